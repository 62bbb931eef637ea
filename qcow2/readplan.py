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
import sys

from . import constants as C
from .image import READ_COPY, READ_FILE, READ_ZEROS, Image, add_piece

# any bit but COPIED and the offset: not a plain data entry (compressed, zero, reserved)
_NOT_PLAIN_DATA = ~(C.L2E_OFFSET_MASK | C.OFLAG_COPIED) & 0xFFFFFFFFFFFFFFFF
_L2_MASK = C.L2E_OFFSET_MASK
_unpack_u64 = struct.Struct(">Q").unpack_from
_ZERO_4K = bytes(4096)
_ZERO_VIEW = memoryview(_ZERO_4K)
_pread = os.pread
_preadv = os.preadv
_LITTLE = sys.byteorder == "little"
_MAP_ENTRIES = 1 << 18           # host map entries kept (~10 MiB)
_FLAT_MAX = 1 << 20              # disks of up to this many clusters get a flat map (8 MiB)


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


_BAD_BYTE: dict[int, bytes] = {}


def _bad_byte(mask: int) -> bytes:
    """A ``bytes.translate`` table: 1 for byte values with a bit of ``mask`` set."""
    t = _BAD_BYTE.get(mask)
    if t is None:
        t = _BAD_BYTE[mask] = bytes(1 if v & mask else 0 for v in range(256))
    return t


def host_map(table, cluster_bits: int) -> list[int]:
    """An L2 table (standard entries) decoded for ``pread``'s fast path, one int per
    entry (a list: it indexes faster than an array): the host offset of a plain,
    aligned data cluster, 0 for an unallocated entry, -1 for any other (compressed,
    zero flag, reserved bits, unaligned: the general path decodes and checks those).
    Byte-wise in C (a translate per byte column; a Python step only per other entry)."""
    n = len(table) >> 3
    bad = int.from_bytes(table[0::8].translate(_bad_byte(0x7F)), "big")  # bits 56-62
    low, col = cluster_bits, 7                  # bits under the cluster size
    while low > 0:
        bad |= int.from_bytes(table[col::8].translate(_bad_byte((1 << min(low, 8)) - 1)),
                              "big")
        low, col = low - 8, col - 1
    stripped = bytearray(table)
    stripped[0::8] = bytes(n)                   # COPIED off (other top bits are bad)
    from array import array     # here: it imports collections, 2.4 ms off every CLI start
    m = array("q")
    m.frombytes(stripped)
    if _LITTLE:
        m.byteswap()
    if bad:
        flags = bad.to_bytes(n, "big")
        i = flags.find(1)
        while i >= 0:
            m[i] = -1
            i = flags.find(1, i + 1)
    return m.tolist()


