"""Prompt encoder: points, boxes and masks to sparse and dense prompt embeddings.

Points and box corners become random-Fourier positional encodings plus a learned embedding
per prompt type; a low-resolution mask becomes a dense embedding through a small conv
stack. Key names follow the official checkpoints.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from .common import LayerNorm2d

# Indices into ``point_embeddings``: what each learned embedding marks.
NEGATIVE_POINT, POSITIVE_POINT, BOX_TOP_LEFT, BOX_BOTTOM_RIGHT = 0, 1, 2, 3
# Label of the padding point appended to point prompts that come without a box.
PADDING_LABEL = -1


class PositionEmbeddingRandom(nn.Module):
    """Random-Fourier positional encoding of normalised ``(x, y)`` coordinates.

    The Gaussian frequency matrix is a persistent buffer: it is part of the checkpoint and
    must be loaded, not re-drawn.
    """

    def __init__(self, num_pos_feats: int = 64, scale: float | None = None) -> None:
        super().__init__()
        if scale is None or scale <= 0.0:
            scale = 1.0
        self.register_buffer(
            "positional_encoding_gaussian_matrix", scale * torch.randn((2, num_pos_feats))
        )

    def _encode(self, coords: torch.Tensor) -> torch.Tensor:
        """``... x 2`` coordinates in [0, 1] -> ``... x 2F`` features ``[sin, cos]``."""
        coords = (2 * coords - 1) @ self.positional_encoding_gaussian_matrix
        coords = 2 * math.pi * coords
        return torch.cat([torch.sin(coords), torch.cos(coords)], dim=-1)

    def forward(self, size: tuple[int, int]) -> torch.Tensor:
        """Encoding of every cell centre of an ``h x w`` grid: ``2F x h x w``."""
        h, w = size
        matrix = self.positional_encoding_gaussian_matrix
        # cumsum - 0.5 (not arange + 0.5) reproduces the reference's float rounding.
        grid = torch.ones((h, w), device=matrix.device, dtype=matrix.dtype)
        y = (grid.cumsum(dim=0) - 0.5) / h
        x = (grid.cumsum(dim=1) - 0.5) / w
        return self._encode(torch.stack([x, y], dim=-1)).permute(2, 0, 1)

    def forward_with_coords(self, coords: torch.Tensor, image_size: tuple[int, int]) -> torch.Tensor:
        """Encode pixel coordinates ``B x N x 2`` (x, y) of an ``(H, W)`` input -> ``B x N x 2F``."""
        coords = coords.clone()
        coords[..., 0] = coords[..., 0] / image_size[1]
        coords[..., 1] = coords[..., 1] / image_size[0]
        return self._encode(coords.to(torch.float))


class PromptEncoder(nn.Module):
    """Encode prompts for the mask decoder.

    Example:
        >>> pe = PromptEncoder(256, (64, 64), (1024, 1024), 16)
        >>> pts = (torch.tensor([[[500.0, 375.0]]]), torch.tensor([[1]]))
        >>> sparse, dense = pe(points=pts, boxes=None, masks=None)
        >>> sparse.shape, dense.shape
        (torch.Size([1, 2, 256]), torch.Size([1, 256, 64, 64]))
    """

    def __init__(
        self,
        embed_dim: int,
        image_embedding_size: tuple[int, int],
        input_image_size: tuple[int, int],
        mask_in_chans: int,
        activation: type[nn.Module] = nn.GELU,
    ) -> None:
        super().__init__()
        self.embed_dim = embed_dim
        self.input_image_size = input_image_size
        self.image_embedding_size = image_embedding_size
        self.pe_layer = PositionEmbeddingRandom(embed_dim // 2)
        self.point_embeddings = nn.ModuleList(nn.Embedding(1, embed_dim) for _ in range(4))
        self.not_a_point_embed = nn.Embedding(1, embed_dim)
        self.mask_input_size = (4 * image_embedding_size[0], 4 * image_embedding_size[1])
        self.mask_downscaling = nn.Sequential(
            nn.Conv2d(1, mask_in_chans // 4, kernel_size=2, stride=2),
            LayerNorm2d(mask_in_chans // 4),
            activation(),
            nn.Conv2d(mask_in_chans // 4, mask_in_chans, kernel_size=2, stride=2),
            LayerNorm2d(mask_in_chans),
            activation(),
            nn.Conv2d(mask_in_chans, embed_dim, kernel_size=1),
        )
        self.no_mask_embed = nn.Embedding(1, embed_dim)

    def get_dense_pe(self) -> torch.Tensor:
        """Positional encoding of the image embedding grid: ``1 x C x 64 x 64``."""
        return self.pe_layer(self.image_embedding_size).unsqueeze(0)

    def _embed_points(self, points: torch.Tensor, labels: torch.Tensor, pad: bool) -> torch.Tensor:
        """``B x N x 2`` points and ``B x N`` labels (-1 pad, 0 neg, 1 pos) -> ``B x N' x C``."""
        points = points + 0.5  # pixel centres
        if pad:
            # A point-only prompt gets one padding token where a box corner would be.
            pad_point = torch.zeros((points.shape[0], 1, 2), device=points.device)
            pad_label = torch.full(
                (labels.shape[0], 1), PADDING_LABEL, device=labels.device, dtype=labels.dtype
            )
            points = torch.cat([points, pad_point], dim=1)
            labels = torch.cat([labels, pad_label], dim=1)
        embedding = self.pe_layer.forward_with_coords(points, self.input_image_size)
        is_pad = (labels == PADDING_LABEL)[..., None]
        embedding = torch.where(is_pad, self.not_a_point_embed.weight, embedding)
        embedding = embedding + (labels == 0)[..., None] * self.point_embeddings[NEGATIVE_POINT].weight
        embedding = embedding + (labels == 1)[..., None] * self.point_embeddings[POSITIVE_POINT].weight
        return embedding

    def _embed_boxes(self, boxes: torch.Tensor) -> torch.Tensor:
        """``B x 4`` boxes (x0, y0, x1, y1) -> ``B x 2 x C`` corner embeddings."""
        corners = (boxes + 0.5).reshape(-1, 2, 2)
        embedding = self.pe_layer.forward_with_coords(corners, self.input_image_size)
        corner_types = torch.cat(
            [self.point_embeddings[BOX_TOP_LEFT].weight, self.point_embeddings[BOX_BOTTOM_RIGHT].weight]
        )
        return embedding + corner_types

    @staticmethod
    def _batch_size(
        points: tuple[torch.Tensor, torch.Tensor] | None,
        boxes: torch.Tensor | None,
        masks: torch.Tensor | None,
    ) -> int:
        if points is not None:
            return points[0].shape[0]
        if boxes is not None:
            return boxes.shape[0]
        if masks is not None:
            return masks.shape[0]
        return 1

    def forward(
        self,
        points: tuple[torch.Tensor, torch.Tensor] | None,
        boxes: torch.Tensor | None,
        masks: torch.Tensor | None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Embed prompts.

        Args:
            points: coordinates ``B x N x 2`` in the model's 1024 input frame, labels ``B x N``.
            boxes: ``B x 4`` in the same frame.
            masks: previous low-resolution logits ``B x 1 x 256 x 256``.

        Returns:
            sparse ``B x N' x C`` and dense ``B x C x 64 x 64`` embeddings.
        """
        batch = self._batch_size(points, boxes, masks)
        device = self.point_embeddings[0].weight.device
        sparse = [torch.empty((batch, 0, self.embed_dim), device=device)]
        if points is not None:
            coords, labels = points
            sparse.append(self._embed_points(coords, labels, pad=boxes is None))
        if boxes is not None:
            sparse.append(self._embed_boxes(boxes))
        sparse_embeddings = torch.cat(sparse, dim=1)
        if masks is not None:
            dense_embeddings = self.mask_downscaling(masks)
        else:
            dense_embeddings = self.no_mask_embed.weight.reshape(1, -1, 1, 1).expand(
                batch, -1, self.image_embedding_size[0], self.image_embedding_size[1]
            )
        return sparse_embeddings, dense_embeddings
