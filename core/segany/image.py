"""Turn whatever image a scientist has into the 8-bit RGB the model expects.

Normalisation rules (documented in the README and applied everywhere in segany):

* ``uint8`` pixels are used as they are (this keeps outputs identical to the reference);
* ``bool`` becomes 0/255;
* every other dtype (uint16, int, float) is stretched linearly from ``value_range`` to
  0-255. By default ``value_range`` is the 0.5th-99.5th percentile of the valid pixels
  of all channels together (one range for all channels keeps colour balance); large
  rasters pass a range measured over the whole scene so that tiles agree;
* NaN, +-inf and ``nodata`` pixels are invalid: they are excluded from the percentiles,
  set to 0 in the output and reported in ``valid`` so callers can ignore them;
* ``H x W`` and ``H x W x 1`` are grey and repeated to 3 channels; ``H x W x 4`` drops alpha;
  ``image_format="BGR"`` reverses the channel order.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .errors import ImageError

DEFAULT_PERCENTILES = (0.5, 99.5)
# Percentiles of a huge image are estimated from at most this many pixels (strided sample):
# exact enough for a contrast stretch and keeps memory flat.
_PERCENTILE_SAMPLE = 4_000_000


@dataclass
class PreparedImage:
    """An image ready for the model.

    Attributes:
        rgb: ``H x W x 3`` uint8.
        valid: ``H x W`` bool, False where the input was NaN/inf/nodata; None if all valid.
        value_range: the ``(low, high)`` mapped to 0 and 255 (None for uint8/bool input).
    """

    rgb: np.ndarray
    valid: np.ndarray | None
    value_range: tuple[float, float] | None


def _as_array(image: object, name: str) -> np.ndarray:
    if hasattr(image, "detach") and hasattr(image, "cpu"):  # a torch tensor
        image = image.detach().cpu().numpy()
    try:
        array = np.asarray(image)
    except Exception as exc:  # e.g. ragged lists
        raise ImageError(f"{name}: cannot be read as an array ({exc})") from None
    if array.dtype == object or array.dtype.kind not in "biuf":
        raise ImageError(f"{name}: unsupported pixel type {array.dtype}; use integer or float pixels")
    return array


def _to_hwc(array: np.ndarray, name: str) -> np.ndarray:
    if array.ndim == 2:
        array = array[:, :, None]
    if array.ndim != 3:
        raise ImageError(
            f"{name}: expected an H x W or H x W x C image, got an array of shape {array.shape}"
        )
    if array.shape[0] == 0 or array.shape[1] == 0:
        raise ImageError(f"{name}: the image is empty (shape {array.shape})")
    channels = array.shape[2]
    if channels not in (1, 3, 4):
        hint = ""
        if array.shape[0] in (1, 3, 4) and array.shape[2] > 4:
            hint = " (it looks channels-first: transpose it to H x W x C)"
        raise ImageError(
            f"{name}: expected 1, 3 or 4 channels (grey, RGB, RGBA), got {channels}{hint}; "
            "select the bands to use first"
        )
    if channels == 1:
        array = np.repeat(array, 3, axis=2)
    elif channels == 4:
        array = array[:, :, :3]
    return array


def invalid_pixels(array: np.ndarray, nodata: float | None = None) -> np.ndarray | None:
    """``H x W`` mask of pixels that are NaN/inf or equal ``nodata`` in any channel; None if none."""
    bad = None
    if array.dtype.kind == "f":
        bad = ~np.isfinite(array)
    if nodata is not None:
        if np.isnan(nodata):
            hit = np.isnan(array) if array.dtype.kind == "f" else None
        else:
            hit = array == nodata
        if hit is not None:
            bad = hit if bad is None else (bad | hit)
    if bad is None:
        return None
    bad = bad.any(axis=2) if bad.ndim == 3 else bad
    return bad if bad.any() else None


def percentile_range(
    array: np.ndarray,
    valid: np.ndarray | None = None,
    percentiles: tuple[float, float] = DEFAULT_PERCENTILES,
) -> tuple[float, float]:
    """The ``(low, high)`` percentiles of the valid pixels of all channels.

    Example:
        >>> percentile_range(np.arange(100, dtype=np.uint16).reshape(10, 10), percentiles=(0, 100))
        (0.0, 99.0)
    """
    values = array if valid is None else array[valid]
    values = values.reshape(-1)
    if values.size > _PERCENTILE_SAMPLE:
        values = values[:: values.size // _PERCENTILE_SAMPLE + 1]
    if values.size == 0:
        raise ImageError("the image has no valid pixels (all NaN or nodata)")
    low, high = np.percentile(values.astype(np.float64), percentiles)
    return float(low), float(high)


def prepare_image(
    image: object,
    image_format: str = "RGB",
    nodata: float | None = None,
    value_range: tuple[float, float] | None = None,
    name: str = "image",
) -> PreparedImage:
    """Validate and normalise an image to ``H x W x 3`` uint8 RGB (see the module rules).

    Args:
        image: ``H x W``, ``H x W x 1/3/4`` array (numpy or torch) of any integer/float type.
        image_format: ``"RGB"`` or ``"BGR"`` (channel order of ``image``).
        nodata: a pixel value that marks missing data.
        value_range: ``(low, high)`` to map to 0-255 for non-uint8 input; default percentiles.
        name: how errors refer to the image (a file name, a layer name).

    Example:
        >>> img = np.array([[0, 1000], [2000, 4000]], dtype=np.uint16)
        >>> prepare_image(img, value_range=(0, 4000)).rgb[..., 0].tolist()
        [[0, 64], [128, 255]]
    """
    if image_format not in ("RGB", "BGR"):
        raise ImageError(f"{name}: image_format must be 'RGB' or 'BGR', got {image_format!r}")
    array = _to_hwc(_as_array(image, name), name)
    if image_format == "BGR":
        array = array[:, :, ::-1]
    invalid = invalid_pixels(array, nodata)
    valid = None if invalid is None else ~invalid
    if valid is not None and not valid.any():
        raise ImageError(f"{name}: every pixel is NaN or nodata; there is nothing to segment")

    if array.dtype == np.uint8 and value_range is None:
        rgb = np.ascontiguousarray(array)
        used_range = None
    elif array.dtype == np.bool_:
        rgb = np.ascontiguousarray(array.astype(np.uint8) * 255)
        used_range = None
    else:
        if value_range is not None:
            low, high = value_range
        else:
            low, high = percentile_range(array, valid)
            if high <= low:
                # Sparse images (a few bright cells on a zero background) can have equal
                # percentiles; fall back to the full range before calling them constant.
                low, high = percentile_range(array, valid, (0.0, 100.0))
        if not (np.isfinite(low) and np.isfinite(high)):
            raise ImageError(f"{name}: value_range must be finite, got {(low, high)}")
        if high <= low:
            raise ImageError(
                f"{name}: the image is constant (all valid pixels are {low:g}); "
                "there is nothing to segment"
            )
        scaled = (array.astype(np.float32) - np.float32(low)) * np.float32(255.0 / (high - low))
        rgb = np.clip(np.nan_to_num(scaled, nan=0.0), 0, 255).round().astype(np.uint8)
        used_range = (float(low), float(high))
    if valid is not None:
        if np.shares_memory(rgb, array):
            rgb = rgb.copy()  # never write into the caller's array
        rgb[~valid] = 0
    sample = rgb if valid is None else rgb[valid]
    if sample.min() == sample.max():
        raise ImageError(
            f"{name}: the image is constant (every valid pixel is {int(sample.flat[0])}); "
            "there is nothing to segment"
        )
    return PreparedImage(rgb=rgb, valid=valid, value_range=used_range)
