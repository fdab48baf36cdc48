"""The TinyViT image encoder of MobileSAM (model type ``vit_t``).

TinyViT-5M distilled from SAM's ViT-H: a conv stem and one stage of MBConv blocks at
stride 4, then three stages of windowed attention blocks (stride 8, 16, 16), and SAM's
conv "neck" mapping the last 64x64 grid to the 256-channel image embedding.

Parameter and buffer names follow MobileSAM's ``tiny_vit_sam.py`` exactly, including the
unused classification head (``norm_head``, ``head``) and the BatchNorm running statistics,
so that ``mobile_sam.pt`` loads with ``strict=True``. The computation is the reference's
(same outputs to float rounding), reorganised for speed and with one bug fixed:

* attention runs through ``scaled_dot_product_attention`` with the learned relative
  position bias as an additive mask (on the CPU, the fused flash kernel);
* the bias is gathered from ``attention_biases`` on every forward. The reference caches it
  when the module switches to eval mode, and the cache goes stale when weights are loaded
  after ``.eval()``; the gather costs a few hundred kilobytes per block;
* at inference each BatchNorm is folded into its convolution on the fly (the state dict is
  unchanged), and the stride-4 MBConv blocks run in strips of rows on the CPU;
* the whole network is channels-last: the tokens between stages are a ``B x H x W x C``
  grid, which is a channels-last ``B x C x H x W`` tensor for the convolutions, so no
  layout copies are made around them;
* nothing is tied to a 1024x1024 input: any size works (windows are padded as needed).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from .common import LayerNorm2d


class DropPath(nn.Module):
    """Stochastic depth: drop a residual branch for a random subset of samples in training.

    Identity at inference. Surviving samples are scaled by ``1 / keep_prob`` so that the
    expected value is unchanged.
    """

    def __init__(self, drop_prob: float = 0.0) -> None:
        super().__init__()
        self.drop_prob = drop_prob

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.drop_prob == 0.0:
            return x
        keep_prob = 1.0 - self.drop_prob
        mask = x.new_empty((x.shape[0],) + (1,) * (x.ndim - 1)).bernoulli_(keep_prob)
        return x * mask.div_(keep_prob)

    def extra_repr(self) -> str:
        return f"drop_prob={self.drop_prob}"


def _drop_path(drop_prob: float) -> nn.Module:
    # No module at all when disabled: keeps the graph (and profiles) free of no-ops.
    return DropPath(drop_prob) if drop_prob > 0.0 else nn.Identity()


class Conv2dBN(nn.Module):
    """Bias-free convolution followed by BatchNorm (checkpoint keys ``c.*`` and ``bn.*``)."""

    def __init__(
        self,
        in_chans: int,
        out_chans: int,
        kernel_size: int = 1,
        stride: int = 1,
        padding: int = 0,
        groups: int = 1,
        bn_weight_init: float = 1.0,
    ) -> None:
        super().__init__()
        self.c = nn.Conv2d(
            in_chans, out_chans, kernel_size, stride, padding, groups=groups, bias=False
        )
        self.bn = nn.BatchNorm2d(out_chans)
        # A zero init on the last BN of a residual branch starts the block as the identity.
        nn.init.constant_(self.bn.weight, bn_weight_init)
        nn.init.zeros_(self.bn.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.bn.training or self.bn.running_var is None:
            return self.bn(self.c(x))
        # Inference: fold the BatchNorm into the conv on the fly. The folded weights cost
        # microseconds; the separate BN pass over the feature map costs a full read+write.
        # Folding per call (not once) keeps the checkpoint keys and follows weight updates.
        bn = self.bn
        scale = bn.weight * torch.rsqrt(bn.running_var + bn.eps)
        weight = self.c.weight * scale[:, None, None, None]
        bias = bn.bias - bn.running_mean * scale
        conv = self.c
        return F.conv2d(x, weight, bias, conv.stride, conv.padding, conv.dilation, conv.groups)


class PatchEmbed(nn.Module):
    """Conv stem, two stride-2 3x3 convs: ``B x in_chans x H x W -> B x C x H/4 x W/4``."""

    def __init__(self, in_chans: int, embed_dim: int, activation: type[nn.Module]) -> None:
        super().__init__()
        self.seq = nn.Sequential(
            Conv2dBN(in_chans, embed_dim // 2, kernel_size=3, stride=2, padding=1),
            activation(),
            Conv2dBN(embed_dim // 2, embed_dim, kernel_size=3, stride=2, padding=1),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.seq(x)


class MBConv(nn.Module):
    """Inverted residual block (MobileNetV2): 1x1 expand, 3x3 depthwise, 1x1 project.

    ``B x C x H x W -> B x C x H x W``.
    """

    #: Size of the expanded activations of one strip of rows at inference on the CPU.
    strip_bytes = 8 * 2**20

    def __init__(
        self,
        chans: int,
        expand_ratio: float,
        activation: type[nn.Module],
        drop_path: float,
    ) -> None:
        super().__init__()
        hidden = int(chans * expand_ratio)
        self.conv1 = Conv2dBN(chans, hidden)
        self.act1 = activation()
        self.conv2 = Conv2dBN(hidden, hidden, kernel_size=3, padding=1, groups=hidden)
        self.act2 = activation()
        self.conv3 = Conv2dBN(hidden, chans, bn_weight_init=0.0)
        self.act3 = activation()
        self.drop_path = _drop_path(drop_path)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        height = x.shape[2]
        rows = self._rows_per_strip(x)
        if rows >= height:
            return self._rows(x, 0, height)
        strips = [self._rows(x, top, min(top + rows, height)) for top in range(0, height, rows)]
        return torch.cat(strips, dim=2)

    def _rows_per_strip(self, x: torch.Tensor) -> int:
        # At stride 4 the expanded activations are big (256 channels x 256 x 256 = 64 MiB for
        # vit_t at 1024 px). On the CPU every tensor that size is a fresh mmap, page-faulted
        # in again on each call, and each op streams it through memory. Strips of a few MiB
        # are recycled by the allocator and stay in cache: 1.7x faster for this stage, with
        # bitwise the same result. Not in training (BatchNorm would take statistics per strip)
        # and not on GPUs (a caching allocator, and wide kernels want the whole map).
        if self.training or x.device.type != "cpu":
            return x.shape[2]
        row_bytes = x.shape[0] * x.shape[3] * self.conv1.c.out_channels * x.element_size()
        return max(8, self.strip_bytes // row_bytes)

    def _rows(self, x: torch.Tensor, top: int, bottom: int) -> torch.Tensor:
        """The block's output rows ``[top, bottom)``: ``B x C x (bottom - top) x W``."""
        # The 3x3 depthwise conv needs one row of context on each side, where there is one.
        lo, hi = max(top - 1, 0), min(bottom + 1, x.shape[2])
        y = self.act1(self.conv1(x[:, :, lo:hi]))
        # Rows lo and hi - 1 of this output saw zero padding in place of their missing
        # neighbour; they are exactly the context rows, which are dropped.
        y = self.conv2(y)[:, :, top - lo : bottom - lo]
        y = self.drop_path(self.conv3(self.act2(y)))
        # ``y`` is a fresh tensor: add the shortcut in place to spare an allocation.
        return self.act3(y.add_(x[:, :, top:bottom]))


