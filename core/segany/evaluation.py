"""Benchmark promptable segmentation with the protocols of the SAM paper.

Any object with ``set_image(image)`` and ``predict(point_coords, point_labels, box,
mask_input, multimask_output) -> (masks, scores, low_res_logits)`` can be evaluated
(a :class:`~segany.SamPredictor`, the classical :class:`OtsuClickPredictor`, a test
oracle); automatic mode takes any callable ``image -> masks``. Protocols:

* ``point`` -- one positive click at the object's centre (the maximum of the distance
  transform of its mask), three candidate masks: the top-ranked one (highest predicted
  IoU, row ``point``) and the best of them against the ground truth (``point_oracle``);
* ``clicks`` -- interactive segmentation: first click at the centre, each next click at
  the centre of the largest error region (missed object: positive, spill: negative), the
  previous low-res logits fed back as ``mask_input``, single-mask output after click 1;
* ``box`` -- the object's tight bounding box, one mask;
* ``auto`` -- recall of automatic proposals: AR@100 and AR@1000 over IoU 0.50:0.05:0.95.

Each object gives rows ``(image, object_id, area, protocol, clicks, iou)``;
:class:`EvaluationResult` summarises them (mIoU per protocol and click count), prints a
table and writes CSV, JSON and a plot of mIoU against the number of clicks.

Example:
    >>> import numpy as np
    >>> from segany.datasets import Sample
    >>> labels = np.zeros((32, 32), np.uint16); labels[4:14, 4:24] = 1; labels[20:28, 6:12] = 2
    >>> image = np.where(labels > 0, 220, 20).astype(np.uint8)
    >>> result = evaluate([Sample(image, "toy", labels=labels)], OtsuClickPredictor(),
    ...                   ["point", "box"], min_area=1)
    >>> [(row["protocol"], row["objects"], row["mIoU"]) for row in result.summary()]
    [('point', 2, 1.0), ('point_oracle', 2, 1.0), ('box', 2, 1.0)]
"""

from __future__ import annotations

import argparse
import csv
import json
import sys
import warnings
import zlib
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np
from scipy import ndimage

from .datasets import InstanceDataset, Sample, rle_decode
from .errors import PromptError, SegAnyError

__all__ = [
    "AR_LIMITS",
    "AR_THRESHOLDS",
    "DEFAULT_PROTOCOLS",
    "PROTOCOLS",
    "EvaluationResult",
    "GroundTruth",
    "ObjectResult",
    "OtsuClickPredictor",
    "Promptable",
    "average_recall",
    "evaluate",
    "evaluate_auto",
    "evaluate_box",
    "evaluate_clicks",
    "evaluate_point",
    "mask_iou",
    "next_click",
    "object_centre",
    "otsu_threshold",
    "parse_protocols",
    "score_box",
    "score_clicks",
    "score_point",
    "score_proposals",
    "select_objects",
    "supports_batched_prompts",
]

PROTOCOLS = ("point", "clicks", "box", "auto")
# Automatic mode runs ~1000 prompts per image: opt-in, it is much slower than the others.
DEFAULT_PROTOCOLS = ("point", "clicks", "box")
AR_THRESHOLDS = tuple(float(t) for t in np.round(np.arange(0.5, 0.951, 0.05), 2))
AR_LIMITS = (100, 1000)
# Prompts per batched predict() call: bounds the B x 3 x H x W boolean output.
PROMPT_BATCH = 16
# Row order in summaries and tables.
_ROW_ORDER = ("point", "point_oracle", "clicks", "box")


class Promptable(Protocol):
    """What the prompt protocols need: SamPredictor's ``set_image`` and ``predict``."""

    def set_image(self, image: np.ndarray) -> None: ...

    def predict(
        self,
        point_coords: np.ndarray | None = None,
        point_labels: np.ndarray | None = None,
        box: np.ndarray | None = None,
        mask_input: np.ndarray | None = None,
        multimask_output: bool = True,
    ) -> tuple[Any, Any, Any]: ...


MaskGenerator = Callable[[np.ndarray], Any]


# --------------------------------------------------------------------------------------------
# Geometry of masks
# --------------------------------------------------------------------------------------------


def mask_iou(pred: np.ndarray, target: np.ndarray) -> float:
    """Intersection over union of two boolean masks (1.0 when both are empty).

    Example:
        >>> a = np.zeros((10, 30), bool); a[:, 2:22] = True   # 20 x 10 rectangle
        >>> b = np.zeros((10, 30), bool); b[:, 4:24] = True   # shifted by 2 px
        >>> round(mask_iou(a, b), 4) == round(18 * 10 / (22 * 10), 4)
        True
    """
    pred, target = np.asarray(pred, bool), np.asarray(target, bool)
    union = np.count_nonzero(pred | target)
    if union == 0:
        return 1.0
    return float(np.count_nonzero(pred & target) / union)


def _bbox_slices(mask: np.ndarray) -> tuple[slice, slice]:
    rows, cols = np.flatnonzero(mask.any(1)), np.flatnonzero(mask.any(0))
    return slice(rows[0], rows[-1] + 1), slice(cols[0], cols[-1] + 1)


def object_centre(mask: np.ndarray) -> tuple[int, int]:
    """``(x, y)`` of the pixel farthest from the mask's boundary (the image edge counts).

    Ties go to the first such pixel in raster order.

    Example:
        >>> m = np.zeros((9, 12), bool); m[2:7, 1:10] = True
        >>> object_centre(m)
        (3, 4)
    """
    mask = np.asarray(mask, bool)
    if not mask.any():
        raise SegAnyError("cannot place a click in an empty mask")
    rows, cols = _bbox_slices(mask)
    # Padding with background makes a region cut by the image edge end there too.
    dist = ndimage.distance_transform_edt(np.pad(mask[rows, cols], 1))[1:-1, 1:-1]
    y, x = np.unravel_index(int(np.argmax(dist)), dist.shape)
    return int(x + cols.start), int(y + rows.start)


