"""``python -m segany.demo``: segment a built-in image with point and box prompts.

Writes into the output folder: ``input.png``, ``masks.npy`` (one boolean mask per prompt),
``labels.png`` (16-bit instance labels), ``overlay.png`` (masks and prompts over the image)
and ``results.json`` (prompts, predicted IoU, IoU against the known ground truth, model).

Example:
    $ python -m segany.demo --output demo_output
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from pathlib import Path

import numpy as np
from PIL import Image
from scipy import ndimage

from . import checkpoints
from .build import build_sam, load_model
from .errors import SegAnyError
from .predictor import SamPredictor
from .synthetic import cells_image
from .visualize import overlay

RANDOM_WEIGHTS_NOTICE = (
    "NOTE: no trained weights are available on this machine, so the demo runs the pipeline "
    "with a RANDOMLY initialised model: its masks are meaningless. Fetch real weights with "
    "`segany fetch mobile_sam` (or pass --model PATH) and run the demo again."
)


def choose_model(name_or_path: str | None):
    """The model to run and a description: the named one, the default, a cached one, or random."""
    if name_or_path is not None:
        return load_model(name_or_path), str(name_or_path), True
    try:
        return load_model(), "default", True
    except SegAnyError:
        pass
    # Prefer the smallest cached file: the demo should be quick on a laptop CPU.
    cached = [
        info
        for info, status in checkpoints.list_checkpoints()
        if status != "missing" and not status.startswith("corrupt")
    ]
    for info in sorted(cached, key=lambda info: info.size or 0):
        return load_model(info.name), info.name, True
    return build_sam("test_tiny"), "test_tiny (random weights)", False


def _save_png(array: np.ndarray, path: Path) -> None:
    """Write atomically: a killed demo never leaves a half-written picture."""
    fd, tmp = tempfile.mkstemp(suffix=".png", dir=path.parent)
    os.close(fd)
    Image.fromarray(array).save(tmp)
    os.replace(tmp, path)


def object_prompts(labels: np.ndarray, count: int) -> list[dict]:
    """Prompts for the ``count`` largest objects: a point at the centre, a box, both."""
    ids, areas = np.unique(labels[labels > 0], return_counts=True)
    chosen = ids[np.argsort(-areas)][:count]
    prompts = []
    for i, label_id in enumerate(chosen):
        mask = labels == label_id
        distance = ndimage.distance_transform_edt(mask)
        cy, cx = np.unravel_index(np.argmax(distance), mask.shape)
        ys, xs = np.nonzero(mask)
        box = [float(xs.min()) - 2, float(ys.min()) - 2, float(xs.max()) + 2, float(ys.max()) + 2]
        kind = ("point", "box", "point+box")[i % 3]
        prompt: dict = {"object": int(label_id), "kind": kind}
        if kind in ("point", "point+box"):
            prompt["point_coords"] = [[float(cx), float(cy)]]
            prompt["point_labels"] = [1]
        if kind in ("box", "point+box"):
            prompt["box"] = box
        prompts.append(prompt)
    return prompts


def run_demo(output: Path, model: str | None = None, n_objects: int = 6) -> dict:
    """Run the demo and return the summary written to ``results.json``."""
    output.mkdir(parents=True, exist_ok=True)
    image, truth = cells_image((512, 640), n_cells=14, seed=3)
    sam, model_name, trained = choose_model(model)
    if not trained:
        print(RANDOM_WEIGHTS_NOTICE, file=sys.stderr)
    predictor = SamPredictor(sam)
    predictor.set_image(image)

    prompts = object_prompts(truth, n_objects)
    masks, records = [], []
    labels = np.zeros(truth.shape, np.uint16)
    for number, prompt in enumerate(prompts, start=1):
        kwargs = {k: np.asarray(prompt[k]) for k in ("point_coords", "point_labels", "box") if k in prompt}
        candidates, scores, _ = predictor.predict(**kwargs, multimask_output="box" not in prompt)
        best = int(np.argmax(scores))
        mask = candidates[best]
        gt = truth == prompt["object"]
        iou = float((mask & gt).sum() / max(1, (mask | gt).sum()))
        masks.append(mask)
        labels[mask & (labels == 0)] = number
        records.append({**prompt, "predicted_iou": float(scores[best]), "iou_vs_truth": round(iou, 4)})

    points = [(p[0][0], p[0][1], 1) for p in (r.get("point_coords") for r in prompts) if p]
    boxes = [tuple(r["box"]) for r in prompts if "box" in r]
    _save_png(image, output / "input.png")
    _save_png(labels, output / "labels.png")
    _save_png(overlay(image, labels, points=points, boxes=boxes), output / "overlay.png")
    np.save(output / "masks.npy", np.stack(masks))
    summary = {
        "model": model_name,
        "trained_weights": trained,
        "image_size": list(image.shape),
        "prompts": records,
        "mean_iou_vs_truth": round(float(np.mean([r["iou_vs_truth"] for r in records])), 4),
    }
    (output / "results.json").write_text(json.dumps(summary, indent=2))
    return summary


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m segany.demo", description=__doc__.split("\n")[0])
    parser.add_argument("--output", "-o", type=Path, default=Path("demo_output"))
    parser.add_argument("--model", help="registry name or checkpoint path (default: best available)")
    args = parser.parse_args(argv)
    try:
        summary = run_demo(args.output, args.model)
    except SegAnyError as exc:
        print(f"segany demo: error: {exc}", file=sys.stderr)
        return 2
    print(f"model: {summary['model']}")
    for r in summary["prompts"]:
        print(f"  object {r['object']:3d} by {r['kind']:9s}: predicted IoU {r['predicted_iou']:.3f}, "
              f"IoU vs truth {r['iou_vs_truth']:.3f}")
    print(f"wrote input.png, masks.npy, labels.png, overlay.png, results.json to {args.output}/")
    return 0


if __name__ == "__main__":
    sys.exit(main())
