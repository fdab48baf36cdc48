"""Model checkpoints in the official layout, and resume files for interrupted runs.

Two kinds of file, on purpose:

* **model checkpoints** (``model.pt``, ``best.pt``): the flat ``state_dict()`` of the
  :class:`~segany.modeling.Sam`, nothing else, exactly like the official files, so
  ``segany.build_sam(config, checkpoint=path)`` -- and, for official configurations, the
  reference ``segment_anything`` / MobileSAM registries -- load them with ``strict=True``.
  A small JSON sidecar (``model.json``) records the configuration name, a custom
  architecture if any, the step and the validation metrics; :func:`load_trained_model` uses
  it to rebuild custom architectures.
* **resume files** (``resume.pt``): optimizer, scheduler, scaler, step, RNG states and the
  training configuration.

Both are written atomically (a temporary file in the same folder, then ``os.replace``):
a run killed while saving leaves the previous file intact, never half a file.

Example:
    >>> import tempfile, segany
    >>> folder = Path(tempfile.mkdtemp())
    >>> path = save_model(segany.build_sam("test_tiny"), folder / "model.pt", step=3)
    >>> sam = load_trained_model(path)
    >>> sam.model_type, read_model_info(path)["step"]
    ('test_tiny', 3)
"""

from __future__ import annotations

import json
import os
import random
import tempfile
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..build import ModelConfig, build_sam, model_configs, register_config
from ..errors import CheckpointError
from ..modeling import Sam

__all__ = [
    "atomic_write",
    "save_model",
    "read_model_info",
    "load_trained_model",
    "load_weights",
    "save_resume",
    "load_resume",
    "rng_state",
    "set_rng_state",
    "OFFICIAL_CONFIGS",
]

OFFICIAL_CONFIGS = ("vit_b", "vit_l", "vit_h", "vit_t")


