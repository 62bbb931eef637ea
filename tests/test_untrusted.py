"""Untrusted mode (issue 6): crafted images built from qemu-img-made ones, one field or
entry poked at a time, each refused with the exact exception type and offset; the
OpenStack cases; the CLI under an address-space limit; a bounded fuzzer."""

from __future__ import annotations

import os
import resource
import shutil
import struct
import subprocess
import sys
import zlib
from pathlib import Path

import pytest
from helpers import (CS, COPIED, l1_off, l2_off, poke, poke64, qemu_img,  # noqa: F401
                      qemu_io, reftable_off, round_up, u32, u64)

pytestmark = pytest.mark.skipif(not (shutil.which("qemu-img") and shutil.which("qemu-io")),
                                reason="qemu-img/qemu-io not installed")

ROOT = Path(__file__).resolve().parent.parent


def move_l1(p, n):
    """Give the image an L1 table of ``n`` entries at the end of the file."""
    old, cnt = l1_off(p), u32(p, 0x24)
    with open(p, "rb") as f:
        f.seek(old)
        entries = f.read(cnt * 8)
    new = round_up(p.stat().st_size)
    os.truncate(p, round_up(new + n * 8))
    poke(p, new, entries)
    poke64(p, 0x28, new)
    poke(p, 0x24, struct.pack(">I", n))
    rb = u64(p, reftable_off(p))                 # refcount 1 for the new clusters
    first, last = new // CS, (new + n * 8 - 1) // CS
    assert last < CS // 2
    poke(p, rb + 2 * first, b"\0\1" * (last - first + 1))


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    """Small qemu-img-made images the cases copy and poke."""
    d = tmp_path_factory.mktemp("untrusted-base")
    imgs = {}
    p = d / "plain.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", p, "64M")
    qemu_io(p, "write -P 1 0 256k", "write -P 2 32M 64k")
    imgs["plain"] = p
    p = d / "snap.qcow2"
    shutil.copy(imgs["plain"], p)
    qemu_img("snapshot", "-c", "s1", p)
    qemu_io(p, "write -P 3 0 64k")
    imgs["snap"] = p
    p = d / "v2.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", "-o", "compat=0.10", p, "64M")
    qemu_io(p, "write -P 1 0 256k")
    imgs["v2"] = p
    p = d / "comp.qcow2"
    qemu_img("convert", "-c", "-O", "qcow2", imgs["plain"], p)
    imgs["comp"] = p
    p = d / "comp16.qcow2"              # 1 MiB compressed: big reads split the decode
    q = d / "src16.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", q, "8M")
    qemu_io(q, "write -P 5 0 1M", "write -P 6 2M 512k")
    qemu_img("convert", "-c", "-O", "qcow2", q, p)
    imgs["comp16"] = p
    p = d / "ext.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", "-o", "extended_l2=on", p, "64M")
    qemu_io(p, "write -P 1 0 128k", "write -z 256k 64k")
    imgs["ext"] = p
    p = d / "bitmap.qcow2"
    shutil.copy(imgs["plain"], p)
    qemu_img("bitmap", "--add", p, "b0")
    qemu_io(p, "write -P 4 1M 64k")
    imgs["bitmap"] = p
    return imgs


@pytest.fixture
def img(base, tmp_path):
    def copy(name):
        dst = tmp_path / f"{name}.qcow2"
        shutil.copy(base[name], dst)
        return dst
    return copy


def refused(path, exc, offset, **kw):
    import qcow2
    with pytest.raises(exc) as ei:
        with qcow2.open(path, untrusted=True, **kw):
            pass
    assert type(ei.value) is exc, repr(ei.value)
    assert getattr(ei.value, "offset", None) == offset, (str(ei.value), offset)
    return ei.value


def test_clean_images_read_as_qemu_does(base, tmp_path):
    import qcow2
    for name, p in base.items():
        raw = tmp_path / f"{name}.raw"
        qemu_img("convert", "-O", "raw", p, raw)
        with qcow2.open(p, untrusted=True) as im:
            assert im.pread(im.size, 0) == raw.read_bytes(), name


