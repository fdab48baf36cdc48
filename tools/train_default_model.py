#!/usr/bin/env python3
"""Train segany's own default model from the shared data: the whole recipe, one command.

    .venv/bin/python tools/train_default_model.py all --data ../shared/data/train --work runs/default_model
    make default-model                       # the same, with the defaults above

Stages (each resumable; ``all`` runs them in order and skips what is done):

``split``     fixed held-out splits, never trained on: microscopy = ``dsb2018_stage1_test``,
              aerial = regions 2 (Kampala) and 4 (Philippines), natural = the last 26
              images of coco128 by name. The rest is linked into ``WORK/splits/train``.
              ``--pack DIR`` also writes a compact copy (JPEG images, PNG labels) for
              moving the training set to an accelerator machine.
``warmup``    80 steps from scratch on the easiest data (nuclei, synthetic cells) at 256 px:
              it gets the fresh model past "background everywhere" (see cmd_warmup).
``stage1``    pre-training on all training images plus procedural scenes at 256 px (zooms
              up to 4x show objects at their 1024 px size), single prompts (a point or a
              noisy box per object).
``engine``    one data-engine round: the stage-1 model labels the aerial and natural
              training images automatically (confident, stable masks, NMS); the
              pseudo-labels complete the human labels only where nothing is labelled
              (OpenStreetMap misses buildings).
``stage2``    continued training from stage 1 on the completed labels at 512 px, with the
              SAM paper's simulated interactive sessions (6 rounds: corrective clicks from
              the error region, previous logits fed back as mask input).
``stage3``    decoder calibration at the full 1024 px input (64 x 64 embedding, as at
              inference), with the encoder frozen and its embeddings cached: the mask
              decoder's attention and IoU head were trained on 16 x 16 and 32 x 32 grids
              (cheap inputs) and must rank candidates on 64 x 64 ones.
``stage4``    the whole model (encoder included) at 1024 px with photometric augmentation
              of the microscopy sources (grey, inverted): bright-field and stained images
              (dark nuclei on a bright background) are 19 % of the microscopy training
              images and the model segmented them worst (held-out 1-click 0.05 there).
              Measured (docs/model-card.md): 12 of 15 held-out figures up; bright-field
              itself only 0.046 -> 0.059.
``stage5``    stage 4 continued (whole model, 1024 px, same photometric augmentation, 700
              steps) with the bright-field and stained microscopy images drawn about 4x as
              often: a linked subset of them (mean grey level above 100: dark nuclei on a
              bright background) is added as one more source (``WORK/brightfield``).
              Measured: 13 of 15 held-out figures up, bright-field 1-click 0.059 -> 0.098;
              the shipped weights.
``stage6``    optional, not part of ``all``: the decoder learns to rank its 3 candidates
              while its masks keep training: encoder frozen (embeddings cached), the mask
              losses plus the pairwise ranking term, mostly single clicks, zooms out to 0.5
              (held-out nuclei are smaller at the model's scale than training ones); starts
              from stage 5, on its data. Measured (docs/model-card.md): oracle and box up
              everywhere, top-ranked single click flat, 3 and 5 clicks down 0.01-0.04; not
              shipped.
``stage7``    optional, not part of ``all``: stage 5 continued with stage 6's ranking term and
              zoom-out, the encoder training too (600 steps at 1024 px); a whole-model step
              costs only about 1.2x a decoder-only one on the CPU. Result: docs/model-card.md.
``scores``    optional, not part of ``all``: score calibration, only the IoU prediction head
              trains (everything else frozen, embeddings cached), so masks stay exactly as
              the previous stage made them and only the predicted IoU learns (it ranks the 3
              candidates of a click), by MSE plus a pairwise ranking term; starts from stage
              5, on stage 5's data. Tried on stage 3 (MSE): +0.014 microscopy 1-click (top);
              on stage 5 (MSE: -0.009 there; MSE + ranking: -0.012); none shipped
              (docs/model-card.md): the frozen decoder's IoU token does not carry what ranks
              bright-field candidates.
``ranking``   optional diagnosis: how --weights ranks the 3 candidates of a centre click on
              the training (``--split train``) or held-out images: top-ranked against best
              candidate, and each candidate's mean true and predicted IoU.
``export``    fp16 weights into ``core/segany/weights/`` (shipped in the wheel) and their
              size and sha256 for the checkpoint registry.
``evaluate``  the held-out splits, per domain, with segany's evaluation protocols, next to
              the classical single-click baseline (Otsu in a window around the click):
              ``WORK/evaluation.json`` and a Markdown table for the model card (microscopy
              also split into bright-field and fluorescence images).

Compute: on the CPU, bf16 autocast where the CPU has bf16 instructions (AVX512-BF16 or
AMX: about 3x faster convolutions), else fp32 (bf16 emulated is 2x slower than fp32);
with ``--device cuda``, bf16 on the GPU. Stop and continue with the same command: the trainer
resumes from ``resume.pt``; ``--time-limit`` bounds one call of a training stage. The run
record of the shipped weights is in docs/model-card.md.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import re
import shutil
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "core"))

MODEL_NAME = "segany_lite"
MODEL_CONFIG = "segany_lite"  # ConvNeXt encoder + SAM prompt encoder and decoder (segany.build)
WEIGHTS_DIR = ROOT / "core" / "segany" / "weights"

# Held-out splits: never trained on (the model card reports on them).
AERIAL_HELDOUT_REGIONS = ("region2_", "region4_")
NATURAL_HELDOUT_COUNT = 26  # the last 26 of the 126 coco128 images by name

DOMAINS = {
    "microscopy": "microscopy/dsb2018_stage1_train",
    "aerial": "aerial/hotosm_fair_oam_osm",
    "natural": "natural/coco128_seg",
}
HELDOUT_MICROSCOPY = "microscopy/dsb2018_stage1_test"
ENGINE_DOMAINS = ("aerial",)  # pseudo-labelled by the data-engine round


# --------------------------------------------------------------------------------------------
# split
# --------------------------------------------------------------------------------------------


def split_names(domain: str, names: list[str]) -> tuple[list[str], list[str]]:
    """(train, held-out) stems of one dataset; fixed rules, independent of any seed."""
    names = sorted(names)
    if domain == "aerial":
        held = [n for n in names if n.startswith(AERIAL_HELDOUT_REGIONS)]
    elif domain == "natural":
        held = names[-NATURAL_HELDOUT_COUNT:]
    else:
        held = []
    return [n for n in names if n not in held], held


def _stems(folder: Path) -> dict[str, Path]:
    return {p.stem: p for p in sorted(folder.iterdir()) if p.is_file() and not p.name.startswith(".")}


def _place(src: Path, dst: Path, pack: bool, is_label: bool) -> None:
    if dst.exists():
        return
    dst.parent.mkdir(parents=True, exist_ok=True)
    if not pack:
        os.symlink(src.resolve(), dst)
        return
    from PIL import Image

    tmp = dst.with_name(f".{dst.name}.tmp")
    if is_label:
        shutil.copyfile(src, tmp)
    else:
        with Image.open(src) as im:
            im.convert("RGB" if im.mode not in ("L", "RGB") else im.mode).save(tmp, format="JPEG", quality=92)
    os.replace(tmp, dst)


def cmd_split(args: argparse.Namespace) -> None:
    data = Path(args.data)
    targets = [(args.work / "splits", False)] + ([(Path(args.pack), True)] if args.pack else [])
    summary = {}
    for out, pack in targets:
        for domain, rel in DOMAINS.items():
            images, labels = _stems(data / rel / "images"), _stems(data / rel / "labels")
            train, held = split_names(domain, [s for s in images if s in labels])
            if not pack:
                summary[domain] = {"train": len(train), "heldout": len(held)}
            for split, names in (("train", train), ("heldout", held)):
                if pack and split == "heldout":
                    continue  # held-out images never travel to the training machine
                base = out / domain if pack else out / split / domain  # a pack holds train only
                for n in names:
                    suffix = ".jpg" if pack else images[n].suffix
                    _place(images[n], base / "images" / f"{n}{suffix}", pack, False)
                    _place(labels[n], base / "labels" / f"{n}.png", pack, True)
        if not pack:
            images, labels = _stems(data / HELDOUT_MICROSCOPY / "images"), _stems(data / HELDOUT_MICROSCOPY / "labels")
            for n in images:
                _place(images[n], out / "heldout" / "microscopy" / "images" / images[n].name, False, False)
                _place(labels[n], out / "heldout" / "microscopy" / "labels" / labels[n].name, False, True)
            summary["microscopy"]["heldout"] = len(images)
    print(json.dumps(summary, indent=1))
    (args.work / "splits.json").write_text(json.dumps(summary, indent=1))


# --------------------------------------------------------------------------------------------
# training stages
# --------------------------------------------------------------------------------------------


def _sources(train_root: Path, extra: dict[str, Path] | None = None) -> list[dict]:
    """Training sources with weights that balance the domains (per image: natural images
    are few and varied, microscopy images many and alike)."""
    extra = extra or {}
    weights = {"microscopy": 1.0, "aerial": 2.0, "natural": 4.0}
    sources = []
    for domain in DOMAINS:
        path = extra.get(domain, train_root / domain)
        sources.append({"path": str(path), "weight": weights[domain], "partial": domain == "aerial"})
    # Procedural scenes (textured shapes, touching cells): exact labels of every object.
    sources.append({"kind": "synthetic", "scene": "shapes", "count": 400, "size": 384, "objects": 10, "seed": 11, "weight": 0.75})
    sources.append({"kind": "synthetic", "scene": "cells", "count": 200, "size": 384, "objects": 24, "seed": 12, "weight": 0.75})
    return sources


def _model_spec(image_size: int, checkpoint: str | None) -> dict:
    """The default model's configuration, or the same weights at a smaller input size: the
    encoder is fully convolutional and the prompt encoder's Fourier features take
    normalised coordinates, so every weight has the same shape at 512 px (32 x 32 grid) as
    at 1024 px (64 x 64); pre-training at 512 px costs a quarter per image."""
    if image_size == 1024:
        return {"config": MODEL_CONFIG, "checkpoint": checkpoint}
    from segany.build import model_configs

    base = model_configs()[MODEL_CONFIG]
    arch = {"encoder": base.encoder, "encoder_kwargs": {k: list(v) for k, v in base.encoder_kwargs.items()},
            "image_size": image_size, "patch_size": base.patch_size}
    return {"config": f"{MODEL_CONFIG}_{image_size}", "checkpoint": checkpoint, "architecture": arch}


# From scratch on small objects the paper's focal:dice 20:1 (alpha 0.25, which down-weights
# object pixels) collapses to "background everywhere" (seen here: train IoU 0.000 at steps
# 50-75), and so does 4:1 without alpha (IoU 0.004 at step 80 of a 256 px probe run); 1:1 with
# alpha 0.75 (object pixels up-weighted) learns (IoU 0.32 at step 80 of the same probe).
MASK_LOSS = {"focal": 1.0, "focal_alpha": 0.75}


@dataclass(frozen=True)
class Stage:
    """How one training stage trains; what every stage shares is in :func:`train_config`.

    Attributes:
        steps_option: the command-line option holding its step count (``steps3`` = ``--steps3``).
        size: model input size in px, or the command-line option holding it
            (``"image_size2"`` = ``--image-size2``).
        lr_factor: its learning rate relative to ``--lr``.
        late: after stage 1 (``--batch-size2`` images of ``--masks-per-image2`` objects,
            objects from 64 px).
        interactive: the paper's simulated sessions (``--rounds``) instead of one prompt.
        frozen: modules that do not train (a frozen image encoder: cached embeddings).
        loss: loss weights (``segany.training.LossWeights``).
        box_probability: share of first prompts that are boxes (the rest: single clicks,
            whose 3 candidates the IoU head must rank).
        zoom_out: the smallest zoom of the augmentation.
    """

    steps_option: str
    size: int | str = 1024
    lr_factor: float = 1.0
    late: bool = True
    interactive: bool = False
    frozen: tuple[str, ...] = ()
    loss: dict = field(default_factory=lambda: dict(MASK_LOSS))
    box_probability: float = 0.3
    zoom_out: float = 0.75

    def input_size(self, args: argparse.Namespace) -> int:
        return getattr(args, self.size) if isinstance(self.size, str) else self.size


# Curriculum: stage 1 learns single prompts (1 round: point or box, 6x cheaper per object, so
# many more objects); stage 2 the paper's interactive sessions; from stage 3 on the first
# prompt again (the 1-click ranking), on the 64 x 64 grid of inference.
STAGES = {
    "warmup": Stage("steps0", size="image_size", late=False, box_probability=0.5),
    "stage1": Stage("steps1", size="image_size", late=False, box_probability=0.5),
    "stage2": Stage("steps2", size="image_size2", lr_factor=0.5, interactive=True, box_probability=0.5),
    "stage3": Stage("steps3", lr_factor=0.1, frozen=("image_encoder",)),
    "stage4": Stage("steps5", lr_factor=0.1),
    "stage5": Stage("steps6", lr_factor=0.1),
    # The decoder learns to rank its candidates while its masks keep training (the ranking
    # term with the IoU head alone did not move the ranking: docs/model-card.md). Zooms
    # out to 0.5: held-out nuclei are smaller at the model's scale than training ones (the
    # 1-click candidates cover 1.84x the nucleus there, 1.08x in training).
    "stage6": Stage("steps7", lr_factor=0.1, frozen=("image_encoder",), loss=dict(MASK_LOSS, rank=1.0),
                    box_probability=0.2, zoom_out=0.5),
    # Stage 5 continued with stage 6's settings (ranking term, zoom out to 0.5), the encoder
    # training too: a step of the whole model costs only ~1.2x a decoder-only step here (the
    # decoder's 64 x 64 passes dominate), and every whole-model stage so far raised most
    # held-out figures while the decoder-only stage 6 lost 3 and 5 clicks.
    "stage7": Stage("steps8", lr_factor=0.1, loss=dict(MASK_LOSS, rank=1.0), zoom_out=0.5),
    # Score calibration: only the IoU head trains, by MSE plus the ranking term.
    "scores": Stage("steps4", frozen=("image_encoder", "prompt_encoder", "mask_decoder"),
                    loss={"focal": 0.0, "dice": 0.0, "iou": 1.0, "rank": 1.0}, box_probability=0.2),
}


def cpu_has_bf16() -> bool:
    """Whether this CPU computes bf16 natively (AVX512-BF16 or AMX); elsewhere torch
    emulates it and bf16 autocast is slower than fp32."""
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return bool(re.search(r"\b(avx512_bf16|amx_bf16)\b", flags))


def precision(device: str) -> str:
    return "bf16" if device.startswith("cuda") or cpu_has_bf16() else "fp32"


def train_config(args: argparse.Namespace, stage: str, sources: list[dict], checkpoint: str | None) -> dict:
    """The trainer configuration (``segany.training.TrainConfig`` as a dict) of one stage."""
    gpu = args.device.startswith("cuda")
    spec = STAGES[stage]
    steps = getattr(args, spec.steps_option)
    size = spec.input_size(args)
    return {
        "model": _model_spec(size, checkpoint),
        "data": {
            "train": sources,
            "masks_per_image": args.masks_per_image2 if spec.late else args.masks_per_image,
            # Stage 1 starts on objects of at least 16 x 16 px (4 x 4 low-resolution cells):
            # tiny ones only teach a fresh model to answer "background" at first.
            "min_mask_area": 64 if spec.late else max(64, size // 2),
            # Below 1024 px, zooms up to 1024/size show objects at their pixel size at 1024 px.
            "augment": {"hflip": True, "vflip": True, "rot90": True,
                        "scale_range": [spec.zoom_out, max(1.5, 1024 / size)]},
            "check": True,
            "cache_in_memory": True,
            "workers": args.workers,
            "prefetch": 3,
        },
        "steps": steps,
        "batch_size": args.batch_size2 if spec.late else args.batch_size,
        "rounds": args.rounds if spec.interactive else 1,
        "freeze": {name: name in spec.frozen for name in ("image_encoder", "prompt_encoder", "mask_decoder")},
        # A frozen encoder: each image is seen under 2 cached augmentations.
        "frozen_augmentations": 2,
        "embedding_cache_mb": 12000,
        "loss": dict(spec.loss),
        "box_probability": spec.box_probability,
        "num_threads": None if gpu else (os.cpu_count() or 1),
        "optim": {
            "lr": args.lr * spec.lr_factor, "weight_decay": 0.05, "warmup_steps": min(250, max(10, steps // 16)),
            "decay_steps": [int(steps * 0.7), int(steps * 0.9)], "grad_clip": 1.0,
        },
        "precision": precision(args.device),
        "device": args.device,
        "output_dir": str(args.work / stage),
        "seed": 0,
        "log_every": 25,
        "save_every": 250,
        "time_limit_s": args.time_limit,
        "progress": not args.quiet,
    }


def _train(args: argparse.Namespace, stage: str, sources: list[dict], checkpoint: str | None) -> Path:
    import torch

    from segany.training import TrainConfig, Trainer

    if args.device.startswith("cuda"):
        torch.backends.cudnn.benchmark = True  # fixed 1024 px inputs: pick the fastest kernels once
        torch.backends.cuda.matmul.allow_tf32 = True

    cfg = TrainConfig.from_dict(train_config(args, stage, sources, checkpoint))
    start = time.perf_counter()
    trainer = Trainer(cfg, resume=True)
    print(f"{stage}: {sum(len(s) for s, _ in trainer.train_sources)} training images, step {trainer.step}/{cfg.steps} "
          f"(data read and checked in {time.perf_counter() - start:.0f} s)", flush=True)
    result = trainer.fit()
    print(f"{stage}: step {result.step} in {result.seconds:.0f} s; last log row {result.history[-1] if result.history else {}}")
    if args.device.startswith("cuda"):
        print(f"{stage}: peak GPU memory {torch.cuda.max_memory_allocated() / 2**30:.1f} GiB", flush=True)
    return result.model_path


def cmd_warmup(args: argparse.Namespace) -> None:
    """A short start on the easiest data (nuclei, synthetic cells): a model trained from
    scratch on everything at once sits at "background everywhere" for hundreds of steps
    (seen here: train IoU <= 0.04 after 225 steps at 512 px), while this subset gets it
    past that within 80 steps (IoU 0.32)."""
    sources = [
        {"path": str(args.train_root / "microscopy"), "limit": 200},
        {"kind": "synthetic", "scene": "cells", "count": 100, "size": 256, "objects": 24, "seed": 13},
    ]
    _train(args, "warmup", sources, None)


def _start(args: argparse.Namespace, default: Path) -> str:
    """The weights a stage starts from: ``--init`` when given (continuing a model trained
    before, e.g. the shipped one), else the previous stage's output."""
    return str(args.init or default)


