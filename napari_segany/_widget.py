"""The "Segment Anything" dock widget: wires napari layers and worker threads to segany's core.

All segmentation logic lives in :mod:`segany.interactive` (one
:class:`~segany.interactive.InteractiveSession` per image, owned by this widget); this module
only turns layer events into session calls, runs the slow calls off the GUI thread and shows
the results.

Threads: the image encoder, model loading, propagation and automatic segmentation run in
napari ``thread_worker``s with a progress bar in napari's activity dock; decoding a prompt
(tens of milliseconds) runs in a light superqt worker, one at a time, and a prompt changed
meanwhile is decoded next (older pending prompts are never decoded: only the newest counts).

Decoding ahead of the click: when the pointer rests on the image (points layer in add mode,
embedding cached), the prompt a click there would give is decoded in the same worker and
kept by the session (:meth:`~segany.interactive.InteractiveSession.speculate`); the click on
that pixel then shows its mask at once, without waiting for the decoder. Nothing is shown
while hovering; only clicks change the object.

Keys (on the viewer and on segany's layers):

=========================  =====================================================
Click (points layer)        positive point (inside the object)
Shift/Ctrl + click          negative point (outside the object)
T                           toggle whether new points are positive or negative
R (boxes layer)             draw a rectangle: a box prompt
N / Shift+N                 next / previous candidate mask
C                           commit the object into the output labels (new id)
Escape                      clear the current object
U                           undo the last commit
=========================  =====================================================
"""

from __future__ import annotations

import re
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

import numpy as np
from napari.qt.threading import create_worker
from napari.utils.notifications import show_error, show_info, show_warning
from qtpy.QtCore import QTimer, Signal
from qtpy.QtWidgets import (
    QCheckBox,
    QComboBox,
    QDoubleSpinBox,
    QFileDialog,
    QFormLayout,
    QGroupBox,
    QHBoxLayout,
    QLabel,
    QPushButton,
    QSpinBox,
    QVBoxLayout,
    QWidget,
)
from superqt.utils import create_worker as create_light_worker

from segany.errors import SegAnyError
from segany.interactive import (
    CachedRaster,
    Cancelled,
    EmbeddingCache,
    InteractiveSession,
    PredictorLike,
    automatic_mask_generator_class,
    box_for_slice,
    device_choices,
    export_training_data,
    make_predictor,
    model_choices,
    points_for_slice,
)

if TYPE_CHECKING:
    import napari
    from napari.layers import Image, Labels, Layer, Points, Shapes

POINTS_NAME = "segany points"
BOXES_NAME = "segany boxes"
PREVIEW_NAME = "segany preview"
LABELS_NAME = "segany labels"
AUTO_NAME = "segany automatic"
POSITIVE_COLOUR = np.array([0.2, 0.9, 0.2, 1.0])
NEGATIVE_COLOUR = np.array([1.0, 0.2, 0.2, 1.0])
# Preview and output labels are in-memory arrays the size of the image.
MAX_LABEL_PIXELS = 2_000_000_000
# How long the pointer must rest on a pixel before the prompt a click there would make is
# decoded ahead: long enough to skip pixels the pointer only passes over (a moving pointer sends
# a move event every ~10-20 ms), short against the ~200 ms a person rests before clicking.
HOVER_REST_MS = 30
_CUSTOM_SPEC = "<custom predictor>"
_BROWSE = "<browse>"


@dataclass(frozen=True)
class _Failure:
    """An expected problem raised in a worker, carried back to the GUI thread as a message."""

    message: str


_CANCELLED = object()


