"""The backend interface."""

from __future__ import annotations

import abc
TYPE_CHECKING = False
if TYPE_CHECKING:        # (importing typing costs every CLI process ~3 ms)
    from typing import Iterator


class Backend(abc.ABC):
    """A byte store with positional reads and writes.

    Capability properties tell callers what the store can do cheaply, so that
    operations pick the best strategy (hole punching, SEEK_DATA, copy offload)
    without probing by trial and error.
    """

    #: a name for messages (usually the path)
    name: str = "<backend>"
    #: opened for writing
    writable: bool = False

    # -- capabilities ------------------------------------------------------
    @property
    def can_seek_data(self) -> bool:
        """Holes can be found cheaply (``data_regions`` is not just one run)."""
        return False

    @property
    def can_punch_holes(self) -> bool:
        return False

    @property
    def fileno_or_none(self) -> int | None:
        """A file descriptor for zero-copy paths (copy_file_range), or None."""
        return None

    def lock(self, *, write: bool, force_share: bool = False) -> None:
        """Take the store's access locks (no-op where the store has none)."""

    # -- reading -----------------------------------------------------------
    @abc.abstractmethod
    def size(self) -> int:
        """Current size in bytes."""

    @abc.abstractmethod
    def readinto(self, buf, offset: int) -> int:
        """Fill ``buf`` from ``offset``; returns bytes read (short only at EOF)."""

    def pread(self, n: int, offset: int) -> bytes:
        buf = bytearray(n)
        got = self.readinto(buf, offset)
        if got < n:
            del buf[got:]
        return bytes(buf)

    def data_regions(self, start: int = 0, end: int | None = None) -> Iterator[tuple[int, int]]:
        """Yield (offset, length) of regions that may hold data; holes are skipped."""
        size = self.size()
        if end is None or end > size:
            end = size
        if start < end:
            yield (start, end - start)

    def allocated_size(self) -> int:
        """Bytes of storage actually used (like st_blocks * 512)."""
        return self.size()

    # -- writing -----------------------------------------------------------
    def pwrite(self, data, offset: int) -> int:
        raise OSError(30, "backend is read-only", self.name)

    def truncate(self, size: int) -> None:
        raise OSError(30, "backend is read-only", self.name)

    def punch_hole(self, offset: int, length: int) -> None:
        raise OSError(95, "hole punching not supported", self.name)

    def flush(self) -> None:
        """Make written data durable."""

    def close(self) -> None:
        """Release the store."""

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
