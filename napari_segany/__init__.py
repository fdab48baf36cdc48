"""napari front-end of segany: the "Segment Anything" dock widget and sample data.

Open it from napari's menu (Plugins > segany > Segment Anything) or from Python::

    viewer.window.add_plugin_dock_widget("segany", "Segment Anything")

The widget only wires layers and threads; the logic is :mod:`segany.interactive`.
"""

from __future__ import annotations

__all__ = ["SegmentWidget"]


def __getattr__(name: str):
    # Lazy: importing the package (e.g. by npe2 to find napari.yaml) must not import Qt.
    if name == "SegmentWidget":
        from ._widget import SegmentWidget

        return SegmentWidget
    raise AttributeError(name)
