"""Automatic mask generation ("segment everything"): SAM prompted with a grid of points.

:class:`AutomaticMaskGenerator` runs the reference ``SamAutomaticMaskGenerator`` algorithm
with the same parameters, defaults and record format:

1. crops: the whole image, then ``(2^i)^2`` overlapping crops per layer ``i``; the encoder runs
   once per crop;
2. a cell-centred point grid per crop, each point one positive-click prompt (points on
   ``valid_mask == False`` pixels, e.g. nodata, are skipped);
3. the decoder returns 3 candidate masks per point; keep predicted IoU ``> pred_iou_thresh``;
4. stability = IoU(logits > +offset, logits > -offset) at full resolution, keep
   ``>= stability_score_thresh``; drop masks touching a crop edge that is not an image edge;
5. box NMS per crop (score: predicted IoU), then across crops (smaller crops win);
6. optional clean-up of small holes and islands, then NMS again.

What differs is how the work is done, so that it is fast and lean:

* the decoder runs in cache-friendly micro-batches (4 prompts on a CPU) through the exact
  :class:`~segany.modeling.click_decoder.ClickDecoder`, and the predicted IoU is read
  *before* the decoder's output upscaling, which runs only for points with a candidate
  above ``pred_iou_thresh``; candidates below it are never upscaled at all;
* by default (``exact=False``) each remaining candidate is resampled to full resolution only
  inside the window where its logits can exceed ``-offset`` (bilinear resampling is a convex
  combination, so nothing outside can), with the two bilinear steps of
  :meth:`Sam.postprocess_masks` folded into one banded matrix per axis; stability, box and
  run-length code come out of that one window. Results equal the reference up to float
  rounding of the resampling (~1e-6 on logits): in practice the same masks;
* ``exact=True`` resamples whole candidates with :meth:`Sam.postprocess_masks` itself, a
  few at a time, so every decision is the reference's bit for bit;
* kept masks are stored as run-length codes, never as full-image arrays; the full-image
  logits of a batch never exist at once.

Records: ``segmentation`` (``H x W`` bool, or an RLE dict with ``output_mode``), ``area``,
``bbox`` (XYWH with the reference's ``w = x1 - x0``), ``predicted_iou``, ``point_coords``,
``stability_score``, ``crop_box`` (XYWH). :func:`records_to_label_image` and
:func:`records_to_polygons` turn them into an instance label image or outlines.

Example:
    >>> import numpy as np, segany
    >>> generator = segany.AutomaticMaskGenerator(segany.build_sam("test_tiny"), points_per_side=4,
    ...                                           pred_iou_thresh=0.0, stability_score_thresh=0.0)
    >>> records = generator.generate(np.random.default_rng(0).integers(0, 255, (48, 64, 3), np.uint8))
    >>> sorted(records[0])
    ['area', 'bbox', 'crop_box', 'point_coords', 'predicted_iou', 'segmentation', 'stability_score']
    >>> records[0]["segmentation"].shape
    (48, 64)
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np
import torch

from .errors import SegAnyError
from .image import prepare_image
from .masks import (
    _counts_from_columns,
    _encode_counts_string,
    _mask_from_counts,
    _rle_counts,
    box_area,
    box_xyxy_to_xywh,
    build_all_layer_point_grids,
    generate_crop_boxes,
    label_image,
    mask_to_polygons,
    nms,
    remove_small_regions,
    stability_score,
)
from .modeling import Sam
from .modeling.click_decoder import ClickDecoder, DecoderImageCache, _token_to_image
from .predictor import ImageEmbedding, SamPredictor
from .resample import band, postprocess_axis_matrix

OUTPUT_MODES = ("binary_mask", "uncompressed_rle", "coco_rle")
# Prompts per decoder call on a CPU. The decoder's per-prompt tensors are large (4096 x 256
# and 65536 x 32 floats): with 4 prompts they stay in cache and below glibc's mmap threshold
# (32 MB; larger buffers are page-faulted in afresh on every call). vit_t on 2 cores: 22-26
# ms/prompt idle, against 33-36 for 16 and 41 for 64; a whole 16 x 16 AMG on a busy machine
# (load 4): 34 s against 40 s for 16. Fixed, so that results never depend on timing.
CPU_DECODER_BATCH = 4
# exact=True: full-resolution float logits resampled per step (bounds memory on large images).
EXACT_CHUNK_BYTES = 128 * 2**20
# Multiply-adds per GEMM call in the banded resampling. Small calls run single-threaded in
# OpenBLAS/MKL (OpenBLAS threads above 4 x 65536): on a busy CPU one threaded 6-Mpixel
# product took 100+ ms against 3.4 ms for the blocks, and blocks skip the band's zeros.
_GEMM_WORK = 200_000


# ---------------------------------------------------------------------------- mask store


@dataclass
class MaskSet:
    """Candidate masks of one image, column by column (``N`` masks).

    Attributes:
        counts: ``N`` RLE count arrays (int64, image frame, column-major runs).
        boxes: ``N x 4`` int64 inclusive XYXY boxes in the image frame.
        iou: ``N`` float32 predicted IoU; stability: ``N`` float32 stability scores.
        points: ``N x 2`` float64 prompt points ``(x, y)`` in the image frame.
        crop_boxes: ``N x 4`` int64 XYXY crop boxes (exclusive ends).
    """

    counts: list[np.ndarray]
    boxes: np.ndarray
    iou: np.ndarray
    stability: np.ndarray
    points: np.ndarray
    crop_boxes: np.ndarray

    @classmethod
    def empty(cls) -> "MaskSet":
        return cls(
            [],
            np.zeros((0, 4), np.int64),
            np.zeros(0, np.float32),
            np.zeros(0, np.float32),
            np.zeros((0, 2), np.float64),
            np.zeros((0, 4), np.int64),
        )

    def __len__(self) -> int:
        return len(self.counts)

    def take(self, index: np.ndarray | torch.Tensor | Sequence[int]) -> "MaskSet":
        """The masks at ``index`` (int indices or a bool mask), in that order."""
        index = np.asarray(index.cpu() if isinstance(index, torch.Tensor) else index)
        if index.dtype == bool:
            index = np.flatnonzero(index)
        index = index.astype(np.int64)
        return MaskSet(
            [self.counts[i] for i in index],
            self.boxes[index],
            self.iou[index],
            self.stability[index],
            self.points[index],
            self.crop_boxes[index],
        )

    @staticmethod
    def cat(sets: Sequence["MaskSet"]) -> "MaskSet":
        sets = [s for s in sets if len(s)]
        if not sets:
            return MaskSet.empty()
        return MaskSet(
            [c for s in sets for c in s.counts],
            np.concatenate([s.boxes for s in sets]),
            np.concatenate([s.iou for s in sets]),
            np.concatenate([s.stability for s in sets]),
            np.concatenate([s.points for s in sets]),
            np.concatenate([s.crop_boxes for s in sets]),
        )


# ---------------------------------------------------------------------------- resampling


class _WindowResampler:
    """Full-resolution logits of one crop, computed only inside a window.

    ``L = A_h X A_w^T`` for low-res logits ``X`` (``h x w``); ``A_h``, ``A_w`` are banded:
    output row ``r`` has non-zero weights on low-res rows ``lo_h[r]..hi_h[r]`` (monotone).
    numpy, not torch: the per-mask work is many small steps, and torch's thread pool costs
    more in synchronisation than it gains on them when the CPU is shared.
    """

    def __init__(self, low_size: tuple[int, int], model_size: int, input_size: tuple[int, int], out_size: tuple[int, int]) -> None:
        ah = postprocess_axis_matrix(low_size[0], model_size, input_size[0], out_size[0])
        aw = postprocess_axis_matrix(low_size[1], model_size, input_size[1], out_size[1])
        self.lo_h, self.hi_h = band(ah)
        self.lo_w, self.hi_w = band(aw)
        self.ah = ah.astype(np.float32)
        self.aw = aw.astype(np.float32)
        self.used = (int(self.hi_h.max()) + 1, int(self.hi_w.max()) + 1)

    def window(self, support: np.ndarray) -> tuple[int, int, int, int] | None:
        """Output rows ``r0:r1`` and columns ``c0:c1`` reached by low-res pixels in ``support``."""
        rows = np.flatnonzero(support.any(axis=1))
        if rows.size == 0:
            return None
        cols = np.flatnonzero(support.any(axis=0))
        r0 = int(np.searchsorted(self.hi_h, rows[0], "left"))
        r1 = int(np.searchsorted(self.lo_h, rows[-1], "right"))
        c0 = int(np.searchsorted(self.hi_w, cols[0], "left"))
        c1 = int(np.searchsorted(self.lo_w, cols[-1], "right"))
        if r0 >= r1 or c0 >= c1:
            return None
        return r0, r1, c0, c1

    def logits_t(self, x: np.ndarray, r0: int, r1: int, c0: int, c1: int) -> np.ndarray:
        """Transposed full-resolution logits ``(c1 - c0) x (r1 - r0)`` of low-res ``x``.

        Transposed because run-length codes are column-major: each row of the result is one
        image column, ready to encode. Both products are done in blocks of output rows that
        touch few low-res rows (the matrices are banded), as small GEMMs.
        """
        la, lb = int(self.lo_w[c0]), int(self.hi_w[c1 - 1]) + 1
        xt = x[:, la:lb].T
        g = np.empty((lb - la, r1 - r0), dtype=np.float32)  # rows resampled: (lb - la) x rows
        step = _block_size(self.lo_h, self.hi_h, r0, r1, lb - la)
        for a0 in range(r0, r1, step):
            a1 = min(a0 + step, r1)
            ka, kb = int(self.lo_h[a0]), int(self.hi_h[a1 - 1]) + 1
            np.matmul(xt[:, ka:kb], self.ah[a0:a1, ka:kb].T, out=g[:, a0 - r0 : a1 - r0])
        out = np.empty((c1 - c0, r1 - r0), dtype=np.float32)
        step = _block_size(self.lo_w, self.hi_w, c0, c1, r1 - r0)
        for b0 in range(c0, c1, step):
            b1 = min(b0 + step, c1)
            ba, bb = int(self.lo_w[b0]), int(self.hi_w[b1 - 1]) + 1
            np.matmul(self.aw[b0:b1, ba:bb], g[ba - la : bb - la], out=out[b0 - c0 : b1 - c0])
        return out


def _block_size(lo: np.ndarray, hi: np.ndarray, start: int, stop: int, other: int) -> int:
    """Output rows per GEMM so that one call does at most ``_GEMM_WORK`` multiply-adds."""
    density = (int(hi[stop - 1]) - int(lo[start]) + 1) / max(1, stop - start)
    size = 256
    while size > 1 and other * (size * density + 3) * size > _GEMM_WORK:
        size //= 2
    return size


# ---------------------------------------------------------------------------- decoder


def _decode_tokens(click: ClickDecoder, cache: DecoderImageCache, sparse: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The two-way transformer part of :meth:`ClickDecoder.decode`: ``(hs, keys)``.

    Same operations as ``decode`` up to the output upscaling, so that the predicted IoU
    (a function of ``hs`` only) is known before the costly upscaling.
    """
    dec = click.decoder
    batch = sparse.shape[0]
    output_tokens = torch.cat([dec.iou_token.weight, dec.mask_tokens.weight], dim=0)
    tokens = torch.cat((output_tokens.unsqueeze(0).expand(batch, -1, -1), sparse), dim=1)
    transformer = dec.transformer
    queries, keys = click._first_layer(transformer.layers[0], cache, tokens, tokens)
    key_pe = cache.key_pe.expand(batch, -1, -1)
    for layer in transformer.layers[1:]:
        queries, keys = click._layer(layer, queries, keys, tokens, key_pe)
    q = queries + tokens
    queries = queries + _token_to_image(transformer.final_attn_token_to_image, q, keys + key_pe, keys)
    return transformer.norm_final_attn(queries), keys


