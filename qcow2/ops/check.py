"""Consistency check and repair of qcow2 images (``qemu-img check [-r leaks|all]``).

The check rebuilds, from the image's own structures, the reference count every host
cluster should have -- the header cluster, the active L1 table, each L2 table once per
L1 table pointing at it, each data cluster once per (L1 table, L2 entry) reaching it,
every host cluster a compressed cluster's bytes touch, the refcount table and blocks,
the snapshot table and snapshot L1 tables, the bitmap directory, bitmap tables and
bitmap data, the LUKS header -- and compares it with the stored refcounts: a stored
refcount below the computed one is a corruption, above it a leak.  It also checks the
COPIED flags (set iff the refcount is 1), alignment, reserved bits, ranges past the
end of the file and the snapshot table.

The rules, counts, messages, the result dict and the exit codes are those of QEMU 7.2
(``qcow2_co_check_locked`` and ``qemu-img check``), so that ``check()`` returns exactly
what ``qemu-img check --output=json`` prints.

Memory is bounded by the file: the computed and the stored refcounts are numpy arrays
with one entry per host cluster of the file (QEMU's limit of INT_MAX clusters applies,
and a check that would need more than half the machine's memory is refused).  L2
tables are classified with numpy, a batch of tables per step; Python only visits the
entries that have something to report, in QEMU's order.

Unlike qemu-img, which needs the key to open a LUKS-encrypted image, the check reads
no guest data and so works on encrypted images without one.

Repair (``repair="leaks"`` or ``"all"``) writes in an order that never makes the image
worse if interrupted: refcount increases before anything relies on them, decreases
only for clusters nothing references, a rebuilt refcount structure is written to free
clusters and made durable before the header points at it, and the dirty and corrupt
bits are cleared last.
"""

from __future__ import annotations

import errno
import os
import struct
from dataclasses import dataclass

import numpy as np

from .. import constants as C
from ..backends import FileBackend
from ..errors import (CorruptImageError, InvalidOptionError, Qcow2Error,
                      UnsafeImageError, UnsupportedFeatureError)
from ..header import Header
from ..refcount import decode_block, encode_block

# -- modes (QEMU's BdrvCheckMode) ------------------------------------------------------
FIX_LEAKS = 1
FIX_ERRORS = 2
_REPAIR_MODES = {None: 0, "leaks": FIX_LEAKS, "all": FIX_LEAKS | FIX_ERRORS}

# -- masks QEMU's check uses beyond constants.py (block/qcow2.h, qcow2-bitmap.c) --------
_L2E_STD_RESERVED = 0x3F000000000001FE
_REFT_RESERVED = 0x1FF
_L2_BITMAP_ALL_ALLOC = 0xFFFFFFFF
_L2_BITMAP_ALL_ZERO = 0xFFFFFFFF << 32
_MAX_INT = 0x7FFFFFFF
_INT64_MAX = 0x7FFFFFFFFFFFFFFF
_SNAPSHOT_EXTRA_V3_MIN = 16          # vm_state_size_large + disk_size
_SNAPSHOT_EXTRA_SIZE = 24            # what QEMU writes: + icount

_BME_TABLE_RESERVED = 0xFF000000000001FE
_BME_OFFSET_MASK = 0x00FFFFFFFFFFFE00
_BME_MAX_TABLE_SIZE = 0x8000000
_BME_MAX_PHYS_SIZE = 0x20000000
_BME_RESERVED_FLAGS = 0xFFFFFFFC
_BME_FLAG_IN_USE = 1

_U64 = np.uint64

# `qemu-img check --output=json` key order: QEMU's QDict iterates its hash buckets in
# order (tdb hash of the key modulo 512); for these keys that order is fixed.
_KEY_ORDER = ("image-end-offset", "compressed-clusters", "total-clusters", "corruptions",
              "corruptions-fixed", "check-errors", "leaks", "leaks-fixed",
              "allocated-clusters", "filename", "format", "fragmented-clusters")


class CheckFailedError(Qcow2Error):
    """The check could not complete (qemu-img: "Check failed: ...", exit status 1)."""

    exit_code = 1

    def __init__(self, message: str, *, errno_: int | None = None,
                 repaired: dict | None = None):
        super().__init__(message)
        self.errno = errno_
        #: what a repair fixed before the check failed ({"leaks-fixed": n, ...}), if any
        self.repaired = repaired


class CheckNotSupportedError(UnsupportedFeatureError):
    """The image format has no consistency checks (raw); qemu-img exits with 63."""

    exit_code = 63


class _Abort(Exception):
    """Internal: stop the check with an errno, as QEMU's functions return -errno."""

    def __init__(self, err: int):
        super().__init__(os.strerror(err))
        self.err = err


@dataclass
class CheckResult:
    """QEMU's BdrvCheckResult (with its BlockFragInfo flattened in)."""
    corruptions: int = 0
    leaks: int = 0
    check_errors: int = 0
    corruptions_fixed: int = 0
    leaks_fixed: int = 0
    image_end_offset: int = 0
    total_clusters: int = 0
    allocated_clusters: int = 0
    fragmented_clusters: int = 0
    compressed_clusters: int = 0

    def add(self, other: "CheckResult", allocation_info: bool) -> None:
        self.corruptions += other.corruptions
        self.leaks += other.leaks
        self.check_errors += other.check_errors
        self.corruptions_fixed += other.corruptions_fixed
        self.leaks_fixed += other.leaks_fixed
        if allocation_info:
            self.image_end_offset = other.image_end_offset
            self.total_clusters = other.total_clusters
            self.allocated_clusters = other.allocated_clusters
            self.fragmented_clusters = other.fragmented_clusters
            self.compressed_clusters = other.compressed_clusters

    def copy(self) -> "CheckResult":
        return CheckResult(**self.__dict__)


def _memory_budget() -> int:
    """Half the physical memory (no limit where the system does not say)."""
    try:
        return os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE") // 2
    except (ValueError, OSError, AttributeError):
        return 1 << 62


def _hex_alt(v: int) -> str:
    """C's ``%#x``: no prefix for zero."""
    return f"{v:#x}" if v else "0"


# ---------------------------------------------------------------------------
# the file under check
# ---------------------------------------------------------------------------

class _File:
    """The image file: reads zero-filled past the end (as QEMU's block layer does)."""

    def __init__(self, be: FileBackend):
        self.be = be
        self.size = be.size()
        self.writable = be.writable
        self.signaled = False           # a corruption was reported (once per open)
        self.marked_corrupt = False

    def read(self, n: int, offset: int) -> bytes:
        if n <= 0:
            return b""
        if offset >= self.size:
            return bytes(n)
        data = self.be.pread(n, offset)
        if len(data) < n:
            data = data + bytes(n - len(data))
        return data

    def write(self, data, offset: int) -> None:
        self.be.pwrite(data, offset)
        end = offset + len(data)
        if end > self.size:
            self.size = end

    def sync(self) -> None:
        self.be.flush()

    def truncate(self, size: int) -> None:
        self.be.truncate(size)
        self.size = size


class _Window:
    """Sequential small reads (the snapshot table) served from 1 MiB windows."""

    def __init__(self, f: _File):
        self.f = f
        self.start = 0
        self.buf = b""

    def read(self, n: int, offset: int) -> bytes:
        if not (self.start <= offset and offset + n <= self.start + len(self.buf)):
            self.start = offset
            self.buf = self.f.read(max(n, 1 << 20), offset)
        return self.buf[offset - self.start:offset - self.start + n]


@dataclass
class _Snapshot:
    l1_offset: int
    l1_size: int
    id: str
    name: str
    extra_data_size: int
    vm_state_size: int
    date_sec: int
    date_nsec: int
    vm_clock_nsec: int
    disk_size: int
    icount: int
    unknown_extra: bytes


def _parse_header(f: _File) -> tuple[Header, int, int]:
    """Parse the header as QEMU does in check mode: the snapshot table fields are left
    to the check (a broken table is reported there, not refused at open)."""
    def read(n: int, offset: int) -> bytes:
        data = f.be.pread(n, offset)
        if offset <= 0x3C < offset + len(data):
            b = bytearray(data)
            lo = 0x3C - offset
            b[lo:lo + 12] = bytes(min(12, len(b) - lo))
            data = bytes(b)
        return data

    h = Header.parse(read, f.size)
    nb, off = struct.unpack(">IQ", f.read(12, 0x3C))
    h.nb_snapshots, h.snapshots_offset = nb, off
    return h, nb, off


# ---------------------------------------------------------------------------
# one check pass (QEMU's qcow2_co_check_locked)
# ---------------------------------------------------------------------------

