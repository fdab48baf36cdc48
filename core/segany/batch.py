"""Batch segmentation of raster archives on a Dask cluster (``segany batch``).

:func:`run_batch` sends one task per scene to a ``distributed`` cluster: a
``LocalCluster`` (one process per worker) by default, or an existing scheduler
(``tcp://host:8786``) for a real cluster. Each worker process loads the model once and
keeps it for all the scenes it gets.

Guarantees:

* **One output per scene**, written atomically (``os.replace``), named after the scene
  (its relative path when file names repeat), plus ``manifest.json`` listing every scene
  with its status, output, object count, time, attempts and error.
* **Resumable.** A finished scene leaves a small state file (``.segany-batch/NAME.json``,
  written after its output); a rerun skips scenes whose state says done for the same job
  and the same unchanged source file. Killing the batch at any moment loses at most the
  scenes in progress, and never duplicates one (outputs are per-scene files, replaced
  whole).
* **Failures are contained.** A failing scene is retried (``retries`` times) and then
  reported in the manifest (with the one-line reason, e.g. a corrupt GeoTIFF); the others
  go on. The command exits with status 1 when some scene failed.

Modes: ``auto`` (everything, vector output per scene), ``embed`` (an embedding cache per
scene), ``segment`` (prompts from a vector file in map coordinates; each scene gets the
prompts that fall on it).

Example::

    from segany.batch import BatchJob, run_batch
    manifest = run_batch("archive/*.tif", "out/", BatchJob(mode="auto", model="sam_vit_b"))
    manifest["summary"]   # {'done': 998, 'skipped': 0, 'failed': 2}
"""

from __future__ import annotations

import glob
import hashlib
import json
import os
import threading
import time
import traceback
import uuid
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Sequence

from .errors import SegAnyError
from .tiling import CancelFn, ProgressFn, check_cancel

__all__ = ["BatchError", "BatchJob", "find_scenes", "process_scene", "run_batch", "scene_names"]

STATE_DIR = ".segany-batch"
MANIFEST = "manifest.json"
EXTENSIONS = {"auto": ".gpkg", "segment": ".gpkg", "embed": ".zarr"}


class BatchError(SegAnyError):
    """The batch cannot start (no scenes, bad output folder, bad options)."""


@dataclass
class BatchJob:
    """What to do with each scene (sent to the workers, so it must pickle).

    Attributes:
        mode: ``"auto"``, ``"embed"`` or ``"segment"``.
        model: what :func:`segany.tiling.resolve_model` accepts (a name, a checkpoint path,
            a test configuration name), or a :class:`segany.ModelConfig` (random weights,
            same in every worker: for tests and benchmarks).
        output_format: vector extension (``.gpkg``, ``.parquet``, ``.geojson``, ``.fgb``).
        masks: also write a ``NAME.masks.tif`` label raster (auto and segment).
        prompts: the prompt file (segment mode).
        bands, tile_size, overlap: raster options (see :func:`segany.raster.open_raster`).
        device: ``"cpu"``, ``"cuda"`` ...; None picks the GPU when present.
        options: more keyword arguments for the mode's function (e.g. ``points_per_side``,
            ``generator`` for automatic mode, ``simplify``, ``to_crs``).

    Example:
        >>> BatchJob(mode="embed", model="test_tiny").fingerprint() == BatchJob("embed", "test_tiny").fingerprint()
        True
    """

    mode: str = "auto"
    model: Any = None
    output_format: str = ".gpkg"
    masks: bool = False
    prompts: str | None = None
    bands: Sequence[int] | None = None
    tile_size: int | None = None
    overlap: int | None = None
    device: str | None = None
    options: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.mode not in EXTENSIONS:
            raise BatchError(f"batch mode must be one of {', '.join(EXTENSIONS)}, got {self.mode!r}")
        if self.mode == "segment" and not self.prompts:
            raise BatchError("segment mode needs a prompt file (--prompts FILE)")
        if not self.output_format.startswith("."):
            self.output_format = "." + self.output_format
        from .vectorize import VECTOR_FORMATS

        if self.mode != "embed" and self.output_format.lower() not in VECTOR_FORMATS:
            raise BatchError(f"output format must be one of {', '.join(sorted(VECTOR_FORMATS))}, got {self.output_format!r}")

    def extension(self) -> str:
        return EXTENSIONS["embed"] if self.mode == "embed" else self.output_format

    def fingerprint(self) -> str:
        """A hash of everything that changes the outputs (reruns redo scenes when it changes)."""
        def plain(value: Any) -> Any:
            if isinstance(value, dict):
                return {str(k): plain(v) for k, v in sorted(value.items())}
            if isinstance(value, (list, tuple)):
                return [plain(v) for v in value]
            if isinstance(value, (str, int, float, bool)) or value is None:
                return value
            if hasattr(value, "__qualname__"):  # a function or class: by name
                return f"{getattr(value, '__module__', '')}.{value.__qualname__}"
            # An object (e.g. a generator instance): its type and its settings, never its
            # address, so the same job built twice has the same fingerprint.
            kind = f"{type(value).__module__}.{type(value).__qualname__}"
            return [kind, plain(dict(vars(value)))] if hasattr(value, "__dict__") else kind

        data = {k: plain(v) for k, v in asdict(self).items() if k != "device"}
        return hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()[:16]


