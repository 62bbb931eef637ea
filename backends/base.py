"""The backend interface: a byte store with positional I/O and capability properties."""

from __future__ import annotations

import abc
import errno

TYPE_CHECKING = False
if TYPE_CHECKING:        # (importing typing costs every CLI process ~3 ms)
    from typing import Hashable, Iterator

_ZERO_CHUNK = 1 << 20


class Backend(abc.ABC):
    """A byte store with positional reads and writes.

    Capability properties tell callers what the store can do cheaply, so that
    operations pick the best strategy (hole punching, SEEK_DATA) without probing by
    trial and error.  Subclasses must supply ``size`` and ``readinto``; a writable
    store also ``pwrite`` and ``truncate``.  What a store cannot do raises ``OSError``
    with an errno (EROFS: read-only, EOPNOTSUPP: not supported, EBADF: closed).
    The operations that mean nothing for some stores (``lock``, ``flush``,
    ``close``) are explicit no-ops here.
    """

    #: a name for messages (usually the path); names stored in an image (its backing
    #: file) are resolved against it as against a path
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
        """``punch_hole`` works (the range then reads as zeros)."""
        return False

    @property
    def can_resize(self) -> bool:
        """``truncate`` works (a block device has the size it has)."""
        return False

    @property
    def preallocation_modes(self) -> tuple[str, ...]:
        """What growing the store may preallocate (qemu-img resize --preallocation):
        "off", "falloc" (``allocate``), "full" (``write_zeros``)."""
        return ("off", "falloc", "full")

    def identity(self) -> Hashable:
        """Which store this is: two backends on the same store (a file opened twice)
        have equal identities (backing chains use it to refuse loops)."""
        return ("object", id(self))

    def lock(self, *, write: bool, force_share: bool = False) -> None:
        """Take the store's access locks.  A store without locks (memory) has nothing
        to take: every open succeeds."""
        return None

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
        start, end = self.clip(start, end)
        if start < end:
            yield (start, end - start)

    def clip(self, start: int, end: int | None) -> tuple[int, int]:
        """``[start, end)`` cut to the store's size (``end`` None: to the end)."""
        size = self.size()
        if end is None or end > size:
            end = size
        return start, end

    def allocated_size(self) -> int:
        """Bytes of storage actually used (like st_blocks * 512)."""
        return self.size()

    # -- writing -----------------------------------------------------------
    def pwrite(self, data, offset: int) -> int:
        """Write all of ``data`` at ``offset`` (the store grows as needed)."""
        raise OSError(errno.EROFS, "backend is read-only", self.name)

    def pwritev(self, parts, offset: int) -> int:
        """Write the buffers ``parts`` one after the other from ``offset`` (a store
        with a descriptor does it without joining them first)."""
        return self.pwrite(b"".join(parts), offset)

    def truncate(self, size: int) -> None:
        """Cut or extend (with zeros) the store to ``size`` bytes."""
        raise OSError(errno.EROFS, "backend is read-only", self.name)

    def punch_hole(self, offset: int, length: int) -> None:
        """Deallocate [offset, offset+length) inside the store; it reads zeros after."""
        raise OSError(errno.EOPNOTSUPP, "hole punching not supported", self.name)

    def allocate(self, offset: int, length: int) -> None:
        """Reserve storage for [offset, offset+length), extending the store if it
        ends before (as posix_fallocate).  A store that allocates as it is written
        (this default) only extends."""
        if self.size() < offset + length:
            self.truncate(offset + length)

    def write_zeros(self, offset: int, length: int) -> None:
        """Write explicit zeros over [offset, offset+length) (allocating them)."""
        zeros = memoryview(bytes(min(length, _ZERO_CHUNK)))
        end = offset + length
        while offset < end:
            n = min(len(zeros), end - offset)
            self.pwrite(zeros[:n], offset)
            offset += n

    def flush(self) -> None:
        """Make written data durable.  A store with nothing below it to sync
        (memory) is always as durable as it gets."""
        return None

    def close(self) -> None:
        """Release the store.  A store holding no resource but memory has nothing to
        release; it stays readable."""
        return None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


class ResizableWhenWritable:
    """Capabilities of a store that punches holes and resizes whenever it is open for
    writing (memory, RBD): mixed in before :class:`Backend`."""

    writable: bool

    @property
    def can_punch_holes(self) -> bool:
        return self.writable

    @property
    def can_resize(self) -> bool:
        return self.writable
