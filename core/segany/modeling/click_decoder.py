"""A faster evaluation of the same mask decoder for interactive clicks.

The mask decoder's cost is dominated by projections of the 4096 image tokens (256 -> 128
wide) in every attention between the ~7 prompt tokens and the image. Two exact rewrites
avoid most of them, and a per-image cache removes the rest of the first layer:

* token -> image attention (few queries, many keys): ``q_h . (W_k x + b_k)`` equals
  ``(W_k^T q_h) . x`` plus a per-query constant that softmax ignores, and
  ``P (W_v x + b_v) = (P x) W_v^T + b_v`` because attention rows sum to 1. So the image
  tokens are never projected: the few queries are projected into the image's 256-wide space.
* image -> token attention (many queries, few keys): scores are ``x (W_q^T K_h^T)`` plus a
  per-key constant, and the output projection folds into the values:
  ``concat_h(P_h V_h) W_o^T = sum_h P_h (V_h W_o,h^T)``.
* without a mask prompt the first layer's image side (embedding + no-mask embedding and its
  positional encoding) is the same for every prompt, so its projections are computed once
  per image (:meth:`ClickDecoder.prepare`).

* the output upscaling (two stride-2 2x2 transposed convolutions) is a per-token linear map
  to the 4 sub-pixels, so it runs as two plain GEMMs on the ``N x C`` token layout, with the
  2D LayerNorm as an ordinary LayerNorm over the 64 channels of each sub-pixel; on CPU this
  is ~3x faster than ``ConvTranspose2d`` and needs no layout copies.

The weights are the :class:`~segany.modeling.MaskDecoder`'s own (nothing is copied); outputs
equal ``MaskDecoder.predict_masks`` up to float rounding (~1e-6, tested).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .mask_decoder import MaskDecoder
from .prompt_encoder import PromptEncoder
from .transformer import Attention, TwoWayAttentionBlock


@dataclass
class DecoderImageCache:
    """Prompt-independent tensors of one image for the first decoder layer.

    Shapes (N = 64*64 image tokens, C = 256, Ci = internal attention width):
        keys ``1 x N x C`` (embedding + no-mask embedding), key_pe ``1 x N x C``,
        t2i_k, t2i_v ``1 x heads x N x Ci/heads``; i2t_q ``1 x N x Ci``.
    """

    keys: torch.Tensor
    key_pe: torch.Tensor
    t2i_k: torch.Tensor
    t2i_v: torch.Tensor
    i2t_q: torch.Tensor


def _softmax_small(x: torch.Tensor) -> torch.Tensor:
    """Stable softmax over a short last axis (the ~7 prompt tokens).

    ``Tensor.softmax`` handles many short rows ~4x slower on CPU than these vectorised
    element-wise steps.
    """
    e = (x - x.amax(dim=-1, keepdim=True)).exp()
    return e / e.sum(dim=-1, keepdim=True)


def _heads(attn: Attention, x: torch.Tensor) -> torch.Tensor:
    """Project-free split ``B x N x Ci -> B x heads x N x Ci/heads``."""
    return attn._split_heads(x)


def _token_to_image(attn: Attention, q_in: torch.Tensor, k_in: torch.Tensor, v_in: torch.Tensor) -> torch.Tensor:
    """``attn(q_in, k_in, v_in)`` for few queries ``B x T x C`` and many keys ``B x N x C``."""
    heads, d = attn.num_heads, attn.internal_dim // attn.num_heads
    batch, t, c = q_in.shape
    q = _heads(attn, attn.q_proj(q_in))  # B x H x T x d
    w_k = attn.k_proj.weight.view(heads, d, c)  # H x d x C
    q_in_image_space = torch.einsum("bhtd,hdc->bhtc", q, w_k).reshape(batch, heads * t, c)
    scores = torch.bmm(q_in_image_space, k_in.transpose(1, 2)) * (d**-0.5)  # B x HT x N
    probs = scores.softmax(dim=-1)
    mixed = torch.bmm(probs, v_in).view(batch, heads, t, c)  # P x, B x H x T x C
    w_v = attn.v_proj.weight.view(heads, d, c)
    out = torch.einsum("bhtc,hdc->bthd", mixed, w_v).reshape(batch, t, heads * d)
    out = out + attn.v_proj.bias
    return attn.out_proj(out)


def _image_to_token(
    attn: Attention,
    q_in: torch.Tensor | None,
    k_in: torch.Tensor,
    v_in: torch.Tensor,
    q_heads: torch.Tensor | None = None,
) -> torch.Tensor:
    """``attn(q_in, k_in, v_in)`` for many queries ``B x N x C`` and few keys ``B x T x C``.

    ``q_heads`` (``1 x N x Ci``, already projected) replaces ``q_in`` when cached.
    """
    heads, d = attn.num_heads, attn.internal_dim // attn.num_heads
    batch, t, c = k_in.shape
    k = _heads(attn, attn.k_proj(k_in))  # B x H x T x d
    if q_heads is not None:
        # Cached queries B x N x Ci against a block-diagonal key matrix Ci x (H*T): one GEMM
        # whose result is already in the (N, H, T) layout used below.
        n = q_heads.shape[1]
        blocks = torch.zeros(batch, heads, d, heads, t, dtype=k.dtype, device=k.device)
        idx = torch.arange(heads, device=k.device)
        blocks[:, idx, :, idx, :] = k.transpose(-1, -2).transpose(0, 1)
        scores = torch.bmm(q_heads.expand(batch, -1, -1), blocks.reshape(batch, heads * d, heads * t))
    else:
        # q_h . k = x W_q,h^T k + b_q,h . k: project the keys into the image's space.
        w_q = attn.q_proj.weight.view(heads, d, c)
        b_q = attn.q_proj.bias.view(heads, d)
        g = torch.einsum("bhtd,hdc->bcht", k, w_q).reshape(batch, c, heads * t)
        const = torch.einsum("bhtd,hd->bht", k, b_q).reshape(batch, 1, heads * t)
        n = q_in.shape[1]
        scores = torch.baddbmm(const, q_in, g)
    probs = _softmax_small(scores.view(batch, n, heads, t) * (d**-0.5)).view(batch, n, heads * t)
    v = _heads(attn, attn.v_proj(v_in))  # B x H x T x d
    w_o = attn.out_proj.weight.view(c, heads, d)
    v_out = torch.einsum("bhtd,chd->bhtc", v, w_o).reshape(batch, heads * t, c)
    return torch.baddbmm(attn.out_proj.bias.expand(batch, 1, c), probs, v_out)


class ClickDecoder:
    """Fast path over a model's prompt-independent work, for many prompts on one image.

    Example:
        >>> import segany
        >>> sam = segany.build_sam("test_tiny")
        >>> fast = ClickDecoder(sam.mask_decoder, sam.prompt_encoder)
        >>> cache = fast.prepare(torch.zeros(1, 256, 64, 64))
        >>> sparse, _ = sam.prompt_encoder((torch.zeros(2, 1, 2), torch.ones(2, 1, dtype=torch.long)), None, None)
        >>> masks, iou = fast.decode(cache, sparse)
        >>> masks.shape, iou.shape
        (torch.Size([2, 4, 256, 256]), torch.Size([2, 4]))
    """

    def __init__(self, mask_decoder: MaskDecoder, prompt_encoder: PromptEncoder) -> None:
        self.decoder = mask_decoder
        self.prompt_encoder = prompt_encoder

    @torch.no_grad()
    def prepare(self, image_embeddings: torch.Tensor) -> DecoderImageCache:
        """Cache the first layer's image-side projections for ``1 x C x h x w`` features."""
        pe = self.prompt_encoder.get_dense_pe().to(image_embeddings.dtype)
        no_mask = self.prompt_encoder.no_mask_embed.weight.reshape(1, -1, 1, 1)
        keys = (image_embeddings + no_mask).flatten(2).transpose(1, 2)
        key_pe = pe.flatten(2).transpose(1, 2)
        layer: TwoWayAttentionBlock = self.decoder.transformer.layers[0]
        keys_with_pe = keys + key_pe
        t2i = layer.cross_attn_token_to_image
        i2t = layer.cross_attn_image_to_token
        return DecoderImageCache(
            keys=keys,
            key_pe=key_pe,
            t2i_k=_heads(t2i, t2i.k_proj(keys_with_pe)),
            t2i_v=_heads(t2i, t2i.v_proj(keys)),
            i2t_q=i2t.q_proj(keys_with_pe),
        )

    def _first_layer(
        self, layer: TwoWayAttentionBlock, cache: DecoderImageCache, queries: torch.Tensor, query_pe: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        if layer.skip_first_layer_pe:
            queries = layer.self_attn(queries, queries, queries)
        else:
            q = queries + query_pe
            queries = queries + layer.self_attn(q, q, queries)
        queries = layer.norm1(queries)
        batch = queries.shape[0]
        t2i = layer.cross_attn_token_to_image
        q = _heads(t2i, t2i.q_proj(queries + query_pe))
        attn = F.scaled_dot_product_attention(
            q, cache.t2i_k.expand(batch, -1, -1, -1), cache.t2i_v.expand(batch, -1, -1, -1)
        )
        attn = attn.transpose(1, 2).reshape(batch, -1, t2i.internal_dim)
        queries = layer.norm2(queries + t2i.out_proj(attn))
        queries = layer.norm3(queries + layer.mlp(queries))
        out = _image_to_token(
            layer.cross_attn_image_to_token,
            None,
            queries + query_pe,
            queries,
            q_heads=cache.i2t_q,
        )
        keys = layer.norm4(cache.keys + out)
        return queries, keys

    @staticmethod
    def _layer(
        layer: TwoWayAttentionBlock, queries: torch.Tensor, keys: torch.Tensor, query_pe: torch.Tensor, key_pe: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        q = queries + query_pe
        queries = layer.norm1(queries + layer.self_attn(q, q, queries))
        keys_with_pe = keys + key_pe
        q = queries + query_pe
        queries = layer.norm2(queries + _token_to_image(layer.cross_attn_token_to_image, q, keys_with_pe, keys))
        queries = layer.norm3(queries + layer.mlp(queries))
        q = queries + query_pe
        keys = layer.norm4(keys + _image_to_token(layer.cross_attn_image_to_token, keys_with_pe, q, queries))
        return queries, keys

    @torch.no_grad()
    def decode(self, cache: DecoderImageCache, sparse_prompt_embeddings: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """All four mask tokens for ``B`` prompts without mask input.

        Returns logits ``B x 4 x 256 x 256`` and IoU predictions ``B x 4``, as
        :meth:`MaskDecoder.predict_masks`.
        """
        dec = self.decoder
        batch = sparse_prompt_embeddings.shape[0]
        output_tokens = torch.cat([dec.iou_token.weight, dec.mask_tokens.weight], dim=0)
        tokens = torch.cat((output_tokens.unsqueeze(0).expand(batch, -1, -1), sparse_prompt_embeddings), dim=1)
        transformer = dec.transformer
        queries, keys = self._first_layer(transformer.layers[0], cache, tokens, tokens)
        key_pe = cache.key_pe.expand(batch, -1, -1)
        for layer in transformer.layers[1:]:
            queries, keys = self._layer(layer, queries, keys, tokens, key_pe)
        q = queries + tokens
        queries = queries + _token_to_image(transformer.final_attn_token_to_image, q, keys + key_pe, keys)
        hs = transformer.norm_final_attn(queries)

        mask_tokens_out = hs[:, 1 : 1 + dec.num_mask_tokens, :]
        hyper_in = torch.stack(
            [mlp(mask_tokens_out[:, i, :]) for i, mlp in enumerate(dec.output_hypernetworks_mlps)], dim=1
        )
        h, w = self.prompt_encoder.image_embedding_size
        masks = self._upscale_and_project(keys, hyper_in, h, w)
        return masks, dec.iou_prediction_head(hs[:, 0, :])

    def _upscale_and_project(self, keys: torch.Tensor, hyper_in: torch.Tensor, h: int, w: int) -> torch.Tensor:
        """``output_upscaling`` + hypernetwork product as GEMMs on the token layout.

        Args:
            keys: image tokens ``B x (h*w) x C``; hyper_in: ``B x M x C/8``.

        Returns:
            mask logits ``B x M x 4h x 4w``.
        """
        conv1, norm, act1, conv2, act2 = self.decoder.output_upscaling
        batch, n, c = keys.shape
        c1, c2 = conv1.out_channels, conv2.out_channels
        # ConvTranspose2d weight is in x out x kh x kw; put the 4 sub-pixels before the channels
        # so that each sub-pixel's channels are contiguous for the LayerNorm.
        w1 = conv1.weight.permute(0, 2, 3, 1).reshape(c, 4 * c1)
        b1 = conv1.bias.repeat(4)
        y = torch.addmm(b1, keys.reshape(batch * n, c), w1).view(batch * n * 4, c1)
        y = act1(F.layer_norm(y, (c1,), norm.weight, norm.bias, norm.eps))
        w2 = conv2.weight.permute(0, 2, 3, 1).reshape(c1, 4 * c2)
        b2 = conv2.bias.repeat(4)
        z = act2(torch.addmm(b2, y, w2))  # (B*N*4*4) x C2
        m = hyper_in.shape[1]
        logits = torch.bmm(z.view(batch, n * 16, c2), hyper_in.transpose(1, 2))  # B x (N*16) x M
        # Token (i, j), first sub-pixel (a, b), second (p, q) -> pixel (4i + 2a + p, 4j + 2b + q).
        logits = logits.view(batch, h, w, 2, 2, 2, 2, m).permute(0, 7, 1, 3, 5, 2, 4, 6)
        return logits.reshape(batch, m, 4 * h, 4 * w)
