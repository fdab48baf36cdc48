"""The training configuration: dataclasses, loaded from (and saved to) YAML.

Every field has a default, so a configuration file only says what differs. Unknown keys are
errors (a typo must not silently train with a default), and relative paths are relative to
the YAML file.

Example YAML (fine-tune MobileSAM's decoder on a folder of microscopy images)::

    model:
      config: vit_t
      checkpoint: mobile_sam            # a `segany models` name or a file
    data:
      train:
        - {path: data/nuclei_train}     # images/ + labels/ (docs/dataset-format.md)
        - {path: data/pseudo, partial: true}
      val:
        - {path: data/nuclei_val, limit: 20}
      masks_per_image: 8
      augment: {hflip: true, vflip: true, rot90: true, scale_range: [0.75, 1.5]}
    steps: 2000
    batch_size: 2
    optim: {lr: 1.0e-4, warmup_steps: 100, decay_steps: [1500]}
    freeze: {image_encoder: true}
    precision: bf16
    output_dir: runs/nuclei
    validation: {every: 250, protocols: [point, clicks], clicks: 5}

Example:
    >>> cfg = TrainConfig.from_dict({"model": {"config": "test_tiny"}, "steps": 5,
    ...                              "data": {"train": [{"kind": "synthetic", "count": 4}]}})
    >>> cfg.steps, cfg.data.train[0].kind, cfg.optim.lr
    (5, 'synthetic', 0.0001)
    >>> TrainConfig.from_dict({"stepz": 5})
    Traceback (most recent call last):
    ...
    segany.errors.SegAnyError: training configuration: unknown key 'stepz' (did you mean 'steps'?)
"""

from __future__ import annotations

import dataclasses
import difflib
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..errors import SegAnyError
from .data import Augment
from .losses import LossWeights

__all__ = [
    "ModelSpec",
    "DataSource",
    "DataConfig",
    "OptimConfig",
    "FreezeConfig",
    "ValidationConfig",
    "TrainConfig",
    "load_config",
    "DATA_KINDS",
    "PRECISIONS",
]

DATA_KINDS = ("folder", "coco", "geo", "synthetic")
PRECISIONS = ("fp32", "bf16", "fp16")


@dataclass
class ModelSpec:
    """Which model to train.

    Attributes:
        config: a registered configuration name (``vit_b``, ``vit_t``, ``test_tiny`` ...).
        checkpoint: weights to start from: a file, a ``segany models`` name, or None for a
            random initialisation.
        architecture: optional custom architecture, registered under ``config`` before
            building: ``{encoder: vit, encoder_kwargs: {...}, image_size: 256, patch_size: 16}``
            (the fields of :class:`segany.ModelConfig`).
    """

    config: str = "vit_t"
    checkpoint: str | None = None
    architecture: dict[str, Any] | None = None


@dataclass
class DataSource:
    """One labelled dataset.

    Attributes:
        path: the dataset folder (``folder``), the COCO JSON file (``coco``) or the raster
            (``geo``); unused for ``synthetic``.
        kind: ``folder`` (images/ + labels/), ``coco``, ``geo`` (GeoTIFF + vectors) or
            ``synthetic`` (procedural scenes).
        partial: the labels are known to be incomplete (OSM buildings, pseudo-labels):
            prompts are only ever sampled from labelled objects and the data engine may add
            pseudo-labels where nothing is labelled.
        skip, limit: use items ``skip .. skip + limit`` (in name order): simple splits.
        tile: cut every image into square tiles of this side (only tiles with objects are
            kept): large microscopy fields or scenes keep their objects at a useful size.
        tile_stride: step between tiles (default: ``tile``).
        images: COCO only: the image folder (default: next to the JSON).
        vectors: geo only: the vector label file.
        tile_size, overlap: geo only (tiles cut from the raster, in pixels).
        count, size, seed, objects, scene: synthetic only (``scene``: shapes or cells).
        weight: relative chance of drawing an image of this source (per image: a source of
            100 images with weight 3 is drawn as often as one of 300 with weight 1);
            balances small domains against large ones.
        grayscale, invert: probabilities of showing an image of this source in grey and
            with inverted intensities (photometric augmentation; applied in that order).
            Microscopy: fluorescence (bright nuclei on black) inverted looks like
            bright-field or stained tissue (dark nuclei on a bright background), the
            look that stays rare in the training sets but common in use.
    """

    path: str | None = None
    kind: str = "folder"
    partial: bool = False
    skip: int = 0
    limit: int | None = None
    tile: int | None = None
    tile_stride: int | None = None
    images: str | None = None
    vectors: str | None = None
    tile_size: int = 512
    overlap: int = 0
    count: int = 64
    size: int = 128
    seed: int = 0
    objects: int = 6
    scene: str = "shapes"
    weight: float = 1.0
    grayscale: float = 0.0
    invert: float = 0.0


