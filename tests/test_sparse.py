"""sparse_copy: same bytes, holes kept (and zero blocks made holes), preallocation,
atomic output, the copy_file_range fallback, a 100 GiB sparse file.

``cp --sparse=always`` is the yardstick for the allocated size.
"""

from __future__ import annotations

import errno
import os
import shutil
import subprocess

import pytest

import qcow2
from qcow2.errors import Qcow2Error
from qcow2.ops import sparse

KiB, MiB, GiB = 1 << 10, 1 << 20, 1 << 30
SLACK = 64 * KiB          # allowed beyond cp --sparse=always's allocation


def blocks(path) -> int:
    return os.stat(path).st_blocks * 512


def same_bytes(a, b) -> bool:
    with open(a, "rb") as fa, open(b, "rb") as fb:
        while True:
            x, y = fa.read(4 * MiB), fb.read(4 * MiB)
            if x != y:
                return False
            if not x:
                return True


def make(path, size, pieces) -> None:
    """A sparse file of ``size`` with ``pieces`` (offset, bytes) written into it."""
    with open(path, "wb") as f:
        f.truncate(size)
        for off, data in pieces:
            f.seek(off)
            f.write(data)


def cp_sparse_blocks(src, tmp_path) -> int:
    out = tmp_path / "cp.out"
    subprocess.run(["cp", "--sparse=always", str(src), str(out)], check=True)
    n = blocks(out)
    out.unlink()
    return n


def leftovers(d) -> list[str]:
    return sorted(n for n in os.listdir(d) if n.endswith(".part"))


MIXED = [  # data, zero blocks inside data, unaligned edges, a zero-filled region
    (0, os.urandom(10_000)),
    (MiB + 123, os.urandom(3 * MiB)),
    (2 * MiB, bytes(512 * KiB)),               # zeros written inside the data region
    (6 * MiB, bytes(2 * MiB)),                 # an all-zero data region
    (9 * MiB - 1, b"\x01"),
    (20 * MiB - 5000, os.urandom(5000)),       # up to the end
]


@pytest.mark.parametrize("size,pieces", [
    (20 * MiB, MIXED),
    (20 * MiB + 777, MIXED),                   # odd size: partial last block
    (0, []),
    (5 * MiB, []),                             # only a hole
    (3 * MiB + 1, [(0, os.urandom(3 * MiB + 1))]),   # no hole at all
    (12 * MiB, [(4 * MiB, bytes(4 * MiB))]),   # data regions that are all zeros
], ids=["mixed", "odd-size", "empty", "all-hole", "all-data", "zero-data"])
def test_content_and_holes(tmp_path, size, pieces):
    src, dst = tmp_path / "src.raw", tmp_path / "dst.raw"
    make(src, size, pieces)
    qcow2.sparse_copy(src, dst)
    assert os.path.getsize(dst) == size
    assert same_bytes(src, dst)
    assert blocks(dst) <= cp_sparse_blocks(src, tmp_path) + SLACK
    assert leftovers(tmp_path) == []


def test_zero_blocks_in_data_become_holes(tmp_path):
    src, dst = tmp_path / "src.raw", tmp_path / "dst.raw"
    data = bytearray(8 * MiB)                  # fully allocated, mostly zeros
    for off in range(0, len(data), MiB):
        data[off:off + 4096] = os.urandom(4096)
    src.write_bytes(bytes(data))
    assert blocks(src) >= 8 * MiB
    qcow2.sparse_copy(src, dst)
    assert same_bytes(src, dst)
    assert blocks(dst) <= 8 * 4096 + SLACK
    with open(dst, "rb") as f:                 # the holes are real holes
        assert os.lseek(f.fileno(), 0, os.SEEK_HOLE) == 4096


def test_preallocate(tmp_path):
    src, dst = tmp_path / "src.raw", tmp_path / "dst.raw"
    make(src, 20 * MiB + 777, MIXED)
    qcow2.sparse_copy(src, dst, preallocate=True)
    assert same_bytes(src, dst)
    assert blocks(dst) >= 20 * MiB + 777


def test_without_copy_file_range(tmp_path, monkeypatch):
    src = tmp_path / "src.raw"
    make(src, 20 * MiB, MIXED)
    calls = []

    def refuse(*args):
        calls.append(args)
        raise OSError(errno.EXDEV, "Invalid cross-device link")

    monkeypatch.setattr(os, "copy_file_range", refuse)
    monkeypatch.setattr(sparse, "shares_extents", lambda fd: True)   # (the offload path)
    qcow2.sparse_copy(src, tmp_path / "a.raw")
    assert 1 <= len(calls) <= 2                # refused once per worker at most, then pwrite
    assert same_bytes(src, tmp_path / "a.raw")
    monkeypatch.delattr(os, "copy_file_range")
    qcow2.sparse_copy(src, tmp_path / "b.raw", workers=1)
    assert same_bytes(src, tmp_path / "b.raw")
    assert blocks(tmp_path / "b.raw") <= cp_sparse_blocks(src, tmp_path) + SLACK


