"""Reading qcow2 images: the active layer or an internal snapshot, through the L1/L2
tables, with compressed clusters, subclusters and an external data file.

Reads are planned from metadata: one L2 table slice is decoded per call into runs of
(kind, host offset) by a batch kernel (``qcow2.kernels``), so Python works per run, never
per byte; data runs are read with ``preadv`` straight into the caller's buffer,
compressed clusters are read in one piece per batch and decoded in one kernel call
(split with a helper thread when big).  A read inside one cluster of a plain entry
takes a shorter path (random 4 KiB reads).

What an image refers to (its backing file, its external data file) is opened by the
opener it is given (``qcow2.opener``), which owns the policy for companions.
"""

from __future__ import annotations

import os
import struct

from . import constants as C
from .cache import TableCache
from .errors import CorruptImageError, DecompressionError, Qcow2Error, ReadOnlyError, \
    UnsafeImageError
from .header import Header
from .image import ST_DATA, ST_OFFSET_VALID, ST_ZERO, Image, zero_fill
from .lightweight import Lock, RLock, local
from .paths import combine_path
from .readplan import PlannedReads, empty_table
from .refcount import RefcountReader
from .snapshot import Snapshot, find_snapshot, read_snapshot_table

TYPE_CHECKING = False
if TYPE_CHECKING:        # (importing typing costs every CLI process ~3 ms)
    from typing import Iterator

    from .backends import Backend

_HOST_KINDS = (C.KIND_DATA, C.KIND_ZERO_ALLOC, C.KIND_UNALLOC_ALLOC)
# any bit but COPIED and the offset: not a plain data entry (compressed, zero, reserved)
_NOT_PLAIN_DATA = ~(C.L2E_OFFSET_MASK | C.OFLAG_COPIED) & 0xFFFFFFFFFFFFFFFF
_unpack_u64 = struct.Struct(">Q").unpack_from
_serial = local()                       # .on: this thread does not split decodes
_SPLIT_MIN = 512 << 10                  # decoded bytes worth a helper thread
_pool = None                            # (executor, pid) of the decode helpers
_pool_lock = Lock()


def _decode_pool():
    """The helper threads that decode half of a big batch of compressed clusters
    (one fewer than the usable CPUs; None with one CPU).  Made on first use, and
    again in a forked child (the parent's threads do not exist there)."""
    global _pool
    pid = os.getpid()
    p = _pool
    if p is None or p[1] != pid:
        with _pool_lock:
            p = _pool
            if p is None or p[1] != pid:
                try:
                    cpus = len(os.sched_getaffinity(0))
                except (AttributeError, OSError):
                    cpus = os.cpu_count() or 1
                ex = None
                if cpus > 1:
                    from concurrent.futures import ThreadPoolExecutor
                    ex = ThreadPoolExecutor(max_workers=cpus - 1,
                                            thread_name_prefix="qcow2-decode")
                p = _pool = (ex, pid)
    return p[0]


def _by_host(c):
    return c[2]


def _decode_into(dec, mv, src, full, offset: int) -> None:
    """One kernel call for whole clusters ``((guest, n, host, csize), buffer offset)``;
    ``dec`` may be a callable returning this thread's decompressor."""
    if not hasattr(dec, "decompress_into"):
        dec = dec()
    dec.decompress_into(mv, src, [so for _c, so in full], [c[3] for c, _so in full],
                        dest_offsets=[c[0] - offset for c, _so in full])


class serial_reads:
    """Within this context the calling thread decodes compressed clusters itself,
    never with helper threads: for callers that already run one reader per core."""

    def __enter__(self):
        self._prev = getattr(_serial, "on", False)
        _serial.on = True
        return self

    def __exit__(self, *exc) -> None:
        _serial.on = self._prev


