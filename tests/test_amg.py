"""Automatic mask generation: parity with the reference, mask utilities, edge cases.

The parity tests give the reference ``SamAutomaticMaskGenerator`` and ours the same weights:
random, then edited by ``reference_oracle.localise_masks`` so that a point prompt gives a
blob around it (all-random weights give noise masks that NMS reduces to one). The models
have a 256-pixel input (16 x 16 embedding, 64 x 64 low-res masks) to keep the reference's
decoder affordable on a laptop CPU; one test uses the real 1024 input.
"""

from __future__ import annotations

import functools
import importlib
from functools import partial

import numpy as np
import pytest
import torch

import segany
from reference_oracle import _nms, import_segment_anything, install_cv2_standin, localise_masks
from segany import masks as M
from segany.amg import AutomaticMaskGenerator, records_to_label_image, records_to_polygons
from segany.build import ModelConfig, build_sam_from_config
from segany.errors import SegAnyError
from test_parity import _randomise

# pycocotools (only a test oracle here) still uses numpy 1's __array__ protocol.
pytestmark = pytest.mark.filterwarnings("ignore:__array__ implementation doesn't accept a copy keyword")


# ---------------------------------------------------------------------------- fixtures


def _blobs(h: int, w: int, seed: int = 3, n: int = 14) -> np.ndarray:
    """Coloured disks on a dark background: objects for the masks to find."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:h, 0:w]
    img = np.full((h, w, 3), 20.0)
    for _ in range(n):
        cy, cx, r = rng.integers(0, h), rng.integers(0, w), rng.integers(min(h, w) // 20 + 2, min(h, w) // 7 + 4)
        img[(yy - cy) ** 2 + (xx - cx) ** 2 < r * r] = rng.integers(60, 255, 3)
    img += rng.normal(0, 3, img.shape)
    return img.clip(0, 255).astype(np.uint8)


@functools.lru_cache(maxsize=None)
def _pair(img_size: int = 256, iou_shift: float = 0.97):
    """(reference package, reference model, our model) with identical localised weights."""
    sa = import_segment_anything()
    from segment_anything.modeling import ImageEncoderViT, MaskDecoder, PromptEncoder, Sam, TwoWayTransformer

    torch.manual_seed(0)
    grid = img_size // 16
    ref = Sam(
        image_encoder=ImageEncoderViT(
            depth=2, embed_dim=64, img_size=img_size, mlp_ratio=4, norm_layer=partial(torch.nn.LayerNorm, eps=1e-6),
            num_heads=2, patch_size=16, qkv_bias=True, use_rel_pos=True, global_attn_indexes=[1], window_size=14,
            out_chans=256,
        ),
        prompt_encoder=PromptEncoder(
            embed_dim=256, image_embedding_size=(grid, grid), input_image_size=(img_size, img_size), mask_in_chans=16
        ),
        mask_decoder=MaskDecoder(
            num_multimask_outputs=3,
            transformer=TwoWayTransformer(depth=2, embedding_dim=256, mlp_dim=2048, num_heads=8),
            transformer_dim=256, iou_head_depth=3, iou_head_hidden_dim=256,
        ),
        pixel_mean=[123.675, 116.28, 103.53],
        pixel_std=[58.395, 57.12, 57.375],
    )
    _randomise(ref, 0)
    localise_masks(ref, logit_scale=200.0, iou_shift=iou_shift)
    ref.eval()
    config = ModelConfig(
        f"amg_test_{img_size}", "vit",
        dict(embed_dim=64, depth=2, num_heads=2, global_attn_indexes=(1,), window_size=14), image_size=img_size,
    )
    ours = build_sam_from_config(config)
    ours.load_state_dict(ref.state_dict(), strict=True)
    return sa, ref, ours


def _match(a: list[dict], b: list[dict], thresh: float = 0.99) -> float:
    """Fraction of the masks of ``a`` that have a mask in ``b`` with IoU >= ``thresh``."""
    if not a:
        return 1.0
    if not b:
        return 0.0
    A = np.stack([np.asarray(r["segmentation"]).ravel() for r in a]).astype(np.float32)
    B = np.stack([np.asarray(r["segmentation"]).ravel() for r in b]).astype(np.float32)
    inter = A @ B.T
    union = A.sum(1)[:, None] + B.sum(1)[None, :] - inter
    return float(((inter / np.maximum(union, 1)).max(axis=1) >= thresh).mean())


IMAGE = _blobs(200, 300)
# (model input size, generator arguments); the 128 input keeps the reference affordable.
PARITY_CASES = {
    "grid16": (256, dict(points_per_side=16, pred_iou_thresh=0.88, stability_score_thresh=0.9)),
    "grid32": (128, dict(points_per_side=32, pred_iou_thresh=0.88, stability_score_thresh=0.9)),
    "crop_layer": (128, dict(points_per_side=8, crop_n_layers=1, pred_iou_thresh=0.88, stability_score_thresh=0.9)),
    "clean_up": (128, dict(points_per_side=12, pred_iou_thresh=0.88, stability_score_thresh=0.9, min_mask_region_area=800)),
}


@functools.lru_cache(maxsize=None)
def _reference_records(case: str) -> tuple:
    size, kwargs = PARITY_CASES[case]
    sa, ref, _ = _pair(size)
    install_cv2_standin()
    return tuple(sa.SamAutomaticMaskGenerator(ref, **kwargs).generate(IMAGE))


@pytest.fixture(scope="module")
def small():
    """A localised model with a 128-pixel input: cheap, and its masks pass the filters."""
    return _pair(128)[2]


# ---------------------------------------------------------------------------- parity


@pytest.mark.slow
@pytest.mark.parametrize("case", list(PARITY_CASES))
def test_exact_mode_equals_reference(case):
    size, kwargs = PARITY_CASES[case]
    ours = _pair(size)[2]
    ref_records = list(_reference_records(case))
    assert len(ref_records) >= 5, f"{case}: the reference found only {len(ref_records)} masks; the test needs more"
    records = AutomaticMaskGenerator(ours, exact=True, **kwargs).generate(IMAGE)
    forward, backward = _match(ref_records, records), _match(records, ref_records)
    print(f"\n{case}: reference {len(ref_records)} masks, exact {len(records)}; matched {forward:.3f} / {backward:.3f}")
    assert forward == 1.0 and backward == 1.0
    # The same numbers, record by record.
    assert len(records) == len(ref_records)
    flat = [r["segmentation"].ravel() for r in ref_records]
    order = []
    for e in records:
        i = next(k for k, m in enumerate(flat) if np.array_equal(m, e["segmentation"].ravel()))
        r = ref_records[i]
        order.append(i)
        assert e["bbox"] == r["bbox"] and e["crop_box"] == r["crop_box"] and e["area"] == r["area"]
        assert e["point_coords"] == r["point_coords"]
        assert abs(e["predicted_iou"] - r["predicted_iou"]) < 1e-4
        assert abs(e["stability_score"] - r["stability_score"]) < 1e-3
    # The same order, except where two predicted IoUs differ by float noise of the network
    # (~1e-7, the decoders are not bit-identical): NMS sorts by them. The clean-up's NMS sorts
    # on ties (changed or not) and carries such swaps further, so its order is not compared.
    if case != "clean_up":
        for a in range(len(order)):
            for b in range(a + 1, len(order)):
                if order[a] > order[b]:
                    assert abs(records[a]["predicted_iou"] - records[b]["predicted_iou"]) < 1e-5


@pytest.mark.slow
@pytest.mark.parametrize("case", ["grid16", "grid32", "crop_layer"])
def test_fast_mode_matches_reference(case):
    size, kwargs = PARITY_CASES[case]
    ours = _pair(size)[2]
    ref_records = list(_reference_records(case))
    records = AutomaticMaskGenerator(ours, **kwargs).generate(IMAGE)
    forward, backward = _match(ref_records, records), _match(records, ref_records)
    print(f"\n{case} fast mode: reference {len(ref_records)} masks, ours {len(records)}; matched {forward:.3f} / {backward:.3f}")
    assert forward >= 0.9 and backward >= 0.9


@pytest.mark.slow
def test_full_size_model_matches_reference():
    """The real 1024 input (test_tiny = the reference's ``_build_sam(64, 2, 2, [1])``)."""
    sa = import_segment_anything()
    torch.manual_seed(0)
    ref = importlib.import_module("segment_anything.build_sam")._build_sam(64, 2, 2, [1])
    _randomise(ref, 1)
    localise_masks(ref, logit_scale=200.0, iou_shift=0.97)
    ref.eval()
    ours = segany.build_sam("test_tiny")
    ours.load_state_dict(ref.state_dict(), strict=True)
    image = _blobs(150, 260, seed=5)
    kw = dict(points_per_side=5, pred_iou_thresh=0.85, stability_score_thresh=0.85, box_nms_thresh=0.9)
    ref_records = sa.SamAutomaticMaskGenerator(ref, **kw).generate(image)
    assert len(ref_records) >= 5
    for exact in (True, False):
        records = AutomaticMaskGenerator(ours, exact=exact, **kw).generate(image)
        assert _match(ref_records, records) == 1.0 and _match(records, ref_records) == 1.0, f"exact={exact}"
        assert [r["bbox"] for r in records] == [r["bbox"] for r in ref_records]


def test_generate_from_embedding_equals_generate(small):
    ours = small
    gen = AutomaticMaskGenerator(ours, points_per_side=8, pred_iou_thresh=0.8, stability_score_thresh=0.8)
    direct = gen.generate(IMAGE)
    embedding = gen.predictor.get_embedding()  # generate() leaves the whole image's embedding
    gen.predictor.reset_image()
    cached = gen.generate_from_embedding(embedding)
    assert len(direct) >= 3 and len(cached) == len(direct)
    for a, b in zip(direct, cached):
        assert np.array_equal(a["segmentation"], b["segmentation"]) and a["bbox"] == b["bbox"]
    # A predictor passed in is used as it is.
    predictor = segany.SamPredictor(ours)
    predictor.set_embedding(embedding)
    assert len(AutomaticMaskGenerator(predictor, points_per_side=8, pred_iou_thresh=0.8,
                                      stability_score_thresh=0.8).generate_from_embedding()) == len(direct)


# ---------------------------------------------------------------------------- output modes, records


@pytest.fixture(scope="module")
def three_modes(small):
    ours = small
    kw = dict(points_per_side=8, pred_iou_thresh=0.8, stability_score_thresh=0.8)
    return {mode: AutomaticMaskGenerator(ours, output_mode=mode, **kw).generate(IMAGE) for mode in segany.amg.OUTPUT_MODES}


def test_output_modes_agree_and_decode(three_modes):
    binary, raw, coco = (three_modes[m] for m in ("binary_mask", "uncompressed_rle", "coco_rle"))
    assert len(binary) == len(raw) == len(coco) >= 3
    for b, r, c in zip(binary, raw, coco):
        assert b["segmentation"].dtype == bool and b["segmentation"].shape == IMAGE.shape[:2]
        assert r["segmentation"]["size"] == [200, 300] and isinstance(r["segmentation"]["counts"], list)
        assert isinstance(c["segmentation"]["counts"], str)
        assert np.array_equal(M.rle_to_mask(r["segmentation"]), b["segmentation"])
        assert np.array_equal(M.rle_to_mask(c["segmentation"]), b["segmentation"])
        assert b["area"] == int(b["segmentation"].sum()) == M.rle_area(c["segmentation"])
        ys, xs = np.nonzero(b["segmentation"])
        assert b["bbox"] == [xs.min(), ys.min(), xs.max() - xs.min(), ys.max() - ys.min()]  # reference's XYWH
    mask_utils = pytest.importorskip("pycocotools.mask")
    for b, c in zip(binary, coco):
        rle = {"size": c["segmentation"]["size"], "counts": c["segmentation"]["counts"].encode()}
        assert np.array_equal(mask_utils.decode(rle).astype(bool), b["segmentation"])


def test_label_image_and_polygons_from_records(three_modes):
    binary = three_modes["binary_mask"]
    labels = records_to_label_image(binary)
    for mode in ("uncompressed_rle", "coco_rle"):
        assert np.array_equal(records_to_label_image(three_modes[mode]), labels)
    assert labels.shape == (200, 300) and labels.dtype == np.int32
    scores = [r["predicted_iou"] * r["stability_score"] for r in binary]
    for i, r in enumerate(binary):
        mine = labels[r["segmentation"]]
        assert np.isin(mine, [0] + [j + 1 for j in range(len(binary))]).all()
        # Where another mask overlaps, the label is the better-scored one.
        winners = np.unique(mine)
        for j in winners:
            assert scores[j - 1] >= scores[i] or j - 1 == i
    union = np.any([r["segmentation"] for r in binary], axis=0)
    assert np.array_equal(labels > 0, union)
    polys = records_to_polygons(three_modes["coco_rle"])
    assert len(polys) == len(binary)
    shapely = pytest.importorskip("shapely")
    for p, r in zip(polys, binary):
        area = sum(shapely.Polygon(poly[0], poly[1:]).area for poly in p)
        assert area == r["area"]


# ---------------------------------------------------------------------------- edge cases


def test_no_mask_passes():
    torch.manual_seed(0)
    sam = segany.build_sam("test_tiny")  # untrained: predicted IoUs are far below 1
    image = _blobs(40, 60)
    for mode in segany.amg.OUTPUT_MODES:
        gen = AutomaticMaskGenerator(sam, points_per_side=2, pred_iou_thresh=1.0, output_mode=mode)
        assert gen.generate(image) == []
    assert records_to_label_image([], (40, 60)).sum() == 0
    assert records_to_polygons([]) == []
    with pytest.raises(SegAnyError, match="shape"):
        records_to_label_image([])


@pytest.mark.parametrize("size", [(8, 8), (1, 37), (29, 1), (2, 3)])
@pytest.mark.parametrize("exact", [False, True])
def test_tiny_images(small, size, exact):
    rng = np.random.default_rng(0)
    image = rng.integers(0, 255, (*size, 3), dtype=np.uint8)
    gen = AutomaticMaskGenerator(small, points_per_side=2, pred_iou_thresh=0.0, stability_score_thresh=0.0,
                                 min_mask_region_area=2, exact=exact, crop_n_layers=int(size == (8, 8)))
    records = gen.generate(image)
    for r in records:
        assert r["segmentation"].shape == size
    labels = records_to_label_image(records, size)
    assert labels.shape == size
    records_to_polygons(records)


def test_nodata_areas(small):
    ours = small
    image = IMAGE.astype(np.float32)
    image[:, :150] = np.nan  # the left half has no data
    kw = dict(points_per_side=8, pred_iou_thresh=0.8, stability_score_thresh=0.8)
    records = AutomaticMaskGenerator(ours, **kw).generate(image)
    assert records, "masks are expected on the valid half"
    for r in records:
        assert r["point_coords"][0][0] >= 150  # no prompt on nodata
        assert not r["segmentation"][:, :150].any()  # masks are clipped to the data
        assert r["area"] > 0
    # An explicit valid_mask does the same for any image, and a crop with no data is skipped.
    valid = np.zeros(IMAGE.shape[:2], bool)
    valid[120:, 200:] = True
    gen = AutomaticMaskGenerator(ours, crop_n_layers=1, **kw)
    for r in gen.generate(IMAGE, valid_mask=valid):
        assert (r["segmentation"] <= valid).all() and r["area"] > 0
        x, y = r["point_coords"][0]
        assert valid[int(y), int(x)]
    cleaned = AutomaticMaskGenerator(ours, min_mask_region_area=2000, **kw).generate(IMAGE, valid_mask=valid)
    assert cleaned and all((r["segmentation"] <= valid).all() for r in cleaned)  # filled holes stay clipped
    assert gen.generate(IMAGE, valid_mask=np.zeros((200, 300), bool)) == []
    with pytest.raises(SegAnyError, match="valid_mask"):
        gen.generate(IMAGE, valid_mask=np.ones((10, 10), bool))


@pytest.mark.slow
def test_large_image_fast_and_lean(small):
    """3000 x 2000 with few points: no full-image float copies (a batch of 64 x 3 full-size
    logits would be 4.6 GB)."""
    import resource

    image = np.zeros((2000, 3000, 3), np.uint8)
    image[500:1500, 800:2400] = (200, 120, 40)
    image[100:400, 100:600] = (40, 200, 90)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    gen = AutomaticMaskGenerator(small, points_per_side=4, pred_iou_thresh=0.0, stability_score_thresh=0.0,
                                 output_mode="coco_rle")
    records = gen.generate(image)
    grown_mb = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) / 1024
    assert records and all(r["segmentation"]["size"] == [2000, 3000] for r in records)
    assert grown_mb < 1000, f"peak memory grew by {grown_mb:.0f} MB"
    labels = records_to_label_image(records)
    assert labels.shape == (2000, 3000)