def cmd_stage1(args: argparse.Namespace) -> None:
    # The engine's completed labels when a round was run before (continuing a model).
    _train(args, "stage1", _engine_sources(args), _start(args, args.work / "warmup" / "model.pt"))


def cmd_engine(args: argparse.Namespace) -> None:
    """Pseudo-label the aerial training images with the stage-1 model and merge them under
    the human labels (which win wherever they exist): OpenStreetMap misses buildings, which
    is where the data engine earns its place. (The natural images are left out of this round
    for time: on 2 CPU cores a 12 x 12 grid costs about 2 s per image.)"""
    from segany.data_engine import merge_datasets, pseudo_label
    from segany.training import load_trained_model

    # The stage-1 model at the input size it was trained at (its sidecar names it).
    model = load_trained_model(_start(args, args.work / "stage1" / "model.pt"), device=args.device)
    for domain in ENGINE_DOMAINS:
        images = sorted((args.train_root / domain / "images").iterdir())
        report = pseudo_label(
            images, args.work / "engine" / f"{domain}_pseudo", model=model, device=args.device,
            pred_iou_thresh=args.engine_iou, stability_thresh=args.engine_stability, points_per_side=12, min_area=64,
            progress=not args.quiet,
        )
        print(f"engine: {domain}: {len(report.written)} images pseudo-labelled, {report.objects} objects")
        merge_datasets(args.train_root / domain, args.work / "engine" / f"{domain}_pseudo",
                       args.work / "engine" / f"{domain}_merged", max_overlap=0.1, min_area=64)


