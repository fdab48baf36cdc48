"""Automatic mask generation: segany against the reference ``SamAutomaticMaskGenerator``.

Each implementation runs in its own fresh subprocess on the same machine, with the same
weights and image, so time and peak memory are comparable:

* time: wall clock (and CPU seconds) of one ``generate`` after a small warm-up run;
* memory: peak resident set size of the process (``ru_maxrss``: sees torch's allocations,
  unlike tracemalloc), reported in full and above the RSS just before ``generate`` (model,
  image and warm-up already loaded: that part is the AMG's own working memory);
* agreement: masks of one run matched to the other's at mask IoU >= 0.99, both ways.

Weights: random (seeded) with the decoder edited by ``tests/reference_oracle.localise_masks``
so that a point gives a blob-shaped mask around it with three nested sizes, as a trained
model does; the logit scale and IoU-head offset are set so that with the DEFAULT thresholds
(pred_iou 0.88, stability 0.95) a realistic share of the candidates passes (printed). A
model with all-random weights would pass nothing, or give noise masks, and measure nothing.

    .venv/bin/python bench/amg.py                          # vit_t, 1024x768 and 3000x2000
    .venv/bin/python bench/amg.py --sizes 1024x768 --model test_tiny
    .venv/bin/python bench/amg.py --impls ours exact       # skip the (slow) reference
    .venv/bin/python bench/amg.py --threads 1              # on a busy machine: no thread-pool waits

Machine load matters: on a CPU shared with other jobs, torch's thread pool waits (and spins)
at every operation, which costs small operations (ours) much more than large ones; the load
average is printed with each row, and CPU seconds next to wall seconds.

Goal (issue 3): >= 3x faster than the reference on CPU, peak memory <= 1/2, same masks.
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))  # the reference oracle's import shims

IMPLS = ("reference", "ours", "exact")


def blob_image(height: int, width: int, seed: int = 0) -> np.ndarray:
    """Coloured disks on a dark, slightly noisy background (deterministic)."""
    rng = np.random.default_rng(seed)
    img = np.full((height, width, 3), 20.0, dtype=np.float32)
    n = 14 * max(1, (height * width) // (1024 * 768))
    for _ in range(n):
        cy, cx = rng.integers(0, height), rng.integers(0, width)
        r = rng.integers(min(height, width) // 20 + 2, min(height, width) // 7 + 4)
        y0, y1, x0, x1 = max(0, cy - r), min(height, cy + r), max(0, cx - r), min(width, cx + r)
        yy, xx = np.mgrid[y0:y1, x0:x1]
        img[y0:y1, x0:x1][(yy - cy) ** 2 + (xx - cx) ** 2 < r * r] = rng.integers(60, 255, 3)
    img += rng.normal(0, 3, img.shape).astype(np.float32)
    return img.clip(0, 255).astype(np.uint8)


def build_models(model_type: str, seed: int = 0):
    """(reference package, reference model, segany model) with identical edited weights."""
    import torch

    import segany
    from reference_oracle import import_mobile_sam, import_segment_anything, localise_masks
    from test_parity import _randomise

    sa = import_segment_anything()
    torch.manual_seed(seed)
    if model_type == "vit_t":
        ref = import_mobile_sam().sam_model_registry["vit_t"]()
    elif model_type == "test_tiny":
        ref = importlib.import_module("segment_anything.build_sam")._build_sam(64, 2, 2, [1])
    else:
        ref = sa.sam_model_registry[model_type]()
    _randomise(ref, seed)
    localise_masks(ref, logit_scale=200.0, iou_shift=0.90)
    ref.train(False)  # after the edits: MobileSAM caches attention biases in eval mode
    ours = segany.build_sam(model_type)
    ours.load_state_dict(ref.state_dict(), strict=True)
    return sa, ref, ours


def rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def worker(impl: str, model_type: str, size: tuple[int, int], out: Path, threads: int | None) -> None:
    """Run one implementation once and write figures and masks (COCO RLE) to ``out``."""
    import torch

    if threads:
        torch.set_num_threads(threads)

    import segany
    from segany.masks import mask_to_rle, rle_to_coco

    sa, ref, ours = build_models(model_type)
    image = blob_image(*size)
    if impl == "reference":
        make = lambda **kw: sa.SamAutomaticMaskGenerator(ref, **kw)  # noqa: E731
    else:
        make = lambda **kw: segany.AutomaticMaskGenerator(ours, exact=impl == "exact", **kw)  # noqa: E731
    with torch.no_grad():
        make(points_per_side=2).generate(blob_image(64, 96, 1))  # warm-up: libraries, kernels
        generator = make()  # default settings
        base = rss_mb()
        wall, cpu = time.perf_counter(), time.process_time()
        records = generator.generate(image)
        wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    masks = [rle_to_coco(mask_to_rle(r["segmentation"]))["counts"] for r in records]
    out.write_text(
        json.dumps(
            {
                "impl": impl,
                "wall_s": wall,
                "cpu_s": cpu,
                "peak_rss_mb": peak,
                "base_rss_mb": base,
                "n_masks": len(records),
                "masks": masks,
                "size": list(size),
                "threads": torch.get_num_threads(),
            }
        )
    )


def agreement(a: list[str], b: list[str], size: tuple[int, int], thresh: float = 0.99) -> float:
    """Fraction of the masks of ``a`` with a mask of ``b`` at IoU >= ``thresh``."""
    from segany.masks import rle_to_mask

    if not a:
        return 1.0
    if not b:
        return 0.0
    h, w = size

    def decode(counts: str) -> tuple[np.ndarray, np.ndarray]:
        m = rle_to_mask({"size": [h, w], "counts": counts})
        ys, xs = np.nonzero(m)
        return np.ravel_multi_index((ys, xs), (h, w)), np.array([xs.min(), ys.min(), xs.max(), ys.max()])

    da = [decode(c) for c in a]
    db = [decode(c) for c in b]
    hits = 0
    for ia, ba in da:
        for ib, bb in db:
            if ba[0] > bb[2] or bb[0] > ba[2] or ba[1] > bb[3] or bb[1] > ba[3]:
                continue
            inter = np.intersect1d(ia, ib, assume_unique=True).size
            if inter / (ia.size + ib.size - inter) >= thresh:
                hits += 1
                break
    return hits / len(a)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="vit_t", help="vit_t (default), test_tiny, vit_b, ...")
    parser.add_argument("--sizes", nargs="+", default=["1024x768", "3000x2000"], help="WxH")
    parser.add_argument("--impls", nargs="+", default=["reference", "ours"], choices=IMPLS)
    parser.add_argument("--threads", type=int, help="torch CPU threads in both (default: torch's)")
    parser.add_argument("--json", type=Path, help="also write the figures here")
    parser.add_argument("--worker", choices=IMPLS, help=argparse.SUPPRESS)
    parser.add_argument("--out", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    sizes = []
    for s in args.sizes:
        w, h = (int(v) for v in s.lower().split("x"))
        sizes.append((h, w))
    if args.worker:
        worker(args.worker, args.model, sizes[0], args.out, args.threads)
        return 0

    print(
        f"AMG, default settings (32x32 points, pred_iou 0.88, stability 0.95), model {args.model} "
        f"(random weights + localise_masks), CPU, {os.cpu_count()} cores, "
        f"{args.threads or 'default'} torch threads, load {os.getloadavg()[0]:.1f} before"
    )
    rows = []
    for h, w in sizes:
        results = {}
        for impl in args.impls:
            with tempfile.TemporaryDirectory() as tmp:
                out = Path(tmp) / "result.json"
                cmd = [sys.executable, __file__, "--worker", impl, "--model", args.model, "--sizes", f"{w}x{h}", "--out", str(out)]
                if args.threads:
                    cmd += ["--threads", str(args.threads)]
                subprocess.run(cmd, check=True)
                results[impl] = json.loads(out.read_text())
            r = results[impl]
            print(
                f"  {w}x{h} {impl:9s}: {r['wall_s']:7.1f} s wall ({r['cpu_s']:.1f} s CPU), peak RSS "
                f"{r['peak_rss_mb']:6.0f} MB ({r['peak_rss_mb'] - r['base_rss_mb']:6.0f} MB above the loaded model), "
                f"{r['n_masks']} masks, load {os.getloadavg()[0]:.1f}",
                flush=True,
            )
        row = {"size": [w, h], "results": {k: {kk: vv for kk, vv in v.items() if kk != "masks"} for k, v in results.items()}}
        if "reference" in results:
            ref = results["reference"]
            for impl in results:
                if impl == "reference":
                    continue
                r = results[impl]
                fwd = agreement(ref["masks"], r["masks"], (h, w))
                back = agreement(r["masks"], ref["masks"], (h, w))
                speed = ref["wall_s"] / r["wall_s"]
                mem = (r["peak_rss_mb"] - r["base_rss_mb"]) / max(1.0, ref["peak_rss_mb"] - ref["base_rss_mb"])
                row[impl] = {"speedup": speed, "peak_ratio": r["peak_rss_mb"] / ref["peak_rss_mb"], "working_memory_ratio": mem, "matched_ref_in_ours": fwd, "matched_ours_in_ref": back}
                print(
                    f"  {w}x{h} {impl} vs reference: {speed:.2f}x faster, peak RSS x{r['peak_rss_mb'] / ref['peak_rss_mb']:.2f} "
                    f"(working memory x{mem:.3f}); masks matched at IoU>=0.99: {fwd:.1%} of the reference's in ours, "
                    f"{back:.1%} of ours in the reference's",
                    flush=True,
                )
        rows.append(row)
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
