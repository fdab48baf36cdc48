"""The ``segany`` Processing provider."""

from __future__ import annotations

from pathlib import Path

from qgis.core import QgsProcessingProvider
from qgis.PyQt.QtGui import QIcon

from .algorithms import AutomaticAlgorithm, EncodeAlgorithm, ModelCache, SegmentPromptsAlgorithm

ICON = Path(__file__).with_name("icon.png")


class SegAnyProvider(QgsProcessingProvider):
    """Algorithms ``segany:encode``, ``segany:segment_prompts`` and ``segany:automatic``.

    ``models`` keeps the last model loaded, for the algorithms and the plugin's map tool.
    """

    def __init__(self) -> None:
        super().__init__()
        self.models = ModelCache()

    def id(self) -> str:
        return "segany"

    def name(self) -> str:
        return "Segment Anything (segany)"

    def longName(self) -> str:  # noqa: N802
        return "Segment Anything (segany): encode rasters, segment prompts, segment everything"

    def icon(self) -> QIcon:
        return QIcon(str(ICON))

    def loadAlgorithms(self) -> None:  # noqa: N802
        for algorithm in (EncodeAlgorithm(), SegmentPromptsAlgorithm(), AutomaticAlgorithm()):
            self.addAlgorithm(algorithm)
