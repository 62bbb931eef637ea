"""amend and snapshots through the CLI against qemu-img: ``amend -p``'s progress lines
byte for byte, the downgrade of an image with internal snapshots, and qemu-img's
words where a snapshot's L1 table is refused (amend, convert -l)."""

from __future__ import annotations

import shutil
import subprocess
import sys

import pytest

from helpers import clean, cli, info, poke, run

pytestmark = pytest.mark.skipif(shutil.which("qemu-img") is None, reason="qemu-img not installed")


def _stdout_bytes(*args) -> bytes:
    """stdout as written (the progress line ends in carriage returns)."""
    return subprocess.run([str(a) for a in args], capture_output=True, check=False).stdout


def _ours(*args) -> bytes:
    return _stdout_bytes(sys.executable, "-m", "qcow2", *args)


def _twins(tmp_path, create: list[str], size: str, *io_cmds, snapshot: bool = False,
           backing: bool = False):
    """The same image twice (theirs, ours), made by qemu-img and qemu-io."""
    out = []
    for who in ("theirs", "ours"):
        p = tmp_path / f"{who}.qcow2"
        extra = []
        if backing:
            b = tmp_path / f"{who}-base.qcow2"
            run("qemu-img", "create", "-q", "-f", "qcow2", str(b), size)
            run("qemu-io", "-c", "write -P 0x55 0 1M", str(b))
            extra = ["-b", b.name, "-F", "qcow2"]
        run("qemu-img", "create", "-q", "-f", "qcow2", "-o", ",".join(create), *extra, str(p),
            size)
        if io_cmds:
            run("qemu-io", *[a for c in io_cmds for a in ("-c", c)], str(p))
        if snapshot:
            run("qemu-img", "snapshot", "-c", "foo", str(p))
        out.append(p)
    return out


@pytest.mark.parametrize("create,size,io,options,snapshot", [
    # the refcount width change that needs a third sizing pass: the estimate goes back
    # (66.67 % of three passes, then 50.00 % of four), as in qemu-img
    (["refcount_bits=1", "cluster_size=512"], "64k", [f"write 0 {58 * 512}"],
     "refcount_bits=64", False),
    (["refcount_bits=16"], "64M", ["write 0 8M"], "refcount_bits=2", False),
    # the downgrade: one step per L1 entry of the active layer and of each snapshot
    (["compat=1.1"], "4G", ["write -z 0 64k", "write -z 1G 64k", "write -z 2G 64k",
                            "write -z 3G 64k"], "compat=0.10", False),
    (["compat=1.1"], "4G", ["write -z 0 64k", "write -z 1G 64k", "write -z 2G 64k",
                            "write -z 3G 64k"], "compat=0.10", True),
    # the upgrade (two steps), a change that reports nothing, and two changes at once
    (["compat=0.10"], "64M", ["write 0 1M"], "compat=1.1", False),
    (["compat=1.1"], "64M", [], "lazy_refcounts=on", False),
    (["compat=0.10"], "1G", ["write 0 200M"], "compat=1.1,refcount_bits=64", True),
    (["refcount_bits=4"], "1G", ["write 0 100M", "write -z 300M 1M"],
     "compat=0.10,refcount_bits=16", False),
])
def test_progress_like_qemu_img(tmp_path, create, size, io, options, snapshot):
    theirs, ours = _twins(tmp_path, create, size, *io, snapshot=snapshot,
                          backing=options.startswith("compat=0.10") and "4G" == size)
    want = _stdout_bytes("qemu-img", "amend", "-p", "-o", options, theirs)
    got = _ours("amend", "-p", "-o", options, ours)
    assert got == want
    assert got.startswith(b"    (0.00/100%)\r") and got.endswith(b"    (100.00/100%)\r\n")
    clean(ours)
    assert info(ours)["format-specific"] == info(theirs)["format-specific"]