# -- L1 entries ------------------------------------------------------------------------

def test_l1_entry_unaligned(img):
    from qcow2 import CorruptImageError
    p = img("plain")
    poke64(p, l1_off(p), COPIED | (l2_off(p) + 0x200))
    refused(p, CorruptImageError, l1_off(p))


def test_l1_entry_past_eof(img):
    from qcow2 import CorruptImageError
    p = img("plain")
    poke64(p, l1_off(p), COPIED | round_up(p.stat().st_size) + 16 * CS)
    refused(p, CorruptImageError, l1_off(p))


def test_l1_entry_reserved_bits(img):
    from qcow2 import CorruptImageError
    p = img("plain")
    poke64(p, l1_off(p), u64(p, l1_off(p)) | 2)
    refused(p, CorruptImageError, l1_off(p))


# -- L2 entries ------------------------------------------------------------------------

def test_l2_entry_unaligned(img):
    from qcow2 import CorruptImageError
    p = img("plain")
    l2 = l2_off(p)
    poke64(p, l2, u64(p, l2) + 0x200)
    refused(p, CorruptImageError, l2)


def test_l2_entry_past_eof(img):
    from qcow2 import CorruptImageError
    p = img("plain")
    l2 = l2_off(p)
    poke64(p, l2 + 8, COPIED | round_up(p.stat().st_size) + 64 * CS)
    refused(p, CorruptImageError, l2 + 8)


def test_l2_entry_reserved_bits(img):
    from qcow2 import CorruptImageError
    p = img("plain")
    l2 = l2_off(p)
    poke64(p, l2, u64(p, l2) | (1 << 57))
    refused(p, CorruptImageError, l2)


def test_l2_zero_flag_in_v2(img):
    from qcow2 import CorruptImageError
    p = img("v2")
    l2 = l2_off(p)
    poke64(p, l2 + 16, u64(p, l2 + 16) | 1)
    refused(p, CorruptImageError, l2 + 16)


def test_l2_double_reference(img):
    from qcow2 import UnsafeImageError
    p = img("plain")
    l2 = l2_off(p)
    poke64(p, l2 + 8, u64(p, l2))
    refused(p, UnsafeImageError, l2 + 8)


def test_l2_double_reference_far_apart(img):
    from qcow2 import UnsafeImageError
    p = img("plain")
    a = l2_off(p)
    poke64(p, a + 8 * 700, u64(p, a + 8 * 512))     # guest 32M's cluster, again at ~43M
    refused(p, UnsafeImageError, a + 8 * 700)


def test_double_reference_across_l2_tables(tmp_path):
    from qcow2 import UnsafeImageError
    p = tmp_path / "two.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", p, "1G")
    qemu_io(p, "write -P 1 0 64k", "write -P 2 600M 64k")
    a, b = l2_off(p, 0), l2_off(p, 1)
    k = (600 << 20) % (512 << 20) // CS
    poke64(p, b + 8 * k, u64(p, a))
    refused(p, UnsafeImageError, b + 8 * k)


def test_snapshot_shared_clusters_are_fine(img):
    import qcow2
    p = img("snap")
    with qcow2.open(p, untrusted=True, snapshot="s1") as im:
        assert im.pread(4, 0) == b"\x01" * 4
    with qcow2.open(p, untrusted=True) as im:
        assert im.pread(4, 0) == b"\x03" * 4


def test_l2_points_at_l1_table(img):
    from qcow2 import UnsafeImageError
    p = img("plain")
    l2 = l2_off(p)
    poke64(p, l2 + 8, COPIED | (l1_off(p) & ~(CS - 1)))
    e = refused(p, UnsafeImageError, l2 + 8)
    assert "L1 table" in str(e)


