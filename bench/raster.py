"""Large rasters: flat memory, pipeline overhead, and scaling of `segany batch` on Dask.

    .venv/bin/python bench/raster.py                # all three, CPU, a small model config
    .venv/bin/python bench/raster.py --only memory --sizes 4096 16384
    .venv/bin/python bench/raster.py --json out.json

1. **Memory.** Encodes a 4096^2 and a 16384^2 GeoTIFF (3 x uint8, deflate, 512 px blocks)
   into a zarr embedding cache with :func:`segany.tiling.encode_raster`, each in a fresh
   process, and reports each process's peak RSS (goal: ratio < 1.3: memory does not grow
   with the raster).
2. **Overhead.** The same tiles of the 4096^2 raster, (a) already in memory, through the
   bare encoder in batches, and (b) through the whole pipeline (windowed read, scene-wide
   normalisation, encode, atomic cache writes) (goal: < 15 % slower).
3. **Batch.** 8 scenes of 2048^2 with `segany.batch.run_batch` (embed mode) on a
   ``LocalCluster`` with 1 and then 2 worker processes (1 thread each).

The model is a small registered configuration (ViT, 64 wide, 2 windowed blocks, random
weights, 1024 px input): the encoder's shape and I/O are SAM's, its cost is not, so the
figures show the pipeline itself (a worst case for the overhead). The overhead is also
measured with segany's shipped default model (``segany_lite``, the smallest real encoder
segany runs; ``--real-model vit_t_random`` measures MobileSAM's TinyViT architecture).
"""

from __future__ import annotations

import argparse
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

BENCH_CONFIG = dict(name="bench_small", encoder="vit",
                    encoder_kwargs=dict(embed_dim=64, depth=2, num_heads=2, global_attn_indexes=(), window_size=14))


def bench_config():
    from segany import ModelConfig

    return ModelConfig(BENCH_CONFIG["name"], BENCH_CONFIG["encoder"], BENCH_CONFIG["encoder_kwargs"])


def bench_model():
    import torch

    import segany

    segany.register_config(bench_config(), overwrite=True)
    torch.manual_seed(0)
    return segany.build_sam(BENCH_CONFIG["name"])