def next_click(pred: np.ndarray, target: np.ndarray) -> tuple[int, int, int] | None:
    """The next simulated click: ``(x, y, label)`` at the centre of the largest error region.

    The largest connected region of missed object pixels (label 1) or of spilled
    background pixels (label 0), by area; a tie goes to the missed pixels. None when
    ``pred`` equals ``target``.

    Example:
        >>> gt = np.zeros((10, 20), bool); gt[2:8, 2:18] = True
        >>> pred = gt.copy(); pred[:, 10:] = False      # the right half is missed
        >>> next_click(pred, gt)
        (12, 4, 1)
    """
    pred, target = np.asarray(pred, bool), np.asarray(target, bool)
    best: tuple[int, np.ndarray, int] | None = None
    for region, label in ((target & ~pred, 1), (pred & ~target, 0)):
        components, count = ndimage.label(region)
        if count == 0:
            continue
        sizes = np.bincount(components.ravel())[1:]
        largest = int(np.argmax(sizes))
        if best is None or sizes[largest] > best[0]:
            best = (int(sizes[largest]), components == largest + 1, label)
    if best is None:
        return None
    x, y = object_centre(best[1])
    return x, y, best[2]


def average_recall(best_ious: Sequence[float], thresholds: Sequence[float] = AR_THRESHOLDS) -> float:
    """Recall averaged over IoU thresholds, from each object's best IoU with a proposal.

    Example:
        >>> average_recall([1.0, 1.0, 0.0, 0.0])
        0.5
        >>> average_recall([0.72])   # matched at 0.50 ... 0.70: 5 of 10 thresholds
        0.5
    """
    ious = np.asarray(best_ious, dtype=np.float64)
    if ious.size == 0:
        return float("nan")
    # The tolerance keeps an IoU of exactly 0.7 matched at the 0.7 threshold.
    return float(np.mean([np.mean(ious >= t - 1e-9) for t in thresholds]))


# --------------------------------------------------------------------------------------------
# Ground-truth objects
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True, eq=False)
class GroundTruth:
    """One ground-truth object: its id, ``H x W`` mask, area and bounding-box slices."""

    object_id: int
    mask: np.ndarray
    area: int
    slices: tuple[slice, slice]

    @classmethod
    def from_mask(cls, object_id: int, mask: np.ndarray) -> GroundTruth:
        """Example:
        >>> m = np.zeros((5, 5), bool); m[1:3, 2:5] = True
        >>> GroundTruth.from_mask(3, m).box.tolist()
        [2, 1, 4, 2]
        """
        mask = np.asarray(mask, bool)
        return cls(int(object_id), mask, int(mask.sum()), _bbox_slices(mask))

    @property
    def box(self) -> np.ndarray:
        """Tight box ``[x0, y0, x1, y1]`` with inclusive pixel indices, as SAM derives boxes."""
        rows, cols = self.slices
        return np.array([cols.start, rows.start, cols.stop - 1, rows.stop - 1])


def select_objects(
    sample: Sample,
    max_objects: int | None = 20,
    min_area: int = 10,
    seed: int = 0,
) -> list[GroundTruth]:
    """Objects of a sample to evaluate: at least ``min_area`` pixels, at most ``max_objects``.

    The random choice is seeded by ``seed`` and the sample's name, so an image gets the
    same objects whatever else is evaluated or in which order.

    Example:
        >>> labels = np.zeros((8, 8), np.uint8); labels[0, 0] = 1; labels[2:6, 2:6] = 2
        >>> [o.object_id for o in select_objects(Sample(labels, "s", labels=labels), min_area=2)]
        [2]
    """
    areas = sample.areas()
    ids = sorted(i for i, area in areas.items() if area >= min_area)
    if max_objects is not None and max_objects > 0 and len(ids) > max_objects:
        rng = np.random.default_rng([seed, zlib.crc32(sample.name.encode("utf-8"))])
        ids = sorted(int(i) for i in rng.choice(ids, size=max_objects, replace=False))
    return [GroundTruth.from_mask(i, sample.mask(i)) for i in ids]


# --------------------------------------------------------------------------------------------
# Calling a predictor
# --------------------------------------------------------------------------------------------


@dataclass
class _Output:
    """A predictor's answer to one prompt: ``C`` masks, scores and low-res logits."""

    masks: np.ndarray
    scores: np.ndarray
    logits: np.ndarray | None

    def top(self) -> int:
        return int(np.argmax(self.scores))


def _as_output(result: Any, shape: tuple[int, int]) -> _Output:
    masks, scores, logits = result
    masks = np.asarray(masks)
    if masks.ndim == 2:
        masks = masks[None]
    if masks.dtype != bool:
        masks = masks > 0  # logits or 0/1 masks: SAM's threshold is 0
    if masks.ndim != 3 or masks.shape[1:] != shape:
        raise SegAnyError(
            f"the predictor returned masks of shape {masks.shape} for an image of size "
            f"{shape[1]}x{shape[0]} (WxH); expected C x {shape[0]} x {shape[1]}"
        )
    scores = np.zeros(len(masks)) if scores is None else np.asarray(scores, np.float64).reshape(-1)
    if logits is not None:
        logits = np.asarray(logits, np.float32)
        logits = logits.reshape(len(masks), *logits.shape[-2:])
    return _Output(masks, scores, logits)


def _predict_all(
    predictor: Promptable,
    prompts: list[dict[str, np.ndarray]],
    multimask: bool,
    batched: bool,
    shape: tuple[int, int],
) -> list[_Output]:
    """Answer every prompt: one call each, or batched calls of ``PROMPT_BATCH``."""
    if not batched:
        return [_as_output(predictor.predict(**p, multimask_output=multimask), shape) for p in prompts]
    outputs = []
    for start in range(0, len(prompts), PROMPT_BATCH):
        chunk = prompts[start : start + PROMPT_BATCH]
        stacked = {key: np.stack([p[key] for p in chunk]) for key in chunk[0]}
        masks, scores, logits = predictor.predict(**stacked, multimask_output=multimask)
        for b in range(len(chunk)):
            outputs.append(_as_output((masks[b], scores[b], None if logits is None else logits[b]), shape))
    return outputs