# ---------------------------------------------------------------------------- parameters


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(points_per_side=None), "exactly one"),
        (dict(point_grids=[np.zeros((4, 2))]), "exactly one"),
        (dict(points_per_side=0), "points_per_side"),
        (dict(pred_iou_thresh=1.5), "pred_iou_thresh"),
        (dict(stability_score_thresh=-0.1), "stability_score_thresh"),
        (dict(output_mode="png"), "output_mode"),
        (dict(crop_n_layers=-1), "crop_n_layers"),
        (dict(points_per_batch=0), "points_per_batch"),
        (dict(crop_overlap_ratio=1.0), "crop_overlap_ratio"),
        (dict(min_mask_region_area=-5), "min_mask_region_area"),
        (dict(points_per_side=None, point_grids=[np.full((3, 2), 2.0)]), r"\[0, 1\]"),
        (dict(points_per_side=None, point_grids=[np.full((3, 2), 0.5)], crop_n_layers=1), "one per layer"),
        (dict(points_per_side=2, crop_n_layers=2, crop_n_points_downscale_factor=2), "no points"),
    ],
)
def test_bad_parameters(small, kwargs, message):
    with pytest.raises(SegAnyError, match=message):
        AutomaticMaskGenerator(small, **kwargs)
    with pytest.raises(SegAnyError, match="Sam or SamPredictor"):
        AutomaticMaskGenerator("vit_b")


