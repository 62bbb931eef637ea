"""Small helpers shared by the operation tests (qemu-img oracles and our CLI)."""

from __future__ import annotations

import json
import subprocess
import sys


def run(*args, check=True, cwd=None) -> subprocess.CompletedProcess:
    """Run a command (usually qemu-img/qemu-io); with ``check`` it must succeed."""
    r = subprocess.run([str(a) for a in args], capture_output=True, text=True, cwd=cwd)
    if check:
        assert r.returncode == 0, r.stdout + r.stderr
    return r


def cli(*args, cwd=None) -> subprocess.CompletedProcess:
    """Our command line, as a user runs it."""
    return subprocess.run([sys.executable, "-m", "qcow2", *[str(a) for a in args]],
                          capture_output=True, text=True, cwd=cwd)


def info(path) -> dict:
    return json.loads(run("qemu-img", "info", "-U", "--output=json", path).stdout)


def clean(path) -> None:
    """qemu-img check finds neither corruption nor leak."""
    r = run("qemu-img", "check", "--output=json", path, check=False)
    assert r.returncode == 0, r.stdout + r.stderr
