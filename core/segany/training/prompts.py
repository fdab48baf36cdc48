"""The interactive prompt simulation of the SAM paper (section 3 and appendix A).

For every ground-truth mask, one training step plays a short interactive session:

1. **first prompt**: with equal probability a foreground point drawn uniformly from the
   mask, or the mask's bounding box with noise on each coordinate (standard deviation 10 %
   of the box side, at most 20 pixels of a 1024-pixel frame);
2. **corrective clicks**: each later point is drawn uniformly from the error region of the
   previous prediction; it is positive when it falls in a false negative (the object was
   missed there) and negative in a false positive;
3. the previous low-resolution logits are fed back (detached) as the mask prompt;
4. 11 rounds in all: the first prompt, 8 corrective clicks, and 2 rounds that add no new
   point -- "one iteration randomly inserted among the iteratively sampled points and one at
   the end" -- so the model learns to refine its own mask from the mask prompt alone.

Prompts of a batch are kept as one ``M x N x 2`` coordinate tensor and one ``M x N`` label
tensor, whatever the first prompt was: a point prompt starts as ``[point, padding]``
(labels ``1, -1``) and a box as ``[top-left, bottom-right]`` (labels ``2, 3``), so every
row has the same length and :func:`embed_sparse` gives exactly the tokens that
:class:`~segany.modeling.PromptEncoder` gives at inference (one padding token after
point-only prompts, none with a box). The token order differs, which does not matter: the
decoder's transformer has no positional encoding over prompt tokens.

Everything is batched in torch with an explicit ``torch.Generator``, so it runs on the
training device and is reproducible.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from ..modeling import PromptEncoder

__all__ = [
    "PAD",
    "NEGATIVE",
    "POSITIVE",
    "BOX_TOP_LEFT",
    "BOX_BOTTOM_RIGHT",
    "FIRST",
    "CLICK",
    "NO_POINT",
    "Prompts",
    "round_schedule",
    "sample_points",
    "mask_boxes",
    "noisy_boxes",
    "first_prompts",
    "error_clicks",
    "embed_sparse",
]

# Point labels. -1/0/1 are the prompt encoder's; 2/3 mark box corners inside the point list.
PAD, NEGATIVE, POSITIVE, BOX_TOP_LEFT, BOX_BOTTOM_RIGHT = -1, 0, 1, 2, 3

# What a round of the session does.
FIRST = "first"  # the initial point or box
CLICK = "click"  # a corrective point from the error region
NO_POINT = "none"  # no new point: refine from the previous mask alone


def round_schedule(rounds: int = 11, rng: np.random.Generator | None = None) -> list[str]:
    """The kinds of the ``rounds`` rounds of one simulated session.

    With 3 rounds or more, one no-new-point round is inserted at a random position among
    the corrective clicks and one is the last round (the paper's 11 = 1 + 8 + 2); with 2
    rounds the second adds no point; 1 round is the first prompt only.

    Example:
        >>> s = round_schedule(11, np.random.default_rng(0))
        >>> len(s), s[0], s[-1], s.count(CLICK), s.count(NO_POINT)
        (11, 'first', 'none', 8, 2)
        >>> round_schedule(2)
        ['first', 'none']
    """
    if rounds < 1:
        raise ValueError(f"rounds must be at least 1, got {rounds}")
    if rounds == 1:
        return [FIRST]
    if rounds == 2:
        return [FIRST, NO_POINT]
    rng = rng if rng is not None else np.random.default_rng()
    middle = [CLICK] * (rounds - 3)
    # Insert among the clicks: after at least one of them when there is one, so that the
    # refinement round sees a prompt set that already contains corrections.
    position = int(rng.integers(1, len(middle) + 1)) if middle else 0
    middle.insert(position, NO_POINT)
    return [FIRST, *middle, NO_POINT]


def sample_points(region: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """One pixel drawn uniformly from each ``M x H x W`` boolean region: ``M x 2`` (x, y).

    Rows with an empty region get ``(-1, -1)``; callers decide what to do with them.

    Example:
        >>> r = torch.zeros(1, 4, 5, dtype=torch.bool); r[0, 2, 3] = True
        >>> sample_points(r).tolist()
        [[3, 2]]
    """
    m, h, w = region.shape
    weights = region.reshape(m, h * w).float()
    empty = weights.sum(dim=1) == 0
    # multinomial refuses all-zero rows: give those a dummy weight and mark them afterwards.
    weights[empty, 0] = 1.0
    index = torch.multinomial(weights, 1, generator=generator).squeeze(1)
    points = torch.stack([index % w, index // w], dim=1)
    points[empty] = -1
    return points


def mask_boxes(masks: torch.Tensor) -> torch.Tensor:
    """Tight boxes ``M x 4`` (x0, y0, x1, y1, inclusive pixel indices) of ``M x H x W`` masks.

    Example:
        >>> m = torch.zeros(1, 6, 8, dtype=torch.bool); m[0, 1:3, 2:6] = True
        >>> mask_boxes(m).tolist()
        [[2.0, 1.0, 5.0, 2.0]]
    """
    m, h, w = masks.shape
    rows = masks.any(dim=2)
    cols = masks.any(dim=1)
    ys = torch.arange(h, device=masks.device, dtype=torch.float32)
    xs = torch.arange(w, device=masks.device, dtype=torch.float32)
    big = float(max(h, w))
    y0 = torch.where(rows, ys, big).amin(dim=1)
    y1 = torch.where(rows, ys, -1.0).amax(dim=1)
    x0 = torch.where(cols, xs, big).amin(dim=1)
    x1 = torch.where(cols, xs, -1.0).amax(dim=1)
    return torch.stack([x0, y0, x1, y1], dim=1)


def noisy_boxes(
    boxes: torch.Tensor,
    image_size: int,
    generator: torch.Generator | None = None,
    noise_fraction: float = 0.1,
    max_noise: float = 20.0,
) -> torch.Tensor:
    """Jitter ``M x 4`` boxes as in the paper: each coordinate gets Gaussian noise.

    Args:
        boxes: boxes in the model input frame (pixels of an ``image_size`` square).
        image_size: side of the model input; boxes are clipped to it.
        noise_fraction: noise standard deviation as a fraction of the box side (0.1).
        max_noise: largest shift in pixels of a 1024-pixel frame (20); scaled to
            ``image_size`` so that a 256-pixel model gets the same relative noise.

    Example:
        >>> b = noisy_boxes(torch.tensor([[10.0, 10.0, 50.0, 30.0]]), 64, torch.Generator().manual_seed(0))
        >>> bool((b[:, 2:] > b[:, :2]).all()), bool((b >= 0).all() and (b <= 63).all())
        (True, True)
    """
    side = torch.stack(
        [boxes[:, 2] - boxes[:, 0], boxes[:, 3] - boxes[:, 1]] * 2, dim=1
    ).clamp(min=1.0)
    noise = torch.randn(boxes.shape, generator=generator, device=boxes.device) * (noise_fraction * side)
    limit = max_noise * image_size / 1024.0
    noisy = boxes + noise.clamp(-limit, limit)
    noisy = noisy.clamp(0.0, image_size - 1.0)
    # Keep a valid box (x1 > x0, y1 > y0) even when the noise crossed the corners.
    lo = torch.minimum(noisy[:, :2], noisy[:, 2:])
    hi = torch.maximum(noisy[:, :2], noisy[:, 2:]).clamp(min=lo + 1.0)
    return torch.cat([lo, hi], dim=1)


@dataclass
class Prompts:
    """The growing prompt set of ``M`` simulated sessions.

    Attributes:
        coords: ``M x N x 2`` (x, y) in the model input frame.
        labels: ``M x N`` (-1 padding, 0 negative, 1 positive, 2/3 box corners).
        single_point: ``M`` bool; True where the first prompt is one point (ambiguous:
            answered with the 3 multimask candidates in the first round).
    """

    coords: torch.Tensor
    labels: torch.Tensor
    single_point: torch.Tensor

    def add(self, coords: torch.Tensor, labels: torch.Tensor) -> "Prompts":
        """Append one point per session (``M x 2`` and ``M``)."""
        return Prompts(
            torch.cat([self.coords, coords[:, None].to(self.coords)], dim=1),
            torch.cat([self.labels, labels[:, None].to(self.labels)], dim=1),
            self.single_point,
        )


def _to_input_frame(points: torch.Tensor, scale: float, generator: torch.Generator | None) -> torch.Tensor:
    """Pixel indices of a mask grid -> continuous model-frame coordinates.

    With masks at the model resolution (``scale == 1``) a pixel index is the coordinate.
    A low-resolution pixel covers ``scale`` input pixels: pick a uniform spot inside it.
    """
    points = points.float()
    if scale == 1.0:
        return points
    jitter = torch.rand(points.shape, generator=generator, device=points.device)
    return (points + jitter) * scale - 0.5


def first_prompts(
    masks: torch.Tensor,
    image_size: int,
    generator: torch.Generator | None = None,
    box_probability: float = 0.5,
    noise_fraction: float = 0.1,
    max_noise: float = 20.0,
) -> Prompts:
    """First prompt of each session: a point in the mask or its noisy box.

    Args:
        masks: ``M x H x W`` bool ground truth (every mask non-empty), at the model input
            resolution or a lower one (``image_size`` must be a multiple of ``H``).
        image_size: side of the model input.
        generator: torch random generator on the masks' device.
        box_probability: chance of a box instead of a point (0.5 in the paper).

    Example:
        >>> m = torch.zeros(2, 32, 32, dtype=torch.bool); m[:, 8:20, 4:12] = True
        >>> p = first_prompts(m, 32, torch.Generator().manual_seed(1), box_probability=0.0)
        >>> p.labels.tolist(), p.single_point.tolist()
        ([[1, -1], [1, -1]], [True, True])
        >>> x, y = p.coords[0, 0].tolist(); bool(m[0, int(y), int(x)])
        True
    """
    m, h, _ = masks.shape
    scale = image_size / h
    device = masks.device
    points = _to_input_frame(sample_points(masks, generator), scale, generator)
    boxes = mask_boxes(masks)
    # Inclusive pixel box -> model frame: the last pixel's far edge, minus the half pixel.
    boxes = torch.cat([boxes[:, :2] * scale, (boxes[:, 2:] + 1) * scale - 1], dim=1)
    boxes = noisy_boxes(boxes, image_size, generator, noise_fraction, max_noise)
    use_box = torch.rand(m, generator=generator, device=device) < box_probability

    point_coords = torch.stack([points, torch.zeros_like(points)], dim=1)
    box_coords = boxes.reshape(m, 2, 2)
    coords = torch.where(use_box[:, None, None], box_coords, point_coords)
    point_labels = torch.tensor([POSITIVE, PAD], device=device).expand(m, 2)
    box_labels = torch.tensor([BOX_TOP_LEFT, BOX_BOTTOM_RIGHT], device=device).expand(m, 2)
    labels = torch.where(use_box[:, None], box_labels, point_labels)
    return Prompts(coords, labels.clone(), ~use_box)


def error_clicks(
    prediction: torch.Tensor,
    target: torch.Tensor,
    image_size: int,
    generator: torch.Generator | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """One corrective click per session, uniformly from the error region.

    A point in a false negative (object pixel predicted as background) is positive; one in
    a false positive is negative. A session without any error gets a positive point inside
    its mask (a harmless confirmation), so every row stays the same length.

    Args:
        prediction: ``M x H x W`` bool, the previous thresholded prediction.
        target: ``M x H x W`` bool ground truth, same grid.
        image_size: side of the model input frame for the returned coordinates.

    Returns:
        ``(coords M x 2, labels M)`` in the model input frame.

    Example:
        >>> t = torch.zeros(2, 8, 8, dtype=torch.bool); t[:, 2:6, 2:6] = True
        >>> p = t.clone(); p[0, 2:6, 2:4] = False     # session 0 misses part of the object
        >>> p[1, 0, 0] = True                         # session 1 leaks into the background
        >>> xy, lab = error_clicks(p, t, 8, torch.Generator().manual_seed(0))
        >>> lab.tolist(), bool(t[0, int(xy[0, 1]), int(xy[0, 0])]), xy[1].tolist()
        ([1, 0], True, [0.0, 0.0])
    """
    error = prediction != target
    has_error = error.flatten(1).any(dim=1)
    region = torch.where(has_error[:, None, None], error, target)
    points = sample_points(region, generator)
    m, h, w = target.shape
    rows = torch.arange(m, device=target.device)
    inside = target[rows, points[:, 1].clamp(min=0), points[:, 0].clamp(min=0)]
    labels = torch.where(inside, POSITIVE, NEGATIVE).to(torch.long)
    coords = _to_input_frame(points, image_size / h, generator)
    return coords, labels


def embed_sparse(prompt_encoder: PromptEncoder, coords: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Sparse prompt embeddings ``M x N x C`` of points and box corners in one list.

    Differentiable, and equal to ``prompt_encoder(points, boxes, None)[0]`` for the same
    prompts (up to token order): labels 2/3 get the box-corner embeddings the encoder adds
    to boxes, -1 the padding embedding.

    Example:
        >>> from segany import build_sam
        >>> pe = build_sam("test_tiny").prompt_encoder
        >>> pts, lab = torch.tensor([[[30.0, 40.0], [0.0, 0.0]]]), torch.tensor([[1, -1]])
        >>> ref, _ = pe(points=(pts[:, :1], lab[:, :1]), boxes=None, masks=None)
        >>> torch.allclose(embed_sparse(pe, pts, lab), ref, atol=1e-6)
        True
    """
    embedding = prompt_encoder.pe_layer.forward_with_coords(coords + 0.5, prompt_encoder.input_image_size)
    embedding = torch.where((labels == PAD)[..., None], prompt_encoder.not_a_point_embed.weight, embedding)
    for label in (NEGATIVE, POSITIVE, BOX_TOP_LEFT, BOX_BOTTOM_RIGHT):
        # Index = label: the encoder's point_embeddings are ordered neg, pos, top-left, bottom-right.
        weight = prompt_encoder.point_embeddings[label].weight
        embedding = embedding + (labels == label)[..., None].to(embedding.dtype) * weight
    return embedding
