#!/usr/bin/env bash
# Smoke-check the installed environment: every stack imports in one process, headless QGIS
# (with Processing) starts, napari opens a viewer under Xvfb, and qgis_process runs.
# Usage: tools/check-env.sh VENV_DIR
set -euo pipefail
py="${1:?usage: $0 VENV_DIR}/bin/python"

echo "check-env: imports"
"$py" - <<'PY'
import torch, numpy, qgis.core, PyQt5.QtCore, napari, rasterio, dask, zarr, geopandas
import sys
assert numpy.__version__.startswith("2"), f"numpy {numpy.__version__} from {numpy.__file__}: pip's numpy 2 must win"
assert "/usr/lib/python3/dist-packages/numpy" not in numpy.__file__
print(f"  python {sys.version.split()[0]}, torch {torch.__version__}, numpy {numpy.__version__}, "
      f"QGIS {qgis.core.Qgis.QGIS_VERSION}, PyQt5 {PyQt5.QtCore.PYQT_VERSION_STR}, napari {napari.__version__}, "
      f"rasterio {rasterio.__version__}, dask {dask.__version__}, zarr {zarr.__version__}, geopandas {geopandas.__version__}")
print("ok")
PY

echo "check-env: headless QGIS + Processing"
QT_QPA_PLATFORM=offscreen "$py" - <<'PY'
from qgis.core import QgsApplication
app = QgsApplication([], False)
app.initQgis()
from processing.core.Processing import Processing
Processing.initialize()
n = len(QgsApplication.processingRegistry().algorithms())
assert n > 100, n
print(f"  {n} processing algorithms")
print("ok")
PY

echo "check-env: napari viewer under Xvfb"
xvfb-run -a "$py" - <<'PY'
import napari, numpy as np
viewer = napari.Viewer(show=False)
viewer.add_image(np.zeros((8, 8), dtype=np.uint8))
viewer.close()
print("ok")
PY

echo "check-env: qgis_process"
QT_QPA_PLATFORM=offscreen /usr/bin/qgis_process.bin --version
echo "check-env: all ok"
