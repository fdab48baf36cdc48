"""Large rasters for segmentation: windowed reads, band choice and one scene-wide stretch.

:func:`open_raster` opens any GDAL raster (GeoTIFF, COG, VRT, JPEG2000, whole-slide TIFF,
...) with rasterio and returns a :class:`Raster`, which holds only metadata: pixels are read
window by window (:meth:`Raster.read`), or as a lazy Dask array (:meth:`Raster.to_dask`),
so memory stays flat whatever the size of the file.

Rules (the same everywhere in segany, see also :mod:`segany.image`):

* **Bands.** By default: 1 band -> grey, repeated to RGB; 2 bands where band 2 is alpha ->
  grey; 3 or 4 bands -> bands 1, 2, 3 (the 4th is alpha or NIR); 5+ bands -> the bands
  tagged red, green, blue if the file says so, otherwise a :class:`BandError` asking for
  ``bands=`` (guessing three bands of a multispectral stack would silently give nonsense).
  An explicit ``bands=`` takes 1 or 3 band numbers (1-based, as in GDAL).
* **Normalisation.** uint8 pixels are used as they are. Every other type is stretched to
  0-255 with ONE ``value_range`` for the whole scene: the 0.5-99.5 percentiles of a sample
  of the valid pixels (all pixels of a small raster; an overview of a big one when it has
  overviews; otherwise a regular grid of windows). Never per tile: tiles must agree.
* **Validity.** A pixel is invalid when GDAL's mask says so in any chosen band (nodata,
  an internal mask, an alpha band), when it is NaN/inf, or when it equals a ``nodata=``
  given by the caller. Invalid pixels are 0 in the RGB and False in ``valid``.
* **Coordinates.** A raster without a CRS is allowed: coordinates are then the raster's own
  (pixels, x = column, y = row, when it has no geotransform), with a :class:`NoCRSWarning`.

Every problem with a file is a :class:`RasterError` naming the file and what is wrong.

Example:
    >>> import numpy as np
    >>> path = write_test_raster(tmp_dir() / "doc.tif", np.arange(3 * 40 * 50, dtype="uint16").reshape(3, 40, 50))
    >>> r = open_raster(path)
    >>> (r.height, r.width, r.bands, r.dtype)
    (40, 50, (1, 2, 3), 'uint16')
    >>> rgb, valid = r.read(Window(0, 0, 20, 30))
    >>> rgb.shape, rgb.dtype, bool(valid.all())
    ((20, 30, 3), dtype('uint8'), True)
"""

from __future__ import annotations

import hashlib
import math
import os
import tempfile
import threading
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from .errors import ImageError
from .image import DEFAULT_PERCENTILES

__all__ = [
    "BandError",
    "NoCRSWarning",
    "Raster",
    "RasterError",
    "Window",
    "normalise",
    "open_raster",
    "write_test_raster",
]

# GDAL's block cache defaults to 5 % of the RAM: on a big machine that alone is gigabytes
# that grow with the raster. A fixed cap keeps the memory of a tiled pass flat; 64 MB holds
# the blocks that overlapping tiles re-read (a strip of blocks along the current row of
# tiles). Only set when the user has not chosen a value.
os.environ.setdefault("GDAL_CACHEMAX", "64")

#: Pixels read to estimate the scene-wide percentiles (about 1 M: a 0.1 % error at most).
SAMPLE_PIXELS = 1 << 20
#: Side of each sampled window when a raster without overviews is sampled.
_SAMPLE_WINDOW = 128


class RasterError(ImageError):
    """A raster file cannot be used: missing, empty, corrupt, truncated, no valid pixels, ..."""


class BandError(RasterError):
    """The bands to use cannot be chosen (or the chosen ones do not exist)."""


class NoCRSWarning(UserWarning):
    """The raster has no coordinate reference system: results are in pixel coordinates."""


