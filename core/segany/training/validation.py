"""Validation during training: single-point and N-click mIoU on held-out images.

:func:`validate` is the one entry point the trainer calls. It uses
:mod:`segany.evaluation` (the protocols of ``segany eval``) when that module is present,
so that training curves and ``segany eval`` report the same numbers, and otherwise the
small built-in implementation below (:func:`evaluate_points`, also used by tests as a
cross-check), which follows the same protocols:

* ``point``: one positive click at the object's centre (the pixel farthest from its
  boundary), multimask output, the candidate with the highest predicted IoU is kept;
* ``clicks``: then ``clicks - 1`` more clicks, each at the centre of the largest error
  region (positive in a false negative, negative in a false positive), with the previous
  low-resolution logits as mask prompt and single-mask output (RITM's protocol as used in
  the SAM paper); the mIoU after the last click is reported.

IoU is measured at the original image resolution, per object, and averaged over objects.

Example:
    >>> import segany
    >>> from segany.training.data import SyntheticScenes
    >>> m = evaluate_points(segany.build_sam("test_tiny"), SyntheticScenes(1, 64), clicks=2,
    ...                     protocols=("point", "clicks"))
    >>> sorted(m), 0.0 <= m["point_miou"] <= 1.0
    (['clicks_miou', 'objects', 'point_miou'], True)
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
from scipy import ndimage

from ..modeling import Sam
from ..predictor import SamPredictor
from .data import LabelledImages

__all__ = ["validate", "evaluate_points", "centre_click", "error_click"]


def centre_click(region: np.ndarray) -> tuple[int, int]:
    """``(x, y)`` of the pixel of ``region`` farthest from its boundary (image edges count).

    Example:
        >>> r = np.zeros((7, 9), bool); r[1:6, 2:7] = True
        >>> centre_click(r)
        (4, 3)
    """
    ys, xs = np.nonzero(region)
    if len(ys) == 0:
        raise ValueError("empty region")
    y0, y1, x0, x1 = ys.min(), ys.max() + 1, xs.min(), xs.max() + 1
    # Crop to the region (fast on big images) and pad with background so the image edge
    # counts as a boundary, as in RITM's click protocol.
    crop = np.pad(region[y0:y1, x0:x1], 1)
    dist = ndimage.distance_transform_edt(crop)
    y, x = np.unravel_index(int(np.argmax(dist)), dist.shape)
    return int(x - 1 + x0), int(y - 1 + y0)


def error_click(prediction: np.ndarray, target: np.ndarray) -> tuple[int, int, int] | None:
    """The next click of the N-click protocol: ``(x, y, label)``, or None when perfect.

    Example:
        >>> t = np.zeros((8, 8), bool); t[2:6, 2:6] = True
        >>> p = np.zeros((8, 8), bool); p[2:6, 2:4] = True
        >>> error_click(p, t)   # the missed right half: a positive click there
        (4, 2, 1)
    """
    fn = target & ~prediction
    fp = prediction & ~target
    best = None
    for region, label in ((fn, 1), (fp, 0)):
        if not region.any():
            continue
        x, y = centre_click(region)
        ys, xs = np.nonzero(region)
        crop = np.pad(region[ys.min() : ys.max() + 1, xs.min() : xs.max() + 1], 1)
        depth = float(ndimage.distance_transform_edt(crop).max())
        if best is None or depth > best[0]:
            best = (depth, x, y, label)
    return None if best is None else best[1:]


def _iou(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    inter = (a & b).reshape(len(a), -1).sum(1)
    union = (a | b).reshape(len(a), -1).sum(1)
    return np.where(union > 0, inter / np.maximum(union, 1), 1.0)


def evaluate_points(
    sam: Sam,
    source: LabelledImages,
    protocols: Sequence[str] = ("point",),
    clicks: int = 5,
    max_images: int | None = 20,
    max_objects: int | None = 20,
    min_area: int = 16,
) -> dict[str, float]:
    """mIoU of the ``point`` and ``clicks`` protocols (built-in implementation).

    Returns ``{"point_miou": ..., "clicks_miou": ..., "objects": n}`` (keys of the
    protocols asked for).
    """
    predictor = SamPredictor(sam)
    point_ious: list[np.ndarray] = []
    click_ious: list[np.ndarray] = []
    count = len(source) if max_images is None else min(len(source), max_images)
    for index in range(count):
        image, labels, _name = source[index]
        labels = np.asarray(labels)
        ids, areas = np.unique(labels[labels > 0], return_counts=True)
        ids = ids[areas >= min_area]
        if max_objects is not None:
            ids = ids[:max_objects]
        if len(ids) == 0:
            continue
        predictor.set_image(image)
        targets = labels[None] == ids[:, None, None]
        coords = np.array([centre_click(t) for t in targets], dtype=np.float64)[:, None]
        point_labels = np.ones((len(ids), 1), np.int64)
        masks, scores, low = predictor.predict(coords, point_labels, multimask_output=True)
        rows = np.arange(len(ids))
        best = scores.argmax(axis=1)
        prediction = masks[rows, best]
        point_ious.append(_iou(prediction, targets))
        if "clicks" in protocols:
            previous = low[rows, best][:, None]
            for _ in range(clicks - 1):
                new = []
                for pred, target in zip(prediction, targets):
                    click = error_click(pred, target)
                    # A perfect mask gets a confirming click at the centre (keeps the batch square).
                    new.append(click if click is not None else (*centre_click(target), 1))
                new_arr = np.array(new, dtype=np.float64)
                coords = np.concatenate([coords, new_arr[:, None, :2]], axis=1)
                point_labels = np.concatenate([point_labels, new_arr[:, None, 2].astype(np.int64)], axis=1)
                masks, _scores, low = predictor.predict(
                    coords, point_labels, mask_input=previous, multimask_output=False
                )
                prediction, previous = masks[:, 0], low
            click_ious.append(_iou(prediction, targets))
    result: dict[str, float] = {"objects": float(sum(len(v) for v in point_ious))}
    if "point" in protocols:
        result["point_miou"] = float(np.concatenate(point_ious).mean()) if point_ious else float("nan")
    if "clicks" in protocols:
        result["clicks_miou"] = float(np.concatenate(click_ious).mean()) if click_ious else float("nan")
    return result


def validate(
    sam: Sam,
    sources: Sequence[LabelledImages],
    protocols: Sequence[str] = ("point",),
    clicks: int = 5,
    max_images: int | None = 20,
    max_objects: int | None = 20,
    min_area: int = 16,
) -> dict[str, float]:
    """Validation metrics over several sources (objects pooled), the model left in eval mode.

    ``max_images`` bounds the images of each source.
    """
    was_training = sam.training
    sam.eval()
    try:
        totals: dict[str, float] = {}
        objects = 0.0
        for source in sources:
            metrics = _evaluate(sam, source, protocols, clicks, max_images, max_objects, min_area)
            n = metrics.pop("objects", 0.0)
            for key, value in metrics.items():
                if n > 0 and np.isfinite(value):
                    totals[key] = totals.get(key, 0.0) + value * n
            objects += n
        return {k: v / objects for k, v in totals.items()} if objects else {}
    finally:
        sam.train(was_training)


def _evaluate(sam, source, protocols, clicks, max_images, max_objects, min_area) -> dict[str, float]:
    """The one place that chooses the implementation (see the module docstring)."""
    try:
        from .. import evaluation
    except ImportError:  # a core without segany.evaluation: the built-in protocols
        evaluation = None
    if evaluation is None or not hasattr(evaluation, "evaluate"):
        return evaluate_points(sam, source, protocols, clicks, max_images, max_objects, min_area)
    count = len(source) if max_images is None else min(len(source), max_images)
    items = (source[i] for i in range(count))  # (image, labels, name) tuples
    result = evaluation.evaluate(
        items, SamPredictor(sam), list(protocols), clicks=clicks,
        max_objects=max_objects, min_area=min_area,
    )
    metrics: dict[str, float] = {}
    for protocol in protocols:
        rows = [r for r in result.rows if r.protocol == protocol]
        metrics[f"{protocol}_miou"] = result.miou(protocol) if rows else float("nan")
    metrics["objects"] = float(len({(r.image, r.object_id) for r in result.rows}))
    return metrics