def test_progress_quiet_and_failed(tmp_path):
    """-q prints nothing; a refused change still ends the line as qemu-img does (100,
    the error, the newline)."""
    theirs, ours = _twins(tmp_path, ["refcount_bits=16"], "64M", "write 0 1M")
    assert _ours("amend", "-p", "-q", "-o", "refcount_bits=8", ours) == b""
    run("qemu-img", "amend", "-p", "-q", "-o", "refcount_bits=8", str(theirs))
    want = _stdout_bytes("qemu-img", "amend", "-p", "-o", "compat=0.10", theirs)
    got = _ours("amend", "-p", "-o", "compat=0.10", ours)
    assert got == want == b"    (0.00/100%)\r    (100.00/100%)\r\n"
    r = cli("amend", "-p", "-o", "compat=0.10", ours)
    assert r.returncode == 1
    assert r.stderr.endswith(": compat=0.10 requires refcount_bits=16\n")
    assert info(ours)["format-specific"]["data"]["compat"] == "1.1"


@pytest.mark.parametrize("backing", [False, True])
def test_downgrade_with_snapshots(tmp_path, backing):
    """compat=0.10 on an image whose snapshots hold zero clusters (plain and allocated,
    in L2 tables shared with the active layer or not): every snapshot and the active
    layer read the same afterwards, and qemu-img check is clean."""
    theirs, ours = _twins(tmp_path, ["compat=1.1"], "4M", "write -P 1 0 1M",
                          "write -z 64k 64k", "write -z 2M 128k", snapshot=True,
                          backing=backing)
    for p in (theirs, ours):
        run("qemu-io", "-c", "write -z 0 64k", "-c", "write -z 1M 64k",
            "-c", "write -P 3 3M 64k", str(p))
        run("qemu-img", "snapshot", "-c", "bar", str(p))
        run("qemu-io", "-c", "write -z 3M 64k", "-c", "write -P 5 128k 64k", str(p))
    before = {}
    for name in ("foo", "bar", None):
        dst = tmp_path / f"{name}.raw"
        run("qemu-img", "convert", *(["-l", name] if name else []), "-O", "raw", str(ours),
            str(dst))
        before[name] = dst.read_bytes()
    r = cli("amend", "-o", "compat=0.10", ours)
    assert r.returncode == 0, r.stderr
    run("qemu-img", "amend", "-o", "compat=0.10", str(theirs))
    clean(ours)
    assert info(ours)["format-specific"]["data"]["compat"] == "0.10"
    for name, data in before.items():
        dst = tmp_path / f"after-{name}.raw"
        run("qemu-img", "convert", *(["-l", name] if name else []), "-O", "raw", str(ours),
            str(dst))
        assert dst.read_bytes() == data, name
        run("qemu-img", "compare", "-f", "raw", "-F", "raw", str(dst), str(tmp_path /
            f"{name}.raw"))


@pytest.mark.parametrize("field,value,reason,errno_text", [
    (0, b"\x00\x00\x00\x00\x00\x40\x02\x00", "Snapshot L1 table offset invalid",
     "Invalid argument"),
    (8, b"\x10\x00\x00\x00", "Snapshot L1 table too large", "File too large"),
])
def test_bad_snapshot_l1_table_words(tmp_path, field, value, reason, errno_text):
    """A snapshot whose L1 table is refused: convert -l says it failed to load it, amend
    compat=0.10 reports the reason and then that zero clusters could not be turned into
    data (qemu-img's two lines), and changes nothing."""
    lines = {}
    for p in _twins(tmp_path, ["compat=1.1"], "64M", "write 0 512", snapshot=True):
        with open(p, "rb") as f:
            f.seek(64)
            table = int.from_bytes(f.read(8), "big")
        poke(p, table + field, value)
        prog = ["qemu-img"] if p.name.startswith("theirs") else [sys.executable, "-m", "qcow2"]
        before = p.read_bytes()
        conv = run(*prog, "convert", "-l", "foo", str(p), str(p) + ".snap", check=False)
        amend = run(*prog, "amend", "-o", "compat=0.10", str(p), check=False)
        assert p.read_bytes() == before
        lines[p.name] = ([ln.split(": ", 1)[1] for ln in conv.stderr.splitlines()],
                         [ln.split(": ", 1)[1] for ln in amend.stderr.splitlines()],
                         conv.returncode, amend.returncode)
    assert lines["ours.qcow2"] == lines["theirs.qcow2"] == (
        [f"Failed to load snapshot: {reason}"],
        [reason, f"Failed to turn zero into data clusters: {errno_text}"], 1, 1)
