"""Test-only access to the official implementations, used as oracles for parity tests.

``segment-anything`` (facebookresearch) and ``mobilesam-mirror`` (MobileSAM) are installed as
test dependencies with ``--no-deps``. They import torchvision (for a PIL resize and box NMS)
and MobileSAM imports timm (for DropPath and friends); the torchvision wheel is broken on
these machines and timm pulls torchvision in. So before importing them we register minimal
stand-ins that implement exactly the few functions the references call, with the reference
semantics (PIL bilinear resize, greedy NMS by descending score).
"""

from __future__ import annotations

import importlib
import sys
import types

import numpy as np
import torch


def _to_pil_image(pic):
    from PIL import Image

    array = np.asarray(pic)
    if array.ndim == 3 and array.shape[2] == 1:
        array = array[:, :, 0]
    return Image.fromarray(array)


def _resize(img, size, interpolation=None, max_size=None, antialias=None):
    from PIL import Image

    if isinstance(size, int):
        raise NotImplementedError("the stand-in only supports an explicit (h, w) size")
    height, width = size
    return img.resize((int(width), int(height)), Image.BILINEAR)


def _box_area(boxes: torch.Tensor) -> torch.Tensor:
    return (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])


def _nms(boxes: torch.Tensor, scores: torch.Tensor, iou_threshold: float) -> torch.Tensor:
    order = torch.argsort(scores, descending=True)
    boxes = boxes.double()
    areas = _box_area(boxes)
    suppressed = torch.zeros(len(boxes), dtype=torch.bool)
    keep = []
    for i in order.tolist():
        if suppressed[i]:
            continue
        keep.append(i)
        lt = torch.maximum(boxes[i, :2], boxes[:, :2])
        rb = torch.minimum(boxes[i, 2:], boxes[:, 2:])
        wh = (rb - lt).clamp(min=0)
        inter = wh[:, 0] * wh[:, 1]
        iou = inter / (areas[i] + areas - inter)
        suppressed |= iou > iou_threshold
    return torch.tensor(keep, dtype=torch.int64)


def _batched_nms(boxes, scores, idxs, iou_threshold):
    if boxes.numel() == 0:
        return torch.empty((0,), dtype=torch.int64)
    offsets = idxs.to(boxes) * (boxes.max() + 1)
    return _nms(boxes + offsets[:, None], scores, iou_threshold)


def _install_torchvision_standin() -> None:
    try:
        import torchvision.ops  # noqa: F401  (a working torchvision wins)

        return
    except Exception:
        pass
    tv = types.ModuleType("torchvision")
    transforms = types.ModuleType("torchvision.transforms")
    functional = types.ModuleType("torchvision.transforms.functional")
    functional.resize = _resize
    functional.to_pil_image = _to_pil_image
    ops = types.ModuleType("torchvision.ops")
    boxes_mod = types.ModuleType("torchvision.ops.boxes")
    boxes_mod.batched_nms = _batched_nms
    boxes_mod.box_area = _box_area
    boxes_mod.nms = _nms
    ops.boxes = boxes_mod
    transforms.functional = functional
    tv.transforms = transforms
    tv.ops = ops
    for name, module in {
        "torchvision": tv,
        "torchvision.transforms": transforms,
        "torchvision.transforms.functional": functional,
        "torchvision.ops": ops,
        "torchvision.ops.boxes": boxes_mod,
    }.items():
        sys.modules[name] = module


class _DropPath(torch.nn.Module):
    """Identity at inference, which is all the oracle is used for."""

    def __init__(self, drop_prob: float = 0.0):
        super().__init__()
        self.drop_prob = drop_prob

    def forward(self, x):
        return x


def _install_timm_standin() -> None:
    try:
        import timm.models.layers  # noqa: F401

        return
    except Exception:
        pass
    timm = types.ModuleType("timm")
    models = types.ModuleType("timm.models")
    layers = types.ModuleType("timm.models.layers")
    registry = types.ModuleType("timm.models.registry")
    layers.DropPath = _DropPath
    layers.to_2tuple = lambda x: tuple(x) if isinstance(x, (tuple, list)) else (x, x)
    layers.trunc_normal_ = torch.nn.init.trunc_normal_
    registry.register_model = lambda fn: fn
    models.layers = layers
    models.registry = registry
    timm.models = models
    for name, module in {
        "timm": timm,
        "timm.models": models,
        "timm.models.layers": layers,
        "timm.models.registry": registry,
    }.items():
        sys.modules[name] = module


