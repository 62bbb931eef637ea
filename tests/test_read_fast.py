"""``pread`` of a read-only plain image answers reads inside one cluster from L2 tables
it has seen, without a lock (plain data: one ``os.pread``; unallocated without a
backing file: zeros).  Everything else must still go the general way, with its checks:
these tests read each entry kind after its table is known."""

from __future__ import annotations

import os
import shutil

import pytest
from helpers import CS, poke64, run, u64

import oracle

pytestmark = pytest.mark.skipif(not shutil.which("qemu-img") or not shutil.which("qemu-io"),
                                reason="qemu-img/qemu-io not installed")


def l2_off(path):
    return u64(path, u64(path, 40)) & 0x00FFFFFFFFFFFE00


@pytest.fixture
def single(tmp_path):
    """No backing file: data, compressed, zero-flagged, unallocated clusters; an
    unallocated L1 entry past the first L2 table's span (64 KiB clusters: 512 MiB)."""
    p = tmp_path / "single.qcow2"
    run("qemu-img", "create", "-q", "-f", "qcow2", p, "1G")
    run("qemu-io", "-f", "qcow2",
        "-c", f"write -P 0x22 {CS} {CS}",
        "-c", f"write -c -P 0x33 {3 * CS} {CS}",
        "-c", f"write -P 0x44 {5 * CS} {CS}",
        "-c", f"write -z {5 * CS} {CS}",
        "-c", f"write -z -u {7 * CS} {CS}",
        p)
    return p


def _warm_then_read_all(img, want, offsets, n):
    img.pread(n, offsets[0])                  # the table is seen (general path)
    buf = bytearray(n)
    for off in offsets:
        assert img.pread(n, off) == want[off:off + n], off
        k = img.readinto(buf, off)
        assert bytes(buf[:k]) == want[off:off + n], off


@pytest.fixture(params=["flat", "tables"])
def layout(request, monkeypatch):
    """Both layouts of the fast path's maps: one list per disk (disks of up to 2^20
    clusters) and one list per L2 table (bigger disks)."""
    if request.param == "tables":
        import qcow2.readplan
        monkeypatch.setattr(qcow2.readplan, "_FLAT_MAX", 0)
    return request.param


@pytest.mark.parametrize("n", [4096, 512, 1000])
def test_fast_reads_match_qemu(single, engine, n, layout):
    want = oracle.raw_bytes(single, "qcow2")
    offsets = [c * CS + k for c in range(10) for k in (0, CS - n, 7)] + \
              [600 << 20, (1 << 30) - n]         # unallocated L1 entry, the last bytes
    with engine.open(single) as img:
        _warm_then_read_all(img, want, offsets, n)
        _warm_then_read_all(img, want, offsets, n)     # every table known now
        assert img.pread(n, (1 << 30) - 10) == want[-10:]    # past the end: short


def test_fast_path_refuses_unaligned_entry_of_a_known_table(single, engine, layout):
    l2 = l2_off(single)
    poke64(single, l2 + 8, u64(single, l2 + 8) + 0x200)       # cluster 1: unaligned
    with engine.open(single) as img:
        assert img.pread(4096, 0) == bytes(4096)              # table known from here
        with pytest.raises(engine.CorruptImageError) as exc:
            img.pread(4096, CS)
        assert exc.value.offset == l2 + 8


def test_fast_path_data_past_the_end_of_the_file_reads_zeros(tmp_path, engine):
    p = tmp_path / "t.qcow2"
    run("qemu-img", "create", "-q", "-f", "qcow2", p, "1M")
    run("qemu-io", "-f", "qcow2", "-c", f"write -P 0x5a 0 {CS}", p)
    host = u64(p, l2_off(p)) & 0x00FFFFFFFFFFFE00
    os.truncate(p, host + 100)                                # the cluster is cut short
    with engine.open(p) as img:
        assert img.pread(4096, CS) == bytes(4096)             # table known
        assert img.pread(4096, 0) == b"\x5a" * 100 + bytes(3996)
        general = bytearray(2 * 4096)
        img.readinto(general, 0)
        assert bytes(general[:4096]) == img.pread(4096, 0)
        small = bytearray(b"\xff" * 4096)
        assert img.readinto(small, 0) == 4096 and bytes(small) == img.pread(4096, 0)


