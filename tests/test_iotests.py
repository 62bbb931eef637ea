"""QEMU's own qemu-iotests with our installed CLI in qemu-img's place.

The suite (QEMU 7.2.0's ``tests/qemu-iotests``, test data, not part of the project)
lives in the shared conformance folder: ``../shared/conformance`` beside the project
root, or ``$QCOW2_CONFORMANCE_DIR``.  Its runner takes the program to test; ours is the
installed console script, reached through a link named ``qemu-img`` so that its error
lines start as qemu-img's do (the suite compares stderr byte for byte).

``tests/iotests_expected_pass.txt`` lists the tests that pass today; a test of that list
that fails is a regression, and this test names it.  Without the suite, qemu-img,
qemu-io or qemu-system-x86 (the suite probes for it), it skips and says why.  Runtime:
about 5 minutes with two jobs (``QCOW2_IOTESTS_JOBS``).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
EXPECTED = Path(__file__).resolve().parent / "iotests_expected_pass.txt"


def _conformance_dir() -> Path:
    env = os.environ.get("QCOW2_CONFORMANCE_DIR")
    return Path(env) if env else ROOT.parent / "shared" / "conformance"


def _missing() -> str | None:
    """Why the suite cannot run here (None: it can)."""
    d = _conformance_dir()
    if not (d / "run-iotests.sh").is_file() or not (d / "qemu-iotests-7.2.0.tar.xz").is_file():
        return (f"the conformance suite is not at {d} (set QCOW2_CONFORMANCE_DIR to the "
                f"folder holding run-iotests.sh)")
    for prog in ("qemu-img", "qemu-io"):
        if shutil.which(prog) is None:
            return f"{prog} is not installed (Debian package qemu-utils)"
    if shutil.which("qemu-system-x86_64") is None:
        return "qemu-system-x86_64 is not installed (Debian package qemu-system-x86)"
    if shutil.which("qcow2", path=os.path.dirname(sys.executable)) is None:
        return "the qcow2 console script is not installed beside this Python"
    return None


def _expected() -> list[str]:
    names = []
    for line in EXPECTED.read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            names.append(line)
    return names


def test_expected_list_is_well_formed():
    names = _expected()
    assert names and len(names) == len(set(names))
    assert all(n.isdigit() and len(n) == 3 or not n.isdigit() for n in names)


def test_qemu_iotests_do_not_regress(tmp_path):
    why = _missing()
    if why is not None:
        pytest.skip(f"QEMU iotests not run: {why}")
    script = shutil.which("qcow2", path=os.path.dirname(sys.executable))
    link = tmp_path / "bin" / "qemu-img"
    link.parent.mkdir()
    link.symlink_to(script)
    results = tmp_path / "results"
    env = dict(os.environ, RESULTS=str(results), TMPDIR=str(tmp_path),
               JOBS=os.environ.get("QCOW2_IOTESTS_JOBS", "2"))
    # the suite's ./check imports modules beside it: this test run's Python settings
    # (-P, PYTHONSAFEPATH) must not reach it
    for var in ("PYTHONSAFEPATH", "PYTHONPATH", "PYTHONHOME"):
        env.pop(var, None)
    names = _expected()
    r = subprocess.run(["bash", str(_conformance_dir() / "run-iotests.sh"), str(link), *names],
                       capture_output=True, text=True, env=env, cwd=tmp_path)
    failed = []
    for name in names:
        status = results / "status" / name
        st = status.read_text().strip() if status.exists() else "missing"
        if st != "pass":
            failed.append(f"{name} ({st})")
    assert not failed, (f"QEMU iotests that passed before now fail: {', '.join(failed)}; "
                        f"diffs kept in {results / 'diffs'}\n{r.stdout[-2000:]}")