def import_segment_anything():
    """Return the official ``segment_anything`` package (raises ImportError if absent)."""
    _install_torchvision_standin()
    return importlib.import_module("segment_anything")


def import_mobile_sam():
    """Return MobileSAM's ``mobile_sam`` package (raises ImportError if absent)."""
    _install_torchvision_standin()
    _install_timm_standin()
    return importlib.import_module("mobile_sam")


# ---------------------------------------------------------------------------- AMG helpers


def _connected_components_with_stats(image, connectivity=8, *args, **kwargs):
    """``cv2.connectedComponentsWithStats`` for a binary image: labels in raster order of each
    region's first pixel (OpenCV's order); stats columns x, y, w, h, area; centroids."""
    from scipy import ndimage

    image = np.asarray(image) != 0
    structure = np.ones((3, 3), bool) if connectivity == 8 else None
    labels, n = ndimage.label(image, structure=structure)
    stats = np.zeros((n + 1, 5), dtype=np.int32)
    stats[:, 4] = np.bincount(labels.ravel(), minlength=n + 1)
    centroids = np.zeros((n + 1, 2), dtype=np.float64)
    for i, box in enumerate(ndimage.find_objects(labels), start=1):
        ys, xs = box
        stats[i, :4] = [xs.start, ys.start, xs.stop - xs.start, ys.stop - ys.start]
    background = ~image
    if background.any():
        ys, xs = np.nonzero(background)
        stats[0, :4] = [xs.min(), ys.min(), xs.max() - xs.min() + 1, ys.max() - ys.min() + 1]
    return n + 1, labels.astype(np.int32), stats, centroids


def install_cv2_standin() -> None:
    """Register a minimal ``cv2`` (only ``connectedComponentsWithStats``) unless OpenCV is
    installed, so that the reference's ``min_mask_region_area`` clean-up can run."""
    try:
        import cv2  # noqa: F401

        return
    except Exception:
        pass
    cv2 = types.ModuleType("cv2")
    cv2.connectedComponentsWithStats = _connected_components_with_stats
    sys.modules["cv2"] = cv2


