"""Prompts in map coordinates: points and boxes in any CRS, turned into raster pixels.

A :class:`Prompt` is one object to segment: foreground/background points and/or a box, in
a CRS (``"EPSG:4326"``, a WKT string, a ``pyproj.CRS`` ...), in the raster's own CRS
(``crs=None``) or in raster pixels (``crs="pixel"``). :func:`to_pixels` reprojects them to
the raster's CRS (boxes are densified along their edges, so a box in degrees stays
covering after reprojection) and then to pixel coordinates through the geotransform.

Pixel coordinates are ``x = column, y = row`` measured from the raster's top-left corner
(pixel edges: the centre of the first pixel is ``(0.5, 0.5)``).

Prompts outside the raster, in a CRS that cannot reach the raster's, or given in map
coordinates for a raster without a CRS raise :class:`~segany.errors.PromptError` naming
the prompt, the raster and the coordinates.

Example:
    >>> import numpy as np
    >>> from segany.raster import open_raster, write_test_raster, tmp_dir
    >>> r = open_raster(write_test_raster(tmp_dir() / "g.tif", np.zeros((1, 100, 100), "uint8") + 1))
    >>> p = to_pixels([Prompt.point(500010.0, 4999990.0)], r)[0]   # UTM 33N metres
    >>> p.points.tolist(), p.crs
    ([[10.0, 10.0]], 'pixel')
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterable, Sequence

import numpy as np

from .errors import PromptError

if TYPE_CHECKING:  # pragma: no cover
    from .raster import Raster, Window

__all__ = [
    "PIXEL",
    "Prompt",
    "bounds_to_window",
    "parse_box",
    "parse_point",
    "prompts_from_geometries",
    "read_prompts",
    "reproject_xy",
    "to_pixels",
]

#: The ``crs`` of prompts given in raster pixels.
PIXEL = "pixel"


@dataclass
class Prompt:
    """One object to segment.

    Attributes:
        points: ``N x 2`` (x, y), possibly empty.
        labels: ``N`` labels, 1 foreground, 0 background.
        box: ``[x0, y0, x1, y1]`` or None.
        id: identifier copied to the output (row number, a feature id, a name).
        crs: CRS of the coordinates; None = the raster's; ``"pixel"`` = raster pixels.

    Example:
        >>> Prompt.point(3, 4, label=0).labels.tolist()
        [0]
        >>> Prompt.from_box([0, 0, 10, 5]).bbox
        (0.0, 0.0, 10.0, 5.0)
    """

    points: np.ndarray = field(default_factory=lambda: np.zeros((0, 2)))
    labels: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))
    box: np.ndarray | None = None
    id: Any = None
    crs: Any = None

    def __post_init__(self) -> None:
        self.points = np.asarray(self.points, dtype=np.float64).reshape(-1, 2)
        self.labels = np.asarray(self.labels, dtype=np.int64).reshape(-1)
        if self.box is not None:
            self.box = np.asarray(self.box, dtype=np.float64).reshape(4)
        if len(self.labels) != len(self.points):
            raise PromptError(f"prompt {self.id}: {len(self.points)} points but {len(self.labels)} labels")
        if len(self.points) == 0 and self.box is None:
            raise PromptError(f"prompt {self.id}: has neither points nor a box")
        if np.setdiff1d(self.labels, [0, 1]).size:
            raise PromptError(f"prompt {self.id}: point labels must be 1 (foreground) or 0 (background)")
        if not np.isfinite(self.points).all() or (self.box is not None and not np.isfinite(self.box).all()):
            raise PromptError(f"prompt {self.id}: coordinates must be finite numbers")
        if self.box is not None and (self.box[2] < self.box[0] or self.box[3] < self.box[1]):
            # Map y grows upwards and pixel y downwards: order each axis instead of failing.
            b = self.box
            self.box = np.array([min(b[0], b[2]), min(b[1], b[3]), max(b[0], b[2]), max(b[1], b[3])])

    @classmethod
    def point(cls, x: float, y: float, label: int = 1, id: Any = None, crs: Any = None) -> "Prompt":
        return cls(np.array([[x, y]]), np.array([label]), None, id, crs)

    @classmethod
    def from_box(cls, box: Sequence[float], id: Any = None, crs: Any = None) -> "Prompt":
        return cls(box=np.asarray(box, dtype=np.float64), id=id, crs=crs)

    @property
    def bbox(self) -> tuple[float, float, float, float]:
        """``(x0, y0, x1, y1)`` around all points and the box."""
        xs = list(self.points[:, 0]) + ([self.box[0], self.box[2]] if self.box is not None else [])
        ys = list(self.points[:, 1]) + ([self.box[1], self.box[3]] if self.box is not None else [])
        return (float(min(xs)), float(min(ys)), float(max(xs)), float(max(ys)))


def _as_crs(crs: Any, what: str) -> Any:
    from pyproj import CRS
    from pyproj.exceptions import CRSError

    if crs is None or crs == PIXEL:
        return crs
    try:
        return CRS.from_user_input(crs.to_wkt() if hasattr(crs, "to_wkt") and not isinstance(crs, CRS) else crs)
    except CRSError as exc:
        raise PromptError(f"{what}: unknown coordinate reference system {crs!r} ({exc})") from None


def reproject_xy(xy: np.ndarray, src_crs: Any, dst_crs: Any) -> np.ndarray:
    """Reproject ``N x 2`` (x, y) coordinates (x = easting/longitude, always).

    Example:
        >>> reproject_xy(np.array([[15.0, 0.0]]), "EPSG:4326", "EPSG:32633").round(3).tolist()
        [[500000.0, 0.0]]
    """
    from pyproj import Transformer

    xy = np.asarray(xy, dtype=np.float64).reshape(-1, 2)
    src, dst = _as_crs(src_crs, "prompts"), _as_crs(dst_crs, "raster")
    if src == dst:
        return xy.copy()
    transformer = Transformer.from_crs(src, dst, always_xy=True)
    x, y = transformer.transform(xy[:, 0], xy[:, 1], errcheck=False)
    return np.column_stack([x, y])


def _reproject_box(box: np.ndarray, src: Any, dst: Any) -> np.ndarray:
    from pyproj import Transformer

    if src == dst:
        return box.copy()
    transformer = Transformer.from_crs(src, dst, always_xy=True)
    # Densified edges: a straight box in one CRS is curved in another.
    return np.array(transformer.transform_bounds(*box, densify_pts=21, errcheck=False))


def apply_affine(transform: Any, x: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Apply an affine transform to coordinate arrays: ``(x', y') = transform * (x, y)``.

    Example:
        >>> from affine import Affine
        >>> apply_affine(Affine(2, 0, 10, 0, -2, 50), np.array([1.0]), np.array([1.0]))
        (array([12.]), array([48.]))
    """
    a, b, c, d, e, f = tuple(transform)[:6]
    x, y = np.asarray(x, dtype=np.float64), np.asarray(y, dtype=np.float64)
    return a * x + b * y + c, d * x + e * y + f


