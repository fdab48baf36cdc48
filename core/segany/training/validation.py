"""Validation during training: single-point and N-click mIoU on held-out images.

:func:`validate` is the one entry point the trainer calls. It runs the protocols of
``segany eval`` (:func:`segany.evaluation.evaluate`), so training curves and ``segany eval``
report the same numbers:

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
    >>> m = validate(segany.build_sam("test_tiny"), [SyntheticScenes(1, 64)], ("point", "clicks"), clicks=2)
    >>> sorted(m), 0.0 <= m["point_miou"] <= 1.0
    (['clicks_miou', 'point_miou'], True)
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

from ..modeling import Sam
from ..predictor import SamPredictor
from .data import LabelledImages

__all__ = ["validate"]


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
    from ..evaluation import evaluate

    count = len(source) if max_images is None else min(len(source), max_images)
    items = (source[i] for i in range(count))  # (image, labels, name) tuples
    result = evaluate(items, SamPredictor(sam), list(protocols), clicks=clicks, max_objects=max_objects,
                      min_area=min_area)
    metrics: dict[str, float] = {}
    for protocol in protocols:
        rows = [r for r in result.rows if r.protocol == protocol]
        metrics[f"{protocol}_miou"] = result.miou(protocol) if rows else float("nan")
    metrics["objects"] = float(len({(r.image, r.object_id) for r in result.rows}))
    return metrics