def test_backing_chain_holes_read_the_backing(tmp_path, engine):
    base, top = tmp_path / "b.qcow2", tmp_path / "t.qcow2"
    run("qemu-img", "create", "-q", "-f", "qcow2", base, "1M")
    run("qemu-io", "-f", "qcow2", "-c", "write -P 0x11 0 1M", base)
    run("qemu-img", "create", "-q", "-f", "qcow2", "-b", base.name, "-F", "qcow2", top, "1M")
    run("qemu-io", "-f", "qcow2", "-c", f"write -P 0x22 0 {CS}", top)
    with engine.open(top) as img:
        assert img.pread(4096, 0) == b"\x22" * 4096
        assert img.pread(4096, CS) == b"\x11" * 4096
        assert img.pread(4096, 2 * CS + 5) == b"\x11" * 4096


def test_writable_images_and_closed_images(single, engine):
    with engine.open(single, "r+") as img:
        assert img.pread(4096, CS) == b"\x22" * 4096
        img.pwrite(b"\x77" * 4096, CS)
        assert img.pread(4096, CS) == b"\x77" * 4096          # no stale fast path
        buf = bytearray(4096)
        assert img.readinto(buf, CS) == 4096 and buf == b"\x77" * 4096
    img = engine.open(single)
    assert img.pread(4096, CS) == b"\x77" * 4096
    img.close()
    with pytest.raises((OSError, ValueError)):
        img.pread(4096, CS)
    with pytest.raises((OSError, ValueError)):
        img.readinto(bytearray(4096), CS)


def test_readinto_of_other_buffer_types(single, engine):
    """Typed buffers (``array('I')``, a ``memoryview`` slice) are filled byte for byte."""
    import array
    want = oracle.raw_bytes(single, "qcow2")
    with engine.open(single) as img:
        img.pread(512, 0)
        a = array.array("I", bytes(4096))
        assert img.readinto(a, CS) == 4096 and a.tobytes() == want[CS:CS + 4096]
        big = bytearray(8192)
        assert img.readinto(memoryview(big)[100:100 + 4096], 3 * CS) == 4096
        assert bytes(big[100:100 + 4096]) == want[3 * CS:3 * CS + 4096]
        assert img.readinto(bytearray(4096), (1 << 30) - 100) == 100