def test_l2_points_at_refcount_block(img):
    from qcow2 import UnsafeImageError
    p = img("plain")
    l2 = l2_off(p)
    poke64(p, l2 + 8, COPIED | u64(p, reftable_off(p)))
    e = refused(p, UnsafeImageError, l2 + 8)
    assert "refcount block" in str(e)


def test_l1_points_at_refcount_table(img):
    from qcow2 import UnsafeImageError
    p = img("plain")
    poke64(p, l1_off(p), COPIED | reftable_off(p))
    refused(p, UnsafeImageError, l1_off(p))


def test_l1_entries_share_an_l2_table(img):
    from qcow2 import UnsafeImageError
    p = img("plain")
    move_l1(p, 2)
    l1 = l1_off(p)
    poke64(p, l1 + 8, u64(p, l1))
    refused(p, UnsafeImageError, l1 + 8)


def test_compressed_data_in_the_l1_table(img):
    from qcow2 import UnsafeImageError
    p = img("comp")
    l2 = l2_off(p)
    shift = 62 - (16 - 8)
    poke64(p, l2, (1 << 62) | (1 << shift) | l1_off(p))
    e = refused(p, UnsafeImageError, l2)
    assert "L1 table" in str(e)


def test_compressed_descriptor_overruns_file(img):
    from qcow2 import CorruptImageError
    p = img("comp")
    l2 = l2_off(p)
    e = u64(p, l2)
    assert e & (1 << 62)
    shift = 62 - (16 - 8)
    size = p.stat().st_size
    coff = (size - 512) & ~511
    poke64(p, l2, (1 << 62) | (3 << shift) | coff)
    refused(p, CorruptImageError, l2)


def test_extended_l2_alloc_and_zero(img):
    from qcow2 import CorruptImageError
    p = img("ext")
    l2 = l2_off(p)
    bm = u64(p, l2 + 8)
    assert bm & 1
    poke64(p, l2 + 8, bm | (1 << 32))
    refused(p, CorruptImageError, l2)


# -- refcounts, snapshots, sizes ----------------------------------------------------------

def test_refcount_block_overlaps_the_l1_table(img):
    from qcow2 import UnsafeImageError
    p = img("plain")
    rt = reftable_off(p)
    poke64(p, rt + 8, l1_off(p) & ~(CS - 1))
    e = refused(p, UnsafeImageError, rt + 8)          # names the refcount table entry
    assert "L1 table" in str(e)


def test_refcount_table_entry_past_eof(img):
    from qcow2 import CorruptImageError
    p = img("plain")
    rt = reftable_off(p)
    poke64(p, rt + 8, round_up(p.stat().st_size) + 1024 * CS)
    refused(p, CorruptImageError, rt + 8)


def test_refcount_table_entry_wrapping_past_eof(img):
    from qcow2 import CorruptImageError
    p = img("plain")
    rt = reftable_off(p)
    poke64(p, rt + 8, 0xFFFFFFFFFFFF0000)        # + cluster size wraps to 0
    refused(p, CorruptImageError, rt + 8)


def test_data_cluster_with_refcount_zero(img):
    import qcow2
    from qcow2 import CorruptImageError
    p = img("plain")
    c = (u64(p, l2_off(p)) & 0x00FFFFFFFFFFFE00) // CS
    rb = u64(p, reftable_off(p))
    poke(p, rb + 2 * c, b"\0\0")
    refused(p, CorruptImageError, rb + 2 * c)
    poke64(p, 0x48, u64(p, 0x48) | 1)                # dirty: refcounts may lag
    with qcow2.open(p, untrusted=True) as im:
        assert im.pread(4, 0) == b"\x01" * 4


