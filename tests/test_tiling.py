"""segany.tiling: the tile grid, model resolution, and the Dask encoding pipeline."""

from __future__ import annotations

import threading
import warnings

import numpy as np
import pytest
import torch

import segany
from segany import CheckpointError, ModelConfig, SegAnyError
from segany.cache import DONE, EMPTY, EmbeddingCache
from segany.raster import Window, open_raster, write_test_raster
from segany.tiling import Cancelled, TileEncoder, TileGrid, check_cancel, encode_raster, resolve_model

# A small encoder with a 256 px input: every test that runs the encoder uses it (fast on CPU).
SMALL = ModelConfig("segany_geo_test", "vit",
                    dict(embed_dim=32, depth=1, num_heads=2, global_attn_indexes=(0,), window_size=4),
                    image_size=256)


def small_model() -> segany.Sam:
    """The small test model, with the same weights on every call."""
    segany.register_config(SMALL, overwrite=True)
    with torch.random.fork_rng():
        torch.manual_seed(0)
        return segany.build_sam(SMALL.name)


def scene(tmp_path, h=300, w=400, name="scene.tif", seed=0, **kw):
    rng = np.random.default_rng(seed)
    return write_test_raster(tmp_path / name, rng.integers(0, 255, (3, h, w)).astype("uint8"), **kw)


# ------------------------------------------------------------------------------ grid


@pytest.mark.parametrize("h, w, size, overlap", [(2500, 1000, 1024, 128), (600, 700, 256, 32), (300, 300, 256, 0),
                                                 (100, 5000, 256, 64), (1024, 1024, 1024, 128)])
def test_grid_covers_the_raster_with_full_tiles_and_overlaps(h, w, size, overlap):
    grid = TileGrid(h, w, size, overlap)
    cover = np.zeros((h, w), np.int32)
    for t in grid:
        assert t.window.shape == (min(size, h), min(size, w))
        assert 0 <= t.window.row0 and t.window.row1 <= h and t.window.col1 <= w
        cover[t.window.slices] += 1
    assert cover.min() >= 1
    for starts in (grid.row_starts, grid.col_starts):
        steps = np.diff(starts)
        assert (size - steps >= overlap).all()  # every overlap at least the requested one
    assert [t.index for t in grid] == list(range(len(grid)))


def test_grid_checks_its_arguments():
    with pytest.raises(SegAnyError, match="overlap"):
        TileGrid(100, 100, 64, 40)
    with pytest.raises(SegAnyError, match="non-empty"):
        TileGrid(0, 100)


def test_best_tile_is_the_most_central_and_raster_edges_are_not_seams():
    grid = TileGrid(600, 700, 256, 32)  # starts rows 0,172,344 cols 0,222,444
    tile, margin = grid.best_tile((300, 290, 310, 300))
    assert (tile.row, tile.col) == (1, 1) and margin > 40
    tile, margin = grid.best_tile((2, 2, 6, 6))  # in the corner: the raster edge cuts nothing
    assert (tile.row, tile.col) == (0, 0) and margin == 250
    _, margin = grid.best_tile((100, 100, 500, 120))  # wider than a tile's interior
    assert margin < 0
    assert grid.seams(grid.tile_at(2, 2).window) == (True, False, True, False)


def test_check_cancel_accepts_events_and_callables():
    check_cancel(None)
    check_cancel(lambda: False)
    with pytest.raises(Cancelled):
        check_cancel(lambda: True)


# ------------------------------------------------------------------------------ models


def test_resolve_model_names_paths_and_default(monkeypatch, tmp_path):
    assert resolve_model(None).model_type == "segany_lite"  # the shipped model, no download
    monkeypatch.setenv("SEGANY_HOME", str(tmp_path))
    monkeypatch.setenv("SEGANY_MODEL", "mobile_sam")  # the default named by the environment
    with pytest.raises(CheckpointError, match="segany fetch mobile_sam"):
        resolve_model(None)
    monkeypatch.delenv("SEGANY_MODEL")
    with pytest.raises(CheckpointError, match="'vit_b' is an architecture.*sam_vit_b"):
        resolve_model("vit_b")
    with pytest.raises(CheckpointError, match="neither an existing file nor a known checkpoint"):
        resolve_model("no_such_model")
    with pytest.warns(UserWarning, match="random"):
        a = resolve_model("test_tiny")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        b = resolve_model("test_tiny")
    # Seeded: two processes (or runs) get the same test weights, so their caches agree.
    assert torch.equal(a.image_encoder.patch_embed.proj.weight, b.image_encoder.patch_embed.proj.weight)


