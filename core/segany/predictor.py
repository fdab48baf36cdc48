"""``SamPredictor``: compute an image embedding once, then decode prompts in milliseconds.

A drop-in for the reference ``segment_anything.SamPredictor`` (same methods, arguments and
return shapes) that also:

* accepts grey/RGB/RGBA images of any integer or float type, with NaN/nodata
  (see :mod:`segany.image` for the normalisation rules);
* decodes many prompts in one call (``B`` boxes, ``B`` point sets, points together with
  boxes) and returns ``B x C x H x W`` masks, in memory-bounded chunks;
* exports and re-imports embeddings (:class:`ImageEmbedding`) so that caches and tiles
  can skip the encoder;
* encodes several images in one batch (:meth:`SamPredictor.compute_embeddings`);
* runs the encoder under bf16/fp16 autocast and optionally ``torch.compile`` on a GPU;
* validates every prompt and raises :class:`~segany.errors.PromptError` with the reason.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch

from .errors import ImageError, PromptError, SegAnyError
from .image import prepare_image
from .modeling import Sam
from .modeling.click_decoder import ClickDecoder, DecoderImageCache
from .resample import MaskUpsampler
from .transforms import ResizeLongestSide

_PRECISIONS = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
# Prompts decoded per forward pass in batched predict(): bounds the memory of the
# full-resolution logits (chunk x 3 x H x W floats) while keeping the decoder busy.
DEFAULT_PROMPT_CHUNK = 64


@dataclass
class ImageEmbedding:
    """An encoded image, enough to decode prompts without the encoder.

    Attributes:
        features: ``1 x 256 x 64 x 64`` float tensor.
        original_size: ``(H, W)`` of the image the prompts refer to.
        input_size: ``(h, w)`` of the resized image inside the padded model input.
        model_type: name of the model configuration that produced it (checked on reuse).
    """

    features: torch.Tensor
    original_size: tuple[int, int]
    input_size: tuple[int, int]
    model_type: str | None = None


class SamPredictor:
    """Promptable segmentation of one image at a time.

    Example:
        >>> import numpy as np, segany
        >>> predictor = segany.SamPredictor(segany.build_sam("test_tiny"))
        >>> predictor.set_image(np.random.randint(0, 255, (120, 160, 3), np.uint8))
        >>> masks, scores, logits = predictor.predict(
        ...     point_coords=np.array([[80, 60]]), point_labels=np.array([1]))
        >>> masks.shape, scores.shape, logits.shape
        ((3, 120, 160), (3,), (3, 256, 256))
    """

    def __init__(
        self,
        sam_model: Sam,
        *,
        precision: str = "fp32",
        compile: bool = False,
        prompt_chunk: int = DEFAULT_PROMPT_CHUNK,
    ) -> None:
        """Args:
        sam_model: a model from :func:`segany.build_sam` / :func:`segany.load_model`.
        precision: ``"fp32"`` (exact), ``"bf16"`` or ``"fp16"`` autocast for the encoder
            and decoder (fp16 only on a GPU).
        compile: wrap the image encoder in ``torch.compile`` (worth it for many images).
        prompt_chunk: prompts decoded per pass in batched :meth:`predict`.
        """
        if precision not in _PRECISIONS:
            raise SegAnyError(f"precision must be one of {sorted(_PRECISIONS)}, got {precision!r}")
        if precision == "fp16" and sam_model.device.type == "cpu":
            raise SegAnyError("fp16 autocast needs a GPU; use 'bf16' or 'fp32' on the CPU")
        self.model = sam_model
        self.precision = precision
        self.prompt_chunk = max(1, int(prompt_chunk))
        self.transform = ResizeLongestSide(sam_model.img_size)
        self._encoder = torch.compile(sam_model.image_encoder) if compile else sam_model.image_encoder
        self._click_decoder = ClickDecoder(sam_model.mask_decoder, sam_model.prompt_encoder)
        # Built for the current sizes on first use; kept across images of the same size.
        self._upsampler: MaskUpsampler | None = None
        self.reset_image()

    # ------------------------------------------------------------------ state
    @property
    def device(self) -> torch.device:
        return self.model.device

    def reset_image(self) -> None:
        """Forget the current image and its embedding."""
        self.is_image_set = False
        self.features: torch.Tensor | None = None
        self.orig_h = self.orig_w = self.input_h = self.input_w = None
        self.original_size: tuple[int, int] | None = None
        self.input_size: tuple[int, int] | None = None
        self.valid_mask: np.ndarray | None = None
        self._decoder_cache: DecoderImageCache | None = None

    def _upsample(self, low_res: torch.Tensor) -> torch.Tensor:
        """``Sam.postprocess_masks`` as two banded resamplings (segany.resample): equal up to
        float rounding, without the 1024 x 1024 intermediate."""
        key = (tuple(low_res.shape[-2:]), self.model.img_size, self.input_size, self.original_size)
        upsampler = self._upsampler
        if upsampler is None or upsampler.key != key or upsampler.row_index.device != low_res.device:
            upsampler = self._upsampler = MaskUpsampler(*key, device=low_res.device)
        return upsampler(low_res)

    def _autocast(self):
        dtype = _PRECISIONS[self.precision]
        return torch.autocast(
            device_type=self.device.type, dtype=dtype, enabled=dtype is not torch.float32
        )

    # ------------------------------------------------------------------ images
    def _to_model_input(self, rgb: np.ndarray) -> torch.Tensor:
        """``H x W x 3`` uint8 -> resized ``1 x 3 x h x w`` float tensor on the device."""
        resized = self.transform.apply_image(rgb)
        tensor = torch.as_tensor(resized, device=self.device).permute(2, 0, 1)[None]
        return tensor.to(torch.float32)

    def set_image(
        self,
        image: np.ndarray,
        image_format: str = "RGB",
        *,
        nodata: float | None = None,
        value_range: tuple[float, float] | None = None,
    ) -> None:
        """Encode an image; prompts of later :meth:`predict` calls refer to it.

        Args:
            image: ``H x W`` or ``H x W x 1/3/4``, uint8/uint16/int/float/bool.
            image_format: ``"RGB"`` or ``"BGR"``.
            nodata: value of missing pixels (NaN is always missing).
            value_range: intensity range mapped to 0-255 for non-uint8 images.
        """
        prepared = prepare_image(image, image_format=image_format, nodata=nodata, value_range=value_range)
        # The model's own channel order (all official models are RGB).
        rgb = prepared.rgb if self.model.image_format == "RGB" else prepared.rgb[..., ::-1]
        self.set_torch_image(self._to_model_input(rgb), rgb.shape[:2])
        self.valid_mask = prepared.valid

    @torch.no_grad()
    def set_torch_image(self, transformed_image: torch.Tensor, original_image_size: tuple[int, ...]) -> None:
        """Encode an already resized ``1 x 3 x h x w`` tensor (long side = model size).

        Args:
            transformed_image: 0-255 float pixels, e.g. from ``transform.apply_image_torch``.
            original_image_size: ``(H, W)`` of the image before resizing.
        """
        if transformed_image.ndim != 4 or transformed_image.shape[1] != 3 or transformed_image.shape[0] != 1:
            raise ImageError(
                f"set_torch_image expects a 1 x 3 x h x w tensor, got shape {tuple(transformed_image.shape)}"
            )
        if max(transformed_image.shape[2:]) != self.model.img_size:
            raise ImageError(
                f"set_torch_image expects the long side resized to {self.model.img_size}, "
                f"got {tuple(transformed_image.shape[2:])}; use predictor.transform.apply_image_torch"
            )
        self.reset_image()
        self.original_size = (int(original_image_size[0]), int(original_image_size[1]))
        self.input_size = (int(transformed_image.shape[2]), int(transformed_image.shape[3]))
        self.orig_h, self.orig_w = self.original_size
        self.input_h, self.input_w = self.input_size
        self.features = self._encode(transformed_image.to(self.device))
        self.is_image_set = True

    def _encode(self, batch: torch.Tensor) -> torch.Tensor:
        """Normalised, padded encoder pass: ``B x 3 x h x w`` -> ``B x 256 x 64 x 64`` float32."""
        with torch.inference_mode(), self._autocast():
            features = self._encoder(self.model.preprocess(batch))
        return features.float()

    def compute_embeddings(
        self,
        images: Sequence[np.ndarray],
        image_format: str = "RGB",
        batch_size: int = 4,
    ) -> list[ImageEmbedding]:
        """Encode several images, ``batch_size`` at a time through the encoder.

        Does not change the current image. Use :meth:`set_embedding` to prompt one of them.

        Example:
            >>> import segany
            >>> p = SamPredictor(segany.build_sam("test_tiny"))
            >>> imgs = [np.random.randint(0, 255, (60, 80, 3), np.uint8) for _ in range(3)]
            >>> [e.original_size for e in p.compute_embeddings(imgs, batch_size=2)]
            [(60, 80), (60, 80), (60, 80)]
        """
        results: list[ImageEmbedding] = []
        for start in range(0, len(images), batch_size):
            chunk = images[start : start + batch_size]
            inputs, sizes = [], []
            for i, image in enumerate(chunk):
                prepared = prepare_image(image, image_format=image_format, name=f"images[{start + i}]")
                tensor = self._to_model_input(prepared.rgb)
                sizes.append((prepared.rgb.shape[:2], tuple(tensor.shape[2:])))
                inputs.append(self.model.preprocess(tensor)[0])
            with torch.inference_mode(), self._autocast():
                features = self._encoder(torch.stack(inputs)).float()
            for feat, (orig, inp) in zip(features, sizes):
                results.append(
                    ImageEmbedding(
                        feat[None].clone(), (int(orig[0]), int(orig[1])), (int(inp[0]), int(inp[1])),
                        getattr(self.model, "model_type", None),
                    )
                )
        return results

    def get_image_embedding(self) -> torch.Tensor:
        """The current embedding, ``1 x 256 x 64 x 64``."""
        self._require_image()
        return self.features

    def get_embedding(self) -> ImageEmbedding:
        """The current embedding with the sizes needed to reuse it (for caches)."""
        self._require_image()
        return ImageEmbedding(
            self.features, self.original_size, self.input_size, getattr(self.model, "model_type", None)
        )

    def set_embedding(
        self,
        embedding: ImageEmbedding | torch.Tensor,
        original_size: tuple[int, int] | None = None,
    ) -> None:
        """Use a previously computed embedding instead of running the encoder.

        Args:
            embedding: an :class:`ImageEmbedding`, or a bare ``1 x 256 x 64 x 64`` tensor
                together with ``original_size``.
            original_size: ``(H, W)`` of the image (only with a bare tensor).
        """
        if isinstance(embedding, torch.Tensor):
            if original_size is None:
                raise SegAnyError("set_embedding with a bare tensor needs original_size=(H, W)")
            from .transforms import preprocess_shape

            size = (int(original_size[0]), int(original_size[1]))
            embedding = ImageEmbedding(embedding, size, preprocess_shape(*size, self.model.img_size))
        expected = (
            self.model.prompt_encoder.embed_dim,
            *self.model.prompt_encoder.image_embedding_size,
        )
        features = embedding.features
        if features.ndim == 3:
            features = features[None]
        if features.ndim != 4 or tuple(features.shape[1:]) != expected or features.shape[0] != 1:
            raise SegAnyError(
                f"embedding has shape {tuple(embedding.features.shape)}; this model needs 1 x "
                f"{expected[0]} x {expected[1]} x {expected[2]}"
            )
        model_type = getattr(self.model, "model_type", None)
        if embedding.model_type and model_type and embedding.model_type != model_type:
            raise SegAnyError(
                f"embedding was computed by model {embedding.model_type!r} but the predictor "
                f"holds {model_type!r}; recompute it"
            )
        self.reset_image()
        self.features = features.to(self.device, torch.float32)
        self.original_size = tuple(int(v) for v in embedding.original_size)  # type: ignore[assignment]
        self.input_size = tuple(int(v) for v in embedding.input_size)  # type: ignore[assignment]
        self.orig_h, self.orig_w = self.original_size
        self.input_h, self.input_w = self.input_size
        self.is_image_set = True

    def _require_image(self) -> None:
        if not self.is_image_set:
            raise SegAnyError("no image is set: call set_image(...) or set_embedding(...) first")

    # ------------------------------------------------------------------ prompts
    def _check_points(self, coords: object, labels: object) -> tuple[np.ndarray, np.ndarray, bool]:
        """Validate points: ``(N x 2, N)`` or batched ``(B x N x 2, B x N)``."""
        if labels is None:
            raise PromptError("point_coords were given without point_labels (1 = foreground, 0 = background)")
        coords = np.asarray(coords, dtype=np.float64)
        labels = np.asarray(labels)
        batched = coords.ndim == 3
        if coords.ndim not in (2, 3) or coords.shape[-1] != 2:
            raise PromptError(f"point_coords must be N x 2 (x, y) or B x N x 2, got shape {coords.shape}")
        if labels.shape != coords.shape[:-1]:
            raise PromptError(
                f"point_labels has shape {labels.shape} but point_coords has {coords.shape[:-1]} points"
            )
        if coords.shape[-2] == 0:
            raise PromptError("point_coords is empty; pass None for no points")
        if not np.all(np.isfinite(coords)):
            raise PromptError("point_coords contains NaN or infinite values")
        bad_labels = np.setdiff1d(np.unique(labels), [0, 1])
        if bad_labels.size:
            raise PromptError(
                f"point_labels must be 1 (foreground) or 0 (background); got {bad_labels.tolist()}"
            )
        h, w = self.original_size
        outside = (coords[..., 0] < 0) | (coords[..., 0] > w) | (coords[..., 1] < 0) | (coords[..., 1] > h)
        if outside.any():
            x, y = coords[outside][0]
            raise PromptError(
                f"point ({x:g}, {y:g}) lies outside the image (width {w}, height {h}); "
                "coordinates are (x, y) in pixels"
            )
        return coords, labels.astype(np.int64), batched

    def _check_boxes(self, box: object) -> tuple[np.ndarray, bool]:
        """Validate boxes ``4`` or ``B x 4`` (x0, y0, x1, y1); clip them to the image."""
        box = np.asarray(box, dtype=np.float64)
        batched = box.ndim == 2
        if box.shape[-1:] != (4,) or box.ndim not in (1, 2):
            raise PromptError(f"box must be [x0, y0, x1, y1] or B x 4, got shape {box.shape}")
        boxes = box.reshape(-1, 4)
        if len(boxes) == 0:
            raise PromptError("box is empty; pass None for no box")
        if not np.all(np.isfinite(boxes)):
            raise PromptError("box contains NaN or infinite values")
        if np.any(boxes[:, 2] < boxes[:, 0]) or np.any(boxes[:, 3] < boxes[:, 1]):
            i = int(np.flatnonzero((boxes[:, 2] < boxes[:, 0]) | (boxes[:, 3] < boxes[:, 1]))[0])
            raise PromptError(f"box {boxes[i].tolist()} has x1 < x0 or y1 < y0; boxes are [x0, y0, x1, y1]")
        h, w = self.original_size
        disjoint = (boxes[:, 2] < 0) | (boxes[:, 0] > w) | (boxes[:, 3] < 0) | (boxes[:, 1] > h)
        if disjoint.any():
            i = int(np.flatnonzero(disjoint)[0])
            raise PromptError(f"box {boxes[i].tolist()} lies outside the image (width {w}, height {h})")
        # A detector box that spills over the border still means the part inside.
        boxes = boxes.copy()
        boxes[:, [0, 2]] = boxes[:, [0, 2]].clip(0, w)
        boxes[:, [1, 3]] = boxes[:, [1, 3]].clip(0, h)
        return boxes, batched

    def _check_mask_input(self, mask_input: object) -> tuple[np.ndarray, bool]:
        mask = np.asarray(mask_input, dtype=np.float32)
        size = self.model.prompt_encoder.mask_input_size
        if mask.ndim == 2:
            mask = mask[None]
        batched = mask.ndim == 4
        if mask.shape[-2:] != tuple(size) or mask.ndim not in (3, 4) or mask.shape[-3] != 1:
            raise PromptError(
                f"mask_input must be 1 x {size[0]} x {size[1]} low-resolution logits (the third "
                f"output of a previous predict), or B x 1 x {size[0]} x {size[1]}; got shape {mask.shape}"
            )
        if not np.all(np.isfinite(mask)):
            raise PromptError("mask_input contains NaN or infinite values")
        return mask.reshape(-1, 1, *size), batched

    def predict(
        self,
        point_coords: np.ndarray | None = None,
        point_labels: np.ndarray | None = None,
        box: np.ndarray | None = None,
        mask_input: np.ndarray | None = None,
        multimask_output: bool = True,
        return_logits: bool = False,
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Masks for prompts on the current image, in original image pixels.

        Args:
            point_coords: ``N x 2`` (x, y) or ``B x N x 2`` for ``B`` prompts.
            point_labels: ``N`` or ``B x N``; 1 foreground, 0 background.
            box: ``[x0, y0, x1, y1]`` or ``B x 4`` (one object per box).
            mask_input: ``1 x 256 x 256`` previous logits, or ``B x 1 x 256 x 256``.
            multimask_output: 3 candidates (for ambiguous prompts) instead of 1.
            return_logits: float logits instead of boolean masks.

        Returns:
            ``(masks, iou_predictions, low_res_logits)`` shaped ``C x H x W``, ``C``,
            ``C x 256 x 256`` for one prompt, with a leading ``B`` when any input is batched.
            Unbatched points are shared by all boxes of a batched ``box`` (and vice versa).
        """
        self._require_image()
        pieces: dict[str, np.ndarray] = {}
        batched = False
        if point_coords is not None:
            coords, labels, b = self._check_points(point_coords, point_labels)
            coords = self.transform.apply_coords(coords, self.original_size)
            pieces["coords"] = coords if b else coords[None]
            pieces["labels"] = labels if b else labels[None]
            batched |= b
        elif point_labels is not None:
            raise PromptError("point_labels were given without point_coords")
        if box is not None:
            boxes, b = self._check_boxes(box)
            pieces["boxes"] = self.transform.apply_boxes(boxes, self.original_size)
            batched |= b
        if mask_input is not None:
            masks, b = self._check_mask_input(mask_input)
            pieces["masks"] = masks
            batched |= b
        sizes = {len(v) for v in pieces.values()}
        if len(sizes - {1}) > 1:
            raise PromptError(
                "batched prompts disagree on the batch size: "
                + ", ".join(f"{k} {len(v)}" for k, v in pieces.items())
            )
        batch = max(sizes) if sizes else 1

        def tensor(key: str, dtype: torch.dtype, start: int, stop: int) -> torch.Tensor | None:
            if key not in pieces:
                return None
            value = torch.as_tensor(pieces[key], dtype=dtype, device=self.device)
            if value.shape[0] == 1:
                return value.expand(stop - start, *value.shape[1:])
            return value[start:stop]

        outputs: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = []
        for start in range(0, batch, self.prompt_chunk):
            stop = min(batch, start + self.prompt_chunk)
            outputs.append(
                self.predict_torch(
                    tensor("coords", torch.float32, start, stop),
                    tensor("labels", torch.int64, start, stop),
                    boxes=tensor("boxes", torch.float32, start, stop),
                    mask_input=tensor("masks", torch.float32, start, stop),
                    multimask_output=multimask_output,
                    return_logits=return_logits,
                )
            )
        masks = np.concatenate([o[0].cpu().numpy() for o in outputs])
        iou = np.concatenate([o[1].float().cpu().numpy() for o in outputs])
        low_res = np.concatenate([o[2].float().cpu().numpy() for o in outputs])
        if not batched:
            return masks[0], iou[0], low_res[0]
        return masks, iou, low_res

    @torch.no_grad()
    def predict_torch(
        self,
        point_coords: torch.Tensor | None,
        point_labels: torch.Tensor | None,
        boxes: torch.Tensor | None = None,
        mask_input: torch.Tensor | None = None,
        multimask_output: bool = True,
        return_logits: bool = False,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Batched prediction with inputs already in the model's 1024 frame (reference API).

        Args:
            point_coords: ``B x N x 2``; point_labels: ``B x N``; boxes: ``B x 4``;
            mask_input: ``B x 1 x 256 x 256``.

        Returns:
            masks ``B x C x H x W`` (bool unless ``return_logits``), IoU ``B x C``,
            low-res logits ``B x C x 256 x 256``.
        """
        self._require_image()
        points = (point_coords, point_labels) if point_coords is not None else None
        with self._autocast():
            sparse, dense = self.model.prompt_encoder(points=points, boxes=boxes, masks=mask_input)
            if mask_input is None:
                # Same decoder, evaluated with the image-side work cached (see click_decoder).
                if self._decoder_cache is None:
                    self._decoder_cache = self._click_decoder.prepare(self.features)
                all_masks, all_iou = self._click_decoder.decode(self._decoder_cache, sparse)
                selected = slice(1, None) if multimask_output else slice(0, 1)
                low_res, iou = all_masks[:, selected], all_iou[:, selected]
            else:
                low_res, iou = self.model.mask_decoder(
                    image_embeddings=self.features,
                    image_pe=self.model.prompt_encoder.get_dense_pe(),
                    sparse_prompt_embeddings=sparse,
                    dense_prompt_embeddings=dense,
                    multimask_output=multimask_output,
                )
        low_res = low_res.float()
        masks = self._upsample(low_res)
        if not return_logits:
            masks = masks > self.model.mask_threshold
        return masks, iou.float(), low_res