def _label(prompt: Prompt, raster: "Raster") -> str:
    return f"prompt {prompt.id if prompt.id is not None else '?'} for raster {raster.path.name}"


def to_pixels(prompts: Iterable[Prompt], raster: "Raster") -> list[Prompt]:
    """Reproject prompts to the raster's CRS and then to pixel coordinates.

    Boxes that stick out of the raster are clipped to it; points outside it and boxes
    entirely outside it are errors.

    Raises:
        PromptError: outside the raster, unreachable CRS, or map coordinates for a raster
            without a CRS.

    Example:
        >>> from segany.raster import open_raster, write_test_raster, tmp_dir
        >>> r = open_raster(write_test_raster(tmp_dir() / "o.tif", np.zeros((1, 50, 50), "uint8") + 1))
        >>> try:
        ...     to_pixels([Prompt.point(15.5, 45.1, id=7, crs="EPSG:4326")], r)
        ... except PromptError as exc:
        ...     print(str(exc).split(":")[0], "/", str(exc).split(", which ")[1][:27])
        prompt 7 for raster o.tif / lies outside the raster (50
    """
    out = []
    dst = _as_crs(raster.crs, f"raster {raster.path}") if raster.crs is not None else None
    inverse = ~raster.transform
    h, w = raster.height, raster.width
    for i, prompt in enumerate(prompts):
        if prompt.id is None:
            prompt = replace(prompt, id=i)
        if prompt.crs == PIXEL:
            points, box = prompt.points.copy(), None if prompt.box is None else prompt.box.copy()
        else:
            src = _as_crs(prompt.crs, _label(prompt, raster)) if prompt.crs is not None else dst
            if src is not None and dst is None:
                raise PromptError(
                    f"{_label(prompt, raster)}: the raster has no CRS, so prompts in {src.to_string()} "
                    "cannot be placed; give them in pixel coordinates (crs='pixel', --crs pixel)"
                )
            points = reproject_xy(prompt.points, src, dst) if len(prompt.points) and src is not None else prompt.points
            box = prompt.box
            if box is not None and src is not None:
                box = _reproject_box(box, src, dst)
            if not np.isfinite(points).all() or (box is not None and not np.isfinite(box).all()):
                raise PromptError(
                    f"{_label(prompt, raster)}: coordinates cannot be reprojected from "
                    f"{src.to_string()} to the raster's CRS (are x and y swapped?)"
                )
            cols, rows = apply_affine(inverse, points[:, 0], points[:, 1])
            map_points = points
            points = np.column_stack([cols, rows])
            if box is not None:
                xs, ys = apply_affine(inverse, np.array([box[0], box[2], box[0], box[2]]),
                                      np.array([box[1], box[1], box[3], box[3]]))
                box = np.array([xs.min(), ys.min(), xs.max(), ys.max()])
        outside = (points[:, 0] < 0) | (points[:, 0] > w) | (points[:, 1] < 0) | (points[:, 1] > h)
        if outside.any():
            k = int(np.flatnonzero(outside)[0])
            given = prompt.points[k]
            crs_name = "pixels" if prompt.crs == PIXEL else (
                _as_crs(prompt.crs, "").to_string() if prompt.crs is not None else "the raster's CRS")
            where = f"point ({given[0]:.8g}, {given[1]:.8g}) in {crs_name}"
            if prompt.crs != PIXEL:
                if prompt.crs is not None and dst is not None:
                    where += f" is ({map_points[k][0]:.2f}, {map_points[k][1]:.2f}) in {dst.to_string()}, i.e."
                where += f" pixel ({points[k][0]:.1f}, {points[k][1]:.1f})"
            left, bottom, right, top = raster.bounds
            raise PromptError(
                f"{_label(prompt, raster)}: {where}, which lies outside the raster ({w} x {h} pixels, "
                f"bounds {left:.6g}, {bottom:.6g}, {right:.6g}, {top:.6g})"
            )
        if box is not None:
            if box[2] < 0 or box[0] > w or box[3] < 0 or box[1] > h:
                raise PromptError(f"{_label(prompt, raster)}: box {prompt.box.tolist()} lies outside the raster")
            box = np.array([max(box[0], 0), max(box[1], 0), min(box[2], w), min(box[3], h)])
        out.append(Prompt(points, prompt.labels.copy(), box, prompt.id, PIXEL))
    return out


