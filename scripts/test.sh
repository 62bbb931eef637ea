#!/usr/bin/env bash
# Set up and run the whole test suite: once with the native core required, once more
# (a fast subset) with the pure-Python kernels.  Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
export QCOW2_REQUIRE_NATIVE=1
bash scripts/setup.sh
export QCOW2_RUN_SLOW=${QCOW2_RUN_SLOW:-1}
export QCOW2_CORPUS_DIR=${QCOW2_CORPUS_DIR:-$(mktemp -d -t qcow2-corpus.XXXXXX)}
# never import the source tree by accident: tests run against the installed package
export PYTHONSAFEPATH=1
export HYPOTHESIS_STORAGE_DIRECTORY=${TMPDIR:-/tmp}/qcow2-hypothesis

echo "== test suite, native kernels (QCOW2_IMPL=native)"
QCOW2_IMPL=native .venv/bin/python -P -m pytest -q -ra "$@"

echo "== test suite, pure-Python kernels (QCOW2_IMPL=python, fast subset)"
QCOW2_IMPL=python QCOW2_REQUIRE_NATIVE=0 QCOW2_RUN_SLOW=0 .venv/bin/python -P -m pytest -q -ra -m "not slow" "$@"
