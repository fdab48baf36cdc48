"""Tests of segany.data_engine: the dataset folder format, pseudo-labelling (with a stub
mask generator and with the real AutomaticMaskGenerator), merging, and the engine loop."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import segany
import segany.datasets
from segany import data_engine as de
from segany.errors import SegAnyError
from segany.synthetic import cells_image, shapes_scene


def _save(path: Path, array: np.ndarray) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path)
    return path


class StubGenerator:
    """Returns each object of a known label image as a record, plus two decoys."""

    def __init__(self, truth: dict[tuple[int, ...], np.ndarray]):
        self.truth = truth
        self.calls = 0

    def generate(self, image):
        self.calls += 1
        labels = self.truth[tuple(np.asarray(image).reshape(-1)[:16].tolist())]
        records = []
        for k in np.unique(labels[labels > 0]):
            m = labels == k
            ys, xs = np.nonzero(m)
            records.append({"segmentation": m, "predicted_iou": 0.95, "stability_score": 0.97,
                            "area": int(m.sum()), "bbox": [int(xs.min()), int(ys.min()), 0, 0],
                            "point_coords": [[float(xs.mean()), float(ys.mean())]]})
        first = labels == labels[labels > 0].min()
        low = np.zeros_like(first)
        low[:4, :4] = True
        records.append({"segmentation": low, "predicted_iou": 0.5, "stability_score": 0.99, "area": 16})
        # A less confident near-duplicate of the first object: must lose the overlap.
        dup = np.roll(first, 1, axis=1)
        records.append({"segmentation": dup, "predicted_iou": 0.9, "stability_score": 0.96, "area": int(dup.sum())})
        return records


def _images(tmp_path: Path, n: int = 3):
    truth, files = {}, []
    for i in range(n):
        image, labels = shapes_scene((64, 64), 4, seed=10 + i)
        files.append(_save(tmp_path / "raw" / f"img {i}.png", image))
        truth[tuple(image.reshape(-1)[:16].tolist())] = labels
    return files, truth


def test_write_sample_layout_manifest_and_prompts(tmp_path):
    image, labels = cells_image((40, 50), n_cells=3, radius=(4, 7), seed=2)
    folder = tmp_path / "ds"
    prompts = {1: [{"points": np.array([[3.0, 4.0]]), "labels": [1]}], 2: [{"box": [1, 2, 10, 12]}]}
    de.write_sample(folder, "a", image, labels, prompts=prompts, source="raw/a.tif", partial=True)
    assert np.array_equal(np.array(Image.open(folder / "images" / "a.png")), image)
    stored = np.array(Image.open(folder / "labels" / "a.png"))
    assert stored.dtype == np.uint16 and np.array_equal(stored, labels)
    assert de.read_prompts(folder, "a")[1][0]["points"] == [[3.0, 4.0]]
    manifest = de.read_manifest(folder)
    assert manifest["format"] == "segany-dataset" and manifest["partial"] is True
    assert manifest["samples"]["a"]["objects"] == 3 and manifest["samples"]["a"]["source"] == "raw/a.tif"
    # Readable by the shared dataset reader and by the trainer's.
    sample = segany.datasets.FolderDataset(folder).validate()[0]
    assert sample.name == "a" and np.array_equal(sample.labels, labels)
    # Replacing a sample without prompts removes its stale prompts; float images are converted.
    de.write_sample(folder, "a", image.astype(np.float32) / 255, labels)
    assert not (folder / "prompts" / "a.json").exists()
    assert de.read_manifest(folder)["samples"]["a"]["converted_from"] == "float32"
    assert not list(folder.rglob(".*.tmp"))


def test_write_sample_rejects_bad_input(tmp_path):
    image, labels = cells_image((40, 50), n_cells=2, radius=(4, 7), seed=1)
    with pytest.raises(SegAnyError, match="labels are 50x30 but the image is 50x40"):
        de.write_sample(tmp_path, "a", image, labels[:30])
    with pytest.raises(SegAnyError, match="sample name '../x'"):
        de.write_sample(tmp_path, "../x", image, labels)
    with pytest.raises(SegAnyError, match="integers"):
        de.write_sample(tmp_path, "a", image, labels.astype(float))


def test_resolve_overlaps_most_confident_first_and_no_fragments():
    big = np.zeros((10, 10), bool)
    big[:, :6] = True
    part = np.zeros((10, 10), bool)
    part[:, :3] = True
    other = np.zeros((10, 10), bool)
    other[:, 5:] = True
    labels, kept = de.resolve_overlaps([big, part, other], [0.9, 0.95, 0.8], (10, 10))
    # part wins its pixels; big keeps the 30 free ones of its 60 (exactly half: kept); other
    # keeps its 40 free pixels of 50.
    assert kept == [1, 0, 2]
    assert (labels[:, :3] == 1).all() and (labels[:, 3:6] == 2).all() and (labels[:, 6:] == 3).all()
    labels, kept = de.resolve_overlaps([big, part], [0.9, 0.95], (10, 10), min_kept_fraction=0.6)
    assert kept == [1]  # the remaining 50 % of big is a fragment below 60 %: dropped


def test_pseudo_label_with_stub_generator_filters_resolves_and_resumes(tmp_path):
    files, truth = _images(tmp_path)
    stub = StubGenerator(truth)
    out = tmp_path / "pseudo"
    report = de.pseudo_label([tmp_path / "raw"], out, generator=stub, progress=False, min_area=4)
    assert sorted(report.written) == ["img_0", "img_1", "img_2"] and stub.calls == 3
    manifest = de.read_manifest(out)
    assert manifest["partial"] is True
    prov = manifest["provenance"]["pseudo_label"]
    assert prov["pred_iou_thresh"] == 0.88 and prov["stability_thresh"] == 0.95 and prov["generator"] == "StubGenerator"
    for name, f in zip(["img_0", "img_1", "img_2"], files):
        entry = manifest["samples"][name]
        labels = np.array(Image.open(out / "labels" / f"{name}.png"))
        true = truth[tuple(np.array(Image.open(f)).reshape(-1)[:16].tolist())]
        n = len(np.unique(true[true > 0]))
        assert entry["objects"] == n == len(np.unique(labels[labels > 0]))
        assert entry["rejected"]["low_iou"] == 1 and entry["rejected"]["overlap"] == 1
        assert entry["candidates"] == n + 2 and entry["source"] == str(f)
        # Same partition of the pixels as the truth (ids may differ).
        for k in np.unique(true[true > 0]):
            assert len(np.unique(labels[true == k])) == 1
        prompts = de.read_prompts(out, name)
        assert len(prompts) == n and prompts[1][0]["pseudo"] is True
    assert report.objects == sum(manifest["samples"][k]["objects"] for k in report.written)
    # Resumable: a second run does nothing; a deleted label file is redone.
    again = de.pseudo_label([tmp_path / "raw"], out, generator=stub, progress=False, min_area=4)
    assert again.written == [] and len(again.skipped) == 3 and stub.calls == 3
    (out / "labels" / "img_1.png").unlink()
    again = de.pseudo_label([tmp_path / "raw"], out, generator=stub, progress=False, min_area=4)
    assert again.written == ["img_1"] and stub.calls == 4
    with pytest.raises(SegAnyError, match="other settings .*pred_iou_thresh: 0.88 -> 0.5"):
        de.pseudo_label([tmp_path / "raw"], out, generator=stub, pred_iou_thresh=0.5, progress=False, min_area=4)
    # The result trains: the trainer reads the folder as a partial source.
    from segany.training.data import ImageLabelFolder, check_source

    ok, errors, _ = check_source(ImageLabelFolder(out))
    assert len(ok) == 3 and not errors


def test_pseudo_label_reports_missing_and_duplicate_images(tmp_path):
    with pytest.raises(SegAnyError, match="not found: .*nope.png"):
        de.pseudo_label([tmp_path / "nope.png"], tmp_path / "o", generator=StubGenerator({}), progress=False)
    _save(tmp_path / "a" / "x.png", np.zeros((4, 4), np.uint8))
    _save(tmp_path / "b" / "x.png", np.zeros((4, 4), np.uint8))
    with pytest.raises(SegAnyError, match="two images named 'x'"):
        de.pseudo_label([tmp_path / "a", tmp_path / "b"], tmp_path / "o", generator=StubGenerator({}), progress=False)


def test_pseudo_label_with_the_real_automatic_mask_generator(tmp_path):
    image, _ = shapes_scene((64, 64), 3, seed=1)
    raw = _save(tmp_path / "raw" / "scene.png", image)
    sam = segany.build_sam("test_tiny")
    generator = segany.AutomaticMaskGenerator(sam, points_per_side=4, pred_iou_thresh=0.0,
                                              stability_score_thresh=0.0, output_mode="binary_mask")
    report = de.pseudo_label([raw], tmp_path / "out", generator=generator, pred_iou_thresh=0.0,
                             stability_thresh=0.0, min_area=1, progress=False)
    assert report.written + report.empty == ["scene"]
    if report.written:
        labels = np.array(Image.open(tmp_path / "out" / "labels" / "scene.png"))
        assert labels.shape == (64, 64) and labels.max() == report.objects


def test_pseudo_label_command_line_with_a_trained_checkpoint(tmp_path):
    from segany.cli import main
    from segany.training.checkpointing import save_model

    image, _ = shapes_scene((48, 48), 3, seed=2)
    raw = _save(tmp_path / "raw" / "s.png", image)
    torch.manual_seed(0)
    ckpt = save_model(segany.build_sam("test_tiny"), tmp_path / "m" / "model.pt", step=1)
    args = ["pseudo-label", str(raw), "-o", str(tmp_path / "out"), "--model", str(ckpt), "-q",
            "--pred-iou-thresh", "0", "--stability-thresh", "0", "--points-per-side", "3", "--min-area", "1"]
    assert main(args) == 0
    manifest = de.read_manifest(tmp_path / "out")
    assert "s" in manifest["samples"] and manifest["provenance"]["pseudo_label"]["points_per_side"] == 3
    assert main(["pseudo-label", str(tmp_path / "missing.png"), "-o", str(tmp_path / "o2")]) == 2


def test_merge_labels_adds_unlabelled_objects_only():
    manual = np.zeros((20, 20), np.uint16)
    manual[2:8, 2:8] = 1
    pseudo = np.zeros((20, 20), np.uint16)
    pseudo[2:8, 2:9] = 3  # the same building, slightly different: not added
    pseudo[12:18, 12:18] = 4  # a building OSM missed: added
    pseudo[0:2, 0:20] = 5  # mostly free (overlap 0 %): added, clipped
    merged = de.merge_labels(manual, pseudo, min_area=4)
    assert (merged[2:8, 2:8] == 1).all() and merged[2:8, 8].max() == 0
    assert len(np.unique(merged[12:18, 12:18])) == 1 and merged[12, 12] not in (0, 1)
    assert len(np.unique(merged[merged > 0])) == 3


def test_merge_datasets_and_engine_round(tmp_path):
    from segany.training import TrainConfig
    from segany.training.config import DataSource

    manual = tmp_path / "manual"
    for i in range(2):
        image, labels = shapes_scene((64, 64), 4, seed=i)
        partial = labels.copy()
        partial[partial > 2] = 0  # "OSM": only some objects labelled
        de.write_sample(manual, f"t{i}", image, partial, partial=True)
    files, truth = _images(tmp_path, 2)
    pseudo = tmp_path / "pseudo"
    de.pseudo_label(files, pseudo, generator=StubGenerator(truth), progress=False, min_area=4)
    merged = de.merge_datasets(manual, pseudo, tmp_path / "merged")
    m = de.read_manifest(merged)
    assert m["partial"] is True and set(m["samples"]) == {"t0", "t1", "img_0", "img_1"}

    small = dict(encoder="vit", encoder_kwargs=dict(embed_dim=32, depth=1, num_heads=2, global_attn_indexes=[0],
                                                    window_size=0), image_size=64, patch_size=16)
    cfg = TrainConfig.from_dict({
        "model": {"config": "engine_small_64", "architecture": small}, "steps": 1, "rounds": 2, "batch_size": 1,
        "num_threads": 1,
        "data": {"train": [{"path": str(manual), "partial": True}], "masks_per_image": 1},
        "progress": False, "output_dir": str(tmp_path / "ignored"),
    })
    cfg_path = tmp_path / "round0.yaml"
    cfg.to_yaml(cfg_path)
    stubs = []

    def factory(sam):
        stubs.append(StubGenerator(truth))
        return stubs[-1]

    next_path = de.engine_round(cfg_path, files, tmp_path / "round1", generator_factory=factory, progress=False)
    nxt = segany.training.load_config(next_path)
    assert [s.path for s in nxt.data.train][0] == str(manual)
    assert nxt.data.train[-1] == DataSource(path=str((tmp_path / "round1" / "pseudo").resolve()), partial=True)
    assert nxt.model.checkpoint == str((tmp_path / "round1" / "train" / "model.pt").resolve())
    assert (tmp_path / "round1" / "train" / "model.pt").exists() and stubs[0].calls == 2
    assert json.loads((tmp_path / "round1" / "pseudo" / "dataset.json").read_text())["partial"] is True
