"""Make ``segany`` (and torch) importable from QGIS's Python.

QGIS runs plugins in the Python it was built with (``/usr/bin/python3`` on Debian). segany
and torch are usually installed in a virtual environment instead (``make setup`` builds
``.venv``). In order, the plugin uses:

1. ``segany`` when QGIS's Python already imports it (installed there with pip);
2. the environment named by ``$SEGANY_VENV`` (a venv folder);
3. the ``.venv`` of the checkout this plugin folder belongs to (``make qgis-plugin`` links
   the folder into the QGIS profile, so this needs no set-up at all).

The environment's site-packages go to the *front* of ``sys.path`` (with its ``.pth``
files processed, so editable installs work): its numpy 2 must win over the Debian numpy
that QGIS's own ``dist-packages`` would otherwise provide.
"""

from __future__ import annotations

import importlib.util
import os
import site
import sys
from pathlib import Path

#: Environment variable naming the virtual environment that holds segany and torch.
VENV_ENV = "SEGANY_VENV"


def site_packages(venv: Path) -> Path:
    """The site-packages folder of ``venv`` for this Python version."""
    return venv / "lib" / f"python{sys.version_info.major}.{sys.version_info.minor}" / "site-packages"


def candidate_venvs() -> list[Path]:
    """Where to look for segany, in order (only existing folders)."""
    found = []
    named = os.environ.get(VENV_ENV, "").strip()
    if named:
        found.append(Path(named).expanduser())
    # The plugin folder is usually a link into a checkout: <checkout>/qgis_segany.
    checkout = Path(__file__).resolve().parent.parent
    found.append(checkout / ".venv")
    return [v for v in found if site_packages(v).is_dir()]


def add_site_dir_first(path: Path) -> None:
    """``site.addsitedir`` (processes ``.pth`` files) but with the new entries first."""
    before = list(sys.path)
    site.addsitedir(str(path))
    added = [p for p in sys.path if p not in before]
    sys.path[:] = added + before


def ensure_segany() -> str | None:
    """Make ``import segany`` work if some known environment provides it; returns the
    site-packages folder used (None when segany was importable already, or nowhere).

    Nothing is raised here: QGIS must still load the plugin, whose algorithms then say
    exactly what is missing (see :func:`missing_message`).
    """
    if importlib.util.find_spec("segany") is not None:
        return None
    for venv in candidate_venvs():
        folder = site_packages(venv)
        add_site_dir_first(folder)
        if importlib.util.find_spec("segany") is not None:
            return str(folder)
    return None


def missing_message() -> str:
    """Why ``segany`` cannot be imported, and how to fix it."""
    return (
        "the segany package (and torch) cannot be imported by QGIS's Python "
        f"({sys.executable}, Python {sys.version.split()[0]}). Either set the environment variable "
        f"{VENV_ENV} to a virtual environment made with that Python that has segany installed "
        "(e.g. the checkout's .venv after `make setup`; QGIS: Settings > Options > System > "
        "Environment), link the plugin from a checkout with `make qgis-plugin`, or install segany "
        "into QGIS's Python with pip."
    )
