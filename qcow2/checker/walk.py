"""The L1/L2 walk (QEMU's check_refcounts_l1 and check_refcounts_l2): every L2 table
an L1 table reaches, and every cluster its entries use, counted in the IMRT; bad
entries reported (and with ``-r all`` a misaligned preallocated zero cluster
repaired) in QEMU's order.

L2 tables are classified with :class:`qcow2.cluster.L2Batch`, a batch of tables per
step; Python only visits the entries that have something to report."""

from __future__ import annotations

import struct

import numpy as np

from .. import constants as C
from ..cluster import L2Batch, cluster_type, has_data, split_table, zeroed_bitmap
from . import fast
from .result import FIX_ERRORS, Abort, CheckResult
from .state import OL_ACTIVE_L2, OL_INACTIVE_L2, U64, State

# what the slow path says about an entry's references
_KEEP, _NO_REF, _NOT_COUNTED = 0, 1, 2


def check_l1(st: State, res: CheckResult, l1_offset: int, l1_size: int, frag: bool,
             active: bool) -> None:
    """QEMU's check_refcounts_l1 (and check_refcounts_l2 for each table), a batch of
    L2 tables per step; messages come out in QEMU's order."""
    if not l1_size:
        return
    st.inc(res, l1_offset, l1_size * 8)
    l1 = np.frombuffer(st.f.read(l1_size * 8, l1_offset), dtype=">u8").astype(U64)
    idx = np.flatnonzero(l1)
    if not idx.size:
        return
    ents = l1[idx]
    l2s = ents & U64(C.L1E_OFFSET_MASK)
    cs = st.cs
    # L1-level findings, in the order QEMU reports them for each entry
    l1_bad = ((ents & U64(C.L1E_RESERVED_MASK)) != 0) | \
             ((l2s & U64(cs - 1)) != 0) | (l2s >= U64(st.f.size))
    native = fast.usable(st)
    for a, b in st.batches(l2s):
        offs = [int(o) for o in l2s[a:b].tolist()]
        raw = st.read_raw(offs)
        good = ~l1_bad[a:b]
        if good.any():
            st.push((l2s[a:b][good] >> U64(st.cbits)).astype(np.int64))
        # clean tables counted in C; the others below.  (A batch with a bad L1 entry
        # goes all the general way: the reference its report counts may apply the
        # queue before the batch's own references are queued.)
        done = fast.count_tables(st, raw, l1_bad[a:b]) if native and good.all() else None
        if done is not None and frag:
            res.allocated_clusters += done.allocated
            res.fragmented_clusters += done.fragmented
            res.compressed_clusters += done.compressed
        rows = done.rows.tolist() if done is not None else list(range(b - a))
        counted = (done.std_refs, done.comp_refs) if done is not None else (0, 0)
        slow_rows = {j for j, t in enumerate(rows) if l1_bad[a + t]}

        def before_row(j: int, a: int = a, rows: list = rows, slow_rows: set = slow_rows) -> None:
            if j in slow_rows:
                _l1_entry_problem(st, res, int(ents[a + rows[j]]))

        if not rows:
            st.push(np.zeros(0, dtype=np.int64), counted[0])
            st.push(np.zeros(0, dtype=np.int64), counted[1])
            continue
        _check_l2_batch(st, res, [offs[t] for t in rows], st.tables_of(raw, rows), frag,
                        active, slow_rows, before_row, counted)


def _l1_entry_problem(st: State, res: CheckResult, e: int) -> None:
    if e & C.L1E_RESERVED_MASK:
        st.log(f"ERROR found L1 entry with reserved bits set: {e:x}")
        res.corruptions += 1
    l2 = e & C.L1E_OFFSET_MASK
    st.inc(res, l2, st.cs)
    if l2 & (st.cs - 1):
        st.log(f"ERROR l2_offset={l2:x}: Table is not cluster aligned; L1 entry corrupted")
        res.corruptions += 1