def supports_batched_prompts(predictor: object) -> bool:
    """True for predictors that take ``B x N x 2`` points / ``B x 4`` boxes in one call.

    A predictor can say so with a ``supports_batched_prompts`` attribute; a
    :class:`~segany.SamPredictor` does.

    Example:
        >>> supports_batched_prompts(OtsuClickPredictor())
        False
    """
    flag = getattr(predictor, "supports_batched_prompts", None)
    if flag is not None:
        return bool(flag)
    from .predictor import SamPredictor

    return isinstance(predictor, SamPredictor)


def _point_prompt(coords: Sequence[Sequence[int]], labels: Sequence[int]) -> dict[str, np.ndarray]:
    return {
        "point_coords": np.asarray(coords, np.float64).reshape(-1, 2),
        "point_labels": np.asarray(labels, np.int64),
    }


# --------------------------------------------------------------------------------------------
# Results
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ObjectResult:
    """One measurement: an object under a protocol after ``clicks`` clicks (0: box, auto)."""

    image: str
    object_id: int
    area: int
    protocol: str
    clicks: int
    iou: float


def _row_key(protocol: str, clicks: int) -> tuple[int, int, str]:
    if protocol in _ROW_ORDER:
        return _ROW_ORDER.index(protocol), clicks, protocol
    if protocol.startswith("auto@"):
        return len(_ROW_ORDER), int(protocol.split("@")[1]), protocol
    return len(_ROW_ORDER) + 1, clicks, protocol


@dataclass
class EvaluationResult:
    """Per-object rows of an evaluation, with summaries, a table and file output.

    Example:
        >>> r = EvaluationResult([ObjectResult("a", 1, 50, "clicks", 1, 0.5),
        ...                       ObjectResult("a", 1, 50, "clicks", 2, 0.9),
        ...                       ObjectResult("a", 1, 50, "auto@100", 0, 0.8)])
        >>> r.miou("clicks", 2), r.average_recall(100)
        (0.9, 0.7)
        >>> print(r.table())
        protocol  clicks  objects  mIoU   AR
        clicks    1       1        0.500
        clicks    2       1        0.900
        auto@100  -       1        0.800  0.700
    """

    rows: list[ObjectResult] = field(default_factory=list)
    config: dict[str, Any] = field(default_factory=dict)

    def _groups(self) -> dict[tuple[str, int], list[float]]:
        groups: dict[tuple[str, int], list[float]] = {}
        for row in self.rows:
            groups.setdefault((row.protocol, row.clicks), []).append(row.iou)
        return dict(sorted(groups.items(), key=lambda item: _row_key(*item[0])))

    def summary(self) -> list[dict[str, Any]]:
        """One dict per (protocol, clicks): ``objects``, ``mIoU`` and ``AR`` (auto only)."""
        return [
            {
                "protocol": protocol,
                "clicks": clicks,
                "objects": len(ious),
                "mIoU": round(float(np.mean(ious)), 6),
                "AR": round(average_recall(ious), 6) if protocol.startswith("auto@") else None,
            }
            for (protocol, clicks), ious in self._groups().items()
        ]

    def miou(self, protocol: str, clicks: int | None = None) -> float:
        """Mean IoU of a protocol (after ``clicks`` clicks; default: the last click)."""
        rows = [r for r in self.rows if r.protocol == protocol]
        if not rows:
            raise SegAnyError(f"no results for protocol {protocol!r}")
        clicks = max(r.clicks for r in rows) if clicks is None else clicks
        ious = [r.iou for r in rows if r.clicks == clicks]
        if not ious:
            raise SegAnyError(f"no results for protocol {protocol!r} after {clicks} clicks")
        return float(np.mean(ious))

    def average_recall(self, limit: int = 100) -> float:
        """AR@limit of automatic mode."""
        ious = [r.iou for r in self.rows if r.protocol == f"auto@{limit}"]
        if not ious:
            raise SegAnyError(f"no results for automatic mode with {limit} proposals")
        return average_recall(ious)

    def table(self) -> str:
        """The summary as an aligned text table."""
        lines = [["protocol", "clicks", "objects", "mIoU", "AR"]]
        for row in self.summary():
            lines.append([
                row["protocol"],
                str(row["clicks"]) if row["clicks"] else "-",
                str(row["objects"]),
                f"{row['mIoU']:.3f}",
                "" if row["AR"] is None else f"{row['AR']:.3f}",
            ])
        widths = [max(len(line[i]) for line in lines) for i in range(len(lines[0]))]
        return "\n".join("  ".join(c.ljust(w) for c, w in zip(line, widths)).rstrip() for line in lines)

    def write_csv(self, path: str | Path) -> Path:
        """Per-object rows as CSV (``image, object_id, area, protocol, clicks, iou``)."""
        path = Path(path)
        with path.open("w", newline="", encoding="utf-8") as f:
            writer = csv.writer(f)
            writer.writerow(["image", "object_id", "area", "protocol", "clicks", "iou"])
            for r in self.rows:
                writer.writerow([r.image, r.object_id, r.area, r.protocol, r.clicks, f"{r.iou:.6f}"])
        return path

    def write_summary_csv(self, path: str | Path) -> Path:
        """The summary as CSV."""
        path = Path(path)
        with path.open("w", newline="", encoding="utf-8") as f:
            writer = csv.DictWriter(f, ["protocol", "clicks", "objects", "mIoU", "AR"])
            writer.writeheader()
            for row in self.summary():
                writer.writerow({k: "" if v is None else v for k, v in row.items()})
        return path

    def write_json(self, path: str | Path) -> Path:
        """Configuration, summary and per-object rows as one JSON document."""
        path = Path(path)
        document = {
            "config": self.config,
            "summary": self.summary(),
            "objects": [asdict(r) for r in self.rows],
        }
        path.write_text(json.dumps(document, indent=1, default=str), encoding="utf-8")
        return path

    def plot(self, path: str | Path) -> Path | None:
        """A PNG of mIoU against the number of clicks (None if nothing click-based ran).

        Uses matplotlib's Agg canvas directly, so no global backend is changed.
        """
        curves = self._plot_data()
        if not curves:
            return None
        try:
            from matplotlib.backends.backend_agg import FigureCanvasAgg
            from matplotlib.figure import Figure
        except ImportError:
            warnings.warn("matplotlib is not installed: no plot was written", stacklevel=2)
            return None
        fig = Figure(figsize=(5.5, 3.8), dpi=100)
        FigureCanvasAgg(fig)
        ax = fig.add_subplot()
        _draw_curves(ax, curves)
        title = " / ".join(Path(str(self.config[k])).name for k in ("model", "dataset") if self.config.get(k))
        if title:
            ax.set_title(title, fontsize=9)
        fig.tight_layout()
        path = Path(path)
        fig.savefig(path)
        return path

    def _plot_data(self) -> dict[str, tuple[list[int], list[float]]]:
        curves: dict[str, tuple[list[int], list[float]]] = {}
        for row in self.summary():
            if row["protocol"] in _ROW_ORDER:
                xs, ys = curves.setdefault(row["protocol"], ([], []))
                xs.append(row["clicks"])
                ys.append(row["mIoU"])
        return curves

    def save(self, outdir: str | Path) -> dict[str, Path]:
        """Write ``objects.csv``, ``summary.csv``, ``results.json`` and ``miou_vs_clicks.png``."""
        outdir = Path(outdir)
        try:
            outdir.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise SegAnyError(f"{outdir}: cannot create the output folder ({exc.strerror or exc})") from None
        files = {
            "objects": self.write_csv(outdir / "objects.csv"),
            "summary": self.write_summary_csv(outdir / "summary.csv"),
            "json": self.write_json(outdir / "results.json"),
        }
        plot = self.plot(outdir / "miou_vs_clicks.png")
        if plot is not None:
            files["plot"] = plot
        return files


