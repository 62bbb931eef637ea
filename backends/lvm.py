"""LVM logical volumes as stores (lvm2's command-line tools through subprocess).

``create_volume(vg, name, size)`` / ``remove_volume`` / ``list_volumes`` manage the
volumes; :class:`BlockDeviceBackend` does positional I/O on a volume (or any block
device), with ``zero_range`` through the BLKZEROOUT ioctl (the device zeroes the range
however it does it best; a plain write of zeros where the ioctl is refused).
"""

from __future__ import annotations

import fcntl
import os
import struct
import subprocess

from .base import Backend

BLKGETSIZE64 = 0x80081272
BLKZEROOUT = 0x127F


def _run(args) -> str:
    env = dict(os.environ, LVM_SUPPRESS_FD_WARNINGS="1")
    res = subprocess.run(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                         env=env, close_fds=True)
    if res.returncode != 0:
        raise OSError(res.returncode, f"{' '.join(args)}: {res.stderr.strip() or 'failed'}")
    return res.stdout


def volume_path(vg: str, name: str) -> str:
    return f"/dev/{vg}/{name}"


def create_volume(vg: str, name: str, size: int) -> str:
    """Create a volume of at least ``size`` bytes (rounded up to whole extents)."""
    _run(["lvcreate", "-y", "-q", "-W", "n", "-Z", "n", "-L", f"{size}b", "-n", name, vg])
    return volume_path(vg, name)


def remove_volume(vg: str, name: str) -> None:
    _run(["lvremove", "-f", "-q", f"{vg}/{name}"])


def list_volumes(vg: str) -> list[str]:
    out = _run(["lvs", "--noheadings", "-o", "lv_name", vg])
    return [line.strip() for line in out.splitlines() if line.strip()]


class BlockDeviceBackend(Backend):
    """Positional I/O on a block device (an LVM volume)."""

    def __init__(self, path: str, *, writable: bool = False):
        self.name = path
        self.writable = writable
        self.fd = os.open(path, (os.O_RDWR if writable else os.O_RDONLY) | os.O_CLOEXEC)

    @property
    def fileno_or_none(self) -> int | None:
        return self.fd

    def size(self) -> int:
        buf = fcntl.ioctl(self.fd, BLKGETSIZE64, b"\0" * 8)
        return struct.unpack("Q", buf)[0]

    def readinto(self, buf, offset: int) -> int:
        return os.preadv(self.fd, [buf], offset)

    def pwrite(self, data, offset: int) -> int:
        mv = memoryview(data)
        done = 0
        while done < len(mv):
            done += os.pwrite(self.fd, mv[done:], offset + done)
        return done

    def zero_range(self, offset: int, length: int) -> None:
        """Make [offset, offset+length) read as zeros."""
        if length <= 0:
            return
        try:
            fcntl.ioctl(self.fd, BLKZEROOUT, struct.pack("QQ", offset, length))
            return
        except OSError:
            pass
        zeros = bytes(1 << 20)
        end = offset + length
        while offset < end:
            n = min(len(zeros), end - offset)
            self.pwrite(zeros[:n], offset)
            offset += n

    def flush(self) -> None:
        os.fsync(self.fd)

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1
