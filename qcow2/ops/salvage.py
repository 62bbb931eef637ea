"""convert --salvage: a source whose unreadable parts read as zeros.

qemu-img's rule: a read that fails is retried sector by sector (512 bytes); each
sector that still cannot be read is reported ("error while reading offset N: ...")
and converted as zeros.  A read fails on an I/O error or on metadata or data this
engine refuses (a compressed cluster that does not decode, a table that points
outside the file)."""

from __future__ import annotations

import errno
import os

from ..errors import Qcow2Error

SECTOR = 512


class SalvagingImage:
    """``image`` as convert reads it with --salvage (everything else delegated)."""

    def __init__(self, image, warn):
        self._image = image
        self._warn = warn

    def __getattr__(self, name):
        return getattr(self._image, name)

    def readinto(self, buf, offset: int) -> int:
        try:
            return self._image.readinto(buf, offset)
        except (Qcow2Error, OSError):
            pass
        mv = memoryview(buf).cast("B")
        for pos in range(0, len(mv), SECTOR):
            part = mv[pos:pos + SECTOR]
            try:
                self._image.readinto(part, offset + pos)
            except (Qcow2Error, OSError) as exc:
                code = getattr(exc, "errno", None) if isinstance(exc, OSError) else None
                why = os.strerror(code or errno.EIO)
                self._warn(f"error while reading offset {offset + pos}: {why}")
                part[:] = bytes(len(part))
        return len(mv)


__all__ = ["SalvagingImage"]