class _Pass:
    def __init__(self, f: _File, fix: int, log):
        self.f = f
        self.fix = fix
        self.log = log or (lambda _msg: None)
        h, _, _ = _parse_header(f)
        self.h = h
        self.cs = h.cluster_size
        self.cbits = h.cluster_bits
        self.extended = h.extended_l2
        self.esize = h.l2_entry_size
        self.l2_entries = 1 << h.l2_bits
        self.data_file = h.has_data_file
        self.bits = h.refcount_bits
        self.rmax = (1 << self.bits) - 1
        self.dtype = decode_block(bytes(8), self.bits).dtype
        self.per = self.cs * 8 // self.bits           # refcount block entries
        self.rb_bits = self.per.bit_length() - 1
        self.csize_shift = 62 - (self.cbits - 8)
        self.csize_mask = (1 << (self.cbits - 8)) - 1
        self.coffset_mask = (1 << self.csize_shift) - 1
        # in-memory state QEMU keeps for an open image
        n = h.l1_size
        self.l1 = list(struct.unpack(f">{n}Q", f.read(n * 8, h.l1_table_offset))) if n else []
        self._load_reftable(h.refcount_table_offset, h.refcount_table_clusters)
        self.snapshots: list[_Snapshot] = []
        self.snapshots_offset = 0
        self.snapshots_size = 0
        self.nb_snapshots = 0
        # the in-memory refcount table (IMRT)
        self.imrt = np.zeros(0, dtype=self.dtype)
        self.nb = 0
        self._pending: list[np.ndarray] = []
        self._pending_n = 0
        self._blocks: dict[int, object] = {}

    # -- small helpers ------------------------------------------------------------------
    def _load_reftable(self, offset: int, clusters: int) -> None:
        n = clusters * self.cs // 8
        self.reftable_offset = offset
        self.reftable = np.frombuffer(self.f.read(n * 8, offset), dtype=">u8").astype(_U64)
        self._blocks = {}

    def _ensure(self, n: int) -> None:
        """Room for ``n`` IMRT entries (capacity rounded to whole refcount blocks)."""
        if n <= len(self.imrt):
            return
        cap = max(n, len(self.imrt) * 2 if len(self.imrt) else n)
        cap = (cap + self.per - 1) // self.per * self.per
        try:
            grown = np.zeros(cap, dtype=self.dtype)
        except MemoryError:
            raise _Abort(errno.ENOMEM) from None
        grown[:len(self.imrt)] = self.imrt
        self.imrt = grown

    def _grow(self, n: int) -> None:
        """QEMU's realloc_refcount_array: the IMRT now covers ``n`` clusters."""
        if n > self.nb:
            self._ensure(n)
            self.nb = n

    # -- counting references ------------------------------------------------------------
    def _push(self, idx: np.ndarray) -> None:
        if not idx.size:
            return
        top = int(idx.max()) + 1
        self._grow(top)
        self._pending.append(idx)
        self._pending_n += idx.size
        if self._pending_n > (1 << 22):
            self._flush_pending()

    def _flush_pending(self) -> None:
        """Apply the queued references; a count beyond the refcount width is a
        corruption of the result being computed (QEMU's "overflow cluster")."""
        if not self._pending:
            return
        idx = np.concatenate(self._pending)
        self._pending = []
        self._pending_n = 0
        if idx.size * 4 >= self.nb:     # dense: one pass over the table
            counts = np.bincount(idx, minlength=len(self.imrt))
            where = np.flatnonzero(counts)
            counts = counts[where]
        else:                           # sparse: memory proportional to the references
            where, counts = np.unique(idx, return_counts=True)
        if self.bits == 64:
            self.imrt[where] += counts.astype(_U64)
            return
        total = self.imrt[where].astype(np.int64) + counts
        over = total > self.rmax
        if over.any():
            for c, t in zip(where[over].tolist(), total[over].tolist()):
                for _ in range(t - self.rmax):
                    self.log(f"ERROR: overflow cluster offset=0x{c << self.cbits:x}")
                    self.log("Use qemu-img amend to increase the refcount entry width or "
                             "qemu-img convert to create a clean copy if the image cannot "
                             "be opened for writing")
                    self._res.corruptions += 1
            total[over] = self.rmax
        self.imrt[where] = total.astype(self.dtype)

    def _inc(self, res: CheckResult, offset: int, size: int) -> None:
        """QEMU's qcow2_inc_refcounts_imrt for one range."""
        if size <= 0:
            return
        if offset + size - self.f.size >= self.cs:
            self.log(f"ERROR: counting reference for region exceeding the end of the file "
                     f"by one cluster or more: offset 0x{offset:x} size 0x{size:x}")
            res.corruptions += 1
            return
        first = offset >> self.cbits
        last = (offset + size - 1) >> self.cbits
        self._push(np.arange(first, last + 1, dtype=np.int64))

    def _inc_now(self, res: CheckResult, offset: int) -> None:
        """One cluster, applied at once (refcount blocks are checked right after)."""
        if offset + self.cs - self.f.size >= self.cs:
            self.log(f"ERROR: counting reference for region exceeding the end of the file "
                     f"by one cluster or more: offset 0x{offset:x} size 0x{self.cs:x}")
            res.corruptions += 1
            return
        k = offset >> self.cbits
        self._grow(k + 1)
        if int(self.imrt[k]) == self.rmax:
            self.log(f"ERROR: overflow cluster offset=0x{k << self.cbits:x}")
            self.log("Use qemu-img amend to increase the refcount entry width or qemu-img "
                     "convert to create a clean copy if the image cannot be opened for "
                     "writing")
            res.corruptions += 1
            return
        self.imrt[k] += 1

    # -- stored refcounts ---------------------------------------------------------------
    _BAD = object()

    def _block(self, bi: int):
        """Decoded refcount block ``bi``; None if there is none; _BAD if unreadable."""
        blk = self._blocks.get(bi)
        if blk is not None:
            return blk
        if bi >= len(self.reftable):
            return None
        off = int(self.reftable[bi]) & C.REFT_OFFSET_MASK
        if not off:
            return None
        if off & (self.cs - 1):
            self._signal_corruption(f"Refblock offset {off:#x} unaligned (reftable index: "
                                    f"{_hex_alt(bi)})")
            return self._BAD
        blk = decode_block(self.f.read(self.cs, off), self.bits)
        if len(self._blocks) > 4096:
            self._blocks.clear()
        self._blocks[bi] = blk
        return blk

    def _stored_range(self, n: int, start: int = 0) -> tuple[np.ndarray, np.ndarray]:
        """Stored refcounts of clusters [start, n) (``start`` block-aligned) and a mask
        of the unreadable ones."""
        vals = np.zeros(n - start, dtype=self.dtype)
        bad = np.zeros(n - start, dtype=bool)
        per = self.per
        for bi in range(start // per, (n + per - 1) // per):
            lo = bi * per
            hi = min(n, lo + per)
            blk = self._block(bi)
            if blk is None:
                continue
            if blk is self._BAD:
                bad[lo - start:hi - start] = True
                continue
            vals[lo - start:hi - start] = blk[:hi - lo]
        self._blocks = {}
        return vals, bad

    def _stored_lookup(self, clusters: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        vals = np.zeros(clusters.size, dtype=_U64)
        bad = np.zeros(clusters.size, dtype=bool)
        if not clusters.size:
            return vals, bad
        bis = clusters >> self.rb_bits
        for bi in np.unique(bis).tolist():
            sel = bis == bi
            blk = self._block(bi)
            if blk is None:
                continue
            if blk is self._BAD:
                bad[sel] = True
                continue
            vals[sel] = blk[clusters[sel] & (self.per - 1)]
        return vals, bad

    def _get_refcount(self, cluster: int) -> int | None:
        blk = self._block(cluster >> self.rb_bits)
        if blk is None:
            return 0
        if blk is self._BAD:
            return None
        return int(blk[cluster & (self.per - 1)])

    # -- metadata overlap (QEMU's qcow2_check_metadata_overlap, "cached" template) -------
    OL_ACTIVE_L1, OL_ACTIVE_L2, OL_INACTIVE_L2 = 1, 2, 4

    def _overlap(self, offset: int, size: int, ignore: int = 0) -> str | None:
        if not size:
            return None
        cs = self.cs
        if offset < cs:
            return "qcow2_header"
        size = ((offset & (cs - 1)) + size + cs - 1) & ~(cs - 1)
        offset &= ~(cs - 1)

        def hit(o: int, n: int) -> bool:
            return o < offset + size and offset < o + n

        h = self.h
        if not ignore & self.OL_ACTIVE_L1 and h.l1_size and \
                hit(h.l1_table_offset, h.l1_size * 8):
            return "active L1 table"
        if hit(self.reftable_offset, len(self.reftable) * 8):
            return "refcount table"
        if self.snapshots_size and hit(self.snapshots_offset, self.snapshots_size):
            return "snapshot table"
        for sn in self.snapshots:
            if sn.l1_size and hit(sn.l1_offset, sn.l1_size * 8):
                return "inactive L1 table"
        if not ignore & self.OL_ACTIVE_L2:
            for e in self.l1:
                o = e & C.L1E_OFFSET_MASK
                if o and hit(o, cs):
                    return "active L2 table"
        for e in self.reftable[self.reftable != 0].tolist():
            o = e & C.REFT_OFFSET_MASK
            if o and hit(o, cs):
                return "refcount block"
        if h.bitmaps_ext is not None:
            _nb, dsize, doff = h.bitmaps_ext
            if hit(doff, dsize):
                return "bitmap directory"
        return None

    def _overlap_guard(self, offset: int, size: int, ignore: int = 0) -> None:
        """Refuse a repair write over metadata: mark the image corrupt, as QEMU does."""
        what = self._overlap(offset, size, ignore)
        if what is None:
            return
        self._signal_corruption(f"Preventing invalid write on metadata (overlaps with "
                                f"{what})")
        raise _Abort(errno.EIO)

    def _signal_corruption(self, message: str) -> None:
        """QEMU's qcow2_signal_corruption: report once; an image open for writing is
        marked corrupt (further writes refused until a repair clears the bit)."""
        f = self.f
        fatal = f.writable
        corrupt = f.marked_corrupt or bool(self.h.incompatible_features & C.INCOMPAT_CORRUPT)
        if f.signaled and (not fatal or corrupt):
            return
        if fatal:
            self.log(f"qcow2: Marking image as corrupt: {message}; further corruption events "
                     f"will be suppressed")
            f.marked_corrupt = True     # (a version 2 header has no bit to record it in)
            self.h.incompatible_features |= C.INCOMPAT_CORRUPT
            if self.h.version >= 3:
                f.write(struct.pack(">Q", self.h.incompatible_features),
                        C.HEADER_INCOMPATIBLE_OFFSET)
                f.sync()
        else:
            self.log(f"qcow2: Image is corrupt: {message}; further non-fatal corruption events "
                     f"will be suppressed")
        f.signaled = True

    # -- the snapshot table (qcow2_check_read_snapshot_table) ---------------------------
    def _check_snapshot_table(self, res: CheckResult) -> None:
        f = self.f
        nb, off = struct.unpack(">IQ", f.read(12, 0x3C))
        reduced = 0
        dropped = 0
        if nb > C.MAX_SNAPSHOTS and self.fix & FIX_ERRORS:
            self.log(f"Discarding {nb - C.MAX_SNAPSHOTS} overhanging snapshots")
            reduced += nb - C.MAX_SNAPSHOTS
            nb = C.MAX_SNAPSHOTS
        if nb > C.MAX_SNAPSHOTS:
            res.check_errors += 1
            self.log("ERROR snapshot table too large")
            self.log(f"You can force-remove all {nb - C.MAX_SNAPSHOTS} overhanging "
                     f"snapshots with qemu-img check -r all")
            raise _Abort(errno.EFBIG)
        if _INT64_MAX - nb * C.SNAPSHOT_HEADER_SIZE < off or off & (self.cs - 1):
            res.check_errors += 1
            self.log("ERROR snapshot table offset invalid")
            raise _Abort(errno.EINVAL)
        repair = bool(self.fix & FIX_ERRORS)
        f = _Window(self.f)
        snaps: list[_Snapshot] = []
        pos = off
        length = 0
        for i in range(nb):
            pre = pos
            length = (length + 7) & ~7
            pos = (pos + 7) & ~7
            (l1_off, l1_size, id_size, name_size, date_sec, date_nsec, clock, vm_state,
             extra_size) = struct.unpack(">QIHHIIQII", f.read(40, pos))
            pos += 40
            truncate = False
            if extra_size > C.MAX_SNAPSHOT_EXTRA_DATA:
                if not repair:
                    res.check_errors += 1
                    self.log(f"ERROR failed to read the snapshot table: Too much extra "
                             f"metadata in snapshot table entry {i}")
                    self.log("You can force-remove this extra metadata with qemu-img "
                             "check -r all")
                    raise _Abort(errno.EFBIG)
                self.log(f"Discarding too much extra metadata in snapshot table entry {i} "
                         f"({extra_size} > {C.MAX_SNAPSHOT_EXTRA_DATA})")
                dropped += 1
                truncate = True
            known = min(_SNAPSHOT_EXTRA_SIZE, extra_size)
            extra = f.read(known, pos) + bytes(_SNAPSHOT_EXTRA_SIZE - known)
            pos += known
            vm_large, disk_size, icount = struct.unpack_from(">QQQ", extra)
            if extra_size >= 8:
                vm_state = vm_large
            if extra_size < 16:
                disk_size = self.h.size
            if extra_size < 24:
                icount = 0xFFFFFFFFFFFFFFFF
            unknown = b""
            if extra_size > _SNAPSHOT_EXTRA_SIZE:
                end = pos + extra_size - _SNAPSHOT_EXTRA_SIZE
                if truncate:
                    extra_size = C.MAX_SNAPSHOT_EXTRA_DATA
                unknown = f.read(extra_size - _SNAPSHOT_EXTRA_SIZE, pos)
                pos = end
            sid = f.read(id_size, pos).split(b"\0", 1)[0].decode("utf-8", "surrogateescape")
            pos += id_size
            name = f.read(name_size, pos).split(b"\0", 1)[0].decode("utf-8",
                                                                     "surrogateescape")
            pos += name_size
            length += 40 + extra_size + id_size + name_size
            if length > C.MAX_SNAPSHOTS_SIZE or pos - off > _MAX_INT:
                if not repair:
                    res.check_errors += 1
                    self.log("ERROR failed to read the snapshot table: Snapshot table is "
                             "too big")
                    self.log(f"You can force-remove all {nb - i} overhanging snapshots "
                             f"with qemu-img check -r all")
                    raise _Abort(errno.EFBIG)
                self.log(f"Discarding {nb - i} overhanging snapshots (snapshot table is "
                         f"too big)")
                reduced += nb - i
                nb = i
                pos = pre
                break
            snaps.append(_Snapshot(l1_off, l1_size, sid, name, extra_size, vm_state,
                                   date_sec, date_nsec, clock, disk_size, icount, unknown))
        self.snapshots = snaps
        self.nb_snapshots = len(snaps)
        self.snapshots_offset = off
        self.snapshots_size = pos - off if snaps else 0
        res.corruptions += reduced + dropped
        if reduced:
            self.f.write(struct.pack(">I", len(snaps)), 0x3C)
            self.f.sync()
            res.corruptions_fixed += reduced
            res.corruptions -= reduced
        if self.h.version >= 3:
            for i, sn in enumerate(snaps):
                if sn.extra_data_size < _SNAPSHOT_EXTRA_V3_MIN:
                    res.corruptions += 1
                    self.log(f"{'Repairing' if repair else 'ERROR'} snapshot table entry "
                             f"{i} is incomplete")

    # -- L1 and L2 tables ------------------------------------------------------------
    _BATCH_BYTES = 8 << 20

    def _read_tables(self, offsets: list[int]) -> np.ndarray:
        """L2 tables at ``offsets`` as one (tables, words) array of native uint64."""
        cs = self.cs
        buf = bytearray(len(offsets) * cs)
        mv = memoryview(buf)
        fsize = self.f.size
        for t, o in enumerate(offsets):
            if o < fsize:
                self.f.be.readinto(mv[t * cs:(t + 1) * cs], o)   # zeros past the end
        return np.frombuffer(buf, dtype=">u8").astype(_U64).reshape(len(offsets), cs // 8)

    def _batches(self, offsets: np.ndarray):
        """Runs [a, b) of table offsets to read at once: bounded in bytes, and without a
        table twice (a repair of its first copy must be seen by the second)."""
        per = max(1, self._BATCH_BYTES // self.cs)
        n = offsets.size
        if np.unique(offsets).size == n:
            for a in range(0, n, per):
                yield a, min(n, a + per)
            return
        a = 0
        seen: set[int] = set()
        for j, o in enumerate(offsets.tolist()):
            if j - a >= per or o in seen:
                yield a, j
                a = j
                seen = set()
            seen.add(o)
        if a < n:
            yield a, n

    def _check_l1(self, res: CheckResult, l1_offset: int, l1_size: int, frag: bool,
                  active: bool) -> None:
        """QEMU's check_refcounts_l1 (and check_refcounts_l2 for each table), a batch of
        L2 tables per step; messages come out in QEMU's order."""
        if not l1_size:
            return
        self._inc(res, l1_offset, l1_size * 8)
        l1 = np.frombuffer(self.f.read(l1_size * 8, l1_offset), dtype=">u8").astype(_U64)
        idx = np.flatnonzero(l1)
        if not idx.size:
            return
        ents = l1[idx]
        l2s = ents & _U64(C.L1E_OFFSET_MASK)
        cs = self.cs
        fsize = self.f.size
        # L1-level findings, in the order QEMU reports them for each entry
        l1_bad = ((ents & _U64(C.L1E_RESERVED_MASK)) != 0) | \
                 ((l2s & _U64(cs - 1)) != 0) | (l2s >= _U64(fsize))
        for a, b in self._batches(l2s):
            offs = [int(o) for o in l2s[a:b].tolist()]
            tables = self._read_tables(offs)
            slow_rows = set(np.flatnonzero(l1_bad[a:b]).tolist())
            good = ~l1_bad[a:b]
            if good.any():
                self._push((l2s[a:b][good] >> _U64(self.cbits)).astype(np.int64))

            def before_row(t: int) -> None:
                if t not in slow_rows:
                    return
                e = int(ents[a + t])
                if e & C.L1E_RESERVED_MASK:
                    self.log(f"ERROR found L1 entry with reserved bits set: {e:x}")
                    res.corruptions += 1
                l2 = e & C.L1E_OFFSET_MASK
                self._inc(res, l2, cs)
                if l2 & (cs - 1):
                    self.log(f"ERROR l2_offset={l2:x}: Table is not cluster aligned; L1 "
                             f"entry corrupted")
                    res.corruptions += 1

            self._check_l2_batch(res, offs, tables, frag, active, slow_rows, before_row)

    def _check_l2_batch(self, res: CheckResult, offsets: list[int], tables: np.ndarray,
                        frag: bool, active: bool, slow_rows: set, before_row) -> None:
        """QEMU's check_refcounts_l2 for several tables at once (rows of ``tables``)."""
        cs = self.cs
        if self.extended:
            ent, bmp = tables[:, 0::2], tables[:, 1::2]
            flat_e, flat_b = ent.ravel(), bmp.ravel()
            live = np.flatnonzero(flat_e | flat_b)
        else:
            flat_e, flat_b = tables.ravel(), None
            live = np.flatnonzero(flat_e)
        width = self.l2_entries
        e = flat_e[live]
        bm = flat_b[live] if flat_b is not None else np.zeros(live.size, dtype=_U64)
        rows = live // width
        off = e & _U64(C.L2E_OFFSET_MASK)
        comp = (e & _U64(C.OFLAG_COMPRESSED)) != 0
        std = ~comp
        copied = (e & _U64(C.OFLAG_COPIED)) != 0
        if self.extended:
            zflag = np.zeros(live.size, dtype=bool)
        else:
            zflag = (e & _U64(C.OFLAG_ZERO)) != 0
        has_off = off != 0
        if self.data_file:
            normal = std & ~zflag & (has_off | copied)
        else:
            normal = std & ~zflag & has_off
        alloc = normal | (std & zflag & has_off)
        unalloc = std & ~zflag & ~normal
        fsize = self.f.size

        # compressed clusters: the host byte range
        coff = e & _U64(self.coffset_mask)
        nsec = ((e >> _U64(self.csize_shift)) & _U64(self.csize_mask)) + _U64(1)
        csize = nsec * _U64(512) - (coff & _U64(511))

        problem = std & ((e & _U64(_L2E_STD_RESERVED)) != 0)
        if comp.any():
            problem |= comp & (copied | (bm != 0))
            if self.data_file:
                problem |= comp
            problem |= comp & ((coff + csize).astype(np.int64) - fsize >= cs)
        if alloc.any():
            if self.extended:
                problem |= alloc & (((bm >> _U64(32)) & bm & _U64(_L2_BITMAP_ALL_ALLOC)) != 0)
            problem |= alloc & ((off & _U64(cs - 1)) != 0)
            if not self.data_file:
                problem |= alloc & (off >= _U64(fsize))
        if self.extended:
            problem |= unalloc & ((bm & _U64(_L2_BITMAP_ALL_ALLOC)) != 0)

        counted_comp = comp.copy()      # compressed entries in the allocation info
        ref_comp = comp.copy()          # ... whose host range gets a reference
        in_seq = alloc.copy()           # standard entries in the fragmentation sequence
        ref_std = alloc.copy() if not self.data_file else np.zeros(live.size, dtype=bool)

        # the slow path, in QEMU's order: per table its L1 findings, then its entries
        bad = np.flatnonzero(problem)
        bad_rows = rows[bad]
        order = sorted(slow_rows | set(np.unique(bad_rows).tolist()))
        for t in order:
            before_row(t)
            lo = np.searchsorted(bad_rows, t, side="left")
            hi = np.searchsorted(bad_rows, t, side="right")
            for k in bad[lo:hi].tolist():
                self._l2_entry_problem(res, offsets[t], int(live[k]) % width, k, e, bm, off,
                                       comp, std, alloc, unalloc, coff, csize, counted_comp,
                                       ref_comp, in_seq, ref_std, active)

        if frag:
            nc = int(np.count_nonzero(counted_comp))
            seq = off[in_seq]
            seq_rows = rows[in_seq]
            res.allocated_clusters += nc + int(seq.size)
            res.compressed_clusters += nc
            res.fragmented_clusters += nc
            if seq.size > 1:
                jump = (seq[1:] != seq[:-1] + _U64(cs)) & (seq_rows[1:] == seq_rows[:-1])
                res.fragmented_clusters += int(np.count_nonzero(jump))
        if ref_std.any():
            o = off[ref_std]
            first = (o >> _U64(self.cbits)).astype(np.int64)
            unal = (o & _U64(cs - 1)) != 0
            if unal.any():
                first = np.concatenate([first, first[unal] + 1])
            self._push(first)
        if ref_comp.any():
            co = coff[ref_comp]
            first = (co >> _U64(self.cbits)).astype(np.int64)
            last = ((co + csize[ref_comp] - _U64(1)) >> _U64(self.cbits)).astype(np.int64)
            span = last - first
            idx = first
            for extra in range(1, int(span.max()) + 1):
                idx = np.concatenate([idx, first[span >= extra] + extra])
            self._push(idx)

    def _l2_entry_problem(self, res, l2_offset, i, k, e, bm, off, comp, std, alloc, unalloc,
                          coff, csize, counted_comp, ref_comp, in_seq, ref_std,
                          active) -> None:
        """One L2 entry with something to report (QEMU's check_refcounts_l2 body)."""
        cs = self.cs
        fsize = self.f.size
        ek = int(e[k])
        bk = int(bm[k])
        if std[k] and ek & _L2E_STD_RESERVED:
            self.log(f"ERROR found l2 entry with reserved bits set: {ek:x}")
            res.corruptions += 1
        if comp[k]:
            if ek & C.OFLAG_COPIED:
                self.log(f"ERROR: coffset=0x{ek & self.coffset_mask:x}: copied flag must "
                         f"never be set for compressed clusters")
                ek &= ~C.OFLAG_COPIED
                res.corruptions += 1
            if self.data_file:
                self.log(f"ERROR compressed cluster {i} with data file, entry=0x{ek:x}")
                res.corruptions += 1
                counted_comp[k] = ref_comp[k] = False
                return
            if bk:
                self.log(f"ERROR compressed cluster {i} with non-zero subcluster "
                         f"allocation bitmap, entry=0x{ek:x}")
                res.corruptions += 1
                counted_comp[k] = ref_comp[k] = False
                return
            co, cz = int(coff[k]), int(csize[k])
            if co + cz - fsize >= cs:
                self.log(f"ERROR: counting reference for region exceeding the end of the "
                         f"file by one cluster or more: offset 0x{co:x} size 0x{cz:x}")
                res.corruptions += 1
                ref_comp[k] = False
            return
        if alloc[k]:
            o = int(off[k])
            if self.extended and (bk >> 32) & bk & _L2_BITMAP_ALL_ALLOC:
                res.corruptions += 1
                self.log(f"ERROR offset={o:x}: Allocated cluster has corrupted subcluster "
                         f"allocation bitmap")
            if o & (cs - 1):
                res.corruptions += 1
                if self.extended:
                    contains_data = bool(bk & _L2_BITMAP_ALL_ALLOC)
                else:
                    contains_data = not ek & C.OFLAG_ZERO
                if not contains_data:
                    fixing = bool(self.fix & FIX_ERRORS)
                    self.log(f"{'Repairing' if fixing else 'ERROR'} offset={o:x}: "
                             f"Preallocated cluster is not properly aligned; L2 entry "
                             f"corrupted.")
                    if fixing and self._fix_l2_entry_by_zero(res, l2_offset, i, ek, bk,
                                                             active):
                        in_seq[k] = ref_std[k] = False
                        return
                else:
                    self.log(f"ERROR offset={o:x}: Data cluster is not properly aligned; "
                             f"L2 entry corrupted.")
            if not self.data_file and o >= fsize:
                self.log(f"ERROR: counting reference for region exceeding the end of the "
                         f"file by one cluster or more: offset 0x{o:x} size 0x{cs:x}")
                res.corruptions += 1
                ref_std[k] = False
            return
        if unalloc[k] and bk & _L2_BITMAP_ALL_ALLOC:
            res.corruptions += 1
            self.log("ERROR: Unallocated cluster has non-zero subcluster allocation map")

    def _fix_l2_entry_by_zero(self, res: CheckResult, l2_offset: int, i: int, e: int,
                              bm: int, active: bool) -> bool:
        """Turn a preallocated zero cluster with an unaligned offset into a plain zero
        cluster (QEMU's fix_l2_entry_by_zero)."""
        if self.extended:
            bm = ((bm | (bm << 32)) & _L2_BITMAP_ALL_ZERO) & 0xFFFFFFFFFFFFFFFF
            data = struct.pack(">QQ", 0, bm)
        else:
            data = struct.pack(">Q", C.OFLAG_ZERO)
        where = l2_offset + i * self.esize
        ign = self.OL_ACTIVE_L2 if active else self.OL_INACTIVE_L2
        try:
            self._overlap_guard(where, self.esize, ign)
        except _Abort:
            self.log("ERROR: Overlap check failed")
            res.check_errors += 1
            raise
        self.f.write(data, where)
        self.f.sync()
        res.corruptions -= 1
        res.corruptions_fixed += 1
        return True

    # -- bitmaps (qcow2_check_bitmaps_refcounts) ------------------------------------------
    def _check_bitmaps(self, res: CheckResult) -> None:
        ext = self.h.bitmaps_ext
        if ext is None:
            return
        nb, dsize, doff = ext
        self._inc(res, doff, dsize)
        bitmaps = self._load_bitmap_list(nb, dsize, doff)
        if bitmaps is None:
            res.corruptions += 1
            raise _Abort(errno.EINVAL)
        cs = self.cs
        for toff, tsize in bitmaps:
            self._inc(res, toff, tsize * 8)
            table = np.frombuffer(self.f.read(tsize * 8, toff), dtype=">u8").astype(_U64)
            offs = table & _U64(_BME_OFFSET_MASK)
            bad = ((table & _U64(_BME_TABLE_RESERVED)) != 0) | \
                  ((offs != 0) & (((table & _U64(1)) != 0) | ((offs & _U64(cs - 1)) != 0)))
            if bad.any():
                res.corruptions += 1
                raise _Abort(errno.EINVAL)
            for o in offs[offs != 0].tolist():
                self._inc(res, int(o), cs)

    def _load_bitmap_list(self, nb: int, dsize: int, doff: int):
        if dsize == 0 or dsize > C.MAX_BITMAP_DIRECTORY_SIZE:
            return None
        d = self.f.read(dsize, doff)
        out = []
        pos = 0
        count = 0
        while pos < dsize:
            if pos + 24 > dsize:
                return None
            count += 1
            if count > nb:
                return None
            (toff, tsize, flags, btype, gbits, name_size,
             extra) = struct.unpack_from(">QIIBBHI", d, pos)
            nxt = pos + ((24 + name_size + extra + 7) & ~7)
            if nxt > dsize or extra != 0:
                return None
            if (tsize == 0 or toff == 0 or toff % self.cs or tsize > _BME_MAX_TABLE_SIZE
                    or gbits > 31 or gbits < 9 or flags & _BME_RESERVED_FLAGS
                    or name_size > 1023 or btype != 1):
                return None
            phys = tsize * self.cs
            if phys > _BME_MAX_PHYS_SIZE:
                return None
            if not flags & _BME_FLAG_IN_USE and self.h.size > (phys * 8) << gbits:
                return None
            out.append((toff, tsize))
            pos = nxt
        if count != nb or pos != dsize:
            return None
        return out

    # -- refcount blocks (check_refblocks) ------------------------------------------------
    def _check_refblocks(self, res: CheckResult) -> bool:
        """QEMU's check_refblocks (run after every other reference is counted)."""
        rebuild = False
        cs = self.cs
        live = np.flatnonzero(self.reftable)
        ents = self.reftable[live]
        clusters = ((ents & _U64(C.REFT_OFFSET_MASK)) >> _U64(self.cbits)).astype(np.int64)
        if (live.size and not (ents & _U64(_REFT_RESERVED | (cs - 1))).any()
                and int(clusters.max()) < self.nb
                and int(clusters.max()) << self.cbits < self.f.size
                and np.unique(clusters).size == clusters.size
                and not self.imrt[clusters].any()):
            self.imrt[clusters] = 1     # the usual case: each block counted once, nothing to say
            return False
        for i in live.tolist():
            e = int(self.reftable[i])
            if e & _REFT_RESERVED:
                self.log(f"ERROR refcount table entry {i} has reserved bits set")
                res.corruptions += 1
                rebuild = True
                continue
            off = e & C.REFT_OFFSET_MASK
            cluster = off >> self.cbits
            if off & (cs - 1):
                self.log(f"ERROR refcount block {i} is not cluster aligned; refcount table "
                         f"entry corrupted")
                res.corruptions += 1
                rebuild = True
                continue
            if cluster >= self.nb:
                res.corruptions += 1
                fixing = bool(self.fix & FIX_ERRORS)
                self.log(f"{'Repairing' if fixing else 'ERROR'} refcount block {i} is outside "
                         f"image")
                if fixing:
                    err = None
                    if off > _INT64_MAX - cs:
                        err = errno.EINVAL
                    else:
                        try:
                            self.f.truncate(off + cs)
                        except OSError as exc:
                            err = exc.errno or errno.EIO
                    if err is None:
                        self._grow((self.f.size + cs - 1) // cs)
                        if cluster >= self.nb:
                            err = errno.EINVAL
                    if err is None:
                        res.corruptions -= 1
                        res.corruptions_fixed += 1
                        self._inc_now(res, off)
                        continue
                    rebuild = True
                    self.log(f"ERROR could not resize image: {os.strerror(err)}")
                continue
            if off:
                self._inc_now(res, off)
                rc = int(self.imrt[cluster])
                if rc != 1:
                    self.log(f"ERROR refcount block {i} refcount={rc}")
                    res.corruptions += 1
                    rebuild = True
        return rebuild

    # -- the in-memory refcount table (calculate_refcounts) -----------------------------
    def _calculate(self, res: CheckResult, fix: int) -> bool:
        saved_fix, self.fix = self.fix, fix
        self._res = res
        try:
            h = self.h
            self._inc(res, 0, self.cs)
            self._check_l1(res, h.l1_table_offset, h.l1_size, True, True)
            if self.data_file and self.nb_snapshots:
                self.log(f"ERROR {self.nb_snapshots} snapshots in image with data file")
                res.corruptions += 1
            for sn in self.snapshots:
                if sn.l1_offset & (self.cs - 1):
                    self.log(f"ERROR snapshot {sn.id} ({sn.name}) l1_offset="
                             f"{_hex_alt(sn.l1_offset)}: L1 table is not cluster aligned; "
                             f"snapshot table entry corrupted")
                    res.corruptions += 1
                    continue
                if sn.l1_size > C.MAX_L1_SIZE // 8:
                    self.log(f"ERROR snapshot {sn.id} ({sn.name}) l1_size="
                             f"{_hex_alt(sn.l1_size)}: L1 table is too large; snapshot table "
                             f"entry corrupted")
                    res.corruptions += 1
                    continue
                self._check_l1(res, sn.l1_offset, sn.l1_size, False, False)
            self._inc(res, self.snapshots_offset, self.snapshots_size)
            self._inc(res, self.reftable_offset, len(self.reftable) * 8)
            if h.crypto_header is not None and h.crypto_header[1]:
                self._inc(res, *h.crypto_header)
            self._check_bitmaps(res)
            self._flush_pending()
            return self._check_refblocks(res)
        finally:
            self.fix = saved_fix

    # -- compare_refcounts ---------------------------------------------------------------
    _CHUNK = 1 << 20                    # clusters compared per step

    def _compare(self, res: CheckResult, fix: int) -> tuple[int, bool]:
        """QEMU's compare_refcounts, a chunk of refcount blocks per step."""
        nb = self.nb
        rebuild = False
        highest = 0
        fixes: dict[int, int] = {}
        step = max(self.per, self._CHUNK // self.per * self.per)
        for lo in range(0, nb, step):
            hi = min(nb, lo + step)
            stored, bad = self._stored_range(hi, lo)
            comp = self.imrt[lo:hi]
            used = np.flatnonzero(((stored != 0) | (comp != 0)) & ~bad)
            if used.size:
                highest = lo + int(used[-1])
            events = np.flatnonzero((stored != comp) | bad)
            for j in events.tolist():
                i = lo + j
                if bad[j]:
                    self.log(f"Can't get refcount for cluster {i}: {os.strerror(errno.EIO)}")
                    res.check_errors += 1
                    continue
                r1 = int(stored[j])
                r2 = int(comp[j])
                fixed = None
                if r1 == 0:
                    rebuild = True
                elif r1 > r2 and fix & FIX_LEAKS:
                    fixed = "leaks"
                elif r1 < r2 and fix & FIX_ERRORS:
                    fixed = "corruptions"
                what = "Repairing" if fixed else ("ERROR" if r1 < r2 else "Leaked")
                self.log(f"{what} cluster {i} refcount={r1} reference={r2}")
                if fixed:
                    fixes[i] = r2
                    if fixed == "leaks":
                        res.leaks_fixed += 1
                    else:
                        res.corruptions_fixed += 1
                    continue
                if r1 < r2:
                    res.corruptions += 1
                else:
                    res.leaks += 1
        if fixes:
            self._apply_refcount_fixes(fixes)
        return highest, rebuild

    def _apply_refcount_fixes(self, fixes: dict[int, int]) -> None:
        """Write new refcounts (QEMU's update_refcount), one block write per block;
        clusters whose refcount drops to 0 are discarded (holes punched)."""
        by_block: dict[int, list[int]] = {}
        for c in sorted(fixes):
            by_block.setdefault(c >> self.rb_bits, []).append(c)
        freed = []
        for bi, clusters in by_block.items():
            off = int(self.reftable[bi]) & C.REFT_OFFSET_MASK
            blk = decode_block(self.f.read(self.cs, off), self.bits).copy()
            for c in clusters:
                blk[c & (self.per - 1)] = fixes[c]
                if fixes[c] == 0:
                    freed.append(c)
            self.f.write(encode_block(blk, self.bits), off)
        self.f.sync()
        self._blocks = {}
        if freed and self.f.be.can_punch_holes:
            for c in freed:
                start = c << self.cbits
                if start >= self.f.size:
                    continue
                try:
                    self.f.be.punch_hole(start, min(self.cs, self.f.size - start))
                except OSError:
                    break

    # -- rebuilding the refcount structure -----------------------------------------------
    def _alloc_imrt(self, count: int, first_free: int) -> tuple[int, int]:
        """QEMU's alloc_clusters_imrt: first fit from ``first_free``; returns
        (cluster, new first_free)."""
        nb = self.nb
        cluster = first_free
        new_ff = first_free
        if cluster < nb:
            z = np.flatnonzero(self.imrt[cluster:nb] == 0)
            if z.size:
                new_ff = cluster + int(z[0])
                start = None
                if count == 1:
                    start = new_ff
                else:
                    breaks = np.flatnonzero(np.diff(z) != 1)
                    run_starts = np.concatenate([[0], breaks + 1])
                    run_ends = np.concatenate([breaks, [z.size - 1]])
                    for a, b in zip(run_starts.tolist(), run_ends.tolist()):
                        if b - a + 1 >= count:
                            start = cluster + int(z[a])
                            break
                    if start is None:
                        a, b = int(run_starts[-1]), int(run_ends[-1])
                        if cluster + int(z[b]) == nb - 1:
                            start = cluster + int(z[a])
                        else:
                            start = nb
                cluster = start
            else:
                cluster = nb
        if cluster + count > self.nb:
            self._grow(cluster + count)
        self.imrt[cluster:cluster + count] = 1
        return cluster, new_ff

    def _write_refblocks(self, first: int, end: int, reftable: list[int]) -> bool:
        """QEMU's rebuild_refcounts_write_refblocks; ``reftable`` grows in place."""
        per = self.per
        first_free = 0
        grown = False
        bi = first >> self.rb_bits
        cluster = first
        while cluster < end:
            lo = max(cluster, bi * per)
            hi = min(end, (bi + 1) * per)
            if lo >= hi or not self.imrt[lo:hi].any():
                bi += 1
                cluster = bi * per
                continue
            start = bi * per
            if len(reftable) > bi and reftable[bi]:
                rb_off = reftable[bi]
            else:
                if first_free < start:
                    first_free = start
                c, first_free = self._alloc_imrt(1, first_free)
                rb_off = c << self.cbits
                if c >= end:
                    end = c + 1
                if len(reftable) <= bi:
                    entries = ((bi + 1) * 8 + self.cs - 1) // self.cs * self.cs // 8
                    reftable.extend([0] * (entries - len(reftable)))
                    grown = True
                reftable[bi] = rb_off
            try:
                self._overlap_guard(rb_off, self.cs)
            except _Abort as exc:
                self.log(f"ERROR writing refblock: {exc}")
                raise
            self.f.write(encode_block(self.imrt[start:start + per], self.bits), rb_off)
            bi += 1
            cluster = bi * per
        return grown

    def _rebuild(self, res: CheckResult) -> None:
        """QEMU's rebuild_refcount_structure: new refcount blocks and table in clusters
        the computed refcounts say are free, durable before the header switches."""
        reftable: list[int] = []
        changed = self._write_refblocks(0, self.nb, reftable)
        assert changed
        while True:
            rt_clusters = (len(reftable) * 8 + self.cs - 1) // self.cs
            c, _ff = self._alloc_imrt(rt_clusters, 0)
            changed = self._write_refblocks(c, c + rt_clusters, reftable)
            if not changed:
                break
        rt_off = c << self.cbits
        data = struct.pack(f">{len(reftable)}Q", *reftable)
        try:
            self._overlap_guard(rt_off, len(data))
        except _Abort as exc:
            self.log(f"ERROR writing reftable: {exc}")
            raise
        self.f.write(data, rt_off)
        self.f.sync()
        self.f.write(struct.pack(">QI", rt_off, rt_clusters), 0x30)
        self.f.sync()
        self.h.refcount_table_offset = rt_off
        self.h.refcount_table_clusters = rt_clusters
        self._load_reftable(rt_off, rt_clusters)
        # QEMU keeps exactly len(reftable) entries in memory (a multiple of cs/8)
        self.reftable = self.reftable[:len(reftable)]

    # -- qcow2_check_refcounts -------------------------------------------------------------
    def _check_refcounts(self, res: CheckResult) -> None:
        size = self.f.size
        nb = (size + self.cs - 1) // self.cs
        if nb > _MAX_INT:
            res.check_errors += 1
            raise _Abort(errno.EFBIG)
        need = nb * (2 * np.dtype(self.dtype).itemsize + 1)
        if need > _memory_budget():
            self.log(f"ERROR checking {nb} clusters needs about {need >> 20} MiB of memory, "
                     f"more than half of this machine's")
            res.check_errors += 1
            raise _Abort(errno.ENOMEM)
        res.total_clusters = (self.h.size + self.cs - 1) // self.cs
        self._grow(nb)
        fix = self.fix
        rebuild = self._calculate(res, fix)
        pre_compare = res.copy()
        highest, rb2 = self._compare(res, 0)
        rebuild = rebuild or rb2
        if rebuild and fix & FIX_ERRORS:
            old = res.copy()
            fresh_leaks = 0
            self.log("Rebuilding refcount structure")
            self._rebuild(res)
            res.corruptions = 0
            res.leaks = 0
            self.imrt[:] = 0
            self._calculate(res, 0)
            if fix & FIX_LEAKS:
                saved = res.copy()
                tmp = CheckResult()
                highest, still = self._compare(tmp, FIX_LEAKS)
                if still:
                    self.log("ERROR rebuilt refcount structure is still broken")
                fresh_leaks = tmp.leaks
                res.__dict__.update(saved.__dict__)
            if res.corruptions < old.corruptions:
                res.corruptions_fixed += old.corruptions - res.corruptions
            if res.leaks < old.leaks:
                res.leaks_fixed += old.leaks - res.leaks
            res.leaks += fresh_leaks
        elif fix:
            if rebuild:
                self.log("ERROR need to rebuild refcount structures")
                res.check_errors += 1
                raise _Abort(errno.EIO)
            if res.leaks or res.corruptions:
                res.__dict__.update(pre_compare.__dict__)
                highest, _ = self._compare(res, fix)
        self._check_oflag_copied(res, fix)
        res.image_end_offset = (highest + 1) * self.cs

    # -- check_oflag_copied ----------------------------------------------------------------
    def _refcounts_of(self, clusters: np.ndarray, stored, stored_bad):
        """Stored refcounts (and unreadable flags) of arbitrary clusters."""
        vals = np.zeros(clusters.size, dtype=_U64)
        bad = np.zeros(clusters.size, dtype=bool)
        inside = clusters < stored.size
        ci = clusters[inside]
        vals[inside] = stored[ci]
        bad[inside] = stored_bad[ci]
        if not inside.all():
            v, b = self._stored_lookup(clusters[~inside])
            vals[~inside] = v
            bad[~inside] = b
        return vals, bad

    def _check_oflag_copied(self, res: CheckResult, fix: int) -> None:
        """QEMU's check_oflag_copied: COPIED must be set iff the refcount is 1, on the
        active L1 entries and on the L2 entries they reach (a batch of tables per step)."""
        if fix & FIX_ERRORS:
            repair = True
        elif fix & FIX_LEAKS:
            repair = not res.check_errors and not res.corruptions and not res.leaks
        else:
            repair = False
        self._blocks = {}
        cs = self.cs
        word = "Repairing" if repair else "ERROR"
        l1 = np.array(self.l1, dtype=_U64)
        l1_idx = np.flatnonzero(l1 & _U64(C.L1E_OFFSET_MASK))
        if not l1_idx.size:
            return
        stored, stored_bad = self._stored_range(self.nb)
        l2s = l1[l1_idx] & _U64(C.L1E_OFFSET_MASK)
        l2_rc, l2_bad = self._refcounts_of((l2s >> _U64(self.cbits)).astype(np.int64),
                                           stored, stored_bad)
        l1_copied = (l1[l1_idx] & _U64(C.OFLAG_COPIED)) != 0
        l1_wrong = ~l2_bad & ((l2_rc == 1) != l1_copied)
        width = self.l2_entries
        for a, b in self._batches(l2s):
            offs = [int(o) for o in l2s[a:b].tolist()]
            tables = self._read_tables(offs)
            e = (tables[:, 0::2] if self.extended else tables).ravel()
            off = e & _U64(C.L2E_OFFSET_MASK)
            comp = (e & _U64(C.OFLAG_COMPRESSED)) != 0
            copied = (e & _U64(C.OFLAG_COPIED)) != 0
            has_off = off != 0
            if self.data_file:
                zflag = np.zeros(e.size, dtype=bool) if self.extended else \
                    (e & _U64(C.OFLAG_ZERO)) != 0
                alloc = ~comp & ((~zflag & (has_off | copied)) | (zflag & has_off))
            else:
                alloc = ~comp & has_off
            idx = np.flatnonzero(alloc)
            if self.data_file:
                rcs = np.ones(idx.size, dtype=_U64)
                bad = np.zeros(idx.size, dtype=bool)
            else:
                rcs, bad = self._refcounts_of((off[idx] >> _U64(self.cbits)).astype(np.int64),
                                              stored, stored_bad)
            wrong = np.flatnonzero(~bad & ((rcs == 1) != copied[idx]))
            wrong_rows = idx[wrong] // width
            skip = l2_bad[a:b]
            rows = set(np.flatnonzero(l1_wrong[a:b]).tolist()) | \
                set(np.unique(wrong_rows).tolist())
            for t in sorted(rows):
                if skip[t]:
                    continue                # refcount unreadable: QEMU skips the table
                i = int(l1_idx[a + t])
                l2_off = offs[t]
                if l1_wrong[a + t]:
                    rc = int(l2_rc[a + t])
                    l1e = self.l1[i]
                    res.corruptions += 1
                    self.log(f"{word} OFLAG_COPIED L2 cluster: l1_index={i} l1_entry={l1e:x} "
                             f"refcount={rc}")
                    if repair:
                        new = l1e | C.OFLAG_COPIED if rc == 1 else l1e & ~C.OFLAG_COPIED
                        where = self.h.l1_table_offset + i * 8
                        try:
                            self._overlap_guard(where, 8, self.OL_ACTIVE_L1)
                            self.f.write(struct.pack(">Q", new), where)
                            self.f.sync()
                        except (_Abort, OSError):
                            res.check_errors += 1
                            raise
                        self.l1[i] = new
                        res.corruptions -= 1
                        res.corruptions_fixed += 1
                lo = np.searchsorted(wrong_rows, t, side="left")
                hi = np.searchsorted(wrong_rows, t, side="right")
                if lo == hi:
                    continue
                table = bytearray(tables[t].astype(">u8").tobytes())
                dirty = 0
                for k in wrong[lo:hi].tolist():
                    j = int(idx[k]) % width
                    ent = int(e[int(idx[k])])
                    r = int(rcs[k])
                    res.corruptions += 1
                    self.log(f"{word} OFLAG_COPIED data cluster: l2_entry={ent:x} "
                             f"refcount={r}")
                    if repair:
                        new = ent | C.OFLAG_COPIED if r == 1 else ent & ~C.OFLAG_COPIED
                        struct.pack_into(">Q", table, j * self.esize, new)
                        dirty += 1
                if dirty:
                    try:
                        self._overlap_guard(l2_off, cs, self.OL_ACTIVE_L2)
                    except _Abort as exc:
                        self.log(f"ERROR: Could not write L2 table; metadata overlap check "
                                 f"failed: {exc}")
                        res.check_errors += 1
                        raise
                    self.f.write(bytes(table), l2_off)
                    self.f.sync()
                    res.corruptions -= dirty
                    res.corruptions_fixed += dirty

    # -- rewriting the snapshot table (qcow2_check_fix_snapshot_table) -------------------
    def _fix_snapshot_table(self, res: CheckResult) -> None:
        if not (res.corruptions and self.fix & FIX_ERRORS):
            return
        try:
            self._write_snapshots()
        except (_Abort, OSError, Qcow2Error) as exc:
            res.check_errors += 1
            self.log(f"ERROR failed to update snapshot table: {exc}")
            raise _Abort(getattr(exc, "err", None) or errno.EIO) from None
        res.corruptions_fixed += res.corruptions
        res.corruptions = 0

    def _write_snapshots(self) -> None:
        """QEMU's qcow2_write_snapshots: the table is written to newly allocated
        clusters, made durable with its refcounts, then the header switches to it and
        the old table is freed."""
        from ..cache import TableCache
        from ..refcount import Refcounts
        buf = bytearray()
        for sn in self.snapshots:
            buf.extend(bytes((-len(buf)) % 8))
            sid = sn.id.encode("utf-8", "surrogateescape")
            name = sn.name.encode("utf-8", "surrogateescape")
            extra_size = max(_SNAPSHOT_EXTRA_SIZE, sn.extra_data_size)
            vm32 = sn.vm_state_size if sn.vm_state_size <= 0xFFFFFFFF else 0
            buf.extend(struct.pack(">QIHHIIQII", sn.l1_offset, sn.l1_size, len(sid), len(name),
                                   sn.date_sec, sn.date_nsec, sn.vm_clock_nsec, vm32,
                                   extra_size))
            buf.extend(struct.pack(">QQQ", sn.vm_state_size, sn.disk_size, sn.icount))
            if sn.extra_data_size > _SNAPSHOT_EXTRA_SIZE:
                buf.extend(sn.unknown_extra)
            buf.extend(sid)
            buf.extend(name)
        if len(buf) > C.MAX_SNAPSHOTS_SIZE:
            raise _Abort(errno.EFBIG)
        adaptor = _RefcountHost(self)
        cache = TableCache(self.cs, 4 << 20, adaptor._read_meta, adaptor._write_meta)
        refs = Refcounts(adaptor, cache)
        new_off = 0
        if buf:
            n = (len(buf) + self.cs - 1) // self.cs
            new_off = refs.alloc(n)
            cache.write_dirty()
            self.f.sync()
            refs.write_table_entries()
            self.f.sync()
            self._overlap_guard(new_off, len(buf))
            self.f.write(bytes(buf), new_off)
            self.f.sync()
        self.f.write(struct.pack(">IQ", len(self.snapshots), new_off), 0x3C)
        self.f.sync()
        if self.snapshots_size:
            refs.free(self.snapshots_offset, self.snapshots_size)
            refs.apply_pending_frees()
            cache.write_dirty()
            self.f.sync()
            refs.write_table_entries()
            self.f.sync()
        self.snapshots_offset = new_off
        self.snapshots_size = len(buf)

    # -- the whole check -------------------------------------------------------------------
    def run(self) -> CheckResult:
        result = CheckResult()
        snap_res = CheckResult()
        ref_res = CheckResult()
        self._res = ref_res
        try:
            self._check_snapshot_table(snap_res)
        except _Abort:
            result.add(snap_res, False)
            raise
        try:
            self._check_refcounts(ref_res)
        except _Abort:
            result.add(ref_res, True)
            result.add(snap_res, False)
            raise
        result.add(ref_res, True)
        try:
            self._fix_snapshot_table(snap_res)
        finally:
            result.add(snap_res, False)
        if self.fix and not result.check_errors and not result.corruptions:
            self._mark_clean()
        return result

    def _mark_clean(self) -> None:
        """qcow2_mark_clean + qcow2_mark_consistent: clear the dirty and corrupt bits."""
        h = self.h
        if h.version < 3:
            return
        raw = struct.unpack(">Q", self.f.read(8, C.HEADER_INCOMPATIBLE_OFFSET))[0]
        new = raw & ~(C.INCOMPAT_DIRTY | C.INCOMPAT_CORRUPT)
        if new != raw:
            self.f.sync()
            self.f.write(struct.pack(">Q", new), C.HEADER_INCOMPATIBLE_OFFSET)
            self.f.sync()
            h.incompatible_features = new


class _RefcountHost:
    """What qcow2.refcount.Refcounts needs from an image, over the file under repair."""

    def __init__(self, p: _Pass):
        self._p = p
        self.header = p.h
        self.file_size = p.f.size

    def _read_meta(self, n: int, offset: int) -> bytes:
        return self._p.f.read(n, offset)

    def _write_meta(self, data, offset: int, _what: str | None = None) -> None:
        self._p.f.write(bytes(data), offset)
        self.file_size = max(self.file_size, self._p.f.size)

    def _sync(self) -> None:
        self._p.f.sync()


# ---------------------------------------------------------------------------
# opening
# ---------------------------------------------------------------------------

def _probe(be: FileBackend) -> str:
    """QEMU's qcow2_probe: the magic and a version of at least 2, else raw."""
    head = be.pread(8, 0)
    if len(head) == 8 and head[:4] == C.MAGIC and struct.unpack(">I", head[4:])[0] >= 2:
        return "qcow2"
    return "raw"


def _open(path, fmt: str | None, writable: bool, force_share: bool):
    filename = os.fspath(path)
    if fmt not in (None, "qcow2", "raw"):
        raise UnsupportedFeatureError(f"Unknown or unsupported image format {fmt!r} "
                                      f"(supported: qcow2, raw)", feature=f"format {fmt}")
    if writable and force_share:
        raise InvalidOptionError(f"Could not open '{filename}': force-share=on can only be "
                                 f"used with read-only images")
    try:
        be = FileBackend(filename, writable=writable)
    except OSError as exc:
        raise Qcow2Error(f"Could not open '{filename}': {exc.strerror or exc}") from None
    try:
        try:
            be.lock(write=writable, force_share=force_share and not writable)
        except OSError as exc:
            raise Qcow2Error(f"Could not open '{filename}': {exc.strerror or exc}") from None
        fmt = fmt or _probe(be)
        return be, fmt
    except BaseException:
        be.close()
        raise


def _open_companions(f: _File, filename: str, force_share: bool, writable: bool) -> list:
    """Open the backing chain and the external data file as qemu-img check does (it
    refuses an image whose companions cannot be opened); returns what to close."""
    from ..opener import open_image
    from ..paths import check_file_name, combine_path
    h, _, _ = _parse_header(f)
    opened = []
    try:
        if h.has_data_file:
            check_file_name(h.data_file, "external data file")
            dpath = combine_path(filename, h.data_file)
            try:
                dbe = FileBackend(dpath, writable=writable)
            except OSError as exc:
                raise Qcow2Error(f"Could not open '{filename}': Could not open '{dpath}': "
                                 f"{exc.strerror or exc}") from None
            opened.append(dbe)
            try:
                dbe.lock(write=writable, force_share=force_share and not writable)
            except OSError as exc:
                raise Qcow2Error(f"Could not open '{dpath}': {exc.strerror or exc}") from None
        if h.backing_file:
            check_file_name(h.backing_file, "backing file")
            bpath = combine_path(filename, h.backing_file)
            try:
                opened.append(open_image(bpath, format=h.backing_format,
                                         force_share=force_share))
            except (Qcow2Error, OSError) as exc:
                raise Qcow2Error(f"Could not open '{filename}': Could not open backing file: "
                                 f"{exc}") from None
    except BaseException:
        for o in opened:
            o.close()
        raise
    return opened


def _run(f: _File, fix: int, log) -> CheckResult:
    try:
        return _Pass(f, fix, log).run()
    except _Abort as exc:
        raise CheckFailedError(f"Check failed: {os.strerror(exc.err)}", errno_=exc.err) from None
    except MemoryError:
        raise CheckFailedError(f"Check failed: {os.strerror(errno.ENOMEM)}",
                               errno_=errno.ENOMEM) from None


def _as_dict(filename: str, fmt: str, r: CheckResult) -> dict:
    """The dict `qemu-img check --output=json` prints (optional keys only when nonzero)."""
    values = {
        "image-end-offset": r.image_end_offset, "compressed-clusters": r.compressed_clusters,
        "total-clusters": r.total_clusters, "corruptions": r.corruptions,
        "corruptions-fixed": r.corruptions_fixed, "check-errors": r.check_errors,
        "leaks": r.leaks, "leaks-fixed": r.leaks_fixed,
        "allocated-clusters": r.allocated_clusters, "filename": filename, "format": fmt,
        "fragmented-clusters": r.fragmented_clusters,
    }
    always = ("check-errors", "filename", "format")
    return {k: values[k] for k in _KEY_ORDER if k in always or values[k]}


# ---------------------------------------------------------------------------
# public API
# ---------------------------------------------------------------------------

def check(path, *, format: str | None = None, repair: str | None = None,
          force_share: bool = False, log=None, untrusted: bool = False,
          limits=None) -> dict:
    """Check (and with ``repair="leaks"|"all"`` repair) an image, as ``qemu-img check``.

    Returns the dict ``qemu-img check --output=json`` prints.  ``log(line)`` receives
    the per-problem messages qemu-img writes to stderr ("Leaked cluster 5 refcount=1
    reference=0", ...).  Raises :class:`CheckNotSupportedError` for raw images
    (qemu-img's exit status 63) and :class:`CheckFailedError` when the check could not
    complete (exit status 1).  :func:`exit_status` maps a result to qemu-img's status.

    ``untrusted=True`` opens the file once, in untrusted mode (format checks and the
    metadata scan of :mod:`qcow2.untrusted`, with ``limits``), and checks that same
    open file: nothing else is opened and the file is not re-opened between the scan
    and the check.  An untrusted image is never repaired.
    """
    if repair not in _REPAIR_MODES:
        raise InvalidOptionError(f"Unknown option value for -r (expecting 'leaks' or 'all'): "
                                 f"{repair}")
    fix = _REPAIR_MODES[repair]
    filename = os.fspath(path)
    if isinstance(filename, bytes):
        filename = os.fsdecode(filename)
    if untrusted:
        return _check_untrusted(filename, format, fix, force_share, log, limits)
    be, fmt = _open(filename, format, bool(fix), force_share)
    companions: list = []
    try:
        if fmt != "qcow2":
            raise CheckNotSupportedError("This image format does not support checks",
                                         feature="check")
        f = _File(be)
        companions = _open_companions(f, filename, force_share, bool(fix))
        res = _run(f, fix, log)
        if res.corruptions_fixed or res.leaks_fixed:
            fixed = (res.leaks_fixed, res.corruptions_fixed)
            repaired = {"leaks-fixed": fixed[0], "corruptions-fixed": fixed[1]}
            if f.marked_corrupt:
                # QEMU makes an image it marked corrupt unusable: no double check
                raise CheckFailedError(f"Check failed: {os.strerror(errno.ENOMEDIUM)}",
                                       errno_=errno.ENOMEDIUM, repaired=repaired)
            try:
                res = _run(f, 0, log)
            except CheckFailedError as exc:
                exc.repaired = repaired
                raise
            res.leaks_fixed, res.corruptions_fixed = fixed
        return _as_dict(filename, fmt, res)
    finally:
        for c in companions:
            c.close()
        be.close()


def _check_untrusted(filename: str, fmt: str | None, fix: int, force_share: bool, log,
                     limits) -> dict:
    """check(untrusted=True): one open_image (scanned), its file checked in place."""
    from ..opener import open_image
    if fix:
        raise UnsafeImageError("an untrusted image is never repaired in place "
                               "(untrusted check with repair)")
    img = open_image(filename, format=fmt, untrusted=True, force_share=force_share,
                     limits=limits)
    try:
        if img.format != "qcow2":
            raise CheckNotSupportedError("This image format does not support checks",
                                         feature="check")
        # the scan refused backing and data files: there are no companions to open
        return _as_dict(filename, "qcow2", _run(_File(img.be), 0, log))
    finally:
        img.close()


def exit_status(result: dict) -> int:
    """qemu-img check's exit status for a result: 1 check errors, 2 corruptions,
    3 leaks only, 0 clean."""
    if result.get("check-errors"):
        return 1
    if result.get("corruptions"):
        return 2
    if result.get("leaks"):
        return 3
    return 0


def format_repaired(result: dict) -> str:
    """What `qemu-img check -r` prints before it checks the repaired image again."""
    lf, cf = result.get("leaks-fixed", 0), result.get("corruptions-fixed", 0)
    if not (lf or cf):
        return ""
    return ("The following inconsistencies were found and repaired:\n\n"
            f"    {lf} leaked clusters\n    {cf} corruptions\n\n"
            "Double checking the fixed image now...\n")


def format_human(result: dict) -> str:
    """The text `qemu-img check` prints on stdout for a result."""
    out = [format_repaired(result)]
    corr = result.get("corruptions", 0)
    leaks = result.get("leaks", 0)
    errs = result.get("check-errors", 0)
    if not (corr or leaks or errs):
        out.append("No errors were found on the image.\n")
    else:
        if corr:
            out.append(f"\n{corr} errors were found on the image.\nData may be corrupted, or "
                       f"further writes to the image may corrupt it.\n")
        if leaks:
            out.append(f"\n{leaks} leaked clusters were found on the image.\nThis means waste "
                       f"of disk space, but no harm to data.\n")
        if errs:
            out.append(f"\n{errs} internal errors have occurred during the check.\n")
    total = result.get("total-clusters", 0)
    alloc = result.get("allocated-clusters", 0)
    if total and alloc:
        frag = result.get("fragmented-clusters", 0)
        comp = result.get("compressed-clusters", 0)
        out.append("%d/%d = %0.2f%% allocated, %0.2f%% fragmented, %0.2f%% compressed "
                   "clusters\n" % (alloc, total, alloc * 100.0 / total, frag * 100.0 / alloc,
                                   comp * 100.0 / alloc))
    if result.get("image-end-offset"):
        out.append(f"Image end offset: {result['image-end-offset']}\n")
    return "".join(out)


def rebuild_if_dirty(path) -> bool:
    """Repair an image left dirty by lazy refcounts (QEMU does this when it opens a
    dirty image read-write): returns True if it repaired, False if the image was not
    dirty.  Takes the write lock for the duration; afterwards the image opens r+."""
    filename = os.fspath(path)
    be, fmt = _open(filename, None, True, False)
    try:
        if fmt != "qcow2":
            return False
        f = _File(be)
        h, _, _ = _parse_header(f)
        if h.version < 3 or not h.dirty:
            return False
        res = _run(f, FIX_LEAKS | FIX_ERRORS, None)
        if res.check_errors:
            raise CorruptImageError(f"Could not repair dirty image '{filename}': "
                                    f"{res.check_errors} errors during the check",
                                    what="refcounts")
        h, _, _ = _parse_header(f)
        if h.dirty:
            raise CorruptImageError(
                f"Could not repair dirty image '{filename}': {res.corruptions} corruptions "
                f"remain; run check -r all and inspect the image", what="refcounts")
        return True
    finally:
        be.close()


__all__ = ["check", "rebuild_if_dirty", "exit_status", "format_human", "format_repaired",
           "CheckResult",
           "CheckFailedError", "CheckNotSupportedError", "FIX_LEAKS", "FIX_ERRORS"]