def _decode_masks(click: ClickDecoder, hs: torch.Tensor, keys: torch.Tensor) -> torch.Tensor:
    """The upscaling part of :meth:`ClickDecoder.decode`: logits ``B x 4 x 4h x 4w``."""
    dec = click.decoder
    mask_tokens_out = hs[:, 1 : 1 + dec.num_mask_tokens, :]
    hyper_in = torch.stack(
        [mlp(mask_tokens_out[:, i, :]) for i, mlp in enumerate(dec.output_hypernetworks_mlps)], dim=1
    )
    h, w = click.prompt_encoder.image_embedding_size
    return click._upscale_and_project(keys, hyper_in, h, w)


# ---------------------------------------------------------------------------- generator


class AutomaticMaskGenerator:
    """Masks for everything in an image, from a grid of point prompts.

    Example:
        >>> import numpy as np, segany
        >>> gen = AutomaticMaskGenerator(segany.build_sam("test_tiny"), points_per_side=2,
        ...                              pred_iou_thresh=0.0, stability_score_thresh=0.0,
        ...                              output_mode="coco_rle")
        >>> recs = gen.generate(np.random.default_rng(1).integers(0, 255, (20, 30, 3), np.uint8))
        >>> recs[0]["segmentation"]["size"], isinstance(recs[0]["segmentation"]["counts"], str)
        ([20, 30], True)
        >>> gen.to_label_image(recs).shape
        (20, 30)
    """

    def __init__(
        self,
        model: Sam | SamPredictor,
        points_per_side: int | None = 32,
        points_per_batch: int = 64,
        pred_iou_thresh: float = 0.88,
        stability_score_thresh: float = 0.95,
        stability_score_offset: float = 1.0,
        box_nms_thresh: float = 0.7,
        crop_n_layers: int = 0,
        crop_nms_thresh: float = 0.7,
        crop_overlap_ratio: float = 512 / 1500,
        crop_n_points_downscale_factor: int = 1,
        point_grids: Sequence[np.ndarray] | None = None,
        min_mask_region_area: int = 0,
        output_mode: str = "binary_mask",
        *,
        exact: bool = False,
        decoder_batch: int | None = None,
    ) -> None:
        """Args (the reference's, same defaults):
        model: a :class:`Sam` or a :class:`SamPredictor` (whose precision is used; its
            current image is replaced by :meth:`generate`).
        points_per_side: grid density, ``n x n`` points per crop (``None``: use ``point_grids``).
        points_per_batch: points decoded and post-processed per step (bounds memory).
        pred_iou_thresh: keep masks whose predicted IoU is above this (0 disables).
        stability_score_thresh: keep masks whose stability is at least this (0 disables).
        stability_score_offset: logit offset of the stability score.
        box_nms_thresh: box IoU above which the lower-scored mask of a crop is dropped.
        crop_n_layers: crop layers after the whole image (layer ``i`` has ``(2^i)^2`` crops).
        crop_nms_thresh: box IoU for duplicates between crops.
        crop_overlap_ratio: overlap of first-layer crops, as a fraction of the short side.
        crop_n_points_downscale_factor: layer ``i`` has ``points_per_side / factor^i`` points a side.
        point_grids: explicit ``N x 2`` grids in ``[0, 1]`` (x, y), one per layer.
        min_mask_region_area: if > 0, fill holes and drop islands smaller than this (pixels).
        output_mode: ``"binary_mask"``, ``"uncompressed_rle"`` or ``"coco_rle"``.
        exact: resample every candidate exactly as the reference (slower; see the module doc).
        decoder_batch: prompts per decoder call (default: 4 on a CPU, ``points_per_batch``
            on a GPU); masks do not depend on it beyond float rounding.
        """
        if isinstance(model, SamPredictor):
            self.predictor = model
        elif isinstance(model, Sam):
            self.predictor = SamPredictor(model)
        else:
            raise SegAnyError(f"model must be a segany Sam or SamPredictor, got {type(model).__name__}")
        if (points_per_side is None) == (point_grids is None):
            raise SegAnyError("give exactly one of points_per_side (a grid density) or point_grids (explicit grids)")
        _check_int("crop_n_layers", crop_n_layers, 0)
        _check_int("crop_n_points_downscale_factor", crop_n_points_downscale_factor, 1)
        _check_int("points_per_batch", points_per_batch, 1)
        if points_per_side is not None:
            _check_int("points_per_side", points_per_side, 1)
            if int(points_per_side / crop_n_points_downscale_factor**crop_n_layers) < 1:
                raise SegAnyError(
                    f"points_per_side={points_per_side} leaves no points on crop layer {crop_n_layers} "
                    f"with crop_n_points_downscale_factor={crop_n_points_downscale_factor}"
                )
            self.point_grids = build_all_layer_point_grids(points_per_side, crop_n_layers, crop_n_points_downscale_factor)
        else:
            self.point_grids = [_check_grid(i, g) for i, g in enumerate(point_grids)]
            if len(self.point_grids) < crop_n_layers + 1:
                raise SegAnyError(
                    f"point_grids has {len(self.point_grids)} grid(s) but crop_n_layers={crop_n_layers} "
                    f"needs {crop_n_layers + 1} (one per layer, the whole image first)"
                )
        for name, value in (
            ("pred_iou_thresh", pred_iou_thresh),
            ("stability_score_thresh", stability_score_thresh),
            ("box_nms_thresh", box_nms_thresh),
            ("crop_nms_thresh", crop_nms_thresh),
        ):
            if not (np.isfinite(value) and 0.0 <= value <= 1.0):
                raise SegAnyError(f"{name} must be in [0, 1], got {value!r}")
        if not (0.0 <= crop_overlap_ratio < 1.0):
            raise SegAnyError(f"crop_overlap_ratio must be in [0, 1), got {crop_overlap_ratio!r}")
        if not np.isfinite(stability_score_offset):
            raise SegAnyError(f"stability_score_offset must be finite, got {stability_score_offset!r}")
        if not (np.isfinite(min_mask_region_area) and min_mask_region_area >= 0):
            raise SegAnyError(f"min_mask_region_area must be >= 0 pixels, got {min_mask_region_area!r}")
        if output_mode not in OUTPUT_MODES:
            raise SegAnyError(f"output_mode must be one of {', '.join(OUTPUT_MODES)}; got {output_mode!r}")
        if decoder_batch is not None:
            _check_int("decoder_batch", decoder_batch, 1)
        self.points_per_batch = int(points_per_batch)
        self.pred_iou_thresh = float(pred_iou_thresh)
        self.stability_score_thresh = float(stability_score_thresh)
        self.stability_score_offset = float(stability_score_offset)
        self.box_nms_thresh = float(box_nms_thresh)
        self.crop_n_layers = int(crop_n_layers)
        self.crop_nms_thresh = float(crop_nms_thresh)
        self.crop_overlap_ratio = float(crop_overlap_ratio)
        self.crop_n_points_downscale_factor = int(crop_n_points_downscale_factor)
        self.min_mask_region_area = min_mask_region_area
        self.output_mode = output_mode
        self.exact = bool(exact)
        self.decoder_batch = decoder_batch
        sam = self.predictor.model
        self._click = ClickDecoder(sam.mask_decoder, sam.prompt_encoder)

    @property
    def model(self) -> Sam:
        return self.predictor.model

    # ------------------------------------------------------------------ public API
    @torch.inference_mode()
    def generate(
        self,
        image: np.ndarray,
        *,
        valid_mask: np.ndarray | None = None,
        image_format: str = "RGB",
        nodata: float | None = None,
        value_range: tuple[float, float] | None = None,
    ) -> list[dict[str, Any]]:
        """Masks for an image (any image :meth:`SamPredictor.set_image` accepts).

        Args:
            image: ``H x W`` or ``H x W x 1/3/4`` pixels.
            valid_mask: ``H x W`` bool, False where there is no data: no points are placed
                there and masks are clipped to the valid pixels (masks left empty are
                dropped). Default: the pixels that are not NaN/``nodata``.
            image_format, nodata, value_range: as in :meth:`SamPredictor.set_image`.

        Returns:
            one record per mask (see the module doc), best first within each crop.
        """
        prepared = prepare_image(image, image_format=image_format, nodata=nodata, value_range=value_range)
        rgb = prepared.rgb if self.model.image_format == "RGB" else prepared.rgb[..., ::-1]
        size = rgb.shape[:2]
        valid = _combine_valid(prepared.valid, valid_mask, size)
        crop_boxes, layers = generate_crop_boxes(size, self.crop_n_layers, self.crop_overlap_ratio)
        results = []
        for crop_box, layer in zip(crop_boxes, layers):
            x0, y0, x1, y1 = crop_box
            if x1 <= x0 or y1 <= y0:
                continue  # a degenerate crop of a 1-pixel-thin image
            if valid is not None and not valid[y0:y1, x0:x1].any():
                continue  # nothing to prompt: skip the encoder too
            self._set_crop(rgb[y0:y1, x0:x1])
            results.append(self._process_crop(crop_box, layer, size, valid))
        data = MaskSet.cat(results)
        if len(crop_boxes) > 1 and len(data):
            # Duplicates between crops: prefer masks from smaller crops.
            areas = box_area(torch.as_tensor(data.crop_boxes))
            scores = 1 / areas
            keep = nms(torch.as_tensor(data.boxes).float(), scores, self.crop_nms_thresh)
            data = data.take(keep)
        if len(crop_boxes) > 1:
            self.predictor.reset_image()  # it holds the last crop, which would surprise a caller
        else:
            self.predictor.valid_mask = prepared.valid
        return self._records(data, size, valid)

    @torch.inference_mode()
    def generate_from_embedding(
        self, embedding: ImageEmbedding | None = None, *, valid_mask: np.ndarray | None = None
    ) -> list[dict[str, Any]]:
        """Masks from a cached embedding (no encoder pass, and hence no crops).

        Args:
            embedding: from :meth:`SamPredictor.get_embedding` / ``compute_embeddings``;
                ``None`` uses the image or embedding the predictor already holds.
            valid_mask: ``H x W`` bool as in :meth:`generate` (default: the predictor's
                ``valid_mask`` when it holds an image).

        Example:
            >>> import numpy as np, segany
            >>> gen = AutomaticMaskGenerator(segany.build_sam("test_tiny"), points_per_side=3,
            ...                              pred_iou_thresh=0.0, stability_score_thresh=0.0)
            >>> image = np.random.default_rng(2).integers(0, 255, (30, 40, 3), np.uint8)
            >>> gen.predictor.set_image(image)
            >>> cached = gen.predictor.get_embedding()
            >>> len(gen.generate_from_embedding(cached)) == len(gen.generate(image))
            True
        """
        if embedding is not None:
            self.predictor.set_embedding(embedding)
        if not self.predictor.is_image_set:
            raise SegAnyError("generate_from_embedding needs an embedding, or a predictor with an image set")
        size = tuple(int(v) for v in self.predictor.original_size)
        valid = _combine_valid(self.predictor.valid_mask, valid_mask, size)
        if valid is not None and not valid.any():
            return []
        data = self._process_crop([0, 0, size[1], size[0]], 0, size, valid)
        return self._records(data, size, valid)

    def to_label_image(self, records: Sequence[dict[str, Any]], shape: tuple[int, int] | None = None) -> np.ndarray:
        """See :func:`records_to_label_image`."""
        return records_to_label_image(records, shape)

    def to_polygons(self, records: Sequence[dict[str, Any]]) -> list[list[list[np.ndarray]]]:
        """See :func:`records_to_polygons`."""
        return records_to_polygons(records)

    # ------------------------------------------------------------------ one crop
    def _set_crop(self, rgb: np.ndarray) -> None:
        """Encode a crop of the prepared image (no second normalisation: crops of one image
        must share its value range, and a uniform crop is legal here)."""
        p = self.predictor
        resized = p.transform.apply_image(np.ascontiguousarray(rgb))
        tensor = torch.as_tensor(resized, device=p.device).permute(2, 0, 1)[None].to(torch.float32)
        p.set_torch_image(tensor, rgb.shape[:2])

    def _process_crop(
        self, crop_box: Sequence[int], layer: int, image_size: tuple[int, int], valid: np.ndarray | None
    ) -> MaskSet:
        """All kept masks of one crop whose embedding the predictor holds (image frame)."""
        x0, y0, x1, y1 = (int(v) for v in crop_box)
        crop_size = (y1 - y0, x1 - x0)
        points = self.point_grids[layer] * np.array([[crop_size[1], crop_size[0]]], dtype=np.float64)
        valid_crop = None if valid is None else valid[y0:y1, x0:x1]
        if valid_crop is not None:
            ix = np.clip(points[:, 0].astype(np.int64), 0, crop_size[1] - 1)
            iy = np.clip(points[:, 1].astype(np.int64), 0, crop_size[0] - 1)
            points = points[valid_crop[iy, ix]]
        if len(points) == 0:
            return MaskSet.empty()
        p = self.predictor
        cache = self._click.prepare(p.features)
        resampler = None
        if not self.exact:
            low = tuple(4 * s for s in p.model.prompt_encoder.image_embedding_size)
            resampler = _WindowResampler(low, p.model.img_size, p.input_size, crop_size)
        parts = []
        for start in range(0, len(points), self.points_per_batch):
            batch = points[start : start + self.points_per_batch]
            low_res, iou, which = self._decode(cache, batch, crop_size)
            if len(iou):
                parts.append(
                    self._postprocess(low_res, iou, batch[which], crop_box, image_size, valid_crop, resampler)
                )
            del low_res
        data = MaskSet.cat(parts)
        if len(data) == 0:
            return data
        # Duplicates within the crop (boxes in the image frame: NMS is shift invariant).
        keep = nms(torch.as_tensor(data.boxes).float(), torch.as_tensor(data.iou), self.box_nms_thresh)
        return data.take(keep)

    def _decode(
        self, cache: DecoderImageCache, points: np.ndarray, crop_size: tuple[int, int]
    ) -> tuple[torch.Tensor, torch.Tensor, np.ndarray]:
        """Candidates of ``P`` points that pass the IoU filter.

        Returns:
            low-res logits ``M x 4h x 4w`` (float32), predicted IoU ``M``, and the point index
            of each, ordered point by point then token by token, as the reference.
        """
        p = self.predictor
        # float64 coordinates into the prompt encoder, exactly as the reference passes them.
        coords = torch.as_tensor(p.transform.apply_coords(points, crop_size), device=p.device)[:, None, :]
        labels = torch.ones((len(points), 1), dtype=torch.int, device=p.device)
        micro = self.decoder_batch or (CPU_DECODER_BATCH if p.device.type == "cpu" else self.points_per_batch)
        logits, ious, which = [], [], []
        with p._autocast():
            sparse_all, _ = p.model.prompt_encoder(points=(coords, labels), boxes=None, masks=None)
            for s in range(0, len(points), micro):
                sparse = sparse_all[s : s + micro]
                hs, keys = _decode_tokens(self._click, cache, sparse)
                iou = p.model.mask_decoder.iou_prediction_head(hs[:, 0, :]).float()[:, 1:]  # multimask tokens
                passed = iou > self.pred_iou_thresh if self.pred_iou_thresh > 0 else torch.ones_like(iou, dtype=torch.bool)
                needed = passed.any(dim=1)
                if not bool(needed.any()):
                    continue
                masks = _decode_masks(self._click, hs[needed], keys[needed])[:, 1:]
                keep = passed[needed]
                logits.append(masks[keep].float())
                ious.append(iou[needed][keep])
                idx = torch.arange(s, s + len(sparse), device=iou.device)[needed]
                which.append(idx[:, None].expand(-1, keep.shape[1])[keep].cpu().numpy())
        if not logits:
            low = tuple(4 * s for s in p.model.prompt_encoder.image_embedding_size)
            return torch.zeros((0, *low)), torch.zeros(0), np.zeros(0, np.int64)
        return torch.cat(logits), torch.cat(ious), np.concatenate(which)

    def _postprocess(
        self,
        low_res: torch.Tensor,
        iou: torch.Tensor,
        points: np.ndarray,
        crop_box: Sequence[int],
        image_size: tuple[int, int],
        valid_crop: np.ndarray | None,
        resampler: _WindowResampler | None,
    ) -> MaskSet:
        """Stability and edge filters, boxes and run-length codes of ``M`` candidates."""
        h, w = image_size
        x0, y0, x1, y1 = (int(v) for v in crop_box)
        thresh = np.float32(self.stability_score_thresh)  # compared in float32, as the reference
        if resampler is None:
            steps = self._exact_masks(low_res, (y1 - y0, x1 - x0))
        else:
            steps = self._window_masks(low_res.cpu().numpy(), resampler)
        kept_counts, boxes, stab, kept = [], [], [], []
        for j, score, mask_t, r0, c0 in steps:
            # mask_t: the binary mask of the crop, transposed (columns x rows), at (r0, c0).
            if self.stability_score_thresh > 0 and not score >= thresh:
                continue
            if valid_crop is not None and mask_t is not None:
                mask_t = mask_t & valid_crop[r0 : r0 + mask_t.shape[1], c0 : c0 + mask_t.shape[0]].T
            box = _box_t(mask_t, r0, c0)
            if valid_crop is not None and box is None:
                continue  # nothing left on valid pixels
            if box is None:
                box = [0, 0, 0, 0]  # an empty mask, as the reference
            box = [box[0] + x0, box[1] + y0, box[2] + x0, box[3] + y0]
            if _near_crop_edge(box, (x0, y0, x1, y1), (0, 0, w, h)):
                continue
            if mask_t is None:
                counts = np.array([h * w], dtype=np.int64)
            else:
                counts = _counts_from_columns(mask_t, y0 + r0, x0 + c0, h, w)
            kept_counts.append(counts)
            boxes.append(box)
            stab.append(score)
            kept.append(j)
        if not kept:
            return MaskSet.empty()
        kept_idx = np.asarray(kept)
        return MaskSet(
            kept_counts,
            np.asarray(boxes, dtype=np.int64),
            iou.cpu().numpy().astype(np.float32)[kept_idx],
            np.asarray(stab, dtype=np.float32),
            points[kept_idx] + np.array([[x0, y0]], dtype=np.float64),
            np.tile(np.array([[x0, y0, x1, y1]], dtype=np.int64), (len(kept), 1)),
        )

    def _exact_masks(self, low_res: torch.Tensor, crop_size: tuple[int, int]):
        """Yield ``(index, stability, mask_t, 0, 0)`` per candidate, with the reference's
        resampling (:meth:`Sam.postprocess_masks`) of whole masks, a few at a time."""
        p = self.predictor
        thr = float(self.model.mask_threshold)
        per_mask = 4 * (p.model.img_size**2 + crop_size[0] * crop_size[1])
        chunk = max(1, EXACT_CHUNK_BYTES // per_mask)
        for s in range(0, len(low_res), chunk):
            logits = p.model.postprocess_masks(low_res[s : s + chunk, None], p.input_size, crop_size)[:, 0]
            scores = stability_score(logits, thr, self.stability_score_offset).cpu().numpy()
            binary = (logits > thr).cpu().numpy()
            del logits
            for j in range(len(binary)):
                yield s + j, scores[j], binary[j].T, 0, 0

    def _window_masks(self, low_res: np.ndarray, resampler: _WindowResampler):
        """Yield ``(index, stability, mask_t, r0, c0)`` per candidate, resampled in a window."""
        thr = float(self.model.mask_threshold)
        off = self.stability_score_offset
        lowest = min(thr - off, thr, thr + off)
        uh, uw = resampler.used
        for j, x in enumerate(low_res):
            x = x[:uh, :uw]
            win = resampler.window(x > lowest)
            if win is None:
                # Nothing can exceed the lowest threshold: 0 / 0 = NaN, as the reference.
                yield j, np.float32(np.nan), None, 0, 0
                continue
            r0, r1, c0, c1 = win
            lt = resampler.logits_t(x, r0, r1, c0, c1)
            inter = np.float32(np.count_nonzero(lt > thr + off))
            union = np.float32(np.count_nonzero(lt > thr - off))
            with np.errstate(invalid="ignore", divide="ignore"):
                score = inter / union
            yield j, score, lt > thr, r0, c0

    # ------------------------------------------------------------------ records
    def _records(self, data: MaskSet, size: tuple[int, int], valid: np.ndarray | None = None) -> list[dict[str, Any]]:
        h, w = size
        if self.min_mask_region_area > 0 and len(data):
            data = self._clean_small_regions(data, size, valid)
        records = []
        for i in range(len(data)):
            counts = data.counts[i]
            if self.output_mode == "binary_mask":
                seg: Any = np.ascontiguousarray(_mask_from_counts(counts, h, w))
            elif self.output_mode == "uncompressed_rle":
                seg = {"size": [h, w], "counts": counts.tolist()}
            else:
                seg = {"size": [h, w], "counts": _encode_counts_string(counts)}
            records.append(
                {
                    "segmentation": seg,
                    "area": int(counts[1::2].sum()),
                    "bbox": box_xyxy_to_xywh(data.boxes[i]),
                    "predicted_iou": float(data.iou[i]),
                    "point_coords": [data.points[i].tolist()],
                    "stability_score": float(data.stability[i]),
                    "crop_box": box_xyxy_to_xywh(data.crop_boxes[i]),
                }
            )
        return records

    def _clean_small_regions(self, data: MaskSet, size: tuple[int, int], valid: np.ndarray | None) -> MaskSet:
        """The reference's clean-up: fill small holes, drop small islands, NMS again
        preferring unchanged masks; changed masks get new codes and boxes (and stay clipped
        to the ``valid`` pixels: a filled hole may be nodata)."""
        h, w = size
        new_counts, boxes, scores = [], [], []
        for i, counts in enumerate(data.counts):
            mask = _mask_from_counts(counts, h, w)
            mask, holes_changed = remove_small_regions(mask, self.min_mask_region_area, "holes")
            mask, islands_changed = remove_small_regions(mask, self.min_mask_region_area, "islands")
            changed = holes_changed or islands_changed
            if changed and valid is not None:
                mask = mask & valid
            if changed:
                new_counts.append(_counts_from_columns(np.asarray(mask).T, 0, 0, h, w))
                box = _box_t(np.asarray(mask).T, 0, 0)
                boxes.append(np.asarray(box if box is not None else [0, 0, 0, 0], dtype=np.int64))
            else:
                # The box of the unchanged mask (the reference recomputes it: empty -> zeros).
                new_counts.append(None)
                boxes.append(data.boxes[i] if len(counts) > 1 else np.zeros(4, np.int64))
            scores.append(0.0 if changed else 1.0)
        boxes = np.stack(boxes)
        keep = nms(torch.as_tensor(boxes).float(), torch.as_tensor(scores), max(self.box_nms_thresh, self.crop_nms_thresh))
        for i in keep.tolist():
            if new_counts[i] is not None:
                data.counts[i] = new_counts[i]
                data.boxes[i] = boxes[i]
        return data.take(keep)


# ---------------------------------------------------------------------------- records


def _record_shape(record: dict[str, Any]) -> tuple[int, int]:
    seg = record["segmentation"]
    if isinstance(seg, dict):
        return int(seg["size"][0]), int(seg["size"][1])
    return tuple(np.shape(seg))  # type: ignore[return-value]


def _record_mask(record: dict[str, Any]) -> np.ndarray:
    seg = record["segmentation"]
    if isinstance(seg, dict):
        h, w = (int(v) for v in seg["size"])
        return _mask_from_counts(_rle_counts(seg), h, w)
    return np.asarray(seg, dtype=bool)


def records_to_label_image(records: Sequence[dict[str, Any]], shape: tuple[int, int] | None = None) -> np.ndarray:
    """Instance label image ``H x W`` int32: record ``i`` is label ``i + 1``, 0 is no mask.

    Overlaps go to the record with the higher ``predicted_iou * stability_score`` (the earlier
    record on ties). Works with every ``output_mode``.

    Example:
        >>> rec = lambda m, s: {"segmentation": m, "predicted_iou": s, "stability_score": 1.0}
        >>> a = np.zeros((2, 3), bool); a[:, :2] = True
        >>> b = np.zeros((2, 3), bool); b[:, 1:] = True
        >>> records_to_label_image([rec(a, 0.9), rec(b, 0.95)]).tolist()
        [[1, 2, 2], [1, 2, 2]]
    """
    if shape is None:
        if not records:
            raise SegAnyError("records_to_label_image needs shape=(H, W) when there are no records")
        shape = _record_shape(records[0])
    scores = [float(r.get("predicted_iou", 1.0)) * float(r.get("stability_score", 1.0)) for r in records]
    return label_image((r["segmentation"] for r in records), shape, scores)


def records_to_polygons(records: Sequence[dict[str, Any]]) -> list[list[list[np.ndarray]]]:
    """Outlines of each record's mask (see :func:`segany.masks.mask_to_polygons`).

    Returns:
        per record, a list of polygons; a polygon is ``[exterior, hole, ...]`` rings of
        ``(x, y)`` pixel-corner coordinates.

    Example:
        >>> m = np.zeros((3, 3), bool); m[1, 1] = True
        >>> records_to_polygons([{"segmentation": m}])[0][0][0].tolist()
        [[1.0, 1.0], [2.0, 1.0], [2.0, 2.0], [1.0, 2.0], [1.0, 1.0]]
    """
    return [mask_to_polygons(_record_mask(r)) for r in records]


# ---------------------------------------------------------------------------- helpers


def _box_t(mask_t: np.ndarray | None, r0: int, c0: int) -> list[int] | None:
    """Inclusive XYXY box (crop frame) of a transposed mask at offset ``(r0, c0)``; None if empty."""
    if mask_t is None:
        return None
    cols = np.flatnonzero(mask_t.any(axis=1))
    if cols.size == 0:
        return None
    rows = np.flatnonzero(mask_t.any(axis=0))
    return [c0 + int(cols[0]), r0 + int(rows[0]), c0 + int(cols[-1]), r0 + int(rows[-1])]


def _near_crop_edge(box: Sequence[int], crop_box: Sequence[int], image_box: Sequence[int], atol: float = 20.0) -> bool:
    """One box of :func:`segany.masks.is_box_near_crop_edge` (same float32 arithmetic)."""
    b = np.asarray(box, dtype=np.float32)
    near_crop = np.abs(b - np.asarray(crop_box, dtype=np.float32)) <= atol
    near_image = np.abs(b - np.asarray(image_box, dtype=np.float32)) <= atol
    return bool(np.any(near_crop & ~near_image))


def _check_int(name: str, value: object, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < minimum:
        raise SegAnyError(f"{name} must be an integer >= {minimum}, got {value!r}")


def _check_grid(i: int, grid: object) -> np.ndarray:
    g = np.asarray(grid, dtype=np.float64)
    if g.ndim != 2 or g.shape[1] != 2 or len(g) == 0:
        raise SegAnyError(f"point_grids[{i}] must be a non-empty N x 2 array of (x, y), got shape {g.shape}")
    if not np.all(np.isfinite(g)) or g.min() < 0 or g.max() > 1:
        raise SegAnyError(f"point_grids[{i}] must hold coordinates normalised to [0, 1]")
    return g


def _combine_valid(image_valid: np.ndarray | None, valid_mask: object, size: tuple[int, int]) -> np.ndarray | None:
    """The image's own valid pixels AND the caller's ``valid_mask``; None when all are valid."""
    valid = image_valid
    if valid_mask is not None:
        user = np.asarray(valid_mask)
        if user.shape != tuple(size):
            raise SegAnyError(f"valid_mask has shape {user.shape}, the image is {tuple(size)} (H, W)")
        user = user.astype(bool)
        valid = user if valid is None else (valid & user)
    if valid is not None and valid.all():
        return None
    return valid
