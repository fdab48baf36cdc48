"""The napari plugin in a real viewer (Xvfb, via pytest-xvfb): manifest, widget, workers.

Masks from a randomly initialised SAM are noise, so the tests that check WHAT is segmented
inject :class:`segany.interactive.ThresholdPredictor` (the blob under the click); the tests
that check HOW (threads, embedding, cancel) use the real tiny model ``test_tiny``.
"""

from __future__ import annotations

import json
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pytest
from napari.utils._proxies import ReadOnlyWrapper
from napari.utils.interactions import mouse_move_callbacks, mouse_press_callbacks, mouse_release_callbacks

import napari_segany._widget as widget_module
from napari_segany._sample import nuclei_stack
from napari_segany._widget import SegmentWidget
from segany.interactive import ThresholdPredictor
from segany.synthetic import cells_image

WAIT_MS = 20_000  # generous: the test machine is shared


@dataclass
class MouseEvent:
    """What napari's mouse callbacks read from a vispy event (as in napari's own tests)."""

    type: str
    modifiers: list[str]
    position: tuple[float, ...]
    is_dragging: bool = False
    pos: np.ndarray = field(default_factory=lambda: np.zeros(2))
    view_direction: list[float] | None = None
    up_direction: list[float] | None = None
    dims_displayed: list[int] = field(default_factory=lambda: [0, 1])


def iou(a: np.ndarray, b: np.ndarray) -> float:
    return float((a & b).sum() / max(1, (a | b).sum()))


def centre(mask: np.ndarray) -> tuple[int, int]:
    """(row, col) of a pixel well inside ``mask``."""
    from scipy import ndimage

    distance = ndimage.distance_transform_edt(mask)
    return tuple(int(v) for v in np.unravel_index(np.argmax(distance), mask.shape))  # type: ignore[return-value]


@pytest.fixture
def cells():
    return cells_image((192, 192), n_cells=6, radius=(10, 20), seed=2)


@pytest.fixture
def open_widget(make_napari_viewer, qtbot):
    """Open the widget from the plugin manifest next to an image; optional stand-in predictor."""

    widgets = []

    def make(image, predictor=None, **image_kwargs):
        viewer = make_napari_viewer()
        viewer.add_image(image, name="img", **image_kwargs)
        _dock, widget = viewer.window.add_plugin_dock_widget("segany", "Segment Anything")
        assert isinstance(widget, SegmentWidget)
        if predictor is not None:
            widget.set_predictor(predictor)
        widgets.append(widget)
        return viewer, widget

    yield make
    # No worker may outlive its test (it would call into a closed viewer).
    for widget in widgets:
        widget.cancel()
        qtbot.waitUntil(lambda: widget.idle(), timeout=WAIT_MS)


def wait_embedded(qtbot, widget: SegmentWidget) -> None:
    qtbot.waitUntil(
        lambda: widget.session is not None
        and widget.session.has_embedding()
        and widget._embed_worker is None,
        timeout=WAIT_MS,
    )


def click(qtbot, widget: SegmentWidget, yx, positive=None) -> None:
    """Add a point and wait until its decoded mask is in the preview layer."""
    with qtbot.waitSignal(widget.preview_changed, timeout=WAIT_MS):
        widget.add_point(yx, positive=positive)
    qtbot.waitUntil(lambda: widget._decode_worker is None and widget._pending_request is None, timeout=WAIT_MS)


def preview(widget: SegmentWidget, key=()) -> np.ndarray:
    data = widget.preview_layer.data
    return np.asarray(data[key] if key else data) > 0


# ------------------------------------------------------------------------------------ manifest


def test_manifest_declares_widget_and_samples_and_ships_in_package():
    import npe2

    root = Path(__file__).resolve().parents[1]
    top_level = root / "napari.yaml"
    packaged = root / "napari_segany" / "napari.yaml"
    assert top_level.exists() and top_level.resolve() == packaged.resolve()
    manifest = npe2.PluginManifest.from_file(top_level)
    assert manifest.name == "segany"
    assert [w.display_name for w in manifest.contributions.widgets] == ["Segment Anything"]
    assert {s.key for s in manifest.contributions.sample_data} >= {"nuclei", "nuclei_3d"}
    # The installed distribution finds the same manifest through its entry point.
    installed = npe2.PluginManifest.from_distribution("segany")
    assert installed.contributions.widgets[0].command == "segany.segment_widget"


def test_sample_data_opens(make_napari_viewer):
    viewer = make_napari_viewer()
    viewer.open_sample("segany", "nuclei_3d")
    assert viewer.layers[-1].data.ndim == 3 and viewer.layers[-1].data.dtype == np.uint8