class PatchMerging(nn.Module):
    """Downsampling between stages: 1x1 conv, 3x3 depthwise conv (stride 1 or 2), 1x1 conv.

    ``B x C x H x W -> B x H' x W' x C'`` (a token grid, ready for the attention stages).
    """

    def __init__(
        self, dim: int, out_dim: int, stride: int, activation: type[nn.Module]
    ) -> None:
        super().__init__()
        self.act = activation()
        self.conv1 = Conv2dBN(dim, out_dim)
        self.conv2 = Conv2dBN(
            out_dim, out_dim, kernel_size=3, stride=stride, padding=1, groups=out_dim
        )
        self.conv3 = Conv2dBN(out_dim, out_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.act(self.conv1(x))
        x = self.act(self.conv2(x))
        return self.conv3(x).permute(0, 2, 3, 1)


class ConvLayer(nn.Module):
    """The first stage: MBConv blocks, then patch merging.

    ``B x C x H x W -> B x H' x W' x C'`` (``B x H x W x C`` without a downsample).
    """

    def __init__(
        self,
        dim: int,
        depth: int,
        activation: type[nn.Module],
        drop_path: Sequence[float],
        downsample: PatchMerging | None,
        conv_expand_ratio: float = 4.0,
    ) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(
            MBConv(dim, conv_expand_ratio, activation, drop_path[i]) for i in range(depth)
        )
        self.downsample = downsample

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.blocks:
            x = block(x)
        if self.downsample is None:
            return x.permute(0, 2, 3, 1)
        return self.downsample(x)


class Mlp(nn.Module):
    """Pre-norm feed-forward: LayerNorm, ``C -> hidden -> C`` with GELU. Acts on the last axis."""

    def __init__(
        self,
        in_features: int,
        hidden_features: int,
        activation: type[nn.Module] = nn.GELU,
        drop: float = 0.0,
    ) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(in_features)
        self.fc1 = nn.Linear(in_features, hidden_features)
        self.fc2 = nn.Linear(hidden_features, in_features)
        self.act = activation()
        self.drop = nn.Dropout(drop)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.drop(self.act(self.fc1(self.norm(x))))
        return self.drop(self.fc2(x))


def relative_offset_index(height: int, width: int) -> torch.Tensor:
    """Index of the ``(|dy|, |dx|)`` offset between every pair of cells of an ``h x w`` window.

    Returns ``(h*w) x (h*w)`` int64, ``index[p, q] = |y_p - y_q| * w + |x_p - x_q|``. This is
    the numbering the reference builds by registering offsets in order of first appearance:
    the first query cell (0, 0) meets every offset, in row-major order.
    """
    ys, xs = torch.meshgrid(torch.arange(height), torch.arange(width), indexing="ij")
    ys, xs = ys.flatten(), xs.flatten()
    dy = (ys[:, None] - ys[None, :]).abs()
    dx = (xs[:, None] - xs[None, :]).abs()
    return dy * width + dx


class Attention(nn.Module):
    """Pre-norm multi-head attention within one window, with a LeViT-style position bias.

    Each head learns one scalar per ``(|dy|, |dx|)`` offset (``attention_biases``), added to
    the attention logits. Acts on windows of tokens: ``B' x N x C -> B' x N x C`` with
    ``N = resolution[0] * resolution[1]``.
    """

    def __init__(
        self,
        dim: int,
        key_dim: int,
        num_heads: int = 8,
        attn_ratio: float = 4.0,
        resolution: tuple[int, int] = (14, 14),
    ) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.key_dim = key_dim
        self.scale = key_dim**-0.5
        self.value_dim = int(attn_ratio * key_dim)  # per head
        # The reference orders qkv's output per head: [q | k | v] for head 0, then head 1...
        self.norm = nn.LayerNorm(dim)
        self.qkv = nn.Linear(dim, num_heads * (2 * key_dim + self.value_dim))
        self.proj = nn.Linear(num_heads * self.value_dim, dim)

        height, width = resolution
        self.attention_biases = nn.Parameter(torch.zeros(num_heads, height * width))
        # Derived from the resolution, so not stored in checkpoints (as in the reference).
        self.register_buffer(
            "attention_bias_idxs", relative_offset_index(height, width), persistent=False
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, n, _ = x.shape
        qkv = self.qkv(self.norm(x)).view(batch, n, self.num_heads, -1)
        q, k, v = qkv.split([self.key_dim, self.key_dim, self.value_dim], dim=3)
        # 1 x heads x N x N, broadcast over the windows. Gathered on each call: a cache could
        # go stale when weights change after .eval(). The leading 1 matters: on CPU a 3-D
        # mask sends SDPA to its slow "math" path, a 4-D one to the fused flash kernel.
        bias = self.attention_biases[:, self.attention_bias_idxs].unsqueeze(0).to(q.dtype)
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)  # B' x heads x N x d
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=bias, scale=self.scale)
        return self.proj(out.transpose(1, 2).reshape(batch, n, -1))


