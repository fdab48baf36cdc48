"""Core helpers added for the QGIS front-end (GUI-free; no QGIS import here): prompts from
in-memory features, extents to windows, raster subsets and the caches made from them,
output records in any CRS, kept embeddings for interactive clicks, $SEGANY_MODEL."""

from __future__ import annotations

import numpy as np
import pytest
import shapely
import torch
from pyproj import Transformer

import segany
from segany import PromptError
from segany.cache import EmbeddingCache
from segany.geo import Prompt, bounds_to_window, prompts_from_geometries, to_pixels
from segany.raster import Window, open_raster, write_test_raster
from segany.scene import SamDecoder, SceneObject, TileContext, object_geometry, object_record, segment_everything
from segany.tiling import check_model_spec, default_model_spec, encode_raster, resolve_model
from test_scene import TRANSFORM, ComponentGenerator, make_scene, truth_polygons
from test_tiling import small_model


def test_prompts_from_geometries_follow_the_file_rules():
    geoms = [shapely.Point(1, 2), shapely.MultiPoint([(3, 4), (5, 6)]), shapely.box(0, 0, 2, 3),
             shapely.Point(7, 8).wkb]
    ps = prompts_from_geometries(geoms, labels=[1, "bg", 1, "foreground"], ids=["a", "b", "c", "d"], crs="EPSG:4326")
    assert [p.id for p in ps] == ["a", "b", "c", "d"]
    assert ps[1].points.tolist() == [[3, 4], [5, 6]] and ps[1].labels.tolist() == [0, 0]
    assert ps[2].box.tolist() == [0, 0, 2, 3] and len(ps[2].points) == 0 and ps[3].labels.tolist() == [1]
    grouped = prompts_from_geometries(geoms[:3], groups=["g", "g", "g"])
    assert len(grouped) == 1 and grouped[0].id == "g" and len(grouped[0].points) == 3
    with pytest.raises(PromptError, match=r"^layer x: prompt 'g' has more than one box"):
        prompts_from_geometries([shapely.box(0, 0, 1, 1)] * 2, groups=["g", "g"], source="layer x")
    with pytest.raises(PromptError, match=r"^layer x: LineString features are not prompts"):
        prompts_from_geometries([shapely.LineString([(0, 0), (1, 1)])], source="layer x")
    with pytest.raises(PromptError, match=r"^layer x: feature 7 has no geometry"):
        prompts_from_geometries([None], ids=[7], source="layer x")
    with pytest.raises(PromptError, match=r"^layer x: field 'kind' must hold 1/0 .* got 'maybe'"):
        prompts_from_geometries([shapely.Point(0, 0)], labels=["maybe"], source="layer x", label_name="field 'kind'")
    with pytest.raises(PromptError, match="2 labels for 1 features"):
        prompts_from_geometries([shapely.Point(0, 0)], labels=[1, 0])
    with pytest.raises(PromptError, match="no features"):
        prompts_from_geometries([])
    # Only background points: allowed by default (as in read_prompts), refused on request.
    assert prompts_from_geometries([shapely.Point(0, 0)], labels=[0])[0].labels.tolist() == [0]
    with pytest.raises(PromptError, match="only background"):
        prompts_from_geometries([shapely.Point(0, 0)], labels=[0], require_foreground=True)
    box_only = prompts_from_geometries([shapely.Point(0, 0), shapely.box(0, 0, 1, 1)], labels=[0, 1],
                                       groups=["g", "g"], require_foreground=True)
    assert box_only[0].labels.tolist() == [0]  # a box says which object: fine


def test_bounds_to_window_reprojects_and_rounds_outwards(tmp_path):
    raster = open_raster(make_scene(tmp_path))  # 0.5 m pixels from (400000, 5100000)
    assert bounds_to_window(raster, raster.bounds) == Window(0, 0, 600, 700)  # exact edges: no extra pixel
    assert bounds_to_window(raster, (400010.2, 5099900.0, 400020.0, 5099950.1)) == Window(99, 20, 101, 20)
    to_ll = Transformer.from_crs("EPSG:32633", "EPSG:4326", always_xy=True)
    ll = to_ll.transform_bounds(400010.0, 5099900.0, 400020.0, 5099950.0)
    w = bounds_to_window(raster, ll, "EPSG:4326")
    assert w.row0 <= 100 and w.col0 <= 20 and w.row1 >= 200 and w.col1 >= 40  # covers, densified
    assert w.height < 110 and w.width < 30
    assert bounds_to_window(raster, (-50, -50, 10, 20), "pixel") == Window(0, 0, 20, 10)  # clipped
    with pytest.raises(PromptError, match=r"extent 0, 0, 1, 1 \(in EPSG:4326\) for raster scene.tif: lies outside"):
        bounds_to_window(raster, (0, 0, 1, 1), "EPSG:4326")
    with pytest.raises(PromptError, match="needs xmin < xmax"):
        bounds_to_window(raster, (5, 0, 1, 1))


def test_raster_bounds_are_west_south_east_north(tmp_path):
    raster = open_raster(make_scene(tmp_path))
    assert raster.bounds == (400000.0, 5099700.0, 400350.0, 5100000.0)