# ------------------------------------------------------------------------------------ 2D


def test_click_preview_cycle_commit_undo_clear(open_widget, qtbot, cells):
    image, truth = cells
    viewer, widget = open_widget(image, ThresholdPredictor())
    widget.embed()
    wait_embedded(qtbot, widget)
    assert widget.points_layer.mode == "add"
    target = truth == 1
    click(qtbot, widget, centre(target))
    assert iou(preview(widget), target) > 0.8
    assert widget.candidate_label.text().startswith(f"{widget.session.selected + 1} of 3: predicted IoU")

    first = widget.session.selected
    shown = preview(widget).copy()
    assert widget.cycle() == (first + 1) % 3
    assert not np.array_equal(preview(widget), shown) or np.array_equal(
        widget.session.candidates.masks[first], widget.session.candidates.masks[(first + 1) % 3]
    )
    widget.cycle(-1)

    object_id = widget.commit()
    assert object_id == 1
    assert iou(widget.labels_layer.data == 1, target) > 0.8
    assert len(widget.points_layer.data) == 0 and not preview(widget).any()

    second = truth == 2
    click(qtbot, widget, centre(second))
    assert widget.commit() == 2
    assert widget.undo() == 2
    assert not (widget.labels_layer.data == 2).any() and (widget.labels_layer.data == 1).any()

    click(qtbot, widget, centre(second))
    widget.clear()
    assert not preview(widget).any() and len(widget.points_layer.data) == 0
    assert widget.session.candidates is None


def test_shift_click_adds_negative_point(open_widget, qtbot, cells):
    image, truth = cells
    viewer, widget = open_widget(image, ThresholdPredictor())
    widget.prepare()
    layer = widget.points_layer
    row, col = centre(truth == 3)

    def mouse(kind: str, modifiers: list[str]) -> None:
        event = ReadOnlyWrapper(MouseEvent(kind, modifiers, (row, col)), exceptions=("handled",))
        (mouse_press_callbacks if kind == "mouse_press" else mouse_release_callbacks)(layer, event)

    with qtbot.waitSignal(widget.preview_changed, timeout=WAIT_MS):
        mouse("mouse_press", [])
        mouse("mouse_release", [])
    mouse("mouse_press", ["Shift"])
    mouse("mouse_release", ["Shift"])
    assert layer.features["positive"].tolist() == [True, False]
    assert np.allclose(layer.face_color[1], [1.0, 0.2, 0.2, 1.0])
    # napari copies a selected point's features into the layer's defaults; the selected
    # negative point must not make the next plain click negative too.
    qtbot.waitUntil(lambda: widget._decode_worker is None and widget._pending_request is None, timeout=WAIT_MS)
    row, col = centre(truth == 4)
    mouse("mouse_press", [])
    mouse("mouse_release", [])
    assert layer.features["positive"].tolist() == [True, False, True]
    qtbot.waitUntil(lambda: widget._decode_worker is None and widget._pending_request is None, timeout=WAIT_MS)
    assert widget.session.candidates.request.prompt.labels.tolist() == [1, 0, 1]
    widget.set_positive(False)  # the T key
    widget.add_point((5, 5))
    assert layer.features["positive"].tolist() == [True, False, True, False]
    qtbot.waitUntil(lambda: widget._decode_worker is None and widget._pending_request is None, timeout=WAIT_MS)


class SlowCountingPredictor(ThresholdPredictor):
    """The stand-in predictor with a decoder slow enough to see whether a click waits for it."""

    def __init__(self, delay: float) -> None:
        super().__init__()
        self.delay = delay
        self.decodes = 0

    def predict(self, *args, **kwargs):
        self.decodes += 1
        time.sleep(self.delay)
        return super().predict(*args, **kwargs)


