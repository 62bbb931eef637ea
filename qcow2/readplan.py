"""Reads planned from the L2 tables a read-only qcow2 image has already seen: the
lock-free ``pread`` of random small reads, and the read plans an NBD server sends
from (``Image.read_plan``: file pieces for ``sendfile``, zeros, decoded copies).

A mixin of ``qcow2.reader.Qcow2Image``: it works on that class's tables and decoders.
Images that can change under a reader (writable ones), encrypted ones, images with
subclusters or an external data file, and stores without a file descriptor never
take these paths; their reads go the general way (``Qcow2Image._read``).
"""

from __future__ import annotations

import os
import struct

from . import constants as C
from .image import READ_COPY, READ_FILE, READ_ZEROS, add_piece

# any bit but COPIED and the offset: not a plain data entry (compressed, zero, reserved)
_NOT_PLAIN_DATA = ~(C.L2E_OFFSET_MASK | C.OFLAG_COPIED) & 0xFFFFFFFFFFFFFFFF
_L2_MASK = C.L2E_OFFSET_MASK
_unpack_u64 = struct.Struct(">Q").unpack_from
_ZERO_4K = bytes(4096)
_ZERO_VIEW = memoryview(_ZERO_4K)
_pread = os.pread
_preadv = os.preadv


_EMPTY: dict[int, bytes] = {}


def empty_table(size: int) -> bytes:
    """An L2 table of unallocated entries (one per cluster size, shared)."""
    t = _EMPTY.get(size)
    if t is None:
        t = _EMPTY[size] = bytes(size)
    return t


class CompressedPieces:
    """Reads a copy piece of a read plan made of compressed clusters only (in guest
    order) straight from the clusters found by the walk that made the plan; anything
    else (a piece that also holds backing-file bytes) is left to ``readinto``."""

    def __init__(self, img, clusters):
        self.img = img
        self.clusters = clusters
        self.i = 0

    def __call__(self, view, a: int) -> bool:
        cl = self.clusters
        i = self.i
        end = a + len(view)
        while i < len(cl) and cl[i][0] < a:
            i += 1
        j = i
        covered = 0
        while j < len(cl) and cl[j][0] < end:
            covered += cl[j][1]
            j += 1
        self.i = j
        if covered != len(view):
            return False
        step = self.img._batch_max
        for k in range(i, j, step):
            self.img._read_compressed(view, a, cl[k:min(j, k + step)])
        return True


