"""Model construction, the configuration registry and the fast click decoder."""

from __future__ import annotations

import pytest
import torch

import segany
from segany.build import ModelConfig, build_sam, model_configs, register_config
from segany.errors import SegAnyError
from segany.modeling.click_decoder import ClickDecoder
from test_parity import _randomise


def test_unknown_model_type_lists_known_ones():
    with pytest.raises(SegAnyError, match="unknown model type 'vit_x'.*vit_b"):
        build_sam("vit_x")


def test_default_is_vit_h_like_the_reference():
    with torch.device("meta"):
        sam = build_sam("default")
    assert sam.image_encoder.patch_embed.proj.out_channels == 1280


def test_register_custom_config_builds_smaller_encoder():
    cfg = ModelConfig("test_custom_small", "vit", dict(embed_dim=96, depth=3, num_heads=3, global_attn_indexes=(2,)))
    register_config(cfg, overwrite=True)
    assert "test_custom_small" in model_configs()
    sam = build_sam("test_custom_small")
    assert len(sam.image_encoder.blocks) == 3
    assert sam.image_encoder.blocks[2].window_size == 0 and sam.image_encoder.blocks[0].window_size == 14
    assert sam(  # the full forward runs and gives a 256-channel, 64x64 embedding interface
        [{"image": torch.zeros(3, 1024, 800), "original_size": (512, 400),
          "boxes": torch.tensor([[10.0, 10.0, 500.0, 600.0]])}], multimask_output=False
    )[0]["masks"].shape == (1, 1, 512, 400)
    with pytest.raises(SegAnyError, match="already registered"):
        register_config(cfg)
    with pytest.raises(SegAnyError, match="unknown encoder kind"):
        register_config(ModelConfig("bad", "resnet"))


def test_model_is_in_eval_mode_and_has_no_pixel_stats_in_state_dict():
    sam = build_sam("test_tiny")
    assert not sam.training
    keys = sam.state_dict().keys()
    assert "pixel_mean" not in keys and "pixel_std" not in keys
    assert "prompt_encoder.pe_layer.positional_encoding_gaussian_matrix" in keys


@pytest.mark.parametrize("batch, n_points, with_box", [(1, 1, False), (1, 3, True), (4, 2, False), (2, 1, True)])
def test_click_decoder_equals_mask_decoder(batch, n_points, with_box):
    torch.manual_seed(batch * 10 + n_points)
    sam = build_sam("test_tiny")
    _randomise(sam, seed=5)
    features = torch.randn(1, 256, 64, 64)
    pe = sam.prompt_encoder
    points = (torch.rand(batch, n_points, 2) * 1024, torch.randint(0, 2, (batch, n_points)))
    boxes = torch.tensor([[50.0, 80.0, 700.0, 900.0]]).expand(batch, 4) if with_box else None
    sparse, dense = pe(points, boxes, None)
    with torch.no_grad():
        ref_masks, ref_iou = sam.mask_decoder.predict_masks(features, pe.get_dense_pe(), sparse, dense)
    fast = ClickDecoder(sam.mask_decoder, pe)
    masks, iou = fast.decode(fast.prepare(features), sparse)
    assert masks.shape == ref_masks.shape == (batch, 4, 256, 256)
    assert (masks - ref_masks).abs().max() < 1e-5
    assert (iou - ref_iou).abs().max() < 1e-6


def test_load_model_without_name_is_the_shipped_model():
    assert segany.load_model(device="cpu").model_type == "segany_lite"  # details: test_default_model