_CURVE_STYLE = {
    "clicks": ("o-", "interactive clicks"),
    "point": ("s", "1 point, top-ranked mask"),
    "point_oracle": ("^", "1 point, oracle (best of 3)"),
}


def _draw_curves(ax: Any, curves: dict[str, tuple[list[int], list[float]]]) -> None:
    top = 1
    for protocol, (xs, ys) in curves.items():
        if protocol == "box":
            ax.axhline(ys[0], linestyle="--", color="grey", label="box")
            continue
        style, label = _CURVE_STYLE[protocol]
        ax.plot(xs, ys, style, label=label)
        top = max(top, *xs)
    ax.set_xlabel("number of clicks")
    ax.set_ylabel("mIoU")
    ax.set_ylim(0, 1.02)
    ax.set_xlim(0.5, top + 0.5)
    ax.set_xticks(range(1, top + 1))
    ax.grid(alpha=0.3)
    ax.legend(loc="lower right", fontsize=8)


# --------------------------------------------------------------------------------------------
# Protocols on one image (the image is already set on the predictor)
# --------------------------------------------------------------------------------------------


def score_point(
    predictor: Promptable, objects: Sequence[GroundTruth], image: str, *, batched: bool = False
) -> list[ObjectResult]:
    """Single centre click, multimask: rows ``point`` (top-ranked) and ``point_oracle``."""
    if not objects:
        return []
    shape = objects[0].mask.shape
    prompts = [_point_prompt([object_centre(o.mask)], [1]) for o in objects]
    rows = []
    for obj, out in zip(objects, _predict_all(predictor, prompts, True, batched, shape)):
        ious = [mask_iou(m, obj.mask) for m in out.masks]
        rows.append(ObjectResult(image, obj.object_id, obj.area, "point", 1, ious[out.top()]))
        rows.append(ObjectResult(image, obj.object_id, obj.area, "point_oracle", 1, max(ious)))
    return rows


def score_box(
    predictor: Promptable, objects: Sequence[GroundTruth], image: str, *, batched: bool = False
) -> list[ObjectResult]:
    """Tight bounding box, single-mask output: rows ``box``."""
    if not objects:
        return []
    shape = objects[0].mask.shape
    prompts = [{"box": o.box.astype(np.float64)} for o in objects]
    outputs = _predict_all(predictor, prompts, False, batched, shape)
    return [
        ObjectResult(image, obj.object_id, obj.area, "box", 0, mask_iou(out.masks[out.top()], obj.mask))
        for obj, out in zip(objects, outputs)
    ]


@dataclass
class _Session:
    """The state of one simulated interactive segmentation."""

    target: GroundTruth
    coords: list[tuple[int, int]]
    labels: list[int]
    mask: np.ndarray
    logits: np.ndarray | None
    ious: list[float]

    def prompt(self, with_logits: bool) -> dict[str, np.ndarray]:
        prompt = _point_prompt(self.coords, self.labels)
        if with_logits:
            prompt["mask_input"] = self.logits
        return prompt


def score_clicks(
    predictor: Promptable,
    objects: Sequence[GroundTruth],
    image: str,
    clicks: int = 5,
    *,
    batched: bool = False,
) -> list[ObjectResult]:
    """Interactive clicks (RITM / SAM protocol): rows ``clicks`` for 1..``clicks`` clicks.

    Click 1 at the centre with multimask output (the top-ranked mask is kept); each next
    click at the centre of the largest error region, with all earlier clicks, the kept
    mask's low-res logits as ``mask_input`` and single-mask output. Once a mask is exact
    its IoU is carried over to the remaining clicks.
    """
    if not objects or clicks < 1:
        return []
    shape = objects[0].mask.shape
    first = [_point_prompt([object_centre(o.mask)], [1]) for o in objects]
    sessions = []
    for obj, prompt, out in zip(objects, first, _predict_all(predictor, first, True, batched, shape)):
        k = out.top()
        logits = None if out.logits is None else out.logits[k][None]
        centre = tuple(int(v) for v in prompt["point_coords"][0])
        sessions.append(_Session(obj, [centre], [1], out.masks[k], logits, [mask_iou(out.masks[k], obj.mask)]))
    for _ in range(2, clicks + 1):
        _click_once(predictor, sessions, batched, shape)
    return [
        ObjectResult(image, s.target.object_id, s.target.area, "clicks", n, iou)
        for s in sessions
        for n, iou in enumerate(s.ious, start=1)
    ]


