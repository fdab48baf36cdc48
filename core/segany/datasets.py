"""Instance-segmentation datasets: image folders with label images, or COCO JSON.

Two layouts are read, both lazily (files are opened when a sample is indexed):

* **folders** -- ``images/<name>.png`` with ``labels/<name>.png`` (one-channel instance
  label image: 0 background, 1..N objects), matched by file stem. PNG, TIFF, JPEG and
  BMP images are read with Pillow (TIFF with ``tifffile`` when it is installed, so
  float and multi-band rasters work too). Give the dataset folder (holding ``images/``
  and ``labels/``) or the two folders.
* **COCO JSON** -- ``images`` + ``annotations`` with polygon or RLE (compressed or not)
  segmentations, decoded here without ``pycocotools``.

Every dataset is a sequence of :class:`Sample` (``len()``, indexing, slicing, iteration).
Problems found in the files (a missing partner file, an unreadable file, an image and
label image of different sizes, a label image without objects) are collected file by
file: :class:`DatasetError` lists all of them at once, or with ``skip_bad=True`` the bad
files are left out with one warning that names them.

Example:
    >>> import numpy as np
    >>> labels = np.zeros((4, 6), np.uint16); labels[1:3, 1:3] = 1; labels[0, 5] = 2
    >>> sample = Sample(np.zeros((4, 6), np.uint8), "tiny", labels=labels)
    >>> sample.ids.tolist(), sample.areas()
    ([1, 2], {1: 4, 2: 1})
    >>> image, target, name = sample   # (image, label image or list of masks, name)
    >>> name, target is labels
    ('tiny', True)
"""

from __future__ import annotations

import copy
import json
import os
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, overload

import numpy as np
from PIL import Image

from .errors import SegAnyError

__all__ = [
    "IMAGE_SUFFIXES",
    "CocoDataset",
    "DatasetError",
    "FolderDataset",
    "InstanceDataset",
    "Sample",
    "open_dataset",
    "polygon_to_mask",
    "read_image",
    "read_labels",
    "rle_decode",
    "rle_encode",
]

#: File suffixes read as images (case-insensitive).
IMAGE_SUFFIXES = (".png", ".tif", ".tiff", ".jpg", ".jpeg", ".bmp")
# A message listing thousands of broken files helps nobody; the count says the rest.
MAX_LISTED_PROBLEMS = 25


class DatasetError(SegAnyError):
    """Problems with the files of a dataset; ``problems`` lists one line per file.

    Example:
        >>> err = DatasetError("data/", ["a.png: cannot be read", "b.png: no label image"])
        >>> print(err)
        dataset data/: 2 problems:
          a.png: cannot be read
          b.png: no label image
        >>> len(err.problems)
        2
    """

    def __init__(self, source: str | os.PathLike[str], problems: Sequence[str]) -> None:
        self.source = str(source)
        self.problems = list(problems)
        super().__init__(_format_problems(self.source, self.problems))


def _format_problems(source: str, problems: Sequence[str]) -> str:
    count = len(problems)
    head = f"dataset {source}: {count} problem{'s' if count != 1 else ''}:"
    lines = [f"  {p}" for p in problems[:MAX_LISTED_PROBLEMS]]
    if count > MAX_LISTED_PROBLEMS:
        lines.append(f"  ... and {count - MAX_LISTED_PROBLEMS} more")
    return "\n".join([head, *lines])


# --------------------------------------------------------------------------------------------
# Samples
# --------------------------------------------------------------------------------------------


