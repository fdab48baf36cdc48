#!/usr/bin/env bash
# Create VENV_DIR with Debian's /usr/bin/python3 (the Python QGIS is built for), without system
# site packages, unless a working one of that kind is already there.
# Usage: tools/ensure-venv.sh VENV_DIR
set -euo pipefail
venv="${1:?usage: $0 VENV_DIR}"
base=/usr/bin/python3

ok=1
if [[ ! -x "$venv/bin/python" || ! -f "$venv/pyvenv.cfg" ]]; then
    ok=0
elif ! "$venv/bin/python" -c 'import sys; sys.exit(sys.base_prefix != "/usr")' 2>/dev/null; then
    echo "ensure-venv: $venv does not run on Debian's $base: recreating it" >&2; ok=0
elif grep -q -E '^include-system-site-packages *= *true' "$venv/pyvenv.cfg"; then
    echo "ensure-venv: $venv has system site packages (leaks Debian's numpy 1.24): recreating it" >&2; ok=0
fi

if ((!ok)); then
    echo "ensure-venv: creating $venv with $base"
    "$base" -m venv --clear "$venv"
fi
