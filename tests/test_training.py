"""Tests of segany.training: prompt simulation, losses, data, checkpoints, resume, and two
real (small, CPU) trainings: synthetic scenes from scratch and DSB 2018 nuclei fine-tuning.

Timings on the 2-core test machine are printed (``-s``) by the two training tests.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import segany
import segany.synthetic
import segany.transforms
from segany.build import ModelConfig, model_configs, register_config
from segany.errors import SegAnyError
from segany.training import TrainConfig, Trainer, load_config, train
from segany.training import checkpointing, data, losses, prompts
from segany.training.config import DataSource
from segany.training.validation import validate

DATA_ROOT = Path(os.environ.get("SEGANY_TRAIN_DATA", "/work/shared/data/train"))
DSB_TRAIN = DATA_ROOT / "microscopy" / "dsb2018_stage1_train"
DSB_TEST = DATA_ROOT / "microscopy" / "dsb2018_stage1_test"

# A small architecture: SAM's prompt encoder and mask decoder, a 2-block ViT encoder at
# 128 px with 16 px patches (8 x 8 embedding grid, 32 x 32 low-res masks).
SMALL_ARCH = dict(
    encoder="vit",
    encoder_kwargs=dict(embed_dim=96, depth=2, num_heads=4, global_attn_indexes=[0, 1], window_size=0),
    image_size=128,
    patch_size=16,
)


def small_config(tmp_path: Path, **overrides) -> TrainConfig:
    base = {
        "model": {"config": "train_small_128", "architecture": SMALL_ARCH},
        "data": {
            "train": [{"kind": "synthetic", "count": 16, "size": 64}],
            "masks_per_image": 2,
            "check": False,
        },
        "steps": 3,
        "batch_size": 2,
        "rounds": 3,
        "optim": {"lr": 1e-3},
        "output_dir": str(tmp_path / "run"),
        "progress": False,
        "log_every": 1,
        "num_threads": 1,
    }
    for key, value in overrides.items():
        node = base
        *parents, last = key.split(".")
        for p in parents:
            node = node.setdefault(p, {})
        node[last] = value
    return TrainConfig.from_dict(base)


@pytest.fixture
def one_thread():
    """One torch thread for evaluations outside the trainer (which sets its own): on a busy
    2-core machine two threads are several times slower than one."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# --------------------------------------------------------------------------------------------
# Prompt simulation
# --------------------------------------------------------------------------------------------


def test_schedule_has_11_rounds_with_two_mask_only_rounds():
    for seed in range(20):
        s = prompts.round_schedule(11, np.random.default_rng(seed))
        assert len(s) == 11
        assert s[0] == prompts.FIRST and s[-1] == prompts.NO_POINT
        assert s.count(prompts.CLICK) == 8 and s.count(prompts.NO_POINT) == 2
        middle = s.index(prompts.NO_POINT)
        assert 1 < middle < 10  # among the corrective clicks, not first, not the final one
    positions = {prompts.round_schedule(11, np.random.default_rng(k)).index(prompts.NO_POINT) for k in range(60)}
    assert len(positions) > 3  # the inserted round really moves


def test_error_clicks_have_the_sign_of_the_error():
    gen = torch.Generator().manual_seed(0)
    target = torch.zeros(64, 32, 32, dtype=torch.bool)
    target[:, 8:24, 8:24] = True
    pred = target.clone()
    pred[:32, 8:24, 8:16] = False  # sessions 0-31: false negatives only
    pred[32:, 0:4, :] = True  # sessions 32-63: false positives only
    coords, labels = prompts.error_clicks(pred, target, 32, gen)
    assert labels[:32].eq(prompts.POSITIVE).all() and labels[32:].eq(prompts.NEGATIVE).all()
    xy = coords.round().long()
    rows = torch.arange(64)
    error = pred != target
    assert error[rows, xy[:, 1], xy[:, 0]].all()  # every click lies in the error region
    # Mixed errors: each click's label is the ground truth at the clicked pixel.
    pred2 = target.clone()
    pred2[:, 8:24, 8:12] = False
    pred2[:, 0:2, :] = True
    coords, labels = prompts.error_clicks(pred2, target, 32, gen)
    xy = coords.round().long()
    assert torch.equal(labels.bool(), target[rows, xy[:, 1], xy[:, 0]])
    assert set(labels.tolist()) == {0, 1}


