"""Untrusted mode and persistent dirty bitmaps: the bitmap directory and every bitmap
table are scanned before the first read (QEMU's qcow2-bitmap.c rules), counted in the
metadata budget, and take part in the overlap and metadata-as-data checks.  Images are
made by ``qemu-img bitmap --add`` and poked one field at a time; each refusal is checked
for its exact exception type and offset."""

from __future__ import annotations

import shutil
import struct
import subprocess

import pytest

from test_untrusted import (COPIED, CS, l1_off, l2_off, poke, poke64, qemu_img, qemu_io,
                            refused, reftable_off, round_up, u32, u64)

pytestmark = pytest.mark.skipif(not (shutil.which("qemu-img") and shutil.which("qemu-io")),
                                reason="qemu-img/qemu-io not installed")

EXT_BITMAPS = 0x23852875


def bitmap_ext(p):
    """File offset of the bitmaps extension's data (nb_bitmaps, reserved, size, offset)."""
    with open(p, "rb") as f:
        head = f.read(CS)
    off = u32(p, 0x64)                       # header_length
    while off + 8 <= len(head):
        magic, length = struct.unpack_from(">II", head, off)
        if magic == EXT_BITMAPS:
            return off + 8
        if magic == 0:
            break
        off += 8 + ((length + 7) & ~7)
    raise AssertionError("no bitmaps extension")


def directory(p):
    """[(entry offset, table offset, table size, flags, granularity bits, name)]"""
    ext = bitmap_ext(p)
    nb, dsize, doff = u32(p, ext), u64(p, ext + 8), u64(p, ext + 16)
    with open(p, "rb") as f:
        f.seek(doff)
        d = f.read(dsize)
    out, pos = [], 0
    while pos < dsize:
        toff, tsize, flags, _t, g, ns, ex = struct.unpack_from(">QIIBBHI", d, pos)
        out.append((doff + pos, toff, tsize, flags, g, d[pos + 24 + ex:pos + 24 + ex + ns]))
        pos += (24 + ns + ex + 7) & ~7
    assert len(out) == nb
    return out


@pytest.fixture(scope="module")
def bitmap_base(tmp_path_factory):
    """Two bitmaps with data (written while they were enabled), as qemu-img makes them."""
    d = tmp_path_factory.mktemp("bitmaps")
    p = d / "bm.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", p, "64M")
    qemu_io(p, "write -P 1 0 256k")
    qemu_img("bitmap", "--add", p, "bm0")
    qemu_img("bitmap", "--add", "-g", "512", p, "bm1")
    qemu_io(p, "write -P 2 1M 64k", "write -P 3 40M 64k")
    ents = directory(p)
    assert len(ents) == 2 and all(u64(p, e[1]) & ~0x1FF for e in ents)
    return p


@pytest.fixture
def bimg(bitmap_base, tmp_path):
    dst = tmp_path / "b.qcow2"
    shutil.copy(bitmap_base, dst)
    return dst


def data_cluster(p, entry):
    return u64(p, entry[1]) & 0x00FFFFFFFFFFFE00


def test_clean_bitmap_image_reads_as_qemu_does(bimg, tmp_path):
    import qcow2
    raw = tmp_path / "b.raw"
    qemu_img("convert", "-O", "raw", bimg, raw)
    with qcow2.open(bimg, untrusted=True) as im:
        assert im.pread(im.size, 0) == raw.read_bytes()
        names = [b["name"] for b in im.info()["format-specific"]["data"]["bitmaps"]]
        assert names == ["bm0", "bm1"]
    # an in-use bitmap may carry a table of the wrong size (QEMU does not load it)
    e = directory(bimg)[0]
    poke(bimg, e[0] + 8, struct.pack(">II", 2, e[3] | 1))
    with qcow2.open(bimg, untrusted=True) as im:
        assert im.pread(4, 0) == b"\x01" * 4


# -- the header extension (every mode) -------------------------------------------------------

def test_directory_past_eof_refused_in_every_mode(bimg):
    import qcow2
    from qcow2 import CorruptImageError
    ext = bitmap_ext(bimg)
    poke64(bimg, ext + 16, round_up(bimg.stat().st_size) + 4 * CS)
    refused(bimg, CorruptImageError, ext + 16)
    with pytest.raises(CorruptImageError) as ei:
        qcow2.open(bimg)
    assert ei.value.offset == ext + 16


