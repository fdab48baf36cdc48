"""Model configurations and the functions that build (and load) a SAM model.

``build_sam("vit_b", checkpoint=path)`` gives the official architecture whose
``state_dict()`` matches the official files key for key, so they load with ``strict=True``.
Custom configurations (a small encoder for training and tests, segany's own model) are
registered with :func:`register_config` and built the same way.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .errors import CheckpointError, SegAnyError
from .modeling import (
    ConvNeXtEncoder,
    ImageEncoderViT,
    MaskDecoder,
    PromptEncoder,
    Sam,
    TinyViT,
    TwoWayTransformer,
)

PROMPT_EMBED_DIM = 256


@dataclass(frozen=True)
class ModelConfig:
    """Everything needed to build one model architecture.

    Attributes:
        name: registry key (``"vit_b"``, ``"vit_t"``, ...).
        encoder: ``"vit"`` (SAM's ViT), ``"tiny_vit"`` (MobileSAM's TinyViT) or
            ``"convnext"`` (segany's small convolutional encoder).
        encoder_kwargs: constructor arguments of the encoder.
        image_size: side of the square model input.
        patch_size: encoder stride; the embedding grid is ``image_size // patch_size``.
        description: one line for listings.
        decoder_dim: width of the image embedding, prompt tokens and mask decoder (SAM:
            256; every official and shipped model keeps it, a narrower one only suits
            small experiments such as the from-scratch training test).
        decoder_mlp_dim, decoder_heads: the two-way transformer's MLP width and heads.
    """

    name: str
    encoder: str
    encoder_kwargs: dict[str, Any] = field(default_factory=dict)
    image_size: int = 1024
    patch_size: int = 16
    description: str = ""
    decoder_dim: int = PROMPT_EMBED_DIM
    decoder_mlp_dim: int = 2048
    decoder_heads: int = 8

    @property
    def embedding_size(self) -> int:
        return self.image_size // self.patch_size


def _vit(name: str, width: int, depth: int, heads: int, global_blocks: tuple[int, ...], desc: str) -> ModelConfig:
    return ModelConfig(
        name=name,
        encoder="vit",
        encoder_kwargs=dict(
            embed_dim=width,
            depth=depth,
            num_heads=heads,
            global_attn_indexes=global_blocks,
            window_size=14,
        ),
        description=desc,
    )


_CONFIGS: dict[str, ModelConfig] = {}
ENCODER_KINDS = ("vit", "tiny_vit", "convnext")


def register_config(config: ModelConfig, overwrite: bool = False) -> None:
    """Make a custom architecture buildable by name.

    Example:
        >>> register_config(ModelConfig("my_vit", "vit", dict(embed_dim=128, depth=4,
        ...     num_heads=4, global_attn_indexes=(1, 3))), overwrite=True)
        >>> build_sam("my_vit").image_encoder.blocks[1].window_size
        0
    """
    if config.name in _CONFIGS and not overwrite:
        raise SegAnyError(f"a model configuration named {config.name!r} is already registered")
    if config.encoder not in ENCODER_KINDS:
        raise SegAnyError(f"unknown encoder kind {config.encoder!r} (use one of {', '.join(ENCODER_KINDS)})")
    _CONFIGS[config.name] = config


def model_configs() -> dict[str, ModelConfig]:
    """The registered configurations by name (a copy)."""
    return dict(_CONFIGS)


for _config in (
    _vit("vit_b", 768, 12, 12, (2, 5, 8, 11), "SAM ViT-B (93.7 M parameters)"),
    _vit("vit_l", 1024, 24, 16, (5, 11, 17, 23), "SAM ViT-L (312 M parameters)"),
    _vit("vit_h", 1280, 32, 16, (7, 15, 23, 31), "SAM ViT-H (641 M parameters)"),
    ModelConfig(
        name="vit_t",
        encoder="tiny_vit",
        encoder_kwargs=dict(
            embed_dims=(64, 128, 160, 320),
            depths=(2, 2, 6, 2),
            num_heads=(2, 4, 5, 10),
            window_sizes=(7, 7, 14, 7),
            mlp_ratio=4.0,
            mbconv_expand_ratio=4.0,
            local_conv_size=3,
        ),
        description="MobileSAM TinyViT (10.1 M parameters)",
    ),
    # segany's own model (see docs/model-card.md): a ConvNeXt encoder small enough to be
    # trained from scratch on a CPU, with SAM's prompt encoder and mask decoder.
    ModelConfig(
        name="segany_lite",
        encoder="convnext",
        encoder_kwargs=dict(dims=(32, 64, 128, 256), depths=(1, 2, 4, 2)),
        description="segany's own small model: ConvNeXt encoder + SAM decoder (6 M parameters)",
    ),
    # A deliberately tiny encoder with SAM's real prompt encoder and decoder: fast enough
    # for unit tests on a laptop CPU while exercising every interface.
    _vit("test_tiny", 64, 2, 2, (1,), "tiny random ViT for tests (not a useful model)"),
):
    register_config(_config)


def _build_encoder(config: ModelConfig) -> nn.Module:
    if config.encoder == "vit":
        kwargs = dict(
            img_size=config.image_size,
            patch_size=config.patch_size,
            out_chans=config.decoder_dim,
            mlp_ratio=4.0,
            qkv_bias=True,
            use_rel_pos=True,
        )
        kwargs.update(config.encoder_kwargs)
        return ImageEncoderViT(**kwargs)
    if config.encoder == "convnext":
        return ConvNeXtEncoder(img_size=config.image_size, out_chans=config.decoder_dim, **config.encoder_kwargs)
    return TinyViT(img_size=config.image_size, out_chans=config.decoder_dim, **config.encoder_kwargs)


def build_sam_from_config(config: ModelConfig) -> Sam:
    """Build a randomly initialised model of ``config`` (eval mode, CPU)."""
    grid = config.embedding_size
    sam = Sam(
        image_encoder=_build_encoder(config),
        prompt_encoder=PromptEncoder(
            embed_dim=config.decoder_dim,
            image_embedding_size=(grid, grid),
            input_image_size=(config.image_size, config.image_size),
            mask_in_chans=16,
        ),
        mask_decoder=MaskDecoder(
            transformer_dim=config.decoder_dim,
            transformer=TwoWayTransformer(
                depth=2, embedding_dim=config.decoder_dim, mlp_dim=config.decoder_mlp_dim,
                num_heads=config.decoder_heads,
            ),
            num_multimask_outputs=3,
            iou_head_depth=3,
            iou_head_hidden_dim=config.decoder_dim,
        ),
    )
    sam.model_type = config.name  # type: ignore[attr-defined]
    return sam.eval()


def resolve_device(device: str | torch.device | None) -> torch.device:
    """``None`` picks CUDA when available, else the CPU; strings are validated."""
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(device)
    except (RuntimeError, TypeError) as exc:
        raise SegAnyError(f"unknown device {device!r}: {exc}") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SegAnyError(f"device {str(device)!r} was requested but CUDA is not available here")
    return device


def build_sam(
    model_type: str = "vit_h",
    checkpoint: str | os.PathLike[str] | None = None,
    device: str | torch.device | None = None,
) -> Sam:
    """Build a SAM model, optionally loading weights, in eval mode.

    Args:
        model_type: a registered configuration: ``vit_b``, ``vit_l``, ``vit_h``, ``vit_t``,
            ``default`` (= ``vit_h``, as in the reference) or a custom name.
        checkpoint: a state-dict file (official, MobileSAM, micro-sam or segany's own); read
            with ``torch.load(weights_only=True)``; keys must match exactly.
        device: ``"cpu"``, ``"cuda"``, ... ; ``None`` keeps the model on the CPU.

    Example:
        >>> sam = build_sam("test_tiny")
        >>> sorted(k.split(".")[0] for k in sam.state_dict())[0]
        'image_encoder'
    """
    from . import checkpoints  # local import: checkpoints imports nothing from here

    if model_type == "default":
        model_type = "vit_h"
    if model_type not in _CONFIGS:
        known = ", ".join(sorted(_CONFIGS))
        raise SegAnyError(f"unknown model type {model_type!r}; known types: {known}")
    sam = build_sam_from_config(_CONFIGS[model_type])
    if checkpoint is not None:
        path = Path(checkpoint)
        state = checkpoints.load_state_dict(path, model_type=model_type)
        checkpoints.check_state_dict(sam.state_dict(), state, source=str(path), model_type=model_type)
        sam.load_state_dict(state, strict=True)
        sam.checkpoint_path = str(path)  # type: ignore[attr-defined]
    if device is not None:
        sam.to(resolve_device(device))
    return sam.eval()


def load_model(
    name_or_path: str | os.PathLike[str] | None = None,
    device: str | torch.device | None = None,
) -> Sam:
    """The one-call entry point: a registry name, a checkpoint path, or the default model.

    Args:
        name_or_path: a name from ``segany models`` (its file must be in the cache, see
            ``segany fetch``), or the path of a checkpoint file whose model type is
            recognised from its keys; ``None`` for segany's own small model, which ships
            inside the package (works offline; see ``docs/model-card.md``).
        device: as in :func:`build_sam`; ``None`` picks CUDA when available.

    Example:
        >>> sam = load_model(device="cpu")      # the shipped default, hash-checked
        >>> sam.model_type, tuple(sam.prompt_encoder.image_embedding_size)
        ('segany_lite', (64, 64))

    Official weights (after ``segany fetch sam_vit_b``)::

        sam = load_model("sam_vit_b")
    """
    from . import checkpoints

    if name_or_path is None:
        name_or_path = checkpoints.DEFAULT_MODEL  # shipped in the package: works offline
    path, model_type, _info = checkpoints.resolve_checkpoint(name_or_path)
    if model_type is None:
        model_type = infer_model_type(checkpoints.load_state_dict(path))
        if model_type is None:
            raise CheckpointError(
                f"{path}: cannot tell which model this checkpoint is for (it matches no "
                "registered configuration); register its configuration with "
                "segany.register_config, or call segany.build_sam(model_type, "
                f"checkpoint={str(path)!r})"
            )
    return build_sam(model_type, checkpoint=path, device=resolve_device(device))


def infer_model_type(state_dict: dict[str, torch.Tensor]) -> str | None:
    """The registered configuration whose parameters have exactly these names and shapes.

    Official layouts are recognised from their signature; custom configurations (segany's
    own models, a user's registered ones) by building each on the meta device (no memory)
    and comparing shapes.

    Example:
        >>> infer_model_type(build_sam("test_tiny").state_dict())
        'test_tiny'
    """
    from . import checkpoints

    guess = checkpoints.guess_model_type(state_dict)
    if guess is not None and guess in _CONFIGS:
        return guess
    shapes = {k: tuple(v.shape) for k, v in state_dict.items()}
    for name, config in _CONFIGS.items():
        with torch.device("meta"):
            try:
                candidate = build_sam_from_config(config)
            except Exception:  # a configuration that cannot be built on meta is not a match
                continue
        if {k: tuple(v.shape) for k, v in candidate.state_dict().items()} == shapes:
            return name
    return None