def test_a_subset_segments_like_the_scene_in_the_same_map_coordinates(tmp_path):
    raster = open_raster(make_scene(tmp_path))
    part = raster.subset(Window(0, 0, 340, 420))  # objects 0 and 4 lie inside
    assert part.value_range == raster.value_range and part.crs == raster.crs and part.parent is raster
    assert raster.subset(Window(0, 0, 600, 700)) is raster
    raw, valid = part.read_raw(Window(100, 100, 50, 60))
    full_raw, _ = raster.read_raw(Window(100, 100, 50, 60))
    assert (raw == full_raw).all() and valid.all()
    objs = segment_everything(part, generator=ComponentGenerator())
    geoms = sorted((object_geometry(o, part) for o in objs), key=lambda g: g.bounds[0])
    truths = truth_polygons()
    assert len(geoms) == 2
    for got, want in zip(geoms, (truths[4], truths[0])):
        assert got.symmetric_difference(want).area < 1e-9 * want.area
    assert object_record(objs[0], part)["source"] == "scene.tif"  # the real file, not the VRT


def test_a_cache_of_an_extent_is_found_again_from_the_whole_raster(tmp_path):
    model = small_model()
    raster = open_raster(make_scene(tmp_path))
    part = raster.subset(Window(100, 172, 300, 400))
    cache = encode_raster(part, model, tmp_path / "part.zarr", tile_size=256, overlap=32)
    reopened = EmbeddingCache.open(tmp_path / "part.zarr")
    again = reopened.raster_for(open_raster(raster.path))
    assert again.parent_window == Window(100, 172, 300, 400)
    reopened.verify(again, model)  # same pixels, grid and model: usable
    assert reopened.raster_for(raster) is not raster and cache.complete
    assert EmbeddingCache.open(tmp_path / "part.zarr").raster_for(part) is part  # already the subset


def test_an_empty_output_folder_becomes_the_cache(tmp_path):
    (tmp_path / "out").mkdir()
    path = write_test_raster(tmp_path / "r.tif", np.random.default_rng(0).integers(0, 255, (3, 64, 64), "uint8"))
    cache = encode_raster(path, small_model(), tmp_path / "out", tile_size=64, overlap=0)
    assert cache.complete and EmbeddingCache.open(tmp_path / "out").complete


def test_object_records_in_another_crs(tmp_path):
    raster = open_raster(make_scene(tmp_path))
    obj = SceneObject(np.ones((60, 60), bool), 50, 70, 0.8, 0.9, "p")
    rec = object_record(obj, raster, to_crs="EPSG:4326", model_name="m")
    want = shapely.box(*(TRANSFORM @ (70, 110)), *(TRANSFORM @ (130, 50)))
    to_ll = Transformer.from_crs("EPSG:32633", "EPSG:4326", always_xy=True)
    want_ll = shapely.transform(shapely.segmentize(want, 1.0), lambda xy: np.column_stack(to_ll.transform(*xy.T)))
    assert rec["geometry"].symmetric_difference(want_ll).area < 1e-6 * want_ll.area
    assert rec["area"] == pytest.approx(want.area) and rec["area_unit"] == "m2"  # measured in the raster's CRS
    assert object_geometry(obj, raster).equals(want)


def test_sam_decoder_keeps_recent_window_embeddings(tmp_path):
    model = small_model()
    raster = open_raster(write_test_raster(tmp_path / "k.tif",
                                           np.random.default_rng(0).integers(0, 255, (3, 300, 300), "uint8")))
    decoder = SamDecoder(model, keep=2)
    windows = [Window(0, 0, 256, 256), Window(44, 44, 256, 256), Window(0, 44, 256, 256)]
    encoded = []

    class Counting(TileContext):
        @property
        def embedding(self):
            encoded.append(self.window)
            return TileContext(self.raster, self.window, encoder=decoder_encoder).embedding

    from segany.tiling import as_encoder

    decoder_encoder = as_encoder(model)
    args = (np.array([[[10.0, 10.0]]]), np.array([[1]]), None, True)
    for w in (windows[0], windows[0], windows[1], windows[0], windows[2], windows[1]):
        decoder(Counting(raster, w), *args)
    # 0 kept; 0 again (no encode); 1; 0 (kept); 2 (drops 1, the least recent); 1 (again encoded)
    assert encoded == [windows[0], windows[1], windows[2], windows[1]]
    assert SamDecoder(model).keep == 0


def test_segany_model_names_the_default_model(tmp_path, monkeypatch):
    with torch.random.fork_rng():
        torch.manual_seed(0)
        torch.save(segany.build_sam("test_tiny").state_dict(), tmp_path / "tiny.pth")
    monkeypatch.delenv("SEGANY_MODEL", raising=False)
    assert default_model_spec() is None
    monkeypatch.setenv("SEGANY_MODEL", str(tmp_path / "tiny.pth"))
    assert default_model_spec() == str(tmp_path / "tiny.pth")
    check_model_spec(None)  # no error: the variable names an existing checkpoint
    model = resolve_model(None)
    assert model.model_type == "test_tiny" and model.checkpoint_path == str(tmp_path / "tiny.pth")
    monkeypatch.setenv("SEGANY_MODEL", str(tmp_path / "missing.pth"))
    with pytest.raises(segany.CheckpointError, match="missing.pth"):
        resolve_model(None)
    monkeypatch.setenv("SEGANY_MODEL", "  ")
    assert default_model_spec() is None


def test_prompts_from_features_place_like_prompt_files(tmp_path):
    raster = open_raster(make_scene(tmp_path))
    x, y = TRANSFORM @ (240.5, 240.5)
    lon, lat = Transformer.from_crs("EPSG:32633", "EPSG:4326", always_xy=True).transform(x, y)
    p = prompts_from_geometries([shapely.Point(lon, lat).wkb], crs="EPSG:4326")[0]
    pixel = to_pixels([p], raster)[0]
    np.testing.assert_allclose(pixel.points, [[240.5, 240.5]], atol=1e-6)
    assert isinstance(p, Prompt) and p.id == 0
