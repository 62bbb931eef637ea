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
import tempfile

from .errors import ToolError
from .fetch import check_space

EXT_MAGIC = b"\x53\xef"
EXT_MAGIC_OFFSET = 1024 + 56
CHUNK = 4 << 20


def has_ext_fs(img) -> bool:
    """True when the guest view of ``img`` starts with an ext2/3/4 superblock (the disk
    is unpartitioned: a partition table would be there instead)."""
    if img.size < EXT_MAGIC_OFFSET + 2:
        return False
    return img.pread(2, EXT_MAGIC_OFFSET) == EXT_MAGIC


def _working_file(directory: str) -> int:
    """An anonymous read-write file in ``directory`` (gone when its descriptor closes)."""
    o_tmpfile = getattr(os, "O_TMPFILE", 0)
    if o_tmpfile:
        try:
            return os.open(directory, o_tmpfile | os.O_RDWR | os.O_CLOEXEC, 0o600)
        except OSError as exc:
            if exc.errno not in (errno.EOPNOTSUPP, errno.EISDIR, errno.EINVAL):
                raise
    fd, path = tempfile.mkstemp(prefix=".disk.grow.", suffix=".part", dir=directory)
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
        b = min(size, -(-b // align) * align)
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


def grow_qcow2_fs(path: str, *, old_size: int | None = None) -> dict | None:
    """Grow the unpartitioned ext2/3/4 inside the qcow2 disk ``path`` to its virtual size.

    ``old_size``: the size the file system was made for (the image's virtual size), for
    the free-space estimate.  Returns None when there is no such file system, else
    ``{"compared": bytes, "written": bytes}``.
    """
    import qcow2
    with qcow2.open(path, force_share=True) as img:
        if not has_ext_fs(img):
            return None
        size = img.size
        data = sum(e.length for e in img.extents() if e.data and not e.zero)
    # the working copy holds the guest data; resize2fs adds group metadata for the new
    # space (inode tables, at most 1/64 of it with the default inode ratio, bitmaps,
    # descriptors) and the changed clusters go into the overlay: a margin for each
    growth = max(0, size - (old_size or 0)) // 32 + (16 << 20)
    directory = os.path.dirname(os.path.abspath(path))
    check_space(directory, data + 2 * growth, f"growing the file system of {path}")
    fd = _working_file(directory)
    try:
        os.ftruncate(fd, size)
        qcow2.convert(path, f"/proc/self/fd/{fd}", src_format="qcow2", out_format="raw",
                      no_create=True, target_is_zero=True, cache="unsafe", force_share=True)
        _run_on_fd(["e2fsck", "-fp"], fd, ok=(0, 1, 2))
        _run_on_fd(["resize2fs"], fd)
        with qcow2.open(path, "r+") as img:
            ranges = list(_data_regions(fd, size))
            ranges += [(e.start, e.start + e.length) for e in img.extents()
                       if e.data and not e.zero]
            ranges = _merge(ranges, img.cluster_size, size)
            written = _write_back(img, fd, ranges, img.cluster_size)
            img.flush()
        return {"compared": sum(b - a for a, b in ranges), "written": written}
    finally:
        os.close(fd)
