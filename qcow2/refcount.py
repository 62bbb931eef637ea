"""Refcounts (spec: "Host cluster management").

:func:`decode_block` / :func:`encode_block` are the one refcount block codec (the
check, untrusted mode and amend use it); :class:`RefcountReader` reads refcounts
(metadata preallocation detection, qemu-img map semantics); :class:`Refcounts` are
the refcounts of a writable image: allocation, free-space search, growth.
"""

from __future__ import annotations

import errno
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
        import array

        count = 0
        per = self.block_entries
        bits = self.bits
        code = {8: "B", 16: "H", 32: "I", 64: "Q"}.get(bits)
        for bi in range((end_cluster + per - 1) // per):
            blk = self.block(bi)
            if blk is None:
                continue
            n = min(per, end_cluster - bi * per)
            if code is not None:
                # nonzero entries, without numpy (the reader's start-up path): the
                # byte order does not matter for comparing with zero
                a = array.array(code)
                a.frombytes(memoryview(blk)[:n * bits // 8])
                count += n - a.count(0)
            else:
                import numpy as np
                count += int(np.count_nonzero(decode_block(blk, bits)[:n]))
            if count >= stop_at:
                break
        return count


_DTYPES = {1: "u1", 2: "u1", 4: "u1", 8: "u1", 16: "u2", 32: "u4", 64: "u8"}


def decode_block(block, bits: int):
    """The refcounts of one refcount block (or of several concatenated) as a numpy
    array of the narrowest unsigned type that holds ``bits``-wide entries (spec:
    "Host cluster management": entries below 8 bits are packed LSB first)."""
    import numpy as np

    if bits >= 8:
        return np.frombuffer(block, dtype=f">u{bits // 8}").astype(_DTYPES[bits])
    per = 8 // bits
    raw = np.frombuffer(block, dtype=np.uint8)
    shifts = np.arange(per, dtype=np.uint8) * np.uint8(bits)
    return ((raw[:, None] >> shifts) & np.uint8((1 << bits) - 1)).reshape(-1)


def encode_block(values, bits: int) -> bytes:
    """The inverse of :func:`decode_block`: ``values`` (a multiple of 8 // bits long
    below 8 bits) packed into ``bits``-wide big-endian or sub-byte entries."""
    import numpy as np

    if bits >= 8:
        return np.asarray(values).astype(f">u{bits // 8}").tobytes()
    per = 8 // bits
    v = np.asarray(values).astype(np.uint8).reshape(-1, per)
    shifts = np.arange(per, dtype=np.uint8) * np.uint8(bits)
    return np.bitwise_or.reduce(v << shifts, axis=1).astype(np.uint8).tobytes()


# ---------------------------------------------------------------------------
# writable refcounts: allocation, free-space search, growth
# ---------------------------------------------------------------------------

def _get_entry(block, index: int, bits: int) -> int:
    if bits == 16:
        return (block[index * 2] << 8) | block[index * 2 + 1]
    if bits >= 8:
        nb = bits // 8
        return int.from_bytes(block[index * nb:(index + 1) * nb], "big")
    per = 8 // bits
    return (block[index // per] >> ((index % per) * bits)) & ((1 << bits) - 1)


def _set_entry(block, index: int, bits: int, value: int) -> None:
    if bits >= 8:
        nb = bits // 8
        block[index * nb:(index + 1) * nb] = value.to_bytes(nb, "big")
        return
    per = 8 // bits
    shift = (index % per) * bits
    mask = ((1 << bits) - 1) << shift
    b = index // per
    block[b] = (block[b] & ~mask & 0xFF) | (value << shift)


class Refcounts:
    """The refcount table and blocks of a writable image.

    Increments are applied at once (and written by the owner's ordered flush before
    the references that need them); decrements are queued and applied only after
    the references were dropped on disk (:meth:`apply_pending_frees`), so a crash
    can leak clusters but never leave a reference to a cluster with refcount 0.
    Clusters freed since the last flush are not reused before it.
    """

    def __init__(self, image, cache):
        h = image.header
        self.img = image
        self.h = h
        self.cache = cache                      # TableCache for refcount blocks
        self.cs = h.cluster_size
        self.cbits = h.cluster_bits
        self.bits = h.refcount_bits
        self.max_ref = (1 << self.bits) - 1
        self.block_entries = self.cs * 8 // self.bits
        n = h.refcount_table_clusters * self.cs // 8
        off = h.refcount_table_offset
        if off + n * 8 > image.file_size:
            raise CorruptImageError(
                f"refcount table at {off:#x} ({n} entries) extends past the end of the file "
                f"(size {image.file_size:#x})", offset=off, size=n * 8, what="refcount table")
        self.table = list(struct.unpack(f">{n}Q", image._read_meta(n * 8, off)))
        self.table_dirty: set[int] = set()
        self.pending_free: list[tuple[int, int]] = []   # (host offset, length)
        self.blocked: set[int] = set()                   # freed since the last flush
        self.free_hint = 0
        self.on_zero = None          # called with a cluster index whose refcount hit 0
        # the end of used space, in clusters: everything at or past it is free
        self.end_cluster = (image.file_size + self.cs - 1) // self.cs

    # -- lookups -------------------------------------------------------------
    def block_offset(self, bi: int) -> int:
        """The host offset of refcount block ``bi`` (0: not allocated)."""
        if bi >= len(self.table):
            return 0
        off = self.table[bi] & C.REFT_OFFSET_MASK
        if off and off & (self.cs - 1):
            raise CorruptImageError(f"refcount block {bi} offset {off:#x} unaligned",
                                    offset=self.h.refcount_table_offset + bi * 8, size=8,
                                    what="refcount table entry")
        return off

    def get(self, cluster: int) -> int:
        bi, idx = divmod(cluster, self.block_entries)
        off = self.block_offset(bi)
        if not off:
            return 0
        return _get_entry(self.cache.get(off), idx, self.bits)

    # -- updates ---------------------------------------------------------------
    def add(self, cluster: int, delta: int) -> None:
        """Change one cluster's refcount now by ``delta`` (a refcount block is
        allocated for an increment where there is none); :meth:`free` instead defers
        decrements until the references are gone from the disk."""
        bi, idx = divmod(cluster, self.block_entries)
        off = self.block_offset(bi)
        if not off:
            if delta < 0:
                raise CorruptImageError(f"refcount of cluster {cluster} would drop below 0 "
                                        f"(no refcount block)", what="refcount block")
            while not self._ensure_blocks(cluster, 1):
                pass
            off = self.block_offset(bi)
        blk = self.cache.get(off)
        v = _get_entry(blk, idx, self.bits) + delta
        if v < 0 or v > self.max_ref:
            raise CorruptImageError(
                f"refcount of cluster {cluster} ({cluster << self.cbits:#x}) would become {v} "
                f"(range 0..{self.max_ref})", offset=cluster << self.cbits, what="refcount")
        _set_entry(blk, idx, self.bits, v)
        self.cache.mark_dirty(off)
        if v == 0 and self.on_zero is not None:
            self.on_zero(cluster)
        if delta > 0 and cluster >= self.end_cluster:
            self.end_cluster = cluster + 1

    def _add_run(self, cluster: int, n: int) -> None:
        """+1 for clusters [cluster, cluster+n), whose refcount blocks exist (as
        ``add`` per cluster, one block lookup and one dirty mark per block)."""
        per, bits, top = self.block_entries, self.bits, self.max_ref
        end = cluster + n
        c = cluster
        while c < end:
            bi, idx = divmod(c, per)
            stop = min(end, (bi + 1) * per)
            off = self.block_offset(bi)
            if not off:
                for k in range(c, stop):          # (no block: add() makes it)
                    self.add(k, 1)
                c = stop
                continue
            blk = self.cache.get(off)
            m = stop - c
            if bits == 16:                        # (the default width: one struct call)
                vals = [v + 1 for v in struct.unpack_from(f">{m}H", blk, idx * 2)]
                if max(vals) > top:
                    self.add(c + vals.index(top + 1), 1)    # (raises, naming it)
                struct.pack_into(f">{m}H", blk, idx * 2, *vals)
            else:
                for i in range(idx, idx + m):
                    v = _get_entry(blk, i, bits) + 1
                    if v > top:
                        self.add(c + i - idx, 1)  # (raises, naming the cluster)
                    _set_entry(blk, i, bits, v)
            self.cache.mark_dirty(off)
            c = stop
        if end > self.end_cluster:
            self.end_cluster = end

    def increment(self, offset: int, length: int) -> None:
        """+1 for every cluster touched by [offset, offset+length)."""
        first = offset >> self.cbits
        last = (offset + length - 1) >> self.cbits
        for c in range(first, last + 1):
            self.add(c, 1)

    def free(self, offset: int, length: int) -> None:
        """Queue -1 for every cluster touched by the range (applied after the flush)."""
        if length > 0:
            self.pending_free.append((offset, length))

    def apply_pending_frees(self) -> bool:
        """Apply queued decrements (the caller flushed the dropped references first)."""
        if not self.pending_free:
            self.blocked.clear()
            return False
        pend, self.pending_free = self.pending_free, []
        for offset, length in pend:
            first = offset >> self.cbits
            last = (offset + length - 1) >> self.cbits
            for c in range(first, last + 1):
                self.add(c, -1)
                if c < self.free_hint:
                    self.free_hint = c
        self.blocked.clear()
        return True

    def block_freed(self, offset: int, length: int) -> None:
        first = offset >> self.cbits
        last = (offset + length - 1) >> self.cbits
        self.blocked.update(range(first, last + 1))

    # -- allocation ---------------------------------------------------------------
    def _is_free(self, c: int) -> bool:
        if c in self.blocked:
            return False
        if c >= self.end_cluster:
            return True
        return self.get(c) == 0

    def find_free(self, n: int, start: int | None = None) -> int:
        """First run of ``n`` free clusters at or after ``start`` (default: the hint);
        no refcount is taken."""
        c = self.free_hint if start is None else start
        while True:
            if c >= self.end_cluster:
                return c
            run = 0
            while run < n and self._is_free(c + run):
                run += 1
            if run == n:
                return c
            c += run + 1

    def take_free(self, n: int = 1, *, prefer: int = -1) -> int:
        """A run of ``n`` free clusters whose refcount blocks exist (no refcount taken);
        ``prefer`` is tried first (a cluster index)."""
        while True:
            c = -1
            if prefer >= 0 and all(self._is_free(prefer + k) for k in range(n)):
                c = prefer
            if c < 0:
                c = self.find_free(n)
            if self._ensure_blocks(c, n):
                return c
            # the refcount table moved, possibly into the run: search again

    def run_ready(self, c: int, n: int) -> bool:
        """Whether clusters [c, c+n) are all free with their refcount blocks in place:
        then ``take_free(1, prefer=k)`` returns k for each of them in turn (a writer
        packing a batch checks once instead of asking cluster by cluster)."""
        return (all(self._is_free(c + k) for k in range(n))
                and not self._missing_blocks(c, n))

    def alloc(self, n: int = 1) -> int:
        """Allocate ``n`` contiguous clusters (refcount 1 each); returns the host offset."""
        c = self.take_free(n)
        self._add_run(c, n)
        # like QEMU's free_cluster_index: continue after this run (a hole skipped on the
        # way is found again once something below it is freed); never rescan the used
        # area from a small hole on every allocation
        self.free_hint = c + n
        return c << self.cbits

    def _register(self, offset: int, length: int, kind: str) -> None:
        claim = getattr(self.img, "_claim", None)
        if claim is not None:
            claim(offset, length, kind)

    def _missing_blocks(self, c: int, n: int) -> set[int]:
        per = self.block_entries
        return {bi for bi in range(c // per, (c + n - 1) // per + 1)
                if not self.block_offset(bi)}

    def _ensure_blocks(self, c: int, n: int) -> bool:
        """Create the refcount blocks that clusters [c, c+n) need.  They are placed in
        free clusters right after the run (never inside it), each range they land in
        getting its block in the same batch, so any run length can be allocated.
        Returns False when the refcount table had to grow first (the caller must look
        for its run again: the new table may sit where the run was)."""
        missing = self._missing_blocks(c, n)
        if not missing:
            return True
        while True:
            if max(missing) >= len(self.table):
                self._grow_table(max(missing) + 1)
                return False
            m = len(missing)
            start = self.find_free(m, c + n)
            extra = self._missing_blocks(start, m) - missing
            if not extra:
                break
            missing |= extra
        hosts = range(start, start + m)
        for bi, h in zip(sorted(missing), hosts, strict=True):
            off = h << self.cbits
            self._register(off, self.cs, "refcount block")
            self.cache.put_new(off)
            self.table[bi] = off
            self.table_dirty.add(bi)
        for h in hosts:
            self.add(h, 1)
        return True

    def _grow_table(self, min_entries: int) -> None:
        """Move the refcount table to a bigger place at the end of the used space.

        The new refcount blocks and the new table are written and made durable before
        the header points at them; the old table is freed afterwards (a crash in
        between leaks it, nothing worse).
        """
        img = self.img
        cs = self.cs
        per = self.block_entries
        new_entries = max(min_entries, len(self.table) * 2)
        start = self.end_cluster
        while True:
            tc = (new_entries * 8 + cs - 1) // cs
            nb = 0
            while True:                 # blocks for the area, the area holding them too
                last = start + nb + tc - 1
                need = [b for b in range(start // per, last // per + 1)
                        if not self.block_offset(b)]
                if len(need) <= nb:
                    break
                nb = len(need)
            if (start + nb + tc + per - 1) // per <= new_entries:
                break
            new_entries = (start + nb + tc + per - 1) // per + 1
        if tc * cs > C.MAX_REFTABLE_SIZE:
            # (refused before anything changes: no open would accept such a table)
            raise OSError(errno.EFBIG, f"a refcount table of {tc} clusters would exceed "
                                       f"the format's limit", img.filename)
        block_hosts = list(range(start, start + nb))
        table_host = start + nb
        self.table = self.table + [0] * (new_entries - len(self.table))
        for b, host in zip(need, block_hosts, strict=False):
            self.table[b] = host << self.cbits
            self._register(host << self.cbits, cs, "refcount block")
            self.cache.put_new(host << self.cbits)
        self._register(table_host << self.cbits, tc * cs, "the refcount table")
        self.end_cluster = max(self.end_cluster, table_host + tc)
        for host in block_hosts:
            self.add(host, 1)
        for i in range(tc):
            self.add(table_host + i, 1)
        old_off = self.h.refcount_table_offset
        old_clusters = self.h.refcount_table_clusters
        self.cache.write_dirty()
        img._write_meta(struct.pack(f">{new_entries}Q", *self.table) +
                        bytes(tc * cs - new_entries * 8), table_host << self.cbits,
                        "the refcount table")
        img._sync()
        self.h.refcount_table_offset = table_host << self.cbits
        self.h.refcount_table_clusters = tc
        img._write_meta(struct.pack(">QI", self.h.refcount_table_offset, tc),
                        C.HDR_REFCOUNT_TABLE_OFFSET)
        img._sync()
        self.table_dirty.clear()
        self.free(old_off, old_clusters * cs)
        self.block_freed(old_off, old_clusters * cs)

    def write_table_entries(self) -> None:
        """Write changed refcount table entries (after their blocks are durable)."""
        if not self.table_dirty:
            return
        base = self.h.refcount_table_offset
        for bi in sorted(self.table_dirty):
            self.img._write_meta(struct.pack(">Q", self.table[bi]), base + bi * 8,
                                 "the refcount table")
        self.table_dirty.clear()