def test_checks_on_a_sparse_huge_file(img):
    """Few references in a huge file: the sort-based path instead of a cluster map."""
    from qcow2 import CorruptImageError, UnsafeImageError
    import qcow2
    p = img("snap")
    os.truncate(p, 1 << 40)
    with qcow2.open(p, untrusted=True) as im:
        assert im.pread(4, 0) == b"\x03" * 4
    l2 = l2_off(p)
    c = (u64(p, l2 + 8) & 0x00FFFFFFFFFFFE00) // CS
    rb = u64(p, reftable_off(p))
    poke(p, rb + 2 * c, b"\0\0")
    refused(p, CorruptImageError, rb + 2 * c)
    poke64(p, l2 + 16, u64(p, l2 + 8))
    refused(p, UnsafeImageError, l2 + 16)


def test_snapshot_l1_past_eof(img):
    from qcow2 import CorruptImageError
    p = img("snap")
    st = u64(p, 0x40)
    poke64(p, st, round_up(p.stat().st_size) + 64 * CS)
    refused(p, CorruptImageError, st)


def big_snapshot_table(p, n, name_size=1000):
    """Replace the snapshot table with ``n`` entries (no L1 table, a long name each) at
    the end of the file, refcounted, so the image stays clean: about n KiB of table."""
    entry = struct.pack(">QIHHIIQII", 0, 0, 4, name_size, 0, 0, 0, 0, 24) + bytes(24)
    table = b"".join(entry + b"%04d" % (i % 10000) + b"n" * name_size +
                     bytes(-(len(entry) + 4 + name_size) % 8) for i in range(n))
    new = round_up(p.stat().st_size)
    os.truncate(p, round_up(new + len(table)))
    poke(p, new, table)
    poke64(p, 0x40, new)
    poke(p, 0x3C, struct.pack(">I", n))
    rb = u64(p, reftable_off(p))
    first, last = new // CS, (new + len(table) - 1) // CS
    assert last < CS // 2
    poke(p, rb + 2 * first, b"\0\1" * (last - first + 1))
    return new, len(table)


def test_snapshot_table_charged_before_it_is_read(img, monkeypatch):
    """A snapshot table bigger than max_metadata is refused after reading at most the
    budget of it (the header's count and the entries' sizes are not trusted)."""
    import qcow2
    from qcow2 import UnsafeImageError
    from qcow2.backends import FileBackend
    p = img("plain")
    off, size = big_snapshot_table(p, 4000)            # ~4 MiB of snapshot table
    with qcow2.open(p, untrusted=True) as im:         # the default 64 MiB: fine
        assert len(im.snapshots_list) == 4000 and im.pread(4, 0) == b"\x01" * 4
    read = []
    real = FileBackend.readinto

    def counting(self, buf, offset):
        n = real(self, buf, offset)
        if offset >= off:
            read.append(n)
        return n

    monkeypatch.setattr(FileBackend, "readinto", counting)
    cap = 1 << 20
    e = refused(p, UnsafeImageError, 0x40, max_metadata=cap)
    assert "snapshot table" in str(e) and str(cap) in str(e)
    assert 0 < sum(read) <= cap, sum(read)
    # the snapshot table counts together with the other metadata
    with pytest.raises(UnsafeImageError, match="metadata"):
        qcow2.open(p, untrusted=True, max_metadata=size + 4096)


