"""``qgis_process`` runs segany's algorithms from the command line.

The plugin is installed the way users install it (``make qgis-plugin``) into a throw-away
QGIS profile (``QGIS_CUSTOM_CONFIG_PATH``), enabled with ``qgis_process plugins enable``,
and finds segany and torch in this checkout's ``.venv`` by itself. The model comes from
``$SEGANY_MODEL`` (a test checkpoint saved here: nothing is downloaded).
"""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch

import segany
from segany.raster import write_test_raster

ROOT = Path(__file__).resolve().parent.parent
QGIS_PROCESS = Path("/usr/bin/qgis_process.bin")

pytestmark = pytest.mark.skipif(not QGIS_PROCESS.exists(), reason="qgis_process is not installed")


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    d = tmp_path_factory.mktemp("qgis_process")
    config = d / "config"
    subprocess.run(["make", "-s", "-C", str(ROOT), "qgis-plugin", f"QGIS_PROFILE_DIR={config}/profiles/default"],
                   check=True, capture_output=True, text=True)
    link = config / "profiles/default/python/plugins/qgis_segany"
    assert link.is_symlink() and link.resolve() == ROOT / "qgis_segany"
    with torch.random.fork_rng():
        torch.manual_seed(0)
        torch.save(segany.build_sam("test_tiny").state_dict(), d / "tiny.pth")
    pixels = np.full((3, 200, 260), 40, "uint8")
    pixels[:, 60:140, 80:200] = 210
    write_test_raster(d / "scene.tif", pixels)
    env = dict(os.environ, QT_QPA_PLATFORM="offscreen", QGIS_CUSTOM_CONFIG_PATH=str(config),
               SEGANY_MODEL=str(d / "tiny.pth"))
    env.pop("SEGANY_VENV", None)
    enable = subprocess.run([str(QGIS_PROCESS), "plugins", "enable", "qgis_segany"], cwd=d, env=env,
                            capture_output=True, text=True, timeout=120)
    assert enable.returncode == 0, enable.stdout + enable.stderr
    return d, env


def qgis_process(workdir, *args, timeout=300):
    d, env = workdir
    return subprocess.run([str(QGIS_PROCESS), *args], cwd=d, env=env, capture_output=True, text=True, timeout=timeout)


@pytest.mark.slow
def test_qgis_process_runs_automatic_on_a_file(workdir):
    d, _env = workdir
    done = qgis_process(workdir, "run", "segany:automatic", "--", "INPUT=scene.tif", "OUTPUT=out.gpkg")
    assert done.returncode == 0, done.stdout + done.stderr
    assert "Model: test_tiny (" in done.stdout and "tiny.pth" in done.stdout  # $SEGANY_MODEL
    assert "N_OBJECTS:" in done.stdout and "100 - done" in done.stdout
    import geopandas as gpd

    out = gpd.read_file(d / "out.gpkg")
    assert out.crs.to_epsg() == 32633  # the raster's CRS
    assert {"id", "prompt_id", "predicted_iou", "stability_score", "area", "n_tiles", "model", "source"} <= set(out.columns)


def test_qgis_process_lists_the_algorithms_and_reports_bad_input(workdir):
    listed = qgis_process(workdir, "list", timeout=120)
    assert listed.returncode == 0
    for alg in ("segany:encode", "segany:segment_prompts", "segany:automatic"):
        assert alg in listed.stdout
    d, _env = workdir
    (d / "junk.pth").write_text("not a checkpoint")
    failed = qgis_process(workdir, "run", "segany:automatic", "--", "INPUT=scene.tif", "OUTPUT=bad.gpkg",
                          "CHECKPOINT=junk.pth", timeout=120)
    assert failed.returncode != 0 and not (d / "bad.gpkg").exists()
    assert "junk.pth" in failed.stdout + failed.stderr and "not a PyTorch checkpoint" in failed.stdout + failed.stderr
