"""The data engine: grow a training set with the model, as SAM's authors did.

Three stages (SAM paper, section 4), each a function here and a command line:

* **assisted-manual**: a person segments objects interactively (napari plugin) and every
  committed object is exported with :func:`write_sample` into a dataset folder
  (``images/``, ``labels/``, ``prompts/``, ``dataset.json``; see ``docs/dataset-format.md``);
* **fully automatic**: :func:`pseudo_label` (``segany pseudo-label``) runs automatic mask
  generation on unlabelled images, keeps confident and stable masks, resolves overlaps and
  writes the same dataset format, marked *partial* (pseudo-labels never cover everything);
  it is resumable (images already written are skipped) and every file is written
  atomically;
* **the loop**: :func:`engine_round` (``segany engine-round``) trains on the labelled data,
  pseudo-labels more images with the new model, and writes the configuration of the next
  training, which uses manual and pseudo labels together; :func:`merge_labels` completes
  partially labelled images (e.g. OpenStreetMap buildings) with pseudo-labels in the
  unlabelled parts only.

Example:
    >>> import tempfile
    >>> from segany.synthetic import shapes_scene
    >>> folder = Path(tempfile.mkdtemp())
    >>> image, labels = shapes_scene((64, 64), n_shapes=3, seed=1)
    >>> prompts = {1: [{"points": [[10, 12]], "labels": [1]}]}
    >>> _ = write_sample(folder, "scene1", image, labels, prompts=prompts)
    >>> sorted(p.name for p in folder.iterdir())
    ['dataset.json', 'images', 'labels', 'prompts']
    >>> read_manifest(folder)["samples"]["scene1"]["objects"] == len(np.unique(labels)) - 1
    True
"""

from __future__ import annotations

import datetime as _dt
import io
import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping, Protocol, Sequence

import numpy as np
from PIL import Image

from .errors import SegAnyError

__all__ = [
    "DATASET_FORMAT",
    "DATASET_VERSION",
    "MANIFEST_NAME",
    "MaskGenerator",
    "PseudoLabelReport",
    "write_sample",
    "read_manifest",
    "read_prompts",
    "resolve_overlaps",
    "filter_records",
    "pseudo_label",
    "merge_labels",
    "merge_datasets",
    "engine_round",
    "collect_images",
]

DATASET_FORMAT = "segany-dataset"
DATASET_VERSION = 1
MANIFEST_NAME = "dataset.json"
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._\-]*$")
_IMAGE_SUFFIXES = (".png", ".tif", ".tiff", ".jpg", ".jpeg", ".bmp")


class MaskGenerator(Protocol):
    """What :func:`pseudo_label` needs: ``generate(image) -> list of mask records``.

    Records have ``segmentation`` (``H x W`` bool), ``predicted_iou``, ``stability_score``,
    ``area`` and ``bbox`` (XYWH), as :class:`segany.AutomaticMaskGenerator` returns them.
    """

    def generate(self, image: np.ndarray) -> list[dict[str, Any]]: ...


# --------------------------------------------------------------------------------------------
# Writing the dataset format
# --------------------------------------------------------------------------------------------


def _atomic_bytes(path: Path, data: bytes) -> None:
    from .training.checkpointing import atomic_write

    atomic_write(path, lambda f: f.write(data))


