"""Growing the file system inside a qcow2 instance disk (resize_fs_using_block_device).

nova attaches the overlay with ``qemu-nbd`` and runs ``e2fsck -fp`` and ``resize2fs`` on
the ``/dev/nbdN`` it gets.  Here no block device and no qemu tool is needed:

1. our reader looks at the guest view: an unpartitioned ext2/3/4 file system has its
   superblock magic (0xEF53, little endian) at byte 1024 + 56;
2. after a free-space check, the guest view is converted (``qcow2.convert``, sparse raw)
   into an anonymous working file in the instance directory -- ``O_TMPFILE`` where the
   file system has it, else a temporary name unlinked at once -- so a killed process
   leaves nothing behind;
3. ``e2fsck -fp`` and ``resize2fs`` run on it as ``/dev/fd/N`` (the tools reopen the
   inode through the descriptor they inherit);
4. only where either side can hold data -- the working file's ``SEEK_DATA`` regions and
   the overlay's allocated extents (backing file included) -- the two are compared in
   4 MiB chunks, and the clusters that differ are written into the overlay (opened r+),
   which is then flushed.  Everything else reads as zeros on both sides.

Nothing is written into the overlay unless both tools succeeded; a tool failure is a
:class:`ToolError` and the overlay is left as it was.
"""

from __future__ import annotations

import errno
import os
import subprocess
from dataclasses import dataclass

from ..paths import make_temp
from ..units import ceil_div, round_up
from .errors import ToolError
from .fetch import check_space

EXT_MAGIC = b"\x53\xef"
CHUNK = 4 << 20
#: the unit compared and written back into a raw image (an RBD clone copies up whole
#: objects on the first write into each anyway)
RAW_GRAIN = 64 << 10


RO_COMPAT_GDT_CSUM = 0x10
RO_COMPAT_METADATA_CSUM = 0x400
INCOMPAT_64BIT = 0x80


@dataclass(frozen=True)
class ExtSuper:
    """The few superblock fields the space estimate needs."""
    block_size: int
    blocks: int
    blocks_per_group: int
    inodes_per_group: int
    inode_size: int
    group_csum: bool       # new groups' inode tables are left uninitialised, not zeroed

    @property
    def size(self) -> int:
        return self.blocks * self.block_size


def read_ext_super(img) -> ExtSuper | None:
    """The ext2/3/4 superblock at byte 1024 of the guest view of ``img`` (an unpartitioned
    file system: a partitioned disk has its partition table there), or None."""
    if img.size < 2048:
        return None
    sb = img.pread(1024, 1024)
    if sb[56:58] != EXT_MAGIC:
        return None
    u32 = lambda off: int.from_bytes(sb[off:off + 4], "little")   # noqa: E731
    log_bs, bpg, ipg = u32(0x18), u32(0x20), u32(0x28)
    incompat, ro_compat = u32(0x60), u32(0x64)
    inode_size = int.from_bytes(sb[0x58:0x5A], "little") if u32(0x4C) >= 1 else 128
    blocks = u32(0x04) | ((u32(0x150) << 32) if incompat & INCOMPAT_64BIT else 0)
    if log_bs > 6 or not bpg or not ipg or not 128 <= inode_size <= 65536 or not blocks:
        return None                                  # not a superblock e2fsprogs would take
    return ExtSuper(1024 << log_bs, blocks, bpg, ipg, inode_size,
                    bool(ro_compat & (RO_COMPAT_GDT_CSUM | RO_COMPAT_METADATA_CSUM)))


def space_needed(sb: ExtSuper, size: int, data: int, cluster: int) -> int:
    """Free space growing ``sb`` to ``size`` bytes can take: the working copy (``data``
    bytes of guest data, plus the new groups' bitmaps -- and their inode tables, which
    resize2fs zeroes unless the file system has group checksums) and the clusters that
    change in the overlay (a new group's bitmaps and descriptors touch at most a couple
    of clusters), with 16 MiB to spare for each."""
    group = sb.blocks_per_group * sb.block_size
    groups = ceil_div(max(0, size - sb.size), group)
    itables = 0 if sb.group_csum else groups * sb.inodes_per_group * sb.inode_size
    working = data + itables + groups * 2 * sb.block_size + (16 << 20)
    overlay = groups * 2 * cluster + (16 << 20)
    return working + overlay


def _working_file(directory: str) -> int:
    """An anonymous read-write file in ``directory`` (gone when its descriptor closes)."""
    o_tmpfile = getattr(os, "O_TMPFILE", 0)
    if o_tmpfile:
        try:
            return os.open(directory, o_tmpfile | os.O_RDWR | os.O_CLOEXEC, 0o600)
        except OSError as exc:
            if exc.errno not in (errno.EOPNOTSUPP, errno.EISDIR, errno.EINVAL):
                raise
    fd, path = make_temp("disk.grow", directory)
    os.unlink(path)
    return fd