@dataclass(frozen=True)
class Window:
    """A rectangle of pixels: ``row0, col0`` (top-left) and ``height, width``.

    Example:
        >>> w = Window(10, 20, 100, 50)
        >>> (w.row1, w.col1, w.slices)
        (110, 70, (slice(10, 110, None), slice(20, 70, None)))
        >>> w.intersection(Window(0, 0, 15, 25))
        Window(row0=10, col0=20, height=5, width=5)
    """

    row0: int
    col0: int
    height: int
    width: int

    @property
    def row1(self) -> int:
        return self.row0 + self.height

    @property
    def col1(self) -> int:
        return self.col0 + self.width

    @property
    def slices(self) -> tuple[slice, slice]:
        return slice(self.row0, self.row1), slice(self.col0, self.col1)

    @property
    def shape(self) -> tuple[int, int]:
        return self.height, self.width

    def intersection(self, other: "Window") -> "Window | None":
        """The common pixels, or None when the windows do not overlap."""
        r0, c0 = max(self.row0, other.row0), max(self.col0, other.col0)
        r1, c1 = min(self.row1, other.row1), min(self.col1, other.col1)
        if r1 <= r0 or c1 <= c0:
            return None
        return Window(r0, c0, r1 - r0, c1 - c0)

    def to_rasterio(self) -> Any:
        from rasterio.windows import Window as RioWindow

        return RioWindow(self.col0, self.row0, self.width, self.height)


def _err(path: Path | str, problem: str) -> RasterError:
    return RasterError(f"{path}: {problem}")


def _check_file(path: Path) -> None:
    # GDAL's messages for these cases ("not recognized as a supported file format") do not
    # say what is actually wrong; these do.
    text = str(path)
    if "://" in text or text.startswith("/vsi"):
        return  # remote or virtual: GDAL decides
    if not path.exists():
        raise _err(path, "no such file")
    if path.is_dir():
        raise _err(path, "is a folder, not a raster file")
    if path.stat().st_size == 0:
        raise _err(path, "the file is empty (0 bytes); it was probably not copied or written completely")


def _default_bands(src: Any, path: Path) -> tuple[int, ...]:
    from rasterio.enums import ColorInterp

    count = src.count
    interp = list(src.colorinterp)
    if count == 1:
        return (1,)
    if count == 2:
        if interp[1] == ColorInterp.alpha:
            return (1,)
        raise BandError(
            f"{path}: has 2 bands and the second is not alpha; say which to use, e.g. bands=(1,) "
            "(grey) or bands=(1, 2, 2) (--bands 1 / --bands 1,2,2 on the command line)"
        )
    if count in (3, 4):
        return (1, 2, 3)
    wanted = [ColorInterp.red, ColorInterp.green, ColorInterp.blue]
    if all(c in interp for c in wanted):
        return tuple(interp.index(c) + 1 for c in wanted)
    names = ", ".join(
        f"{i + 1}={src.descriptions[i] or interp[i].name}" for i in range(min(count, 8))
    ) + (", ..." if count > 8 else "")
    raise BandError(
        f"{path}: has {count} bands ({names}) and none is tagged red/green/blue; choose 3 bands "
        "(or 1) to segment, e.g. bands=(4, 3, 2) (--bands 4,3,2 on the command line)"
    )


def _check_bands(bands: Sequence[int], count: int, path: Path) -> tuple[int, ...]:
    try:
        chosen = tuple(int(b) for b in bands)
    except (TypeError, ValueError):
        raise BandError(f"{path}: bands must be band numbers (1-based), got {bands!r}") from None
    if len(chosen) not in (1, 3):
        raise BandError(
            f"{path}: choose 1 band (grey) or 3 bands (RGB), got {len(chosen)}: {list(chosen)}"
        )
    bad = [b for b in chosen if not 1 <= b <= count]
    if bad:
        raise BandError(
            f"{path}: band {bad[0]} does not exist; the file has {count} band"
            f"{'s' if count != 1 else ''} (numbered 1 to {count})"
        )
    return chosen


