"""The image under check and the state one check pass keeps (QEMU's BDRVQcow2State as
``qcow2_co_check_locked`` sees it): the header, the active L1 table, the refcount
table, the snapshot table as read, and the in-memory refcount table (IMRT) that the
walk fills with the references it counts.

Everything is read and written through a :class:`qcow2.backends.Backend`."""

from __future__ import annotations

import errno
import struct

import numpy as np

from .. import constants as C
from ..cluster import Geometry
from ..refcount import decode_block
from .file import CheckedFile, Window, read_header
from .result import Abort, CheckResult, hex_alt

U64 = np.uint64

__all__ = ["CheckedFile", "Window", "read_header", "State", "U64", "BAD"]

#: a refcount block that cannot be read (its offset is unaligned)
BAD = object()

# metadata overlap checks a repair write may skip (QEMU's QCOW2_OL_*)
OL_ACTIVE_L1, OL_ACTIVE_L2, OL_INACTIVE_L2 = 1, 2, 4


class State:
    """One check pass: the image's structures as read, and the computed refcounts."""

    #: bytes of L2 tables read at once
    BATCH_BYTES = 2 << 20
    #: decoded refcount blocks kept (by their size on disk; decoded they take up to
    #: 64 / refcount_bits times as much): memory must not grow with the image
    BLOCK_CACHE_BYTES = 8 << 20
    #: references queued before they are applied to the IMRT (8 bytes each)
    PENDING_REFS = 1 << 18

    def __init__(self, f: CheckedFile, fix: int, log):
        self.f = f
        self.fix = fix
        self.log = log or (lambda _msg: None)
        self.h = h = read_header(f)
        self.geo = Geometry.of(h)
        self.cs = h.cluster_size
        self.cbits = h.cluster_bits
        self.extended = h.extended_l2
        self.esize = h.l2_entry_size
        self.l2_entries = self.geo.l2_entries
        self.data_file = h.has_data_file
        self.bits = h.refcount_bits
        self.rmax = (1 << self.bits) - 1
        self.dtype = decode_block(bytes(8), self.bits).dtype
        self.per = self.cs * 8 // self.bits           # refcount block entries
        self.rb_bits = self.per.bit_length() - 1
        # in-memory state QEMU keeps for an open image
        n = h.l1_size
        self.l1 = list(struct.unpack(f">{n}Q", f.read(n * 8, h.l1_table_offset))) if n else []
        self.load_reftable(h.refcount_table_offset, h.refcount_table_clusters)
        self.snapshots: list = []
        self.snapshots_offset = 0
        self.snapshots_size = 0
        # the in-memory refcount table (IMRT) and references queued for it
        self.imrt = np.zeros(0, dtype=self.dtype)
        self.nb = 0
        self.pending: list[np.ndarray] = []
        self.pending_n = 0
        self.res = CheckResult()        # where overflowing references are counted
        #: the last compare found every stored refcount equal to the IMRT
        self.exact = False

    # -- the refcount table ---------------------------------------------------------
    def load_reftable(self, offset: int, clusters: int) -> None:
        n = clusters * self.cs // 8
        self.reftable_offset = offset
        self.reftable = np.frombuffer(self.f.read(n * 8, offset), dtype=">u8").astype(U64)
        self.blocks: dict[int, object] = {}

    # -- the IMRT -------------------------------------------------------------------
    def ensure(self, n: int) -> None:
        """Room for ``n`` IMRT entries (capacity rounded to whole refcount blocks)."""
        if n <= len(self.imrt):
            return
        cap = max(n, len(self.imrt) * 2 if len(self.imrt) else n)
        cap = (cap + self.per - 1) // self.per * self.per
        try:
            grown = np.zeros(cap, dtype=self.dtype)
        except MemoryError:
            raise Abort(errno.ENOMEM) from None
        grown[:len(self.imrt)] = self.imrt
        self.imrt = grown

    def grow(self, n: int) -> None:
        """QEMU's realloc_refcount_array: the IMRT now covers ``n`` clusters."""
        if n > self.nb:
            self.ensure(n)
            self.nb = n

    def push(self, idx: np.ndarray, counted: int = 0) -> None:
        """Queue one reference to each cluster in ``idx`` (int64 cluster indices);
        ``counted`` references already applied to the IMRT (the native fast path) are
        accounted with them, so the queue is applied at the same points either way."""
        if not idx.size and not counted:
            return
        if idx.size:
            self.grow(int(idx.max()) + 1)
            self.pending.append(idx)
        self.pending_n += idx.size + counted
        if self.pending_n > self.PENDING_REFS:
            self.flush_pending()

    def overflow(self, res: CheckResult, cluster: int) -> None:
        self.log(f"ERROR: overflow cluster offset=0x{cluster << self.cbits:x}")
        self.log("Use qemu-img amend to increase the refcount entry width or qemu-img "
                 "convert to create a clean copy if the image cannot be opened for writing")
        res.corruptions += 1

    def flush_pending(self) -> None:
        """Apply the queued references; a count beyond the refcount width is a
        corruption of the result being computed (QEMU's "overflow cluster")."""
        self.pending_n = 0
        if not self.pending:
            return
        idx = np.concatenate(self.pending)
        self.pending = []
        lo = int(idx.min())
        span = int(idx.max()) + 1 - lo
        if span <= 4 * idx.size:        # dense: one pass over the span they cover
            counts = np.bincount(idx - lo, minlength=span)
            where = np.flatnonzero(counts)
            counts = counts[where]
            where += lo
        else:                           # sparse: memory proportional to the references
            where, counts = np.unique(idx, return_counts=True)
        if self.bits == 64:
            self.imrt[where] += counts.astype(U64)
            return
        total = self.imrt[where].astype(np.int64) + counts
        over = total > self.rmax
        if over.any():
            for c, t in zip(where[over].tolist(), total[over].tolist(), strict=True):
                for _ in range(t - self.rmax):
                    self.overflow(self.res, c)
            total[over] = self.rmax
        self.imrt[where] = total.astype(self.dtype)

    def past_end(self, res: CheckResult, offset: int, size: int) -> bool:
        """A range that ends a cluster or more past the end of the file is a
        corruption (reported; no reference counted)."""
        if offset + size - self.f.size < self.cs:
            return False
        self.log(f"ERROR: counting reference for region exceeding the end of the file by "
                 f"one cluster or more: offset 0x{offset:x} size 0x{size:x}")
        res.corruptions += 1
        return True

    def inc(self, res: CheckResult, offset: int, size: int) -> None:
        """QEMU's qcow2_inc_refcounts_imrt for one range."""
        if size <= 0 or self.past_end(res, offset, size):
            return
        first = offset >> self.cbits
        last = (offset + size - 1) >> self.cbits
        self.push(np.arange(first, last + 1, dtype=np.int64))

    def inc_now(self, res: CheckResult, offset: int) -> None:
        """One cluster, applied at once (refcount blocks are checked right after)."""
        if self.past_end(res, offset, self.cs):
            return
        k = offset >> self.cbits
        self.grow(k + 1)
        if int(self.imrt[k]) == self.rmax:
            self.overflow(res, k)
            return
        self.imrt[k] += 1

    # -- stored refcounts ---------------------------------------------------------------
    def block(self, bi: int):
        """Decoded refcount block ``bi``; None if there is none; BAD if unreadable."""
        blk = self.blocks.get(bi)
        if blk is not None:
            return blk
        if bi >= len(self.reftable):
            return None
        off = int(self.reftable[bi]) & C.REFT_OFFSET_MASK
        if not off:
            return None
        if off & (self.cs - 1):
            self.signal_corruption(f"Refblock offset {off:#x} unaligned (reftable index: "
                                   f"{hex_alt(bi)})")
            return BAD
        blk = decode_block(self.f.read(self.cs, off), self.bits)
        if len(self.blocks) * self.cs >= self.BLOCK_CACHE_BYTES:
            self.blocks.clear()
        self.blocks[bi] = blk
        return blk

    def stored_range(self, n: int, start: int = 0) -> tuple[np.ndarray, np.ndarray]:
        """Stored refcounts of clusters [start, n) (``start`` block-aligned) and a mask
        of the unreadable ones."""
        vals = np.zeros(n - start, dtype=self.dtype)
        bad = np.zeros(n - start, dtype=bool)
        per = self.per
        for bi in range(start // per, (n + per - 1) // per):
            lo = bi * per
            hi = min(n, lo + per)
            blk = self.block(bi)
            if blk is None:
                continue
            if blk is BAD:
                bad[lo - start:hi - start] = True
                continue
            vals[lo - start:hi - start] = blk[:hi - lo]
        self.blocks = {}
        return vals, bad

    def stored_lookup(self, clusters: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Stored refcounts of arbitrary clusters and a mask of the unreadable ones
        (grouped by refcount block: one decode per block, whatever the order)."""
        vals = np.zeros(clusters.size, dtype=U64)
        bad = np.zeros(clusters.size, dtype=bool)
        if not clusters.size:
            return vals, bad
        bis = clusters >> self.rb_bits
        order = np.argsort(bis, kind="stable")
        sorted_bis = bis[order]
        cuts = np.flatnonzero(sorted_bis[1:] != sorted_bis[:-1]) + 1
        starts = np.concatenate(([0], cuts)).tolist()
        ends = np.concatenate((cuts, [clusters.size])).tolist()
        for a, b in zip(starts, ends, strict=True):
            sel = order[a:b]
            blk = self.block(int(sorted_bis[a]))
            if blk is None:
                continue
            if blk is BAD:
                bad[sel] = True
                continue
            vals[sel] = blk[clusters[sel] & (self.per - 1)]
        return vals, bad

    # -- metadata overlap (QEMU's qcow2_check_metadata_overlap, "cached" template) -------
    def overlap(self, offset: int, size: int, ignore: int = 0) -> str | None:
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
        if not ignore & OL_ACTIVE_L1 and h.l1_size and hit(h.l1_table_offset, h.l1_size * 8):
            return "active L1 table"
        if hit(self.reftable_offset, len(self.reftable) * 8):
            return "refcount table"
        if self.snapshots_size and hit(self.snapshots_offset, self.snapshots_size):
            return "snapshot table"
        if any(sn.l1_size and hit(sn.l1_table_offset, sn.l1_size * 8)
               for sn in self.snapshots):
            return "inactive L1 table"
        if not ignore & OL_ACTIVE_L2 and any((e & C.L1E_OFFSET_MASK)
                                             and hit(e & C.L1E_OFFSET_MASK, cs)
                                             for e in self.l1):
            return "active L2 table"
        if any((e & C.REFT_OFFSET_MASK) and hit(e & C.REFT_OFFSET_MASK, cs)
               for e in self.reftable[self.reftable != 0].tolist()):
            return "refcount block"
        if h.bitmaps_ext is not None and hit(h.bitmaps_ext[2], h.bitmaps_ext[1]):
            return "bitmap directory"
        return None

    def overlap_guard(self, offset: int, size: int, ignore: int = 0) -> None:
        """Refuse a repair write over metadata: mark the image corrupt, as QEMU does."""
        what = self.overlap(offset, size, ignore)
        if what is None:
            return
        self.signal_corruption(f"Preventing invalid write on metadata (overlaps with "
                               f"{what})")
        raise Abort(errno.EIO)

    def signal_corruption(self, message: str) -> None:
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
                        C.HDR_INCOMPATIBLE_FEATURES)
                f.sync()
        else:
            self.log(f"qcow2: Image is corrupt: {message}; further non-fatal corruption events "
                     f"will be suppressed")
        f.signaled = True

    # -- L2 tables, a batch at a time ------------------------------------------------------
    def read_raw(self, offsets: list[int]) -> bytearray:
        """The on-disk bytes of the L2 tables at ``offsets``, one after the other (zeros
        past the end of the file); adjacent tables are read at once."""
        cs = self.cs
        buf = bytearray(len(offsets) * cs)
        mv = memoryview(buf)
        fsize = self.f.size
        n = len(offsets)
        t = 0
        while t < n:
            o = offsets[t]
            u = t + 1
            while u < n and offsets[u] == offsets[u - 1] + cs:
                u += 1
            if o < fsize:
                self.f.be.readinto(mv[t * cs:u * cs], o)
            t = u
        return buf

    def tables_of(self, raw: bytearray, rows=None) -> np.ndarray:
        """Tables of ``raw`` (all, or the ``rows``) as a (tables, words) native array."""
        words = np.frombuffer(raw, dtype=">u8").reshape(-1, self.cs // 8)
        if rows is not None:
            words = words[rows]
        return words.astype(U64)

    def read_tables(self, offsets: list[int]) -> np.ndarray:
        """L2 tables at ``offsets`` as one (tables, words) array of native uint64."""
        return self.tables_of(self.read_raw(offsets))

    def batches(self, offsets: np.ndarray):
        """Runs [a, b) of table offsets to read at once: bounded in bytes, and without a
        table twice (a repair of its first copy must be seen by the second)."""
        per = max(1, self.BATCH_BYTES // self.cs)
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