def test_error_clicks_on_low_res_masks_land_in_the_right_cell():
    gen = torch.Generator().manual_seed(1)
    target = torch.zeros(16, 8, 8, dtype=torch.bool)
    target[:, 2:6, 2:6] = True
    pred = torch.zeros_like(target)
    coords, labels = prompts.error_clicks(pred, target, 64, gen)  # 8 px per low-res cell
    assert labels.eq(1).all()
    cells = ((coords + 0.5) // 8).long()
    assert target[torch.arange(16), cells[:, 1], cells[:, 0]].all()


def test_first_prompts_points_and_noisy_boxes():
    gen = torch.Generator().manual_seed(0)
    masks = torch.zeros(400, 64, 64, dtype=torch.bool)
    masks[:, 10:40, 20:50] = True
    p = prompts.first_prompts(masks, 1024, gen, box_probability=0.5)
    boxes = ~p.single_point
    assert 150 < int(boxes.sum()) < 250
    assert p.labels[boxes].tolist() == [[2, 3]] * int(boxes.sum())
    assert p.labels[~boxes].tolist() == [[1, -1]] * int((~boxes).sum())
    # Point prompts lie inside the mask (mask pixel = 16 input pixels here).
    pts = p.coords[~boxes, 0]
    cells = ((pts + 0.5) // 16).long()
    assert masks[0][cells[:, 1], cells[:, 0]].all()
    # Box noise: std 10 % of the side, clipped at 20 px (1024 frame).
    true_box = torch.tensor([20 * 16, 10 * 16, 50 * 16 - 1, 40 * 16 - 1], dtype=torch.float32)
    shift = p.coords[boxes].reshape(-1, 4) - true_box
    assert shift.abs().max() <= 20.0 + 1e-4
    assert 5.0 < float(shift.std()) < 20.0
    single = prompts.first_prompts(masks[:4], 1024, gen, box_probability=0.0)
    assert single.single_point.all()


def test_embed_sparse_equals_the_prompt_encoder():
    pe = segany.build_sam("test_tiny").prompt_encoder
    pts = torch.tensor([[[100.0, 200.0], [300.0, 50.0]]])
    lab = torch.tensor([[1, 0]])
    box = torch.tensor([[50.0, 60.0, 400.0, 500.0]])
    ref, _ = pe(points=(pts, lab), boxes=box, masks=None)  # points then box corners
    ours = prompts.embed_sparse(pe, torch.cat([pts, box.reshape(1, 2, 2)], 1), torch.tensor([[1, 0, 2, 3]]))
    assert torch.allclose(ours, ref, atol=1e-5)
    ref2, _ = pe(points=(pts, lab), boxes=None, masks=None)  # points + padding token
    ours2 = prompts.embed_sparse(pe, torch.cat([pts, torch.zeros(1, 1, 2)], 1), torch.tensor([[1, 0, -1]]))
    assert torch.allclose(ours2, ref2, atol=1e-5)


# --------------------------------------------------------------------------------------------
# Losses
# --------------------------------------------------------------------------------------------


def test_perfect_prediction_has_about_zero_loss():
    target = torch.zeros(3, 32, 32, dtype=torch.bool)
    target[0, 4:20, 4:20] = True
    target[1, :, :5] = True
    target[2, 30:, 30:] = True
    logits = torch.where(target, 40.0, -40.0)[:, None]
    out = losses.sam_losses(logits, torch.ones(3, 1), target)
    assert float(out.total.max()) < 1e-4
    assert torch.allclose(out.iou_actual, torch.ones(3, 1))
    wrong = losses.sam_losses(-logits, torch.ones(3, 1), target)
    assert float(wrong.total.min()) > 1.0


def test_ranking_term_penalises_only_a_wrong_order_of_the_candidates_scores():
    target = torch.zeros(1, 16, 16, dtype=torch.bool)
    target[0, 4:12, 4:12] = True
    good = torch.where(target, 10.0, -10.0)[0]
    half = good.clone()
    half[:, :8] = -10.0
    logits = torch.stack([-good, half, good])[None]  # actual IoU 0, 0.5, 1
    ranked = losses.LossWeights(focal=0.0, dice=0.0, iou=0.0, rank=1.0)
    # The best candidate scored below the middle one (the failure seen on bright-field).
    wrong = torch.tensor([[0.1, 0.5, 0.4]], requires_grad=True)
    out = losses.sam_losses(logits, wrong, target, ranked)
    assert float(out.total) > 0 and float(out.rank) == pytest.approx(float(out.total))
    out.total.sum().backward()
    assert wrong.grad[0, 2] < 0 < wrong.grad[0, 1]  # gradient descent raises the best, lowers the middle
    # The right order by the margin costs nothing, whatever the absolute values.
    right = torch.tensor([[0.0, 0.1, 0.2]])
    assert float(losses.sam_losses(logits, right, target, ranked).total) == 0.0
    # Off by default (the paper's loss), and meaningless for a single candidate.
    assert losses.sam_losses(logits, wrong.detach(), target).rank is None
    assert losses.sam_losses(logits[:, 2:], wrong.detach()[:, 2:], target, ranked).rank is None


def test_best_of_multimask_backpropagates_only_the_best_candidate():
    target = torch.zeros(2, 16, 16, dtype=torch.bool)
    target[:, 4:12, 4:12] = True
    good = torch.where(target, 10.0, -10.0)
    half = good.clone()
    half[:, :, :8] = -10.0
    # Candidate order differs per mask: the best one is 2 for mask 0 and 0 for mask 1.
    logits = torch.stack([torch.stack([-good[0], half[0], good[0]]), torch.stack([good[1], -good[1], half[1]])])
    logits.requires_grad_(True)
    iou_pred = torch.full((2, 3), 0.3, requires_grad=True)
    out = losses.sam_losses(logits, iou_pred, target)
    assert out.chosen.tolist() == [2, 0]
    out.total.sum().backward()
    grad = logits.grad.abs().flatten(2).sum(2)
    assert grad[0, 2] > 0 and grad[0, 0] == 0 and grad[0, 1] == 0
    assert grad[1, 0] > 0 and grad[1, 1] == 0 and grad[1, 2] == 0
    # The IoU head is supervised for every candidate (actual IoU 0, 0.5 and 1 here).
    assert (iou_pred.grad != 0).all()
    assert out.iou_actual[0].tolist() == pytest.approx([0.0, 0.5, 1.0])


def test_focal_and_dice_weights_20_to_1():
    w = losses.LossWeights()
    assert (w.focal, w.dice, w.iou, w.focal_gamma) == (20.0, 1.0, 1.0, 2.0)


# --------------------------------------------------------------------------------------------
# Configuration and data
# --------------------------------------------------------------------------------------------


def test_config_from_yaml_resolves_paths_and_rejects_typos(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text(
        "model: {config: vit_t, checkpoint: weights/start.pt}\n"
        "data:\n  train:\n    - {path: nuclei, partial: true, limit: 5}\n  masks_per_image: 4\n"
        "  augment: {vflip: true, scale_range: [0.5, 2]}\n"
        "optim: {lr: 1e-4, warmup_steps: 10, decay_steps: [50, 80]}\n"
        "freeze: {image_encoder: true}\nprecision: bf16\noutput_dir: out\n"
    )
    cfg = load_config(path)
    assert cfg.optim.lr == 1e-4 and isinstance(cfg.optim.lr, float)  # YAML reads 1e-4 as a string
    assert cfg.data.train[0].path == str(tmp_path / "nuclei") and cfg.data.train[0].partial
    assert cfg.model.checkpoint == str(tmp_path / "weights/start.pt")
    assert cfg.data.augment.scale_range == (0.5, 2.0) and cfg.freeze.image_encoder
    assert TrainConfig.from_dict(cfg.to_dict()) == cfg
    path.write_text("optim: {lr: 1e-4, warmup: 10}\n")
    with pytest.raises(SegAnyError, match="unknown key 'warmup' .*warmup_steps"):
        load_config(path)
    path.write_text("precision: fp8\n")
    with pytest.raises(SegAnyError, match="precision must be one of"):
        load_config(path)


def _write_pair(root: Path, name: str, image: np.ndarray, labels: np.ndarray | None) -> None:
    (root / "images").mkdir(parents=True, exist_ok=True)
    (root / "labels").mkdir(parents=True, exist_ok=True)
    Image.fromarray(image).save(root / "images" / f"{name}.png")
    if labels is not None:
        Image.fromarray(labels).save(root / "labels" / f"{name}.png")


def test_bad_data_is_reported_file_by_file(tmp_path):
    root = tmp_path / "bad"
    image, labels = segany.synthetic.shapes_scene((48, 48), 3, seed=0)
    _write_pair(root, "good", image, labels)
    _write_pair(root, "mismatch", image, labels[:40])
    _write_pair(root, "empty", image, np.zeros_like(labels))
    _write_pair(root, "nolabel", image, None)
    (root / "labels" / "orphan.png").write_bytes(b"")
    (root / "images" / "broken.png").write_bytes(b"not a png")
    Image.fromarray(labels).save(root / "labels" / "broken.png")
    cfg = small_config(tmp_path, **{"data.train": [{"path": str(root)}], "data.check": True})
    with pytest.raises(SegAnyError) as info:
        Trainer(cfg)
    message = str(info.value)
    for name in ("mismatch", "empty", "nolabel", "orphan", "broken"):
        assert name in message, (name, message)
    assert "good.png" not in message
    assert "differ" in message and "no objects" in message


def test_builtin_folder_reader_and_checks(tmp_path):
    root = tmp_path / "ds"
    image, labels = segany.synthetic.shapes_scene((48, 48), 3, seed=0)
    _write_pair(root, "a", image, labels)
    _write_pair(root, "b", image, np.zeros_like(labels))
    folder = data.ImageLabelFolder(root)
    ok, errors, warnings = data.check_source(folder)
    assert ok == [0] and errors == [] and "b" in warnings[0]
    _write_pair(root, "c", image, None)
    with pytest.raises(data.DataError, match="c.png: no label file"):
        data.ImageLabelFolder(root)


def test_augment_keeps_image_and_labels_aligned():
    image, labels = segany.synthetic.shapes_scene((90, 120), 5, seed=3)
    colour_of = {int(k): image[labels == k].mean(0) for k in np.unique(labels) if k}
    rng = np.random.default_rng(0)
    cfg = data.Augment(hflip=True, vflip=True, rot90=True, scale_range=(0.6, 2.0))
    for _ in range(10):
        s = data.augment(image, labels, 64, rng, cfg)
        h, w = s.image.shape[:2]
        assert max(h, w) <= 64 and s.labels.shape == (64, 64)
        assert not s.labels[h:].any() and not s.labels[:, w:].any()
        for k in np.unique(s.labels[:h, :w]):
            inside = (s.labels[:h, :w] == k) & ~(np.abs(np.diff(s.labels[:h, :w], axis=0, prepend=0)) > 0)
            if k and inside.sum() > 30:
                # The pixels of an object keep (roughly) the object's colour.
                assert np.abs(s.image[inside].mean(0) - colour_of[int(k)]).max() < 40
    plain = data.augment(image, labels, 64, rng)
    ref = segany.transforms.ResizeLongestSide(64).apply_image(image)
    assert np.array_equal(plain.image, ref)  # no augmentation: exactly the inference resize


def test_photometric_augmentation_greys_and_inverts_per_source(tmp_path):
    rgb = np.random.default_rng(0).integers(0, 256, (20, 30, 3)).astype(np.uint8)
    grey = data.photometric(rgb, np.random.default_rng(0), grayscale=1.0)
    pil = np.asarray(Image.fromarray(rgb).convert("L")).astype(int)
    assert (grey[..., 0] == grey[..., 2]).all() and np.abs(grey[..., 1].astype(int) - pil).max() <= 1
    assert np.array_equal(data.photometric(rgb, np.random.default_rng(0), invert=1.0), 255 - rgb)
    rng = np.random.default_rng(1)
    inverted = sum(data.photometric(rgb, rng, invert=0.3)[0, 0, 0] != rgb[0, 0, 0] for _ in range(1000))
    assert 250 <= inverted <= 350  # ~ the probability
    # Without photometric augmentation nothing is drawn: earlier random streams are unchanged.
    rng = np.random.default_rng(2)
    assert data.photometric(rgb, rng) is rgb and rng.random() == np.random.default_rng(2).random()

    # In the trainer it is a property of a source: the same item drawn with the same random
    # generator from a plain and an inverting source differs only by the inversion.
    scenes = {"kind": "synthetic", "count": 4, "size": 64, "seed": 3}
    trainer = Trainer(small_config(tmp_path, **{"data.train": [scenes, dict(scenes, invert=1.0)]}))
    plain = trainer._augmented(0, 2, np.random.default_rng(5))
    flipped = trainer._augmented(1, 2, np.random.default_rng(5))
    assert np.array_equal(flipped.image, 255 - plain.image) and np.array_equal(flipped.labels, plain.labels)
    with pytest.raises(SegAnyError, match=r"data.train\[0\].invert is a probability"):
        small_config(tmp_path, **{"data.train": [dict(scenes, invert=1.5)]})


def test_geotiff_with_vector_labels_is_rasterised_per_tile(tmp_path):
    rasterio = pytest.importorskip("rasterio")
    gpd = pytest.importorskip("geopandas")
    from rasterio.transform import from_origin
    from shapely.geometry import box

    transform = from_origin(500000.0, 4600000.0, 0.5, 0.5)  # 0.5 m pixels, UTM 33N
    pixels = np.random.default_rng(0).integers(0, 60, (3, 100, 150), dtype=np.uint16)
    houses = [box(500005, 4599960, 500015, 4599970), box(500050, 4599990, 500060, 4599998)]
    for geom in houses:
        x0, y0, x1, y1 = geom.bounds
        c0, r0 = ~transform * (x0, y1)
        c1, r1 = ~transform * (x1, y0)
        pixels[:, int(r0):int(r1), int(c0):int(c1)] += 150
    raster = tmp_path / "scene.tif"
    with rasterio.open(raster, "w", driver="GTiff", width=150, height=100, count=3, dtype="uint16",
                       crs="EPSG:32633", transform=transform) as dst:
        dst.write(pixels)
    # Labels in WGS84: reprojected to the raster's CRS by the reader.
    frame = gpd.GeoDataFrame({"id": [1, 2]}, geometry=houses, crs="EPSG:32633").to_crs("EPSG:4326")
    vectors = tmp_path / "houses.geojson"
    frame.to_file(vectors, driver="GeoJSON")
    tiles = data.GeoTiles(raster, vectors, tile_size=64)
    assert len(tiles) == 3  # the tiles that contain a house (one house spans two tiles)
    total = 0
    for i in range(len(tiles)):
        image, labels, name = tiles[i]
        assert image.dtype == np.uint8 and image.shape[:2] == labels.shape
        for k in np.unique(labels[labels > 0]):
            assert image[labels == k].mean() > image[labels == 0].mean() + 50
        total += len(np.unique(labels[labels > 0]))
    assert total == 3
    cfg = small_config(tmp_path, **{"data.train": [{"kind": "geo", "path": str(raster), "vectors": str(vectors),
                                                   "tile_size": 64, "partial": True}], "steps": 1, "rounds": 1})
    assert train(cfg).step == 1


def test_coco_json_source_via_segany_datasets(tmp_path):
    image, labels = segany.synthetic.shapes_scene((40, 50), 2, seed=4)
    Image.fromarray(image).save(tmp_path / "a.png")
    anns = []
    for k in np.unique(labels[labels > 0]):
        ys, xs = np.nonzero(labels == k)
        x0, y0, x1, y1 = xs.min(), ys.min(), xs.max() + 1, ys.max() + 1
        anns.append({"id": int(k), "image_id": 1, "iscrowd": 0,
                     "segmentation": [[float(v) for v in (x0, y0, x1, y0, x1, y1, x0, y1)]]})
    (tmp_path / "ann.json").write_text(json.dumps(
        {"images": [{"id": 1, "file_name": "a.png", "height": 40, "width": 50}], "annotations": anns}))
    source = data.open_source(DataSource(path=str(tmp_path / "ann.json"), kind="coco"))
    img, lab, name = source[0]
    assert name == "a" and img.shape == (40, 50, 3) and lab.shape == (40, 50) and lab.max() == len(anns)


# --------------------------------------------------------------------------------------------
# Checkpoints and resume
# --------------------------------------------------------------------------------------------


def test_checkpoint_is_flat_and_reloads_by_config(tmp_path):
    cfg = small_config(tmp_path, steps=2)
    result = train(cfg)
    state = torch.load(result.model_path, weights_only=True)
    assert all(isinstance(v, torch.Tensor) for v in state.values())
    assert {k.split(".")[0] for k in state} == {"image_encoder", "prompt_encoder", "mask_decoder"}
    sam = segany.build_sam("train_small_128", checkpoint=result.model_path)  # strict load
    for k, v in sam.state_dict().items():
        assert torch.equal(v, state[k])
    assert checkpointing.load_trained_model(result.model_path).img_size == 128
    assert not list(result.output_dir.glob(".*tmp*"))  # atomic writes leave no debris
    rows = (result.output_dir / "log.csv").read_text().splitlines()
    assert rows[0].startswith("step,loss,focal,dice,iou_mse") and len(rows) == 3
    assert (result.output_dir / "curves.png").stat().st_size > 1000


def test_log_records_the_one_click_ranking(tmp_path):
    """rank_hit (share of single clicks whose top-scored candidate is the best) is logged in
    every run, the ranking term only when it is on."""
    def logged(run, **overrides):
        cfg = small_config(tmp_path / run, steps=2, box_probability=0.0, rounds=1, **overrides)
        return train(cfg).history

    plain, ranked = logged("plain"), logged("ranked", **{"loss.rank": 1.0})
    for row in plain + ranked:
        assert 0.0 <= row["rank_hit"] <= 1.0
    assert all("rank" not in row for row in plain)
    assert all(row["rank"] >= 0.0 for row in ranked)
    header = (tmp_path / "ranked" / "run" / "log.csv").read_text().splitlines()[0].split(",")
    assert {"rank", "rank_hit"} <= set(header)


def test_vit_t_checkpoint_loads_strictly_into_mobile_sam(tmp_path):
    from reference_oracle import import_mobile_sam

    try:
        mobile_sam = import_mobile_sam()
    except ImportError as exc:
        pytest.skip(f"MobileSAM reference not installed: {exc}")
    cfg = small_config(tmp_path, **{
        "model": {"config": "vit_t"}, "steps": 1, "rounds": 2, "data.masks_per_image": 1,
        "batch_size": 1, "freeze.image_encoder": True, "data.train": [{"kind": "synthetic", "count": 1, "size": 96}],
    })
    result = train(cfg)
    before = segany.build_sam("vit_t")
    reference = mobile_sam.sam_model_registry["vit_t"](checkpoint=str(result.model_path))  # strict
    state = torch.load(result.model_path, weights_only=True)
    ref_state = reference.state_dict()
    for k, v in state.items():
        assert torch.equal(ref_state[k], v)
    # The step really changed the decoder (and not the frozen encoder).
    trained = segany.build_sam("vit_t", checkpoint=result.model_path)
    dec = "mask_decoder.output_hypernetworks_mlps.0.layers.0.weight"
    torch.manual_seed(cfg.seed)
    init = segany.build_sam("vit_t")
    assert not torch.equal(trained.state_dict()[dec], init.state_dict()[dec])
    enc = "image_encoder.patch_embed.seq.0.c.weight"
    assert torch.equal(trained.state_dict()[enc], init.state_dict()[enc])
    del before


@pytest.mark.slow
def test_vit_b_checkpoint_loads_strictly_into_segment_anything(tmp_path):
    from reference_oracle import import_segment_anything

    try:
        sa = import_segment_anything()
    except ImportError as exc:
        pytest.skip(f"segment_anything reference not installed: {exc}")
    sam = segany.build_sam("vit_b")
    # One decoder-only optimizer step on a precomputed embedding (the vit_b encoder pass
    # at 1024 px is the slow part and adds nothing to what is tested: the file layout).
    cfg = small_config(tmp_path, **{"model": {"config": "vit_b"}, "freeze.image_encoder": True,
                                    "rounds": 1, "data.masks_per_image": 1, "batch_size": 1})
    trainer = Trainer(cfg, model=sam)
    trainer._encode = lambda inputs: torch.zeros(len(inputs), 256, 64, 64)
    trainer.train_step()
    path = checkpointing.save_model(trainer.sam, tmp_path / "vit_b.pt", step=1)
    reference = sa.sam_model_registry["vit_b"](checkpoint=str(path))  # strict=True inside
    key = "mask_decoder.iou_prediction_head.layers.0.weight"
    assert torch.equal(reference.state_dict()[key], trainer.sam.state_dict()[key].cpu())


def test_resume_gives_the_same_weights_as_an_uninterrupted_run(tmp_path):
    common = {"steps": 6, "rounds": 4, "optim.warmup_steps": 2, "optim.decay_steps": [4],
              "data.augment": {"hflip": True, "scale_range": [0.8, 1.3]}, "save_every": 100}
    straight = train(small_config(tmp_path / "a", **common))
    cfg = small_config(tmp_path / "b", **common)
    first = Trainer(cfg).fit(stop_at=3)  # "killed" after step 3 (the resume file is written on exit)
    assert first.step == 3 and (tmp_path / "b" / "run" / "resume.pt").exists()
    resumed = Trainer(small_config(tmp_path / "b", **common), resume=True)
    assert resumed.step == 3
    final = resumed.fit()
    assert final.step == 6
    a = torch.load(straight.model_path, weights_only=True)
    b = torch.load(final.model_path, weights_only=True)
    for k in a:
        assert torch.allclose(a[k], b[k], atol=1e-6, rtol=1e-5), k
    la = [r["loss"] for r in straight.history]
    lb = [r["loss"] for r in final.history]
    assert lb == pytest.approx(la, rel=1e-5)  # the log was continued, not restarted


def test_data_threads_and_memory_cache_do_not_change_the_result(tmp_path):
    """Prefetching threads and the in-memory cache only change speed: same weights, same log."""
    common = {"steps": 4, "rounds": 2, "data.augment": {"hflip": True, "scale_range": [0.8, 1.3]}}
    plain = train(small_config(tmp_path / "a", **common))
    threaded = train(small_config(tmp_path / "b", **common, **{"data.workers": 3, "data.prefetch": 2,
                                                              "data.cache_in_memory": True}))
    a = torch.load(plain.model_path, weights_only=True)
    b = torch.load(threaded.model_path, weights_only=True)
    for k in a:
        assert torch.allclose(a[k], b[k], atol=1e-6, rtol=1e-5), k
    assert [r["loss"] for r in threaded.history] == pytest.approx([r["loss"] for r in plain.history], rel=1e-5)


def test_source_weights_balance_the_draws(tmp_path):
    cfg = small_config(tmp_path, **{"data.train": [
        {"kind": "synthetic", "count": 30, "size": 64, "seed": 1},
        {"kind": "synthetic", "count": 3, "size": 64, "seed": 2, "weight": 10.0}]})
    trainer = Trainer(cfg)
    rng = np.random.default_rng(0)
    draws = np.array([trainer._draw_item(rng)[0] for _ in range(2000)])
    # 30 images x 1 against 3 images x 10: each source half of the time.
    assert 0.45 < (draws == 1).mean() < 0.55
    with pytest.raises(SegAnyError, match="weight must be positive"):
        small_config(tmp_path, **{"data.train": [{"kind": "synthetic", "weight": 0}]})


def test_frozen_encoder_embeddings_are_cached(tmp_path):
    cfg = small_config(tmp_path, **{"freeze.image_encoder": True, "frozen_augmentations": 2, "steps": 12,
                                    "data.train": [{"kind": "synthetic", "count": 3, "size": 64}]})
    trainer = Trainer(cfg)
    calls = []
    original = trainer._encode
    trainer._encode = lambda inputs: calls.append(len(inputs)) or original(inputs)
    before = {k: v.clone() for k, v in trainer.sam.image_encoder.state_dict().items()}
    trainer.fit()
    assert sum(calls) <= 3 * 2  # at most one encoder pass per (image, augmentation)
    for k, v in trainer.sam.image_encoder.state_dict().items():
        assert torch.equal(v, before[k])


def test_score_calibration_trains_only_the_iou_head(tmp_path):
    """freeze.mask_decoder (+ encoders): masks stay exactly the same, only the scores move."""
    cfg = small_config(tmp_path, **{"freeze.image_encoder": True, "freeze.prompt_encoder": True,
                                    "freeze.mask_decoder": True, "steps": 4, "rounds": 1,
                                    "loss": {"focal": 0.0, "dice": 0.0, "iou": 1.0},
                                    "optim": {"lr": 1e-2, "warmup_steps": 0}})
    trainer = Trainer(cfg)
    before = {k: v.clone() for k, v in trainer.sam.state_dict().items()}
    trainer.fit()
    changed = {k for k, v in trainer.sam.state_dict().items() if not torch.equal(v, before[k])}
    assert changed and all(k.startswith("mask_decoder.iou_prediction_head.") for k in changed), changed


def test_bf16_autocast_and_gradient_accumulation_run_on_cpu(tmp_path):
    cfg = small_config(tmp_path, **{"precision": "bf16", "grad_accum_steps": 2, "steps": 2, "rounds": 2,
                                    "loss_at_full_resolution": True, "optim.grad_clip": 1.0})
    result = train(cfg)
    assert result.step == 2 and np.isfinite(result.history[-1]["loss"])
    with pytest.raises(SegAnyError, match="fp16 needs a CUDA"):
        Trainer(small_config(tmp_path, precision="fp16"))


def test_validation_uses_the_evaluation_protocols(tmp_path, one_thread):
    """Training curves report what `segany eval` would: the same protocols, the same numbers,
    objects pooled over sources."""
    from segany.evaluation import evaluate
    from segany.predictor import SamPredictor

    sam = Trainer(small_config(tmp_path)).sam.eval()
    a, b = data.SyntheticScenes(2, 64, seed=5), data.SyntheticScenes(1, 64, seed=6)
    pooled = validate(sam, [a, b], ("point", "clicks"), clicks=3, max_objects=None, min_area=10)
    direct = evaluate([a[0], a[1], b[0]], SamPredictor(sam), ["point", "clicks"], clicks=3, max_objects=None,
                      min_area=10)
    assert set(pooled) == {"point_miou", "clicks_miou"}
    assert pooled["point_miou"] == pytest.approx(direct.miou("point"), abs=1e-9)
    assert pooled["clicks_miou"] == pytest.approx(direct.miou("clicks"), abs=1e-9)


def test_train_command_line(tmp_path):
    from segany.cli import main

    cfg = small_config(tmp_path, steps=2, rounds=2)
    cfg.data.val = [DataSource(kind="synthetic", count=2, size=64, seed=99)]
    cfg.validation.every = 1
    path = tmp_path / "run.yaml"
    cfg.to_yaml(path)
    assert main(["train", "--config", str(path), "-q", "--set", "optim.lr=5e-4"]) == 0
    out = Path(cfg.output_dir)
    assert {"model.pt", "model.json", "best.pt", "resume.pt", "log.csv", "curves.png", "config.yaml"} <= {
        p.name for p in out.iterdir()}
    assert load_config(out / "config.yaml").optim.lr == 5e-4
    log = (out / "log.csv").read_text()
    assert "val_point_miou" in log.splitlines()[0] and len(log.splitlines()) == 3
    # Resume at the end: nothing more to do, same model.
    assert main(["train", "--config", str(path), "-q", "--resume"]) == 0
    assert main(["train", "--config", str(tmp_path / "missing.yaml")]) == 2


# --------------------------------------------------------------------------------------------
# Real trainings (small, CPU)
# --------------------------------------------------------------------------------------------


# The from-scratch test trains a small TinyViT-style encoder (MobileSAM's architecture with
# one block per stage: convolutions first, 1.2 M parameters) at 128 px (8 x 8 embedding grid)
# with SAM's own prompt encoder and mask decoder. Tuned on the shared 2-core test machine:
# one thread (faster than two when other processes compete for the cores), 32 objects per
# step, the first prompt only (rounds=1: the single-point metric depends on it alone; the
# other rounds are exercised by the tests above), focal:dice 4:1 without alpha (the paper's
# 20:1 with alpha=0.25 keeps a from-scratch model predicting background for longer), scenes
# of separated textured shapes (the occluding shapes_scene learns about 1.5x slower).
TINYVIT_ARCH = dict(
    encoder="tiny_vit",
    encoder_kwargs=dict(embed_dims=[32, 64, 96, 128], depths=[1, 1, 1, 1], num_heads=[1, 2, 3, 4],
                        window_sizes=[7, 7, 7, 7], mlp_ratio=4.0, mbconv_expand_ratio=4.0, local_conv_size=3),
    image_size=128,
    patch_size=16,
    # A 64-wide decoder (SAM: 256, MLP 2048, 8 heads): same structure, a quarter of the
    # width; it learns these scenes in fewer steps at ~0.2 s a step instead of ~0.4 s.
    decoder_dim=64,
    decoder_mlp_dim=256,
    decoder_heads=2,
)
SCENES = {"kind": "synthetic", "scene": "separated", "size": 128, "objects": 4}
SYNTHETIC = {
    "model": {"config": "train_tinyvit_128", "architecture": TINYVIT_ARCH},
    "data.train": [{**SCENES, "count": 1000, "seed": 0}],
    "data.val": [{**SCENES, "count": 24, "seed": 100_000}],
    "data.masks_per_image": 4,
    "data.min_mask_area": 100,
    "data.augment": {"hflip": True, "vflip": True},
    "batch_size": 8,
    "rounds": 1,
    "box_probability": 0.1,
    "loss": {"focal": 4.0, "focal_alpha": None},
    "optim": {"lr": 1e-3, "warmup_steps": 30, "weight_decay": 0.01},
    "validation": {"every": 100, "protocols": ["point"], "max_images": 24, "max_objects": 8, "min_area": 100},
    "steps": 600,
    "num_threads": 1,
    "save_every": 100_000,
    "log_every": 10,
}
TARGET_MIOU = 0.7


@pytest.fixture(scope="module")
def synthetic_model(tmp_path_factory):
    """Train the small model from scratch until held-out single-point mIoU >= 0.7 (at most
    600 steps); shared by the fine-tuning test as its starting point.

    With this seed (runs are deterministic) 0.7 is reached at step 500: 0.71 after 114 s of
    training on the idle 2-core development machine (one torch thread), under the issue's
    two minutes. The curve is printed (pytest -s)."""
    tmp = tmp_path_factory.mktemp("synthetic")
    cfg = small_config(tmp, **SYNTHETIC)
    cfg.validation.stop_at_miou = TARGET_MIOU  # stops as soon as it is reached
    trainer = Trainer(cfg)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        untrained = trainer.validate()["val_point_miou"]
    finally:
        torch.set_num_threads(threads)
    result = trainer.fit()
    curve = [(int(r["step"]), round(r["seconds"], 1), round(r["val_point_miou"], 3))
             for r in result.history if "val_point_miou" in r]
    print(f"\nsynthetic training: untrained mIoU {untrained:.3f}; (step, s, mIoU): {curve}")
    return {"path": result.model_path, "untrained": untrained, "curve": curve,
            "miou": result.metrics["val_point_miou"], "seconds": result.seconds, "config": cfg}


@pytest.mark.slow
def test_training_from_scratch_on_synthetic_scenes_reaches_07_miou(synthetic_model, one_thread):
    """A small SAM learns promptable segmentation of textured shapes from scratch."""
    assert synthetic_model["untrained"] < 0.3
    assert synthetic_model["miou"] >= TARGET_MIOU, synthetic_model["curve"]
    # The checkpoint reloads by name (custom architecture, registered from its sidecar).
    sam = checkpointing.load_trained_model(synthetic_model["path"])
    v = synthetic_model["config"].validation
    again = validate(sam, [data.SyntheticScenes(24, 128, "separated", seed=100_000, objects=4)], ("point",),
                     max_images=v.max_images, max_objects=v.max_objects, min_area=v.min_area)
    assert again["point_miou"] == pytest.approx(synthetic_model["miou"], abs=1e-6)


def _spread(source, count):
    """``count`` items evenly spread over a source (tiles of many images, not of one)."""
    step = max(1, len(source) // count)
    return data.Subset(source, range(0, len(source), step)[:count])


@pytest.mark.slow
def test_finetuning_on_dsb2018_nuclei_improves_held_out_miou(synthetic_model, tmp_path, one_thread):
    """Fine-tune the synthetic model on 20 DSB 2018 training images; held-out test mIoU rises."""
    if not (DSB_TRAIN / "images").is_dir() or not (DSB_TEST / "images").is_dir():
        print(f"skipped: the DSB 2018 data is not in {DATA_ROOT} (set SEGANY_TRAIN_DATA)")
        pytest.skip(f"DSB 2018 data not found under {DATA_ROOT}")
    # 64-pixel tiles at a 128-pixel model input: nuclei keep a useful size.
    train_tiles = data.Tiles(data.Subset(data.ImageLabelFolder(DSB_TRAIN), range(20)), tile=64)
    test_tiles = _spread(data.Tiles(data.Subset(data.ImageLabelFolder(DSB_TEST), range(12)), tile=64), 48)
    start = checkpointing.load_trained_model(synthetic_model["path"])
    protocols = ("point", "clicks")
    before = validate(start, [test_tiles], protocols, clicks=3, max_images=None, max_objects=6)
    cfg = small_config(tmp_path, **{
        "model": {"config": "train_tinyvit_128", "architecture": TINYVIT_ARCH,
                  "checkpoint": str(synthetic_model["path"])},
        "data.masks_per_image": 8, "data.augment": {"hflip": True, "vflip": True, "rot90": True},
        "batch_size": 4, "rounds": 3, "steps": 150, "num_threads": 1,
        "optim": {"lr": 5e-4, "warmup_steps": 10, "weight_decay": 0.01},
        "save_every": 100_000,
    })
    started = time.perf_counter()
    result = Trainer(cfg, train_data=[train_tiles]).fit()
    seconds = time.perf_counter() - started
    tuned = checkpointing.load_trained_model(result.model_path)
    after = validate(tuned, [test_tiles], protocols, clicks=3, max_images=None, max_objects=6)
    print(f"\nDSB 2018 fine-tuning ({len(train_tiles)} training tiles, {result.step} steps, {seconds:.0f} s): "
          f"held-out point mIoU {before['point_miou']:.3f} -> {after['point_miou']:.3f}, "
          f"3-click mIoU {before['clicks_miou']:.3f} -> {after['clicks_miou']:.3f}")
    assert after["point_miou"] > before["point_miou"] + 0.1
    assert after["clicks_miou"] > before["clicks_miou"] + 0.1