# ------------------------------------------------------------------------------ parsing


def parse_point(text: str) -> tuple[float, float, int]:
    """``"x,y"`` or ``"x,y,label"`` -> ``(x, y, label)``.

    Example:
        >>> parse_point("12.5,3"), parse_point("1,2,0")
        ((12.5, 3.0, 1), (1.0, 2.0, 0))
    """
    parts = [p.strip() for p in text.split(",")]
    try:
        if len(parts) == 2:
            return float(parts[0]), float(parts[1]), 1
        if len(parts) == 3:
            label = int(float(parts[2]))
            if label not in (0, 1):
                raise ValueError
            return float(parts[0]), float(parts[1]), label
    except ValueError:
        pass
    raise PromptError(f"point {text!r}: expected x,y or x,y,label with label 1 (object) or 0 (background)")


def parse_box(text: str) -> tuple[float, float, float, float]:
    """``"x0,y0,x1,y1"`` -> a tuple of 4 floats.

    Example:
        >>> parse_box("0,0,10,20")
        (0.0, 0.0, 10.0, 20.0)
    """
    try:
        values = tuple(float(v) for v in text.split(","))
    except ValueError:
        values = ()
    if len(values) != 4:
        raise PromptError(f"box {text!r}: expected x0,y0,x1,y1")
    return values  # type: ignore[return-value]


