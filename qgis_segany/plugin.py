"""The plugin object: the Processing provider everywhere, the map tool in QGIS Desktop."""

from __future__ import annotations

from typing import Any

from qgis.core import QgsApplication, QgsMapLayerProxyModel, QgsRasterLayer, QgsVectorLayer
from qgis.gui import QgsFileWidget, QgsMapLayerComboBox
from qgis.PyQt.QtCore import Qt
from qgis.PyQt.QtGui import QIcon
from qgis.PyQt.QtWidgets import (
    QAction,
    QComboBox,
    QDockWidget,
    QFormLayout,
    QHBoxLayout,
    QLabel,
    QPushButton,
    QVBoxLayout,
    QWidget,
)

from .provider import ICON, SegAnyProvider


class SegAnyPlugin:
    """Registers the ``segany`` provider (``initProcessing``: also what ``qgis_process``
    calls) and, in QGIS Desktop, a toolbar button opening the segmentation dock."""

    def __init__(self, iface: Any) -> None:
        self.iface = iface
        self.provider: SegAnyProvider | None = None
        self.action: QAction | None = None
        self.dock: SegmentDock | None = None

    def initProcessing(self) -> None:  # noqa: N802
        if self.provider is None:
            self.provider = SegAnyProvider()
            QgsApplication.processingRegistry().addProvider(self.provider)

    def initGui(self) -> None:  # noqa: N802
        self.initProcessing()
        if self.iface is None:
            return
        self.action = QAction(QIcon(str(ICON)), "Segment Anything map tool", self.iface.mainWindow())
        self.action.setCheckable(True)
        self.action.toggled.connect(self._toggle)
        self.iface.addToolBarIcon(self.action)
        self.iface.addPluginToRasterMenu("Segment Anything", self.action)

    def _toggle(self, on: bool) -> None:
        if self.dock is None:
            self.dock = SegmentDock(self.iface, self.provider.models if self.provider else None)
            self.iface.addDockWidget(Qt.RightDockWidgetArea, self.dock)
        self.dock.setVisible(on)
        self.dock.activate(on)

    def unload(self) -> None:
        if self.provider is not None:
            QgsApplication.processingRegistry().removeProvider(self.provider)
            self.provider = None
        if self.iface is not None and self.action is not None:
            self.iface.removeToolBarIcon(self.action)
            self.iface.removePluginRasterMenu("Segment Anything", self.action)
        if self.dock is not None:
            self.dock.activate(False)
            self.iface.removeDockWidget(self.dock)
            self.dock.deleteLater()
            self.dock = None


class SegmentDock(QDockWidget):
    """Chooses the raster, the model and the target layer; owns the map tool."""

    def __init__(self, iface: Any, models: Any = None) -> None:
        super().__init__("Segment Anything")
        from .algorithms import ModelCache

        self.models = models if models is not None else ModelCache()
        from .algorithms import model_names
        from .maptool import SegmentMapTool

        self.iface = iface
        body = QWidget()
        form = QFormLayout()
        self.raster_box = QgsMapLayerComboBox()
        self.raster_box.setFilters(QgsMapLayerProxyModel.RasterLayer)
        self.target_box = QgsMapLayerComboBox()
        self.target_box.setFilters(QgsMapLayerProxyModel.PolygonLayer)
        self.model_box = QComboBox()
        self.model_box.addItems(model_names())
        self.checkpoint = QgsFileWidget()
        self.checkpoint.setFilter("Checkpoints (*.pth *.pt *.safetensors);;All files (*)")
        form.addRow("Raster", self.raster_box)
        form.addRow("Model", self.model_box)
        form.addRow("Checkpoint", self.checkpoint)
        form.addRow("Add objects to", self.target_box)
        buttons = QHBoxLayout()
        self.accept_button = QPushButton("Accept (Enter)")
        self.clear_button = QPushButton("Clear (Esc)")
        buttons.addWidget(self.accept_button)
        buttons.addWidget(self.clear_button)
        self.status = QLabel("Left click: object. Right click: background. Drag: box.")
        self.status.setWordWrap(True)
        layout = QVBoxLayout(body)
        layout.addLayout(form)
        layout.addLayout(buttons)
        layout.addWidget(self.status)
        layout.addStretch(1)
        self.setWidget(body)

        canvas = iface.mapCanvas()
        self.tool = SegmentMapTool(canvas, target=self.target_layer)
        self.tool.message.connect(self.status.setText)
        self.tool.accepted.connect(lambda _f: self.status.setText("Object added; save the layer's edits to keep it."))
        self.accept_button.clicked.connect(self.tool.accept)
        self.clear_button.clicked.connect(self._clear)
        for signal in (self.raster_box.layerChanged, self.model_box.currentIndexChanged,
                       self.checkpoint.fileChanged):
            signal.connect(self._reset_segmenter)

    def target_layer(self) -> QgsVectorLayer | None:
        layer = self.target_box.currentLayer()
        return layer if isinstance(layer, QgsVectorLayer) else None

    def activate(self, on: bool) -> None:
        canvas = self.iface.mapCanvas()
        if on:
            self._reset_segmenter()
            canvas.setMapTool(self.tool)
        elif canvas.mapTool() is self.tool:
            canvas.unsetMapTool(self.tool)

    def _clear(self) -> None:
        if self.tool.segmenter is not None:
            self.tool.segmenter.clear()
            self.tool.refresh()

    def _reset_segmenter(self, *_args: Any) -> None:
        from .algorithms import DEFAULT_MODEL
        from .maptool import MapSegmenter

        layer = self.raster_box.currentLayer()
        self.tool.segmenter = None
        if not isinstance(layer, QgsRasterLayer):
            self.status.setText("Add a raster layer to segment.")
            return
        spec = self.checkpoint.filePath() or self.model_box.currentText()
        try:
            self.tool.segmenter = MapSegmenter(self.iface.mapCanvas(), layer,
                                               None if spec == DEFAULT_MODEL else spec, models=self.models)
        except Exception as exc:  # segany's errors and a missing segany: shown, not raised
            self.status.setText(f"segany: {exc}")
            return
        self.status.setText("Left click: object. Right click: background. Drag: box. Enter: accept.")
        self.tool.refresh()
