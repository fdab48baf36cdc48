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