# ------------------------------------------------------------------------------ scenes


def find_scenes(inputs: str | os.PathLike[str] | Sequence[str | os.PathLike[str]]) -> list[Path]:
    """Scenes from glob patterns (``"dir/**/*.tif"``), folders (their ``.tif``/``.tiff``
    files) and file paths, sorted and without repeats.

    Example:
        >>> find_scenes("/nonexistent/*.tif")
        Traceback (most recent call last):
        ...
        segany.batch.BatchError: no raster matches /nonexistent/*.tif
    """
    items = [inputs] if isinstance(inputs, (str, os.PathLike)) else list(inputs)
    found: dict[str, Path] = {}
    for item in items:
        text = os.fspath(item)
        if any(ch in text for ch in "*?["):
            matches = [Path(p) for p in glob.glob(text, recursive=True) if Path(p).is_file()]
        elif Path(text).is_dir():
            matches = [p for p in Path(text).iterdir() if p.suffix.lower() in (".tif", ".tiff") and p.is_file()]
        else:
            matches = [Path(text)] if Path(text).exists() else []
        if not matches:
            raise BatchError(f"no raster matches {text}")
        for m in matches:
            found.setdefault(str(m.resolve()), m.resolve())
    return [found[k] for k in sorted(found)]


def scene_names(scenes: Sequence[Path]) -> list[str]:
    """Output names: file stems, or relative paths (``a__b__x``) where stems repeat.

    Example:
        >>> scene_names([Path("/d/a/x.tif"), Path("/d/b/x.tif"), Path("/d/b/y.tif")])
        ['a__x', 'b__x', 'y']
    """
    stems = [p.stem for p in scenes]
    if len(set(stems)) == len(stems):
        return stems
    root = Path(os.path.commonpath([str(p.parent) for p in scenes]))
    out = []
    for p in scenes:
        if stems.count(p.stem) > 1:
            rel = p.relative_to(root).with_suffix("")
            out.append("__".join(rel.parts))
        else:
            out.append(p.stem)
    return out


def _source_signature(path: Path) -> dict[str, Any]:
    st = path.stat()
    return {"size": st.st_size, "mtime_ns": st.st_mtime_ns}


def _write_json(path: Path, data: Any) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{uuid.uuid4().hex[:8]}")
    tmp.write_text(json.dumps(data, indent=1, default=str))
    os.replace(tmp, path)


# ------------------------------------------------------------------------------ workers

_MODELS: dict[Any, Any] = {}
_MODELS_LOCK = threading.Lock()


def _worker_encoder(spec: Any, device: str | None) -> Any:
    """An encoder around this process's model for ``spec``: the model is loaded on first
    use and then shared by every scene; each scene gets its own predictor state, so a
    worker with several threads never mixes two scenes' embeddings."""
    from .tiling import TileEncoder

    return TileEncoder(_worker_model(spec, device))


def _worker_model(spec: Any, device: str | None) -> Any:
    from .build import ModelConfig
    from .tiling import resolve_model

    key = (repr(spec), device)
    with _MODELS_LOCK:
        if key not in _MODELS:
            if isinstance(spec, ModelConfig):
                import torch

                from .build import build_sam, register_config

                register_config(spec, overwrite=True)
                with torch.random.fork_rng():
                    torch.manual_seed(0)  # the same random weights in every worker
                    model = build_sam(spec.name, device=device)
            else:
                import warnings

                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")  # "random weights" was said once, by the driver
                    model = resolve_model(spec, device=device)
            _MODELS[key] = model
        return _MODELS[key]


