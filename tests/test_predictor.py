"""Predictor behaviour beyond parity: input types, embeddings, batching and bad input."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import segany
from segany.errors import ImageError, PromptError, SegAnyError


@pytest.fixture(scope="module")
def tiny_model():
    torch.manual_seed(0)
    return segany.build_sam("test_tiny")


@pytest.fixture()
def predictor(tiny_model):
    p = segany.SamPredictor(tiny_model)
    rng = np.random.default_rng(0)
    p.set_image(rng.integers(0, 255, (90, 120, 3), dtype=np.uint8))
    return p


def _textured(h=90, w=120, dtype=np.uint8, scale=1.0):
    rng = np.random.default_rng(1)
    return (rng.random((h, w, 3)) * 255 * scale).astype(dtype)


# ---------------------------------------------------------------- image types
def test_grey_image_equals_its_rgb_copy(tiny_model):
    grey = _textured()[..., 0]
    a, b = segany.SamPredictor(tiny_model), segany.SamPredictor(tiny_model)
    a.set_image(grey)
    b.set_image(np.repeat(grey[..., None], 3, axis=2))
    assert torch.equal(a.get_image_embedding(), b.get_image_embedding())


def test_bgr_input_is_reversed(tiny_model):
    rgb = _textured()
    a, b = segany.SamPredictor(tiny_model), segany.SamPredictor(tiny_model)
    a.set_image(rgb)
    b.set_image(rgb[..., ::-1].copy(), image_format="BGR")
    assert torch.equal(a.get_image_embedding(), b.get_image_embedding())


def test_uint16_and_float_are_stretched_like_uint8(tiny_model):
    """A 16-bit or float image holding the same picture gives the same embedding."""
    base = _textured()
    base[0, 0] = 0
    base[0, 1] = 255  # full range so the 0-100 % stretch is the identity
    as_u16 = base.astype(np.uint16) * 257
    as_float = base.astype(np.float32) / 255.0
    ref, p16, pf = (segany.SamPredictor(tiny_model) for _ in range(3))
    ref.set_image(base)
    p16.set_image(as_u16, value_range=(0, 65535))
    pf.set_image(as_float, value_range=(0.0, 1.0))
    assert torch.allclose(ref.get_image_embedding(), p16.get_image_embedding(), atol=1e-5)
    assert torch.allclose(ref.get_image_embedding(), pf.get_image_embedding(), atol=1e-5)


def test_nan_and_nodata_pixels_are_marked_invalid(tiny_model):
    img = _textured().astype(np.float32)
    img[:10] = np.nan
    img[-5:, :] = -9999
    p = segany.SamPredictor(tiny_model)
    p.set_image(img, nodata=-9999)
    assert p.valid_mask is not None
    assert not p.valid_mask[:10].any() and not p.valid_mask[-5:].any() and p.valid_mask[20:80].all()


def test_rgba_drops_alpha(tiny_model):
    rgb = _textured()
    rgba = np.concatenate([rgb, np.full(rgb.shape[:2] + (1,), 7, np.uint8)], axis=2)
    a, b = segany.SamPredictor(tiny_model), segany.SamPredictor(tiny_model)
    a.set_image(rgb)
    b.set_image(rgba)
    assert torch.equal(a.get_image_embedding(), b.get_image_embedding())


@pytest.mark.parametrize(
    "image, message",
    [
        (np.zeros((0, 10, 3), np.uint8), "empty"),
        (np.zeros((10, 10, 5), np.uint8), "5"),
        (np.zeros((3, 64, 64), np.uint8), "channels-first"),
        (np.zeros((4, 4, 4, 3), np.uint8), "shape"),
        (np.full((20, 20, 3), 17, np.uint8), "constant"),
        (np.full((20, 20), 3000, np.uint16), "constant"),
        (np.full((20, 20), np.nan, np.float32), "NaN"),
        (np.zeros((20, 20), np.complex64), "unsupported"),
        (np.array([["a", "b"]]), "unsupported"),
    ],
)
def test_bad_images_raise_clear_errors(tiny_model, image, message):
    p = segany.SamPredictor(tiny_model)
    with pytest.raises(ImageError, match=message):
        p.set_image(image)


def test_sparse_image_is_not_called_constant(tiny_model):
    """A few bright cells on a zero background: the 99.5th percentile is 0 but it has contrast."""
    img = np.zeros((100, 100), np.uint16)
    img[10:12, 10:12] = 5000
    p = segany.SamPredictor(tiny_model)
    p.set_image(img)
    assert p.is_image_set


def test_set_image_does_not_modify_the_callers_array(tiny_model):
    img = _textured()
    img_copy = img.copy()
    segany.SamPredictor(tiny_model).set_image(img, nodata=img[0, 0, 0])
    assert np.array_equal(img, img_copy)


# ---------------------------------------------------------------- prompts
@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(point_coords=np.array([[10, 10]])), "without point_labels"),
        (dict(point_labels=np.array([1])), "without point_coords"),
        (dict(point_coords=np.array([[10, 10]]), point_labels=np.array([2])), "1 \\(foreground\\) or 0"),
        (dict(point_coords=np.array([[10, 10]]), point_labels=np.array([-1])), "1 \\(foreground\\) or 0"),
        (dict(point_coords=np.array([[10, 10, 3]]), point_labels=np.array([1])), "N x 2"),
        (dict(point_coords=np.array([[10, 10], [5, 5]]), point_labels=np.array([1])), "point_labels has shape"),
        (dict(point_coords=np.array([[500, 10]]), point_labels=np.array([1])), "outside the image"),
        (dict(point_coords=np.array([[-3, 10]]), point_labels=np.array([1])), "outside the image"),
        (dict(point_coords=np.array([[np.nan, 10]]), point_labels=np.array([1])), "NaN"),
        (dict(box=np.array([50, 50, 10, 10])), "x1 < x0"),
        (dict(box=np.array([500, 500, 600, 600])), "outside the image"),
        (dict(box=np.array([1, 2, 3])), "x0, y0, x1, y1"),
        (dict(box=np.array([[1, 2, 30, 40], [1, 2, 30, 40]]),
              point_coords=np.zeros((3, 1, 2)), point_labels=np.ones((3, 1))), "batch size"),
        (dict(mask_input=np.zeros((1, 64, 64))), "low-resolution logits"),
        (dict(mask_input=np.full((1, 256, 256), np.inf)), "NaN or infinite"),
    ],
)
def test_bad_prompts_raise_clear_errors(predictor, kwargs, message):
    with pytest.raises(PromptError, match=message):
        predictor.predict(**kwargs)


def test_predict_before_set_image_is_an_error(tiny_model):
    with pytest.raises(SegAnyError, match="no image is set"):
        segany.SamPredictor(tiny_model).predict(box=np.array([0, 0, 5, 5]))


def test_box_partly_outside_is_clipped(predictor):
    clipped = predictor.predict(box=np.array([60, 40, 120, 90]), multimask_output=False)
    spilling = predictor.predict(box=np.array([60, 40, 400, 300]), multimask_output=False)
    assert np.array_equal(clipped[2], spilling[2])


def test_no_prompt_returns_a_mask(predictor):
    masks, iou, low = predictor.predict()
    assert masks.shape == (3, 90, 120) and iou.shape == (3,) and low.shape == (3, 256, 256)


def test_batched_points_give_one_result_per_prompt(predictor):
    coords = np.array([[[10, 10]], [[60, 40]], [[100, 80]]], dtype=float)
    labels = np.ones((3, 1))
    masks, iou, _ = predictor.predict(point_coords=coords, point_labels=labels, multimask_output=False)
    assert masks.shape == (3, 1, 90, 120)
    for i in range(3):
        single = predictor.predict(point_coords=coords[i], point_labels=labels[i], multimask_output=False)
        assert np.allclose(single[1], iou[i], atol=1e-5)


def test_return_logits_thresholds_to_masks(predictor):
    logits = predictor.predict(box=np.array([10, 10, 80, 60]), return_logits=True)[0]
    masks = predictor.predict(box=np.array([10, 10, 80, 60]))[0]
    assert logits.dtype == np.float32 and masks.dtype == bool
    assert np.array_equal(logits > 0, masks)


# ---------------------------------------------------------------- embeddings
def test_set_embedding_reproduces_predictions(tiny_model, predictor):
    emb = predictor.get_embedding()
    other = segany.SamPredictor(tiny_model)
    other.set_embedding(emb)
    box = np.array([5, 5, 70, 50])
    assert np.array_equal(other.predict(box=box)[2], predictor.predict(box=box)[2])
    bare = segany.SamPredictor(tiny_model)
    bare.set_embedding(emb.features, original_size=emb.original_size)
    assert np.array_equal(bare.predict(box=box)[2], predictor.predict(box=box)[2])


def test_set_embedding_rejects_wrong_shape_and_model(tiny_model):
    p = segany.SamPredictor(tiny_model)
    with pytest.raises(SegAnyError, match="needs 1 x 256 x 64 x 64"):
        p.set_embedding(segany.ImageEmbedding(torch.zeros(1, 128, 64, 64), (10, 10), (1024, 1024)))
    with pytest.raises(SegAnyError, match="recompute"):
        p.set_embedding(segany.ImageEmbedding(torch.zeros(1, 256, 64, 64), (10, 10), (1024, 1024), "vit_h"))
    with pytest.raises(SegAnyError, match="original_size"):
        p.set_embedding(torch.zeros(1, 256, 64, 64))


def test_compute_embeddings_batches_like_single_images(tiny_model):
    images = [_textured(60, 80), _textured(80, 60)[..., 0], _textured(50, 50)]
    p = segany.SamPredictor(tiny_model)
    batched = p.compute_embeddings(images, batch_size=2)
    assert len(batched) == 3
    for image, emb in zip(images, batched):
        p.set_image(image)
        assert emb.original_size == image.shape[:2]
        assert torch.allclose(emb.features, p.get_image_embedding(), atol=1e-4)


def test_bf16_autocast_runs_and_stays_close(tiny_model):
    img = _textured()
    exact, fast = segany.SamPredictor(tiny_model), segany.SamPredictor(tiny_model, precision="bf16")
    exact.set_image(img)
    fast.set_image(img)
    assert fast.get_image_embedding().dtype == torch.float32
    diff = (exact.get_image_embedding() - fast.get_image_embedding()).abs().max().item()
    assert 0 < diff < 0.5  # bf16 changes the numbers, but not by much
    m_exact = exact.predict(box=np.array([10, 10, 80, 60]), multimask_output=False)[0]
    m_fast = fast.predict(box=np.array([10, 10, 80, 60]), multimask_output=False)[0]
    assert (m_exact == m_fast).mean() > 0.9


def test_bad_predictor_options(tiny_model):
    with pytest.raises(SegAnyError, match="precision"):
        segany.SamPredictor(tiny_model, precision="int4")
    with pytest.raises(SegAnyError, match="needs a GPU"):
        segany.SamPredictor(tiny_model, precision="fp16")