def atomic_write(path: str | os.PathLike[str], write: Any) -> Path:
    """Call ``write(file_object)`` on a temporary file next to ``path``, then rename it.

    Example:
        >>> import tempfile
        >>> p = atomic_write(Path(tempfile.mkdtemp()) / "x.txt", lambda f: f.write(b"hi"))
        >>> p.read_bytes()
        b'hi'
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        # Also on KeyboardInterrupt: never leave a stray temporary file behind.
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return path


def _sidecar(path: Path) -> Path:
    return path.with_suffix(".json")


def save_model(
    sam: Sam,
    path: str | os.PathLike[str],
    *,
    step: int | None = None,
    metrics: dict[str, float] | None = None,
    extra: dict[str, Any] | None = None,
) -> Path:
    """Write ``sam.state_dict()`` (on the CPU, flat, official key names) and its JSON sidecar.

    Returns the checkpoint path.
    """
    path = Path(path)
    state = {k: v.detach().to("cpu").clone() for k, v in sam.state_dict().items()}
    atomic_write(path, lambda f: torch.save(state, f))
    model_type = getattr(sam, "model_type", None)
    info: dict[str, Any] = {"model_type": model_type, "step": step, "metrics": metrics or {}}
    config = model_configs().get(model_type) if model_type else None
    if config is not None and model_type not in OFFICIAL_CONFIGS:
        # Custom architectures are not known to a fresh process: keep their definition.
        info["architecture"] = _config_dict(config)
    info.update(extra or {})
    atomic_write(_sidecar(path), lambda f: f.write(json.dumps(info, indent=2).encode()))
    return path


def _config_dict(config: ModelConfig) -> dict[str, Any]:
    data = asdict(config)
    data["encoder_kwargs"] = {
        k: list(v) if isinstance(v, tuple) else v for k, v in data["encoder_kwargs"].items()
    }
    return data


def config_from_dict(data: dict[str, Any]) -> ModelConfig:
    """A :class:`ModelConfig` from its dict form (lists back to tuples)."""
    data = dict(data)
    data["encoder_kwargs"] = {
        k: tuple(v) if isinstance(v, list) else v for k, v in dict(data.get("encoder_kwargs", {})).items()
    }
    try:
        return ModelConfig(**data)
    except TypeError as exc:
        raise CheckpointError(f"invalid architecture description: {exc}") from None


def read_model_info(path: str | os.PathLike[str]) -> dict[str, Any]:
    """The sidecar of a checkpoint written by :func:`save_model` (empty dict if none)."""
    sidecar = _sidecar(Path(path))
    if not sidecar.exists():
        return {}
    try:
        return json.loads(sidecar.read_text())
    except (OSError, ValueError) as exc:
        raise CheckpointError(f"{sidecar}: cannot be read ({exc})") from None


def register_architecture(name: str, architecture: dict[str, Any]) -> ModelConfig:
    """Register a custom architecture (from a sidecar or a training configuration).

    Re-registering the same definition is a no-op; a different definition under a name
    that is already taken is an error (it would silently change what the name builds).
    """
    config = config_from_dict({**architecture, "name": name})
    known = model_configs().get(name)
    if known is not None:
        if _config_dict(known) != _config_dict(config):
            raise CheckpointError(
                f"model configuration {name!r} is already registered with another architecture; "
                "choose a new name for the custom architecture"
            )
        return known
    register_config(config)
    return config


def load_trained_model(path: str | os.PathLike[str], device: str | torch.device | None = None) -> Sam:
    """Load a checkpoint written by the trainer, registering its architecture if needed.

    Official configurations need no sidecar: ``segany.build_sam(config, checkpoint=path)``
    works too; this function also knows custom ones.
    """
    path = Path(path)
    info = read_model_info(path)
    model_type = info.get("model_type")
    if "architecture" in info:
        register_architecture(model_type, info["architecture"])
    if model_type is None:
        from ..build import infer_model_type
        from ..checkpoints import load_state_dict

        model_type = infer_model_type(load_state_dict(path))
        if model_type is None:
            raise CheckpointError(
                f"{path}: no model.json sidecar and the weights match no registered "
                "configuration; pass the configuration name to segany.build_sam"
            )
    if model_type in OFFICIAL_CONFIGS:
        return build_sam(model_type, checkpoint=path, device=device)
    sam = build_sam(model_type)
    load_weights(sam, path)
    if device is not None:
        from ..build import resolve_device

        sam.to(resolve_device(device))
    return sam.eval()


def load_weights(sam: Sam, path: str | os.PathLike[str]) -> Sam:
    """Load a flat checkpoint into ``sam`` (strict), checking names and shapes first.

    Unlike ``build_sam(name, checkpoint=...)`` this does not ask the file which official
    type it looks like, so custom architectures whose encoder resembles an official one (a
    small TinyViT looks like ``vit_t``) load too.
    """
    from ..checkpoints import check_state_dict, load_state_dict

    path = Path(path)
    state = load_state_dict(path)
    check_state_dict(sam.state_dict(), state, source=str(path))
    sam.load_state_dict(state, strict=True)
    sam.checkpoint_path = str(path)  # type: ignore[attr-defined]
    return sam


# --------------------------------------------------------------------------------------------
# Resume files
# --------------------------------------------------------------------------------------------


def rng_state() -> dict[str, Any]:
    """Python, numpy (legacy global) and torch RNG states (CPU and every CUDA device)."""
    state: dict[str, Any] = {
        "python": random.getstate(),
        "numpy": np.random.get_state(),
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    """Restore what :func:`rng_state` captured."""
    random.setstate(_tuples(state["python"]))
    np.random.set_state(_tuples(state["numpy"]))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _tuples(value: Any) -> Any:
    # Serialisation may turn the nested tuples of getstate() into lists.
    if isinstance(value, list):
        return tuple(_tuples(v) for v in value)
    return value


def save_resume(path: str | os.PathLike[str], payload: dict[str, Any]) -> Path:
    """Write a resume file atomically (``payload``: any torch-serialisable dict)."""
    return atomic_write(path, lambda f: torch.save(payload, f))


def load_resume(path: str | os.PathLike[str]) -> dict[str, Any]:
    """Read a resume file written by :func:`save_resume`.

    Unlike model checkpoints this file holds optimizer states and numpy RNG arrays, so it is
    read with ``weights_only=False``: only resume runs from your own output folders.
    """
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"{path}: no resume file (nothing to resume; start without resume)")
    try:
        return torch.load(path, map_location="cpu", weights_only=False)
    except Exception as exc:
        raise CheckpointError(f"{path}: the resume file cannot be read ({exc}); delete it to start over") from None
