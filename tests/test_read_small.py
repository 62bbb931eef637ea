"""Reads inside one cluster take a fast path (plain and unallocated L2 entries are
decoded in Python; everything else goes through the kernel).  These tests pin that
both paths agree with qemu-img on every entry kind and raise the same errors."""

from __future__ import annotations

import random
import shutil

import pytest
from helpers import COPIED, CS, poke64, run, u64

import oracle

pytestmark = pytest.mark.skipif(not shutil.which("qemu-img") or not shutil.which("qemu-io"),
                                reason="qemu-img/qemu-io not installed")


def l2_off(path):
    return u64(path, u64(path, 40)) & 0x00FFFFFFFFFFFE00


@pytest.fixture
def chain(tmp_path):
    """An overlay with every entry kind over a backing file: data, compressed, zero
    (plain and allocated), unallocated (backing data), and a tail past the backing."""
    base = tmp_path / "base.qcow2"
    top = tmp_path / "top.qcow2"
    run("qemu-img", "create", "-q", "-f", "qcow2", base, str(16 * CS - 4096))
    run("qemu-io", "-f", "qcow2", "-c", f"write -P 0x11 0 {16 * CS - 4096}", base)
    run("qemu-img", "create", "-q", "-f", "qcow2", "-b", base.name, "-F", "qcow2", top,
        str(20 * CS))
    run("qemu-io", "-f", "qcow2",
        "-c", f"write -P 0x22 {CS} {CS}",                  # data
        "-c", f"write -c -P 0x33 {3 * CS} {CS}",           # compressed
        "-c", f"write -z {5 * CS} {CS}",                   # zero flag
        "-c", f"write -P 0x44 {7 * CS} {CS}",
        "-c", f"write -z {7 * CS} {CS}",                   # zero, allocated
        "-c", f"write -P 0x55 {9 * CS + 512} 1024",        # partial cluster: COW
        "-c", f"write -P 0x66 {18 * CS} 4096",             # past the backing's end
        top)
    return top


@pytest.mark.parametrize("impl_size", [512, 4096, 3000])
def test_small_reads_match_qemu(chain, engine, impl_size):
    want = oracle.raw_bytes(chain, "qcow2")
    rnd = random.Random(impl_size)
    with engine.open(chain) as img:
        assert img._fast_reads
        for c in range(20):
            for off in (c * CS, c * CS + CS - impl_size, c * CS + rnd.randrange(CS - impl_size)):
                assert img.pread(impl_size, off) == want[off:off + impl_size], (c, off)
        # straddling two clusters: the general path
        for c in range(19):
            off = c * CS + CS - 100
            assert img.pread(200, off) == want[off:off + 200], c


@pytest.mark.parametrize("index", [1, 5])     # a data entry; a zero entry (then "allocated")
def test_small_read_of_unaligned_entry_is_refused(chain, engine, index):
    """QEMU: "Cluster allocation offset 0x... unaligned"; the same on every read size."""
    l2 = l2_off(chain)
    poke64(chain, l2 + 8 * index, u64(chain, l2 + 8 * index) + 0x200)
    for n in (512, 2 * CS):
        with engine.open(chain) as img:
            with pytest.raises(engine.CorruptImageError) as exc:
                img.pread(n, index * CS)
            assert exc.value.offset == l2 + 8 * index, n


@pytest.mark.parametrize("index, bits", [
    (1, 1 << 57),          # a reserved bit on a data entry
    (3, COPIED),           # COPIED on a compressed entry (check reports it; reads ignore it)
])
def test_odd_entries_read_like_qemu(chain, engine, index, bits):
    """Trusted reads ignore what QEMU's reads ignore (check and untrusted mode refuse)."""
    l2 = l2_off(chain)
    poke64(chain, l2 + 8 * index, u64(chain, l2 + 8 * index) | bits)
    want = oracle.raw_bytes(chain, "qcow2")
    off = index * CS
    with engine.open(chain) as img:
        for n, at in ((512, off), (4096, off + CS - 4096), (CS, off), (2 * CS, off)):
            assert img.pread(n, at) == want[at:at + n], (n, at)


def test_file_object_read_sizes(chain, engine):
    """``file().read(n)`` goes through ``pread`` (small, large, past the end, closed)."""
    want = oracle.raw_bytes(chain, "qcow2")
    with engine.open(chain) as img:
        f = img.file()
        for n in (1, 4096, CS + 3, 5 * CS):
            at = f.tell()
            assert f.read(n) == want[at:at + n]
        f.seek(len(want) - 10)
        assert f.read(CS) == want[-10:]
        assert f.read(CS) == b"" and f.read() == b""
        f.seek(0)
        assert f.read() == want
        f.close()
        with pytest.raises(ValueError):
            f.read(10)


# -- big reads of compressed clusters: one buffer, one kernel call, split in two threads --