def normalise(
    raw: np.ndarray,
    valid: np.ndarray,
    value_range: tuple[float, float] | None,
    layout: str = "hwc",
) -> np.ndarray:
    """``bands x H x W`` pixels -> ``H x W x 3`` uint8, with the rules of :mod:`segany.image`.

    One band is repeated to three; invalid pixels become 0. ``layout="chw"`` returns
    ``3 x H x W`` instead (what the encoder takes, without a transposed copy).

    Example:
        >>> raw = np.array([[[0, 1000], [2000, 4000]]], dtype=np.uint16)
        >>> normalise(raw, np.ones((2, 2), bool), (0, 4000))[..., 0].tolist()
        [[0, 64], [128, 255]]
    """
    if raw.dtype == np.uint8 and value_range is None:
        out = raw
    elif raw.dtype == np.bool_:
        out = raw.astype(np.uint8) * 255
    else:
        if value_range is None:
            raise ImageError(f"pixels of type {raw.dtype} need a value_range to map to 0-255")
        low, high = value_range
        # Same formula as segany.image.prepare_image, so a small image and the same pixels
        # read as a tile give identical model input.
        scaled = (raw.astype(np.float32) - np.float32(low)) * np.float32(255.0 / (high - low))
        out = np.clip(np.nan_to_num(scaled, nan=0.0), 0, 255).round().astype(np.uint8)
    if layout == "chw":
        chw = np.repeat(out, 3, axis=0) if out.shape[0] == 1 else out
        if not valid.all():
            chw = chw.copy() if np.shares_memory(chw, raw) else chw
            chw[:, ~valid] = 0
        return chw
    rgb = np.moveaxis(out, 0, -1)
    if rgb.shape[2] == 1:
        rgb = np.repeat(rgb, 3, axis=2)
    rgb = np.ascontiguousarray(rgb)
    if not valid.all():
        if np.shares_memory(rgb, raw):
            rgb = rgb.copy()
        rgb[~valid] = 0
    return rgb