def test_directory_cut_by_eof_refused_in_every_mode(bimg):
    import qcow2
    from qcow2 import CorruptImageError
    ext = bitmap_ext(bimg)
    dsize, doff = u64(bimg, ext + 8), u64(bimg, ext + 16)
    with open(bimg, "r+b") as f:
        f.truncate(doff + dsize - 8)
    with pytest.raises(CorruptImageError) as ei:
        qcow2.open(bimg)
    assert ei.value.offset == ext + 16


def test_directory_size_zero(bimg):
    import qcow2
    from qcow2 import CorruptImageError
    ext = bitmap_ext(bimg)
    poke64(bimg, ext + 8, 0)
    refused(bimg, CorruptImageError, ext + 8)
    with pytest.raises(CorruptImageError):
        qcow2.open(bimg)


def test_directory_unaligned(bimg):
    from qcow2 import CorruptImageError
    ext = bitmap_ext(bimg)
    poke64(bimg, ext + 16, u64(bimg, ext + 16) + 8)
    refused(bimg, CorruptImageError, ext + 16)


def test_fewer_entries_than_the_extension_says(bimg):
    from qcow2 import CorruptImageError
    ext = bitmap_ext(bimg)
    poke(bimg, ext, struct.pack(">I", 3))
    refused(bimg, CorruptImageError, ext)


def test_more_entries_than_the_extension_says(bimg):
    from qcow2 import CorruptImageError
    ext = bitmap_ext(bimg)
    poke(bimg, ext, struct.pack(">I", 1))
    refused(bimg, CorruptImageError, directory_offsets(bimg, 2)[1])


def directory_offsets(p, n):
    ext = bitmap_ext(p)
    dsize, doff = u64(p, ext + 8), u64(p, ext + 16)
    with open(p, "rb") as f:
        f.seek(doff)
        d = f.read(dsize)
    out, pos = [], 0
    while pos < dsize and len(out) < n:
        ns, ex = struct.unpack_from(">HI", d, pos + 18)
        out.append(doff + pos)
        pos += (24 + ns + ex + 7) & ~7
    return out


# -- directory entries ------------------------------------------------------------------------

@pytest.mark.parametrize("field,data", [
    (20, struct.pack(">I", 8)),                 # extra data: not supported
    (18, struct.pack(">H", 1024)),              # name longer than 1023 bytes
    (18, struct.pack(">H", 200)),               # name overruns the directory
    (12, struct.pack(">I", 0x12)),              # reserved flag bit
    (16, b"\x02"),                              # not a dirty tracking bitmap
    (17, b"\x08"),                              # granularity 2^8 < 2^9
    (17, b"\x20"),                              # granularity 2^32 > 2^31
    (0, struct.pack(">Q", 0)),                  # no bitmap table
    (8, struct.pack(">I", 0)),                  # empty bitmap table
    (8, struct.pack(">I", 2)),                  # table size not what the disk needs
    (8, struct.pack(">I", 0x8000001)),          # table size over QEMU's cap
])
def test_directory_entry_field(bimg, field, data):
    from qcow2 import CorruptImageError
    e = directory(bimg)[0]
    poke(bimg, e[0] + field, data)
    refused(bimg, CorruptImageError, e[0] + field)


def test_directory_entry_table_unaligned(bimg):
    from qcow2 import CorruptImageError
    e = directory(bimg)[1]
    poke64(bimg, e[0], e[1] + 0x200)
    refused(bimg, CorruptImageError, e[0])


def test_bitmap_table_past_eof(bimg):
    from qcow2 import CorruptImageError
    e = directory(bimg)[1]
    poke64(bimg, e[0], round_up(bimg.stat().st_size) + 8 * CS)
    refused(bimg, CorruptImageError, e[0])


def test_bitmap_table_overlaps_refcount_table(bimg):
    from qcow2 import UnsafeImageError
    e = directory(bimg)[1]
    poke64(bimg, e[0], reftable_off(bimg))
    refused(bimg, UnsafeImageError, e[0])


def test_bitmap_tables_shared(bimg):
    from qcow2 import UnsafeImageError
    a, b = directory(bimg)
    poke64(bimg, a[1], 0)               # no data cluster: only the table is shared
    poke64(bimg, b[0], a[1])
    refused(bimg, UnsafeImageError, b[0])


# -- bitmap table entries ---------------------------------------------------------------------

@pytest.mark.parametrize("how", ["reserved", "all-ones", "unaligned", "past-eof"])
def test_bitmap_table_entry(bimg, how):
    from qcow2 import CorruptImageError
    e = directory(bimg)[0]
    v = u64(bimg, e[1])
    v = {"reserved": v | (1 << 57), "all-ones": v | 1, "unaligned": v + 0x200,
         "past-eof": round_up(bimg.stat().st_size) + 2 * CS}[how]
    poke64(bimg, e[1], v)
    refused(bimg, CorruptImageError, e[1])


