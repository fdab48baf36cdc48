"""Headless QGIS for the plugin's tests, and tests of the plugin's packaging.

QGIS needs ONE ``QgsApplication`` for the whole pytest session, created before anything
else creates a ``QApplication`` (napari's tests, pytest-qt's ``qapp``): pytest-qt and napari
then use it, since ``QApplication.instance()`` returns it. So it is created when this
module is imported, i.e. at collection time, before any test runs. It is GUI-enabled (the
map tool tests need a ``QgsMapCanvas``), on pytest-xvfb's display or Qt's offscreen
platform, and ``exitQgis()`` is never called (it segfaults with live layers).

Other QGIS test modules import :func:`qgis_app` from here.
"""

from __future__ import annotations

import configparser
import os
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PLUGIN_DIR = ROOT / "qgis_segany"

if not os.environ.get("DISPLAY"):
    os.environ.setdefault("QT_QPA_PLATFORM", "offscreen")

try:
    from qgis.core import QgsApplication
    from qgis.PyQt.QtWidgets import QApplication
except ImportError as exc:  # pragma: no cover - the set-up installs QGIS
    pytest.skip(f"PyQGIS is not importable ({exc})", allow_module_level=True)

_existing = QApplication.instance()
if _existing is None:
    QGIS_APP = QgsApplication([], True)
    QGIS_APP.initQgis()
elif isinstance(_existing, QgsApplication):
    QGIS_APP = _existing
else:  # pragma: no cover - only if something made a plain QApplication at import time
    pytest.skip("a QApplication that is not a QgsApplication exists already", allow_module_level=True)

from processing.core.Processing import Processing  # noqa: E402 (needs the application)

Processing.initialize()

from qgis_segany.provider import SegAnyProvider  # noqa: E402

# Keep a Python reference: the registry does not keep the Python object alive.
PROVIDER = QgsApplication.processingRegistry().providerById("segany")
if PROVIDER is None:
    PROVIDER = SegAnyProvider()
    QgsApplication.processingRegistry().addProvider(PROVIDER)


def qgis_app() -> QgsApplication:
    """The session's QgsApplication (with Processing and the segany provider)."""
    return QGIS_APP


def test_provider_offers_the_three_algorithms():
    ids = sorted(a.id() for a in PROVIDER.algorithms())
    assert ids == ["segany:automatic", "segany:encode", "segany:segment_prompts"]
    for alg in PROVIDER.algorithms():
        assert not alg.flags() & alg.FlagNoThreading  # runs in QGIS's worker threads
        assert alg.shortHelpString() and alg.group() == "Segment Anything"
    automatic = QgsApplication.processingRegistry().algorithmById("segany:automatic")
    advanced = {p.name() for p in automatic.parameterDefinitions() if p.flags() & p.FlagAdvanced}
    assert {"POINTS_PER_SIDE", "PRED_IOU_THRESH", "STABILITY_SCORE_THRESH", "MIN_AREA"} <= advanced
    model = automatic.parameterDefinition("MODEL")
    assert model.options()[0] == "default" and "sam_vit_b" in model.options() and model.defaultValue() == 0
    assert automatic.parameterDefinition("CHECKPOINT").flags() & automatic.parameterDefinition("CHECKPOINT").FlagOptional


def test_metadata_and_class_factory():
    meta = configparser.ConfigParser()
    meta.read(PLUGIN_DIR / "metadata.txt")
    general = meta["general"]
    assert general["qgisMinimumVersion"] == "3.22" and general["hasProcessingProvider"] == "yes"
    for key in ("name", "description", "version", "author", "icon"):
        assert general[key].strip()
    assert (PLUGIN_DIR / general["icon"]).is_file()
    import qgis_segany

    plugin = qgis_segany.classFactory(None)  # qgis_process passes no iface
    registry = QgsApplication.processingRegistry()
    before = registry.providerById("segany")
    if before is not None:  # the session's provider: swap it for the plugin's and back
        registry.removeProvider(before)
    try:
        plugin.initProcessing()
        assert registry.providerById("segany") is plugin.provider
        plugin.initGui()  # no iface: Processing only, no error
        plugin.unload()
        assert registry.providerById("segany") is None
    finally:
        global PROVIDER  # a fresh session provider (the old one was deleted with its removal)
        PROVIDER = SegAnyProvider()
        registry.addProvider(PROVIDER)


def test_environment_finds_the_checkouts_venv(tmp_path, monkeypatch):
    from qgis_segany import environment

    venvs = environment.candidate_venvs()
    assert ROOT / ".venv" in venvs  # the plugin folder lives in this checkout
    fake = tmp_path / "env"
    environment.site_packages(fake).mkdir(parents=True)
    monkeypatch.setenv(environment.VENV_ENV, str(fake))
    assert environment.candidate_venvs()[0] == fake  # $SEGANY_VENV comes first
    site_dir = environment.site_packages(fake)
    (site_dir / "marker.pth").write_text(str(tmp_path / "extra") + "\n")
    (tmp_path / "extra").mkdir()
    monkeypatch.setattr(sys, "path", list(sys.path))
    environment.add_site_dir_first(site_dir)
    assert sys.path[:2] == [str(site_dir), str(tmp_path / "extra")]  # .pth processed, both first
    assert "SEGANY_VENV" in environment.missing_message()