# ------------------------------------------------------------------------------ encoding


class CountingEncoder(TileEncoder):
    def __init__(self, model, fail_after=None):
        super().__init__(model)
        self.calls = 0
        self.tiles = 0
        self.fail_after = fail_after

    def encode(self, images, layout="hwc"):
        self.calls += 1
        self.tiles += len(images)
        return super().encode(images, layout)


def test_encode_matches_the_predictor_tile_by_tile(tmp_path):
    model = small_model()
    raster = open_raster(scene(tmp_path, dtype="uint16"))  # uint16: scene-wide normalisation
    cache = encode_raster(raster, model, tmp_path / "c.zarr", batch_size=3, dtype="float32")
    assert cache.complete and len(cache.grid) == 4
    predictor = segany.SamPredictor(model)
    for i in (0, 3):
        tile = cache.grid[i]
        rgb, _ = raster.read(tile.window)
        predictor.set_image(rgb)
        expected = predictor.get_embedding()
        got = cache.read(i)
        assert got.original_size == expected.original_size and got.input_size == expected.input_size
        torch.testing.assert_close(got.features, expected.features, atol=1e-5, rtol=1e-4)
    # Tiles smaller than the model input are resized exactly as the predictor does.
    small_tiles = encode_raster(raster, model, None, tile_size=200, overlap=20, dtype="float32")
    rgb, _ = raster.read(small_tiles.grid[1].window)
    predictor.set_image(rgb)
    got = small_tiles.read(1)
    assert got.input_size == predictor.input_size == (256, 256)
    torch.testing.assert_close(got.features, predictor.get_embedding().features, atol=1e-5, rtol=1e-4)


def test_progress_cancel_and_resume(tmp_path):
    model = small_model()
    path = scene(tmp_path, 500, 500)
    seen = []
    stop = threading.Event()

    def progress(done, total):
        seen.append((done, total))
        if done >= 2:
            stop.set()

    enc = CountingEncoder(model)
    with pytest.raises(Cancelled):
        encode_raster(path, enc, tmp_path / "c.zarr", batch_size=1, prefetch=1, num_workers=1,
                      progress=progress, cancel=stop)
    partial = EmbeddingCache.open(tmp_path / "c.zarr")
    n_done = len(partial.grid) - len(partial.pending())
    assert 2 <= n_done < len(partial.grid) == 9
    enc2 = CountingEncoder(model)
    progress2 = []
    cache = encode_raster(path, enc2, tmp_path / "c.zarr", batch_size=2,
                          progress=lambda d, t: progress2.append((d, t)))
    assert cache.complete and enc2.tiles == 9 - n_done  # only the rest was encoded
    assert progress2[0] == (n_done, 9) and progress2[-1] == (9, 9)
    # The resumed cache equals one made in a single run.
    full = encode_raster(path, model, None, batch_size=4)
    for i in range(9):
        torch.testing.assert_close(cache.read(i).features, full.read(i).features)


def test_all_nodata_tiles_are_not_encoded(tmp_path):
    data = np.random.default_rng(1).integers(1, 255, (3, 300, 560)).astype("uint8")
    data[:, :, :300] = 0  # the left tiles are nodata
    raster = open_raster(write_test_raster(tmp_path / "nd.tif", data, nodata=0))
    enc = CountingEncoder(small_model())
    cache = encode_raster(raster, enc, None, overlap=16)
    statuses = cache.statuses()
    assert (statuses == EMPTY).sum() >= 2 and (statuses == DONE).sum() >= 1
    assert enc.tiles == (statuses == DONE).sum()
    assert cache.valid_fraction(int(np.flatnonzero(statuses == EMPTY)[0])) == 0


def test_encode_arguments_are_checked(tmp_path):
    with pytest.raises(SegAnyError, match="batch_size"):
        encode_raster(scene(tmp_path), small_model(), batch_size=0)


def test_tile_encoder_embeds_decimated_windows(tmp_path):
    from segany.tiling import read_window_for_model

    enc = TileEncoder(small_model())
    raster = open_raster(scene(tmp_path, 600, 600))
    rgb, valid = read_window_for_model(raster, Window(0, 0, 600, 600), enc.image_size)
    assert rgb.shape == (256, 256, 3)  # the encoder never needs more than its input size
    emb = enc.embed(rgb, original_size=(600, 600))
    assert emb.original_size == (600, 600) and emb.input_size == (256, 256)
