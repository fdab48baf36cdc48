"""Encoder and per-click decoder speed: segany against the official implementation.

Both models get the same random weights in the same process, so the ratio is fair on any
machine. Prints a table and (with --json) writes the figures.

    .venv/bin/python bench/encoder.py                  # vit_t and vit_b, CPU fp32
    .venv/bin/python bench/encoder.py --models vit_t --repeats 5
    .venv/bin/python bench/encoder.py --device cuda    # adds bf16 autocast rows on a GPU

Goals (issue 2): encoder >= 1.3x faster than the reference on CPU with max |diff| <= 1e-4;
one click decoded (prompt to full-resolution mask) in under 10 ms on CPU.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))  # the reference oracle's import shims

import segany  # noqa: E402
from reference_oracle import import_mobile_sam, import_segment_anything  # noqa: E402


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def timed(fn, device: torch.device, repeats: int, warmup: int = 1) -> list[float]:
    """Wall-clock seconds of ``fn()`` over ``repeats`` runs after ``warmup`` runs."""
    for _ in range(warmup):
        fn()
    _sync(device)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        _sync(device)
        times.append(time.perf_counter() - start)
    return times


def model_pair(model_type: str, device: torch.device):
    pkg = import_mobile_sam() if model_type == "vit_t" else import_segment_anything()
    torch.manual_seed(0)
    ref = pkg.sam_model_registry[model_type]()
    with torch.no_grad():
        for name, p in ref.named_parameters():
            if "rel_pos" in name or "pos_embed" in name:
                p.normal_(0, 0.2)
    ref.train(False)
    ours = segany.build_sam(model_type)
    ours.load_state_dict(ref.state_dict(), strict=True)
    return pkg, ref.to(device).eval(), ours.to(device).eval()


def bench_encoder(model_type: str, device: torch.device, repeats: int, precision: str) -> dict:
    pkg, ref, ours = model_pair(model_type, device)
    x = torch.randn(1, 3, 1024, 1024, device=device)
    dtype = {"fp32": None, "bf16": torch.bfloat16}[precision]

    def ctx():
        if dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(device.type, dtype=dtype)

    def run(model):
        with torch.inference_mode(), ctx():
            return model.image_encoder(x)

    # Interleave the two so that machine noise hits both alike.
    ours_t, ref_t = [], []
    run(ours), run(ref)
    for _ in range(repeats):
        ours_t += timed(lambda: run(ours), device, 1, warmup=0)
        ref_t += timed(lambda: run(ref), device, 1, warmup=0)
    diff = (run(ours).float() - run(ref).float()).abs().max().item()
    ours_s, ref_s = statistics.median(ours_t), statistics.median(ref_t)
    return {
        "model": model_type,
        "device": str(device),
        "precision": precision,
        "ours_s": ours_s,
        "reference_s": ref_s,
        "speedup": ref_s / ours_s,
        "max_abs_diff": diff,
    }


def bench_click(model_type: str, device: torch.device, repeats: int) -> dict:
    """One positive click on a cached embedding -> full-resolution masks (3 candidates)."""
    pkg, ref, ours = model_pair(model_type, device)
    rng = np.random.default_rng(0)
    image = rng.integers(0, 255, (768, 1024, 3), dtype=np.uint8)
    results = {}
    for name, predictor in (("ours", segany.SamPredictor(ours)), ("reference", pkg.SamPredictor(ref))):
        predictor.set_image(image)
        clicks = iter(rng.uniform([0, 0], [1023, 767], (repeats + 5, 2)))

        def click():
            predictor.predict(point_coords=next(clicks)[None], point_labels=np.array([1]))

        results[name] = statistics.median(timed(click, device, repeats, warmup=5))
    return {
        "model": model_type,
        "device": str(device),
        "ours_ms": results["ours"] * 1e3,
        "reference_ms": results["reference"] * 1e3,
        "speedup": results["reference"] / results["ours"],
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--models", nargs="+", default=["vit_t", "vit_b"])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--click-repeats", type=int, default=50)
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    parser.add_argument("--json", type=Path, help="also write the figures here")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} CPU threads, device {device}")
    encoder_rows, click_rows = [], []
    precisions = ["fp32"] + (["bf16"] if device.type == "cuda" else [])
    for model_type in args.models:
        for precision in precisions:
            row = bench_encoder(model_type, device, args.repeats, precision)
            encoder_rows.append(row)
            print(
                f"encoder {model_type:6s} {precision}: ours {row['ours_s']:.3f} s, reference "
                f"{row['reference_s']:.3f} s, speed-up {row['speedup']:.2f}x, max |diff| {row['max_abs_diff']:.1e}"
            )
        row = bench_click(model_type, device, args.click_repeats)
        click_rows.append(row)
        print(
            f"click   {model_type:6s}: ours {row['ours_ms']:.1f} ms, reference {row['reference_ms']:.1f} ms "
            f"(prompt -> 3 masks at 1024x768), speed-up {row['speedup']:.2f}x"
        )
    if args.json:
        args.json.write_text(json.dumps({"encoder": encoder_rows, "click": click_rows}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
