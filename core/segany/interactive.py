"""Click-to-segment, one object at a time: the GUI-free logic behind segany's napari plugin.

An :class:`InteractiveSession` holds everything about segmenting objects in one image or
stack: the per-slice embeddings (through an :class:`EmbeddingCache`), the prompt of the
object being segmented, its candidate masks (SAM returns three for an ambiguous click), the
object's mask on every slice it has been segmented in, and the undo history of the objects
committed into a label image. It also propagates an object through a stack, runs automatic
segmentation and exports committed labels as training data.

Large slices are decoded on full-resolution tiles (:class:`segany.tiling.TileGrid`), each
embedded when first needed; a raster encoded ahead of time into a segany embedding cache
(:mod:`segany.cache`) is opened with :class:`CachedRaster` and needs no encoder run at all.

Nothing here imports a GUI toolkit. A front-end runs the slow calls (:meth:`~InteractiveSession.
embed`, :meth:`~InteractiveSession.decode`, :meth:`~InteractiveSession.propagate`,
:meth:`~InteractiveSession.automatic`) in worker threads and everything else on its GUI
thread; the session is written for exactly that split:

* the predictor is used under one lock, so an embedding, a decode and a propagation never
  touch it at the same time;
* every prompt change bumps a *generation*; :meth:`~InteractiveSession.accept` drops a
  decoded result whose generation is no longer current, so a slow result can never overwrite
  the answer to a newer click ("latest prompt wins");
* an embedding can be cancelled mid-encoder through a :class:`threading.Event`.

Any object with the predictor methods used here (``set_image``, ``get_embedding``,
``set_embedding``, ``predict``) works, e.g. :class:`segany.SamPredictor` or the model-free
:class:`ThresholdPredictor` used by tests and tutorials on machines without trained weights.

Coordinates: prompts are ``(x, y)`` pixels of the current slice (as in
:meth:`segany.SamPredictor.predict`); label images have the shape of the image without its
channel axis, e.g. ``Z x H x W`` for a grey stack.

Example:
    >>> import numpy as np
    >>> image = np.zeros((64, 64), np.uint8)
    >>> image[10:30, 10:30] = 200                      # one bright square object
    >>> session = InteractiveSession(ThresholdPredictor(), image)
    >>> session.embed().cached                         # encodes once ...
    False
    >>> session.embed().cached                         # ... then comes from the cache
    True
    >>> request = session.set_prompt(points=[[20, 20]], labels=[1])    # a click at x=20, y=20
    >>> session.accept(session.decode(request))        # decode (in a worker), accept (GUI thread)
    True
    >>> len(session.candidates.masks), int(session.mask.sum())
    (3, 400)
    >>> labels = np.zeros((64, 64), np.uint16)
    >>> session.commit(labels).object_id, int((labels == 1).sum())
    (1, 400)
    >>> session.undo(labels).object_id, int(labels.max())
    (1, 0)
"""

from __future__ import annotations

import os
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Hashable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import numpy as np
from scipy import ndimage

from .errors import ImageError, PromptError, SegAnyError
from .image import prepare_image

__all__ = [
    "CachedRaster",
    "Cancelled",
    "DecodeRequest",
    "DecodeResult",
    "EmbedReport",
    "EmbeddingCache",
    "EmbeddingSource",
    "InteractiveSession",
    "LabelEdit",
    "ModelChoice",
    "PredictorLike",
    "Prompt",
    "PropagationStep",
    "ThresholdPredictor",
    "box_for_slice",
    "cancellable",
    "device_choices",
    "export_training_data",
    "make_predictor",
    "mask_to_logits",
    "model_choices",
    "points_for_slice",
    "prompts_from_mask",
]

SliceKey = tuple[int, ...]
# Where a prompt is decoded: None = the whole slice, an int = a tile of the session's grid.
Frame = int | None
# SAM's dense prompt: logits on a 256 x 256 grid covering the padded 1024 x 1024 model input.
DEFAULT_MASK_INPUT_SIZE = 256
# Probability given to inside/outside pixels of a mask prompt before taking logits (as in
# micro-sam): +-6.9, confident but not saturated, so points can still overrule the mask.
_MASK_PROMPT_EPS = 1e-3
# Large images: tiles of the model's input size at full resolution, overlapping enough that an
# object of up to ~a quarter tile always lies wholly inside some tile.
DEFAULT_TILE_SIZE = 1024
DEFAULT_TILE_OVERLAP = 256
_BLANK = "blank (constant or no data): nothing to segment there"
# Results decoded ahead of clicks that a session keeps (each holds C full-slice masks).
PREFETCH_KEEP = 2
# Default budget of the embedding cache: 256 SAM embeddings (4 MiB each).
DEFAULT_CACHE_BYTES = 1 << 30
# Non-uint8 stacks get ONE intensity range for all slices (so that an object looks the same to
# the model on every slice, which propagation relies on), estimated from this many slices.
_RANGE_SAMPLE_SLICES = 8


try:  # one "cancelled" exception for all of segany's long calls
    from .tiling import Cancelled
except ImportError:  # pragma: no cover - segany.tiling is being written alongside

    class Cancelled(SegAnyError):  # type: ignore[no-redef]
        """An embedding or propagation was cancelled by the user (not an error)."""


@runtime_checkable
class PredictorLike(Protocol):
    """What a session needs from a predictor (:class:`segany.SamPredictor` has all of it)."""

    def set_image(self, image: np.ndarray, image_format: str = "RGB", **kwargs: Any) -> None: ...

    def get_embedding(self) -> Any: ...

    def set_embedding(self, embedding: Any) -> None: ...

    def predict(
        self,
        point_coords: np.ndarray | None = None,
        point_labels: np.ndarray | None = None,
        box: np.ndarray | None = None,
        mask_input: np.ndarray | None = None,
        multimask_output: bool = True,
        return_logits: bool = False,
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]: ...


class EmbeddingSource(Protocol):
    """Embeddings computed elsewhere that a session may use instead of its encoder."""

    def available(self, slice_key: SliceKey, frame: Frame) -> bool: ...

    def load(self, slice_key: SliceKey, frame: Frame) -> Any: ...


# ----------------------------------------------------------------------------------------------
# Prompts
# ----------------------------------------------------------------------------------------------


@dataclass(frozen=True, eq=False)
class Prompt:
    """The prompt of one object on one slice.

    Attributes:
        points: ``N x 2`` float ``(x, y)`` pixel coordinates (``N`` may be 0).
        labels: ``N`` int, 1 = inside the object (positive), 0 = outside (negative).
        box: ``[x0, y0, x1, y1]`` or None.
        mask: ``H x W`` bool mask prompt (e.g. an existing label) or None.

    Example:
        >>> p = Prompt.build(points=[[3, 4]], labels=[1], box=[0, 0, 10, 10])
        >>> p.points.tolist(), p.labels.tolist(), p.box.tolist(), p.empty
        ([[3.0, 4.0]], [1], [0.0, 0.0, 10.0, 10.0], False)
        >>> Prompt.build().empty
        True
    """

    points: np.ndarray
    labels: np.ndarray
    box: np.ndarray | None = None
    mask: np.ndarray | None = None

    @classmethod
    def build(
        cls,
        points: Sequence[Sequence[float]] | np.ndarray | None = None,
        labels: Sequence[int] | np.ndarray | None = None,
        box: Sequence[float] | np.ndarray | None = None,
        mask: np.ndarray | None = None,
    ) -> Prompt:
        """Validate and normalise the pieces of a prompt (raises :class:`PromptError`)."""
        pts = np.zeros((0, 2)) if points is None else np.asarray(points, dtype=np.float64)
        if pts.size == 0:
            pts = np.zeros((0, 2))
        if pts.ndim != 2 or pts.shape[1] != 2:
            raise PromptError(f"points must be N x 2 (x, y), got shape {pts.shape}")
        if labels is None:
            lab = np.ones(len(pts), np.int64)
        else:
            lab = np.asarray(labels, dtype=np.int64).reshape(-1)
        if len(lab) != len(pts):
            raise PromptError(f"{len(pts)} points but {len(lab)} labels")
        if not np.isin(lab, (0, 1)).all():
            raise PromptError("point labels must be 1 (inside the object) or 0 (outside)")
        if not np.isfinite(pts).all():
            raise PromptError("points contain NaN or infinite coordinates")
        bx = None
        if box is not None:
            bx = np.asarray(box, dtype=np.float64).reshape(-1)
            if bx.shape != (4,) or not np.isfinite(bx).all():
                raise PromptError(f"box must be 4 finite numbers [x0, y0, x1, y1], got {box!r}")
            if bx[2] < bx[0] or bx[3] < bx[1]:
                raise PromptError(f"box {bx.tolist()} has x1 < x0 or y1 < y0")
        mk = None
        if mask is not None:
            mk = np.asarray(mask).astype(bool, copy=False)
            if mk.ndim != 2:
                raise PromptError(f"a mask prompt must be H x W, got shape {mk.shape}")
            if not mk.any():
                mk = None  # an empty mask says nothing about the object
        return cls(pts, lab, bx, mk)

    @property
    def empty(self) -> bool:
        """True when there is nothing to segment from."""
        return len(self.points) == 0 and self.box is None and self.mask is None

    def same_as(self, other: Prompt | None) -> bool:
        """True if ``other`` holds exactly the same prompt (used to skip redundant decodes)."""
        if other is None:
            return False

        def same(a: np.ndarray | None, b: np.ndarray | None) -> bool:
            if a is None or b is None:
                return a is None and b is None
            return a.shape == b.shape and bool(np.array_equal(a, b))

        return (
            same(self.points, other.points)
            and same(self.labels, other.labels)
            and same(self.box, other.box)
            and same(self.mask, other.mask)
        )


