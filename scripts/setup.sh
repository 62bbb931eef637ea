#!/usr/bin/env bash
# Set up everything on a fresh Debian machine: system packages (oracle + headers),
# a virtual environment in .venv with the linter (ruff), and the package installed
# into it (native core built).
# Idempotent: a second run only reinstalls the package.
set -euo pipefail
cd "$(dirname "$0")/.."

PKGS="qemu-utils qemu-block-extra libnbd-bin qemu-system-x86 busybox-static zlib1g-dev libzstd-dev libdeflate-dev gcc python3-venv python3-dev e2fsprogs lvm2 util-linux"
# a single-node Ceph cluster for the RBD tests (scripts/ceph.sh) and librbd's headers;
# qemu-block-extra (above) gives qemu-img its rbd driver, the tests' oracle.  Without
# their recommends: the mgr's dashboard and disk-prediction modules pull in hundreds of
# MB that a test cluster never loads.
CEPH_PKGS="ceph-mon ceph-mgr ceph-osd ceph-common librbd-dev"
# clang and its libFuzzer/sanitizer runtimes: the C kernels' fuzz harnesses
# (native/fuzz/, tests/test_faults_fuzz.py::test_native_fuzz; skipped without them)
PKGS="$PKGS clang libclang-rt-dev"
# QEMU's own iotests run with our CLI as qemu-img (tests/test_iotests.py) probe for a
# qemu-system binary; no recommends (firmware, display stacks) needed for that.
CEPH_PKGS="$CEPH_PKGS qemu-system-x86"
missing=""
for p in $PKGS; do
    dpkg -s "$p" >/dev/null 2>&1 || missing="$missing $p"
done
missing_ceph=""
for p in $CEPH_PKGS; do
    dpkg -s "$p" >/dev/null 2>&1 || missing_ceph="$missing_ceph $p"
done
if [ -n "$missing$missing_ceph" ]; then
    if [ "$(id -u)" = 0 ]; then SUDO=""; else SUDO="sudo"; fi
    echo "== installing Debian packages:$missing$missing_ceph"
    $SUDO apt-get update -qq
    if [ -n "$missing" ]; then
        DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq $missing >/dev/null
    fi
    if [ -n "$missing_ceph" ]; then
        # no init system here: the packages' services are not started (ceph.sh runs
        # the daemons itself)
        DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends \
            $missing_ceph >/dev/null
    fi
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
# the coverage-guided fuzzer of tests/test_faults_fuzz.py (setup.py's "fuzz" extra): a
# prebuilt wheel; where none installs, those tests skip and say why
.venv/bin/python -m pip install -q "atheris>=2.3" >/dev/null 2>&1 || \
    echo "WARNING: atheris did not install: the fuzz tests will be skipped" >&2
.venv/bin/python -P -c 'import qcow2; print("qcow2", qcow2.__version__, "implementation:", qcow2.implementation, "features:", ",".join(sorted(qcow2.features)) or "-")'
