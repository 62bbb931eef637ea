"""Reading refcounts (spec: "Host cluster management").

The write path extends this with allocation; reading is needed for metadata
preallocation detection (qemu-img map semantics) and for check.
"""

from __future__ import annotations

import struct

from . import constants as C
from .errors import CorruptImageError


class RefcountReader:
    def __init__(self, header, read, file_size: int):
        self.h = header
        self._read = read
        self.file_size = file_size
        self.cluster_size = header.cluster_size
        self.bits = header.refcount_bits
        # entries per refcount block
        self.block_entries = self.cluster_size * 8 // self.bits
        self._table: tuple[int, ...] | None = None
        self._blocks: dict[int, bytes] = {}

    def table(self) -> tuple[int, ...]:
        if self._table is None:
            n = self.h.refcount_table_clusters * self.cluster_size // 8
            off = self.h.refcount_table_offset
            if off + n * 8 > self.file_size:
                raise CorruptImageError(
                    f"refcount table at {off:#x} ({n} entries) extends past the end of the "
                    f"file (size {self.file_size:#x})", offset=off, size=n * 8,
                    what="refcount table")
            raw = self._read(n * 8, off)
            self._table = struct.unpack(f">{n}Q", raw)
        return self._table

    def block(self, index: int) -> bytes | None:
        """The refcount block for table index ``index``, None if unallocated."""
        table = self.table()
        if index >= len(table):
            return None
        off = table[index] & C.REFT_OFFSET_MASK
        if off == 0:
            return None
        if off & (self.cluster_size - 1):
            raise CorruptImageError(
                f"refcount block {index} offset {off:#x} unaligned", offset=off,
                what="refcount table entry")
        if off + self.cluster_size > self.file_size:
            raise CorruptImageError(
                f"refcount block {index} at {off:#x} extends past the end of the file "
                f"(size {self.file_size:#x})", offset=off, size=self.cluster_size,
                what="refcount block")
        blk = self._blocks.get(index)
        if blk is None:
            blk = self._read(self.cluster_size, off)
            if len(self._blocks) > 64:
                self._blocks.clear()
            self._blocks[index] = blk
        return blk

    def count_referenced(self, end_cluster: int, stop_at: int) -> int:
        """Number of clusters below ``end_cluster`` with a nonzero refcount,
        counting no further than ``stop_at``."""
        import numpy as np

        count = 0
        per = self.block_entries
        for bi in range((end_cluster + per - 1) // per):
            blk = self.block(bi)
            if blk is None:
                continue
            n = min(per, end_cluster - bi * per)
            count += int(np.count_nonzero(_decode(blk, self.bits)[:n]))
            if count >= stop_at:
                break
        return count


def _decode(block: bytes, bits: int):
    import numpy as np

    raw = np.frombuffer(block, dtype=np.uint8)
    if bits >= 8:
        return np.frombuffer(block, dtype=f">u{bits // 8}")
    # sub-byte widths: entry i lives at bit (i * bits) % 8 of byte i*bits//8, LSB first
    per = 8 // bits
    shifts = np.arange(per, dtype=np.uint8) * bits
    return ((raw[:, None] >> shifts) & ((1 << bits) - 1)).reshape(-1)