@dataclass
class Sample:
    """One image with its objects, either as a label image or as a list of masks.

    Attributes:
        image: the image as read (``H x W`` or ``H x W x C``, any dtype).
        name: identifier used in results (the file stem).
        labels: ``H x W`` integer instance labels (0 background), or None.
        instance_masks: list of ``H x W`` bool masks (may overlap, e.g. COCO), or None.
        instance_ids: ids of ``instance_masks`` (COCO annotation ids); default 1..N.
        image_path, label_path: where the data came from (None for in-memory samples).

    Exactly one of ``labels`` and ``instance_masks`` is given. Iterating a sample gives
    ``(image, labels or instance_masks, name)``.

    Example:
        >>> m = np.zeros((3, 3), bool); m[0, :2] = True
        >>> s = Sample(np.zeros((3, 3)), "m", instance_masks=[m], instance_ids=[7])
        >>> s.ids.tolist(), s.areas(), s.label_image()[0].tolist()
        ([7], {7: 2}, [1, 1, 0])
    """

    image: np.ndarray
    name: str
    labels: np.ndarray | None = None
    instance_masks: list[np.ndarray] | None = None
    instance_ids: list[int] | None = None
    image_path: Path | None = None
    label_path: Path | None = None

    def __post_init__(self) -> None:
        if (self.labels is None) == (self.instance_masks is None):
            raise SegAnyError(f"sample {self.name}: give exactly one of labels and instance_masks")
        if self.instance_masks is not None:
            self.instance_masks = [np.asarray(m, bool) for m in self.instance_masks]
            if self.instance_ids is None:
                self.instance_ids = list(range(1, len(self.instance_masks) + 1))
            if len(self.instance_ids) != len(self.instance_masks):
                raise SegAnyError(f"sample {self.name}: {len(self.instance_ids)} ids for "
                                  f"{len(self.instance_masks)} masks")

    def __iter__(self) -> Iterator[Any]:
        """``image, target, name = sample`` with target the label image or the mask list."""
        yield self.image
        yield self.labels if self.labels is not None else self.instance_masks
        yield self.name

    @property
    def shape(self) -> tuple[int, int]:
        """``(H, W)`` of the image."""
        return int(self.image.shape[0]), int(self.image.shape[1])

    @property
    def ids(self) -> np.ndarray:
        """Object ids present, ascending for label images."""
        if self.labels is not None:
            return np.asarray(list(self._label_areas()), dtype=np.int64)
        return np.asarray(self.instance_ids, dtype=np.int64)

    def _label_areas(self) -> dict[int, int]:
        """Pixel count of every non-zero label value, ascending."""
        flat = self.labels.ravel()
        if flat.size and int(flat.max()) < 1 << 22:  # bincount: fast for ordinary ids
            counts = np.bincount(flat.astype(np.int64, copy=False))
            values = np.flatnonzero(counts)
            areas = counts[values]
        else:  # huge ids (e.g. int32 hashes) would make bincount allocate gigabytes
            values, areas = np.unique(flat, return_counts=True)
        return {int(v): int(a) for v, a in zip(values, areas) if v != 0}

    def areas(self) -> dict[int, int]:
        """Pixel count of every object, by id."""
        if self.labels is not None:
            return self._label_areas()
        return {int(i): int(m.sum()) for i, m in zip(self.instance_ids, self.instance_masks)}

    def mask(self, object_id: int) -> np.ndarray:
        """``H x W`` bool mask of one object."""
        if self.labels is not None:
            return self.labels == object_id
        return self.instance_masks[list(self.instance_ids).index(object_id)]

    def masks(self) -> list[np.ndarray]:
        """All object masks, in the order of :attr:`ids`."""
        return [self.mask(int(i)) for i in self.ids]

    def label_image(self) -> np.ndarray:
        """``H x W`` uint32 labels; overlapping masks: later ones win, ids become 1..N."""
        if self.labels is not None:
            return self.labels.astype(np.uint32, copy=False)
        out = np.zeros(self.shape, np.uint32)
        for value, m in enumerate(self.instance_masks, start=1):
            out[m] = value
        return out


# --------------------------------------------------------------------------------------------
# Reading files
# --------------------------------------------------------------------------------------------


def _tifffile():
    try:
        import tifffile
    except ImportError:  # optional: Pillow reads ordinary TIFFs
        return None
    return tifffile