def window_partition(x: torch.Tensor, window_size: int) -> tuple[torch.Tensor, tuple[int, int]]:
    """Cut a token grid into windows, zero-padding bottom/right.

    ``B x H x W x C -> (B * nWin) x (ws*ws) x C`` plus the padded size ``(Hp, Wp)``. The
    padding tokens take part in the attention (they are not masked), as in the reference.
    """
    batch, h, w, c = x.shape
    pad_h = (window_size - h % window_size) % window_size
    pad_w = (window_size - w % window_size) % window_size
    if pad_h or pad_w:
        x = F.pad(x, (0, 0, 0, pad_w, 0, pad_h))
    hp, wp = h + pad_h, w + pad_w
    x = x.view(batch, hp // window_size, window_size, wp // window_size, window_size, c)
    windows = x.transpose(2, 3).reshape(-1, window_size * window_size, c)
    return windows, (hp, wp)


def window_unpartition(
    windows: torch.Tensor, window_size: int, padded_hw: tuple[int, int], hw: tuple[int, int]
) -> torch.Tensor:
    """Inverse of :func:`window_partition`: ``(B * nWin) x (ws*ws) x C -> B x H x W x C``.

    The crop of the padding is a view; callers only read it.
    """
    hp, wp = padded_hw
    h, w = hw
    nh, nw = hp // window_size, wp // window_size
    batch = windows.shape[0] // (nh * nw)
    x = windows.view(batch, nh, nw, window_size, window_size, -1)
    x = x.transpose(2, 3).reshape(batch, hp, wp, -1)
    if hp > h or wp > w:
        x = x[:, :h, :w]
    return x


class TinyViTBlock(nn.Module):
    """Windowed attention, a depthwise conv to mix across windows, then the MLP.

    ``B x H x W x C -> B x H x W x C``. Attention and MLP are residual branches; the local
    conv is applied to the sum (not residual), as in the reference.
    """

    def __init__(
        self,
        dim: int,
        num_heads: int,
        window_size: int = 7,
        mlp_ratio: float = 4.0,
        drop: float = 0.0,
        drop_path: float = 0.0,
        local_conv_size: int = 3,
        activation: type[nn.Module] = nn.GELU,
    ) -> None:
        super().__init__()
        if window_size <= 0:
            raise ValueError("window_size must be positive")
        if dim % num_heads:
            raise ValueError(f"dim {dim} is not divisible by num_heads {num_heads}")
        self.window_size = window_size
        self.drop_path = _drop_path(drop_path)
        self.attn = Attention(
            dim, dim // num_heads, num_heads, attn_ratio=1.0, resolution=(window_size, window_size)
        )
        self.mlp = Mlp(dim, int(dim * mlp_ratio), activation=activation, drop=drop)
        self.local_conv = Conv2dBN(
            dim, dim, kernel_size=local_conv_size, padding=local_conv_size // 2, groups=dim
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        _, h, w, _ = x.shape
        # A grid of exactly one window goes through partition/unpartition as pure views.
        windows, padded_hw = window_partition(x, self.window_size)
        attn = window_unpartition(self.attn(windows), self.window_size, padded_hw, (h, w))
        x = x + self.drop_path(attn)
        # B x H x W x C is a channels-last B x C x H x W: the conv needs no layout copy.
        x = self.local_conv(x.permute(0, 3, 1, 2)).permute(0, 2, 3, 1)
        return x + self.drop_path(self.mlp(x))


class BasicLayer(nn.Module):
    """One attention stage: TinyViT blocks, then (except for the last stage) patch merging.

    ``B x H x W x C -> B x H' x W' x C'``.
    """

    def __init__(
        self,
        dim: int,
        depth: int,
        num_heads: int,
        window_size: int,
        activation: type[nn.Module],
        drop_path: Sequence[float],
        downsample: PatchMerging | None,
        mlp_ratio: float = 4.0,
        drop: float = 0.0,
        local_conv_size: int = 3,
    ) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(
            TinyViTBlock(
                dim,
                num_heads,
                window_size=window_size,
                mlp_ratio=mlp_ratio,
                drop=drop,
                drop_path=drop_path[i],
                local_conv_size=local_conv_size,
                activation=activation,
            )
            for i in range(depth)
        )
        self.downsample = downsample

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.blocks:
            x = block(x)
        if self.downsample is not None:
            x = self.downsample(x.permute(0, 3, 1, 2))
        return x


class TinyViT(nn.Module):
    """MobileSAM's image encoder: ``B x in_chans x H x W -> B x 256 x H/16 x W/16``.

    The defaults are MobileSAM's ``vit_t`` (TinyViT-5M at 1024x1024). Stage ``i`` runs at
    stride ``4 * 2**i`` except the last, whose patch merging keeps the stride (16) so that
    the embedding has SAM's 64x64 grid. ``norm_head`` and ``head`` (ImageNet classifier) are
    unused; they exist only so that the official checkpoint loads strictly.
    """

    def __init__(
        self,
        img_size: int = 1024,
        in_chans: int = 3,
        num_classes: int = 1000,
        embed_dims: Sequence[int] = (64, 128, 160, 320),
        depths: Sequence[int] = (2, 2, 6, 2),
        num_heads: Sequence[int] = (2, 4, 5, 10),
        window_sizes: Sequence[int] = (7, 7, 14, 7),
        mlp_ratio: float = 4.0,
        drop_rate: float = 0.0,
        drop_path_rate: float = 0.0,
        mbconv_expand_ratio: float = 4.0,
        local_conv_size: int = 3,
        out_chans: int = 256,
    ) -> None:
        super().__init__()
        if len(depths) < 2:
            raise ValueError("TinyViT needs a conv stage and at least one attention stage")
        self.img_size = img_size
        activation = nn.GELU
        num_stages = len(depths)

        self.patch_embed = PatchEmbed(in_chans, embed_dims[0], activation)

        # Stochastic depth grows linearly from 0 over all blocks. (Plain Python rather than
        # torch.linspace(...).tolist(), which fails when built on the meta device.)
        num_blocks = sum(depths)
        rates = [drop_path_rate * i / max(num_blocks - 1, 1) for i in range(num_blocks)]
        self.layers = nn.ModuleList()
        for i in range(num_stages):
            block_rates = rates[sum(depths[:i]) : sum(depths[: i + 1])]
            downsample = None
            if i < num_stages - 1:
                downsample = PatchMerging(
                    embed_dims[i],
                    embed_dims[i + 1],
                    stride=2 if i < num_stages - 2 else 1,
                    activation=activation,
                )
            if i == 0:
                layer: nn.Module = ConvLayer(
                    embed_dims[0],
                    depths[0],
                    activation,
                    block_rates,
                    downsample,
                    conv_expand_ratio=mbconv_expand_ratio,
                )
            else:
                layer = BasicLayer(
                    embed_dims[i],
                    depths[i],
                    num_heads[i],
                    window_sizes[i],
                    activation,
                    block_rates,
                    downsample,
                    mlp_ratio=mlp_ratio,
                    drop=drop_rate,
                    local_conv_size=local_conv_size,
                )
            self.layers.append(layer)

        self.norm_head = nn.LayerNorm(embed_dims[-1])
        self.head = nn.Linear(embed_dims[-1], num_classes) if num_classes > 0 else nn.Identity()
        self.apply(_init_weights)

        self.neck = nn.Sequential(
            nn.Conv2d(embed_dims[-1], out_chans, kernel_size=1, bias=False),
            LayerNorm2d(out_chans),
            nn.Conv2d(out_chans, out_chans, kernel_size=3, padding=1, bias=False),
            LayerNorm2d(out_chans),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Channels-last from the start: oneDNN's convolutions (the depthwise ones above all)
        # are several times faster on it, and the token grids below are channels-last anyway.
        x = self.patch_embed(x.contiguous(memory_format=torch.channels_last))
        for layer in self.layers:
            x = layer(x)
        # B x H x W x C is channels-last B x C x H x W; return the usual contiguous layout.
        return self.neck(x.permute(0, 3, 1, 2)).contiguous()


def _init_weights(module: nn.Module) -> None:
    # The reference's training init; loading a checkpoint overwrites it. The reference's
    # trunc_normal_(std=0.02) truncates at +-2 in absolute terms, i.e. at 100 sigma: that is
    # a plain normal, and drawing one is ~50x cheaper than the erfinv-based truncated draw.
    if isinstance(module, nn.Linear):
        nn.init.normal_(module.weight, std=0.02)
        if module.bias is not None:
            nn.init.zeros_(module.bias)
    elif isinstance(module, nn.LayerNorm):
        nn.init.ones_(module.weight)
        nn.init.zeros_(module.bias)
