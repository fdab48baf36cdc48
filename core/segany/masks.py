"""Mask utilities: COCO run-length encoding, boxes, NMS, stability, clean-up, grids, crops,
label images and polygons.

Used by :mod:`segany.amg`, and useful on their own. Conventions (the reference's and COCO's):

* masks are ``H x W`` bool arrays; points are ``(x, y)``; image sizes are ``(H, W)``;
* boxes are ``XYXY`` with *inclusive* ``x1, y1`` (the last pixel of the mask), as in the
  reference automatic mask generator; ``XYWH`` boxes derived from them have ``w = x1 - x0``.
  :func:`rle_to_bbox` instead follows pycocotools (``w = x1 - x0 + 1``);
* an uncompressed RLE is ``{"size": [H, W], "counts": [n0, n1, ...]}``: alternating runs of
  False and True pixels in column-major (Fortran) order, starting with a (possibly empty)
  False run. A COCO RLE has the same ``size`` and ``counts`` compressed into a string
  (pycocotools' ``rleToString`` format), so ``pycocotools.mask.decode`` reads it.

Nothing here needs OpenCV, torchvision or pycocotools.
"""

from __future__ import annotations

import math
from itertools import product
from typing import Any, Iterable, Sequence

import numpy as np
import torch
from scipy import ndimage

RLE = dict  # {"size": [H, W], "counts": list[int] | str}

# ---------------------------------------------------------------------------- grids, crops


def build_point_grid(n_per_side: int) -> np.ndarray:
    """Cell-centred ``n^2 x 2`` grid of ``(x, y)`` points in ``[0, 1]^2``, row by row.

    Example:
        >>> build_point_grid(2).tolist()
        [[0.25, 0.25], [0.75, 0.25], [0.25, 0.75], [0.75, 0.75]]
    """
    offset = 1.0 / (2 * n_per_side)
    side = np.linspace(offset, 1 - offset, n_per_side)
    xs = np.tile(side[None, :], (n_per_side, 1))
    ys = np.tile(side[:, None], (1, n_per_side))
    return np.stack([xs, ys], axis=-1).reshape(-1, 2)


def build_all_layer_point_grids(n_per_side: int, n_layers: int, scale_per_layer: int) -> list[np.ndarray]:
    """One grid per crop layer ``0..n_layers``, ``n_per_side / scale_per_layer**i`` points a side.

    Example:
        >>> [len(g) for g in build_all_layer_point_grids(8, 2, 2)]
        [64, 16, 4]
    """
    return [build_point_grid(int(n_per_side / (scale_per_layer**i))) for i in range(n_layers + 1)]


def generate_crop_boxes(
    im_size: tuple[int, int], n_layers: int, overlap_ratio: float
) -> tuple[list[list[int]], list[int]]:
    """Crop boxes ``[x0, y0, x1, y1]`` (exclusive ends) and their layer: the whole image, then
    ``(2^i)^2`` overlapping crops for layer ``i = 1..n_layers``.

    Example:
        >>> boxes, layers = generate_crop_boxes((100, 200), 1, 0.25)
        >>> boxes[0], boxes[1], layers
        ([0, 0, 200, 100], [0, 0, 113, 63], [0, 1, 1, 1, 1])
    """
    im_h, im_w = im_size
    short_side = min(im_h, im_w)
    boxes, layers = [[0, 0, im_w, im_h]], [0]

    def crop_len(orig_len: int, n_crops: int, overlap: int) -> int:
        return int(math.ceil((overlap * (n_crops - 1) + orig_len) / n_crops))

    for i_layer in range(n_layers):
        n_crops = 2 ** (i_layer + 1)
        overlap = int(overlap_ratio * short_side * (2 / n_crops))
        crop_w, crop_h = crop_len(im_w, n_crops, overlap), crop_len(im_h, n_crops, overlap)
        xs = [int((crop_w - overlap) * i) for i in range(n_crops)]
        ys = [int((crop_h - overlap) * i) for i in range(n_crops)]
        # x-major order, as the reference (the order decides NMS ties between crops).
        for x0, y0 in product(xs, ys):
            boxes.append([x0, y0, min(x0 + crop_w, im_w), min(y0 + crop_h, im_h)])
            layers.append(i_layer + 1)
    return boxes, layers


