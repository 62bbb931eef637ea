#!/usr/bin/env bash
# Set up, lint (ruff, with the rules in pyproject.toml: any finding fails the run) and
# run the whole test suite: once with the native core required, once more (a fast
# subset) with the pure-Python kernels.  Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
export QCOW2_REQUIRE_NATIVE=1
# setup.sh installs librbd-dev: a binding that does not build is a failure here
export QCOW2_REQUIRE_RBD=1
bash scripts/setup.sh
echo "== lint: ruff check (rules in pyproject.toml)"
.venv/bin/ruff check .
# Everything the run writes (corpus, pytest's temporary folders, qemu-img's oracle
# outputs, anything else under TMPDIR) lives in one folder that is removed at the end,
# pass or fail: runs must not fill a shared /tmp.  Passed tests' folders are removed as
# they pass (pyproject.toml) and the oracle cache is capped, so the peak stays near the
# corpus size plus ~1.5 GB.
WORK=$(mktemp -d -t qcow2-test.XXXXXX)
# the Ceph cluster (below) is stopped before the folder goes, pass, fail or interrupt
cleanup() {
    if [ -d "$WORK/ceph" ]; then bash scripts/ceph.sh stop "$WORK/ceph" || true; fi
    rm -rf "$WORK"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM
mkdir -p "$WORK/tmp"
export TMPDIR=$WORK/tmp
export QCOW2_CORPUS_DIR=${QCOW2_CORPUS_DIR:-$WORK/corpus}
# never import the source tree by accident: tests run against the installed package
export PYTHONSAFEPATH=1
export HYPOTHESIS_STORAGE_DIRECTORY=$WORK/hypothesis
# The full run (slow cases: the whole option matrix, a 2.9 GiB corpus) needs ~6 GiB
# free; the fast subset ~1.5 GiB.  With less than the full run needs and no explicit
# QCOW2_RUN_SLOW, the slow cases are left out, loudly, rather than failing on ENOSPC.
free_mb=$(( $(df -Pk "$WORK" | awk 'NR == 2 {print $4}') / 1024 ))
echo "== $free_mb MiB free under $WORK"
if [ "$free_mb" -lt 6144 ] && [ -z "${QCOW2_RUN_SLOW:-}" ]; then
    echo "WARNING: less than 6 GiB free: running WITHOUT the slow cases" \
         "(QCOW2_RUN_SLOW=0; set QCOW2_RUN_SLOW=1 to run them anyway)" >&2
    QCOW2_RUN_SLOW=0
fi
if [ "$free_mb" -lt 1536 ]; then
    echo "WARNING: less than 1.5 GiB free: tests may fail with 'No space left on device'" >&2
fi
export QCOW2_RUN_SLOW=${QCOW2_RUN_SLOW:-1}

# One single-node Ceph cluster for the whole run (both passes): the RBD tests use it
# through QCOW2_CEPH_CONF.  Where it cannot start they skip, saying why.
echo "== Ceph: starting a single-node cluster (scripts/ceph.sh)"
unset QCOW2_CEPH_CONF QCOW2_CEPH_KEYRING QCOW2_CEPH_UNAVAILABLE
if ceph_err=$(bash scripts/ceph.sh start "$WORK/ceph" 2>&1 >"$WORK/ceph-start.out"); then
    cat "$WORK/ceph-start.out"
    export QCOW2_CEPH_CONF=$WORK/ceph/ceph.conf
else
    ceph_err=$(printf '%s\n' "$ceph_err" | tail -n 1)
    echo "WARNING: no Ceph cluster, the RBD tests will be skipped: $ceph_err" >&2
    export QCOW2_CEPH_UNAVAILABLE=$ceph_err
fi

echo "== test suite, native kernels (QCOW2_IMPL=native)"
QCOW2_IMPL=native .venv/bin/python -P -m pytest -q -ra --basetemp "$WORK/pytest-native" "$@"
rm -rf "$WORK/pytest-native" "$WORK/tmp" && mkdir -p "$WORK/tmp"

echo "== test suite, pure-Python kernels (QCOW2_IMPL=python, fast subset)"
QCOW2_IMPL=python QCOW2_REQUIRE_NATIVE=0 QCOW2_RUN_SLOW=0 .venv/bin/python -P -m pytest -q -ra -m "not slow" \
    --basetemp "$WORK/pytest-python" "$@"
