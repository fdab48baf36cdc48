"""Geometry of SAM's input: resize the longest side to the model size, map prompts alike.

The image resize is PIL's bilinear resize of a uint8 image, as in the reference
(its tensor alternative gives slightly different pixels and hence different masks).
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image


def preprocess_shape(height: int, width: int, long_side: int) -> tuple[int, int]:
    """Size ``(h, w)`` after scaling the longest side to ``long_side`` (rounded half up).

    Example:
        >>> preprocess_shape(480, 640, 1024)
        (768, 1024)
    """
    scale = long_side * 1.0 / max(height, width)
    return int(height * scale + 0.5), int(width * scale + 0.5)


class ResizeLongestSide:
    """Resize images and prompt coordinates so that the longest image side is ``target_length``.

    Example:
        >>> t = ResizeLongestSide(1024)
        >>> t.apply_coords(np.array([[640.0, 480.0]]), (480, 640)).tolist()
        [[1024.0, 768.0]]
    """

    def __init__(self, target_length: int) -> None:
        self.target_length = target_length

    def apply_image(self, image: np.ndarray) -> np.ndarray:
        """``H x W x 3`` uint8 -> resized ``h x w x 3`` uint8 (PIL bilinear)."""
        if image.dtype != np.uint8:
            raise TypeError(f"apply_image expects uint8 pixels, got {image.dtype}")
        h, w = preprocess_shape(image.shape[0], image.shape[1], self.target_length)
        if (h, w) == image.shape[:2]:
            return image
        return np.array(Image.fromarray(image).resize((w, h), Image.BILINEAR))

    def _scale(self, original_size: tuple[int, int]) -> tuple[float, float]:
        old_h, old_w = original_size
        new_h, new_w = preprocess_shape(old_h, old_w, self.target_length)
        return new_w / old_w, new_h / old_h

    def apply_coords(self, coords: np.ndarray, original_size: tuple[int, int]) -> np.ndarray:
        """``... x 2`` (x, y) pixel coordinates of the original image -> model frame (float)."""
        sx, sy = self._scale(original_size)
        coords = np.array(coords, dtype=float, copy=True)
        coords[..., 0] *= sx
        coords[..., 1] *= sy
        return coords

    def apply_boxes(self, boxes: np.ndarray, original_size: tuple[int, int]) -> np.ndarray:
        """``B x 4`` (x0, y0, x1, y1) boxes -> model frame."""
        return self.apply_coords(np.asarray(boxes).reshape(-1, 2, 2), original_size).reshape(-1, 4)

    def apply_image_torch(self, image: torch.Tensor) -> torch.Tensor:
        """``B x C x H x W`` float tensor -> resized, antialiased bilinear (GPU friendly)."""
        h, w = preprocess_shape(image.shape[2], image.shape[3], self.target_length)
        return F.interpolate(image, (h, w), mode="bilinear", align_corners=False, antialias=True)

    def apply_coords_torch(self, coords: torch.Tensor, original_size: tuple[int, int]) -> torch.Tensor:
        """Torch version of :meth:`apply_coords`."""
        sx, sy = self._scale(original_size)
        coords = coords.to(torch.float).clone()
        coords[..., 0] = coords[..., 0] * sx
        coords[..., 1] = coords[..., 1] * sy
        return coords

    def apply_boxes_torch(self, boxes: torch.Tensor, original_size: tuple[int, int]) -> torch.Tensor:
        """Torch version of :meth:`apply_boxes`."""
        return self.apply_coords_torch(boxes.reshape(-1, 2, 2), original_size).reshape(-1, 4)