def _engine_sources(args: argparse.Namespace) -> list[dict]:
    merged = {d: args.work / "engine" / f"{d}_merged" for d in ENGINE_DOMAINS}
    return _sources(args.train_root, {d: p for d, p in merged.items() if p.exists()})


def cmd_stage2(args: argparse.Namespace) -> None:
    _train(args, "stage2", _engine_sources(args), _start(args, args.work / "stage1" / "model.pt"))


def cmd_stage3(args: argparse.Namespace) -> None:
    _train(args, "stage3", _engine_sources(args), _start(args, args.work / "stage2" / "model.pt"))


# Stage 4: fluorescence (bright nuclei on black) inverted looks like bright-field / stained
# tissue (dark on bright); grey removes the stain colour that only a few images have.
MICROSCOPY_PHOTOMETRIC = {"grayscale": 0.2, "invert": 0.3}


def _photometric_sources(sources: list[dict]) -> list[dict]:
    out = []
    for source in sources:
        microscopy = "microscopy" in str(source.get("path", "")) or source.get("scene") == "cells"
        out.append(dict(source, **MICROSCOPY_PHOTOMETRIC) if microscopy else source)
    return out


def cmd_stage4(args: argparse.Namespace) -> None:
    _train(args, "stage4", _photometric_sources(_engine_sources(args)), _start(args, args.work / "stage3" / "model.pt"))