@torch.no_grad()
def localise_masks(
    model: torch.nn.Module,
    sizes: tuple[float, float, float] = (0.3, 0.5, 0.7),
    logit_scale: float = 12.0,
    iou_shift: float = 0.0,
    sharpness: float = 2.0,
    bump_norm: float = 40.0,
    feature_scale: float = 0.3,
    first_freq: int = 16,
    threshold: float = 0.5,
) -> None:
    """Edit a (randomised) SAM-structured model in place so that a point prompt gives masks
    that look like real ones: a smooth blob around the point, bent by the image features,
    three nested sizes for the three multimask tokens. Works on the reference's and segany's
    modules alike (same parameter names): edit one, load its state into the other.

    How: the first decoder layer's image->token attention scores become a positional-encoding
    kernel ``sum_j cos(2 pi g_j . (p - q))`` (peaked at the point ``q``) by zeroing the image
    embedding and the token embeddings on the kernel's dimensions; its values carry a token
    dimension that only the point prompt has, so image tokens near the point get a fixed
    vector added. The output upscaling is made constant over sub-pixels (smooth masks), and
    the hypernetworks read the direction of that vector, with per-token offsets (sizes)."""
    pe_enc, dec = model.prompt_encoder, model.mask_decoder
    dim = dec.transformer_dim
    half = dim // 2
    layer0, layer1 = dec.transformer.layers[0], dec.transformer.layers[1]
    i2t = layer0.cross_attn_image_to_token
    heads, n_freq = i2t.num_heads, i2t.internal_dim // 2
    per_head = n_freq // heads
    gauss = pe_enc.pe_layer.positional_encoding_gaussian_matrix  # 2 x half
    by_scale = torch.argsort(gauss.norm(dim=0)).tolist()
    # The marker: the smoothest sine dimension (nearly constant over the image).
    marker = by_scale[0]
    freqs = by_scale[1 + first_freq : 1 + first_freq + heads * (per_head - 1)]
    kernel_dims = freqs + [half + j for j in freqs]
    gen = torch.Generator().manual_seed(0)
    # Image embedding and token embeddings: nothing on the kernel dimensions or the marker.
    neck_norm = model.image_encoder.neck[3]
    neck_norm.weight.mul_(feature_scale)  # image features bend the masks but do not rule them
    neck_norm.weight[kernel_dims + [marker]] = 0.0
    neck_norm.bias[kernel_dims + [marker]] = 0.0
    for emb in [pe_enc.no_mask_embed, pe_enc.not_a_point_embed, *pe_enc.point_embeddings, dec.iou_token, dec.mask_tokens]:
        emb.weight[:, kernel_dims + [marker]] = 0.0
    pe_enc.point_embeddings[1].weight[0, marker] = 5.0  # only positive points carry the marker
    # Image tokens: a constant negative marker, so the point token scores low far away.
    pe_enc.no_mask_embed.weight[0, marker] = -threshold

    # Layer 0 token side: self-attention ~ identity, cross-attention and MLP silent.
    sa = layer0.self_attn
    for proj in (sa.q_proj, sa.k_proj, sa.v_proj, sa.out_proj):
        proj.weight.copy_(torch.eye(proj.weight.shape[0], proj.weight.shape[1]))
        proj.bias.zero_()
    for lin in (layer0.cross_attn_token_to_image.out_proj, layer0.mlp.lin2):
        lin.weight.zero_()
        lin.bias.zero_()
    # Layer 0 image -> token attention: kernel scores (frequencies dealt to the heads in turn,
    # each head a mix of scales); values = marker * u.
    select = torch.zeros(i2t.internal_dim, dim)
    f = per_head - 1
    for n, j in enumerate(freqs):
        h, k = n % heads, n // heads
        select[h * 2 * per_head + k, j] = 1.0  # sin_j
        select[h * 2 * per_head + f + k, half + j] = 1.0  # cos_j
    for h in range(heads):
        select[h * 2 * per_head + 2 * f, marker] = 1.0
    for proj in (i2t.q_proj, i2t.k_proj):
        proj.weight.copy_(select * sharpness**0.5)
        proj.bias.zero_()
    u = torch.randn(i2t.internal_dim, generator=gen)
    i2t.v_proj.weight.zero_()
    i2t.v_proj.weight[:, marker] = u
    i2t.v_proj.bias.zero_()
    i2t.out_proj.bias.zero_()
    i2t.out_proj.weight.mul_(bump_norm / i2t.out_proj(5.0 * u).norm())
    # Layer 1 leaves the image tokens alone (its token side stays random: varied IoUs).
    layer1.cross_attn_image_to_token.out_proj.weight.zero_()
    layer1.cross_attn_image_to_token.out_proj.bias.zero_()
    # Smooth upscaling (all sub-pixels alike); channel 0 of the output is a constant 5.
    conv1, norm, act1, conv2, act2 = dec.output_upscaling
    for conv in (conv1, conv2):
        conv.weight.copy_(conv.weight.mean(dim=(2, 3), keepdim=True).expand_as(conv.weight))
    conv2.weight[:, 0] = 0.0
    conv2.bias[0] = 5.0

    def z_of(keys: torch.Tensor) -> torch.Tensor:
        keys = layer1.norm4(layer0.norm4(keys))
        y = act1(norm((keys @ conv1.weight[:, :, 0, 0] + conv1.bias)[..., None, None]))[..., 0, 0]
        return act2(y @ conv2.weight[:, :, 0, 0] + conv2.bias)

    # Typical image tokens: unit-variance features (the neck ends with a LayerNorm).
    feats = torch.randn(512, dim, generator=gen) * neck_norm.weight + neck_norm.bias + pe_enc.no_mask_embed.weight
    bump = i2t.out_proj(5.0 * u)
    z_far, z_near = z_of(feats).mean(0), z_of(feats + bump).mean(0)
    direction = z_near - z_far
    direction[0] = 0.0
    direction = direction / direction.norm()
    for i, mlp in enumerate(dec.output_hypernetworks_mlps):
        last = mlp.layers[-1]
        # Mask edge where the point gets this share of the attention.
        level = float(direction @ z_of(feats + sizes[(i - 1) % len(sizes)] * bump).mean(0))
        last.weight.zero_()
        last.bias.copy_(logit_scale * direction)
        last.bias[0] = -logit_scale * level / float(z_far[0])
    dec.iou_prediction_head.layers[-1].bias.add_(iou_shift)
