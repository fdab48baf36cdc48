"""Masks to GIS layers: polygons with attributes, and label rasters, written atomically.

* :func:`mask_to_geometry` turns a boolean mask (cropped, with its affine transform) into a
  (Multi)Polygon in map coordinates, holes included, pixel edges exact.
* :class:`VectorWriter` streams features to a file whose format follows the extension:
  ``.gpkg`` (GeoPackage), ``.parquet``/``.geoparquet`` (GeoParquet), ``.geojson``/``.json``
  (GeoJSON), ``.fgb`` (FlatGeobuf). Features are spooled to a hidden GeoPackage next to the
  output (flat memory) and the final file appears in one ``os.replace`` at :meth:`close`:
  a crash never leaves a half-written output under the final name.
* :class:`MaskRasterWriter` writes instance ids (uint32, 0 = nothing) to a tiled, compressed
  GeoTIFF with overviews, window by window, with the same atomic rule. Where objects
  overlap, a pixel goes to the smaller object (nested objects stay visible).

Attributes of every feature (:data:`FIELDS`): ``id``, ``prompt_id``, ``predicted_iou``,
``stability_score``, ``area`` and ``area_unit`` (square metres for projected and geographic
CRSs -- geodesic on the ellipsoid for the latter --, CRS units otherwise, ``px2`` without a
CRS), ``n_tiles`` (tiles that saw the object), ``model`` and ``source`` (the raster file).

Simplification (``simplify=`` tolerance in the raster's map units) uses
``preserve_topology=True``: polygons stay valid and holes stay inside their shells.

Example:
    >>> import numpy as np
    >>> from affine import Affine
    >>> m = np.zeros((4, 5), bool); m[1:3, 1:4] = True
    >>> g = mask_to_geometry(m, Affine(2, 0, 100, 0, -2, 50))
    >>> g.bounds, g.area
    ((102.0, 44.0, 108.0, 48.0), 24.0)
"""

from __future__ import annotations

import os
import uuid
import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterable

import numpy as np

from .errors import SegAnyError

if TYPE_CHECKING:  # pragma: no cover
    from .raster import Raster

__all__ = [
    "FIELDS",
    "MaskRasterWriter",
    "OutputError",
    "VectorWriter",
    "area_in_units",
    "mask_to_geometry",
    "output_kind",
]

VECTOR_FORMATS = {
    ".gpkg": "GPKG",
    ".parquet": "Parquet",
    ".geoparquet": "Parquet",
    ".geojson": "GeoJSON",
    ".json": "GeoJSON",
    ".fgb": "FlatGeobuf",
}
RASTER_FORMATS = (".tif", ".tiff")
FIELDS = ("id", "prompt_id", "predicted_iou", "stability_score", "area", "area_unit", "n_tiles", "model", "source")


# rasterio.features.shapes vectorises through an in-memory GDAL dataset that it warns has
# no georeferencing; the transform is applied anyway (and an identity one is legitimate for
# rasters without a CRS). A narrow, global filter: catch_warnings is not thread-safe, and
# masks are vectorised from several threads in a Dask worker.
warnings.filterwarnings("ignore", message="Dataset has no geotransform", module=r"rasterio\.features")


class OutputError(SegAnyError):
    """An output path cannot be written (unknown extension, missing folder, ...)."""


def output_kind(path: str | os.PathLike[str]) -> str:
    """``"vector"`` or ``"raster"`` from the extension; an :class:`OutputError` otherwise.

    Example:
        >>> output_kind("out.gpkg"), output_kind("labels.tif")
        ('vector', 'raster')
    """
    suffix = Path(path).suffix.lower()
    if suffix in VECTOR_FORMATS:
        return "vector"
    if suffix in RASTER_FORMATS:
        return "raster"
    known = ", ".join(sorted(VECTOR_FORMATS) + list(RASTER_FORMATS))
    raise OutputError(f"{path}: unknown output format {suffix or '(no extension)'!r}; use one of {known}")