class Raster:
    """A raster file opened for segmentation (metadata only; pixels are read on demand).

    Build it with :func:`open_raster`. Instances are cheap to pickle (Dask ships them to
    workers): the GDAL handle is reopened per thread and process.

    Attributes:
        path: the file.
        width, height, count: size and number of bands in the file.
        bands: the 1-based bands used (1 or 3 of them).
        dtype: pixel type of the file (numpy name).
        crs: a ``rasterio.crs.CRS`` or None (coordinates are then the raster's own).
        transform: the pixel -> map affine transform.
        nodata: the nodata value of the file or given by the caller (None: none).
        value_range: the scene-wide ``(low, high)`` mapped to 0-255 (None for uint8).
    """

    def __init__(
        self,
        path: Path,
        *,
        width: int,
        height: int,
        count: int,
        bands: tuple[int, ...],
        dtype: str,
        crs: Any,
        transform: Any,
        nodata: float | None,
        user_nodata: float | None,
        value_range: tuple[float, float] | None,
        percentiles: tuple[float, float],
    ) -> None:
        self.path = path
        self.width, self.height, self.count = width, height, count
        self.bands = bands
        self.dtype = dtype
        self.crs = crs
        self.transform = transform
        self.nodata = nodata
        self.user_nodata = user_nodata
        self.value_range = value_range
        self.percentiles = percentiles
        self._local = threading.local()

    # -------------------------------------------------------------- pickling / handles
    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state.pop("_local", None)  # GDAL handles do not travel
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._local = threading.local()

    def _dataset(self) -> Any:
        # One handle per thread: GDAL dataset handles must not be shared between threads.
        ds = getattr(self._local, "ds", None)
        if ds is None or ds.closed:
            import contextlib

            import rasterio

            # rasterio repeats "not georeferenced" on every open; open_raster already said it
            # once (NoCRSWarning). catch_warnings is not thread-safe, so only where needed.
            quiet = warnings.catch_warnings() if self.crs is None else contextlib.nullcontext()
            with quiet:
                if self.crs is None:
                    warnings.simplefilter("ignore", rasterio.errors.NotGeoreferencedWarning)
                try:
                    ds = rasterio.open(self.path)
                except rasterio.errors.RasterioIOError as exc:
                    raise _err(self.path, f"cannot be opened any more ({exc})") from None
            self._local.ds = ds
        return ds

    def close(self) -> None:
        """Close this thread's GDAL handle (others close when their thread ends)."""
        ds = getattr(self._local, "ds", None)
        if ds is not None:
            ds.close()
            self._local.ds = None

    def __repr__(self) -> str:
        crs = self.crs.to_string() if self.crs else "no CRS"
        return (
            f"Raster({str(self.path)!r}, {self.width} x {self.height}, bands {self.bands}, "
            f"{self.dtype}, {crs})"
        )

    # -------------------------------------------------------------- geometry
    @property
    def shape(self) -> tuple[int, int]:
        """``(height, width)``."""
        return self.height, self.width

    @property
    def bounds(self) -> tuple[float, float, float, float]:
        """``(left, bottom, right, top)`` in the raster's coordinates."""
        from rasterio.transform import array_bounds

        # array_bounds already answers (west, south, east, north).
        west, south, east, north = array_bounds(self.height, self.width, self.transform)
        return (west, south, east, north)

    def window_transform(self, window: Window) -> Any:
        """The affine transform of a window (its pixel (0, 0) is the window's corner)."""
        from affine import Affine

        a, b, c, d, e, f = tuple(self.transform)[:6]
        return Affine(a, b, c + a * window.col0 + b * window.row0, d, e, f + d * window.col0 + e * window.row0)

    def subset(self, window: Window) -> "Raster":
        """The pixels of ``window`` as a raster of their own, with this raster's band choice,
        normalisation (:attr:`value_range`) and nodata, and a geotransform that keeps every
        pixel at its place on the map.

        It reads through a small GDAL VRT (no pixels are copied), so every tiled function
        (:func:`segany.tiling.encode_raster`, :func:`segany.scene.segment_everything`, ...)
        works on an extent of a large scene; objects come out in the same map coordinates
        as from the whole raster, and tiles are stretched exactly like the whole scene's.
        (A per-dataset GDAL mask is not carried over; nodata values and alpha bands are.)

        Example:
            >>> path = write_test_raster(tmp_dir() / "big.tif", np.arange(40 * 50, dtype="uint16").reshape(1, 40, 50))
            >>> full = open_raster(path)
            >>> part = full.subset(Window(10, 20, 5, 6))
            >>> (part.height, part.width, part.value_range == full.value_range, part.bounds[0] - full.bounds[0])
            (5, 6, True, 20.0)
            >>> bool((part.read_raw(Window(0, 0, 5, 6))[0] == full.read_raw(Window(10, 20, 5, 6))[0]).all())
            True
        """
        window = self.clip(window)
        if window == Window(0, 0, self.height, self.width):
            return self
        vrt = _subset_vrt(self, window)
        part = Raster(
            vrt, width=window.width, height=window.height, count=self.count, bands=self.bands, dtype=self.dtype,
            crs=self.crs, transform=self.window_transform(window), nodata=self.nodata,
            user_nodata=self.user_nodata, value_range=self.value_range, percentiles=self.percentiles,
        )
        part.parent, part.parent_window = self, window  # type: ignore[attr-defined]
        return part

    def clip(self, window: Window) -> Window:
        """The part of ``window`` inside the raster (an error if none is)."""
        inside = window.intersection(Window(0, 0, self.height, self.width))
        if inside is None:
            raise _err(self.path, f"window {window} lies outside the raster ({self.height} x {self.width})")
        return inside

    # -------------------------------------------------------------- pixels
    def read_raw(
        self, window: Window, out_shape: tuple[int, int] | None = None, resampling: str = "bilinear"
    ) -> tuple[np.ndarray, np.ndarray]:
        """Pixels of the chosen bands as stored, ``bands x h x w``, and the ``h x w`` validity.

        Args:
            window: pixels to read; must lie inside the raster.
            out_shape: ``(h, w)`` to resample to (GDAL uses overviews when it can); default
                the window's own size.
            resampling: a ``rasterio.enums.Resampling`` name, used with ``out_shape``.
        """
        import rasterio
        from rasterio.enums import Resampling

        if window.row0 < 0 or window.col0 < 0 or window.row1 > self.height or window.col1 > self.width:
            raise _err(self.path, f"window {window} is not inside the raster ({self.height} x {self.width})")
        shape = tuple(out_shape) if out_shape is not None else window.shape
        ds = self._dataset()
        kwargs: dict[str, Any] = dict(window=window.to_rasterio())
        if shape != window.shape:
            kwargs.update(out_shape=(len(self.bands), *shape), resampling=Resampling[resampling])
        try:
            raw = ds.read(list(self.bands), **kwargs)
            mask_kwargs = dict(kwargs)
            if "resampling" in mask_kwargs:
                mask_kwargs["resampling"] = Resampling.nearest
            masks = ds.read_masks(list(self.bands), **mask_kwargs)
        except rasterio.errors.RasterioError as exc:
            raise _err(
                self.path,
                f"cannot read pixels (rows {window.row0}-{window.row1}, columns "
                f"{window.col0}-{window.col1}): {exc}; the file may be truncated or corrupt",
            ) from None
        valid = (masks > 0).all(axis=0)
        if raw.dtype.kind == "f":
            valid &= np.isfinite(raw).all(axis=0)
        if self.user_nodata is not None:
            if np.isnan(self.user_nodata):
                if raw.dtype.kind == "f":
                    valid &= ~np.isnan(raw).any(axis=0)
            else:
                valid &= ~(raw == self.user_nodata).any(axis=0)
        return raw, valid

    def read(
        self, window: Window, out_shape: tuple[int, int] | None = None, layout: str = "hwc"
    ) -> tuple[np.ndarray, np.ndarray]:
        """Model-ready pixels: ``h x w x 3`` uint8 RGB (``3 x h x w`` with
        ``layout="chw"``) and ``h x w`` bool validity.

        Uses the scene-wide :attr:`value_range`, so every window of the raster is stretched
        the same way.
        """
        raw, valid = self.read_raw(window, out_shape)
        return normalise(raw, valid, self.value_range, layout), valid

    def to_dask(self, chunks: int | tuple[int, int] = 1024, normalised: bool = True) -> Any:
        """The raster as a lazy Dask array, read window by window when computed.

        Args:
            chunks: chunk side (or ``(rows, cols)``) in pixels.
            normalised: ``H x W x 3`` uint8 model input (default) or the raw
                ``bands x H x W`` pixels in the file's type.

        Example:
            >>> path = write_test_raster(tmp_dir() / "dask.tif", np.ones((1, 30, 20), "float32"))
            >>> arr = open_raster(path, value_range=(0, 2)).to_dask(chunks=16)
            >>> arr.shape, arr.chunks[0], int(arr[5:7, 5:7].max().compute())
            ((30, 20, 3), (16, 14), 128)
        """
        import dask.array as da

        rows, cols = (chunks, chunks) if isinstance(chunks, int) else chunks
        reader = _DaskReader(self, normalised)
        if normalised:
            return da.from_array(reader, chunks=(rows, cols, 3), asarray=False, lock=False,
                                 meta=np.empty((0, 0, 0), np.uint8), name=f"raster-{self.signature_hash()[:12]}")
        return da.from_array(reader, chunks=(len(self.bands), rows, cols), asarray=False, lock=False,
                             meta=np.empty((0, 0, 0), np.dtype(self.dtype)),
                             name=f"raw-{self.signature_hash()[:12]}")

    def valid_fraction(self, window: Window) -> float:
        """Share of valid pixels in a window (0 for an all-nodata window)."""
        _raw, valid = self.read_raw(window)
        return float(valid.mean())

    # -------------------------------------------------------------- identity
    def signature(self) -> dict[str, Any]:
        """What identifies the raster's content, for caches: size, bands, CRS, transform,
        nodata and a hash of sampled pixels (not the path or the modification time, so a
        moved or copied file keeps its cache, while rewritten pixels invalidate it).
        """
        cached = getattr(self, "_signature", None)
        if cached is not None:
            return cached
        digest = hashlib.sha256()
        ds = self._dataset()
        for window in _grid_windows(self.height, self.width, 3, 64):
            block = ds.read(window=window.to_rasterio())  # all bands, raw bytes
            digest.update(np.ascontiguousarray(block).tobytes())
        signature = {
            "width": self.width,
            "height": self.height,
            "count": self.count,
            "dtype": self.dtype,
            "crs": self.crs.to_wkt() if self.crs else None,
            "transform": [float(v) for v in tuple(self.transform)[:6]],
            "nodata": None if self.nodata is None else float(self.nodata),
            "pixels_sha256": digest.hexdigest(),
        }
        self._signature = signature
        return signature

    def signature_hash(self) -> str:
        """A short stable hash of :meth:`signature` plus band choice and normalisation."""
        import json

        payload = dict(self.signature(), bands=list(self.bands), value_range=self.value_range,
                       user_nodata=self.user_nodata)
        return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()