# Bright-field and stained images: dark nuclei on a bright background. Their mean grey level
# is above 100 (135 and up in the DSB training images; fluorescence images stay below 60).
BRIGHTFIELD_MEAN_GREY = 100.0
BRIGHTFIELD_WEIGHT = 3.0  # per image, on top of their draws as part of the microscopy source


def is_brightfield(image: np.ndarray) -> bool:
    """Whether a microscopy image shows dark objects on a bright background (bright-field,
    H&E): its mean grey level (RGB averaged, alpha ignored) is above BRIGHTFIELD_MEAN_GREY.

    >>> is_brightfield(np.full((4, 4, 3), 200, np.uint8)), is_brightfield(np.zeros((4, 4), np.uint8))
    (True, False)
    """
    grey = image[..., :3].mean(axis=-1) if image.ndim == 3 else image
    return float(grey.mean()) > BRIGHTFIELD_MEAN_GREY


def brightfield_subset(microscopy: Path, out: Path) -> int:
    """Link the bright-field images of a microscopy training folder (and their labels) into
    ``out``; returns how many. Idempotent: a second call links nothing new."""
    from PIL import Image

    count = 0
    for image_path in sorted((microscopy / "images").iterdir()):
        with Image.open(image_path) as im:
            if not is_brightfield(np.asarray(im.convert("RGB"))):
                continue
        label = microscopy / "labels" / f"{image_path.stem}.png"
        _place(image_path, out / "images" / image_path.name, False, False)
        _place(label, out / "labels" / label.name, False, True)
        count += 1
    return count


