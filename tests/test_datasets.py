"""Tests of segany.datasets: folder and COCO readers, RLE/polygon decoding, bad-file reports."""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from segany.datasets import (
    CocoDataset,
    DatasetError,
    FolderDataset,
    InstanceDataset,
    Sample,
    open_dataset,
    polygon_to_mask,
    read_labels,
    rle_decode,
    rle_encode,
)
from segany.errors import SegAnyError
from segany.synthetic import cells_image, shapes_scene

DSB_TEST = Path("/work/shared/data/train/microscopy/dsb2018_stage1_test")


def save(path: Path, array: np.ndarray) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path)
    return path


def make_folder(root: Path, names=("a", "b", "c")) -> Path:
    for i, name in enumerate(names):
        image, labels = shapes_scene((48 + 8 * i, 64), n_shapes=3, seed=i)
        save(root / "images" / f"{name}.png", image)
        save(root / "labels" / f"{name}.png", labels)
    return root


# ---------------------------------------------------------------------------- folders


def test_folder_dataset_is_lazy_indexable_and_sliceable(tmp_path):
    data = FolderDataset(make_folder(tmp_path / "ds"))
    assert isinstance(data, InstanceDataset) and len(data) == 3
    assert data.names == ["a", "b", "c"]
    sample = data[1]
    assert sample.name == "b" and sample.image.shape == (56, 64, 3) and sample.labels.shape == (56, 64)
    assert sample.labels.dtype == np.uint16 and sample.ids.min() >= 1
    image, target, name = sample
    assert target is sample.labels and name == "b"
    assert [s.name for s in data[1:]] == ["b", "c"] and len(data[:2]) == 2
    assert data[-1].name == "c"
    masks = sample.masks()
    assert len(masks) == len(sample.ids) and all(m.dtype == bool for m in masks)
    assert sum(sample.areas().values()) == int((sample.labels > 0).sum())


def test_folder_dataset_from_two_folders_with_label_suffix(tmp_path):
    image, labels = cells_image((64, 64), n_cells=3, radius=(5, 9))
    save(tmp_path / "imgs" / "x1.png", image)
    save(tmp_path / "masks" / "x1_mask.png", labels)
    data = FolderDataset(tmp_path / "imgs", tmp_path / "masks", label_suffix="_mask")
    assert data.names == ["x1"] and np.array_equal(data[0].labels, labels)
    # open_dataset with the image folder named images/ finds labels/ next to it.
    save(tmp_path / "ds" / "images" / "y.png", image)
    save(tmp_path / "ds" / "labels" / "y.png", labels)
    assert open_dataset(tmp_path / "ds" / "images").names == ["y"]


def test_tiff_images_and_labels(tmp_path):
    tifffile = pytest.importorskip("tifffile")
    image = (np.arange(40 * 50, dtype=np.uint16).reshape(40, 50) * 7)
    labels = np.zeros((40, 50), np.uint16)
    labels[5:15, 5:20] = 3
    (tmp_path / "images").mkdir()
    (tmp_path / "labels").mkdir()
    tifffile.imwrite(tmp_path / "images" / "t.tif", image)
    tifffile.imwrite(tmp_path / "labels" / "t.tiff", labels)
    sample = FolderDataset(tmp_path).validate()[0]
    assert sample.image.dtype == np.uint16 and sample.ids.tolist() == [3] and sample.areas() == {3: 150}


def test_bad_files_are_all_reported_by_name(tmp_path):
    root = make_folder(tmp_path / "ds", names=("good", "small", "empty", "broken"))
    save(root / "labels" / "small.png", np.ones((10, 10), np.uint16))  # size mismatch
    save(root / "labels" / "empty.png", np.zeros((64, 64), np.uint16))  # no objects
    (root / "images" / "broken.png").write_bytes(b"not a png at all")  # unreadable
    save(root / "images" / "lonely.png", np.zeros((8, 8), np.uint8))  # no label image
    save(root / "labels" / "orphan.png", np.ones((8, 8), np.uint16))  # no image

    with pytest.raises(DatasetError) as info:
        FolderDataset(root)
    message = str(info.value)
    assert "lonely.png" in message and "no label image" in message
    assert "orphan.png" in message and "without an image" in message

    for path in (root / "images" / "lonely.png", root / "labels" / "orphan.png"):
        path.unlink()
    with pytest.raises(DatasetError) as info:
        FolderDataset(root).validate()
    problems = info.value.problems
    assert len(problems) == 3
    text = "\n".join(problems)
    assert "small.png" in text and "differs" in text
    assert "empty.png" in text and "no objects" in text
    assert "broken.png" in text and "cannot be read" in text

    # Reading one bad sample names its file too.
    data = FolderDataset(root)
    with pytest.raises(DatasetError, match="broken.png"):
        data[data.names.index("broken")]


