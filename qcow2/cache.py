"""A bounded write-back cache of metadata tables (L2 tables, refcount blocks).

Tables are cluster-sized ``bytearray`` objects keyed by their host offset.  Dirty
tables are written back only by :meth:`TableCache.write_dirty`, which the image calls
from its ordered flush (refcount blocks before the L2 tables that depend on them,
L2 tables before the L1 entries that point at them).  When the cache is over its
budget and every evictable table is dirty, :meth:`get` asks the owner to flush
(``on_pressure``) instead of writing a table out of order.
"""

from __future__ import annotations

TYPE_CHECKING = False
if TYPE_CHECKING:        # (importing typing costs every CLI process ~3 ms)
    from typing import Callable


class TableCache:
    """Tables of ``table_size`` bytes, at most ``max_bytes`` of them (at least 8 tables):
    ``read(n, offset)`` loads one, ``write(data, offset)`` writes one back."""

    def __init__(self, table_size: int, max_bytes: int, read: Callable[[int, int], bytes],
                 write: Callable[[bytes, int], None],
                 on_pressure: Callable[[], None] | None = None):
        self.table_size = table_size
        self.max_tables = max(8, max_bytes // table_size)
        self._read = read
        self._write = write
        self.on_pressure = on_pressure
        # insertion order is recency order (a hit moves its table to the end); a
        # plain dict: collections.OrderedDict would cost every CLI start its import
        self._tables: dict[int, bytearray] = {}
        self._dirty: set[int] = set()

    def __contains__(self, offset: int) -> bool:
        return offset in self._tables

    def get(self, offset: int) -> bytearray:
        t = self._tables.pop(offset, None)
        if t is not None:
            self._tables[offset] = t
            return t
        self._make_room()
        raw = self._read(self.table_size, offset)
        t = bytearray(raw)
        if len(t) < self.table_size:
            t.extend(bytes(self.table_size - len(t)))
        self._tables[offset] = t
        return t

    def put_new(self, offset: int, data: bytes | bytearray | None = None) -> bytearray:
        """Install a table that exists only in memory so far (a freshly allocated one)."""
        self._make_room()
        t = bytearray(data) if data is not None else bytearray(self.table_size)
        if len(t) != self.table_size:
            raise ValueError("table size mismatch")
        self._tables[offset] = t
        self._dirty.add(offset)
        return t

    def mark_dirty(self, offset: int) -> None:
        if offset not in self._tables:
            raise KeyError(offset)
        self._dirty.add(offset)

    def drop(self, offset: int) -> None:
        """Forget a table (its cluster was freed); a dirty copy is discarded."""
        self._tables.pop(offset, None)
        self._dirty.discard(offset)

    @property
    def dirty_count(self) -> int:
        return len(self._dirty)

    def write_dirty(self) -> int:
        """Write every dirty table (in offset order); returns how many were written."""
        n = 0
        for off in sorted(self._dirty):
            self._write(self._tables[off], off)
            n += 1
        self._dirty.clear()
        return n

    def clear(self) -> None:
        self._tables.clear()
        self._dirty.clear()

    def _make_room(self) -> None:
        if len(self._tables) < self.max_tables:
            return
        # evict the least recently used clean table
        for off in self._tables:
            if off not in self._dirty:
                del self._tables[off]
                return
        # everything is dirty: let the owner run its ordered flush, then evict
        if self.on_pressure is not None:
            self.on_pressure()
        for off in self._tables:
            if off not in self._dirty:
                del self._tables[off]
                return
        # still all dirty (no owner): grow beyond the budget rather than break ordering
