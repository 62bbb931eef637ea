"""An in-memory backend: for tests, models and scratch images."""

from __future__ import annotations

from .base import Backend


class MemoryBackend(Backend):
    def __init__(self, data: bytes | bytearray = b"", *, writable: bool = True, name: str = "<memory>"):
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
        mv[:n] = self._buf[offset:offset + n]
        return n

    def pwrite(self, data, offset: int) -> int:
        if not self.writable:
            return super().pwrite(data, offset)
        mv = memoryview(data).cast("B")
        end = offset + len(mv)
        if end > len(self._buf):
            self._buf.extend(bytes(end - len(self._buf)))
        self._buf[offset:end] = mv
        return len(mv)

    def truncate(self, size: int) -> None:
        if not self.writable:
            return super().truncate(size)
        if size < len(self._buf):
            del self._buf[size:]
        else:
            self._buf.extend(bytes(size - len(self._buf)))

    @property
    def can_punch_holes(self) -> bool:
        return self.writable

    def punch_hole(self, offset: int, length: int) -> None:
        end = min(offset + length, len(self._buf))
        if offset < end:
            self._buf[offset:end] = bytes(end - offset)

    def getvalue(self) -> bytes:
        return bytes(self._buf)