def points_for_slice(
    coords: np.ndarray,
    positive: Sequence[bool] | np.ndarray,
    slice_key: SliceKey,
    shape: tuple[int, int],
) -> tuple[np.ndarray, np.ndarray, int]:
    """Points of an N-d points layer that lie on one slice, as SAM prompts.

    Args:
        coords: ``N x D`` layer coordinates ``(..., row, col)`` with ``D = len(slice_key) + 2``.
        positive: ``N`` flags, True for points inside the object.
        slice_key: the indices of the leading (non-spatial) axes of the slice.
        shape: ``(H, W)`` of the slice; points outside it are left out.

    Returns:
        ``(points N' x 2 (x, y), labels N', left_out)`` where ``left_out`` counts the points
        of this slice that lie outside the image.

    Example:
        >>> xy, lab, out = points_for_slice(np.array([[2, 5, 7], [3, 1, 1], [2, 99, 0]]),
        ...                                 [True, True, False], (2,), (64, 64))
        >>> xy.tolist(), lab.tolist(), out
        ([[7.0, 5.0]], [1], 1)
    """
    coords = np.asarray(coords, dtype=np.float64).reshape(-1, len(slice_key) + 2)
    flags = np.asarray(positive, dtype=bool).reshape(-1)
    if len(flags) != len(coords):
        raise PromptError(f"{len(coords)} points but {len(flags)} positive/negative flags")
    on_slice = np.ones(len(coords), bool)
    for axis, index in enumerate(slice_key):
        on_slice &= np.round(coords[:, axis]).astype(np.int64) == index
    rows, cols = coords[on_slice, -2], coords[on_slice, -1]
    h, w = shape
    # A click on a pixel's outer half (-0.5 .. 0) still means that pixel.
    inside = (rows > -0.5) & (rows < h - 0.5) & (cols > -0.5) & (cols < w - 0.5)
    # A point prompts the pixel under it: napari's pixel i spans i - 0.5 .. i + 0.5 and SAM's
    # prompt encoder adds 0.5 to reach a pixel's centre, so the pixel index is the prompt.
    # Snapping also makes the prompt of a click equal the one prefetched while the pointer
    # rested on that pixel (InteractiveSession.speculate), even if it moved within the pixel.
    xy = np.stack([np.round(cols[inside]).clip(0, w - 1), np.round(rows[inside]).clip(0, h - 1)], axis=1)
    labels = flags[on_slice][inside].astype(np.int64)
    return xy.reshape(-1, 2), labels, int((~inside).sum())


def box_for_slice(
    shapes: Sequence[np.ndarray],
    slice_key: SliceKey,
    shape: tuple[int, int],
    shape_types: Sequence[str] | None = None,
) -> np.ndarray | None:
    """The box prompt of a slice: the bounding box of the LAST shape drawn on it.

    Args:
        shapes: vertex arrays ``V x D`` (``(..., row, col)``) of a shapes layer.
        slice_key: indices of the leading axes.
        shape: ``(H, W)``; the box is clipped to the image.
        shape_types: the napari shape types; only rectangles count when given.

    Returns:
        ``[x0, y0, x1, y1]`` or None.

    Example:
        >>> rect = np.array([[4, 2, 3], [4, 2, 9], [4, 8, 9], [4, 8, 3]])
        >>> box_for_slice([rect], (4,), (64, 64)).tolist()
        [3.0, 2.0, 9.0, 8.0]
        >>> box_for_slice([rect], (5,), (64, 64)) is None
        True
    """
    h, w = shape
    for i in range(len(shapes) - 1, -1, -1):
        if shape_types is not None and shape_types[i] != "rectangle":
            continue
        vertices = np.asarray(shapes[i], dtype=np.float64)
        if vertices.ndim != 2 or vertices.shape[1] != len(slice_key) + 2 or len(vertices) == 0:
            continue
        lead = np.round(vertices[:, : len(slice_key)]).astype(np.int64)
        if len(slice_key) and not (lead == np.asarray(slice_key)).all():
            continue
        rows, cols = vertices[:, -2], vertices[:, -1]
        box = np.array([cols.min(), rows.min(), cols.max(), rows.max()])
        box[[0, 2]] = box[[0, 2]].clip(0, w - 1)
        box[[1, 3]] = box[[1, 3]].clip(0, h - 1)
        if box[2] <= box[0] or box[3] <= box[1]:
            continue  # degenerate or entirely outside the image
        return box
    return None


def mask_to_logits(mask: np.ndarray, mask_size: int = DEFAULT_MASK_INPUT_SIZE) -> np.ndarray:
    """A binary ``H x W`` mask as SAM's ``1 x 256 x 256`` mask-input logits.

    The mask is resized like the image (longest side to ``mask_size``) and padded at the
    bottom/right, matching the model's padded input frame.

    Example:
        >>> m = np.zeros((100, 50), bool); m[:50] = True
        >>> logits = mask_to_logits(m)
        >>> logits.shape, bool(logits[0, 10, 10] > 0), bool(logits[0, 200, 10] < 0)
        ((1, 256, 256), True, True)
    """
    import torch
    import torch.nn.functional as F

    from .transforms import preprocess_shape

    mask = np.asarray(mask, dtype=bool)
    h, w = preprocess_shape(mask.shape[0], mask.shape[1], mask_size)
    tensor = torch.from_numpy(mask.astype(np.float32))[None, None]
    # Bilinear for upsampling, area averaging for downsampling: both keep edges soft.
    mode = "area" if h <= mask.shape[0] else "bilinear"
    kwargs = {} if mode == "area" else {"align_corners": False}
    small = F.interpolate(tensor, size=(h, w), mode=mode, **kwargs)[0, 0].numpy()
    prob = np.full((mask_size, mask_size), _MASK_PROMPT_EPS, np.float32)
    prob[:h, :w] = np.clip(small, _MASK_PROMPT_EPS, 1 - _MASK_PROMPT_EPS)
    return np.log(prob / (1 - prob))[None].astype(np.float32)


def _interior_point(mask: np.ndarray) -> tuple[float, float]:
    """``(x, y)`` of the pixel deepest inside ``mask`` (a centroid can lie outside a C shape)."""
    ys, xs = np.nonzero(mask)
    y0, y1, x0, x1 = ys.min(), ys.max() + 1, xs.min(), xs.max() + 1
    crop = np.pad(mask[y0:y1, x0:x1], 1)  # pad: the image border is not the object border
    distance = ndimage.distance_transform_edt(crop)
    # Of the deepest pixels (a ridge in elongated shapes), the one nearest the centroid.
    deepest = np.argwhere(distance >= distance.max() - 1e-6)
    centroid = np.argwhere(crop).mean(axis=0)
    y, x = deepest[np.argmin(((deepest - centroid) ** 2).sum(axis=1))]
    return float(x - 1 + x0), float(y - 1 + y0)


def prompts_from_mask(
    mask: np.ndarray,
    logits: np.ndarray | None = None,
    mask_size: int = DEFAULT_MASK_INPUT_SIZE,
) -> dict[str, np.ndarray]:
    """SAM prompts that ask for ``mask`` again: its box, its innermost point, its logits.

    Used to carry an object to the next slice of a stack, and for mask prompts.

    Args:
        mask: ``H x W`` bool, not empty.
        logits: the low-resolution logits that produced ``mask`` (``256 x 256`` or
            ``1 x 256 x 256``); computed from the mask when None.

    Example:
        >>> m = np.zeros((32, 32), bool); m[8:16, 4:20] = True
        >>> p = prompts_from_mask(m)
        >>> p["box"].tolist(), p["point_coords"].tolist(), p["mask_input"].shape
        ([4.0, 8.0, 19.0, 15.0], [[11.0, 11.0]], (1, 256, 256))
    """
    mask = np.asarray(mask, dtype=bool)
    if not mask.any():
        raise PromptError("cannot make prompts from an empty mask")
    ys, xs = np.nonzero(mask)
    x, y = _interior_point(mask)
    if logits is None:
        logits = mask_to_logits(mask, mask_size)
    return {
        "point_coords": np.array([[x, y]]),
        "point_labels": np.array([1]),
        "box": np.array([xs.min(), ys.min(), xs.max(), ys.max()], dtype=np.float64),
        "mask_input": np.asarray(logits, dtype=np.float32).reshape(1, mask_size, mask_size),
    }


# ----------------------------------------------------------------------------------------------
# Embedding cache and cancellation
# ----------------------------------------------------------------------------------------------


def _nbytes(embedding: Any) -> int:
    features = getattr(embedding, "features", embedding)
    if hasattr(features, "element_size") and hasattr(features, "numel"):
        return int(features.element_size() * features.numel())
    return int(getattr(features, "nbytes", 0))


class EmbeddingCache:
    """A thread-safe least-recently-used store of embeddings, bounded in bytes.

    Keys are any hashable; sessions use ``(image key, slice key)``. One cache can serve
    several sessions (a GUI switching between images keeps their embeddings).

    Example:
        >>> cache = EmbeddingCache(max_bytes=8)
        >>> cache.put("a", np.zeros(1, np.float32)); cache.put("b", np.zeros(1, np.float32))
        >>> cache.put("c", np.zeros(1, np.float32))   # 12 bytes > 8: the oldest goes
        >>> "a" in cache, "c" in cache, len(cache), cache.nbytes
        (False, True, 2, 8)
    """

    def __init__(self, max_bytes: int = DEFAULT_CACHE_BYTES) -> None:
        self.max_bytes = int(max_bytes)
        self._items: OrderedDict[Hashable, tuple[Any, int]] = OrderedDict()
        self._lock = threading.Lock()
        self.nbytes = 0

    def get(self, key: Hashable) -> Any | None:
        """The embedding stored under ``key`` (now the most recently used), or None."""
        with self._lock:
            item = self._items.get(key)
            if item is None:
                return None
            self._items.move_to_end(key)
            return item[0]

    def put(self, key: Hashable, embedding: Any) -> None:
        """Store ``embedding``; evict the least recently used ones beyond the budget."""
        size = _nbytes(embedding)
        with self._lock:
            old = self._items.pop(key, None)
            if old is not None:
                self.nbytes -= old[1]
            self._items[key] = (embedding, size)
            self.nbytes += size
            # Keep at least the newest entry, even if it alone is over the budget.
            while self.nbytes > self.max_bytes and len(self._items) > 1:
                _, (_, evicted) = self._items.popitem(last=False)
                self.nbytes -= evicted

    def discard(self, predicate: Callable[[Hashable], bool]) -> int:
        """Remove the entries whose key satisfies ``predicate``; return how many."""
        with self._lock:
            keys = [key for key in self._items if predicate(key)]
            for key in keys:
                self.nbytes -= self._items.pop(key)[1]
            return len(keys)

    def clear(self) -> None:
        with self._lock:
            self._items.clear()
            self.nbytes = 0

    def __contains__(self, key: object) -> bool:
        with self._lock:
            return key in self._items

    def __len__(self) -> int:
        with self._lock:
            return len(self._items)