def test_custom_point_grid(small):
    grid = np.array([[0.5, 0.5], [0.1, 0.9]])
    records = AutomaticMaskGenerator(small, points_per_side=None, point_grids=[grid], pred_iou_thresh=0.0,
                                     stability_score_thresh=0.0, box_nms_thresh=1.0).generate(_blobs(40, 50))
    points = {tuple(r["point_coords"][0]) for r in records}
    assert points <= {(25.0, 20.0), (5.0, 36.0)}


# ---------------------------------------------------------------------------- utilities


def _random_masks(rng, n=120):
    for i in range(n):
        h, w = (int(v) for v in rng.integers(1, 24, 2))
        kind = i % 5
        if kind == 0:
            m = rng.random((h, w)) < 0.5
        elif kind == 1:
            m = np.zeros((h, w), bool)
        elif kind == 2:
            m = np.ones((h, w), bool)
        elif kind == 3:
            m = np.zeros((h, w), bool)
            m[rng.integers(0, h), rng.integers(0, w)] = True  # one pixel
        else:
            m = np.zeros((h, w), bool)
            y, x = rng.integers(0, h), rng.integers(0, w)
            m[y : y + rng.integers(1, 9), x : x + rng.integers(1, 9)] = True
        yield m


def test_rle_round_trips_and_reference_encoding():
    sa = import_segment_anything()
    ref_amg = sa.utils.amg
    rng = np.random.default_rng(0)
    for m in _random_masks(rng):
        rle = M.mask_to_rle(m)
        assert rle == ref_amg.mask_to_rle_pytorch(torch.as_tensor(m)[None])[0]
        assert np.array_equal(M.rle_to_mask(rle), m)
        coco = M.rle_to_coco(rle)
        assert M.coco_to_rle(coco) == rle and np.array_equal(M.rle_to_mask(coco), m)
        assert M.rle_area(rle) == m.sum()
        assert M.masks_to_boxes(torch.as_tensor(m)[None]).tolist() == ref_amg.batched_mask_to_box(torch.as_tensor(m)[None]).tolist()
    assert M.mask_to_rle(np.zeros((0, 5), bool)) == {"size": [0, 5], "counts": [0]}


