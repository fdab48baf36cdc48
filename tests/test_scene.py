"""segany.scene: prompts in map coordinates across tiles, automatic mode merged at seams.

The scene: a UTM 33N raster (EPSG:32633, 0.5 m pixels) cut into 256 px tiles overlapping by
32 px, with five objects: one crossing four tiles, one wider than a tile, one lying inside
the overlap of four tiles, one crossing a row seam at the raster's edge, one inside a
single tile. A stand-in for SAM segments "the bright connected region under the prompt",
so every object has an exact, known outline to compare with, in map coordinates.
"""

from __future__ import annotations

import warnings

import geopandas as gpd
import numpy as np
import pytest
import rasterio
import shapely
from affine import Affine
from pyproj import Transformer
from scipy import ndimage

from segany import PromptError
from segany.geo import Prompt, apply_affine, read_prompts, to_pixels
from segany.raster import open_raster, write_test_raster
from segany.scene import (
    SamDecoder,
    SceneWriter,
    TileContext,
    auto_file,
    segment,
    segment_everything,
    segment_file,
)
from segany.tiling import Cancelled, TileGrid, encode_raster
from segany.vectorize import mask_to_geometry
from test_tiling import small_model

H, W = 600, 700
TRANSFORM = Affine(0.5, 0, 400000.0, 0, -0.5, 5100000.0)
GRID = TileGrid(H, W, 256, 32)  # rows start 0, 172, 344; columns 0, 222, 444
TO_LONLAT = Transformer.from_crs("EPSG:32633", "EPSG:4326", always_xy=True)


