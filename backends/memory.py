"""An in-memory store: images that live in a ``bytearray`` (tests, models, scratch
images, images received over the network), and the reference every other backend is
compared with in the conformance tests."""

from __future__ import annotations

import errno

from .base import Backend, ResizableWhenWritable


class MemoryBackend(ResizableWhenWritable, Backend):
    """A growable byte buffer.  ``getvalue()`` returns the bytes; ``close()`` has
    nothing to release (the buffer stays readable), locks and flushes are no-ops."""

    def __init__(self, data: bytes | bytearray = b"", *, writable: bool = True,
                 name: str = "<memory>"):
        self._buf = bytearray(data)
        self.writable = writable
        self.name = name

    def size(self) -> int:
        return len(self._buf)

    def readinto(self, buf, offset: int) -> int:
        mv = memoryview(buf).cast("B")
        if offset >= len(self._buf):
            return 0
        n = min(len(mv), len(self._buf) - offset)
        mv[:n] = memoryview(self._buf)[offset:offset + n]
        return n

    def _refuse_read_only(self) -> None:
        if not self.writable:
            raise OSError(errno.EROFS, "backend is read-only", self.name)

    def pwrite(self, data, offset: int) -> int:
        self._refuse_read_only()
        mv = memoryview(data).cast("B")
        end = offset + len(mv)
        if end > len(self._buf):
            self._buf.extend(bytes(end - len(self._buf)))
        self._buf[offset:end] = mv
        return len(mv)

    def truncate(self, size: int) -> None:
        self._refuse_read_only()
        if size < len(self._buf):
            del self._buf[size:]
        else:
            self._buf.extend(bytes(size - len(self._buf)))

    def punch_hole(self, offset: int, length: int) -> None:
        self._refuse_read_only()
        end = min(offset + length, len(self._buf))
        if offset < end:
            self._buf[offset:end] = bytes(end - offset)

    def getvalue(self) -> bytes:
        """A copy of the whole store."""
        return bytes(self._buf)