def _check_parent(path: Path) -> None:
    if not path.parent.exists():
        raise OutputError(f"{path}: the folder {path.parent} does not exist")


def _tmp_name(path: Path, suffix: str | None = None) -> Path:
    return path.with_name(f".{path.stem}.tmp-{uuid.uuid4().hex[:8]}{suffix or path.suffix}")


def mask_to_geometry(mask: np.ndarray, transform: Any, simplify: float | None = None) -> Any:
    """The pixels of ``mask`` as a Polygon/MultiPolygon in the coordinates of ``transform``
    (None when the mask is empty). ``simplify`` is a tolerance in those coordinates.

    Example:
        >>> from affine import Affine
        >>> m = np.zeros((6, 6), bool); m[0:2, 0:2] = True; m[4:6, 4:6] = True
        >>> mask_to_geometry(m, Affine.identity()).geom_type
        'MultiPolygon'
    """
    import shapely
    from rasterio import features

    mask = np.ascontiguousarray(mask, dtype=bool)
    if not mask.any():
        return None
    polygons = [
        shapely.geometry.shape(geom)
        for geom, value in features.shapes(mask.view(np.uint8), mask=mask, transform=transform)
        if value
    ]
    geom = polygons[0] if len(polygons) == 1 else shapely.MultiPolygon(polygons)
    if not geom.is_valid:  # polygons touching at a corner can need repair in some GEOS versions
        geom = shapely.make_valid(geom)
    if simplify:
        simplified = geom.simplify(simplify, preserve_topology=True)
        if not simplified.is_empty:
            geom = simplified
    return geom


def area_in_units(geom: Any, crs: Any) -> tuple[float, str]:
    """Area of ``geom`` given in ``crs``: m² when the CRS is projected in metres (or feet,
    converted) or geographic (geodesic area); CRS units² otherwise; ``px2`` without a CRS.

    Example:
        >>> import shapely
        >>> area_in_units(shapely.box(0, 0, 10, 10), "EPSG:32633")
        (100.0, 'm2')
    """
    if geom is None:
        return 0.0, "m2"
    if crs is None:
        return float(geom.area), "px2"
    from pyproj import CRS

    crs = CRS.from_user_input(crs.to_wkt() if hasattr(crs, "to_wkt") and not isinstance(crs, CRS) else crs)
    if crs.is_geographic:
        geod = crs.get_geod()
        area, _perimeter = geod.geometry_area_perimeter(geom)
        return abs(float(area)), "m2"
    axis = crs.axis_info[0] if crs.axis_info else None
    factor = getattr(axis, "unit_conversion_factor", None)
    if factor:
        return float(geom.area) * factor * factor, "m2"
    return float(geom.area), "crs_units2"


