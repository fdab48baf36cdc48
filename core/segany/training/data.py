"""Training data: labelled-image sources, checks, augmentation and mask sampling.

A *source* is anything indexable that returns ``(image, labels, name)``:

* ``image``: ``H x W`` or ``H x W x C`` array (any dtype :func:`segany.image.prepare_image`
  accepts);
* ``labels``: ``H x W`` integer instance labels, 0 = background (or unlabelled), 1..N objects;
* ``name``: a short identifier used in messages (the file name).

That is the whole protocol (:class:`LabelledImages`), so the readers of
:mod:`segany.datasets`, the built-in :class:`ImageLabelFolder`, :class:`GeoTiles`
(GeoTIFF + vector labels rasterised per tile) and :class:`SyntheticScenes` all plug in.

Augmentation follows SAM's geometry: the (randomly scaled) image is resized so that its
longest side is the model's input size, randomly cropped when larger, flipped, and padded at
the bottom/right (the padding itself is done by ``Sam.preprocess`` after normalisation, so it
has the same value as at inference).

Example:
    >>> src = SyntheticScenes(count=2, size=64, seed=0)
    >>> image, labels, name = src[1]
    >>> len(src), image.shape, name
    (2, (64, 64, 3), 'shapes_0001')
    >>> s = augment(image, labels, 32, np.random.default_rng(0), Augment(hflip=True))
    >>> s.image.shape, s.labels.shape
    ((32, 32, 3), (32, 32))
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol, Sequence, runtime_checkable

import numpy as np
from PIL import Image

from ..errors import SegAnyError
from ..image import prepare_image
from ..transforms import preprocess_shape

__all__ = [
    "LabelledImages",
    "DataError",
    "ImageLabelFolder",
    "SyntheticScenes",
    "separated_shapes",
    "GeoTiles",
    "Subset",
    "Tiles",
    "InMemory",
    "DatasetSamples",
    "open_source",
    "check_source",
    "Augment",
    "AugmentedSample",
    "augment",
    "instance_areas",
    "sample_instances",
    "IMAGE_SUFFIXES",
    "LABEL_SUFFIXES",
]

IMAGE_SUFFIXES = (".png", ".tif", ".tiff", ".jpg", ".jpeg", ".bmp")
LABEL_SUFFIXES = (".png", ".tif", ".tiff")


class DataError(SegAnyError):
    """A training/validation file is missing, unreadable or inconsistent."""


@runtime_checkable
class LabelledImages(Protocol):
    """What the trainer needs from a dataset: ``len()`` and ``[i] -> (image, labels, name)``."""

    def __len__(self) -> int: ...

    def __getitem__(self, index: int) -> tuple[np.ndarray, np.ndarray, str]: ...


# --------------------------------------------------------------------------------------------
# Sources
# --------------------------------------------------------------------------------------------


def read_image_file(path: Path) -> np.ndarray:
    """Pixels of an image file as an array (PIL; 16-bit and float TIFFs kept as they are)."""
    try:
        with Image.open(path) as img:
            img.load()
            if img.mode in ("P", "PA", "CMYK", "YCbCr", "LAB", "HSV", "1", "LA"):
                img = img.convert("RGBA" if "A" in img.mode or img.mode == "P" else "RGB")
            return np.array(img)
    except FileNotFoundError:
        raise DataError(f"{path}: file not found") from None
    except Exception as exc:  # PIL raises many types for corrupt files
        raise DataError(f"{path}: cannot be read as an image ({exc})") from None


def read_label_file(path: Path) -> np.ndarray:
    """An instance label image as an ``H x W`` integer array; rejects colour and float labels."""
    labels = read_image_file(path)
    if labels.ndim == 3:
        raise DataError(
            f"{path}: a label image must have one channel of integer instance ids, this one "
            f"has {labels.shape[2]} channels (save it as a 16-bit greyscale PNG)"
        )
    if labels.dtype.kind not in "iub":
        raise DataError(f"{path}: label pixels must be integers, got {labels.dtype}")
    if labels.dtype.kind == "i" and labels.size and labels.min() < 0:
        raise DataError(f"{path}: label ids must be >= 0 (0 = background)")
    return labels


class ImageLabelFolder:
    """A folder with ``images/`` and ``labels/`` (same file stems): segany's dataset format.

    Files are read lazily, one item at a time (with :mod:`segany.datasets`' readers, so
    the file rules are the same as ``segany eval``'s). Pairing problems -- an image without
    a label file, a label file without an image -- are listed by name: raised at once with
    ``strict=True``, else kept in :attr:`problems` so that :func:`check_source` reports them
    together with the problems found inside the files.

    Args:
        root: the dataset folder (see ``docs/dataset-format.md``).
        strict: raise for pairing problems when opening.

    Example:
        >>> import tempfile
        >>> from segany.data_engine import write_sample
        >>> root = Path(tempfile.mkdtemp())
        >>> img, lab, _ = SyntheticScenes(1, size=48)[0]
        >>> _ = write_sample(root, "a", img, lab)
        >>> ds = ImageLabelFolder(root)
        >>> len(ds), ds[0][2], ds[0][1].dtype
        (1, 'a', dtype('uint16'))
    """

    def __init__(self, root: str | os.PathLike[str], strict: bool = True) -> None:
        self.root = Path(root)
        image_dir, label_dir = self.root / "images", self.root / "labels"
        for folder in (image_dir, label_dir):
            if not folder.is_dir():
                raise DataError(
                    f"{self.root}: expected an 'images/' and a 'labels/' folder, "
                    f"{folder.name}/ is missing (see docs/dataset-format.md)"
                )
        images = _by_stem(image_dir, IMAGE_SUFFIXES)
        labels = _by_stem(label_dir, LABEL_SUFFIXES)
        problems = [f"{images[s]}: no label file labels/{s}.png" for s in sorted(images) if s not in labels]
        problems += [f"{labels[s]}: label file without an image in images/" for s in sorted(labels) if s not in images]
        if problems and strict:
            raise DataError(_problem_message(self.root, problems))
        self.problems = problems
        self.names = sorted(s for s in images if s in labels)
        if not self.names and not problems:
            raise DataError(f"{self.root}: no image/label pairs found in images/ and labels/")
        self.image_paths = [images[s] for s in self.names]
        self.label_paths = [labels[s] for s in self.names]

    def __len__(self) -> int:
        return len(self.names)

    def __getitem__(self, index: int) -> tuple[np.ndarray, np.ndarray, str]:
        image = _read(self.image_paths[index], labels=False)
        labels = _read(self.label_paths[index], labels=True)
        if image.shape[:2] != labels.shape:
            raise DataError(
                f"{self.label_paths[index]}: label size {labels.shape[1]}x{labels.shape[0]} "
                f"differs from image {self.image_paths[index].name} size "
                f"{image.shape[1]}x{image.shape[0]} (width x height)"
            )
        return image, labels, self.names[index]

    def __repr__(self) -> str:
        return f"ImageLabelFolder({str(self.root)!r}, {len(self)} images)"


def _read(path: Path, labels: bool) -> np.ndarray:
    """Read with segany.datasets when present (shared rules), else with the fallbacks here."""
    try:
        from .. import datasets
    except ImportError:
        return read_label_file(path) if labels else read_image_file(path)
    try:
        return datasets.read_labels(path) if labels else datasets.read_image(path)
    except FileNotFoundError:
        raise DataError(f"{path}: file not found") from None
    except SegAnyError:
        raise
    except Exception as exc:  # PIL raises many types for corrupt files
        raise DataError(f"{path}: cannot be read ({exc})") from None


def _by_stem(folder: Path, suffixes: tuple[str, ...]) -> dict[str, Path]:
    found: dict[str, Path] = {}
    for path in sorted(folder.iterdir()):
        if path.is_file() and path.suffix.lower() in suffixes and not path.name.startswith("."):
            found.setdefault(path.stem, path)
    return found


def _problem_message(root: Path | str, problems: Sequence[str], limit: int = 20) -> str:
    lines = [f"{root}: {len(problems)} problem(s) in the data:"]
    lines += [f"  - {p}" for p in problems[:limit]]
    if len(problems) > limit:
        lines.append(f"  ... and {len(problems) - limit} more")
    return "\n".join(lines)


def separated_shapes(
    shape: tuple[int, int] = (128, 128),
    n_shapes: int = 4,
    seed: int = 0,
    radius: tuple[float, float] = (0.1, 0.2),
) -> tuple[np.ndarray, np.ndarray]:
    """Textured discs, boxes and triangles that do not touch, on a textured background.

    Like :func:`segany.synthetic.shapes_scene` (same textures) but without occlusion, so
    every object is a whole shape: the easy end of the synthetic scenes, for quick
    from-scratch training checks. ``radius`` is relative to the shorter side.

    Example:
        >>> img, lab = separated_shapes((64, 64), 3, seed=1)
        >>> img.shape, img.dtype, int(lab.max()) <= 3
        ((64, 64, 3), dtype('uint8'), True)
    """
    from scipy import ndimage

    from ..synthetic import _triangle

    rng = np.random.default_rng(seed)
    h, w = shape
    yy, xx = np.mgrid[0:h, 0:w]

    def texture(colour: np.ndarray) -> np.ndarray:
        freq = rng.uniform(0.05, 0.4)
        phase = rng.uniform(0, 2 * np.pi)
        pattern = np.sin(freq * (xx * rng.uniform(-1, 1) + yy * rng.uniform(-1, 1)) + phase)
        noise = ndimage.gaussian_filter(rng.normal(0, 1, shape), 1.0)
        return colour[None, None, :] + (rng.uniform(10, 40) * pattern + 8 * noise)[..., None]

    image = texture(rng.uniform(40, 215, 3))
    labels = np.zeros(shape, np.uint16)
    placed = 0
    for _ in range(n_shapes * 10):
        if placed == n_shapes:
            break
        size = rng.uniform(*radius) * min(h, w)
        cy, cx = rng.uniform(size, h - size), rng.uniform(size, w - size)
        kind = rng.integers(0, 3)
        if kind == 0:
            inside = (yy - cy) ** 2 + (xx - cx) ** 2 <= size**2
        elif kind == 1:
            ay, ax = size * rng.uniform(0.5, 1.0), size * rng.uniform(0.5, 1.0)
            inside = (np.abs(yy - cy) <= ay) & (np.abs(xx - cx) <= ax)
        else:
            inside = _triangle(rng.uniform(-size, size, (3, 2)) + [cx, cy], xx, yy)
        if inside.sum() < 20 or (ndimage.binary_dilation(inside, iterations=2) & (labels > 0)).any():
            continue
        placed += 1
        image[inside] = texture(rng.uniform(0, 255, 3))[inside]
        labels[inside] = placed
    return np.clip(image, 0, 255).astype(np.uint8), labels


class SyntheticScenes:
    """Procedural scenes with exact labels (:mod:`segany.synthetic`), for tests and demos.

    Item ``i`` is always the same scene (seeded by ``seed + i``); a small cache avoids
    re-generating scenes that are sampled again.

    Args:
        count: number of scenes.
        size: side of the square scenes.
        kind: ``"shapes"`` (textured shapes that may occlude each other, colour),
            ``"separated"`` (the same shapes, not touching) or ``"cells"`` (nuclei, grey).
        seed: seed of scene 0.
        objects: objects per scene.
    """

    def __init__(self, count: int, size: int = 128, kind: str = "shapes", seed: int = 0, objects: int = 6) -> None:
        if kind not in ("shapes", "separated", "cells"):
            raise SegAnyError(f"synthetic scene must be 'shapes', 'separated' or 'cells', got {kind!r}")
        self.count, self.size, self.kind, self.seed, self.objects = int(count), int(size), kind, int(seed), int(objects)
        self._cache: dict[int, tuple[np.ndarray, np.ndarray]] = {}

    def __len__(self) -> int:
        return self.count

    def __getitem__(self, index: int) -> tuple[np.ndarray, np.ndarray, str]:
        if not 0 <= index < self.count:
            raise IndexError(index)
        if index not in self._cache:
            from .. import synthetic

            shape = (self.size, self.size)
            if self.kind == "shapes":
                scene = synthetic.shapes_scene(shape, n_shapes=self.objects, seed=self.seed + index)
            elif self.kind == "separated":
                scene = separated_shapes(shape, n_shapes=self.objects, seed=self.seed + index)
            else:
                r = self.size / 20
                scene = synthetic.cells_image(shape, n_cells=self.objects, radius=(r, 2.5 * r), seed=self.seed + index)
            if len(self._cache) < 4096:
                self._cache[index] = scene
            else:
                return (*scene, f"{self.kind}_{index:04d}")
        image, labels = self._cache[index]
        return image, labels, f"{self.kind}_{index:04d}"


class Subset:
    """Items ``indices`` of another source (a split, a limit)."""

    def __init__(self, source: LabelledImages, indices: Sequence[int]) -> None:
        self.source, self.indices = source, list(indices)
        self.problems = list(getattr(source, "problems", []))

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, index: int) -> tuple[np.ndarray, np.ndarray, str]:
        return self.source[self.indices[index]]


class InMemory:
    """Any source, each item decoded once and then served from memory.

    For small datasets on a fast accelerator, where decoding image files every step would
    leave the accelerator waiting. Safe to read from several threads (a race at worst
    decodes an item twice).

    Example:
        >>> src = InMemory(SyntheticScenes(2, size=32))
        >>> src[1][0] is src[1][0], len(src)
        (True, 2)
    """

    def __init__(self, source: LabelledImages) -> None:
        self.source = source
        self._items: dict[int, tuple[np.ndarray, np.ndarray, str]] = {}
        self.problems = getattr(source, "problems", [])

    def __len__(self) -> int:
        return len(self.source)

    def __getitem__(self, index: int) -> tuple[np.ndarray, np.ndarray, str]:
        item = self._items.get(index)
        if item is None:
            item = self._items[index] = self.source[index]
        return item

    def __repr__(self) -> str:
        return f"InMemory({self.source!r})"


class Tiles:
    """Square tiles of the items of another source (only tiles with objects are kept).

    For images much larger than the model input (microscopy fields, aerial scenes) tiles
    keep objects at a useful size; objects cut by a tile edge are partial objects of the
    tile, as at inference with tiling.

    Args:
        source: the source to cut.
        tile: tile side in pixels.
        stride: step between tiles (default: ``tile``, no overlap).
        min_area: a tile is kept if it holds an object part of at least this many pixels.

    Example:
        >>> t = Tiles(SyntheticScenes(2, size=64, seed=1), tile=32)
        >>> image, labels, name = t[0]
        >>> image.shape[:2], labels.shape, name
        ((32, 32), (32, 32), 'shapes_0000_y0_x0')
    """

    def __init__(self, source: LabelledImages, tile: int, stride: int | None = None, min_area: int = 16) -> None:
        self.source, self.tile = source, int(tile)
        self.stride = int(stride or tile)
        self.problems = list(getattr(source, "problems", []))
        self.windows: list[tuple[int, int, int]] = []
        for i in range(len(source)):
            try:
                _, labels, _ = source[i]
            except SegAnyError as exc:  # reported with the others by check_source
                self.problems += getattr(exc, "problems", None) or [str(exc)]
                continue
            h, w = np.asarray(labels).shape
            for y in _starts(h, self.tile, self.stride):
                for x in _starts(w, self.tile, self.stride):
                    crop = np.asarray(labels[y : y + self.tile, x : x + self.tile])
                    if crop.any() and instance_areas(crop)[1:].max() >= min_area:
                        self.windows.append((i, y, x))

    def __len__(self) -> int:
        return len(self.windows)

    def __getitem__(self, index: int) -> tuple[np.ndarray, np.ndarray, str]:
        i, y, x = self.windows[index]
        image, labels, name = self.source[i]
        t = self.tile
        return image[y : y + t, x : x + t], np.asarray(labels)[y : y + t, x : x + t], f"{name}_y{y}_x{x}"


def _starts(size: int, tile: int, stride: int) -> list[int]:
    if size <= tile:
        return [0]
    starts = list(range(0, size - tile + 1, stride))
    if starts[-1] != size - tile:
        starts.append(size - tile)  # the last tile ends at the edge
    return starts


class GeoTiles:
    """A GeoTIFF with vector labels (polygons), cut into tiles and rasterised per tile.

    Every polygon becomes one instance (id = its row number + 1), rasterised with
    ``rasterio.features.rasterize`` in the raster's CRS (the vectors are reprojected with
    geopandas if needed). Only tiles that intersect at least one polygon are kept. Labels from
    OpenStreetMap and similar are usually incomplete: mark such sources ``partial``.

    Args:
        raster: path of the image (any GDAL raster; the first 3 bands, or ``bands``).
        vectors: path of the labels (any OGR vector file: GeoPackage, GeoJSON, Shapefile).
        tile_size: tile side in pixels.
        overlap: pixels shared by neighbouring tiles.
        bands: 1-based band indices to read (default: first 3, or 1 for single-band).
        value_range: intensity range mapped to 0-255 for non-8-bit rasters (default: the
            0.5-99.5 percentiles of a decimated read of the whole raster, so tiles agree).
    """

    def __init__(
        self,
        raster: str | os.PathLike[str],
        vectors: str | os.PathLike[str],
        tile_size: int = 512,
        overlap: int = 0,
        bands: Sequence[int] | None = None,
        value_range: tuple[float, float] | None = None,
    ) -> None:
        import geopandas as gpd
        import rasterio
        from shapely.geometry import box

        self.raster, self.vectors = Path(raster), Path(vectors)
        for path in (self.raster, self.vectors):
            if not path.exists():
                raise DataError(f"{path}: file not found")
        try:
            with rasterio.open(self.raster) as src:
                self.crs, self.transform = src.crs, src.transform
                self.width, self.height, count = src.width, src.height, src.count
                self.bands = list(bands) if bands else ([1, 2, 3] if count >= 3 else [1])
                if value_range is None and src.dtypes[0] != "uint8":
                    step = max(1, max(self.width, self.height) // 1024)
                    small = src.read(
                        self.bands, out_shape=(len(self.bands), self.height // step or 1, self.width // step or 1)
                    )
                    value_range = tuple(float(v) for v in np.percentile(small, (0.5, 99.5)))
        except rasterio.errors.RasterioIOError as exc:
            raise DataError(f"{self.raster}: cannot be read as a raster ({exc})") from None
        self.value_range = value_range
        try:
            frame = gpd.read_file(self.vectors)
        except Exception as exc:
            raise DataError(f"{self.vectors}: cannot be read as vector data ({exc})") from None
        frame = frame[frame.geometry.notna() & ~frame.geometry.is_empty]
        if frame.crs is not None and self.crs is not None and frame.crs != self.crs:
            frame = frame.to_crs(self.crs)
        self.geometries = list(frame.geometry)
        if not self.geometries:
            raise DataError(f"{self.vectors}: contains no geometries")
        stride = max(1, tile_size - overlap)
        self.tile_size = tile_size
        windows = []
        index = frame.sindex
        for row in range(0, max(1, self.height - overlap), stride):
            for col in range(0, max(1, self.width - overlap), stride):
                h, w = min(tile_size, self.height - row), min(tile_size, self.width - col)
                bounds = rasterio.windows.bounds(rasterio.windows.Window(col, row, w, h), self.transform)
                hits = index.query(box(*bounds), predicate="intersects")
                if len(hits):
                    windows.append((row, col, h, w, [int(i) for i in hits]))
        if not windows:
            raise DataError(f"{self.vectors}: no polygon intersects the raster {self.raster.name}")
        self.windows = windows

    def __len__(self) -> int:
        return len(self.windows)

    def __getitem__(self, index: int) -> tuple[np.ndarray, np.ndarray, str]:
        import rasterio
        from rasterio import features, windows

        row, col, h, w, hits = self.windows[index]
        window = windows.Window(col, row, w, h)
        with rasterio.open(self.raster) as src:
            pixels = src.read(self.bands, window=window)
            transform = src.window_transform(window)
        image = np.moveaxis(pixels, 0, -1)
        if image.shape[2] == 1:
            image = image[..., 0]
        image = prepare_image(image, value_range=self.value_range, name=f"{self.raster.name} tile {row},{col}").rgb
        shapes = [(self.geometries[i], i + 1) for i in hits]
        labels = features.rasterize(shapes, out_shape=(h, w), transform=transform, fill=0, dtype="int32")
        # Renumber 1..N within the tile (uint16 covers any tile's count).
        ids = np.unique(labels[labels > 0])
        lut = np.zeros(int(labels.max()) + 1, np.uint16)
        lut[ids] = np.arange(1, len(ids) + 1)
        return image, lut[labels], f"{self.raster.stem}_r{row}_c{col}"


# --------------------------------------------------------------------------------------------
# Checks
# --------------------------------------------------------------------------------------------


def check_source(source: LabelledImages, label: str = "data") -> tuple[list[int], list[str], list[str]]:
    """Read every item once: usable indices, fatal problems and warnings, file by file.

    Fatal: unreadable or missing files, image/label size mismatch, bad label types.
    Warnings: label images without any object (these items are skipped for training).

    Example:
        >>> class Bad:
        ...     def __len__(self): return 2
        ...     def __getitem__(self, i):
        ...         return np.zeros((4, 4), np.uint8), np.zeros((4, 4) if i else (3, 4), np.uint16), f"im{i}"
        >>> ok, errors, warnings = check_source(Bad())
        >>> ok, len(errors), warnings
        ([], 1, ['im1: the label image has no objects (all 0); skipped'])
    """
    ok: list[int] = []
    errors: list[str] = list(getattr(source, "problems", []))
    warnings: list[str] = []
    for i in range(len(source)):
        try:
            image, labels, name = source[i]
        except SegAnyError as exc:
            errors += getattr(exc, "problems", None) or [str(exc)]
            continue
        except Exception as exc:  # a reader bug or an odd file: still say which item
            errors.append(f"{label} item {i}: {type(exc).__name__}: {exc}")
            continue
        image = np.asarray(image)
        labels = np.asarray(labels)
        if labels.ndim != 2 or image.shape[:2] != labels.shape:
            errors.append(
                f"{name}: image size {image.shape[:2]} and label size {labels.shape} differ"
            )
            continue
        if not labels.any():
            warnings.append(f"{name}: the label image has no objects (all 0); skipped")
            continue
        ok.append(i)
    return ok, errors, warnings


# --------------------------------------------------------------------------------------------
# Augmentation
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Augment:
    """Random geometric augmentation.

    Attributes:
        hflip, vflip: random left-right / up-down flips (probability 0.5 each).
        rot90: random multiple of 90 degrees (microscopy, aerial: no natural "up").
        scale_range: zoom relative to "longest side = model size"; above 1 the image is
            enlarged and a random crop of the model size is taken, below 1 it is shrunk
            (more padding).
    """

    hflip: bool = True
    vflip: bool = False
    rot90: bool = False
    scale_range: tuple[float, float] = (1.0, 1.0)


NO_AUGMENT = Augment(hflip=False)


@dataclass
class AugmentedSample:
    """One image ready for the encoder.

    Attributes:
        image: ``h x w x 3`` uint8, long side = model size at scale 1 (not padded).
        labels: ``S x S`` int32 instance labels, padded with 0 to the model size ``S``.
        name: the item's name.
    """

    image: np.ndarray
    labels: np.ndarray
    name: str


def _nearest(labels: np.ndarray, height: int, width: int) -> np.ndarray:
    """Nearest-neighbour resize of a label image (pixel centres mapped back)."""
    h, w = labels.shape
    rows = np.minimum(((np.arange(height) + 0.5) * h / height).astype(np.int64), h - 1)
    cols = np.minimum(((np.arange(width) + 0.5) * w / width).astype(np.int64), w - 1)
    return labels[rows[:, None], cols[None, :]]


def augment(
    image: np.ndarray,
    labels: np.ndarray,
    image_size: int,
    rng: np.random.Generator,
    config: Augment = NO_AUGMENT,
    name: str = "",
) -> AugmentedSample:
    """Scale, crop, flip one image and its labels for a model of input size ``image_size``.

    Without augmentation the image is resized exactly as :class:`~segany.transforms.ResizeLongestSide`
    does at inference (PIL bilinear, same rounding).

    Example:
        >>> img = np.zeros((50, 100, 3), np.uint8); lab = np.zeros((50, 100), np.uint16)
        >>> s = augment(img, lab, 64, np.random.default_rng(0))
        >>> s.image.shape, s.labels.shape
        ((32, 64, 3), (64, 64))
    """
    rgb = _rgb(image, name or "image")
    labels = np.asarray(labels)
    if config.rot90:
        k = int(rng.integers(0, 4))
        rgb, labels = np.rot90(rgb, k), np.rot90(labels, k)
    if config.hflip and rng.random() < 0.5:
        rgb, labels = rgb[:, ::-1], labels[:, ::-1]
    if config.vflip and rng.random() < 0.5:
        rgb, labels = rgb[::-1], labels[::-1]
    lo, hi = config.scale_range
    scale = float(rng.uniform(lo, hi)) if hi > lo else float(lo)
    height, width = labels.shape
    if scale == 1.0:
        rh, rw = preprocess_shape(height, width, image_size)
    else:
        rh, rw = preprocess_shape(height, width, max(1, int(round(image_size * scale))))
    # Crop in the resized frame, mapped back to the source so that only the crop is resized.
    ch, cw = min(rh, image_size), min(rw, image_size)
    y0 = int(rng.integers(0, rh - ch + 1))
    x0 = int(rng.integers(0, rw - cw + 1))
    fy, fx = height / rh, width / rw
    sy0, sy1 = int(np.floor(y0 * fy)), min(height, max(int(np.ceil((y0 + ch) * fy)), int(np.floor(y0 * fy)) + 1))
    sx0, sx1 = int(np.floor(x0 * fx)), min(width, max(int(np.ceil((x0 + cw) * fx)), int(np.floor(x0 * fx)) + 1))
    crop = np.ascontiguousarray(rgb[sy0:sy1, sx0:sx1])
    crop_labels = labels[sy0:sy1, sx0:sx1]
    if crop.shape[:2] != (ch, cw):
        crop = np.array(Image.fromarray(crop).resize((cw, ch), Image.BILINEAR))
        crop_labels = _nearest(crop_labels, ch, cw)
    padded = np.zeros((image_size, image_size), np.int32)
    padded[:ch, :cw] = crop_labels
    return AugmentedSample(image=crop, labels=padded, name=name)


def photometric(image: np.ndarray, rng: np.random.Generator, grayscale: float = 0.0, invert: float = 0.0) -> np.ndarray:
    """Randomly grey (probability ``grayscale``) and invert (``invert``) an 8-bit RGB image.

    Draws from ``rng`` only for non-zero probabilities, so sources without photometric
    augmentation see exactly the random streams they saw before it existed.

    Example:
        >>> rgb = np.array([[[10, 20, 30]]], np.uint8)
        >>> photometric(rgb, np.random.default_rng(0), grayscale=1.0, invert=1.0).tolist()
        [[[237, 237, 237]]]
    """
    out = image
    if grayscale > 0 and rng.random() < grayscale:
        # ITU-R BT.601 luma, as PIL's "L" conversion.
        luma = out[..., :3].astype(np.float32) @ np.array([0.299, 0.587, 0.114], np.float32)
        out = np.repeat(np.clip(np.rint(luma), 0, 255).astype(np.uint8)[..., None], 3, axis=-1)
    if invert > 0 and rng.random() < invert:
        out = 255 - out
    return out


def _rgb(image: np.ndarray, name: str) -> np.ndarray:
    """8-bit RGB by segany's rules; a constant crop or tile is not an error here (it is
    valid training data: background), it simply becomes black."""
    from ..errors import ImageError

    try:
        return prepare_image(image, name=name).rgb
    except ImageError as exc:
        if "constant" not in str(exc):
            raise
        return np.zeros((*np.asarray(image).shape[:2], 3), np.uint8)


def instance_areas(labels: np.ndarray) -> np.ndarray:
    """Pixel count of every label id (index = id; index 0 = background).

    Example:
        >>> instance_areas(np.array([[0, 1, 1], [2, 2, 2]])).tolist()
        [1, 2, 3]
    """
    return np.bincount(labels.reshape(-1).astype(np.int64, copy=False))


def sample_instances(
    labels: np.ndarray, count: int, min_area: int, rng: np.random.Generator
) -> np.ndarray:
    """Up to ``count`` distinct object ids of at least ``min_area`` pixels, drawn at random.

    Example:
        >>> lab = np.zeros((10, 10), int); lab[:5, :5] = 1; lab[6:, 6:] = 2; lab[0, 9] = 3
        >>> sorted(sample_instances(lab, 8, 4, np.random.default_rng(0)).tolist())
        [1, 2]
    """
    areas = instance_areas(labels)
    ids = np.nonzero(areas >= max(1, min_area))[0]
    ids = ids[ids > 0]
    if len(ids) > count:
        ids = rng.choice(ids, size=count, replace=False)
    return np.asarray(ids, dtype=np.int64)


# --------------------------------------------------------------------------------------------
# Opening a configured source
# --------------------------------------------------------------------------------------------


def open_source(spec: Any) -> LabelledImages:
    """The reader for one :class:`~segany.training.config.DataSource`, with skip/limit
    and tiling applied.

    ``folder`` and ``coco`` sources use :mod:`segany.datasets` when it provides a reader for
    them, else (folders only) the built-in :class:`ImageLabelFolder`.

    Example:
        >>> from segany.training.config import DataSource
        >>> len(open_source(DataSource(kind="synthetic", count=10, skip=2, limit=3)))
        3
    """
    kind = spec.kind
    if kind == "synthetic":
        source: LabelledImages = SyntheticScenes(spec.count, spec.size, spec.scene, spec.seed, spec.objects)
    elif kind == "geo":
        source = GeoTiles(spec.path, spec.vectors, tile_size=spec.tile_size, overlap=spec.overlap)
    elif kind in ("folder", "coco"):
        source = _datasets_reader(spec)
    else:
        raise SegAnyError(f"unknown data kind {kind!r}")
    if spec.skip or spec.limit is not None:
        stop = len(source) if spec.limit is None else min(len(source), spec.skip + spec.limit)
        source = Subset(source, range(min(spec.skip, len(source)), stop))
        if len(source) == 0:
            raise DataError(f"{spec.path}: skip={spec.skip}, limit={spec.limit} leave no items")
    if spec.tile:
        source = Tiles(source, spec.tile, spec.tile_stride)
    return source


def _datasets_reader(spec: Any) -> LabelledImages:
    """Prefer segany.datasets (shared with `segany eval`); fall back to the built-in reader."""
    path = Path(spec.path)
    if not path.exists():
        raise DataError(f"{path}: not found")
    try:
        from .. import datasets  # written alongside the trainer; optional here
    except ImportError:
        datasets = None
    if spec.kind == "folder":
        # The built-in folder reader (with segany.datasets' file readers) defers pairing
        # problems, so that they are reported together with those found in the files.
        return ImageLabelFolder(path, strict=False)
    if datasets is None:
        raise DataError(f"{path}: reading COCO JSON needs segany.datasets, which this installation lacks")
    return DatasetSamples(datasets.CocoDataset(path, spec.images))


class DatasetSamples:
    """A :mod:`segany.datasets` dataset (items are ``Sample``) as ``(image, labels, name)``.

    Overlapping instance masks (COCO) become one label image, later objects on top.
    """

    def __init__(self, dataset: Any) -> None:
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> tuple[np.ndarray, np.ndarray, str]:
        sample = self.dataset[index]
        return sample.image, sample.label_image(), sample.name
