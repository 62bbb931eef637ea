"""amend against qemu-img: options changed, content kept, check clean."""

from __future__ import annotations

import shutil
import struct

import pytest

from helpers import clean, cli, info, run

pytestmark = pytest.mark.skipif(shutil.which("qemu-img") is None, reason="qemu-img not installed")


@pytest.fixture
def img(tmp_path):
    p = tmp_path / "a.qcow2"
    run("qemu-img", "create", "-q", "-f", "qcow2", str(p), "8M")
    run("qemu-io", "-c", "write -P 0x11 0 3M", "-c", "write -c -P 0x12 4M 64k",
        "-c", "write -z 5M 128k", str(p))
    ref = tmp_path / "ref.raw"
    run("qemu-img", "convert", "-O", "raw", str(p), str(ref))
    return p, ref


@pytest.mark.parametrize("bits", [1, 2, 8, 32, 64, 16])
def test_refcount_bits(img, bits):
    p, ref = img
    r = cli("amend", "-o", f"refcount_bits={bits}", str(p))
    assert r.returncode == 0, r.stderr
    assert info(p)["format-specific"]["data"]["refcount-bits"] == bits
    run("qemu-img", "check", str(p))
    run("qemu-img", "compare", str(p), str(ref))
    # and the image stays writable with the new width
    run("qemu-io", "-c", "write -P 0x13 6M 1M", str(p))
    run("qemu-img", "check", str(p))


def test_compat_down_and_up(img):
    p, ref = img
    r = cli("amend", "-o", "compat=0.10", str(p))
    assert r.returncode == 0, r.stderr
    assert info(p)["format-specific"]["data"]["compat"] == "0.10"
    run("qemu-img", "check", str(p))
    run("qemu-img", "compare", str(p), str(ref))
    r = cli("amend", "-o", "compat=1.1,lazy_refcounts=on", str(p))
    assert r.returncode == 0, r.stderr
    d = info(p)["format-specific"]["data"]
    assert d["compat"] == "1.1" and d["lazy-refcounts"] is True
    run("qemu-img", "check", str(p))
    run("qemu-img", "compare", str(p), str(ref))


def test_backing_and_size(img, tmp_path):
    """qemu-img 7.2 refuses to change the backing file (rebase does that) but takes
    the one the image has."""
    p, ref = img
    run("qemu-img", "create", "-q", "-f", "raw", str(tmp_path / "b.raw"), "8M")
    twin = tmp_path / "twin.qcow2"
    shutil.copy(p, twin)
    for opts in ("backing_file=b.raw,backing_fmt=raw,size=16M", "backing_fmt=raw"):
        r = cli("amend", "-o", opts, str(p))
        q = run("qemu-img", "amend", "-o", opts, str(twin), check=False)
        assert r.returncode == q.returncode == 1
        assert r.stderr.split(": ", 1)[1] == q.stderr.split(": ", 1)[1] == (
            "Cannot amend the backing file\nYou can use 'qemu-img rebase' instead.\n")
    run("qemu-img", "rebase", "-u", "-b", "b.raw", "-F", "raw", str(p))
    r = cli("amend", "-o", "backing_file=b.raw,backing_fmt=raw,size=16M", str(p))
    assert r.returncode == 0, r.stderr
    i = info(p)
    assert i["backing-filename"] == "b.raw" and i["virtual-size"] == 16 << 20
    run("qemu-img", "check", str(p))


def test_refused_options(img):
    p, _ = img
    r = cli("amend", "-o", "cluster_size=4k", str(p))
    assert r.returncode == 1 and r.stderr.endswith(
        ": Invalid parameter 'cluster_size'\nThis option is only supported for image creation\n")
    r = cli("amend", "-o", "nonsense=1", str(p))
    assert r.returncode == 1 and "nonsense" in r.stderr


def _strip_snapshot_extra_data(path) -> None:
    """Rewrite the one-entry snapshot table of a version 2 image with no extra data
    (what QEMU before 1.1 wrote; version 2 allows it)."""
    with open(path, "r+b") as f:
        head = f.read(72)
        (nb, off) = struct.unpack_from(">IQ", head, 0x3C)
        assert nb == 1
        f.seek(off)
        e = bytearray(f.read(4096))
        (l1_off, l1_size, id_len, name_len, dsec, dnsec, clock, vm32,
         extra) = struct.unpack_from(">QIHHIIQII", e, 0)
        names = bytes(e[40 + extra:40 + extra + id_len + name_len])
        new = struct.pack(">QIHHIIQII", l1_off, l1_size, id_len, name_len, dsec, dnsec,
                          clock, vm32, 0) + names
        f.seek(off)
        f.write(new + bytes(len(e) - len(new)))


def test_upgrade_completes_old_snapshot_entries(tmp_path):
    """compat=0.10 -> 1.1 rewrites snapshot entries that lack the version 3 extra data
    (the 64-bit VM state size and the disk size) before the header says version 3, as
    QEMU's qcow2_upgrade does: qemu-img check is clean afterwards."""
    import qcow2
    p = tmp_path / "v2.qcow2"
    run("qemu-img", "create", "-q", "-f", "qcow2", "-o", "compat=0.10", str(p), "8M")
    run("qemu-io", "-c", "write -P 0x21 0 1M", str(p))
    run("qemu-img", "snapshot", "-c", "old", str(p))
    _strip_snapshot_extra_data(p)
    run("qemu-img", "check", str(p))
    with qcow2.open(str(p)) as im:
        assert im.snapshots_list[0].extra_data_size == 0
    r = cli("amend", "-o", "compat=1.1", str(p))
    assert r.returncode == 0, r.stderr
    run("qemu-img", "check", str(p))
    with qcow2.open(str(p)) as im:
        sn = im.snapshots_list[0]
        assert im.header.version == 3
        assert (sn.extra_data_size, sn.disk_size, sn.name) == (24, 8 << 20, "old")
    with qcow2.open(str(p), snapshot="old") as im:
        assert im.pread(4, 0) == b"\x21" * 4


@pytest.mark.parametrize("steps", [
    [["-o", "compat=0.10"]],
    [["-o", "refcount_bits=32,compat=0.10"]],
    [["-o", "compat=0.10,refcount_bits=16"]],
    [["-o", "refcount_bits=1"]],
])
def test_amend_refcount_width_like_qemu_img(tmp_path, steps):
    """Refusals come before any change (the image keeps its width), worded as qemu-img."""
    res = []
    for who in ("theirs", "ours"):
        p = tmp_path / f"{who}.qcow2"
        run("qemu-img", "create", "-q", "-f", "qcow2", "-o", "refcount_bits=64", str(p), "64M")
        if "-o" in steps[0] and steps[0][1] == "refcount_bits=1":
            run("qemu-img", "snapshot", "-c", "s", str(p))    # refcounts of 2
        run("qemu-io", "-c", "write 0 1M", str(p))
        out = []
        for args in steps:
            r = (run("qemu-img", "amend", *args, str(p), check=False) if who == "theirs"
                 else cli("amend", *args, str(p)))
            out.append((r.returncode, r.stderr.split(": ", 1)[-1]))
        clean(p)
        d = info(p)["format-specific"]["data"]
        res.append((out, d["refcount-bits"], d["compat"]))
    assert res[1] == res[0]
