"""The ViT image encoder of SAM (vit_b, vit_l, vit_h and smaller custom widths).

A plain ViT over 16x16 patches of a 1024x1024 image: most blocks attend within 14x14
windows, a few attend globally, every attention adds decomposed relative-position terms,
and a conv "neck" maps the 64x64 token grid to the 256-channel embedding.

Parameter names follow the official checkpoints exactly so that they load with
``strict=True``. The computation is the reference's, reorganised for speed: attention runs
through ``scaled_dot_product_attention`` with the relative-position terms as an additive
mask, so the ``heads x N x N`` score matrix is never materialised and then re-read for the
bias add and the softmax.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .common import LayerNorm2d, MLPBlock


class PatchEmbed(nn.Module):
    """Non-overlapping patches to tokens: ``B x 3 x H x W -> B x H/16 x W/16 x C``."""

    def __init__(self, patch_size: int = 16, in_chans: int = 3, embed_dim: int = 768) -> None:
        super().__init__()
        self.proj = nn.Conv2d(in_chans, embed_dim, kernel_size=patch_size, stride=patch_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x).permute(0, 2, 3, 1)


def relative_position_table(q_size: int, k_size: int, rel_pos: torch.Tensor) -> torch.Tensor:
    """Embeddings of every query/key offset along one axis: ``q_size x k_size x C``.

    ``rel_pos`` holds ``2 * max(q_size, k_size) - 1`` learned rows (one per offset); a table
    of another length (a checkpoint trained at another resolution) is linearly resized.
    """
    max_rel_dist = 2 * max(q_size, k_size) - 1
    if rel_pos.shape[0] != max_rel_dist:
        rel_pos = F.interpolate(
            rel_pos.T[None], size=max_rel_dist, mode="linear"
        )[0].T
    # Offsets are scaled to the coarser axis when q and k have different lengths.
    q_coords = torch.arange(q_size, device=rel_pos.device)[:, None] * max(k_size / q_size, 1.0)
    k_coords = torch.arange(k_size, device=rel_pos.device)[None, :] * max(q_size / k_size, 1.0)
    offsets = (q_coords - k_coords) + (k_size - 1) * max(q_size / k_size, 1.0)
    return rel_pos[offsets.long()]


def decomposed_relative_bias(
    q: torch.Tensor,
    rel_pos_h: torch.Tensor,
    rel_pos_w: torch.Tensor,
    size: tuple[int, int],
) -> torch.Tensor:
    """Additive attention bias from decomposed relative positions (MViTv2 style).

    Args:
        q: unscaled queries, ``B x (h*w) x C``.
        rel_pos_h, rel_pos_w: learned offset tables, ``(2h-1) x C`` and ``(2w-1) x C``.
        size: ``(h, w)`` of the token grid (queries and keys share it here).

    Returns:
        ``B x (h*w) x (h*w)`` bias, ``bias[q, k] = <q, R_h[qy - ky]> + <q, R_w[qx - kx]>``.
    """
    h, w = size
    table_h = relative_position_table(h, h, rel_pos_h)
    table_w = relative_position_table(w, w, rel_pos_w)
    batch, _, dim = q.shape
    q_grid = q.reshape(batch, h, w, dim)
    bias_h = torch.einsum("byxc,ykc->byxk", q_grid, table_h)
    bias_w = torch.einsum("byxc,xkc->byxk", q_grid, table_w)
    bias = bias_h[:, :, :, :, None] + bias_w[:, :, :, None, :]
    return bias.reshape(batch, h * w, h * w)


class Attention(nn.Module):
    """Multi-head self-attention over a token grid with relative-position bias."""

    def __init__(
        self,
        dim: int,
        num_heads: int = 8,
        qkv_bias: bool = True,
        use_rel_pos: bool = False,
        input_size: tuple[int, int] | None = None,
    ) -> None:
        super().__init__()
        self.num_heads = num_heads
        head_dim = dim // num_heads
        self.scale = head_dim**-0.5
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)
        self.use_rel_pos = use_rel_pos
        if use_rel_pos:
            if input_size is None:
                raise ValueError("relative positions need the token grid size (input_size)")
            self.rel_pos_h = nn.Parameter(torch.zeros(2 * input_size[0] - 1, head_dim))
            self.rel_pos_w = nn.Parameter(torch.zeros(2 * input_size[1] - 1, head_dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``B x h x w x C -> B x h x w x C``."""
        batch, h, w, _ = x.shape
        n = h * w
        qkv = self.qkv(x).reshape(batch, n, 3, self.num_heads, -1).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)  # each B x heads x N x head_dim
        bias = None
        if self.use_rel_pos:
            bias = decomposed_relative_bias(
                q.reshape(batch * self.num_heads, n, -1), self.rel_pos_h, self.rel_pos_w, (h, w)
            ).view(batch, self.num_heads, n, n)
            bias = bias.to(q.dtype)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=bias, scale=self.scale)
        out = out.transpose(1, 2).reshape(batch, h, w, -1)
        return self.proj(out)