class PlannedReads:
    """``pread``'s fast path and ``read_plan`` for ``Qcow2Image``."""

    _fast = None                # see _fast_state
    _fast_tables: dict | None = None

    def _fast_state(self):
        """What ``pread``'s lock-free path needs, or None where it does not apply: plain
        entries only (no subclusters, data file or encryption), images that never
        change under it (read-only classes), a store with a descriptor."""
        fd = getattr(self.data_be, "fd", None)
        if (self.writable or not self._fast_reads or not isinstance(fd, int)
                or (self.untrusted and self.header.corrupt)):
            return None
        cmask = self.cluster_size - 1
        # bits that make an entry anything but plain, aligned data (the kernel decodes
        # and checks those)
        self._fast_tables = {}          # L1 index -> its L2 table, as seen by _l2_table
        return (self.cluster_bits, self._l2_span_bits, self._l2_entries - 1, cmask,
                _NOT_PLAIN_DATA | cmask, self.size, self._fast_tables.get, self.data_be,
                self.backing is None)

    def _remember(self, l1_index: int, table) -> None:
        """Keep ``table`` for pread's fast path (read-only images: tables never change),
        at most as many as the cache holds (then it starts again)."""
        tables = self._fast_tables
        if len(tables) >= self._l2c.max_tables:
            tables.clear()
        tables[l1_index] = table

    def pread(self, n: int, offset: int) -> bytes:
        """``n`` bytes from guest ``offset`` (fewer only at the end of the disk).

        A read inside one cluster whose L2 table was seen before and whose entry is
        plain data, or unallocated without a backing file, is answered here without a
        lock: one ``os.pread``, or a shared block of zeros (every operation counts: this
        is ~0.5 us over the system call for random 4 KiB reads); anything else goes the
        general way."""
        fast = self._fast
        if fast is not None and n > 0:
            cbits, span_bits, l2_mask, cmask, not_plain, size, tables, be, zeros = fast
            end = offset + n
            if offset >= 0 and offset >> cbits == (end - 1) >> cbits and end <= size:
                table = tables(offset >> span_bits)
                if table is not None:
                    entry = _unpack_u64(table, ((offset >> cbits) & l2_mask) << 3)[0]
                    if not entry & not_plain:
                        host = entry & _L2_MASK
                        if host:
                            data = _pread(be.fd, n, host + (offset & cmask))
                            return data if len(data) == n else data + bytes(n - len(data))
                        if zeros:
                            return _ZERO_4K if n == 4096 else bytes(n)
        return super().pread(n, offset)

    def readinto(self, buf, offset: int) -> int:
        """``pread``'s fast path for a caller's buffer (file objects, buffered readers):
        one ``preadv`` into it, or zeros; anything else goes the general way."""
        fast = self._fast
        if fast is not None and offset >= 0:
            cbits, span_bits, l2_mask, cmask, not_plain, size, tables, be, zeros = fast
            mv = buf if type(buf) is bytearray else memoryview(buf).cast("B")
            n = len(mv)
            end = offset + n
            if n and offset >> cbits == (end - 1) >> cbits and end <= size:
                table = tables(offset >> span_bits)
                if table is not None:
                    entry = _unpack_u64(table, ((offset >> cbits) & l2_mask) << 3)[0]
                    if not entry & not_plain:
                        host = entry & _L2_MASK
                        if host:
                            if _preadv(be.fd, [mv], host + (offset & cmask)) == n:
                                return n
                        elif zeros:
                            if n <= 4096:
                                mv[:] = _ZERO_VIEW[:n]
                            else:
                                mv[:] = bytes(n)
                            return n
        return super().readinto(buf, offset)       # (a short read: the general way)

    def read_plan(self, offset, n, buffer=None):
        """See ``Image.read_plan``: data clusters are file pieces of the data file,
        zero clusters (and unallocated ones without a backing file) zeros, unallocated
        ones the backing file's plan, compressed clusters copies, decoded into
        ``buffer`` from the same walk (one kernel call per L2 table for the range)."""
        fd = getattr(self.data_be, "fd", None)
        if self.writable or self._crypto is not None or not isinstance(fd, int) or n <= 0:
            return super().read_plan(offset, n, buffer)
        if self._fast is not None:
            known = self._known_plan(offset, n)
            if known is not None:
                out, compressed = known
                if buffer is not None and compressed:
                    self._fill_copies(out, buffer, CompressedPieces(self, compressed))
                return out
        self._require_readable()
        out: list = []
        compressed: list = []                   # (guest, length, host, csize)
        for a, ln, kind, host, csize in self._runs(offset, offset + n):
            if kind == C.KIND_DATA:
                add_piece(out, a, ln, READ_FILE, fd, host)
            elif kind == C.KIND_COMPRESSED:
                add_piece(out, a, ln, READ_COPY)
                compressed.append((a, ln, host, csize))
            elif kind in (C.KIND_ZERO, C.KIND_ZERO_ALLOC) or self.backing is None:
                add_piece(out, a, ln, READ_ZEROS)
            else:
                mid = max(a, min(a + ln, self.backing.size))
                if mid > a:
                    for piece in self.backing.read_plan(a, mid - a):
                        add_piece(out, *piece)
                if mid < a + ln:
                    add_piece(out, mid, a + ln - mid, READ_ZEROS)
        if buffer is not None:
            self._fill_copies(out, buffer, CompressedPieces(self, compressed))
        return out

    def _known_plan(self, offset: int, n: int):
        """(plan, compressed clusters) of a short range (up to 64 clusters of one L2
        table seen before) whose entries are plain data, compressed, or unallocated
        without a backing file, decoded here (a request of a few clusters costs less
        than the run kernel's call; no entry of these kinds has a check to fail in a
        trusted image); None for anything else."""
        cbits, span_bits, l2_mask, cmask, not_plain, size, tables, be, zeros = self._fast
        end = offset + n
        first = offset >> cbits
        count = ((end - 1) >> cbits) - first + 1
        if count > 64 or end > size or offset >> span_bits != (end - 1) >> span_bits:
            return None
        table = tables(offset >> span_bits)
        if table is None:
            return None
        fd = be.fd
        out: list = []
        compressed: list = []
        shift = C.L2E_COMPRESSED_FIELD_BITS - (cbits - 8)
        pos = offset
        c = first
        for entry in struct.unpack_from(f">{count}Q", table, (first & l2_mask) << 3):
            c += 1
            stop = c << cbits
            if stop > end:
                stop = end
            if entry & C.OFLAG_COMPRESSED:
                # (compressed_extent's rule, inline: this is the per-request path)
                coff = entry & ((1 << shift) - 1)
                csize = ((((entry >> shift) & ((1 << (cbits - 8)) - 1)) + 1)
                         * C.COMPRESSED_SECTOR_SIZE - (coff & (C.COMPRESSED_SECTOR_SIZE - 1)))
                add_piece(out, pos, stop - pos, READ_COPY)
                compressed.append((pos, stop - pos, coff, csize))
            elif entry & not_plain:
                return None
            elif entry & _L2_MASK:
                add_piece(out, pos, stop - pos, READ_FILE, fd,
                          (entry & _L2_MASK) + (pos & cmask))
            elif zeros:
                add_piece(out, pos, stop - pos, READ_ZEROS)
            else:
                return None
            pos = stop
        return out, compressed


__all__ = ["PlannedReads", "CompressedPieces", "empty_table"]
