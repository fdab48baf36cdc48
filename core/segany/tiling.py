"""Tiled encoding of large rasters: a tile grid, and a Dask pipeline that streams tiles
through the image encoder in batches into an embedding cache.

The grid (:class:`TileGrid`) cuts a raster into ``tile_size`` squares (the model's input
size, 1024 px, by default) that overlap by at least ``overlap`` pixels; tiles are spread
evenly so that the last one ends exactly at the raster's edge (every tile is full size, so
every embedding has the same scale).

:func:`encode_raster` builds a Dask graph per batch of tiles: *read* (windowed GDAL read +
scene-wide normalisation) -> *encode* (one batched encoder pass, GPU when present) ->
*write* (one atomic cache entry per tile). Reads of batch ``i + prefetch`` wait for the
write of batch ``i``, and encodes run one after the other, so I/O overlaps compute while
at most ``prefetch + 1`` batches are in memory: memory does not grow with the raster.
Tiles already in the cache are skipped, so an interrupted encode resumes where it stopped.

Long functions take ``progress(done, total)`` and ``cancel`` (a callable returning True,
or a ``threading.Event``) so GUIs can show progress and stop work; cancelling raises
:class:`Cancelled`.

Example:
    >>> grid = TileGrid(height=2500, width=1000, tile_size=1024, overlap=128)
    >>> (grid.n_rows, grid.n_cols, len(grid))
    (3, 1, 3)
    >>> [t.window.row0 for t in grid]
    [0, 738, 1476]
"""

from __future__ import annotations

import hashlib
import math
import os
import threading
import warnings
from dataclasses import dataclass
from functools import cached_property
from typing import TYPE_CHECKING, Any, Callable, Iterator, Sequence, Union

import numpy as np

from .errors import SegAnyError
from .raster import Raster, Window, open_raster

if TYPE_CHECKING:  # pragma: no cover
    import torch

    from .cache import EmbeddingCache
    from .modeling import Sam
    from .predictor import ImageEmbedding, SamPredictor

__all__ = [
    "Cancelled",
    "Tile",
    "TileEncoder",
    "TileGrid",
    "check_cancel",
    "default_model_spec",
    "encode_raster",
    "resolve_model",
]

ProgressFn = Callable[[int, int], None]
CancelFn = Union[Callable[[], bool], threading.Event, None]


class Cancelled(SegAnyError):
    """The work was cancelled through its ``cancel`` hook (nothing half-written is kept)."""


def check_cancel(cancel: CancelFn) -> None:
    """Raise :class:`Cancelled` when ``cancel`` (a callable or an Event) says so.

    Example:
        >>> ev = threading.Event(); check_cancel(ev); ev.set()
        >>> try:
        ...     check_cancel(ev)
        ... except Cancelled as exc:
        ...     print(exc)
        cancelled
    """
    if cancel is None:
        return
    stop = cancel.is_set() if hasattr(cancel, "is_set") else cancel()
    if stop:
        raise Cancelled("cancelled")


# ------------------------------------------------------------------------------ the grid


@dataclass(frozen=True)
class Tile:
    """One tile: its number, grid row/column and pixel window."""

    index: int
    row: int
    col: int
    window: Window


def _starts(length: int, tile: int, overlap: int) -> list[int]:
    """Evenly spread tile starts: first at 0, last at ``length - tile``, overlaps >= overlap."""
    if length <= tile:
        return [0]
    n = math.ceil((length - overlap) / (tile - overlap))
    return [int(round(v)) for v in np.linspace(0, length - tile, n)]


