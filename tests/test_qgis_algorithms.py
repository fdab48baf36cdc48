"""The segany Processing algorithms in a real headless QGIS, through ``processing.run``.

The scene is test_scene's: a UTM 33N raster (0.5 m pixels, 600 x 700) with five objects of
known outline, cut by 256 px tiles. Prompt layers are in OTHER CRSs (WGS 84 points, Web
Mercator boxes, a WGS 84 extent), so the algorithms must reproject them. Where the test
checks that polygons land on the objects, SAM's decoder and mask generator are replaced by
test_scene's stand-ins (the bright region under a prompt), the only way to get known
outlines without trained weights; everything else (model loading, tiling, reprojection,
seams, sinks, progress, cancel) is the real code. The real small model runs every
algorithm end to end too.
"""

from __future__ import annotations

import warnings

import pytest
import shapely
import torch
from pyproj import Transformer

from test_qgis_app import qgis_app

qgis_app()

import processing  # noqa: E402
from qgis.core import (  # noqa: E402
    QgsFeature,
    QgsField,
    QgsGeometry,
    QgsPointXY,
    QgsProcessingException,
    QgsProcessingFeedback,
    QgsRectangle,
    QgsVectorLayer,
)
from qgis.PyQt.QtCore import QVariant, Qt  # noqa: E402

import segany.scene  # noqa: E402
from segany.cache import EmbeddingCache  # noqa: E402
from test_scene import (  # noqa: E402
    GRID,
    TRANSFORM,
    ComponentGenerator,
    centre_lonlat,
    flood_decoder,
    make_scene,
    object_masks,
    truth_polygons,
)
from test_tiling import small_model  # noqa: E402

TO_MERCATOR = Transformer.from_crs("EPSG:32633", "EPSG:3857", always_xy=True)


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """The scene and a checkpoint of the small test model (256 px input: tiles = GRID)."""
    d = tmp_path_factory.mktemp("qgis_algs")
    torch.save(small_model().state_dict(), d / "small.pth")
    return {"dir": d, "scene": str(make_scene(d)), "checkpoint": str(d / "small.pth")}


@pytest.fixture
def stand_ins(monkeypatch):
    """SAM's decoder and generator replaced by the known-outline stand-ins."""
    generators = []

    def generator(*_args, **_kwargs):
        generators.append(ComponentGenerator())
        return generators[-1]

    monkeypatch.setattr(segany.scene, "SamDecoder", lambda *_a, **_k: flood_decoder)
    monkeypatch.setattr(segany.scene, "AmgGenerator", generator)
    return generators


def point_layer(points, crs="EPSG:4326", fields=(("label", QVariant.Int),), values=None, name="clicks"):
    layer = QgsVectorLayer(f"Point?crs={crs}", name, "memory")
    layer.dataProvider().addAttributes([QgsField(n, t) for n, t in fields])
    layer.updateFields()
    feats = []
    for i, (x, y) in enumerate(points):
        f = QgsFeature(layer.fields())
        f.setGeometry(QgsGeometry.fromPointXY(QgsPointXY(x, y)))
        f.setAttributes(list(values[i]) if values is not None else [1])
        feats.append(f)
    layer.dataProvider().addFeatures(feats)
    return layer


def box_layer(boxes, crs="EPSG:3857", name="detections"):
    layer = QgsVectorLayer(f"Polygon?crs={crs}", name, "memory")
    feats = []
    for b in boxes:
        f = QgsFeature()
        f.setGeometry(QgsGeometry.fromRect(QgsRectangle(*b)))
        feats.append(f)
    layer.dataProvider().addFeatures(feats)
    return layer


def features(layer):
    return sorted(layer.getFeatures(), key=lambda f: str(f["prompt_id"]))


def shapely_geom(feature):
    return shapely.from_wkb(bytes(feature.geometry().asWkb()))


def assert_on(geom, truth, tol=1e-9):
    assert geom.symmetric_difference(truth).area <= tol * truth.area, (geom.bounds, truth.bounds)


# ------------------------------------------------------------------------------ where objects land