def _run_on_fd(args, fd: int, *, ok=(0,)) -> None:
    path = f"/dev/fd/{fd}"
    try:
        res = subprocess.run([*args, path], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                             text=True, pass_fds=(fd,))
    except FileNotFoundError:
        raise ToolError(f"{args[0]} is not installed") from None
    if res.returncode not in ok:
        msg = (res.stderr.strip() or res.stdout.strip()).splitlines()
        raise ToolError(f"{' '.join(args)} on the working copy failed (exit "
                        f"{res.returncode}): {msg[-1] if msg else '?'}")


def _data_regions(fd: int, size: int):
    """(start, end) of the data regions of a file (SEEK_DATA/SEEK_HOLE)."""
    pos = 0
    while pos < size:
        try:
            start = os.lseek(fd, pos, os.SEEK_DATA)
        except OSError as exc:
            if exc.errno == errno.ENXIO:
                return
            if exc.errno == errno.EINVAL:         # no SEEK_DATA here: all of it is data
                yield pos, size
                return
            raise
        end = min(size, os.lseek(fd, start, os.SEEK_HOLE))
        if end > start:
            yield start, end
        pos = end


def _merge(ranges, align: int, size: int):
    """Sort, widen to ``align`` boundaries and merge overlapping (start, end) ranges."""
    out: list[list[int]] = []
    for a, b in sorted(ranges):
        a = a // align * align
        b = min(size, round_up(b, align))
        if out and a <= out[-1][1]:
            out[-1][1] = max(out[-1][1], b)
        else:
            out.append([a, b])
    return out


def _write_back(img, fd: int, ranges, cluster: int) -> int:
    """Write into ``img`` the clusters of ``ranges`` where the working file differs;
    returns the number of bytes written."""
    mine = bytearray(CHUNK)
    theirs = bytearray(CHUNK)
    written = 0
    for a, b in ranges:
        pos = a
        while pos < b:
            n = min(CHUNK, b - pos)
            mv_w, mv_g = memoryview(mine)[:n], memoryview(theirs)[:n]
            got = os.preadv(fd, [mv_w], pos)
            if got < n:                           # past the end of the working file
                mv_w[got:] = bytes(n - got)
            img.readinto(mv_g, pos)
            # (bytearray comparison is a memcmp; memoryview's is ~100x slower)
            if (mine != theirs) if n == CHUNK else (mine[:n] != theirs[:n]):
                run = None                        # [start, end) of differing clusters
                for off in range(0, n, cluster):
                    end = min(n, off + cluster)
                    if mine[off:end] != theirs[off:end]:
                        run = [run[0], end] if run else [off, end]
                        continue
                    if run:
                        img.pwrite(mv_w[run[0]:run[1]], pos + run[0])
                        written += run[1] - run[0]
                        run = None
                if run:
                    img.pwrite(mv_w[run[0]:run[1]], pos + run[0])
                    written += run[1] - run[0]
            pos += n
    return written


def grow_qcow2_fs(path: str) -> dict | None:
    """Grow the unpartitioned ext2/3/4 inside the qcow2 disk ``path`` to its virtual size.

    Returns None when there is no such file system or it already fills the disk, else
    ``{"compared": bytes, "written": bytes}`` (guest bytes compared, bytes written into
    the overlay).
    """
    return grow_image_fs(path, "qcow2", os.path.dirname(os.path.abspath(path)))


def grow_image_fs(name: str, fmt: str, workdir: str) -> dict | None:
    """:func:`grow_qcow2_fs` for any image the engine writes: a qcow2 file, or a raw
    RBD image (``rbd:`` name) whose working copy lives in ``workdir``."""
    import qcow2
    with qcow2.open(name, format=fmt, force_share=True) as img:
        sb = read_ext_super(img)
        if sb is None or img.size - sb.size < sb.block_size:
            return None
        size = img.size
        cluster = getattr(img, "cluster_size", RAW_GRAIN)
        data = sum(e.length for e in img.extents() if e.data and not e.zero)
    check_space(workdir, space_needed(sb, size, data, cluster),
                f"growing the file system of {name}")
    fd = _working_file(workdir)
    try:
        os.ftruncate(fd, size)
        qcow2.convert(name, f"/proc/self/fd/{fd}", src_format=fmt, out_format="raw",
                      no_create=True, target_is_zero=True, cache="unsafe", force_share=True)
        _run_on_fd(["e2fsck", "-fp"], fd, ok=(0, 1, 2))
        _run_on_fd(["resize2fs"], fd)
        with qcow2.open(name, "r+", format=fmt) as img:
            ranges = list(_data_regions(fd, size))
            ranges += [(e.start, e.start + e.length) for e in img.extents()
                       if e.data and not e.zero]
            ranges = _merge(ranges, cluster, size)
            written = _write_back(img, fd, ranges, cluster)
            img.flush()
        return {"compared": sum(b - a for a, b in ranges), "written": written}
    finally:
        os.close(fd)
