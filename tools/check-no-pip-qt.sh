#!/usr/bin/env bash
# Remove any Qt binding that pip pulled in as someone's dependency: a pip PyQt5 (or PyQt5-sip,
# which installs into site-packages/PyQt5/) would shadow Debian's PyQt5 and break QGIS.
# Usage: tools/check-no-pip-qt.sh VENV_DIR
set -euo pipefail
py="${1:?usage: $0 VENV_DIR}/bin/python"
mapfile -t bad < <("$py" -m pip list --format=freeze 2>/dev/null | cut -d= -f1 |
    grep -i -x -E 'pyqt5|pyqt5[-_]qt5|pyqt5[-_]sip|pyqt6|pyqt6[-_]qt6|pyqt6[-_]sip|pyside2|pyside6|shiboken2|shiboken6' || true)
if ((${#bad[@]})); then
    echo "check-no-pip-qt: removing pip Qt bindings (Debian's PyQt5 is used): ${bad[*]}" >&2
    "$py" -m pip uninstall -y "${bad[@]}"
fi
