#!/usr/bin/env bash
# Install the Debian packages listed in tools/apt-packages.txt that are missing, and only those.
#
# Idempotent and cheap when nothing is missing (one dpkg-query call), so `make` runs it every
# time: a stamp alone could lie on a fresh machine whose work tree kept a .stamps/ folder.
# Usage: tools/ensure-apt.sh [STAMP_FILE]
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
stamp="${1:-}"
mapfile -t wanted < <(sed -e 's/#.*//' -e 's/[[:space:]]//g' "$here/apt-packages.txt" | grep -v '^$')

missing=()
for pkg in "${wanted[@]}"; do
    status="$(dpkg-query -W -f='${db:Status-Status}' "$pkg" 2>/dev/null || true)"
    [[ "$status" == "installed" ]] || missing+=("$pkg")
done

if ((${#missing[@]})); then
    echo "ensure-apt: installing missing Debian packages: ${missing[*]}"
    sudo=()
    if [[ "$(id -u)" != 0 ]]; then
        command -v sudo >/dev/null || { echo "ensure-apt: need root or sudo for apt-get" >&2; exit 1; }
        sudo=(sudo -n)
    fi
    export DEBIAN_FRONTEND=noninteractive
    # </dev/null: CI has no stdin, and nothing here may ever wait for an answer.
    "${sudo[@]}" apt-get update -q </dev/null
    "${sudo[@]}" apt-get install -y -q --no-install-recommends "${missing[@]}" </dev/null
else
    echo "ensure-apt: all Debian packages present"
fi

if [[ -n "$stamp" ]]; then
    mkdir -p "$(dirname "$stamp")"
    # The stamp records what was checked; its mtime only moves when something was installed or
    # the list changed, so targets that depend on it are not re-run for nothing.
    new="$(printf '%s\n' "${wanted[@]}")"
    if ((${#missing[@]})) || [[ ! -f "$stamp" ]] || [[ "$(cat "$stamp")" != "$new" ]]; then
        printf '%s\n' "$new" >"$stamp"
    fi
fi
