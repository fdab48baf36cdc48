#!/usr/bin/env bash
# Make Debian's QGIS, PyQt5, GDAL and psycopg2 bindings importable from the venv, and nothing
# else from Debian's dist-packages.
#
# Why: QGIS 3.22 is built for Debian's Python and Qt; PyQt5 from pip and QGIS can never share
# a process. A venv with --system-site-packages would also leak Debian's old numpy 1.24 and attrs,
# which break rasterio and numpy 2. So the venv gets a folder of symlinks to just the packages
# below, put on sys.path by a .pth file. .pth entries go AFTER site-packages, so pip's packages
# (numpy 2, ...) always win over anything reachable through the links.
# Usage: tools/link-debian-python.sh VENV_DIR
set -euo pipefail

venv="$(cd "${1:?usage: $0 VENV_DIR}" && pwd)"
dist=/usr/lib/python3/dist-packages
links="$venv/debian-links"
# PyQt5/sip and PyQt5/Qsci live inside the PyQt5 folder on Debian 12: no separate sip link needed.
packages=(qgis PyQt5 osgeo osgeo_utils psycopg2)

site="$("$venv/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')"
mkdir -p "$links"
for pkg in "${packages[@]}"; do
    [[ -e "$dist/$pkg" ]] || { echo "link-debian-python: $dist/$pkg missing (run tools/ensure-apt.sh)" >&2; exit 1; }
    ln -sfn "$dist/$pkg" "$links/$pkg"
done

pth="$site/segany-debian.pth"
want="$(printf '%s\n' "$links" /usr/share/qgis/python/plugins)"
# Rewrite only when it differs, so the file's mtime means something.
if [[ ! -f "$pth" || "$(cat "$pth")" != "$want" ]]; then
    printf '%s\n' "$want" >"$pth"
    echo "link-debian-python: wrote $pth"
fi