def stage5_sources(args: argparse.Namespace) -> list[dict]:
    """Stage 4's sources plus the bright-field subset of the microscopy training images as a
    source of its own (linked under ``WORK/brightfield``), all with the photometric
    augmentation of stage 4."""
    subset = args.work / "brightfield" / "microscopy"
    count = brightfield_subset(args.train_root / "microscopy", subset)
    print(f"bright-field subset: {count} bright-field or stained microscopy training images drawn about "
          f"{1 + BRIGHTFIELD_WEIGHT:g}x as often")
    return _photometric_sources(_engine_sources(args) + [{"path": str(subset), "weight": BRIGHTFIELD_WEIGHT}])


def cmd_stage5(args: argparse.Namespace) -> None:
    _train(args, "stage5", stage5_sources(args), _start(args, args.work / "stage4" / "model.pt"))


def cmd_stage6(args: argparse.Namespace) -> None:
    _train(args, "stage6", stage5_sources(args), _start(args, args.work / "stage5" / "model.pt"))


def cmd_stage7(args: argparse.Namespace) -> None:
    _train(args, "stage7", stage5_sources(args), _start(args, args.work / "stage5" / "model.pt"))


def cmd_scores(args: argparse.Namespace) -> None:
    _train(args, "scores", stage5_sources(args), _start(args, args.work / "stage5" / "model.pt"))