def test_coco_rle_matches_pycocotools():
    mask_utils = pytest.importorskip("pycocotools.mask")
    rng = np.random.default_rng(1)
    masks = list(_random_masks(rng))
    big = np.zeros((3000, 2000), bool)
    big[100:2900, 5:1990] = True
    big[0, 1999] = big[2999, 0] = True
    for m in masks + [big]:
        coco = M.rle_to_coco(M.mask_to_rle(m))
        theirs = mask_utils.encode(np.asfortranarray(m.astype(np.uint8)))
        assert coco["counts"] == theirs["counts"].decode()
        assert np.array_equal(mask_utils.decode({"size": coco["size"], "counts": coco["counts"].encode()}).astype(bool), m)
        assert M.rle_area(coco) == int(mask_utils.area(theirs))
        assert M.rle_to_bbox(coco) == mask_utils.toBbox(theirs).astype(int).tolist()


def test_nms_matches_reference_standin():
    rng = np.random.default_rng(2)
    for trial in range(40):
        n = int(rng.integers(0, 60))
        xy = rng.integers(0, 50, (n, 2))
        boxes = torch.as_tensor(np.concatenate([xy, xy + rng.integers(0, 30, (n, 2))], 1)).float()
        scores = torch.as_tensor(rng.integers(0, 4, n) / 4 if trial % 2 else rng.random(n)).float()  # ties too
        thr = float(rng.choice([0.0, 0.3, 0.7, 1.0]))
        expected = _nms(boxes, scores, thr) if n else torch.empty(0, dtype=torch.int64)
        assert M.nms(boxes, scores, thr).tolist() == expected.tolist()