def _click_once(predictor: Promptable, sessions: list[_Session], batched: bool, shape: tuple[int, int]) -> None:
    """Add one simulated click to every unfinished session and record all IoUs."""
    active = []
    for session in sessions:
        click = next_click(session.mask, session.target.mask)
        if click is not None:
            session.coords.append(click[:2])
            session.labels.append(click[2])
            active.append(session)
    # Batched calls need the same inputs for every prompt: feed logits only if all have them.
    with_logits = all(s.logits is not None for s in active)
    outputs = _predict_all(predictor, [s.prompt(with_logits) for s in active], False, batched, shape)
    for session, out in zip(active, outputs):
        k = out.top()
        session.mask = out.masks[k]
        session.logits = None if out.logits is None else out.logits[k][None]
    for session in sessions:
        session.ious.append(mask_iou(session.mask, session.target.mask))


def _proposal_masks(proposals: Any, shape: tuple[int, int], limit: int) -> list[np.ndarray]:
    """The ``limit`` best-ranked proposal masks (by ``score``/``predicted_iou`` if given)."""
    items = list(proposals)  # records, masks, or the planes of an N x H x W array

    def score(item: Any) -> float:
        if isinstance(item, dict):
            for key in ("score", "predicted_iou"):
                if key in item:
                    return float(item[key])
        return 0.0

    # Stable sort: proposals without scores keep the generator's order.
    ranked = sorted(items, key=score, reverse=True)[:limit]
    masks = []
    for item in ranked:
        mask = item["segmentation"] if isinstance(item, dict) else item
        if isinstance(mask, dict):  # COCO RLE, as SAM's generator writes with output_mode="coco_rle"
            mask = rle_decode(mask)
        mask = np.asarray(mask, bool)
        if mask.shape != shape:
            raise SegAnyError(
                f"the mask generator returned a mask of shape {mask.shape} for an image of "
                f"size {shape[1]}x{shape[0]} (WxH)"
            )
        masks.append(mask)
    return masks


def score_proposals(
    proposals: Any,
    objects: Sequence[GroundTruth],
    image: str,
    limits: Sequence[int] = AR_LIMITS,
) -> list[ObjectResult]:
    """Best IoU of each object with the top-K proposals: rows ``auto@K`` for K in ``limits``.

    Any proposal may match an object (no one-to-one assignment), so this is the recall of
    objects by a set of candidates; :func:`average_recall` of a row group gives AR@K.

    Example:
        >>> gt = GroundTruth.from_mask(1, np.eye(4, dtype=bool))
        >>> proposals = [{"segmentation": np.eye(4, dtype=bool), "predicted_iou": 0.9}]
        >>> [(r.protocol, r.iou) for r in score_proposals(proposals, [gt], "x", limits=[1])]
        [('auto@1', 1.0)]
    """
    if not objects:
        return []
    masks = _proposal_masks(proposals, objects[0].mask.shape, max(limits))
    ious = np.zeros((len(masks), len(objects)))
    for p, mask in enumerate(masks):
        area = np.count_nonzero(mask)
        for j, obj in enumerate(objects):
            # Only the object's box can hold the intersection: cheap for small objects.
            inter = np.count_nonzero(mask[obj.slices] & obj.mask[obj.slices])
            if inter:
                ious[p, j] = inter / (area + obj.area - inter)
    rows = []
    for limit in limits:
        best = ious[:limit].max(axis=0) if len(masks) else np.zeros(len(objects))
        rows += [
            ObjectResult(image, obj.object_id, obj.area, f"auto@{limit}", 0, float(iou))
            for obj, iou in zip(objects, best)
        ]
    return rows


# --------------------------------------------------------------------------------------------
# Whole datasets
# --------------------------------------------------------------------------------------------


def parse_protocols(protocols: str | Iterable[str]) -> tuple[str, ...]:
    """Protocol names from ``"point,clicks"`` or a list, checked and de-duplicated.

    Example:
        >>> parse_protocols("box, point,box")
        ('box', 'point')
    """
    names = protocols.split(",") if isinstance(protocols, str) else list(protocols)
    result: list[str] = []
    for name in (n.strip() for n in names):
        if name and name not in result:
            result.append(name)
    unknown = [n for n in result if n not in PROTOCOLS]
    if unknown or not result:
        raise SegAnyError(f"unknown protocol(s) {unknown or protocols!r}; choose from {', '.join(PROTOCOLS)}")
    return tuple(result)


def _as_sample(item: Any, index: int) -> Sample:
    """A :class:`Sample` from a sample or an ``(image, labels or masks[, name])`` tuple."""
    if isinstance(item, Sample):
        return item
    if not isinstance(item, (tuple, list)) or len(item) not in (2, 3):
        raise SegAnyError(f"dataset item {index}: expected a Sample or (image, labels[, name])")
    image, target = item[0], item[1]
    name = str(item[2]) if len(item) == 3 else f"image{index}"
    target_array = None if isinstance(target, list) else np.asarray(target)
    if target_array is not None and target_array.ndim == 2 and target_array.dtype != bool:
        return Sample(np.asarray(image), name, labels=target_array)
    return Sample(np.asarray(image), name, instance_masks=list(target))


def _samples(dataset: Iterable[Any], max_images: int | None) -> tuple[Iterator[Sample], int | None]:
    if isinstance(dataset, InstanceDataset):
        subset = dataset[:max_images] if max_images is not None else dataset
        return iter(subset), len(subset)
    total = len(dataset) if hasattr(dataset, "__len__") else None  # type: ignore[arg-type]
    if max_images is not None:
        total = max_images if total is None else min(total, max_images)

    def generate() -> Iterator[Sample]:
        for i, item in enumerate(dataset):
            if max_images is not None and i >= max_images:
                return
            yield _as_sample(item, i)

    return generate(), total