def test_skip_bad_warns_and_drops(tmp_path):
    root = make_folder(tmp_path / "ds", names=("good", "empty"))
    save(root / "labels" / "empty.png", np.zeros((56, 64), np.uint16))
    save(root / "images" / "lonely.png", np.zeros((8, 8), np.uint8))
    with pytest.warns(UserWarning, match="lonely.png"):
        data = FolderDataset(root, skip_bad=True)
    assert len(data) == 2
    with pytest.warns(UserWarning, match="empty.png"):
        names = [s.name for s in data]  # iteration skips the bad one
    assert names == ["good"]
    with pytest.warns(UserWarning, match="empty.png"):
        data.validate()
    assert data.names == ["good"]


def test_label_image_checks(tmp_path):
    colour = np.zeros((4, 4, 3), np.uint8)
    colour[0, 0] = (255, 0, 0)
    with pytest.raises(SegAnyError, match="channels"):
        read_labels(save(tmp_path / "c.png", colour))
    grey_as_rgb = np.repeat(np.arange(16, dtype=np.uint8).reshape(4, 4)[..., None], 3, axis=2)
    assert read_labels(save(tmp_path / "g.png", grey_as_rgb)).shape == (4, 4)


def test_missing_paths_are_clear(tmp_path):
    with pytest.raises(SegAnyError, match="no such file"):
        open_dataset(tmp_path / "nothing")
    (tmp_path / "flat").mkdir()
    with pytest.raises(SegAnyError, match="images/ and labels/"):
        open_dataset(tmp_path / "flat")
    (tmp_path / "e" / "images").mkdir(parents=True)
    (tmp_path / "e" / "labels").mkdir()
    with pytest.raises(DatasetError, match="no image files"):
        open_dataset(tmp_path / "e")


def test_dsb2018_stage1_test_reads():
    if not DSB_TEST.is_dir():
        print(f"skipped: {DSB_TEST} is missing")
        pytest.skip(f"{DSB_TEST} is missing")
    data = FolderDataset(DSB_TEST)
    assert len(data) == 65
    subset = data[:2].validate()
    for sample in subset:
        assert sample.image.dtype == np.uint8 and sample.labels.dtype == np.uint16
        assert sample.image.shape[:2] == sample.labels.shape
        ids = sample.ids
        assert ids.tolist() == list(range(1, len(ids) + 1))  # consecutive, as PROVENANCE says


# ---------------------------------------------------------------------------- COCO


def test_polygon_rasterisation():
    square = polygon_to_mask([2, 3, 12, 3, 12, 8, 2, 8], 20, 20)  # 10 x 5 pixel-edge rectangle
    assert square.sum() == 50 and square[3:8, 2:12].all()
    triangle = polygon_to_mask([0, 0, 40, 0, 0, 40], 50, 50)
    assert abs(int(triangle.sum()) - 800) <= 40  # area 800, give or take the diagonal
    assert polygon_to_mask([-5, -5, 100, -5, 100, 100, -5, 100], 6, 7).all()  # clipped


def test_rle_round_trip_and_known_strings():
    rng = np.random.default_rng(0)
    for _ in range(50):
        mask = rng.random((int(rng.integers(1, 30)), int(rng.integers(1, 30)))) < rng.random()
        assert np.array_equal(rle_decode(rle_encode(mask)), mask)
    # Hand-encoded: runs [0, 5] -> "05"; runs [10, 10, 1, 1] -> "::1G" (last run coded
    # as the difference 1 - 10 = -9 from two runs before, as pycocotools does).
    assert rle_decode({"size": [1, 5], "counts": "05"}).all()
    assert rle_encode(np.ones((1, 5), bool))["counts"] == "05"
    mask = rle_decode({"size": [2, 11], "counts": "::1G"})
    assert mask.T.ravel().tolist() == [False] * 10 + [True] * 10 + [False, True]
    with pytest.raises(SegAnyError, match="cover"):
        rle_decode({"size": [2, 2], "counts": [1, 1]})