def read_image(path: str | os.PathLike[str]) -> np.ndarray:
    """Read an image file into an array, keeping its dtype (uint16 stays uint16).

    Palette images become RGB; TIFFs are read with ``tifffile`` when installed.

    Example:
        >>> import tempfile
        >>> with tempfile.TemporaryDirectory() as tmp:
        ...     Image.fromarray(np.full((2, 3), 7, np.uint16)).save(f"{tmp}/a.png")
        ...     a = read_image(f"{tmp}/a.png")
        >>> a.shape, a.dtype, int(a[0, 0])
        ((2, 3), dtype('uint16'), 7)
    """
    path = Path(path)
    tifffile = _tifffile()
    if tifffile is not None and path.suffix.lower() in (".tif", ".tiff"):
        return np.asarray(tifffile.imread(path))
    with Image.open(path) as im:
        if im.mode == "P":
            im = im.convert("RGBA" if "transparency" in im.info else "RGB")
        elif im.mode in ("LA", "La"):
            im = im.getchannel(0)
        elif im.mode not in ("1", "L", "I", "F", "RGB", "RGBA") and not im.mode.startswith("I;16"):
            im = im.convert("RGB")  # CMYK, YCbCr, ...
        return np.array(im)


def _image_size(path: Path) -> tuple[int, int]:
    """``(H, W)`` from the file header when possible (no pixel decoding)."""
    try:
        with Image.open(path) as im:
            return im.size[1], im.size[0]
    except OSError:
        if _tifffile() is None:
            raise
        shape = read_image(path).shape  # TIFF that Pillow cannot open (float, many bands)
        return int(shape[0]), int(shape[1])


def read_labels(path: str | os.PathLike[str]) -> np.ndarray:
    """Read a one-channel instance label image (0 background) as an integer array.

    Raises:
        SegAnyError: naming the file, if it has several different channels, negative or
        fractional values.

    Example:
        >>> import tempfile
        >>> with tempfile.TemporaryDirectory() as tmp:
        ...     Image.fromarray(np.array([[0, 300]], np.uint16)).save(f"{tmp}/l.png")
        ...     read_labels(f"{tmp}/l.png").tolist()
        [[0, 300]]
    """
    labels = read_image(path)
    if labels.ndim == 3:
        # An RGB(A) file whose channels are equal is a grey label image saved as colour.
        if all(np.array_equal(labels[..., 0], labels[..., c]) for c in range(1, min(3, labels.shape[2]))):
            labels = labels[..., 0]
        else:
            raise SegAnyError(
                f"{path}: label image has {labels.shape[2]} different channels; expected one "
                "channel of instance ids (0 = background); colour-coded labels are not supported"
            )
    if labels.ndim != 2:
        raise SegAnyError(f"{path}: label image has shape {labels.shape}; expected H x W")
    if labels.dtype.kind == "f":
        if not np.all(np.isfinite(labels)) or np.any(labels != np.round(labels)):
            raise SegAnyError(f"{path}: label image has fractional or NaN values; expected integer ids")
        labels = labels.astype(np.int64)
    if labels.dtype.kind == "b":
        labels = labels.astype(np.uint8)
    if labels.dtype.kind == "i" and labels.size and labels.min() < 0:
        raise SegAnyError(f"{path}: label image has negative values; expected ids >= 0")
    return labels


def _check_pair(image_shape: tuple[int, ...], labels: np.ndarray, image_name: str, label_name: str) -> list[str]:
    """Problems of an image / label image pair (sizes, no objects)."""
    problems = []
    if tuple(image_shape[:2]) != labels.shape:
        problems.append(
            f"{label_name}: size {labels.shape[1]}x{labels.shape[0]} (WxH) differs from "
            f"image {image_name} {image_shape[1]}x{image_shape[0]}"
        )
    elif not labels.any():
        problems.append(f"{label_name}: no objects (every pixel is 0)")
    return problems


# --------------------------------------------------------------------------------------------
# COCO masks
# --------------------------------------------------------------------------------------------