class _Findings:
    """What a batch of entries has to report: one mask per rule of check_refcounts_l2."""

    def __init__(self, st: State, b: L2Batch):
        cs = st.cs
        fsize = st.f.size
        comp, alloc = b.compressed, b.allocated
        self.reserved = b.reserved()
        problem = self.reserved.copy()
        self.coff = self.csize = None
        if comp.any():
            self.coff, self.csize, _start, _n = b.compressed_extents(st.cbits)
            problem |= b.copied_compressed() | b.compressed_with_bitmap()
            if st.data_file:
                problem |= comp
            problem |= comp & ((self.coff + self.csize).astype(np.int64) - fsize >= cs)
        if alloc.any():
            if st.extended:
                problem |= b.bitmap_conflict()
            problem |= b.unaligned(cs)
            if not st.data_file:
                problem |= alloc & (b.offset >= U64(fsize))
        if st.extended:
            problem |= b.bitmap_unallocated()
        self.problem = problem


def _check_l2_batch(st: State, res: CheckResult, offsets: list[int], tables: np.ndarray,
                    frag: bool, active: bool, slow_rows: set, before_row,
                    counted: tuple[int, int] = (0, 0)) -> None:
    """QEMU's check_refcounts_l2 for several tables at once (rows of ``tables``);
    ``counted`` references (standard, compressed) of the same batch were counted by
    the fast path: they are accounted where the general path queues its own."""
    ent, bmp = split_table(tables, st.extended)
    flat_e = ent.ravel()
    flat_b = bmp.ravel() if bmp is not None else None
    live = np.flatnonzero(flat_e | flat_b if flat_b is not None else flat_e)
    width = st.l2_entries
    b = L2Batch(flat_e[live], flat_b[live] if flat_b is not None else None,
                extended=st.extended, data_file=st.data_file)
    rows = live // width
    found = _Findings(st, b)
    counted_comp = b.compressed.copy()      # compressed entries in the allocation info
    ref_comp = b.compressed.copy()          # ... whose host range gets a reference
    in_seq = b.allocated.copy()             # standard entries in the fragmentation sequence
    ref_std = b.allocated.copy() if not st.data_file else np.zeros(live.size, dtype=bool)

    # the slow path, in QEMU's order: per table its L1 findings, then its entries
    bad = np.flatnonzero(found.problem)
    bad_rows = rows[bad]
    for t in sorted(slow_rows | set(np.unique(bad_rows).tolist())):
        before_row(t)
        lo = np.searchsorted(bad_rows, t, side="left")
        hi = np.searchsorted(bad_rows, t, side="right")
        for k in bad[lo:hi].tolist():
            csize = int(found.csize[k]) if found.csize is not None else 0
            coff = int(found.coff[k]) if found.coff is not None else 0
            drop = _entry_problem(st, res, offsets[t], int(live[k]) % width,
                                  int(b.entry[k]), int(b.bitmap[k]), coff, csize, active)
            if drop == _NOT_COUNTED:
                counted_comp[k] = ref_comp[k] = False
            elif drop == _NO_REF:
                ref_comp[k] = ref_std[k] = False
            elif drop == _NO_REF | _NOT_COUNTED:
                in_seq[k] = ref_std[k] = False

    if frag:
        _allocation_info(st, res, b.offset[in_seq], rows[in_seq],
                         int(np.count_nonzero(counted_comp)))
    if ref_std.any():
        o = b.offset[ref_std]
        first = (o >> U64(st.cbits)).astype(np.int64)
        unal = (o & U64(st.cs - 1)) != 0
        if unal.any():
            first = np.concatenate([first, first[unal] + 1])
        st.push(first, counted[0])
    else:
        st.push(np.zeros(0, dtype=np.int64), counted[0])
    if ref_comp.any():
        co = found.coff[ref_comp]
        first = (co >> U64(st.cbits)).astype(np.int64)
        last = ((co + found.csize[ref_comp] - U64(1)) >> U64(st.cbits)).astype(np.int64)
        span = last - first
        idx = first
        for extra in range(1, int(span.max()) + 1):
            idx = np.concatenate([idx, first[span >= extra] + extra])
        st.push(idx, counted[1])
    else:
        st.push(np.zeros(0, dtype=np.int64), counted[1])


def _allocation_info(st: State, res: CheckResult, seq: np.ndarray, seq_rows: np.ndarray,
                     compressed: int) -> None:
    """Allocated, compressed and fragmented clusters (QEMU's BlockFragInfo)."""
    res.allocated_clusters += compressed + int(seq.size)
    res.compressed_clusters += compressed
    res.fragmented_clusters += compressed
    if seq.size > 1:
        jump = (seq[1:] != seq[:-1] + U64(st.cs)) & (seq_rows[1:] == seq_rows[:-1])
        res.fragmented_clusters += int(np.count_nonzero(jump))