# --------------------------------------------------------------------------------------------
# export and evaluation
# --------------------------------------------------------------------------------------------


def cmd_export(args: argparse.Namespace) -> None:
    import torch

    source = Path(args.weights or args.work / "stage5" / "model.pt")
    state = torch.load(source, map_location="cpu", weights_only=True)
    # fp16 storage halves the wheel; BatchNorm counters stay integers. Loading converts back
    # to fp32 (load_state_dict copies into the model's fp32 parameters).
    half = {k: (v.half() if v.is_floating_point() else v) for k, v in state.items()}
    WEIGHTS_DIR.mkdir(parents=True, exist_ok=True)
    target = WEIGHTS_DIR / f"{MODEL_NAME}.pt"
    tmp = target.with_name(f".{target.name}.tmp")
    torch.save(half, tmp)
    os.replace(tmp, target)
    digest = hashlib.sha256(target.read_bytes()).hexdigest()
    info = {"name": MODEL_NAME, "file": target.name, "size": target.stat().st_size, "sha256": digest, "source": str(source)}
    print(json.dumps(info, indent=1))
    (args.work / "export.json").write_text(json.dumps(info, indent=1))
    # The registry records the size and hash, so that a damaged installation is detected.
    registry = ROOT / "core" / "segany" / "checkpoints.py"
    text = registry.read_text()
    text = re.sub(r"^BUNDLED_SIZE: int \| None = .*$", f"BUNDLED_SIZE: int | None = {info['size']}", text, flags=re.M)
    text = re.sub(r"^BUNDLED_SHA256: str \| None = .*$", f'BUNDLED_SHA256: str | None = "{digest}"', text, flags=re.M)
    registry.write_text(text)


def cmd_evaluate(args: argparse.Namespace) -> None:
    import torch

    from segany.build import load_model
    from segany.datasets import open_dataset
    from segany.evaluation import EvaluationResult, OtsuClickPredictor, evaluate
    from segany.predictor import SamPredictor

    torch.set_num_threads(args.threads or torch.get_num_threads())
    model = load_model(args.weights or MODEL_NAME, device=args.device)
    contenders = {"segany": SamPredictor(model), "otsu baseline": OtsuClickPredictor()}
    report: dict[str, dict] = {}
    for domain in ("microscopy", "aerial", "natural"):
        dataset = open_dataset(args.work / "splits" / "heldout" / domain)
        # Microscopy's worst case, reported apart: dark nuclei on a bright background.
        bright = _brightfield_names(dataset) if domain == "microscopy" else None
        for name, predictor in contenders.items():
            start = time.perf_counter()
            result = evaluate(dataset, predictor, ["point", "clicks", "box"], clicks=5,
                              max_objects=args.max_objects, max_images=args.max_images, min_area=16,
                              progress=not args.quiet)
            row = dict(_summary(result), seconds=time.perf_counter() - start)
            report.setdefault(domain, {})[name] = row
            print(domain, name, {k: (round(v, 3) if isinstance(v, float) else v) for k, v in row.items()}, flush=True)
            if bright is not None:
                for group, keep in (("bright-field", True), ("fluorescence", False)):
                    rows = [r for r in result.rows if (r.image in bright) == keep]
                    if rows:  # --max-images may leave one group out
                        report.setdefault(f"microscopy: {group}", {})[name] = _summary(EvaluationResult(rows))
    out = args.work / "evaluation.json"
    out.write_text(json.dumps(report, indent=1))
    print(markdown_table(report))