def test_bitmap_data_on_the_l1_table(bimg):
    from qcow2 import UnsafeImageError
    e = directory(bimg)[0]
    poke64(bimg, e[1], l1_off(bimg) & ~(CS - 1))
    err = refused(bimg, UnsafeImageError, e[1])
    assert "L1 table" in str(err)


def test_bitmap_data_cluster_shared_by_two_bitmaps(bimg):
    from qcow2 import UnsafeImageError
    a, b = directory(bimg)
    poke64(bimg, b[1], data_cluster(bimg, a))
    refused(bimg, UnsafeImageError, b[1])


def test_guest_data_on_bitmap_data(bimg):
    from qcow2 import UnsafeImageError
    e = directory(bimg)[0]
    l2 = l2_off(bimg)
    poke64(bimg, l2 + 8, COPIED | data_cluster(bimg, e))
    err = refused(bimg, UnsafeImageError, l2 + 8)
    assert "bitmap data" in str(err)


def test_guest_data_on_a_bitmap_table(bimg):
    from qcow2 import UnsafeImageError
    e = directory(bimg)[1]
    l2 = l2_off(bimg)
    poke64(bimg, l2 + 8, COPIED | (e[1] & ~(CS - 1)))
    err = refused(bimg, UnsafeImageError, l2 + 8)
    assert "bitmap table" in str(err)


def test_bitmap_clusters_need_a_refcount(bimg):
    from qcow2 import CorruptImageError
    e = directory(bimg)[0]
    c = data_cluster(bimg, e) // CS
    rb = u64(bimg, reftable_off(bimg))
    poke(bimg, rb + 2 * c, b"\0\0")
    refused(bimg, CorruptImageError, rb + 2 * c)


def test_bitmap_tables_count_in_the_metadata_budget(bimg):
    """An in-use bitmap with a long table: charged before it is read."""
    import qcow2
    from qcow2 import UnsafeImageError
    with qcow2.open(bimg, untrusted=True) as im:
        held = im.budget.held
    e = directory(bimg)[0]
    n = 4000                                  # 32000 bytes of table, inside its cluster
    poke(bimg, e[0] + 8, struct.pack(">II", n, e[3] | 1))
    with qcow2.open(bimg, untrusted=True) as im:
        assert im.budget.held == held + (n - 1) * 8
    nl2 = sum(1 for i in range(u32(bimg, 0x24)) if u64(bimg, l1_off(bimg) + 8 * i))
    err = refused(bimg, UnsafeImageError, e[0] + 8, max_metadata=held - nl2 * CS)
    assert "bitmap table" in str(err) and str(held - nl2 * CS) in str(err)


def test_bitmaps_ignored_when_the_autoclear_bit_is_clear(bimg):
    """A program without bitmap support cleared the bit: QEMU ignores the extension,
    and so does the scan (nothing of it is read)."""
    import qcow2
    ext = bitmap_ext(bimg)
    poke64(bimg, 0x58, u64(bimg, 0x58) & ~1)
    poke64(bimg, ext + 16, round_up(bimg.stat().st_size) + 4 * CS)
    with qcow2.open(bimg, untrusted=True) as im:
        assert im.pread(4, 0) == b"\x01" * 4


@pytest.mark.parametrize("in_use", [False, True])
def test_qemu_made_bitmap_images_pass(tmp_path, in_use):
    """As the corpus makes them: an enabled and a disabled bitmap, writes recorded, and
    (in_use) qemu-io killed while the image was open read-write: the bitmaps keep their
    in-use flag.  Untrusted mode reads all of them as qemu-img does."""
    import qcow2
    p = tmp_path / "b.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", p, "4M")
    qemu_img("bitmap", "--add", p, "bm0")
    qemu_img("bitmap", "--add", "-g", "128k", "--disable", p, "bitmap-one")
    qemu_io(p, "write -P 1 0 64k", "write -P 2 1M 192k", "write -z 2M 64k")
    if in_use:
        r = subprocess.run(["qemu-io", "-f", "qcow2", "-c", "write -P 0x5a 65536 4096",
                            "-c", "flush", "-c", "sigraise 9", str(p)], capture_output=True)
        assert r.returncode == -9
        assert any(e[3] & 1 for e in directory(p))
    raw = tmp_path / "b.raw"
    qemu_img("convert", "-U", "-O", "raw", p, raw)
    with qcow2.open(p, untrusted=True) as im:
        assert im.pread(im.size, 0) == raw.read_bytes()