class Qcow2Image(PlannedReads, Image):
    """A qcow2 image opened for reading (``qcow2.writer`` adds writing).

    ``companions`` opens the backing file and the external data file (the opener
    passes its own; None opens neither: reads of an external data file then refuse,
    unallocated clusters read zeros).  ``owns_backend`` False: ``close()`` leaves
    ``backend`` open (a store the caller handed in).
    """

    format = "qcow2"

    def __init__(self, backend: Backend, filename: str, *, untrusted: bool = False,
                 snapshot=None, companions=None, owns_backend: bool = True,
                 l2_cache_bytes: int = C.DEFAULT_L2_CACHE_BYTES, limits=None):
        self.be = backend
        self.owns_backend = owns_backend
        self.filename = filename
        self.untrusted = untrusted
        self.file_size = backend.size()
        self.header = h = Header.parse(self._read_meta, self.file_size)
        charge = None
        self.budget = None                     # untrusted mode: the metadata budget
        if untrusted:
            from . import untrusted as U
            limits = U.resolve(limits)
            U.check_header(h, self.file_size, limits)
            self.budget = U.Budget(limits)     # metadata bytes, charged before reads
            charge = self.budget.charge_snapshot_table
        self.cluster_size = h.cluster_size
        self.cluster_bits = h.cluster_bits
        self.size = h.size
        self.encrypted = h.crypt_method != C.CRYPT_NONE
        self._crypto = None                    # (encrypted images) the data cipher
        self._l2_entries = 1 << h.l2_bits
        self._l2_span_bits = h.cluster_bits + h.l2_bits
        self._unit_shift = h.cluster_bits - (5 if h.extended_l2 else 0)
        # reads within one cluster of a plain L2 entry skip the run decoder
        self._fast_reads = not h.extended_l2 and not h.has_data_file and not self.encrypted
        # compressed clusters per batch: 4 MiB of output (2 clusters of 2 MiB), which
        # bounds the read buffer to ~8 MiB whatever the cluster size
        self._batch_max = max(2, (4 << 20) >> h.cluster_bits)
        self._l1: list[int] | None = None
        self._l1_offset = h.l1_table_offset
        self._l1_entries = h.l1_size
        self._l1_what = "active L1 table"
        self._lock = RLock()
        self._l2c = TableCache(h.cluster_size, l2_cache_bytes, self._read_meta, self._write_meta,
                               on_pressure=self._cache_pressure)
        self._tls = local()
        self._meta_prealloc: bool | None = None
        self._kernels = None
        self.snapshots_list: list[Snapshot] = read_snapshot_table(
            self._read_meta, h.snapshots_offset, h.nb_snapshots, self.file_size, charge)
        self.snapshot: Snapshot | None = None
        self.data_be: Backend = backend
        # error injection (backends.blkdebug): the engine's steps named, else None
        self.debug_event = getattr(backend, "debug_event", None)
        self.data_filename: str | None = None
        self.data_display_name: str | None = None
        self.backing = None
        self.backing_filename = h.backing_file
        self.full_backing_filename = (combine_path(filename, h.backing_file)
                                      if h.backing_file else None)
        try:
            if self.encrypted:
                from .encrypted import DataCrypto
                key = companions.key_for(self) if companions is not None else None
                self._crypto = DataCrypto(h, self._read_meta, self.file_size, filename, key)
            if snapshot is not None:
                self._select_snapshot(snapshot)
            if h.has_data_file and companions is not None and (
                    companions.open_backing or self.writable):
                self.data_be, self.data_filename = companions.data_file(self)
                self.data_display_name = h.data_file      # as stored: what map prints
            elif h.has_data_file:
                # info without the chain: the data file is named, not opened (reads of
                # guest data refuse instead of looking in the wrong file)
                self.data_be = None
            if h.backing_file and companions is not None and companions.open_backing:
                self.backing = companions.backing_file(self)
            if untrusted:
                # before the first data read: every L1/L2/refcount entry is checked
                U.scan(self, limits)
        except BaseException:
            self.close()
            raise
        self._fast = self._fast_state()

    # -- helpers ---------------------------------------------------------------
    def _read_meta(self, n: int, offset: int) -> bytes:
        return self.be.pread(n, offset)

    @property
    def l2_span(self) -> int:
        """Guest bytes one L2 table maps (cluster size x entries per table)."""
        return 1 << self._l2_span_bits

    @property
    def kernels(self):
        if self._kernels is None:
            from . import kernels
            self._kernels = kernels
        return self._kernels

    def find_snapshot(self, key) -> Snapshot | None:
        """The internal snapshot whose id or name is ``key`` (the place of its L1 table
        checked as QEMU checks it), or None."""
        sn = find_snapshot(self.snapshots_list, key)
        if sn is not None:
            self.header.validate_snapshot_l1(sn)
        return sn

    def _select_snapshot(self, key) -> None:
        sn = self.find_snapshot(key)
        if sn is None:
            raise Qcow2Error(f"Failed to load snapshot: snapshot {key!r} not found "
                             f"in '{self.filename}'")
        self.snapshot = sn
        self._l1_offset = sn.l1_table_offset
        self._l1_entries = sn.l1_size
        self._l1_what = f"L1 table of snapshot {sn.id}"

    # -- metadata tables --------------------------------------------------------
    def _l1_table(self) -> list[int]:
        if self._l1 is None:
            n, off = self._l1_entries, self._l1_offset
            if n and off + n * 8 > self.file_size:
                raise CorruptImageError(
                    f"{self._l1_what} at {off:#x} ({n} entries) extends past the end of "
                    f"the file (size {self.file_size:#x})", offset=off, size=n * 8,
                    what="L1 table")
            raw = self._read_meta(n * 8, off) if n else b""
            self._l1 = list(struct.unpack(f">{n}Q", raw))
        return self._l1

    def _write_meta(self, data, offset: int) -> None:
        raise ReadOnlyError(f"image '{self.filename}' is open read-only")

    def _cache_pressure(self) -> None:
        pass

    def _l2_table(self, l1_index: int, l2_offset: int):
        with self._lock:
            if l2_offset in self._l2c:
                t = self._l2c.get(l2_offset)
                if self._fast is not None:
                    self._remember(l1_index, t)
                return t
        if l2_offset & (self.cluster_size - 1):
            raise CorruptImageError(
                f"L2 table offset {l2_offset:#x} unaligned (L1 index: {l1_index:#x})",
                offset=self._l1_offset + l1_index * 8, size=8, what="L1 entry")
        if l2_offset + self.cluster_size > self.file_size:
            raise CorruptImageError(
                f"L2 table for L1 index {l1_index} at {l2_offset:#x} extends past the end "
                f"of the file (size {self.file_size:#x})", offset=l2_offset,
                size=self.cluster_size, what="L2 table")
        with self._lock:
            t = self._l2c.get(l2_offset)
            if self._fast is not None:
                self._remember(l1_index, t)
            return t

    def _runs(self, start: int, end: int) -> Iterator[tuple[int, int, int, int, int]]:
        """Decode the mapping of [start, end) into runs (guest, length, kind, host, csize).

        For data-carrying kinds ``host`` is the host offset of ``guest``; for compressed
        clusters it is the compressed data offset of the whole cluster.
        """
        l1 = self._l1_table()
        span_bits = self._l2_span_bits
        mask = C.L1E_OFFSET_MASK
        cbits = self.cluster_bits
        ushift = self._unit_shift
        h = self.header
        k = self.kernels
        pos = start
        n_l1 = len(l1)
        while pos < end:
            idx = pos >> span_bits
            l2_off = l1[idx] & mask if idx < n_l1 else 0
            if l2_off == 0:
                j = idx + 1
                while (j << span_bits) < end and (j >= n_l1 or not l1[j] & mask):
                    j += 1
                stop = min(end, j << span_bits)
                yield pos, stop - pos, C.KIND_UNALLOC, 0, 0
                pos = stop
                continue
            table_end = min(end, (idx + 1) << span_bits)
            table = self._l2_table(idx, l2_off)
            first = (pos >> cbits) & (self._l2_entries - 1)
            last = ((table_end - 1) >> cbits) & (self._l2_entries - 1)
            kinds, starts, lens, hosts, csizes = k.l2_runs(
                table, first, last - first + 1, cluster_bits=cbits, extended=h.extended_l2,
                data_file=h.has_data_file, table_offset=l2_off)
            base = (idx << span_bits) + (first << cbits)
            for kind, s, n, host, csize in zip(kinds.tolist(), starts.tolist(), lens.tolist(),
                                               hosts.tolist(), csizes.tolist(), strict=True):
                g = base + (s << ushift)
                gend = g + (n << ushift)
                a = g if g > pos else pos
                b = gend if gend < table_end else table_end
                if a >= b:
                    continue
                if kind == C.KIND_COMPRESSED:
                    yield a, b - a, kind, host, csize
                elif kind in _HOST_KINDS:
                    yield a, b - a, kind, host + (a - g), 0
                else:
                    yield a, b - a, kind, 0, 0
            pos = table_end

    # -- reading ------------------------------------------------------------------
    def _decompressor(self):
        d = getattr(self._tls, "dec", None)
        if d is None:
            # Untrusted images decode with zlib's exact rules (libdeflate, the fast
            # default, accepts a few malformed streams that QEMU refuses).
            d = self._tls.dec = self.kernels.Decompressor(self.header.compression_type,
                                                          self.cluster_size,
                                                          strict=self.untrusted)
        return d

    def _require_readable(self) -> None:
        if self.data_be is None:
            raise Qcow2Error(f"'{self.filename}' was opened without its external data file "
                             f"{self.header.data_file!r} (backing=False): its data cannot "
                             f"be read")
        if self.untrusted and self.header.corrupt:
            at = C.HEADER_INCOMPATIBLE_OFFSET
            err = UnsafeImageError(f"image '{self.filename}' is marked corrupt; untrusted "
                                   f"mode does not read it (at offset {at:#x})")
            err.offset, err.size, err.what = at, 8, "header"  # type: ignore[attr-defined]
            raise err
        if self.encrypted:
            self._crypto.ready()

    def _one_cluster(self, offset: int):
        """Fast path for reads inside one cluster (random 4 KiB reads): the host offset
        of ``offset`` for a plain data entry, -1 for an unallocated one, None for any
        other entry (zero flags, compressed, reserved bits, ...: the kernel decodes
        those, with its checks)."""
        l1 = self._l1
        if l1 is None:
            l1 = self._l1_table()
        idx = offset >> self._l2_span_bits
        if idx >= len(l1):
            return None
        l2_off = l1[idx] & C.L1E_OFFSET_MASK
        if not l2_off:
            if self._fast is not None:          # (a table of unallocated entries)
                self._remember(idx, empty_table(self.cluster_size))
            return -1
        table = self._l2_table(idx, l2_off)
        index = (offset >> self.cluster_bits) & (self._l2_entries - 1)
        entry = _unpack_u64(table, index << 3)[0]
        if not entry:
            return -1
        cmask = self.cluster_size - 1
        if entry & _NOT_PLAIN_DATA or not entry & C.L2E_OFFSET_MASK or entry & cmask:
            return None
        return (entry & C.L2E_OFFSET_MASK) + (offset & cmask)

    def _read(self, mv: memoryview, offset: int) -> None:
        self._require_readable()
        n = len(mv)
        end = offset + n
        cbits = self.cluster_bits
        if self._fast_reads and offset >> cbits == (end - 1) >> cbits:
            host = self._one_cluster(offset)
            if host is not None:
                if host >= 0:
                    if self.debug_event is not None:
                        self.debug_event("read_aio")
                    got = self.data_be.readinto(mv, host)
                    if got < n:
                        zero_fill(mv[got:])
                elif self.backing is None:
                    zero_fill(mv)
                else:
                    self.backing._read_clipped(mv, offset)
                return
        if (self._fast_reads and not (offset | n) & ((1 << cbits) - 1)
                and self._read_packed(mv, offset, end)):
            return
        batch: list[tuple[int, int, int, int]] = []
        for a, n, kind, host, csize in self._runs(offset, end):
            dst = mv[a - offset:a - offset + n]
            if kind == C.KIND_DATA:
                # (compressed clusters keep collecting: each run has its own part of mv)
                if self._crypto is not None:
                    self._crypto.read_into(self.data_be, dst, host, a)
                    continue
                if self.debug_event is not None:
                    self.debug_event("read_aio")
                got = self.data_be.readinto(dst, host)
                if got < n:
                    zero_fill(dst[got:])
            elif kind == C.KIND_COMPRESSED:
                if self._crypto is not None:
                    raise CorruptImageError(
                        f"compressed cluster in the encrypted image '{self.filename}' "
                        f"(QEMU never writes one)", offset=host, size=csize,
                        what="L2 entry")
                batch.append((a, n, host, csize))
                if len(batch) >= self._batch_max:
                    self._read_compressed(mv, offset, batch)
                    batch = []
            elif kind in (C.KIND_ZERO, C.KIND_ZERO_ALLOC):
                zero_fill(dst)
            else:
                if self.backing is None:
                    zero_fill(dst)
                else:
                    self.backing._read_clipped(dst, a)
        if batch:
            self._read_compressed(mv, offset, batch)

    def _read_packed(self, mv: memoryview, offset: int, end: int) -> bool:
        """A converter's usual chunk, whole clusters of one L2 table all compressed and
        stored in order with small gaps (as qemu-img writes them): one read and one
        kernel call, no Python step per cluster (10,000 clusters of a 633 MiB image
        cost ~50 ms of CPU in the general path).  False, having written nothing that
        matters, where any of that does not hold: the general path then reads, and
        reports what is wrong with the guest offset."""
        cbits = self.cluster_bits
        count = (end - offset) >> cbits
        if count > self._batch_max or (count << cbits >= _SPLIT_MIN
                                       and not getattr(_serial, "on", False)):
            return False            # (the general path splits these among threads)
        span_bits = self._l2_span_bits
        idx = offset >> span_bits
        l1 = self._l1_table()
        if (end - 1) >> span_bits != idx or idx >= len(l1):
            return False
        l2_off = l1[idx] & C.L1E_OFFSET_MASK
        if not l2_off:
            return False
        first = (offset >> cbits) & (self._l2_entries - 1)
        kinds, _starts, _lens, hosts, csizes = self.kernels.l2_runs(
            self._l2_table(idx, l2_off), first, count, cluster_bits=cbits, extended=False,
            data_file=False, table_offset=l2_off)
        if len(kinds) != count or kinds.count(C.KIND_COMPRESSED) != count:
            return False
        hl = hosts.tolist()
        sl = csizes.tolist()
        lo = hl[0]
        hi = max([h + s for h, s in zip(hl, sl, strict=True)])
        if hi - lo > sum(sl) + count * min(self.cluster_size, 64 << 10) or hl != sorted(hl):
            return False
        src = self._src_buffer(hi - lo)
        if self.be.readinto(src, lo) < hi - lo:
            return False            # (past the end of the file: zeros, as QEMU reads)
        try:
            self._decompressor().decompress_into(mv, src, [h - lo for h in hl], sl,
                                                 src_file_offset=lo)
        except DecompressionError:
            return False
        return True

    def _src_buffer(self, n: int) -> memoryview:
        """A per-thread buffer for compressed data, reused (a fresh one per batch
        costs a page fault per 4 KiB)."""
        buf = getattr(self._tls, "src", None)
        if buf is None or len(buf) < n:
            if n > 8 << 20:                     # (rare, big clusters): not kept
                return memoryview(bytearray(n))
            from .atomic import io_buffer
            buf = self._tls.src = io_buffer(max(n, 1 << 20))
        return buf[:n]

    def _read_compressed(self, mv: memoryview, offset: int, batch) -> None:
        """Decode a batch of compressed clusters ``(guest, length, host, csize)``.

        Their host ranges are read into one buffer with as few reads as possible
        (clusters less than a cluster -- at most 64 KiB -- apart share a read; qemu-img
        writes them back to back, with plain clusters in between), then all whole
        clusters are decoded by one kernel call, split across threads when big."""
        cs = self.cluster_size
        gap = min(cs, 64 << 10)
        groups: list[list[int]] = []            # [host start, host end, buffer offset]
        placed = []                             # (cluster, its offset in the buffer)
        pos = 0
        for c in sorted(batch, key=_by_host):
            h, e = c[2], c[2] + c[3]
            g = groups[-1] if groups else None
            if g is not None and h - g[1] <= gap:
                if e > g[1]:
                    g[1] = e
            else:
                if g is not None:
                    pos += g[1] - g[0]
                g = [h, e, pos]
                groups.append(g)
            placed.append((c, g[2] + h - g[0]))
        g = groups[-1]
        src = self._src_buffer(pos + g[1] - g[0])
        for glo, ghi, at in groups:
            got = self.be.readinto(src[at:at + ghi - glo], glo)
            if got < ghi - glo:
                zero_fill(src[at + got:at + ghi - glo])   # zeros past EOF, as QEMU reads
        full = [p for p in placed if p[0][1] == cs]
        dec = self._decompressor()
        bad = None
        try:
            if full:
                bad = full
                self._decode_full(dec, mv, src, full, offset)
            for p in placed:
                if p[0][1] != cs:
                    bad = [p]
                    (a, n, _host, csize), so = p
                    cl = dec.decompress(src[so:so + csize])
                    within = a & (cs - 1)
                    mv[a - offset:a - offset + n] = memoryview(cl)[within:within + n]
        except DecompressionError as exc:
            idx = exc.index if exc.index is not None and exc.index < len(bad) else 0
            (a, _n, host, csize), _so = bad[idx]
            raise DecompressionError(
                f"compressed cluster at host offset {host:#x} (guest offset "
                f"{a & ~(cs - 1):#x}) does not decode to a full cluster: {exc}",
                offset=host, size=csize, index=idx) from None

    def _decode_full(self, dec, mv, src, full, offset: int) -> None:
        """Decode whole clusters ``(cluster, buffer offset)`` into ``mv``; big batches
        are split with a helper thread (the kernels release the GIL), unless this
        thread is already one of several workers (convert: ``serial_reads``)."""
        half = len(full) // 2
        if (half and len(full) * self.cluster_size >= _SPLIT_MIN
                and not getattr(_serial, "on", False)):
            pool = _decode_pool()
            try:
                fut = pool.submit(_decode_into, self._decompressor, mv, src, full[half:],
                                  offset) if pool is not None else None
            except RuntimeError:                # (interpreter shutting down)
                fut = None
            if fut is not None:
                try:
                    _decode_into(dec, mv, src, full[:half], offset)
                finally:
                    # the helper writes into mv and reads src: never leave before it
                    # is done, whatever happened here
                    exc = fut.exception()
                if exc is not None:
                    if isinstance(exc, DecompressionError) and exc.index is not None:
                        exc.index += half
                    raise exc
                return
        _decode_into(dec, mv, src, full, offset)

    # -- allocation status ----------------------------------------------------------
    def _metadata_preallocated(self) -> bool:
        """QEMU's qcow2_detect_metadata_preallocation: many more clusters referenced
        than the file really allocates means metadata-only preallocation."""
        if self._meta_prealloc is None:
            real_clusters = max(0, self._actual_size()) // self.cluster_size
            threshold = max(real_clusters * 10 // 9, real_clusters + 2)
            end_cluster = (self.file_size + self.cluster_size - 1) // self.cluster_size
            rc = RefcountReader(self.header, self._read_meta, self.file_size)
            self._meta_prealloc = rc.count_referenced(end_cluster, threshold) >= threshold
        return self._meta_prealloc

    def block_status(self, start, end):
        """This layer's allocation; consecutive compressed clusters (one run each from
        the kernel) come out as one run, so that a compressed image's status costs
        per L2 table, not per cluster, above this."""
        self._require_readable()
        crypto = self.encrypted
        recurse = None
        comp_a = comp_n = 0                     # compressed clusters not yet yielded
        for a, n, kind, host, _csize in self._runs(start, end):
            if kind == C.KIND_COMPRESSED:
                if comp_n and comp_a + comp_n == a:
                    comp_n += n
                    continue
                if comp_n:
                    yield comp_a, comp_n, ST_DATA, 0
                comp_a, comp_n = a, n
                continue
            if comp_n:
                yield comp_a, comp_n, ST_DATA, 0
                comp_n = 0
            if kind == C.KIND_DATA:
                flags = ST_DATA
            elif kind == C.KIND_ZERO:
                yield a, n, ST_ZERO, 0
                continue
            elif kind == C.KIND_ZERO_ALLOC:
                flags = ST_ZERO
            elif kind == C.KIND_UNALLOC_ALLOC:
                flags = 0
            else:
                yield a, n, 0, 0
                continue
            if crypto:
                yield a, n, flags, 0
                continue
            flags |= ST_OFFSET_VALID
            if flags & ST_DATA:
                if recurse is None:
                    recurse = self._metadata_preallocated()
                if recurse:
                    yield from self._recurse_file(a, n, host)
                    continue
            yield a, n, flags, host
        if comp_n:
            yield comp_a, comp_n, ST_DATA, 0

    def _recurse_file(self, a: int, n: int, host: int):
        """Data clusters of a metadata-preallocated image: the file's holes read as zeros."""
        be = self.data_be
        fsize = be.size()
        pos = host
        end = host + n
        flags = ST_DATA | ST_OFFSET_VALID
        for off, ln in be.data_regions(host, min(end, fsize)):
            if off > pos:
                yield a + (pos - host), off - pos, flags | ST_ZERO, pos
            stop = min(off + ln, end)
            yield a + (off - host), stop - off, flags, off
            pos = stop
        if pos < end:
            yield a + (pos - host), end - pos, flags | ST_ZERO, pos

    # -- description ------------------------------------------------------------------
    def snapshots(self) -> list[dict]:
        return [sn.info() for sn in self.snapshots_list]

    def bitmaps(self) -> list[dict]:
        """The persistent dirty bitmaps as qemu-img info lists them."""
        h = self.header
        if h.bitmaps_ext is None:
            return []
        nb, dsize, doff = h.bitmaps_ext
        if doff + dsize > self.file_size:
            raise CorruptImageError(
                f"bitmap directory at {doff:#x} ({dsize} bytes) extends past the end of the "
                f"file (size {self.file_size:#x})", offset=doff, size=dsize,
                what="bitmap directory")
        from .bitmap import read_directory      # not on every open's import path

        return [e.info() for e in read_directory(self._read_meta(dsize, doff), doff, nb)]

    def format_specific(self) -> dict:
        h = self.header
        comp = C.COMPRESSION_NAMES[h.compression_type]
        if h.version == 2:
            d = {"compat": "0.10", "compression-type": comp, "refcount-bits": h.refcount_bits}
            if self.encrypted:
                d["encrypt"] = self._encrypt_info()
            return d
        d = {"compat": "1.1", "compression-type": comp, "lazy-refcounts": h.lazy_refcounts}
        bms = self.bitmaps()
        if bms:
            d["bitmaps"] = bms
        d["refcount-bits"] = h.refcount_bits
        if self.encrypted:
            d["encrypt"] = self._encrypt_info()
        if h.data_file is not None:
            d["data-file"] = h.data_file
        if h.has_data_file:
            d["data-file-raw"] = h.data_file_raw
        d["corrupt"] = h.corrupt
        d["extended-l2"] = h.extended_l2
        return d

    def _encrypt_info(self) -> dict:
        if self.header.crypt_method == C.CRYPT_AES:
            return {"format": "aes"}
        from .luks import luks_info
        off, length = self.header.crypto_header
        return luks_info(self._read_meta, off, length, self.file_size)

    def info(self) -> dict:
        h = self.header
        d: dict = {}
        if h.backing_format is not None:
            d["backing-filename-format"] = h.backing_format
        if self.snapshots_list:
            d["snapshots"] = self.snapshots()
        d["virtual-size"] = self.size
        d["filename"] = self.filename
        d["cluster-size"] = self.cluster_size
        d["format"] = "qcow2"
        d["actual-size"] = self._actual_size()
        d["format-specific"] = {"type": "qcow2", "data": self.format_specific()}
        if self.encrypted:
            d["encrypted"] = True
        if h.backing_file is not None:
            d["full-backing-filename"] = self.full_backing_filename
            d["backing-filename"] = h.backing_file
        d["dirty-flag"] = h.dirty
        return d

    def close(self) -> None:
        self._drop_fast()           # the lock-free read path holds the descriptor
        super().close()
        if self._crypto is not None:
            self._crypto.wipe()
        if self.data_be is not None and self.data_be is not self.be:
            self.data_be.close()
        self._close_backend()


__all__ = ["Qcow2Image", "serial_reads"]
