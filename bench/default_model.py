"""Inference cost of segany's shipped default model on the CPU, next to MobileSAM's TinyViT.

Both run in the same process on the same 1024 px input (MobileSAM's architecture with
random weights: its cost does not depend on the weights), so the ratio holds on any machine.

    .venv/bin/python bench/default_model.py               # all CPU threads
    .venv/bin/python bench/default_model.py --threads 2   # a 2-core laptop

Rows: encoder per 1024 px tile (``set_image``: resize, normalise, encode) and one click
(prompt to full-resolution masks, 3 candidates, cached embedding). Goal (issue 5): the
encoder "well under a second" on 2 CPU cores.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "core"))

import segany  # noqa: E402
from segany.predictor import SamPredictor  # noqa: E402


def timed(fn, repeats: int, warmup: int = 1) -> list[float]:
    for _ in range(warmup):
        fn()
    out = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        out.append(time.perf_counter() - start)
    return out


def measure(model: torch.nn.Module, image: np.ndarray, repeats: int) -> dict[str, float]:
    predictor = SamPredictor(model)
    encode = timed(lambda: predictor.set_image(image), repeats)
    rng = np.random.default_rng(0)
    points = rng.integers(100, 900, size=(repeats + 1, 1, 2)).astype(np.float32)
    it = iter(points)
    click = timed(lambda: predictor.predict(point_coords=next(it), point_labels=np.array([1]), multimask_output=True), repeats)
    return {"encoder_s": statistics.median(encode), "click_ms": 1000 * statistics.median(click)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, help="torch CPU threads (default: torch's)")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    image = (np.random.default_rng(1).random((1024, 1024, 3)) * 255).astype(np.uint8)
    ours = segany.load_model(device="cpu")
    tiny = segany.build_sam("vit_t")
    params = {name: sum(p.numel() for p in m.parameters()) / 1e6 for name, m in (("segany_lite", ours), ("vit_t", tiny))}
    rows = {}
    with torch.inference_mode():
        for name, model in (("segany_lite", ours), ("vit_t (MobileSAM arch.)", tiny)):
            rows[name] = measure(model, image, args.repeats)
    print(f"CPU, {torch.get_num_threads()} torch threads, 1024 x 1024 input, median of {args.repeats}")
    print(f"{'model':26s} {'params (M)':>10s} {'encoder (s)':>12s} {'click (ms)':>11s}")
    for (name, r), p in zip(rows.items(), params.values()):
        print(f"{name:26s} {p:10.2f} {r['encoder_s']:12.3f} {r['click_ms']:11.1f}")
    a, b = rows["segany_lite"], rows["vit_t (MobileSAM arch.)"]
    print(f"encoder speed-up over TinyViT: {b['encoder_s'] / a['encoder_s']:.2f}x; click: {b['click_ms'] / a['click_ms']:.2f}x")
    if args.json:
        args.json.write_text(json.dumps({"threads": torch.get_num_threads(), "rows": rows, "params_m": params}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
