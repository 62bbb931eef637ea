"""Writing qcow2 images: allocation, copy-on-write, zero writes, discard, compressed
clusters, and an ordered flush that keeps the image consistent across crashes.

Changes to the whole image (resize, the L1 table's size, the backing file, the format
version, the refcount width) come from :class:`qcow2.reshape.Reshape`, internal
snapshots from :class:`qcow2.internal_snapshots.InternalSnapshots`, compressed clusters
from :class:`qcow2.compressed_writes.CompressedWrites`; they are mixed into
:class:`WritableQcow2Image` and use its tables, refcounts and flush.

Crash safety comes from one rule, applied by :meth:`WritableQcow2Image.flush`:
nothing on disk ever points at something that is not durable yet.

  1. guest data and COW copies are written with pwrite as they come;
  2. refcount blocks (increments only) are written; sync;
     refcount table entries for new blocks are written; sync;
  3. L2 tables are written; sync;          (they may point at new clusters now)
  4. L1 entries for new L2 tables; sync;
  5. queued refcount decrements (clusters dropped by steps 3-4) are applied and
     their blocks written; sync.  Freed clusters are reused only after this.

A crash between any two steps leaves at worst leaked clusters (refcount > 0 with no
reference), which ``qemu-img check`` reports as leaks, never as corruption.

An I/O error is final: the first write-side call on the image's stores that fails
(write, sync, truncate, allocation) poisons the open image.  Every later write,
flush or close writes nothing more and raises, so the file keeps the state the
ordered stages left when the error struck (leaks at worst), and a sync that failed
is never followed by one that "succeeds" over pages the kernel may have dropped.
"""

from __future__ import annotations

import errno
import os
import struct

from . import constants as C
from .cluster import compressed_extent
from .atomic import copy_range
from .cache import TableCache
from .compressed_writes import CompressedWrites
from .errors import (ClosedImageError, CorruptImageError, InvalidOptionError, Qcow2Error,
                     ReadOnlyError)
from .image import zero_fill
from .internal_snapshots import InternalSnapshots
from .lightweight import Lock, local
from .overlap import GUEST_DATA, HEADER_FIELD, MetadataMap
from .reader import Qcow2Image
from .refcount import Refcounts
from .reshape import Reshape

_ALL_ALLOC = C.L2_BITMAP_ALLOC_MASK
_ALL_ZERO = C.L2_BITMAP_ZERO_MASK