def _labels(values: Any, path: Path | str, column: str) -> np.ndarray:
    def one(v: Any) -> int:
        if isinstance(v, str):
            key = v.strip().lower()
            if key in ("1", "pos", "positive", "fg", "foreground", "object", "true", "yes", "+"):
                return 1
            if key in ("0", "neg", "negative", "bg", "background", "false", "no", "-"):
                return 0
        elif v is not None and not (isinstance(v, float) and np.isnan(v)) and int(v) in (0, 1):
            return int(v)
        raise PromptError(f"{path}: {column} must hold 1/0 (or positive/negative), got {v!r}")

    return np.array([one(v) for v in values], dtype=np.int64)


def read_prompts(
    path: str | os.PathLike[str],
    *,
    layer: str | int | None = None,
    label_field: str = "label",
    group_field: str | None = None,
    crs: Any = None,
) -> list[Prompt]:
    """Prompts from a vector file (GeoPackage, GeoJSON, Shapefile, FlatGeobuf, GeoParquet).

    * a Point is a prompt of one point; its label comes from ``label_field`` when present
      (1/0, positive/negative), else 1;
    * a MultiPoint is one prompt with several points;
    * a Polygon (or any other area) is a box prompt: its bounding box;
    * with ``group_field``, all features sharing a value form one prompt (e.g. a box plus
      negative points). The group value (or the feature id) becomes the prompt id.

    Args:
        crs: the coordinates' CRS when the file has none (GeoJSON without ``crs`` is
            EPSG:4326 by specification).

    Example:
        >>> import geopandas as gpd, shapely
        >>> from segany.raster import tmp_dir
        >>> f = tmp_dir() / "p.geojson"
        >>> gpd.GeoDataFrame({"label": [1, 0]}, geometry=[shapely.Point(15, 45), shapely.Point(15.1, 45)],
        ...                  crs="EPSG:4326").to_file(f)
        >>> [(p.id, p.labels.tolist()) for p in read_prompts(f)]
        [(0, [1]), (1, [0])]
    """
    path = Path(path)
    if not path.exists():
        raise PromptError(f"prompt file {path} does not exist")
    try:
        if path.suffix.lower() in (".parquet", ".geoparquet"):
            import geopandas as gpd

            frame = gpd.read_parquet(path)
        else:
            import pyogrio

            frame = pyogrio.read_dataframe(path, layer=layer)
    except PromptError:
        raise
    except Exception as exc:
        raise PromptError(f"prompt file {path} cannot be read as vector data ({exc})") from None
    if len(frame) == 0:
        raise PromptError(f"prompt file {path} has no features")
    file_crs = frame.crs if frame.crs is not None else crs
    if group_field is not None and group_field not in frame.columns:
        raise PromptError(f"prompt file {path} has no column {group_field!r} (columns: {list(frame.columns)})")
    return prompts_from_geometries(
        list(frame.geometry),
        labels=list(frame[label_field]) if label_field in frame.columns else None,
        groups=list(frame[group_field]) if group_field else None,
        crs=file_crs,
        source=f"prompt file {path}",
        label_name=f"column {label_field!r}",
    )


