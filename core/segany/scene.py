"""Whole scenes: prompts decoded across tiles, and automatic mode with seam merging.

**Prompts** (:func:`segment`). Each prompt is decoded on the tile of the grid where it
lies most centrally (farthest from any seam; see :meth:`TileGrid.best_tile`), using the
cached embedding when there is one. When the mask touches a seam of that tile (the object
goes on beyond it), it is decoded again on an extra window centred on the object, 1.5x its
size and at least twice the previous window (larger windows than the model input are read
decimated, so the encoder input stays the model's size), up to ``max_refine`` times: an
object that crosses tile borders comes out whole.

**Automatic mode** (:func:`segment_everything`). A generator (by default
:class:`segany.AutomaticMaskGenerator` on each tile's embedding) proposes masks per tile,
row by row. Seams are handled by this rule:

    Two masks from *different* tiles are the same object when, on the pixels both tiles
    see (their overlap), their IoU is at least ``merge_iou`` (0.5) -- or, when a mask crosses
    the overlap in several pieces, the IoU of just the pieces of each that meet the other
    is. Same-object masks are grouped transitively and the object is the union of its masks; its predicted IoU and
    stability are those of its largest mask; ``n_tiles`` counts the tiles that saw it.

A mask cut by a seam and the same object seen whole (or cut elsewhere) by the neighbouring
tile agree on the overlap, so they merge into one object; a duplicate (the same object
seen twice in an overlap) merges with itself. A U-shaped object whose bend only one tile
sees reaches the other tile as two arms: each arm matches its own piece of the whole U, so
all three merge. Masks from the same tile are never merged
(the generator already removed its own duplicates). The grid needs an overlap for this.

Objects are final as soon as every tile that could still touch them has been processed;
they go to ``sink`` at once, so results stream to disk tile by tile and memory holds at
most about two rows of tiles' objects.

Decoders and generators are injectable (``decoder=``, ``generator=``): a decoder is
``decoder(ctx, points, labels, boxes, multimask) -> (masks, iou, stability)`` and a
generator ``generator(ctx) -> records`` (SAM's record format), where ``ctx`` is a
:class:`TileContext` (embedding and pixels of one window, both lazy).

Example:
    >>> import numpy as np
    >>> from segany.raster import open_raster, write_test_raster, tmp_dir
    >>> img = np.zeros((1, 300, 300), "uint8"); img[0, 100:200, 120:260] = 200   # one bright block
    >>> r = open_raster(write_test_raster(tmp_dir() / "s.tif", img))
    >>> def threshold(ctx, points, labels, boxes, multimask):   # a stand-in for SAM
    ...     rgb, _ = ctx.pixels
    ...     m = rgb[..., 0] > 100
    ...     return np.repeat(m[None], len(points), 0), np.ones(len(points)), np.ones(len(points))
    >>> objs = segment(r, [Prompt.point(150.5, 150.5, crs="pixel")], decoder=threshold,
    ...                grid=TileGrid(300, 300, tile_size=128, overlap=16))
    >>> o = objs[0]; (o.row0, o.col0, o.mask.shape, o.area)   # whole, across 3 x 2 tiles
    (100, 120, (100, 140), 14000)
"""

from __future__ import annotations

import math
import os
import warnings
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterable, Sequence

import numpy as np

from .errors import SegAnyError
from .geo import Prompt, read_prompts, to_pixels
from .raster import Raster, Window, open_raster
from .tiling import CancelFn, ProgressFn, Tile, TileEncoder, TileGrid, as_encoder, check_cancel, read_window_for_model

if TYPE_CHECKING:  # pragma: no cover
    from .cache import EmbeddingCache
    from .predictor import ImageEmbedding

__all__ = [
    "AmgGenerator",
    "Prompt",
    "SamDecoder",
    "SceneObject",
    "SceneWriter",
    "TileContext",
    "TileGrid",
    "auto_file",
    "model_name",
    "object_geometry",
    "object_record",
    "segment",
    "segment_everything",
    "segment_file",
]

Decoder = Callable[..., tuple[np.ndarray, np.ndarray, np.ndarray]]
Generator = Callable[["TileContext"], list[dict[str, Any]]]


@dataclass
class SceneObject:
    """One object in raster pixels: a boolean mask cropped to its bounding box.

    Attributes:
        mask: ``h x w`` bool; its pixel ``(0, 0)`` is raster pixel ``(row0, col0)``.
        predicted_iou, stability_score: the model's quality estimates.
        prompt_id: the prompt it answers (None in automatic mode).
        n_tiles: tiles (or windows) that contributed.
        id: number in the output (1, 2, ...; 0 until written).
    """

    mask: np.ndarray
    row0: int
    col0: int
    predicted_iou: float = float("nan")
    stability_score: float = float("nan")
    prompt_id: Any = None
    n_tiles: int = 1
    id: int = 0

    @property
    def window(self) -> Window:
        return Window(self.row0, self.col0, *self.mask.shape)

    @property
    def area(self) -> int:
        """Area in pixels."""
        return int(self.mask.sum())

    def full(self, shape: tuple[int, int]) -> np.ndarray:
        """The mask pasted into an ``H x W`` array (for small rasters and tests)."""
        out = np.zeros(shape, bool)
        out[self.window.slices] = self.mask
        return out


def _crop(mask: np.ndarray, row0: int, col0: int) -> tuple[np.ndarray, int, int] | None:
    """Crop a mask to its bounding box; None when empty."""
    rows, cols = np.flatnonzero(mask.any(axis=1)), np.flatnonzero(mask.any(axis=0))
    if rows.size == 0:
        return None
    r0, r1, c0, c1 = rows[0], rows[-1] + 1, cols[0], cols[-1] + 1
    return np.ascontiguousarray(mask[r0:r1, c0:c1]), row0 + int(r0), col0 + int(c0)