class _DaskReader:
    """Array-like that Dask slices: every ``__getitem__`` is one windowed read."""

    def __init__(self, raster: Raster, normalised: bool) -> None:
        self.raster = raster
        self.normalised = normalised
        if normalised:
            self.shape = (raster.height, raster.width, 3)
            self.dtype = np.dtype(np.uint8)
        else:
            self.shape = (len(raster.bands), raster.height, raster.width)
            self.dtype = np.dtype(raster.dtype)
        self.ndim = 3

    def __getitem__(self, key: tuple[slice, ...]) -> np.ndarray:
        if self.normalised:
            rows, cols, chans = key
        else:
            chans, rows, cols = key
        r0, r1, _ = rows.indices(self.raster.height)
        c0, c1, _ = cols.indices(self.raster.width)
        if r1 <= r0 or c1 <= c0:
            shape = (max(r1 - r0, 0), max(c1 - c0, 0))
            empty = np.zeros((*shape, 3) if self.normalised else (len(self.raster.bands), *shape), self.dtype)
            return empty[(slice(None), slice(None), chans) if self.normalised else (chans,)]
        window = Window(r0, c0, r1 - r0, c1 - c0)
        if self.normalised:
            rgb, _valid = self.raster.read(window)
            return rgb[:, :, chans]
        raw, _valid = self.raster.read_raw(window)
        return raw[chans]


