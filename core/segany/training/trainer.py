"""The training loop: SAM's interactive training recipe on any labelled images.

One optimizer step (``grad_accum_steps`` forward passes of ``batch_size`` images):

1. draw images, augment them (:mod:`.data`), draw up to ``masks_per_image`` objects each;
2. encode the images (with gradients, or -- frozen encoder -- once per image and
   augmentation under ``no_grad``, cached);
3. simulate an interactive session per object (:mod:`.prompts`): first point or box, then
   corrective clicks and two mask-only rounds, 11 decoder passes with the previous logits fed
   back detached;
4. focal + dice + IoU-MSE losses per round (:mod:`.losses`), averaged over masks and rounds;
5. AdamW with linear warm-up and step decay, optional gradient clipping, bf16/fp16 autocast.

Every random draw of step ``s`` comes from generators seeded by ``(seed, s)``, so a run
resumed from its resume file repeats exactly what an uninterrupted run would have done.

Outputs in ``output_dir``: ``model.pt`` (latest weights, official layout), ``best.pt`` (best
validation score), their ``.json`` sidecars, ``resume.pt``, ``config.yaml``, ``log.csv``
(one line per ``log_every`` steps and per validation) and ``curves.png``.

Example (a very small custom architecture: a 1-block ViT at 64 px with SAM's decoder):
    >>> import tempfile
    >>> vit = {"encoder": "vit", "image_size": 64, "patch_size": 16, "encoder_kwargs": {
    ...     "embed_dim": 32, "depth": 1, "num_heads": 2, "global_attn_indexes": [0], "window_size": 0}}
    >>> cfg = TrainConfig.from_dict({
    ...     "model": {"config": "doc_vit_64", "architecture": vit}, "steps": 2, "rounds": 3,
    ...     "data": {"train": [{"kind": "synthetic", "count": 2, "size": 64}], "masks_per_image": 2},
    ...     "output_dir": tempfile.mkdtemp(), "log_every": 1, "progress": False, "num_threads": 1})
    >>> result = train(cfg)
    >>> result.step, sorted(p.name for p in result.output_dir.iterdir())[:4]
    (2, ['config.yaml', 'curves.png', 'log.csv', 'model.json'])
"""

from __future__ import annotations

import csv
import math
import os
import time
from collections import OrderedDict
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ..build import build_sam, resolve_device
from ..errors import SegAnyError
from ..modeling import Sam
from . import checkpointing
from .config import TrainConfig
from .data import (
    AugmentedSample,
    DataError,
    InMemory,
    LabelledImages,
    augment,
    check_source,
    open_source,
    photometric,
    sample_instances,
    _problem_message,
)
from .losses import sam_losses
from .prompts import CLICK, FIRST, Prompts, embed_sparse, error_clicks, first_prompts, round_schedule
from .validation import validate

__all__ = ["Trainer", "TrainResult", "train", "LOG_FIELDS"]

LOG_FIELDS = [
    "step", "loss", "focal", "dice", "iou_mse", "train_iou_first", "train_iou_last",
    "lr", "seconds", "val_point_miou", "val_clicks_miou", "rank", "rank_hit",
]

_PRECISION_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


@dataclass
class TrainResult:
    """What a finished (or stopped) run leaves behind.

    Attributes:
        output_dir: the run folder.
        model_path: latest weights (official layout).
        best_path: weights with the best validation score (None without validation).
        step: optimizer steps done.
        metrics: last validation metrics (``val_point_miou``, ``val_clicks_miou``).
        history: the rows written to ``log.csv``.
        seconds: wall time of this call.
    """

    output_dir: Path
    model_path: Path
    best_path: Path | None
    step: int
    metrics: dict[str, float]
    history: list[dict[str, float]] = field(default_factory=list)
    seconds: float = 0.0


def _seed_for(*values: int) -> int:
    """A 63-bit seed from integers (numpy's SeedSequence mixing; stable across runs)."""
    return int(np.random.SeedSequence([int(v) for v in values]).generate_state(1, np.uint64)[0] >> 1)