def test_remove_small_regions_matches_reference():
    install_cv2_standin()
    ref_amg = import_segment_anything().utils.amg
    rng = np.random.default_rng(3)
    for trial in range(300):
        h, w = (int(v) for v in rng.integers(1, 20, 2))
        m = np.zeros((h, w), bool)
        for _ in range(int(rng.integers(0, 4))):
            y, x = rng.integers(0, h), rng.integers(0, w)
            m[y : y + rng.integers(1, h + 1), x : x + rng.integers(1, w + 1)] ^= True
        if trial % 3 == 0:
            m ^= rng.random((h, w)) < 0.1
        area = int(rng.integers(0, 30))
        for mode in ("holes", "islands"):
            ours, changed = M.remove_small_regions(m, area, mode)
            theirs, ref_changed = ref_amg.remove_small_regions(m, area, mode)
            assert changed == ref_changed and np.array_equal(ours, theirs), (trial, mode)
    one = np.zeros((5, 5), bool)
    one[2, 2] = True
    assert M.remove_small_regions(one, 10, "islands")[0][2, 2]  # the only island is kept
    assert M.remove_small_regions(~one, 10, "holes")[0].all()


def test_crop_boxes_and_grids_match_reference():
    ref_amg = import_segment_anything().utils.amg
    for size, layers, ratio in [((768, 1024), 1, 512 / 1500), ((100, 37), 2, 0.3), ((1, 9), 1, 0.5)]:
        assert M.generate_crop_boxes(size, layers, ratio) == ref_amg.generate_crop_boxes(size, layers, ratio)
    for a, b in zip(M.build_all_layer_point_grids(32, 2, 2), ref_amg.build_all_layer_point_grids(32, 2, 2)):
        assert np.array_equal(a, b)