_SUBSET_DIR: list[Path] = []


def _subset_vrt(raster: Raster, window: Window) -> Path:
    """A VRT file showing ``window`` of ``raster`` (every band), in a per-process folder
    removed at exit; the same subset of the same file reuses its VRT."""
    import atexit
    import shutil
    from xml.sax.saxutils import escape

    from rasterio.dtypes import _gdal_typename

    if not _SUBSET_DIR:
        folder = Path(tempfile.mkdtemp(prefix="segany-subsets-"))
        atexit.register(shutil.rmtree, folder, True)
        _SUBSET_DIR.append(folder)
    source = os.fspath(raster.path)
    if "://" not in source and not source.startswith("/vsi"):
        source = os.path.abspath(source)
    key = hashlib.sha256(f"{source}|{window}".encode()).hexdigest()[:16]
    path = _SUBSET_DIR[0] / f"{Path(source).stem}.{key}.vrt"
    if path.exists():
        return path
    ds = raster._dataset()
    a, b, c, d, e, f = tuple(raster.window_transform(window))[:6]
    lines = [f'<VRTDataset rasterXSize="{window.width}" rasterYSize="{window.height}">']
    if raster.crs is not None:
        lines.append(f"  <SRS>{escape(raster.crs.to_wkt())}</SRS>")
    lines.append(f"  <GeoTransform>{c!r}, {a!r}, {b!r}, {f!r}, {d!r}, {e!r}</GeoTransform>")
    for band in range(1, ds.count + 1):
        lines.append(f'  <VRTRasterBand dataType="{_gdal_typename(ds.dtypes[band - 1])}" band="{band}">')
        nodata = ds.nodatavals[band - 1]
        if nodata is not None:
            lines.append(f"    <NoDataValue>{nodata!r}</NoDataValue>")
        lines.append(f"    <ColorInterp>{ds.colorinterp[band - 1].name.capitalize()}</ColorInterp>")
        lines += [
            "    <SimpleSource>",
            f'      <SourceFilename relativeToVRT="0">{escape(source)}</SourceFilename>',
            f"      <SourceBand>{band}</SourceBand>",
            f'      <SrcRect xOff="{window.col0}" yOff="{window.row0}" xSize="{window.width}" ySize="{window.height}"/>',
            f'      <DstRect xOff="0" yOff="0" xSize="{window.width}" ySize="{window.height}"/>',
            "    </SimpleSource>",
            "  </VRTRasterBand>",
        ]
    lines.append("</VRTDataset>")
    tmp = path.with_name(path.name + f".tmp{os.getpid()}-{threading.get_ident()}")
    tmp.write_text("\n".join(lines) + "\n")
    os.replace(tmp, path)  # atomic: another thread may be writing the same subset
    return path


def _grid_windows(height: int, width: int, n: int, side: int) -> list[Window]:
    """``n x n`` windows of ``side`` pixels spread evenly over the raster (clipped to it)."""
    side_h, side_w = min(side, height), min(side, width)
    rows = np.linspace(0, height - side_h, n).round().astype(int)
    cols = np.linspace(0, width - side_w, n).round().astype(int)
    seen, windows = set(), []
    for r in rows:
        for c in cols:
            if (r, c) not in seen:
                seen.add((r, c))
                windows.append(Window(int(r), int(c), side_h, side_w))
    return windows


