"""Build and drive the LD_PRELOAD fault injector (``faultshim.c``) for the tests.

``Injector(workdir).run(argv, at=N, errno="EIO", sticky=False)`` runs a command with
the shim preloaded, counting write-side calls on files under ``workdir`` and failing
the N-th; the result says how many calls were counted and whether the fault fired.
"""

from __future__ import annotations

import os
import random
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

HERE = Path(__file__).resolve().parent
SOURCE = HERE / "faultshim.c"


def build_shim(out_dir: Path) -> Path | None:
    """Compile the shim into ``out_dir``; None when there is no C compiler."""
    cc = shutil.which("gcc") or shutil.which("cc")
    if cc is None:
        return None
    out = Path(out_dir) / "faultshim.so"
    subprocess.run([cc, "-shared", "-fPIC", "-O2", "-Wall", "-Wextra", "-Werror",
                    "-o", str(out), str(SOURCE), "-ldl"], check=True, capture_output=True)
    return out


@dataclass
class Outcome:
    returncode: int
    stdout: str
    stderr: str
    calls: list[str]          # "op path" of every counted call, in order
    fired: list[str]          # the calls that were failed

    @property
    def count(self) -> int:
        return len(self.calls)


class Injector:
    def __init__(self, shim: Path, prefix: Path, log: Path):
        self.shim = shim
        self.prefix = str(prefix)
        self.log = log

    def env(self, at: int = 0, err: str = "EIO", sticky: bool = False) -> dict:
        env = dict(os.environ)
        env.update(LD_PRELOAD=str(self.shim), QCOW2_FAULT_PREFIX=self.prefix,
                   QCOW2_FAULT_AT=str(at), QCOW2_FAULT_ERRNO=err,
                   QCOW2_FAULT_STICKY="1" if sticky else "0", QCOW2_FAULT_LOG=str(self.log))
        return env

    def run(self, argv, *, cwd=None, at: int = 0, err: str = "EIO", sticky: bool = False,
            timeout: float = 300) -> Outcome:
        self.log.unlink(missing_ok=True)
        p = subprocess.run([str(a) for a in argv], cwd=cwd, capture_output=True, text=True,
                           env=self.env(at, err, sticky), timeout=timeout)
        lines = self.log.read_text().splitlines() if self.log.exists() else []
        calls, fired = [], []
        for ln in lines:
            if ln.startswith("!fault "):
                ln = ln[len("!fault "):]
                fired.append(ln.split(" ", 1)[1])
            calls.append(ln.split(" ", 1)[1])
        return Outcome(p.returncode, p.stdout, p.stderr, calls, fired)


def full_sweep() -> bool:
    return os.environ.get("QCOW2_FAULT_SWEEP", "") == "full"


def plan(count: int, seed, samples: int = 8) -> list[tuple[int, str, bool]]:
    """Which faults to inject into an operation of ``count`` calls: (call number,
    errno name, sticky).  Full sweep: every call x {EIO, ENOSPC} x {once, from then
    on}; otherwise the first and the last three calls plus a seeded sample of the
    rest, each with a seeded errno and mode."""
    if full_sweep():
        return [(n, e, s) for n in range(1, count + 1) for e in ("EIO", "ENOSPC")
                for s in (False, True)]
    rng = random.Random(f"{seed}:{count}")
    picks = {1, count, count - 1, count - 2}
    rest = [n for n in range(2, count - 2)]
    picks.update(rng.sample(rest, min(len(rest), max(0, samples - 4))))
    return [(n, rng.choice(("EIO", "ENOSPC")), rng.random() < 0.5)
            for n in sorted(p for p in picks if p >= 1)]
