"""Error lines: one line on stderr, prefixed with the name the program was invoked as
(qemu-img's convention), never a traceback."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys

import pytest

SCRIPT = shutil.which("qcow2", path=os.path.dirname(sys.executable))


@pytest.mark.skipif(SCRIPT is None, reason="the qcow2 console script is not installed")
@pytest.mark.parametrize("name", ["qcow2", "qemu-img"])
def test_error_prefix_is_the_invoked_name(tmp_path, name):
    prog = tmp_path / name
    prog.symlink_to(SCRIPT)
    r = subprocess.run([str(prog), "info", str(tmp_path / "missing.qcow2")],
                       capture_output=True, text=True)
    assert r.returncode == 1 and r.stdout == ""
    assert r.stderr == f"{name}: Could not open '{tmp_path / 'missing.qcow2'}': " \
                       f"No such file or directory\n"


def test_module_run_says_qcow2(tmp_path):
    r = subprocess.run([sys.executable, "-P", "-m", "qcow2", "info", str(tmp_path / "x")],
                       capture_output=True, text=True, cwd=tmp_path)
    assert r.returncode == 1
    assert r.stderr.startswith("qcow2: Could not open") and r.stderr.count("\n") == 1
