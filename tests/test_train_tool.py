"""tools/train_default_model.py: the pieces of the training recipe that choose data (the
bright-field subset of stage 5 and the evaluation's split by image type)."""

from __future__ import annotations

import argparse
import importlib.util
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

TOOL = Path(__file__).resolve().parents[1] / "tools" / "train_default_model.py"


@pytest.fixture(scope="module")
def tool():
    spec = importlib.util.spec_from_file_location("train_default_model", TOOL)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    try:
        spec.loader.exec_module(module)
        yield module
    finally:
        sys.modules.pop(spec.name, None)


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


def _args(tmp_path, **steps) -> argparse.Namespace:
    counts = {f"steps{i}": 1 for i in range(9)} | steps
    return argparse.Namespace(
        device="cpu", lr=1e-3, masks_per_image=8, masks_per_image2=3, batch_size=8, batch_size2=4, rounds=6,
        image_size=256, image_size2=512, workers=1, time_limit=None, quiet=True, work=tmp_path, **counts,
    )


def test_stage5_trains_the_whole_model_at_1024_px_from_stage4(tool, tmp_path):
    cfg = tool.train_config(_args(tmp_path, steps6=7), "stage5", [], "stage4.pt")
    assert cfg["steps"] == 7 and cfg["optim"]["lr"] == pytest.approx(1e-4)
    assert cfg["model"] == {"config": tool.MODEL_CONFIG, "checkpoint": "stage4.pt"}  # 1024 px input
    assert not any(cfg["freeze"].values())
    assert cfg["rounds"] == 1 and cfg["box_probability"] == 0.3
    assert cfg["loss"].get("rank", 0.0) == 0.0  # the paper's losses


def test_stage6_trains_the_decoder_to_rank_on_cached_embeddings(tool, tmp_path):
    from segany.training import TrainConfig

    cfg = tool.train_config(_args(tmp_path, steps7=9), "stage6", [{"path": "x"}], "stage5.pt")
    assert cfg["steps"] == 9 and cfg["optim"]["lr"] == pytest.approx(1e-4)
    assert cfg["freeze"] == {"image_encoder": True, "prompt_encoder": False, "mask_decoder": False}
    assert cfg["loss"]["rank"] > 0 and cfg["loss"]["focal"] > 0  # masks and their ranking together
    assert cfg["data"]["augment"]["scale_range"][0] == 0.5  # zooms out further than stage 5
    assert cfg["box_probability"] < 0.3  # more single clicks, whose candidates must be ranked
    parsed = TrainConfig.from_dict(cfg)  # a valid trainer configuration
    assert parsed.loss.rank == cfg["loss"]["rank"] and parsed.freeze.image_encoder


def test_stage7_trains_the_whole_model_with_stage6s_ranking_settings(tool, tmp_path):
    cfg = tool.train_config(_args(tmp_path, steps8=11), "stage7", [{"path": "x"}], "stage5.pt")
    assert cfg["steps"] == 11 and cfg["optim"]["lr"] == pytest.approx(1e-4)
    assert cfg["model"] == {"config": tool.MODEL_CONFIG, "checkpoint": "stage5.pt"}  # 1024 px input
    assert not any(cfg["freeze"].values())  # the encoder trains too, unlike stage 6
    stage6 = tool.train_config(_args(tmp_path), "stage6", [{"path": "x"}], "stage5.pt")
    assert cfg["loss"] == stage6["loss"] and cfg["loss"]["rank"] > 0
    assert cfg["data"]["augment"]["scale_range"] == stage6["data"]["augment"]["scale_range"]
    assert cfg["rounds"] == 1 and cfg["output_dir"].endswith("stage7")


def test_every_stage_has_a_valid_configuration_and_its_own_output(tool, tmp_path):
    from segany.training import TrainConfig

    args = _args(tmp_path)
    outputs = set()
    for stage in tool.STAGES:
        cfg = tool.train_config(args, stage, [{"path": "x"}], None)
        TrainConfig.from_dict(cfg).validate()
        outputs.add(cfg["output_dir"])
    assert len(outputs) == len(tool.STAGES)
    assert set(tool.STAGES) <= set(tool.COMMANDS) and set(tool.ALL) <= set(tool.COMMANDS)
    sizes = {stage: tool.STAGES[stage].input_size(args) for stage in ("warmup", "stage2", "stage3")}
    assert sizes == {"warmup": 256, "stage2": 512, "stage3": 1024}


def test_brightfield_names_split_an_evaluation_by_image_type(tool, tmp_path):
    from segany.datasets import open_dataset

    names = tool._brightfield_names(open_dataset(_microscopy(tmp_path)))
    assert names == {"brightfield", "stained_grey"}


class _FixedRanker:
    """Three candidates per click: the whole image, the object under the click, nothing;
    scored by fixed numbers (a head that ranks by its candidates' averages)."""

    def __init__(self, scores):
        self.scores = np.asarray(scores, np.float32)

    def set_image(self, image):
        self.shape = image.shape[:2]

    def predict(self, point_coords, point_labels, multimask_output=True):
        assert multimask_output and point_labels.tolist() == [1]
        x, y = point_coords[0]
        whole = np.ones(self.shape, bool)
        under = self.labels == self.labels[y, x]
        return np.stack([whole, under, np.zeros(self.shape, bool)]), self.scores, None


def test_candidate_ranking_tells_a_wrong_order_from_bad_candidates(tool, tmp_path):
    from segany.datasets import open_dataset

    dataset = open_dataset(_microscopy(tmp_path))  # 3 images, one 4 x 4 object each in 8 x 8
    ranker = _FixedRanker([0.9, 0.5, 0.1])  # ranks the whole image first: IoU 16/64
    ranker.labels = np.zeros((8, 8), int)
    ranker.labels[2:6, 2:6] = 1
    images, iou, score = tool.candidate_scores(ranker, dataset, min_area=4)
    assert sorted(images) == ["brightfield", "fluorescence", "stained_grey"]
    report = tool.ranking_summary(iou, score)
    assert report["objects"] == 3
    assert report["top"] == pytest.approx(0.25) and report["oracle"] == pytest.approx(1.0)
    assert report["hit"] == 0.0 and report["best_share"] == [0.0, 1.0, 0.0]
    assert report["iou"] == pytest.approx([0.25, 1.0, 0.0])
    assert report["score"] == pytest.approx([0.9, 0.5, 0.1])
    ranker.scores = np.array([0.2, 0.8, 0.1], np.float32)
    right = tool.ranking_summary(*tool.candidate_scores(ranker, dataset, every=2, min_area=4)[1:])
    assert right["objects"] == 2 and right["hit"] == 1.0 and right["top"] == pytest.approx(1.0)
    assert tool.ranking_summary(iou[:0], score[:0]) == {"objects": 0}  # an empty image type
