"""Coverage-guided fuzz targets (atheris, libFuzzer) for hostile images.

    python tests/faults/fuzz.py TARGET [libFuzzer options] [CORPUS_DIR...]

Targets (each gets the fuzzer's bytes as a whole image file):

- ``open``:      trusted open of a qcow2 (no backing chain), ``info``, snapshots,
                 the first extents, reads at the start, middle and end;
- ``untrusted``: ``qcow2.open(untrusted=True)``: the full metadata scan, then reads;
- ``check``:     ``qcow2.check`` in both modes (the consistency check walks every
                 table, so it sees what the reader never reads).

Only ``qcow2.errors.Qcow2Error`` may come out; anything else (an IndexError, a
struct.error, a MemoryError past libFuzzer's ``-rss_limit_mb``, a hang past
``-timeout``) is a crash, and libFuzzer writes the input to ``-artifact_prefix``.
``tests/test_faults_fuzz.py`` runs each target for a bounded time and keeps any
crash in ``tests/fuzz_regressions/``.  Longer runs, e.g. an hour on one target:

    .venv/bin/python tests/faults/fuzz.py untrusted -max_total_time=3600 \\
        -rss_limit_mb=1024 -timeout=20 corpus-dir/

With ``QCOW2_FUZZ_ASAN=1`` under an ASan/UBSan build of the native core (see
``scripts/asan.sh``) the C kernels run sanitized too.
"""

from __future__ import annotations

import os
import sys
import tempfile

import atheris

with atheris.instrument_imports(include=["qcow2"]):
    import importlib
    import pkgutil

    import qcow2
    from qcow2 import Qcow2Error
    # the engine imports much of itself lazily (inside functions): import it all now,
    # while the hook instruments it
    for _m in pkgutil.walk_packages(qcow2.__path__, "qcow2."):
        if not _m.name.endswith("__main__") and not _m.name.startswith((
                "qcow2.compute", "qcow2.cli", "qcow2.backends.rbd",
                "qcow2.backends._rbd")):
            try:
                importlib.import_module(_m.name)
            except ImportError:
                pass

CS = 65536
_TMP = None


def _file(data: bytes) -> str:
    """The input as a file (the engine opens images by path, as users do)."""
    global _TMP
    if _TMP is None:
        d = "/dev/shm" if os.access("/dev/shm", os.W_OK) else None
        _TMP = tempfile.mkdtemp(prefix="qcow2-fuzz-", dir=d)
    path = os.path.join(_TMP, "input.qcow2")
    with open(path, "wb") as f:
        f.write(data)
    return path


def _reads(im) -> None:
    im.info()
    for off in (0, im.size // 2, max(0, im.size - CS)):
        im.pread(CS, off)
    im.pread(1024, max(0, im.size // 3 - 512))
    for _i, _e in zip(range(100), im.extents(), strict=False):
        pass


def target_open(data: bytes) -> None:
    path = _file(data)
    try:
        with qcow2.open(path, format="qcow2", backing=False) as im:
            im.snapshots()
            _reads(im)
    except Qcow2Error:
        pass


def target_untrusted(data: bytes) -> None:
    path = _file(data)
    try:
        with qcow2.open(path, untrusted=True, format="qcow2") as im:
            _reads(im)
            im.pread(1 << 20, 0)
    except Qcow2Error:
        pass


def target_check(data: bytes) -> None:
    path = _file(data)
    for untrusted in (False, True):
        try:
            qcow2.check(path, format="qcow2", untrusted=untrusted)
        except Qcow2Error:
            pass


TARGETS = {"open": target_open, "untrusted": target_untrusted, "check": target_check}


def main(argv: list[str]) -> None:
    if len(argv) < 2 or argv[1] not in TARGETS:
        sys.exit(f"usage: {argv[0]} {{{','.join(TARGETS)}}} [libFuzzer options] [corpus...]")
    target = TARGETS[argv[1]]
    atheris.Setup([argv[0]] + argv[2:], target)
    atheris.Fuzz()


if __name__ == "__main__":
    main(sys.argv)