def _prompts_on(raster: Any, prompts: list[Any]) -> list[Any]:
    """The prompts that fall on this raster (the others belong to other scenes)."""
    from .errors import PromptError
    from .geo import to_pixels
    from .scene import check_prompts_on_data

    inside = []
    for p in prompts:
        try:
            check_prompts_on_data(to_pixels([p], raster), raster)  # outside, or on its nodata collar
        except PromptError:
            continue
        inside.append(p)
    return inside


def process_scene(source: str, output: str, job: BatchJob, state: str, run_id: str) -> dict[str, Any]:
    """Process one scene (runs on a worker); returns its manifest record.

    Writes the output atomically, then the state file that marks the scene done.
    """
    try:
        return _process_scene(source, output, job, state, run_id)
    except SegAnyError as exc:
        # A problem with the scene itself (corrupt file, no valid pixels ...): reported as a
        # record, not raised, so worker logs stay quiet and GDAL's exception types (which do
        # not unpickle) stay here. The driver retries it like any failure.
        return {"source": source, "output": None, "status": "failed", "error": str(exc), "run": run_id}


def _process_scene(source: str, output: str, job: BatchJob, state: str, run_id: str) -> dict[str, Any]:
    from .raster import open_raster

    start = time.perf_counter()
    src, out = Path(source), Path(output)
    signature = _source_signature(src)
    stand_in = job.mode != "embed" and job.model is None and ("generator" in job.options or "decoder" in job.options)
    encoder = None if stand_in else _worker_encoder(job.model, job.device)
    raster = open_raster(src, job.bands)
    record: dict[str, Any] = {"source": str(src), "output": out.name, "status": "done", "run": run_id,
                              "job": job.fingerprint(), "signature": signature}
    options = dict(job.options)
    if job.mode == "embed":
        from .tiling import encode_raster

        cache = encode_raster(raster, encoder, out, tile_size=job.tile_size, overlap=job.overlap, **options)
        record["tiles"] = len(cache.grid)
    else:
        from .scene import TileGrid, auto_file, segment_file

        if job.tile_size or job.overlap is not None:
            size = job.tile_size or (encoder.image_size if encoder is not None else 1024)
            options["grid"] = TileGrid(raster.height, raster.width, size, size // 8 if job.overlap is None else job.overlap)
        masks = out.with_name(out.stem + ".masks.tif") if job.masks else None
        if job.mode == "auto":
            record["objects"] = auto_file(raster, out, encoder, masks=masks, **options)
        else:
            from .geo import read_prompts

            prompts = _prompts_on(raster, read_prompts(job.prompts))  # type: ignore[arg-type]
            record["objects"] = segment_file(raster, prompts, out, encoder, masks=masks, **options) if prompts else 0
            if not prompts:
                from .scene import SceneWriter

                SceneWriter(raster, out, masks).close()  # an empty output: the scene was seen
        if masks is not None:
            record["masks"] = masks.name
    record["seconds"] = round(time.perf_counter() - start, 3)
    _write_json(Path(state), record)
    return record


# ------------------------------------------------------------------------------ driver


def _client(scheduler: Any, n_workers: int, threads_per_worker: int, processes: bool) -> tuple[Any, Any]:
    """A distributed Client (and the LocalCluster it owns, if any)."""
    from distributed import Client, LocalCluster

    if scheduler is None:
        cluster = LocalCluster(n_workers=n_workers, threads_per_worker=threads_per_worker, processes=processes,
                               dashboard_address=None)
        return Client(cluster, set_as_default=False), cluster
    if isinstance(scheduler, Client):
        return scheduler, None
    try:
        # set_as_default=False: a batch run must not leave Dask's global scheduler
        # pointing at a client that it closes (later .compute() calls would fail).
        return Client(scheduler, timeout="20s", set_as_default=False), None
    except (OSError, TimeoutError) as exc:
        raise BatchError(f"cannot reach the Dask scheduler at {scheduler} ({exc})") from None


def _done(state: Path, output: Path, source: Path, job: BatchJob) -> dict[str, Any] | None:
    if not state.exists() or not output.exists():
        return None
    try:
        record = json.loads(state.read_text())
    except (OSError, ValueError):
        return None  # a state file is written atomically; an unreadable one means redo
    if record.get("status") != "done" or record.get("job") != job.fingerprint():
        return None
    if record.get("signature") != _source_signature(source):
        return None  # the source changed since
    return record


def run_batch(
    inputs: str | os.PathLike[str] | Sequence[str | os.PathLike[str]],
    outdir: str | os.PathLike[str],
    job: BatchJob,
    *,
    scheduler: Any = None,
    n_workers: int = 2,
    threads_per_worker: int = 1,
    processes: bool = True,
    retries: int = 1,
    progress: ProgressFn | None = None,
    cancel: CancelFn = None,
) -> dict[str, Any]:
    """Process every scene on a Dask cluster, skipping finished ones; returns the manifest.

    Args:
        inputs: glob pattern(s), folder(s) or file(s).
        outdir: output folder (created).
        job: what to do per scene.
        scheduler: None (a new LocalCluster), a scheduler address, or a ``distributed.Client``.
        n_workers, threads_per_worker, processes: the LocalCluster's shape.
        retries: extra attempts for a failing scene before it is reported.
        progress: ``progress(scenes_finished, n_scenes)``.
        cancel: a callable or Event; pending scenes are cancelled and :class:`Cancelled`
            raised (finished scenes stay done).
    """
    from distributed import as_completed

    scenes = find_scenes(inputs)
    outdir = Path(outdir)
    try:
        (outdir / STATE_DIR).mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise BatchError(f"cannot create the output folder {outdir} ({exc})") from None
    for leftover in outdir.glob(".*.tmp-*"):  # from a run that was killed mid-write
        if leftover.is_dir():
            import shutil

            shutil.rmtree(leftover, ignore_errors=True)
        else:
            leftover.unlink(missing_ok=True)
    names = scene_names(scenes)
    run_id = uuid.uuid4().hex[:12]
    manifest: dict[str, Any] = {"segany_version": _version(), "job": _job_summary(job), "run": run_id, "scenes": {}}
    todo = []
    for name, src in zip(names, scenes):
        output = outdir / (name + job.extension())
        state = outdir / STATE_DIR / f"{name}.json"
        record = _done(state, output, src, job)
        if record is not None:
            manifest["scenes"][name] = dict(record, status="done", skipped=True)
        else:
            state.unlink(missing_ok=True)
            todo.append((name, src, output, state))
    total, finished = len(scenes), len(scenes) - len(todo)
    manifest_path = outdir / MANIFEST

    def save() -> None:
        statuses = [r["status"] for r in manifest["scenes"].values()]
        manifest["summary"] = {
            "scenes": total,
            "done": statuses.count("done"),
            "skipped": sum(1 for r in manifest["scenes"].values() if r.get("skipped")),
            "failed": statuses.count("failed"),
            "pending": total - len(statuses),
        }
        _write_json(manifest_path, manifest)

    save()
    if progress is not None:
        progress(finished, total)
    if not todo:
        return manifest
    check_cancel(cancel)
    client, cluster = _client(scheduler, n_workers, threads_per_worker, processes)
    try:
        by_key: dict[str, tuple[str, Path, Path, Path, int]] = {}
        futures = []
        for name, src, output, state in todo:
            fut = client.submit(process_scene, str(src), str(output), job, str(state), run_id,
                                key=f"segany-{name}-{run_id}-0", pure=False)
            by_key[fut.key] = (name, src, output, state, 1)
            futures.append(fut)
        queue = as_completed(futures, loop=client.loop)  # not default_client(): ours is not global
        for fut in queue:
            if cancel is not None:
                try:
                    check_cancel(cancel)
                except Exception:
                    client.cancel(futures)
                    raise
            name, src, output, state, attempt = by_key.pop(fut.key)
            try:
                record = fut.result()
            except Exception as exc:  # a failed scene never stops the others
                record = {"source": str(src), "output": None, "status": "failed",
                          "error": f"{type(exc).__name__}: {exc}", "run": run_id,
                          "traceback": "".join(traceback.format_exception(exc))[-2000:]}
            if record["status"] == "failed" and attempt <= retries:
                retry = client.submit(process_scene, str(src), str(output), job, str(state), run_id,
                                      key=f"segany-{name}-{run_id}-{attempt}", pure=False)
                by_key[retry.key] = (name, src, output, state, attempt + 1)
                futures.append(retry)
                queue.add(retry)
                continue
            record = dict(record, attempts=attempt)
            manifest["scenes"][name] = record
            finished += 1
            save()
            if progress is not None:
                progress(finished, total)
    finally:
        if client is not scheduler:  # ours to close; a caller's Client stays open
            client.close()
        if cluster is not None:
            cluster.close()
    # Scenes in input order, for people reading the manifest.
    manifest["scenes"] = {n: manifest["scenes"][n] for n in names if n in manifest["scenes"]}
    save()
    return manifest


def _version() -> str:
    from . import __version__

    return __version__


def _job_summary(job: BatchJob) -> dict[str, Any]:
    summary = {k: (v if isinstance(v, (str, int, float, bool, type(None), list, tuple)) else repr(v))
               for k, v in asdict(job).items() if k != "options"}
    summary["options"] = {k: (v if isinstance(v, (str, int, float, bool, type(None))) else repr(v))
                          for k, v in job.options.items()}
    summary["fingerprint"] = job.fingerprint()
    return summary


# ------------------------------------------------------------------------------ command line


def _cmd_batch(args: Any) -> int:
    from .tiling import check_model_spec, tqdm_progress

    options: dict[str, Any] = {}
    if args.mode != "embed":
        options.update(to_crs=args.to_crs, simplify=args.simplify)
    if args.mode == "auto":
        options.update(points_per_side=args.points_per_side, pred_iou_thresh=args.pred_iou_thresh,
                       stability_score_thresh=args.stability_score_thresh, merge_iou=args.merge_iou,
                       min_area=args.min_area)
    job = BatchJob(mode=args.mode, model=args.model, output_format=args.format, masks=args.masks,
                   prompts=args.prompts, bands=args.bands, tile_size=args.tile_size, overlap=args.overlap,
                   device=args.device, options=options)
    # Fail fast, before starting a cluster (a missing default model prints what to fetch).
    check_model_spec(args.model)
    progress, close = tqdm_progress("batch", unit="scene", disable=args.quiet)
    try:
        manifest = run_batch(args.inputs, args.output, job, scheduler=args.scheduler, n_workers=args.workers,
                             threads_per_worker=args.threads, retries=args.retries, progress=progress)
    finally:
        close()
    s = manifest["summary"]
    print(f"{args.output}: {s['done']} done ({s['skipped']} already done before), {s['failed']} failed; "
          f"manifest: {Path(args.output) / MANIFEST}")
    for name, record in manifest["scenes"].items():
        if record["status"] == "failed":
            print(f"  failed: {name}: {record['error']}")
    return 1 if s["failed"] else 0


def register_batch_command(subparsers: Any) -> None:
    """Add ``segany batch "DIR/*.tif" -o OUTDIR``."""
    from .scene import add_amg_arguments, add_output_arguments
    from .tiling import add_model_arguments, add_raster_arguments

    parser = subparsers.add_parser(
        "batch", help="process an archive of rasters on a Dask cluster (resumable)",
        description="Process many rasters on a Dask cluster (a local one by default): one output per "
                    "scene plus manifest.json. Reruns skip finished scenes; failed scenes are retried "
                    "and reported without stopping the others (exit status 1 if any failed).")
    parser.add_argument("inputs", nargs="+", help="glob patterns (quote them: \"dir/**/*.tif\"), folders or files")
    parser.add_argument("-o", "--output", required=True, help="output folder")
    parser.add_argument("--mode", choices=tuple(EXTENSIONS), default="auto", help="what to do per scene (default auto)")
    parser.add_argument("--prompts", default=None, help="prompt file in map coordinates (segment mode)")
    parser.add_argument("--format", default=".gpkg", help="vector output extension (default .gpkg)")
    parser.add_argument("--masks", action="store_true", help="also write NAME.masks.tif label rasters")
    parser.add_argument("--scheduler", default=None, help="Dask scheduler address, e.g. tcp://host:8786 "
                                                          "(default: a local cluster)")
    parser.add_argument("--workers", type=int, default=2, help="local cluster worker processes (default 2)")
    parser.add_argument("--threads", type=int, default=1, help="threads per local worker (default 1)")
    parser.add_argument("--retries", type=int, default=1, help="extra attempts for a failing scene (default 1)")
    add_output_arguments(parser)
    add_amg_arguments(parser)
    add_model_arguments(parser)
    add_raster_arguments(parser)
    parser.set_defaults(func=_cmd_batch)
