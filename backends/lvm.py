"""LVM logical volumes as stores (lvm2's command-line tools through subprocess).

``create_volume(vg, name, size)`` / ``remove_volume`` / ``list_volumes`` manage the
volumes; :class:`BlockDeviceBackend` does positional I/O on a volume (or any block
device; a regular file works too, for tests), with ``zero_range`` through the
BLKZEROOUT ioctl (the device zeroes the range however it does it best; a plain write
of zeros where the ioctl is refused).
"""

from __future__ import annotations

import fcntl
import os
import struct
import subprocess

from .file import FileBackend

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


class BlockDeviceBackend(FileBackend):
    """Positional I/O on a block device (an LVM volume): a file backend whose size is
    the device's and that zeroes ranges with the device's own command."""

    def __init__(self, path: str, *, writable: bool = False):
        super().__init__(path, writable=writable)

    def size(self) -> int:
        if not self.is_block_device:
            return super().size()
        buf = fcntl.ioctl(self.fd, BLKGETSIZE64, b"\0" * 8)
        return struct.unpack("Q", buf)[0]

    def zero_range(self, offset: int, length: int) -> None:
        """Make [offset, offset+length) read as zeros."""
        if length <= 0:
            return
        if self.is_block_device:
            try:
                fcntl.ioctl(self.fd, BLKZEROOUT, struct.pack("QQ", offset, length))
                return
            except OSError:
                pass
        self.write_zeros(offset, length)
