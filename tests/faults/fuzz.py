"""Coverage-guided fuzz targets (atheris, libFuzzer) for hostile images.

    python tests/faults/fuzz.py TARGET [libFuzzer options] [CORPUS_DIR...]

Targets (each gets the fuzzer's bytes as a whole image file):

- ``open``:      trusted open of a qcow2 (no backing chain), ``info``, snapshots,
                 the first extents, reads at the start, middle and end;
- ``untrusted``: ``qcow2.open(untrusted=True)``: the full metadata scan, then reads;
- ``check``:     ``qcow2.check`` in both modes (the consistency check walks every
                 table, so it sees what the reader never reads);
- ``check-paths``: a differential: the general check with and without its native
                 fast path (native/check.c) gives the same result and messages, and
                 the numpy-free quick check, when it answers, the same result.

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


_PATHS = {}


def _general(path: str, native: bool):
    """The general check's answer (result or failure, and messages), with or without
    the native fast path of its L2 walk."""
    from qcow2.backends import FileBackend
    from qcow2.checker import fast, run
    from qcow2.checker.file import CheckedFile
    if "native" not in _PATHS:
        _PATHS["native"] = fast._load()       # noqa: SLF001 -- the switch under test
    saved = fast._NATIVE
    fast._NATIVE = _PATHS["native"] if native else None
    log: list[str] = []
    be = FileBackend(path)
    try:
        try:
            out = run.check_file(CheckedFile(be), 0, log.append)
        except Qcow2Error as exc:
            out = (type(exc).__name__, str(exc))
    finally:
        be.close()
        fast._NATIVE = saved
    return out, log


def target_check_paths(data: bytes) -> None:
    """The check's paths agree: the general check with and without the native fast
    path (results, failures and every message), and the quick check whenever it
    answers."""
    from qcow2.backends import FileBackend
    from qcow2.checker import quick
    from qcow2.checker.file import CheckedFile
    path = _file(data)
    try:
        with_c = _general(path, True)
    except Qcow2Error:
        return                  # the header does not parse: nothing to compare
    without = _general(path, False)
    if with_c != without:
        raise AssertionError(f"fast path differs: {with_c!r} != {without!r}")
    be = FileBackend(path)
    try:
        q = quick.quick_check(CheckedFile(be))
    finally:
        be.close()
    if q is not None and (q, []) != with_c:
        raise AssertionError(f"quick check differs: {q!r} != {with_c!r}")


TARGETS = {"open": target_open, "untrusted": target_untrusted, "check": target_check,
           "check-paths": target_check_paths}


def main(argv: list[str]) -> None:
    if len(argv) < 2 or argv[1] not in TARGETS:
        sys.exit(f"usage: {argv[0]} {{{','.join(TARGETS)}}} [libFuzzer options] [corpus...]")
    target = TARGETS[argv[1]]
    atheris.Setup([argv[0]] + argv[2:], target)
    atheris.Fuzz()


if __name__ == "__main__":
    main(sys.argv)
