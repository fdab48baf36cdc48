"""The napari quick-start tutorial runs end to end and its screenshots show something."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "tutorials" / "napari_quickstart.py"
SHOTS = [
    "01_embedded.png",
    "02_click_preview.png",
    "03_next_candidate.png",
    "04_committed.png",
    "06_propagated_slice.png",
    "07_propagated_3d.png",
]


@pytest.mark.slow
def test_quickstart_tutorial_writes_screenshots(tmp_path):
    # A separate process, as a user runs it; pytest-xvfb's DISPLAY is inherited. The
    # model-free stand-in keeps it fast and its masks meaningful without weights.
    env = dict(os.environ, SEGANY_TUTORIAL_OUTPUT=str(tmp_path))
    done = subprocess.run(
        [sys.executable, str(SCRIPT), "--model", "threshold"],
        env=env, capture_output=True, text=True, timeout=300, cwd=ROOT,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "done: 6 screenshots" in done.stdout
    pictures = {}
    for name in SHOTS:
        path = tmp_path / name
        assert path.exists(), f"{name} missing"
        assert path.stat().st_size > 20_000, f"{name} is suspiciously small"
        pixels = np.asarray(Image.open(path).convert("RGB"), dtype=np.float32)
        assert pixels.shape[0] > 400 and pixels.shape[1] > 600
        assert pixels.std() > 10, f"{name} is (nearly) blank"
        pictures[name] = pixels
    # The click changed the picture (preview, point, candidate text), and so did commits.
    assert np.abs(pictures["02_click_preview.png"] - pictures["01_embedded.png"]).mean() > 0.05
    assert np.abs(pictures["04_committed.png"] - pictures["02_click_preview.png"]).mean() > 0.05
    # The committed objects were exported as training data.
    assert (tmp_path / "dataset" / "dataset.json").exists()
    assert list((tmp_path / "dataset" / "labels").glob("*.png"))