def test_source_without_seek_data(tmp_path, monkeypatch):
    """A block device reports one data region: zero blocks still become holes."""
    src, dst = tmp_path / "src.raw", tmp_path / "dst.raw"
    make(src, 20 * MiB, MIXED)
    from qcow2.backends import FileBackend
    monkeypatch.setattr(FileBackend, "can_seek_data", property(lambda self: False))
    qcow2.sparse_copy(src, dst)
    assert same_bytes(src, dst)
    assert blocks(dst) <= cp_sparse_blocks(src, tmp_path) + SLACK


def test_failure_leaves_nothing(tmp_path, monkeypatch):
    src, dst = tmp_path / "src.raw", tmp_path / "dst.raw"
    make(src, 20 * MiB, MIXED)
    calls = []

    def fail(*args, **kw):
        calls.append(1)
        if len(calls) > 2:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(*args, **kw)

    for offload in (True, False):
        monkeypatch.setattr(sparse, "shares_extents", lambda fd, v=offload: v)
        if offload:
            real = sparse._offload
            monkeypatch.setattr(sparse, "_offload", fail)
        else:
            real = sparse.pwrite_all
            monkeypatch.setattr(sparse, "pwrite_all", fail)
        calls.clear()
        dst.unlink(missing_ok=True)
        with pytest.raises(OSError):
            qcow2.sparse_copy(src, dst)
        assert not dst.exists() and leftovers(tmp_path) == []
        dst.write_bytes(b"old")                # an existing destination is kept as is
        calls.clear()
        with pytest.raises(OSError):
            qcow2.sparse_copy(src, dst)
        assert dst.read_bytes() == b"old" and leftovers(tmp_path) == []
        monkeypatch.undo()


def test_offload_where_the_file_system_shares_extents(tmp_path, monkeypatch):
    """copy_file_range where it shares blocks (XFS, Btrfs, NFS...), pwrite elsewhere:
    the same bytes and holes either way."""
    src = tmp_path / "src.raw"
    make(src, 20 * MiB, MIXED)
    used = []
    real = sparse._offload

    def spy(*a):
        used.append(1)
        return real(*a)
    monkeypatch.setattr(sparse, "_offload", spy)
    for v in (True, False):
        monkeypatch.setattr(sparse, "shares_extents", lambda fd, v=v: v)
        used.clear()
        out = tmp_path / f"{v}.raw"
        qcow2.sparse_copy(src, out)
        assert bool(used) == v
        assert same_bytes(src, out)
        assert blocks(out) <= cp_sparse_blocks(src, tmp_path) + SLACK
    fd = os.open(tmp_path, os.O_RDONLY)
    try:
        assert sparse.shares_extents(fd) in (True, False)
    finally:
        os.close(fd)


def test_destinations(tmp_path):
    src = tmp_path / "src.raw"
    make(src, MiB, [(4096, b"x" * 100)])
    target = tmp_path / "target.raw"
    target.write_bytes(b"old")
    link = tmp_path / "link.raw"
    link.symlink_to(target.name)
    qcow2.sparse_copy(src, link)               # through the symlink, like qemu-img
    assert link.is_symlink() and same_bytes(src, target)
    with pytest.raises(Qcow2Error):
        qcow2.sparse_copy(src, "/dev/null")    # never replace a device node
    with pytest.raises(Qcow2Error):
        qcow2.sparse_copy(tmp_path / "missing.raw", tmp_path / "x.raw")
    assert not (tmp_path / "x.raw").exists()


def test_progress(tmp_path):
    src = tmp_path / "src.raw"
    make(src, 40 * MiB, [(0, os.urandom(9 * MiB)), (30 * MiB, os.urandom(MiB))])
    seen = []
    qcow2.sparse_copy(src, tmp_path / "dst.raw", progress=seen.append)
    assert seen[0] == 0.0 and seen[-1] == 100.0 and seen == sorted(seen)


def test_big_sparse_file(tmp_path):
    """100 GiB with a few MiB of data: only the data regions are visited."""
    src, dst = tmp_path / "big.raw", tmp_path / "big.out"
    pieces = [(off, os.urandom(MiB)) for off in (0, 7 * GiB + 4096, 50 * GiB, 100 * GiB - MiB)]
    pieces.append((80 * GiB, bytes(MiB)))      # zeros written in the middle
    make(src, 100 * GiB, pieces)
    qcow2.sparse_copy(src, dst)
    assert os.path.getsize(dst) == 100 * GiB
    assert blocks(dst) <= 4 * MiB + SLACK
    with open(dst, "rb") as f:
        for off, data in pieces:
            f.seek(off)
            assert f.read(len(data)) == data
    assert qcow2.compare(src, dst) is None     # reads the data regions only
    if shutil.which("qemu-img"):
        proc = subprocess.run(["qemu-img", "compare", "-f", "raw", "-F", "raw", str(src),
                               str(dst)], capture_output=True, text=True)
        assert proc.returncode == 0, proc.stdout
