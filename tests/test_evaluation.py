"""Tests of segany.evaluation: SAM-paper protocols on cases whose numbers are known.

Predictors here are small fakes (an oracle, a shifted oracle, one that misses half of
the object) so that every expected IoU can be computed by hand; one test runs the tiny
random SAM to check that batched and one-by-one prompting agree.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from scipy import ndimage

from segany import cli
from segany.datasets import FolderDataset, Sample, rle_encode
from segany.errors import SegAnyError
from segany.evaluation import (
    AR_THRESHOLDS,
    EvaluationResult,
    GroundTruth,
    OtsuClickPredictor,
    average_recall,
    evaluate,
    evaluate_auto,
    evaluate_clicks,
    mask_iou,
    next_click,
    object_centre,
    parse_protocols,
    score_clicks,
    select_objects,
)
from segany.synthetic import cells_image, shapes_scene

# ---------------------------------------------------------------------------- fixtures


def rectangle_scene() -> tuple[np.ndarray, np.ndarray]:
    """A 20 x 10 (W x H) rectangle (id 1) and a 8 x 8 square (id 2) on a 40 x 60 image."""
    labels = np.zeros((40, 60), np.uint16)
    labels[5:15, 10:30] = 1
    labels[25:33, 40:48] = 2
    image = np.where(labels > 0, 200, 30).astype(np.uint8)
    return image, labels


class OraclePredictor:
    """Returns the ground-truth mask of the object under the first positive click or box."""

    def __init__(self, labels: np.ndarray, shift: int = 0) -> None:
        self.labels = labels
        self.shift = shift  # move every answer by this many pixels in x
        self.calls: list[dict] = []

    def set_image(self, image: np.ndarray) -> None:
        assert image.shape[:2] == self.labels.shape

    def _object(self, point_coords, point_labels, box) -> np.ndarray:
        if box is not None:
            x0, y0, x1, y1 = (int(v) for v in box)
            ids, counts = np.unique(self.labels[y0 : y1 + 1, x0 : x1 + 1], return_counts=True)
            counts[ids == 0] = 0
            return self.labels == ids[np.argmax(counts)]
        x, y = (int(v) for v in np.asarray(point_coords)[np.asarray(point_labels) == 1][0])
        return self.labels == self.labels[y, x]

    def predict(self, point_coords=None, point_labels=None, box=None, mask_input=None, multimask_output=True):
        self.calls.append(dict(point_coords=None if point_coords is None else np.array(point_coords),
                               point_labels=None if point_labels is None else np.array(point_labels),
                               box=box, mask_input=mask_input, multimask_output=multimask_output))
        mask = self._object(point_coords, point_labels, box)
        if self.shift:
            mask = np.roll(mask, self.shift, axis=1)
        if not multimask_output:
            return mask[None], np.array([0.9]), None
        # The best mask is ranked first: top-ranked and oracle agree.
        return np.stack([mask, np.zeros_like(mask), np.ones_like(mask)]), np.array([0.9, 0.1, 0.2]), None


class MisrankingPredictor(OraclePredictor):
    """Multimask answers where the right mask has the lowest score."""

    def predict(self, point_coords=None, point_labels=None, box=None, mask_input=None, multimask_output=True):
        mask = self._object(point_coords, point_labels, box)
        empty = np.zeros_like(mask)
        return np.stack([empty, mask, empty]), np.array([0.9, 0.1, 0.5]), None


class HalfPredictor(OraclePredictor):
    """Click 1: only the left half of the object (or, with ``spill``, object plus a blob)."""

    def __init__(self, labels: np.ndarray, spill: np.ndarray | None = None) -> None:
        super().__init__(labels)
        self.spill = spill

    def predict(self, point_coords=None, point_labels=None, box=None, mask_input=None, multimask_output=True):
        self.calls.append(dict(point_coords=np.array(point_coords), point_labels=np.array(point_labels),
                               mask_input=mask_input, multimask_output=multimask_output))
        mask = self._object(point_coords, point_labels, None)
        if len(self.calls) == 1:
            if self.spill is not None:
                first = mask | self.spill
            else:
                cols = np.flatnonzero(mask.any(0))
                first = mask.copy()
                first[:, cols[len(cols) // 2] :] = False
            logits = np.stack([np.full((256, 256), 7.0), np.zeros((256, 256)), np.zeros((256, 256))])
            return np.stack([first, np.zeros_like(mask), np.zeros_like(mask)]), np.array([0.8, 0.1, 0.1]), logits
        return mask[None], np.array([0.9]), np.zeros((1, 256, 256))


def one_object(labels: np.ndarray, object_id: int = 1) -> list[GroundTruth]:
    return [GroundTruth.from_mask(object_id, labels == object_id)]


# ---------------------------------------------------------------------------- metrics


def test_mask_iou_of_a_shifted_rectangle():
    a = np.zeros((10, 40), bool)
    a[:, 5:25] = True
    assert mask_iou(a, np.roll(a, 2, axis=1)) == pytest.approx(18 * 10 / (22 * 10))
    assert mask_iou(a, a) == 1.0
    assert mask_iou(np.zeros_like(a), a) == 0.0


def test_object_centre_is_the_distance_transform_maximum():
    _, labels = shapes_scene((96, 96), n_shapes=5, seed=3)
    for object_id in np.unique(labels[labels > 0]):
        mask = labels == object_id
        x, y = object_centre(mask)
        dist = ndimage.distance_transform_edt(np.pad(mask, 1))[1:-1, 1:-1]
        assert mask[y, x] and dist[y, x] == dist.max()


def test_object_centre_counts_the_image_edge_as_boundary():
    mask = np.zeros((20, 20), bool)
    mask[:, :6] = True  # a strip along the left edge: its centre is 3 px in, not at x = 5
    assert object_centre(mask)[0] in (2, 3)


def test_next_click_targets_the_largest_error_region_with_its_label():
    gt = np.zeros((30, 40), bool)
    gt[5:15, 10:30] = True
    missed = gt.copy()
    missed[:, 20:] = False  # right half (10 x 10) missed
    x, y, label = next_click(missed, gt)
    assert label == 1 and 20 <= x < 30 and 5 <= y < 15
    spilled = gt.copy()
    spilled[18:28, 2:14] = True  # a 12 x 10 false positive, the only error
    x, y, label = next_click(spilled, gt)
    assert label == 0 and 2 <= x < 14 and 18 <= y < 28
    assert next_click(gt, gt) is None


def test_average_recall_counts_thresholds():
    assert average_recall([1.0, 1.0]) == 1.0
    assert average_recall([1.0, 0.0]) == 0.5
    assert average_recall([0.7]) == pytest.approx(5 / 10)  # 0.50 ... 0.70 matched
    assert len(AR_THRESHOLDS) == 10 and AR_THRESHOLDS[0] == 0.5 and AR_THRESHOLDS[-1] == 0.95


def test_select_objects_filters_small_and_samples_reproducibly():
    _, labels = cells_image((160, 160), n_cells=12, radius=(5, 10), seed=4)
    labels[0, 0] = 99  # a one-pixel object
    sample = Sample(labels, "cells", labels=labels)
    all_ids = [o.object_id for o in select_objects(sample, None, min_area=10)]
    assert 99 not in all_ids and len(all_ids) >= 6
    chosen = [o.object_id for o in select_objects(sample, 4, min_area=10, seed=1)]
    assert len(chosen) == 4 and set(chosen) <= set(all_ids)
    assert chosen == [o.object_id for o in select_objects(sample, 4, min_area=10, seed=1)]


def test_parse_protocols_rejects_unknown_names():
    assert parse_protocols("point,box") == ("point", "box")
    with pytest.raises(SegAnyError, match="unknown protocol"):
        parse_protocols("point,lasso")


# ---------------------------------------------------------------------------- protocols


def test_perfect_predictor_scores_one_everywhere():
    image, labels = rectangle_scene()
    oracle = OraclePredictor(labels)
    masks_of = lambda img: [labels == 1, labels == 2]  # noqa: E731
    result = evaluate([Sample(image, "rect", labels=labels)], oracle, ["point", "clicks", "box", "auto"],
                      mask_generator=masks_of, clicks=3, min_area=1)
    summary = result.summary()
    assert {r["protocol"] for r in summary} == {"point", "point_oracle", "clicks", "box", "auto@100", "auto@1000"}
    assert all(r["mIoU"] == 1.0 and r["objects"] == 2 for r in summary)
    assert [r["clicks"] for r in summary if r["protocol"] == "clicks"] == [1, 2, 3]
    assert result.average_recall(100) == result.average_recall(1000) == 1.0


def test_shifted_predictor_gives_the_hand_computed_iou():
    image, labels = rectangle_scene()
    result = evaluate([Sample(image, "rect", labels=labels)], OraclePredictor(labels, shift=2),
                      ["point", "box"], min_area=1)
    rect = [r for r in result.rows if r.object_id == 1]
    square = [r for r in result.rows if r.object_id == 2]
    assert [r.protocol for r in rect] == ["point", "point_oracle", "box"]
    assert all(r.iou == pytest.approx(18 * 10 / (22 * 10)) for r in rect)
    assert all(r.iou == pytest.approx(6 * 8 / (10 * 8)) for r in square)
    assert rect[0].area == 200


def test_point_protocol_clicks_the_centre_and_separates_top_ranked_from_oracle():
    image, labels = rectangle_scene()
    oracle = OraclePredictor(labels)
    evaluate([Sample(image, "rect", labels=labels)], oracle, ["point"], min_area=1)
    (x, y), = oracle.calls[0]["point_coords"]
    assert oracle.calls[0]["multimask_output"] and labels[int(y), int(x)] == 1
    assert (x, y) == object_centre(labels == 1)
    result = evaluate([Sample(image, "rect", labels=labels)], MisrankingPredictor(labels), ["point"], min_area=1)
    assert result.miou("point") == 0.0 and result.miou("point_oracle") == 1.0


def test_box_protocol_sends_the_tight_box():
    image, labels = rectangle_scene()
    oracle = OraclePredictor(labels)
    evaluate([Sample(image, "rect", labels=labels)], oracle, ["box"], min_area=1)
    boxes = [c["box"].tolist() for c in oracle.calls]
    assert boxes == [[10, 5, 29, 14], [40, 25, 47, 32]]
    assert not any(c["multimask_output"] for c in oracle.calls)


def test_second_click_goes_to_the_missed_half_with_positive_label():
    _, labels = rectangle_scene()
    predictor = HalfPredictor(labels)
    rows = score_clicks(predictor, one_object(labels), "rect", clicks=3)
    first, second = predictor.calls[0], predictor.calls[1]
    assert first["multimask_output"] and not second["multimask_output"]
    assert second["point_labels"].tolist() == [1, 1]
    x, y = second["point_coords"][1]
    assert 20 <= x < 30 and 5 <= y < 15  # the missed right half (columns 20..29)
    missed = labels == 1
    missed[:, :20] = False
    assert (x, y) == object_centre(missed)
    # The kept mask's low-res logits come back as mask_input (1 x 256 x 256).
    assert second["mask_input"].shape == (1, 256, 256) and second["mask_input"].max() == 7.0
    assert [r.iou for r in rows] == [pytest.approx(0.5), 1.0, 1.0]
    assert len(predictor.calls) == 2  # exact after click 2: no third call


def test_second_click_is_negative_in_a_false_positive_region():
    _, labels = rectangle_scene()
    spill = np.zeros(labels.shape, bool)
    spill[20:38, 2:20] = True  # 18 x 18 false positive, larger than anything missed
    predictor = HalfPredictor(labels, spill=spill)
    score_clicks(predictor, one_object(labels), "rect", clicks=2)
    x, y = predictor.calls[1]["point_coords"][1]
    assert predictor.calls[1]["point_labels"].tolist() == [1, 0]
    assert spill[int(y), int(x)]


def test_auto_recall_full_half_and_ranking():
    image, labels = rectangle_scene()
    data = [Sample(image, "rect", labels=labels)]
    assert evaluate_auto(lambda img: [labels == 1, labels == 2], data, min_area=1).average_recall(100) == 1.0
    half = evaluate_auto(lambda img: np.stack([labels == 2]), data, min_area=1)
    assert half.average_recall(100) == half.average_recall(1000) == 0.5

    junk = np.zeros(labels.shape, bool)
    junk[0, 0] = True

    def generator(img):  # 150 confident wrong masks, then the right ones (as RLE records)
        records = [{"segmentation": junk, "predicted_iou": 0.99} for _ in range(150)]
        return records + [{"segmentation": rle_encode(labels == i), "predicted_iou": 0.5} for i in (1, 2)]

    ranked = evaluate_auto(generator, data, min_area=1)
    assert ranked.average_recall(100) == 0.0 and ranked.average_recall(1000) == 1.0


def test_evaluate_reads_a_folder_dataset_and_limits_objects(tmp_path):
    root = write_dataset(tmp_path / "cells", n_images=2)
    dataset = FolderDataset(root)
    labels_by_shape = {s.shape: s.labels for s in dataset}  # the two images differ in size
    assert len(labels_by_shape) == 2

    class FolderOracle(OraclePredictor):
        def set_image(self, image):
            self.labels = labels_by_shape[image.shape[:2]]

    result = evaluate(dataset, FolderOracle(np.zeros((1, 1))), ["point", "clicks"], clicks=2, max_objects=3)
    images = {r.image for r in result.rows}
    assert images == set(dataset.names)
    per_image = {name: {r.object_id for r in result.rows if r.image == name} for name in images}
    assert all(len(ids) == 3 for ids in per_image.values())
    assert result.miou("clicks", 2) == 1.0


def test_evaluate_needs_the_right_inputs():
    image, labels = rectangle_scene()
    with pytest.raises(SegAnyError, match="need a predictor"):
        evaluate([(image, labels)], None, ["point"])
    with pytest.raises(SegAnyError, match="mask generator"):
        evaluate([(image, labels)], OraclePredictor(labels), ["auto"])

    class WrongSize(OraclePredictor):
        def predict(self, **kwargs):
            return np.zeros((1, 5, 5), bool), np.ones(1), None

    with pytest.raises(SegAnyError, match="masks of shape"):
        evaluate([(image, labels)], WrongSize(labels), ["box"], min_area=1)


def test_otsu_baseline_on_synthetic_cells():
    image, labels = cells_image((128, 128), n_cells=6, radius=(8, 14), seed=2)
    result = evaluate([Sample(image, "cells", labels=labels)], OtsuClickPredictor(), ["point", "box", "clicks"],
                      clicks=2, min_area=20)
    assert result.miou("point") > 0.6 and result.miou("box") > 0.6
    # Polarity: a dark object on a bright background is found too.
    inverted = evaluate([Sample(255 - image, "inv", labels=labels)], OtsuClickPredictor(), ["point"], min_area=20)
    assert inverted.miou("point") == pytest.approx(result.miou("point"), abs=0.05)


def test_batched_and_one_by_one_prompting_agree():
    import segany

    image, labels = shapes_scene((96, 96), n_shapes=3, seed=5)
    predictor = segany.SamPredictor(segany.build_sam("test_tiny"))
    data = [Sample(image, "scene", labels=labels)]
    kwargs = dict(protocols=["point", "clicks", "box"], clicks=2, max_objects=2, min_area=20)
    batched = evaluate(data, predictor, batched=True, **kwargs)
    single = evaluate(data, predictor, batched=False, **kwargs)
    assert len(batched.rows) == len(single.rows) == 2 * (2 + 2 + 1)
    for a, b in zip(batched.rows, single.rows):
        assert (a.image, a.object_id, a.protocol, a.clicks) == (b.image, b.object_id, b.protocol, b.clicks)
        assert a.iou == pytest.approx(b.iou, abs=1e-3)


# ---------------------------------------------------------------------------- results


def test_results_are_written_as_csv_json_and_png(tmp_path):
    image, labels = rectangle_scene()
    result = evaluate_clicks(OraclePredictor(labels, shift=2), [Sample(image, "rect", labels=labels)],
                             clicks=3, min_area=1)
    result.rows += evaluate([(image, labels, "rect")], OraclePredictor(labels), ["point", "box"], min_area=1).rows
    files = result.save(tmp_path / "out")
    assert set(files) == {"objects", "summary", "json", "plot"}
    with files["objects"].open() as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == len(result.rows) == 2 * 3 + 2 * 3
    assert set(rows[0]) == {"image", "object_id", "area", "protocol", "clicks", "iou"}
    document = json.loads(files["json"].read_text())
    assert document["summary"] == result.summary() and len(document["objects"]) == len(rows)
    assert files["plot"].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with Image.open(files["plot"]) as png:
        assert png.size[0] > 200
    table = result.table()
    assert "point_oracle" in table and "clicks" in table.splitlines()[0]


def test_no_plot_without_click_based_protocols(tmp_path):
    result = EvaluationResult([])
    assert result.plot(tmp_path / "p.png") is None


# ---------------------------------------------------------------------------- command line


def write_dataset(root: Path, n_images: int = 2) -> Path:
    """A dataset folder of synthetic cells: images/<name>.png + labels/<name>.png."""
    (root / "images").mkdir(parents=True)
    (root / "labels").mkdir()
    for i in range(n_images):
        image, labels = cells_image((96 + 16 * i, 112), n_cells=5, radius=(6, 12), seed=i)
        Image.fromarray(image).save(root / "images" / f"cells{i}.png")
        Image.fromarray(labels).save(root / "labels" / f"cells{i}.png")
    return root


def run_cli(capsys, *argv: str) -> tuple[int, str, str]:
    code = cli.main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def test_cli_eval_with_the_tiny_model(tmp_path, capsys):
    root = write_dataset(tmp_path / "cells", n_images=2)
    out_dir = tmp_path / "results"
    code, out, err = run_cli(capsys, "eval", str(root), "--model", "test_tiny", "--protocols", "point,clicks,box",
                             "--clicks", "2", "--max-objects", "2", "--max-images", "1", "-o", str(out_dir), "-q")
    assert code == 0, err
    assert "point_oracle" in out and "wrote" in out
    assert {p.name for p in out_dir.iterdir()} == {"objects.csv", "summary.csv", "results.json", "miou_vs_clicks.png"}
    document = json.loads((out_dir / "results.json").read_text())
    assert document["config"]["model"] == "test_tiny"
    assert {o["image"] for o in document["objects"]} == {"cells0"}  # --max-images 1


def test_cli_eval_with_the_baseline(tmp_path, capsys):
    root = write_dataset(tmp_path / "cells", n_images=2)
    code, out, err = run_cli(capsys, "eval", str(root / "images"), str(root / "labels"), "--model", "baseline",
                             "--clicks", "2", "-o", str(tmp_path / "o"), "-q")
    assert code == 0, err
    rows = list(csv.DictReader((tmp_path / "o" / "objects.csv").open()))
    assert {r["image"] for r in rows} == {"cells0", "cells1"}
    assert {r["protocol"] for r in rows} == {"point", "point_oracle", "clicks", "box"}


def test_cli_eval_errors_exit_2_with_a_message(tmp_path, capsys, monkeypatch):
    root = write_dataset(tmp_path / "cells", n_images=1)
    monkeypatch.setenv("SEGANY_HOME", str(tmp_path / "home"))  # an empty checkpoint cache
    code, _, err = run_cli(capsys, "eval", str(root), "--model", "sam_vit_b", "-o", str(tmp_path / "o"), "-q")
    assert code == 2 and "segany fetch sam_vit_b" in err
    code, _, err = run_cli(capsys, "eval", str(root), "--model", "baseline", "--protocols", "auto", "-q")
    assert code == 2 and "automatic" in err
    code, _, err = run_cli(capsys, "eval", str(root), "--model", "baseline", "--protocols", "lasso")
    assert code == 2 and "unknown protocol" in err
    (root / "labels" / "cells0.png").unlink()
    Image.fromarray(np.zeros((10, 10), np.uint16)).save(root / "labels" / "cells0.png")
    code, _, err = run_cli(capsys, "eval", str(root), "--model", "baseline", "-q")
    assert code == 2 and "cells0.png" in err and "size" in err


def test_cli_auto_protocol_uses_the_automatic_mask_generator(tmp_path, capsys, monkeypatch):
    import segany

    class FakeGenerator:  # stands in for segany.AutomaticMaskGenerator: proposes the whole image
        def __init__(self, model):
            self.model = model

        def generate(self, image):
            return [{"segmentation": np.ones(image.shape[:2], bool), "predicted_iou": 0.5}]

    root = write_dataset(tmp_path / "cells", n_images=1)
    monkeypatch.setattr(segany, "AutomaticMaskGenerator", FakeGenerator, raising=False)
    code, out, err = run_cli(capsys, "eval", str(root), "--model", "test_tiny", "--protocols", "auto",
                             "-o", str(tmp_path / "o"), "-q")
    assert code == 0, err
    assert "auto@100" in out and "auto@1000" in out
    assert not (tmp_path / "o" / "miou_vs_clicks.png").exists()  # nothing click-based to plot

    monkeypatch.delattr(segany, "AutomaticMaskGenerator")
    monkeypatch.setitem(__import__("sys").modules, "segany.amg", None)  # as if not written yet
    code, _, err = run_cli(capsys, "eval", str(root), "--model", "test_tiny", "--protocols", "auto", "-q")
    assert code == 2 and "AutomaticMaskGenerator" in err
