"""The file under check, and its header as QEMU reads it in check mode (no numpy: the
quick check (:mod:`qcow2.checker.quick`) and the CLI's start use these alone)."""

from __future__ import annotations

import struct

from .. import constants as C
from ..header import Header


class CheckedFile:
    """The image file: reads zero-filled past the end (as QEMU's block layer does)."""

    def __init__(self, be):
        self.be = be
        self.size = be.size()
        self.writable = be.writable
        self.signaled = False           # a corruption was reported (once per open)
        self.marked_corrupt = False

    def read(self, n: int, offset: int) -> bytes:
        if n <= 0:
            return b""
        if offset >= self.size:
            return bytes(n)
        data = self.be.pread(n, offset)
        if len(data) < n:
            data = data + bytes(n - len(data))
        return data

    def write(self, data, offset: int) -> None:
        self.be.pwrite(data, offset)
        end = offset + len(data)
        if end > self.size:
            self.size = end

    def sync(self) -> None:
        self.be.flush()

    def truncate(self, size: int) -> None:
        self.be.truncate(size)
        self.size = size


class Window:
    """Sequential small reads (the snapshot table) served from 1 MiB windows."""

    def __init__(self, f: CheckedFile):
        self.f = f
        self.start = 0
        self.buf = b""

    def read(self, n: int, offset: int) -> bytes:
        if not (self.start <= offset and offset + n <= self.start + len(self.buf)):
            self.start = offset
            self.buf = self.f.read(max(n, 1 << 20), offset)
        return self.buf[offset - self.start:offset - self.start + n]


def read_header(f: CheckedFile) -> Header:
    """The header as QEMU parses it in check mode: the snapshot table fields are left
    to the check (a broken table is reported there, not refused at open)."""
    lo, n = C.HDR_NB_SNAPSHOTS, C.HDR_SNAPSHOTS_OFFSET + 8 - C.HDR_NB_SNAPSHOTS

    def read(size: int, offset: int) -> bytes:
        data = f.be.pread(size, offset)
        if offset <= lo < offset + len(data):
            b = bytearray(data)
            at = lo - offset
            b[at:at + n] = bytes(min(n, len(b) - at))
            data = bytes(b)
        return data

    h = Header.parse(read, f.size)
    h.nb_snapshots, h.snapshots_offset = struct.unpack(">IQ", f.read(n, lo))
    return h