def prompts_from_geometries(
    geometries: Sequence[Any],
    *,
    labels: Sequence[Any] | None = None,
    groups: Sequence[Any] | None = None,
    ids: Sequence[Any] | None = None,
    crs: Any = None,
    source: str = "prompts",
    label_name: str = "labels",
    require_foreground: bool = False,
) -> list[Prompt]:
    """Prompts from in-memory features: the rules of :func:`read_prompts` without a file.

    Front-ends that hold features in their own objects (a QGIS layer, a napari shapes
    layer, a web request) hand over the geometries as shapely objects or WKB bytes:

    * a Point is a prompt of one point, a MultiPoint one prompt of several points, labelled
      by ``labels`` (1/0, positive/negative, ...; default 1);
    * a Polygon (or MultiPolygon) is a box prompt: its bounding box, so a detector's boxes
      give one object each;
    * with ``groups``, the features sharing a value form one prompt (points and at most one
      box); the group value is the prompt id. Without, each feature is a prompt whose id is
      ``ids[i]`` (default: its index).

    Args:
        crs: the CRS of the coordinates (see :class:`Prompt`).
        source: names the features in error messages (``"layer points.gpkg"``).
        label_name: names the labels in error messages (``"field 'label'"``).
        require_foreground: refuse a prompt made only of background points (SAM has
            nothing to segment then; interactive tools and batch jobs want an error).

    Raises:
        PromptError: naming ``source`` and the feature or group: a missing or empty
            geometry, a line, a bad label, two boxes in a group, only background points.

    Example:
        >>> import shapely
        >>> feats = [shapely.Point(10, 20), shapely.Point(12, 20), shapely.box(0, 0, 5, 5).wkb]
        >>> ps = prompts_from_geometries(feats, labels=[1, "negative", 1], groups=["a", "a", "b"], crs="EPSG:32633")
        >>> [(p.id, p.points.tolist(), p.labels.tolist(), None if p.box is None else p.box.tolist()) for p in ps]
        [('a', [[10.0, 20.0], [12.0, 20.0]], [1, 0], None), ('b', [], [], [0.0, 0.0, 5.0, 5.0])]
        >>> try:
        ...     prompts_from_geometries([shapely.Point(1, 2)], labels=[0], ids=["f7"], source="layer pts",
        ...                             require_foreground=True)
        ... except PromptError as exc:
        ...     print(exc)
        layer pts: prompt 'f7' has only background (label 0) points and no box: nothing says which object to segment
    """
    import shapely

    n = len(geometries)
    if n == 0:
        raise PromptError(f"{source}: no features")
    for name, values in (("labels", labels), ("groups", groups), ("ids", ids)):
        if values is not None and len(values) != n:
            raise PromptError(f"{source}: {len(values)} {name} for {n} features")
    ids = list(ids) if ids is not None else list(range(n))
    geoms = []
    for i, geom in enumerate(geometries):
        if isinstance(geom, (bytes, bytearray, memoryview)):
            geom = shapely.from_wkb(bytes(geom))
        if geom is None or geom.is_empty:
            raise PromptError(f"{source}: feature {ids[i]} has no geometry")
        geoms.append(geom)
    parsed = _labels(labels, source, label_name) if labels is not None else np.ones(n, np.int64)
    keys = list(groups) if groups is not None else ids
    collected: dict[Any, dict[str, Any]] = {}
    for key, geom, label in zip(keys, geoms, parsed):
        g = collected.setdefault(key, {"points": [], "labels": [], "box": None})
        kind = geom.geom_type
        if kind == "Point":
            g["points"].append((geom.x, geom.y))
            g["labels"].append(label)
        elif kind == "MultiPoint":
            for part in geom.geoms:
                g["points"].append((part.x, part.y))
                g["labels"].append(label)
        elif kind in ("Polygon", "MultiPolygon"):
            if g["box"] is not None:
                raise PromptError(f"{source}: prompt {key!r} has more than one box")
            g["box"] = geom.bounds
        else:
            raise PromptError(f"{source}: {kind} features are not prompts (use points or polygons)")
    if require_foreground:
        for key, g in collected.items():
            if g["box"] is None and 1 not in g["labels"]:
                raise PromptError(f"{source}: prompt {key!r} has only background (label 0) points and no box: "
                                  "nothing says which object to segment")
    return [
        Prompt(np.array(g["points"]).reshape(-1, 2), np.array(g["labels"], np.int64), g["box"], key, crs)
        for key, g in collected.items()
    ]