def _guarded(func: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
    """Run ``func`` in a worker; user-fixable errors come back as values, not tracebacks."""
    try:
        return func(*args, **kwargs)
    except Cancelled:
        return _CANCELLED
    except (SegAnyError, OSError) as exc:
        return _Failure(str(exc))


def _guarded_generator(gen: Any) -> Any:
    """:func:`_guarded` for generator jobs (progress comes from their yields)."""
    try:
        return (yield from gen)
    except Cancelled:
        return _CANCELLED
    except (SegAnyError, OSError) as exc:
        return _Failure(str(exc))


def _reports_errors(method: Callable[..., Any]) -> Callable[..., Any]:
    """GUI slots: show a user-fixable error in napari instead of raising a traceback."""

    def wrapper(self: SegmentWidget, *args: Any, **kwargs: Any) -> Any:
        try:
            return method(self, *args, **kwargs)
        except SegAnyError as exc:
            show_error(str(exc))
            return None

    wrapper.__name__ = method.__name__
    wrapper.__doc__ = method.__doc__
    return wrapper


def _alive(method: Callable[..., Any]) -> Callable[..., Any]:
    """Worker callbacks: do nothing once the widget is closed (a worker may outlive it)."""

    def wrapper(self: SegmentWidget, *args: Any, **kwargs: Any) -> Any:
        if self._state["closed"]:
            return None
        return method(self, *args, **kwargs)

    wrapper.__name__ = method.__name__
    wrapper.__doc__ = method.__doc__
    return wrapper


def _track(worker: Any) -> None:
    """Mark the worker done when it finishes, even if the widget is gone by then."""
    worker.finished.connect(lambda: setattr(worker, "_segany_done", True))


def _negative_modifiers(event: Any) -> bool:
    """Shift, Ctrl or Cmd held: the point being added (or about to be) is negative."""
    return any(key in event.modifiers for key in ("Shift", "Control", "Meta"))


def _running(worker: Any) -> bool:
    return worker is not None and not getattr(worker, "_segany_done", False)


class SegmentWidget(QWidget):
    """Click-to-segment with SAM: prompts, candidates, commit/undo, 3D propagation, automatic.

    Args:
        napari_viewer: the viewer (napari passes it).
        predictor: a predictor to use instead of loading a model (tests inject
            :class:`segany.interactive.ThresholdPredictor`; scripts a ready
            :class:`segany.SamPredictor`).

    Signals:
        preview_changed: the preview layer shows a new object state.
        prefetch_done: the prompt of a click at the resting pointer was decoded ahead.
        embedding_done: an embedding job ended (finished, failed or cancelled).
        job_done: a propagation or automatic segmentation ended.
    """

    preview_changed = Signal()
    prefetch_done = Signal()
    embedding_done = Signal()
    job_done = Signal()

    def __init__(self, napari_viewer: napari.viewer.Viewer, predictor: PredictorLike | None = None) -> None:
        super().__init__()
        # Plain dict, not an attribute lookup on the (possibly deleted) Qt object.
        self._state = {"closed": False}
        state = self._state
        self.destroyed.connect(lambda *_: state.update(closed=True))
        self.viewer = napari_viewer
        self.cache = EmbeddingCache()
        self.session: InteractiveSession | None = None
        self._predictor: Any = None
        self._predictor_key: tuple[str, str] | None = None
        self.points_layer: Points | None = None
        self.boxes_layer: Shapes | None = None
        self.preview_layer: Labels | None = None
        self.labels_layer: Labels | None = None
        self.auto_layer: Labels | None = None
        self._session_layer: Image | None = None
        self._positive = True
        self._click_negative = False
        self._next_positive: bool | None = None
        self._syncing = False
        # Per slice: the mask shown in the preview and the window it was written to.
        self._preview_shown: dict[tuple[int, ...], tuple[np.ndarray, tuple[slice, slice]]] = {}
        self._embed_worker: Any = None
        self._embed_cancel: threading.Event | None = None
        self._decode_worker: Any = None
        self._job_worker: Any = None
        self._job_cancel: threading.Event | None = None
        self._pending_request: Any = None
        self.last_embed_thread: int | None = None
        self._bound: list[tuple[Any, str, Any]] = []
        # The pointer's last position on the points layer (data coordinates, positive?), waiting
        # for it to rest HOVER_REST_MS before its click's prompt is decoded ahead.
        self._hover: tuple[tuple[float, ...], bool] | None = None
        self._hover_timer = QTimer(self)
        self._hover_timer.setSingleShot(True)
        self._hover_timer.setInterval(HOVER_REST_MS)
        self._hover_timer.timeout.connect(self._prefetch_hover)
        self._thumbnail_timer = QTimer(self)
        self._thumbnail_timer.setSingleShot(True)
        self._thumbnail_timer.setInterval(300)
        self._thumbnail_timer.timeout.connect(self._refresh_preview_thumbnail)
        self._build_ui()
        self._refresh_layer_choices()
        self._on_image_chosen()
        if predictor is not None:
            self.set_predictor(predictor)
        self.viewer.layers.events.inserted.connect(self._refresh_layer_choices)
        self.viewer.layers.events.removed.connect(self._on_layer_removed)
        self.viewer.dims.events.current_step.connect(self._on_slice_changed)
        self._bind_keys(self.viewer)

    # ================================================================== UI
    def _build_ui(self) -> None:
        layout = QVBoxLayout(self)

        setup = QGroupBox("Image and model")
        form = QFormLayout(setup)
        self.image_combo = QComboBox()
        self.image_combo.currentIndexChanged.connect(self._on_image_chosen)
        form.addRow("Image", self.image_combo)
        self.model_combo = QComboBox()
        self._random_weights = set()
        for choice in model_choices():
            self.model_combo.addItem(choice.label, choice.spec)
            if not choice.trained:
                self._random_weights.add(choice.spec)
        self.model_combo.addItem("Checkpoint file...", _BROWSE)
        self.model_combo.setToolTip(
            "segany_lite (shipped with segany, no download), checkpoints in segany's cache "
            "(`segany fetch mobile_sam`), a file, or test_tiny (random weights: only for "
            "trying the interface)"
        )
        self.model_combo.currentIndexChanged.connect(self._on_model_chosen)
        form.addRow("Model", self.model_combo)
        self.device_combo = QComboBox()
        self.device_combo.addItems(device_choices())
        self.device_combo.currentIndexChanged.connect(self._drop_predictor)
        form.addRow("Device", self.device_combo)
        row = QHBoxLayout()
        self.embed_button = QPushButton("Embed")
        self.embed_button.setToolTip("Run the image encoder on the current image/slice (cached)")
        self.embed_button.clicked.connect(lambda: self.embed())
        self.embed_all_button = QPushButton("Embed all slices")
        self.embed_all_button.clicked.connect(lambda: self.embed(all_slices=True))
        self.cancel_button = QPushButton("Cancel")
        self.cancel_button.setEnabled(False)
        self.cancel_button.clicked.connect(self.cancel)
        row.addWidget(self.embed_button)
        row.addWidget(self.embed_all_button)
        row.addWidget(self.cancel_button)
        form.addRow(row)
        self.auto_embed_check = QCheckBox("Embed each slice when it is shown")
        self.auto_embed_check.setChecked(True)
        form.addRow(self.auto_embed_check)
        self.status_label = QLabel("Choose an image, then Embed (or just click in it).")
        self.status_label.setWordWrap(True)
        form.addRow(self.status_label)
        layout.addWidget(setup)

        prompts = QGroupBox("Object")
        form = QFormLayout(prompts)
        self.polarity_button = QPushButton()
        self.polarity_button.setCheckable(True)
        self.polarity_button.toggled.connect(lambda on: self.set_positive(not on))
        self._update_polarity_button()
        form.addRow("New points", self.polarity_button)
        self.prefetch_check = QCheckBox("Decode ahead where the pointer rests")
        self.prefetch_check.setChecked(True)
        self.prefetch_check.setToolTip(
            "While the pointer rests on the image, compute the mask a click there would give, so "
            "that the click shows it at once (uses the CPU/GPU while you point; nothing is shown "
            "until you click)"
        )
        form.addRow(self.prefetch_check)
        mask_row = QHBoxLayout()
        self.mask_combo = QComboBox()
        self.mask_combo.setToolTip("An existing label (layer + id) used as a mask prompt")
        self.mask_combo.currentIndexChanged.connect(lambda _i: self._on_prompts_changed())
        self.mask_id_spin = QSpinBox()
        self.mask_id_spin.setRange(0, 2**31 - 1)
        self.mask_id_spin.setToolTip("Label id used as mask prompt (0: none)")
        self.mask_id_spin.valueChanged.connect(lambda _v: self._on_prompts_changed())
        mask_row.addWidget(self.mask_combo, 2)
        mask_row.addWidget(self.mask_id_spin, 1)
        form.addRow("Mask prompt", mask_row)
        self.candidate_label = QLabel("No object yet.")
        self.candidate_label.setWordWrap(True)
        form.addRow("Candidate", self.candidate_label)
        row = QHBoxLayout()
        self.next_button = QPushButton("Next candidate (N)")
        self.next_button.clicked.connect(lambda: self.cycle())
        row.addWidget(self.next_button)
        form.addRow(row)
        row = QHBoxLayout()
        self.commit_button = QPushButton("Commit (C)")
        self.commit_button.clicked.connect(lambda: self.commit())
        self.clear_button = QPushButton("Clear (Esc)")
        self.clear_button.clicked.connect(lambda: self.clear())
        self.undo_button = QPushButton("Undo commit (U)")
        self.undo_button.clicked.connect(lambda: self.undo())
        row.addWidget(self.commit_button)
        row.addWidget(self.clear_button)
        row.addWidget(self.undo_button)
        form.addRow(row)
        self.overwrite_check = QCheckBox("Commit over existing objects")
        form.addRow(self.overwrite_check)
        layout.addWidget(prompts)

        stack = QGroupBox("Stacks and time series")
        form = QFormLayout(stack)
        self.min_area_spin = QDoubleSpinBox()
        self.min_area_spin.setRange(0.0, 1.0)
        self.min_area_spin.setSingleStep(0.05)
        self.min_area_spin.setValue(0.25)
        self.min_area_spin.setToolTip("Stop when the area drops below this fraction of the previous slice")
        form.addRow("Min area fraction", self.min_area_spin)
        self.min_iou_spin = QDoubleSpinBox()
        self.min_iou_spin.setRange(0.0, 1.0)
        self.min_iou_spin.setSingleStep(0.05)
        self.min_iou_spin.setValue(0.2)
        self.min_iou_spin.setToolTip("Stop when the IoU with the previous slice drops below this")
        form.addRow("Min IoU with previous", self.min_iou_spin)
        self.propagate_button = QPushButton("Propagate through slices")
        self.propagate_button.clicked.connect(lambda: self.propagate())
        form.addRow(self.propagate_button)
        layout.addWidget(stack)

        auto = QGroupBox("Automatic segmentation")
        form = QFormLayout(auto)
        self.points_per_side_spin = QSpinBox()
        self.points_per_side_spin.setRange(1, 128)
        self.points_per_side_spin.setValue(32)
        form.addRow("Points per side", self.points_per_side_spin)
        self.iou_thresh_spin = self._unit_spin(0.88, "Keep masks whose predicted IoU is above this")
        form.addRow("Predicted IoU threshold", self.iou_thresh_spin)
        self.stability_spin = self._unit_spin(0.95, "Keep masks whose stability score is above this")
        form.addRow("Stability threshold", self.stability_spin)
        self.nms_spin = self._unit_spin(0.7, "Overlapping boxes above this IoU are merged")
        form.addRow("Box NMS threshold", self.nms_spin)
        self.auto_button = QPushButton("Segment everything (this slice)")
        self.auto_button.clicked.connect(lambda: self.segment_everything())
        form.addRow(self.auto_button)
        layout.addWidget(auto)

        export = QGroupBox("Training data")
        form = QFormLayout(export)
        self.export_button = QPushButton("Export committed labels...")
        self.export_button.setToolTip(
            "Write images/, labels/, prompts/ and dataset.json (segany's dataset format) into a folder"
        )
        self.export_button.clicked.connect(lambda: self.export_training_data())
        self.complete_check = QCheckBox("Every object in these images is labelled")
        self.complete_check.setToolTip(
            "Unchecked (usual): the dataset is marked partial, so unlabelled pixels mean "
            "'unknown' to the trainer, not 'background'"
        )
        form.addRow(self.complete_check)
        form.addRow(self.export_button)
        layout.addWidget(export)

        keys = QLabel(
            "<b>Keys</b>: click = positive point, Shift/Ctrl+click = negative, T = toggle, "
            "R on the boxes layer = box, N = next candidate, C = commit, Esc = clear, "
            "U = undo commit."
        )
        keys.setWordWrap(True)
        layout.addWidget(keys)
        layout.addStretch(1)

    @staticmethod
    def _unit_spin(value: float, tip: str) -> QDoubleSpinBox:
        spin = QDoubleSpinBox()
        spin.setRange(0.0, 1.0)
        spin.setSingleStep(0.01)
        spin.setDecimals(2)
        spin.setValue(value)
        spin.setToolTip(tip)
        return spin

    def _set_status(self, text: str) -> None:
        self.status_label.setText(text)

    def _update_polarity_button(self) -> None:
        self.polarity_button.blockSignals(True)
        self.polarity_button.setChecked(not self._positive)
        self.polarity_button.setText("positive (T)" if self._positive else "NEGATIVE (T)")
        self.polarity_button.setToolTip(
            "Whether new points are inside (positive) or outside (negative) the object; "
            "T toggles, Shift/Ctrl+click always adds a negative point"
        )
        self.polarity_button.blockSignals(False)

    # ================================================================== keys
    def _bind_keys(self, target: Any) -> None:
        """Bind segany's keys on the viewer or one of segany's layers (never on user layers)."""
        bindings: dict[str, Callable[[Any], Any]] = {
            "c": lambda _t: self.commit(),
            "n": lambda _t: self.cycle(1),
            "Shift-n": lambda _t: self.cycle(-1),
            "Escape": lambda _t: self.clear(),
            "u": lambda _t: self.undo(),
            "t": lambda _t: self.set_positive(not self._positive),
        }
        from napari.layers import Labels, Shapes

        for key, func in bindings.items():
            if isinstance(target, Shapes) and key in ("Escape", "t"):
                continue  # Esc finishes a drawing and T draws paths there: keep napari's meaning
            if isinstance(target, Labels) and key == "Escape":
                continue  # Esc resets a polygon being painted
            previous = target.bind_key(key, func, overwrite=True)
            self._bound.append((target, key, previous))

    def _unbind_keys(self) -> None:
        """Give the keys back, restoring what the viewer had bound to them before."""
        for target, key, previous in reversed(self._bound):
            try:
                target.bind_key(key, previous, overwrite=True)
            except (KeyError, RuntimeError, TypeError, ValueError):
                pass
        self._bound = []

    def closeEvent(self, event: Any) -> None:  # noqa: N802 (Qt's name)
        self.cleanup()
        super().closeEvent(event)

    def idle(self) -> bool:
        """True when no worker (embedding, decoding, propagation, automatic) is running."""
        return not any(
            _running(w) for w in (self._embed_worker, self._decode_worker, self._job_worker)
        )

    def cleanup(self) -> None:
        """Stop workers and release key bindings and viewer connections (widget closing)."""
        self._hover_timer.stop()
        self._hover = None
        self.cancel()
        self._state["closed"] = True
        self._unbind_keys()
        for emitter, slot in (
            (self.viewer.layers.events.inserted, self._refresh_layer_choices),
            (self.viewer.layers.events.removed, self._on_layer_removed),
            (self.viewer.dims.events.current_step, self._on_slice_changed),
        ):
            try:
                emitter.disconnect(slot)
            except (TypeError, ValueError, RuntimeError):
                pass

    # ================================================================== layer choices
    def _refresh_layer_choices(self, event: Any = None) -> None:
        from napari.layers import Image, Labels

        current = self.image_combo.currentData()
        self.image_combo.blockSignals(True)
        self.image_combo.clear()
        for layer in self.viewer.layers:
            if isinstance(layer, Image):
                self.image_combo.addItem(layer.name, layer)
        index = self.image_combo.findData(current) if current is not None else -1
        self.image_combo.setCurrentIndex(index if index >= 0 else self.image_combo.count() - 1)
        self.image_combo.blockSignals(False)
        if self.image_combo.currentData() is not current:
            self._on_image_chosen()

        mask_current = self.mask_combo.currentData()
        self.mask_combo.blockSignals(True)
        self.mask_combo.clear()
        self.mask_combo.addItem("(none)", None)
        for layer in self.viewer.layers:
            if isinstance(layer, Labels) and layer is not self.preview_layer:
                self.mask_combo.addItem(layer.name, layer)
        index = self.mask_combo.findData(mask_current) if mask_current is not None else 0
        self.mask_combo.setCurrentIndex(max(0, index))
        self.mask_combo.blockSignals(False)

    def _on_layer_removed(self, event: Any) -> None:
        layer = event.value
        for name in ("points_layer", "boxes_layer", "preview_layer", "labels_layer", "auto_layer"):
            if getattr(self, name) is layer:
                setattr(self, name, None)
        if layer is self._session_layer:
            self._reset_session()
        self._refresh_layer_choices()

    def image_layer(self) -> Image | None:
        """The chosen image layer."""
        return self.image_combo.currentData()

    def _on_image_chosen(self, *_: Any) -> None:
        if self.image_layer() is not self._session_layer:
            self._reset_session()
        layer = self.image_layer()
        stack = layer is not None and len(self._labels_shape(layer)) > 2
        # Only what applies to this image is clickable.
        self.embed_all_button.setEnabled(stack)
        self.propagate_button.setEnabled(stack)

    def _on_image_data_changed(self, event: Any = None) -> None:
        # New pixels: the cached embeddings of this layer are wrong now.
        layer = self._session_layer
        if layer is not None:
            self.cache.discard(lambda key: key[0][0] == layer.unique_id)
        self._reset_session()

    def _reset_session(self) -> None:
        self.cancel()
        if self._session_layer is not None:
            try:
                self._session_layer.events.data.disconnect(self._on_image_data_changed)
            except (TypeError, ValueError, RuntimeError):
                pass
        self.session = None
        self._session_layer = None
        self._pending_request = None
        # The object being segmented belonged to the old session: its prompts and preview go.
        self._clear_prompt_layers()
        if self.preview_layer is not None and self._preview_shown:
            self.preview_layer.data[...] = 0
            self.preview_layer.refresh()
        self._preview_shown = {}
        self._update_candidate_label()

    # ================================================================== model
    def _on_model_chosen(self, *_: Any) -> None:
        if self.model_combo.currentData() == _BROWSE:
            path, _filter = QFileDialog.getOpenFileName(
                self, "SAM checkpoint", "", "Checkpoints (*.pth *.pt *.ckpt *.bin);;All files (*)"
            )
            if path:
                self.add_model_path(path)
            else:
                self.model_combo.setCurrentIndex(0)
            return
        self._drop_predictor()

    def add_model_path(self, path: str) -> None:
        """Offer (and select) a checkpoint file as the model."""
        index = self.model_combo.findData(path)
        if index < 0:
            self.model_combo.insertItem(self.model_combo.count() - 1, path, path)
            index = self.model_combo.findData(path)
        self.model_combo.setCurrentIndex(index)

    def _drop_predictor(self, *_: Any) -> None:
        if self.model_combo.currentData() == _CUSTOM_SPEC:
            return
        self._predictor = None
        self._predictor_key = None
        self._reset_session()

    def set_predictor(self, predictor: PredictorLike, name: str = "custom") -> None:
        """Use ``predictor`` for everything (instead of a model chosen in the list)."""
        self._reset_session()
        label = f"({name} predictor)"
        index = self.model_combo.findData(_CUSTOM_SPEC)
        self.model_combo.blockSignals(True)
        if index < 0:
            self.model_combo.insertItem(0, label, _CUSTOM_SPEC)
            index = 0
        else:
            self.model_combo.setItemText(index, label)
        self.model_combo.setCurrentIndex(index)
        self.model_combo.blockSignals(False)
        self._predictor = predictor
        self._predictor_key = (f"{_CUSTOM_SPEC}:{id(predictor)}", "")

    def select_model(self, spec: str) -> None:
        """Choose a model of the list by its spec (e.g. ``"test_tiny"``, ``"mobile_sam"``)."""
        index = self.model_combo.findData(spec)
        if index < 0:
            raise SegAnyError(f"model {spec!r} is not in the list (is its checkpoint downloaded?)")
        self.model_combo.setCurrentIndex(index)

    def _model_key(self) -> tuple[str, str]:
        return str(self.model_combo.currentData()), self.device_combo.currentText()

    # ================================================================== session and layers
    @staticmethod
    def _pixels(layer: Image) -> Any:
        """Full-resolution pixels (level 0 of a multiscale image; read lazily)."""
        return layer.data[0] if layer.multiscale else layer.data

    def _slice_key(self, layer: Layer | None = None) -> tuple[int, ...]:
        """Indices of the leading (stack/time) axes of the slice shown in the viewer."""
        layer = layer or self._session_layer or self.image_layer()
        if layer is None:
            return ()
        data_point = layer.world_to_data(self.viewer.dims.point)
        shape = self._labels_shape(layer)
        return tuple(
            int(np.clip(round(float(v)), 0, n - 1)) for v, n in zip(data_point, shape[:-2])
        )

    def _labels_shape(self, layer: Image) -> tuple[int, ...]:
        shape = tuple(int(n) for n in self._pixels(layer).shape)
        return shape[:-1] if layer.rgb else shape

    def _make_session(self, predictor: Any, layer: Image, cache_key: Any = None) -> InteractiveSession:
        """Cheap: no pixels are read until the first embedding (done in a worker).

        A layer opened from a segany embedding cache gets a session on the cache's tiles
        that uses the cached embeddings (when they fit the model).
        """
        kwargs = {"cache": self.cache, "cache_key": cache_key or (layer.unique_id, self._predictor_key)}
        cache_path = layer.metadata.get("segany_cache")
        if cache_path:
            cached = CachedRaster(cache_path)
            problem = cached.problem_with(predictor) if predictor is not None else None
            if problem is None:
                session = InteractiveSession(
                    predictor, self._pixels(layer), rgb=True, tiled=True,
                    tile_size=cached.cache.grid.tile_size, tile_overlap=cached.cache.grid.overlap,
                    embedding_source=cached, **kwargs,
                )
                return session
            session = InteractiveSession(predictor, self._pixels(layer), rgb=layer.rgb, **kwargs)
            session.notes.append(
                f"The embeddings in {Path(cache_path).name} are not used: {problem}. Tiles are "
                "embedded again where you click."
            )
            return session
        return InteractiveSession(predictor, self._pixels(layer), rgb=layer.rgb, **kwargs)

    @staticmethod
    def _transform_kwargs(layer: Image) -> dict[str, Any]:
        # segany's layers sit exactly on the image (napari's layer.ndim excludes RGB channels).
        return {"scale": tuple(layer.scale), "translate": tuple(layer.translate)}

    def _ensure_layers(self, layer: Image) -> None:
        """Create (or re-create for a new shape) segany's prompt, preview and output layers."""
        shape = self._labels_shape(layer)
        pixels = int(np.prod(shape))
        if pixels > MAX_LABEL_PIXELS:
            raise SegAnyError(
                f"{layer.name} has {pixels / 1e9:.1f} billion pixels: too many for in-memory label "
                "layers; crop it, or segment it with segany's raster tools (QGIS, command line)"
            )
        ndim = len(shape)
        transform = self._transform_kwargs(layer)
        size = max(3.0, min(shape[-2:]) / 60)
        layers = self.viewer.layers

        def fits(other: Layer | None) -> bool:
            return (
                other is not None and other in layers and other.ndim == ndim
                and tuple(other.scale) == transform["scale"]
                and tuple(other.translate) == transform["translate"]
                and (not hasattr(other.data, "shape") or tuple(other.data.shape) == shape)
            )

        self._syncing = True
        try:
            if not fits(self.preview_layer):
                self._remove(self.preview_layer)
                self.preview_layer = self.viewer.add_labels(
                    np.zeros(shape, np.uint8), name=PREVIEW_NAME, opacity=0.55, **transform
                )
                self._bind_keys(self.preview_layer)
                self._preview_shown = {}
            if not fits(self.labels_layer):
                # 16-bit ids (65,535 objects) halve the memory of very large label images.
                dtype = np.uint32 if pixels <= 100_000_000 else np.uint16
                self.labels_layer = self.viewer.add_labels(
                    np.zeros(shape, dtype), name=LABELS_NAME, **transform
                )
                self._bind_keys(self.labels_layer)
            if not fits(self.boxes_layer):
                self._remove(self.boxes_layer)
                self.boxes_layer = self.viewer.add_shapes(
                    ndim=ndim, name=BOXES_NAME, edge_color="yellow", face_color="transparent",
                    edge_width=max(1.0, size / 3), **transform,
                )
                self.boxes_layer.events.data.connect(self._on_layer_prompt_event)
                self._bind_keys(self.boxes_layer)
            if not fits(self.points_layer):
                self._remove(self.points_layer)
                self.points_layer = self.viewer.add_points(
                    ndim=ndim, name=POINTS_NAME, size=size, features={"positive": np.zeros(0, bool)},
                    face_color="positive",
                    face_color_cycle={True: POSITIVE_COLOUR, False: NEGATIVE_COLOUR},
                    border_color="white", **transform,
                )
                self.points_layer.feature_defaults = {"positive": self._positive}
                self.points_layer.events.data.connect(self._on_points_event)
                self.points_layer.mouse_drag_callbacks.insert(0, self._on_points_press)
                self.points_layer.mouse_move_callbacks.append(self._on_points_move)
                self._bind_keys(self.points_layer)
                self.points_layer.mode = "add"
            self.viewer.layers.selection.active = self.points_layer
        finally:
            self._syncing = False
        self._refresh_layer_choices()

    def _remove(self, layer: Layer | None) -> None:
        if layer is not None and layer in self.viewer.layers:
            self.viewer.layers.remove(layer)

    def _ensure_session(self) -> InteractiveSession | None:
        """The session for the chosen image, if its predictor is loaded (None otherwise)."""
        layer = self.image_layer()
        if layer is None:
            raise SegAnyError("open or choose an image layer first")
        if self.session is not None and self._session_layer is layer:
            return self.session
        if self._predictor is None:
            return None
        self._adopt_session(self._make_session(self._predictor, layer), layer)
        return self.session

    def _adopt_session(self, session: InteractiveSession, layer: Image) -> None:
        self.session = session
        self._session_layer = layer
        layer.events.data.connect(self._on_image_data_changed)
        session.set_slice(self._slice_key(layer))
        self._ensure_layers(layer)
        for note in session.notes:
            show_warning(note)
        h, w = session.spatial_shape
        if session.tiled:
            cached = " (from its embedding cache)" if session.embedding_source is not None else ""
            show_info(
                f"{layer.name} is {w} x {h} px: it is segmented on {len(session.grid)} "
                f"full-resolution tiles of {session.grid.tile_size} px{cached}; a tile is embedded "
                "when you first click in it (Embed does them all)."
            )

    # ================================================================== embedding
    @_reports_errors
    def embed(
        self,
        all_slices: bool = False,
        slice_key: tuple[int, ...] | None = None,
        jobs: list[tuple[tuple[int, ...], Any]] | None = None,
    ) -> Any:
        """Compute the embedding of the current slice (or of every slice) in a worker.

        Loads the model first if needed (in the worker too). A large image is embedded tile
        by tile. ``jobs`` names exact ``(slice, tile)`` embeddings instead (what a click
        needs). Returns the worker (None when nothing needs computing).
        """
        layer = self.image_layer()
        if layer is None:
            raise SegAnyError("open or choose an image layer first")
        if _running(self._embed_worker):
            return self._embed_worker
        if self.model_combo.currentData() in (None, _BROWSE):
            raise SegAnyError("choose a model first")
        session = self._ensure_session()
        model_key = self._model_key()
        predictor = self._predictor
        cache_key = (layer.unique_id, self._predictor_key or model_key)
        if jobs is None:
            # A predictor-less twin of the session, to count the work before the model loads.
            probe = session or self._make_session(None, layer, cache_key)
            keys = probe.all_slice_keys() if all_slices else [
                slice_key if slice_key is not None else self._slice_key(layer)
            ]
            jobs = probe.embedding_jobs(keys)
        if not jobs:
            self._set_status(self._embedding_status())
            self._dispatch_pending()
            return None
        cancel = threading.Event()
        steps = len(jobs) + (0 if predictor is not None else 1) + (0 if session is not None else 1)

        def job() -> Any:
            nonlocal predictor, session
            if predictor is None:
                spec, device = model_key
                predictor = make_predictor(spec, device)
                yield ("predictor", predictor)
            if session is None:
                session = self._make_session(predictor, layer, cache_key)
                yield ("session", session)
            for report in session.embed_slices(jobs, cancel):
                yield ("embedded", report)
            return session

        worker = create_worker(
            _guarded_generator, job(),
            _progress={"total": steps, "desc": "segany: embedding"},
        )
        _track(worker)
        worker.yielded.connect(lambda item: self._on_embed_progress(item, layer, model_key))
        worker.returned.connect(self._on_embed_returned)
        worker.finished.connect(lambda: self._on_embed_finished(worker))
        self._embed_worker = worker
        self._embed_cancel = cancel
        self.cancel_button.setEnabled(True)
        slices = sorted({key for key, _frame in jobs})
        tiles = sum(frame is not None for _key, frame in jobs)
        if len(slices) > 1:
            what = f"{len(slices)} slices"
        else:
            what = f"slice {slices[0]}" if slices[0] else "the image"
        if tiles:
            what = f"{tiles} tiles of {what}"
        self._set_status(
            f"Embedding {what}..." if predictor is not None
            else f"Loading {model_key[0]}, then embedding {what}..."
        )
        worker.start()
        return worker

    @_alive
    def _on_embed_progress(self, item: tuple[str, Any], layer: Image, model_key: tuple[str, str]) -> None:
        kind, value = item
        if kind == "predictor":
            if self._model_key() == model_key and self.model_combo.currentData() != _CUSTOM_SPEC:
                self._predictor = value
                self._predictor_key = model_key
                if model_key[0] in self._random_weights:
                    show_warning(
                        f"{model_key[0]} has random weights: its masks are noise (it is for trying "
                        "the interface). Get a real model with `segany fetch mobile_sam`."
                    )
        elif kind == "session":
            if self.image_layer() is layer and self._predictor is value.predictor:
                self._adopt_session(value, layer)
        elif kind == "embedded":
            self.last_embed_thread = value.thread_id
            where = f"slice {value.slice_key}" if value.slice_key else "the image"
            blank = ""
            if value.blank:
                blank = " (blank: " + (
                    "the whole slice" if value.blank == (None,) else f"{len(value.blank)} tiles"
                ) + ", nothing to segment there)"
            self._set_status(f"Embedded {where} in {value.seconds:.1f} s{blank}")

    @_alive
    def _on_embed_returned(self, value: Any) -> None:
        if isinstance(value, _Failure):
            show_error(value.message)
            self._set_status(f"Embedding failed: {value.message}")
            self._pending_request = None
        elif value is _CANCELLED:
            self._set_status("Embedding cancelled.")
            self._pending_request = None
        else:
            self._set_status(self._embedding_status())

    @_alive
    def _on_embed_finished(self, worker: Any) -> None:
        if self._embed_worker is worker:
            self._embed_worker = None
            self._embed_cancel = None
        self.cancel_button.setEnabled(_running(self._job_worker))
        if getattr(worker, "abort_requested", False):
            self._set_status("Embedding cancelled.")
            self._pending_request = None
        self.embedding_done.emit()
        if self._pending_request is not None:
            self._dispatch_pending()
        elif (
            self._auto_embeds()
            and not getattr(worker, "abort_requested", False)
            and not self.session.has_embedding(self._slice_key())  # type: ignore[union-attr]
        ):
            # The user moved on while we were busy: embed the slice now shown.
            self.embed()

    def _embedding_status(self) -> str:
        session = self.session
        if session is None:
            return "No embedding yet."
        if not session.leading_shape:
            return "Embedding ready: click in the image." if session.has_embedding() else "Not embedded yet."
        done = sum(session.has_embedding(k) for k in session.all_slice_keys())
        return f"{done} of {int(np.prod(session.leading_shape))} slices embedded."

    def cancel(self) -> None:
        """Cancel the running embedding / propagation / automatic segmentation."""
        for event in (self._embed_cancel, self._job_cancel):
            if event is not None:
                event.set()
        for worker in (self._embed_worker, self._job_worker):
            if _running(worker):
                worker.quit()
        self._pending_request = None
        if hasattr(self, "cancel_button"):
            self.cancel_button.setEnabled(False)

    # ================================================================== prompts
    def set_positive(self, positive: bool) -> None:
        """Make new points positive (inside) or negative (outside)."""
        self._positive = bool(positive)
        if self.points_layer is not None:
            self.points_layer.feature_defaults = {"positive": self._positive}
        self._update_polarity_button()

    def _on_points_press(self, layer: Points, event: Any) -> None:
        # Runs before napari's "add" callback (inserted first): remember this click's modifiers
        # (only when adding: Shift+click in select mode extends a selection).
        self._click_negative = str(layer.mode) == "add" and _negative_modifiers(event)

    def _on_points_move(self, layer: Points, event: Any) -> None:
        # Called for pointer moves while the points layer is active; cheap: only restarts a timer.
        if str(layer.mode) != "add" or not self.prefetch_check.isChecked():
            return
        position = tuple(float(v) for v in layer.world_to_data(event.position))
        self._hover = (position, self._positive and not _negative_modifiers(event))
        self._hover_timer.start()

    def hover(self, yx: tuple[float, ...], positive: bool | None = None) -> None:
        """The pointer moved to data coordinates ``(..., row, col)`` (what a mouse move does).

        If it rests there for ``HOVER_REST_MS``, the prompt a click there would make is decoded
        ahead (``prefetch_done`` is emitted when that is done).

        Example:
            >>> widget.hover((120.0, 85.0))            # doctest: +SKIP
            >>> widget.add_point((120.0, 85.0))        # shown at once once prefetch_done fired
        """
        self._hover = (tuple(float(v) for v in yx), self._positive if positive is None else bool(positive))
        self._hover_timer.start()

    def _prefetch_hover(self) -> None:
        """The pointer rests: decode the prompt a click under it would make (nothing shown)."""
        session, layer, hover = self.session, self.points_layer, self._hover
        if (
            hover is None or session is None or layer is None or self._state["closed"]
            or not self.prefetch_check.isChecked()
            or _running(self._embed_worker) or _running(self._job_worker)  # they hold the predictor
        ):
            return
        if _running(self._decode_worker) or self._pending_request is not None:
            self._hover_timer.start()  # the decoder is busy with a click: try again shortly
            return
        self._hover = None
        yx, positive = hover
        key = self._slice_key()
        if len(yx) != layer.ndim or tuple(int(round(v)) for v in yx[:-2]) != key:
            return
        try:
            points, labels, box, _ = self._layer_prompt(key, session.spatial_shape, extra_point=(yx, positive))
            request = session.speculate(points, labels, box, self._mask_prompt(key), slice_key=key)
        except SegAnyError:
            return  # the click would report it; hovering stays silent
        if request is not None:
            self._start_decode(request, lambda result, owner=session: self._on_prefetched(owner, result))

    @_alive
    def _on_prefetched(self, session: InteractiveSession, result: Any) -> None:
        if session is not self.session or isinstance(result, _Failure) or result is _CANCELLED:
            return
        session.remember(result)
        self.prefetch_done.emit()

    def _layers_current(self) -> bool:
        layer = self.image_layer()
        return (
            self.points_layer is not None
            and self.boxes_layer is not None
            and layer is not None
            and self.points_layer.ndim == len(self._labels_shape(layer))
        )

    def add_point(self, yx: tuple[float, ...], positive: bool | None = None) -> None:
        """Add a prompt point at data coordinates ``(..., row, col)`` (what a click does)."""
        if not self._layers_current():
            self.prepare()
        assert self.points_layer is not None
        self._next_positive = positive
        self._click_negative = False  # not a mouse click: no modifiers
        try:
            self.points_layer.add(np.asarray(yx, dtype=float))
        finally:
            self._next_positive = None

    def add_box(self, top_left: tuple[float, ...], bottom_right: tuple[float, ...]) -> None:
        """Add a box prompt from two corners in data coordinates ``(..., row, col)``."""
        if not self._layers_current():
            self.prepare()
        assert self.boxes_layer is not None
        lead = list(top_left[:-2])
        (r0, c0), (r1, c1) = top_left[-2:], bottom_right[-2:]
        rect = np.array([lead + [r0, c0], lead + [r0, c1], lead + [r1, c1], lead + [r1, c0]], float)
        self.boxes_layer.add_rectangles(rect)

    @_reports_errors
    def prepare(self) -> None:
        """Create the session and segany's layers now (normally done on first Embed)."""
        layer = self.image_layer()
        if layer is None:
            raise SegAnyError("open or choose an image layer first")
        if self._ensure_session() is None:
            self._ensure_layers(layer)

    def _on_points_event(self, event: Any) -> None:
        action = str(getattr(event, "action", ""))
        if action.endswith("ing") or self._syncing:
            return
        layer = self.points_layer
        if layer is None:
            return
        recolour = False
        if action == "added":
            if self._next_positive is not None:
                positive = self._next_positive
            else:
                positive = self._positive and not self._click_negative
            self._click_negative = False
            indices = [i % len(layer.data) for i in event.data_indices]
            if (layer.features["positive"].to_numpy(bool)[indices] != positive).any():
                # Not the layer's default (a Shift/Ctrl+click, or defaults napari copied from a
                # selected point of the other polarity): fix the new point's polarity.
                layer.features.loc[indices, "positive"] = positive
                recolour = True
        self._on_prompts_changed()  # decoding starts first: colours can wait a few ms
        if recolour:
            layer.refresh_colors(update_color_mapping=False)
        if action == "added" and bool(layer.feature_defaults["positive"].iloc[0]) != self._positive:
            # napari makes a selected point's features the defaults of the next one.
            layer.feature_defaults = {"positive": self._positive}

    def _on_layer_prompt_event(self, event: Any) -> None:
        action = str(getattr(event, "action", ""))
        if action.endswith("ing") or self._syncing:
            return
        self._on_prompts_changed()

    def _mask_prompt(self, key: tuple[int, ...]) -> np.ndarray | None:
        layer = self.mask_combo.currentData()
        object_id = self.mask_id_spin.value()
        if layer is None or object_id == 0 or layer not in self.viewer.layers:
            return None
        data = np.asarray(layer.data[key]) if key else np.asarray(layer.data)
        if data.shape != self.session.spatial_shape:  # type: ignore[union-attr]
            raise SegAnyError(
                f"the mask prompt layer {layer.name!r} has slices of {data.shape}, the image "
                f"{self.session.spatial_shape}"  # type: ignore[union-attr]
            )
        return data == object_id

    @_reports_errors
    def _on_prompts_changed(self) -> None:
        """A prompt layer changed: build the current slice's prompt and decode it."""
        if self._syncing or self.image_layer() is None:
            return
        if self.points_layer is None and self.mask_combo.currentData() is None:
            return
        session = self._ensure_session()
        if session is None:
            # No model yet: load it and embed; the prompt is decoded when that is done.
            self._pending_request = "sync"
            self.embed()
            return
        key = self._slice_key()
        session.set_slice(key)
        points, labels, box, left_out = self._layer_prompt(key, session.spatial_shape)
        if left_out:
            show_warning(f"{left_out} point(s) outside the image are ignored")
        request = session.set_prompt(points, labels, box, self._mask_prompt(key), slice_key=key)
        if request is None:
            self._show_object()
            return
        self._dispatch(request)

    def _layer_prompt(
        self,
        key: tuple[int, ...],
        shape: tuple[int, int],
        extra_point: tuple[tuple[float, ...], bool] | None = None,
    ) -> tuple[np.ndarray | None, np.ndarray | None, np.ndarray | None, int]:
        """Points, labels and box of the prompt layers on one slice, plus the number of points
        left out (outside the image). ``extra_point`` (data coordinates, positive?) is added
        as if clicked: the prompt a click there would make."""
        layer = self.points_layer
        coords = np.zeros((0, layer.ndim if layer is not None else len(key) + 2))
        flags = np.zeros(0, bool)
        if layer is not None and len(layer.data):
            coords, flags = np.asarray(layer.data, float), layer.features["positive"].to_numpy(bool)
        if extra_point is not None:
            coords = np.concatenate([coords.reshape(-1, len(extra_point[0])), [extra_point[0]]])
            flags = np.append(flags, extra_point[1])
        points = labels = box = None
        left_out = 0
        if len(coords):
            points, labels, left_out = points_for_slice(coords, flags, key, shape)
        if self.boxes_layer is not None and len(self.boxes_layer.data):
            box = box_for_slice(self.boxes_layer.data, key, shape, self.boxes_layer.shape_type)
        return points, labels, box, left_out

    def _dispatch(self, request: Any) -> None:
        session = self.session
        if session is None:
            return
        hit = session.prefetched(request)
        if hit is not None:  # decoded ahead while the pointer rested here: show it now
            self._pending_request = None
            self._on_decoded(hit)
            return
        if _running(self._decode_worker):
            # Decoded when the running one ends (a prefetch of this very prompt answers it
            # then); newest wins.
            self._pending_request = request
            return
        missing = session.missing_embeddings(request)
        if missing:
            self._pending_request = request
            self.embed(jobs=missing)
            return
        self._start_decode(request, self._on_decoded)

    def _start_decode(self, request: Any, on_returned: Callable[[Any], None]) -> None:
        """Decode ``request`` in the (single) light decode worker."""
        assert self.session is not None
        worker = create_light_worker(_guarded, self.session.decode, request, _start_thread=False)
        _track(worker)
        worker.returned.connect(on_returned)
        worker.finished.connect(lambda: self._on_decode_finished(worker))
        self._decode_worker = worker
        worker.start()

    def _dispatch_pending(self) -> None:
        request, self._pending_request = self._pending_request, None
        if request == "sync":
            self._on_prompts_changed()
        elif request is not None:
            self._dispatch(request)

    @_alive
    def _on_decoded(self, result: Any) -> None:
        if isinstance(result, _Failure):
            show_error(result.message)
            return
        if self.session is None or result is _CANCELLED:
            return
        if self.session.accept(result):  # False for a stale answer: a newer prompt exists
            self._show_object()

    @_alive
    def _on_decode_finished(self, worker: Any) -> None:
        if self._decode_worker is worker:
            self._decode_worker = None
        if self._pending_request is not None and not _running(self._embed_worker):
            self._dispatch_pending()

    # ================================================================== showing the object
    def _show_object(self) -> None:
        """Copy the session's object masks into the preview layer (changed slices only, and
        only the tile a mask lies in on large images)."""
        session, layer = self.session, self.preview_layer
        if session is None or layer is None or layer not in self.viewer.layers:
            self._update_candidate_label()
            return
        data = layer.data
        masks = session.object_masks
        changed = False
        for key in [k for k in self._preview_shown if k not in masks]:
            _mask, window = self._preview_shown.pop(key)
            data[key + window] = 0
            changed = True
        for key, mask in masks.items():
            shown = self._preview_shown.get(key)
            if shown is not None and shown[0] is mask:
                continue  # "is", not id(): an id can be reused once an old mask is freed
            if shown is not None:
                data[key + shown[1]] = 0
            window = session.mask_window(key)
            data[key + window] = mask[window]
            self._preview_shown[key] = (mask, window)
            changed = True
        if changed:
            # Only the slice shown: the thumbnail (and the layer-list repaint it causes) waits
            # until the clicks pause, off the click -> preview path.
            layer.refresh(thumbnail=False, extent=False, highlight=False)
            self._thumbnail_timer.start()
        self._update_candidate_label()
        self.preview_changed.emit()

    def _refresh_preview_thumbnail(self) -> None:
        layer = self.preview_layer
        if not self._state["closed"] and layer is not None and layer in self.viewer.layers:
            layer.refresh(thumbnail=True, data_displayed=False, highlight=False, extent=False)

    def _update_candidate_label(self) -> None:
        session = self.session
        if not hasattr(self, "candidate_label"):
            return
        if session is None or session.candidates is None:
            slices = len(session.object_masks) if session is not None else 0
            self.candidate_label.setText(f"Object on {slices} slices." if slices else "No object yet.")
            return
        count = len(session.candidates.masks)
        seconds = session.last_decode_seconds or 0.0
        extra = f", on {len(session.object_masks)} slices" if len(session.object_masks) > 1 else ""
        how = "decoded ahead" if session.candidates.ahead else "decoded"
        self.candidate_label.setText(
            f"{session.selected + 1} of {count}: predicted IoU {session.selected_score:.2f} "
            f"({how} in {seconds * 1000:.0f} ms{extra})"
        )

    @_reports_errors
    def cycle(self, step: int = 1) -> int | None:
        """Show the next candidate mask (key N; Shift+N: previous)."""
        if self.session is None:
            raise SegAnyError("there are no candidates yet: click in the image first")
        index = self.session.cycle(step)
        self._show_object()
        return index

    # ================================================================== commit / clear / undo
    def _clear_prompt_layers(self) -> None:
        self._syncing = True
        try:
            if self.points_layer is not None and len(self.points_layer.data):
                self.points_layer.data = np.zeros((0, self.points_layer.ndim))
            if self.boxes_layer is not None and len(self.boxes_layer.data):
                self.boxes_layer.data = []
        finally:
            self._syncing = False

    @_reports_errors
    def commit(self) -> int | None:
        """Write the current object into the output labels with a new id (key C)."""
        session = self.session
        if session is None:
            raise SegAnyError("nothing to commit: segment an object first")
        if self._pending_request is not None or _running(self._decode_worker):
            show_warning("the newest prompt is still being decoded: committing what is shown")
        labels = self.labels_layer
        if labels is None or labels not in self.viewer.layers:
            self._ensure_layers(self._session_layer)  # type: ignore[arg-type]
            labels = self.labels_layer
        edit = session.commit(
            labels.data, overwrite=self.overwrite_check.isChecked(), write=labels.data_setitem
        )
        self._pending_request = None
        self._clear_prompt_layers()
        self._show_object()
        self._set_status(f"Committed object {edit.object_id} ({edit.size} pixels).")
        return edit.object_id

    def clear(self) -> None:
        """Forget the current object: prompts, candidates and preview (key Esc)."""
        self._pending_request = None
        if self.session is not None:
            self.session.clear()
        self._clear_prompt_layers()
        self._show_object()

    @_reports_errors
    def undo(self) -> int | None:
        """Take back the last commit (key U)."""
        if self.session is None or self.labels_layer is None or not self.session.history:
            raise SegAnyError("there is no commit to undo")
        edit = self.session.undo(self.labels_layer.data, write=self.labels_layer.data_setitem)
        assert edit is not None
        self._set_status(f"Undid object {edit.object_id}.")
        return edit.object_id

    # ================================================================== slices
    def _on_slice_changed(self, event: Any = None) -> None:
        session = self.session
        if session is None or not session.leading_shape:
            return
        key = self._slice_key()
        if key == session.slice_key:
            return
        session.set_slice(key)
        self._update_candidate_label()
        if self._auto_embeds() and not session.has_embedding(key):
            self.embed()

    def _auto_embeds(self) -> bool:
        """Embed slices as they are shown? Only stacks of ordinary size: a large (tiled)
        slice is embedded tile by tile where the user clicks."""
        session = self.session
        return (
            self.auto_embed_check.isChecked()
            and session is not None
            and bool(session.leading_shape)
            and not session.tiled
        )

    # ================================================================== propagation
    @_reports_errors
    def propagate(self) -> Any:
        """Carry the current object through the stack until it vanishes (in a worker)."""
        session = self.session
        if session is None or session.mask is None:
            raise SegAnyError("segment an object on this slice first, then propagate it")
        if not session.leading_shape:
            raise SegAnyError("propagation needs a stack or a time series; this image is 2D")
        if _running(self._job_worker):
            raise SegAnyError("another segany job is running; wait or cancel it")
        cancel = threading.Event()
        steps = session.propagate(
            min_area_fraction=self.min_area_spin.value(),
            min_iou=self.min_iou_spin.value(),
            cancel=cancel,
        )
        worker = create_worker(
            _guarded_generator, steps,
            _progress={"total": session.leading_shape[-1] - 1, "desc": "segany: propagating"},
        )
        reasons: list[str] = []

        def on_step(step: Any) -> None:
            if self._state["closed"]:
                return
            if self.session is session and session.apply_step(step):
                if step.reason:
                    reasons.append(f"slice {step.slice_key}: {step.reason}")
                self._show_object()

        def on_returned(value: Any) -> None:
            if self._state["closed"]:
                return
            if isinstance(value, _Failure):
                show_error(value.message)
            else:
                done = "cancelled" if value is _CANCELLED else "done"
                self._set_status(
                    f"Propagation {done}: object on {len(session.object_masks)} slices. "
                    + ("Stopped at " + "; ".join(reasons) if reasons else "")
                )

        worker.yielded.connect(on_step)
        worker.returned.connect(on_returned)
        self._start_job(worker, cancel)
        return worker

    def _start_job(self, worker: Any, cancel: threading.Event | None) -> None:
        def finished() -> None:
            if self._state["closed"]:
                return
            if self._job_worker is worker:
                self._job_worker = None
                self._job_cancel = None
            self.cancel_button.setEnabled(_running(self._embed_worker))
            self.job_done.emit()

        _track(worker)
        worker.finished.connect(finished)
        self._job_worker = worker
        self._job_cancel = cancel
        self.cancel_button.setEnabled(True)
        worker.start()

    # ================================================================== automatic
    def automatic_parameters(self) -> dict[str, Any]:
        """The thresholds shown in the widget, as AutomaticMaskGenerator arguments."""
        return {
            "points_per_side": self.points_per_side_spin.value(),
            "pred_iou_thresh": self.iou_thresh_spin.value(),
            "stability_score_thresh": self.stability_spin.value(),
            "box_nms_thresh": self.nms_spin.value(),
        }

    @_reports_errors
    def segment_everything(self) -> Any:
        """Automatic segmentation of the current image/slice into the "segany automatic" layer."""
        automatic_mask_generator_class()  # a clear message now if the core lacks it
        session = self._ensure_session()
        if session is None:
            raise SegAnyError("press Embed first to load the model")
        if _running(self._job_worker):
            raise SegAnyError("another segany job is running; wait or cancel it")
        key = self._slice_key()
        params = self.automatic_parameters()
        cancel = threading.Event()
        worker = create_worker(
            _guarded, session.automatic, key, cancel, **params,
            _progress={"desc": "segany: segmenting everything"},
        )

        def on_returned(value: Any) -> None:
            if self._state["closed"]:
                return
            if isinstance(value, _Failure):
                show_error(value.message)
                return
            if value is _CANCELLED or cancel.is_set() or self.session is not session:
                return  # cancelled (the generator may finish its work, unseen) or outdated
            layer = self.auto_layer
            if layer is None or layer not in self.viewer.layers or layer.data.shape != session.labels_shape:
                self.auto_layer = layer = self.viewer.add_labels(
                    np.zeros(session.labels_shape, np.uint32), name=AUTO_NAME,
                    **self._transform_kwargs(self._session_layer),  # type: ignore[arg-type]
                )
            layer.data[key if key else ...] = value
            layer.refresh()
            self._set_status(f"Automatic segmentation: {int(value.max())} objects.")

        worker.returned.connect(on_returned)
        self._start_job(worker, cancel)
        return worker

    # ================================================================== export
    @_reports_errors
    def export_training_data(self, folder: str | None = None) -> list[str] | None:
        """Write the committed labels (and their image slices) as training samples."""
        layer = self._session_layer or self.image_layer()
        if layer is None or self.labels_layer is None:
            raise SegAnyError("nothing to export: commit some objects first")
        if not np.any(self.labels_layer.data):
            raise SegAnyError("nothing to export: the output labels are empty")
        if folder is None:
            folder = QFileDialog.getExistingDirectory(self, "Export training data to")
            if not folder:
                return None
        name = re.sub(r"[^A-Za-z0-9_.-]+", "_", layer.name).strip("._") or "image"
        session = self.session if self._session_layer is layer else None
        source = getattr(getattr(layer, "source", None), "path", None) or layer.name
        written = export_training_data(
            folder, name, self._pixels(layer), self.labels_layer.data, rgb=layer.rgb,
            prompts=session.committed_prompts if session is not None else None,
            source=str(source), partial=not self.complete_check.isChecked(),
        )
        show_info(f"exported {len(written)} sample(s) to {folder}")
        return written