class PlannedReads:
    """``pread``'s fast path and ``read_plan`` for ``Qcow2Image``."""

    _fast = None                # see _fast_state
    _fast_tables: dict | None = None
    _fast_maps: dict | None = None
    _fast_flat: list | None = None

    def _fast_state(self):
        """What ``pread``'s lock-free path needs, or None where it does not apply: plain
        entries only (no subclusters, data file or encryption), images that never
        change under it (read-only classes), a store with a descriptor."""
        fd = getattr(self.data_be, "fd", None)
        if (self.writable or not self._fast_reads or not isinstance(fd, int)
                or (self.untrusted and self.header.corrupt)):
            return None
        cbits = self.cluster_bits
        self._fast_tables = {}          # L1 index -> its L2 table, as seen by _l2_table
        self._fast_maps = {}            # L1 index -> host_map of a table read again
        fast = (cbits, self._l2_span_bits - cbits, self._l2_entries - 1,
                self.cluster_size - 1, self.cluster_size, self.size >> cbits,
                self._fast_maps, self.data_be, self.backing is None, self._fast_tables)
        # instance attributes over the methods: a plain function call, the state in
        # closure cells (the per-call cost is what random 4 KiB reads measure); not
        # over a subclass' own methods
        cls = type(self)
        if cls.pread is PlannedReads.pread and cls.readinto is Image.readinto:
            self.pread, self.readinto = _fast_calls(self, fast)
        return fast

    def _remember(self, l1_index: int, table) -> None:
        """Keep ``table`` for pread's fast path (read-only images: tables never change),
        at most as many as the cache holds (then it starts again)."""
        tables = self._fast_tables
        if l1_index in tables:
            return
        if len(tables) >= self._l2c.max_tables:
            tables.clear()
            self._clear_maps()
        tables[l1_index] = table

    def _clear_maps(self) -> None:
        maps, flat = self._fast_maps, self._fast_flat
        if flat is not None:
            span = self._l2_entries
            for l1_index in maps:
                start = l1_index * span
                end = min(start + span, len(flat))
                flat[start:end] = [-1] * (end - start)
        maps.clear()

    def _map_of(self, l1_index: int):
        """The host map of an L2 table seen before (made on its second read, so that
        reads that never come back to a table do not pay for it), or None.  The maps
        hold at most _MAP_ENTRIES entries (~40 bytes each), then start again."""
        table = self._fast_tables.get(l1_index)
        if table is None:
            return None
        maps = self._fast_maps
        if (len(maps) + 1) * self._l2_entries > _MAP_ENTRIES:
            self._clear_maps()
        m = maps[l1_index] = host_map(table, self.cluster_bits)
        flat = self._fast_flat
        if flat is not None:            # (the whole clusters of the disk only)
            start = l1_index * len(m)
            end = min(start + len(m), len(flat))
            flat[start:end] = m[:end - start]
        return m

    def _drop_fast(self) -> None:
        """Close the lock-free paths (they hold the descriptor): before closing."""
        self._fast = None
        self.__dict__.pop("pread", None)
        self.__dict__.pop("readinto", None)

    def pread(self, n: int, offset: int) -> bytes:
        """``n`` bytes from guest ``offset`` (fewer only at the end of the disk).

        Read-only images answer a read inside one cluster in ``_fast_calls``' pread; a
        longer read of one table's clusters that lie back to back in the file, or are
        all unallocated without a backing file, is answered here (one ``os.pread``, or
        zeros); anything else goes the general way."""
        fast = self._fast
        if fast is not None and n > 0 and offset >= 0:
            data = self._pread_run(n, offset, fast)
            if data is not None:
                return data
        return super().pread(n, offset)

    def _pread_run(self, n: int, offset: int, fast):
        """``pread``'s path for a range of clusters of one table: one ``os.pread`` when
        their data lie back to back, zeros when all are unallocated without a backing
        file; None for anything else."""
        cbits, l2bits, l2_mask, cmask, csize, nfull, maps, be, zeros, _t = fast
        ci = offset >> cbits
        last = (offset + n - 1) >> cbits
        if last >= nfull or ci >> l2bits != last >> l2bits:
            return None
        m = maps.get(ci >> l2bits) or self._map_of(ci >> l2bits)
        if m is None:
            return None
        i = ci & l2_mask
        count = last - ci + 1
        run = m[i:i + count]
        first = run[0]
        if first > 0:
            if run == list(range(first, first + count * csize, csize)):
                data = _pread(be.fd, n, first + (offset & cmask))
                if len(data) == n:
                    return data
        elif not first and zeros and run.count(0) == count:
            return bytes(n)
        return None

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
        cbits, l2bits, l2_mask, cmask, _cs, _nf, _maps, be, zeros, tables = self._fast
        span_bits = cbits + l2bits
        not_plain = _NOT_PLAIN_DATA | cmask
        size = self.size
        end = offset + n
        first = offset >> cbits
        count = ((end - 1) >> cbits) - first + 1
        if count > 64 or end > size or offset >> span_bits != (end - 1) >> span_bits:
            return None
        table = tables.get(offset >> span_bits)
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


