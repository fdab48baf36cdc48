"""Procedural images with known instance labels: built-in demo data and test scenes.

Nothing is downloaded: the images are generated from a seed, so demos, tutorials and
tests run offline and reproducibly.
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage


def cells_image(
    shape: tuple[int, int] = (512, 512),
    n_cells: int = 24,
    radius: tuple[float, float] = (12.0, 30.0),
    seed: int = 0,
) -> tuple[np.ndarray, np.ndarray]:
    """A fluorescence-microscopy-like image of elliptical nuclei.

    Args:
        shape: ``(H, W)``.
        n_cells: how many nuclei to try to place (overlapping ones are skipped).
        radius: range of the ellipses' semi-axes in pixels.
        seed: random seed.

    Returns:
        ``(image, labels)``: ``H x W`` uint8 image and ``H x W`` uint16 instance labels
        (0 background, 1..N nuclei).

    Example:
        >>> img, lab = cells_image((128, 128), n_cells=5, radius=(6, 12), seed=1)
        >>> img.dtype, bool(lab.max() >= 1)
        (dtype('uint8'), True)
    """
    rng = np.random.default_rng(seed)
    h, w = shape
    labels = np.zeros(shape, np.uint16)
    yy, xx = np.mgrid[0:h, 0:w]
    brightness = np.zeros(shape, np.float32)
    next_id = 1
    for _ in range(n_cells * 4):
        if next_id > n_cells:
            break
        ry, rx = rng.uniform(*radius, size=2)
        cy, cx = rng.uniform(ry, h - ry), rng.uniform(rx, w - rx)
        angle = rng.uniform(0, np.pi)
        dy, dx = yy - cy, xx - cx
        u = dx * np.cos(angle) + dy * np.sin(angle)
        v = -dx * np.sin(angle) + dy * np.cos(angle)
        inside = (u / rx) ** 2 + (v / ry) ** 2 <= 1.0
        # Keep a gap of background between nuclei so every instance is separable.
        if (ndimage.binary_dilation(inside, iterations=3) & (labels > 0)).any():
            continue
        labels[inside] = next_id
        brightness[inside] = rng.uniform(0.45, 1.0)
        next_id += 1
    texture = ndimage.gaussian_filter(rng.normal(0, 1, shape), 2.0).astype(np.float32)
    image = ndimage.gaussian_filter(brightness, 1.2) * (1.0 + 0.25 * texture)
    image += 0.08 + 0.03 * rng.normal(0, 1, shape).astype(np.float32)
    image = np.clip(image * 220, 0, 255).astype(np.uint8)
    return image, labels


def shapes_scene(
    shape: tuple[int, int] = (256, 256),
    n_shapes: int = 6,
    seed: int = 0,
) -> tuple[np.ndarray, np.ndarray]:
    """A colour scene of textured discs, boxes and triangles on a textured background.

    Returns ``(image H x W x 3 uint8, labels H x W uint16)``; later shapes occlude earlier
    ones, and every label present has at least 20 pixels.

    Example:
        >>> img, lab = shapes_scene((64, 64), n_shapes=3, seed=2)
        >>> img.shape, int(lab.max()) <= 3
        ((64, 64, 3), True)
    """
    rng = np.random.default_rng(seed)
    h, w = shape
    yy, xx = np.mgrid[0:h, 0:w]

    def texture(colour: np.ndarray) -> np.ndarray:
        freq = rng.uniform(0.05, 0.4)
        phase = rng.uniform(0, 2 * np.pi)
        pattern = np.sin(freq * (xx * rng.uniform(-1, 1) + yy * rng.uniform(-1, 1)) + phase)
        noise = ndimage.gaussian_filter(rng.normal(0, 1, shape), 1.0)
        amp = rng.uniform(10, 40)
        return colour[None, None, :] + (amp * pattern + 8 * noise)[..., None]

    image = texture(rng.uniform(40, 215, 3))
    labels = np.zeros(shape, np.uint16)
    for i in range(1, n_shapes + 1):
        kind = rng.integers(0, 3)
        size = rng.uniform(0.08, 0.22) * min(h, w)
        cy, cx = rng.uniform(size, h - size), rng.uniform(size, w - size)
        if kind == 0:
            inside = (yy - cy) ** 2 + (xx - cx) ** 2 <= size**2
        elif kind == 1:
            ay, ax = size * rng.uniform(0.5, 1.0), size * rng.uniform(0.5, 1.0)
            inside = (np.abs(yy - cy) <= ay) & (np.abs(xx - cx) <= ax)
        else:
            pts = rng.uniform(-size, size, (3, 2)) + [cx, cy]
            inside = _triangle(pts, xx, yy)
        if inside.sum() < 20:
            continue
        image[inside] = texture(rng.uniform(0, 255, 3))[inside]
        labels[inside] = i
    # Drop labels occluded down to slivers, then renumber 1..N.
    ids, counts = np.unique(labels[labels > 0], return_counts=True)
    for label_id, count in zip(ids, counts):
        if count < 20:
            labels[labels == label_id] = 0
    remaining = np.unique(labels[labels > 0])
    lut = np.zeros(int(labels.max()) + 1, np.uint16)
    lut[remaining] = np.arange(1, len(remaining) + 1)
    return np.clip(image, 0, 255).astype(np.uint8), lut[labels]


def _triangle(pts: np.ndarray, xx: np.ndarray, yy: np.ndarray) -> np.ndarray:
    (x0, y0), (x1, y1), (x2, y2) = pts
    d0 = (xx - x1) * (y0 - y1) - (x0 - x1) * (yy - y1)
    d1 = (xx - x2) * (y1 - y2) - (x1 - x2) * (yy - y2)
    d2 = (xx - x0) * (y2 - y0) - (x2 - x0) * (yy - y0)
    has_neg = (d0 < 0) | (d1 < 0) | (d2 < 0)
    has_pos = (d0 > 0) | (d1 > 0) | (d2 > 0)
    return ~(has_neg & has_pos)
