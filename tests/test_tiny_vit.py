"""MobileSAM's TinyViT encoder (``vit_t``) against the official implementation.

The oracle is ``mobile_sam``'s own ``TinyViT``, taken from ``build_sam_vit_t`` so that the
constructor arguments are exactly MobileSAM's. Random weights stand in for the checkpoint:
every tensor, BatchNorm running statistics and attention biases included, is randomised so
that no branch is silently zero (MBConv's last BatchNorm starts at zero, for instance).
"""

from __future__ import annotations

import importlib
import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(__file__))
from reference_oracle import import_mobile_sam  # noqa: E402

from segany.modeling.tiny_vit import (  # noqa: E402
    BasicLayer,
    ConvLayer,
    DropPath,
    MBConv,
    PatchMerging,
    TinyViT,
)

# Everything here is CPU float32 of the same operations in another order.
PARITY_ATOL = 1e-4


@pytest.fixture(scope="module")
def mobile_sam():
    try:
        return import_mobile_sam()
    except ImportError as exc:
        pytest.skip(f"MobileSAM reference not installed: {exc}")


@pytest.fixture(scope="module")
def reference_sam(mobile_sam):
    torch.manual_seed(0)
    return mobile_sam.build_sam_vit_t()


def randomise_(module: torch.nn.Module, seed: int = 0) -> None:
    """Give every floating-point tensor of ``module``'s state dict non-trivial values."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, tensor in module.state_dict().items():
            if not tensor.is_floating_point():
                continue  # num_batches_tracked
            noise = torch.randn(tensor.shape, generator=generator)
            if name.endswith("running_var"):
                tensor.copy_(torch.rand(tensor.shape, generator=generator) + 0.5)
            elif name.endswith("attention_biases"):
                tensor.copy_(noise)
            elif tensor.ndim >= 2:  # conv and linear weights: variance-preserving scale
                tensor.copy_(noise * tensor[0].numel() ** -0.5)
            elif name.endswith("weight"):  # BatchNorm / LayerNorm scales
                tensor.copy_(1.0 + 0.1 * noise)
            else:  # biases, running means
                tensor.copy_(0.1 * noise)


@pytest.fixture(scope="module")
def reference_encoder(reference_sam):
    encoder = reference_sam.image_encoder
    randomise_(encoder)
    # The reference caches its attention biases in ``train(False)``: refresh that cache
    # after changing the weights, or the oracle runs with stale (zero) biases.
    encoder.train(False)
    return encoder


def test_state_dict_names_and_shapes_match_reference(reference_sam):
    ours = TinyViT()
    ref_sd = reference_sam.image_encoder.state_dict()
    our_sd = ours.state_dict()
    assert list(our_sd) == list(ref_sd)  # same names, same order
    assert {k: tuple(v.shape) for k, v in our_sd.items()} == {
        k: tuple(v.shape) for k, v in ref_sd.items()
    }
    assert {k: v.dtype for k, v in our_sd.items()} == {k: v.dtype for k, v in ref_sd.items()}
    # The full vit_t model: our encoder supplies exactly the reference encoder's share.
    full = reference_sam.state_dict()
    assert len(full) == 439
    prefix = "image_encoder."
    encoder_keys = {k.removeprefix(prefix) for k in full if k.startswith(prefix)}
    assert encoder_keys == set(our_sd)
    assert len(full) - len(encoder_keys) + len(our_sd) == 439
    assert ours.img_size == reference_sam.image_encoder.img_size == 1024


def test_relative_offset_indices_match_reference(reference_sam):
    ours = TinyViT()
    ref_idx = {
        k: v for k, v in reference_sam.image_encoder.named_buffers() if "attention_bias_idxs" in k
    }
    our_idx = dict(ours.named_buffers())
    assert ref_idx  # 10 attention blocks
    for name, idx in ref_idx.items():
        assert torch.equal(our_idx[name], idx), name


@pytest.mark.parametrize("batch", [1, 2])
def test_outputs_match_reference(reference_encoder, batch):
    ours = TinyViT()
    ours.load_state_dict(reference_encoder.state_dict(), strict=True)
    ours.eval()
    x = torch.randn(batch, 3, 1024, 1024, generator=torch.Generator().manual_seed(batch))
    with torch.no_grad():
        expected = reference_encoder(x)
        actual = ours(x)
    assert actual.shape == (batch, 256, 64, 64)
    assert actual.is_contiguous()
    diff = (actual - expected).abs().max().item()
    scale = expected.abs().max().item()
    print(f"TinyViT parity, batch {batch}: max |diff| = {diff:.3g} (max |ref| = {scale:.3g})")
    assert diff <= PARITY_ATOL


def test_eval_before_loading_weights_uses_the_loaded_biases():
    """The reference caches its attention bias in ``.eval()``; loading afterwards is ignored.

    Ours must give the same outputs whichever order eval() and load_state_dict() come in.
    Small input: the encoder works at any size, and the biases matter at every one.
    """
    torch.manual_seed(1)
    source = TinyViT()
    randomise_(source, seed=1)
    state = source.state_dict()

    loaded_then_eval = TinyViT()
    loaded_then_eval.load_state_dict(state, strict=True)
    loaded_then_eval.eval()

    eval_then_loaded = TinyViT().eval()
    eval_then_loaded.load_state_dict(state, strict=True)

    fresh = TinyViT().eval()  # zero attention biases: must differ, or the test proves nothing
    fresh.load_state_dict(
        {k: v for k, v in state.items() if "attention_biases" not in k}, strict=False
    )

    x = torch.randn(1, 3, 256, 256, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        expected = loaded_then_eval(x)
        actual = eval_then_loaded(x)
        without_biases = fresh(x)
    assert actual.shape == (1, 256, 16, 16)
    torch.testing.assert_close(actual, expected, rtol=0, atol=0)
    assert (without_biases - expected).abs().max() > 1e-3


def _assert_training_step_matches(ref, ours, x_ref, x_ours, to_ref_layout):
    """Train-mode forward and backward of a reference stage and ours: outputs and gradients."""
    ours.load_state_dict(ref.state_dict(), strict=True)
    ref.train()
    ours.train()
    x_ref.requires_grad_(True)
    x_ours.requires_grad_(True)
    out_ref, out_ours = ref(x_ref), ours(x_ours)
    torch.testing.assert_close(to_ref_layout(out_ours), out_ref, rtol=1e-4, atol=1e-5)
    grad = torch.randn(out_ref.shape, generator=torch.Generator().manual_seed(7))
    out_ref.backward(grad)
    out_ours.backward(grad.view(out_ours.shape))
    ours_params = dict(ours.named_parameters())
    for name, param in ref.named_parameters():
        torch.testing.assert_close(
            ours_params[name].grad, param.grad, rtol=1e-4, atol=1e-5, msg=name
        )
    return x_ref.grad, x_ours.grad


def test_attention_stage_trains_like_the_reference(mobile_sam):
    """Gradients too (attention bias through the SDPA mask, BatchNorm batch statistics)."""
    tv = importlib.import_module("mobile_sam.modeling.tiny_vit_sam")
    torch.manual_seed(5)
    # 20x20 tokens, 7x7 windows: padded to 21x21, as in every vit_t stage.
    ref = tv.BasicLayer(
        dim=32,
        input_resolution=(20, 20),
        depth=2,
        num_heads=2,
        window_size=7,
        drop_path=0.0,
        downsample=tv.PatchMerging,
        out_dim=48,
        activation=torch.nn.GELU,
    )
    merge = PatchMerging(32, 48, stride=2, activation=torch.nn.GELU)
    ours = BasicLayer(32, 2, 2, 7, torch.nn.GELU, [0.0, 0.0], merge)
    randomise_(ref, seed=5)
    x = torch.randn(2, 20, 20, 32)
    grad_ref, grad_ours = _assert_training_step_matches(
        ref, ours, x.reshape(2, 400, 32).clone(), x.clone(), lambda y: y.reshape(2, 100, 48)
    )
    torch.testing.assert_close(grad_ours.reshape(2, 400, 32), grad_ref, rtol=1e-4, atol=1e-5)


def test_conv_stage_trains_like_the_reference(mobile_sam):
    tv = importlib.import_module("mobile_sam.modeling.tiny_vit_sam")
    torch.manual_seed(6)
    ref = tv.ConvLayer(
        dim=16,
        input_resolution=(20, 20),
        depth=2,
        activation=torch.nn.GELU,
        drop_path=0.0,
        downsample=tv.PatchMerging,
        out_dim=24,
        conv_expand_ratio=4.0,
    )
    merge = PatchMerging(16, 24, stride=2, activation=torch.nn.GELU)
    ours = ConvLayer(16, 2, torch.nn.GELU, [0.0, 0.0], merge)
    randomise_(ref, seed=6)
    x = torch.randn(2, 16, 20, 20)
    grad_ref, grad_ours = _assert_training_step_matches(
        ref, ours, x.clone(), x.clone(), lambda y: y.reshape(2, 100, 24)
    )
    torch.testing.assert_close(grad_ours, grad_ref, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("batch", [1, 2])
def test_mbconv_row_strips_match_the_whole_map(batch):
    """At inference on the CPU, MBConv runs in strips of rows; the result must not change."""
    torch.manual_seed(4)
    block = MBConv(16, 4.0, torch.nn.GELU, drop_path=0.0)
    randomise_(block, seed=4)
    block.eval()
    # 45 rows: 8-row strips with a 5-row remainder, odd width, channels-last as in TinyViT.
    x = torch.randn(batch, 16, 45, 23).contiguous(memory_format=torch.channels_last)
    with torch.no_grad():
        block.strip_bytes = 2**62  # one strip: the plain block
        whole = block(x)
        block.strip_bytes = 1  # the minimum, 8 rows per strip
        assert block._rows_per_strip(x) == 8
        strips = block(x)
    torch.testing.assert_close(strips, whole, rtol=0, atol=1e-6)
    assert strips.is_contiguous(memory_format=torch.channels_last)


def test_drop_path_is_identity_at_inference_and_per_sample_in_training():
    drop = DropPath(0.5)
    x = torch.randn(64, 3, 5)
    drop.eval()
    assert drop(x) is x
    drop.train()
    torch.manual_seed(0)
    y = drop(x)
    kept = (y != 0).flatten(1).any(1)
    assert 0 < kept.sum() < 64  # some samples dropped, some kept
    torch.testing.assert_close(y[kept], x[kept] * 2.0)  # survivors rescaled by 1/keep_prob
    assert torch.all(y[~kept] == 0)


def test_stochastic_depth_only_in_training():
    torch.manual_seed(0)
    model = TinyViT(drop_path_rate=0.5)
    randomise_(model, seed=3)
    model.eval()  # BN running statistics; only DropPath differs between the modes below
    x = torch.randn(2, 3, 128, 128)
    with torch.no_grad():
        first, second = model(x), model(x)
        torch.testing.assert_close(first, second, rtol=0, atol=0)
        for module in model.modules():
            if isinstance(module, DropPath):
                module.train()
        assert not torch.allclose(model(x), first)