def polygon_to_mask(polygon: Sequence[float], height: int, width: int) -> np.ndarray:
    """Rasterise one COCO polygon ``[x0, y0, x1, y1, ...]`` (pixel-edge coordinates).

    A pixel is inside when its centre is (even-odd rule), so an axis-aligned rectangle
    gets exactly its area in pixels; pycocotools may differ by a pixel along edges.

    Example:
        >>> polygon_to_mask([1, 1, 4, 1, 4, 3, 1, 3], 4, 5).astype(int)
        array([[0, 0, 0, 0, 0],
               [0, 1, 1, 1, 0],
               [0, 1, 1, 1, 0],
               [0, 0, 0, 0, 0]])
    """
    xy = np.asarray(polygon, dtype=np.float64).reshape(-1, 2)
    mask = np.zeros((height, width), bool)
    if len(xy) < 3:
        return mask
    x0, y0 = xy[:, 0], xy[:, 1]
    x1, y1 = np.roll(x0, -1), np.roll(y0, -1)
    rows = np.arange(max(0, int(np.floor(y0.min()))), min(height, int(np.ceil(y0.max())) + 1))
    if rows.size == 0:
        return mask
    yc = rows[:, None] + 0.5
    # Edges crossing each row centre (half-open so a vertex on the line counts once).
    crosses = (y0[None] <= yc) != (y1[None] <= yc)
    with np.errstate(divide="ignore", invalid="ignore"):
        xs = x0 + (yc - y0) * (x1 - x0) / (y1 - y0)
    xs = np.where(crosses, xs, np.inf)
    xs.sort(axis=1)
    centres = np.arange(width) + 0.5
    for row, cuts in zip(rows, xs):
        cuts = cuts[np.isfinite(cuts)]
        for start, stop in zip(cuts[0::2], cuts[1::2]):
            mask[row] |= (centres >= start) & (centres < stop)
    return mask


def _rle_string_to_counts(counts: str) -> list[int]:
    """Decode pycocotools' compressed counts (6-bit chars, delta-coded from run i-2)."""
    values: list[int] = []
    pos = 0
    data = counts.encode("ascii") if isinstance(counts, str) else bytes(counts)
    while pos < len(data):
        value, shift, more = 0, 0, True
        while more:
            c = data[pos] - 48
            value |= (c & 0x1F) << shift
            more = bool(c & 0x20)
            pos += 1
            shift += 5
            if not more and c & 0x10:
                value |= -1 << shift  # sign-extend
        if len(values) > 2:
            value += values[-2]
        values.append(value)
    return values


def _counts_to_rle_string(counts: Sequence[int]) -> str:
    chars = []
    for i, count in enumerate(counts):
        value = int(count) - (int(counts[i - 2]) if i > 2 else 0)
        more = True
        while more:
            c = value & 0x1F
            value >>= 5  # arithmetic shift keeps the sign
            more = value != -1 if c & 0x10 else value != 0
            if more:
                c |= 0x20
            chars.append(chr(c + 48))
    return "".join(chars)


def rle_decode(rle: dict[str, Any]) -> np.ndarray:
    """Decode a COCO RLE (``{"size": [h, w], "counts": str or list}``) to a bool mask.

    Example:
        >>> rle_decode({"size": [2, 3], "counts": [1, 2, 3]}).astype(int)
        array([[0, 1, 0],
               [1, 0, 0]])
    """
    height, width = (int(v) for v in rle["size"])
    counts = rle["counts"]
    counts = _rle_string_to_counts(counts) if isinstance(counts, (str, bytes)) else list(counts)
    total = int(np.sum(counts))
    if total != height * width or any(c < 0 for c in counts):
        raise SegAnyError(f"RLE counts cover {total} pixels but size {height}x{width} has {height * width}")
    values = np.zeros(len(counts), bool)
    values[1::2] = True  # runs alternate, starting with background
    flat = np.repeat(values, counts)
    return flat.reshape(width, height).T  # COCO runs go down the columns


def rle_encode(mask: np.ndarray) -> dict[str, Any]:
    """Encode a bool mask as compressed COCO RLE (what pycocotools writes).

    Example:
        >>> m = np.array([[0, 1, 1], [0, 1, 0]], bool)
        >>> rle = rle_encode(m)
        >>> rle["size"], bool((rle_decode(rle) == m).all())
        ([2, 3], True)
    """
    mask = np.asarray(mask, bool)
    flat = mask.T.ravel()
    change = np.flatnonzero(flat[1:] != flat[:-1]) + 1
    bounds = np.concatenate([[0], change, [flat.size]])
    counts = np.diff(bounds).tolist()
    if flat.size and flat[0]:
        counts = [0, *counts]  # the first run is background by definition
    return {"size": [int(mask.shape[0]), int(mask.shape[1])], "counts": _counts_to_rle_string(counts)}


