"""Click-to-segment on the QGIS map canvas.

Two layers, so that the logic is testable with a headless ``QgsMapCanvas``:

* :class:`MapSegmenter` holds the logic: the prompt being built (object clicks, background
  clicks, a box, all in map coordinates of the canvas), its conversion to raster pixels and
  the call to the core (:func:`segany.scene.segment`, which also follows objects across
  tiles), the preview polygon in the canvas CRS, and accepting the object into a vector
  layer (reprojected to that layer's CRS). Decoding is split into :meth:`request` (GUI
  thread), :meth:`run` (any thread) and :meth:`apply` (GUI thread): a result that answers
  an older prompt than the current one is dropped ("latest click wins").
* :class:`SegmentMapTool` is the ``QgsMapTool`` glue: left click = object point, right
  click = background point, left drag = box, Enter = accept, Esc = clear, Backspace =
  undo the last prompt; rubber bands show the prompt and the preview.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass
from typing import Any, Callable

from qgis.core import (
    QgsApplication,
    QgsCoordinateReferenceSystem,
    QgsFeature,
    QgsGeometry,
    QgsPointXY,
    QgsRasterLayer,
    QgsRectangle,
    QgsTask,
    QgsVectorLayer,
    QgsWkbTypes,
)
from qgis.gui import QgsMapCanvas, QgsMapMouseEvent, QgsMapTool, QgsRubberBand
from qgis.PyQt.QtCore import QPoint, Qt, pyqtSignal
from qgis.PyQt.QtGui import QColor, QKeyEvent

from . import conversions

#: A drag shorter than this (screen pixels) is a click.
DRAG_THRESHOLD = 5


@dataclass(frozen=True)
class SegmentRequest:
    """A snapshot of the prompt to decode (``prompt`` is a core prompt in map coordinates)."""

    generation: int
    prompt: Any


@dataclass
class SegmentResult:
    """The answer to a :class:`SegmentRequest`: the core object and its preview polygon
    (canvas CRS), or the error message."""

    generation: int
    obj: Any = None
    preview: QgsGeometry | None = None
    error: str | None = None


class MapSegmenter:
    """The map tool's logic: prompts on a canvas -> segany core -> preview -> a feature.

    Args:
        canvas: the map canvas (its CRS is the prompts' CRS; its transform maps screen
            positions to map coordinates).
        raster: the raster layer to segment (a file GDAL reads), or a file path.
        model: a model spec (registry name, checkpoint path, None for the default) or a
            model object; loaded on the first decode.
        decoder: replaces SAM's decoder (see :mod:`segany.scene`; tests and model-free demos).
        bands: 1-based bands (1 or 3); default: the core's rules.
        models: a :class:`~qgis_segany.algorithms.ModelCache` to share (the plugin passes
            its provider's, so the map tool and the algorithms load a model once).
    """

    def __init__(self, canvas: QgsMapCanvas, raster: QgsRasterLayer | str, model: Any = None, *,
                 decoder: Callable[..., Any] | None = None, bands: list[int] | None = None,
                 device: str | None = None, models: Any = None) -> None:
        from segany.raster import open_raster

        from .algorithms import ModelCache

        self.canvas = canvas
        path = conversions.raster_path(raster) if isinstance(raster, QgsRasterLayer) else str(raster)
        self.raster = open_raster(path, bands, warn_no_crs=False)
        self.model_spec, self.device = model, device
        self.models = models if models is not None else ModelCache()
        self._decoder = decoder
        self._encoder: Any = None
        self._lock = threading.Lock()  # one decode at a time: the predictor holds state
        self.points: list[tuple[QgsPointXY, int]] = []
        self.box: QgsRectangle | None = None
        self._history: list[str] = []  # "point" / "box": what undo removes
        self.generation = 0
        self.obj: Any = None
        self.preview: QgsGeometry | None = None

    # -------------------------------------------------------------- coordinates
    @property
    def map_crs(self) -> QgsCoordinateReferenceSystem:
        return self.canvas.mapSettings().destinationCrs()

    def to_map(self, pos: QPoint) -> QgsPointXY:
        """A canvas position (screen pixels) in map coordinates."""
        return self.canvas.getCoordinateTransform().toMapCoordinates(int(pos.x()), int(pos.y()))

    # -------------------------------------------------------------- prompt
    def _changed(self) -> int:
        self.generation += 1
        return self.generation

    def add_point(self, point: QgsPointXY, foreground: bool = True) -> int:
        """Add an object (or background) point in map coordinates; returns the generation."""
        self.points.append((QgsPointXY(point), 1 if foreground else 0))
        self._history.append("point")
        return self._changed()

    def add_click(self, pos: QPoint, foreground: bool = True) -> int:
        """Add a point clicked at a canvas position."""
        return self.add_point(self.to_map(pos), foreground)

    def set_box(self, rect: QgsRectangle) -> int:
        """Set the box (map coordinates); a new box replaces the old one."""
        self.box = QgsRectangle(rect)
        self.box.normalize()
        self._history = [h for h in self._history if h != "box"] + ["box"]
        return self._changed()

    def set_box_from_canvas(self, start: QPoint, end: QPoint) -> int:
        """Set the box dragged between two canvas positions."""
        return self.set_box(QgsRectangle(self.to_map(start), self.to_map(end)))

    def undo(self) -> int:
        """Remove the last point or the box."""
        if self._history:
            if self._history.pop() == "box":
                self.box = None
            else:
                self.points.pop()
        if self.empty:
            self.obj = self.preview = None
        return self._changed()

    def clear(self) -> int:
        """Forget the prompt and the preview."""
        self.points, self.box, self._history = [], None, []
        self.obj = self.preview = None
        return self._changed()

    @property
    def empty(self) -> bool:
        return not self.points and self.box is None

    def prompt(self) -> Any:
        """The prompt as a core :class:`segany.geo.Prompt` in map coordinates (None: empty)."""
        if self.empty:
            return None
        from segany.geo import Prompt

        xy = [(p.x(), p.y()) for p, _l in self.points]
        box = None if self.box is None else [self.box.xMinimum(), self.box.yMinimum(), self.box.xMaximum(),
                                             self.box.yMaximum()]
        return Prompt(xy, [label for _p, label in self.points], box, "map tool", conversions.crs_to_core(self.map_crs))

    def pixel_prompt(self) -> Any:
        """The prompt in raster pixels (x = column, y = row), as the core places it."""
        from segany.geo import to_pixels

        prompt = self.prompt()
        return None if prompt is None else to_pixels([prompt], self.raster)[0]

    # -------------------------------------------------------------- decoding
    def request(self) -> SegmentRequest | None:
        """What to decode now (GUI thread); None when there is no prompt."""
        prompt = self.prompt()
        return None if prompt is None else SegmentRequest(self.generation, prompt)

    def encoder(self) -> Any:
        """The model (loaded on first use, through the shared model cache)."""
        if self._encoder is None:
            from segany.tiling import TileEncoder

            model = self.model_spec
            if model is None or isinstance(model, str):
                model = self.models.get(model, self.device)
            self._encoder = TileEncoder(model)
        return self._encoder

    def run(self, request: SegmentRequest) -> SegmentResult:
        """Decode a request (any thread): the core segments, and the object's outline is
        reprojected to the canvas CRS. Errors come back as the result's ``error``."""
        from segany.errors import SegAnyError
        from segany.scene import SamDecoder, object_geometry, segment

        map_crs = conversions.crs_to_core(self.map_crs)
        try:
            with self._lock:
                if self._decoder is None:
                    # Keep a few window embeddings: clicks near each other skip the encoder.
                    self._decoder = SamDecoder(self.encoder(), keep=4)
                # SAM's decoder needs the encoder for windows not seen yet; a stand-in does not.
                model = self._encoder if isinstance(self._decoder, SamDecoder) else None
                objs = segment(self.raster, [request.prompt], model, decoder=self._decoder)
        except (SegAnyError, ValueError, OSError) as exc:
            return SegmentResult(request.generation, error=str(exc))
        if not objs:
            return SegmentResult(request.generation, error="the model found no object there")
        obj = objs[0]
        geom = object_geometry(obj, self.raster, to_crs=map_crs)
        return SegmentResult(request.generation, obj, conversions.geometry_from_core(geom))

    def apply(self, result: SegmentResult) -> bool:
        """Show a result (GUI thread) unless the prompt changed since it was requested."""
        if result.generation != self.generation:
            return False
        self.obj, self.preview = result.obj, result.preview
        return result.error is None

    def update(self) -> SegmentResult | None:
        """Request, run and apply in one go (synchronous; tests and scripts)."""
        request = self.request()
        if request is None:
            return None
        result = self.run(request)
        self.apply(result)
        return result

    # -------------------------------------------------------------- accepting
    def accept(self, layer: QgsVectorLayer) -> QgsFeature:
        """Add the previewed object to ``layer`` (a polygon layer; editing is started when
        needed, saving is left to the user) and clear the prompt for the next object.

        The geometry is the object's outline reprojected to the layer's CRS; the layer's
        fields named like segany's outputs (``predicted_iou``, ``area``, ...) are filled.
        """
        from segany.scene import model_name, object_record

        if self.obj is None:
            raise ValueError("nothing to accept: click on an object first")
        if layer is None or not layer.isValid():
            raise ValueError("choose a valid vector layer to add the object to")
        if layer.geometryType() != QgsWkbTypes.PolygonGeometry:
            raise ValueError(f"layer '{layer.name()}' is not a polygon layer")
        record = object_record(self.obj, self.raster, to_crs=conversions.crs_to_core(layer.crs()),
                               model_name=model_name(self._encoder) if self._encoder is not None else None)
        feature = conversions.feature_from_record(record, layer.fields())
        geometry = feature.geometry()
        if not QgsWkbTypes.isMultiType(layer.wkbType()) and geometry.isMultipart():
            parts = geometry.asGeometryCollection()
            if len(parts) == 1:
                geometry = parts[0]
            feature.setGeometry(geometry)
        if not layer.isEditable() and not layer.startEditing():
            raise ValueError(f"layer '{layer.name()}' cannot be edited")
        if not layer.addFeature(feature):
            raise ValueError(f"layer '{layer.name()}' refused the feature")
        self.clear()
        return feature


class SegmentMapTool(QgsMapTool):
    """Mouse and keyboard glue around a :class:`MapSegmenter` (see the module docs).

    Decoding runs in a ``QgsTask`` (the encoder can take seconds); ``synchronous=True``
    decodes on the spot (tests, scripts).
    """

    previewChanged = pyqtSignal()  # noqa: N815 (Qt naming)
    accepted = pyqtSignal(QgsFeature)
    message = pyqtSignal(str)

    def __init__(self, canvas: QgsMapCanvas, segmenter: MapSegmenter | None = None, *,
                 target: Callable[[], QgsVectorLayer | None] | None = None, synchronous: bool = False) -> None:
        super().__init__(canvas)
        self.segmenter = segmenter
        self.target = target or (lambda: None)
        self.synchronous = synchronous
        self._press: QPoint | None = None
        self._dragging = False
        self._task: QgsTask | None = None
        self.preview_band = QgsRubberBand(canvas, QgsWkbTypes.PolygonGeometry)
        self.preview_band.setColor(QColor(255, 170, 0, 200))
        self.preview_band.setFillColor(QColor(255, 170, 0, 70))
        self.preview_band.setWidth(2)
        self.box_band = QgsRubberBand(canvas, QgsWkbTypes.PolygonGeometry)
        self.box_band.setColor(QColor(0, 160, 255, 220))
        self.box_band.setFillColor(QColor(0, 0, 0, 0))
        self.points_band = {label: QgsRubberBand(canvas, QgsWkbTypes.PointGeometry) for label in (0, 1)}
        for label, colour in ((1, QColor(0, 200, 0)), (0, QColor(220, 0, 0))):
            self.points_band[label].setColor(colour)
            self.points_band[label].setIconSize(10)
            self.points_band[label].setIcon(QgsRubberBand.ICON_CIRCLE)
        self.setCursor(Qt.CrossCursor)

    # -------------------------------------------------------------- events
    def canvasPressEvent(self, event: QgsMapMouseEvent) -> None:  # noqa: N802
        self._press, self._dragging = event.pos(), False

    def canvasMoveEvent(self, event: QgsMapMouseEvent) -> None:  # noqa: N802
        if self._press is None or not (event.buttons() & Qt.LeftButton):
            return
        if (event.pos() - self._press).manhattanLength() >= DRAG_THRESHOLD:
            self._dragging = True
            rect = QgsRectangle(self.toMapCoordinates(self._press), self.toMapCoordinates(event.pos()))
            self.box_band.setToGeometry(QgsGeometry.fromRect(rect), None)

    def canvasReleaseEvent(self, event: QgsMapMouseEvent) -> None:  # noqa: N802
        if self.segmenter is None:
            self.message.emit("choose a raster layer to segment first")
            return
        start, self._press = self._press or event.pos(), None
        dragged = (event.pos() - start).manhattanLength() >= DRAG_THRESHOLD
        if event.button() == Qt.LeftButton and dragged:
            self.segmenter.set_box_from_canvas(start, event.pos())
        elif event.button() in (Qt.LeftButton, Qt.RightButton):
            self.segmenter.add_click(event.pos(), foreground=event.button() == Qt.LeftButton)
        else:
            return
        self.refresh()

    def keyPressEvent(self, event: QKeyEvent) -> None:  # noqa: N802
        key = event.key()
        if self.segmenter is None:
            return
        if key in (Qt.Key_Return, Qt.Key_Enter):
            self.accept()
        elif key == Qt.Key_Escape:
            self.segmenter.clear()
            self.refresh()
        elif key == Qt.Key_Backspace:
            self.segmenter.undo()
            self.refresh()
        else:
            return
        event.accept()

    # -------------------------------------------------------------- actions
    def accept(self) -> QgsFeature | None:
        """Accept the preview into the target layer."""
        try:
            feature = self.segmenter.accept(self.target())  # type: ignore[union-attr]
        except ValueError as exc:
            self.message.emit(str(exc))
            return None
        self.accepted.emit(feature)
        self.refresh()
        return feature

    def refresh(self) -> None:
        """Redraw the prompt and decode it (a new prompt makes older results stale)."""
        self._draw_prompt()
        request = self.segmenter.request() if self.segmenter is not None else None
        if request is None:
            self._draw_preview()
            return
        if self.synchronous:
            self._finish(self.segmenter.run(request))  # type: ignore[union-attr]
            return
        segmenter = self.segmenter

        def work(_task: QgsTask) -> SegmentResult:
            return segmenter.run(request)  # type: ignore[union-attr]

        def done(exception: Exception | None, result: SegmentResult | None = None) -> None:
            if exception is not None:
                self.message.emit(f"segany: {exception}")
            elif result is not None and segmenter is self.segmenter:
                self._finish(result)

        self._task = QgsTask.fromFunction("segany: segment at the click", work, on_finished=done)
        QgsApplication.taskManager().addTask(self._task)

    def _finish(self, result: SegmentResult) -> None:
        if self.segmenter is not None and self.segmenter.apply(result):
            self._draw_preview()
            self.previewChanged.emit()
        elif result.error and result.generation == getattr(self.segmenter, "generation", None):
            self._draw_preview()
            self.message.emit(result.error)

    def _draw_prompt(self) -> None:
        for band in self.points_band.values():
            band.reset(QgsWkbTypes.PointGeometry)
        self.box_band.reset(QgsWkbTypes.PolygonGeometry)
        if self.segmenter is None:
            return
        for point, label in self.segmenter.points:  # map coordinates already: no layer transform
            self.points_band[label].addPoint(point, True)
        if self.segmenter.box is not None:
            self.box_band.setToGeometry(QgsGeometry.fromRect(self.segmenter.box), None)

    def _draw_preview(self) -> None:
        self.preview_band.reset(QgsWkbTypes.PolygonGeometry)
        preview = self.segmenter.preview if self.segmenter is not None else None
        if preview is not None and not preview.isEmpty():
            self.preview_band.setToGeometry(preview, None)

    def deactivate(self) -> None:
        self.preview_band.reset(QgsWkbTypes.PolygonGeometry)
        self.box_band.reset(QgsWkbTypes.PolygonGeometry)
        for band in self.points_band.values():
            band.reset(QgsWkbTypes.PointGeometry)
        super().deactivate()