class VectorWriter:
    """Stream features (dicts with ``geometry`` plus :data:`FIELDS`) to a vector file.

    Args:
        path: output; the format follows the extension (see the module docs).
        crs: CRS of the geometries written (the raster's; None = pixel coordinates).
        to_crs: reproject to this CRS on the way out.
        batch: features buffered in memory between spool writes.

    Use as a context manager: the output appears on a clean exit, and nothing (not even a
    temporary file) is left after an exception.

    Example:
        >>> import shapely
        >>> from segany.raster import tmp_dir
        >>> out = tmp_dir() / "objects.geojson"
        >>> with VectorWriter(out, crs="EPSG:32633", to_crs="EPSG:4326") as w:
        ...     w.add({"geometry": shapely.box(500000, 0, 500010, 10), "id": 1, "area": 100.0})
        >>> import geopandas as gpd
        >>> gdf = gpd.read_file(out); (len(gdf), gdf.crs.to_epsg(), int(gdf.id[0]))
        (1, 4326, 1)
    """

    def __init__(self, path: str | os.PathLike[str], crs: Any = None, *, to_crs: Any = None,
                 batch: int = 512, layer: str | None = None) -> None:
        self.path = Path(path)
        if output_kind(self.path) != "vector":
            raise OutputError(f"{self.path}: a vector output needs one of {', '.join(sorted(VECTOR_FORMATS))}")
        _check_parent(self.path)
        self.driver = VECTOR_FORMATS[self.path.suffix.lower()]
        self.crs = crs
        self.to_crs = to_crs
        self.batch = max(1, int(batch))
        self.layer = layer or self.path.stem
        self.count = 0
        self._buffer: list[dict[str, Any]] = []
        self._spool = _tmp_name(self.path, ".gpkg")
        self._spooled = False
        self._closed = False

    def __enter__(self) -> "VectorWriter":
        return self

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abort()

    def add(self, record: dict[str, Any]) -> None:
        """Queue one feature (written in batches)."""
        self._buffer.append(record)
        self.count += 1
        if len(self._buffer) >= self.batch:
            self.flush()

    def extend(self, records: Iterable[dict[str, Any]]) -> None:
        for record in records:
            self.add(record)

    def _frame(self, records: list[dict[str, Any]]) -> Any:
        import geopandas as gpd
        import pandas as pd

        columns: dict[str, Any] = {}
        names = list(FIELDS) + [k for r in records for k in r if k not in FIELDS and k != "geometry"]
        for name in dict.fromkeys(names):
            values = [r.get(name) for r in records]
            if name in ("id", "n_tiles"):
                columns[name] = pd.Series([-1 if v is None else int(v) for v in values], dtype="int64")
            elif name in ("predicted_iou", "stability_score", "area"):
                columns[name] = pd.Series([np.nan if v is None else float(v) for v in values], dtype="float64")
            else:
                columns[name] = pd.Series([None if v is None else str(v) for v in values], dtype="object")
        geoms = gpd.GeoSeries([r.get("geometry") for r in records], crs=self.crs)
        frame = gpd.GeoDataFrame(columns, geometry=geoms, crs=self.crs)
        if self.to_crs is not None and self.crs is not None:
            frame = frame.to_crs(self.to_crs)
        return frame

    def flush(self) -> None:
        """Append the buffered features to the spool file."""
        if not self._buffer:
            return
        import pyogrio

        frame = self._frame(self._buffer)
        pyogrio.write_dataframe(frame, self._spool, layer=self.layer, driver="GPKG",
                                append=self._spooled, promote_to_multi=True, geometry_type="MultiPolygon")
        self._spooled = True
        self._buffer = []

    def close(self) -> Path:
        """Write the final file (atomically) and return its path."""
        if self._closed:
            return self.path
        import pyogrio

        try:
            self.flush()
            if not self._spooled:  # no features: still write a valid, empty layer
                pyogrio.write_dataframe(self._frame([]), self._spool, layer=self.layer, driver="GPKG",
                                        geometry_type="MultiPolygon")
            if self.driver == "GPKG":
                os.replace(self._spool, self.path)
            else:
                frame = pyogrio.read_dataframe(self._spool, layer=self.layer)
                final_tmp = _tmp_name(self.path)
                try:
                    if self.driver == "Parquet":
                        frame.to_parquet(final_tmp)
                    else:
                        pyogrio.write_dataframe(frame, final_tmp, layer=self.layer, driver=self.driver,
                                                promote_to_multi=True)
                    os.replace(final_tmp, self.path)
                finally:
                    final_tmp.unlink(missing_ok=True)
        finally:
            self._spool.unlink(missing_ok=True)
            self._closed = True
        return self.path

    def abort(self) -> None:
        """Drop everything written so far (the final path is not touched)."""
        self._buffer = []
        self._spool.unlink(missing_ok=True)
        self._closed = True