def test_huge_virtual_size(img):
    from qcow2 import UnsafeImageError
    p = img("plain")
    size = 32 << 40
    poke64(p, 0x18, size)
    move_l1(p, size // (CS * CS // 8))
    e = refused(p, UnsafeImageError, 0x18)
    assert str(32 << 40) in str(e)
    import qcow2
    with qcow2.open(p, untrusted=True, max_virtual_size=64 << 40) as im:
        assert im.size == size


def test_huge_l1_over_metadata_cap(img):
    import qcow2
    from qcow2 import UnsafeImageError
    p = img("plain")
    n = 4 << 20                          # 32 MiB of L1: QEMU's cap, allowed by QEMU
    move_l1(p, n)
    with pytest.raises(UnsafeImageError) as ei:
        qcow2.open(p, untrusted=True, limits=qcow2.Limits(max_metadata=16 << 20))
    assert str(16 << 20) in str(ei.value)
    with qcow2.open(p, untrusted=True) as im:      # default 64 MiB: fits
        assert im.pread(4, 0) == b"\x01" * 4


def test_scan_cpu_budget(img):
    import qcow2
    from qcow2 import UnsafeImageError
    with pytest.raises(UnsafeImageError, match="CPU"):
        qcow2.open(img("snap"), untrusted=True, max_scan_cpu=0)


def test_corrupt_bit_refuses_untrusted_reads_only(img):
    import qcow2
    from qcow2 import UnsafeImageError
    p = img("plain")
    poke64(p, 0x48, u64(p, 0x48) | 2)
    with qcow2.open(p) as im:
        assert im.pread(4, 0) == b"\x01" * 4
    with qcow2.open(p, untrusted=True) as im:
        im.info()
        with pytest.raises(UnsafeImageError, match="corrupt") as ei:
            im.pread(4, 0)
        assert ei.value.offset == 0x48


def test_dirty_bit_reads_and_no_repair(img):
    import qcow2
    from qcow2 import UnsafeImageError
    p = img("plain")
    poke64(p, 0x48, u64(p, 0x48) | 1)
    before = p.read_bytes()
    with qcow2.open(p, untrusted=True) as im:
        assert im.pread(4, 0) == b"\x01" * 4
    with pytest.raises(UnsafeImageError):
        qcow2.open(p, "r+", untrusted=True)
    assert p.read_bytes() == before


def test_decompression_never_exceeds_a_cluster(img):
    """A stream that inflates to four clusters yields one (QEMU's rule), in every mode."""
    import qcow2
    p = img("comp")
    l2 = l2_off(p)
    e = u64(p, l2)
    shift = 62 - (16 - 8)
    coff = e & ((1 << shift) - 1)
    nsec = ((e >> shift) & 0xFF) + 1
    co = zlib.compressobj(9, zlib.DEFLATED, -12)
    bomb = co.compress(b"\xaa" * (4 * CS)) + co.flush()
    assert len(bomb) <= nsec * 512 - (coff & 511)
    poke(p, coff, bomb)
    for untrusted in (False, True):
        with qcow2.open(p, untrusted=untrusted) as im:
            assert im.pread(CS, 0) == b"\xaa" * CS


# -- the OpenStack cases ------------------------------------------------------------------

def test_backing_file_etc_passwd(tmp_path):
    import qcow2
    from qcow2 import UnsafeImageError
    p = tmp_path / "b.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", "-b", "/etc/passwd", "-F", "raw", p, "1M")
    with pytest.raises(UnsafeImageError, match="backing"):
        qcow2.open(p, untrusted=True)


def test_data_file(tmp_path):
    import qcow2
    from qcow2 import UnsafeImageError
    p = tmp_path / "d.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", "-o", f"data_file={tmp_path / 'd.raw'}", p, "1M")
    with pytest.raises(UnsafeImageError, match="data file"):
        qcow2.open(p, untrusted=True)


def test_json_data_file_name(tmp_path):
    import qcow2
    from qcow2 import UnsafeImageError
    p = tmp_path / "j.qcow2"
    # (qemu-img creates the data file relative to its working directory)
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", "-o", "data_file=jsonXaaaa.raw",
                    str(p), "1M"], check=True, capture_output=True, cwd=tmp_path)
    raw = p.read_bytes()
    i = raw.index(b"jsonXaaaa.raw")
    poke(p, i, b"json:")
    for untrusted in (False, True):
        with pytest.raises(UnsafeImageError, match="json:"):
            qcow2.open(p, untrusted=untrusted)


def test_image_is_its_own_backing_file(img):
    import qcow2
    from qcow2 import UnsafeImageError
    p = img("plain")
    qemu_img("rebase", "-u", "-f", "qcow2", "-b", p.name, "-F", "qcow2", p)
    with pytest.raises(UnsafeImageError):
        qcow2.open(p, untrusted=True)
    with pytest.raises(UnsafeImageError, match="loop"):
        qcow2.open(p)


