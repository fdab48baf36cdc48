"""Pictures of results: masks blended over the image, with the prompts drawn on top."""

from __future__ import annotations

from typing import Iterable

import numpy as np
from PIL import Image, ImageDraw

from .image import prepare_image


def label_colours(n: int, seed: int = 7) -> np.ndarray:
    """``n x 3`` distinct-ish bright uint8 colours (reproducible)."""
    rng = np.random.default_rng(seed)
    hues = (np.arange(n) * 0.61803398875 + rng.uniform()) % 1.0
    hsv = np.stack([hues, np.full(n, 0.75), np.full(n, 1.0)], axis=1)
    rgb = np.array(Image.fromarray((hsv[None] * 255).astype(np.uint8), "HSV").convert("RGB"))[0]
    return rgb


def overlay(
    image: np.ndarray,
    labels: np.ndarray,
    points: Iterable[tuple[float, float, int]] = (),
    boxes: Iterable[tuple[float, float, float, float]] = (),
    alpha: float = 0.45,
) -> np.ndarray:
    """Blend an instance label image over an image and draw prompts.

    Args:
        image: any image :func:`segany.image.prepare_image` accepts.
        labels: ``H x W`` integer labels (0 = background).
        points: ``(x, y, label)``; foreground points are green, background points red.
        boxes: ``(x0, y0, x1, y1)`` drawn as yellow rectangles.
        alpha: opacity of the masks.

    Returns:
        ``H x W x 3`` uint8 picture.

    Example:
        >>> pic = overlay(np.zeros((8, 8), np.uint8) + np.eye(8, dtype=np.uint8), np.eye(8, dtype=int))
        >>> pic.shape
        (8, 8, 3)
    """
    rgb = prepare_image(image).rgb.astype(np.float32)
    labels = np.asarray(labels)
    if labels.shape != rgb.shape[:2]:
        raise ValueError(f"labels have shape {labels.shape}, image has {rgb.shape[:2]}")
    ids = np.unique(labels[labels > 0])
    if ids.size:
        colours = label_colours(int(ids.max()) + 1).astype(np.float32)
        fg = labels > 0
        rgb[fg] = (1 - alpha) * rgb[fg] + alpha * colours[labels[fg]]
    picture = Image.fromarray(rgb.clip(0, 255).astype(np.uint8))
    draw = ImageDraw.Draw(picture)
    radius = max(3, min(picture.size) // 100)
    for x0, y0, x1, y1 in boxes:
        draw.rectangle([x0, y0, x1, y1], outline=(255, 220, 0), width=max(1, radius // 2))
    for x, y, label in points:
        colour = (0, 230, 0) if label == 1 else (230, 0, 0)
        draw.ellipse([x - radius, y - radius, x + radius, y + radius], fill=colour, outline=(255, 255, 255))
    return np.asarray(picture)
