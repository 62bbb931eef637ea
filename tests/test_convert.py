"""convert (read side): byte-identical sparse raw output, and nothing left behind on failure."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time

import pytest

import qcow2
from qcow2.errors import CorruptImageError, Qcow2Error

pytestmark = pytest.mark.skipif(shutil.which("qemu-img") is None, reason="qemu-img not installed")


def run(*args):
    subprocess.run(args, check=True, capture_output=True)


def cli(*args, cwd=None):
    return subprocess.run([sys.executable, "-m", "qcow2", *args], capture_output=True,
                          text=True, cwd=cwd)


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    d = tmp_path_factory.mktemp("conv")
    raw = d / "src.raw"
    with open(raw, "wb") as f:
        f.truncate(48 << 20)
        for i, off in enumerate(range(0, 48 << 20, 3 << 20)):
            f.seek(off + 4096 * i)
            f.write((b"block %d " % i) * 20000)
            f.seek(off + (1 << 20))
            f.write(os.urandom(300000))
            f.seek(off + (2 << 20))
            f.write(bytes(65536))               # explicit zeros: must become a hole
    out = {"raw": raw}
    for name, opts in (("plain", []), ("zlib", ["-c"]),
                       ("zstd", ["-c", "-o", "compression_type=zstd"])):
        p = d / f"{name}.qcow2"
        run("qemu-img", "convert", "-O", "qcow2", *opts, str(raw), str(p))
        out[name] = p
    return out


def leftovers(d):
    return sorted(n for n in os.listdir(d) if n.endswith(".part"))


@pytest.mark.parametrize("kind", ["plain", "zlib", "zstd", "raw"])
@pytest.mark.parametrize("workers", [1, 2])
def test_convert_matches_qemu(images, tmp_path, kind, workers):
    src = images[kind]
    ours, theirs = tmp_path / "ours.raw", tmp_path / "theirs.raw"
    qcow2.convert(src, ours, workers=workers)
    run("qemu-img", "convert", "-O", "raw", str(src), str(theirs))
    assert ours.read_bytes() == theirs.read_bytes()
    assert os.stat(ours).st_blocks <= os.stat(theirs).st_blocks + 8
    assert leftovers(tmp_path) == []


def test_zero_blocks_become_holes(images, tmp_path):
    ours = tmp_path / "o.raw"
    qcow2.convert(images["plain"], ours)
    st = os.stat(ours)
    assert st.st_blocks * 512 < st.st_size // 2
    full = tmp_path / "full.raw"
    qcow2.convert(images["plain"], full, sparse_size=0)
    assert full.read_bytes() == ours.read_bytes()
    assert os.stat(full).st_blocks >= st.st_blocks


def test_nova_convert_line(images, tmp_path):
    r = cli("convert", "-t", "none", "-O", "raw", "-f", "qcow2", str(images["zlib"]),
            str(tmp_path / "base.raw"))
    assert r.returncode == 0, r.stderr
    assert (tmp_path / "base.raw").read_bytes() == images["raw"].read_bytes()


def test_progress_callback(images, tmp_path):
    seen = []
    qcow2.convert(images["zstd"], tmp_path / "p.raw", progress=seen.append)
    assert seen[0] == 0.0 and seen[-1] == 100.0
    assert seen == sorted(seen)


def test_failure_leaves_nothing(images, tmp_path):
    bad = tmp_path / "bad.qcow2"
    data = bytearray(images["zlib"].read_bytes())
    # wreck every compressed cluster's bytes after the metadata
    data[1 << 20:] = b"\xff" * (len(data) - (1 << 20))
    bad.write_bytes(bytes(data))
    dst = tmp_path / "dst.raw"
    with pytest.raises(CorruptImageError):
        qcow2.convert(bad, dst)
    assert not dst.exists()
    assert leftovers(tmp_path) == []
    r = cli("convert", "-O", "raw", str(bad), str(dst))
    assert r.returncode == 1
    assert len(r.stderr.strip().splitlines()) == 1 and "Traceback" not in r.stderr
    assert not dst.exists() and leftovers(tmp_path) == []


def test_failure_keeps_existing_destination(images, tmp_path):
    dst = tmp_path / "dst.raw"
    dst.write_bytes(b"precious")
    with pytest.raises(Qcow2Error):
        qcow2.convert(tmp_path / "missing.qcow2", dst)
    assert dst.read_bytes() == b"precious"


def test_killed_convert_leaves_nothing(images, tmp_path):
    """SIGKILL in the middle: the destination never appears, no temporary name remains."""
    dst = tmp_path / "k.raw"
    slow = ("import qcow2, time\n"
            "from qcow2.ops import convert as c\n"
            "orig = c._pwrite_all\n"
            "def slow(*a):\n"
            "    time.sleep(0.05)\n"
            "    orig(*a)\n"
            "c._pwrite_all = slow\n"
            f"qcow2.convert({str(images['zlib'])!r}, {str(dst)!r}, workers=1)\n")
    p = subprocess.Popen([sys.executable, "-c", slow])
    time.sleep(1.5)
    p.send_signal(signal.SIGKILL)
    p.wait()
    assert not dst.exists()
    assert leftovers(tmp_path) == []