def _segmentation_problem(seg: Any, height: int, width: int) -> str | None:
    """Why a COCO segmentation cannot be decoded for an image of this size, or None."""
    if isinstance(seg, list):
        if not seg or not all(isinstance(p, list) and len(p) >= 6 and len(p) % 2 == 0 for p in seg):
            return "polygons must be lists of at least 3 x, y pairs"
        return None
    if isinstance(seg, dict) and "counts" in seg and "size" in seg:
        size = [int(v) for v in seg["size"]]
        if size != [height, width]:
            return f"RLE size {size[1]}x{size[0]} (WxH) differs from the image {width}x{height}"
        return None
    return "segmentation is neither polygons nor RLE"


def _segmentation_to_mask(seg: Any, height: int, width: int) -> np.ndarray:
    if isinstance(seg, list):
        mask = np.zeros((height, width), bool)
        for polygon in seg:  # several parts of one object: their union
            mask |= polygon_to_mask(polygon, height, width)
        return mask
    return rle_decode(seg)


# --------------------------------------------------------------------------------------------
# Datasets
# --------------------------------------------------------------------------------------------


class InstanceDataset(Sequence[Sample]):
    """A lazy, indexable sequence of :class:`Sample`; subclasses read the files.

    ``dataset[i]`` reads one sample (raising :class:`DatasetError` naming the bad file),
    ``dataset[a:b]`` is a dataset of those samples, iteration skips bad samples with a
    warning when the dataset was opened with ``skip_bad=True``.
    """

    def __init__(self, source: str | os.PathLike[str], entries: list[Any], skip_bad: bool) -> None:
        self.source = str(source)
        self.skip_bad = skip_bad
        self._entries = entries

    # -- to implement -------------------------------------------------------------------
    def _entry_name(self, entry: Any) -> str:
        raise NotImplementedError

    def _load(self, entry: Any) -> Sample:
        """Read a sample; raise SegAnyError/OSError for bad files."""
        raise NotImplementedError

    def _check(self, entry: Any) -> list[str]:
        """Problems of one entry, reading as little as possible."""
        raise NotImplementedError

    # -- sequence -----------------------------------------------------------------------
    def __len__(self) -> int:
        return len(self._entries)

    @overload
    def __getitem__(self, index: int) -> Sample: ...

    @overload
    def __getitem__(self, index: slice) -> InstanceDataset: ...

    def __getitem__(self, index: int | slice) -> Sample | InstanceDataset:
        if isinstance(index, slice):
            subset = copy.copy(self)
            subset._entries = self._entries[index]
            return subset
        entry = self._entries[index]
        try:
            return self._load(entry)
        except DatasetError:
            raise
        except (SegAnyError, OSError, ValueError) as exc:
            raise DatasetError(self.source, [_describe(exc, self._entry_name(entry))]) from None

    def __iter__(self) -> Iterator[Sample]:
        for i in range(len(self)):
            try:
                yield self[i]
            except DatasetError as exc:
                if not self.skip_bad:
                    raise
                warnings.warn(f"skipping a bad sample: {'; '.join(exc.problems)}", stacklevel=2)

    @property
    def names(self) -> list[str]:
        """Sample names, in order."""
        return [self._entry_name(e) for e in self._entries]

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.source!r}, {len(self)} samples)"

    # -- problems -----------------------------------------------------------------------
    def _settle(self, problems: list[str], bad: set[int]) -> None:
        """Raise all problems at once, or drop the bad entries with one warning."""
        if not problems:
            return
        if not self.skip_bad:
            raise DatasetError(self.source, problems)
        warnings.warn("skipping bad files: " + _format_problems(self.source, problems), stacklevel=3)
        self._entries = [e for i, e in enumerate(self._entries) if i not in bad]

    def validate(self) -> InstanceDataset:
        """Check every sample now (headers and label files) and return the dataset.

        Without ``skip_bad`` one :class:`DatasetError` lists every problem; with it the bad
        samples are dropped (one warning names them), so indices stay valid afterwards.
        """
        problems: list[str] = []
        bad: set[int] = set()
        for i, entry in enumerate(self._entries):
            try:
                found = self._check(entry)
            except (SegAnyError, OSError, ValueError) as exc:
                found = [_describe(exc, self._entry_name(entry))]
            if found:
                problems.extend(found)
                bad.add(i)
        self._settle(problems, bad)
        return self