@pytest.fixture
def compressed(tmp_path):
    """64 compressed 64 KiB clusters, every fourth one stored plain (incompressible),
    so the compressed ones are not contiguous in the file; then a hole."""
    import os
    raw = tmp_path / "src.raw"
    with open(raw, "wb") as f:
        for i in range(64):
            f.write(os.urandom(CS) if i % 4 == 3 else (b"cluster %5d " % i) * (CS // 14)
                    + bytes(CS % 14))
        f.truncate(72 * CS)
    img = tmp_path / "c.qcow2"
    run("qemu-img", "convert", "-c", "-O", "qcow2", raw, img)
    return img, raw.read_bytes()


def _compressed_offset(path, index):
    l2 = l2_off(path)
    e = u64(path, l2 + 8 * index)
    assert e & (1 << 62), index
    return e & ((1 << 54) - 1)


def _spoil(path, index) -> int:
    """Overwrite the start of compressed cluster ``index``; its host offset."""
    coff = _compressed_offset(path, index)
    with open(path, "r+b") as f:
        f.seek(coff)
        f.write(b"\xff" * 64)
    return coff


def _names_the_cluster(exc, coff, index) -> None:
    assert exc.value.offset == coff
    assert f"guest offset {index * CS:#x}" in str(exc.value)


@pytest.mark.parametrize("serial", [False, True])
def test_big_compressed_reads(compressed, engine, serial):
    from qcow2.reader import serial_reads
    import contextlib
    path, want = compressed
    with engine.open(path) as img, (serial_reads() if serial else contextlib.nullcontext()):
        assert img.pread(len(want), 0) == want
        for off, n in ((CS + 100, 40 * CS), (0, 2 * CS), (7 * CS - 1, 17 * CS + 2)):
            assert img.pread(n, off) == want[off:off + n]


@pytest.mark.parametrize("index", [0, 5, 33, 62])       # first half, second half, last
@pytest.mark.parametrize("serial", [False, True])
def test_big_compressed_read_names_the_bad_cluster(compressed, engine, index, serial):
    from qcow2.reader import serial_reads
    import contextlib
    path, want = compressed
    coff = _spoil(path, index)
    with engine.open(path) as img, (serial_reads() if serial else contextlib.nullcontext()):
        with pytest.raises(engine.DecompressionError) as exc:
            img.pread(64 * CS, 0)
        _names_the_cluster(exc, coff, index)
        # a good cluster still reads, alone
        good = 2 * CS if index != 2 else 1 * CS
        assert img.pread(CS, good) == want[good:good + CS]


def test_decode_helpers_after_fork(compressed, engine):
    """A forked child makes its own helper threads (the parent's do not exist there)."""
    import os
    path, want = compressed
    with engine.open(path) as img:
        assert img.pread(len(want), 0) == want          # the parent's pool exists now
        pid = os.fork()
        if pid == 0:                                     # child: exit code says it all
            try:
                ok = img.pread(len(want), 0) == want
            except BaseException:
                ok = False
            os._exit(0 if ok else 1)
        _, status = os.waitpid(pid, 0)
        assert os.WIFEXITED(status) and os.WEXITSTATUS(status) == 0


# -- whole chunks of compressed clusters: one read, one kernel call (Qcow2Image._read_packed)

@pytest.fixture
def packed(tmp_path):
    """48 compressed clusters back to back, as qemu-img -c writes them."""
    raw = tmp_path / "src.raw"
    data = b"".join((b"packed %5d " % i) * (CS // 13) + bytes(CS % 13) for i in range(48))
    raw.write_bytes(data)
    img = tmp_path / "p.qcow2"
    run("qemu-img", "convert", "-c", "-O", "qcow2", raw, img)
    return img, data


def _spy_packed(monkeypatch):
    from qcow2.reader import Qcow2Image
    took = []
    real = Qcow2Image._read_packed

    def spy(self, mv, offset, end):
        took.append(real(self, mv, offset, end))
        return took[-1]
    monkeypatch.setattr(Qcow2Image, "_read_packed", spy)
    return took


def test_packed_compressed_reads(packed, engine, monkeypatch):
    from qcow2.reader import serial_reads
    path, want = packed
    took = _spy_packed(monkeypatch)
    with engine.open(path) as img, serial_reads():
        assert img.pread(len(want), 0) == want                       # 48 clusters
        assert img.pread(7 * CS, 3 * CS) == want[3 * CS:10 * CS]
        assert img.pread(2 * CS, 5 * CS + 1) == want[5 * CS + 1:7 * CS + 1]   # unaligned
    assert took == [True, True]


@pytest.mark.parametrize("index", [0, 17, 47])
def test_packed_read_names_the_bad_cluster(packed, engine, monkeypatch, index):
    from qcow2.reader import serial_reads
    path, want = packed
    coff = _spoil(path, index)
    took = _spy_packed(monkeypatch)
    with engine.open(path) as img, serial_reads():
        with pytest.raises(engine.DecompressionError) as exc:
            img.pread(len(want), 0)
        _names_the_cluster(exc, coff, index)
    assert took == [False]                  # the general path reported it


def test_packed_read_out_of_order_and_truncated(tmp_path, engine, monkeypatch):
    # clusters stored in reverse guest order are read by the general path; so is a
    # file cut inside the last compressed cluster (QEMU reads zeros past the end)
    from qcow2.reader import serial_reads
    path = str(tmp_path / "r.qcow2")
    engine.create(path, 16 * CS)
    blobs = [(b"rev %3d " % i) * (CS // 8) for i in range(16)]
    with engine.open(path, "r+") as img:
        for i in reversed(range(16)):
            img.write_compressed(blobs[i], i * CS)
    took = _spy_packed(monkeypatch)
    with engine.open(path) as img, serial_reads():
        assert img.pread(16 * CS, 0) == b"".join(blobs)
    assert took == [False]
    with engine.open(path) as img:
        last = max(_compressed_offset(path, i) for i in range(16))
    with open(path, "r+b") as f:
        f.truncate(last + 10)
    with engine.open(path) as img, serial_reads():
        try:
            got = img.pread(16 * CS, 0)
        except engine.DecompressionError:
            got = None
    try:
        want = oracle.raw_bytes(path)
    except Exception:                       # noqa: BLE001 - qemu-img refused it too
        want = None
    assert got == want
