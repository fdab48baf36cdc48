"""segany.raster: windowed reads, band rules, one scene-wide stretch, validity, bad files."""

from __future__ import annotations

import pickle

import numpy as np
import pytest
import rasterio
from rasterio.enums import ColorInterp

from segany import ImageError, SegAnyError
from segany.image import percentile_range, prepare_image
from segany.raster import (
    BandError,
    NoCRSWarning,
    Raster,
    RasterError,
    Window,
    normalise,
    open_raster,
    scene_value_range,
    write_test_raster,
)

RNG = np.random.default_rng(0)


def rgb_data(h=64, w=80, dtype="uint8"):
    return RNG.integers(0, 255, (3, h, w)).astype(dtype)


def test_rgb_uint8_reads_as_stored(tmp_path):
    data = rgb_data()
    r = open_raster(write_test_raster(tmp_path / "a.tif", data))
    assert (r.height, r.width, r.count, r.bands, r.value_range) == (64, 80, 3, (1, 2, 3), None)
    assert r.crs.to_epsg() == 32633
    rgb, valid = r.read(Window(10, 20, 30, 40))
    np.testing.assert_array_equal(rgb, data[:, 10:40, 20:60].transpose(1, 2, 0))
    assert valid.all()


def test_grey_is_repeated_and_bands_can_be_chosen(tmp_path):
    data = rgb_data()
    grey = open_raster(write_test_raster(tmp_path / "g.tif", data[:1]))
    rgb, _ = grey.read(Window(0, 0, 5, 5))
    assert grey.bands == (1,) and (rgb[..., 0] == rgb[..., 2]).all()
    r = open_raster(write_test_raster(tmp_path / "c.tif", data), bands=(3, 2, 1))
    rgb, _ = r.read(Window(0, 0, 8, 8))
    np.testing.assert_array_equal(rgb[..., 0], data[2, :8, :8])


def test_rgba_drops_alpha_and_masks_transparent_pixels(tmp_path):
    data = np.concatenate([rgb_data(), np.full((1, 64, 80), 255, np.uint8)])
    data[3, :10, :10] = 0
    path = write_test_raster(tmp_path / "rgba.tif", data, photometric="RGB", alpha="YES")
    r = open_raster(path)
    assert r.bands == (1, 2, 3)
    rgb, valid = r.read(Window(0, 0, 20, 20))
    assert not valid[:10, :10].any() and valid[10:, 10:].all() and (rgb[:10, :10] == 0).all()


def test_five_bands_need_a_choice_unless_tagged(tmp_path):
    path = write_test_raster(tmp_path / "ms.tif", RNG.integers(0, 1000, (5, 32, 32)).astype("uint16"))
    with pytest.raises(BandError, match=r"ms\.tif: has 5 bands .*choose 3 bands"):
        open_raster(path)
    assert open_raster(path, bands=(4, 3, 2)).bands == (4, 3, 2)
    with rasterio.open(path, "r+") as dst:
        dst.colorinterp = [ColorInterp.undefined, ColorInterp.blue, ColorInterp.green, ColorInterp.red,
                           ColorInterp.undefined]
    assert open_raster(path).bands == (4, 3, 2)


@pytest.mark.parametrize("bands, match", [((1, 2), "choose 1 band .* or 3 bands"), ((1, 2, 9), "band 9 does not exist"),
                                          (("a",), "band numbers")])
def test_bad_band_choices(tmp_path, bands, match):
    path = write_test_raster(tmp_path / "b.tif", rgb_data())
    with pytest.raises(BandError, match=match):
        open_raster(path, bands=bands)


def test_two_bands_without_alpha_are_ambiguous(tmp_path):
    path = write_test_raster(tmp_path / "two.tif", rgb_data()[:2])
    with pytest.raises(BandError, match="two.tif: has 2 bands and the second is not alpha"):
        open_raster(path)
    assert open_raster(path, bands=(2,)).bands == (2,)


def test_uint16_uses_one_scene_wide_range(tmp_path):
    data = RNG.integers(0, 4000, (3, 64, 80)).astype("uint16")
    data[0, :32] += 20000  # the top half is much brighter: a per-tile stretch would differ
    r = open_raster(write_test_raster(tmp_path / "u16.tif", data))
    assert r.value_range == percentile_range(data.transpose(1, 2, 0))
    top, _ = r.read(Window(0, 0, 32, 80))
    whole, _ = r.read(Window(0, 0, 64, 80))
    np.testing.assert_array_equal(top, whole[:32])  # a tile reads exactly as the same pixels of the scene
    # and as segany.image would prepare the same pixels with the same range
    np.testing.assert_array_equal(whole, prepare_image(data.transpose(1, 2, 0), value_range=r.value_range).rgb)


def test_float_nan_and_nodata_are_invalid(tmp_path):
    data = RNG.normal(0, 1, (1, 40, 40)).astype("float32")
    data[0, :5] = np.nan
    data[0, 5:10] = -9999
    r = open_raster(write_test_raster(tmp_path / "f.tif", data, nodata=-9999))
    rgb, valid = r.read(Window(0, 0, 40, 40))
    assert not valid[:10].any() and valid[10:].all() and (rgb[:10] == 0).all()
    assert -5 < r.value_range[0] < 0 < r.value_range[1] < 5  # NaN and -9999 excluded
    r2 = open_raster(tmp_path / "f.tif", nodata=data[0, 20, 20])
    assert not r2.read(Window(20, 20, 1, 1))[1].any()