def _describe(exc: Exception, fallback: str) -> str:
    """One problem line from an exception; names the file if the message does not."""
    if isinstance(exc, DatasetError):
        return "; ".join(exc.problems)
    filename = getattr(exc, "filename", None)
    text = str(exc) or type(exc).__name__
    if isinstance(exc, OSError):
        where = filename or fallback
        reason = exc.strerror or text
        return f"{where}: cannot be read ({reason})"
    return text if (filename and str(filename) in text) or fallback in text else f"{fallback}: {text}"


@dataclass(frozen=True)
class _Pair:
    name: str
    image: Path
    labels: Path


def _list_images(folder: Path) -> list[Path]:
    return sorted(
        p for p in folder.iterdir()
        if p.is_file() and not p.name.startswith(".") and p.suffix.lower() in IMAGE_SUFFIXES
    )


def _by_stem(files: list[Path], suffix: str, kind: str) -> tuple[dict[str, Path], list[str]]:
    """Files keyed by stem (minus ``suffix``); two files with one stem is a problem."""
    found: dict[str, Path] = {}
    problems = []
    for path in files:
        stem = path.stem[: -len(suffix)] if suffix and path.stem.endswith(suffix) else path.stem
        if stem in found:
            problems.append(f"{path}: two {kind} files for '{stem}' (also {found[stem].name})")
            continue
        found[stem] = path
    return found, problems


class FolderDataset(InstanceDataset):
    """Images and instance label images in two folders, matched by file stem.

    Args:
        images: the dataset folder (holding ``images/`` and ``labels/``) or the image folder.
        labels: the label folder, when ``images`` is the image folder.
        label_suffix: label stems carry this suffix (``"_mask"``: ``a.png`` <-> ``a_mask.png``).
        skip_bad: leave out bad files with a warning instead of raising.

    Unpaired files are reported at once; sizes and contents when a sample is read or by
    :meth:`validate`.

    Example:
        >>> import tempfile
        >>> from segany.synthetic import cells_image
        >>> with tempfile.TemporaryDirectory() as tmp:
        ...     for sub in ("images", "labels"):
        ...         os.mkdir(f"{tmp}/{sub}")
        ...     image, labels = cells_image((64, 64), n_cells=3, radius=(5, 9))
        ...     Image.fromarray(image).save(f"{tmp}/images/a.png")
        ...     Image.fromarray(labels).save(f"{tmp}/labels/a.png")
        ...     data = FolderDataset(tmp).validate()
        ...     sample = data[0]
        >>> len(data), sample.name, sample.labels.dtype, len(sample.ids)
        (1, 'a', dtype('uint16'), 3)
    """

    def __init__(
        self,
        images: str | os.PathLike[str],
        labels: str | os.PathLike[str] | None = None,
        *,
        label_suffix: str = "",
        skip_bad: bool = False,
    ) -> None:
        image_dir, label_dir = _resolve_folders(Path(images), None if labels is None else Path(labels))
        super().__init__(image_dir.parent if labels is None else image_dir, [], skip_bad)
        self.image_dir, self.label_dir = image_dir, label_dir
        image_files, problems = _by_stem(_list_images(image_dir), "", "image")
        label_files, label_problems = _by_stem(_list_images(label_dir), label_suffix, "label")
        problems += label_problems
        for stem, path in image_files.items():
            if stem in label_files:
                self._entries.append(_Pair(stem, path, label_files[stem]))
            else:
                problems.append(f"{path}: no label image (looked for {label_dir}/{stem}{label_suffix}.*)")
        for stem, path in label_files.items():
            if stem not in image_files:
                problems.append(f"{path}: label image without an image (looked for {image_dir}/{stem}.*)")
        if not image_files and not label_files:
            raise DatasetError(self.source, [f"{image_dir}: no image files ({', '.join(IMAGE_SUFFIXES)})"])
        # Unpaired files have no entry, so there is nothing to drop: report or warn.
        self._settle(problems, set())

    def _entry_name(self, entry: _Pair) -> str:
        return entry.name

    def _load(self, entry: _Pair) -> Sample:
        image = read_image(entry.image)
        labels = read_labels(entry.labels)
        problems = _check_pair(image.shape, labels, entry.image.name, str(entry.labels))
        if problems:
            raise DatasetError(self.source, problems)
        return Sample(image, entry.name, labels=labels, image_path=entry.image, label_path=entry.labels)

    def _check(self, entry: _Pair) -> list[str]:
        problems = []
        try:
            shape = _image_size(entry.image)
        except OSError as exc:
            problems.append(f"{entry.image}: cannot be read ({exc})")
            shape = None
        try:
            labels = read_labels(entry.labels)
        except OSError as exc:
            return [*problems, f"{entry.labels}: cannot be read ({exc})"]
        except SegAnyError as exc:
            return [*problems, str(exc)]
        if shape is not None:
            problems += _check_pair(shape, labels, entry.image.name, str(entry.labels))
        return problems