# ---------------------------------------------------------------------------- boxes, NMS


def box_xyxy_to_xywh(box: Sequence[int]) -> list[int]:
    """``[x0, y0, x1, y1] -> [x0, y0, x1 - x0, y1 - y0]`` (the reference's record ``bbox``).

    Example:
        >>> box_xyxy_to_xywh([2, 3, 10, 4])
        [2, 3, 8, 1]
    """
    x0, y0, x1, y1 = (int(v) for v in box)
    return [x0, y0, x1 - x0, y1 - y0]


def masks_to_boxes(masks: torch.Tensor) -> torch.Tensor:
    """``... x H x W`` bool masks -> ``... x 4`` inclusive XYXY int64 boxes; empty -> zeros.

    Example:
        >>> m = torch.zeros(2, 4, 5, dtype=torch.bool); m[0, 1:3, 2] = True
        >>> masks_to_boxes(m).tolist()
        [[2, 1, 2, 2], [0, 0, 0, 0]]
    """
    shape = masks.shape
    if masks.numel() == 0:
        return torch.zeros(*shape[:-2], 4, dtype=torch.int64, device=masks.device)
    h, w = shape[-2:]
    flat = masks.reshape(-1, h, w)
    rows, cols = flat.any(dim=-1), flat.any(dim=-2)  # N x H, N x W
    (x0, x1), (y0, y1) = _first_last(cols), _first_last(rows)
    out = torch.stack([x0, y0, x1, y1], dim=-1)
    empty = ~rows.any(dim=-1)
    out[empty] = 0
    return out.reshape(*shape[:-2], 4)