def test_all_nodata_and_constant_rasters_are_refused(tmp_path):
    empty = write_test_raster(tmp_path / "nodata.tif", np.zeros((1, 30, 30), "uint16"), nodata=0)
    with pytest.raises(RasterError, match="nodata.tif: has no valid pixels"):
        open_raster(empty)
    const = write_test_raster(tmp_path / "const.tif", np.full((1, 30, 30), 7, "float32"))
    with pytest.raises(RasterError, match="const.tif: is constant"):
        open_raster(const)


def test_bad_files_name_the_file_and_the_problem(tmp_path):
    (tmp_path / "zero.tif").write_bytes(b"")
    with pytest.raises(RasterError, match=r"zero\.tif: the file is empty \(0 bytes\)"):
        open_raster(tmp_path / "zero.tif")
    (tmp_path / "junk.tif").write_bytes(b"II*\x00" + RNG.bytes(500))
    with pytest.raises(RasterError, match=r"junk\.tif: cannot be read as a raster"):
        open_raster(tmp_path / "junk.tif")
    with pytest.raises(RasterError, match="no such file"):
        open_raster(tmp_path / "missing.tif")
    with pytest.raises(RasterError, match="is a folder"):
        open_raster(tmp_path)
    assert issubclass(RasterError, SegAnyError) and issubclass(RasterError, ImageError)


def test_truncated_geotiff_is_reported(tmp_path):
    path = write_test_raster(tmp_path / "cut.tif", RNG.integers(0, 255, (3, 256, 256)).astype("uint8"),
                             block=64, compress="none")
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(RasterError, match=r"cut\.tif: .*(truncated or corrupt|cannot be read)"):
        r = open_raster(path)
        r.read(Window(0, 0, 256, 256))


def test_no_crs_is_allowed_with_a_warning(tmp_path):
    path = write_test_raster(tmp_path / "plain.tif", rgb_data(), crs=None)
    with pytest.warns(NoCRSWarning, match="plain.tif has no coordinate reference system"):
        r = open_raster(path)
    assert r.crs is None and tuple(r.transform)[:6] == (1, 0, 0, 0, 1, 0)


def test_sampled_percentiles_for_big_scenes(tmp_path, monkeypatch):
    import segany.raster as raster_mod

    data = RNG.integers(0, 10000, (1, 300, 300)).astype("uint16")
    path = write_test_raster(tmp_path / "big.tif", data)
    exact = percentile_range(data[0])
    monkeypatch.setattr(raster_mod, "SAMPLE_PIXELS", 2000)  # forces the sampled-windows path
    r = open_raster(path)
    assert abs(r.value_range[0] - exact[0]) < 200 and abs(r.value_range[1] - exact[1]) < 200
    with rasterio.open(path, "r+") as dst:  # with overviews, they are the sample
        dst.build_overviews([2, 4])
    r = open_raster(path)
    assert abs(r.value_range[1] - exact[1]) < 300


def test_dask_array_is_lazy_and_exact(tmp_path):
    data = RNG.integers(0, 1000, (3, 100, 90)).astype("uint16")
    r = open_raster(write_test_raster(tmp_path / "d.tif", data))
    arr = r.to_dask(chunks=32)
    assert arr.shape == (100, 90, 3) and arr.chunks[0] == (32, 32, 32, 4)
    rgb, _ = r.read(Window(0, 0, 100, 90))
    np.testing.assert_array_equal(arr.compute(), rgb)
    raw = r.to_dask(chunks=(50, 45), normalised=False)
    np.testing.assert_array_equal(raw[:, 10:60, 5:50].compute(), data[:, 10:60, 5:50])


def test_raster_pickles_and_signature_follows_content(tmp_path):
    data = rgb_data()
    r = open_raster(write_test_raster(tmp_path / "s.tif", data))
    clone = pickle.loads(pickle.dumps(r))
    assert isinstance(clone, Raster)
    np.testing.assert_array_equal(clone.read(Window(0, 0, 4, 4))[0], r.read(Window(0, 0, 4, 4))[0])
    copy = open_raster(write_test_raster(tmp_path / "copy.tif", data))
    assert copy.signature() == r.signature()  # the path is not part of it
    data[:, 0, 0] += 1
    changed = open_raster(write_test_raster(tmp_path / "changed.tif", data))
    assert changed.signature()["pixels_sha256"] != r.signature()["pixels_sha256"]


def test_read_outside_and_normalise_rules(tmp_path):
    r = open_raster(write_test_raster(tmp_path / "o.tif", rgb_data()))
    with pytest.raises(RasterError, match="not inside the raster"):
        r.read(Window(60, 0, 10, 10))
    with pytest.raises(ImageError, match="need a value_range"):
        normalise(np.zeros((1, 2, 2), np.uint16), np.ones((2, 2), bool), None)
    raw = np.array([[[0, 10]]], np.float32)
    assert normalise(raw, np.array([[True, False]]), (0, 10))[..., 0].tolist() == [[0, 0]]


def test_value_range_argument_is_checked(tmp_path):
    path = write_test_raster(tmp_path / "v.tif", rgb_data(dtype="uint16"))
    with pytest.raises(ImageError, match="low < high"):
        open_raster(path, value_range=(5, 5))
    assert open_raster(path, value_range=(0, 255)).value_range == (0.0, 255.0)
    assert scene_value_range(open_raster(path), (0, 100)) == (0.0, 254.0)