def test_resting_pointer_decodes_ahead_so_the_click_shows_its_mask_at_once(open_widget, qtbot, cells):
    image, truth = cells
    predictor = SlowCountingPredictor(delay=0.3)
    viewer, widget = open_widget(image, predictor)
    widget.embed()
    wait_embedded(qtbot, widget)
    layer = widget.points_layer
    (row, col), (row2, col2) = centre(truth == 1), centre(truth == 2)

    def move(position, modifiers=()):
        event = ReadOnlyWrapper(MouseEvent("mouse_move", list(modifiers), position), exceptions=("handled",))
        mouse_move_callbacks(layer, event)

    # A real pointer move through napari's callbacks, a fraction of a pixel off the centre.
    with qtbot.waitSignal(widget.prefetch_done, timeout=WAIT_MS):
        move((row + 0.3, col - 0.2))
    qtbot.waitUntil(lambda: widget._decode_worker is None, timeout=WAIT_MS)
    assert not preview(widget).any() and widget.session.mask is None  # hovering shows nothing
    decodes = predictor.decodes
    # The click: its mask is in the preview when add_point returns, with no decoder run.
    start = time.perf_counter()
    widget.add_point((row, col))
    assert time.perf_counter() - start < predictor.delay
    assert iou(preview(widget), truth == 1) > 0.8 and predictor.decodes == decodes
    assert widget._decode_worker is None and widget._pending_request is None
    assert "decoded ahead in" in widget.candidate_label.text()

    # Shift held while resting: the prefetch is the current point plus a negative one there.
    with qtbot.waitSignal(widget.prefetch_done, timeout=WAIT_MS):
        move((row2, col2), ["Shift"])
    qtbot.waitUntil(lambda: widget._decode_worker is None, timeout=WAIT_MS)
    decodes = predictor.decodes
    widget.add_point((row2, col2), positive=False)
    assert predictor.decodes == decodes and layer.features["positive"].tolist() == [True, False]
    assert widget.session.candidates.request.prompt.labels.tolist() == [1, 0]

    # Clicking before the prefetch is done: the click waits for that one decode, not a second.
    widget.clear()
    decodes = predictor.decodes
    widget.hover((row2, col2))
    qtbot.waitUntil(lambda: widget._decode_worker is not None, timeout=WAIT_MS)
    with qtbot.waitSignal(widget.preview_changed, timeout=WAIT_MS):
        widget.add_point((row2, col2))
    qtbot.waitUntil(lambda: widget._decode_worker is None and widget._pending_request is None, timeout=WAIT_MS)
    assert predictor.decodes == decodes + 1 and iou(preview(widget), truth == 2) > 0.8

    # Switched off: resting decodes nothing.
    widget.clear()
    widget.prefetch_check.setChecked(False)
    decodes = predictor.decodes
    move((row, col))
    qtbot.wait(200)
    assert predictor.decodes == decodes and widget._decode_worker is None


def test_keys_drive_the_session(open_widget, qtbot, cells):
    image, truth = cells
    viewer, widget = open_widget(image, ThresholdPredictor())
    widget.embed()
    wait_embedded(qtbot, widget)
    click(qtbot, widget, centre(truth == 1))
    handler = viewer.window._qt_viewer._key_map_handler
    selected = widget.session.selected
    handler.press_key("n")  # points layer active: its binding
    assert widget.session.selected == (selected + 1) % 3
    handler.press_key("c")
    assert widget.labels_layer.data.max() == 1
    handler.press_key("u")
    assert widget.labels_layer.data.max() == 0
    viewer.layers.selection.active = viewer.layers["img"]  # viewer binding
    handler.press_key("t")
    assert widget._positive is False


def test_box_prompt(open_widget, qtbot, cells):
    image, truth = cells
    viewer, widget = open_widget(image, ThresholdPredictor())
    widget.embed()
    wait_embedded(qtbot, widget)
    target = truth == 2
    rows, cols = np.nonzero(target)
    with qtbot.waitSignal(widget.preview_changed, timeout=WAIT_MS):
        widget.add_box((rows.min() - 2, cols.min() - 2), (rows.max() + 2, cols.max() + 2))
    qtbot.waitUntil(lambda: widget._decode_worker is None, timeout=WAIT_MS)
    assert len(widget.session.candidates.masks) == 1  # a box is not ambiguous
    assert iou(preview(widget), target) > 0.8


def test_mask_prompt_from_existing_labels(open_widget, qtbot, cells):
    image, truth = cells
    viewer, widget = open_widget(image, ThresholdPredictor())
    viewer.add_labels(truth.astype(np.uint16), name="previous")
    widget.embed()
    wait_embedded(qtbot, widget)
    with qtbot.waitSignal(widget.preview_changed, timeout=WAIT_MS):
        widget.mask_combo.setCurrentIndex(widget.mask_combo.findText("previous"))
        widget.mask_id_spin.setValue(4)
    qtbot.waitUntil(lambda: widget._decode_worker is None, timeout=WAIT_MS)
    assert iou(preview(widget), truth == 4) > 0.7


def test_uint16_image_uses_core_normalisation(open_widget, qtbot, cells):
    image, truth = cells
    image16 = image.astype(np.uint16) * 50 + 3000
    viewer, widget = open_widget(image16, ThresholdPredictor())
    click(qtbot, widget, centre(truth == 5))  # no Embed pressed: the first click embeds
    assert iou(preview(widget), truth == 5) > 0.8
    assert widget.session.value_range[0] >= 3000