def test_label_image_overlaps_and_single_pixels():
    a = np.zeros((4, 5), bool)
    a[1, 1] = True  # one pixel
    b = np.zeros((4, 5), bool)
    b[:3, :3] = True
    labels = M.label_image([a, b], (4, 5), scores=[0.9, 0.5])
    assert labels[1, 1] == 1 and labels[0, 0] == 2 and labels[3, 4] == 0
    assert M.label_image([a, b], (4, 5), scores=[0.1, 0.5])[1, 1] == 2
    assert M.label_image([M.mask_to_rle(a)], (4, 5)).sum() == 1
    with pytest.raises(ValueError, match="shape"):
        M.label_image([a], (5, 5))


def test_polygons_are_valid_and_exact():
    shapely = pytest.importorskip("shapely")
    features = pytest.importorskip("rasterio.features")
    from rasterio.transform import Affine

    rng = np.random.default_rng(4)
    masks = list(_random_masks(rng, 150))
    checker = np.indices((6, 6)).sum(0) % 2 == 0  # diagonal neighbours only
    ring = np.ones((5, 5), bool)
    ring[1:4, 1:4] = False
    ring[2, 2] = True  # an island in a hole
    pinch = np.zeros((4, 4), bool)
    pinch[:2, :2] = pinch[2:, 2:] = True
    pinch[0, 2:] = pinch[:, 3] = True  # a region touching itself at a corner
    for m in masks + [checker, ring, pinch]:
        polys = M.mask_to_polygons(m)
        shapes = [shapely.Polygon(p[0], p[1:]) for p in polys]
        assert all(s.is_valid for s in shapes), [shapely.is_valid_reason(s) for s in shapes]
        assert sum(s.area for s in shapes) == m.sum()
        for p in polys:
            assert M._signed_area(p[0]) > 0 and all(M._signed_area(r) < 0 for r in p[1:])
            assert all(np.array_equal(r[0], r[-1]) for r in p)
        if shapes:
            back = features.rasterize([(s, 1) for s in shapes], out_shape=m.shape, transform=Affine.identity())
            assert np.array_equal(back.astype(bool), m)
            theirs = [shapely.geometry.shape(g) for g, _ in features.shapes(m.astype(np.uint8), mask=m, connectivity=4)]
            assert len(theirs) == len(shapes)
    single = M.mask_to_polygons(np.pad(np.ones((1, 1), bool), ((3, 1), (2, 4))))
    assert single[0][0].tolist() == [[2.0, 3.0], [3.0, 3.0], [3.0, 4.0], [2.0, 4.0], [2.0, 3.0]]
    assert M.mask_to_polygons(np.zeros((3, 3), bool)) == []
