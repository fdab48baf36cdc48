"""The ``Sam`` module: image encoder + prompt encoder + mask decoder, with pre/post-processing."""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from .mask_decoder import MaskDecoder
from .prompt_encoder import PromptEncoder

# ImageNet statistics in 0-255 units, as used by every official checkpoint.
PIXEL_MEAN = (123.675, 116.28, 103.53)
PIXEL_STD = (58.395, 57.12, 57.375)


class Sam(nn.Module):
    """Segment Anything model.

    ``pixel_mean``/``pixel_std`` are non-persistent buffers: official checkpoints do not
    store them, so they must not appear in ``state_dict()``.

    Example:
        >>> import segany
        >>> sam = segany.build_sam("test_tiny")
        >>> out = sam([{"image": torch.zeros(3, 256, 200), "original_size": (256, 200),
        ...             "point_coords": torch.tensor([[[10.0, 20.0]]]),
        ...             "point_labels": torch.tensor([[1]])}], multimask_output=True)
        >>> out[0]["masks"].shape
        torch.Size([1, 3, 256, 200])
    """

    mask_threshold: float = 0.0
    image_format: str = "RGB"

    def __init__(
        self,
        image_encoder: nn.Module,
        prompt_encoder: PromptEncoder,
        mask_decoder: MaskDecoder,
        pixel_mean: tuple[float, float, float] = PIXEL_MEAN,
        pixel_std: tuple[float, float, float] = PIXEL_STD,
    ) -> None:
        super().__init__()
        self.image_encoder = image_encoder
        self.prompt_encoder = prompt_encoder
        self.mask_decoder = mask_decoder
        self.register_buffer("pixel_mean", torch.tensor(pixel_mean).view(-1, 1, 1), False)
        self.register_buffer("pixel_std", torch.tensor(pixel_std).view(-1, 1, 1), False)

    @property
    def device(self) -> torch.device:
        return self.pixel_mean.device

    @property
    def img_size(self) -> int:
        """Side of the square model input (1024 for the official models)."""
        return int(self.image_encoder.img_size)

    def preprocess(self, x: torch.Tensor) -> torch.Tensor:
        """Normalise ``(B x) 3 x h x w`` 0-255 pixels and pad bottom/right to the model size."""
        x = (x - self.pixel_mean) / self.pixel_std
        h, w = x.shape[-2:]
        return F.pad(x, (0, self.img_size - w, 0, self.img_size - h))

    def postprocess_masks(
        self,
        masks: torch.Tensor,
        input_size: tuple[int, ...],
        original_size: tuple[int, ...],
    ) -> torch.Tensor:
        """Low-res logits ``B x C x 256 x 256`` -> logits at the original image size.

        Upsample to the padded model input, crop the padding away, then resize to the
        original size: two bilinear steps, exactly as the reference, so thresholds agree.
        """
        masks = F.interpolate(
            masks, (self.img_size, self.img_size), mode="bilinear", align_corners=False
        )
        masks = masks[..., : input_size[0], : input_size[1]]
        return F.interpolate(masks, tuple(original_size), mode="bilinear", align_corners=False)

    @torch.no_grad()
    def forward(
        self, batched_input: list[dict[str, Any]], multimask_output: bool
    ) -> list[dict[str, torch.Tensor]]:
        """Reference-compatible batched forward over several images.

        Each input dict has ``image`` (3 x h x w, already resized so the long side is the model
        size), ``original_size`` and optional ``point_coords`` (B x N x 2), ``point_labels``
        (B x N), ``boxes`` (B x 4) and ``mask_inputs`` (B x 1 x 256 x 256), all in the resized
        frame. Returns per image ``masks`` (bool), ``iou_predictions`` and
        ``low_res_logits``.
        """
        input_images = torch.stack([self.preprocess(x["image"]) for x in batched_input], dim=0)
        image_embeddings = self.image_encoder(input_images)
        outputs = []
        for record, embedding in zip(batched_input, image_embeddings):
            points = None
            if "point_coords" in record:
                points = (record["point_coords"], record["point_labels"])
            sparse, dense = self.prompt_encoder(
                points=points, boxes=record.get("boxes"), masks=record.get("mask_inputs")
            )
            low_res, iou = self.mask_decoder(
                image_embeddings=embedding.unsqueeze(0),
                image_pe=self.prompt_encoder.get_dense_pe(),
                sparse_prompt_embeddings=sparse,
                dense_prompt_embeddings=dense,
                multimask_output=multimask_output,
            )
            masks = self.postprocess_masks(
                low_res, input_size=record["image"].shape[-2:], original_size=record["original_size"]
            )
            outputs.append(
                {
                    "masks": masks > self.mask_threshold,
                    "iou_predictions": iou,
                    "low_res_logits": low_res,
                }
            )
        return outputs