def candidate_scores(predictor, dataset, every: int = 1, max_objects: int = 10, min_area: int = 16):
    """True and predicted IoU of the 3 candidates of a single centre click (the evaluation's
    ``point`` protocol) for the objects of every ``every``-th image of a dataset.

    Returns ``(images, iou, score)``: each object's image name (``M``), and ``M x 3`` arrays.
    """
    from segany.evaluation import mask_iou, object_centre, select_objects

    images, ious, scores = [], [], []
    for index, sample in enumerate(dataset):
        if index % every:
            continue
        objects = select_objects(sample, max_objects=max_objects, min_area=min_area)
        if not objects:
            continue
        predictor.set_image(np.asarray(sample.image))
        for obj in objects:
            x, y = object_centre(obj.mask)
            masks, score, _ = predictor.predict(np.array([[x, y]]), np.array([1]), multimask_output=True)
            images.append(sample.name)
            ious.append([mask_iou(m, obj.mask) for m in masks])
            scores.append(np.asarray(score, np.float64).reshape(-1))
    return np.asarray(images), np.asarray(ious).reshape(len(ious), -1), np.asarray(scores).reshape(len(scores), -1)


def ranking_summary(iou: np.ndarray, score: np.ndarray) -> dict:
    """How the scores rank the candidates (``M x C`` true and predicted IoU).

    Returns ``objects``, ``top`` (mIoU of the top-scored candidate), ``oracle`` (mIoU of
    the best), ``hit`` (share of objects whose top-scored candidate is the best), and per
    candidate ``best_share`` (how often it is the best), ``iou`` (its mean true IoU) and
    ``score`` (its mean predicted IoU). A head that only learned each candidate's average
    has ``score`` close to ``iou`` and ``top`` close to the best column of ``iou``.
    """
    if not len(iou):
        return {"objects": 0}
    rows = np.arange(len(iou))
    top, best = score.argmax(axis=1), iou.argmax(axis=1)
    return {
        "objects": len(iou),
        "top": float(iou[rows, top].mean()),
        "oracle": float(iou.max(axis=1).mean()),
        "hit": float((iou[rows, top] >= iou[rows, best]).mean()),
        "best_share": (np.bincount(best, minlength=iou.shape[1]) / len(iou)).tolist(),
        "iou": iou.mean(axis=0).tolist(),
        "score": score.mean(axis=0).tolist(),
    }


def cmd_ranking(args: argparse.Namespace) -> None:
    """The 1-click ranking diagnosis of --weights on the training (``--split train``) or
    held-out images, per domain (microscopy also by image type): ``WORK/ranking_SPLIT.json``."""
    import torch

    from segany.build import load_model
    from segany.datasets import open_dataset
    from segany.predictor import SamPredictor

    torch.set_num_threads(args.threads or torch.get_num_threads())
    predictor = SamPredictor(load_model(args.weights or MODEL_NAME, device=args.device))
    report = {}
    for domain in ("microscopy", "aerial", "natural"):
        dataset = open_dataset(args.work / "splits" / args.split / domain)
        images, iou, score = candidate_scores(predictor, dataset, args.every, args.max_objects)
        groups = {domain: np.ones(len(images), bool)}
        if domain == "microscopy":  # one pass over the images, summarised by type as evaluate does
            bright = np.isin(images, sorted(_brightfield_names(dataset)))
            groups.update({"microscopy: bright-field": bright, "microscopy: fluorescence": ~bright})
        for name, keep in groups.items():
            report[name] = ranking_summary(iou[keep], score[keep])
            print(name, json.dumps({k: (np.round(v, 3).tolist() if isinstance(v, (list, float)) else v)
                                    for k, v in report[name].items()}), flush=True)
    out = args.work / f"ranking_{args.split}.json"
    out.write_text(json.dumps(report, indent=1))


def _summary(result) -> dict:
    """The model card's figures of one evaluation (segany.evaluation.EvaluationResult)."""
    return {
        "objects": sum(1 for r in result.rows if r.protocol == "point"),
        "point": result.miou("point"), "point_oracle": result.miou("point_oracle"),
        "clicks3": result.miou("clicks", 3), "clicks5": result.miou("clicks", 5), "box": result.miou("box"),
    }


def _brightfield_names(dataset) -> set[str]:
    """Names (as in evaluation rows) of a dataset's bright-field or stained images."""
    return {sample.name for sample in dataset if is_brightfield(np.asarray(sample.image))}


