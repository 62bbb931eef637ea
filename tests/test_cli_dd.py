"""qemu-img dd: same output images and messages as qemu-img."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys

import pytest

pytestmark = pytest.mark.skipif(shutil.which("qemu-img") is None, reason="qemu-img not installed")

SCRIPT = shutil.which("qcow2", path=os.path.dirname(sys.executable))


@pytest.fixture()
def src(tmp_path):
    p = tmp_path / "src.qcow2"
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(p), "1M"], check=True)
    subprocess.run(["qemu-io", "-c", "write -P 0xa 0 300k", "-c", "write -P 0xb 700k 5k",
                    str(p)], check=True, capture_output=True)
    return p


def _ours(tmp_path):
    if SCRIPT is None:
        pytest.skip("the qcow2 console script is not installed")
    link = tmp_path / "bin" / "qemu-img"
    link.parent.mkdir(exist_ok=True)
    if not link.exists():
        link.symlink_to(SCRIPT)
    return str(link)


@pytest.mark.parametrize("ops", [
    [], ["bs=5"], ["bs=1999"], ["bs=64k", "count=3"], ["bs=1k", "count=3", "skip=1"],
    ["bs=4k", "skip=100"], ["-O", "qcow2", "bs=1k"], ["-O", "qcow2", "bs=512", "count=1k"],
])
def test_dd_output_like_qemu_img(tmp_path, src, ops):
    ours = _ours(tmp_path)
    outs = []
    for prog, name in (("qemu-img", "theirs"), (ours, "mine")):
        out = tmp_path / name
        r = subprocess.run([prog, "dd", *ops, f"if={src}", f"of={out}"], capture_output=True,
                           text=True)
        assert r.returncode == 0, r.stderr
        assert r.stdout == "" and r.stderr == ""
        outs.append(out)
    fmt = "qcow2" if "qcow2" in ops else "raw"
    r = subprocess.run(["qemu-img", "compare", "-f", fmt, "-F", fmt, "-s", *map(str, outs)],
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr
    if fmt == "qcow2":
        assert subprocess.run(["qemu-img", "check", str(outs[1])]).returncode == 0


@pytest.mark.parametrize("ops", [
    [], ["if=SRC"], ["bs=0", "if=SRC", "of=OUT"], ["bs=foo", "if=SRC", "of=OUT"],
    ["count=-1", "if=SRC", "of=OUT"], ["xyz", "if=SRC", "of=OUT"],
    ["foo=1", "if=SRC", "of=OUT"],
])
def test_dd_refusals_like_qemu_img(tmp_path, src, ops):
    ours = _ours(tmp_path)
    res = []
    for prog in ("qemu-img", ours):
        args = [o.replace("SRC", str(src)).replace("OUT", str(tmp_path / "o")) for o in ops]
        r = subprocess.run([prog, "dd", *args], capture_output=True, text=True)
        res.append((r.returncode, r.stdout, r.stderr))
    assert res[1] == res[0] and res[0][0] == 1


def test_dd_skip_past_the_end_leaves_nothing(tmp_path, src):
    """qemu-img creates an empty output before refusing; we create nothing."""
    ours = _ours(tmp_path)
    r = subprocess.run([ours, "dd", "bs=4k", "skip=1000", f"if={src}",
                        f"of={tmp_path / 'o'}"], capture_output=True, text=True)
    assert r.returncode == 1
    assert r.stderr == f"qemu-img: {src}: cannot skip to specified offset\n"
    assert sorted(os.listdir(tmp_path)) == ["bin", "src.qcow2"]