def _entry_problem(st: State, res: CheckResult, l2_offset: int, i: int, e: int, bm: int,
                   coff: int, csize: int, active: bool) -> int:
    """One L2 entry with something to report (QEMU's check_refcounts_l2 body); returns
    what to drop of its references and allocation info."""
    kind = cluster_type(e, extended=st.extended, data_file=st.data_file)
    if kind != C.KIND_COMPRESSED and e & C.L2E_STD_RESERVED_MASK:
        st.log(f"ERROR found l2 entry with reserved bits set: {e:x}")
        res.corruptions += 1
    if kind == C.KIND_COMPRESSED:
        return _compressed_problem(st, res, i, e, bm, coff, csize)
    if kind in (C.KIND_DATA, C.KIND_ZERO_ALLOC):
        return _allocated_problem(st, res, l2_offset, i, e, bm, active)
    if kind == C.KIND_UNALLOC and bm & C.L2_BITMAP_ALLOC_MASK:
        res.corruptions += 1
        st.log("ERROR: Unallocated cluster has non-zero subcluster allocation map")
    return _KEEP


def _compressed_problem(st: State, res: CheckResult, i: int, e: int, bm: int, coff: int,
                        csize: int) -> int:
    if e & C.OFLAG_COPIED:
        st.log(f"ERROR: coffset=0x{coff:x}: copied flag must never be set for compressed "
               f"clusters")
        e &= ~C.OFLAG_COPIED
        res.corruptions += 1
    if st.data_file:
        st.log(f"ERROR compressed cluster {i} with data file, entry=0x{e:x}")
        res.corruptions += 1
        return _NOT_COUNTED
    if bm:
        st.log(f"ERROR compressed cluster {i} with non-zero subcluster allocation bitmap, "
               f"entry=0x{e:x}")
        res.corruptions += 1
        return _NOT_COUNTED
    if st.past_end(res, coff, csize):
        return _NO_REF
    return _KEEP


def _allocated_problem(st: State, res: CheckResult, l2_offset: int, i: int, e: int, bm: int,
                       active: bool) -> int:
    cs = st.cs
    o = e & C.L2E_OFFSET_MASK
    if st.extended and (bm >> C.L2_BITMAP_ZERO_SHIFT) & bm & C.L2_BITMAP_ALLOC_MASK:
        res.corruptions += 1
        st.log(f"ERROR offset={o:x}: Allocated cluster has corrupted subcluster allocation "
               f"bitmap")
    if o & (cs - 1):
        res.corruptions += 1
        if has_data(e, bm, extended=st.extended):
            st.log(f"ERROR offset={o:x}: Data cluster is not properly aligned; L2 entry "
                   f"corrupted.")
        else:
            fixing = bool(st.fix & FIX_ERRORS)
            st.log(f"{'Repairing' if fixing else 'ERROR'} offset={o:x}: Preallocated "
                   f"cluster is not properly aligned; L2 entry corrupted.")
            if fixing:
                _fix_l2_entry_by_zero(st, res, l2_offset, i, bm, active)
                return _NO_REF | _NOT_COUNTED
    if not st.data_file and o >= st.f.size:
        st.past_end(res, o, cs)
        return _NO_REF
    return _KEEP


def _fix_l2_entry_by_zero(st: State, res: CheckResult, l2_offset: int, i: int, bm: int,
                          active: bool) -> None:
    """Turn a preallocated zero cluster with an unaligned offset into a plain zero
    cluster (QEMU's fix_l2_entry_by_zero)."""
    if st.extended:
        data = struct.pack(">QQ", 0, zeroed_bitmap(bm))
    else:
        data = struct.pack(">Q", C.OFLAG_ZERO)
    where = l2_offset + i * st.esize
    try:
        st.overlap_guard(where, st.esize, OL_ACTIVE_L2 if active else OL_INACTIVE_L2)
    except Abort:
        st.log("ERROR: Overlap check failed")
        res.check_errors += 1
        raise
    st.f.write(data, where)
    st.f.sync()
    res.corruptions -= 1
    res.corruptions_fixed += 1
