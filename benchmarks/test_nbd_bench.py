"""NBD export speed: ``nbdcopy`` from our server (``qcow2 nbd``) against ``nbdcopy``
from ``qemu-nbd`` serving the same image, read-only, to ``null:`` (the client reads
every data extent and skips the holes both servers report).

Both servers are started before the timing (persistent, any number of clients, so
nbdcopy uses its default four connections where the server offers multi-conn: both do)
and stopped after; the timed process is nbdcopy alone.  ``extra_info`` holds
``ours_s``, ``theirs_s`` (best of QCOW2_BENCH_ROUNDS rounds each), ``ratio`` (lower is
better), ``server_cpu_s`` of each server over all its rounds and ``peak_rss_mib`` of
our server.  Nothing here asserts
timings.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROUNDS = int(os.environ.get("QCOW2_BENCH_ROUNDS", "3"))
_SCRIPT = os.path.join(os.path.dirname(sys.executable), "qcow2")
QCOW2 = [_SCRIPT] if os.access(_SCRIPT, os.X_OK) else [sys.executable, "-m", "qcow2"]

pytestmark = pytest.mark.skipif(not (shutil.which("nbdcopy") and shutil.which("qemu-nbd")),
                                reason="needs nbdcopy (libnbd-bin) and qemu-nbd (qemu-utils)")


class _Served:
    """A server process on a Unix socket, ready once its pid file exists."""

    def __init__(self, argv_head, image: Path, d: Path, tag: str):
        self.sock = str(d / f"{tag}.sock")
        self.pid_file = d / f"{tag}.pid"
        argv = [*argv_head, "-r", "-t", "-e", "0", "-k", self.sock, "--pid-file",
                str(self.pid_file), "-f", "qcow2", str(image)]
        self.proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        deadline = time.monotonic() + 120
        while not self.pid_file.exists():
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"{argv[0]} did not start: {self.proc.stderr.read()}")
            time.sleep(0.02)

    @property
    def uri(self) -> str:
        return f"nbd+unix:///?socket={self.sock}"

    def stop(self) -> tuple[float, float]:
        """Stop (SIGTERM, by PID): the server's CPU seconds and peak RSS (MiB)."""
        if self.proc.poll() is None:
            self.proc.terminate()
        try:
            _pid, _status, ru = os.wait4(self.proc.pid, 0)
        except ChildProcessError:
            return 0.0, 0.0
        self.proc.returncode = 0
        self.proc.stderr.close()
        return ru.ru_utime + ru.ru_stime, ru.ru_maxrss / 1024


def _copy(uri: str) -> float:
    os.sync()
    t0 = time.perf_counter()
    subprocess.run(["nbdcopy", uri, "null:"], check=True, capture_output=True)
    return time.perf_counter() - t0


@pytest.mark.parametrize("kind", ["plain", "zlib", "zstd"])
def test_nbdcopy_from_our_export_vs_qemu_nbd(benchmark, corpus, scratch, kind):
    if kind not in corpus:
        pytest.skip(f"the {corpus.kind} corpus has no {kind!r} image")
    image = corpus[kind]
    ours = _Served(QCOW2 + ["nbd"], image, scratch, "ours")
    try:
        benchmark.pedantic(lambda: _copy(ours.uri), rounds=ROUNDS, iterations=1,
                           warmup_rounds=1)
    finally:
        ours_cpu, ours_rss = ours.stop()
    theirs = _Served(["qemu-nbd"], image, scratch, "qemu")
    try:
        _copy(theirs.uri)                                   # the same warm-up round
        best = min(_copy(theirs.uri) for _ in range(ROUNDS))
    finally:
        theirs_cpu, _rss = theirs.stop()
    ours_best = benchmark.stats.stats.min
    benchmark.extra_info.update({
        "what": "nbdcopy URI null: (4 connections), server started outside the timing",
        "theirs_s": round(best, 4), "ours_s": round(ours_best, 4),
        "ratio": round(ours_best / best, 3) if best else None,
        "server_cpu_s": {"ours": round(ours_cpu, 2), "qemu-nbd": round(theirs_cpu, 2)},
        "peak_rss_mib": round(ours_rss, 1), "impl": os.environ.get("QCOW2_IMPL", "auto"),
    })