def test_segment_prompts_reprojects_points_and_boxes_onto_the_objects(files, stand_ins):
    masks, truths = object_masks(), truth_polygons()
    # Object 0 by one click; object 4 by a click plus a background click (grouped); in WGS 84.
    pts = [centre_lonlat(masks[0]), centre_lonlat(masks[4]), (15.0, 45.0)]
    lon, lat = centre_lonlat(masks[4])
    pts[2] = (lon + 0.0005, lat)  # background, outside object 4 (about 40 m east)
    points = point_layer(pts, fields=(("label", QVariant.Int), ("obj", QVariant.String)),
                         values=[(1, "a"), (1, "b"), (0, "b")])
    # Object 1 by a detector's box in Web Mercator (EPSG:3857).
    x0, y0, x1, y1 = truths[1].buffer(3).bounds
    mx0, my0, mx1, my1 = TO_MERCATOR.transform_bounds(x0, y0, x1, y1)
    boxes = box_layer([(mx0, my0, mx1, my1)])
    result = processing.run("segany:segment_prompts", {
        "INPUT": files["scene"], "POINTS": points, "GROUP_FIELD": "obj", "BOXES": boxes,
        "CHECKPOINT": files["checkpoint"], "OUTPUT": "memory:"})
    out = result["OUTPUT"]
    assert result["N_OBJECTS"] == 3 and out.featureCount() == 3
    assert out.crs().authid() == "EPSG:32633"  # the raster's CRS: map coordinates
    got = {str(f["prompt_id"]): f for f in out.getFeatures()}
    assert set(got) == {"a", "b", "box 1"}
    assert_on(shapely_geom(got["a"]), truths[0])
    assert_on(shapely_geom(got["b"]), truths[4])
    assert_on(shapely_geom(got["box 1"]), truths[1])  # 460 px wide: whole across 3 tiles
    assert got["a"]["area"] == pytest.approx(truths[0].area) and got["a"]["area_unit"] == "m2"
    assert got["a"]["source"] == "scene.tif" and got["a"]["model"] == "segany_geo_test:small.pth"
    assert 0 < got["a"]["predicted_iou"] <= 1


def test_automatic_finds_every_object_once_and_honours_an_extent_in_another_crs(files, stand_ins, tmp_path):
    out = tmp_path / "auto.gpkg"
    result = processing.run("segany:automatic", {"INPUT": files["scene"], "CHECKPOINT": files["checkpoint"],
                                                 "OUTPUT": str(out)})
    assert result["OUTPUT"] == str(out) and result["N_OBJECTS"] == 5
    assert len(stand_ins[-1].windows) == len(GRID)  # the model's 256 px tiles
    layer = QgsVectorLayer(str(out), "auto", "ogr")
    assert layer.featureCount() == 5 and layer.crs().authid() == "EPSG:32633"
    geoms = [shapely_geom(f) for f in layer.getFeatures()]
    for truth in truth_polygons():  # seams merged: each object exactly once, whole
        assert sum(g.symmetric_difference(truth).area <= 1e-9 * truth.area for g in geoms) == 1

    # An extent in WGS 84 around pixel rows 0-340, columns 0-420: objects 0 and 4 only.
    left, top = TRANSFORM @ (0, 0)
    right, bottom = TRANSFORM @ (420, 340)
    lon0, lat0, lon1, lat1 = Transformer.from_crs("EPSG:32633", "EPSG:4326", always_xy=True).transform_bounds(
        left, bottom, right, top)
    result = processing.run("segany:automatic", {
        "INPUT": files["scene"], "CHECKPOINT": files["checkpoint"], "OUTPUT": "memory:",
        "EXTENT": f"{lon0},{lon1},{lat0},{lat1} [EPSG:4326]"})
    geoms = sorted((shapely_geom(f) for f in result["OUTPUT"].getFeatures()), key=lambda g: g.bounds[0])
    truths = truth_polygons()
    assert len(geoms) == 2
    assert_on(geoms[0], truths[4])
    assert_on(geoms[1], truths[0])  # map coordinates of the whole scene, not of the extent
    assert {f["source"] for f in result["OUTPUT"].getFeatures()} == {"scene.tif"}


# ------------------------------------------------------------------------------ the real model


def test_real_model_encode_then_automatic_and_prompts_from_the_cache(files, tmp_path):
    cache_dir = tmp_path / "scene.zarr"
    feedback = QgsProcessingFeedback()
    steps = []
    # Direct: the encoder reports from its Dask threads, and no event loop runs here.
    feedback.progressChanged.connect(steps.append, Qt.DirectConnection)
    result = processing.run("segany:encode", {"INPUT": files["scene"], "CHECKPOINT": files["checkpoint"],
                                              "OUTPUT": str(cache_dir)}, feedback=feedback)
    assert result["N_TILES"] == 9 and steps[-1] == pytest.approx(100)
    cache = EmbeddingCache.open(cache_dir)
    assert cache.complete and cache.model_type == "segany_geo_test"

    result = processing.run("segany:automatic", {
        "INPUT": files["scene"], "CHECKPOINT": files["checkpoint"], "CACHE": str(cache_dir), "OUTPUT": "memory:",
        "POINTS_PER_SIDE": 2, "PRED_IOU_THRESH": 0.0, "STABILITY_SCORE_THRESH": 0.0})
    layer = result["OUTPUT"]
    bounds = shapely.box(*TRANSFORM @ (0, 600), *TRANSFORM @ (700, 0))
    assert layer.featureCount() == result["N_OBJECTS"] > 0  # random weights: some masks, anywhere
    for f in layer.getFeatures():
        g = shapely_geom(f)
        assert g.is_valid and bounds.buffer(1e-6).contains(g)

    points = point_layer([centre_lonlat(m) for m in object_masks()])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # random weights may find no object at a point: a warning
        result = processing.run("segany:segment_prompts", {
            "INPUT": files["scene"], "POINTS": points, "CHECKPOINT": files["checkpoint"], "CACHE": str(cache_dir),
            "OUTPUT": "memory:"})
    assert result["OUTPUT"].featureCount() == result["N_OBJECTS"]
    for f in result["OUTPUT"].getFeatures():
        assert shapely_geom(f).is_valid and str(f["prompt_id"]).startswith("point ")


