"""Backend conformance (zarr's pattern): one class of tests that every store passes.

Each backend subclasses :class:`BackendConformance` and says how to make a store that
holds given bytes; the tests then check the interface (size, readinto, pread, pwrite,
truncate, punch_hole, allocate, write_zeros, data_regions, flush, close, identity)
against the store's capability properties, and a random sequence of operations
against the in-memory model.  The block-device backend runs on a regular file and on
a loop device (skipped, with the reason, where none can be made).
"""

from __future__ import annotations

import errno
import os
import random
import shutil
import subprocess

import pytest
from helpers import random_writes

from qcow2.backends import Backend, FileBackend, MemoryBackend
from qcow2.backends.lvm import BlockDeviceBackend

SIZE = 256 << 10                       # a multiple of the block size (loop devices)


def _data(seed: int = 1, size: int = SIZE) -> bytes:
    rng = random.Random(seed)
    out = bytearray(rng.randbytes(size))
    out[64 << 10:128 << 10] = bytes(64 << 10)          # a zero stretch in the middle
    return bytes(out)


class BackendConformance:
    """What every backend does.  Subclasses define ``make(data, writable)``."""

    resizable = True                   # can_resize is expected when writable

    @pytest.fixture
    def store(self, tmp_path):
        made: list[Backend] = []

        def factory(data: bytes = b"", writable: bool = True) -> Backend:
            be = self.make(tmp_path, data, writable)
            made.append(be)
            return be

        yield factory
        for be in made:
            be.close()

    def make(self, tmp_path, data: bytes, writable: bool) -> Backend:  # pragma: no cover
        raise NotImplementedError

    # -- capabilities ----------------------------------------------------------------
    def test_capabilities_are_booleans(self, store):
        be = store(_data())
        for cap in (be.can_seek_data, be.can_punch_holes, be.can_resize, be.writable):
            assert isinstance(cap, bool)
        assert be.can_resize is (self.resizable and be.writable)
        ro = store(_data(), writable=False)
        assert not ro.writable and not ro.can_resize and not ro.can_punch_holes
        assert isinstance(be.name, str) and be.name

    def test_identity_is_hashable_and_stable(self, store):
        be = store(_data())
        assert hash(be.identity()) == hash(be.identity())
        assert be.identity() != store(_data()).identity()

    # -- reading ---------------------------------------------------------------------
    def test_size(self, store):
        assert store(_data()).size() == SIZE

    def test_pread(self, store):
        data = _data()
        be = store(data)
        assert be.pread(4096, 0) == data[:4096]
        assert be.pread(1000, 12345) == data[12345:13345]
        assert be.pread(100, SIZE - 10) == data[-10:]          # short at the end only
        assert be.pread(100, SIZE) == b""
        assert be.pread(0, 5) == b""

    def test_readinto(self, store):
        data = _data()
        be = store(data)
        buf = bytearray(8192)
        assert be.readinto(buf, 4096) == 8192 and bytes(buf) == data[4096:12288]
        mv = memoryview(bytearray(4096))[100:300]
        assert be.readinto(mv, 7) == 200 and bytes(mv) == data[7:207]
        buf = bytearray(4096)
        assert be.readinto(buf, SIZE - 512) == 512 and bytes(buf[:512]) == data[-512:]
        assert be.readinto(bytearray(16), SIZE + 4096) == 0

    def test_data_regions_cover_the_data(self, store):
        data = _data()
        be = store(data)
        regions = list(be.data_regions())
        pos = 0
        for off, n in regions:
            assert off >= pos and n > 0 and off + n <= SIZE
            assert data[pos:off] == bytes(off - pos)            # what is skipped is zero
            pos = off + n
        assert data[pos:] == bytes(SIZE - pos)
        inner = list(be.data_regions(4096, 8192))
        assert all(4096 <= o and o + n <= 8192 for o, n in inner)
        assert list(be.data_regions(SIZE, SIZE + 10)) == []
        if not be.can_seek_data:
            assert regions == [(0, SIZE)]

    def test_allocated_size(self, store):
        assert store(_data()).allocated_size() >= 0

    # -- writing ---------------------------------------------------------------------
    def test_pwrite(self, store):
        data = bytearray(_data())
        be = store(bytes(data))
        assert be.pwrite(b"x" * 5000, 777) == 5000
        data[777:5777] = b"x" * 5000
        assert be.pread(SIZE, 0) == bytes(data)
        assert be.pwrite(memoryview(b"abc"), SIZE - 3) == 3
        assert be.pread(3, SIZE - 3) == b"abc"

    def test_pwrite_past_the_end(self, store):
        be = store(_data())
        if not be.can_resize:
            with pytest.raises(OSError):
                be.pwrite(b"y" * 4096, SIZE)
            return
        be.pwrite(b"y" * 10, SIZE + 100)
        assert be.size() == SIZE + 110
        assert be.pread(110, SIZE) == bytes(100) + b"y" * 10

    def test_read_only_refuses_writes(self, store):
        be = store(_data(), writable=False)
        for call in (lambda: be.pwrite(b"z", 0), lambda: be.truncate(4096),
                     lambda: be.punch_hole(0, 4096), lambda: be.write_zeros(0, 4096)):
            with pytest.raises(OSError):
                call()
        assert be.pread(SIZE, 0) == _data()

    def test_truncate(self, store):
        data = _data()
        be = store(data)
        if not be.can_resize:
            with pytest.raises(OSError):
                be.truncate(SIZE // 2)
            assert be.size() == SIZE
            return
        be.truncate(SIZE // 2)
        assert be.size() == SIZE // 2 and be.pread(SIZE, 0) == data[:SIZE // 2]
        be.truncate(SIZE)
        assert be.pread(SIZE, 0) == data[:SIZE // 2] + bytes(SIZE // 2)

    def test_punch_hole(self, store):
        data = _data()
        be = store(data)
        if not be.can_punch_holes:
            with pytest.raises(OSError):
                be.punch_hole(4096, 8192)
            return
        try:
            be.punch_hole(4096, 8192)
        except OSError as exc:                       # pragma: no cover - file system
            if exc.errno in (errno.EOPNOTSUPP, errno.EINVAL):
                pytest.skip(f"the file system here cannot punch holes: {exc}")
            raise
        assert be.size() == SIZE
        assert be.pread(SIZE, 0) == data[:4096] + bytes(8192) + data[12288:]

    def test_write_zeros_and_allocate(self, store):
        data = _data()
        be = store(data)
        be.write_zeros(1000, 3000)
        assert be.pread(SIZE, 0) == data[:1000] + bytes(3000) + data[4000:]
        be.allocate(0, SIZE)                          # inside: changes nothing
        assert be.size() == SIZE and be.pread(16, 0) == data[:16]
        if be.can_resize:
            be.allocate(SIZE, 8192)
            assert be.size() == SIZE + 8192 and be.pread(8192, SIZE) == bytes(8192)

    def test_flush_keeps_the_data(self, store):
        be = store(_data())
        be.pwrite(b"durable", 4096)
        be.flush()
        assert be.pread(7, 4096) == b"durable"

    def test_close_is_idempotent(self, store):
        be = store(_data())
        with be as same:
            assert same is be
        be.close()

    # -- against the model ------------------------------------------------------------
    def test_random_operations_match_memory(self, store):
        rng = random.Random(7)
        be = store(_data(3))
        model = MemoryBackend(_data(3))
        for _ in range(200):
            op = rng.choice(["write", "write", "read", "zeros", "punch", "truncate"])
            size = model.size()
            off = rng.randrange(size)
            n = rng.randrange(1, 20000)
            if op != "read" and op != "truncate" and not be.can_resize:
                n = min(n, size - off)
            if op == "write":
                blob = rng.randbytes(n)
                be.pwrite(blob, off)
                model.pwrite(blob, off)
            elif op == "zeros":
                be.write_zeros(off, n)
                model.write_zeros(off, n)
            elif op == "punch" and be.can_punch_holes:
                n = min(n, size - off)
                be.punch_hole(off, n)
                model.punch_hole(off, n)
            elif op == "truncate" and be.can_resize:
                new = rng.randrange(SIZE // 2, SIZE * 2)
                be.truncate(new)
                model.truncate(new)
            assert be.size() == model.size()
            assert be.pread(n, off) == model.pread(n, off)
        assert be.pread(be.size(), 0) == model.getvalue()


# ---------------------------------------------------------------------------------------
# the stores
# ---------------------------------------------------------------------------------------

class TestMemoryBackend(BackendConformance):
    def make(self, tmp_path, data, writable):
        return MemoryBackend(data, writable=writable)

    def test_getvalue_and_close(self):
        be = MemoryBackend(b"abc")
        be.pwrite(b"Z", 1)
        be.close()                               # nothing to release: still readable
        assert be.getvalue() == b"aZc" and be.pread(3, 0) == b"aZc"


def _file(tmp_path, data: bytes) -> str:
    path = tmp_path / f"store{len(list(tmp_path.iterdir()))}.bin"
    path.write_bytes(data)
    return str(path)


class TestFileBackend(BackendConformance):
    def make(self, tmp_path, data, writable):
        return FileBackend(_file(tmp_path, data), writable=writable)

    def test_identity_names_the_file(self, tmp_path):
        p = _file(tmp_path, b"x" * 10)
        os.link(p, p + ".link")
        with FileBackend(p) as a, FileBackend(p + ".link") as b:
            assert a.identity() == b.identity()

    def test_on_an_open_descriptor(self, tmp_path):
        p = _file(tmp_path, _data())
        fd = os.open(p, os.O_RDWR)
        try:
            be = FileBackend(fd=fd, writable=True)
            be.pwrite(b"q", 0)
            be.close()                               # the caller's descriptor stays open
            assert os.pread(fd, 1, 0) == b"q"
        finally:
            os.close(fd)


class TestBlockDeviceBackendOnAFile(BackendConformance):
    """The block-device backend works on a regular file too (its size is the file's)."""

    def make(self, tmp_path, data, writable):
        return BlockDeviceBackend(_file(tmp_path, data), writable=writable)

    def test_zero_range(self, tmp_path):
        data = _data()
        with BlockDeviceBackend(_file(tmp_path, data), writable=True) as be:
            be.zero_range(512, 4096)
            assert be.pread(SIZE, 0) == data[:512] + bytes(4096) + data[4608:]


class TestBlockDeviceBackendOnALoopDevice(BackendConformance):
    """On a real block device (a loop device over a file): a fixed size."""

    resizable = False

    @pytest.fixture(autouse=True)
    def _loops(self):
        self.loops: list[str] = []
        yield
        for dev in self.loops:
            subprocess.run(["losetup", "-d", dev], capture_output=True)

    def make(self, tmp_path, data, writable):
        if not shutil.which("losetup"):
            pytest.skip("losetup is not installed")
        res = subprocess.run(["losetup", "-f", "--show", _file(tmp_path, data)],
                             capture_output=True, text=True)
        if res.returncode != 0:
            pytest.skip(f"cannot make a loop device here: {res.stderr.strip()}")
        dev = res.stdout.strip()
        self.loops.append(dev)
        be = BlockDeviceBackend(dev, writable=writable)
        assert be.is_block_device
        return be

    def test_zero_range(self, tmp_path):
        data = _data()
        be = self.make(tmp_path, data, True)
        try:
            be.zero_range(4096, 8192)
            assert be.pread(SIZE, 0) == data[:4096] + bytes(8192) + data[12288:]
        finally:
            be.close()


# ---------------------------------------------------------------------------------------
# a qcow2 image in a store: opened by store, not by path
# ---------------------------------------------------------------------------------------

qemu = pytest.mark.skipif(shutil.which("qemu-img") is None, reason="qemu-img not installed")
MiB = 1 << 20


def _qemu_img(*args) -> subprocess.CompletedProcess:
    return subprocess.run(["qemu-img", *map(str, args)], capture_output=True, text=True)


def _made_by_qemu(tmp_path, opts: str, size: int = 8 * MiB, name: str = "q.qcow2") -> bytes:
    p = tmp_path / name
    r = _qemu_img("create", "-q", "-f", "qcow2", "-o", opts, p, size)
    assert r.returncode == 0, r.stderr
    return p.read_bytes()


@qemu
@pytest.mark.parametrize("opts", ["cluster_size=65536", "cluster_size=16384,extended_l2=on",
                                  "compat=0.10,cluster_size=512",
                                  "cluster_size=65536,compression_type=zstd"])
def test_qcow2_in_memory_is_written_through_the_engine(tmp_path, opts):
    import qcow2
    size = 8 * MiB
    be = MemoryBackend(_made_by_qemu(tmp_path, opts, size), name="in-memory.qcow2")
    model = bytearray(size)
    rng = random.Random(opts)
    with qcow2.open(be, "r+") as img:
        assert img.format == "qcow2" and img.filename == "in-memory.qcow2"
        random_writes(img, model, rng, 60, ["write", "write", "zero", "discard", "compressed"],
                      300000)
        assert img.pread(size, 0) == bytes(model)
        img.resize(size + MiB)                  # (v2 cannot resize once it has snapshots)
        model.extend(bytes(MiB))
        img.create_snapshot("s1")
    # the image closed; the store is the caller's and holds the result
    with qcow2.open(be) as img:
        assert img.size == len(model) and img.pread(len(model), 0) == bytes(model)
        assert [s["name"] for s in img.snapshots()] == ["s1"]
    out = tmp_path / "dumped.qcow2"
    out.write_bytes(be.getvalue())
    raw = tmp_path / "model.raw"
    raw.write_bytes(bytes(model))
    r = _qemu_img("check", out)
    assert r.returncode == 0, r.stdout + r.stderr
    r = _qemu_img("compare", "-f", "qcow2", "-F", "raw", out, raw)
    assert r.returncode == 0, r.stdout + r.stderr


@qemu
def test_raw_in_memory(tmp_path):
    import qcow2
    be = MemoryBackend(bytes(4 * MiB), name="disk.raw")
    with qcow2.open(be, "r+", format="raw") as img:
        img.pwrite(b"hello", 4096)
        img.resize(6 * MiB, preallocation="full")
    assert be.size() == 6 * MiB and be.pread(5, 4096) == b"hello"


@qemu
def test_store_locks_and_ownership(tmp_path):
    """A store without locks lets every open in; a read-only store refuses r+; the
    image leaves the caller's store open."""
    import qcow2
    be = MemoryBackend(_made_by_qemu(tmp_path, "cluster_size=65536"))
    with qcow2.open(be, "r+"), qcow2.open(be, "r+"):
        pass                                     # no locks: nothing excludes the other
    with qcow2.open(be, "r+") as img:
        img.pwrite(b"x" * 512, 0)
    assert be.pread(4, 0) == b"QFI\xfb"             # still open, holding the image
    with qcow2.open(be) as img:                     # a writable store, opened to read
        assert not img.writable
        with pytest.raises(qcow2.ReadOnlyError):
            img.pwrite(b"y", 0)
    ro = MemoryBackend(be.getvalue(), writable=False)
    with pytest.raises(qcow2.ReadOnlyError, match="read-only"):
        qcow2.open(ro, "r+")
    with qcow2.open(ro) as img:
        assert img.pread(1, 0) == b"x"


@qemu
def test_backing_file_of_a_store_opens_relative_to_the_current_folder(tmp_path, monkeypatch):
    import qcow2
    base = tmp_path / "base.qcow2"
    assert _qemu_img("create", "-q", "-f", "qcow2", base, 4 * MiB).returncode == 0
    assert subprocess.run(["qemu-io", "-f", "qcow2", "-c", "write -P 0x5a 0 64k", str(base)],
                          capture_output=True).returncode == 0
    top = tmp_path / "top.qcow2"
    assert _qemu_img("create", "-q", "-f", "qcow2", "-b", "base.qcow2", "-F", "qcow2",
                     top).returncode == 0
    be = MemoryBackend(top.read_bytes())
    monkeypatch.chdir(tmp_path)
    with qcow2.open(be) as img:
        assert img.backing is not None and img.backing.filename == "base.qcow2"
        assert img.pread(4, 0) == b"\x5a" * 4
    monkeypatch.chdir(tmp_path.parent)
    with pytest.raises(qcow2.Qcow2Error, match="Could not open 'base.qcow2'"):
        qcow2.open(be)
    with qcow2.open(be, backing=False) as img:             # info without the chain
        assert img.info()["backing-filename"] == "base.qcow2"


@qemu
def test_dirty_image_in_a_store_is_rebuilt(tmp_path):
    """A dirty image (lazy refcounts, then a crash) opened r+ from a store has its
    refcounts rebuilt first, as when opened by path; read-only it opens as it is."""
    import qcow2
    from qcow2 import constants as C
    path = tmp_path / "d.qcow2"
    assert _qemu_img("create", "-q", "-f", "qcow2", "-o", "cluster_size=65536,lazy_refcounts=on",
                     path, 8 * MiB).returncode == 0
    assert subprocess.run(["qemu-io", "-f", "qcow2", "-c", "write -P 0x33 0 192k", str(path)],
                          capture_output=True).returncode == 0
    data = bytearray(path.read_bytes())
    # what a crash with lazy refcounts leaves: the dirty bit set
    data[C.HDR_INCOMPATIBLE_FEATURES + 7] |= C.INCOMPAT_DIRTY
    be = MemoryBackend(bytes(data))
    with qcow2.open(be) as img:
        assert img.info()["dirty-flag"] is True
    with qcow2.open(be, "r+") as img:
        assert img.info()["dirty-flag"] is False
        img.pwrite(b"\x44" * 4096, 1 << 20)
    out = tmp_path / "out.qcow2"
    out.write_bytes(be.getvalue())
    assert _qemu_img("check", out).returncode == 0
    with qcow2.open(str(out)) as img:
        assert img.pread(4, 0) == b"\x33" * 4 and img.pread(4, 1 << 20) == b"\x44" * 4