@dataclass
class DataConfig:
    """Training and validation data, sampling and augmentation.

    Attributes:
        train, val: data sources.
        masks_per_image: objects drawn per image per step (fewer when the image has fewer).
        min_mask_area: objects smaller than this (pixels at the model input size, after
            augmentation) are never sampled.
        augment: random flips / rotations / zoom (:class:`~segany.training.data.Augment`).
        check: read every item once before training and report bad files one by one.
        cache_in_memory: keep every decoded image and label image in memory after its
            first read (small datasets on a fast accelerator: decoding PNGs is then the
            bottleneck).
        workers: threads that read and augment the images of the next steps while the
            current step runs (0: in the training thread). Results do not depend on it:
            every image slot of every step has its own random generator.
        prefetch: steps prepared ahead when ``workers`` > 0.
    """

    train: list[DataSource] = field(default_factory=list)
    val: list[DataSource] = field(default_factory=list)
    masks_per_image: int = 8
    min_mask_area: int = 16
    augment: Augment = field(default_factory=Augment)
    check: bool = True
    cache_in_memory: bool = False
    workers: int = 0
    prefetch: int = 2


@dataclass
class OptimConfig:
    """AdamW with linear warm-up and step decay (the paper: lr 8e-4, wd 0.1, x0.1 twice).

    Attributes:
        lr: peak learning rate after warm-up.
        weight_decay: AdamW decoupled weight decay.
        betas: AdamW betas (the paper: 0.9, 0.999).
        warmup_steps: linear ramp from 0 to ``lr``.
        decay_steps: steps at which the learning rate is multiplied by ``decay_factor``.
        decay_factor: 0.1.
        grad_clip: clip the gradient norm to this value (None: no clipping).
    """

    lr: float = 1e-4
    weight_decay: float = 0.1
    betas: tuple[float, float] = (0.9, 0.999)
    warmup_steps: int = 0
    decay_steps: list[int] = field(default_factory=list)
    decay_factor: float = 0.1
    grad_clip: float | None = None


@dataclass
class FreezeConfig:
    """Parts kept fixed. With a frozen image encoder, embeddings are computed once per
    (image, augmentation) under no_grad and cached (``embedding_cache_mb``).

    ``mask_decoder``: everything of the mask decoder except its IoU prediction head, so the
    masks stay exactly as they are and only the predicted-IoU scores (which rank the 3
    candidates of a click and filter automatic masks) learn: score calibration.

    ``batchnorm`` (TinyViT's BatchNorm layers): keep their running statistics (True), or
    train them (False); None: kept when starting from a checkpoint (batch statistics of a
    few images are noise), trained from scratch."""

    image_encoder: bool = False
    prompt_encoder: bool = False
    mask_decoder: bool = False
    batchnorm: bool | None = None


@dataclass
class ValidationConfig:
    """Validation every ``every`` steps (0: only at the end).

    Attributes:
        protocols: ``point`` (one click at the object's centre: the point farthest from its
            boundary) and/or ``clicks`` (``clicks`` corrective clicks, each at the centre of
            the largest error region).
        clicks: number of clicks of the ``clicks`` protocol.
        max_images, max_objects: bound the cost (objects per image: a seeded random choice).
        min_area: objects smaller than this (original pixels) are not evaluated.
        stop_at_miou: stop training once the first protocol's mIoU reaches this ("good
            enough"; the checkpoint and resume file are written as at the end).
    """

    every: int = 0
    protocols: list[str] = field(default_factory=lambda: ["point"])
    clicks: int = 5
    max_images: int = 20
    max_objects: int = 20
    min_area: int = 16
    stop_at_miou: float | None = None