class TileContext:
    """One window of a raster as seen by a decoder or a generator (everything lazy).

    Attributes:
        raster: the :class:`~segany.raster.Raster`.
        window: the window, in full-resolution raster pixels.
        tile: the grid tile when the window is one (its embedding may be cached).
    """

    def __init__(self, raster: Raster, window: Window, *, tile: Tile | None = None,
                 encoder: TileEncoder | None = None, cache: "EmbeddingCache | None" = None) -> None:
        self.raster, self.window, self.tile = raster, window, tile
        self.encoder, self.cache = encoder, cache

    @cached_property
    def embedding(self) -> "ImageEmbedding":
        """The window's embedding: from the cache, else encoded now (decimated if larger
        than the model input); masks decoded from it come back at full resolution."""
        from .cache import DONE

        if self.cache is not None and self.tile is not None and self.cache.status(self.tile.index) == DONE:
            return self.cache.read(self.tile.index)
        if self.encoder is None:
            raise SegAnyError("this decoder needs embeddings but no model was given")
        rgb, _valid = read_window_for_model(self.raster, self.window, self.encoder.image_size)
        return self.encoder.embed(rgb, original_size=self.window.shape)

    @cached_property
    def pixels(self) -> tuple[np.ndarray, np.ndarray]:
        """Full-resolution ``h x w x 3`` uint8 RGB and ``h x w`` validity."""
        return self.raster.read(self.window)

    @cached_property
    def valid(self) -> np.ndarray:
        if "pixels" in self.__dict__:
            return self.pixels[1]
        return self.raster.read_raw(self.window)[1]


# ------------------------------------------------------------------------------ decoding


def _stability(logits: np.ndarray, threshold: float, offset: float = 1.0) -> float:
    union = np.count_nonzero(logits > threshold - offset)
    return float(np.count_nonzero(logits > threshold + offset) / union) if union else 0.0


class SamDecoder:
    """Prompts -> one mask each, with SAM on a window's embedding.

    With ``multimask`` the best of the 3 candidates (by predicted IoU) is kept, as SAM's
    authors advise for single-point prompts.
    """

    def __init__(self, model: Any, chunk: int = 4, keep: int = 0) -> None:
        from .predictor import SamPredictor

        self.predictor = model if isinstance(model, SamPredictor) else as_encoder(model).predictor
        self.chunk = max(1, int(chunk))  # full-res logits of chunk x 3 masks live at once
        # Interactive tools decode click after click on the same window: keeping its
        # embedding skips the encoder (the slow part) on every click but the first.
        self.keep = max(0, int(keep))
        self._kept: dict[tuple[str, Window], Any] = {}

    def embedding(self, ctx: TileContext) -> Any:
        """The window's embedding, from the ``keep`` most recently used ones when there."""
        if not self.keep:
            return ctx.embedding
        key = (str(ctx.raster.path), ctx.window)
        emb = self._kept.pop(key, None)
        if emb is None:
            emb = ctx.embedding
        self._kept[key] = emb  # most recent last
        while len(self._kept) > self.keep:
            self._kept.pop(next(iter(self._kept)))
        return emb

    def __call__(self, ctx: TileContext, points: np.ndarray | None, labels: np.ndarray | None,
                 boxes: np.ndarray | None, multimask: bool) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        pred = self.predictor
        pred.set_embedding(self.embedding(ctx))
        threshold = float(pred.model.mask_threshold)
        n = len(points) if points is not None else len(boxes)
        masks, ious, stabs = [], [], []
        for s in range(0, n, self.chunk):
            sl = slice(s, s + self.chunk)
            logits, iou, _low = pred.predict(
                point_coords=None if points is None else points[sl],
                point_labels=None if labels is None else labels[sl],
                box=None if boxes is None else boxes[sl],
                multimask_output=multimask, return_logits=True,
            )
            logits = logits.reshape(-1, logits.shape[-3], *logits.shape[-2:])
            iou = iou.reshape(len(logits), -1)
            best = iou.argmax(axis=1)
            for b in range(len(logits)):
                chosen = logits[b, best[b]]
                masks.append(chosen > threshold)
                ious.append(float(iou[b, best[b]]))
                stabs.append(_stability(chosen, threshold))
        return np.stack(masks), np.array(ious), np.array(stabs)


def _touches_seam(mask: np.ndarray, window: Window, grid: TileGrid) -> bool:
    top, bottom, left, right = grid.seams(window)
    return bool((top and mask[0].any()) or (bottom and mask[-1].any())
                or (left and mask[:, 0].any()) or (right and mask[:, -1].any()))


def _centred_window(box: tuple[float, float, float, float], grid: TileGrid, max_size: int,
                    at_least: int = 0) -> Window:
    """A square window centred on ``box`` (x0, y0, x1, y1), 1.5x its size, at least a
    tile (and ``at_least``), at most ``max_size``, shifted to lie inside the raster."""
    x0, y0, x1, y1 = box
    side = int(min(max_size, max(grid.tile_size, at_least, math.ceil(1.5 * max(x1 - x0, y1 - y0)))))
    h, w = min(side, grid.height), min(side, grid.width)
    row0 = int(min(max(round((y0 + y1) / 2 - h / 2), 0), grid.height - h))
    col0 = int(min(max(round((x0 + x1) / 2 - w / 2), 0), grid.width - w))
    return Window(row0, col0, h, w)