def _sample(raster: Raster) -> tuple[np.ndarray, np.ndarray]:
    """Raw pixels of the chosen bands (``bands x N``) and their validity, ~SAMPLE_PIXELS."""
    h, w = raster.height, raster.width
    if h * w <= 4 * SAMPLE_PIXELS:
        raw, valid = raster.read_raw(Window(0, 0, h, w))
        return raw.reshape(raw.shape[0], -1), valid.reshape(-1)
    ds = raster._dataset()
    if ds.overviews(raster.bands[0]):
        # A decimated read of the whole raster is served from the overviews: the best sample.
        # Nearest, not bilinear: averaging would shrink the range the percentiles measure.
        scale = math.sqrt(SAMPLE_PIXELS / (h * w))
        shape = (max(1, round(h * scale)), max(1, round(w * scale)))
        raw, valid = raster.read_raw(Window(0, 0, h, w), out_shape=shape, resampling="nearest")
        return raw.reshape(raw.shape[0], -1), valid.reshape(-1)
    n = max(2, int(math.sqrt(SAMPLE_PIXELS / _SAMPLE_WINDOW**2)))
    raws, valids = [], []
    for window in _grid_windows(h, w, n, _SAMPLE_WINDOW):
        raw, valid = raster.read_raw(window)
        raws.append(raw.reshape(raw.shape[0], -1))
        valids.append(valid.reshape(-1))
    return np.concatenate(raws, axis=1), np.concatenate(valids)


def scene_value_range(
    raster: Raster, percentiles: tuple[float, float] = DEFAULT_PERCENTILES
) -> tuple[float, float]:
    """The ``(low, high)`` percentiles of the valid pixels of the whole scene (sampled).

    Example:
        >>> path = write_test_raster(tmp_dir() / "vr.tif", np.arange(100, dtype="float32").reshape(1, 10, 10))
        >>> scene_value_range(open_raster(path, value_range=(0, 1)), (0, 100))
        (0.0, 99.0)
    """
    raw, valid = _sample(raster)
    values = raw[:, valid]
    if values.size == 0:
        # The sample may have missed a small valid area: look at a decimated whole scene.
        scale = min(1.0, math.sqrt(4 * SAMPLE_PIXELS / (raster.height * raster.width)))
        shape = (max(1, round(raster.height * scale)), max(1, round(raster.width * scale)))
        raw, valid = raster.read_raw(Window(0, 0, raster.height, raster.width), out_shape=shape,
                                     resampling="nearest")
        values = raw[:, valid]
    if values.size == 0:
        raise _err(raster.path, "has no valid pixels (every pixel is nodata, masked or NaN)")
    values = values.astype(np.float64).reshape(-1)
    low, high = np.percentile(values, percentiles)
    if high <= low:
        # Sparse scenes (a few bright objects on a flat background) can have equal
        # percentiles; the full range still separates them.
        low, high = float(values.min()), float(values.max())
    if high <= low:
        raise _err(raster.path, f"is constant (every valid pixel is {low:g}); there is nothing to segment")
    return float(low), float(high)