@dataclass(frozen=True)
class TileGrid:
    """Overlapping square tiles covering a ``height x width`` raster, row by row.

    Args:
        height, width: raster size in pixels.
        tile_size: side of a tile (tiles are smaller only where the raster is).
        overlap: minimum overlap of neighbouring tiles in pixels.

    Example:
        >>> g = TileGrid(600, 600, tile_size=256, overlap=32)
        >>> g.tile_at(1, 2).window
        Window(row0=172, col0=344, height=256, width=256)
        >>> g.seams(g.tile_at(0, 0).window)   # top, bottom, left, right edge is a seam?
        (False, True, False, True)
    """

    height: int
    width: int
    tile_size: int = 1024
    overlap: int = 128

    def __post_init__(self) -> None:
        if self.height <= 0 or self.width <= 0:
            raise SegAnyError(f"a tile grid needs a non-empty raster, got {self.height} x {self.width}")
        if self.tile_size < 16:
            raise SegAnyError(f"tile_size must be at least 16 pixels, got {self.tile_size}")
        if not 0 <= self.overlap < self.tile_size // 2 + 1:
            raise SegAnyError(
                f"overlap must be between 0 and half the tile size ({self.tile_size // 2}), got {self.overlap}"
            )

    @cached_property
    def row_starts(self) -> list[int]:
        return _starts(self.height, self.tile_size, self.overlap)

    @cached_property
    def col_starts(self) -> list[int]:
        return _starts(self.width, self.tile_size, self.overlap)

    @property
    def n_rows(self) -> int:
        return len(self.row_starts)

    @property
    def n_cols(self) -> int:
        return len(self.col_starts)

    @cached_property
    def tiles(self) -> list[Tile]:
        h, w = min(self.tile_size, self.height), min(self.tile_size, self.width)
        return [
            Tile(r * self.n_cols + c, r, c, Window(r0, c0, h, w))
            for r, r0 in enumerate(self.row_starts)
            for c, c0 in enumerate(self.col_starts)
        ]

    def __len__(self) -> int:
        return self.n_rows * self.n_cols

    def __iter__(self) -> Iterator[Tile]:
        return iter(self.tiles)

    def __getitem__(self, index: int) -> Tile:
        return self.tiles[index]

    def tile_at(self, row: int, col: int) -> Tile:
        return self.tiles[row * self.n_cols + col]

    def to_dict(self) -> dict[str, int]:
        return dict(height=self.height, width=self.width, tile_size=self.tile_size, overlap=self.overlap)

    def seams(self, window: Window) -> tuple[bool, bool, bool, bool]:
        """Which edges of ``window`` (top, bottom, left, right) lie inside the raster, where
        an object can be cut; the raster's own edges cut nothing."""
        return (window.row0 > 0, window.row1 < self.height, window.col0 > 0, window.col1 < self.width)

    def tiles_intersecting(self, window: Window) -> list[Tile]:
        """Tiles that share at least one pixel with ``window``."""
        return [t for t in self.tiles if t.window.intersection(window) is not None]

    def margin(self, tile: Tile, box: tuple[float, float, float, float]) -> float:
        """Distance in pixels from ``box`` (x0, y0, x1, y1) to the nearest seam of ``tile``
        (negative when the box sticks out across a seam; raster edges do not count)."""
        x0, y0, x1, y1 = box
        w = tile.window
        top, bottom, left, right = self.seams(w)
        big = float(max(self.height, self.width))
        dists = [
            y0 - w.row0 if top else (big if y0 >= 0 else y0),
            w.row1 - y1 if bottom else (big if y1 <= self.height else self.height - y1),
            x0 - w.col0 if left else (big if x0 >= 0 else x0),
            w.col1 - x1 if right else (big if x1 <= self.width else self.width - x1),
        ]
        return float(min(dists))

    def best_tile(self, box: tuple[float, float, float, float]) -> tuple[Tile, float]:
        """The tile where ``box`` (x0, y0, x1, y1 in pixels) lies most centrally, i.e. farthest
        from any seam, and that distance (ties: the first tile).

        Example:
            >>> g = TileGrid(600, 600, tile_size=256, overlap=32)
            >>> g.best_tile((240, 240, 250, 250))[0].index   # in the middle tile, not at a corner
            4
        """
        best, best_margin = self.tiles[0], -math.inf
        for tile in self.tiles:
            m = self.margin(tile, box)
            if m > best_margin:
                best, best_margin = tile, m
        return best, best_margin


# ------------------------------------------------------------------------------ models


#: Environment variable naming the model used wherever none is named (a registry name or a
#: checkpoint file): the command line, the QGIS plugin, ``qgis_process`` scripts.
MODEL_ENV = "SEGANY_MODEL"