def test_read_plan_pieces(tmp_path, engine):
    """The plan a server sends from: file pieces of each layer's file, zeros, copies
    read into the buffer asked for; writable images hand out copies only."""
    from qcow2.image import READ_COPY, READ_FILE, READ_ZEROS
    base, top = tmp_path / "b.qcow2", tmp_path / "t.qcow2"
    run("qemu-img", "create", "-q", "-f", "qcow2", base, "1M")
    run("qemu-io", "-f", "qcow2", "-c", f"write -P 0x11 0 {4 * CS}", base)
    run("qemu-img", "create", "-q", "-f", "qcow2", "-b", base.name, "-F", "qcow2", top, "2M")
    run("qemu-io", "-f", "qcow2", "-c", f"write -P 0x22 {CS} {CS}",
        "-c", f"write -c -P 0x33 {2 * CS} {CS}", "-c", f"write -z {5 * CS} {CS}", top)
    want = oracle.raw_bytes(top, "qcow2")
    bufs = []

    def buffer(n):
        bufs.append(bytearray(n))
        return bufs[-1]

    with engine.open(top) as img:
        for first in (False, True):                 # general path, then known tables
            bufs.clear()
            plan = img.read_plan(0, 8 * CS, buffer)
            kinds = [(a // CS, n // CS, k) for a, n, k, _fd, _h in plan]
            assert kinds == [(0, 1, READ_FILE), (1, 1, READ_FILE), (2, 1, READ_COPY),
                             (3, 1, READ_FILE), (4, 4, READ_ZEROS)], first
            assert plan[0][3] == img.backing.be.fd and plan[1][3] == img.be.fd
            for a, n, kind, fd, host in plan:
                if kind == READ_FILE:
                    assert os.pread(fd, n, host) == want[a:a + n]
                elif kind == READ_COPY:
                    assert bytes(bufs[-1][fd:fd + n]) == want[a:a + n]
                else:
                    assert want[a:a + n] == bytes(n)
    with engine.open(top, "r+") as img:
        assert [p[2] for p in img.read_plan(0, 8 * CS)] == [READ_COPY]


def test_reads_of_several_clusters(tmp_path, engine, layout):
    """Longer reads of a known table: clusters back to back in the file are one read,
    all-unallocated ranges zeros; anything else (clusters out of order, compressed,
    zero-flagged, a hole between data, a table boundary, the last bytes) goes the
    general way: every read matches qemu's bytes."""
    p = tmp_path / "multi.qcow2"
    run("qemu-img", "create", "-q", "-f", "qcow2", p, "1G")
    run("qemu-io", "-f", "qcow2",
        "-c", f"write -P 0x11 0 {4 * CS}",                   # back to back
        "-c", f"write -P 0x22 {6 * CS} {CS}",                # out of order in the file
        "-c", f"write -P 0x33 {5 * CS} {CS}",
        "-c", f"write -c -P 0x44 {8 * CS} {CS}",
        "-c", f"write -z {9 * CS} {CS}",
        "-c", f"write -P 0x55 {(512 << 20) - CS} {2 * CS}",  # across the table boundary
        p)
    want = oracle.raw_bytes(p, "qcow2")
    ranges = [(0, 4 * CS), (100, 3 * CS), (CS - 1, 2), (4 * CS - 10, 20), (5 * CS, 2 * CS),
              (7 * CS, 3 * CS), (10 * CS, 6 * CS), (12 * CS + 7, 1 << 20),
              ((512 << 20) - CS, 2 * CS), ((1 << 30) - 3 * CS, 3 * CS), (3 * CS, 4 * CS)]
    with engine.open(p) as img:
        for _ in range(3):                                   # tables unknown, seen, mapped
            for off, n in ranges:
                assert img.pread(n, off) == want[off:off + n], (off, n)
                buf = bytearray(n)
                assert img.readinto(buf, off) == n and buf == want[off:off + n], (off, n)
        assert img.pread(2 * CS, (1 << 30) - CS) == want[-CS:]   # short at the end
        with pytest.raises(engine.errors.InvalidOptionError):
            img.pread(2 * CS, -CS)


def test_host_map_of_each_entry_kind():
    """The fast path's view of an L2 table: host offsets of plain aligned data (the
    COPIED flag off), 0 unallocated, -1 for anything the general path must check."""
    import struct

    from qcow2.readplan import host_map
    copied, compressed = 1 << 63, 1 << 62
    entries = [0, copied | 5 * CS, 7 * CS, copied | 9 * CS | 1, copied | 3 * CS + 512,
               compressed | 12345, 1 << 56, copied, 1 << 55 | CS, 2]
    table = struct.pack(f">{len(entries)}Q", *entries) + bytes(CS - 8 * len(entries))
    m = host_map(bytearray(table), 16)
    assert len(m) == CS // 8
    assert m[:len(entries)] == [0, 5 * CS, 7 * CS, -1, -1, -1, -1, 0, 1 << 55 | CS, -1]
    assert set(m[len(entries):]) == {0}
    for bits in (9, 12, 21):                 # the low bits under each cluster size
        size = 1 << bits
        t = struct.pack(">3Q", copied | 4 * size, 4 * size + (size >> 1), 4 * size + 512)
        last = 4 * size + 512 if bits == 9 else -1        # (512 B clusters: aligned)
        assert host_map(t, bits) == [4 * size, -1, last]


def test_maps_start_again_when_full(single, engine, layout, monkeypatch):
    """Past their bound the maps (and the flat list) are emptied and made again from
    the tables; reads stay right, by readinto alone too."""
    import qcow2.readplan
    monkeypatch.setattr(qcow2.readplan, "_MAP_ENTRIES", 1)
    want = oracle.raw_bytes(single, "qcow2")
    offsets = [CS, 600 << 20, 0, 5 * CS, CS + 7, 600 << 20, 3 * CS]
    with engine.open(single) as img:
        buf = bytearray(4096)
        for _ in range(3):
            for off in offsets:
                assert img.readinto(buf, off) == 4096 and buf == want[off:off + 4096], off
                assert img.pread(4096, off) == want[off:off + 4096], off
