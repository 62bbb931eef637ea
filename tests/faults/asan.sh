#!/usr/bin/env bash
# Build the native core with AddressSanitizer and UndefinedBehaviorSanitizer into a
# separate folder and run tests against it (the kernel tests by default; extra
# arguments go to pytest instead, e.g. tests/test_faults_fuzz.py).
#
#   bash tests/faults/asan.sh                 # kernel tests, sanitized
#   bash tests/faults/asan.sh tests/test_read_small.py
#   bash tests/faults/asan.sh tests/test_launcher.py     # the qcow2 command's launcher
#   bash tests/faults/asan.sh tests/test_launcher_convert.py   # and its convert
#
# The build lives in $ASAN_DIR (default .venv-asan-site); .venv (scripts/setup.sh)
# provides Python and the test tools.  Python itself is not instrumented: the
# sanitizer runtimes are preloaded, leaks are not reported (CPython keeps its arenas),
# any other finding aborts the run with a report.
set -euo pipefail
cd "$(dirname "$0")/../.."
ASAN_DIR=${ASAN_DIR:-$PWD/.venv-asan-site}
PY=.venv/bin/python
CC=${CC:-gcc}
libasan=$($CC -print-file-name=libasan.so)
libubsan=$($CC -print-file-name=libubsan.so)
if [ ! -e "$libasan" ] || [ ! -e "$libubsan" ]; then
    echo "asan.sh: $CC has no sanitizer runtimes (libasan/libubsan)" >&2
    exit 2
fi
san="-fsanitize=address,undefined -fno-sanitize-recover=undefined -fno-omit-frame-pointer -g"
echo "== building the native core with ASan/UBSan into $ASAN_DIR"
rm -rf "$ASAN_DIR" build
CFLAGS="$san -O1" LDFLAGS="$san" QCOW2_REQUIRE_NATIVE=1 \
    $PY -m pip install -q --no-deps --no-build-isolation --target "$ASAN_DIR" . >/dev/null
rm -rf build
# the qcow2 command's launcher, sanitized too (tests/test_launcher.py runs it)
mkdir -p "$ASAN_DIR/bin"
$CC $san -O1 -Wall -Wextra -std=c99 -DQCOW2_PYTHON="\"$PWD/$PY\"" \
    native/launcher/launcher.c native/launcher/image.c native/launcher/print.c \
    native/launcher/convert.c -o "$ASAN_DIR/bin/qcow2" -lm -lzstd -ldeflate -lpthread
export QCOW2_LAUNCHER=$ASAN_DIR/bin/qcow2
# qemu-img (a child of the tests) hangs under the preloaded runtimes, so children never
# inherit them: Python children find QCOW2_ASAN_PRELOAD and start again under them (the
# sanitized extension cannot load without), every other program runs as it is.
cat > "$ASAN_DIR/sitecustomize.py" <<'PY'
import os, sys
_pre = os.environ.get("QCOW2_ASAN_PRELOAD")
if _pre:
    if "libasan" not in os.environ.get("LD_PRELOAD", ""):
        os.execve(sys.executable, sys.orig_argv, dict(os.environ, LD_PRELOAD=_pre))
    del os.environ["LD_PRELOAD"]
PY
if [ $# -eq 0 ]; then
    set -- tests/test_kernels.py tests/test_kernels_contract.py
fi
export PYTHONPATH=$ASAN_DIR LD_PRELOAD="$libasan:$libubsan" QCOW2_ASAN_PRELOAD="$libasan:$libubsan"
export ASAN_OPTIONS=detect_leaks=0:abort_on_error=1:allocator_may_return_null=1
export UBSAN_OPTIONS=print_stacktrace=1:halt_on_error=1
export QCOW2_IMPL=native QCOW2_REQUIRE_NATIVE=1 PYTHONSAFEPATH=1
# everything runs ~20x slower sanitized: a fuzz input is a hang only past 3 minutes
export QCOW2_FUZZ_TIMEOUT=${QCOW2_FUZZ_TIMEOUT:-180}
# the sanitized extension, not the one in .venv, must be the one imported
$PY -P -c 'import ctypes, sys, qcow2._native as n, qcow2; d = sys.argv[1]
assert n.__file__.startswith(d), (n.__file__, d); print("native core:", n.__file__)
ctypes.CDLL(None).__asan_init; print("AddressSanitizer runtime loaded")' "$ASAN_DIR"
echo "== pytest $* (QCOW2_IMPL=native, sanitized)"
exec $PY -P -m pytest -q -p no:cacheprovider "$@"