def _mask_box(mask: np.ndarray, window: Window) -> tuple[float, float, float, float] | None:
    rows, cols = np.flatnonzero(mask.any(axis=1)), np.flatnonzero(mask.any(axis=0))
    if rows.size == 0:
        return None
    return (window.col0 + cols[0], window.row0 + rows[0], window.col0 + cols[-1] + 1, window.row0 + rows[-1] + 1)


def _union_box(a: tuple[float, ...], b: tuple[float, ...] | None) -> tuple[float, float, float, float]:
    if b is None:
        return a  # type: ignore[return-value]
    return (min(a[0], b[0]), min(a[1], b[1]), max(a[2], b[2]), max(a[3], b[3]))


def _sam_inputs(prompts: Sequence[Prompt], window: Window) -> tuple[np.ndarray | None, np.ndarray | None, np.ndarray | None]:
    """Batched SAM inputs in window pixels. SAM reads coordinates as pixel indices (it adds
    0.5 itself), prompts are in pixel-edge coordinates: hence the -0.5 and the inclusive
    box corner."""
    h, w = window.shape
    points = labels = boxes = None
    if len(prompts[0].points):
        pts = np.stack([p.points for p in prompts]) - [window.col0 + 0.5, window.row0 + 0.5]
        points = np.clip(pts, 0, [w, h])
        labels = np.stack([p.labels for p in prompts])
    if prompts[0].box is not None:
        b = np.stack([p.box for p in prompts]) - [window.col0, window.row0, window.col0 + 1, window.row0 + 1]
        boxes = np.clip(b, 0, [w, h, w, h])
        boxes[:, 2:] = np.maximum(boxes[:, 2:], boxes[:, :2])
    return points, labels, boxes


def check_prompts_on_data(pixel_prompts: Sequence[Prompt], raster: Raster) -> None:
    """Raise :class:`~segany.errors.PromptError` for a foreground point on a nodata pixel
    (there is nothing there to segment; usually a prompt meant for another scene)."""
    from .errors import PromptError

    for p in pixel_prompts:
        for (x, y), label in zip(p.points, p.labels):
            if label != 1:
                continue
            row, col = min(int(y), raster.height - 1), min(int(x), raster.width - 1)
            if not raster.read_raw(Window(row, col, 1, 1))[1].all():
                raise PromptError(f"prompt {p.id} for raster {raster.path.name}: point at pixel ({x:.1f}, {y:.1f}) "
                                  "lies on a nodata pixel; there is nothing to segment there")