def window_partition(x: torch.Tensor, window_size: int) -> tuple[torch.Tensor, tuple[int, int]]:
    """Cut a token grid into windows, zero-padding bottom/right.

    ``B x H x W x C -> (B * nWin) x ws x ws x C`` plus the padded size ``(Hp, Wp)``.
    The padding is attended to (not masked), as in the reference: masking it changes outputs.
    """
    batch, h, w, c = x.shape
    pad_h = (window_size - h % window_size) % window_size
    pad_w = (window_size - w % window_size) % window_size
    if pad_h or pad_w:
        x = F.pad(x, (0, 0, 0, pad_w, 0, pad_h))
    hp, wp = h + pad_h, w + pad_w
    x = x.view(batch, hp // window_size, window_size, wp // window_size, window_size, c)
    windows = x.permute(0, 1, 3, 2, 4, 5).reshape(-1, window_size, window_size, c)
    return windows, (hp, wp)


def window_unpartition(
    windows: torch.Tensor, window_size: int, padded_hw: tuple[int, int], hw: tuple[int, int]
) -> torch.Tensor:
    """Inverse of :func:`window_partition`: ``(B * nWin) x ws x ws x C -> B x H x W x C``."""
    hp, wp = padded_hw
    h, w = hw
    batch = windows.shape[0] // ((hp // window_size) * (wp // window_size))
    x = windows.view(batch, hp // window_size, wp // window_size, window_size, window_size, -1)
    x = x.permute(0, 1, 3, 2, 4, 5).reshape(batch, hp, wp, -1)
    if hp > h or wp > w:
        x = x[:, :h, :w, :]
    return x


class Block(nn.Module):
    """Pre-norm transformer block with windowed (``window_size > 0``) or global attention."""

    def __init__(
        self,
        dim: int,
        num_heads: int,
        mlp_ratio: float = 4.0,
        qkv_bias: bool = True,
        use_rel_pos: bool = True,
        window_size: int = 0,
        input_size: tuple[int, int] | None = None,
    ) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        self.attn = Attention(
            dim,
            num_heads=num_heads,
            qkv_bias=qkv_bias,
            use_rel_pos=use_rel_pos,
            input_size=input_size if window_size == 0 else (window_size, window_size),
        )
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = MLPBlock(dim, int(dim * mlp_ratio), nn.GELU)
        self.window_size = window_size

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``B x h x w x C -> B x h x w x C``."""
        shortcut = x
        x = self.norm1(x)
        if self.window_size > 0:
            h, w = x.shape[1], x.shape[2]
            windows, padded = window_partition(x, self.window_size)
            x = window_unpartition(self.attn(windows), self.window_size, padded, (h, w))
        else:
            x = self.attn(x)
        x = shortcut + x
        return x + self.mlp(self.norm2(x))


class ImageEncoderViT(nn.Module):
    """SAM's ViT encoder: ``B x 3 x 1024 x 1024`` (normalised) -> ``B x 256 x 64 x 64``.

    Example:
        >>> enc = ImageEncoderViT(img_size=256, embed_dim=64, depth=2, num_heads=2,
        ...                       global_attn_indexes=(1,), out_chans=32)
        >>> enc(torch.zeros(1, 3, 256, 256)).shape
        torch.Size([1, 32, 16, 16])
    """

    def __init__(
        self,
        img_size: int = 1024,
        patch_size: int = 16,
        in_chans: int = 3,
        embed_dim: int = 768,
        depth: int = 12,
        num_heads: int = 12,
        mlp_ratio: float = 4.0,
        out_chans: int = 256,
        qkv_bias: bool = True,
        use_abs_pos: bool = True,
        use_rel_pos: bool = True,
        window_size: int = 14,
        global_attn_indexes: tuple[int, ...] = (),
    ) -> None:
        super().__init__()
        self.img_size = img_size
        grid = img_size // patch_size
        self.patch_embed = PatchEmbed(patch_size, in_chans, embed_dim)
        self.pos_embed: nn.Parameter | None = None
        if use_abs_pos:
            self.pos_embed = nn.Parameter(torch.zeros(1, grid, grid, embed_dim))
        self.blocks = nn.ModuleList(
            Block(
                dim=embed_dim,
                num_heads=num_heads,
                mlp_ratio=mlp_ratio,
                qkv_bias=qkv_bias,
                use_rel_pos=use_rel_pos,
                window_size=0 if i in global_attn_indexes else window_size,
                input_size=(grid, grid),
            )
            for i in range(depth)
        )
        self.neck = nn.Sequential(
            nn.Conv2d(embed_dim, out_chans, kernel_size=1, bias=False),
            LayerNorm2d(out_chans),
            nn.Conv2d(out_chans, out_chans, kernel_size=3, padding=1, bias=False),
            LayerNorm2d(out_chans),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.patch_embed(x)
        if self.pos_embed is not None:
            x = x + self.pos_embed
        for block in self.blocks:
            x = block(x)
        return self.neck(x.permute(0, 3, 1, 2))
