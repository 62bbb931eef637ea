"""check against qemu-img check: the same JSON, the same exit status, the same
messages; then images corrupted by poking bytes (leaks, corruptions, COPIED flags,
ranges past the end of the file, unaligned offsets, reserved bits, a refcount block
inside the L1 table, broken snapshot entries, the dirty bit): the same counts before
repair, and after ``-r leaks`` / ``-r all`` the same result as qemu-img's own repair,
a clean ``qemu-img check`` where qemu-img's repair is clean, and the same guest data.

Every corrupted case is checked three ways (no repair, leaks, all) on copies: qemu-img
repairs one copy, we repair the other, then qemu-img compares the outcomes.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
import shutil
import signal
import struct
import subprocess
import sys

import pytest

import qcow2
from helpers import QemuIoWriter
from oracle import run_pbkdf
from qcow2 import checker
from qcow2.cli import check as cli_check
from qcow2.ops import check as ck

pytestmark = pytest.mark.skipif(shutil.which("qemu-img") is None or shutil.which("qemu-io")
                                is None, reason="qemu-img/qemu-io not installed")

MB = 1 << 20


def run(*args, cwd=None, input=None):
    return subprocess.run([str(a) for a in args], capture_output=True, text=True, cwd=cwd,
                          input=input)


def qimg(*args, cwd=None):
    r = run("qemu-img", *args, cwd=cwd)
    assert r.returncode == 0, r.stderr
    return r


def qio(path, *cmds, fmt="qcow2", extra=()):
    args = ["qemu-io", "-f", fmt, *extra]
    for c in cmds:
        args += ["-c", c]
    # qemu 7.2 resolves a relative data-file name against the working directory
    r = run(*args, path, cwd=os.path.dirname(path) or None)
    assert r.returncode == 0, r.stderr
    return r


def qemu_check(path, *args):
    """qemu-img check --output=json: (dict or None, exit status, stderr lines)."""
    r = run("qemu-img", "check", "--output=json", *args, os.path.basename(path),
            cwd=os.path.dirname(path))
    d = json.loads(r.stdout) if r.stdout.strip() else None
    return d, r.returncode, _messages(r, "qemu-img: ")


def _messages(r, prefix):
    """stderr without the program name, and without the final one-line failure."""
    keep = ("qcow2: Marking image as corrupt", "qcow2: Image is corrupt")   # QEMU's own
    lines = [ln[len(prefix):] if ln.startswith(prefix) and not ln.startswith(keep) else ln
             for ln in r.stderr.splitlines()]
    if r.returncode and lines and lines[-1].startswith(("Check failed", "Could not open")):
        lines.pop()
    return lines


def cli(*args, cwd=None):
    """Our CLI, in this process (no interpreter start-up): a CompletedProcess."""
    from qcow2.cli import main
    out, err = io.StringIO(), io.StringIO()
    old = os.getcwd()
    try:
        if cwd:
            os.chdir(cwd)
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            rc = main([str(a) for a in args])
    finally:
        os.chdir(old)
    return subprocess.CompletedProcess(args, rc, out.getvalue(), err.getvalue())


def our_check(path, *args):
    """Our CLI, the same way: (dict or None, exit status, stderr lines)."""
    r = cli("check", "--output=json", *args, os.path.basename(path),
            cwd=os.path.dirname(path))
    d = json.loads(r.stdout) if r.stdout.strip() else None
    return d, r.returncode, _messages(r, "qcow2: ")


def raw_sha(path):
    """Hash of the guest data (qemu-img convert), None when qemu-img cannot read it."""
    out = str(path) + ".raw"
    r = run("qemu-img", "convert", "-U", "-O", "raw", path, out, cwd=os.path.dirname(path))
    if r.returncode:
        return None
    with open(out, "rb") as f:
        h = hashlib.sha256(f.read()).hexdigest()
    os.unlink(out)
    return h


# ---------------------------------------------------------------------------
# poking helpers
# ---------------------------------------------------------------------------

class Img:
    """Just enough of the layout to find the bytes to poke."""

    def __init__(self, path):
        self.path = path
        with open(path, "rb") as f:
            b = f.read(112)
        (_m, self.version, _bo, _bs, self.cbits, self.size, _c, self.l1_size, self.l1_off,
         self.rt_off, self.rt_clusters, self.nb_snapshots,
         self.sn_off) = struct.unpack_from(">4sIQIIQIIQQIIQ", b)
        self.cs = 1 << self.cbits
        self.rorder = struct.unpack_from(">I", b, 96)[0] if self.version >= 3 else 4
        self.incompat = struct.unpack_from(">Q", b, 72)[0] if self.version >= 3 else 0
        self.bits = 1 << self.rorder
        self.extended = bool(self.incompat & 16)
        self.esize = 16 if self.extended else 8

    def r64(self, off):
        with open(self.path, "rb") as f:
            f.seek(off)
            return struct.unpack(">Q", f.read(8))[0]

    def w64(self, off, v):
        with open(self.path, "r+b") as f:
            f.seek(off)
            f.write(struct.pack(">Q", v & 0xFFFFFFFFFFFFFFFF))

    def w32(self, off, v):
        with open(self.path, "r+b") as f:
            f.seek(off)
            f.write(struct.pack(">I", v))

    def l2_offset(self, l1_index=0, l1_off=None):
        return self.r64((self.l1_off if l1_off is None else l1_off) + 8 * l1_index) \
            & 0x00FFFFFFFFFFFE00

    def l2_entry_off(self, i, l1_index=0):
        return self.l2_offset(l1_index) + i * self.esize

    def refblock(self, index=0):
        return self.r64(self.rt_off + 8 * index) & ~0x1FF

    def get_ref(self, cluster):
        per = self.cs * 8 // self.bits
        blk = self.refblock(cluster // per)
        i = cluster % per
        with open(self.path, "rb") as f:
            if self.bits >= 8:
                n = self.bits // 8
                f.seek(blk + i * n)
                return int.from_bytes(f.read(n), "big")
            f.seek(blk + i * self.bits // 8)
            byte = f.read(1)[0]
            return (byte >> ((i * self.bits) % 8)) & ((1 << self.bits) - 1)

    def set_ref(self, cluster, value):
        per = self.cs * 8 // self.bits
        blk = self.refblock(cluster // per)
        i = cluster % per
        with open(self.path, "r+b") as f:
            if self.bits >= 8:
                n = self.bits // 8
                f.seek(blk + i * n)
                f.write(value.to_bytes(n, "big"))
                return
            f.seek(blk + i * self.bits // 8)
            byte = f.read(1)[0]
            shift = (i * self.bits) % 8
            mask = ((1 << self.bits) - 1) << shift
            f.seek(blk + i * self.bits // 8)
            f.write(bytes([(byte & ~mask & 0xFF) | (value << shift)]))

    def bitmap_tables(self):
        """[(table offset, entries)] of the persistent bitmaps."""
        with open(self.path, "rb") as f:
            first = f.read(self.cs)
            pos = 112 if self.version >= 3 else 72
            while pos + 8 <= len(first):
                magic, length = struct.unpack_from(">II", first, pos)
                if magic == 0:
                    return []
                if magic == 0x23852875:
                    _nb, _r, dsize, doff = struct.unpack_from(">IIQQ", first, pos + 8)
                    f.seek(doff)
                    d = f.read(dsize)
                    out, p = [], 0
                    while p < dsize:
                        toff, tsize, _fl, _t, _g, ns, ex = struct.unpack_from(">QIIBBHI", d, p)
                        out.append((toff, tsize))
                        p += (24 + ns + ex + 7) & ~7
                    return out
                pos += 8 + ((length + 7) & ~7)
        return []

    def data_cluster(self, i, l1_index=0):
        return (self.r64(self.l2_entry_off(i, l1_index)) & 0x00FFFFFFFFFFFE00) >> self.cbits


# ---------------------------------------------------------------------------
# clean images of many kinds: the whole dict and the exit status
# ---------------------------------------------------------------------------

def _writes(path, cs, extra_cmds=()):
    qio(path, f"write -P 0x11 0 {4 * cs}", f"write -P 0x22 {9 * cs} {3 * cs}",
        f"write -z {14 * cs} {2 * cs}", *extra_cmds)


CLEAN = {
    "v2-64k": ("compat=0.10", 16 * MB, None),
    "v3-512": ("cluster_size=512", 2 * MB, None),
    "v3-2M": ("cluster_size=2097152", 64 * MB, None),
    "rb1": ("refcount_bits=1,cluster_size=4096", 8 * MB, None),
    "rb4-lazy": ("refcount_bits=4,lazy_refcounts=on,cluster_size=1024", 4 * MB, None),
    "rb64": ("refcount_bits=64,cluster_size=4096", 8 * MB, None),
    "xl2": ("extended_l2=on,cluster_size=65536", 32 * MB, "subclusters"),
    "compressed-zlib": ("cluster_size=4096", 8 * MB, "compressed"),
    "compressed-zstd": ("cluster_size=65536,compression_type=zstd", 16 * MB, "compressed"),
    "snapshots": ("cluster_size=4096", 8 * MB, "snapshots"),
    "v2-snapshots-compressed": ("compat=0.10,cluster_size=4096", 8 * MB,
                                "snapshots+compressed"),
    "bitmaps": ("cluster_size=65536", 64 * MB, "bitmaps"),
    "data-file": ("data_file=DATA,cluster_size=65536", 16 * MB, None),
    "data-file-raw": ("data_file=DATA,data_file_raw=on,cluster_size=65536", 16 * MB, None),
    "prealloc-metadata": ("preallocation=metadata,cluster_size=65536", 16 * MB, None),
    "prealloc-falloc": ("preallocation=falloc,cluster_size=65536", 8 * MB, None),
    "prealloc-full": ("preallocation=full,cluster_size=4096", 4 * MB, None),
    "backing-chain": ("cluster_size=65536", 16 * MB, "backing"),
    "empty": ("cluster_size=65536", 1 << 40, "empty"),
}


def make_clean(d, kind):
    opts, size, extra = CLEAN[kind]
    path = os.path.join(d, f"{kind}.qcow2")
    if "DATA" in opts:
        opts = opts.replace("DATA", f"{kind}.data")
    args = ["create", "-q", "-f", "qcow2", "-o", opts]
    if extra == "backing":
        base = os.path.join(d, "base.qcow2")
        qimg("create", "-q", "-f", "qcow2", base, size)
        qio(base, f"write -P 0x33 0 {size // 2}")
        args += ["-b", "base.qcow2", "-F", "qcow2"]
    qimg(*args, path, size, cwd=d)
    if extra == "empty":
        return path
    cs = Img(path).cs
    if extra == "subclusters":
        qio(path, f"write -P 0x44 {cs // 32} {cs // 16}", f"write -P 0x45 {5 * cs} {cs}",
            f"write -z {7 * cs + cs // 4} {cs // 8}")
    elif extra and "compressed" in extra and "snapshots" not in extra:
        qio(path, f"write -c -P 0x55 0 {cs}", f"write -c -P 0x56 {cs} {cs}",
            f"write -P 0x57 {4 * cs} {2 * cs}")
    elif extra and "snapshots" in extra:
        cmds = [f"write -c -P 0x55 {20 * cs} {cs}"] if "compressed" in extra else []
        _writes(path, cs, cmds)
        qimg("snapshot", "-c", "one", path)
        qio(path, f"write -P 0x66 {cs} {2 * cs}", f"discard {10 * cs} {cs}")
        qimg("snapshot", "-c", "two", path)
        qio(path, f"write -P 0x67 {3 * cs} {3 * cs}")
    elif extra == "bitmaps":
        qimg("bitmap", "--add", path, "b0")
        qimg("bitmap", "--add", "-g", "131072", path, "b1")
        _writes(path, cs)
    else:
        _writes(path, cs)
    return path


@pytest.mark.parametrize("kind", sorted(CLEAN))
def test_clean_images_match_qemu(tmp_path, kind):
    path = make_clean(str(tmp_path), kind)
    expect, qrc, _ = qemu_check(path)
    got, rc, err = our_check(path)
    assert got == expect
    assert rc == qrc == 0
    assert err == []
    # the library returns the same dict (filename as given)
    assert ck.check(path) == dict(expect, filename=path)
    assert qcow2.check(path, force_share=True) == dict(expect, filename=path)


def test_human_output_matches_qemu(tmp_path):
    path = make_clean(str(tmp_path), "compressed-zlib")
    q = run("qemu-img", "check", path)
    o = run(sys.executable, "-m", "qcow2", "check", path)
    assert (o.stdout, o.returncode) == (q.stdout, q.returncode)
    # leaks and corruptions: stdout and the per-cluster messages on stderr
    img = Img(path)
    c = img.data_cluster(4)
    img.set_ref(c, 2)
    img.set_ref(img.data_cluster(5), 0)
    q = run("qemu-img", "check", path)
    o = run(sys.executable, "-m", "qcow2", "check", path)
    assert (o.stdout, o.returncode) == (q.stdout, q.returncode)
    assert o.stderr == q.stderr
    assert f"Leaked cluster {c} refcount=2 reference=1" in o.stderr
    # repaired: the summary of what was fixed, then the double check
    shutil.copy(path, path + ".q")
    q = run("qemu-img", "check", "-r", "all", path + ".q")
    o = run(sys.executable, "-m", "qcow2", "check", "-r", "all", path)
    assert (o.stdout, o.returncode) == (q.stdout, q.returncode)
    assert "The following inconsistencies were found and repaired:" in o.stdout
    assert o.stderr.replace(path, "X") == q.stderr.replace(path + ".q", "X")


def test_raw_is_not_supported(tmp_path):
    path = tmp_path / "r.raw"
    qimg("create", "-q", "-f", "raw", path, MB)
    r = run(sys.executable, "-m", "qcow2", "check", path)
    q = run("qemu-img", "check", path)
    assert r.returncode == q.returncode == 63
    assert "This image format does not support checks" in r.stderr
    with pytest.raises(checker.CheckNotSupportedError):
        ck.check(path)
    qc = tmp_path / "q.qcow2"
    qimg("create", "-q", "-f", "qcow2", qc, MB)
    assert run(sys.executable, "-m", "qcow2", "check", "-f", "raw", qc).returncode == 63


def test_refusals(tmp_path):
    path = make_clean(str(tmp_path), "v3-512")
    with pytest.raises(qcow2.errors.InvalidOptionError):
        ck.check(path, repair="some")
    with pytest.raises(qcow2.Qcow2Error, match="force-share"):
        ck.check(path, repair="all", force_share=True)
    os.rename(str(tmp_path / "v3-512.qcow2"), str(tmp_path / "x.qcow2"))
    r = run(sys.executable, "-m", "qcow2", "check", tmp_path / "v3-512.qcow2")
    assert r.returncode == 1
    # a backing file that is missing fails like qemu-img (exit 1, nothing on stdout)
    ov = make_clean(str(tmp_path), "backing-chain")
    os.rename(tmp_path / "base.qcow2", tmp_path / "gone.qcow2")
    for cmd in (["qemu-img"], [sys.executable, "-m", "qcow2"]):
        r = run(*cmd, "check", ov)
        assert r.returncode == 1 and r.stdout == ""
        assert "backing file" in r.stderr


def test_writer_lock_excludes_repair(tmp_path):
    path = make_clean(str(tmp_path), "v3-512")
    with QemuIoWriter(path):
        with pytest.raises(qcow2.Qcow2Error, match="lock"):
            ck.check(path, repair="all")
        assert ck.check(path, force_share=True)["check-errors"] == 0
        assert run("qemu-img", "check", path).returncode == 1     # (qemu-img agrees)


# ---------------------------------------------------------------------------
# corrupted images: counts before repair, and the result of each repair mode
# ---------------------------------------------------------------------------

def _base(d, opts="cluster_size=65536", size=64 * MB, snapshot=False, bitmaps=False,
          more=0):
    path = os.path.join(d, "img.qcow2")
    qimg("create", "-q", "-f", "qcow2", "-o", opts, path, size)
    img = Img(path)
    cs = img.cs
    if bitmaps:                         # persistent bitmaps: qemu-io's writes dirty them
        qimg("bitmap", "--add", path, "b0")
        qimg("bitmap", "--add", "-g", "512", path, "b1")
    cmds = [f"write -P 0x11 0 {16 * cs}", f"write -c -P 0x12 {32 * cs} {cs}",
            f"write -P 0x13 {40 * cs} {2 * cs}"]
    if more:
        cmds.append(f"write -P 0x15 {64 * cs} {more}")
    qio(path, *cmds)
    if snapshot:
        qimg("snapshot", "-c", "snap1", path)
        qio(path, f"write -P 0x14 0 {4 * cs}")
    return path


def poke_leak(img):
    img.set_ref(img.data_cluster(3), 2)           # referenced once, stored 2


def poke_leak_free_cluster(img):
    end = os.path.getsize(img.path)
    with open(img.path, "r+b") as f:                # one more cluster at the end,
        f.truncate(end + img.cs)                    # counted but unreferenced
    img.set_ref(end // img.cs, 1)


def poke_refcount_zero(img):
    img.set_ref(img.data_cluster(5), 0)           # referenced, stored 0: rebuild


def poke_refcount_low(img):
    img.set_ref(img.data_cluster(8), 1)           # shared with the snapshot: 2 -> 1


def poke_clear_copied_l2(img):
    o = img.l2_entry_off(2)
    img.w64(o, img.r64(o) & ~(1 << 63))


def poke_set_copied_shared(img):
    o = img.l2_entry_off(9)                         # shared with the snapshot
    img.w64(o, img.r64(o) | (1 << 63))


def poke_clear_copied_l1(img):
    img.w64(img.l1_off, img.r64(img.l1_off) & ~(1 << 63))


def poke_l2_past_eof(img):
    img.w64(img.l2_entry_off(6), (1 << 63) | (os.path.getsize(img.path) + 64 * img.cs))


def poke_l2_unaligned(img):
    o = img.l2_entry_off(7)
    img.w64(o, img.r64(o) + 512)


def poke_prealloc_zero_unaligned(img):
    o = img.l2_entry_off(7)
    img.w64(o, img.r64(o) + 512 | 1)              # zero flag: preallocated zero cluster


def poke_l1_unaligned(img):
    img.w64(img.l1_off, img.r64(img.l1_off) + 512)


def poke_refblock_in_l1(img):
    img.w64(img.rt_off, img.l1_off)


def poke_refblock_outside(img):
    img.w64(img.rt_off + 8, os.path.getsize(img.path) + 16 * img.cs)


def poke_reserved_l1(img):
    img.w64(img.l1_off, img.r64(img.l1_off) | 2)


def poke_reserved_l2(img):
    o = img.l2_entry_off(1)
    img.w64(o, img.r64(o) | 2)


def poke_reserved_reftable(img):
    img.w64(img.rt_off, img.r64(img.rt_off) | 1)


def poke_compressed_copied(img):
    o = img.l2_entry_off(32)
    img.w64(o, img.r64(o) | (1 << 63))


def poke_snapshot_l1_unaligned(img):
    img.w64(img.sn_off, img.r64(img.sn_off) + 512)


def poke_snapshot_incomplete(img):
    img.w32(img.sn_off + 36, 0)                     # extra_data_size 0 in a v3 image


def poke_dirty_leak(img):
    img.w64(72, img.incompat | 1)                   # dirty bit (lazy refcounts crash)
    img.set_ref(img.data_cluster(1), 3)
    img.set_ref(img.data_cluster(2), 0)


def poke_corrupt_bit(img):
    img.w64(72, img.incompat | 2)
    img.set_ref(img.data_cluster(1), 2)


def poke_xl2_bitmap(img):
    o = img.l2_entry_off(3) + 8                     # allocated and zero at once
    img.w64(o, img.r64(o) | (1 << 32) | 1)


def poke_unalloc_bitmap(img):
    o = img.l2_entry_off(20) + 8
    img.w64(o, 3)


def poke_refblock_unaligned(img):
    img.w64(img.rt_off, img.refblock(0) + 512)      # unreadable: check errors, status 1


def poke_duplicate_reference(img):
    o = img.l2_entry_off(3)                         # two entries, one cluster
    img.w64(o, img.r64(img.l2_entry_off(2)))
    img.w64(img.l2_entry_off(4), img.r64(img.l2_entry_off(2)))


def poke_reftable_entry_gone(img):
    img.w64(img.rt_off + 8 * 3, 0)                  # a refcount block forgotten


def poke_too_many_snapshots(img):
    img.w32(0x3C, 70000)


def poke_snapshot_extra_too_large(img):
    img.w32(img.sn_off + 36, 2000)


def poke_bitmap_leak(img):
    toff, _n = img.bitmap_tables()[1]
    img.w64(toff, 0)                                # its data cluster leaks


def poke_bitmap_table_reserved(img):
    toff, _n = img.bitmap_tables()[0]
    img.w64(toff, img.r64(toff) | 2)                # the check cannot complete


def poke_bitmap_shared(img):
    (t0, _), (t1, _) = img.bitmap_tables()
    img.w64(t1 + 8, img.r64(t0))                    # two bitmaps, one data cluster


CORRUPT = {
    "leak": (poke_leak, {}),
    "leak-free-cluster": (poke_leak_free_cluster, {}),
    "refcount-zero": (poke_refcount_zero, {}),
    "refcount-low": (poke_refcount_low, {"snapshot": True}),
    "clear-copied-l2": (poke_clear_copied_l2, {}),
    "set-copied-shared": (poke_set_copied_shared, {"snapshot": True}),
    "clear-copied-l1": (poke_clear_copied_l1, {}),
    "l2-past-eof": (poke_l2_past_eof, {}),
    "l2-unaligned": (poke_l2_unaligned, {}),
    "prealloc-zero-unaligned": (poke_prealloc_zero_unaligned, {}),
    "l1-unaligned": (poke_l1_unaligned, {"opts": "cluster_size=4096", "size": 16 * MB}),
    "refblock-in-l1": (poke_refblock_in_l1, {}),
    "refblock-outside": (poke_refblock_outside, {"opts": "cluster_size=512", "size": 4 * MB}),
    "reserved-l1": (poke_reserved_l1, {}),
    "reserved-l2": (poke_reserved_l2, {}),
    "reserved-reftable": (poke_reserved_reftable, {}),
    "compressed-copied": (poke_compressed_copied, {}),
    "snapshot-l1-unaligned": (poke_snapshot_l1_unaligned, {"snapshot": True}),
    "snapshot-incomplete": (poke_snapshot_incomplete, {"snapshot": True}),
    "dirty-leak": (poke_dirty_leak, {"opts": "lazy_refcounts=on,cluster_size=4096",
                                     "size": 16 * MB}),
    "corrupt-bit": (poke_corrupt_bit, {}),
    "refcount-zero-rb1": (poke_refcount_zero, {"opts": "refcount_bits=1,cluster_size=512",
                                               "size": 4 * MB}),
    "leak-rb64-v2": (poke_leak, {"opts": "compat=0.10,cluster_size=4096", "size": 8 * MB}),
    "refcount-zero-rb8-2M": (poke_refcount_zero, {"opts": "refcount_bits=8,"
                                                  "cluster_size=2097152", "size": 128 * MB}),
    "xl2-bitmap": (poke_xl2_bitmap, {"opts": "extended_l2=on,cluster_size=65536"}),
    "xl2-unalloc-bitmap": (poke_unalloc_bitmap, {"opts": "extended_l2=on,cluster_size=65536"}),
    "refblock-unaligned": (poke_refblock_unaligned, {"opts": "cluster_size=4096",
                                                     "size": 8 * MB}),
    "duplicate-reference": (poke_duplicate_reference, {}),
    "duplicate-reference-rb1-overflow": (poke_duplicate_reference,
                                         {"opts": "refcount_bits=1,cluster_size=4096",
                                          "size": 8 * MB}),
    "reftable-entry-gone-512": (poke_reftable_entry_gone,
                                {"opts": "cluster_size=512", "size": 32 * MB, "more": 12 * MB}),
    "too-many-snapshots": (poke_too_many_snapshots, {"snapshot": True}),
    "snapshot-extra-too-large": (poke_snapshot_extra_too_large, {"snapshot": True}),
    "bitmap-leak": (poke_bitmap_leak, {"opts": "cluster_size=4096", "size": 64 * MB,
                                       "bitmaps": True}),
    "bitmap-table-reserved": (poke_bitmap_table_reserved,
                              {"opts": "cluster_size=4096", "size": 64 * MB, "bitmaps": True}),
    "bitmap-shared": (poke_bitmap_shared, {"opts": "cluster_size=4096", "size": 64 * MB,
                                           "bitmaps": True}),
}

# the poke itself changes what the guest reads: a data cluster becomes a zero cluster
DATA_CHANGED = {"prealloc-zero-unaligned"}

# qemu-img -r opens the image read-write, which rewrites persistent bitmaps when it
# closes (a side effect of opening, not of the check): the images after repair differ
BITMAP_REWRITE = {"bitmap-leak", "bitmap-shared"}


def _same_outcome(a, b):
    a = dict(a or {}, filename="X")
    b = dict(b or {}, filename="X")
    return a == b


@pytest.mark.parametrize("case", sorted(CORRUPT))
def test_corrupted_images(tmp_path, case):
    poke, kw = CORRUPT[case]
    d = str(tmp_path)
    path = _base(d, **kw)
    before = raw_sha(path)
    poke(Img(path))
    # without repair: the same dict, status and messages
    expect, qrc, qerr = qemu_check(path)
    got, rc, err = our_check(path)
    assert (got, rc) == (expect, qrc)
    assert err == qerr
    assert qrc in (1, 2, 3)
    for mode in ("leaks", "all"):
        ours = os.path.join(d, f"ours-{mode}.qcow2")
        theirs = os.path.join(d, f"theirs-{mode}.qcow2")
        shutil.copy(path, ours)
        shutil.copy(path, theirs)
        expect, qrc, qerr = qemu_check(theirs, "-r", mode)
        got, rc, err = our_check(ours, "-r", mode)
        assert _same_outcome(got, expect), (mode, got, expect)
        assert rc == qrc, mode
        if case not in BITMAP_REWRITE:
            assert err == qerr, mode
        if qrc == 1 or case in BITMAP_REWRITE:
            continue
        # the repaired images check the same with qemu-img, and read the same
        after_q, arc_q, _ = qemu_check(theirs)
        after_o, arc_o, _ = qemu_check(ours)
        assert _same_outcome(after_o, after_q) and arc_o == arc_q, mode
        data = raw_sha(ours)
        assert data == raw_sha(theirs), mode
        if arc_q == 0:                  # repaired: clean, and the guest data as it was
            assert arc_o == 0
            assert data == before or case in DATA_CHANGED, mode


def test_repair_all_is_clean_and_keeps_data(tmp_path):
    """A dirty image with leaks and a zero refcount: -r all leaves qemu-img check clean,
    the dirty bit cleared, and the guest data unchanged."""
    d = str(tmp_path)
    path = _base(d, opts="lazy_refcounts=on,cluster_size=4096", size=16 * MB, snapshot=True)
    before = raw_sha(path)
    poke_dirty_leak(Img(path))
    res = ck.check(path, repair="all")
    assert res["check-errors"] == 0 and "corruptions" not in res and "leaks" not in res
    assert res.get("leaks-fixed", 0) >= 1 and res.get("corruptions-fixed", 0) >= 1
    assert qemu_check(path)[1] == 0
    assert not Img(path).incompat & 1
    assert raw_sha(path) == before
    with qcow2.open(path, "r+") as img:
        img.pwrite(b"x" * 4096, 0)
    assert qemu_check(path)[1] == 0


def test_rebuild_if_dirty_after_killed_qemu_io(tmp_path):
    d = str(tmp_path)
    path = os.path.join(d, "lazy.qcow2")
    qimg("create", "-q", "-f", "qcow2", "-o", "lazy_refcounts=on,cluster_size=65536", path,
         64 * MB)
    qio(path, "write -P 0x11 0 1M")
    p = subprocess.run(["qemu-io", "-c", "write -P 0x22 1M 3M", "-c", "write -P 0x23 8M 64k",
                        "-c", "sigraise 9", path], capture_output=True)
    assert p.returncode == -signal.SIGKILL
    assert Img(path).incompat & 1                       # left dirty
    d0, rc0, _ = qemu_check(path)
    assert rc0 == 2 and d0["corruptions"] > 0
    theirs = os.path.join(d, "theirs.qcow2")
    shutil.copy(path, theirs)
    qemu_check(theirs, "-r", "all")
    # opening a dirty image read-write rebuilds its refcounts first
    auto = os.path.join(d, "auto.qcow2")
    shutil.copy(path, auto)
    with qcow2.open(auto, "r+") as img:
        assert img.pread(4096, 1 * MB) == b"\x22" * 4096
    assert not Img(auto).incompat & 1
    assert qemu_check(auto)[1] == 0
    assert raw_sha(auto) == raw_sha(theirs)
    assert checker.rebuild_if_dirty(path) is True
    assert checker.rebuild_if_dirty(path) is False          # clean now: nothing to do
    d1, rc1, _ = qemu_check(path)
    assert rc1 == 0 and d1["check-errors"] == 0
    assert not Img(path).incompat & 1
    assert raw_sha(path) == raw_sha(theirs)
    with qcow2.open(path) as img:
        assert img.pread(4096, 1 * MB) == b"\x22" * 4096
        assert img.pread(4096, 8 * MB) == b"\x23" * 4096
    with qcow2.open(path, "r+") as img:
        img.pwrite(b"\x24" * 4096, 0)
    assert qemu_check(path)[1] == 0


def test_messages_go_to_log(tmp_path):
    path = _base(str(tmp_path))
    img = Img(path)
    c = img.data_cluster(3)
    img.set_ref(c, 2)                   # a leak, and a COPIED flag refcount 2 forbids
    lines = []
    res = ck.check(path, log=lines.append)
    assert res["leaks"] == 1 and res["corruptions"] == 1 and cli_check.exit_status(res) == 2
    assert lines[0] == f"Leaked cluster {c} refcount=2 reference=1"
    assert lines[1].startswith("ERROR OFLAG_COPIED data cluster: l2_entry=")
    img.set_ref(c, 1)
    poke_leak_free_cluster(img)         # a leak alone
    end = os.path.getsize(path) // img.cs - 1
    lines = []
    res = ck.check(path, log=lines.append)
    assert res["leaks"] == 1 and "corruptions" not in res and cli_check.exit_status(res) == 3
    assert lines == [f"Leaked cluster {end} refcount=1 reference=0"]
    assert cli_check.format_human(res).startswith(
        "\n1 leaked clusters were found on the image.\n"
        "This means waste of disk space, but no harm to data.\n")
    res = ck.check(path, repair="leaks", log=lines.append)
    assert res["leaks-fixed"] == 1 and cli_check.exit_status(res) == 0


def test_library_failures_and_flags(tmp_path):
    """-r leaks cannot fix a referenced cluster with refcount 0 (it needs a rebuild):
    CheckFailedError, status 1; -r all rebuilds and clears the corrupt bit."""
    path = _base(str(tmp_path))
    img = Img(path)
    img.w64(72, img.incompat | 2)                   # corrupt bit: r+ refuses the image
    poke_refcount_zero(img)
    lines = []
    with pytest.raises(checker.CheckFailedError, match="Input/output error") as ei:
        ck.check(path, repair="leaks", log=lines.append)
    assert ei.value.exit_code == 1
    assert lines[-1] == "ERROR need to rebuild refcount structures"
    with pytest.raises(qcow2.Qcow2Error):
        qcow2.open(path, "r+")
    lines = []
    res = ck.check(path, repair="all", log=lines.append)
    assert "Rebuilding refcount structure" in lines
    assert res["corruptions-fixed"] >= 1 and cli_check.exit_status(res) == 0
    assert not Img(path).incompat & 3
    assert qemu_check(path)[1] == 0
    with qcow2.open(path, "r+") as w:
        w.pwrite(b"\x99" * 512, 0)
    assert qemu_check(path)[1] == 0
    # an unknown version is not qcow2 to the prober: "does not support checks", as qemu-img
    img.w32(4, 1)
    with pytest.raises(checker.CheckNotSupportedError):
        ck.check(path)


def test_luks_image_without_the_key(tmp_path):
    """The LUKS header area is counted; no key is needed (qemu-img needs one to open)."""
    path = str(tmp_path / "e.qcow2")
    secret = ["--object", "secret,id=s0,data=pw"]
    r = run_pbkdf(["qemu-img", "create", "-q", "-f", "qcow2", *secret, "-o",
                   "encrypt.format=luks,encrypt.key-secret=s0,encrypt.iter-time=10", path,
                   16 * MB])
    assert r.returncode == 0, r.stderr
    opts = f"driver=qcow2,file.filename={path},encrypt.key-secret=s0"
    r = run("qemu-io", *secret, "--image-opts", opts, "-c", "write -P 1 0 1M")
    assert r.returncode == 0, r.stderr
    q = run("qemu-img", "check", "--output=json", *secret, "--image-opts", opts)
    assert q.returncode == 0, q.stderr
    assert ck.check(path) == dict(json.loads(q.stdout), filename=path)
    Img(path).set_ref(0, 2)
    q = run("qemu-img", "check", "--output=json", *secret, "--image-opts", opts)
    res = ck.check(path)
    assert res == dict(json.loads(q.stdout), filename=path) and res["leaks"] == 1


def test_check_and_dirty_rebuild_on_any_backend(tmp_path):
    """The check reads and writes through the Backend interface: an image held in
    memory is checked, repaired and rebuilt exactly as the same image in a file."""
    from qcow2.backends import MemoryBackend
    from qcow2.checker.run import check_file
    from qcow2.checker.state import CheckedFile
    path = _base(str(tmp_path))
    img = Img(path)
    img.set_ref(img.data_cluster(3), 2)         # a leak (and COPIED then looks wrong)
    with open(path, "rb") as f:
        be = MemoryBackend(f.read())
    want_lines: list = []
    want = ck.check(path, repair="all", log=want_lines.append)
    lines: list = []
    got = check_file(CheckedFile(be), checker.FIX_LEAKS | checker.FIX_ERRORS, lines.append)
    assert got.as_dict(path, "qcow2") == want and lines == want_lines
    assert want["leaks-fixed"] == 1
    with open(path, "rb") as f:
        assert be.getvalue() == f.read()
    # a dirty image (lazy refcounts, then a kill): rebuilt in memory as on disk
    lazy = os.path.join(str(tmp_path), "lazy.qcow2")
    qimg("create", "-q", "-f", "qcow2", "-o", "lazy_refcounts=on", lazy, 64 * MB)
    p = subprocess.run(["qemu-io", "-c", "write -P 0x22 1M 3M", "-c", "sigraise 9", lazy],
                       capture_output=True)
    assert p.returncode == -signal.SIGKILL and Img(lazy).incompat & 1
    with open(lazy, "rb") as f:
        be = MemoryBackend(f.read())
    assert checker.needs_rebuild(be)
    assert checker.rebuild_if_dirty(be) is True and checker.rebuild_if_dirty(lazy) is True
    assert not checker.needs_rebuild(be) and checker.rebuild_if_dirty(be) is False
    with open(lazy, "rb") as f:
        assert be.getvalue() == f.read()
