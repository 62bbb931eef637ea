"""NBD export speed: ``nbdcopy`` from our server (``qcow2 nbd``) against ``nbdcopy``
from ``qemu-nbd`` serving the same image, read-only, to ``null:`` (the client reads
every data extent and skips the holes both servers report).

Both servers are started before the timing (persistent, any number of clients, both
offering multi-conn: nbdcopy opens one connection per thread, at most four, as many as
there are cores: two on the 2-core VM, each with up to 64 requests of 256 KiB in flight)
and stopped after; the timed process is nbdcopy alone.  After one warm-up copy each,
rounds alternate (ours, theirs, ours, ...; QCOW2_BENCH_ROUNDS, 5 by default).
``extra_info`` holds ``ours_s`` and ``theirs_s`` (medians), ``ratio`` (of the medians,
lower is better), the minimums and their ratio, ``server_cpu_s_per_copy`` of each server
(user + system time over all its copies) and ``peak_rss_mib`` of our server.  Nothing
here asserts timings.
"""

from __future__ import annotations

import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROUNDS = int(os.environ.get("QCOW2_BENCH_ROUNDS", "5"))
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
        theirs = _Served(["qemu-nbd"], image, scratch, "qemu")
    except BaseException:
        ours.stop()
        raise
    a, b = [], []
    try:
        _copy(ours.uri)                                     # one warm-up round each
        _copy(theirs.uri)
        for _ in range(ROUNDS):                             # alternating: ours, theirs, ...
            a.append(_copy(ours.uri))
            b.append(_copy(theirs.uri))
        benchmark.pedantic(lambda: _copy(ours.uri), rounds=1, iterations=1)
    finally:
        ours_cpu, ours_rss = ours.stop()
        theirs_cpu, _rss = theirs.stop()
    ma, mb = statistics.median(a), statistics.median(b)
    copies = ROUNDS + 2
    benchmark.extra_info.update({
        "what": "nbdcopy URI null: (as many connections as nbdcopy takes), servers started "
                "outside the timing, rounds alternating",
        "theirs_s": round(mb, 4), "ours_s": round(ma, 4), "ratio": round(ma / mb, 3),
        "ours_min_s": round(min(a), 4), "theirs_min_s": round(min(b), 4),
        "ratio_of_mins": round(min(a) / min(b), 3),
        "server_cpu_s_per_copy": {"ours": round(ours_cpu / copies, 3),
                                  "qemu-nbd": round(theirs_cpu / (ROUNDS + 1), 3)},
        "peak_rss_mib": round(ours_rss, 1), "impl": os.environ.get("QCOW2_IMPL", "auto"),
    })