@dataclass
class TrainConfig:
    """Everything a training run needs (see the module docstring for a YAML example).

    Attributes:
        model, data, optim, freeze, loss, validation: the sections above;
            ``loss`` is :class:`~segany.training.losses.LossWeights`.
        steps: optimizer steps.
        batch_size: images per forward pass.
        grad_accum_steps: forward passes accumulated per optimizer step.
        rounds: simulated interaction rounds per mask (11 in the paper).
        box_probability: chance that the first prompt is a box (0.5).
        loss_at_full_resolution: compute losses (and sample clicks) on masks upsampled to
            the model input size instead of the decoder's low-resolution output (4x the
            embedding grid): closer to inference, 16x more pixels.
        precision: ``fp32``, ``bf16`` (autocast, no scaler) or ``fp16`` (autocast with a
            gradient scaler; GPU only).
        device: ``cpu``, ``cuda``, ``cuda:1``... or None (CUDA when available).
        output_dir: checkpoints, logs and plots go here.
        seed: seeds data sampling, prompts and initialisation.
        deterministic: ``torch.use_deterministic_algorithms`` (slower on GPU).
        log_every: steps between CSV log lines (and progress bar updates).
        save_every: steps between checkpoint + resume-file writes (and always at the end).
        frozen_augmentations: with a frozen image encoder, each image uses one of this
            many fixed augmentations so that its embeddings can be cached.
        embedding_cache_mb: memory bound of that cache.
        num_threads: torch CPU threads (None: torch's default).
        time_limit_s: stop cleanly (checkpoint, resume file, final validation) after this
            many seconds of this call; resume later with ``--resume`` (cluster job limits).
        progress: show a tqdm progress bar.
    """

    model: ModelSpec = field(default_factory=ModelSpec)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    freeze: FreezeConfig = field(default_factory=FreezeConfig)
    loss: LossWeights = field(default_factory=LossWeights)
    validation: ValidationConfig = field(default_factory=ValidationConfig)
    steps: int = 1000
    batch_size: int = 1
    grad_accum_steps: int = 1
    rounds: int = 11
    box_probability: float = 0.5
    loss_at_full_resolution: bool = False
    precision: str = "fp32"
    device: str | None = None
    output_dir: str = "runs/segany"
    seed: int = 0
    deterministic: bool = False
    log_every: int = 10
    save_every: int = 500
    frozen_augmentations: int = 4
    embedding_cache_mb: int = 2048
    num_threads: int | None = None
    time_limit_s: float | None = None
    progress: bool = True

    # ---------------------------------------------------------------- (de)serialisation
    @classmethod
    def from_dict(cls, data: dict[str, Any], base_dir: str | os.PathLike[str] | None = None, source: str = "training configuration") -> "TrainConfig":
        """Build from a plain dict (parsed YAML); ``base_dir`` resolves relative paths."""
        config = _build(cls, data, source)
        config.validate(source)
        if base_dir is not None:
            config._resolve_paths(Path(base_dir))
        return config

    def to_dict(self) -> dict[str, Any]:
        """Plain dict (YAML/JSON-serialisable): the inverse of :meth:`from_dict`.

        Example:
            >>> TrainConfig.from_dict(TrainConfig().to_dict()) == TrainConfig()
            True
        """
        return _plain(dataclasses.asdict(self))

    def to_yaml(self, path: str | os.PathLike[str]) -> None:
        """Write the configuration (all fields, defaults included) to ``path``."""
        import yaml

        Path(path).write_text(yaml.safe_dump(self.to_dict(), sort_keys=False))

    def validate(self, source: str = "training configuration") -> None:
        """Raise :class:`SegAnyError` for values that cannot work."""

        def bad(message: str) -> SegAnyError:
            return SegAnyError(f"{source}: {message}")

        if self.steps < 1:
            raise bad(f"steps must be at least 1, got {self.steps}")
        for name in ("batch_size", "grad_accum_steps", "rounds"):
            if getattr(self, name) < 1:
                raise bad(f"{name} must be at least 1, got {getattr(self, name)}")
        if self.data.masks_per_image < 1:
            raise bad(f"data.masks_per_image must be at least 1, got {self.data.masks_per_image}")
        if self.precision not in PRECISIONS:
            raise bad(f"precision must be one of {', '.join(PRECISIONS)}, got {self.precision!r}")
        if not 0.0 <= self.box_probability <= 1.0:
            raise bad(f"box_probability must be in [0, 1], got {self.box_probability}")
        if self.optim.lr <= 0:
            raise bad(f"optim.lr must be positive, got {self.optim.lr}")
        if sorted(self.optim.decay_steps) != list(self.optim.decay_steps):
            raise bad(f"optim.decay_steps must be increasing, got {self.optim.decay_steps}")
        for p in self.validation.protocols:
            if p not in ("point", "clicks"):
                raise bad(f"validation.protocols: unknown protocol {p!r} (use 'point' and/or 'clicks')")
        if self.data.workers < 0 or self.data.prefetch < 1:
            raise bad(f"data.workers must be >= 0 and data.prefetch >= 1, got {self.data.workers}, {self.data.prefetch}")
        lo, hi = self.data.augment.scale_range
        if not 0 < lo <= hi:
            raise bad(f"data.augment.scale_range must be 0 < low <= high, got {[lo, hi]}")
        for section, sources in (("train", self.data.train), ("val", self.data.val)):
            for i, s in enumerate(sources):
                where = f"data.{section}[{i}]"
                if s.kind not in DATA_KINDS:
                    raise bad(f"{where}.kind must be one of {', '.join(DATA_KINDS)}, got {s.kind!r}")
                if s.kind != "synthetic" and not s.path:
                    raise bad(f"{where}: a {s.kind!r} source needs a path")
                for name in ("grayscale", "invert"):
                    if not 0.0 <= getattr(s, name) <= 1.0:
                        raise bad(f"{where}.{name} is a probability (0 to 1), got {getattr(s, name)}")
                if not s.weight > 0:
                    raise bad(f"{where}.weight must be positive, got {s.weight}")
                if s.kind == "geo" and not s.vectors:
                    raise bad(f"{where}: a 'geo' source needs 'vectors' (the label polygons file)")

    def _resolve_paths(self, base: Path) -> None:
        def resolve(value: str | None) -> str | None:
            if value is None:
                return None
            path = Path(os.path.expanduser(value))
            return str(path if path.is_absolute() else base / path)

        for s in [*self.data.train, *self.data.val]:
            s.path, s.images, s.vectors = resolve(s.path), resolve(s.images), resolve(s.vectors)
        self.output_dir = resolve(self.output_dir) or self.output_dir
        ckpt = self.model.checkpoint
        if ckpt is not None and (os.sep in ckpt or ckpt.endswith((".pt", ".pth"))):
            self.model.checkpoint = resolve(ckpt)