def _first_last(hits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Indices of the first and last True along the last axis (``N x L`` -> ``N``, ``N``)."""
    n = hits.shape[-1]
    idx = torch.arange(n, device=hits.device)
    first = torch.where(hits, idx, n).amin(dim=-1)
    last = torch.where(hits, idx, -1).amax(dim=-1)
    return first, last


def box_area(boxes: torch.Tensor) -> torch.Tensor:
    """``N x 4`` XYXY -> ``N`` areas ``(x1 - x0) * (y1 - y0)`` (the reference's box area)."""
    return (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])


def nms(boxes: torch.Tensor, scores: torch.Tensor, iou_threshold: float) -> torch.Tensor:
    """Greedy non-maximum suppression: indices of the kept boxes, best score first.

    A box is dropped when its IoU with an already kept box is ``> iou_threshold``. The IoU is
    computed in float64 and the order is ``torch.argsort(scores, descending=True)`` (the sort
    torchvision's NMS uses), so ties are broken as in the reference.

    Args:
        boxes: ``N x 4`` XYXY; scores: ``N``.

    Returns:
        ``K`` int64 indices into ``boxes``.

    Example:
        >>> b = torch.tensor([[0, 0, 10, 10], [1, 1, 10, 10], [20, 20, 30, 30]])
        >>> nms(b, torch.tensor([0.5, 0.9, 0.1]), 0.7).tolist()
        [1, 2]
    """
    if len(boxes) == 0:
        return torch.empty(0, dtype=torch.int64)
    order = torch.argsort(scores.cpu(), descending=True)
    b = boxes.detach().cpu().to(torch.float64)[order]
    areas = box_area(b)
    keep: list[int] = []
    remaining = torch.arange(len(b))
    while remaining.numel():
        i = int(remaining[0])
        keep.append(i)
        rest = remaining[1:]
        lt = torch.maximum(b[i, :2], b[rest, :2])
        rb = torch.minimum(b[i, 2:], b[rest, 2:])
        wh = (rb - lt).clamp(min=0)
        inter = wh[:, 0] * wh[:, 1]
        iou = inter / (areas[i] + areas[rest] - inter)
        # NaN (two empty boxes) is not "> threshold": such boxes survive, as in torchvision.
        remaining = rest[~(iou > iou_threshold)]
    return order[torch.tensor(keep, dtype=torch.int64)]


def is_box_near_crop_edge(
    boxes: torch.Tensor, crop_box: Sequence[int], orig_box: Sequence[int], atol: float = 20.0
) -> torch.Tensor:
    """``N`` bool: the (image-frame XYXY) box lies within ``atol`` of a crop edge that is not
    an image edge (such masks are probably cut by the crop).

    Example:
        >>> is_box_near_crop_edge(torch.tensor([[5, 5, 95, 40], [5, 5, 30, 30]]), [0, 0, 100, 50], [0, 0, 200, 50]).tolist()
        [True, False]
    """
    crop = torch.as_tensor(crop_box, dtype=torch.float32)
    orig = torch.as_tensor(orig_box, dtype=torch.float32)
    b = boxes.to(torch.float32)
    near_crop = torch.isclose(b, crop[None], atol=atol, rtol=0)
    near_image = torch.isclose(b, orig[None], atol=atol, rtol=0)
    return (near_crop & ~near_image).any(dim=1)


# ---------------------------------------------------------------------------- stability


def stability_score(logits: torch.Tensor, mask_threshold: float, offset: float) -> torch.Tensor:
    """IoU of the masks ``logits > t + offset`` and ``logits > t - offset`` (``... x H x W``).

    The high-threshold mask lies inside the low one, so the IoU is a ratio of two counts.

    Example:
        >>> stability_score(torch.tensor([[[-2.0, 0.5, 2.0, 3.0]]]), 0.0, 1.0)
        tensor([0.6667])
    """
    inter = (logits > (mask_threshold + offset)).sum(dim=(-1, -2), dtype=torch.int64)
    union = (logits > (mask_threshold - offset)).sum(dim=(-1, -2), dtype=torch.int64)
    # int32 counts divided in float32, as the reference does, so that ">= threshold" agrees.
    return inter.to(torch.int32) / union.to(torch.int32)


# ---------------------------------------------------------------------------- RLE


def _counts_from_window(window: np.ndarray, top: int, left: int, height: int, width: int) -> np.ndarray:
    """RLE counts of an ``H x W`` image that is False except for ``window`` at ``(top, left)``.

    Args:
        window: ``h x w`` bool, placed at rows ``top..top+h-1``, columns ``left..left+w-1``.

    Returns:
        int64 counts (column-major runs, starting with a False run).
    """
    return _counts_from_columns(window.T, top, left, height, width)


def _counts_from_columns(columns: np.ndarray, top: int, left: int, height: int, width: int) -> np.ndarray:
    """As :func:`_counts_from_window` for the transposed window ``w x h`` (one row per column)."""
    w, h = columns.shape
    total = height * width
    if h == 0 or w == 0:
        return np.array([total], dtype=np.int64)
    # One False row above and below each column: every column then starts and ends False,
    # so its transitions never depend on the neighbouring column.
    padded = np.zeros((w, h + 2), dtype=bool)
    padded[:, 1:-1] = columns
    flat = padded.reshape(-1)
    change = np.flatnonzero(flat[1:] != flat[:-1]) + 1  # index of the first pixel of a new run
    col, row = np.divmod(change, h + 2)
    pos = (left + col) * height + (top + row - 1)
    if pos.size > 2:
        # A run ending at the bottom of a column and one starting at the top of the next one
        # meet at the same flat index: they are one run in column-major order.
        dup = np.flatnonzero(pos[1:] == pos[:-1])
        if dup.size:
            pos = np.delete(pos, np.concatenate([dup, dup + 1]))
    if pos.size and pos[-1] == total:
        pos = pos[:-1]  # a run ending at the last pixel: no empty run after it
    return np.diff(np.concatenate([[0], pos, [total]])).astype(np.int64)


def _mask_from_counts(counts: np.ndarray, height: int, width: int) -> np.ndarray:
    """Decode counts to an ``H x W`` bool array (a transposed view of a column-major buffer)."""
    counts = np.asarray(counts, dtype=np.int64)
    if counts.sum() != height * width:
        raise ValueError(f"RLE counts sum to {int(counts.sum())}, but the size is {height} x {width}")
    values = (np.arange(len(counts)) % 2).astype(bool)
    return np.repeat(values, counts).reshape(width, height).T


def mask_to_rle(mask: np.ndarray | torch.Tensor) -> RLE:
    """Uncompressed COCO RLE of an ``H x W`` mask.

    Example:
        >>> mask_to_rle(np.array([[0, 1], [1, 1]], bool))
        {'size': [2, 2], 'counts': [1, 3]}
    """
    if isinstance(mask, torch.Tensor):
        mask = mask.detach().cpu().numpy()
    mask = np.asarray(mask, dtype=bool)
    if mask.ndim != 2:
        raise ValueError(f"mask_to_rle expects an H x W mask, got shape {mask.shape}")
    h, w = mask.shape
    return {"size": [h, w], "counts": _counts_from_window(mask, 0, 0, h, w).tolist()}


def _rle_counts(rle: RLE) -> np.ndarray:
    counts = rle["counts"]
    if isinstance(counts, (str, bytes)):
        return _decode_counts_string(counts)
    return np.asarray(counts, dtype=np.int64)


def rle_to_mask(rle: RLE) -> np.ndarray:
    """Decode an uncompressed or COCO (string) RLE to an ``H x W`` bool array.

    Example:
        >>> rle_to_mask({"size": [2, 2], "counts": [1, 3]}).astype(int).tolist()
        [[0, 1], [1, 1]]
    """
    h, w = (int(v) for v in rle["size"])
    return np.ascontiguousarray(_mask_from_counts(_rle_counts(rle), h, w))


def rle_area(rle: RLE) -> int:
    """Number of True pixels.

    Example:
        >>> rle_area({"size": [2, 2], "counts": [1, 3]})
        3
    """
    return int(_rle_counts(rle)[1::2].sum())


def rle_to_bbox(rle: RLE) -> list[int]:
    """COCO box ``[x, y, w, h]`` (``w = x1 - x0 + 1``), equal to ``pycocotools.mask.toBbox``.

    Example:
        >>> rle_to_bbox(mask_to_rle(np.array([[0, 0, 0], [0, 1, 1]], bool)))
        [1, 1, 2, 1]
    """
    h = int(rle["size"][0])
    counts = _rle_counts(rle)
    m = (len(counts) // 2) * 2
    if m == 0 or h == 0:
        return [0, 0, 0, 0]
    ends = np.cumsum(counts[:m])
    # Even entries end False runs (the next pixel starts a True run); odd ones end True runs.
    pix = ends - (np.arange(m) % 2)
    x, y = np.divmod(pix, h)
    ys, ye = int(y.min()), int(y.max())
    if np.any(x[1::2] > x[0::2]):  # a run crosses a column: it covers a whole column height
        ys, ye = 0, h - 1
    xs, xe = int(x.min()), int(x.max())
    return [xs, ys, xe - xs + 1, ye - ys + 1]


def _encode_counts_string(counts: np.ndarray) -> str:
    """pycocotools' ``rleToString``: deltas of every other count, 5-bit groups, ASCII 48+."""
    cnts = np.asarray(counts, dtype=np.int64)
    x = cnts.copy()
    if len(x) > 3:
        x[3:] -= cnts[1:-2]
    n_chunks = 13  # 64 bits / 5
    chars = np.zeros((len(x), n_chunks), dtype=np.uint8)
    length = np.zeros(len(x), dtype=np.int64)
    active = np.ones(len(x), dtype=bool)
    for k in range(n_chunks):
        c = x & 0x1F
        x = x >> 5  # arithmetic shift, as the C code's on a signed long
        more = np.where((c & 0x10) != 0, x != -1, x != 0)
        chars[:, k] = (c | (more.astype(np.int64) << 5)) + 48
        length += active
        active &= more
        if not active.any():
            break
    return chars[np.arange(n_chunks)[None, :] < length[:, None]].tobytes().decode("ascii")


def _decode_counts_string(s: str | bytes) -> np.ndarray:
    """Inverse of :func:`_encode_counts_string` (pycocotools' ``rleFrString``)."""
    raw = np.frombuffer(s.encode("ascii") if isinstance(s, str) else s, dtype=np.uint8)
    if raw.size == 0:
        return np.zeros(0, dtype=np.int64)
    c = raw.astype(np.int64) - 48
    last = (c & 0x20) == 0  # the final 5-bit group of a value
    value_id = np.concatenate([[0], np.cumsum(last)[:-1]])
    starts = np.flatnonzero(np.concatenate([[True], last[:-1]]))
    k = np.arange(len(c)) - starts[value_id]
    x = np.add.reduceat((c & 0x1F) << (5 * k), starts)
    n_groups = np.diff(np.concatenate([starts, [len(c)]]))
    negative = (c[last] & 0x10) != 0
    x[negative] |= np.left_shift(np.int64(-1), 5 * n_groups[negative])
    counts = x.copy()
    counts[1::2] = np.cumsum(x[1::2])
    if len(x) > 2:
        counts[2::2] = np.cumsum(x[2::2])
    return counts


def rle_to_coco(rle: RLE) -> dict[str, Any]:
    """Compress an uncompressed RLE to COCO's string form (``pycocotools.mask.frPyObjects``).

    Example:
        >>> rle_to_coco({"size": [2, 2], "counts": [1, 3]})
        {'size': [2, 2], 'counts': '13'}
    """
    return {"size": [int(v) for v in rle["size"]], "counts": _encode_counts_string(_rle_counts(rle))}


def coco_to_rle(rle: RLE) -> RLE:
    """Decompress a COCO (string) RLE to an uncompressed one.

    Example:
        >>> coco_to_rle({"size": [2, 2], "counts": "13"})
        {'size': [2, 2], 'counts': [1, 3]}
    """
    return {"size": [int(v) for v in rle["size"]], "counts": _rle_counts(rle).tolist()}


# ---------------------------------------------------------------------------- clean-up

_EIGHT = np.ones((3, 3), dtype=bool)


def remove_small_regions(mask: np.ndarray, area_thresh: float, mode: str) -> tuple[np.ndarray, bool]:
    """Fill holes (``mode="holes"``) or drop islands (``"islands"``) smaller than ``area_thresh``.

    Same rule as the reference (8-connected regions; background regions touching the image
    border count as holes when small; if every island is small the largest one is kept), with
    scipy instead of OpenCV, and working inside the mask's box when that gives the same answer.

    Returns:
        ``(mask, changed)``.

    Example:
        >>> m = np.zeros((6, 6), bool); m[1:4, 1:4] = True; m[2, 2] = False; m[5, 5] = True
        >>> filled, changed = remove_small_regions(m, 2, "holes")
        >>> bool(filled[2, 2]), changed
        (True, True)
        >>> cleaned, changed = remove_small_regions(filled, 2, "islands")
        >>> bool(cleaned[5, 5]), int(cleaned.sum()), changed
        (False, 9, True)
    """
    if mode not in ("holes", "islands"):
        raise ValueError(f"mode must be 'holes' or 'islands', got {mode!r}")
    mask = np.asarray(mask, dtype=bool)
    rows, cols = np.flatnonzero(mask.any(axis=1)), np.flatnonzero(mask.any(axis=0))
    if rows.size == 0:
        if mode == "islands":
            return mask, False
        return _remove_small_regions_full(mask, area_thresh, mode)
    y0, y1, x0, x1 = int(rows[0]), int(rows[-1]), int(cols[0]), int(cols[-1])
    if mode == "islands":
        # Islands are mask pixels: they all lie inside the box.
        window, changed = _remove_small_regions_full(mask[y0 : y1 + 1, x0 : x1 + 1], area_thresh, mode)
        if not changed:
            return mask, False
        out = np.zeros_like(mask)
        out[y0 : y1 + 1, x0 : x1 + 1] = window
        return out, True
    # Holes: the background outside the box is one or two large regions (pieces). If a piece
    # is small the reference may fill it: then do the full-image computation.
    h, w = mask.shape
    top, bottom, left, right = y0 > 0, y1 < h - 1, x0 > 0, x1 < w - 1
    if not (left or right):
        pieces = [y0 * w, (h - 1 - y1) * w]
    elif not (top or bottom):
        pieces = [x0 * h, (w - 1 - x1) * h]
    else:
        pieces = [h * w - (y1 - y0 + 1) * (x1 - x0 + 1)]
    if any(0 < p < area_thresh for p in pieces):
        return _remove_small_regions_full(mask, area_thresh, mode)
    # Pad the box with background on the sides that are not image borders: background
    # regions touching that pad are joined to a large outside piece and are never filled.
    pad = ((int(top), int(bottom)), (int(left), int(right)))
    window = np.pad(mask[y0 : y1 + 1, x0 : x1 + 1], pad)
    labels, _ = ndimage.label(~window, structure=_EIGHT)
    sizes = np.bincount(labels.ravel())
    outside = np.zeros(len(sizes), dtype=bool)
    for edge in (labels[0] if top else None, labels[-1] if bottom else None,
                 labels[:, 0] if left else None, labels[:, -1] if right else None):
        if edge is not None:
            outside[edge] = True
    small = (sizes < area_thresh) & ~outside
    small[0] = False
    if not small.any():
        return mask, False
    filled = window | small[labels]
    out = mask.copy()
    out[y0 : y1 + 1, x0 : x1 + 1] = filled[pad[0][0] : filled.shape[0] - pad[0][1], pad[1][0] : filled.shape[1] - pad[1][1]]
    return out, True


def _remove_small_regions_full(mask: np.ndarray, area_thresh: float, mode: str) -> tuple[np.ndarray, bool]:
    """The reference algorithm on the whole array."""
    holes = mode == "holes"
    labels, n = ndimage.label(mask ^ holes, structure=_EIGHT)
    sizes = np.bincount(labels.ravel(), minlength=n + 1)[1:]
    small = sizes < area_thresh
    if not small.any():
        return mask, False
    if holes:
        fill = np.concatenate([[True], small])  # label 0 = the mask itself
    else:
        fill = np.concatenate([[False], ~small])
        if not fill.any():
            fill[int(np.argmax(sizes)) + 1] = True  # every island is small: keep the largest
    return fill[labels], True


# ---------------------------------------------------------------------------- label image


def label_image(
    masks: Iterable[np.ndarray | RLE],
    shape: tuple[int, int],
    scores: Sequence[float] | None = None,
    dtype: type = np.int32,
) -> np.ndarray:
    """Paint masks into an instance label image: mask ``i`` gets label ``i + 1``, 0 is background.

    Where masks overlap the higher score wins; with equal scores (or no scores) the earlier
    mask wins.

    Args:
        masks: ``H x W`` bool arrays or RLEs (uncompressed or COCO).
        shape: ``(H, W)``.
        scores: one per mask (default: all equal).

    Example:
        >>> a = np.zeros((2, 3), bool); a[:, :2] = True
        >>> b = np.zeros((2, 3), bool); b[:, 1:] = True
        >>> label_image([a, b], (2, 3), scores=[0.5, 0.9]).tolist()
        [[1, 2, 2], [1, 2, 2]]
        >>> label_image([a, b], (2, 3)).tolist()
        [[1, 1, 2], [1, 1, 2]]
    """
    masks = list(masks)
    h, w = (int(v) for v in shape)
    out = np.zeros((h, w), dtype=dtype)
    if not masks:
        return out
    if scores is None:
        scores = np.zeros(len(masks))
    scores = np.asarray(scores, dtype=np.float64)
    if len(scores) != len(masks):
        raise ValueError(f"{len(masks)} masks but {len(scores)} scores")
    # Paint the lowest first so the best ends on top; on ties the earlier mask is painted last.
    order = np.lexsort((-np.arange(len(masks)), scores))
    for i in order:
        mask = masks[i]
        if isinstance(mask, dict):
            mh, mw = (int(v) for v in mask["size"])
            if (mh, mw) != (h, w):
                raise ValueError(f"mask {i} has size {(mh, mw)}, the label image {(h, w)}")
            mask = _mask_from_counts(_rle_counts(mask), h, w)
        else:
            mask = np.asarray(mask, dtype=bool)
            if mask.shape != (h, w):
                raise ValueError(f"mask {i} has shape {mask.shape}, the label image {(h, w)}")
        rows, cols = np.flatnonzero(mask.any(axis=1)), np.flatnonzero(mask.any(axis=0))
        if rows.size == 0:
            continue
        # Only the box is touched: cheap for the many small masks of a large image.
        ys, xs = slice(rows[0], rows[-1] + 1), slice(cols[0], cols[-1] + 1)
        out[ys, xs][mask[ys, xs]] = i + 1
    return out


# ---------------------------------------------------------------------------- polygons


def mask_to_polygons(mask: np.ndarray) -> list[list[np.ndarray]]:
    """Outlines of a mask as polygons along pixel edges.

    Foreground is 4-connected (pixels touching only at a corner are separate polygons), so
    every polygon is valid (OGC simple features). Pixel ``(row r, column c)`` is the square
    ``[c, c + 1] x [r, r + 1]``; multiply by the raster's affine transform for map coordinates.

    Returns:
        one entry per connected region (in raster order): ``[exterior, hole, hole, ...]``, each
        ring a closed ``K x 2`` float array of ``(x, y)`` corners (first point repeated at the
        end). The exterior has a positive shoelace area in ``(x, y)``, holes a negative one.

    Example:
        >>> m = np.zeros((4, 4), bool); m[:3, :3] = True; m[1, 1] = False
        >>> polys = mask_to_polygons(m)
        >>> len(polys), len(polys[0]), polys[0][0].tolist()
        (1, 2, [[0.0, 0.0], [3.0, 0.0], [3.0, 3.0], [0.0, 3.0], [0.0, 0.0]])
        >>> polys[0][1].tolist()
        [[1.0, 2.0], [2.0, 2.0], [2.0, 1.0], [1.0, 1.0], [1.0, 2.0]]
    """
    mask = np.asarray(mask, dtype=bool)
    if mask.ndim != 2:
        raise ValueError(f"mask_to_polygons expects an H x W mask, got shape {mask.shape}")
    rows, cols = np.flatnonzero(mask.any(axis=1)), np.flatnonzero(mask.any(axis=0))
    if rows.size == 0:
        return []
    # Trace inside the box only (cheap for small masks of a large image), then shift.
    top, left = int(rows[0]), int(cols[0])
    offset = np.array([left, top], dtype=np.float64)
    polygons = _trace_polygons(mask[top : rows[-1] + 1, left : cols[-1] + 1])
    return [[ring + offset for ring in polygon] for polygon in polygons]


def _trace_polygons(mask: np.ndarray) -> list[list[np.ndarray]]:
    """:func:`mask_to_polygons` of a non-empty mask, in its own pixel frame."""
    h, w = mask.shape
    p = np.pad(mask, 1)
    fg = p[1:-1, 1:-1]
    # Directed unit edges with the foreground on the same side (clockwise on screen):
    # top (x -> x+1 at y=r), right (y -> y+1 at x=c+1), bottom (x+1 -> x at y=r+1), left.
    kinds = (
        (fg & ~p[:-2, 1:-1], (0, 0), (1, 0)),
        (fg & ~p[1:-1, 2:], (1, 0), (1, 1)),
        (fg & ~p[2:, 1:-1], (1, 1), (0, 1)),
        (fg & ~p[1:-1, :-2], (0, 1), (0, 0)),
    )
    sx, sy, ex, ey, owner = [], [], [], [], []
    for edges, (dx0, dy0), (dx1, dy1) in kinds:
        r, c = np.nonzero(edges)
        sx.append(c + dx0), sy.append(r + dy0), ex.append(c + dx1), ey.append(r + dy1)
        owner.append(r * w + c)
    sx, sy, ex, ey, owner = (np.concatenate(a) for a in (sx, sy, ex, ey, owner))
    stride = w + 1
    start, end = sy * stride + sx, ey * stride + ex
    order = np.argsort(start, kind="stable")
    s_sorted = start[order]
    lo = np.searchsorted(s_sorted, end, side="left")
    hi = np.searchsorted(s_sorted, end, side="right")
    nxt = order[lo]
    # Saddle corners (two diagonal foreground pixels) have two outgoing edges: stay on the
    # pixel we came from, which keeps diagonal neighbours apart (4-connectivity).
    two = np.flatnonzero(hi - lo == 2)
    if two.size:
        alt = order[lo[two] + 1]
        nxt[two] = np.where(owner[order[lo[two]]] == owner[two], order[lo[two]], alt)
    labels, _ = ndimage.label(mask)  # 4-connected components
    comp = labels.reshape(-1)[owner]
    seen = np.zeros(len(start), dtype=bool)
    rings: dict[int, list[np.ndarray]] = {}
    for e0 in range(len(start)):
        if seen[e0]:
            continue
        # Follow the boundary; a corner visited twice (a pinch between diagonal pixels of
        # the same region) splits the cycle into simple rings, as OGC validity requires.
        path: list[int] = []
        where: dict[int, int] = {}
        e = e0
        while not seen[e]:
            seen[e] = True
            v = int(start[e])
            if v in where:
                i = where[v]
                rings.setdefault(int(comp[e0]), []).append(_ring(path[i:], stride))
                for u in path[i + 1 :]:
                    del where[u]
                del path[i + 1 :]
            else:
                where[v] = len(path)
                path.append(v)
            e = nxt[e]
        rings.setdefault(int(comp[e0]), []).append(_ring(path, stride))
    polygons = []
    for label in sorted(rings):
        ring_list = rings[label]
        areas = [_signed_area(r) for r in ring_list]
        ext = int(np.argmax(areas))
        polygons.append([ring_list[ext]] + [r for i, r in enumerate(ring_list) if i != ext])
    return polygons


def _ring(vertices: list[int], stride: int) -> np.ndarray:
    """Closed ``K x 2`` ring of corner ids ``y * stride + x``, keeping only true corners."""
    y, x = np.divmod(np.asarray(vertices, dtype=np.int64), stride)
    pts = np.stack([x, y], axis=1).astype(np.float64)
    d_in = pts - np.roll(pts, 1, axis=0)
    d_out = np.roll(pts, -1, axis=0) - pts
    pts = pts[np.any(d_in != d_out, axis=1)]
    return np.vstack([pts, pts[:1]])


def _signed_area(ring: np.ndarray) -> float:
    x, y = ring[:, 0], ring[:, 1]
    return 0.5 * float(np.dot(x[:-1], y[1:]) - np.dot(x[1:], y[:-1]))
