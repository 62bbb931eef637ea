"""The file protocol's creation hints (``-o nocow=on``, ``-o extent_size_hint=SIZE``),
applied to a created image file as QEMU's file driver applies them: best effort, on
the file systems that have them (btrfs's no-copy-on-write flag, XFS's extent size
hint); elsewhere they change nothing and are not an error.  ``extent_size_hint=0``
means no hint.  A failure to set a hint given explicitly is returned as a warning."""

from __future__ import annotations

import fcntl
import os
import struct

_FS_IOC_GETFLAGS = 0x80086601
_FS_IOC_SETFLAGS = 0x40086602
_FS_NOCOW_FL = 0x00800000
_FS_IOC_FSGETXATTR = 0x801C581F
_FS_IOC_FSSETXATTR = 0x401C5820
_FS_XFLAG_EXTSIZE = 0x00000800
_FSXATTR = struct.Struct("=IIIII8s")          # struct fsxattr (28 bytes)


def apply_file_hints(path: str, *, nocow: bool = False,
                     extent_size_hint: int | None = None) -> str | None:
    """Set the hints on ``path``; returns a warning (qemu-img's words) or None."""
    if not nocow and not extent_size_hint:
        return None
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except OSError:
        return None
    try:
        if nocow:
            try:
                flags = struct.unpack("=l", fcntl.ioctl(fd, _FS_IOC_GETFLAGS, b"\0" * 8)[:4])[0]
                fcntl.ioctl(fd, _FS_IOC_SETFLAGS, struct.pack("=l", flags | _FS_NOCOW_FL)
                            + b"\0" * 4)
            except OSError:
                pass                            # (valid only on btrfs)
        if extent_size_hint:
            try:
                raw = fcntl.ioctl(fd, _FS_IOC_FSGETXATTR, b"\0" * _FSXATTR.size)
                xflags, _ext, nextents, projid, cow, pad = _FSXATTR.unpack(raw)
                fcntl.ioctl(fd, _FS_IOC_FSSETXATTR, _FSXATTR.pack(
                    xflags | _FS_XFLAG_EXTSIZE, extent_size_hint, nextents, projid, cow, pad))
            except OSError as exc:
                if exc.errno not in (25, 95):  # ENOTTY, EOPNOTSUPP: no such hint here
                    return f"Failed to set extent size hint: {exc.strerror}"
    finally:
        os.close(fd)
    return None


__all__ = ["apply_file_hints"]
