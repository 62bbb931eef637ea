"""QEMU's check_oflag_copied: the COPIED flag must be set exactly on the active L1
and L2 entries whose cluster has refcount 1; reported, and repaired with ``-r all``
(or ``-r leaks`` when nothing else is wrong), a batch of L2 tables per step."""

from __future__ import annotations

import struct

import numpy as np

from .. import constants as C
from ..cluster import L2Batch, split_table
from . import fast
from .result import FIX_ERRORS, FIX_LEAKS, Abort, CheckResult
from .state import OL_ACTIVE_L1, OL_ACTIVE_L2, U64, State


def _refcounts_of(st: State, clusters: np.ndarray):
    """Stored refcounts (and unreadable flags) of arbitrary clusters (a batch's worth:
    the refcount blocks are read as needed, never the whole table at once)."""
    return st.stored_lookup(clusters)


class _Pass:
    """The state of one check_oflag_copied pass."""

    def __init__(self, st: State, res: CheckResult, repair: bool):
        self.st = st
        self.res = res
        self.repair = repair
        self.word = "Repairing" if repair else "ERROR"

    def fix_l1(self, i: int, rc: int) -> None:
        """The active L1 entry ``i`` whose L2 table has refcount ``rc``."""
        st, res = self.st, self.res
        l1e = st.l1[i]
        res.corruptions += 1
        st.log(f"{self.word} OFLAG_COPIED L2 cluster: l1_index={i} l1_entry={l1e:x} "
               f"refcount={rc}")
        if not self.repair:
            return
        new = l1e | C.OFLAG_COPIED if rc == 1 else l1e & ~C.OFLAG_COPIED
        where = st.h.l1_table_offset + i * 8
        try:
            st.overlap_guard(where, 8, OL_ACTIVE_L1)
            st.f.write(struct.pack(">Q", new), where)
            st.f.sync()
        except (Abort, OSError):
            res.check_errors += 1
            raise
        st.l1[i] = new
        res.corruptions -= 1
        res.corruptions_fixed += 1

    def fix_l2(self, l2_off: int, table: np.ndarray, wrong: list) -> None:
        """Entries (index, entry, refcount) of the L2 table at ``l2_off``."""
        st, res = self.st, self.res
        data = bytearray(table.astype(">u8").tobytes())
        dirty = 0
        for j, ent, r in wrong:
            res.corruptions += 1
            st.log(f"{self.word} OFLAG_COPIED data cluster: l2_entry={ent:x} refcount={r}")
            if self.repair:
                new = ent | C.OFLAG_COPIED if r == 1 else ent & ~C.OFLAG_COPIED
                struct.pack_into(">Q", data, j * st.esize, new)
                dirty += 1
        if not dirty:
            return
        try:
            st.overlap_guard(l2_off, st.cs, OL_ACTIVE_L2)
        except Abort as exc:
            st.log(f"ERROR: Could not write L2 table; metadata overlap check failed: {exc}")
            res.check_errors += 1
            raise
        st.f.write(bytes(data), l2_off)
        st.f.sync()
        res.corruptions -= dirty
        res.corruptions_fixed += dirty


def check_oflag_copied(st: State, res: CheckResult, fix: int) -> None:
    """COPIED must be set iff the refcount is 1, on the active L1 entries and on the
    L2 entries they reach (a batch of tables per step)."""
    if fix & FIX_ERRORS:
        repair = True
    elif fix & FIX_LEAKS:
        repair = not res.check_errors and not res.corruptions and not res.leaks
    else:
        repair = False
    st.blocks = {}
    l1 = np.array(st.l1, dtype=U64)
    l1_idx = np.flatnonzero(l1 & U64(C.L1E_OFFSET_MASK))
    if not l1_idx.size:
        return
    p = _Pass(st, res, repair)
    l2s = l1[l1_idx] & U64(C.L1E_OFFSET_MASK)
    l2_rc, l2_bad = _refcounts_of(st, (l2s >> U64(st.cbits)).astype(np.int64))
    l1_copied = (l1[l1_idx] & U64(C.OFLAG_COPIED)) != 0
    l1_wrong = ~l2_bad & ((l2_rc == 1) != l1_copied)
    native = fast.usable(st) and st.exact
    for a, b in st.batches(l2s):
        offs = [int(o) for o in l2s[a:b].tolist()]
        raw = st.read_raw(offs)
        if native:      # tables whose flags all agree with their refcounts are done
            keep = np.union1d(fast.copied_tables(st, raw, b - a),
                              np.flatnonzero(l1_wrong[a:b])).astype(np.int64)
        else:
            keep = np.arange(b - a)
        if keep.size:
            _copied_rows(st, p, [offs[t] for t in keep.tolist()], st.tables_of(raw, keep),
                         (keep + a).tolist(), (l1_idx, l2_rc, l2_bad, l1_wrong))


def _copied_rows(st: State, p: _Pass, offs: list[int], tables: np.ndarray, at: list[int],
                 l1_info: tuple) -> None:
    """The COPIED flags of ``tables`` (at ``offs``; ``at`` their rows in the L1 arrays
    ``l1_info``: L1 index, L2 table refcount, refcount unreadable, L1 flag wrong)."""
    l1_idx, l2_rc, l2_bad, l1_wrong = l1_info
    width = st.l2_entries
    e = split_table(tables, st.extended)[0].ravel()
    batch = L2Batch(e, extended=st.extended, data_file=st.data_file)
    idx = np.flatnonzero(batch.allocated)
    if st.data_file:
        rcs = np.ones(idx.size, dtype=U64)
        bad = np.zeros(idx.size, dtype=bool)
    else:
        rcs, bad = _refcounts_of(st, (batch.offset[idx] >> U64(st.cbits)).astype(np.int64))
    copied = (e[idx] & U64(C.OFLAG_COPIED)) != 0
    wrong = np.flatnonzero(~bad & ((rcs == 1) != copied))
    wrong_rows = idx[wrong] // width
    rows = {t for t, g in enumerate(at) if l1_wrong[g]} | set(np.unique(wrong_rows).tolist())
    for t in sorted(rows):
        g = at[t]
        if l2_bad[g]:
            continue                # refcount unreadable: QEMU skips the table
        if l1_wrong[g]:
            p.fix_l1(int(l1_idx[g]), int(l2_rc[g]))
        lo = np.searchsorted(wrong_rows, t, side="left")
        hi = np.searchsorted(wrong_rows, t, side="right")
        if lo < hi:
            p.fix_l2(offs[t], tables[t], [(int(idx[k]) % width, int(e[int(idx[k])]),
                                           int(rcs[k])) for k in wrong[lo:hi].tolist()])
