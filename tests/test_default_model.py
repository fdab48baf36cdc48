"""segany's shipped default model: hash-checked loading, a damaged installation, and real
segmentation of held-out objects (images it was never trained on)."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import numpy as np
import pytest
import torch

import segany
from segany import checkpoints
from segany.errors import CheckpointError
from segany.evaluation import evaluate, object_centre
from segany.predictor import SamPredictor

DATA_ROOT = Path(os.environ.get("SEGANY_TRAIN_DATA", "/work/shared/data/train"))
# Held out of training (tools/train_default_model.py): never seen by the shipped model.
DSB_TEST = DATA_ROOT / "microscopy" / "dsb2018_stage1_test"


def test_shipped_weights_match_the_registry_and_fit_the_wheel_budget():
    info = checkpoints.REGISTRY[checkpoints.DEFAULT_MODEL]
    path = checkpoints.checkpoint_path(info.name)
    assert info.bundled and path.is_file() and path.parent == checkpoints.bundled_weights_dir()
    data = path.read_bytes()
    assert len(data) == info.size <= 25 * 1024 * 1024
    assert hashlib.sha256(data).hexdigest() == info.sha256
    state = torch.load(path, map_location="cpu", weights_only=True)
    assert {v.dtype for v in state.values() if v.is_floating_point()} == {torch.float16}  # compact storage
    assert checkpoints.fetch(info.name, progress=False) == path  # nothing to download


def test_load_model_without_a_name_is_the_shipped_model():
    sam = segany.load_model(device="cpu")
    assert sam.model_type == checkpoints.DEFAULT_MODEL
    assert tuple(sam.prompt_encoder.image_embedding_size) == (64, 64) and sam.image_encoder.img_size == 1024
    assert all(p.dtype == torch.float32 for p in sam.parameters())  # fp16 storage, fp32 compute
    with torch.inference_mode():
        emb = sam.image_encoder(torch.zeros(1, 3, 1024, 1024))
    assert tuple(emb.shape) == (1, 256, 64, 64)  # SAM's interface: everything downstream works


@pytest.mark.parametrize("damage", ["truncated", "missing", "flipped"])
def test_a_damaged_installation_is_reported(tmp_path, monkeypatch, damage):
    info = checkpoints.REGISTRY[checkpoints.DEFAULT_MODEL]
    source = checkpoints.checkpoint_path(info.name)
    monkeypatch.setattr(checkpoints, "bundled_weights_dir", lambda: tmp_path)
    if damage != "missing":
        data = bytearray(source.read_bytes())
        if damage == "truncated":
            data = data[: len(data) // 2]
        else:
            data[len(data) // 2] ^= 0xFF
        (tmp_path / info.filename).write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="reinstall segany") as err:
        segany.load_model(device="cpu")
    assert str(tmp_path / info.filename) in str(err.value)


@pytest.mark.skipif(not DSB_TEST.is_dir(), reason=f"shared data not found at {DSB_TEST}")
def test_shipped_model_segments_held_out_nuclei():
    """Single clicks at nucleus centres of held-out DSB 2018 test images: the shipped model
    segments them above a fixed IoU, and its training is what does it (the same architecture
    with untrained weights fails). It does *not* yet beat the Otsu-window baseline on
    microscopy as a whole (see docs/model-card.md); that goal is tracked, not asserted."""
    from segany.datasets import open_dataset
    from segany.build import build_sam

    samples = list(open_dataset(DSB_TEST))[:4]
    trained = evaluate(samples, SamPredictor(segany.load_model(device="cpu")), ["point", "box"],
                       max_objects=8, min_area=30)
    torch.manual_seed(0)
    untrained = evaluate(samples, SamPredictor(build_sam(checkpoints.DEFAULT_MODEL)),
                         ["point", "box"], max_objects=8, min_area=30)
    assert trained.miou("point") >= 0.60, trained.table()
    assert trained.miou("box") >= 0.60, trained.table()
    assert trained.miou("point") > untrained.miou("point") + 0.3, (trained.table(), untrained.table())


@pytest.mark.skipif(not DSB_TEST.is_dir(), reason=f"shared data not found at {DSB_TEST}")
def test_one_held_out_nucleus_by_hand():
    """The same check spelled out for one object: click, take the top-ranked mask, IoU."""
    from segany.datasets import open_dataset

    sample = next(iter(open_dataset(DSB_TEST)))
    labels = sample.labels
    ids, counts = np.unique(labels[labels > 0], return_counts=True)
    target = labels == ids[np.argmax(counts)]  # the largest nucleus of the image
    x, y = object_centre(target)
    predictor = SamPredictor(segany.load_model(device="cpu"))
    predictor.set_image(sample.image)
    masks, scores, _ = predictor.predict(point_coords=np.array([[x, y]]), point_labels=np.array([1]))
    best = masks[int(np.argmax(scores))]
    iou = (best & target).sum() / (best | target).sum()
    assert iou >= 0.6, iou