def bounds_to_window(raster: "Raster", bounds: Sequence[float], crs: Any = None) -> "Window":
    """The raster pixels covering ``bounds`` (``xmin, ymin, xmax, ymax``) given in ``crs``
    (None: the raster's own; ``"pixel"``: pixel coordinates), clipped to the raster.

    The extent is reprojected with densified edges and rounded outwards to whole pixels,
    so every pixel the extent touches is in the window.

    Raises:
        PromptError: an extent that is empty, lies outside the raster, or cannot be placed.

    Example:
        >>> from segany.raster import open_raster, write_test_raster, tmp_dir
        >>> r = open_raster(write_test_raster(tmp_dir() / "b.tif", np.zeros((1, 100, 100), "uint8") + 1))
        >>> bounds_to_window(r, (500010.5, 4999950.0, 500030.0, 4999990.0))   # UTM metres, 1 m pixels
        Window(row0=10, col0=10, height=40, width=20)
    """
    from .raster import Window

    b = np.asarray(bounds, dtype=np.float64).reshape(4)
    crs_name = "pixels" if crs == PIXEL else ("the raster's CRS" if crs is None else _as_crs(crs, "extent").to_string())
    what = f"extent {', '.join(f'{v:.8g}' for v in b)} (in {crs_name}) for raster {raster.path.name}"
    if not np.isfinite(b).all() or b[2] <= b[0] or b[3] <= b[1]:
        raise PromptError(f"{what}: an extent needs xmin < xmax and ymin < ymax")
    if crs == PIXEL:
        cols, rows = b[[0, 2]], b[[1, 3]]
    else:
        dst = _as_crs(raster.crs, f"raster {raster.path}") if raster.crs is not None else None
        src = _as_crs(crs, what) if crs is not None else dst
        if src is not None and dst is None:
            raise PromptError(f"{what}: the raster has no CRS, so an extent in {src.to_string()} cannot be placed")
        if src is not None:
            b = _reproject_box(b, src, dst)
            if not np.isfinite(b).all():
                raise PromptError(f"{what}: cannot be reprojected to the raster's CRS")
        cols, rows = apply_affine(~raster.transform, np.array([b[0], b[2], b[0], b[2]]),
                                  np.array([b[1], b[1], b[3], b[3]]))
    # A hair of tolerance: an extent taken from the raster's own bounds lands on pixel
    # edges up to floating-point noise, and must not grow by a pixel.
    c0, c1 = int(np.floor(cols.min() + 1e-6)), int(np.ceil(cols.max() - 1e-6))
    r0, r1 = int(np.floor(rows.min() + 1e-6)), int(np.ceil(rows.max() - 1e-6))
    c0, r0, c1, r1 = max(c0, 0), max(r0, 0), min(c1, raster.width), min(r1, raster.height)
    if c1 <= c0 or r1 <= r0:
        left, bottom, right, top = raster.bounds
        raise PromptError(f"{what}: lies outside the raster (bounds {left:.6g}, {bottom:.6g}, {right:.6g}, {top:.6g})")
    return Window(r0, c0, r1 - r0, c1 - c0)
