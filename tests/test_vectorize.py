"""segany.vectorize: masks to polygons, areas, streaming writers, label rasters, atomicity."""

from __future__ import annotations

import geopandas as gpd
import numpy as np
import pytest
import rasterio
import shapely
from affine import Affine

from segany.raster import open_raster, write_test_raster
from segany.vectorize import (
    MaskRasterWriter,
    OutputError,
    VectorWriter,
    area_in_units,
    mask_to_geometry,
    output_kind,
)

UTM = Affine(0.5, 0, 400000, 0, -0.5, 5100000)


def test_polygons_follow_pixel_edges_with_holes():
    m = np.zeros((20, 20), bool)
    m[2:18, 3:15] = True
    m[6:9, 6:9] = False  # a hole
    g = mask_to_geometry(m, UTM)
    assert g.geom_type == "Polygon" and len(g.interiors) == 1 and g.is_valid
    assert g.bounds == (400001.5, 5099991.0, 400007.5, 5099999.0)
    assert g.area == pytest.approx((16 * 12 - 9) * 0.25)
    assert mask_to_geometry(np.zeros((3, 3), bool), UTM) is None


def test_diagonal_pieces_make_a_valid_multipolygon():
    m = np.zeros((4, 4), bool)
    m[0, 0] = m[1, 1] = m[3, 3] = True
    g = mask_to_geometry(m, Affine.identity())
    assert g.is_valid and g.area == 3


def test_simplification_keeps_polygons_valid():
    yy, xx = np.mgrid[0:200, 0:200]
    ring = ((yy - 100) ** 2 + (xx - 100) ** 2 < 80**2) & ((yy - 100) ** 2 + (xx - 100) ** 2 > 30**2)
    raw = mask_to_geometry(ring, Affine.identity())
    simple = mask_to_geometry(ring, Affine.identity(), simplify=2.0)
    assert simple.is_valid and len(simple.interiors) == 1
    assert shapely.get_num_coordinates(simple) < shapely.get_num_coordinates(raw) / 3
    assert simple.area == pytest.approx(raw.area, rel=0.02)


def test_areas_in_square_metres():
    box = shapely.box(0, 0, 10, 20)
    assert area_in_units(box, "EPSG:32633") == (200.0, "m2")
    ft, unit = area_in_units(box, "EPSG:2272")  # US survey feet
    assert unit == "m2" and ft == pytest.approx(200 * 0.3048006**2, rel=1e-5)
    geo, unit = area_in_units(shapely.box(15, 45, 15.001, 45.001), "EPSG:4326")
    assert unit == "m2" and geo == pytest.approx(111.1e3 * 78.7e3 * 1e-6, rel=0.01)
    assert area_in_units(box, None) == (200.0, "px2")


def test_output_kinds():
    assert output_kind("a.GPKG") == "vector" and output_kind("b.tiff") == "raster"
    with pytest.raises(OutputError, match="unknown output format '.shp'"):
        output_kind("c.shp")


def features(n):
    return [{"geometry": shapely.box(400000 + 10 * i, 5000000, 400005 + 10 * i, 5000005), "id": i + 1,
             "prompt_id": f"p{i}", "predicted_iou": 0.9, "stability_score": 0.95, "area": 25.0,
             "area_unit": "m2", "n_tiles": 1, "model": "m", "source": "s.tif"} for i in range(n)]


@pytest.mark.parametrize("ext", [".gpkg", ".parquet", ".geojson", ".fgb"])
def test_every_format_round_trips_with_attributes(tmp_path, ext):
    out = tmp_path / f"objects{ext}"
    with VectorWriter(out, "EPSG:32633", batch=2) as w:
        w.extend(features(5))
    gdf = gpd.read_parquet(out) if ext == ".parquet" else gpd.read_file(out)
    gdf = gdf.sort_values("id").reset_index(drop=True)  # FlatGeobuf stores features in spatial-index order
    assert len(gdf) == 5 and gdf.crs.to_epsg() == 32633
    assert list(gdf["id"]) == [1, 2, 3, 4, 5] and gdf["prompt_id"][2] == "p2"
    assert gdf["predicted_iou"].dtype.kind == "f" and gdf["n_tiles"].dtype.kind == "i"
    assert gdf.geometry[0].area == pytest.approx(25.0)
    assert not list(tmp_path.glob(".*"))  # no temporary file left behind


def test_reprojection_and_empty_outputs(tmp_path):
    with VectorWriter(tmp_path / "ll.gpkg", "EPSG:32633", to_crs="EPSG:4326") as w:
        w.extend(features(1))
    gdf = gpd.read_file(tmp_path / "ll.gpkg")
    assert gdf.crs.to_epsg() == 4326 and 13 < gdf.geometry[0].centroid.x < 14
    with VectorWriter(tmp_path / "none.geojson", "EPSG:32633"):
        pass
    assert len(gpd.read_file(tmp_path / "none.geojson")) == 0


def test_a_failed_write_leaves_nothing(tmp_path):
    out = tmp_path / "x.gpkg"
    with pytest.raises(RuntimeError):
        with VectorWriter(out, "EPSG:32633", batch=1) as w:
            w.extend(features(3))
            raise RuntimeError("crash")
    assert not out.exists() and not list(tmp_path.iterdir())
    with pytest.raises(OutputError, match="does not exist"):
        VectorWriter(tmp_path / "missing" / "x.gpkg")


def test_mask_raster_is_tiled_compressed_and_georeferenced(tmp_path):
    r = open_raster(write_test_raster(tmp_path / "in.tif", np.ones((1, 300, 300), "uint8"), transform=UTM))
    big = np.ones((100, 100), bool)
    small = np.ones((10, 10), bool)
    with MaskRasterWriter(tmp_path / "labels.tif", r) as w:
        w.add(1, 0, 0, big)
        w.add(2, 50, 50, small)  # inside object 1: the smaller object keeps the overlap
        w.add(3, 45, 45, np.ones((10, 10), bool))  # larger than 2, smaller than 1
    with rasterio.open(tmp_path / "labels.tif") as src:
        a = src.read(1)
        assert src.crs.to_epsg() == 32633 and src.transform == UTM
        assert src.profile["tiled"] and src.compression.name == "deflate" and src.nodata == 0
        assert src.overviews(1) == [2, 4]
    assert (a[50:60, 50:60] == 2).all() and a[47, 47] == 3 and a[0, 0] == 1 and a[200, 200] == 0
    assert not list(tmp_path.glob(".*"))
    with pytest.raises(OutputError, match="ids in a mask raster must be >= 1"):
        MaskRasterWriter(tmp_path / "l2.tif", r).add(0, 0, 0, small)