def test_iso_qcow2_polyglot(img):
    import qcow2
    from qcow2 import UnsafeImageError
    p = img("plain")
    poke(p, 0x8001, b"CD001")
    with pytest.raises(UnsafeImageError, match="iso"):
        qcow2.open(p, untrusted=True)
    with qcow2.open(p, untrusted=True, format="qcow2") as im:   # the caller said qcow2
        assert im.pread(4, 0) == b"\x01" * 4


def test_iso_is_raw(tmp_path):
    import qcow2
    p = tmp_path / "cd.iso"
    data = bytearray(0x10000)
    data[0x8001:0x8006] = b"CD001"
    p.write_bytes(bytes(data))
    with qcow2.open(p, untrusted=True) as im:
        assert im.format == "raw" and im.pread(5, 0x8001) == b"CD001"


def test_other_formats_named_as_raw(tmp_path):
    import qcow2
    from qcow2 import UnsafeImageError
    for magic, name in ((b"KDMV", "vmdk"), (b"QFI\xfb\x00\x00\x00\x01", "qcow"),
                        (b"vhdxfile", "vhdx")):
        p = tmp_path / f"x.{name}"
        p.write_bytes(magic + bytes(4096))
        with pytest.raises(UnsafeImageError, match=f"a {name} image named as raw"):
            qcow2.open(p, untrusted=True)


def test_qcow2_named_as_raw(img):
    import qcow2
    from qcow2 import UnsafeImageError
    p = img("plain")
    with pytest.raises(UnsafeImageError, match="a qcow2 image named as raw"):
        qcow2.open(p, untrusted=True, format="raw")
    with qcow2.open(p, format="raw") as im:                    # trusted: the caller knows
        assert im.format == "raw"


def test_convert_max_output(img, tmp_path):
    import qcow2
    from qcow2 import UnsafeImageError
    with pytest.raises(UnsafeImageError, match="max_output"):
        qcow2.convert(img("plain"), tmp_path / "o.raw", untrusted=True, max_output=1 << 20)
    assert not (tmp_path / "o.raw").exists()


# -- the CLI under a 1 GiB address-space limit ------------------------------------------------

def _limit_as():
    resource.setrlimit(resource.RLIMIT_AS, (1 << 30, 1 << 30))


def _cli(*args):
    # the CLI must run the very package under test (the installed one in CI)
    import qcow2
    pkg_root = os.path.dirname(os.path.dirname(qcow2.__file__))
    env = dict(os.environ, PYTHONPATH=pkg_root + os.pathsep + os.environ.get("PYTHONPATH", ""))
    env.pop("QCOW2_DEBUG", None)
    return subprocess.run([sys.executable, "-m", "qcow2", *map(str, args)], env=env,
                          capture_output=True, text=True, preexec_fn=_limit_as, timeout=60)