def _png_bytes(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG")
    return buffer.getvalue()


def _image_for_png(image: np.ndarray, name: str) -> tuple[np.ndarray, dict[str, Any]]:
    """The array to store as PNG, and notes on any conversion (recorded in the manifest).

    uint8 grey/RGB/RGBA and uint16 grey are stored unchanged; anything else is converted to
    8-bit RGB with segany's normalisation (the value range is recorded).
    """
    array = np.asarray(image)
    if array.ndim == 3 and array.shape[2] == 1:
        array = array[..., 0]
    if array.dtype == np.uint8 and (array.ndim == 2 or (array.ndim == 3 and array.shape[2] in (3, 4))):
        return np.ascontiguousarray(array), {}
    if array.dtype == np.uint16 and array.ndim == 2:
        return np.ascontiguousarray(array), {}
    from .image import prepare_image

    prepared = prepare_image(array, name=name)
    return prepared.rgb, {"converted_from": str(array.dtype), "value_range": prepared.value_range}


def _check_name(name: str) -> str:
    name = str(name)
    if not _NAME.match(name):
        raise SegAnyError(
            f"sample name {name!r}: use letters, digits, '.', '_' and '-' only "
            "(it becomes a file name), starting with a letter or digit"
        )
    return name


def _check_labels(labels: np.ndarray, shape: tuple[int, int], name: str) -> np.ndarray:
    labels = np.asarray(labels)
    if labels.ndim != 2:
        raise SegAnyError(f"sample {name}: labels must be H x W, got shape {labels.shape}")
    if labels.shape != tuple(shape):
        raise SegAnyError(
            f"sample {name}: labels are {labels.shape[1]}x{labels.shape[0]} but the image is "
            f"{shape[1]}x{shape[0]} (width x height)"
        )
    if labels.dtype.kind not in "iub":
        raise SegAnyError(f"sample {name}: labels must be integers, got {labels.dtype}")
    if labels.size and (labels.min() < 0 or labels.max() > 65535):
        raise SegAnyError(f"sample {name}: label ids must be in 0..65535 (stored as 16-bit PNG)")
    return labels.astype(np.uint16)


def read_manifest(folder: str | os.PathLike[str]) -> dict[str, Any]:
    """The ``dataset.json`` of a dataset folder (a fresh one if the folder has none).

    Example:
        >>> read_manifest("/no/such/folder")["format"]
        'segany-dataset'
    """
    path = Path(folder) / MANIFEST_NAME
    if not path.exists():
        return {"format": DATASET_FORMAT, "version": DATASET_VERSION, "partial": False, "provenance": {}, "samples": {}}
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise SegAnyError(f"{path}: cannot be read ({exc})") from None
    if data.get("format") != DATASET_FORMAT:
        raise SegAnyError(f"{path}: not a segany dataset manifest (format {data.get('format')!r})")
    if int(data.get("version", 0)) > DATASET_VERSION:
        raise SegAnyError(f"{path}: dataset format version {data['version']} is newer than this segany reads ({DATASET_VERSION})")
    data.setdefault("samples", {})
    data.setdefault("provenance", {})
    return data


def _write_manifest(folder: Path, manifest: dict[str, Any]) -> None:
    _atomic_bytes(folder / MANIFEST_NAME, json.dumps(manifest, indent=1, sort_keys=False).encode())


def _json_prompts(prompts: Mapping[Any, Any]) -> dict[str, Any]:
    def plain(value: Any) -> Any:
        if isinstance(value, np.ndarray):
            return value.tolist()
        if isinstance(value, (np.integer, np.floating, np.bool_)):
            return value.item()
        if isinstance(value, Mapping):
            return {str(k): plain(v) for k, v in value.items()}
        if isinstance(value, (list, tuple)):
            return [plain(v) for v in value]
        return value

    return {str(int(k)): plain(v) for k, v in prompts.items()}


def write_sample(
    folder: str | os.PathLike[str],
    name: str,
    image: np.ndarray,
    labels: np.ndarray,
    prompts: Mapping[int, Any] | None = None,
    *,
    source: str | None = None,
    partial: bool | None = None,
    extra: Mapping[str, Any] | None = None,
) -> Path:
    """Add (or replace) one image with its instance labels in a dataset folder.

    This is what the napari plugin calls to export committed objects. Files are written
    atomically; the image and labels go first, the manifest entry last, so a sample listed
    in ``dataset.json`` is complete.

    Args:
        folder: the dataset folder (created if needed).
        name: sample name = file stem (letters, digits, ``._-``).
        image: ``H x W`` or ``H x W x 3/4``; uint8 and uint16-grey are stored unchanged,
            other types converted to 8-bit RGB (noted in the manifest).
        labels: ``H x W`` instance ids (0 = background, 1..65535 = objects).
        prompts: optional, per object id, the prompts that produced it: a list of records
            such as ``{"points": [[x, y], ...], "labels": [1, 0, ...], "box": [x0, y0, x1, y1]}``
            (pixel coordinates of the image; any extra keys are kept).
        source: where the image came from (a path, a layer name).
        partial: True if the image holds unlabelled objects (sets the dataset's flag).
        extra: more fields for the manifest entry.

    Returns:
        the path of the label file.
    """
    folder = Path(folder)
    name = _check_name(name)
    stored, notes = _image_for_png(image, name)
    labels16 = _check_labels(labels, stored.shape[:2], name)
    for sub in ("images", "labels"):
        (folder / sub).mkdir(parents=True, exist_ok=True)
    _atomic_bytes(folder / "images" / f"{name}.png", _png_bytes(stored))
    label_path = folder / "labels" / f"{name}.png"
    _atomic_bytes(label_path, _png_bytes(labels16))
    prompt_path = folder / "prompts" / f"{name}.json"
    if prompts:
        prompt_path.parent.mkdir(exist_ok=True)
        _atomic_bytes(prompt_path, json.dumps({"image": name, "objects": _json_prompts(prompts)}, indent=1).encode())
    elif prompt_path.exists():
        prompt_path.unlink()  # stale prompts of a replaced sample would describe other objects
    manifest = read_manifest(folder)
    entry: dict[str, Any] = {
        "objects": int(len(np.unique(labels16[labels16 > 0]))),
        "size": [int(stored.shape[1]), int(stored.shape[0])],
        "written": _now(),
    }
    if source is not None:
        entry["source"] = str(source)
    if prompts:
        entry["prompts"] = True
    entry.update(notes)
    entry.update(dict(extra or {}))
    manifest["samples"][name] = entry
    if partial:
        manifest["partial"] = True
    _write_manifest(folder, manifest)
    return label_path


def read_prompts(folder: str | os.PathLike[str], name: str) -> dict[int, Any]:
    """The prompts recorded for a sample by :func:`write_sample` (empty dict if none)."""
    path = Path(folder) / "prompts" / f"{name}.json"
    if not path.exists():
        return {}
    data = json.loads(path.read_text())
    return {int(k): v for k, v in data.get("objects", {}).items()}


def _now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


# --------------------------------------------------------------------------------------------
# From mask records to an instance label image
# --------------------------------------------------------------------------------------------


def filter_records(
    records: Sequence[Mapping[str, Any]],
    pred_iou_thresh: float = 0.88,
    stability_thresh: float = 0.95,
    min_area: int = 0,
) -> tuple[list[Mapping[str, Any]], dict[str, int]]:
    """Keep confident (predicted IoU) and stable masks of at least ``min_area`` pixels.

    Returns the kept records and how many each test rejected.

    Example:
        >>> m = np.ones((2, 2), bool)
        >>> recs = [{"segmentation": m, "predicted_iou": 0.9, "stability_score": 0.99},
        ...         {"segmentation": m, "predicted_iou": 0.5, "stability_score": 0.99}]
        >>> kept, why = filter_records(recs)
        >>> len(kept), why
        (1, {'candidates': 2, 'low_iou': 1, 'unstable': 0, 'small': 0})
    """
    kept = []
    why = {"candidates": len(records), "low_iou": 0, "unstable": 0, "small": 0}
    for r in records:
        if float(r.get("predicted_iou", 1.0)) < pred_iou_thresh:
            why["low_iou"] += 1
        elif float(r.get("stability_score", 1.0)) < stability_thresh:
            why["unstable"] += 1
        elif int(r.get("area", np.count_nonzero(r["segmentation"]))) < max(1, min_area):
            why["small"] += 1
        else:
            kept.append(r)
    return kept, why


def resolve_overlaps(
    masks: Sequence[np.ndarray],
    scores: Sequence[float],
    shape: tuple[int, int],
    min_area: int = 1,
    min_kept_fraction: float = 0.5,
    start_id: int = 1,
    occupied: np.ndarray | None = None,
) -> tuple[np.ndarray, list[int]]:
    """Paint masks into one label image, most confident first; each pixel keeps one object.

    A mask whose still-free part is below ``min_kept_fraction`` of its area (it is mostly a
    duplicate, or a whole of which the parts were already taken) or below ``min_area``
    pixels is dropped rather than kept as a fragment.

    Args:
        masks: ``H x W`` bool masks.
        scores: one score per mask (higher wins).
        shape: ``(H, W)``.
        start_id: id of the first kept object.
        occupied: pixels already taken (e.g. by manual labels); never overwritten.

    Returns:
        ``(labels uint16, kept)``: the label image and the indices of the kept masks (in
        the order of their ids).

    Example:
        >>> a = np.zeros((4, 4), bool); a[:, :3] = True
        >>> b = np.zeros((4, 4), bool); b[:, 2:] = True
        >>> lab, kept = resolve_overlaps([a, b], [0.9, 0.95], (4, 4))
        >>> lab[0].tolist(), kept      # b (more confident) is object 1; a keeps what is left
        ([2, 2, 1, 1], [1, 0])
    """
    labels = np.zeros(shape, np.uint16)
    taken = np.zeros(shape, bool) if occupied is None else occupied.astype(bool).copy()
    kept: list[int] = []
    next_id = start_id
    for i in np.argsort(-np.asarray(scores, dtype=np.float64), kind="stable"):
        mask = np.asarray(masks[i], bool)
        area = int(mask.sum())
        free = mask & ~taken
        n_free = int(free.sum())
        if area == 0 or n_free < max(1, min_area) or n_free < min_kept_fraction * area:
            continue
        if next_id > 65535:
            break
        labels[free] = next_id
        taken |= free
        kept.append(int(i))
        next_id += 1
    return labels, kept


# --------------------------------------------------------------------------------------------
# Fully automatic stage
# --------------------------------------------------------------------------------------------


@dataclass
class PseudoLabelReport:
    """What :func:`pseudo_label` did.

    Attributes:
        output: the dataset folder.
        written: names of the images labelled by this call.
        skipped: names already present (resumed run).
        empty: names where no mask passed the filters (recorded, no files written).
        objects: objects written by this call.
    """

    output: Path
    written: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    empty: list[str] = field(default_factory=list)
    objects: int = 0


def collect_images(paths: Iterable[str | os.PathLike[str]]) -> list[Path]:
    """Image files from files and folders (folders: their image files, sorted, not recursive).

    Raises a :class:`SegAnyError` that names every missing path, and one for duplicate
    names (the file stem becomes the sample name).
    """
    files: list[Path] = []
    missing = []
    for p in paths:
        path = Path(p)
        if path.is_dir():
            sub = path / "images" if (path / "images").is_dir() else path
            files += sorted(f for f in sub.iterdir() if f.is_file() and f.suffix.lower() in _IMAGE_SUFFIXES)
        elif path.is_file():
            files.append(path)
        else:
            missing.append(str(path))
    if missing:
        raise SegAnyError("image(s) not found: " + ", ".join(missing))
    seen: dict[str, Path] = {}
    for f in files:
        if f.stem in seen and seen[f.stem] != f:
            raise SegAnyError(f"two images named {f.stem!r}: {seen[f.stem]} and {f} (sample names must be unique)")
        seen[f.stem] = f
    if not files:
        raise SegAnyError("no image files given")
    return list(dict.fromkeys(files))


def _sample_done(folder: Path, manifest: dict[str, Any], name: str) -> bool:
    entry = manifest["samples"].get(name)
    if entry is None:
        return False
    if entry.get("objects", 0) == 0:
        return True
    return (folder / "images" / f"{name}.png").exists() and (folder / "labels" / f"{name}.png").exists()


def _safe_name(stem: str) -> str:
    name = re.sub(r"[^A-Za-z0-9._\-]", "_", stem)
    return name if _NAME.match(name) else f"img_{name}"


def _model_description(model: Any) -> dict[str, Any]:
    if model is None:
        return {}
    if isinstance(model, (str, os.PathLike)):
        return {"model": str(model)}
    sam = getattr(model, "model", model)
    return {
        "model": getattr(sam, "checkpoint_path", None) or getattr(sam, "model_type", type(sam).__name__),
        "model_type": getattr(sam, "model_type", None),
    }


def pseudo_label(
    images: Iterable[str | os.PathLike[str]],
    output: str | os.PathLike[str],
    *,
    model: Any = None,
    generator: MaskGenerator | None = None,
    pred_iou_thresh: float = 0.88,
    stability_thresh: float = 0.95,
    box_nms_thresh: float = 0.7,
    points_per_side: int = 32,
    min_area: int = 16,
    min_kept_fraction: float = 0.5,
    device: str | None = None,
    progress: bool = True,
    read_image: Callable[[Path], np.ndarray] | None = None,
) -> PseudoLabelReport:
    """Label images automatically and write them as a (partial) dataset folder.

    Per image: automatic mask generation, :func:`filter_records` (confident and stable),
    :func:`resolve_overlaps` (most confident first), then :func:`write_sample` with a
    ``prompts/`` record per object (the grid point that found it, its scores). Images
    already in the output (a previous, interrupted run) are skipped.

    Args:
        images: image files or folders.
        output: the dataset folder to write.
        model: a model name/checkpoint path (see ``segany models``), a loaded ``Sam`` or a
            ``SamPredictor``; used to build a :class:`segany.AutomaticMaskGenerator`.
        generator: a ready mask generator instead (anything with ``generate(image)``);
            its own thresholds apply first, then the ones given here.
        pred_iou_thresh, stability_thresh, box_nms_thresh, points_per_side: the automatic
            mask generator's settings (SAM's data engine: 0.88, 0.95, 0.7, 32).
        min_area: smallest object kept (pixels).
        min_kept_fraction: see :func:`resolve_overlaps`.
        progress: show a progress bar.

    Returns:
        a :class:`PseudoLabelReport`.
    """
    from .datasets import read_image as default_reader

    read = read_image or default_reader
    output = Path(output)
    files = collect_images(images)
    provenance = {
        **_model_description(model if generator is None else getattr(generator, "predictor", model)),
        "generator": type(generator).__name__ if generator is not None else "AutomaticMaskGenerator",
        "pred_iou_thresh": pred_iou_thresh,
        "stability_thresh": stability_thresh,
        "box_nms_thresh": box_nms_thresh,
        "points_per_side": points_per_side,
        "min_area": min_area,
        "min_kept_fraction": min_kept_fraction,
    }
    manifest = read_manifest(output)
    old = manifest.get("provenance", {}).get("pseudo_label")
    if old is not None:
        changed = {k: (old.get(k), v) for k, v in provenance.items() if k != "model" and old.get(k) != v}
        if changed:
            raise SegAnyError(
                f"{output}: already holds pseudo-labels made with other settings "
                f"({', '.join(f'{k}: {a} -> {b}' for k, (a, b) in changed.items())}); "
                "write to a new folder, or use the same settings to resume"
            )
    report = PseudoLabelReport(output=output)
    todo = []
    for f in files:
        name = _safe_name(f.stem)
        if _sample_done(output, manifest, name):
            report.skipped.append(name)
        else:
            todo.append((name, f))
    if not todo:
        return report
    if generator is None:
        generator = _make_generator(model, device, pred_iou_thresh, stability_thresh, box_nms_thresh, points_per_side)
    output.mkdir(parents=True, exist_ok=True)
    manifest["partial"] = True
    manifest.setdefault("provenance", {})["pseudo_label"] = {**provenance, "started": _now()}
    _write_manifest(output, manifest)

    from tqdm.auto import tqdm

    for name, path in tqdm(todo, desc="segany pseudo-label", unit="image", disable=not progress):
        try:
            image = read(path)
        except SegAnyError:
            raise
        except Exception as exc:
            raise SegAnyError(f"{path}: cannot be read as an image ({exc})") from None
        records = generator.generate(image)
        kept, why = filter_records(records, pred_iou_thresh, stability_thresh, min_area)
        shape = tuple(np.asarray(image).shape[:2])
        scores = [float(r.get("predicted_iou", 1.0)) * float(r.get("stability_score", 1.0)) for r in kept]
        labels, order = resolve_overlaps([_as_mask(r["segmentation"], shape) for r in kept], scores, shape, min_area, min_kept_fraction)
        why["overlap"] = len(kept) - len(order)
        entry = {"source": str(path), "candidates": why["candidates"], "rejected": {k: v for k, v in why.items() if k != "candidates"}}
        if not order:
            # Nothing confident: remember it (so a resumed run skips it) but write no files.
            manifest = read_manifest(output)
            manifest["samples"][name] = {"objects": 0, **entry, "written": _now()}
            _write_manifest(output, manifest)
            report.empty.append(name)
            continue
        prompts = {
            obj_id: [{
                "pseudo": True,
                "points": [list(map(float, p)) for p in kept[i].get("point_coords", [])],
                "labels": [1] * len(kept[i].get("point_coords", [])),
                "predicted_iou": float(kept[i].get("predicted_iou", float("nan"))),
                "stability_score": float(kept[i].get("stability_score", float("nan"))),
            }]
            for obj_id, i in enumerate(order, start=1)
        }
        write_sample(output, name, image, labels, prompts, source=str(path), partial=True, extra=entry)
        report.written.append(name)
        report.objects += len(order)
    manifest = read_manifest(output)
    manifest["provenance"]["pseudo_label"]["finished"] = _now()
    manifest["provenance"]["pseudo_label"]["objects"] = int(sum(s.get("objects", 0) for s in manifest["samples"].values()))
    _write_manifest(output, manifest)
    return report


def _as_mask(segmentation: Any, shape: tuple[int, ...]) -> np.ndarray:
    if isinstance(segmentation, dict):
        from .datasets import rle_decode

        return rle_decode(segmentation).astype(bool)
    mask = np.asarray(segmentation, bool)
    if mask.shape != tuple(shape):
        raise SegAnyError(f"mask generator returned a {mask.shape} mask for a {shape} image")
    return mask


def _make_generator(model: Any, device: str | None, pred_iou: float, stability: float, nms: float, points: int) -> MaskGenerator:
    from . import AutomaticMaskGenerator  # the automatic mode of segany.amg

    if model is None:
        from .build import load_model

        model = load_model(None)  # raises the "which model?" help
    if isinstance(model, (str, os.PathLike)):
        model = _load_any_model(model, device)
    return AutomaticMaskGenerator(
        model,
        points_per_side=points,
        pred_iou_thresh=pred_iou,
        stability_score_thresh=stability,
        box_nms_thresh=nms,
        output_mode="binary_mask",
    )


def _load_any_model(name_or_path: str | os.PathLike[str], device: str | None):
    """A registry name, an official checkpoint, or a model trained by segany (with sidecar)."""
    from .training.checkpointing import load_trained_model, read_model_info

    path = Path(name_or_path)
    if path.is_file() and read_model_info(path):
        return load_trained_model(path, device=device)
    from .build import load_model

    return load_model(name_or_path, device=device)


# --------------------------------------------------------------------------------------------
# Merging manual and pseudo labels
# --------------------------------------------------------------------------------------------


def merge_labels(
    manual: np.ndarray,
    pseudo: np.ndarray,
    max_overlap: float = 0.1,
    min_area: int = 16,
) -> np.ndarray:
    """Complete partial manual labels with pseudo-labelled objects where nothing is labelled.

    Manual objects are kept unchanged. A pseudo object is added (clipped to unlabelled
    pixels, new id) only if at most ``max_overlap`` of it lies on manual objects: it is then
    an object the annotator did not label, not a second opinion on one they did.

    Example:
        >>> manual = np.zeros((4, 6), np.uint16); manual[:, :2] = 1
        >>> pseudo = np.zeros((4, 6), np.uint16); pseudo[:, 1:3] = 1; pseudo[:, 4:] = 2
        >>> merge_labels(manual, pseudo, min_area=1)[0].tolist()
        [1, 1, 0, 0, 2, 2]
    """
    manual = np.asarray(manual)
    pseudo = np.asarray(pseudo)
    if manual.shape != pseudo.shape:
        raise SegAnyError(f"manual labels {manual.shape} and pseudo-labels {pseudo.shape} differ in size")
    out = manual.astype(np.uint32).copy()
    labelled = manual > 0
    next_id = int(manual.max()) + 1
    for pid in np.unique(pseudo[pseudo > 0]):
        mask = pseudo == pid
        area = int(mask.sum())
        if area == 0 or (mask & labelled).sum() > max_overlap * area:
            continue
        free = mask & ~labelled
        if free.sum() < min_area:
            continue
        out[free] = next_id
        labelled |= free
        next_id += 1
    if next_id > 65536:
        raise SegAnyError("merged labels exceed 65535 objects")
    return out.astype(np.uint16)


def merge_datasets(
    manual: str | os.PathLike[str],
    pseudo: str | os.PathLike[str],
    output: str | os.PathLike[str],
    max_overlap: float = 0.1,
    min_area: int = 16,
) -> Path:
    """Merge two dataset folders: images in both get :func:`merge_labels`, others are copied.

    The output is marked partial if either input is.
    """
    from .datasets import read_image as read, read_labels

    manual, pseudo, output = Path(manual), Path(pseudo), Path(output)
    names_m = {p.stem: p for p in (manual / "labels").glob("*.png")}
    names_p = {p.stem: p for p in (pseudo / "labels").glob("*.png")}
    partial = read_manifest(manual).get("partial", False) or read_manifest(pseudo).get("partial", False)
    for name in sorted(set(names_m) | set(names_p)):
        base = manual if name in names_m else pseudo
        image_path = next((base / "images").glob(f"{name}.*"), None)
        if image_path is None:
            raise SegAnyError(f"{base}: label {name}.png has no image in images/")
        image = read(image_path)
        if name in names_m and name in names_p:
            labels = merge_labels(read_labels(names_m[name]), read_labels(names_p[name]), max_overlap, min_area)
            origin = "manual+pseudo"
        else:
            labels = read_labels(names_m.get(name) or names_p[name])
            origin = "manual" if name in names_m else "pseudo"
        prompts = read_prompts(base, name)
        write_sample(output, name, image, labels, prompts or None, source=str(image_path), partial=partial, extra={"origin": origin})
    manifest = read_manifest(output)
    manifest["provenance"]["merged_from"] = [str(manual), str(pseudo)]
    _write_manifest(output, manifest)
    return output


# --------------------------------------------------------------------------------------------
# The loop
# --------------------------------------------------------------------------------------------


def engine_round(
    config: str | os.PathLike[str],
    unlabelled: Iterable[str | os.PathLike[str]],
    round_dir: str | os.PathLike[str],
    *,
    pred_iou_thresh: float = 0.88,
    stability_thresh: float = 0.95,
    points_per_side: int = 32,
    resume: bool = True,
    generator_factory: Callable[[Any], MaskGenerator] | None = None,
    progress: bool = True,
) -> Path:
    """One round of the data engine: train, pseudo-label, write the next configuration.

    1. train with ``config`` (its ``output_dir`` is replaced by ``round_dir/train``);
    2. pseudo-label ``unlabelled`` with the trained model into ``round_dir/pseudo``;
    3. write ``round_dir/next.yaml``: the same configuration, its training data plus the
       pseudo-labelled folder as a ``partial`` source, its output in ``round_dir/next``.

    Every step resumes (training from its resume file, pseudo-labelling image by image), so
    an interrupted round is simply run again. Returns the path of ``next.yaml``; run
    ``segany train --config next.yaml`` (or another round with it).
    """
    from .training import load_config, train
    from .training.config import DataSource

    round_dir = Path(round_dir)
    cfg = load_config(config, {"output_dir": str((round_dir / "train").resolve())})
    cfg.progress = progress
    result = train(cfg, resume=resume)
    from .training.checkpointing import load_trained_model

    sam = load_trained_model(result.model_path)
    generator = generator_factory(sam) if generator_factory is not None else None
    pseudo_dir = round_dir / "pseudo"
    pseudo_label(
        unlabelled, pseudo_dir, model=sam, generator=generator, pred_iou_thresh=pred_iou_thresh,
        stability_thresh=stability_thresh, points_per_side=points_per_side, progress=progress,
    )
    next_cfg = load_config(config, {"output_dir": str((round_dir / "next").resolve())})
    next_cfg.data.train = [s for s in next_cfg.data.train if s.path != str(pseudo_dir.resolve())]
    if any((pseudo_dir / "labels").glob("*.png")):
        next_cfg.data.train.append(DataSource(path=str(pseudo_dir.resolve()), kind="folder", partial=True))
    next_cfg.model.checkpoint = str(Path(result.model_path).resolve())
    next_path = round_dir / "next.yaml"
    next_cfg.to_yaml(next_path)
    return next_path