def make_raster(path: Path, size: int, seed: int = 0) -> Path:
    """A synthetic orthomosaic: coloured fields with texture, written window by window
    (flat memory), tiled and deflate-compressed like a real one."""
    import rasterio
    from affine import Affine

    if path.exists():
        return path
    rng = np.random.default_rng(seed)
    block = 512
    profile = dict(driver="GTiff", width=size, height=size, count=3, dtype="uint8", crs="EPSG:32633",
                   transform=Affine(0.1, 0, 400000, 0, -0.1, 5100000), tiled=True, blockxsize=block,
                   blockysize=block, compress="deflate", BIGTIFF="IF_SAFER")
    tmp = path.with_name(path.name + ".tmp")
    colours = rng.integers(30, 225, (64, 3))
    with rasterio.open(tmp, "w", **profile) as dst:
        for r0 in range(0, size, block):
            for c0 in range(0, size, block):
                yy, xx = np.mgrid[r0 : r0 + block, c0 : c0 + block]
                field = ((yy // 300) * 7 + (xx // 420) * 13) % 64
                tex = ((yy * 3 + xx * 5) % 17).astype(np.int16) - 8
                noise = rng.integers(-6, 7, (3, block, block), dtype=np.int16)  # sensor noise: real file sizes
                win = np.stack([np.clip(colours[field, b] + tex + noise[b], 0, 255) for b in range(3)]).astype(np.uint8)
                dst.write(win, window=rasterio.windows.Window(c0, r0, block, block))
    os.replace(tmp, path)
    return path


# ------------------------------------------------------------------------------ children


def child_encode(raster_path: str, cache_path: str) -> dict:
    """Runs in a fresh process: encode one raster; report peak RSS and times."""
    from segany.raster import open_raster
    from segany.tiling import TileEncoder, encode_raster

    enc = TileEncoder(bench_model())
    raster = open_raster(raster_path)
    base_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    start = time.perf_counter()
    cache = encode_raster(raster, enc, cache_path, batch_size=4)
    seconds = time.perf_counter() - start
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return {"tiles": len(cache.grid), "seconds": seconds, "peak_rss_mb": peak / 1024,
            "before_encode_rss_mb": base_rss / 1024}


def run_child(*args: str) -> dict:
    out = subprocess.run([sys.executable, __file__, "--child", *args], capture_output=True, text=True,
                         env=dict(os.environ, PYTHONWARNINGS="ignore"))
    if out.returncode:
        raise RuntimeError(out.stderr[-3000:])
    return json.loads(out.stdout.strip().splitlines()[-1])


# ------------------------------------------------------------------------------ benches


def bench_memory(work: Path, sizes: list[int]) -> dict:
    results = {}
    for size in sizes:
        raster = make_raster(work / f"ortho_{size}.tif", size)
        cache = work / f"ortho_{size}.zarr"
        if cache.exists():
            import shutil

            shutil.rmtree(cache)
        r = run_child("encode", str(raster), str(cache))
        r["file_mb"] = raster.stat().st_size / 1e6
        results[size] = r
        print(f"  {size:>6}^2: {r['tiles']:>4} tiles in {r['seconds']:7.1f} s, peak RSS {r['peak_rss_mb']:7.1f} MB "
              f"(before encoding {r['before_encode_rss_mb']:.0f} MB), file {r['file_mb']:.0f} MB", flush=True)
    if len(sizes) >= 2:
        ratio = results[sizes[-1]]["peak_rss_mb"] / results[sizes[0]]["peak_rss_mb"]
        print(f"  peak memory ratio {sizes[-1]}^2 / {sizes[0]}^2 = {ratio:.3f} (goal < 1.3)")
        results["ratio"] = ratio
    return results


def bench_overhead(work: Path, size: int, repeats: int, model_name: str) -> dict:
    import shutil
    import warnings

    from segany.cache import EmbeddingCache
    from segany.raster import open_raster
    from segany.tiling import TileEncoder, TileGrid, encode_raster, resolve_model

    if model_name == BENCH_CONFIG["name"]:
        model = bench_model()
    elif model_name.endswith("_random"):  # an official architecture with random weights
        import dataclasses

        import torch

        import segany

        base = segany.model_configs()[model_name[: -len("_random")]]
        segany.register_config(dataclasses.replace(base, name=model_name), overwrite=True)
        torch.manual_seed(0)
        model = segany.build_sam(model_name)
    else:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            model = resolve_model(model_name)
    enc = TileEncoder(model)
    raster = open_raster(make_raster(work / f"ortho_{size}.tif", size))
    grid = TileGrid(raster.height, raster.width, 1024, 128)
    tiles = [raster.read(t.window, layout="chw")[0] for t in grid]  # bare: pixels already in memory
    batches = [tiles[i : i + 4] for i in range(0, len(tiles), 4)]
    enc.encode(batches[0], layout="chw")  # warm-up
    bare, pipe = [], []

    def run_bare() -> None:
        start = time.perf_counter()
        for b in batches:
            enc.encode(b, layout="chw")
        bare.append(time.perf_counter() - start)

    def run_pipeline() -> None:
        cache = work / "overhead.zarr"
        if cache.exists():
            shutil.rmtree(cache)
        start = time.perf_counter()
        encode_raster(raster, enc, cache, batch_size=4)
        pipe.append(time.perf_counter() - start)

    for i in range(repeats):  # alternate the order: the machine's load drifts
        for run in ((run_bare, run_pipeline) if i % 2 == 0 else (run_pipeline, run_bare)):
            run()
    # The pipeline's own work per tile, measured alone (no encoder running beside it).
    start = time.perf_counter()
    for t in grid:
        raster.read(t.window, layout="chw")
    read_ms = 1000 * (time.perf_counter() - start) / len(grid)
    cache = EmbeddingCache.open(work / "overhead.zarr")
    feats = cache.read(0).features[0]
    start = time.perf_counter()
    for i in range(len(grid)):
        cache.write(i, feats, 1.0)
    write_ms = 1000 * (time.perf_counter() - start) / len(grid)
    overhead = min(pipe) / min(bare) - 1
    encode_ms = 1000 * min(bare) / len(tiles)
    print(f"  {model_name}, {size}^2, {len(tiles)} tiles: bare encoder {min(bare):.2f} s ({encode_ms:.0f} ms/tile), "
          f"pipeline {min(pipe):.2f} s (best of {repeats}): overhead {100 * overhead:+.1f} % (goal < 15 %)")
    print(f"    per tile, alone: read + normalise {read_ms:.1f} ms, cache write {write_ms:.1f} ms; "
          f"all runs: bare {[round(v, 2) for v in bare]}, pipeline {[round(v, 2) for v in pipe]}", flush=True)
    return {"model": model_name, "tiles": len(tiles), "bare_s": bare, "pipeline_s": pipe, "overhead": overhead,
            "read_ms": read_ms, "write_ms": write_ms, "encode_ms": encode_ms}


def _warm_worker(config) -> int:
    """Load the model in a worker, as its first scene would (imports torch, builds it)."""
    from segany.batch import _worker_encoder

    _worker_encoder(config, None)
    return os.getpid()


def _cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def bench_batch(work: Path, n_scenes: int, size: int) -> dict:
    import shutil

    from distributed import Client, LocalCluster

    from segany.batch import BatchJob, run_batch

    archive = work / "archive"
    archive.mkdir(exist_ok=True)
    for k in range(n_scenes):
        make_raster(archive / f"scene{k}.tif", size, seed=k)
    job = BatchJob(mode="embed", model=bench_config())
    results = {}
    for workers in (1, 2):
        out = work / f"batch_{workers}"
        if out.exists():
            shutil.rmtree(out)
        start = time.perf_counter()
        # The same cluster run_batch makes by default, started here so that its start-up
        # (process spawn, torch import, model load: once per worker) is timed apart.
        with LocalCluster(n_workers=workers, threads_per_worker=1, processes=True, dashboard_address=None) as cluster, \
                Client(cluster) as client:
            client.wait_for_workers(workers)
            client.run(_warm_worker, bench_config())
            started = time.perf_counter() - start
            cpu0 = sum(client.run(_cpu_seconds).values())
            start = time.perf_counter()
            manifest = run_batch(str(archive / "*.tif"), out, job, scheduler=client)
            wall = time.perf_counter() - start
            cpu = sum(client.run(_cpu_seconds).values()) - cpu0
        assert manifest["summary"]["done"] == n_scenes, manifest["summary"]
        per_scene = float(np.mean([r["seconds"] for r in manifest["scenes"].values()]))
        results[workers] = {"wall_s": wall, "startup_s": started, "per_scene_s": per_scene, "worker_cpu_s": cpu}
        print(f"  {workers} worker(s): {n_scenes} scenes of {size}^2 in {wall:.1f} s "
              f"({n_scenes / wall * 60:.1f} scenes/min; cluster start + model load {started:.1f} s apart; "
              f"{per_scene:.1f} s per scene inside a worker; workers used {cpu / wall:.2f} cores on average)",
              flush=True)
    results["speedup"] = results[1]["wall_s"] / results[2]["wall_s"]
    print(f"  speed-up 2 workers vs 1: {results['speedup']:.2f}x ({os.cpu_count()} CPU cores on this machine, "
          f"load average {os.getloadavg()[0]:.1f}; 1 torch thread per worker)")
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", choices=("memory", "overhead", "batch"), nargs="+")
    parser.add_argument("--sizes", type=int, nargs="+", default=[4096, 16384])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--real-model", default="segany_lite",
                        help="also measure the overhead with this encoder on a 2048^2 raster ('' to skip)")
    parser.add_argument("--scenes", type=int, default=8)
    parser.add_argument("--scene-size", type=int, default=2048)
    parser.add_argument("--work", default=None, help="folder for the rasters (kept for reruns)")
    parser.add_argument("--json", default=None)
    parser.add_argument("--child", nargs="+", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(child_encode(*args.child[1:])))
        return
    import torch

    work = Path(args.work or tempfile.mkdtemp(prefix="segany-bench-"))
    work.mkdir(parents=True, exist_ok=True)
    print(f"segany raster bench: CPU, torch {torch.__version__}, {torch.get_num_threads()} threads, "
          f"{os.cpu_count()} cores, model {BENCH_CONFIG['name']} {BENCH_CONFIG['encoder_kwargs']}; work dir {work}")
    only = set(args.only or ("memory", "overhead", "batch"))
    results = {}
    if "memory" in only:
        print("memory (each size in a fresh process):", flush=True)
        results["memory"] = bench_memory(work, args.sizes)
    if "overhead" in only:
        print("pipeline overhead (encode_raster vs the bare encoder on the same tiles in memory):", flush=True)
        results["overhead"] = [bench_overhead(work, min(args.sizes), args.repeats, BENCH_CONFIG["name"])]
        if args.real_model:
            results["overhead"].append(bench_overhead(work, 2048, args.repeats, args.real_model))
    if "batch" in only:
        print("batch on a Dask LocalCluster:", flush=True)
        results["batch"] = bench_batch(work, args.scenes, args.scene_size)
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1, default=str))


if __name__ == "__main__":
    main()
