"""QGIS objects <-> segany core objects. Only conversions live here, no computation:
CRSs as text pyproj understands, geometries as WKB, output features from core records."""

from __future__ import annotations

from typing import Any, Iterable

from qgis.core import (
    QgsCoordinateReferenceSystem,
    QgsFeature,
    QgsField,
    QgsFields,
    QgsGeometry,
    QgsRasterLayer,
    QgsWkbTypes,
)
from qgis.PyQt.QtCore import QVariant

#: Output attributes, in the order of ``segany.vectorize.FIELDS``, with their QGIS types.
FIELD_TYPES = (
    ("id", QVariant.Int),
    ("prompt_id", QVariant.String),
    ("predicted_iou", QVariant.Double),
    ("stability_score", QVariant.Double),
    ("area", QVariant.Double),
    ("area_unit", QVariant.String),
    ("n_tiles", QVariant.Int),
    ("model", QVariant.String),
    ("source", QVariant.String),
)
OUTPUT_WKB_TYPE = QgsWkbTypes.MultiPolygon


def output_fields() -> QgsFields:
    """The attribute table of segany's polygon outputs."""
    fields = QgsFields()
    for name, kind in FIELD_TYPES:
        fields.append(QgsField(name, kind))
    return fields


def crs_to_core(crs: QgsCoordinateReferenceSystem | None) -> str | None:
    """A QGIS CRS as text for segany (pyproj): its EPSG code when it has one, else WKT2.
    None for an invalid CRS (the raster's own is then meant)."""
    if crs is None or not crs.isValid():
        return None
    authid = crs.authid()
    if authid.upper().startswith("EPSG:"):
        return authid
    return crs.toWkt(QgsCoordinateReferenceSystem.WKT_PREFERRED)


def crs_from_core(crs: Any) -> QgsCoordinateReferenceSystem:
    """A rasterio/pyproj CRS (or None) as a QGIS CRS (invalid for None)."""
    if crs is None:
        return QgsCoordinateReferenceSystem()
    epsg = crs.to_epsg() if hasattr(crs, "to_epsg") else None
    if epsg:
        return QgsCoordinateReferenceSystem(f"EPSG:{epsg}")
    return QgsCoordinateReferenceSystem.fromWkt(crs.to_wkt())


def geometry_to_wkb(geometry: QgsGeometry) -> bytes | None:
    """WKB bytes of a QGIS geometry (None when it is null or empty)."""
    if geometry is None or geometry.isNull() or geometry.isEmpty():
        return None
    return bytes(geometry.asWkb())


def geometry_from_core(geom: Any) -> QgsGeometry:
    """A shapely geometry as a QGIS one (through WKB: exact coordinates)."""
    g = QgsGeometry()
    if geom is not None:
        g.fromWkb(geom.wkb)
    return g


def feature_from_record(record: dict[str, Any], fields: QgsFields) -> QgsFeature:
    """A core output record (``segany.scene.object_record``) as a feature with ``fields``.

    Fields the record does not have stay NULL; record keys the fields lack are dropped, so
    the same record fills segany's own outputs and a user's layer alike.
    """
    feature = QgsFeature(fields)
    geometry = geometry_from_core(record.get("geometry"))
    if QgsWkbTypes.isMultiType(OUTPUT_WKB_TYPE) and not geometry.isMultipart():
        geometry.convertToMultiType()
    feature.setGeometry(geometry)
    for name, value in record.items():
        index = fields.indexOf(name)
        if index < 0 or name == "geometry":
            continue
        feature.setAttribute(index, _plain(value))
    return feature


def _plain(value: Any) -> Any:
    """numpy scalars and NaN as values QGIS stores (NaN -> NULL)."""
    if value is None:
        return None
    if hasattr(value, "item"):
        value = value.item()
    if isinstance(value, float) and value != value:
        return None
    if isinstance(value, (int, float, str)):
        return value
    return str(value)


def raster_path(layer: QgsRasterLayer) -> str:
    """The file (or GDAL connection string) behind a raster layer, for rasterio.

    Raises ValueError for layers GDAL cannot read (web services, other providers).
    """
    if layer is None or not layer.isValid():
        raise ValueError("the raster layer is not valid (its file cannot be read)")
    if layer.providerType() != "gdal":
        raise ValueError(
            f"raster layer '{layer.name()}' comes from the '{layer.providerType()}' provider; segany reads "
            "rasters with GDAL: save it as a GeoTIFF (or a VRT) first"
        )
    return layer.source()


def labels_from_values(values: Iterable[Any]) -> list[Any]:
    """Attribute values as labels for ``segany.geo.prompts_from_geometries`` (NULL -> None)."""
    out = []
    for v in values:
        if v is None or (hasattr(v, "isNull") and v.isNull()):
            out.append(None)
        else:
            out.append(v)
    return out
