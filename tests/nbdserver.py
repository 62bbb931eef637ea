"""NBD servers for the tests: ours (``qcow2 nbd``) and qemu-nbd (the reference), each
started in its own process on a Unix socket and always stopped by its PID.

A server is ready when its pid file exists (both write it after they listen), so the
tests never connect just to probe: a non-persistent server ends after its first
client.  ``stop()`` sends SIGTERM, waits, and SIGKILLs a server that does not exit
within a generous bound (a hang guard, not a timing assertion).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

STARTUP_LIMIT = 60.0         # seconds; only bounds a broken server, never asserted
STOP_LIMIT = 60.0


class Server:
    """``qcow2 nbd`` (``kind="ours"``) or ``qemu-nbd`` (``kind="qemu"``) serving ``image``
    as export ``name`` on ``workdir/<tag>.sock`` with the extra ``args``."""

    def __init__(self, image, workdir, *args, name: str = "disk", kind: str = "ours",
                 tag: str = "s"):
        self.image = str(image)
        self.dir = Path(workdir)
        self.name = name
        self.kind = kind
        self.socket = str(self.dir / f"{tag}.sock")
        self.pid_file = str(self.dir / f"{tag}.pid")
        self.log_path = self.dir / f"{tag}.log"
        self.args = [str(a) for a in args]
        self.proc: subprocess.Popen | None = None

    @property
    def uri(self) -> str:
        return f"nbd+unix:///{self.name}?socket={self.socket}"

    def argv(self) -> list[str]:
        if self.kind == "ours":
            head = [sys.executable, "-m", "qcow2", "nbd", "-v"]
        else:
            head = ["qemu-nbd"]
        return [*head, "-k", self.socket, "-x", self.name, "--pid-file", self.pid_file,
                *self.args, self.image]

    def start(self) -> "Server":
        for p in (self.socket, self.pid_file):
            if os.path.lexists(p):
                os.unlink(p)
        with open(self.log_path, "wb") as log:
            self.proc = subprocess.Popen(self.argv(), stdout=log, stderr=log,
                                         stdin=subprocess.DEVNULL)
        deadline = time.monotonic() + STARTUP_LIMIT
        while not os.path.exists(self.pid_file):
            if self.proc.poll() is not None:
                raise RuntimeError(f"{self.kind} server exited with {self.proc.returncode}: "
                                   f"{self.log()}")
            if time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"{self.kind} server did not start: {self.log()}")
            time.sleep(0.02)
        return self

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def wait(self) -> int:
        """Wait for a server that is expected to end by itself (its last client left)."""
        assert self.proc is not None
        try:
            return self.proc.wait(timeout=STOP_LIMIT)
        except subprocess.TimeoutExpired:
            self.stop()
            raise

    def stop(self) -> int | None:
        p = self.proc
        if p is None:
            return None
        if p.poll() is None:
            p.send_signal(signal.SIGTERM)
            try:
                p.wait(timeout=STOP_LIMIT)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()
        return p.returncode

    def log(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except OSError:
            return ""

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc):
        self.stop()


def run(*argv, check: bool = True) -> subprocess.CompletedProcess:
    r = subprocess.run([str(a) for a in argv], capture_output=True, text=True,
                       timeout=600)
    if check:
        assert r.returncode == 0, f"{argv}: {r.stdout}{r.stderr}"
    return r


def nbd_map(uri: str) -> list[tuple[int, int, int]]:
    """``nbdinfo --map``: (offset, length, type) with adjacent equal types merged."""
    out = json.loads(run("nbdinfo", "--map", "--json", uri).stdout)
    return merge((e["offset"], e["length"], e["type"]) for e in out)


def qemu_map_as_nbd(path, *args) -> list[tuple[int, int, int]]:
    """``qemu-img map`` in base:allocation terms: HOLE (1) where no data, ZERO (2)."""
    out = json.loads(run("qemu-img", "map", "--output=json", *args, path).stdout)
    return merge((e["start"], e["length"], (0 if e["data"] else 1) | (2 if e["zero"] else 0))
                 for e in out)


def merge(runs) -> list[tuple[int, int, int]]:
    out: list[list[int]] = []
    for off, n, t in runs:
        if out and out[-1][2] == t and out[-1][0] + out[-1][1] == off:
            out[-1][1] += n
        else:
            out.append([off, n, t])
    return [tuple(r) for r in out]