def markdown_table(report: dict[str, dict]) -> str:
    lines = [
        "| domain (held-out) | method | objects | 1 click (top) | 1 click (oracle) | 3 clicks | 5 clicks | box |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for domain, rows in report.items():
        for name, r in rows.items():
            lines.append(
                f"| {domain} | {name} | {r.get('objects') or ''} | {r['point']:.3f} | {r['point_oracle']:.3f} | "
                f"{r['clicks3']:.3f} | {r['clicks5']:.3f} | {r['box']:.3f} |"
            )
    return "\n".join(lines)


# --------------------------------------------------------------------------------------------


COMMANDS = {
    "split": cmd_split, "warmup": cmd_warmup, "stage1": cmd_stage1, "engine": cmd_engine, "stage2": cmd_stage2,
    "stage3": cmd_stage3, "stage4": cmd_stage4, "stage5": cmd_stage5, "stage6": cmd_stage6, "stage7": cmd_stage7,
    "scores": cmd_scores, "ranking": cmd_ranking,
    "export": cmd_export, "evaluate": cmd_evaluate,
}
# What ``all`` runs, in order: the recipe of the shipped weights (stage6, stage7 and scores were tried
# and not shipped).
ALL = ["split", "warmup", "stage1", "engine", "stage2", "stage3", "stage4", "stage5", "export", "evaluate"]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("stage", choices=[*COMMANDS, "all"])
    parser.add_argument("--data", default=str(ROOT.parent / "shared" / "data" / "train"), help="the shared data's train/ folder")
    parser.add_argument("--work", type=Path, default=ROOT / "runs" / "default_model")
    parser.add_argument("--train-root", type=Path, help="training split folder (default: WORK/splits/train)")
    parser.add_argument("--pack", help="split: also write a compact JPEG copy of the training split here")
    parser.add_argument("--device", default=None, help="cuda or cpu (default: cuda when available)")
    parser.add_argument("--steps0", type=int, default=80, help="warmup steps")
    parser.add_argument("--steps1", type=int, default=2000)
    parser.add_argument("--steps2", type=int, default=240)
    parser.add_argument("--steps3", type=int, default=400)
    parser.add_argument("--steps4", type=int, default=300, help="scores: IoU-head calibration steps")
    parser.add_argument("--steps5", type=int, default=420, help="stage4: whole-model steps at 1024 px")
    parser.add_argument("--steps6", type=int, default=700, help="stage5: more whole-model steps, bright-field drawn more")
    parser.add_argument("--steps7", type=int, default=1000, help="stage6: decoder steps with the ranking term")
    parser.add_argument("--steps8", type=int, default=600, help="stage7: whole-model steps with the ranking term")
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--masks-per-image", type=int, default=8)
    parser.add_argument("--batch-size2", type=int, default=4, help="stage2: images per step")
    parser.add_argument("--masks-per-image2", type=int, default=3, help="stage2: objects per image")
    parser.add_argument("--rounds", type=int, default=6, help="stage2: simulated interaction rounds per object (paper: 11)")
    parser.add_argument("--image-size", type=int, default=256, help="warmup and stage1: model input size (cheap pre-training)")
    parser.add_argument("--image-size2", type=int, default=512, help="stage2: model input size")
    parser.add_argument("--workers", type=int, default=min(12, os.cpu_count() or 1))
    parser.add_argument("--time-limit", type=float, help="seconds per call of a training stage (then resume)")
    # SAM's engine keeps predicted IoU >= 0.88 from a model whose IoU head says so when it
    # is right; a small model's head is calibrated to its own (lower) quality.
    parser.add_argument("--engine-iou", type=float, default=0.88, help="engine: keep masks with predicted IoU >= this")
    parser.add_argument("--engine-stability", type=float, default=0.92, help="engine: and stability >= this")
    parser.add_argument("--init", type=Path, help="engine and training stages: start from these weights instead of the previous stage's")
    parser.add_argument("--weights", help="export, evaluate and ranking: this checkpoint instead of the default")
    parser.add_argument("--max-objects", type=int, default=20, help="evaluate and ranking: objects per image (a seeded random choice, the same for every model)")
    parser.add_argument("--max-images", type=int, help="evaluate: images per domain (default: all)")
    parser.add_argument("--threads", type=int, help="evaluate and ranking: torch CPU threads")
    parser.add_argument("--split", choices=["train", "heldout"], default="train", help="ranking: which images")
    parser.add_argument("--every", type=int, default=1, help="ranking: every N-th image")
    parser.add_argument("-q", "--quiet", action="store_true")
    args = parser.parse_args(argv)
    if args.device is None:
        import torch

        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    args.work.mkdir(parents=True, exist_ok=True)
    args.train_root = args.train_root or args.work / "splits" / "train"
    stages = ALL if args.stage == "all" else [args.stage]
    for stage in stages:
        print(f"== {stage}", flush=True)
        COMMANDS[stage](args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
