"""Regular files and block devices through positional system calls."""

from __future__ import annotations

import errno
import os
import stat

from .base import Backend

TYPE_CHECKING = False
if TYPE_CHECKING:        # (importing typing costs every CLI process ~3 ms)
    from typing import Hashable, Iterator

_SEEK_DATA = getattr(os, "SEEK_DATA", 3)
_SEEK_HOLE = getattr(os, "SEEK_HOLE", 4)
_DEVICE_BLOCK = 4096        # a multiple of every logical block size Linux supports


#: buffers per pwritev call (Linux's UIO_MAXIOV)
_IOV_MAX = 1024


class FileBackend(Backend):
    """A file opened by path (or an already open descriptor).

    Reads use ``os.preadv`` straight into the caller's buffer (no copies); the
    descriptor is shared safely between threads because every call is positional.
    """

    def __init__(self, path: str | os.PathLike | None = None, *, writable: bool = False,
                 fd: int | None = None, create: bool = False, name: str | None = None):
        if fd is None:
            if path is None:
                raise ValueError("FileBackend needs a path or an fd")
            flags = os.O_RDWR if writable else os.O_RDONLY
            if create:
                flags |= os.O_CREAT
            flags |= getattr(os, "O_CLOEXEC", 0)
            fd = os.open(path, flags, 0o644)
            self._owns_fd = True
        else:
            self._owns_fd = False
        self.fd = fd
        self.path = os.fspath(path) if path is not None else None
        self.name = name or (self.path if self.path is not None else f"<fd {fd}>")
        self.writable = writable
        st = os.fstat(fd)
        if stat.S_ISDIR(st.st_mode):
            # opening a directory read-only succeeds; refuse here, not at the first read
            if self._owns_fd:
                os.close(fd)
            self.fd = -1
            raise IsADirectoryError(errno.EISDIR, os.strerror(errno.EISDIR), self.name)
        self.is_block_device = stat.S_ISBLK(st.st_mode)
        self._seek_data_ok: bool | None = None

    # -- capabilities ------------------------------------------------------
    @property
    def can_seek_data(self) -> bool:
        return not self.is_block_device

    @property
    def can_punch_holes(self) -> bool:
        return self.writable and hasattr(os, "posix_fallocate")

    @property
    def can_resize(self) -> bool:
        return self.writable and not self.is_block_device

    def fileno(self) -> int:
        return self.fd

    def identity(self) -> Hashable:
        """The file itself (device and inode), whatever name opened it."""
        st = os.fstat(self.fd)
        return ("file", st.st_dev, st.st_ino)

    def lock(self, *, write: bool, force_share: bool = False) -> None:
        """Take QEMU-compatible image locks: a reader excludes writers (unless
        ``force_share``), a writer excludes every other writer and reader."""
        from . import qemu_locks as L
        if write:
            perm = L.PERM_CONSISTENT_READ | L.PERM_WRITE | L.PERM_RESIZE
            shared = L.PERM_CONSISTENT_READ | L.PERM_WRITE_UNCHANGED
        elif force_share:
            return
        else:
            perm = L.PERM_CONSISTENT_READ
            shared = L.PERM_ALL & ~L.PERM_WRITE & ~L.PERM_RESIZE
        L.apply_locks(self.fd, perm, shared, self.name)

    # -- reading -----------------------------------------------------------
    def size(self) -> int:
        if self.is_block_device:
            return os.lseek(self.fd, 0, os.SEEK_END)
        return os.fstat(self.fd).st_size

    def readinto(self, buf, offset: int) -> int:
        mv = memoryview(buf).cast("B")
        total = 0
        n = len(mv)
        while total < n:
            got = os.preadv(self.fd, [mv[total:]], offset + total)
            if got == 0:
                break
            total += got
        return total

    def allocated_size(self) -> int:
        return os.fstat(self.fd).st_blocks * 512

    def data_regions(self, start: int = 0, end: int | None = None) -> Iterator[tuple[int, int]]:
        start, end = self.clip(start, end)
        if start >= end:
            return
        if not self.can_seek_data or self._seek_data_ok is False:
            yield (start, end - start)
            return
        pos = start
        while pos < end:
            try:
                data = os.lseek(self.fd, pos, _SEEK_DATA)
            except OSError as exc:
                if exc.errno == errno.ENXIO:  # no data after pos
                    return
                if exc.errno in (errno.EINVAL, errno.EOPNOTSUPP):
                    self._seek_data_ok = False
                    yield (pos, end - pos)
                    return
                raise
            if data >= end:
                return
            try:
                hole = os.lseek(self.fd, data, _SEEK_HOLE)
            except OSError as exc:
                if exc.errno == errno.ENXIO:
                    hole = end
                else:
                    raise
            hole = min(hole, end)
            if hole <= data:  # defensive: the file changed under us
                hole = end
            yield (data, hole - data)
            pos = hole

    # -- writing -----------------------------------------------------------
    def pwrite(self, data, offset: int) -> int:
        if not self.writable:
            return super().pwrite(data, offset)
        mv = memoryview(data).cast("B")
        total = 0
        while total < len(mv):
            total += os.pwritev(self.fd, [mv[total:]], offset + total)
        return total

    def pwritev(self, parts, offset: int) -> int:
        if not self.writable:
            return super().pwritev(parts, offset)
        views = [v for v in (memoryview(p).cast("B") for p in parts) if len(v)]
        total = i = 0
        while i < len(views):
            n = os.pwritev(self.fd, views[i:i + _IOV_MAX], offset + total)
            if n <= 0:
                raise OSError(errno.EIO, "a write made no progress", self.name)
            total += n
            while i < len(views) and n >= len(views[i]):    # what went out whole
                n -= len(views[i])
                i += 1
            if n:
                views[i] = views[i][n:]
        return total

    def truncate(self, size: int) -> None:
        if not self.writable:
            return super().truncate(size)
        os.ftruncate(self.fd, size)

    def punch_hole(self, offset: int, length: int) -> None:
        from . import fallocate         # (ctypes: not on the CLI's start path)
        if self.is_block_device:
            # a device deallocates whole blocks only: zeros are written around them
            a = min((offset + _DEVICE_BLOCK - 1) // _DEVICE_BLOCK * _DEVICE_BLOCK,
                    offset + length)
            b = max(a, (offset + length) // _DEVICE_BLOCK * _DEVICE_BLOCK)
            self.write_zeros(offset, a - offset)
            self.write_zeros(b, offset + length - b)
            offset, length = a, b - a
            if not length:
                return
        fallocate.punch_hole(self.fd, offset, length)

    def allocate(self, offset: int, length: int) -> None:
        if self.is_block_device:
            # a device's blocks all exist already; it cannot grow
            if offset + length > self.size():
                raise OSError(errno.ENOSPC, "past the end of the device", self.name)
            return
        from . import fallocate
        fallocate.allocate(self.fd, offset, length)

    def flush(self) -> None:
        # fdatasync, as QEMU: the data and what is needed to read it back (size,
        # allocation) are durable; only time stamps may lag.  A full fsync per
        # ordering step cost an overlay's resize 11 inode-metadata flushes.
        if self.writable:
            os.fdatasync(self.fd)

    def close(self) -> None:
        if self._owns_fd and self.fd >= 0:
            os.close(self.fd)
        self.fd = -1

    def __del__(self):
        try:
            self.close()
        except Exception:  # noqa: BLE001 - interpreter shutdown
            pass