class Trainer:
    """Train (or fine-tune) a SAM model as configured by a :class:`TrainConfig`.

    Args:
        config: the run's configuration.
        train_data, val_data: optional sources replacing ``config.data.train`` / ``val``
            (any object with ``len()`` and ``[i] -> (image, labels, name)``).
        resume: continue from ``output_dir/resume.pt`` if it exists (else start afresh).
        model: an already built model to train instead of ``config.model``.
    """

    def __init__(
        self,
        config: TrainConfig,
        *,
        train_data: Sequence[LabelledImages] | None = None,
        val_data: Sequence[LabelledImages] | None = None,
        resume: bool = False,
        model: Sam | None = None,
    ) -> None:
        config.validate()
        self.config = config
        self.device = resolve_device(config.device)
        if config.deterministic:
            torch.use_deterministic_algorithms(True, warn_only=True)
        dtype = _PRECISION_DTYPES[config.precision]
        if config.precision == "fp16" and self.device.type != "cuda":
            raise SegAnyError("precision fp16 needs a CUDA device (use bf16 or fp32 on the CPU)")
        self.autocast_dtype = dtype
        self.output_dir = Path(config.output_dir)
        self.output_dir.mkdir(parents=True, exist_ok=True)

        torch.manual_seed(config.seed)  # model initialisation
        self.sam = model if model is not None else self._build_model()
        self.sam.to(self.device)
        self.image_size = self.sam.img_size
        self.mask_size = self.sam.prompt_encoder.mask_input_size[0]
        self._apply_freeze()

        self.train_sources = self._open(config.data.train, train_data, "train")
        # Per source: (grayscale, invert) probabilities; sources given as objects have none.
        specs = config.data.train if train_data is None else []
        self._photometric = [(s.grayscale, s.invert) for s in specs] or [(0.0, 0.0)] * len(self.train_sources)
        self.val_sources = [s for s, _ in self._open(config.data.val, val_data, "val")] if (config.data.val or val_data) else []
        if config.data.check:
            self._items = self._check(self.train_sources, "training")
        else:
            for s, _ in self.train_sources:
                for problem in getattr(s, "problems", []):
                    print(f"segany train: warning: {problem}")
            self._items = [(si, i) for si, (s, _) in enumerate(self.train_sources) for i in range(len(s))]
        if config.data.check and self.val_sources:
            self._check([(s, False) for s in self.val_sources], "validation")
        self._item_p = self._item_probabilities()
        # Two pools: queued steps wait on their image slots, image slots never wait, so no
        # pool can fill up with jobs that wait on jobs queued behind them.
        self._executor: ThreadPoolExecutor | None = None  # image slots
        self._step_executor: ThreadPoolExecutor | None = None  # steps prepared ahead
        self._prepared: dict[tuple[int, int], Future] = {}

        self.optimizer = self._make_optimizer()
        # A plain function (not a bound method): LambdaLR then keeps it out of its state_dict.
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, lambda step: self._lr_factor(step))
        self.scaler = torch.amp.GradScaler("cuda") if config.precision == "fp16" else None
        self._cache: OrderedDict[tuple[int, int, int], tuple[torch.Tensor, np.ndarray]] = OrderedDict()
        self._cache_bytes = 0
        self.step = 0
        self.best_score = -math.inf
        self.metrics: dict[str, float] = {}
        self.history: list[dict[str, float]] = []
        if resume:
            self._resume()

    # ------------------------------------------------------------------ set-up
    def _build_model(self) -> Sam:
        spec = self.config.model
        if spec.architecture:
            checkpointing.register_architecture(spec.config, spec.architecture)
        checkpoint = None
        if spec.checkpoint:
            from ..checkpoints import resolve_checkpoint

            checkpoint, model_type, _info = resolve_checkpoint(spec.checkpoint)
            if model_type is not None and model_type != spec.config:
                raise SegAnyError(
                    f"model.checkpoint {spec.checkpoint!r} is a {model_type!r} checkpoint but "
                    f"model.config is {spec.config!r}"
                )
        sam = build_sam(spec.config)
        if checkpoint is None:
            _init_from_scratch(sam)
        else:
            checkpointing.load_weights(sam, checkpoint)
        return sam

    def _apply_freeze(self) -> None:
        freeze = self.config.freeze
        for module, frozen in (
            (self.sam.image_encoder, freeze.image_encoder),
            (self.sam.prompt_encoder, freeze.prompt_encoder),
        ):
            for p in module.parameters():
                p.requires_grad_(not frozen)
        for name, p in self.sam.mask_decoder.named_parameters():
            p.requires_grad_(not freeze.mask_decoder or name.startswith("iou_prediction_head."))
        self._set_train_mode()

    def _set_train_mode(self) -> None:
        self.sam.train()
        if self.config.freeze.image_encoder:
            self.sam.image_encoder.eval()
        frozen_bn = self.config.freeze.batchnorm
        if frozen_bn is None:
            frozen_bn = bool(self.config.model.checkpoint)
        if frozen_bn:
            for m in self.sam.modules():
                # Batch statistics of 1-4 images are noise: BatchNorm layers (TinyViT) keep
                # the running statistics of the checkpoint.
                if isinstance(m, nn.modules.batchnorm._BatchNorm):
                    m.eval()

    def _open(self, specs, given, split) -> list[tuple[LabelledImages, bool]]:
        wrap = InMemory if self.config.data.cache_in_memory else (lambda source: source)
        if given is not None:
            return [(wrap(s), False) for s in given]
        if not specs and split == "train":
            raise SegAnyError("the configuration has no training data (data.train is empty)")
        return [(wrap(open_source(spec)), bool(spec.partial)) for spec in specs]

    def _item_probabilities(self) -> np.ndarray | None:
        """Per-item draw probabilities from the sources' weights (None: all equal)."""
        specs = self.config.data.train
        if len(specs) != len(self.train_sources) or all(s.weight == 1.0 for s in specs):
            return None
        p = np.array([specs[si].weight for si, _ in self._items], dtype=np.float64)
        return p / p.sum()

    def _check(self, sources, what: str) -> list[tuple[int, int]]:
        if self.config.data.cache_in_memory and self.config.data.workers > 0:
            # Decode every item once, in parallel, into the memory cache: the checks below
            # then read from memory (PIL decoding releases the GIL).
            with ThreadPoolExecutor(self.config.data.workers) as pool:
                for source, _partial in sources:
                    list(pool.map(lambda i, s=source: _try_read(s, i), range(len(source))))
        items: list[tuple[int, int]] = []
        errors: list[str] = []
        warnings_all: list[str] = []
        for si, (source, _partial) in enumerate(sources):
            ok, errs, warns = check_source(source, f"{what} source {si}")
            errors += errs
            warnings_all += warns
            items += [(si, i) for i in ok]
        if errors:
            # Empty label images are only skipped, but list them too: one message, all files.
            raise DataError(_problem_message(f"{what} data", errors + warnings_all))
        for w in warnings_all:
            print(f"segany train: warning: {w}")
        if not items and what == "training":
            raise DataError("training data: no image has any labelled object")
        return items

    def _make_optimizer(self) -> torch.optim.Optimizer:
        decay, no_decay = [], []
        for name, p in self.sam.named_parameters():
            if not p.requires_grad:
                continue
            # No weight decay on biases, norms, positional tables and prompt/token embeddings:
            # shrinking them towards 0 has no regularising meaning.
            if p.ndim <= 1 or "pos" in name.split(".")[-1] or name.endswith("embed.weight") or "embeddings" in name or "tokens" in name or "token." in name:
                no_decay.append(p)
            else:
                decay.append(p)
        if not decay and not no_decay:
            raise SegAnyError("every parameter is frozen: nothing to train")
        o = self.config.optim
        groups = [{"params": decay, "weight_decay": o.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
        # foreach: one fused update per parameter group (torch only picks it by default on GPUs).
        return torch.optim.AdamW([g for g in groups if g["params"]], lr=o.lr, betas=tuple(o.betas), foreach=True)

    def _lr_factor(self, step: int) -> float:
        o = self.config.optim
        warm = min(1.0, (step + 1) / o.warmup_steps) if o.warmup_steps > 0 else 1.0
        return warm * o.decay_factor ** sum(1 for s in o.decay_steps if step >= s)

    # ------------------------------------------------------------------ resume
    @property
    def resume_path(self) -> Path:
        return self.output_dir / "resume.pt"

    def _resume(self) -> None:
        if not self.resume_path.exists():
            print(f"segany train: no resume file in {self.output_dir}; starting from step 0")
            return
        state = checkpointing.load_resume(self.resume_path)
        old = state.get("config", {})
        for key in ("model", "data"):
            if old.get(key) != self.config.to_dict()[key]:
                print(f"segany train: warning: the '{key}' section differs from the resumed run's")
        self.sam.load_state_dict(state["model"], strict=True)
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        if self.scaler is not None and state.get("scaler"):
            self.scaler.load_state_dict(state["scaler"])
        self.step = int(state["step"])
        self.best_score = float(state.get("best_score", -math.inf))
        self.metrics = dict(state.get("metrics", {}))
        checkpointing.set_rng_state(state["rng"])
        self.history = [r for r in _read_log(self.output_dir / "log.csv") if r["step"] <= self.step]
        _write_log(self.output_dir / "log.csv", self.history)  # drop lines logged after the save

    def _save(self) -> None:
        extra = {"config_name": self.config.model.config}
        checkpointing.save_model(self.sam, self.output_dir / "model.pt", step=self.step, metrics=self.metrics, extra=extra)
        payload = {
            "step": self.step,
            "model": {k: v.detach().cpu() for k, v in self.sam.state_dict().items()},
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "scaler": self.scaler.state_dict() if self.scaler is not None else None,
            "rng": checkpointing.rng_state(),
            "config": self.config.to_dict(),
            "best_score": self.best_score,
            "metrics": self.metrics,
        }
        checkpointing.save_resume(self.resume_path, payload)

    # ------------------------------------------------------------------ data
    def _draw_item(self, rng: np.random.Generator) -> tuple[int, int]:
        if self._item_p is None:
            return self._items[int(rng.integers(len(self._items)))]
        return self._items[int(rng.choice(len(self._items), p=self._item_p))]

    def _draw_slot(self, step: int, micro: int, slot: int) -> tuple[AugmentedSample, np.ndarray]:
        """One image of a batch, augmented, with the object ids to train on.

        Each (step, micro-batch, slot) has its own generator, so the result is the same
        whichever thread computes it and in whichever order."""
        cfg = self.config
        rng = np.random.default_rng(_seed_for(cfg.seed, step, micro, 3, slot))
        for _ in range(50):
            si, index = self._draw_item(rng)
            sample = self._augmented(si, index, rng)
            ids = sample_instances(sample.labels, cfg.data.masks_per_image, cfg.data.min_mask_area, rng)
            if len(ids):
                return sample, ids
        raise DataError(
            f"no object of at least data.min_mask_area={cfg.data.min_mask_area} pixels "
            "found in 50 random crops; lower min_mask_area or the zoom"
        )

    def _draw_batch(self, step: int, micro: int) -> list[tuple[AugmentedSample, np.ndarray]]:
        slots = range(self.config.batch_size)
        if self._executor is None:
            return [self._draw_slot(step, micro, b) for b in slots]
        return list(self._executor.map(lambda b: self._draw_slot(step, micro, b), slots))

    def _prepared_batch(self, micro: int) -> list[tuple[AugmentedSample, np.ndarray]]:
        """This step's images; with ``data.workers``, also queue those of the next steps."""
        cfg = self.config
        if cfg.data.workers <= 0:
            return self._draw_batch(self.step, micro)
        if self._executor is None:
            self._executor = ThreadPoolExecutor(cfg.data.workers, thread_name_prefix="segany-data")
            self._step_executor = ThreadPoolExecutor(cfg.data.prefetch, thread_name_prefix="segany-step")
        key = (self.step, micro)
        future = self._prepared.pop(key, None)
        for ahead in range(1, cfg.data.prefetch + 1):
            for m in range(cfg.grad_accum_steps):
                k = (self.step + ahead, m)
                if k not in self._prepared and self.step + ahead < cfg.steps:
                    self._prepared[k] = self._step_executor.submit(self._draw_batch, *k)
        if future is None:
            return self._draw_batch(self.step, micro)
        return future.result()

    def close(self) -> None:
        """Stop the data threads (called at the end of :meth:`fit`)."""
        if self._executor is not None:
            for f in self._prepared.values():
                f.cancel()
            self._prepared.clear()
            self._step_executor.shutdown(wait=True, cancel_futures=True)
            self._executor.shutdown(wait=True, cancel_futures=True)
            self._executor = self._step_executor = None

    def _augmented(self, si: int, index: int, rng: np.random.Generator):
        source, _partial = self.train_sources[si]
        image, labels, name = source[index]
        sample = augment(image, labels, self.image_size, rng, self.config.data.augment, name=str(name))
        grayscale, invert = self._photometric[si]
        if grayscale or invert:
            sample.image = photometric(sample.image, rng, grayscale, invert)
        return sample

    def _to_input(self, image: np.ndarray) -> torch.Tensor:
        x = torch.as_tensor(np.ascontiguousarray(image), device=self.device).permute(2, 0, 1).float()
        return self.sam.preprocess(x)

    def _encode(self, inputs: list[torch.Tensor]) -> torch.Tensor:
        with self._autocast():
            return self.sam.image_encoder(torch.stack(inputs)).float()

    def _batch(self, rng: np.random.Generator, micro: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Embeddings ``B x C x g x g``, ground truth ``M x L x L`` and image index ``M``."""
        cfg = self.config
        frozen = cfg.freeze.image_encoder
        if not frozen:
            drawn = self._prepared_batch(micro)
            embeddings = self._encode([self._to_input(sample.image) for sample, _ in drawn])
            return (embeddings, *self._ground_truth([(sample.labels, ids) for sample, ids in drawn]))
        # A frozen encoder sees each image under one of a few fixed augmentations, so that
        # its embedding is computed once and then served from the cache.
        # (cache key, fresh sample or None, labels, object ids) per image.
        picked: list[tuple[Any, Any, np.ndarray, np.ndarray]] = []
        tries = 0
        while len(picked) < cfg.batch_size:
            tries += 1
            if tries > 50 * cfg.batch_size:
                raise DataError(
                    f"no object of at least data.min_mask_area={cfg.data.min_mask_area} pixels "
                    "found in 50 random crops per image; lower min_mask_area or the zoom"
                )
            si, index = self._draw_item(rng)
            key, sample = (si, index, int(rng.integers(max(1, cfg.frozen_augmentations)))), None
            if key in self._cache:
                self._cache.move_to_end(key)
                labels = self._cache[key][1]
            else:
                sample = self._augmented(si, index, np.random.default_rng(_seed_for(cfg.seed, *key)))
                labels = sample.labels
            ids = sample_instances(labels, cfg.data.masks_per_image, cfg.data.min_mask_area, rng)
            if len(ids):
                picked.append((key, sample, labels, ids))

        # dict: one encoder pass per key even if the batch drew the same key twice.
        missing = list({key: sample for key, sample, _, _ in picked if sample is not None}.items())
        if missing:
            with torch.no_grad():
                emb = self._encode([self._to_input(sample.image) for _, sample in missing])
            for (key, sample), e in zip(missing, emb):
                self._cache_put(key, e, sample.labels)
        embeddings = torch.stack([self._cache[key][0] for key, _, _, _ in picked])
        return (embeddings, *self._ground_truth([(labels, ids) for _, _, labels, ids in picked]))

    def _ground_truth(self, items: list[tuple[np.ndarray, np.ndarray]]) -> tuple[torch.Tensor, torch.Tensor]:
        """Object masks ``M x L x L`` (at the loss resolution) and their image index ``M``."""
        gts, index = [], []
        for b, (labels, ids) in enumerate(items):
            lab = torch.as_tensor(labels.astype(np.int32, copy=False), device=self.device)
            gts.append(lab[None] == torch.as_tensor(ids, device=self.device)[:, None, None])
            index += [b] * len(ids)
        gt = torch.cat(gts)
        if not self.config.loss_at_full_resolution:
            gt = _downsample_masks(gt, self.mask_size)
        return gt, torch.as_tensor(index, device=self.device)

    def _cache_put(self, key, embedding: torch.Tensor, labels: np.ndarray) -> None:
        labels = labels.astype(np.uint16) if labels.max() < 65536 else labels
        self._cache[key] = (embedding.detach(), labels)
        self._cache_bytes += embedding.numel() * embedding.element_size() + labels.nbytes
        limit = self.config.embedding_cache_mb * 1024 * 1024
        while self._cache_bytes > limit and len(self._cache) > self.config.batch_size:
            _, (e, lab) = self._cache.popitem(last=False)
            self._cache_bytes -= e.numel() * e.element_size() + lab.nbytes

    def _autocast(self):
        return torch.autocast(
            device_type=self.device.type, dtype=self.autocast_dtype,
            enabled=self.autocast_dtype is not torch.float32,
        )

    # ------------------------------------------------------------------ one step
    def _forward(self, rng: np.random.Generator, gen: torch.Generator, micro: int = 0) -> tuple[torch.Tensor, dict[str, float]]:
        """Loss of one batch: the simulated interactive sessions of every sampled object."""
        cfg = self.config
        embeddings, gt, image_index = self._batch(rng, micro)
        pe, decoder = self.sam.prompt_encoder, self.sam.mask_decoder
        emb = embeddings[image_index]
        m = gt.shape[0]
        rows = torch.arange(m, device=self.device)
        prompts: Prompts = first_prompts(gt, self.image_size, gen, cfg.box_probability)
        schedule = round_schedule(cfg.rounds, rng)
        total = torch.zeros((), device=self.device)
        sums = {"focal": 0.0, "dice": 0.0, "iou_mse": 0.0}
        previous_low: torch.Tensor | None = None
        previous_pred: torch.Tensor | None = None
        first_iou = last_iou = 0.0
        # The 1-click ranking: the ranking term and how often the top-scored candidate is the
        # best one, over this batch's single-point first prompts (what inference ranks).
        rank_sum = rank_hits = ranked = 0.0
        with self._autocast():
            dense_pe = pe.get_dense_pe()
            no_mask = pe.no_mask_embed.weight.reshape(1, -1, 1, 1).expand(m, -1, *pe.image_embedding_size)
            for kind in schedule:
                if kind == CLICK:
                    coords, labels = error_clicks(previous_pred, gt, self.image_size, gen)
                    prompts = prompts.add(coords, labels)
                sparse = embed_sparse(pe, prompts.coords, prompts.labels)
                dense = pe.mask_downscaling(previous_low) if previous_low is not None else no_mask
                low, iou = decoder.predict_masks(emb, dense_pe, sparse, dense)
                logits = low
                if cfg.loss_at_full_resolution:
                    logits = F.interpolate(low, (self.image_size, self.image_size), mode="bilinear", align_corners=False)
                if kind == FIRST:
                    # Ambiguous single points: the 3 multimask candidates; boxes: token 0.
                    multi = prompts.single_point
                    token = torch.zeros(m, dtype=torch.long, device=self.device)
                    loss_sum = torch.zeros((), device=self.device)
                    for group, cands in ((multi, slice(1, 4)), (~multi, slice(0, 1))):
                        idx = group.nonzero().squeeze(1)
                        if len(idx) == 0:
                            continue
                        out = sam_losses(logits[idx, cands], iou[idx, cands], gt[idx], cfg.loss)
                        loss_sum = loss_sum + out.total.sum()
                        _accumulate(sums, out)
                        if cands.start == 1:
                            # The paper feeds back the candidate with the highest predicted IoU.
                            token[idx] = 1 + iou[idx, 1:].detach().argmax(dim=1)
                        fed_back = out.iou_actual.gather(1, (token[idx] - cands.start)[:, None])[:, 0]
                        first_iou += float(fed_back.sum())
                        if cands.start == 1:
                            rank_hits += float((fed_back >= out.iou_actual.max(dim=1).values).sum())
                            ranked += len(idx)
                            if out.rank is not None:
                                rank_sum += float(out.rank.sum())
                    round_loss = loss_sum / m
                    first_iou /= m
                else:
                    token = torch.zeros(m, dtype=torch.long, device=self.device)
                    out = sam_losses(logits[:, :1], iou[:, :1], gt, cfg.loss)
                    round_loss = out.total.mean()
                    _accumulate(sums, out)
                    last_iou = float(out.iou_actual.mean())
                total = total + round_loss
                previous_low = low[rows, token][:, None].detach()
                previous_pred = logits[rows, token].detach() > 0
        n = len(schedule)
        parts = {k: v / (n * m) for k, v in sums.items()}
        parts["train_iou_first"] = first_iou
        parts["train_iou_last"] = last_iou if n > 1 else first_iou
        if ranked:
            parts["rank_hit"] = rank_hits / ranked
            if cfg.loss.rank:
                parts["rank"] = rank_sum / ranked
        return total / n, parts

    def train_step(self) -> dict[str, float]:
        """One optimizer step (``grad_accum_steps`` batches); returns the logged values."""
        cfg = self.config
        self.optimizer.zero_grad(set_to_none=True)
        logged: dict[str, float] = {}
        for micro in range(cfg.grad_accum_steps):
            rng = np.random.default_rng(_seed_for(cfg.seed, self.step, micro, 1))
            gen = torch.Generator(device=self.device).manual_seed(_seed_for(cfg.seed, self.step, micro, 2))
            loss, parts = self._forward(rng, gen, micro)
            loss = loss / cfg.grad_accum_steps
            if not torch.isfinite(loss):
                raise SegAnyError(
                    f"step {self.step + 1}: the loss is {float(loss)}; lower optim.lr or use fp32/bf16"
                )
            (self.scaler.scale(loss) if self.scaler is not None else loss).backward()
            logged["loss"] = logged.get("loss", 0.0) + float(loss.detach())
            for k, v in parts.items():
                logged[k] = logged.get(k, 0.0) + v / cfg.grad_accum_steps
        if self.scaler is not None:
            self.scaler.unscale_(self.optimizer)
        if cfg.optim.grad_clip:
            params = [p for g in self.optimizer.param_groups for p in g["params"]]
            torch.nn.utils.clip_grad_norm_(params, cfg.optim.grad_clip)
        logged["lr"] = self.optimizer.param_groups[0]["lr"]
        if self.scaler is not None:
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            self.optimizer.step()
        self.scheduler.step()
        self.step += 1
        return logged

    # ------------------------------------------------------------------ validation
    def validate(self) -> dict[str, float]:
        """Validation metrics now (``val_point_miou`` / ``val_clicks_miou``)."""
        if not self.val_sources:
            return {}
        v = self.config.validation
        metrics = validate(self.sam, self.val_sources, v.protocols, v.clicks, v.max_images, v.max_objects, v.min_area)
        self._set_train_mode()
        return {f"val_{k}": float(val) for k, val in metrics.items()}

    # ------------------------------------------------------------------ loop
    def fit(self, stop_at: int | None = None) -> TrainResult:
        """Train until ``config.steps`` (or ``stop_at``, to interrupt a run on purpose)."""
        threads = torch.get_num_threads()
        if self.config.num_threads:
            # On a shared, oversubscribed CPU, fewer threads than cores can be several times
            # faster (busy-waiting OpenMP workers); restored afterwards.
            torch.set_num_threads(int(self.config.num_threads))
        try:
            return self._fit(stop_at)
        finally:
            self.close()
            torch.set_num_threads(threads)

    def _fit(self, stop_at: int | None) -> TrainResult:
        from tqdm.auto import tqdm

        cfg = self.config
        started = time.perf_counter()
        end = cfg.steps if stop_at is None else min(cfg.steps, stop_at)
        cfg.to_yaml(self.output_dir / "config.yaml")
        log_path = self.output_dir / "log.csv"
        if self.step == 0 or not log_path.exists():
            _write_log(log_path, self.history)  # a new run starts a new log
        pending: dict[str, float] = {}
        count = 0
        bar = tqdm(total=cfg.steps, initial=self.step, disable=not cfg.progress, desc="segany train", unit="step")
        every = cfg.validation.every
        try:
            while self.step < end:
                logged = self.train_step()
                for k, v in logged.items():
                    pending[k] = pending.get(k, 0.0) + v
                count += 1
                out_of_time = cfg.time_limit_s is not None and time.perf_counter() - started > cfg.time_limit_s
                if out_of_time:
                    end = self.step  # stop here, as if asked to: validate, save, report
                last = self.step == cfg.steps or out_of_time
                validate_now = bool(self.val_sources) and ((every and self.step % every == 0) or last)
                if self.step % cfg.log_every == 0 or validate_now or self.step == end:
                    row = {k: v / count for k, v in pending.items()}
                    row["step"] = self.step
                    row["seconds"] = time.perf_counter() - started
                    if validate_now:
                        self.metrics = self.validate()
                        row.update(self.metrics)
                        self._maybe_best()
                        target = cfg.validation.stop_at_miou
                        if target is not None and self.metrics.get(self._score_key, -1.0) >= target:
                            end = self.step  # good enough: finish as at the end
                    self.history.append(row)
                    _append_log(log_path, row)
                    bar.set_postfix({k: f"{row[k]:.3f}" for k in ("loss", "train_iou_last", "val_point_miou") if k in row})
                    pending, count = {}, 0
                bar.update(1)
                if self.step % cfg.save_every == 0 or self.step == end:
                    self._save()
        finally:
            bar.close()
        _plot(self.history, self.output_dir / "curves.png")
        best = self.output_dir / "best.pt"
        return TrainResult(
            output_dir=self.output_dir,
            model_path=self.output_dir / "model.pt",
            best_path=best if best.exists() else None,
            step=self.step,
            metrics=dict(self.metrics),
            history=list(self.history),
            seconds=time.perf_counter() - started,
        )

    @property
    def _score_key(self) -> str:
        return f"val_{self.config.validation.protocols[0]}_miou"

    def _maybe_best(self) -> None:
        score = self.metrics.get(self._score_key)
        if score is not None and score > self.best_score:
            self.best_score = score
            checkpointing.save_model(self.sam, self.output_dir / "best.pt", step=self.step, metrics=self.metrics)


def train(
    config: TrainConfig,
    *,
    resume: bool = False,
    train_data: Sequence[LabelledImages] | None = None,
    val_data: Sequence[LabelledImages] | None = None,
    stop_at: int | None = None,
) -> TrainResult:
    """Run a whole training as configured (see :class:`Trainer` for the arguments)."""
    return Trainer(config, train_data=train_data, val_data=val_data, resume=resume).fit(stop_at=stop_at)


# --------------------------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------------------------


def _init_from_scratch(sam: Sam, mimetic: bool = True) -> None:
    """Initialisation for training without a checkpoint.

    * SAM's ViT creates its absolute position embedding as zeros (every official model
      starts from MAE weights); from scratch, a small random table breaks the symmetry
      between patches, as in the ViT/MAE recipes.
    * ``mimetic``: attention layers start with equal query and key projections, so that
      ``W_q^T W_k`` is positive semi-definite and similar tokens already attend to each other
      ("mimetic initialisation", Trockman & Kolter, 2023, which makes small transformers
      trained from scratch learn much faster). For SAM this matters most in the decoder,
      whose prompt tokens must find the image positions with the same positional encoding
      (both use the prompt encoder's random Fourier features).
    """
    pos = getattr(sam.image_encoder, "pos_embed", None)
    with torch.no_grad():
        if isinstance(pos, torch.Tensor):
            nn.init.trunc_normal_(pos, std=0.02)
        if not mimetic:
            return
        for module in sam.modules():
            if hasattr(module, "q_proj") and hasattr(module, "k_proj"):
                module.k_proj.weight.copy_(module.q_proj.weight)
            elif hasattr(module, "qkv") and isinstance(module.qkv, nn.Linear):
                dim = module.qkv.out_features // 3
                module.qkv.weight[dim : 2 * dim].copy_(module.qkv.weight[:dim])


def _try_read(source: LabelledImages, index: int) -> None:
    """Read one item to warm a cache; its errors are reported by the checks that follow."""
    try:
        source[index]
    except Exception:  # noqa: BLE001 - check_source reports each bad file with its reason
        pass


def _downsample_masks(masks: torch.Tensor, size: int) -> torch.Tensor:
    """``M x S x S`` bool -> ``M x size x size``: area fraction > 0.5, or > 0 for objects
    that would otherwise vanish (tiny objects keep at least one pixel)."""
    if masks.shape[-1] == size:
        return masks
    frac = F.interpolate(masks[:, None].float(), size=(size, size), mode="area")[:, 0]
    out = frac > 0.5
    empty = ~out.flatten(1).any(dim=1)
    if empty.any():
        out[empty] = frac[empty] > 0
    return out


def _accumulate(sums: dict[str, float], out) -> None:
    sums["focal"] += float(out.focal.sum())
    sums["dice"] += float(out.dice.sum())
    sums["iou_mse"] += float(out.iou.sum())


def _write_log(path: Path, rows: list[dict[str, float]]) -> None:
    def write(f):
        import io

        text = io.StringIO()
        writer = csv.DictWriter(text, LOG_FIELDS, extrasaction="ignore")
        writer.writeheader()
        for row in rows:
            writer.writerow(row)
        f.write(text.getvalue().encode())

    checkpointing.atomic_write(path, write)


def _append_log(path: Path, row: dict[str, float]) -> None:
    with open(path, "a", newline="") as f:
        csv.DictWriter(f, LOG_FIELDS, extrasaction="ignore").writerow(row)


def _read_log(path: Path) -> list[dict[str, float]]:
    if not path.exists():
        return []
    rows = []
    with open(path, newline="") as f:
        for row in csv.DictReader(f):
            rows.append({k: float(v) for k, v in row.items() if v not in (None, "")})
    return rows


def _plot(history: list[dict[str, float]], path: Path) -> None:
    """Learning curves: losses (left) and train/validation IoU (right)."""
    if not history:
        return
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt
    from matplotlib.figure import Figure

    del plt  # the object-oriented Figure API needs no global pyplot state
    fig = Figure(figsize=(10, 4))
    ax_loss, ax_iou = fig.subplots(1, 2)
    steps = [r["step"] for r in history]
    for key in ("loss", "dice", "iou_mse"):
        ys = [r.get(key, math.nan) for r in history]
        ax_loss.plot(steps, ys, label=key)
    ax_loss.set_yscale("log")
    ax_loss.set_xlabel("step")
    ax_loss.set_title("training loss")
    ax_loss.legend()
    for key in ("train_iou_first", "train_iou_last", "rank_hit"):
        ax_iou.plot(steps, [r.get(key, math.nan) for r in history], label=key, alpha=0.6)
    for key in ("val_point_miou", "val_clicks_miou"):
        pts = [(r["step"], r[key]) for r in history if key in r]
        if pts:
            ax_iou.plot(*zip(*pts), marker="o", label=key)
    ax_iou.set_ylim(0, 1)
    ax_iou.set_xlabel("step")
    ax_iou.set_title("IoU")
    ax_iou.legend()
    fig.tight_layout()
    tmp = path.with_name(f".{path.name}.tmp.png")
    fig.savefig(tmp, dpi=90)
    os.replace(tmp, path)