def _checkpoint_modules(encoder: Any) -> list[Any]:
    """Encoder sub-modules (up to three levels deep) at which a cancel request is honoured."""
    modules = []
    for name, module in encoder.named_modules():
        if name and name.count(".") <= 2:
            modules.append(module)
    return modules


@contextmanager
def cancellable(predictor: Any, cancel: threading.Event | None) -> Iterator[None]:
    """Let ``cancel.set()`` (from any thread) stop the predictor's image encoder mid-way.

    A big encoder (ViT-H) takes a minute on a CPU; without this, "Cancel" would only take
    effect after it. Hooks on the encoder's blocks raise :class:`Cancelled` at the next block.
    Predictors without a torch ``model.image_encoder`` are simply not interruptible.

    Example:
        >>> import segany
        >>> predictor = segany.SamPredictor(segany.build_sam("test_tiny"))
        >>> stop = threading.Event(); stop.set()
        >>> try:
        ...     with cancellable(predictor, stop):
        ...         predictor.set_image(np.random.randint(0, 255, (32, 32), np.uint8))
        ... except Cancelled as exc:
        ...     print(exc)
        embedding cancelled
    """
    encoder = getattr(getattr(predictor, "model", None), "image_encoder", None)
    if cancel is None or encoder is None or not hasattr(encoder, "named_modules"):
        yield
        return

    def check(_module: Any, _inputs: Any) -> None:
        if cancel.is_set():
            raise Cancelled("embedding cancelled")

    handles = [module.register_forward_pre_hook(check) for module in _checkpoint_modules(encoder)]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


# ----------------------------------------------------------------------------------------------
# Results
# ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class DecodeRequest:
    """A snapshot of one prompt to decode (safe to hand to a worker thread)."""

    generation: int
    slice_key: SliceKey
    prompt: Prompt
    multimask: bool


@dataclass
class DecodeResult:
    """The candidates for one :class:`DecodeRequest`.

    Attributes:
        masks: ``C x H x W`` bool candidates (``C`` = 3 or 1).
        scores: ``C`` predicted IoU of each candidate.
        logits: ``C x 256 x 256`` low-resolution logits (reused by propagation), or None.
        seconds: time spent decoding (embedding included if it had to be computed).
        thread_id: the thread that decoded it (``threading.get_ident()``).
        frame: where it was decoded: None (whole slice) or a tile index; the logits belong
            to that frame.
        ahead: decoded before the request existed, while the pointer rested where the
            click came (:meth:`InteractiveSession.prefetched`).
    """

    request: DecodeRequest
    masks: np.ndarray
    scores: np.ndarray
    logits: np.ndarray | None
    seconds: float
    thread_id: int
    frame: Frame = None
    ahead: bool = False


@dataclass(frozen=True)
class EmbedReport:
    """What :meth:`InteractiveSession.embed` did for one slice."""

    slice_key: SliceKey
    cached: bool
    seconds: float
    thread_id: int
    blank: tuple[Frame, ...] = ()  # frames found blank (constant/no data): nothing embedded


@dataclass(frozen=True)
class PropagationStep:
    """The object on one more slice (``mask`` is None on the slice where it vanished).

    ``reason`` says why propagation stopped there (empty string while it goes on).
    """

    generation: int
    slice_key: SliceKey
    mask: np.ndarray | None
    area: int
    iou_with_previous: float
    score: float
    reason: str = ""
    frame: Frame = None


@dataclass
class LabelEdit:
    """One commit into a label image, enough to undo it.

    Attributes:
        object_id: the label value written.
        indices: tuple of index arrays into the label image (numpy fancy indexing).
        old: the values that were there before.
        prompts: per slice, the prompt that made the object there (``points`` ``[x, y]``,
            ``labels``, ``box``, ``mask_input``) or ``{"propagated": True}`` (provenance for
            exported training data, see :meth:`InteractiveSession.committed_prompts`).
    """

    object_id: int
    indices: tuple[np.ndarray, ...]
    old: np.ndarray
    prompts: dict[SliceKey, dict[str, Any]] = field(default_factory=dict)

    @property
    def size(self) -> int:
        return int(len(self.old))


Writer = Callable[[tuple[np.ndarray, ...], Any], None]


# ----------------------------------------------------------------------------------------------
# The session
# ----------------------------------------------------------------------------------------------


