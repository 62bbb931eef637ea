"""The metadata scan of an untrusted image (see :mod:`qcow2.untrusted`): every table
charged against the budget before it is read, every entry checked, numpy throughout;
only the first problem found is formatted."""

from __future__ import annotations

import time

from .. import constants as C
from ..bitmap import data_clusters, load_directory, table_problem
from ..cluster import Geometry, L2Batch, split_table
from ..errors import CorruptImageError, UnsafeImageError
from ..refcount import decode_block
from .limits import Budget, Limits, corrupt, unsafe

_BATCH_TABLES = 256


class _L1:
    """An L1 table to scan: where, how many entries, its name, and the file offsets of
    the fields that point at it and give its size."""

    __slots__ = ("offset", "size", "what", "ptr", "size_ptr")

    def __init__(self, offset: int, size: int, what: str, ptr: int, size_ptr: int):
        self.offset, self.size, self.what = offset, size, what
        self.ptr, self.size_ptr = ptr, size_ptr


class _Scan:
    def __init__(self, img, limits: Limits):
        import numpy as np
        self.np = np
        self.img = img
        self.h = img.header
        self.limits = limits
        self.geo = Geometry.of(img.header)
        self.cs = img.cluster_size
        self.cbits = img.cluster_bits
        self.fsize = img.file_size
        self.t0 = time.process_time()
        # shared with the open, which charged the snapshot table before reading it
        self.budget = getattr(img, "budget", None) or Budget(limits)
        # (cluster indices, what, file offset of the pointer) of every metadata structure
        self.meta: list[tuple] = []

    # -- budgets -------------------------------------------------------------------
    def _hold(self, n: int, what: str, offset: int | None = None) -> None:
        self.budget.hold(n, what, offset)

    def _tick(self) -> None:
        used = time.process_time() - self.t0
        if used > self.limits.max_scan_cpu:
            raise unsafe(f"metadata scan took more than {self.limits.max_scan_cpu} s of CPU "
                         f"time ({used:.1f} s)")

    def _read(self, n: int, offset: int) -> bytes:
        return self.img.be.pread(n, offset) if n else b""

    def _read_u64(self, offset: int, n: int):
        np = self.np
        raw = self._read(n * 8, offset)
        if len(raw) != n * 8:
            raise corrupt(f"short read of {n * 8} bytes", offset, n * 8, "table")
        return np.frombuffer(raw, dtype=">u8").astype(np.uint64)

    def _region(self, offset: int, size: int, what: str, ptr: int) -> None:
        """A metadata region: inside the file, clusters recorded for overlap checks."""
        if size == 0:
            return
        if offset + size > self.fsize:
            raise corrupt(f"{what} at {offset:#x} ({size} bytes) extends past the end of "
                          f"the file (size {self.fsize:#x})", ptr, 8, what)
        first = offset >> self.cbits
        last = (offset + size - 1) >> self.cbits
        self.meta.append((self.np.arange(first, last + 1, dtype=self.np.int64), what, ptr))

    # -- the steps ---------------------------------------------------------------------
    def run(self) -> None:
        l1s = self._l1_list()
        # budget from the header alone, before anything is read
        self._hold(self.h.refcount_table_clusters * self.cs, "the refcount table",
                   C.HDR_REFCOUNT_TABLE_CLUSTERS)
        for t in l1s:
            self._hold(t.size * 8, t.what, t.size_ptr)
        self._regions(l1s)
        self._refcount_table()
        self._bitmaps()
        per_l1 = [self._l1_table(t) for t in l1s]        # L1 tables -> their L2 tables
        self._tick()
        all_l2 = self._l2_set(per_l1)
        refs, comp_all = self._l2_tables(all_l2)
        total = sum(len(r) for r in refs.values())
        nclus = (self.fsize + self.cs - 1) >> self.cbits
        # With a byte map over the file's clusters no bigger than the references
        # themselves, the checks below are linear and need no copy of all references.
        use_map = nclus <= max(4 * total, 1 << 20)
        if len(comp_all) and total:
            self._compressed_vs_data(refs, comp_all, nclus, use_map)
        self._tick()
        # one L1 table (one view of the disk) never reaches a host cluster twice;
        # snapshots may share clusters with each other and with the active layer
        for t, _idx, l2off in per_l1:
            self._no_double_refs(t, l2off, refs, nclus, use_map)
            self._tick()
        if not self.h.dirty:
            # (a dirty image may have lazy refcounts lagging behind: QEMU rebuilds them)
            parts = [m[0] for m in self.meta] + list(refs.values()) + [comp_all]
            self._refcounts(parts, nclus, use_map)
        self._tick()

    def _l1_list(self) -> list[_L1]:
        h = self.h
        l1s = [_L1(h.l1_table_offset, h.l1_size, "active L1 table", C.HDR_L1_TABLE_OFFSET,
                   C.HDR_L1_SIZE)]
        for sn in self.img.snapshots_list:
            h.validate_snapshot_l1(sn)
            l1s.append(_L1(sn.l1_table_offset, sn.l1_size, f"L1 table of snapshot {sn.id}",
                           sn.entry_offset, sn.entry_offset + 8))   # its l1_size field
        return l1s

    def _regions(self, l1s: list[_L1]) -> None:
        h, cs = self.h, self.cs
        self._region(0, cs, "header", 0)
        self._region(h.refcount_table_offset, h.refcount_table_clusters * cs,
                     "refcount table", C.HDR_REFCOUNT_TABLE_OFFSET)
        if h.nb_snapshots:
            end = max(sn.entry_offset + sn.entry_size for sn in self.img.snapshots_list)
            self._region(h.snapshots_offset, end - h.snapshots_offset, "snapshot table",
                         C.HDR_SNAPSHOTS_OFFSET)
        if h.bitmaps_ext is not None:
            _nb, dsize, doff = h.bitmaps_ext
            self._region(doff, dsize, "bitmap directory", h.bitmaps_ext_offset + 16)
        if h.crypto_header is not None:
            self._region(h.crypto_header[0], h.crypto_header[1], "encryption header", 0)
        for t in l1s:
            self._region(t.offset, t.size * 8, t.what, t.ptr)

    def _l1_table(self, t: _L1):
        """One L1 table: (it, indices of its entries with an L2 table, their offsets)."""
        np = self.np
        off, what, cs = t.offset, t.what, self.cs
        l1 = self._read_u64(off, t.size)
        idx = np.nonzero(l1)[0]
        ent = l1[idx]
        l2off = ent & np.uint64(C.L1E_OFFSET_MASK)
        checks = (
            ((ent & np.uint64(C.L1E_RESERVED_MASK)) != 0, " ({entry:#x}) has reserved bits set"),
            ((l2off & np.uint64(cs - 1)) != 0, ": L2 table offset {l2:#x} is not cluster-aligned"),
            (l2off + np.uint64(cs) > np.uint64(self.fsize),
             ": L2 table at {l2:#x} extends past the end of the file (size {fsize:#x})"),
        )
        for mask, text in checks:
            bad = np.nonzero(mask)[0]
            if len(bad):
                i = int(idx[bad[0]])
                msg = text.format(entry=int(l1[i]), l2=int(l2off[bad[0]]), fsize=self.fsize)
                raise corrupt(f"{what} entry {i}{msg}", off + i * 8, 8, "L1 entry")
        keep = l2off != 0       # an entry with only the COPIED flag points nowhere
        idx, l2off = idx[keep], l2off[keep]
        u, counts = np.unique(l2off, return_counts=True)
        if len(u) and counts.max() > 1:
            dup = int(np.argmax(counts > 1))
            j = np.nonzero(l2off == u[dup])[0]
            i = int(idx[j[1]])
            raise unsafe(f"{what} entries {int(idx[j[0]])} and {i} both point at the L2 "
                         f"table at {int(u[dup]):#x}", off + i * 8, 8, "L1 entry")
        return t, idx, l2off

    def _l2_set(self, per_l1):
        """The distinct L2 tables (budgeted, checked against the other metadata)."""
        np = self.np
        all_l2 = np.unique(np.concatenate([p[2] for p in per_l1])) if per_l1 else \
            np.zeros(0, np.uint64)
        self._hold(len(all_l2) * self.cs, f"{len(all_l2)} L2 tables", C.HDR_L1_TABLE_OFFSET)
        # where each L2 table is pointed from (for messages): first L1 entry seen
        l2_ptr = {}
        for t, idx, l2off in per_l1:
            for i, o in zip(idx.tolist(), l2off.tolist(), strict=True):
                l2_ptr.setdefault(o, t.offset + i * 8)
        self.meta.append(((all_l2 >> np.uint64(self.cbits)).astype(np.int64), "L2 table",
                          None))
        self.meta_clusters, self.meta_what = self._metadata_overlaps(l2_ptr)
        nclus = (self.fsize + self.cs - 1) >> self.cbits
        self.dtype = np.uint32 if nclus < (1 << 32) else np.int64
        return all_l2

    def _l2_tables(self, all_l2):
        """Every L2 table: ({offset: standard host clusters}, compressed host clusters)."""
        np = self.np
        refs = {}           # L2 offset -> standard host cluster indices (uint32 or int64)
        comp = []           # host clusters touched by compressed data
        for b in range(0, len(all_l2), _BATCH_TABLES):
            for o in all_l2[b:b + _BATCH_TABLES].tolist():
                r, c = self._l2_table(o)
                refs[o] = r
                if c is not None:
                    comp.append(c)
            self._tick()
        comp_all = _uniq(np, np.concatenate(comp)) if comp else np.zeros(0, np.int64)
        return refs, comp_all

    def _compressed_vs_data(self, refs, comp_all, nclus: int, use_map: bool) -> None:
        """Compressed data never shares a host cluster with an uncompressed one."""
        np = self.np
        if use_map:
            mark = np.zeros(nclus, dtype=bool)
            for r in refs.values():
                mark[r] = True
            hit = mark[comp_all]
            del mark
        else:
            hit = np.isin(comp_all, np.concatenate(list(refs.values())))
        if hit.any():
            c = int(comp_all[np.argmax(hit)])
            raise unsafe(f"compressed data touches host cluster {c << self.cbits:#x}, which "
                         f"is also an uncompressed data cluster", c << self.cbits, self.cs,
                         "compressed data")

    def _no_double_refs(self, t: _L1, l2off, refs, nclus: int, use_map: bool) -> None:
        np = self.np
        c = None
        if use_map:
            mark = np.zeros(nclus, dtype=bool)
            for o in l2off.tolist():
                r = refs[o]
                seen = mark[r]
                if seen.any():
                    c = int(r[np.argmax(seen)])
                    break
                mark[r] = True
            del mark
        else:
            tabs = [refs[o] for o in l2off.tolist()]
            s = np.sort(np.concatenate(tabs) if tabs else np.zeros(0, np.int64))
            d = np.nonzero(s[1:] == s[:-1])[0]
            if len(d):
                c = int(s[d[0]])
        if c is not None:
            raise unsafe(f"host cluster {c << self.cbits:#x} is referenced twice by the "
                         f"{t.what} (not compressed, not shared by a snapshot)",
                         self._find_entry(c, l2off, 2), 8, "L2 entry")

    def _refcounts(self, parts, nclus: int, use_map: bool) -> None:
        """Every cluster in use -- metadata, data, compressed data -- has a refcount."""
        np = self.np
        h, cs, cbits = self.h, self.cs, self.cbits
        bits = h.refcount_bits
        span = cbits + 3 - h.refcount_order          # log2(entries per refcount block)
        rt = self.rt
        for j, (b, base, idx) in enumerate(self._refcount_groups(parts, nclus, use_map,
                                                                 span)):
            if not len(idx):
                continue
            bo = int(rt[b]) & C.REFT_OFFSET_MASK if b < len(rt) else 0
            if bo == 0:
                c = base + int(idx[0])
                raise corrupt(f"host cluster {c << cbits:#x} is in use but has no refcount "
                              f"block (refcount table entry {b})",
                              h.refcount_table_offset + 8 * min(b, len(rt)), 8,
                              "refcount table entry")
            vals = decode_block(self._read(cs, bo), bits)
            z = np.flatnonzero(vals[idx] == 0)
            if len(z):
                i = int(idx[z[0]])
                c = base + i
                raise corrupt(f"host cluster {c << cbits:#x} is in use but its refcount "
                              f"is 0", bo + i * bits // 8, max(1, bits // 8), "refcount")
            if j % 64 == 63:
                self._tick()

    def _refcount_groups(self, parts, nclus: int, use_map: bool, span: int):
        """(refcount block index, its first cluster, clusters in use relative to it)."""
        np = self.np
        if use_map:
            mark = np.zeros(nclus, dtype=bool)
            for a in parts:
                mark[a] = True
            return ((b, b << span, np.flatnonzero(mark[b << span:(b + 1) << span]))
                    for b in range((nclus + (1 << span) - 1) >> span))
        want = np.sort(np.concatenate([a.astype(np.int64) for a in parts]))
        blk = want >> span
        cuts = [0] + (np.flatnonzero(blk[1:] != blk[:-1]) + 1).tolist() + [len(want)]
        return ((int(blk[cuts[j]]), int(blk[cuts[j]]) << span,
                 want[cuts[j]:cuts[j + 1]] - (int(blk[cuts[j]]) << span))
                for j in range(len(cuts) - 1) if cuts[j] < cuts[j + 1])

    def _find_entry(self, cluster: int, l2offs, nth: int) -> int:
        """File offset of the ``nth`` L2 entry reaching ``cluster`` (for the message)."""
        np = self.np
        ext = self.h.extended_l2
        step = 2 if ext else 1
        seen = 0
        for o in l2offs.tolist():
            ent = split_table(self._read_u64(o, self.geo.l2_entries * step), ext)[0]
            b = L2Batch(ent, extended=ext)
            hits = np.nonzero(b.standard & (b.offset != 0) &
                              (b.offset >> np.uint64(self.cbits) == np.uint64(cluster)))[0]
            for k in hits.tolist():
                seen += 1
                if seen == nth:
                    return o + k * 8 * step
        return 0

    def _metadata_overlaps(self, l2_ptr):
        np = self.np
        cl = np.concatenate([m[0] for m in self.meta])
        owner = np.concatenate([np.full(len(m[0]), i, dtype=np.int64)
                                for i, m in enumerate(self.meta)])
        order = np.argsort(cl, kind="stable")
        cl, owner = cl[order], owner[order]
        d = np.nonzero(cl[1:] == cl[:-1])[0]
        if len(d):
            k = int(d[0])
            a, b = self.meta[int(owner[k])], self.meta[int(owner[k + 1])]
            c = int(cl[k]) << self.cbits
            if b[1] == "L2 table":
                ptr = l2_ptr.get(c, c)
                # an L1 entry pointing an L2 table at other metadata: name the entry
                raise unsafe(f"L2 table at {c:#x} overlaps the {a[1]}", ptr, 8, "L1 entry")
            ptr = b[2]
            if isinstance(ptr, np.ndarray):
                # one pointer per cluster (refcount blocks, bitmap data): the entry
                # reaching this one
                starts = np.cumsum([0] + [len(m[0]) for m in self.meta])
                ptr = int(ptr[int(order[k + 1]) - int(starts[int(owner[k + 1])])])
            raise unsafe(f"{b[1]} overlaps the {a[1]} at host cluster {c:#x}",
                         ptr if ptr is not None else c, None, b[1])
        whats = [self.meta[int(o)][1] for o in owner.tolist()] if len(cl) < 4096 else \
            _LazyNames(self.meta, owner)
        return cl, whats

    # -- bitmaps -----------------------------------------------------------------------
    def _bitmaps(self) -> None:
        """The bitmap directory and every bitmap table (QEMU's bitmap_list_load,
        check_dir_entry, bitmap_table_load and load_bitmap_data rules); the tables and
        the bitmap data clusters they point at join the metadata for the overlap,
        metadata-as-data and refcount checks."""
        h = self.h
        if h.bitmaps_ext is None:
            return
        nb, dsize, doff = h.bitmaps_ext
        ext = h.bitmaps_ext_offset        # nb_bitmaps at +0, size at +8, offset at +16
        self._hold(dsize, "the bitmap directory", ext + 8)
        d = self._read(dsize, doff)
        if len(d) != dsize:
            raise corrupt(f"short read of the bitmap directory ({len(d)} of {dsize} "
                          f"bytes)", ext + 16, 8, "bitmap directory")
        # a bitmap saved cleanly must have exactly the table the disk needs
        entries = load_directory(d, doff, nb, self.cs, h.size, exact_size=True,
                                 count_offset=ext)
        # budget first, for every table, then read and check them
        for e in entries:
            self._hold(e.table_size * 8, f"the bitmap table of bitmap entry at {e.offset:#x}",
                       e.offset + 8)
        for e in entries:
            self._bitmap_table(e)
            self._tick()

    def _bitmap_table(self, e) -> None:
        np = self.np
        label = e.label()
        what = f"bitmap table of bitmap {label!r}"
        toff = e.table_offset
        self._region(toff, e.table_size * 8, what, e.offset)
        t = self._read_u64(toff, e.table_size)
        problem = table_problem(t, self.cs, self.fsize)
        if problem is not None:
            k, text = problem
            raise corrupt(f"entry {k} of the {what} at {toff:#x} ({int(t[k]):#x}) {text}",
                          toff + 8 * k, 8, "bitmap table entry")
        k, off = data_clusters(t)
        self.meta.append(((off >> np.uint64(self.cbits)).astype(np.int64),
                          f"bitmap data of bitmap {label!r}", toff + 8 * k))

    # -- the refcount table ------------------------------------------------------------
    def _refcount_table(self) -> None:
        np = self.np
        h = self.h
        cs = self.cs
        off = h.refcount_table_offset
        n = h.refcount_table_clusters * cs // 8
        rt = self.rt = self._read_u64(off, n)
        idx = np.nonzero(rt)[0]
        ent = rt[idx]
        checks = (
            (ent & np.uint64(C.REFT_RESERVED_MASK), "has reserved bits set"),
            (ent & np.uint64(cs - 1), "is not cluster-aligned"),
            (ent > np.uint64(self.fsize - cs) if self.fsize >= cs else ent == ent,
             f"extends past the end of the file (size {self.fsize:#x})"),
        )
        for mask, text in checks:
            bad = np.nonzero(mask)[0]
            if len(bad):
                i = int(idx[bad[0]])
                raise corrupt(f"refcount table entry {i} ({int(rt[i]):#x}): refcount block "
                              f"{text}", off + i * 8, 8, "refcount table entry")
        self._hold(len(idx) * cs, "refcount blocks", C.HDR_REFCOUNT_TABLE_OFFSET)
        blocks = (ent >> np.uint64(self.cbits)).astype(np.int64)
        u, counts = np.unique(blocks, return_counts=True)
        if len(u) and counts.max() > 1:
            j = np.nonzero(blocks == u[int(np.argmax(counts > 1))])[0]
            i = int(idx[j[1]])
            raise unsafe(f"refcount table entries {int(idx[j[0]])} and {i} point at the "
                         f"same refcount block", off + i * 8, 8, "refcount table entry")
        self.meta.append((blocks, "refcount block", off + idx.astype(np.int64) * 8))

    # -- one L2 table ------------------------------------------------------------------
    def _l2_table(self, o: int):
        """Check one L2 table; return (standard host clusters, compressed host clusters)."""
        np = self.np
        h = self.h
        ext = h.extended_l2
        step = 2 if ext else 1
        ent, bmp = split_table(self._read_u64(o, self.geo.l2_entries * step), ext)
        nz = np.nonzero(ent)[0] if not ext else np.nonzero(ent | bmp)[0]
        if not len(nz):
            return np.zeros(0, self.dtype), None
        b = L2Batch(ent[nz], bmp[nz] if ext else None, extended=ext,
                    data_file=h.has_data_file)
        fail = _Fail(o, nz, ent, step)
        self._l2_entries(b, fail)
        elsewhere = h.has_data_file
        std, es = b.standard, b.offset
        host = (es[std & (es != 0)] >> np.uint64(self.cbits)).astype(self.dtype)
        hit = (_member(np, self.meta_clusters, host) if not elsewhere
               else np.zeros(len(host), bool))
        if hit.any():
            c = int(host[np.argmax(hit)])
            j = int(np.searchsorted(self.meta_clusters, c))
            fail(std & (es >> np.uint64(self.cbits) == np.uint64(c)),
                 f"points at host cluster {c << self.cbits:#x}, which is the "
                 f"{self.meta_what[j]}", UnsafeImageError)
        if len(host) > 1:
            s = np.sort(host)
            d = np.nonzero(s[1:] == s[:-1])[0]
            if len(d):
                c = int(s[d[0]])
                k = np.nonzero(std & (es >> np.uint64(self.cbits) == np.uint64(c)))[0][1]
                fail(np.arange(len(b.entry)) == k,
                     f"points at host cluster {c << self.cbits:#x} already used in this table",
                     UnsafeImageError)
        if elsewhere:
            host = host[:0]            # nothing of the image file's own
        if not b.compressed.any():
            return host, None
        return host, self._compressed(b, fail)

    def _l2_entries(self, b: L2Batch, fail) -> None:
        """The rules every entry must keep on its own."""
        np = self.np
        h = self.h
        fail(b.reserved(), "has reserved bits set")
        if h.version < 3:
            fail(b.zero_bit(), "has the zero flag, which a version 2 image does not have")
        if h.extended_l2:
            fail(b.zero_bit(), "has bit 0 set, which is reserved with extended L2 entries")
        fail(b.unaligned(self.cs), "points at an unaligned cluster")
        # a data cluster may be cut by the file's end (QEMU writes only the subclusters
        # or sectors it needs); one that starts at or past the end is refused
        # with an external data file, data clusters live in that (unopened) file: the
        # image file's size, metadata and refcounts say nothing about them
        if not h.has_data_file:
            fail(b.standard & (b.offset != 0) & (b.offset >= np.uint64(self.fsize)),
                 f"points past the end of the file (size {self.fsize:#x})")
        if h.extended_l2:
            fail(b.both_bits(), "has subclusters both allocated and zero")
            fail(b.standard & (b.offset == 0) & (b.alloc_bits() != 0),
                 "has allocated subclusters but no host cluster")
            fail(b.compressed_with_bitmap(), "is compressed but has a subcluster bitmap")

    def _compressed(self, b: L2Batch, fail):
        """Compressed entries: their data inside the file, off the metadata; returns
        the host clusters their sectors touch."""
        np = self.np
        cbits = self.cbits
        fail(b.copied_compressed(), "is compressed and has the COPIED flag")
        cidx = np.nonzero(b.compressed)[0]
        _coff, _clen, start, nbytes = b.compressed_extents(cbits)
        start, end = start[cidx], start[cidx] + nbytes[cidx]
        # QEMU reads nsec sectors from the first one; the last may be cut by the file's
        # end (QEMU does not pad it), so a descriptor overruns when its sectors go past
        # the file's end rounded up to a sector.
        sector = C.COMPRESSED_SECTOR_SIZE
        limit = np.uint64((self.fsize + sector - 1) & ~(sector - 1))
        over = np.zeros(len(b.entry), bool)
        over[cidx] = end > limit
        fail(over, f"has compressed data past the end of the file (size {self.fsize:#x})")
        first = (start >> np.uint64(cbits)).astype(np.int64)
        last = ((end - np.uint64(1)) >> np.uint64(cbits)).astype(np.int64)
        touched = np.concatenate([first, last[last != first]])
        hit = _member(np, self.meta_clusters, touched)
        if hit.any():
            c = int(touched[np.argmax(hit)])
            j = int(np.searchsorted(self.meta_clusters, c))
            k = np.zeros(len(b.entry), bool)
            k[cidx[(first == c) | (last == c)]] = True
            fail(k, f"has compressed data in host cluster {c << cbits:#x}, which is the "
                    f"{self.meta_what[j]}", UnsafeImageError)
        return touched


class _Fail:
    """Raise for the first entry of an L2 table a mask selects (``nz``: the indices in
    the table of the masked entries)."""

    def __init__(self, table_offset: int, nz, ent, step: int):
        self.o, self.nz, self.ent, self.step = table_offset, nz, ent, step

    def __call__(self, mask, text: str, cls=CorruptImageError) -> None:
        import numpy as np
        bad = np.nonzero(mask)[0]
        if not len(bad):
            return
        k = int(self.nz[bad[0]])
        at, size = self.o + k * 8 * self.step, 8 * self.step
        msg = f"L2 entry {k} of the L2 table at {self.o:#x} ({int(self.ent[k]):#x}) {text}"
        if cls is CorruptImageError:
            raise corrupt(msg, at, size, "L2 entry")
        raise unsafe(msg, at, size, "L2 entry")


def _uniq(np, a):
    """Sorted distinct values (numpy's hash-based unique is slow on big arrays)."""
    s = np.sort(a)
    return s[np.concatenate(([True], s[1:] != s[:-1]))] if len(s) else s


def _member(np, sorted_set, a):
    """``a in sorted_set``, element-wise."""
    if not len(sorted_set) or not len(a):
        return np.zeros(len(a), bool)
    pos = np.minimum(np.searchsorted(sorted_set, a), len(sorted_set) - 1)
    return sorted_set[pos] == a


class _LazyNames:
    def __init__(self, meta, owner):
        self.meta, self.owner = meta, owner

    def __getitem__(self, j):
        return self.meta[int(self.owner[j])][1]


def scan(img, limits: Limits) -> None:
    """Refuse the image unless every metadata structure is sane (see qcow2.untrusted)."""
    _Scan(img, limits).run()
