"""A small convolutional image encoder with SAM's interface: 1024 px in, 256 x 64 x 64 out.

segany's own default model uses it. It exists because nothing pre-trained can be downloaded
where segany must be trainable from scratch, on a CPU: SAM's ViTs and MobileSAM's TinyViT
spend most of their compute at full token resolution (TinyViT: about 4.6 s per 1024 px
image for a forward and backward pass on 2 CPU cores), which makes training them from
scratch on a CPU hopeless. This encoder is a ConvNeXt (Liu et al., 2022) in four stages:

* a 4 x 4 stride-4 "patchify" stem (1024 -> 256 px) and stages at strides 4, 8, 16 and 32;
* ConvNeXt blocks: depth-wise 7 x 7 convolution, LayerNorm, a 4x point-wise MLP, a learned
  per-channel scale (layer scale) and a residual connection;
* a top-down fusion of the stride-32 stage into the stride-16 one (upsampled, added), which
  gives every position of the 64 x 64 grid a receptive field of several hundred pixels;
* an absolute position signal: sines and cosines of the normalised (x, y) of each cell,
  projected and added before the stride-16 stage. Convolutions alone are translation
  equivariant, and SAM's decoder finds the prompted object partly through position in the
  image features (SAM's ViTs have absolute position embeddings); without it a model trained
  from scratch stalls at "background everywhere". Normalised coordinates keep it valid at
  any input size;
* SAM's neck (1 x 1 projection to 256 channels, LayerNorm2d, 3 x 3 convolution, LayerNorm2d),
  with the 3 x 3 convolution depth-wise separable to keep it cheap at 64 x 64.

About 12 GFLOP per 1024 px image (TinyViT-5M: about 38), so a tile encodes in a fraction of
a second on a laptop CPU; the prompt encoder and mask decoder are SAM's, unchanged.

Example:
    >>> import torch
    >>> enc = ConvNeXtEncoder(img_size=256, dims=(8, 16, 32, 64), depths=(1, 1, 1, 1))
    >>> tuple(enc(torch.zeros(1, 3, 256, 256)).shape)
    (1, 256, 16, 16)
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .common import LayerNorm2d

__all__ = ["ConvNeXtEncoder", "ConvNeXtBlock"]


class ConvNeXtBlock(nn.Module):
    """Depth-wise 7 x 7 conv, LayerNorm, point-wise MLP (x4), layer scale, residual.

    Input and output ``B x C x H x W``; the MLP runs channels-last (``nn.Linear``), as in
    ConvNeXt, because point-wise linear layers are faster than 1 x 1 convolutions there.
    """

    def __init__(self, dim: int, mlp_ratio: float = 4.0, layer_scale: float = 1e-6) -> None:
        super().__init__()
        self.dwconv = nn.Conv2d(dim, dim, kernel_size=7, padding=3, groups=dim)
        self.norm = nn.LayerNorm(dim, eps=1e-6)
        self.fc1 = nn.Linear(dim, int(dim * mlp_ratio))
        self.act = nn.GELU()
        self.fc2 = nn.Linear(int(dim * mlp_ratio), dim)
        self.gamma = nn.Parameter(torch.full((dim,), float(layer_scale)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.dwconv(x).permute(0, 2, 3, 1)  # B x H x W x C
        y = self.fc2(self.act(self.fc1(self.norm(y))))
        return x + (self.gamma * y).permute(0, 3, 1, 2)


class _Downsample(nn.Sequential):
    """LayerNorm2d then a 2 x 2 stride-2 convolution: half the grid, ``out`` channels."""

    def __init__(self, dim: int, out: int) -> None:
        super().__init__(LayerNorm2d(dim), nn.Conv2d(dim, out, kernel_size=2, stride=2))


class ConvNeXtEncoder(nn.Module):
    """ConvNeXt encoder with SAM's output: ``B x 3 x S x S`` -> ``B x out_chans x S/16 x S/16``.

    Args:
        img_size: input side (1024 for SAM's interface).
        dims: channels of the four stages (strides 4, 8, 16, 32).
        depths: blocks per stage.
        out_chans: embedding channels (256: SAM's prompt encoder and decoder).
        pos_frequencies: octaves of the absolute position signal (sin, cos of x and y).
    """

    def __init__(
        self,
        img_size: int = 1024,
        dims: tuple[int, int, int, int] = (32, 64, 128, 256),
        depths: tuple[int, int, int, int] = (1, 2, 4, 2),
        out_chans: int = 256,
        pos_frequencies: int = 6,
    ) -> None:
        super().__init__()
        self.img_size = img_size
        dims = tuple(int(d) for d in dims)
        self.stem = nn.Sequential(nn.Conv2d(3, dims[0], kernel_size=4, stride=4), LayerNorm2d(dims[0]))
        self.downsample = nn.ModuleList(_Downsample(dims[i], dims[i + 1]) for i in range(3))
        self.stages = nn.ModuleList(
            nn.Sequential(*(ConvNeXtBlock(dims[i]) for _ in range(int(depths[i])))) for i in range(4)
        )
        self.pos_frequencies = int(pos_frequencies)
        self.pos_proj = nn.Conv2d(4 * self.pos_frequencies, dims[2], kernel_size=1)
        # Top-down: stride-32 context added to the stride-16 features.
        self.lateral = nn.Conv2d(dims[3], dims[2], kernel_size=1)
        self.neck = nn.Sequential(
            nn.Conv2d(dims[2], out_chans, kernel_size=1, bias=False),
            LayerNorm2d(out_chans),
            nn.Conv2d(out_chans, out_chans, kernel_size=3, padding=1, groups=out_chans, bias=False),
            nn.Conv2d(out_chans, out_chans, kernel_size=1, bias=False),
            LayerNorm2d(out_chans),
        )
        self.apply(self._init_weights)

    @staticmethod
    def _init_weights(m: nn.Module) -> None:
        if isinstance(m, (nn.Conv2d, nn.Linear)):
            nn.init.trunc_normal_(m.weight, std=0.02)
            if m.bias is not None:
                nn.init.zeros_(m.bias)

    def position_signal(self, x: torch.Tensor) -> torch.Tensor:
        """``1 x 4F x H x W``: sin and cos of ``2^k * pi * (x, y)`` for k < F, with (x, y)
        the cell centres normalised to [0, 1] over the whole (padded) input."""
        h, w = x.shape[-2:]
        ys = (torch.arange(h, device=x.device, dtype=torch.float32) + 0.5) / h
        xs = (torch.arange(w, device=x.device, dtype=torch.float32) + 0.5) / w
        freqs = torch.pi * 2.0 ** torch.arange(self.pos_frequencies, device=x.device, dtype=torch.float32)
        ay = ys[:, None] * freqs  # H x F
        ax = xs[:, None] * freqs  # W x F
        parts = [
            torch.sin(ay).T[:, :, None].expand(-1, h, w), torch.cos(ay).T[:, :, None].expand(-1, h, w),
            torch.sin(ax).T[:, None, :].expand(-1, h, w), torch.cos(ax).T[:, None, :].expand(-1, h, w),
        ]
        return torch.cat(parts)[None].to(x.dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``B x 3 x S x S`` (normalised pixels) -> ``B x 256 x S/16 x S/16``."""
        x = self.stages[0](self.stem(x))
        x = self.stages[1](self.downsample[0](x))
        x = self.downsample[1](x)
        s16 = self.stages[2](x + self.pos_proj(self.position_signal(x)))
        s32 = self.stages[3](self.downsample[2](s16))
        fused = s16 + F.interpolate(self.lateral(s32), size=s16.shape[-2:], mode="nearest")
        return self.neck(fused)