class MaskRasterWriter:
    """Instance ids of objects into a tiled, compressed GeoTIFF aligned with ``raster``.

    Objects are written as they come (flat memory) into a sparse uncompressed scratch file
    that is compressed into the final file, with overviews, at :meth:`close`.

    Example:
        >>> from segany.raster import open_raster, write_test_raster, tmp_dir
        >>> d = tmp_dir()
        >>> r = open_raster(write_test_raster(d / "in.tif", np.ones((1, 40, 40), "uint8")))
        >>> with MaskRasterWriter(d / "labels.tif", r) as w:
        ...     w.add(1, 0, 0, np.ones((10, 10), bool)); w.add(2, 5, 5, np.ones((3, 3), bool))
        >>> import rasterio
        >>> with rasterio.open(d / "labels.tif") as src:
        ...     a = src.read(1); (src.crs.to_epsg(), int(a[0, 0]), int(a[6, 6]), int((a == 1).sum()))
        (32633, 1, 2, 91)
    """

    def __init__(self, path: str | os.PathLike[str], raster: "Raster", *, block: int = 256) -> None:
        import rasterio

        self.path = Path(path)
        if output_kind(self.path) != "raster":
            raise OutputError(f"{self.path}: a mask raster needs a .tif/.tiff name")
        _check_parent(self.path)
        self.raster = raster
        self.block = block
        self._scratch = _tmp_name(self.path)
        self._areas = np.zeros(1024, np.int64)  # area of each id, to give overlaps to the smaller
        self.count = 0
        profile = dict(driver="GTiff", width=raster.width, height=raster.height, count=1, dtype="uint32",
                       crs=raster.crs, transform=raster.transform, nodata=0, tiled=True,
                       blockxsize=block, blockysize=block, SPARSE_OK=True, BIGTIFF="IF_SAFER")
        self._dst = rasterio.open(self._scratch, "w+", **profile)
        self._closed = False

    def __enter__(self) -> "MaskRasterWriter":
        return self

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abort()

    def add(self, object_id: int, row0: int, col0: int, mask: np.ndarray) -> None:
        """Paint object ``object_id`` (>= 1) whose mask's top-left pixel is ``(row0, col0)``."""
        from rasterio.windows import Window as RioWindow

        if object_id < 1:
            raise OutputError(f"object ids in a mask raster must be >= 1, got {object_id}")
        if object_id >= len(self._areas):
            self._areas = np.concatenate([self._areas, np.zeros(max(object_id + 1, 2 * len(self._areas)), np.int64)])
        mask = np.asarray(mask, bool)
        area = int(mask.sum())
        self._areas[object_id] = area
        window = RioWindow(col0, row0, mask.shape[1], mask.shape[0])
        current = self._dst.read(1, window=window)
        take = mask & ((current == 0) | (self._areas[current] > area))
        if take.any():
            current[take] = object_id
            self._dst.write(current, 1, window=window)
        self.count += 1

    def close(self) -> Path:
        """Compress into the final GeoTIFF (with overviews) and move it into place."""
        if self._closed:
            return self.path
        import rasterio
        from rasterio.enums import Resampling
        from rasterio.windows import Window as RioWindow

        final_tmp = _tmp_name(self.path)
        try:
            profile = dict(self._dst.profile)
            profile.pop("sparse_ok", None)
            profile.update(compress="deflate", predictor=2, SPARSE_OK=False)
            with rasterio.open(final_tmp, "w", **profile) as out:
                step = self.block * 4
                for r0 in range(0, self.raster.height, step):
                    window = RioWindow(0, r0, self.raster.width, min(step, self.raster.height - r0))
                    out.write(self._dst.read(1, window=window), 1, window=window)
                factors = [f for f in (2, 4, 8, 16, 32) if min(self.raster.height, self.raster.width) // f >= 64]
                if factors:
                    out.build_overviews(factors, Resampling.mode)
            self._dst.close()
            os.replace(final_tmp, self.path)
        finally:
            if not self._dst.closed:
                self._dst.close()
            final_tmp.unlink(missing_ok=True)
            self._scratch.unlink(missing_ok=True)
            self._closed = True
        return self.path

    def abort(self) -> None:
        if not self._dst.closed:
            self._dst.close()
        self._scratch.unlink(missing_ok=True)
        self._closed = True