def test_rgb_image(open_widget, qtbot, cells):
    image, truth = cells
    rgb = np.stack([image, image // 2, image], axis=-1)
    viewer, widget = open_widget(rgb, ThresholdPredictor())
    assert viewer.layers["img"].rgb
    click(qtbot, widget, centre(truth == 1))
    assert widget.preview_layer.data.shape == truth.shape
    assert iou(preview(widget), truth == 1) > 0.8


# ------------------------------------------------------------------------------------ real model, threads


def test_tiny_model_embeds_off_the_gui_thread(open_widget, qtbot):
    image = np.random.default_rng(0).integers(0, 255, (96, 128), np.uint8)
    viewer, widget = open_widget(image)
    widget.select_model("test_tiny")
    worker = widget.embed()
    assert worker is not None
    wait_embedded(qtbot, widget)
    assert widget.last_embed_thread is not None
    assert widget.last_embed_thread != threading.get_ident()
    assert widget.session.last_embed_thread == widget.last_embed_thread
    click(qtbot, widget, (40, 60))
    assert widget.session.candidates.thread_id != threading.get_ident()
    assert widget.session.candidates.masks.shape == (3, 96, 128)
    assert widget.preview_layer.data.shape == (96, 128)


def test_stale_decode_results_are_dropped(open_widget, qtbot, cells):
    image, truth = cells

    class SlowPredictor(ThresholdPredictor):
        def predict(self, *args, **kwargs):
            time.sleep(0.15)
            return super().predict(*args, **kwargs)

    viewer, widget = open_widget(image, SlowPredictor())
    widget.embed()
    wait_embedded(qtbot, widget)
    accepted = []
    original = widget.session.accept
    widget.session.accept = lambda result: accepted.append(original(result)) or accepted[-1]
    widget.add_point(centre(truth == 1))
    widget.add_point(centre(truth == 2))  # while the first decodes: pending
    widget.add_point(centre(truth == 3))  # replaces the pending one
    qtbot.waitUntil(lambda: widget._decode_worker is None and widget._pending_request is None, timeout=WAIT_MS)
    assert accepted == [False, True]  # first result stale; second request skipped; newest shown
    assert preview(widget)[centre(truth == 3)]


def test_cancel_a_running_embedding(open_widget, qtbot):
    stack = np.random.default_rng(1).integers(0, 255, (30, 32, 32), np.uint8)

    class SlowEncoder(ThresholdPredictor):
        def set_image(self, *args, **kwargs):
            time.sleep(0.1)
            super().set_image(*args, **kwargs)

    viewer, widget = open_widget(stack, SlowEncoder())
    worker = widget.embed(all_slices=True)
    assert widget.cancel_button.isEnabled()
    qtbot.waitUntil(lambda: widget.session is not None and widget.session.has_embedding((0,)), timeout=WAIT_MS)
    with qtbot.waitSignal(widget.embedding_done, timeout=WAIT_MS):
        widget.cancel_button.click()
    done = sum(widget.session.has_embedding(k) for k in widget.session.all_slice_keys())
    assert 1 <= done < 30
    assert "cancelled" in widget.status_label.text()
    assert not widget.cancel_button.isEnabled()
    assert worker.abort_requested


# ------------------------------------------------------------------------------------ 3D, automatic, export


def test_3d_propagation_and_commit(open_widget, qtbot):
    stack, truth = nuclei_stack((12, 96, 96), n_cells=3, seed=4)
    viewer, widget = open_widget(stack, ThresholdPredictor())
    object_id = int(np.bincount(truth.ravel())[1:].argmax()) + 1
    target = truth == object_id
    z = int(np.argmax(target.sum(axis=(1, 2))))
    viewer.dims.set_point(0, z)
    click(qtbot, widget, (z, *centre(target[z])))
    assert widget.session.slice_key == (z,)
    with qtbot.waitSignal(widget.job_done, timeout=WAIT_MS):
        widget.propagate()
    found = set(k[0] for k in widget.session.object_masks)
    expected = set(np.nonzero(target.any(axis=(1, 2)))[0].tolist())
    # Blur in Z leaves a faint halo past the object's ends: allow two slices of slack.
    assert len(found & expected) >= len(expected) - 2
    assert min(expected) - 2 <= min(found) and max(found) <= max(expected) + 2
    assert min(found) > 0  # it stopped where the object vanished, not at the stack's end
    assert widget.commit() == 1
    assert iou(widget.labels_layer.data == 1, target) > 0.6


def test_errors_in_workers_are_shown_as_messages_not_tracebacks(open_widget, qtbot, cells, monkeypatch):
    messages = []
    monkeypatch.setattr(widget_module, "show_error", messages.append)
    viewer, widget = open_widget(cells[0], ThresholdPredictor())
    widget.embed()
    wait_embedded(qtbot, widget)
    with qtbot.waitSignal(widget.job_done, timeout=WAIT_MS):
        widget.segment_everything()  # the stand-in is no SAM: the generator refuses it
    assert len(messages) == 1 and "Sam or SamPredictor" in messages[0]
    assert widget.commit() is None  # nothing segmented yet: a message again, no exception
    assert "nothing to commit" in messages[1]


def test_automatic_segmentation_fills_a_labels_layer(open_widget, qtbot, cells):
    segany = pytest.importorskip("segany")
    if not hasattr(segany, "AutomaticMaskGenerator"):
        pytest.skip("segany.AutomaticMaskGenerator is not in the core yet (segany.amg in progress)")
    image = cells[0]
    viewer, widget = open_widget(image)
    widget.select_model("test_tiny")
    widget.embed()
    wait_embedded(qtbot, widget)
    widget.points_per_side_spin.setValue(2)
    for spin in (widget.iou_thresh_spin, widget.stability_spin):
        spin.setValue(0.0)  # random weights: keep whatever comes out
    with qtbot.waitSignal(widget.job_done, timeout=60_000):
        widget.segment_everything()
    layer = widget.auto_layer
    assert layer is not None and layer.data.shape == image.shape
    assert layer.data.max() >= 1


def test_export_training_data(open_widget, qtbot, cells, tmp_path):
    from segany.datasets import FolderDataset

    image, truth = cells
    viewer, widget = open_widget(image, ThresholdPredictor())
    click(qtbot, widget, centre(truth == 1))
    widget.commit()
    written = widget.export_training_data(str(tmp_path))
    assert written == ["img"]
    sample = FolderDataset(tmp_path)[0]
    assert sample.image.shape == image.shape
    assert sample.ids.tolist() == [1]
    manifest = json.loads((tmp_path / "dataset.json").read_text())
    assert manifest["partial"] is True
    prompts = json.loads((tmp_path / "prompts" / "img.json").read_text())
    assert prompts["objects"]["1"][0]["labels"] == [1]


# ------------------------------------------------------------------------------------ large images


def test_large_image_is_segmented_on_tiles(open_widget, qtbot):
    image = np.zeros((700, 1300), np.uint8) + 20
    image[600:650, 1200:1260] = 220  # an object in the bottom-right corner
    predictor = ThresholdPredictor()
    viewer, widget = open_widget(image, predictor)
    click(qtbot, widget, (625, 1230))  # the first click embeds only the tile under it
    session = widget.session
    assert session.tiled and len(session.grid) == 2
    assert sum(session.has_embedding((), frame=i) for i in range(len(session.grid))) == 1
    assert preview(widget).sum() == 50 * 60 and preview(widget)[625, 1230]
    widget.embed()  # Embed on a tiled image: every tile, with progress
    qtbot.waitUntil(lambda: widget.idle() and session.has_embedding(), timeout=WAIT_MS)


def test_open_an_embedding_cache_and_click_without_any_encoder_run(make_napari_viewer, qtbot, tmp_path):
    import segany
    from segany.raster import write_test_raster
    from segany.tiling import encode_raster

    image, truth = cells_image((250, 400), n_cells=6, radius=(10, 20), seed=5)
    raster = write_test_raster(tmp_path / "scene.tif", image[None])
    model = segany.build_sam("test_tiny")
    encode_raster(raster, model, tmp_path / "scene.zarr", tile_size=256, overlap=32, num_workers=1)
    viewer = make_napari_viewer()
    viewer.open(str(tmp_path / "scene.zarr"), plugin="segany")
    layer = viewer.layers[-1]
    assert layer.rgb and layer.data.shape == (250, 400, 3) and layer.metadata["segany_cache"]
    _dock, widget = viewer.window.add_plugin_dock_widget("segany", "Segment Anything")
    widget.set_predictor(segany.SamPredictor(model))
    runs = []
    handle = model.image_encoder.register_forward_pre_hook(lambda *_: runs.append(1))
    try:
        click(qtbot, widget, tuple(int(v) for v in np.argwhere(truth == 1)[0]))
    finally:
        handle.remove()
    assert widget.session.embedding_source is not None and widget.session.tiled
    assert widget.preview_layer.data.shape == (250, 400)
    assert runs == []  # the tile embedding came from the cache