def default_model_spec() -> str | None:
    """The model to use when none is named: ``$SEGANY_MODEL`` when set (a registry name or
    a checkpoint path), else None (segany's own default, :func:`segany.load_model`).

    Front-ends that cannot pass a model through their own options (a ``qgis_process``
    pipeline, a batch job) set the variable instead.

    Example:
        >>> import os
        >>> os.environ["SEGANY_MODEL"] = "/models/sam_vit_b_01ec64.pth"
        >>> default_model_spec()
        '/models/sam_vit_b_01ec64.pth'
        >>> del os.environ["SEGANY_MODEL"]; default_model_spec() is None
        True
    """
    value = os.environ.get(MODEL_ENV, "").strip()
    return os.path.expanduser(value) if value else None


def resolve_model(spec: "str | os.PathLike[str] | Sam | SamPredictor | None", device: str | None = None) -> "Sam":
    """A model from what a user typed: a checkpoint name (``sam_vit_b``), a checkpoint
    path, a registered configuration name with random weights (``test_tiny``, for tests),
    a model object, or None for the default model (``$SEGANY_MODEL`` when set, see
    :func:`default_model_spec`, else :func:`segany.load_model`'s own default).

    Example:
        >>> import warnings
        >>> with warnings.catch_warnings():
        ...     warnings.simplefilter("ignore")
        ...     resolve_model("test_tiny").model_type
        'test_tiny'
    """
    from .build import build_sam, load_model, model_configs, resolve_device
    from .checkpoints import MODEL_TYPES, REGISTRY
    from .errors import CheckpointError
    from .modeling import Sam
    from .predictor import SamPredictor

    if isinstance(spec, SamPredictor):
        return spec.model
    if isinstance(spec, Sam):
        return spec
    if spec is None:
        spec = default_model_spec()
        if spec is None:
            return load_model(None, device=device)
    text = os.fspath(spec)
    if text in REGISTRY or os.path.exists(text):
        return load_model(text, device=device)
    if text in model_configs():
        if text in MODEL_TYPES or text == "default":
            names = ", ".join(n for n, info in REGISTRY.items() if info.model_type == text)
            raise CheckpointError(
                f"'{text}' is an architecture, not a model: name a checkpoint ({names}) or give "
                "a checkpoint file"
            )
        warnings.warn(
            f"model '{text}' is a configuration name: its weights are random (for tests and "
            "benchmarks only)",
            stacklevel=2,
        )
        import torch

        # Seeded, so every process and every run builds the same weights: caches and batch
        # workers agree (and reruns resume) even with a test model.
        with torch.random.fork_rng():
            torch.manual_seed(0)
            return build_sam(text, device=resolve_device(device))
    return load_model(text, device=device)  # raises the checkpoint module's clear error


def check_model_spec(spec: "str | os.PathLike[str] | None") -> None:
    """Fail fast, without loading weights, when :func:`resolve_model` would fail on ``spec``
    (no default model, a checkpoint not downloaded, a missing file, an unknown name).

    Example:
        >>> check_model_spec("test_tiny")
        >>> from segany.errors import CheckpointError
        >>> try:
        ...     check_model_spec("sam_vit_x")
        ... except CheckpointError as exc:
        ...     print(str(exc)[:56])
        'sam_vit_x' is neither an existing file nor a known chec
    """
    from .build import load_model, model_configs
    from .checkpoints import MODEL_TYPES, resolve_checkpoint
    from .errors import CheckpointError

    if spec is None:
        spec = default_model_spec()
        if spec is None:
            load_model(None)  # raises the "what to fetch" message (or finds the shipped model)
            return
    text = os.fspath(spec)
    if text in model_configs() and not os.path.exists(text):
        if text in MODEL_TYPES or text == "default":
            raise CheckpointError(f"'{text}' is an architecture, not a model: name a checkpoint or give a file")
        return
    resolve_checkpoint(text)