def _progress(items: Iterator[Sample], total: int | None, enabled: bool) -> Iterator[Sample]:
    if not enabled:
        return items
    from tqdm import tqdm

    return iter(tqdm(items, total=total, unit="image", desc="segany eval", file=sys.stderr))


def evaluate(
    dataset: Iterable[Any],
    predictor: Promptable | None = None,
    protocols: str | Iterable[str] = DEFAULT_PROTOCOLS,
    *,
    mask_generator: MaskGenerator | None = None,
    clicks: int = 5,
    max_objects: int | None = 20,
    min_area: int = 10,
    max_images: int | None = None,
    seed: int = 0,
    batched: bool | None = None,
    progress: bool = False,
    config: dict[str, Any] | None = None,
) -> EvaluationResult:
    """Run protocols over a dataset; the image is encoded once for all prompt protocols.

    Args:
        dataset: an :class:`~segany.datasets.InstanceDataset`, or any iterable of
            :class:`~segany.datasets.Sample` or ``(image, labels or masks[, name])``.
        predictor: for ``point``, ``clicks`` and ``box``.
        protocols: names from :data:`PROTOCOLS` (a list or ``"point,box"``).
        mask_generator: for ``auto``: ``image -> masks`` (arrays, an ``N x H x W`` array,
            or records with ``segmentation`` and optionally ``predicted_iou``/``score``).
        clicks: number of clicks of the ``clicks`` protocol.
        max_objects: objects per image (seeded random choice); None or 0: all.
        min_area: smaller objects are ignored.
        max_images: evaluate only the first images.
        seed: seed of the object choice.
        batched: send all prompts of an image in batched calls; default: when the
            predictor supports it (:func:`supports_batched_prompts`).
        progress: show a progress bar on stderr.
        config: extra entries for :attr:`EvaluationResult.config` (model name, ...).
    """
    protocols = parse_protocols(protocols)
    prompted = [p for p in protocols if p != "auto"]
    if prompted and predictor is None:
        raise SegAnyError(f"protocols {', '.join(prompted)} need a predictor")
    if "auto" in protocols and mask_generator is None:
        raise SegAnyError("protocol 'auto' needs a mask generator (image -> masks)")
    if batched is None:
        batched = bool(prompted) and supports_batched_prompts(predictor)
    from . import __version__

    settings = dict(protocols=list(protocols), clicks=clicks, max_objects=max_objects,
                    min_area=min_area, max_images=max_images, seed=seed, segany_version=__version__)
    result = EvaluationResult(config={**settings, **(config or {})})
    samples, total = _samples(dataset, max_images)
    for sample in _progress(samples, total, progress):
        objects = select_objects(sample, max_objects, min_area, seed)
        if objects:
            result.rows += _evaluate_sample(sample, objects, predictor, mask_generator, protocols, clicks, batched)
    return result


def _evaluate_sample(
    sample: Sample,
    objects: list[GroundTruth],
    predictor: Promptable | None,
    mask_generator: MaskGenerator | None,
    protocols: Sequence[str],
    clicks: int,
    batched: bool,
) -> list[ObjectResult]:
    rows: list[ObjectResult] = []
    if any(p != "auto" for p in protocols):
        predictor.set_image(sample.image)  # type: ignore[union-attr]
    for protocol in protocols:
        if protocol == "point":
            rows += score_point(predictor, objects, sample.name, batched=batched)
        elif protocol == "clicks":
            rows += score_clicks(predictor, objects, sample.name, clicks, batched=batched)
        elif protocol == "box":
            rows += score_box(predictor, objects, sample.name, batched=batched)
        elif protocol == "auto":
            rows += score_proposals(mask_generator(sample.image), objects, sample.name)  # type: ignore[misc]
    return rows


def evaluate_point(predictor: Promptable, dataset: Iterable[Any], **kwargs: Any) -> EvaluationResult:
    """The single-point protocol over a dataset (keywords as in :func:`evaluate`)."""
    return evaluate(dataset, predictor, ["point"], **kwargs)


def evaluate_clicks(predictor: Promptable, dataset: Iterable[Any], clicks: int = 5, **kwargs: Any) -> EvaluationResult:
    """The interactive-clicks protocol over a dataset (keywords as in :func:`evaluate`)."""
    return evaluate(dataset, predictor, ["clicks"], clicks=clicks, **kwargs)


def evaluate_box(predictor: Promptable, dataset: Iterable[Any], **kwargs: Any) -> EvaluationResult:
    """The box protocol over a dataset (keywords as in :func:`evaluate`)."""
    return evaluate(dataset, predictor, ["box"], **kwargs)


def evaluate_auto(mask_generator: MaskGenerator, dataset: Iterable[Any], **kwargs: Any) -> EvaluationResult:
    """AR@100 / AR@1000 of a mask generator over a dataset (keywords as in :func:`evaluate`).

    Example:
        >>> labels = np.zeros((16, 16), np.uint8); labels[2:6, 2:6] = 1; labels[9:14, 8:15] = 2
        >>> first_only = lambda image: [labels == 1]
        >>> evaluate_auto(first_only, [(labels, labels)], min_area=1).average_recall(100)
        0.5
    """
    return evaluate(dataset, None, ["auto"], mask_generator=mask_generator, **kwargs)


# --------------------------------------------------------------------------------------------
# A classical baseline
# --------------------------------------------------------------------------------------------


def otsu_threshold(values: np.ndarray, bins: int = 256) -> float:
    """Otsu's threshold: ``values >= t`` and ``values < t`` have the most separated means.

    Example:
        >>> v = np.array([10.0] * 50 + [200.0] * 30)
        >>> 10 < otsu_threshold(v) <= 200
        True
    """
    values = np.asarray(values, np.float64).ravel()
    low, high = float(values.min()), float(values.max())
    if high <= low:
        return low
    hist, edges = np.histogram(values, bins=bins, range=(low, high))
    centres = (edges[:-1] + edges[1:]) / 2
    w0 = np.cumsum(hist)[:-1].astype(np.float64)
    w1 = values.size - w0
    s0 = np.cumsum(hist * centres)[:-1]
    m0 = s0 / np.maximum(w0, 1)
    m1 = (np.sum(hist * centres) - s0) / np.maximum(w1, 1)
    between = w0 * w1 * (m0 - m1) ** 2
    return float(edges[int(np.argmax(between)) + 1])


