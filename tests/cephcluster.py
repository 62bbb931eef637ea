"""A real Ceph cluster for the tests: started with scripts/ceph.sh, or one given.

``start(dir)`` brings up a single-node cluster (one mon, one mgr, one OSD, pool ``rbd``)
under ``dir`` with the script and returns a :class:`Cluster`; ``stop()`` ends it.
``from_conf(conf)`` wraps a running cluster (``QCOW2_CEPH_CONF``, as scripts/test.sh
exports).  Where Ceph cannot start, ``start`` raises :class:`CephUnavailable` with the
script's one-line reason, which the ``ceph`` fixture turns into a skip.

The tests' own processes talk to the cluster through ``Cluster.env`` (``CEPH_CONF`` and
``CEPH_ARGS`` naming the conf, the user and the keyring), so the ``ceph``/``rbd`` CLIs,
qemu-img's ``rbd:`` names and librados all find it without further arguments.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from dataclasses import dataclass, field
from pathlib import Path

SCRIPT = Path(__file__).resolve().parent.parent / "scripts" / "ceph.sh"

# seconds: the script's own start bound plus slack, one CLI call
START_TIMEOUT = 150
CLI_TIMEOUT = 300


class CephUnavailable(Exception):
    """Ceph cannot start here; the message says why (one line)."""


class CephCommandError(subprocess.CalledProcessError):
    """A ``ceph``/``rbd`` call failed; str() includes its stderr."""

    def __str__(self) -> str:
        err = (self.stderr or "").strip()
        return f"{' '.join(map(str, self.cmd))} exited {self.returncode}: {err}"


@dataclass
class Cluster:
    conf: Path
    keyring: Path
    user: str = "admin"
    pool: str = "rbd"
    dir: Path | None = None              # set when we started it (and so stop it)
    env: dict[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not self.env:
            self.env = client_env(self.conf, self.keyring, self.user)

    # the CLIs -------------------------------------------------------------------
    def run(self, tool: str, *args: str, check: bool = True, timeout: float = CLI_TIMEOUT,
            input: bytes | None = None) -> subprocess.CompletedProcess:
        """Run ``tool`` (ceph, rbd, rados, qemu-img, ...) against this cluster."""
        cmd = [tool, *map(str, args)]
        p = subprocess.run(cmd, env=self.env, capture_output=True, timeout=timeout,
                           input=input)
        out = p.stdout.decode(errors="replace")
        err = p.stderr.decode(errors="replace")
        if check and p.returncode != 0:
            raise CephCommandError(p.returncode, cmd, out, err)
        return subprocess.CompletedProcess(cmd, p.returncode, out, err)

    def ceph(self, *args: str, timeout: float = CLI_TIMEOUT) -> str:
        """``ceph ARGS``: its stdout; raises CephCommandError on failure."""
        return self.run("ceph", *args, timeout=timeout).stdout

    def rbd(self, *args: str, timeout: float = CLI_TIMEOUT) -> str:
        """``rbd ARGS``: its stdout; raises CephCommandError on failure."""
        return self.run("rbd", *args, timeout=timeout).stdout

    def rbd_name(self, image: str, snap: str | None = None) -> str:
        """The qemu-img style name of IMAGE in the pool, with conf and user."""
        at = f"@{snap}" if snap else ""
        return f"rbd:{self.pool}/{image}{at}:conf={self.conf}:id={self.user}"

    def pids(self) -> dict[str, int]:
        """Daemon name -> PID, for a cluster we started (recorded by the script)."""
        if self.dir is None:
            return {}
        found = {}
        for f in sorted((self.dir / "run").glob("*.pid")):
            text = f.read_text().strip()
            if text.isdigit():
                found[f.stem] = int(text)
        return found

    def stop(self) -> None:
        """Stop the daemons (only for a cluster we started)."""
        if self.dir is not None:
            stop(self.dir)


def client_env(conf: Path, keyring: Path, user: str) -> dict[str, str]:
    env = dict(os.environ)
    env["CEPH_CONF"] = str(conf)
    env["CEPH_ARGS"] = f"--id {user} --keyring {keyring}"
    return env


def missing_tools() -> list[str]:
    return [t for t in ("ceph-mon", "ceph-mgr", "ceph-osd", "ceph", "rbd")
            if shutil.which(t) is None]


def start(directory: Path, *, timeout: float = START_TIMEOUT) -> Cluster:
    """Start a cluster under DIRECTORY; CephUnavailable(reason) when it cannot."""
    directory = Path(directory)
    try:
        p = subprocess.run(["bash", str(SCRIPT), "start", str(directory)],
                           capture_output=True, text=True, timeout=timeout,
                           stdin=subprocess.DEVNULL)
    except subprocess.TimeoutExpired:
        stop(directory)
        raise CephUnavailable(f"scripts/ceph.sh start did not finish in {timeout:.0f} s "
                              f"(logs in {directory / 'log'})") from None
    if p.returncode != 0:
        lines = [ln for ln in p.stderr.splitlines() if ln.strip()]
        reason = lines[-1] if lines else f"scripts/ceph.sh start exited {p.returncode}"
        raise CephUnavailable(reason)
    return Cluster(conf=directory / "ceph.conf", keyring=directory / "keyring",
                   dir=directory)


def stop(directory: Path) -> None:
    subprocess.run(["bash", str(SCRIPT), "stop", str(directory)], timeout=60,
                   stdin=subprocess.DEVNULL, check=False)


def from_conf(conf: str | Path, keyring: str | Path | None = None,
              user: str = "admin", pool: str = "rbd") -> Cluster:
    """A running cluster given by its ceph.conf; the keyring is KEYRING, else the one
    beside the conf (as ceph.sh writes it), else what the conf names for the user."""
    conf = Path(conf).resolve()
    if keyring is None:
        beside = conf.parent / "keyring"
        if beside.exists():
            keyring = beside
        else:
            p = subprocess.run(["ceph-conf", "-c", str(conf), "--name", f"client.{user}",
                                "--lookup", "keyring"], capture_output=True, text=True,
                               timeout=30, check=False)
            first = p.stdout.strip().split(",")[0]
            keyring = Path(first) if first else beside
    return Cluster(conf=conf, keyring=Path(keyring), user=user, pool=pool)