def test_cli_refusals_one_line(img, tmp_path):
    hostile = []
    p = img("plain")
    poke64(p, l2_off(p) + 8, COPIED | (l1_off(p) & ~(CS - 1)))
    hostile.append(p)
    q = tmp_path / "huge.qcow2"
    shutil.copy(img("snap"), q)
    poke64(q, 0x18, 1 << 50)
    move_l1(q, (1 << 50) // (CS * CS // 8))
    hostile.append(q)
    for h in hostile:
        for argv in (["info", "--untrusted", h],
                     ["convert", "--untrusted", "-O", "raw", h, tmp_path / "out.raw"],
                     ["map", "--untrusted", h], ["check", "--untrusted", h],
                     ["measure", "--untrusted", h],
                     ["compare", "--untrusted", h, h]):
            r = _cli(*argv)
            assert r.returncode != 0, (argv, r.stdout)
            assert len(r.stderr.splitlines()) == 1, (argv, r.stderr)
            assert "Traceback" not in r.stderr and "internal error" not in r.stderr, r.stderr
    clean = img("plain")
    for argv in (["info", "--untrusted", clean], ["check", "--untrusted", clean],
                 ["map", "--untrusted", clean], ["measure", "--untrusted", clean],
                 ["compare", "--untrusted", clean, clean]):
        r = _cli(*argv)
        assert r.returncode == 0, (argv, r.stderr)
    r = _cli("check", "--untrusted", "-r", "all", clean)
    assert r.returncode != 0 and len(r.stderr.splitlines()) == 1, r.stderr


# -- a bounded fuzzer ---------------------------------------------------------------------

REGRESSIONS = ROOT / "tests" / "fuzz_regressions"


def exercise(path, deep=False):
    """What the fuzzer and the regression corpus do with an image: an untrusted open,
    info, reads at the start, middle and end, the first extents; then small reads in
    trusted mode (without the backing chain); ``deep`` adds
    ``check(untrusted=True)`` and a sequential read of the whole disk (up to 256 MiB).
    Qcow2Error is the only exception allowed out."""
    import qcow2
    from qcow2 import Qcow2Error
    with qcow2.open(path, untrusted=True) as im:
        im.info()
        for off in (0, im.size // 2, max(0, im.size - CS)):
            im.pread(CS, off)
        for _i, _e in zip(range(200), im.extents(), strict=False):
            pass
    # trusted mode (no other file opened: backing=False) must hold too, including the
    # single-cluster fast path of small reads and reads that straddle clusters
    with qcow2.open(path, backing=False, format="qcow2") as im:
        for off in (0, 4096, im.size // 3, max(0, im.size - 4096)):
            im.pread(4096, off)
            im.pread(1024, max(0, off - 512))
        im.pread(1 << 20, 0)            # big: compressed clusters decoded in two threads
    if deep:
        try:
            qcow2.check(path, untrusted=True)
        except Qcow2Error:
            pass
        with qcow2.open(path, untrusted=True) as im, im.file() as f:
            for _i in range(64):
                if not f.read(4 << 20):
                    break


def save_regression(data: bytes) -> Path:
    """Keep a failing input in tests/fuzz_regressions/ (gzip, named by its hash)."""
    import gzip
    import hashlib
    REGRESSIONS.mkdir(exist_ok=True)
    path = REGRESSIONS / f"fuzz-{hashlib.sha256(data).hexdigest()[:16]}.qcow2.gz"
    with open(path, "wb") as raw, gzip.GzipFile(fileobj=raw, mode="wb", mtime=0) as f:
        f.write(data)
    return path


def fuzz_seeds(base):
    """(bytes, hot regions) of each base image: the fields and tables mutations aim at."""
    seeds = {}
    for name, p in base.items():
        raw = p.read_bytes()
        hot = [(0, 0x200), (l1_off(p), 0x200), (reftable_off(p), 0x200)]
        l2 = l2_off(p)
        if l2:
            hot.append((l2, 0x1000))
        if u32(p, 0x3C):
            hot.append((u64(p, 0x40), 0x100))
        i = raw.find(struct.pack(">I", 0x23852875), 0, CS)      # bitmaps extension
        if i > 0:
            doff = u64(p, i + 8 + 16)
            hot += [(i, 0x20), (doff, 0x40), (u64(p, doff) & ~(CS - 1), 0x200)]
        seeds[name] = (raw, hot)
    return seeds


def mutate(raw, hot, muts) -> bytes:
    data = bytearray(raw)
    for region, at, kind, val in muts:
        start, length = hot[region % len(hot)]
        off = min(start + at % length, len(data) - 8)
        if kind == "byte":
            data[off] = val & 0xFF
        elif kind == "u64":
            data[off:off + 8] = struct.pack(">Q", val)
        elif kind == "bit":
            data[off] ^= 1 << (val % 8)
        else:
            data[off:off + 8] = bytes(8)
    return bytes(data)


def test_fuzz_mutated_images(base, tmp_path):
    """Mutated real images through an untrusted open and reads.  Any other exception
    than a Qcow2Error, or a memory peak over 256 MiB, fails the test and the minimal
    failing input (hypothesis shrinks it, then replays it last) is written to
    tests/fuzz_regressions/ (see the README there; QCOW2_FUZZ_SAVE=0 turns that off).
    QCOW2_FUZZ_EXAMPLES (default 200) and QCOW2_FUZZ_SEED run it longer or elsewhere;
    QCOW2_FUZZ_DEEP=1 also checks each image and reads all of it (about 5x slower)."""
    pytest.importorskip("hypothesis")
    from hypothesis import HealthCheck, given, note, seed, settings, strategies as st
    import tracemalloc

    from qcow2 import Qcow2Error

    seeds = fuzz_seeds(base)
    names = sorted(seeds)
    target = tmp_path / "fuzz.qcow2"
    failing: dict = {}

    mutation = st.tuples(st.integers(0, 10 ** 6), st.integers(0, 10 ** 6),
                         st.sampled_from(["byte", "u64", "bit", "zero"]),
                         st.integers(0, 2 ** 64 - 1))
    fixed_seed = os.environ.get("QCOW2_FUZZ_SEED")
    deep = os.environ.get("QCOW2_FUZZ_DEEP") == "1"

    @settings(max_examples=int(os.environ.get("QCOW2_FUZZ_EXAMPLES", "200")), deadline=None,
              derandomize=fixed_seed is None, suppress_health_check=list(HealthCheck),
              database=None)
    @given(st.sampled_from(names), st.lists(mutation, min_size=1, max_size=4))
    def run(name, muts):
        data = mutate(*seeds[name], muts)
        target.write_bytes(data)
        tracemalloc.start()
        try:
            exercise(target, deep)
        except Qcow2Error:
            pass
        except BaseException:
            failing["data"] = data
            note(f"seed image {name!r}, {len(data)} bytes")
            raise
        finally:
            peak = tracemalloc.get_traced_memory()[1]
            tracemalloc.stop()
        if peak >= 256 << 20:
            failing["data"] = data
            raise AssertionError(f"memory peak {peak} bytes")

    if fixed_seed is not None:
        run = seed(int(fixed_seed))(run)
    try:
        run()
    except BaseException:
        if "data" in failing and os.environ.get("QCOW2_FUZZ_SAVE", "1") != "0":
            path = save_regression(failing["data"])
            print(f"\nfuzzer: minimal failing input saved as {path}", file=sys.stderr)
        raise


def test_info_reports_data_file_that_untrusted_reads_refuse(tmp_path):
    """info --untrusted still names the external data file; reading refuses it."""
    import json as _json

    p = tmp_path / "df.qcow2"
    r = subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", "-o", "data_file=df.data",
                        str(p), "1M"], capture_output=True, text=True, cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    r = _cli("info", "--untrusted", "--output=json", p)
    assert r.returncode == 0, r.stderr
    assert _json.loads(r.stdout)["format-specific"]["data"]["data-file"] == "df.data"
    r = _cli("convert", "--untrusted", "-O", "raw", p, tmp_path / "out.raw")
    assert r.returncode == 1 and "df.data" in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "out.raw").exists()


def test_virtual_size_cap_applies_to_raw_images(tmp_path):
    import qcow2
    from qcow2.errors import UnsafeImageError

    p = tmp_path / "big.raw"
    with open(p, "wb") as f:
        f.truncate(2 << 40)                         # 2 TiB sparse raw file
    with pytest.raises(UnsafeImageError, match="exceeds the limit"):
        qcow2.open(p, format="raw", untrusted=True, max_virtual_size=1 << 40)
    with qcow2.open(p, format="raw", untrusted=True) as img:   # default cap: 16 TiB
        assert img.size == 2 << 40
    with qcow2.open(p, format="raw", max_virtual_size=1 << 40) as img:  # trusted: no cap
        assert img.size == 2 << 40