def _fast_calls(img, fast):
    """``pread`` and ``readinto`` for one read-only image: a read inside one cluster
    of an L2 table read before whose entry is plain data, or unallocated without a
    backing file, is one ``os.pread``/``preadv`` (or zeros) here, without a lock;
    anything else goes to the class's methods (the general way).  ~0.4 us over the
    system call: every operation counts."""
    cbits, l2bits, l2_mask, cmask, csize, nfull, maps, be, zeros, _t = fast
    cls = type(img)
    map_of = img._map_of
    if nfull <= _FLAT_MAX:
        img._fast_flat = [-1] * nfull
        return _flat_calls(img, fast, img._fast_flat)

    def pread(n: int, offset: int) -> bytes:
        ci = offset >> cbits
        within = offset & cmask
        if 0 <= ci < nfull and 0 < n <= csize - within:
            try:
                m = maps[ci >> l2bits]
            except KeyError:
                m = map_of(ci >> l2bits)
            if m is not None:
                host = m[ci & l2_mask]
                if host > 0:
                    data = _pread(be.fd, n, host + within)
                    if len(data) == n:
                        return data
                elif not host and zeros:
                    return _ZERO_4K if n == 4096 else bytes(n)
        return cls.pread(img, n, offset)

    def readinto(buf, offset: int) -> int:
        mv = buf if type(buf) is bytearray else memoryview(buf).cast("B")
        n = len(mv)
        ci = offset >> cbits
        within = offset & cmask
        if 0 <= ci < nfull and 0 < n <= csize - within:
            try:
                m = maps[ci >> l2bits]
            except KeyError:
                m = map_of(ci >> l2bits)
            if m is not None:
                host = m[ci & l2_mask]
                if host > 0:
                    if _preadv(be.fd, [mv], host + within) == n:
                        return n
                elif not host and zeros:
                    if n <= 4096:
                        mv[:] = _ZERO_VIEW[:n]
                    else:
                        mv[:] = bytes(n)
                    return n
        return cls.readinto(img, buf, offset)     # (a short read: the general way)

    pread.__doc__ = cls.pread.__doc__
    readinto.__doc__ = cls.readinto.__doc__
    return pread, readinto



def _flat_calls(img, fast, flat: list):
    """``_fast_calls`` for disks of up to _FLAT_MAX clusters: one list indexed by
    cluster, the host maps of the tables mapped so far copied into it (-1 elsewhere:
    the class's methods map a table on its second read), one subscript per read."""
    cbits, l2bits, _l2_mask, cmask, csize, nfull, maps, be, zeros, _t = fast
    cls = type(img)
    map_of = img._map_of

    def pread(n: int, offset: int) -> bytes:
        ci = offset >> cbits
        within = offset & cmask
        if 0 <= ci < nfull and 0 < n <= csize - within:
            host = flat[ci]
            if host > 0:
                data = _pread(be.fd, n, host + within)
                if len(data) == n:
                    return data
            elif not host:
                if zeros:
                    return _ZERO_4K if n == 4096 else bytes(n)
            elif ci >> l2bits not in maps and map_of(ci >> l2bits) is not None:
                return pread(n, offset)                 # (mapped now: once)
        return cls.pread(img, n, offset)

    def readinto(buf, offset: int) -> int:
        mv = buf if type(buf) is bytearray else memoryview(buf).cast("B")
        n = len(mv)
        ci = offset >> cbits
        within = offset & cmask
        if 0 <= ci < nfull and 0 < n <= csize - within:
            host = flat[ci]
            if host > 0:
                if _preadv(be.fd, [mv], host + within) == n:
                    return n
            elif not host:
                if zeros:
                    if n <= 4096:
                        mv[:] = _ZERO_VIEW[:n]
                    else:
                        mv[:] = bytes(n)
                    return n
            elif ci >> l2bits not in maps and map_of(ci >> l2bits) is not None:
                return readinto(buf, offset)            # (mapped now: once)
        return cls.readinto(img, buf, offset)     # (a short read: the general way)

    pread.__doc__ = cls.pread.__doc__
    readinto.__doc__ = cls.readinto.__doc__
    return pread, readinto


__all__ = ["PlannedReads", "CompressedPieces", "empty_table", "host_map"]