class WritableQcow2Image(CompressedWrites, Reshape, InternalSnapshots, Qcow2Image):
    """A qcow2 image opened with ``mode="r+"``.

    Guest writes: ``pwrite``, ``write_zeroes``, ``discard``, ``write_compressed*``;
    ``flush`` makes them durable in a crash-safe order; whole-image changes
    (``resize``, ``grow_l1``, ``discard_all``, ``set_backing``, snapshots, ...) come
    from the mixins.  Every public method takes the image's lock.
    """

    writable = True

    def __init__(self, backend, filename, **kw):
        super().__init__(backend, filename, **kw)
        h = self.header
        if h.corrupt:
            raise Qcow2Error(f"qcow2: Image is corrupt; cannot be opened read/write "
                             f"('{self.filename}')")
        if self.encrypted:
            self._crypto.check_writable()     # unlocked now: a wrong key writes nothing
        if self.snapshot is not None:
            raise ReadOnlyError("a snapshot is read-only; open the active layer to write")
        if h.dirty:
            # open_image rebuilds refcounts of dirty images before getting here; an
            # image that became dirty in between is refused rather than trusted
            raise Qcow2Error(f"'{self.filename}' has the dirty bit set: its refcounts "
                             f"must be rebuilt before writing (qcow2 check -r all)")
        # the reader's cache holds no table yet: one that writes back through the
        # overlap check replaces it
        self._l2c = TableCache(h.cluster_size, self._l2c.max_tables * h.cluster_size,
                               self._read_meta, lambda d, o: self._write_meta(d, o, "L2 table"),
                               on_pressure=self._cache_pressure)
        self._overlap = MetadataMap(h.cluster_bits)
        self._open_refcounts()
        self._l1_dirty: set[int] = set()
        self._free_byte_offset = 0
        self._compressor = None
        self._closed = False
        self._marked_dirty = False
        self._unordered = False
        self._durable = True
        self._offload = [True]         # copy_file_range works for this output (so far)
        self._dtls = local()  # per-thread deferred data writes (defer_data)
        self._copy_lock = Lock()
        self._failed: OSError | None = None    # the I/O error that poisoned the image
        self._l1_table()
        self._rebuild_overlap_map()
        if h.autoclear_features & ~C.AUTOCLEAR_MASK or (
                h.bitmaps_ext is not None and h.bitmaps_consistent):
            # We do not maintain persistent bitmaps or unknown autoclear features:
            # clearing their bits tells every reader they are stale, as QEMU does.
            self._clear_autoclear()

    # -- low level -------------------------------------------------------------
    def _open_refcounts(self) -> None:
        """The refcount machinery over the structure the header names now."""
        self._rc_cache = TableCache(self.cluster_size, C.REFCOUNT_CACHE_BYTES, self._read_meta,
                                    lambda d, o: self._write_meta(d, o, "refcount block"),
                                    on_pressure=self._cache_pressure)
        self.refs = Refcounts(self, self._rc_cache)
        self.refs.on_zero = self._overlap.forget

    def _write_meta(self, data, offset: int, kind: str = "metadata") -> None:
        if offset < self.cluster_size:
            kind = HEADER_FIELD
        elif kind != "metadata":
            why = self._overlap.conflict(offset, len(data), kind)
            if why is not None:
                self._mark_corrupt(why)
        self._io(self.be.pwrite, data, offset)
        end = offset + len(data)
        if end > self.file_size:
            self.file_size = end

    def _write_header_field(self, offset: int, fmt: str, *values) -> None:
        """Write header fields at ``offset`` (a ``C.HDR_*``) in place; not synced."""
        self._io(self.be.pwrite, struct.pack(fmt, *values), offset)

    def _io(self, call, *args):
        """One write-side call on a store of the image; the first that fails poisons
        the image (see the module's docstring)."""
        self._refuse_if_failed()
        try:
            return call(*args)
        except OSError as exc:
            self._failed = exc
            raise

    def _refuse_if_failed(self) -> None:
        if self._failed is not None:
            raise OSError(errno.EIO, f"an earlier write to the image failed "
                                     f"({self._failed.strerror or self._failed}); "
                                     f"reopen it", self.filename)

    # -- overlap protection (QEMU's qcow2_pre_write_overlap_check) ----------------
    def _claim(self, offset: int, length: int, kind: str) -> None:
        """Newly allocated clusters must not hold metadata already (a refcount that
        says "free" for a table would otherwise make us overwrite it)."""
        why = self._overlap.claim(offset, length, kind)
        if why is not None:
            self._mark_corrupt(why)

    def _rebuild_overlap_map(self) -> None:
        self._overlap.rebuild(self.header, self._l1_offset, self._l1, self.refs.table,
                              self.snapshots_list)

    def _mark_corrupt(self, why: str):
        h = self.header
        h.incompatible_features |= C.INCOMPAT_CORRUPT
        try:
            self._write_header_field(C.HDR_INCOMPATIBLE_FEATURES, ">Q", h.incompatible_features)
            self._io(self.be.flush)
        finally:
            raise CorruptImageError(f"qcow2: Marking image as corrupt: {why}; further "
                                    f"writes are refused", what="metadata overlap")

    def defer_data(self, pending: list | None) -> None:
        """Queue this thread's guest-data writes in ``pending`` instead of performing
        them (None: write directly again).  Allocation and table updates still happen
        at once, in call order; the caller must then run ``write_pending(pending)``
        -- outside the image lock, in parallel with other threads -- before any
        flush, and must not read those clusters before.  Converters use it to keep
        allocation in guest order while the data copies run on every core."""
        self._dtls.pending = pending

    def write_pending(self, pending: list) -> None:
        """Perform writes queued by :meth:`defer_data` (any thread, no lock held)."""
        with self._copy_lock:     # (one copy at a time: see ops.sparse_write.COPY_LOCK)
            for data, host, src, guest in pending:
                self._put_data(data, host, src, guest)
        pending.clear()

    def limit_table_cache(self, max_bytes: int) -> None:
        """From now on keep at most ``max_bytes`` of L2 tables in memory (at least 8
        tables).  A writer that fills the tables in guest order and does not come back
        to them (convert) needs few; the others are written back as new ones come."""
        self._l2c.max_tables = max(8, max_bytes // self.cluster_size)

    def set_unordered(self, *, durable: bool = True) -> None:
        """For an output nobody sees until it is complete (convert's temporary file,
        renamed into place only after its final flush): metadata goes out without the
        ordering syncs between stages, and cache-pressure flushes do not sync at all;
        ``flush()`` ends with one sync that makes everything durable.  A crash before
        that leaves a temporary file that is thrown away, never an image in use.
        ``durable=False`` (convert ``-t unsafe``): no sync at all."""
        self._unordered = True
        self._durable = durable

    def ignore_flushes(self) -> None:
        """``-t unsafe`` on an image in place (commit, rebase, amend): no sync at all
        from now on, so no ordering between stages either (as QEMU's cache=unsafe,
        whose flushes do nothing)."""
        self.set_unordered(durable=False)

    def _stage_sync(self) -> None:
        """The sync between two stages of an ordered flush."""
        if not self._unordered:
            self._sync()

    def _sync(self) -> None:
        if not self._durable:
            return
        if self.data_be is not self.be:
            self._io(self.data_be.flush)
        self._io(self.be.flush)

    def _write_data(self, data, host: int, src=None, guest: int | None = None) -> None:
        """Write guest data at ``host`` (guest offset ``guest``, which legacy AES
        encryption needs); ``src`` (fd, offset, state): the same bytes lie
        in that file, copy them in the kernel (copy_file_range) while ``state[0]``.
        ``data`` may be a list of buffers that go out back to back (compressed
        clusters: written with one pwritev, never joined)."""
        if self.debug_event is not None:          # error injection (backends.blkdebug)
            self.debug_event("write_aio")
        n = sum(map(len, data)) if type(data) is list else len(data)
        if self.data_be is self.be:
            why = self._overlap.conflict(host, n, GUEST_DATA)
            if why is not None:
                self._mark_corrupt(why)
        pending = getattr(self._dtls, "pending", None)
        if pending is not None:
            # deferred (see defer_data): the caller writes it outside the lock
            pending.append((data, host, src, guest))
            if host + n > self.file_size and self.data_be is self.be:
                self.file_size = host + n
            return
        self._put_data(data, host, src, guest)

    def _put_data(self, data, host: int, src=None, guest: int | None = None) -> None:
        if type(data) is list:                    # buffers back to back (_write_data)
            if self._crypto is None:
                n = self._io(self.data_be.pwritev, data, host)
                if self.data_be is self.be and host + n > self.file_size:
                    self.file_size = host + n
                return
            data = b"".join(data)
        if self._crypto is not None:              # encrypted: a ciphertext copy goes out
            self._io(self._crypto.write, self.data_be, data, host, guest)
            if self.data_be is self.be and host + len(data) > self.file_size:
                self.file_size = host + len(data)
            return
        if src is not None and src[2][0]:
            fd = getattr(self.data_be, "fd", None)
            got = self._io(copy_range, src[0], src[1], fd, host, len(data)) \
                if isinstance(fd, int) else -1
            if got < 0:
                src[2][0] = False                # the kernel cannot: stop trying
            if got == len(data):
                if host + len(data) > self.file_size and self.data_be is self.be:
                    self.file_size = host + len(data)
                return
        self._io(self.data_be.pwrite, data, host)
        if self.data_be is self.be and host + len(data) > self.file_size:
            self.file_size = host + len(data)

    def _mark_modified(self) -> None:
        if self._closed:
            raise ClosedImageError("I/O operation on closed image")
        self._refuse_if_failed()
        if self.header.lazy_refcounts and not self._marked_dirty and self.header.version >= 3:
            # Refcounts stay exact here, but mark the image dirty while it is open
            # for writing with lazy refcounts, as QEMU does.
            self.header.incompatible_features |= C.INCOMPAT_DIRTY
            self._write_header_field(C.HDR_INCOMPATIBLE_FEATURES, ">Q",
                                     self.header.incompatible_features)
            self._sync()
            self._marked_dirty = True

    def _clear_autoclear(self) -> None:
        h = self.header
        h.autoclear_features &= C.AUTOCLEAR_DATA_FILE_RAW
        self._write_header_field(C.HDR_AUTOCLEAR_FEATURES, ">Q", h.autoclear_features)
        self._sync()

    def _cache_pressure(self) -> None:
        self.flush(sync_only_metadata=True)

    # -- tables ------------------------------------------------------------------
    def _entry(self, table, i: int) -> tuple[int, int]:
        if self.header.extended_l2:
            e, b = struct.unpack_from(">QQ", table, i * 16)
            return e, b
        return struct.unpack_from(">Q", table, i * 8)[0], 0

    def _set_entry(self, table, table_off: int, i: int, e: int, bitmap: int = 0) -> None:
        if self.header.extended_l2:
            struct.pack_into(">QQ", table, i * 16, e, bitmap)
        else:
            struct.pack_into(">Q", table, i * 8, e)
        self._l2c.mark_dirty(table_off)

    def _tables(self, a: int, b: int):
        """For each L2 table covering [a, b): (start, end, table, table offset), the
        table made private to the active layer (allocated or copied) first."""
        span = self._l2_span_bits
        pos = a
        while pos < b:
            l1i = pos >> span
            tend = min(b, (l1i + 1) << span)
            table, toff = self._l2_for_write(l1i)
            yield pos, tend, table, toff
            pos = tend

    def _l2_for_write(self, l1i: int):
        """The L2 table for L1 index ``l1i``, private to the active layer (allocated,
        or copied from a table shared with a snapshot)."""
        l1 = self._l1
        e = l1[l1i]
        off = e & C.L1E_OFFSET_MASK
        if off and e & C.OFLAG_COPIED:
            return self._l2_table(l1i, off), off
        new = self.refs.alloc(1)
        self._claim(new, self.cluster_size, "L2 table")
        if off:
            old = bytes(self._l2_table(l1i, off))
            t = self._l2c.put_new(new, old)
            self.refs.free(off, self.cluster_size)
            self.refs.block_freed(off, self.cluster_size)
        else:
            t = self._l2c.put_new(new)
        l1[l1i] = new | C.OFLAG_COPIED
        self._l1_dirty.add(l1i)
        return t, new

    # -- public API ----------------------------------------------------------------
    def readinto(self, buf, offset: int) -> int:
        with self._lock:
            return super().readinto(buf, offset)

    def pwrite(self, data, offset: int, *, source=None) -> int:
        """Write ``data`` at guest ``offset`` (any alignment).

        ``source``: optional ``(fd, file_offset)`` where exactly these bytes also lie
        in a file; whole clusters may then be copied from there by the kernel
        (copy_file_range) instead of from ``data`` (converters pass it)."""
        mv = memoryview(data).cast("B")
        n = len(mv)
        if offset < 0 or offset + n > self.size:
            raise InvalidOptionError(f"write of {n} bytes at {offset} is outside the disk "
                                     f"(size {self.size})")
        if not n:
            return 0
        src = None
        if source is not None and hasattr(os, "copy_file_range"):
            src = (source[0], source[1] - offset, self._offload)   # minus: see _write
        with self._lock:
            self._mark_modified()
            self._write(mv, offset, src)
        return n

    def write_zeroes(self, offset: int, n: int) -> None:
        """Make [offset, offset+n) read as zeros: zero clusters/subclusters where the
        format allows (whole units, v3), explicit zeros for the unaligned rest."""
        if offset < 0 or n < 0 or offset + n > self.size:
            raise InvalidOptionError("range outside the disk")
        if not n:
            return
        with self._lock:
            self._mark_modified()
            unit = self.cluster_size >> (5 if self.header.extended_l2 else 0)
            if self.header.has_data_file:
                p = offset
                while p < offset + n:
                    k = min(1 << 20, offset + n - p)
                    self._write(memoryview(bytes(k)), p)
                    p += k
                return
            if self.header.version < 3:
                self._zero_v2(offset, n)
                return
            a = (offset + unit - 1) // unit * unit
            b = (offset + n) // unit * unit
            if a >= b:
                self._write(memoryview(bytes(n)), offset)
                return
            if a > offset:
                self._write(memoryview(bytes(a - offset)), offset)
            self._zero_units(a, b)
            if b < offset + n:
                self._write(memoryview(bytes(offset + n - b)), b)

    def discard(self, offset: int, n: int) -> None:
        """Deallocate whole clusters in the range, as QEMU does: v3 images then read
        zeros there, v2 images read the backing file (or zeros); partial clusters at
        either end are left alone (discard is a hint)."""
        if offset < 0 or n < 0 or offset + n > self.size:
            raise InvalidOptionError("range outside the disk")
        cs = self.cluster_size
        a = (offset + cs - 1) // cs * cs
        b = (offset + n) // cs * cs
        if offset + n == self.size:
            b = (offset + n + cs - 1) // cs * cs
        if a >= b:
            return
        with self._lock:
            self._mark_modified()
            self._discard_clusters(a, min(b, self._l1_span_end()), full=False)

    def flush(self, *, sync_only_metadata: bool = False) -> None:
        """Make every write so far durable, in the order that keeps the image consistent."""
        with self._lock:
            if self._closed:
                raise ClosedImageError("I/O operation on closed image")
            refs = self.refs
            self._refuse_if_failed()
            self._stage_sync()                                  # data before anything points at it
            if self._rc_cache.dirty_count:
                self._rc_cache.write_dirty()
                if refs.table_dirty:
                    self._stage_sync()
            if refs.table_dirty:
                refs.write_table_entries()
            self._stage_sync()
            if self._l2c.dirty_count:
                self._l2c.write_dirty()
                self._stage_sync()
            if self._l1_dirty:
                base = self._l1_offset
                for i in sorted(self._l1_dirty):
                    self._write_meta(struct.pack(">Q", self._l1[i]), base + i * 8,
                                     "the active L1 table")
                self._l1_dirty.clear()
                self._stage_sync()
            if refs.apply_pending_frees():
                # the cluster compressed data was being packed into may be free now and
                # reused for anything: start packing in a fresh cluster
                self._free_byte_offset = 0
                self._rc_cache.write_dirty()
                refs.write_table_entries()
                self._stage_sync()
            if self._unordered and not sync_only_metadata:
                self._sync()                              # the one sync of an unordered image

    def close(self) -> None:
        if getattr(self, "_closed", True):
            return super().close()
        try:
            if self._failed is None:       # poisoned: nothing more is written
                self.flush()
            if self._marked_dirty and self._failed is None:
                self.header.incompatible_features &= ~C.INCOMPAT_DIRTY
                self._write_header_field(C.HDR_INCOMPATIBLE_FEATURES, ">Q",
                                         self.header.incompatible_features)
                self._sync()
        finally:
            self._closed = True
            super().close()

    # -- the write engine ------------------------------------------------------------
    def _l1_span_end(self) -> int:
        return min(self.size + self.cluster_size, len(self._l1) << self._l2_span_bits)

    def _write(self, mv: memoryview, offset: int, src=None) -> None:
        """``src`` (fd, file offset of guest offset 0, state): see pwrite."""
        end = offset + len(mv)
        cbits = self.cluster_bits
        cs = self.cluster_size
        mask = self._l2_entries - 1
        for pos, tend, table, toff in self._tables(offset, end):
            i = (pos >> cbits) & mask
            while pos < tend:
                cstart = pos & ~(cs - 1)
                cend = min(cstart + cs, tend)
                e, bm = self._entry(table, i)
                full = pos == cstart and cend == cstart + cs
                if self._in_place(e):
                    # a run of in-place clusters with contiguous host offsets: one pwrite
                    host0 = (e & C.L2E_OFFSET_MASK) + (pos - cstart)
                    j, stop = i, cend
                    if not self.header.extended_l2:
                        while stop < tend and j + 1 <= mask:
                            e2, _ = self._entry(table, j + 1)
                            if not self._in_place(e2) or (e2 & C.L2E_OFFSET_MASK) != \
                                    (e & C.L2E_OFFSET_MASK) + (j + 1 - i) * cs:
                                break
                            j += 1
                            stop = min(stop + cs, tend)
                        self._write_data(mv[pos - offset:stop - offset], host0,
                                         src and (src[0], src[1] + pos, src[2]), pos)
                    else:
                        self._write_ext_in_place(table, toff, i, e, bm, mv, offset, pos, cend)
                    pos = stop
                    i = j + 1
                    continue
                if full and not self.header.extended_l2:
                    # a run of whole clusters needing new space: one allocation, one pwrite
                    # (the run's entries read and set at once: per-cluster calls were
                    # most of a plain convert's Python time)
                    most = min((tend - cstart) // cs, mask + 1 - i)
                    olds = struct.unpack_from(f">{most}Q", table, i * 8)
                    n = 1
                    while n < most and (not olds[n] or not self._in_place(olds[n])):
                        n += 1
                    stop = cstart + n * cs
                    host = self._alloc_data(n, cstart)
                    self._write_data(mv[pos - offset:stop - offset], host,
                                     src and (src[0], src[1] + pos, src[2]), pos)
                    struct.pack_into(f">{n}Q", table, i * 8,
                                     *range(host | C.OFLAG_COPIED,
                                            host + n * cs | C.OFLAG_COPIED, cs))
                    self._l2c.mark_dirty(toff)
                    for old in olds[:n]:
                        if old:
                            self._free_entry(old)
                    pos = stop
                    i += n
                    continue
                self._write_cow(table, toff, i, e, bm, mv, offset, pos, cend, cstart)
                pos = cend
                i += 1

    def _alloc_data(self, n: int, guest: int) -> int:
        """Host space for ``n`` data clusters starting at guest offset ``guest``: in an
        external data file the mapping is the identity (and is not refcounted)."""
        if self.header.has_data_file:
            return guest
        host = self.refs.alloc(n)
        self._claim(host, n * self.cluster_size, "guest data")
        return host

    def _in_place(self, e: int) -> bool:
        """Standard cluster that belongs to the active layer alone: write in place."""
        if e & C.OFLAG_COMPRESSED or not e & C.OFLAG_COPIED:
            return False
        if not e & C.L2E_OFFSET_MASK and not self.header.has_data_file:
            return False
        if not self.header.extended_l2 and e & C.OFLAG_ZERO:
            return False       # zero cluster with a preallocated host: rewrite it whole
        return True

    def _old_content(self, e: int, bm: int, cstart: int, into: memoryview) -> None:
        """What the cluster at guest ``cstart`` reads as now (whole cluster)."""
        if e & C.OFLAG_COMPRESSED:
            coff, csize, _start, _n = compressed_extent(e, self.cluster_bits)
            src = bytearray(csize)
            self.be.readinto(src, coff)
            into[:] = self._decompressor().decompress(src)
            return
        # everything else: the reader knows how (zero, unallocated -> backing, data)
        self._read_clipped(into, cstart)

    def _write_cow(self, table, toff, i, e, bm, mv, offset, pos, cend, cstart) -> None:
        cs = self.cluster_size
        h = self.header
        if h.extended_l2 and not e & C.OFLAG_COMPRESSED and not (e & C.L2E_OFFSET_MASK):
            # unallocated cluster with subclusters: allocate, write only what is touched
            host = self._alloc_data(1, cstart)
            new_bm = bm & _ALL_ZERO          # zero bits stay for untouched subclusters
            self._set_entry(table, toff, i, host | C.OFLAG_COPIED, new_bm)
            self._write_ext_in_place(table, toff, i, host | C.OFLAG_COPIED, new_bm, mv,
                                     offset, pos, cend)
            return
        buf = bytearray(cs)
        bv = memoryview(buf)
        if not (pos == cstart and cend == cstart + cs):
            self._old_content(e, bm, cstart, bv)
        bv[pos - cstart:cend - cstart] = mv[pos - offset:cend - offset]
        reuse = (not h.extended_l2 and e & C.OFLAG_ZERO and e & C.OFLAG_COPIED
                 and e & C.L2E_OFFSET_MASK)
        host = (e & C.L2E_OFFSET_MASK) if reuse else self._alloc_data(1, cstart)
        self._write_data(bv[:max(0, min(cs, self.size - cstart))] if self.data_be is not self.be
                         else bv, host, guest=cstart)
        new_bm = _ALL_ALLOC if h.extended_l2 else 0
        self._set_entry(table, toff, i, host | C.OFLAG_COPIED, new_bm)
        if not reuse:
            self._free_entry(e, bm)

    def _write_ext_in_place(self, table, toff, i, e, bm, mv, offset, pos, cend) -> None:
        """Extended L2, cluster owned by the active layer: write the touched subclusters,
        filling the untouched part of a partially written subcluster from what it read
        as before (backing data or zeros)."""
        cs = self.cluster_size
        sc = cs >> 5
        cstart = pos & ~(cs - 1)
        host = e & C.L2E_OFFSET_MASK
        first = (pos - cstart) // sc
        last = (cend - 1 - cstart) // sc
        a0 = cstart + first * sc
        b0 = cstart + (last + 1) * sc
        if (pos != a0 and not bm & (1 << first)) or (cend != b0 and not bm & (1 << last)):
            # partial subclusters that are not allocated: build them whole
            buf = bytearray(b0 - a0)
            bv = memoryview(buf)
            for s in {first, last}:
                if not bm & (1 << s):
                    part = bv[(s - first) * sc:(s - first + 1) * sc]
                    g = cstart + s * sc
                    if bm & (1 << (32 + s)):
                        zero_fill(part)
                    elif self.backing is not None:
                        self.backing._read_clipped(part, g)
                    else:
                        zero_fill(part)
                elif s in (first, last):
                    part = bv[(s - first) * sc:(s - first + 1) * sc]
                    if self._crypto is not None:
                        self._crypto.read_into(self.data_be, part, host + s * sc,
                                               cstart + s * sc)
                    else:
                        self.data_be.readinto(part, host + s * sc)
            bv[pos - a0:cend - a0] = mv[pos - offset:cend - offset]
            self._write_data(bv, host + first * sc, guest=a0)
        else:
            self._write_data(mv[pos - offset:cend - offset], host + (pos - cstart), guest=pos)
        bits = ((1 << (last + 1)) - 1) & ~((1 << first) - 1)
        new_bm = (bm | bits) & ~(bits << 32)
        if new_bm != bm:
            self._set_entry(table, toff, i, e, new_bm)

    def _free_entry(self, e: int, bm: int = 0) -> None:
        """Drop the reference an L2 entry held (the caller replaced it)."""
        if e & C.OFLAG_COMPRESSED:
            _coff, _csize, start, n = compressed_extent(e, self.cluster_bits)
            self.refs.free(start, n)
            self.refs.block_freed(start, n)
            return
        off = e & C.L2E_OFFSET_MASK
        if off and self.data_be is self.be:
            self.refs.free(off, self.cluster_size)
            self.refs.block_freed(off, self.cluster_size)

    def _zero_units(self, a: int, b: int) -> None:
        """v3: mark whole clusters (or subclusters) in [a, b) as zero, freeing space."""
        h = self.header
        cs = self.cluster_size
        mask = self._l2_entries - 1
        for pos, tend, table, toff in self._tables(a, b):
            while pos < tend:
                i = (pos >> self.cluster_bits) & mask
                cstart = pos & ~(cs - 1)
                cend = min(cstart + cs, tend)
                e, bm = self._entry(table, i)
                if not h.extended_l2:
                    self._set_entry(table, toff, i, C.OFLAG_ZERO)
                    self._free_entry(e, bm)
                elif pos == cstart and cend == cstart + cs:
                    self._set_entry(table, toff, i, 0, _ALL_ZERO)
                    self._free_entry(e, bm)
                else:
                    sc = cs >> 5
                    first = (pos - cstart) // sc
                    last = (cend - cstart) // sc - 1
                    bits = ((1 << (last + 1)) - 1) & ~((1 << first) - 1)
                    if e & C.OFLAG_COMPRESSED or (e & C.L2E_OFFSET_MASK and
                                                  not e & C.OFLAG_COPIED):
                        # shared or compressed: materialise a private copy first
                        self._write_cow(table, toff, i, e, bm, memoryview(b""), pos, pos, pos,
                                        cstart)
                        e, bm = self._entry(table, i)
                    self._set_entry(table, toff, i, e, (bm & ~bits) | (bits << 32))
                pos = cend

    def _zero_v2(self, offset: int, n: int) -> None:
        """v2 has no zero flag: unallocated clusters of an image without backing file
        already read as zeros; everything else gets explicit zeros."""
        end = offset + n
        chunk = 1 << 20
        for a, ln, kind, _host, _cs in list(self._runs(offset, end)):
            if kind == C.KIND_UNALLOC and self.backing is None:
                continue
            p = a
            while p < a + ln:
                k = min(chunk, a + ln - p)
                self._write(memoryview(bytes(k)), p)
                p += k

    def _discard_clusters(self, a: int, b: int, *, full: bool) -> None:
        h = self.header
        cs = self.cluster_size
        span = self._l2_span_bits
        mask = self._l2_entries - 1
        pos = a
        while pos < b:
            l1i = pos >> span
            tend = min(b, (l1i + 1) << span)
            if not self._l1[l1i] & C.L1E_OFFSET_MASK and (self.backing is None or full
                                                          or h.version < 3):
                pos = tend           # nothing allocated here and nothing to hide
                continue
            table, toff = self._l2_for_write(l1i)
            while pos < tend:
                i = (pos >> self.cluster_bits) & mask
                e, bm = self._entry(table, i)
                allocated = bool(e & (C.L2E_OFFSET_MASK | C.OFLAG_COMPRESSED))
                if full:
                    ne, nbm = 0, 0
                elif self.backing is not None or allocated:
                    if h.extended_l2:
                        ne, nbm = 0, _ALL_ZERO
                    else:
                        ne, nbm = (C.OFLAG_ZERO if h.version >= 3 else 0), 0
                else:
                    ne, nbm = 0, 0
                if (ne, nbm) != (e, bm):
                    self._set_entry(table, toff, i, ne, nbm)
                    self._free_entry(e, bm)
                pos += cs