def write_coco(tmp_path: Path) -> Path:
    image, labels = shapes_scene((40, 50), n_shapes=2, seed=1)
    save(tmp_path / "images" / "scene.png", image)
    first = labels == 1
    ann = {
        "images": [{"id": 1, "file_name": "scene.png", "height": 40, "width": 50}],
        "annotations": [
            {"id": 10, "image_id": 1, "iscrowd": 0, "segmentation": [[2, 2, 12, 2, 12, 7, 2, 7],
                                                                     [20, 20, 30, 20, 30, 30, 20, 30]]},
            {"id": 11, "image_id": 1, "iscrowd": 0, "segmentation": rle_encode(first)},
            {"id": 12, "image_id": 1, "iscrowd": 0,
             "segmentation": {"size": [40, 50], "counts": [0, 3, 1997]}},  # uncompressed
            {"id": 13, "image_id": 1, "iscrowd": 1, "segmentation": rle_encode(first)},
        ],
    }
    path = tmp_path / "ann.json"
    path.write_text(json.dumps(ann))
    return path


def test_coco_polygons_and_rle(tmp_path):
    data = open_dataset(write_coco(tmp_path))
    assert isinstance(data, CocoDataset) and len(data) == 1
    sample = data.validate()[0]
    assert sample.labels is None and sample.ids.tolist() == [10, 11, 12]  # crowd left out
    areas = sample.areas()
    assert areas[10] == 10 * 5 + 10 * 10  # two polygons: their union
    assert areas[12] == 3 and sample.mask(12)[:3, 0].all()  # runs go down the first column
    image, target, name = sample
    assert name == "scene" and isinstance(target, list) and len(target) == 3
    assert sample.label_image().max() == 3
    assert len(CocoDataset(tmp_path / "ann.json", include_crowd=True)[0].ids) == 4


def test_coco_problems_name_the_files(tmp_path):
    path = write_coco(tmp_path)
    ann = json.loads(path.read_text())
    ann["images"] += [
        {"id": 2, "file_name": "gone.png", "height": 40, "width": 50},
        {"id": 3, "file_name": "scene.png", "height": 40, "width": 50},  # no annotations
    ]
    ann["annotations"].append({"id": 20, "image_id": 1, "segmentation": {"size": [4, 5], "counts": "05"}})
    ann["annotations"].append({"id": 21, "image_id": 99, "segmentation": [[0, 0, 1, 0, 1, 1]]})
    path.write_text(json.dumps(ann))
    with pytest.raises(DatasetError) as info:
        CocoDataset(path)
    text = str(info.value)
    assert "gone.png: image file not found" in text
    assert "annotation 20" in text and "RLE size" in text
    assert "unknown image id 99" in text and "no objects" in text
    with warnings.catch_warnings(record=True):
        warnings.simplefilter("always")
        assert len(CocoDataset(path, skip_bad=True)) == 0  # scene.png carries the bad RLE

    (tmp_path / "bad.json").write_text("{")
    with pytest.raises(DatasetError, match="not valid JSON"):
        open_dataset(tmp_path / "bad.json")


def test_coco_image_size_must_match_the_record(tmp_path):
    path = write_coco(tmp_path)
    ann = json.loads(path.read_text())
    ann["images"][0].update(height=41)
    ann["annotations"] = [a for a in ann["annotations"] if isinstance(a["segmentation"], list)]
    path.write_text(json.dumps(ann))
    data = CocoDataset(path)
    with pytest.raises(DatasetError, match="50x40 .* 50x41"):
        data.validate()


def test_in_memory_sample_checks():
    with pytest.raises(SegAnyError, match="exactly one"):
        Sample(np.zeros((2, 2)), "x")
    big_ids = np.zeros((3, 3), np.int64)
    big_ids[0, 0] = 2**40  # huge ids must not allocate a giant bincount
    assert Sample(big_ids, "big", labels=big_ids).areas() == {2**40: 1}
