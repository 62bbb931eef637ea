"""Image locking compatible with QEMU's file-posix driver.

QEMU marks what each open of an image file does with shared OFD byte-range locks:
byte 100+i means "I hold permission i", byte 200+i means "I do not let others hold
permission i".  A process may take a permission only if nobody locks its "unshared"
byte, and may refuse to share one only if nobody holds it.  Using the same bytes
makes a writer here exclude a running VM or qemu-img writer, and the other way round.
"""

from __future__ import annotations

import errno
import fcntl
import os
import struct

PERM_CONSISTENT_READ = 0x1
PERM_WRITE = 0x2
PERM_WRITE_UNCHANGED = 0x4
PERM_RESIZE = 0x8
PERM_ALL = 0xF
_NAMES = {0: "consistent read", 1: "write", 2: "write unchanged", 3: "resize"}

_PERM_BASE = 100
_SHARED_BASE = 200
_F_OFD_GETLK = 36
_F_OFD_SETLK = 37
_F_RDLCK, _F_WRLCK, _F_UNLCK = 0, 1, 2
_FLOCK = struct.Struct("hhqqi4x")


class LockError(OSError):
    pass


def _flock(fd: int, cmd: int, ltype: int, start: int) -> int:
    res = fcntl.fcntl(fd, cmd, _FLOCK.pack(ltype, os.SEEK_SET, start, 1, 0))
    return _FLOCK.unpack(res)[0]


def _held_by_other(fd: int, byte: int) -> bool:
    return _flock(fd, _F_OFD_GETLK, _F_WRLCK, byte) != _F_UNLCK


def apply_locks(fd: int, perm: int, shared: int, name: str) -> None:
    """Check for conflicts, then take the lock bytes for ``perm`` / ``~shared``."""
    unshared = PERM_ALL & ~shared
    try:
        for i in range(4):
            if perm & (1 << i) and _held_by_other(fd, _SHARED_BASE + i):
                raise LockError(errno.EAGAIN,
                                f"Failed to get \"{_NAMES[i]}\" lock: is another process "
                                f"using the image [{name}]?")
            if unshared & (1 << i) and _held_by_other(fd, _PERM_BASE + i):
                raise LockError(errno.EAGAIN,
                                f"Failed to get shared \"{_NAMES[i]}\" lock: is another "
                                f"process using the image [{name}]?")
        for i in range(4):
            if perm & (1 << i):
                _flock(fd, _F_OFD_SETLK, _F_RDLCK, _PERM_BASE + i)
            if unshared & (1 << i):
                _flock(fd, _F_OFD_SETLK, _F_RDLCK, _SHARED_BASE + i)
    except OSError as exc:
        if isinstance(exc, LockError):
            raise
        if exc.errno in (errno.EINVAL, errno.ENOTSUP, errno.ENOLCK):
            return      # no OFD locks on this file system: QEMU also goes on unlocked
        if exc.errno in (errno.EAGAIN, errno.EACCES):
            raise LockError(exc.errno, f"Failed to lock the image [{name}]: another process "
                                       f"is using it") from None
        raise