class OtsuClickPredictor:
    """Classical single-click baseline: Otsu threshold in a window around the click.

    The click's side of the threshold is the object; the connected component holding the
    click is the mask. When that component reaches the window's edge the window doubles
    (up to the whole image). Several positive clicks give the union of their components
    (clicks on the other side of the threshold than the first one add nothing); negative
    clicks and ``mask_input`` are ignored. A box is thresholded inside itself,
    the side found in a margin around the box being background; the largest component
    is kept. One mask is returned per call (score 1, no low-res logits).

    Example:
        >>> img = np.full((40, 40), 30, np.uint8); img[10:20, 5:30] = 200
        >>> p = OtsuClickPredictor(); p.set_image(img)
        >>> masks, scores, logits = p.predict(np.array([[12, 15]]), np.array([1]))
        >>> masks.shape, int(masks.sum()), logits is None
        ((1, 40, 40), 250, True)
        >>> int(p.predict(box=np.array([5, 10, 29, 19]), multimask_output=False)[0].sum())
        250
    """

    supports_batched_prompts = False

    def __init__(self, window: int = 64, smoothing: float = 1.0, box_margin: int = 4) -> None:
        """Args:
        window: side of the first window around a click, in pixels.
        smoothing: Gaussian sigma applied first, so noise does not fragment objects.
        box_margin: width of the ring around a box that shows the background.
        """
        self.window = max(3, int(window))
        self.smoothing = float(smoothing)
        self.box_margin = max(1, int(box_margin))
        self._grey: np.ndarray | None = None

    def set_image(self, image: np.ndarray, image_format: str = "RGB", **kwargs: Any) -> None:
        """Keep a smoothed grey version of the image (normalised like the models' input)."""
        from .image import prepare_image

        rgb = prepare_image(image, image_format=image_format, **kwargs).rgb
        grey = rgb.astype(np.float32).mean(axis=2)
        self._grey = ndimage.gaussian_filter(grey, self.smoothing) if self.smoothing > 0 else grey

    def predict(
        self,
        point_coords: np.ndarray | None = None,
        point_labels: np.ndarray | None = None,
        box: np.ndarray | None = None,
        mask_input: np.ndarray | None = None,
        multimask_output: bool = True,
        return_logits: bool = False,
    ) -> tuple[np.ndarray, np.ndarray, None]:
        """``(1 x H x W mask, [1.0], None)`` for a positive click (or several) and/or a box."""
        if self._grey is None:
            raise SegAnyError("no image is set: call set_image(...) first")
        mask = np.zeros(self._grey.shape, bool)
        used = False
        if box is not None:
            box = np.asarray(box, np.float64)
            if box.shape != (4,):
                raise PromptError(f"the baseline takes one box [x0, y0, x1, y1] per call, got shape {box.shape}")
            mask |= self._segment_box(box)
            used = True
        if point_coords is not None:
            coords = np.asarray(point_coords, np.float64)
            labels = np.ones(len(coords)) if point_labels is None else np.asarray(point_labels)
            if coords.ndim != 2 or coords.shape[1] != 2 or labels.shape != (len(coords),):
                raise PromptError("the baseline takes one prompt per call: N x 2 points and N labels")
            bright = None  # later clicks keep the first click's polarity
            for (x, y), label in zip(coords, labels):
                if label == 1:
                    part, bright = self._segment_click(int(round(x)), int(round(y)), bright)
                    mask |= part
                    used = True
        if not used:
            raise PromptError("the Otsu baseline needs a positive click or a box")
        return mask[None], np.ones(1, np.float32), None

    def _segment_click(self, x: int, y: int, bright: bool | None = None) -> tuple[np.ndarray, bool]:
        """The component holding a click, and the polarity used (True: object is bright).

        With ``bright`` given, a click on the other side of the threshold adds nothing.
        """
        grey = self._grey
        h, w = grey.shape
        x, y = min(max(x, 0), w - 1), min(max(y, 0), h - 1)
        half = self.window // 2
        mask = np.zeros((h, w), bool)
        while True:
            y0, y1, x0, x1 = max(0, y - half), min(h, y + half + 1), max(0, x - half), min(w, x + half + 1)
            window = grey[y0:y1, x0:x1]
            t = otsu_threshold(window)
            # Polarity: the side of the threshold the (first) click is on is the object.
            on_bright = bool(grey[y, x] >= t)
            if bright is not None and on_bright != bright:
                return mask, bright
            fg = window >= t if on_bright else window < t
            components, _ = ndimage.label(fg)
            comp = components == components[y - y0, x - x0]
            cut = (comp[0].any() and y0 > 0) or (comp[-1].any() and y1 < h) or (
                comp[:, 0].any() and x0 > 0) or (comp[:, -1].any() and x1 < w)
            if not cut or (y0 == 0 and x0 == 0 and y1 == h and x1 == w):
                break
            half *= 2
        mask[y0:y1, x0:x1] = comp
        return mask, on_bright

    def _segment_box(self, box: np.ndarray) -> np.ndarray:
        grey = self._grey
        h, w = grey.shape
        bx0, by0 = int(np.clip(np.floor(box[0]), 0, w - 1)), int(np.clip(np.floor(box[1]), 0, h - 1))
        bx1, by1 = int(np.clip(np.ceil(box[2]), bx0, w - 1)), int(np.clip(np.ceil(box[3]), by0, h - 1))
        m = self.box_margin
        y0, y1, x0, x1 = max(0, by0 - m), min(h, by1 + m + 1), max(0, bx0 - m), min(w, bx1 + m + 1)
        context = grey[y0:y1, x0:x1]
        above = context >= otsu_threshold(context)
        inside = np.zeros(context.shape, bool)
        inside[by0 - y0 : by1 - y0 + 1, bx0 - x0 : bx1 - x0 + 1] = True
        ring = above[~inside]
        # A tight box is touched by its object on all sides, so its own border cannot tell
        # object from background; the ring around it can (if the box is not the image).
        background_above = ring.mean() >= 0.5 if ring.size else above[inside].mean() < 0.5
        fg = (~above if background_above else above) & inside
        components, count = ndimage.label(fg)
        mask = np.zeros((h, w), bool)
        if count == 0:
            mask[by0 : by1 + 1, bx0 : bx1 + 1] = True
            return mask
        sizes = np.bincount(components.ravel())[1:]
        mask[y0:y1, x0:x1] = components == int(np.argmax(sizes)) + 1
        return mask


