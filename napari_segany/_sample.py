"""Sample data for the napari plugin (File > Open Sample > segany), generated offline.

The pictures come from :mod:`segany.synthetic`, so they need no download and are the same
on every machine.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from scipy import ndimage

from segany.synthetic import cells_image

LayerDataTuple = tuple[Any, dict[str, Any], str]


def nuclei_stack(
    shape: tuple[int, int, int] = (16, 192, 192), n_cells: int = 8, seed: int = 0
) -> tuple[np.ndarray, np.ndarray]:
    """A ``Z x H x W`` stack of ellipsoidal nuclei and their 3D instance labels.

    Each nucleus of a 2D :func:`segany.synthetic.cells_image` is given a depth centre and a
    depth radius; its cross-section shrinks towards its top and bottom like a real nucleus,
    so that objects appear, grow and vanish along Z (what propagation must follow).

    Example:
        >>> stack, labels = nuclei_stack((8, 64, 64), n_cells=3, seed=1)
        >>> stack.shape, stack.dtype, labels.shape, int(labels.max()) >= 1
        ((8, 64, 64), dtype('uint8'), (8, 64, 64), True)
    """
    depth, height, width = shape
    rng = np.random.default_rng(seed)
    _, flat = cells_image((height, width), n_cells=n_cells, radius=(10.0, 22.0), seed=seed)
    labels = np.zeros(shape, np.uint16)
    brightness = np.zeros(shape, np.float32)
    for object_id in range(1, int(flat.max()) + 1):
        footprint = flat == object_id
        if not footprint.any():
            continue
        # 1 at the centre of the footprint, 0 at its rim.
        distance = ndimage.distance_transform_edt(footprint)
        depth_map = distance / distance.max()
        z_centre = rng.uniform(0.3, 0.7) * (depth - 1)
        z_radius = rng.uniform(0.25, 0.45) * depth
        level = rng.uniform(0.5, 1.0)
        for z in range(depth):
            offset = (z - z_centre) / z_radius
            if abs(offset) >= 1:
                continue
            section = footprint & (depth_map >= 1 - np.sqrt(1 - offset**2))
            labels[z][section] = object_id
            brightness[z][section] = level
    noise = rng.normal(0, 1, shape).astype(np.float32)
    image = ndimage.gaussian_filter(brightness, (0.7, 1.2, 1.2)) * 220 + 18 + 6 * noise
    return np.clip(image, 0, 255).astype(np.uint8), labels


def cells_sample() -> list[LayerDataTuple]:
    """Synthetic fluorescent nuclei, 2D (512 x 512, uint8)."""
    image, _ = cells_image((512, 512), n_cells=24, seed=0)
    return [(image, {"name": "nuclei (synthetic)", "colormap": "gray"}, "image")]


def cells_uint16_sample() -> list[LayerDataTuple]:
    """The same nuclei as a 16-bit camera image with an offset (contrast handled by segany)."""
    image, _ = cells_image((512, 512), n_cells=24, seed=0)
    image16 = (image.astype(np.uint16) * 37 + 1000).astype(np.uint16)
    return [(image16, {"name": "nuclei 16-bit (synthetic)", "colormap": "gray"}, "image")]


def nuclei_stack_sample() -> list[LayerDataTuple]:
    """A synthetic 3D stack of nuclei (16 x 192 x 192, uint8)."""
    stack, _ = nuclei_stack()
    return [(stack, {"name": "nuclei 3D (synthetic)", "colormap": "gray"}, "image")]
