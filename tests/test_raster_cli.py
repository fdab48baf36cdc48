"""`segany embed | segment | auto | batch`: the command line on real files.

Uses the registered ``test_tiny`` configuration (random, seeded weights) so that separate
processes build the same model; small rasters keep it to one or a few tiles.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import geopandas as gpd
import numpy as np
import pytest

from segany.cache import EmbeddingCache
from segany.cli import main
from segany.raster import write_test_raster
from test_scene import TRANSFORM, centre_lonlat, flood_decoder, make_scene, object_masks  # noqa: F401

SEGANY = [sys.executable, "-m", "segany.cli"]


@pytest.fixture
def small(tmp_path):
    pixels = np.random.default_rng(0).integers(0, 255, (3, 200, 240)).astype("uint8")
    return write_test_raster(tmp_path / "small.tif", pixels, transform=TRANSFORM)


def test_embed_creates_then_resumes_a_cache(tmp_path, small, capsys):
    assert main(["embed", str(small), "--model", "test_tiny", "-q"]) == 0
    out = capsys.readouterr()
    cache_path = tmp_path / "small.test_tiny.zarr"
    assert f"{cache_path}: 1 tiles (1 x 1, 1024 px" in out.out
    assert "segany: warning: model 'test_tiny' is a configuration name" in out.err
    assert EmbeddingCache.open(cache_path).complete
    assert main(["embed", str(small), "--model", "test_tiny", "-q", "-o", str(tmp_path / "c.zarr"),
                 "--tile-size", "128", "--overlap", "16", "--bands", "3,2,1"]) == 0
    assert len(EmbeddingCache.open(tmp_path / "c.zarr").grid) == 4


def test_segment_with_points_in_wgs84_and_a_cache(tmp_path, small, capsys):
    main(["embed", str(small), "--model", "test_tiny", "-q", "-o", str(tmp_path / "c.zarr")])
    lon, lat = centre_lonlat(np.pad(np.ones((50, 50), bool), ((75, 75), (95, 95))))
    out = tmp_path / "objects.geojson"
    code = main(["segment", str(small), "--points", f"{lon},{lat}", f"{lon + 0.0001},{lat},0", "--crs", "EPSG:4326",
                 "--model", "test_tiny", "--cache", str(tmp_path / "c.zarr"), "-o", str(out),
                 "--masks", str(tmp_path / "m.tif"), "-q"])
    assert code == 0, capsys.readouterr().err
    assert "object(s) from 1 prompt(s)" in capsys.readouterr().out
    assert out.exists() and (tmp_path / "m.tif").exists()


def test_segment_reports_user_errors_in_one_line(tmp_path, small, capsys):
    base = ["segment", str(small), "--model", "test_tiny", "-o", str(tmp_path / "o.gpkg")]
    assert main(base + ["--points", "2.0,48.0", "--crs", "EPSG:4326"]) == 2
    err = capsys.readouterr().err
    assert "segany: error: prompt 0 for raster small.tif: point (2, 48) in EPSG:4326" in err
    assert "lies outside the raster" in err and "Traceback" not in err
    assert main(base) == 2
    assert "nothing to segment: give --points" in capsys.readouterr().err
    assert main(base + ["--points", "1;2"]) == 2
    assert "expected x,y or x,y,label" in capsys.readouterr().err
    assert main(["segment", str(small), "--points", "5,5", "--crs", "pixel", "-o", str(tmp_path / "o.shp"),
                 "--model", "test_tiny"]) == 2
    assert "unknown output format '.shp'" in capsys.readouterr().err
    assert not (tmp_path / "o.gpkg").exists()


def test_a_named_model_missing_from_the_cache_says_what_to_fetch(small, capsys, monkeypatch, tmp_path):
    monkeypatch.setenv("SEGANY_HOME", str(tmp_path / "empty_home"))
    for command in (["embed", str(small)], ["auto", str(small), "-o", "x.gpkg"], ["batch", str(small), "-o", "out"]):
        assert main([*command, "--model", "mobile_sam"]) == 2
        assert "segany fetch mobile_sam" in capsys.readouterr().err


def test_segany_model_variable_names_the_default_model(small, capsys, monkeypatch, tmp_path):
    """Without --model the command line uses $SEGANY_MODEL (here a missing registry file)."""
    monkeypatch.setenv("SEGANY_HOME", str(tmp_path / "empty_home"))
    monkeypatch.setenv("SEGANY_MODEL", "sam_vit_b")
    assert main(["embed", str(small), "-q", "-o", str(tmp_path / "c.zarr")]) == 2
    assert "segany fetch sam_vit_b" in capsys.readouterr().err


def test_bad_rasters_from_the_command_line(tmp_path, capsys):
    (tmp_path / "zero.tif").write_bytes(b"")
    assert main(["embed", str(tmp_path / "zero.tif"), "--model", "test_tiny"]) == 2
    assert "zero.tif: the file is empty (0 bytes)" in capsys.readouterr().err
    five = write_test_raster(tmp_path / "five.tif", np.zeros((5, 20, 20), "uint16") + np.arange(20, dtype="uint16"))
    assert main(["embed", str(five), "--model", "test_tiny"]) == 2
    assert "five.tif: has 5 bands" in capsys.readouterr().err
    assert main(["embed", str(five), "--model", "test_tiny", "--bands", "x"]) == 2
    assert "--bands takes band numbers" in capsys.readouterr().err


def test_auto_streams_polygons_and_masks(tmp_path, small, capsys):
    code = main(["auto", str(small), "--model", "test_tiny", "-o", str(tmp_path / "auto.parquet"),
                 "--masks", str(tmp_path / "auto.tif"), "--points-per-side", "2", "--pred-iou-thresh", "0",
                 "--stability-score-thresh", "0", "-q"])
    assert code == 0, capsys.readouterr().err
    gdf = gpd.read_parquet(tmp_path / "auto.parquet")
    assert gdf.crs.to_epsg() == 32633 and set(gdf.model) <= {"test_tiny"}
    assert (tmp_path / "auto.tif").exists()


def state_files(out: Path) -> list[Path]:
    return sorted((out / ".segany-batch").glob("*.json")) if (out / ".segany-batch").exists() else []


def test_killed_batch_resumes_without_losing_or_duplicating_scenes(tmp_path):
    archive = tmp_path / "archive"
    archive.mkdir()
    rng = np.random.default_rng(0)
    for k in range(5):
        write_test_raster(archive / f"s{k}.tif", rng.integers(0, 255, (3, 128, 128)).astype("uint8"))
    (archive / "broken.tif").write_bytes(b"II*\x00" + bytes(200))
    out = tmp_path / "out"
    command = SEGANY + ["batch", str(archive / "*.tif"), "-o", str(out), "--mode", "embed", "--model", "test_tiny",
                        "--workers", "1", "-q"]
    env = dict(os.environ, PYTHONWARNINGS="ignore")
    first = subprocess.Popen(command, start_new_session=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env)
    try:
        deadline = time.monotonic() + 120
        while len(state_files(out)) < 2 and time.monotonic() < deadline and first.poll() is None:
            time.sleep(0.05)
        assert first.poll() is None, first.communicate()
        os.killpg(first.pid, signal.SIGKILL)  # the whole batch: driver, scheduler and workers
    finally:
        first.wait(30)
        first.stdout.close()
        first.stderr.close()
    done_first = {p.stem: json.loads(p.read_text())["run"] for p in state_files(out)}
    assert 2 <= len(done_first) < 5

    second = subprocess.run(command, capture_output=True, text=True, env=env, timeout=180)
    assert second.returncode == 1, second.stderr  # 1: finished, with a failed scene
    assert "5 done" in second.stdout and "1 failed" in second.stdout
    assert "failed: broken: " in second.stdout and "broken.tif: cannot be read as a raster" in second.stdout
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["summary"] == {"scenes": 6, "done": 5, "skipped": len(done_first), "failed": 1, "pending": 0}
    for k in range(5):
        record = manifest["scenes"][f"s{k}"]
        assert record["status"] == "done" and EmbeddingCache.open(out / f"s{k}.zarr").complete
        if f"s{k}" in done_first:  # finished before the kill: not redone
            assert record["run"] == done_first[f"s{k}"] and record["skipped"]
        else:
            assert record["run"] == manifest["run"]
    assert sorted(p.name for p in out.iterdir() if not p.name.startswith(".")) == \
        ["manifest.json"] + [f"s{k}.zarr" for k in range(5)]
    assert not list(out.glob(".*.tmp-*"))