def open_raster(
    path: str | os.PathLike[str],
    bands: Sequence[int] | None = None,
    *,
    value_range: tuple[float, float] | None = None,
    nodata: float | None = None,
    percentiles: tuple[float, float] = DEFAULT_PERCENTILES,
    warn_no_crs: bool = True,
) -> Raster:
    """Open a raster for segmentation and fix its band choice and normalisation.

    Args:
        path: any file or URL GDAL opens (GeoTIFF, COG, VRT, ``/vsicurl/...``).
        bands: 1-based band numbers, 1 (grey) or 3 (RGB); default: see the module rules.
        value_range: ``(low, high)`` mapped to 0-255; default the scene's percentiles
            (uint8 rasters are used as they are unless a range is given).
        nodata: a pixel value to treat as missing on top of the file's own nodata/masks.
        percentiles: the percentiles measured when ``value_range`` is not given.
        warn_no_crs: warn (:class:`NoCRSWarning`) when the raster has no CRS.

    Raises:
        RasterError: missing, empty, unreadable, truncated or all-nodata file.
        BandError: bands that cannot be chosen or do not exist.

    Example:
        >>> import numpy as np
        >>> path = write_test_raster(tmp_dir() / "grey.tif", np.full((1, 8, 8), 7, "uint8"))
        >>> open_raster(path).bands
        (1,)
    """
    import rasterio

    path = Path(os.fspath(path))
    _check_file(path)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", rasterio.errors.NotGeoreferencedWarning)
        try:
            src = rasterio.open(path)
        except rasterio.errors.RasterioIOError as exc:
            raise _err(path, f"cannot be read as a raster ({exc}); is it a complete, valid image file?") from None
    with src:
        if src.width == 0 or src.height == 0 or src.count == 0:
            raise _err(path, f"has no pixels ({src.width} x {src.height}, {src.count} bands)")
        chosen = _check_bands(bands, src.count, path) if bands is not None else _default_bands(src, path)
        dtypes = {src.dtypes[b - 1] for b in chosen}
        if len(dtypes) > 1:
            raise BandError(f"{path}: the chosen bands {list(chosen)} have different pixel types {sorted(dtypes)}")
        dtype = dtypes.pop()
        if np.dtype(dtype).kind == "c":
            raise _err(path, f"has complex pixels ({dtype}); convert them to amplitude first")
        crs = src.crs
        if crs is None and warn_no_crs:
            hint = " (it has ground control points: warp it with gdalwarp first)" if src.gcps[0] else ""
            warnings.warn(
                f"{path} has no coordinate reference system{hint}: coordinates are the raster's "
                "own (pixels: x = column, y = row)",
                NoCRSWarning,
                stacklevel=2,
            )
        file_nodata = src.nodatavals[chosen[0] - 1]
        raster = Raster(
            path,
            width=src.width,
            height=src.height,
            count=src.count,
            bands=chosen,
            dtype=dtype,
            crs=crs,
            transform=src.transform,
            nodata=nodata if nodata is not None else file_nodata,
            user_nodata=nodata,
            value_range=None,
            percentiles=tuple(percentiles),  # type: ignore[arg-type]
        )
    _check_last_block(raster)
    if value_range is not None:
        low, high = (float(v) for v in value_range)
        if not (math.isfinite(low) and math.isfinite(high)) or high <= low:
            raise ImageError(f"{path}: value_range must be finite with low < high, got {tuple(value_range)}")
        raster.value_range = (low, high)
    elif dtype != "uint8":
        raster.value_range = scene_value_range(raster, tuple(percentiles))  # type: ignore[arg-type]
    return raster


def _check_last_block(raster: Raster) -> None:
    """Read the last block: a truncated file fails here, at open time, not hours later."""
    ds = raster._dataset()
    bh, bw = ds.block_shapes[raster.bands[0] - 1]
    bh, bw = min(bh, raster.height), min(bw, raster.width)
    raster.read_raw(Window(raster.height - bh, raster.width - bw, bh, bw))


# ------------------------------------------------------------------------------ test data


def tmp_dir() -> Path:
    """A fresh temporary folder for examples and tests, removed when Python exits."""
    import atexit
    import shutil

    path = Path(tempfile.mkdtemp(prefix="segany-"))
    atexit.register(shutil.rmtree, path, True)
    return path


def write_test_raster(
    path: str | os.PathLike[str],
    data: np.ndarray,
    *,
    crs: str | None = "EPSG:32633",
    transform: Any = None,
    nodata: float | None = None,
    block: int = 256,
    compress: str = "deflate",
    **profile: Any,
) -> Path:
    """Write ``bands x H x W`` pixels as a tiled, compressed GeoTIFF (examples and tests).

    Default georeferencing: UTM 33N, 1 m pixels, top-left corner at (500000, 5000000).

    Example:
        >>> p = write_test_raster(tmp_dir() / "t.tif", np.zeros((3, 16, 16), "uint8"))
        >>> p.suffix
        '.tif'
    """
    import rasterio
    from affine import Affine

    data = np.asarray(data)
    if data.ndim == 2:
        data = data[None]
    if transform is None and crs is not None:
        transform = Affine(1.0, 0.0, 500000.0, 0.0, -1.0, 5000000.0)
    count, height, width = data.shape
    kwargs: dict[str, Any] = dict(
        driver="GTiff", width=width, height=height, count=count, dtype=data.dtype.name,
        crs=crs, nodata=nodata, compress=compress,
    )
    if transform is not None:
        kwargs["transform"] = transform
    if height >= 16 and width >= 16:
        bs = max(16, min(block, 1 << int(math.log2(min(height, width)))))
        kwargs.update(tiled=True, blockxsize=bs, blockysize=bs)
    kwargs.update(profile)
    path = Path(path)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", rasterio.errors.NotGeoreferencedWarning)
        with rasterio.open(path, "w", **kwargs) as dst:
            dst.write(data)
    return path