def load_config(path: str | os.PathLike[str], overrides: dict[str, Any] | None = None) -> TrainConfig:
    """Read a YAML training configuration; ``overrides`` (dotted keys) win over the file.

    Example:
        >>> import tempfile
        >>> p = Path(tempfile.mkdtemp()) / "t.yaml"
        >>> _ = p.write_text("steps: 3\\noptim: {lr: 0.001}\\noutput_dir: out\\n")
        >>> cfg = load_config(p, {"optim.lr": 0.01})
        >>> cfg.optim.lr, Path(cfg.output_dir) == p.parent / "out"
        (0.01, True)
    """
    import yaml

    path = Path(path)
    try:
        text = path.read_text()
    except FileNotFoundError:
        raise SegAnyError(f"{path}: training configuration file not found") from None
    try:
        data = yaml.safe_load(text) or {}
    except yaml.YAMLError as exc:
        raise SegAnyError(f"{path}: not valid YAML ({exc})") from None
    if not isinstance(data, dict):
        raise SegAnyError(f"{path}: the configuration must be a mapping of keys to values")
    for key, value in (overrides or {}).items():
        node = data
        parts = key.split(".")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
        node[parts[-1]] = value
    return TrainConfig.from_dict(data, base_dir=path.parent, source=str(path))


# --------------------------------------------------------------------------------------------
# dict <-> dataclass, strictly
# --------------------------------------------------------------------------------------------

_NESTED = {
    "model": ModelSpec,
    "data": DataConfig,
    "optim": OptimConfig,
    "freeze": FreezeConfig,
    "loss": LossWeights,
    "validation": ValidationConfig,
    "augment": Augment,
}


def _build(cls: type, data: Any, where: str) -> Any:
    if data is None:
        return cls()
    if isinstance(data, str) and cls is ModelSpec:
        return ModelSpec(config=data)  # "model: vit_t" shorthand
    if not isinstance(data, dict):
        raise SegAnyError(f"{where}: expected a mapping for {cls.__name__}, got {data!r}")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    names = set(fields)
    kwargs: dict[str, Any] = {}
    for key, value in data.items():
        if key not in names:
            close = difflib.get_close_matches(str(key), sorted(names), n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else f" (known: {', '.join(sorted(names))})"
            raise SegAnyError(f"{where}: unknown key {key!r}{hint}")
        if key in _NESTED:
            kwargs[key] = _build(_NESTED[key], value, f"{where}: {key}")
        elif cls is DataConfig and key in ("train", "val"):
            if isinstance(value, dict):
                value = [value]
            kwargs[key] = [_build(DataSource, v, f"{where}: data.{key}[{i}]") for i, v in enumerate(value or [])]
        elif key in ("betas", "scale_range"):
            kwargs[key] = tuple(float(v) for v in value)
        else:
            kwargs[key] = _coerce(value, str(fields[key].type), f"{where}: {key}")
    try:
        return cls(**kwargs)
    except TypeError as exc:
        raise SegAnyError(f"{where}: {exc}") from None


def _coerce(value: Any, annotation: str, where: str) -> Any:
    """Numbers written as strings: YAML 1.1 reads ``1e-4`` (no dot) as the string '1e-4'."""
    if not isinstance(value, str) or "str" in annotation:
        return value
    for kind, convert in (("float", float), ("int", int)):
        if kind in annotation:
            try:
                return convert(value)
            except ValueError:
                raise SegAnyError(f"{where}: expected a number, got {value!r}") from None
    return value


def _plain(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value