def object_masks() -> list[np.ndarray]:
    yy, xx = np.mgrid[0:H, 0:W]
    ellipse = lambda cy, cx, ry, rx: ((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2 <= 1  # noqa: E731
    rect = lambda r0, r1, c0, c1: (yy >= r0) & (yy < r1) & (xx >= c0) & (xx < c1)  # noqa: E731
    return [
        ellipse(240, 240, 50, 70),  # crosses two row seams and two column seams (4 tiles)
        rect(440, 500, 100, 560),  # 460 px: wider than a tile, spans 3 tiles
        rect(190, 235, 450, 472),  # inside the overlap of 4 tiles: a duplicate trap
        ellipse(350, 640, 60, 40),  # crosses a row seam next to the raster's right edge
        ellipse(80, 100, 30, 30),  # inside one tile
    ]


def make_scene(tmp_path, name="scene.tif", dtype="uint16", **kw):
    data = np.full((3, H, W), 500, dtype)
    for k, m in enumerate(object_masks()):
        data[:, m] = 3000 + 100 * k
    return write_test_raster(tmp_path / name, data, transform=TRANSFORM, **kw)


def truth_polygons():
    return [mask_to_geometry(m, TRANSFORM) for m in object_masks()]


def centre_lonlat(mask: np.ndarray) -> tuple[float, float]:
    """An interior pixel's centre in EPSG:4326."""
    rows, cols = np.nonzero(ndimage.binary_erosion(mask, iterations=3))
    k = len(rows) // 2
    x, y = apply_affine(TRANSFORM, cols[k] + 0.5, rows[k] + 0.5)
    return TO_LONLAT.transform(x, y)


def flood_decoder(ctx, points, labels, boxes, multimask):
    """Stand-in for SAM: the bright connected region under the (first positive) point or
    the box centre, seen in this window only (so a tile cuts it, as SAM's view would)."""
    rgb, _valid = ctx.pixels
    lab, _ = ndimage.label(rgb[..., 0] > 127)
    n = len(points) if points is not None else len(boxes)
    out = []
    for b in range(n):
        if points is not None:
            x, y = points[b][labels[b] == 1][0]
        else:
            x, y = (boxes[b][0] + boxes[b][2]) / 2, (boxes[b][1] + boxes[b][3]) / 2
        v = lab[int(round(y)), int(round(x))]
        out.append(lab == v if v else np.zeros(lab.shape, bool))
    return np.stack(out), np.full(n, 0.9), np.full(n, 0.95)


class ComponentGenerator:
    """Stand-in for the automatic mask generator: every bright connected region of a tile."""

    def __init__(self):
        self.windows = []

    def __call__(self, ctx):
        self.windows.append(ctx.window)
        rgb, _valid = ctx.pixels
        lab, n = ndimage.label(rgb[..., 0] > 127)
        return [{"segmentation": lab == i, "predicted_iou": 0.9, "stability_score": 0.95} for i in range(1, n + 1)]


def assert_same_geometry(got, want, tol=1e-9):
    assert got.symmetric_difference(want).area <= tol * want.area, (got.bounds, want.bounds)


# ------------------------------------------------------------------------------ prompts


def test_prompts_in_wgs84_give_whole_objects_in_the_right_place(tmp_path):
    raster = open_raster(make_scene(tmp_path))
    masks = object_masks()
    prompts = [Prompt.point(*centre_lonlat(m), id=f"obj{k}", crs="EPSG:4326") for k, m in enumerate(masks)]
    out = tmp_path / "objects.gpkg"
    n = segment_file(raster, prompts, out, decoder=flood_decoder, grid=GRID, masks=tmp_path / "masks.tif")
    assert n == 5
    gdf = gpd.read_file(out).sort_values("prompt_id").reset_index(drop=True)  # written as decoded, tile by tile
    assert gdf.crs.to_epsg() == 32633 and list(gdf.prompt_id) == [f"obj{k}" for k in range(5)]
    for geom, truth in zip(gdf.geometry, truth_polygons()):
        assert len(geom.geoms) == 1  # one polygon per object
        assert_same_geometry(geom, truth)
    assert list(gdf.area_unit) == ["m2"] * 5
    np.testing.assert_allclose(gdf["area"], [t.area for t in truth_polygons()])
    assert gdf.n_tiles[0] >= 2 and gdf.n_tiles[1] >= 2 and gdf.n_tiles[4] == 1  # refined across seams
    with rasterio.open(tmp_path / "masks.tif") as src:
        labels = src.read(1)
    for k, m in enumerate(masks):
        assert (labels[m] == gdf.id[k]).all()
    assert (labels > 0).sum() == sum(m.sum() for m in masks)


def test_box_prompts_are_reprojected_with_their_edges(tmp_path):
    raster = open_raster(make_scene(tmp_path))
    truth = truth_polygons()[1]
    x0, y0, x1, y1 = truth.buffer(3).bounds
    lon0, lat0, lon1, lat1 = Transformer.from_crs("EPSG:32633", "EPSG:4326", always_xy=True).transform_bounds(
        x0, y0, x1, y1)
    objs = segment(raster, [Prompt.from_box([lon0, lat0, lon1, lat1], crs="EPSG:4326")], decoder=flood_decoder,
                   grid=GRID)
    box = to_pixels([Prompt.from_box([lon0, lat0, lon1, lat1], crs="EPSG:4326")], raster)[0].box
    assert box[0] <= 100 and box[2] >= 560 and box[1] <= 440 and box[3] >= 500  # covers the object
    assert_same_geometry(mask_to_geometry(objs[0].mask, raster.window_transform(objs[0].window)), truth)


def test_reprojected_output_and_simplification(tmp_path):
    raster = open_raster(make_scene(tmp_path))
    prompts = [Prompt.point(*centre_lonlat(object_masks()[0]), crs="EPSG:4326")]
    segment_file(raster, prompts, tmp_path / "ll.geojson", decoder=flood_decoder, grid=GRID,
                 to_crs="EPSG:4326", simplify=0.5)
    gdf = gpd.read_file(tmp_path / "ll.geojson")
    truth = gpd.GeoSeries(truth_polygons()[:1], crs="EPSG:32633").to_crs("EPSG:4326")[0]
    assert gdf.crs.to_epsg() == 4326 and gdf.geometry[0].is_valid
    assert gdf.geometry[0].symmetric_difference(truth).area < 0.02 * truth.area


def test_prompts_outside_or_in_an_unusable_crs_are_clear_errors(tmp_path):
    raster = open_raster(make_scene(tmp_path))
    with pytest.raises(PromptError, match=r"prompt far for raster scene\.tif: point \(2, 48\) in EPSG:4326 .*"
                                          r"lies outside the raster \(700 x 600 pixels"):
        segment(raster, [Prompt.point(2.0, 48.0, id="far", crs="EPSG:4326")], decoder=flood_decoder)
    with pytest.raises(PromptError, match=r"point \(800, 10\) in pixels, which lies outside"):
        segment(raster, [Prompt.point(800, 10, crs="pixel")], decoder=flood_decoder)
    with pytest.raises(PromptError, match="unknown coordinate reference system"):
        to_pixels([Prompt.point(1, 2, crs="EPSG:999999")], raster)
    with pytest.raises(PromptError, match="box .* lies outside the raster"):
        to_pixels([Prompt.from_box([0, 0, 1, 1], crs="EPSG:4326")], raster)
    with pytest.warns(UserWarning, match="no coordinate reference system"):
        plain = open_raster(write_test_raster(tmp_path / "plain.tif", np.ones((1, 50, 50), "uint8"), crs=None))
    with pytest.raises(PromptError, match="the raster has no CRS, so prompts in EPSG:4326 cannot be placed"):
        to_pixels([Prompt.point(15, 45, crs="EPSG:4326")], plain)
    assert to_pixels([Prompt.point(10, 20)], plain)[0].points.tolist() == [[10, 20]]  # pixels
    data = np.ones((1, 60, 60), "uint8")
    data[0, :, :30] = 0
    collar = open_raster(write_test_raster(tmp_path / "collar.tif", data, nodata=0))
    with pytest.raises(PromptError, match=r"prompt 0 for raster collar.tif: point at pixel \(10.5, 5.5\) lies on a nodata"):
        segment(collar, [Prompt.point(10.5, 5.5, crs="pixel")], decoder=flood_decoder)


def test_prompt_files_with_labels_groups_and_boxes(tmp_path):
    pts = [shapely.Point(15.0, 45.0), shapely.Point(15.001, 45.0), shapely.box(15, 45, 15.01, 45.01)]
    gpd.GeoDataFrame({"label": ["positive", "neg", 1], "obj": ["a", "a", "b"]}, geometry=pts,
                     crs="EPSG:4326").to_file(tmp_path / "p.gpkg")
    grouped = read_prompts(tmp_path / "p.gpkg", group_field="obj")
    assert [(p.id, p.labels.tolist(), p.box is not None) for p in grouped] == [("a", [1, 0], False), ("b", [], True)]
    assert grouped[0].crs.to_epsg() == 4326
    with pytest.raises(PromptError, match="has no column 'nope'"):
        read_prompts(tmp_path / "p.gpkg", group_field="nope")
    gpd.GeoDataFrame({"label": [7]}, geometry=[shapely.Point(0, 0)], crs="EPSG:4326").to_file(tmp_path / "bad.geojson")
    with pytest.raises(PromptError, match="column 'label' must hold 1/0"):
        read_prompts(tmp_path / "bad.geojson")
    (tmp_path / "junk.gpkg").write_bytes(b"junk")
    with pytest.raises(PromptError, match="cannot be read as vector data"):
        read_prompts(tmp_path / "junk.gpkg")


def test_sam_decoder_uses_the_cached_tile_embedding(tmp_path):
    model = small_model()
    raster = open_raster(make_scene(tmp_path))
    cache = encode_raster(raster, model, None, tile_size=256, overlap=32, dtype="float32")
    seen = []

    class Spy(SamDecoder):
        def __call__(self, ctx, *args):
            seen.append((ctx.tile.index if ctx.tile else None, ctx.embedding.features))
            return super().__call__(ctx, *args)

    prompt = Prompt.point(*centre_lonlat(object_masks()[4]), crs="EPSG:4326")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # random weights may find no object: a warning, not an error
        objs = segment(raster, [prompt], model, cache=cache, decoder=Spy(model), refine=False)
    tile, features = seen[0]
    assert tile == 0 and (features == cache.read(0).features).all()
    assert len(objs) <= 1 and all(o.mask.dtype == bool for o in objs)
    masks, iou, stab = SamDecoder(model)(TileContext(raster, GRID[4].window, tile=GRID[4], cache=cache),
                                         np.array([[[10.0, 20.0]]]), np.array([[1]]), None, True)
    assert masks.shape == (1, 256, 256) and iou.shape == (1,) and 0 <= stab[0] <= 1


# ------------------------------------------------------------------------------ automatic mode


def test_automatic_mode_gives_one_object_per_real_object(tmp_path):
    raster = open_raster(make_scene(tmp_path))
    gen = ComponentGenerator()
    objs = segment_everything(raster, generator=gen, grid=GRID)
    assert len(gen.windows) == len(GRID) == 9
    truths = truth_polygons()
    assert len(objs) == len(truths)  # seams merged, the 4-tile duplicate removed
    got = sorted(objs, key=lambda o: (o.row0, o.col0))
    want = sorted(zip(object_masks(), truths), key=lambda mt: (np.nonzero(mt[0])[0].min(), np.nonzero(mt[0])[1].min()))
    for o, (mask, truth) in zip(got, want):
        assert_same_geometry(mask_to_geometry(o.mask, raster.window_transform(o.window)), truth)
    by_area = {o.area: o for o in objs}
    assert by_area[45 * 22].n_tiles == 4  # seen whole by four tiles, kept once


def test_a_u_shaped_object_whose_arms_cross_a_seam_comes_out_whole(tmp_path):
    """The bend lies in the left tile, the two arms reach into the right one: the right
    tile sees two separate pieces (one thin arm, one thick), the left one the whole U. On
    the tiles' overlap the thin arm covers a quarter of the U, so the plain IoU rule would
    leave it apart; matching connected pieces on the overlap joins both arms."""
    yy, xx = np.mgrid[0:H, 0:W]
    u = ((yy >= 30) & (yy < 140) & (xx >= 140) & (xx < 170))  # the bend (left tile only)
    u |= (yy >= 30) & (yy < 40) & (xx >= 140) & (xx < 420)  # thin arm, 10 px
    u |= (yy >= 110) & (yy < 140) & (xx >= 140) & (xx < 420)  # thick arm, 30 px
    data = np.full((3, H, W), 500, "uint16")
    data[:, u] = 3000
    raster = open_raster(write_test_raster(tmp_path / "u.tif", data, transform=TRANSFORM))
    objs = segment_everything(raster, generator=ComponentGenerator(), grid=GRID)
    assert len(objs) == 1, [(o.row0, o.col0, o.area) for o in objs]
    assert_same_geometry(mask_to_geometry(objs[0].mask, raster.window_transform(objs[0].window)),
                         mask_to_geometry(u, TRANSFORM))
    assert objs[0].n_tiles == 2


def test_objects_touching_across_a_seam_stay_apart(tmp_path):
    """Two different objects side by side on the overlap (each one piece) are not joined by
    the piece matching: it only applies to pieces of one mask."""
    yy, xx = np.mgrid[0:H, 0:W]
    left = (yy >= 40) & (yy < 120) & (xx >= 150) & (xx < 240)  # ends inside the overlap (222-256)
    right = (yy >= 40) & (yy < 120) & (xx >= 241) & (xx < 330)  # starts inside it, 1 px apart
    data = np.full((3, H, W), 500, "uint16")
    data[:, left | right] = 3000
    raster = open_raster(write_test_raster(tmp_path / "two.tif", data, transform=TRANSFORM))
    areas = sorted(o.area for o in segment_everything(raster, generator=ComponentGenerator(), grid=GRID))
    assert areas == sorted([int(left.sum()), int(right.sum())])


def test_automatic_mode_streams_objects_tile_by_tile_to_disk(tmp_path):
    raster = open_raster(make_scene(tmp_path))
    events = []
    out = tmp_path / "auto.fgb"
    with SceneWriter(raster, out, tmp_path / "auto.tif", model_name="stand-in") as writer:
        def sink(obj):
            events.append("object")
            writer(obj)

        n = segment_everything(raster, generator=ComponentGenerator(), grid=GRID, sink=sink,
                               progress=lambda d, t: events.append(f"tile{d}"))
    assert n == 5 and events[-1] == "tile9"
    assert events.index("object") < events.index("tile4")  # the first object is written early
    gdf = gpd.read_file(out)
    assert len(gdf) == 5 and set(gdf.model) == {"stand-in"} and set(gdf.source) == {"scene.tif"}
    assert sorted(gdf.geometry.area.round(2)) == sorted(round(t.area, 2) for t in truth_polygons())


def test_automatic_mode_skips_nodata_tiles_and_cancels(tmp_path):
    data = np.zeros((1, H, W), "uint16")
    data[0, :, 480:] = 1000  # only the last column of tiles (444-700) has data
    data[0, 100:150, 500:560] = 5000
    raster = open_raster(write_test_raster(tmp_path / "nd.tif", data, nodata=0, transform=TRANSFORM))
    gen = ComponentGenerator()
    objs = segment_everything(raster, generator=gen, grid=GRID)
    assert {w.col0 for w in gen.windows} == {444}  # only the column of tiles with data
    assert len(objs) == 1 and objs[0].area == 50 * 60
    with pytest.raises(Cancelled):
        segment_everything(raster, generator=gen, grid=GRID, cancel=lambda: True)


def test_automatic_mode_with_the_real_generator_and_cache(tmp_path):
    model = small_model()
    pixels = np.random.default_rng(0).integers(0, 255, (3, 300, 300)).astype("uint8")
    raster = open_raster(write_test_raster(tmp_path / "small.tif", pixels))
    n = auto_file(raster, tmp_path / "auto.gpkg", model, cache=tmp_path / "c.zarr", points_per_side=2,
                  pred_iou_thresh=0.0, stability_score_thresh=0.0)
    gdf = gpd.read_file(tmp_path / "auto.gpkg")
    assert len(gdf) == n and gdf.geometry.is_valid.all()
    assert (tmp_path / "c.zarr").exists() and set(gdf.model) == {"segany_geo_test"}
