"""segany in QGIS: a Processing provider (``segany:encode``, ``segany:segment_prompts``,
``segany:automatic``) and a click-to-segment map tool.

QGIS loads this folder as a plugin and calls :func:`classFactory`. The plugin is a thin
front-end: every computation happens in the ``segany`` core package, which (with torch)
must be importable by QGIS's Python. When it is not installed into that Python, the
plugin looks for a virtual environment that has it (see :mod:`qgis_segany.environment`).
"""

from __future__ import annotations

from typing import Any

from .environment import ensure_segany

# Before anything imports numpy: the environment's packages must come first on sys.path.
ensure_segany()


def classFactory(iface: Any) -> Any:  # noqa: N802 (QGIS's name)
    """QGIS's entry point: the plugin object for QGIS Desktop or ``qgis_process``."""
    from .plugin import SegAnyPlugin

    return SegAnyPlugin(iface)
