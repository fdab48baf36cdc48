"""segany.batch: archives of rasters on a Dask cluster: outputs, manifest, reruns, failures.

These tests use an in-process LocalCluster (threads) with two workers to stay fast; the
process-based default, a killed run and its rerun are tested through the command line in
test_raster_cli.py.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import geopandas as gpd
import numpy as np
import pytest

from segany.batch import STATE_DIR, BatchError, BatchJob, find_scenes, run_batch, scene_names
from segany.cache import EmbeddingCache
from test_scene import ComponentGenerator, make_scene
from test_tiling import SMALL


class FlakyGenerator(ComponentGenerator):
    """Fails the first attempt at each scene (a marker file remembers), then works."""

    def __init__(self, folder):
        super().__init__()
        self.folder = str(folder)

    def __call__(self, ctx):
        marker = Path(self.folder) / (ctx.raster.path.stem + ".tried")
        if not marker.exists():
            marker.write_text("x")
            raise RuntimeError(f"transient failure on {ctx.raster.path.name}")
        return super().__call__(ctx)


@pytest.fixture
def archive(tmp_path):
    folder = tmp_path / "archive"
    folder.mkdir()
    for k in range(4):
        make_scene(folder, name=f"scene{k}.tif")
    (folder / "corrupt.tif").write_bytes(b"II*\x00" + os.urandom(300))
    return folder


def auto_job(**kw):
    return BatchJob(mode="auto", tile_size=256, overlap=32, options={"generator": ComponentGenerator()}, **kw)


def run(archive, out, job, **kw):
    kw.setdefault("processes", False)
    return run_batch(str(archive / "*.tif"), out, job, n_workers=2, **kw)


def test_batch_writes_one_output_per_scene_and_reports_the_corrupt_one(tmp_path, archive):
    out = tmp_path / "out"
    finished = []
    manifest = run(archive, out, auto_job(), progress=lambda d, t: finished.append((d, t)))
    assert manifest["summary"] == {"scenes": 5, "done": 4, "skipped": 0, "failed": 1, "pending": 0}
    bad = manifest["scenes"]["corrupt"]
    assert bad["status"] == "failed" and bad["attempts"] == 2  # retried once, then reported
    assert "corrupt.tif: cannot be read as a raster" in bad["error"]
    for k in range(4):
        record = manifest["scenes"][f"scene{k}"]
        assert record["status"] == "done" and record["objects"] == 5 and record["output"] == f"scene{k}.gpkg"
        assert len(gpd.read_file(out / f"scene{k}.gpkg")) == 5
    assert json.loads((out / "manifest.json").read_text())["summary"]["failed"] == 1
    assert finished[-1] == (5, 5)
    assert sorted(p.name for p in out.iterdir()) == [STATE_DIR, "manifest.json"] + [f"scene{k}.gpkg" for k in range(4)]


def test_rerun_skips_finished_scenes_and_redoes_changed_ones(tmp_path, archive):
    out = tmp_path / "out"
    first = run(archive, out, auto_job())
    stamps = {k: (out / f"scene{k}.gpkg").stat().st_mtime_ns for k in range(4)}
    second = run(archive, out, auto_job())
    assert second["summary"]["skipped"] == 4 and second["summary"]["done"] == 4
    assert {k: (out / f"scene{k}.gpkg").stat().st_mtime_ns for k in range(4)} == stamps
    assert all(second["scenes"][f"scene{k}"]["run"] == first["run"] for k in range(4))
    make_scene(archive, name="scene2.tif", dtype="int16")  # the source changed
    third = run(archive, out, auto_job())
    assert third["scenes"]["scene2"]["run"] == third["run"] and third["summary"]["skipped"] == 3
    # another job (other options) redoes everything
    fourth = run(archive, out, auto_job(masks=True))
    assert fourth["summary"]["skipped"] == 0 and (out / "scene0.masks.tif").exists()


def test_transient_failures_are_retried(tmp_path, archive):
    job = BatchJob(mode="auto", tile_size=256, overlap=32, options={"generator": FlakyGenerator(tmp_path)})
    manifest = run(archive, tmp_path / "out", job)
    assert manifest["scenes"]["scene0"]["status"] == "done" and manifest["scenes"]["scene0"]["attempts"] == 2
    job = BatchJob(mode="auto", tile_size=256, overlap=32, options={"generator": FlakyGenerator(tmp_path / "o2")})
    (tmp_path / "o2").mkdir()
    manifest = run(archive, tmp_path / "out2", job, retries=0)
    failed = manifest["scenes"]["scene1"]
    assert failed["status"] == "failed" and "RuntimeError: transient failure on scene1.tif" in failed["error"]
    assert "Traceback" in failed["traceback"]


def test_embed_mode_with_a_small_model_config(tmp_path, archive):
    (archive / "corrupt.tif").unlink()
    manifest = run(archive, tmp_path / "out", BatchJob(mode="embed", model=SMALL, tile_size=256, overlap=32))
    assert manifest["summary"]["done"] == 4
    cache = EmbeddingCache.open(tmp_path / "out" / "scene0.zarr")
    assert cache.complete and cache.model_type == "segany_geo_test" and len(cache.grid) == 9


def test_scene_discovery_and_names(tmp_path):
    for sub in ("a", "b"):
        (tmp_path / sub).mkdir()
        (tmp_path / sub / "x.tif").write_bytes(b"")
    (tmp_path / "b" / "y.TIF").write_bytes(b"")
    scenes = find_scenes([str(tmp_path / "*" / "*.tif"), tmp_path / "b"])
    assert [p.name for p in scenes] == ["x.tif", "x.tif", "y.TIF"]
    assert scene_names(scenes) == ["a__x", "b__x", "y"]
    with pytest.raises(BatchError, match="no raster matches"):
        find_scenes(str(tmp_path / "*.jp2"))


def test_job_validation():
    with pytest.raises(BatchError, match="batch mode must be one of"):
        BatchJob(mode="paint")
    with pytest.raises(BatchError, match="needs a prompt file"):
        BatchJob(mode="segment")
    with pytest.raises(BatchError, match="output format"):
        BatchJob(output_format="shp")
    assert BatchJob(output_format="fgb").extension() == ".fgb"
    assert BatchJob(options={"a": 1}).fingerprint() != BatchJob(options={"a": 2}).fingerprint()


def test_segment_mode_gives_each_scene_its_prompts(tmp_path):
    import shapely
    from test_scene import TRANSFORM, centre_lonlat, object_masks

    folder = tmp_path / "archive"
    folder.mkdir()
    make_scene(folder, name="here.tif")
    from segany.raster import write_test_raster

    write_test_raster(folder / "elsewhere.tif", np.arange(64 * 64, dtype="uint16").reshape(1, 64, 64),
                      transform=type(TRANSFORM)(0.5, 0, 200000.0, 0, -0.5, 4000000.0))
    lon, lat = centre_lonlat(object_masks()[0])
    gpd.GeoDataFrame({"label": [1]}, geometry=[shapely.Point(lon, lat)], crs="EPSG:4326").to_file(tmp_path / "p.gpkg")
    job = BatchJob(mode="segment", prompts=str(tmp_path / "p.gpkg"), tile_size=256, overlap=32,
                   options={"decoder": __import__("test_scene").flood_decoder})
    manifest = run(folder, tmp_path / "out", job)
    assert manifest["scenes"]["here"]["objects"] == 1 and manifest["scenes"]["elsewhere"]["objects"] == 0
    assert len(gpd.read_file(tmp_path / "out" / "elsewhere.gpkg")) == 0


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def remote_cluster(tmp_path):
    """A Dask scheduler and one worker as separate processes on the loopback interface:
    what `segany batch --scheduler tcp://HOST:PORT` meets on a real cluster."""
    import subprocess
    import sys
    import time

    from distributed import Client

    port = _free_port()
    address = f"tcp://127.0.0.1:{port}"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(Path(__file__).parent), os.environ.get("PYTHONPATH", "")])}
    logs = open(tmp_path / "cluster.log", "w")
    procs = [subprocess.Popen([sys.executable, "-m", "distributed.cli.dask_scheduler", "--host", "127.0.0.1",
                               "--port", str(port), "--dashboard-address", ":0"], stdout=logs, stderr=logs, env=env)]
    procs.append(subprocess.Popen([sys.executable, "-m", "distributed.cli.dask_worker", address, "--nthreads", "1",
                                   "--nworkers", "1", "--no-dashboard", "--local-directory", str(tmp_path / "w")],
                                  stdout=logs, stderr=logs, env=env))
    try:
        deadline = time.monotonic() + 60
        while True:  # wait until the worker has registered with the scheduler
            try:
                with Client(address, timeout="5s") as client:
                    if client.scheduler_info()["workers"]:
                        break
            except OSError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError(f"the test cluster did not start: {(tmp_path / 'cluster.log').read_text()}")
            time.sleep(0.5)
        yield address
    finally:
        for p in reversed(procs):
            p.terminate()
        for p in procs:
            try:
                p.wait(timeout=20)
            except subprocess.TimeoutExpired:
                p.kill()
        logs.close()


@pytest.mark.slow
def test_batch_on_an_existing_scheduler_from_the_command_line(tmp_path, remote_cluster, capsys):
    """The worker is another process that loads the model itself; results, manifest and a
    rerun behave as with the default LocalCluster."""
    from segany.cli import main

    folder = tmp_path / "archive"
    folder.mkdir()
    for k in range(2):
        make_scene(folder, name=f"scene{k}.tif")
    out = tmp_path / "out"
    args = ["batch", str(folder / "*.tif"), "-o", str(out), "--mode", "embed", "--model", "test_tiny",
            "--scheduler", remote_cluster, "-q"]
    assert main(args) == 0, capsys.readouterr().err
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["summary"]["done"] == 2 and manifest["summary"]["failed"] == 0
    for k in range(2):
        assert EmbeddingCache.open(out / manifest["scenes"][f"scene{k}"]["output"]).complete
    assert main(args) == 0
    assert json.loads((out / "manifest.json").read_text())["summary"]["skipped"] == 2
    _assert_global_dask_untouched()


def _assert_global_dask_untouched():
    """A batch run leaves Dask's global scheduler alone: plain .compute() still works after it
    (a client left as the default, then closed, broke every later dask computation)."""
    import dask
    import dask.array as da

    assert dask.config.get("scheduler", None) is None
    assert int(da.ones(10, chunks=5).sum().compute()) == 10


def test_an_unreachable_scheduler_is_a_clear_error(tmp_path, archive):
    address = f"tcp://127.0.0.1:{_free_port()}"  # nothing listens there
    with pytest.raises(BatchError, match=f"cannot reach the Dask scheduler at {address}"):
        run_batch(str(archive / "*.tif"), tmp_path / "out", BatchJob(mode="embed", model="test_tiny"),
                  scheduler=address)
    _assert_global_dask_untouched()