def model_fingerprint(model: "Sam") -> str:
    """A short hash of the model's weights (a strided sample of every encoder tensor).

    It identifies the weights actually used (a fine-tuned model in memory, a checkpoint
    anywhere on disk) in well under a second even for ViT-H.

    Example:
        >>> import segany, torch
        >>> _ = torch.manual_seed(0); a = model_fingerprint(segany.build_sam("test_tiny"))
        >>> _ = torch.manual_seed(0); b = model_fingerprint(segany.build_sam("test_tiny"))
        >>> a == b, a == model_fingerprint(segany.build_sam("test_tiny"))
        (True, False)
    """
    digest = hashlib.sha256()
    for name, tensor in sorted(model.image_encoder.state_dict().items()):
        flat = tensor.detach().reshape(-1)
        step = max(1, flat.numel() // 4096)
        digest.update(name.encode())
        digest.update(str(tuple(tensor.shape)).encode())
        digest.update(flat[::step].float().cpu().numpy().tobytes())
    return digest.hexdigest()[:16]


class TileEncoder:
    """Batches of ``H x W x 3`` uint8 tiles -> embeddings, with the predictor's precision.

    Args:
        model: a model, a :class:`~segany.SamPredictor` (its precision and compile settings
            are used) or anything :func:`resolve_model` accepts.

    Example:
        >>> import segany
        >>> enc = TileEncoder(segany.build_sam("test_tiny"))
        >>> feats = enc.encode([np.zeros((100, 80, 3), np.uint8)] * 2)
        >>> tuple(feats.shape), enc.input_size((100, 80))
        ((2, 256, 64, 64), (1024, 819))
    """

    def __init__(self, model: Any) -> None:
        from .predictor import SamPredictor

        self.predictor = model if isinstance(model, SamPredictor) else SamPredictor(resolve_model(model))
        self.model = self.predictor.model
        self.image_size = int(self.model.image_encoder.img_size)
        self.model_type = getattr(self.model, "model_type", None)
        # The device runs one batch at a time; Dask threads only overlap I/O with it.
        self.lock = threading.Lock()

    def input_size(self, original_size: tuple[int, int]) -> tuple[int, int]:
        from .transforms import preprocess_shape

        return preprocess_shape(int(original_size[0]), int(original_size[1]), self.image_size)

    def encode(self, images: Sequence[np.ndarray], layout: str = "hwc") -> "torch.Tensor":
        """Encode same-sized uint8 RGB tiles in one pass; returns ``B x C x g x g`` float32
        (CPU). ``layout``: ``"hwc"`` (``H x W x 3``) or ``"chw"`` (``3 x H x W``)."""
        import torch

        tensors = []
        for image in images:
            chw = torch.from_numpy(np.ascontiguousarray(image))
            chw = chw if layout == "chw" else chw.permute(2, 0, 1)
            size = (int(chw.shape[1]), int(chw.shape[2]))
            if size != self.input_size(size):
                # Resized exactly as SamPredictor.set_image does, so embeddings agree. A tile of
                # the model's size (the usual case) skips this round trip.
                resized = self.predictor.transform.apply_image(chw.permute(1, 2, 0).numpy())
                chw = torch.from_numpy(resized).permute(2, 0, 1)
            if self.model.image_format != "RGB":
                chw = chw.flip(0)
            tensors.append(chw)
        batch = torch.stack(tensors).to(self.predictor.device, torch.float32)
        with self.lock:  # the device runs one batch at a time
            features = self.predictor._encode(batch)
        return features.cpu()

    def embed(
        self, rgb: np.ndarray, original_size: tuple[int, int] | None = None
    ) -> "ImageEmbedding":
        """One image as an :class:`~segany.ImageEmbedding`; ``original_size`` is the size the
        masks come back at (larger than ``rgb`` when it was read decimated)."""
        from .predictor import ImageEmbedding

        size = tuple(original_size) if original_size is not None else rgb.shape[:2]
        return ImageEmbedding(self.encode([rgb]), (int(size[0]), int(size[1])),
                              self.input_size(rgb.shape[:2]), self.model_type)


def as_encoder(model: Any) -> TileEncoder:
    """``model`` itself if it is a :class:`TileEncoder`, else a new one around it."""
    return model if isinstance(model, TileEncoder) else TileEncoder(model)


def read_window_for_model(raster: Raster, window: Window, image_size: int) -> tuple[np.ndarray, np.ndarray]:
    """Pixels of ``window`` at most ``image_size`` on the long side (decimated by GDAL, which
    uses overviews, when the window is larger): the encoder never needs more."""
    from .transforms import preprocess_shape

    if max(window.shape) > image_size:
        return raster.read(window, out_shape=preprocess_shape(window.height, window.width, image_size))
    return raster.read(window)


# ------------------------------------------------------------------------------ pipeline


def _read(raster: Raster, tile: Tile, cancel: CancelFn, _after: Any = None) -> tuple[Tile, np.ndarray | None, float]:
    check_cancel(cancel)
    rgb, valid = raster.read(tile.window, layout="chw")
    fraction = float(valid.mean())
    return tile, (rgb if fraction > 0 else None), fraction


def _encode(encoder: TileEncoder, items: list[tuple[Tile, np.ndarray | None, float]], cancel: CancelFn,
            _after: Any = None) -> list[tuple[Tile, Any, float]]:
    check_cancel(cancel)
    todo = [(t, rgb, f) for t, rgb, f in items if rgb is not None]
    out: list[tuple[Tile, Any, float]] = [(t, None, f) for t, rgb, f in items if rgb is None]
    if todo:
        feats = encoder.encode([rgb for _t, rgb, _f in todo], layout="chw")
        out += [(t, feats[i], f) for i, (t, _rgb, f) in enumerate(todo)]
    return out


def _write(cache: "EmbeddingCache", results: list[tuple[Tile, Any, float]], counter: "_Counter") -> int:
    for tile, feats, fraction in results:
        if feats is None:
            cache.mark_empty(tile.index)  # all nodata: nothing to encode or segment here
        else:
            cache.write(tile.index, feats, fraction)
        counter.step()
    release_memory()
    return len(results)


_LIBC: Any = None
_TRIMMED_RSS: list[float] = []


def _rss_mb() -> float | None:
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20
    except (OSError, ValueError, IndexError, AttributeError):
        return None


def release_memory(growth_mb: float = 64.0) -> None:
    """Hand freed heap memory back to the operating system once it has piled up (glibc on
    Linux; a no-op elsewhere).

    Tiles, embeddings and encoder activations are large blocks allocated and freed from
    several threads; glibc keeps such freed blocks in its arenas, so the resident memory
    of a long tiled pass creeps up with the number of tiles. Trimming has a cost (pages
    are faulted in again), so it happens only when the resident size has grown by
    ``growth_mb`` since the last trim: memory stays flat, the cost stays negligible.
    (Dask's workers trim for the same reason.)
    """
    global _LIBC
    rss = _rss_mb()
    if rss is None:
        return
    if not _TRIMMED_RSS or rss < _TRIMMED_RSS[0]:
        _TRIMMED_RSS[:] = [rss]
    if rss - _TRIMMED_RSS[0] < growth_mb:
        return
    if _LIBC is None:
        import ctypes
        import ctypes.util

        try:
            _LIBC = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
            _LIBC.malloc_trim  # noqa: B018  (musl, macOS: missing)
        except (OSError, AttributeError):
            _LIBC = False
    if _LIBC:
        _LIBC.malloc_trim(0)
    _TRIMMED_RSS[:] = [_rss_mb() or rss]


class _Counter:
    def __init__(self, done: int, total: int, progress: ProgressFn | None) -> None:
        self.done, self.total, self.progress = done, total, progress
        self.lock = threading.Lock()

    def step(self) -> None:
        with self.lock:
            self.done += 1
            if self.progress is not None:
                self.progress(self.done, self.total)


def encode_raster(
    raster: "Raster | str | os.PathLike[str]",
    model: Any,
    cache: "EmbeddingCache | str | os.PathLike[str] | None" = None,
    *,
    tile_size: int | None = None,
    overlap: int | None = None,
    batch_size: int = 4,
    prefetch: int = 2,
    num_workers: int = 2,
    dtype: str = "float16",
    on_mismatch: str = "recompute",
    progress: ProgressFn | None = None,
    cancel: CancelFn = None,
) -> "EmbeddingCache":
    """Encode every tile of a raster into an embedding cache (resuming a partial one).

    Args:
        raster: a :class:`~segany.raster.Raster` or a path (opened with default rules).
        model: a model, predictor, :class:`TileEncoder` or a spec for :func:`resolve_model`.
        cache: a cache, the path of a ``.zarr`` cache folder, or None (in memory).
        tile_size: tile side; default the model's input size (1024).
        overlap: minimum tile overlap; default ``tile_size // 8``.
        batch_size: tiles per encoder pass (raise it on a GPU).
        prefetch: batches read ahead of the encoder (bounds memory).
        num_workers: Dask threads (reads and writes overlap the encoder).
        dtype: storage type of a new cache (``float16`` halves the disk; ``float32`` exact).
        on_mismatch: an existing cache made for another raster/model/grid:
            ``"recompute"`` it or ``"error"``.
        progress: ``progress(done_tiles, total_tiles)`` after each tile.
        cancel: a callable or ``threading.Event``; when set, :class:`Cancelled` is raised and
            the tiles written so far stay in the cache for the next run.

    Returns:
        The :class:`~segany.cache.EmbeddingCache`, complete.

    Example:
        >>> import segany
        >>> from segany.raster import write_test_raster, tmp_dir
        >>> path = write_test_raster(tmp_dir() / "enc.tif", np.random.randint(0, 255, (3, 300, 200), np.uint8))
        >>> cache = encode_raster(path, segany.build_sam("test_tiny"), tile_size=256, overlap=32)
        >>> (len(cache.grid), cache.complete)
        (2, True)
    """
    import dask
    import dask.threaded

    from .cache import EmbeddingCache

    if batch_size < 1 or prefetch < 1:
        raise SegAnyError(f"batch_size and prefetch must be >= 1, got {batch_size} and {prefetch}")
    if not isinstance(raster, Raster):
        raster = open_raster(raster)
    encoder = as_encoder(model)
    if isinstance(cache, EmbeddingCache):
        grid = cache.grid
    else:
        size = tile_size or encoder.image_size
        grid = TileGrid(raster.height, raster.width, size, size // 8 if overlap is None else overlap)
        cache = EmbeddingCache.create(cache, raster=raster, grid=grid, model=encoder.model,
                                      dtype=dtype, on_mismatch=on_mismatch)
    pending = cache.pending()
    counter = _Counter(len(grid) - len(pending), len(grid), progress)
    if progress is not None:
        progress(counter.done, counter.total)
    if not pending:
        return cache
    check_cancel(cancel)

    batches = [[grid[i] for i in pending[s : s + batch_size]] for s in range(0, len(pending), batch_size)]
    dsk: dict[Any, Any] = {}
    for b, batch in enumerate(batches):
        gate = ("write", b - prefetch) if b >= prefetch else None  # bounds read-ahead
        for j, tile in enumerate(batch):
            dsk[("read", b, j)] = (_read, raster, tile, cancel, gate)
        previous = ("encode", b - 1) if b else None  # one encoder pass at a time, in order
        dsk[("encode", b)] = (_encode, encoder, [("read", b, j) for j in range(len(batch))], cancel, previous)
        dsk[("write", b)] = (_write, cache, ("encode", b), counter)
    dsk["done"] = (sum, [("write", b) for b in range(len(batches))])
    # The threaded scheduler is called directly, not through dask.config.set: the config
    # is process-global, and concurrent encodes (threads of a distributed worker, napari
    # workers) entering and leaving it would leave a stale global scheduler behind.
    dask.threaded.get(dsk, "done", num_workers=max(1, num_workers))
    return cache


def tqdm_progress(desc: str, unit: str = "tile", disable: bool = False) -> tuple[ProgressFn, Callable[[], None]]:
    """A ``progress(done, total)`` callback drawing a tqdm bar, and a function closing it."""
    from tqdm.auto import tqdm

    bar: dict[str, Any] = {}

    def progress(done: int, total: int) -> None:
        if "bar" not in bar:
            bar["bar"] = tqdm(total=total, desc=desc, unit=unit, disable=disable, dynamic_ncols=True)
        b = bar["bar"]
        b.total = total
        b.update(done - b.n)

    def close() -> None:
        if "bar" in bar:
            bar["bar"].close()

    return progress, close


# ------------------------------------------------------------------------------ command line
# Shared by `segany embed|segment|auto|batch` (registered in segany.cli).


def _int_list(text: str) -> tuple[int, ...]:
    import argparse

    try:
        return tuple(int(v) for v in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"--bands takes band numbers separated by commas, e.g. 3,2,1; got {text!r}") from None


def _range(text: str) -> tuple[float, float]:
    import argparse

    try:
        low, high = (float(v) for v in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"--value-range takes LOW,HIGH, got {text!r}") from None
    return low, high


def add_model_arguments(parser: Any) -> None:
    """``--model``, ``--device``, ``-q``."""
    parser.add_argument("--model", default=None,
                        help="checkpoint name (see `segany models`), checkpoint file, or a test configuration "
                             "such as test_tiny; default: segany's default model")
    parser.add_argument("--device", default=None, help="cpu, cuda, cuda:1 ... (default: the GPU when present)")
    parser.add_argument("-q", "--quiet", action="store_true", help="no progress bars")


def add_raster_arguments(parser: Any, grid: bool = True) -> None:
    """``--bands``, ``--nodata``, ``--value-range`` and (with ``grid``) ``--tile-size``, ``--overlap``."""
    parser.add_argument("--bands", type=_int_list, default=None, metavar="B[,G,R]",
                        help="1-based bands to use: one (grey) or three (RGB); default: see the docs")
    parser.add_argument("--nodata", type=float, default=None, help="extra pixel value meaning no data")
    parser.add_argument("--value-range", type=_range, default=None, metavar="LOW,HIGH",
                        help="intensities mapped to 0-255 (default: scene-wide 0.5-99.5 percentiles)")
    if grid:
        parser.add_argument("--tile-size", type=int, default=None, help="tile side in pixels (default: the model's, 1024)")
        parser.add_argument("--overlap", type=int, default=None, help="minimum tile overlap (default: tile size / 8)")


def raster_from_args(args: Any) -> Raster:
    return open_raster(args.raster, args.bands, value_range=args.value_range, nodata=args.nodata)


def encoder_from_args(args: Any) -> TileEncoder:
    import sys

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        encoder = TileEncoder(resolve_model(args.model, device=args.device))
    for w in caught:  # one line each, like the CLI's errors, not a source-code excerpt
        print(f"segany: warning: {w.message}", file=sys.stderr)
    return encoder


def grid_from_args(args: Any, raster: Raster, encoder: TileEncoder) -> TileGrid | None:
    if args.tile_size is None and args.overlap is None:
        return None
    size = args.tile_size or encoder.image_size
    return TileGrid(raster.height, raster.width, size, size // 8 if args.overlap is None else args.overlap)


def default_cache_path(raster_path: str | os.PathLike[str], encoder: TileEncoder) -> str:
    """``scene.tif`` -> ``scene.<model>.zarr`` beside it."""
    base, _ext = os.path.splitext(os.fspath(raster_path))
    return f"{base}.{encoder.model_type or 'model'}.zarr"


def _cmd_embed(args: Any) -> int:
    import time

    raster = raster_from_args(args)
    encoder = encoder_from_args(args)
    out = args.output or default_cache_path(args.raster, encoder)
    progress, close = tqdm_progress(f"embed {raster.path.name}", disable=args.quiet)
    start = time.perf_counter()
    try:
        cache = encode_raster(raster, encoder, out, tile_size=args.tile_size, overlap=args.overlap,
                              batch_size=args.batch_size, dtype=args.dtype, on_mismatch=args.on_mismatch,
                              progress=progress)
    finally:
        close()
    statuses = cache.statuses()
    print(f"{out}: {len(cache.grid)} tiles ({cache.grid.n_rows} x {cache.grid.n_cols}, "
          f"{cache.grid.tile_size} px, overlap {cache.grid.overlap}), {int((statuses == 2).sum())} without data, "
          f"{time.perf_counter() - start:.1f} s")
    return 0


def register_embed_command(subparsers: Any) -> None:
    """Add ``segany embed RASTER [-o CACHE]``."""
    parser = subparsers.add_parser(
        "embed", help="encode a large raster tile by tile into an embedding cache",
        description="Encode every tile of RASTER into a zarr embedding cache, resuming a partial one. "
                    "`segany segment/auto --cache` then skip the encoder.")
    parser.add_argument("raster", help="any GDAL raster (GeoTIFF, COG, VRT, ...)")
    parser.add_argument("-o", "--output", default=None, help="cache folder (default: RASTER.<model>.zarr)")
    parser.add_argument("--batch-size", type=int, default=4, help="tiles per encoder pass (default 4)")
    parser.add_argument("--dtype", choices=("float16", "float32"), default="float16", help="storage type")
    parser.add_argument("--on-mismatch", choices=("recompute", "error"), default="recompute",
                        help="an existing cache for another raster/model: recompute it or stop")
    add_model_arguments(parser)
    add_raster_arguments(parser)
    parser.set_defaults(func=_cmd_embed)
