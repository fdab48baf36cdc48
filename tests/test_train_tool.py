"""tools/train_default_model.py: the pieces of the training recipe that choose data (the
bright-field subset of stage 5 and the evaluation's split by image type)."""

from __future__ import annotations

import argparse
import importlib.util
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

TOOL = Path(__file__).resolve().parents[1] / "tools" / "train_default_model.py"


@pytest.fixture(scope="module")
def tool():
    spec = importlib.util.spec_from_file_location("train_default_model", TOOL)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _write(folder: Path, name: str, image: np.ndarray) -> None:
    (folder / "images").mkdir(parents=True, exist_ok=True)
    (folder / "labels").mkdir(parents=True, exist_ok=True)
    Image.fromarray(image).save(folder / "images" / f"{name}.png")
    labels = np.zeros(image.shape[:2], np.uint16)
    labels[2:6, 2:6] = 1
    Image.fromarray(labels).save(folder / "labels" / f"{name}.png")


def _microscopy(root: Path) -> Path:
    folder = root / "microscopy"
    dark = np.zeros((8, 8, 4), np.uint8)
    dark[..., 3] = 255  # an opaque alpha channel (DSB's PNGs have one) must not count as bright
    dark[2:6, 2:6, :3] = 230  # a bright nucleus on black: fluorescence
    bright = np.full((8, 8, 3), 190, np.uint8)
    bright[2:6, 2:6] = 40  # a dark nucleus on a bright background: bright-field
    _write(folder, "fluorescence", dark)
    _write(folder, "brightfield", bright)
    _write(folder, "stained_grey", np.full((8, 8), 150, np.uint8))
    return folder


def test_brightfield_subset_links_only_dark_on_bright_images_with_their_labels(tool, tmp_path):
    out = tmp_path / "subset"
    assert tool.brightfield_subset(_microscopy(tmp_path), out) == 2
    assert sorted(p.name for p in (out / "images").iterdir()) == ["brightfield.png", "stained_grey.png"]
    assert sorted(p.name for p in (out / "labels").iterdir()) == ["brightfield.png", "stained_grey.png"]
    assert (out / "images" / "brightfield.png").is_symlink()  # linked, not copied
    assert tool.brightfield_subset(tmp_path / "microscopy", out) == 2  # a second call changes nothing
    assert len(list((out / "images").iterdir())) == 2


def test_stage5_draws_brightfield_more_and_keeps_stage4s_augmentation(tool, tmp_path):
    train = tmp_path / "train"
    _microscopy(train)
    args = argparse.Namespace(work=tmp_path / "work", train_root=train)
    sources = tool.stage5_sources(args)
    extra = [s for s in sources if s.get("path") == str(tmp_path / "work" / "brightfield" / "microscopy")]
    assert len(extra) == 1 and extra[0]["weight"] == tool.BRIGHTFIELD_WEIGHT > 1
    microscopy = [s for s in sources if "microscopy" in str(s.get("path", "")) or s.get("scene") == "cells"]
    assert len(microscopy) == 3  # the microscopy folder, the bright-field subset, synthetic cells
    for source in microscopy:
        assert source["invert"] == tool.MICROSCOPY_PHOTOMETRIC["invert"] > 0
        assert source["grayscale"] == tool.MICROSCOPY_PHOTOMETRIC["grayscale"] > 0
    others = [s for s in sources if s not in microscopy]
    assert others and all("invert" not in s for s in others)


def test_stage5_trains_the_whole_model_at_1024_px_from_stage4(tool, tmp_path):
    args = argparse.Namespace(
        device="cpu", steps0=1, steps1=1, steps2=1, steps3=1, steps4=1, steps5=1, steps6=7, lr=1e-3,
        masks_per_image=8, masks_per_image2=3, batch_size=8, batch_size2=4, rounds=6, image_size=256,
        image_size2=512, workers=1, time_limit=None, quiet=True, work=tmp_path,
    )
    cfg = tool.train_config(args, "stage5", [], "stage4.pt")
    assert cfg["steps"] == 7 and cfg["optim"]["lr"] == pytest.approx(1e-4)
    assert cfg["model"] == {"config": tool.MODEL_CONFIG, "checkpoint": "stage4.pt"}  # 1024 px input
    assert not any(cfg["freeze"].values())
    assert cfg["rounds"] == 1 and cfg["box_probability"] == 0.3


def test_brightfield_names_split_an_evaluation_by_image_type(tool, tmp_path):
    from segany.datasets import open_dataset

    names = tool._brightfield_names(open_dataset(_microscopy(tmp_path)))
    assert names == {"brightfield", "stained_grey"}