# ------------------------------------------------------------------------------ cancel


def cancelling_feedback(after_percent):
    feedback = QgsProcessingFeedback()

    def check(percent):
        if percent >= after_percent:
            feedback.cancel()

    feedback.progressChanged.connect(check, Qt.DirectConnection)  # progress may come from worker threads
    return feedback


def test_cancel_stops_automatic_and_encode_mid_run_and_encode_resumes(files, stand_ins, tmp_path):
    feedback = cancelling_feedback(30)
    result = processing.run("segany:automatic", {"INPUT": files["scene"], "CHECKPOINT": files["checkpoint"],
                                                 "OUTPUT": "memory:"}, feedback=feedback)
    assert feedback.isCanceled()
    assert 1 <= len(stand_ins[-1].windows) < len(GRID)  # stopped after a few of the 9 tiles
    assert result["OUTPUT"].featureCount() == result["N_OBJECTS"] < 5  # what was final is kept

    cache_dir = tmp_path / "c.zarr"
    feedback = cancelling_feedback(1)
    params = {"INPUT": files["scene"], "CHECKPOINT": files["checkpoint"], "OUTPUT": str(cache_dir),
              "BATCH_SIZE": 1}
    result = processing.run("segany:encode", params, feedback=feedback)
    assert feedback.isCanceled() and result["N_TILES"] < 9
    pending = len(EmbeddingCache.open(cache_dir).pending())
    assert 0 < pending < 9  # the tiles encoded before the cancel are kept ...
    result = processing.run("segany:encode", params)
    assert result["N_TILES"] == 9 and EmbeddingCache.open(cache_dir).complete  # ... and the rest follows


# ------------------------------------------------------------------------------ bad input


def run_error(alg, params):
    with pytest.raises(QgsProcessingException) as info:
        processing.run(alg, params)
    return str(info.value)


def test_bad_input_gives_clear_errors(files, stand_ins, tmp_path):
    base = {"INPUT": files["scene"], "CHECKPOINT": files["checkpoint"], "OUTPUT": "memory:"}
    assert "give prompts: a point layer (POINTS) and/or a box layer (BOXES)" in run_error(
        "segany:segment_prompts", base)
    far = point_layer([(2.0, 48.0)], name="paris")
    message = run_error("segany:segment_prompts", dict(base, POINTS=far))
    assert message.startswith("prompt point 1 for raster scene.tif: point (2, 48) in EPSG:4326")
    assert "lies outside the raster" in message
    bad_labels = point_layer([centre_lonlat(object_masks()[0])], fields=(("kind", QVariant.Int),), values=[(7,)])
    assert run_error("segany:segment_prompts", dict(base, POINTS=bad_labels, LABEL_FIELD="kind")).startswith(
        "point layer 'clicks': field 'kind' must hold 1/0 (or positive/negative), got 7")
    background = point_layer([centre_lonlat(object_masks()[0])], values=[(0,)])
    assert "has only background (label 0) points" in run_error("segany:segment_prompts", dict(base, POINTS=background))
    junk = tmp_path / "junk.pth"
    junk.write_text("<html>not a model</html>")
    message = run_error("segany:automatic", dict(base, CHECKPOINT=str(junk)))
    assert message.startswith(f"{junk} is not a PyTorch checkpoint")
    message = run_error("segany:automatic", dict(base, CHECKPOINT=str(tmp_path / "missing.pth")))
    assert "missing.pth" in message
    message = run_error("segany:automatic", dict(base, EXTENT="0,1,0,1 [EPSG:4326]"))
    assert message.startswith("raster layer 'scene': extent 0, 0, 1, 1 (in EPSG:4326) for raster scene.tif: lies outside")
    message = run_error("segany:automatic", dict(base, BANDS=[1, 2]))
    assert "raster layer 'scene'" in message and "choose 1 band (grey) or 3 bands (RGB), got 2" in message
    other = make_scene(tmp_path, name="other.tif", dtype="int32")
    processing.run("segany:encode", {"INPUT": str(other), "CHECKPOINT": files["checkpoint"],
                                     "OUTPUT": str(tmp_path / "other.zarr")})
    message = run_error("segany:automatic", dict(base, CACHE=str(tmp_path / "other.zarr")))
    assert "other.zarr was made for" in message and "not for scene.tif" in message
    message = run_error("segany:automatic", dict(base, CACHE=str(tmp_path)))
    assert "not a segany embedding cache" in message or "not a readable zarr" in message