def _resolve_folders(images: Path, labels: Path | None) -> tuple[Path, Path]:
    """(image folder, label folder) from a dataset folder or the two folders."""
    for path in (images, labels):
        if path is not None and not path.is_dir():
            raise SegAnyError(f"{path}: not a folder")
    if labels is not None:
        return images, labels
    if (images / "images").is_dir() and (images / "labels").is_dir():
        return images / "images", images / "labels"
    if images.name == "images" and (images.parent / "labels").is_dir():
        return images, images.parent / "labels"
    raise SegAnyError(
        f"{images}: expected a dataset folder holding images/ and labels/, "
        "or give the label folder as well"
    )


@dataclass(frozen=True)
class _CocoImage:
    name: str
    path: Path
    height: int
    width: int
    annotations: tuple[dict[str, Any], ...]


class CocoDataset(InstanceDataset):
    """Images with COCO-style instance annotations (polygons or RLE) from a JSON file.

    Args:
        annotations: the JSON file (``images``, ``annotations``).
        images: folder of the image files; default: the JSON's folder, then its
            ``images/`` subfolder.
        include_crowd: also use ``iscrowd`` annotations as objects (COCO treats them as
            regions to ignore, so they are left out by default).
        skip_bad: leave out bad images with a warning instead of raising.

    Example:
        >>> import tempfile
        >>> with tempfile.TemporaryDirectory() as tmp:
        ...     Image.fromarray(np.zeros((6, 8), np.uint8)).save(f"{tmp}/a.png")
        ...     ann = {"images": [{"id": 1, "file_name": "a.png", "height": 6, "width": 8}],
        ...            "annotations": [{"id": 5, "image_id": 1, "iscrowd": 0,
        ...                             "segmentation": [[1, 1, 5, 1, 5, 4, 1, 4]]}]}
        ...     _ = Path(f"{tmp}/ann.json").write_text(json.dumps(ann))
        ...     sample = CocoDataset(f"{tmp}/ann.json")[0]
        >>> sample.name, sample.areas()
        ('a', {5: 12})
    """

    def __init__(
        self,
        annotations: str | os.PathLike[str],
        images: str | os.PathLike[str] | None = None,
        *,
        include_crowd: bool = False,
        skip_bad: bool = False,
    ) -> None:
        path = Path(annotations)
        super().__init__(path, [], skip_bad)
        data = _read_json(path)
        folders = [Path(images)] if images is not None else [path.parent, path.parent / "images"]
        by_image: dict[Any, list[dict[str, Any]]] = {}
        problems: list[str] = []
        known = {img.get("id") for img in data["images"]}
        for ann in data["annotations"]:
            if ann.get("image_id") not in known:
                problems.append(f"{path}: annotation {ann.get('id')} refers to unknown image id {ann.get('image_id')}")
            elif include_crowd or not ann.get("iscrowd", 0):
                by_image.setdefault(ann["image_id"], []).append(ann)
        for record in data["images"]:
            entry, found = _coco_entry(record, by_image.get(record.get("id"), []), folders, path)
            problems += found
            if entry is not None and not found:
                self._entries.append(entry)
        self._settle(problems, set())

    def _entry_name(self, entry: _CocoImage) -> str:
        return entry.name

    def _load(self, entry: _CocoImage) -> Sample:
        image = read_image(entry.path)
        if tuple(image.shape[:2]) != (entry.height, entry.width):
            raise DatasetError(self.source, [_size_problem(entry, image.shape[:2])])
        masks = [_segmentation_to_mask(a["segmentation"], entry.height, entry.width) for a in entry.annotations]
        ids = [int(a.get("id", i + 1)) for i, a in enumerate(entry.annotations)]
        return Sample(image, entry.name, instance_masks=masks, instance_ids=ids, image_path=entry.path)

    def _check(self, entry: _CocoImage) -> list[str]:
        try:
            shape = _image_size(entry.path)
        except OSError as exc:
            return [f"{entry.path}: cannot be read ({exc})"]
        return [] if shape == (entry.height, entry.width) else [_size_problem(entry, shape)]


