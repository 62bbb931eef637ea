#!/usr/bin/env bash
# Set up everything on a fresh Debian machine: system packages (oracle + headers),
# a virtual environment in .venv with the linter (ruff), and the package installed
# into it (native core built).
# Idempotent: a second run only reinstalls the package.
set -euo pipefail
cd "$(dirname "$0")/.."

PKGS="qemu-utils zlib1g-dev libzstd-dev libdeflate-dev gcc python3-venv python3-dev e2fsprogs lvm2 util-linux"
missing=""
for p in $PKGS; do
    dpkg -s "$p" >/dev/null 2>&1 || missing="$missing $p"
done
if [ -n "$missing" ]; then
    if [ "$(id -u)" = 0 ]; then SUDO=""; else SUDO="sudo"; fi
    echo "== installing Debian packages:$missing"
    $SUDO apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq $missing >/dev/null
fi

PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
    echo "== creating .venv"
    $PY -m venv .venv
fi
.venv/bin/python -m pip install -q --upgrade pip setuptools wheel cffi "ruff>=0.6" >/dev/null
echo "== installing qcow2 (native core required: ${QCOW2_REQUIRE_NATIVE:-0})"
rm -rf build
.venv/bin/python -m pip install -q ".[test]"
.venv/bin/python -P -c 'import qcow2; print("qcow2", qcow2.__version__, "implementation:", qcow2.implementation, "features:", ",".join(sorted(qcow2.features)) or "-")'