class InteractiveSession:
    """Segment objects one at a time in a 2D image, a stack or a time series.

    Args:
        predictor: a :class:`segany.SamPredictor` or any :class:`PredictorLike`.
        image: ``H x W``, ``H x W x C`` (RGB/RGBA), or a stack with leading axes
            (``Z x H x W``, ``T x Z x H x W x 3``, ...). numpy or any array that slices to numpy
            (dask, zarr): only the slices (and tiles) used are read.
        rgb: whether the last axis holds colour channels; guessed (last axis of 3 or 4) if None.
        nodata: pixel value marking missing data (NaN always is).
        value_range: intensities mapped to 0-255 for non-uint8 images; by default the
            0.5-99.5 percentiles, measured once over the whole stack.
        cache: an :class:`EmbeddingCache` to share between sessions (one per session if None).
        cache_key: identifies this image and model in the cache (required to share a cache).
        multimask: ``"auto"`` (3 candidates for a single click, where SAM's answer is
            ambiguous, 1 candidate otherwise, as SAM's authors recommend), or True/False.
        tiled: encode ``tile_size`` tiles at full resolution instead of the whole slice
            squeezed into the model's input (:class:`segany.tiling.TileGrid`); by default
            when a slice is larger than ``tile_size``. A prompt is decoded on the tile where
            it lies farthest from a seam; a prompt wider than any tile falls back to the
            whole slice ("overview").
        tile_size, tile_overlap: the tile grid (the model's input size by default).
        embedding_source: embeddings computed elsewhere (e.g. a raster's
            :class:`CachedRaster`), used before running the encoder.

    Example (a stack: propagate an object found on the middle slice):
        >>> z, y, x = np.mgrid[:9, :48, :48]
        >>> ball = ((z - 4) ** 2 * 30 + (y - 24) ** 2 + (x - 24) ** 2 < 15 ** 2)
        >>> session = InteractiveSession(ThresholdPredictor(), ball.astype(np.uint8) * 200)
        >>> session.set_slice((4,))
        >>> session.accept(session.decode(session.set_prompt(points=[[24, 24]])))
        True
        >>> steps = session.propagate_all()
        >>> sorted(key[0] for key in session.object_masks)
        [2, 3, 4, 5, 6]
        >>> labels = np.zeros(session.labels_shape, np.uint16)
        >>> edit = session.commit(labels)
        >>> sorted(np.unique(np.nonzero(labels)[0]).tolist())
        [2, 3, 4, 5, 6]

    Example (a large image, decoded on 64 px tiles):
        >>> big = np.zeros((100, 160), np.uint8); big[70:90, 120:150] = 220
        >>> s = InteractiveSession(ThresholdPredictor(), big, tile_size=64, tile_overlap=16)
        >>> s.tiled, len(s.grid)
        (True, 6)
        >>> request = s.set_prompt(points=[[135, 80]])
        >>> s.missing_embeddings(request)      # only the tile under the click is encoded
        [((), 5)]
        >>> s.accept(s.decode(request)), int(s.mask.sum()), s.mask.shape
        (True, 600, (100, 160))
    """

    def __init__(
        self,
        predictor: PredictorLike,
        image: Any,
        *,
        rgb: bool | None = None,
        nodata: float | None = None,
        value_range: tuple[float, float] | None = None,
        cache: EmbeddingCache | None = None,
        cache_key: Hashable | None = None,
        multimask: bool | str = "auto",
        tiled: bool | None = None,
        tile_size: int = DEFAULT_TILE_SIZE,
        tile_overlap: int = DEFAULT_TILE_OVERLAP,
        embedding_source: EmbeddingSource | None = None,
    ) -> None:
        if not hasattr(image, "shape") or not hasattr(image, "dtype"):
            image = np.asarray(image)
        shape = tuple(int(n) for n in image.shape)
        if rgb is None:
            rgb = len(shape) >= 3 and shape[-1] in (3, 4)
        spatial_end = len(shape) - 1 if rgb else len(shape)
        if spatial_end < 2:
            raise ImageError(f"image: expected at least 2 spatial axes, got shape {shape}")
        if multimask not in ("auto", True, False):
            raise SegAnyError(f"multimask must be 'auto', True or False, got {multimask!r}")
        self.predictor = predictor
        self.image = image
        self.rgb = bool(rgb)
        self.nodata = nodata
        self.multimask = multimask
        self.leading_shape: tuple[int, ...] = shape[: spatial_end - 2]
        self.spatial_shape: tuple[int, int] = (shape[spatial_end - 2], shape[spatial_end - 1])
        if 0 in self.spatial_shape:
            raise ImageError(f"image: the image is empty (shape {shape})")
        self.labels_shape: tuple[int, ...] = self.leading_shape + self.spatial_shape
        if tiled is None:
            tiled = max(self.spatial_shape) > tile_size
        self.grid: Any = None
        if tiled:
            from .tiling import TileGrid

            self.grid = TileGrid(*self.spatial_shape, tile_size=tile_size, overlap=tile_overlap)
        self.embedding_source = embedding_source
        # Messages for the user about this session (a front-end shows them).
        self.notes: list[str] = []
        self.cache = cache if cache is not None else EmbeddingCache()
        self.cache_key: Hashable = cache_key if cache_key is not None else ("session", id(self))
        self._value_range = value_range
        self._range_known = value_range is not None or np.dtype(image.dtype) in (np.uint8, np.bool_)
        self.slice_key: SliceKey = (0,) * len(self.leading_shape)
        # Prompt state (GUI thread only).
        self.generation = 0
        self.candidates: DecodeResult | None = None
        self.selected = 0
        self.object_masks: dict[SliceKey, np.ndarray] = {}
        self._object_frames: dict[SliceKey, Frame] = {}
        self.history: list[LabelEdit] = []
        self._last_prompt: dict[SliceKey, Prompt] = {}
        # Results decoded ahead of a click (see speculate); newest last.
        self._prefetched: list[DecodeResult] = []
        # Predictor state (any thread, under the lock).
        self._lock = threading.RLock()
        self._active: tuple[SliceKey, Frame] | None = None
        self._blank: set[tuple[SliceKey, Frame]] = set()
        self.last_embed_thread: int | None = None
        self.last_decode_seconds: float | None = None

    # ------------------------------------------------------------------ slices and images
    @property
    def tiled(self) -> bool:
        """True when prompts are decoded on full-resolution tiles (large images)."""
        return self.grid is not None

    @property
    def ndim_leading(self) -> int:
        """Number of leading (stack/time) axes; 0 for a 2D image."""
        return len(self.leading_shape)

    def _check_key(self, slice_key: Sequence[int] | None) -> SliceKey:
        if slice_key is None:
            return self.slice_key
        key = tuple(int(i) for i in slice_key)
        if len(key) != len(self.leading_shape) or any(
            not 0 <= i < n for i, n in zip(key, self.leading_shape)
        ):
            raise SegAnyError(
                f"slice {key} does not exist in an image with leading axes {self.leading_shape}"
            )
        return key

    def set_slice(self, slice_key: Sequence[int]) -> None:
        """Make ``slice_key`` (indices of the leading axes) the current slice."""
        self.slice_key = self._check_key(slice_key)

    def all_slice_keys(self) -> list[SliceKey]:
        """Every slice of the image, in order (``[()]`` for a 2D image)."""
        return [tuple(int(i) for i in k) for k in np.ndindex(*self.leading_shape)]

    def slice_image(self, slice_key: Sequence[int] | None = None, frame: Frame = None) -> np.ndarray:
        """The pixels of one slice (or of one tile of it) as a numpy array."""
        key = self._check_key(slice_key)
        if frame is None:
            return np.asarray(self.image[key])
        return np.asarray(self.image[key + self.grid[frame].window.slices])

    @property
    def value_range(self) -> tuple[float, float] | None:
        """The intensity range mapped to 0-255 (None for uint8 images: used as they are)."""
        if not self._range_known:
            self._value_range = self._stack_range()
            self._range_known = True
        return self._value_range

    def _stack_range(self) -> tuple[float, float] | None:
        from .image import DEFAULT_PERCENTILES

        keys = self.all_slice_keys()
        count = min(len(keys), _RANGE_SAMPLE_SLICES)
        picks = np.unique(np.linspace(0, len(keys) - 1, count).round().astype(int))
        values = []
        for index in picks:
            pixels = np.asarray(self.image[keys[index]], dtype=np.float64).reshape(-1)
            ok = np.isfinite(pixels)
            if self.nodata is not None and not np.isnan(self.nodata):
                ok &= pixels != self.nodata
            values.append(pixels[ok][:: max(1, int(ok.sum()) // 500_000)])
        sample = np.concatenate(values)
        if sample.size == 0:
            return None  # prepare_image will explain that nothing is valid
        low, high = np.percentile(sample, DEFAULT_PERCENTILES)
        if high <= low:
            low, high = sample.min(), sample.max()
        return (float(low), float(high)) if high > low else None

    def prepared_rgb(self, slice_key: Sequence[int] | None = None) -> np.ndarray:
        """One slice normalised to ``H x W x 3`` uint8 exactly as the model sees it."""
        key = self._check_key(slice_key)
        return prepare_image(
            self.slice_image(key), nodata=self.nodata, value_range=self.value_range,
            name=f"slice {key}" if key else "image",
        ).rgb

    # ------------------------------------------------------------------ embeddings
    def _cache_entry(self, key: SliceKey, frame: Frame) -> tuple[Hashable, SliceKey, Frame]:
        return (self.cache_key, key, frame)

    def frames(self) -> list[Frame]:
        """What "embedding a slice" computes: every tile of a tiled image, else the slice."""
        return list(range(len(self.grid))) if self.tiled else [None]

    def _available(self, key: SliceKey, frame: Frame) -> bool:
        """Is this embedding cached (in memory, or in the embedding source), or known blank?"""
        if self._cache_entry(key, frame) in self.cache or (key, frame) in self._blank:
            return True
        source = self.embedding_source
        return source is not None and source.available(key, frame)

    def has_embedding(self, slice_key: Sequence[int] | None = None, frame: Frame | str = "all") -> bool:
        """True if the slice's embedding (every tile of it by default) is cached."""
        key = self._check_key(slice_key)
        frames = self.frames() if frame == "all" else [frame]
        return all(self._available(key, f) for f in frames)

    def embed(
        self,
        slice_key: Sequence[int] | None = None,
        cancel: threading.Event | None = None,
        frame: Frame | str = "all",
    ) -> EmbedReport:
        """Compute (or find in the cache) the embedding of a slice. Slow: call it in a worker.

        Args:
            frame: ``"all"`` (the slice, or all its tiles), ``None`` (the whole slice even
                when tiled) or a tile index.

        Raises:
            Cancelled: ``cancel`` was set before or during the encoder run.
        """
        key = self._check_key(slice_key)
        frames = self.frames() if frame == "all" else [frame]
        start = time.perf_counter()
        cached = True
        blank = []
        for f in frames:
            with self._lock:
                if not self._available(key, f):
                    cached = False
                    try:
                        self._encode(key, f, cancel)
                    except ImageError:
                        if len(frames) == 1:
                            raise
                        blank.append(f)  # one blank tile does not stop the others
                self.last_embed_thread = threading.get_ident()
        if blank and len(blank) == len(frames):
            raise ImageError(f"{self._where(key, None)} is {_BLANK}")
        return EmbedReport(key, cached, time.perf_counter() - start, threading.get_ident(), tuple(blank))

    def embed_slices(
        self,
        jobs: Sequence[Sequence[int]] | Sequence[tuple[SliceKey, Frame]],
        cancel: threading.Event | None = None,
    ) -> Iterator[EmbedReport]:
        """Embed several slices (or ``(slice, frame)`` pairs), yielding after each (progress).

        A blank slice or tile (constant, all nodata) among several is reported in its
        :class:`EmbedReport` (``blank``) and skipped; a single blank job raises
        :class:`~segany.errors.ImageError`. Raises :class:`Cancelled` when ``cancel`` is set.
        """
        jobs = list(jobs)
        for job in jobs:
            if cancel is not None and cancel.is_set():
                raise Cancelled("embedding cancelled")
            pair = len(job) == 2 and isinstance(job[0], tuple)
            key, frame = (job[0], job[1]) if pair else (tuple(job), "all")
            try:
                yield self.embed(key, cancel, frame=frame)  # type: ignore[arg-type]
            except ImageError:
                if len(jobs) == 1:
                    raise
                blank = tuple(self.frames()) if frame == "all" else (frame,)
                yield EmbedReport(
                    tuple(key), False, 0.0, threading.get_ident(), blank  # type: ignore[arg-type]
                )

    def embedding_jobs(self, slice_keys: Sequence[Sequence[int]]) -> list[tuple[SliceKey, Frame]]:
        """The ``(slice, frame)`` embeddings still missing for these slices."""
        jobs = []
        for slice_key in slice_keys:
            key = self._check_key(slice_key)
            jobs += [(key, f) for f in self.frames() if not self._available(key, f)]
        return jobs

    def _where(self, key: SliceKey, frame: Frame) -> str:
        return (f"slice {key}" if key else "the image") + ("" if frame is None else f", tile {frame}")

    def _encode(self, key: SliceKey, frame: Frame, cancel: threading.Event | None) -> None:
        if cancel is not None and cancel.is_set():
            raise Cancelled("embedding cancelled")
        if (key, frame) in self._blank:
            raise ImageError(f"{self._where(key, frame)} is {_BLANK}")
        image = self.slice_image(key, frame)
        self._active = None  # the predictor forgets its image as soon as set_image starts
        with cancellable(self.predictor, cancel):
            try:
                self.predictor.set_image(image, nodata=self.nodata, value_range=self.value_range)
            except ImageError as exc:
                # A blank tile of a scan, an empty slice at the top of a stack: remember it, so
                # that embedding everything goes on and is not retried.
                self._blank.add((key, frame))
                reason = str(exc).removeprefix("image: ")
                raise ImageError(f"{self._where(key, frame)}: {reason}") from None
        self.cache.put(self._cache_entry(key, frame), self.predictor.get_embedding())
        self._active = (key, frame)

    def _activate(self, key: SliceKey, frame: Frame, cancel: threading.Event | None = None) -> None:
        """Make the predictor hold this embedding (caller holds the lock)."""
        if self._active == (key, frame):
            return  # set_embedding would drop the predictor's per-image decoder cache
        embedding = self.cache.get(self._cache_entry(key, frame))
        source = self.embedding_source
        if embedding is None and source is not None and source.available(key, frame):
            embedding = source.load(key, frame)
            self.cache.put(self._cache_entry(key, frame), embedding)
        if embedding is None:
            self._encode(key, frame, cancel)
        else:
            self.predictor.set_embedding(embedding)
            self._active = (key, frame)

    # ------------------------------------------------------------------ frames (tiles)
    def frame_for(
        self,
        points: np.ndarray | None = None,
        box: np.ndarray | None = None,
        mask: np.ndarray | None = None,
    ) -> Frame:
        """Where a prompt is decoded: None (whole slice) or the tile where it is most central."""
        if not self.tiled:
            return None
        xs: list[float] = []
        ys: list[float] = []
        if points is not None and len(points):
            xs += list(points[:, 0])
            ys += list(points[:, 1])
        if box is not None:
            xs += [box[0], box[2]]
            ys += [box[1], box[3]]
        if mask is not None and mask.any():
            rows, cols = np.nonzero(mask)
            xs += [cols.min(), cols.max() + 1]
            ys += [rows.min(), rows.max() + 1]
        if not xs:
            return None
        tile, margin = self.grid.best_tile((min(xs), min(ys), max(xs), max(ys)))
        # A prompt that crosses every tile's seams needs the whole slice (downscaled).
        return tile.index if margin >= 0 else None

    def missing_embeddings(self, request: DecodeRequest) -> list[tuple[SliceKey, Frame]]:
        """The embeddings :meth:`decode` would have to compute first (empty: it is fast)."""
        prompt = request.prompt
        frame = self.frame_for(prompt.points, prompt.box, prompt.mask)
        if self._available(request.slice_key, frame):
            return []
        return [(request.slice_key, frame)]

    def _run_predictor(
        self,
        key: SliceKey,
        *,
        points: np.ndarray | None = None,
        labels: np.ndarray | None = None,
        box: np.ndarray | None = None,
        mask: np.ndarray | None = None,
        logits: tuple[Frame, np.ndarray] | None = None,
        multimask: bool,
        cancel: threading.Event | None = None,
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray | None, Frame]:
        """One predictor call on the right frame; masks come back at full slice size.

        ``logits`` (with the frame they belong to) are used as mask input on that frame only;
        otherwise a ``mask`` is turned into mask-input logits on the chosen frame.
        """
        frame = self.frame_for(points, box, mask)
        row0 = col0 = 0
        if frame is not None:
            window = self.grid[frame].window
            row0, col0 = window.row0, window.col0
            h, w = window.height, window.width
            if points is not None:
                points = points - np.array([col0, row0])
                points = np.stack([points[:, 0].clip(0, w - 1), points[:, 1].clip(0, h - 1)], 1)
            if box is not None:
                box = box - np.array([col0, row0, col0, row0])
                box = np.array([max(box[0], 0), max(box[1], 0), min(box[2], w - 1), min(box[3], h - 1)])
            if mask is not None:
                mask = mask[window.slices]
        kwargs: dict[str, Any] = {}
        if points is not None and len(points):
            kwargs["point_coords"], kwargs["point_labels"] = points, labels
        if box is not None:
            kwargs["box"] = box
        size = self._mask_input_size()
        if logits is not None and logits[0] == frame:
            kwargs["mask_input"] = np.asarray(logits[1], np.float32).reshape(1, size, size)
        elif mask is not None and mask.any():
            kwargs["mask_input"] = mask_to_logits(mask, size)
        with self._lock:
            self._activate(key, frame, cancel)
            masks, scores, low_res = self.predictor.predict(**kwargs, multimask_output=multimask)
        masks = np.asarray(masks).astype(bool, copy=False)
        masks = masks.reshape(-1, *masks.shape[-2:])
        if frame is not None:
            # Paste the tile's masks into the slice (a tile never leaves the slice).
            full = np.zeros((len(masks), *self.spatial_shape), bool)
            full[:, row0 : row0 + masks.shape[1], col0 : col0 + masks.shape[2]] = masks
            masks = full
        scores = np.asarray(scores, dtype=np.float32).reshape(-1)
        low_res = None if low_res is None else np.asarray(low_res, dtype=np.float32).reshape(-1, size, size)
        return masks, scores, low_res, frame

    # ------------------------------------------------------------------ prompts
    def _wants_multimask(self, prompt: Prompt) -> bool:
        if self.multimask != "auto":
            return bool(self.multimask)
        return len(prompt.points) == 1 and prompt.box is None and prompt.mask is None

    def _build_prompt(
        self,
        points: Sequence[Sequence[float]] | np.ndarray | None,
        labels: Sequence[int] | np.ndarray | None,
        box: Sequence[float] | np.ndarray | None,
        mask: np.ndarray | None,
    ) -> Prompt:
        """A validated prompt for this image (raises :class:`PromptError`)."""
        prompt = Prompt.build(points, labels, box, mask)
        if prompt.mask is not None and prompt.mask.shape != self.spatial_shape:
            raise PromptError(
                f"the mask prompt is {prompt.mask.shape[0]} x {prompt.mask.shape[1]} but the "
                f"image is {self.spatial_shape[0]} x {self.spatial_shape[1]}"
            )
        h, w = self.spatial_shape
        if len(prompt.points) and (
            (prompt.points < 0).any() or (prompt.points[:, 0] > w).any() or (prompt.points[:, 1] > h).any()
        ):
            raise PromptError(f"a point lies outside the image (width {w}, height {h}); points are (x, y)")
        return prompt

    def set_prompt(
        self,
        points: Sequence[Sequence[float]] | np.ndarray | None = None,
        labels: Sequence[int] | np.ndarray | None = None,
        box: Sequence[float] | np.ndarray | None = None,
        mask: np.ndarray | None = None,
        slice_key: Sequence[int] | None = None,
    ) -> DecodeRequest | None:
        """Set the prompt of the current object on a slice (the current one by default).

        Returns the :class:`DecodeRequest` to run with :meth:`decode`, or None when there is
        nothing to decode: the prompt is unchanged, or empty (then the object's mask on that
        slice is dropped too). Any result of an earlier prompt becomes stale.
        """
        key = self._check_key(slice_key)
        prompt = self._build_prompt(points, labels, box, mask)
        if prompt.same_as(self._last_prompt.get(key)):
            return None
        self.generation += 1
        if prompt.empty:
            self._last_prompt.pop(key, None)
            self.object_masks.pop(key, None)
            self._object_frames.pop(key, None)
            if self.candidates is not None and self.candidates.request.slice_key == key:
                self.candidates = None
            return None
        self._last_prompt[key] = prompt
        return DecodeRequest(self.generation, key, prompt, self._wants_multimask(prompt))

    def _mask_input_size(self) -> int:
        encoder = getattr(getattr(self.predictor, "model", None), "prompt_encoder", None)
        size = getattr(encoder, "mask_input_size", None)
        return int(size[0]) if size else DEFAULT_MASK_INPUT_SIZE

    def decode(self, request: DecodeRequest) -> DecodeResult:
        """Candidate masks for a request. Fast with a cached embedding (computes it otherwise).

        Safe to call from a worker thread; the result is applied by :meth:`accept`.
        """
        prompt = request.prompt
        box = prompt.box
        if prompt.mask is not None and box is None and not len(prompt.points):
            # SAM does poorly from a dense mask alone; its box pins the object down.
            box = prompts_from_mask(prompt.mask)["box"]
        start = time.perf_counter()
        masks, scores, logits, frame = self._run_predictor(
            request.slice_key,
            points=prompt.points if len(prompt.points) else None,
            labels=prompt.labels if len(prompt.points) else None,
            box=box,
            mask=prompt.mask,
            multimask=request.multimask,
        )
        seconds = time.perf_counter() - start
        return DecodeResult(request, masks, scores, logits, seconds, threading.get_ident(), frame)

    def accept(self, result: DecodeResult) -> bool:
        """Make a decoded result current; False (and nothing changes) if it is stale."""
        if result.request.generation != self.generation:
            return False
        self.candidates = result
        self.selected = int(np.argmax(result.scores)) if len(result.scores) else 0
        self.object_masks[result.request.slice_key] = result.masks[self.selected]
        self._object_frames[result.request.slice_key] = result.frame
        self.last_decode_seconds = result.seconds
        return True

    # ------------------------------------------------------------------ prefetching
    def speculate(
        self,
        points: Sequence[Sequence[float]] | np.ndarray | None = None,
        labels: Sequence[int] | np.ndarray | None = None,
        box: Sequence[float] | np.ndarray | None = None,
        mask: np.ndarray | None = None,
        slice_key: Sequence[int] | None = None,
    ) -> DecodeRequest | None:
        """The request a prompt *would* make, without making it the current prompt.

        For decoding ahead of a click: while the pointer rests over the image, a front-end
        asks for the prompt a click there would give (the current points plus one at the
        pointer), decodes the request in a worker and hands the result to :meth:`remember`.
        When the click comes, :meth:`prefetched` returns that result for the click's real
        request at once, so the preview appears without waiting for the decoder.

        Returns None when there is nothing worth decoding: the prompt is empty or invalid
        (e.g. the pointer is outside the image), it is the current prompt already, it is
        already prefetched, or its embedding is not cached (a prefetch never runs the
        encoder). Nothing about the session changes; the request's generation is -1, so
        :meth:`accept` never takes it as the current answer.

        Example:
            >>> image = np.zeros((64, 64), np.uint8); image[10:30, 10:30] = 200
            >>> s = InteractiveSession(ThresholdPredictor(), image); _ = s.embed()
            >>> ahead = s.speculate(points=[[20, 20]], labels=[1])      # pointer at (20, 20)
            >>> s.remember(s.decode(ahead))                              # in a worker, then here
            >>> click = s.set_prompt(points=[[20, 20]], labels=[1])      # the click
            >>> hit = s.prefetched(click)                                # no decoding needed
            >>> s.accept(hit), int(s.mask.sum())
            (True, 400)
        """
        try:
            key = self._check_key(slice_key)
            prompt = self._build_prompt(points, labels, box, mask)
        except SegAnyError:
            return None
        if prompt.empty or prompt.same_as(self._last_prompt.get(key)):
            return None
        request = DecodeRequest(-1, key, prompt, self._wants_multimask(prompt))
        if self._find_prefetched(request) is not None or self.missing_embeddings(request):
            return None
        return request

    def _find_prefetched(self, request: DecodeRequest) -> int | None:
        for index, result in enumerate(self._prefetched):
            ahead = result.request
            if (
                ahead.slice_key == request.slice_key
                and ahead.multimask == request.multimask
                and ahead.prompt.same_as(request.prompt)
            ):
                return index
        return None

    def remember(self, result: DecodeResult) -> None:
        """Keep a result decoded for a :meth:`speculate` request (the newest few are kept)."""
        if result.request.generation != -1:
            raise SegAnyError("remember() takes results of speculate() requests only")
        self._prefetched.append(result)
        # Each result holds C full-slice masks: keep only the latest pointer positions.
        del self._prefetched[:-PREFETCH_KEEP]

    def prefetched(self, request: DecodeRequest) -> DecodeResult | None:
        """The remembered result for exactly this request's prompt, made its answer; or None.

        The result is the one the decoder would give (same prompt, same embedding), so it
        can be passed to :meth:`accept` like the result of :meth:`decode`.
        """
        index = self._find_prefetched(request)
        if index is None:
            return None
        result = self._prefetched.pop(index)
        return replace(result, request=request, ahead=True)

    def forget_prefetched(self) -> None:
        """Drop every prefetched result (e.g. after the embeddings were replaced)."""
        self._prefetched = []

    def cycle(self, step: int = 1) -> int:
        """Show the next (``step=-1``: previous) candidate; returns its index.

        Example:
            >>> image = np.zeros((32, 32), np.uint8); image[4:20, 4:20] = 100; image[8:14, 8:14] = 250
            >>> s = InteractiveSession(ThresholdPredictor(), image)
            >>> s.accept(s.decode(s.set_prompt(points=[[10, 10]])))
            True
            >>> first = s.selected
            >>> s.cycle() == (first + 1) % 3
            True
        """
        if self.candidates is None or len(self.candidates.masks) == 0:
            raise SegAnyError("there are no candidates to cycle through: add a prompt first")
        count = len(self.candidates.masks)
        self.selected = (self.selected + step) % count
        self.object_masks[self.candidates.request.slice_key] = self.candidates.masks[self.selected]
        return self.selected

    @property
    def mask(self) -> np.ndarray | None:
        """The current object's mask on the current slice, or None."""
        return self.object_masks.get(self.slice_key)

    def mask_window(self, slice_key: Sequence[int] | None = None) -> tuple[slice, slice]:
        """Where the object's mask on a slice can be non-zero: its tile, or the whole slice.

        Lets a front-end copy a tile instead of a whole large slice.

        Example:
            >>> s = InteractiveSession(ThresholdPredictor(), np.zeros((8, 8), np.uint8))
            >>> s.mask_window()
            (slice(None, None, None), slice(None, None, None))
        """
        frame = self._object_frames.get(self._check_key(slice_key))
        if frame is None:
            return (slice(None), slice(None))
        return self.grid[frame].window.slices

    @property
    def selected_score(self) -> float | None:
        """Predicted IoU of the selected candidate, or None."""
        if self.candidates is None:
            return None
        return float(self.candidates.scores[self.selected])

    def clear(self) -> None:
        """Forget the current object (its prompts, candidates and masks on every slice)."""
        self.generation += 1
        self.candidates = None
        self.selected = 0
        self.object_masks = {}
        self._object_frames = {}
        self._last_prompt = {}

    # ------------------------------------------------------------------ commit / undo
    def _check_labels(self, labels: Any) -> None:
        if tuple(labels.shape) != self.labels_shape:
            raise SegAnyError(
                f"the label image has shape {tuple(labels.shape)}; this image needs {self.labels_shape}"
            )

    @staticmethod
    def next_id(labels: Any) -> int:
        """The smallest label value above every value in ``labels``."""
        return int(np.max(labels)) + 1 if np.size(labels) else 1

    def commit(
        self,
        labels: Any,
        object_id: int | None = None,
        *,
        overwrite: bool = False,
        write: Writer | None = None,
    ) -> LabelEdit:
        """Write the current object into ``labels`` with a new id; then start a new object.

        Args:
            labels: the label image (shape :attr:`labels_shape`), changed in place.
            object_id: the value to write; the next free id by default.
            overwrite: also paint over other objects (by default only background is painted,
                so committing never damages an earlier object).
            write: ``write(indices, value)`` does the writing instead (e.g. napari's
                ``Labels.data_setitem``, which records the edit in napari's history and
                refreshes only the changed region).
        """
        self._check_labels(labels)
        if not any(mask.any() for mask in self.object_masks.values()):
            raise SegAnyError("nothing to commit: the current object has no mask yet")
        if object_id is None:
            object_id = self.next_id(labels)
        if object_id <= 0:
            raise SegAnyError(f"object ids must be positive, got {object_id}")
        dtype = np.dtype(labels.dtype)
        if np.issubdtype(dtype, np.integer) and object_id > np.iinfo(dtype).max:
            raise SegAnyError(
                f"object id {object_id} does not fit the label image's type {dtype}; use a wider "
                "label image (e.g. uint32)"
            )
        parts: list[tuple[np.ndarray, ...]] = []
        for key in sorted(self.object_masks):
            mask = self.object_masks[key]
            region = np.asarray(labels[key])
            target = mask & (region != object_id) if overwrite else mask & (region == 0)
            rows, cols = np.nonzero(target)
            parts.append(tuple(np.full(len(rows), i, np.intp) for i in key) + (rows, cols))
        indices = tuple(np.concatenate(axis) for axis in zip(*parts))
        if len(indices[0]) == 0:
            raise SegAnyError(
                "the object lies entirely on objects committed before: nothing to write "
                "(commit with overwrite to paint over them)"
            )
        old = np.asarray(labels[indices]).copy()
        if write is not None:
            write(indices, object_id)
        else:
            labels[indices] = object_id
        edit = LabelEdit(int(object_id), indices, old, self._provenance())
        self.history.append(edit)
        self.clear()
        return edit

    def _provenance(self) -> dict[SliceKey, dict[str, Any]]:
        records: dict[SliceKey, dict[str, Any]] = {}
        for key in self.object_masks:
            prompt = self._last_prompt.get(key)
            if prompt is None:
                records[key] = {"propagated": True}
                continue
            record: dict[str, Any] = {}
            if len(prompt.points):
                record["points"] = prompt.points.tolist()
                record["labels"] = prompt.labels.tolist()
            if prompt.box is not None:
                record["box"] = prompt.box.tolist()
            record["mask_input"] = prompt.mask is not None
            records[key] = record
        return records

    def committed_prompts(self, slice_key: Sequence[int] | None = None) -> dict[int, list[dict[str, Any]]]:
        """The prompts of the committed objects on a slice, by object id (for export).

        Example:
            >>> image = np.zeros((32, 32), np.uint8); image[4:12, 4:12] = 200
            >>> s = InteractiveSession(ThresholdPredictor(), image)
            >>> s.accept(s.decode(s.set_prompt(points=[[8, 8]])))
            True
            >>> _ = s.commit(np.zeros((32, 32), np.uint16))
            >>> s.committed_prompts()
            {1: [{'points': [[8.0, 8.0]], 'labels': [1], 'mask_input': False}]}
        """
        key = self._check_key(slice_key)
        return {
            edit.object_id: [edit.prompts[key]] for edit in self.history if key in edit.prompts
        }

    def undo(self, labels: Any, *, write: Writer | None = None) -> LabelEdit | None:
        """Take back the last commit (restore the old values); None if there is none."""
        if not self.history:
            return None
        self._check_labels(labels)
        edit = self.history.pop()
        if write is not None:
            write(edit.indices, edit.old)
        else:
            labels[edit.indices] = edit.old
        return edit

    # ------------------------------------------------------------------ propagation
    def propagate(
        self,
        *,
        axis: int = -1,
        direction: str = "both",
        min_area_fraction: float = 0.25,
        min_iou: float = 0.2,
        min_pixels: int = 10,
        max_slices: int | None = None,
        cancel: threading.Event | None = None,
    ) -> Iterator[PropagationStep]:
        """Carry the current object from the current slice to its neighbours until it vanishes.

        On each next slice, the previous slice's mask gives the prompts (its box, its
        innermost point and its logits as mask input; one output). Propagation in a
        direction stops when the new mask has fewer than ``min_pixels`` pixels, less than
        ``min_area_fraction`` of the previous area, or an IoU with the previous mask below
        ``min_iou`` (the model jumped to another object). Slow (embeds each new slice): call
        it in a worker; apply each step with :meth:`apply_step` on the GUI thread.

        Args:
            axis: which leading axis to walk along (default the last, e.g. Z of T x Z x H x W).
            direction: ``"both"``, ``"forward"`` (increasing index) or ``"backward"``.
            max_slices: at most this many slices in each direction.
            cancel: set it to stop at the next slice (raises :class:`Cancelled`).
        """
        if not self.leading_shape:
            raise SegAnyError("propagation needs a stack or a time series; this image is 2D")
        axis = range(len(self.leading_shape))[axis]
        start = self.slice_key
        mask0 = self.object_masks.get(start)
        if mask0 is None or not mask0.any():
            raise SegAnyError(
                "segment the object on the current slice first: propagation starts from its mask"
            )
        logits0 = None
        cand = self.candidates
        if cand is not None and cand.request.slice_key == start and cand.logits is not None:
            logits0 = (cand.frame, cand.logits[self.selected])
        steps = {"both": (1, -1), "forward": (1,), "backward": (-1,)}.get(direction)
        if steps is None:
            raise SegAnyError(f"direction must be 'both', 'forward' or 'backward', got {direction!r}")
        generation = self.generation
        for step in steps:
            previous, previous_logits, key, count = mask0, logits0, start, 0
            while max_slices is None or count < max_slices:
                index = key[axis] + step
                if not 0 <= index < self.leading_shape[axis]:
                    break
                if cancel is not None and cancel.is_set():
                    raise Cancelled("propagation cancelled")
                key = key[:axis] + (index,) + key[axis + 1 :]
                prompts = prompts_from_mask(previous)
                try:
                    masks, scores, logits, frame = self._run_predictor(
                        key,
                        points=prompts["point_coords"],
                        labels=prompts["point_labels"],
                        box=prompts["box"],
                        mask=previous,
                        logits=previous_logits,
                        multimask=False,
                        cancel=cancel,
                    )
                except ImageError:
                    # A blank slice (constant, all nodata): nothing of the object is left.
                    yield PropagationStep(generation, key, None, 0, 0.0, 0.0, "the slice is blank")
                    break
                new = masks[0]
                area = int(new.sum())
                union = int((new | previous).sum())
                iou = float((new & previous).sum() / union) if union else 0.0
                reason = ""
                if area < min_pixels:
                    reason = f"the object vanished ({area} pixels)"
                elif area < min_area_fraction * previous.sum():
                    reason = f"the area dropped to {area / previous.sum():.0%} of the previous slice"
                elif iou < min_iou:
                    reason = f"the mask moved too much (IoU {iou:.2f} with the previous slice)"
                yield PropagationStep(
                    generation, key, None if reason else new, area, iou, float(scores[0]), reason, frame
                )
                if reason:
                    break
                count += 1
                previous = new
                previous_logits = None if logits is None else (frame, logits[0])

    def apply_step(self, step: PropagationStep) -> bool:
        """Add a propagated slice to the current object; False if the object changed since."""
        if step.generation != self.generation:
            return False
        if step.mask is not None:
            self.object_masks[step.slice_key] = step.mask
            self._object_frames[step.slice_key] = step.frame
        return True

    def propagate_all(self, **kwargs: Any) -> list[PropagationStep]:
        """:meth:`propagate` and apply every step (for scripts; GUIs use the generator)."""
        steps = list(self.propagate(**kwargs))
        for step in steps:
            self.apply_step(step)
        return steps

    # ------------------------------------------------------------------ automatic
    def automatic(
        self,
        slice_key: Sequence[int] | None = None,
        cancel: threading.Event | None = None,
        **generator_kwargs: Any,
    ) -> np.ndarray:
        """Segment everything on a slice with :class:`segany.AutomaticMaskGenerator`.

        A slice whose embedding is cached is segmented from it (no encoder pass) unless crop
        layers are asked for.

        Args:
            slice_key: the slice (the current one by default).
            cancel: set it to stop the encoder pass (raises :class:`Cancelled`).
            **generator_kwargs: arguments of the generator (``points_per_side``,
                ``pred_iou_thresh``, ``stability_score_thresh``, ``box_nms_thresh``, ...).

        Returns:
            ``H x W`` int32 label image (0 background, 1..N objects; where masks overlap
            the better-scored one wins).

        Example:
            >>> import segany
            >>> s = InteractiveSession(segany.SamPredictor(segany.build_sam("test_tiny")),
            ...                        np.random.default_rng(0).integers(0, 255, (40, 50), np.uint8))
            >>> s.automatic(points_per_side=2, pred_iou_thresh=0, stability_score_thresh=0).shape
            (40, 50)
        """
        from .image import invalid_pixels

        generator_class = automatic_mask_generator_class()
        from .amg import records_to_label_image

        key = self._check_key(slice_key)
        pixels = self.slice_image(key)
        invalid = invalid_pixels(pixels, self.nodata)
        with self._lock:
            try:
                generator = generator_class(self.predictor, **generator_kwargs)
                embedding = None
                if not self.tiled and not getattr(generator, "crop_n_layers", 0):
                    embedding = self.cache.get(self._cache_entry(key, None))
                if embedding is not None:
                    records = generator.generate_from_embedding(
                        embedding, valid_mask=None if invalid is None else ~invalid
                    )
                else:
                    with cancellable(self.predictor, cancel):
                        # The same contrast as the interactive embeddings.
                        records = generator.generate(pixels, nodata=self.nodata, value_range=self.value_range)
            finally:
                self._active = None  # the generator gave our predictor another image
        return records_to_label_image(records, self.spatial_shape)


def automatic_mask_generator_class() -> type:
    """``segany.AutomaticMaskGenerator``, or a :class:`SegAnyError` saying it is missing."""
    import segany

    generator_class = getattr(segany, "AutomaticMaskGenerator", None)
    if generator_class is None:
        try:
            from .amg import AutomaticMaskGenerator as generator_class  # type: ignore[no-redef]
        except ImportError:
            generator_class = None
    if generator_class is None:
        raise SegAnyError(
            "automatic segmentation needs segany.AutomaticMaskGenerator (module segany.amg), "
            "which this version of segany does not have yet"
        )
    return generator_class


# ----------------------------------------------------------------------------------------------
# A model-free stand-in predictor
# ----------------------------------------------------------------------------------------------


@dataclass
class ThresholdEmbedding:
    """The "embedding" of :class:`ThresholdPredictor`: the grey image itself."""

    features: np.ndarray
    original_size: tuple[int, int]


class ThresholdPredictor:
    """A model-free stand-in for :class:`segany.SamPredictor`: the blob under the prompt.

    Tests, tutorials and demos on machines without trained SAM weights need masks that mean
    something (a randomly initialised SAM returns noise). This predictor thresholds the grey
    image between the background level and the intensity under the positive points, at
    three levels (the three candidates), and keeps the connected regions that hold the
    positive points (or, for a box alone, the largest region in the box); negative points
    cut away the pixels nearer to them than to any positive point. Scores are a stability
    measure (how little the region changes between neighbouring levels). It is NOT a
    segmentation model; it has the predictor interface the session uses.

    Example:
        >>> image = np.zeros((40, 40), np.uint8); image[5:15, 5:25] = 180
        >>> p = ThresholdPredictor(); p.set_image(image)
        >>> masks, scores, logits = p.predict(point_coords=np.array([[10, 10]]),
        ...                                   point_labels=np.array([1]))
        >>> masks.shape, int(masks[1].sum()), logits.shape
        ((3, 40, 40), 200, (3, 256, 256))
    """

    def __init__(self, levels: tuple[float, float, float] = (0.3, 0.5, 0.7)) -> None:
        self.levels = tuple(float(v) for v in levels)
        self.model = None  # nothing to interrupt (see cancellable)
        self.reset_image()

    def reset_image(self) -> None:
        self.gray: np.ndarray | None = None
        self.original_size: tuple[int, int] | None = None
        self.is_image_set = False

    def set_image(
        self,
        image: np.ndarray,
        image_format: str = "RGB",
        *,
        nodata: float | None = None,
        value_range: tuple[float, float] | None = None,
    ) -> None:
        prepared = prepare_image(image, image_format=image_format, nodata=nodata, value_range=value_range)
        gray = prepared.rgb.astype(np.float32).mean(axis=2)
        self.set_embedding(ThresholdEmbedding(gray, prepared.rgb.shape[:2]))

    def get_embedding(self) -> ThresholdEmbedding:
        if not self.is_image_set:
            raise SegAnyError("no image is set: call set_image(...) first")
        return ThresholdEmbedding(self.gray, self.original_size)  # type: ignore[arg-type]

    def set_embedding(self, embedding: ThresholdEmbedding) -> None:
        self.gray = embedding.features
        self.original_size = tuple(embedding.original_size)  # type: ignore[assignment]
        self.is_image_set = True

    def predict(
        self,
        point_coords: np.ndarray | None = None,
        point_labels: np.ndarray | None = None,
        box: np.ndarray | None = None,
        mask_input: np.ndarray | None = None,
        multimask_output: bool = True,
        return_logits: bool = False,
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        if self.gray is None:
            raise SegAnyError("no image is set: call set_image(...) first")
        gray = self.gray
        h, w = gray.shape
        pts = np.zeros((0, 2)) if point_coords is None else np.asarray(point_coords, float).reshape(-1, 2)
        labs = np.ones(len(pts), int) if point_labels is None else np.asarray(point_labels).reshape(-1)
        window = np.ones((h, w), bool)
        if box is not None:
            x0, y0, x1, y1 = np.asarray(box, float).reshape(4)
            window[:] = False
            window[int(max(0, y0)) : int(min(h, y1 + 1)), int(max(0, x0)) : int(min(w, x1 + 1))] = True
        if not window.any():
            raise PromptError("the box lies outside the image")
        rc = np.stack([pts[:, 1].round().clip(0, h - 1), pts[:, 0].round().clip(0, w - 1)], 1).astype(int)
        positive, negative = rc[labs == 1], rc[labs == 0]
        rows, cols = np.nonzero(window)
        r0, r1, c0, c1 = rows.min(), rows.max(), cols.min(), cols.max()
        # The window's rim: background when a box is drawn around an object.
        rim = np.concatenate(
            [gray[r0, c0 : c1 + 1], gray[r1, c0 : c1 + 1], gray[r0 : r1 + 1, c0], gray[r0 : r1 + 1, c1]]
        )
        if len(positive) == 0:
            # A box alone: seed at its centre if that stands out from the rim (boxes are drawn
            # around the object), else at the pixel that differs most from the rim.
            contrast = np.where(window, np.abs(ndimage.uniform_filter(gray, 3) - np.median(rim)), -1.0)
            centre = ((r0 + r1) // 2, (c0 + c1) // 2)
            if contrast[centre] < 0.5 * contrast.max():
                centre = np.unravel_index(int(np.argmax(contrast)), gray.shape)
            positive = np.array([centre])
        background = float(np.median(rim)) if box is not None else float(np.percentile(gray[window], 10))
        seed_level = float(np.mean(gray[positive[:, 0], positive[:, 1]]))
        if abs(seed_level - background) < 1e-6:
            background = float(np.percentile(gray[window], 90))
        levels = self.levels if multimask_output else (self.levels[len(self.levels) // 2],)
        masks = np.stack(
            [self._region(gray, window, background, seed_level, f, positive, negative) for f in levels]
        )
        areas = masks.reshape(len(masks), -1).sum(axis=1).astype(float)
        if len(masks) == 1:
            scores = np.array([0.9])
        else:
            # Stability: the area ratio of the neighbouring levels around each candidate.
            lo = np.r_[areas[0], areas[:-1]]
            hi = np.r_[areas[1:], areas[-1]]
            scores = np.minimum(lo, hi) / np.maximum(np.maximum(lo, hi), 1)
            scores = 0.5 + 0.45 * scores - 0.01 * np.arange(len(masks))  # ties go to the first
        logits = np.concatenate([mask_to_logits(m) for m in masks])
        out: np.ndarray = masks.astype(np.float32) * 20 - 10 if return_logits else masks
        return out, scores.astype(np.float32), logits

    @staticmethod
    def _region(
        gray: np.ndarray,
        window: np.ndarray,
        background: float,
        seed_level: float,
        fraction: float,
        positive: np.ndarray,
        negative: np.ndarray,
    ) -> np.ndarray:
        threshold = background + fraction * (seed_level - background)
        foreground = (gray >= threshold) if seed_level >= background else (gray <= threshold)
        foreground &= window
        if len(negative):
            # Pixels nearer to a negative than to every positive point are outside.
            yy, xx = np.mgrid[: gray.shape[0], : gray.shape[1]]
            near_pos = np.min([(yy - r) ** 2 + (xx - c) ** 2 for r, c in positive], axis=0)
            near_neg = np.min([(yy - r) ** 2 + (xx - c) ** 2 for r, c in negative], axis=0)
            foreground &= near_pos < near_neg
        regions, _ = ndimage.label(foreground)
        ids = np.unique(regions[positive[:, 0], positive[:, 1]])
        ids = ids[ids > 0]
        return np.isin(regions, ids) if len(ids) else np.zeros(gray.shape, bool)


# ----------------------------------------------------------------------------------------------
# Rasters encoded ahead of time (segany.cache)
# ----------------------------------------------------------------------------------------------


class CachedRaster:
    """A raster encoded into a segany embedding cache (``*.zarr``), ready to prompt.

    The cache (:mod:`segany.cache`, written by :func:`segany.tiling.encode_raster`, e.g. on a
    GPU machine) holds every tile's embedding; the raster it names is read lazily with the
    cache's band choice and normalisation, so the pixels are exactly the ones encoded.
    :meth:`session` gives an :class:`InteractiveSession` on the cache's tile grid that takes
    tile embeddings from the cache: clicks decode at once, with no encoder run.

    Attributes:
        path: the cache folder.
        cache: the :class:`segany.cache.EmbeddingCache`.
        image: ``H x W x 3`` uint8 lazy (Dask) array of the raster as the model saw it.
        source: the raster's path as stored in the cache.
    """

    def __init__(self, path: str | os.PathLike[str]) -> None:
        from .cache import EmbeddingCache as TileCache
        from .raster import open_raster

        self.path = Path(path)
        self.cache = TileCache.open(self.path, mode="r")
        attrs = self.cache.attrs
        self.source = str(attrs["source"])
        norm = attrs.get("normalisation", {})
        value_range = norm.get("value_range")
        raster = open_raster(
            self.source, bands=attrs.get("bands"), nodata=norm.get("nodata"),
            value_range=None if value_range is None else tuple(value_range), warn_no_crs=False,
        )
        self.cache.verify(raster)  # the raster changed since it was encoded: say so now
        self.image = raster.to_dask(chunks=self.cache.grid.tile_size, normalised=True)

    @staticmethod
    def is_cache(path: str | os.PathLike[str]) -> bool:
        """True if ``path`` is a segany embedding cache folder (cheap: reads its metadata)."""
        import json

        meta = Path(path) / "zarr.json"
        try:
            return "segany_cache" in json.loads(meta.read_text()).get("attributes", {})
        except (OSError, ValueError):
            return False

    @property
    def model_type(self) -> str | None:
        return self.cache.attrs.get("model", {}).get("type")

    def problem_with(self, predictor: Any) -> str | None:
        """Why ``predictor`` cannot use these embeddings (None when it can)."""
        from .tiling import model_fingerprint

        model = getattr(predictor, "model", None)
        if model is None or not hasattr(model, "image_encoder"):
            return f"the cache holds SAM embeddings; {type(predictor).__name__} cannot use them"
        stored = self.cache.attrs.get("model", {})
        if stored.get("type") != getattr(model, "model_type", None):
            return (f"the cache was made by model {stored.get('type')!r}, the chosen model is "
                    f"{getattr(model, 'model_type', None)!r}")
        if stored.get("weights") != model_fingerprint(model):
            made = (
                f"from {stored['checkpoint']}" if stored.get("checkpoint") else "other than the chosen model's"
            )
            return f"the cache was made with weights {made}"
        return None

    def available(self, slice_key: SliceKey, frame: Frame) -> bool:
        from .cache import DONE

        return slice_key == () and frame is not None and self.cache.status(frame) == DONE

    def load(self, slice_key: SliceKey, frame: Frame) -> Any:
        return self.cache.read(int(frame))  # type: ignore[arg-type]

    def session(self, predictor: Any, **kwargs: Any) -> InteractiveSession:
        """A session on the cache's tiles; its embeddings are used when they fit ``predictor``.

        Raises:
            SegAnyError: the embeddings do not fit the predictor (another model or weights).
        """
        problem = self.problem_with(predictor)
        if problem is not None:
            raise SegAnyError(f"embedding cache {self.path.name}: {problem}")
        grid = self.cache.grid
        return InteractiveSession(
            predictor, self.image, rgb=True, tiled=True, tile_size=grid.tile_size,
            tile_overlap=grid.overlap, embedding_source=self, **kwargs,
        )


# ----------------------------------------------------------------------------------------------
# Models for front-ends
# ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ModelChoice:
    """A model a front-end can offer.

    Attributes:
        spec: what :func:`make_predictor` takes (a registry name or a configuration name).
        label: the text shown to the user.
        trained: False for random weights (only good for testing the interface).
    """

    spec: str
    label: str
    trained: bool = True


def model_choices(include_test: bool = True) -> list[ModelChoice]:
    """The registry checkpoints present on this machine (smallest first), then ``test_tiny``.

    Example:
        >>> model_choices()[-1]
        ModelChoice(spec='test_tiny', label='test_tiny (random weights: for testing only)', trained=False)
    """
    from . import checkpoints

    present = [
        (info, status)
        for info, status in checkpoints.list_checkpoints()
        if status != checkpoints.STATUS_MISSING and not status.startswith("corrupt")
    ]
    choices = [
        ModelChoice(info.name, f"{info.name}: {info.description}")
        for info, _ in sorted(present, key=lambda item: item[0].size or 0)
    ]
    if include_test:
        choices.append(ModelChoice("test_tiny", "test_tiny (random weights: for testing only)", False))
    return choices


def device_choices() -> list[str]:
    """Devices torch can use here: ``"cpu"``, then ``"cuda"``/``"mps"`` when available."""
    import torch

    devices = ["cpu"]
    if torch.cuda.is_available():
        devices.append("cuda")
    if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
        devices.append("mps")
    return devices


def make_predictor(spec: str | os.PathLike[str], device: str | None = None) -> Any:
    """A :class:`segany.SamPredictor` for a registry name, a checkpoint path or a configuration.

    A configuration name that is not a registry entry (``test_tiny``) builds that
    architecture with random weights; anything else goes through :func:`segany.load_model`,
    whose errors say what to fetch.

    Example:
        >>> make_predictor("test_tiny", "cpu").model.model_type
        'test_tiny'
    """
    from . import checkpoints
    from .build import build_sam, load_model, model_configs
    from .predictor import SamPredictor

    text = os.fspath(spec)
    if text in model_configs() and text not in checkpoints.REGISTRY and not Path(text).is_file():
        return SamPredictor(build_sam(text, device=device or "cpu"))
    return SamPredictor(load_model(text, device=device))


# ----------------------------------------------------------------------------------------------
# Training-data export
# ----------------------------------------------------------------------------------------------


def export_training_data(
    folder: str | os.PathLike[str],
    name: str,
    image: Any,
    labels: Any,
    *,
    rgb: bool | None = None,
    prompts: Callable[[SliceKey], dict[int, list[dict[str, Any]]]] | None = None,
    source: str | None = None,
    partial: bool | None = True,
    only_labelled: bool = True,
) -> list[str]:
    """Export an image (or every labelled slice of a stack) with its labels as training samples.

    Writes segany's dataset folder (``images/``, ``labels/``, ``prompts/``, ``dataset.json``;
    see ``docs/dataset-format.md``) through :func:`segany.data_engine.write_sample`.

    Args:
        folder: the dataset folder (created if needed).
        name: sample name; slices of a stack get ``<name>_<index>[_<index>]``.
        image: the image or stack (as for :class:`InteractiveSession`).
        labels: its label image (the image's shape without the channel axis).
        rgb: whether the image's last axis holds colour channels (guessed if None).
        prompts: ``prompts(slice_key)`` gives the prompts per object id of a slice (e.g.
            :meth:`InteractiveSession.committed_prompts`), stored in ``prompts/``.
        source: where the image came from (a file, a layer name).
        partial: True when some objects of the images are not labelled (the usual case for
            hand annotation: background then means "unknown" to the trainer).
        only_labelled: skip slices without any label.

    Returns:
        The names of the samples written.

    Example:
        >>> import tempfile
        >>> from segany.datasets import FolderDataset
        >>> stack = np.random.randint(0, 255, (3, 16, 16), np.uint8)
        >>> lab = np.zeros((3, 16, 16), np.uint16); lab[1, 4:8, 4:8] = 1
        >>> with tempfile.TemporaryDirectory() as tmp:
        ...     names = export_training_data(tmp, "stack", stack, lab)
        ...     sample = FolderDataset(tmp)[0]
        >>> names, sample.name, sample.ids.tolist()
        (['stack_0001'], 'stack_0001', [1])
    """
    from .data_engine import write_sample

    image = np.asarray(image) if not hasattr(image, "shape") else image
    shape = tuple(image.shape)
    if rgb is None:
        rgb = len(shape) >= 3 and shape[-1] in (3, 4)
    spatial_end = len(shape) - 1 if rgb else len(shape)
    leading = shape[: spatial_end - 2]
    if tuple(labels.shape) != shape[:spatial_end]:
        raise SegAnyError(
            f"labels have shape {tuple(labels.shape)} but the image needs {shape[:spatial_end]}"
        )
    written = []
    width = max(4, len(str(max(leading, default=1))))
    for key in np.ndindex(*leading):
        lab = np.asarray(labels[key])
        if only_labelled and not lab.any():
            continue
        sample = name if not key else name + "_" + "_".join(f"{i:0{width}d}" for i in key)
        records = prompts(tuple(int(i) for i in key)) if prompts is not None else None
        if records:
            present = set(np.unique(lab).tolist())
            records = {oid: rec for oid, rec in records.items() if oid in present}
        extra = {"slice": [int(i) for i in key]} if key else None
        write_sample(
            folder, sample, np.asarray(image[key]), lab, prompts=records or None,
            source=source, partial=partial, extra=extra,
        )
        written.append(sample)
    return written