# --------------------------------------------------------------------------------------------
# Command line: segany eval
# --------------------------------------------------------------------------------------------


def automatic_generator(sam: Any) -> MaskGenerator:
    """``image -> records`` from :class:`segany.AutomaticMaskGenerator` for a model.

    Imported lazily: automatic mask generation lives in its own module.
    """
    try:
        from . import AutomaticMaskGenerator  # type: ignore[attr-defined]
    except ImportError:
        try:
            from .amg import AutomaticMaskGenerator  # type: ignore[no-redef]
        except ImportError:
            raise SegAnyError(
                "protocol 'auto' needs segany.AutomaticMaskGenerator, which this installation "
                "lacks; leave 'auto' out of --protocols, or call segany.evaluation.evaluate_auto "
                "with your own mask generator"
            ) from None
    generator = AutomaticMaskGenerator(sam)
    # SAM's reference generator has .generate(image); a plain callable works as well.
    return generator.generate if hasattr(generator, "generate") else generator


def load_evaluator(
    model: str | None, protocols: Sequence[str], device: str | None = None
) -> tuple[Promptable, MaskGenerator | None, str]:
    """``(predictor, mask generator or None, display name)`` for a ``--model`` value.

    ``"baseline"`` is the :class:`OtsuClickPredictor`, ``"test_tiny"`` the tiny random
    model used in tests; anything else goes to :func:`segany.load_model` (None: default).
    """
    if model == "baseline":
        if "auto" in protocols:
            raise SegAnyError("the Otsu baseline has no automatic mode; leave 'auto' out of --protocols")
        return OtsuClickPredictor(), None, "baseline (Otsu)"
    from .build import build_sam, load_model
    from .predictor import SamPredictor

    sam = build_sam("test_tiny", device=device) if model == "test_tiny" else load_model(model, device=device)
    generator = automatic_generator(sam) if "auto" in protocols else None
    return SamPredictor(sam), generator, model or "default"


def _positive(text: str) -> int:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"expected a number >= 0, got {text}")
    return value


def _cmd_eval(args: argparse.Namespace) -> int:
    from .datasets import open_dataset

    protocols = parse_protocols(args.protocols)
    dataset = open_dataset(args.dataset, args.partner, skip_bad=args.skip_bad)
    if args.max_images:
        dataset = dataset[: args.max_images]
    dataset.validate()  # report every bad file now, before a long run
    predictor, generator, name = load_evaluator(args.model, protocols, args.device)
    result = evaluate(
        dataset, predictor, protocols, mask_generator=generator, clicks=args.clicks,
        max_objects=args.max_objects or None, min_area=args.min_area, seed=args.seed,
        progress=not args.quiet, config={"dataset": str(args.dataset), "model": name},
    )
    if not result.rows:
        raise SegAnyError(f"{args.dataset}: no objects of at least {args.min_area} pixels to evaluate")
    print(result.table())
    for path in result.save(args.output).values():
        print(f"wrote {path}")
    return 0


def register_eval_command(subparsers: argparse._SubParsersAction) -> None:
    """Add ``segany eval DATASET [PARTNER] [--model ...] [--protocols ...] ...``."""
    parser = subparsers.add_parser(
        "eval",
        help="measure a model on a labelled dataset (SAM paper protocols)",
        description=(
            "Evaluate promptable segmentation on instance-labelled images: a single centre "
            "click (top-ranked and oracle mask), N interactive clicks, the bounding box, and "
            "optionally automatic-mode recall (AR@100/AR@1000). Prints a table and writes "
            "objects.csv, summary.csv, results.json and miou_vs_clicks.png."
        ),
    )
    parser.add_argument("dataset", help="dataset folder (images/ + labels/), image folder, or COCO .json")
    parser.add_argument(
        "partner", nargs="?", default=None,
        help="label folder (when DATASET is an image folder) or image folder (for a COCO .json)",
    )
    parser.add_argument(
        "--model", default=None,
        help="checkpoint name or path (default: segany's default model); 'baseline' for the "
        "Otsu click baseline, 'test_tiny' for the tiny random test model",
    )
    parser.add_argument(
        "--protocols", default=",".join(DEFAULT_PROTOCOLS),
        help=f"comma-separated, from {','.join(PROTOCOLS)} (default: %(default)s; auto is slow)",
    )
    parser.add_argument("--clicks", type=_positive, default=5, help="clicks of the clicks protocol (default 5)")
    parser.add_argument("--max-objects", type=_positive, default=20, help="objects per image, 0 = all (default 20)")
    parser.add_argument("--max-images", type=_positive, default=None, help="only the first N images")
    parser.add_argument("--min-area", type=_positive, default=10, help="ignore smaller objects (pixels, default 10)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the random object choice (default 0)")
    parser.add_argument("--skip-bad", action="store_true", help="skip bad files with a warning instead of stopping")
    parser.add_argument("--device", default=None, help="cpu, cuda, ... (default: CUDA when available)")
    parser.add_argument("-o", "--output", default="segany-eval", help="output folder (default: ./segany-eval)")
    parser.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    parser.set_defaults(func=_cmd_eval)