def segment(
    raster: "Raster | str | os.PathLike[str]",
    prompts: Iterable[Prompt],
    model: Any = None,
    *,
    cache: "EmbeddingCache | None" = None,
    decoder: Decoder | None = None,
    grid: TileGrid | None = None,
    refine: bool = True,
    max_refine: int = 3,
    max_window: int | None = None,
    multimask: str | bool = "auto",
    sink: Callable[[SceneObject], None] | None = None,
    progress: ProgressFn | None = None,
    cancel: CancelFn = None,
) -> list[SceneObject] | int:
    """Segment one object per prompt anywhere in a raster (see the module docs).

    Args:
        raster: a :class:`~segany.raster.Raster` or a path.
        prompts: :class:`~segany.geo.Prompt` objects in any CRS (reprojected here).
        model: anything :func:`~segany.tiling.resolve_model` accepts; needed unless a
            ``decoder`` that does not use embeddings is given.
        cache: an :class:`~segany.cache.EmbeddingCache` of this raster and model.
        decoder: replaces SAM's decoder (see the module docs).
        grid: the tile grid (default: the cache's, or model-size tiles, 1/8 overlap).
        refine: decode again on a window centred on objects that touch a seam.
        max_refine: at most this many extra windows per prompt.
        max_window: largest extra window side (default 4 tiles).
        multimask: ``"auto"`` (3 candidates for single-point prompts, keep the best), True
            or False.
        sink: called with each object as soon as it is final (then the count is returned).
        progress, cancel: see :mod:`segany.tiling`.

    Returns:
        One :class:`SceneObject` per prompt, in prompt order (empty masks are dropped with
        a warning), or, with ``sink``, the number of prompts processed.
    """
    if not isinstance(raster, Raster):
        raster = open_raster(raster)
    pixel_prompts = to_pixels(prompts, raster)
    check_prompts_on_data(pixel_prompts, raster)
    encoder = as_encoder(model) if (model is not None or decoder is None) else None
    if cache is not None:
        cache.verify(raster, encoder.model if encoder is not None else None)
        grid = cache.grid
    if grid is None:
        size = encoder.image_size if encoder is not None else 1024
        grid = TileGrid(raster.height, raster.width, size, size // 8)
    if decoder is None:
        decoder = SamDecoder(encoder.predictor)  # type: ignore[union-attr]
    max_window = max_window or 4 * grid.tile_size
    contexts: dict[Any, TileContext] = {}

    def context(window: Window, tile: Tile | None) -> TileContext:
        key = tile.index if tile is not None else window
        if key not in contexts:
            if len(contexts) > 8:  # windows are visited roughly in order: keep a few
                contexts.pop(next(iter(contexts)))
            contexts[key] = TileContext(raster, window, tile=tile, encoder=encoder, cache=cache)
        return contexts[key]

    def decode(group: list[Prompt], window: Window, tile: Tile | None) -> list[tuple[np.ndarray, float, float]]:
        check_cancel(cancel)
        ctx = context(window, tile)
        points, labels, boxes = _sam_inputs(group, window)
        multi = (points is not None and points.shape[1] == 1 and boxes is None) if multimask == "auto" else bool(multimask)
        masks, ious, stabs = decoder(ctx, points, labels, boxes, multi)
        valid = ctx.valid
        return [(np.asarray(masks[i], bool) & valid, float(ious[i]), float(stabs[i])) for i in range(len(group))]

    # Each prompt on its most central tile, grouped to batch the decoder; then each result
    # is refined, cropped and handed on at once (full-window masks never pile up).
    groups: dict[tuple[Any, ...], list[int]] = {}
    placement: list[tuple[Window, Tile | None]] = []
    for i, p in enumerate(pixel_prompts):
        tile, margin = grid.best_tile(p.bbox)
        if margin >= 0:
            placement.append((tile.window, tile))
        else:  # larger than any tile's interior: a window around it from the start
            placement.append((_centred_window(p.bbox, grid, max_window), None))
        window, tile = placement[-1]
        key = (tile.index if tile is not None else window, len(p.points), p.box is not None)
        groups.setdefault(key, []).append(i)

    found: dict[int, SceneObject] = {}
    done = 0
    for _key, members in sorted(groups.items(), key=lambda kv: kv[1][0]):
        first_window, tile = placement[members[0]]
        decoded = decode([pixel_prompts[i] for i in members], first_window, tile)
        for i, (mask, iou, stab) in zip(members, decoded):
            p, window, n = pixel_prompts[i], first_window, 1
            # Refinement: follow the object across seams with windows centred on it.
            for _ in range(max_refine if refine else 0):
                if not _touches_seam(mask, window, grid):
                    break
                box = _union_box(p.bbox, _mask_box(mask, window))
                # The object goes on past the seam by an unknown amount: at least double the
                # view, so a few steps reach any object up to max_window.
                new = _centred_window(box, grid, max_window, at_least=2 * max(window.shape))
                if new == window:
                    break
                (mask, iou, stab), = decode([p], new, None)
                window, n = new, n + 1
            if refine and _touches_seam(mask, window, grid):
                warnings.warn(f"prompt {p.id}: the object reaches the edge of a {window.height} x {window.width} "
                              "window; it may be larger (raise max_window)", stacklevel=2)
            cropped = _crop(mask, window.row0, window.col0)
            if cropped is None:
                warnings.warn(f"prompt {p.id}: the model found no object there", stacklevel=2)
            else:
                obj = SceneObject(cropped[0], cropped[1], cropped[2], iou, stab, p.id, n)
                if sink is not None:
                    sink(obj)
                else:
                    found[i] = obj
            done += 1
            if progress is not None:
                progress(done, len(pixel_prompts))
        decoded = []
    if sink is not None:
        return done
    return [found[i] for i in sorted(found)]


# ------------------------------------------------------------------------------ automatic mode


def _rle_to_mask(seg: dict[str, Any]) -> np.ndarray:
    h, w = (int(v) for v in seg["size"])
    counts = np.asarray(seg["counts"], dtype=np.int64)
    flat = np.repeat(np.arange(len(counts)) % 2 == 1, counts)
    return flat.reshape(w, h).T


class AmgGenerator:
    """The default per-tile generator: :class:`segany.AutomaticMaskGenerator` on each
    tile's (cached) embedding, with nodata excluded. Keyword arguments go to it."""

    def __init__(self, model: Any, **amg_options: Any) -> None:
        from .amg import AutomaticMaskGenerator

        encoder = as_encoder(model)
        amg_options.setdefault("output_mode", "uncompressed_rle")  # no full-tile arrays per mask
        self.amg = AutomaticMaskGenerator(encoder.predictor, **amg_options)

    def __call__(self, ctx: TileContext) -> list[dict[str, Any]]:
        return self.amg.generate_from_embedding(ctx.embedding, valid_mask=ctx.valid)


@dataclass
class _Part:
    tile: int
    window: Window  # of the tile
    mask: np.ndarray  # cropped
    row0: int
    col0: int
    iou: float
    stability: float

    @property
    def box(self) -> Window:
        return Window(self.row0, self.col0, *self.mask.shape)


def _same_object(a: _Part, b: _Part, merge_iou: float) -> bool:
    """The seam rule: IoU of two masks on the pixels both of their tiles see."""
    shared = a.window.intersection(b.window)
    if shared is None:
        return False
    region = a.box.intersection(b.box)
    if region is None:
        return False
    # Union is measured on the shared pixels too, over both masks' extent there.
    hull = Window(min(a.row0, b.row0), min(a.col0, b.col0), 0, 0)
    hull = Window(hull.row0, hull.col0, max(a.box.row1, b.box.row1) - hull.row0, max(a.box.col1, b.box.col1) - hull.col0)
    area = shared.intersection(hull)
    if area is None:
        return False

    def paste(p: _Part) -> np.ndarray:
        out = np.zeros(area.shape, bool)
        inter = p.box.intersection(area)
        if inter is not None:
            out[inter.row0 - area.row0 : inter.row1 - area.row0, inter.col0 - area.col0 : inter.col1 - area.col0] = \
                p.mask[inter.row0 - p.row0 : inter.row1 - p.row0, inter.col0 - p.col0 : inter.col1 - p.col0]
        return out

    ma, mb = paste(a), paste(b)
    if _iou_at_least(ma, mb, merge_iou):
        return True
    if not (ma & mb).any():
        return False
    # A mask may cross the overlap in several pieces (the arms of a U whose bend only one
    # tile sees): then compare only the pieces that meet. Pieces of one mask belong to one
    # object, so a piece matching a piece of the other mask is the same object.
    return _iou_at_least(_pieces_meeting(ma, mb), _pieces_meeting(mb, ma), merge_iou)


def _iou_at_least(a: np.ndarray, b: np.ndarray, threshold: float) -> bool:
    union = np.count_nonzero(a | b)
    return union > 0 and np.count_nonzero(a & b) / union >= threshold


def _pieces_meeting(mask: np.ndarray, other: np.ndarray) -> np.ndarray:
    """The connected pieces of ``mask`` that share a pixel with ``other``."""
    from scipy import ndimage

    pieces, n = ndimage.label(mask)
    if n <= 1:
        return mask
    hit = np.unique(pieces[mask & other])
    return np.isin(pieces, hit[hit > 0])


class _Group:
    def __init__(self, part: _Part) -> None:
        self.parts = [part]
        self.box = part.box

    def absorb(self, other: "_Group") -> None:
        self.parts += other.parts
        b, o = self.box, other.box
        r0, c0 = min(b.row0, o.row0), min(b.col0, o.col0)
        self.box = Window(r0, c0, max(b.row1, o.row1) - r0, max(b.col1, o.col1) - c0)

    def to_object(self) -> SceneObject:
        box = self.box
        mask = np.zeros(box.shape, bool)
        for p in self.parts:
            mask[p.row0 - box.row0 : p.row0 - box.row0 + p.mask.shape[0],
                 p.col0 - box.col0 : p.col0 - box.col0 + p.mask.shape[1]] |= p.mask
        largest = max(self.parts, key=lambda p: p.mask.sum())
        return SceneObject(mask, box.row0, box.col0, largest.iou, largest.stability, None,
                           len({p.tile for p in self.parts}))


def segment_everything(
    raster: "Raster | str | os.PathLike[str]",
    model: Any = None,
    *,
    cache: "EmbeddingCache | None" = None,
    generator: Generator | None = None,
    grid: TileGrid | None = None,
    merge_iou: float = 0.5,
    min_area: int = 0,
    sink: Callable[[SceneObject], None] | None = None,
    progress: ProgressFn | None = None,
    cancel: CancelFn = None,
    **amg_options: Any,
) -> list[SceneObject] | int:
    """Every object of a raster, tile by tile, merged across seams (see the module docs).

    Args:
        raster: a :class:`~segany.raster.Raster` or a path.
        model: the model (needed unless a ``generator`` without embeddings is given).
        cache: an embedding cache of this raster and model (else tiles are encoded here).
        generator: ``generator(ctx) -> records`` replacing the default :class:`AmgGenerator`.
        grid: tile grid (default: the cache's, or model-size tiles with 1/8 overlap).
        merge_iou: the seam rule's IoU threshold.
        min_area: drop objects smaller than this many pixels.
        sink: called with each final object, as soon as it is final (streaming); without
            it, the objects are returned as a list.
        progress: ``progress(tiles_done, n_tiles)``; cancel: see :mod:`segany.tiling`.
        amg_options: options of :class:`segany.AutomaticMaskGenerator` (``points_per_side``,
            ``pred_iou_thresh``, ...) for the default generator.

    Returns:
        The objects (no ``sink``) or how many were sent to ``sink``.
    """
    from .cache import EMPTY

    if not isinstance(raster, Raster):
        raster = open_raster(raster)
    if not 0 < merge_iou <= 1:
        raise SegAnyError(f"merge_iou must be in (0, 1], got {merge_iou}")
    encoder = as_encoder(model) if (model is not None or generator is None) else None
    if cache is not None:
        cache.verify(raster, encoder.model if encoder is not None else None)
        grid = cache.grid
    if grid is None:
        size = encoder.image_size if encoder is not None else 1024
        grid = TileGrid(raster.height, raster.width, size, size // 8)
    if grid.overlap == 0 and len(grid) > 1:
        warnings.warn("the tile grid has no overlap: objects cut by seams cannot be merged", stacklevel=2)
    if generator is None:
        generator = AmgGenerator(encoder, **amg_options)
    collected: list[SceneObject] = []
    emit = sink if sink is not None else collected.append
    pending: list[_Group] = []
    count = 0

    def last_tile_touching(box: Window) -> int:
        # Tiles touching a box form a block of the grid; its last tile in row-major order.
        rows = [r for r, s in enumerate(grid.row_starts) if s < box.row1 and s + grid.tile_size > box.row0]
        cols = [c for c, s in enumerate(grid.col_starts) if s < box.col1 and s + grid.tile_size > box.col0]
        return rows[-1] * grid.n_cols + cols[-1]

    for tile in grid:
        check_cancel(cancel)
        ctx = TileContext(raster, tile.window, tile=tile, encoder=encoder, cache=cache)
        skip = cache is not None and cache.status(tile.index) == EMPTY
        if not skip and not ctx.valid.any():
            skip = True
        parts: list[_Part] = []
        if not skip:
            for record in generator(ctx):
                seg = record["segmentation"]
                mask = _rle_to_mask(seg) if isinstance(seg, dict) else np.asarray(seg, bool)
                mask = mask & ctx.valid
                cropped = _crop(mask, tile.window.row0, tile.window.col0)
                if cropped is None:
                    continue
                parts.append(_Part(tile.index, tile.window, cropped[0], cropped[1], cropped[2],
                                   float(record.get("predicted_iou", float("nan"))),
                                   float(record.get("stability_score", float("nan")))))
        for part in parts:
            group = _Group(part)
            keep = []
            for g in pending:
                if any(q.tile != part.tile and _same_object(part, q, merge_iou) for q in g.parts):
                    group.absorb(g)
                else:
                    keep.append(g)
            pending = keep + [group]
        # Objects no later tile can touch are final: write them now.
        still = []
        for g in pending:
            if last_tile_touching(g.box) <= tile.index:
                obj = g.to_object()
                if obj.area >= max(1, min_area):
                    count += 1
                    emit(obj)
            else:
                still.append(g)
        pending = still
        if progress is not None:
            progress(tile.index + 1, len(grid))
    for g in pending:  # only reachable with an inconsistent grid; flush anyway
        obj = g.to_object()
        if obj.area >= max(1, min_area):
            count += 1
            emit(obj)
    return count if sink is not None else collected


# ------------------------------------------------------------------------------ features


def object_geometry(obj: SceneObject, raster: Raster, *, to_crs: Any = None, simplify: float | None = None) -> Any:
    """The object's outline as a shapely (Multi)Polygon in the raster's map coordinates, or
    reprojected to ``to_crs`` (``simplify`` is a tolerance in the raster's units, applied
    before reprojecting, so it means the same whatever the output CRS).

    Example:
        >>> from segany.raster import open_raster, write_test_raster, tmp_dir
        >>> r = open_raster(write_test_raster(tmp_dir() / "og.tif", np.ones((1, 50, 50), "uint8")))
        >>> obj = SceneObject(np.ones((10, 20), bool), row0=5, col0=10)
        >>> object_geometry(obj, r).bounds      # 1 m pixels from (500000, 5000000)
        (500010.0, 4999985.0, 500030.0, 4999995.0)
        >>> [round(v, 4) for v in object_geometry(obj, r, to_crs="EPSG:4326").bounds]
        [15.0001, 45.1533, 15.0004, 45.1534]
    """
    from .vectorize import mask_to_geometry

    geom = mask_to_geometry(obj.mask, raster.window_transform(obj.window), simplify)
    if geom is None or to_crs is None or raster.crs is None:
        return geom
    from .geo import _as_crs

    src, dst = _as_crs(raster.crs, f"raster {raster.path}"), _as_crs(to_crs, "output")
    if src == dst:
        return geom
    import shapely
    from pyproj import Transformer

    transformer = Transformer.from_crs(src, dst, always_xy=True)
    # Pixel outlines have long straight edges (a box prompt's object is often a rectangle):
    # densify them so they follow the projection's curvature like the pixels do.
    a, b = raster.transform.a, raster.transform.e
    dense = shapely.segmentize(geom, max(abs(a), abs(b)) * 4)
    return shapely.transform(dense, lambda xy: np.column_stack(transformer.transform(xy[:, 0], xy[:, 1])))


def object_record(obj: SceneObject, raster: Raster, *, to_crs: Any = None, simplify: float | None = None,
                  model_name: str | None = None) -> dict[str, Any]:
    """One output feature: ``geometry`` (see :func:`object_geometry`) plus the attributes of
    :data:`segany.vectorize.FIELDS` (``area`` in m² measured in the raster's CRS). Every
    front-end builds its features with this, so files, QGIS layers and napari agree.

    Example:
        >>> from segany.raster import open_raster, write_test_raster, tmp_dir
        >>> r = open_raster(write_test_raster(tmp_dir() / "rec.tif", np.ones((1, 50, 50), "uint8")))
        >>> rec = object_record(SceneObject(np.ones((10, 20), bool), 5, 10, 0.9, 0.95, "p1"), r, model_name="m")
        >>> {k: rec[k] for k in ("prompt_id", "area", "area_unit", "n_tiles", "model", "source")}
        {'prompt_id': 'p1', 'area': 200.0, 'area_unit': 'm2', 'n_tiles': 1, 'model': 'm', 'source': 'rec.tif'}
    """
    from .vectorize import area_in_units

    geom = object_geometry(obj, raster, simplify=simplify)
    area, unit = area_in_units(geom, raster.crs)
    if to_crs is not None and geom is not None:
        geom = object_geometry(obj, raster, to_crs=to_crs, simplify=simplify)
    return {
        "geometry": geom, "id": obj.id, "prompt_id": obj.prompt_id, "predicted_iou": obj.predicted_iou,
        "stability_score": obj.stability_score, "area": area, "area_unit": unit, "n_tiles": obj.n_tiles,
        "model": model_name, "source": _source_name(raster),
    }


def _source_name(raster: Raster) -> str:
    # A subset (an extent of a scene) reads through a temporary VRT: name the real file.
    parent = getattr(raster, "parent", None)
    return parent.path.name if parent is not None else raster.path.name


def model_name(model: Any) -> str | None:
    """What the ``model`` field says: the model type, and the checkpoint file when known.

    Example:
        >>> import segany
        >>> model_name(segany.build_sam("test_tiny"))
        'test_tiny'
    """
    if model is None:
        return None
    sam = getattr(model, "model", model)  # a TileEncoder or a SamPredictor holds the model
    sam = getattr(sam, "model", sam)
    ckpt = getattr(sam, "checkpoint_path", None)
    kind = getattr(sam, "model_type", None)
    return f"{kind}:{Path(ckpt).name}" if ckpt else kind


# ------------------------------------------------------------------------------ files


class SceneWriter:
    """A ``sink`` writing objects to a vector file and/or a mask GeoTIFF as they come.

    Args:
        raster: the raster the objects belong to.
        out: vector output (``.gpkg``, ``.parquet``, ``.geojson``, ``.fgb``) or a ``.tif``
            mask raster, or None.
        masks: an extra ``.tif`` mask raster, or None.
        to_crs: reproject polygons to this CRS (default: the raster's).
        simplify: polygon simplification tolerance in the raster's map units.
        model_name: written to the ``model`` field.
    """

    def __init__(self, raster: Raster, out: "str | os.PathLike[str] | None", masks: "str | os.PathLike[str] | None" = None,
                 *, to_crs: Any = None, simplify: float | None = None, model_name: str | None = None) -> None:
        from .vectorize import MaskRasterWriter, VectorWriter, output_kind

        self.raster, self.simplify, self.model_name = raster, simplify, model_name
        self.vector = self.mask_raster = None
        targets = [p for p in (out, masks) if p is not None]
        if not targets:
            raise SegAnyError("give an output: a vector file and/or a .tif mask raster")
        for path in targets:
            if output_kind(path) == "raster":
                if self.mask_raster is not None:
                    raise SegAnyError("only one mask raster output at a time")
                self.mask_raster = MaskRasterWriter(path, raster)
            else:
                if self.vector is not None:
                    raise SegAnyError("only one vector output at a time")
                self.vector = VectorWriter(path, raster.crs, to_crs=to_crs)
        self.count = 0

    def __call__(self, obj: SceneObject) -> None:
        self.count += 1
        if not obj.id:
            obj.id = self.count
        if self.mask_raster is not None:
            self.mask_raster.add(obj.id, obj.row0, obj.col0, obj.mask)
        if self.vector is not None:
            self.vector.add(object_record(obj, self.raster, simplify=self.simplify, model_name=self.model_name))

    def close(self) -> None:
        for w in (self.vector, self.mask_raster):
            if w is not None:
                w.close()

    def abort(self) -> None:
        for w in (self.vector, self.mask_raster):
            if w is not None:
                w.abort()

    def __enter__(self) -> "SceneWriter":
        return self

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abort()


def _model_name(encoder: TileEncoder | None) -> str | None:
    if encoder is None:
        return None
    ckpt = getattr(encoder.model, "checkpoint_path", None)
    return f"{encoder.model_type}:{Path(ckpt).name}" if ckpt else encoder.model_type


def segment_file(
    raster: "str | os.PathLike[str] | Raster",
    prompts: "Sequence[Prompt] | str | os.PathLike[str]",
    out: "str | os.PathLike[str] | None",
    model: Any = None,
    *,
    masks: "str | os.PathLike[str] | None" = None,
    cache: "EmbeddingCache | str | os.PathLike[str] | None" = None,
    to_crs: Any = None,
    simplify: float | None = None,
    **options: Any,
) -> int:
    """:func:`segment` from files to files; returns the number of objects written.

    ``prompts`` may be a vector file (see :func:`segany.geo.read_prompts`); ``cache`` a
    cache folder made by ``segany embed`` for this raster and model.
    """
    from .cache import EmbeddingCache

    if not isinstance(raster, Raster):
        raster = open_raster(raster)
    if isinstance(prompts, (str, os.PathLike)):
        prompts = read_prompts(prompts)
    encoder = as_encoder(model) if model is not None or options.get("decoder") is None else None
    if cache is not None and not isinstance(cache, EmbeddingCache):
        cache = EmbeddingCache.open(cache)
    with SceneWriter(raster, out, masks, to_crs=to_crs, simplify=simplify, model_name=_model_name(encoder)) as writer:
        segment(raster, prompts, encoder, cache=cache, sink=writer, **options)
    return writer.count


def auto_file(
    raster: "str | os.PathLike[str] | Raster",
    out: "str | os.PathLike[str] | None",
    model: Any = None,
    *,
    masks: "str | os.PathLike[str] | None" = None,
    cache: "EmbeddingCache | str | os.PathLike[str] | None" = None,
    to_crs: Any = None,
    simplify: float | None = None,
    progress: ProgressFn | None = None,
    cancel: CancelFn = None,
    **options: Any,
) -> int:
    """:func:`segment_everything` streamed to files; returns the number of objects.

    With ``cache`` (a path), the raster is first encoded into it (resuming a partial
    cache) through the Dask pipeline of :func:`segany.tiling.encode_raster`.
    """
    from .cache import EmbeddingCache
    from .tiling import encode_raster

    if not isinstance(raster, Raster):
        raster = open_raster(raster)
    encoder = as_encoder(model) if model is not None or options.get("generator") is None else None
    if cache is not None and not isinstance(cache, EmbeddingCache):
        tile_size = options.get("grid").tile_size if options.get("grid") is not None else None
        overlap = options.get("grid").overlap if options.get("grid") is not None else None
        cache = encode_raster(raster, encoder, cache, tile_size=tile_size, overlap=overlap, cancel=cancel)
        options.pop("grid", None)
    with SceneWriter(raster, out, masks, to_crs=to_crs, simplify=simplify, model_name=_model_name(encoder)) as writer:
        return int(segment_everything(raster, encoder, cache=cache, sink=writer, progress=progress,
                                      cancel=cancel, **options))


# ------------------------------------------------------------------------------ command line


def _prompts_from_args(args: Any) -> list[Prompt]:
    from .geo import PIXEL, parse_box, parse_point

    crs = args.crs
    if crs is not None and crs.lower() in ("pixel", "pixels"):
        crs = PIXEL
    if args.prompts:
        if args.points or args.box:
            raise SegAnyError("give either --prompts FILE or --points/--box, not both")
        return read_prompts(args.prompts, crs=crs)
    if not args.points and not args.box:
        raise SegAnyError("nothing to segment: give --points x,y[,label] ..., --box x0,y0,x1,y1 or --prompts FILE")
    points = [parse_point(t) for t in (args.points or [])]
    box = parse_box(args.box) if args.box else None
    if args.separate:
        if box is not None:
            raise SegAnyError("--separate makes one object per point; it cannot be combined with --box")
        return [Prompt.point(x, y, label, id=i, crs=crs) for i, (x, y, label) in enumerate(points)]
    xy = np.array([(x, y) for x, y, _l in points]).reshape(-1, 2)
    return [Prompt(xy, np.array([label for _x, _y, label in points], np.int64), box, 0, crs)]


def _cmd_segment(args: Any) -> int:
    from .tiling import encoder_from_args, grid_from_args, raster_from_args

    prompts = _prompts_from_args(args)
    raster = raster_from_args(args)
    encoder = encoder_from_args(args)
    from .cache import EmbeddingCache

    cache = EmbeddingCache.open(args.cache) if args.cache else None
    grid = None if cache is not None else grid_from_args(args, raster, encoder)
    count = segment_file(raster, prompts, args.output, encoder, masks=args.masks, cache=cache, grid=grid,
                         to_crs=args.to_crs, simplify=args.simplify)
    print(f"{args.output or args.masks}: {count} object(s) from {len(prompts)} prompt(s)")
    return 0


def _cmd_auto(args: Any) -> int:
    from .tiling import encoder_from_args, grid_from_args, raster_from_args, tqdm_progress

    raster = raster_from_args(args)
    encoder = encoder_from_args(args)
    grid = grid_from_args(args, raster, encoder)
    progress, close = tqdm_progress(f"auto {raster.path.name}", disable=args.quiet)
    try:
        count = auto_file(raster, args.output, encoder, masks=args.masks, cache=args.cache, grid=grid,
                          to_crs=args.to_crs, simplify=args.simplify, progress=progress,
                          merge_iou=args.merge_iou, min_area=args.min_area,
                          points_per_side=args.points_per_side, pred_iou_thresh=args.pred_iou_thresh,
                          stability_score_thresh=args.stability_score_thresh)
    finally:
        close()
    print(f"{args.output or args.masks}: {count} object(s)")
    return 0


def add_output_arguments(parser: Any) -> None:
    """``-o``, ``--masks``, ``--to-crs``, ``--simplify`` (shared with ``segany batch``)."""
    parser.add_argument("--to-crs", default=None, help="CRS of the output polygons (default: the raster's)")
    parser.add_argument("--simplify", type=float, default=None,
                        help="simplify polygons with this tolerance in map units (topology kept)")


def add_amg_arguments(parser: Any) -> None:
    parser.add_argument("--points-per-side", type=int, default=32, help="prompt grid per tile (default 32)")
    parser.add_argument("--pred-iou-thresh", type=float, default=0.88, help="keep masks above this predicted IoU")
    parser.add_argument("--stability-score-thresh", type=float, default=0.95, help="keep masks this stable")
    parser.add_argument("--merge-iou", type=float, default=0.5, help="seam rule: IoU on shared pixels (default 0.5)")
    parser.add_argument("--min-area", type=int, default=0, help="drop objects smaller than this (pixels)")


def register_scene_commands(subparsers: Any) -> None:
    """Add ``segany segment`` and ``segany auto``."""
    from .tiling import add_model_arguments, add_raster_arguments

    seg = subparsers.add_parser(
        "segment", help="segment objects at points/boxes (any CRS) in a large raster",
        description="Segment objects given by points and boxes in map coordinates (reprojected from "
                    "--crs) anywhere in a large raster; objects crossing tiles come out whole. "
                    "Output format by extension: .gpkg .parquet .geojson .fgb, or .tif for masks.")
    seg.add_argument("raster", help="any GDAL raster")
    seg.add_argument("--points", nargs="+", metavar="X,Y[,LABEL]",
                     help="points of ONE object (label 1 object, 0 background); see --separate")
    seg.add_argument("--box", metavar="X0,Y0,X1,Y1", help="a box around the object")
    seg.add_argument("--separate", action="store_true", help="one object per point instead")
    seg.add_argument("--prompts", metavar="FILE", help="vector file of prompts: points (column 'label'), polygons = boxes")
    seg.add_argument("--crs", default=None, help="CRS of --points/--box (default: the raster's; 'pixel' for pixels)")
    seg.add_argument("-o", "--output", required=True, help="output file (.gpkg, .parquet, .geojson, .fgb or .tif)")
    seg.add_argument("--masks", default=None, help="also write a label GeoTIFF here")
    seg.add_argument("--cache", default=None, help="embedding cache from `segany embed`")
    add_output_arguments(seg)
    add_model_arguments(seg)
    add_raster_arguments(seg)
    seg.set_defaults(func=_cmd_segment)

    auto = subparsers.add_parser(
        "auto", help="segment everything in a large raster, tile by tile, merged across seams",
        description="Automatic mask generation over a whole raster: per tile, then merged across tile "
                    "seams (one polygon per object), streamed to disk.")
    auto.add_argument("raster", help="any GDAL raster")
    auto.add_argument("-o", "--output", required=True, help="output file (.gpkg, .parquet, .geojson, .fgb or .tif)")
    auto.add_argument("--masks", default=None, help="also write a label GeoTIFF here")
    auto.add_argument("--cache", default=None, help="embedding cache folder (made or resumed first)")
    add_output_arguments(auto)
    add_amg_arguments(auto)
    add_model_arguments(auto)
    add_raster_arguments(auto)
    auto.set_defaults(func=_cmd_auto)
