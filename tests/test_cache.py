"""segany.cache: the zarr embedding cache: attributes, mismatches, atomic tiles, resume."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import zarr

import segany
from segany.cache import CacheError, CacheMismatchError, EmbeddingCache
from segany.raster import open_raster, write_test_raster
from segany.tiling import TileGrid, encode_raster
from test_tiling import CountingEncoder, scene, small_model


@pytest.fixture
def raster(tmp_path):
    return open_raster(scene(tmp_path, 300, 400))


def test_attributes_describe_everything_the_embeddings_depend_on(tmp_path, raster):
    model = small_model()
    cache = encode_raster(raster, model, tmp_path / "c.zarr")
    attrs = dict(zarr.open_group(str(tmp_path / "c.zarr")).attrs)
    assert attrs["segany_version"] == segany.__version__ and attrs["segany_cache"] == 1
    assert attrs["raster"]["width"] == 400 and "UTM zone 33N" in attrs["raster"]["crs"]
    assert len(attrs["raster"]["pixels_sha256"]) == 64
    assert attrs["bands"] == [1, 2, 3] and attrs["normalisation"]["value_range"] is None
    assert attrs["grid"] == {"height": 300, "width": 400, "tile_size": 256, "overlap": 32}
    assert attrs["model"]["type"] == "segany_geo_test" and len(attrs["model"]["weights"]) == 16
    assert attrs["dtype"] == "float16"
    assert cache.read(0).features.dtype == torch.float32
    assert repr(cache).startswith("EmbeddingCache(") and "4/4 tiles" in repr(cache)


def test_matching_cache_is_reused_without_encoding(tmp_path, raster):
    model = small_model()
    encode_raster(raster, model, tmp_path / "c.zarr")
    enc = CountingEncoder(model)
    encode_raster(raster, enc, tmp_path / "c.zarr")
    assert enc.tiles == 0


def test_mismatch_recomputes_or_refuses_with_the_reason(tmp_path, raster):
    model = small_model()
    encode_raster(raster, model, tmp_path / "c.zarr")
    other = small_model()
    with torch.no_grad():
        other.image_encoder.patch_embed.proj.weight.add_(1.0)  # e.g. a fine-tuned model
    with pytest.raises(CacheMismatchError, match="c.zarr does not fit: it was made for model weights"):
        encode_raster(raster, other, tmp_path / "c.zarr", on_mismatch="error")
    enc = CountingEncoder(other)
    with pytest.warns(UserWarning, match="recomputing"):
        encode_raster(raster, enc, tmp_path / "c.zarr")
    assert enc.tiles == 4
    # bands, normalisation and grid count too
    grey = open_raster(raster.path, bands=(1,))
    with pytest.raises(CacheMismatchError, match=r"bands \[1, 2, 3\] \(now \[1\]\)"):
        encode_raster(grey, other, tmp_path / "c.zarr", on_mismatch="error")
    with pytest.raises(CacheMismatchError, match="tile grid"):
        encode_raster(raster, other, tmp_path / "c.zarr", tile_size=128, on_mismatch="error")
    stretched = open_raster(raster.path, value_range=(0, 100))
    with pytest.raises(CacheMismatchError, match="normalisation"):
        encode_raster(stretched, other, tmp_path / "c.zarr", on_mismatch="error")


def test_changed_pixels_invalidate_but_a_moved_file_does_not(tmp_path, raster):
    model = small_model()
    encode_raster(raster, model, tmp_path / "c.zarr")
    moved = tmp_path / "moved"
    moved.mkdir()
    (moved / "renamed.tif").write_bytes(raster.path.read_bytes())
    enc = CountingEncoder(model)
    encode_raster(moved / "renamed.tif", enc, tmp_path / "c.zarr")
    assert enc.tiles == 0
    rewritten = scene(tmp_path, 300, 400, name="rewritten.tif", seed=5)
    with pytest.raises(CacheMismatchError, match=r"a different raster \(pixels_sha256 differ\)"):
        encode_raster(rewritten, model, tmp_path / "c.zarr", on_mismatch="error")


def test_a_tile_counts_only_once_committed(tmp_path, raster):
    model = small_model()
    grid = TileGrid(300, 400, 256, 32)
    cache = EmbeddingCache.create(tmp_path / "c.zarr", raster=raster, grid=grid, model=model)
    # A run killed after writing tile 1's embedding but before its status byte:
    cache._emb[1] = np.ones(cache._emb.shape[1:], np.float16)
    assert cache.pending() == [0, 1, 2, 3]
    with pytest.raises(CacheError, match="tile 1 of embedding cache .* is not encoded yet"):
        cache.read(1)
    enc = CountingEncoder(model)
    resumed = encode_raster(raster, enc, tmp_path / "c.zarr")
    assert resumed.complete and enc.tiles == 4
    assert not torch.equal(resumed.read(1).features, torch.ones_like(resumed.read(1).features))


def test_not_a_cache_is_never_deleted(tmp_path, raster):
    folder = tmp_path / "precious.zarr"
    folder.mkdir()
    (folder / "data.txt").write_text("keep me")
    with pytest.raises(CacheError, match="not a readable zarr embedding cache|not a segany embedding cache"):
        encode_raster(raster, small_model(), folder)
    assert (folder / "data.txt").read_text() == "keep me"
    zarr.open_group(str(tmp_path / "other.zarr"), mode="w").attrs["x"] = 1
    with pytest.raises(CacheError, match="not a segany embedding cache"):
        EmbeddingCache.open(tmp_path / "other.zarr")


def test_verify_catches_a_cache_of_another_raster(tmp_path, raster):
    model = small_model()
    cache = encode_raster(raster, model, tmp_path / "c.zarr")
    cache.verify(raster, model)
    cache.verify(raster)  # without a model: the raster part only
    other = open_raster(write_test_raster(tmp_path / "o.tif", np.zeros((3, 300, 400), np.uint8) + 3))
    with pytest.raises(CacheMismatchError, match="a different raster"):
        cache.verify(other, model)
    with pytest.raises(CacheMismatchError, match="raster"):
        cache.verify(other)


def test_memory_cache_and_arguments(raster):
    with pytest.raises(segany.SegAnyError, match="on_mismatch"):
        EmbeddingCache.create(None, raster=raster, grid=TileGrid(300, 400, 256, 32), model=small_model(),
                              on_mismatch="ignore")
    cache = EmbeddingCache.create(None, raster=raster, grid=TileGrid(300, 400, 256, 32), model=small_model())
    assert cache.path is None and cache.pending() == [0, 1, 2, 3]