def _size_problem(entry: _CocoImage, shape: tuple[int, ...]) -> str:
    return (f"{entry.path}: image is {shape[1]}x{shape[0]} (WxH) but the annotations say "
            f"{entry.width}x{entry.height}")


def _read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except OSError as exc:
        raise DatasetError(path, [f"{path}: cannot be read ({exc.strerror or exc})"]) from None
    except json.JSONDecodeError as exc:
        raise DatasetError(path, [f"{path}: not valid JSON ({exc})"]) from None
    if not isinstance(data, dict) or not isinstance(data.get("images"), list) or not isinstance(
        data.get("annotations"), list
    ):
        raise DatasetError(path, [f"{path}: not a COCO instance file (needs 'images' and 'annotations' lists)"])
    return data


def _coco_entry(
    record: dict[str, Any], anns: list[dict[str, Any]], folders: list[Path], source: Path
) -> tuple[_CocoImage | None, list[str]]:
    """One image of a COCO file and the problems found from the JSON alone."""
    file_name = record.get("file_name")
    if not file_name or "height" not in record or "width" not in record:
        return None, [f"{source}: image record {record.get('id')} lacks file_name, height or width"]
    height, width = int(record["height"]), int(record["width"])
    path = next((f / file_name for f in folders if (f / file_name).is_file()), folders[0] / file_name)
    problems = []
    if not path.is_file():
        problems.append(f"{file_name}: image file not found (looked in {', '.join(map(str, folders))})")
    for ann in anns:
        why = _segmentation_problem(ann.get("segmentation"), height, width)
        if why:
            problems.append(f"{file_name}: annotation {ann.get('id')}: {why}")
    if not anns:
        problems.append(f"{file_name}: no objects (no annotations)")
    return _CocoImage(Path(file_name).stem, path, height, width, tuple(anns)), problems


def open_dataset(
    path: str | os.PathLike[str],
    partner: str | os.PathLike[str] | None = None,
    *,
    skip_bad: bool = False,
) -> InstanceDataset:
    """Open a dataset folder, an image folder + label folder, or a COCO JSON file.

    Args:
        path: dataset folder (``images/`` + ``labels/``), image folder, or ``.json`` file.
        partner: the label folder (for an image folder) or the image folder (for a JSON).
        skip_bad: leave out bad files with a warning instead of raising.

    Example:
        >>> open_dataset("/no/such/place")
        Traceback (most recent call last):
        ...
        segany.errors.SegAnyError: /no/such/place: no such file or folder
    """
    path = Path(path)
    if path.is_file() and path.suffix.lower() == ".json":
        return CocoDataset(path, partner, skip_bad=skip_bad)
    if path.is_dir():
        return FolderDataset(path, partner, skip_bad=skip_bad)
    if path.exists():
        raise SegAnyError(f"{path}: expected a dataset folder or a COCO .json file")
    raise SegAnyError(f"{path}: no such file or folder")
