"""The whole check (QEMU's qcow2_co_check_locked, and qemu-img check's second pass
after a repair)."""

from __future__ import annotations

import errno
import os
import struct

import numpy as np

from .. import constants as C
from . import refcounts
from .bitmaps import check_bitmaps
from .copied import check_oflag_copied
from .result import (FIX_ERRORS, FIX_LEAKS, Abort, CheckFailedError, CheckResult, hex_alt,
                     memory_budget)
from .snapshots import check_table, fix_table
from .state import CheckedFile, State
from .walk import check_l1


# -- the in-memory refcount table (calculate_refcounts) -----------------------------
def _calculate(st: State, res: CheckResult, fix: int) -> bool:
    """Count every reference into the IMRT; returns whether the refcount structure
    must be rebuilt (from check_refblocks)."""
    saved_fix, st.fix = st.fix, fix
    st.res = res
    try:
        h = st.h
        st.inc(res, 0, st.cs)
        check_l1(st, res, h.l1_table_offset, h.l1_size, True, True)
        if st.data_file and st.snapshots:
            st.log(f"ERROR {len(st.snapshots)} snapshots in image with data file")
            res.corruptions += 1
        for sn in st.snapshots:
            if _snapshot_l1_ok(st, res, sn):
                check_l1(st, res, sn.l1_table_offset, sn.l1_size, False, False)
        st.inc(res, st.snapshots_offset, st.snapshots_size)
        st.inc(res, st.reftable_offset, len(st.reftable) * 8)
        if h.crypto_header is not None and h.crypto_header[1]:
            st.inc(res, *h.crypto_header)
        check_bitmaps(st, res)
        st.flush_pending()
        return refcounts.check_refblocks(st, res)
    finally:
        st.fix = saved_fix


def _snapshot_l1_ok(st: State, res: CheckResult, sn) -> bool:
    what = None
    if sn.l1_table_offset & (st.cs - 1):
        what = f"l1_offset={hex_alt(sn.l1_table_offset)}: L1 table is not cluster aligned"
    elif sn.l1_size > C.MAX_L1_SIZE // C.L1E_SIZE:
        what = f"l1_size={hex_alt(sn.l1_size)}: L1 table is too large"
    if what is None:
        return True
    st.log(f"ERROR snapshot {sn.id} ({sn.name}) {what}; snapshot table entry corrupted")
    res.corruptions += 1
    return False


# -- qcow2_check_refcounts -------------------------------------------------------------
def _check_refcounts(st: State, res: CheckResult) -> None:
    nb = (st.f.size + st.cs - 1) // st.cs
    if nb > C.INT_MAX:
        res.check_errors += 1
        raise Abort(errno.EFBIG)
    need = nb * (2 * np.dtype(st.dtype).itemsize + 1)
    if need > memory_budget():
        st.log(f"ERROR checking {nb} clusters needs about {need >> 20} MiB of memory, more "
               f"than half of this machine's")
        res.check_errors += 1
        raise Abort(errno.ENOMEM)
    res.total_clusters = (st.h.size + st.cs - 1) // st.cs
    st.grow(nb)
    fix = st.fix
    rebuild = _calculate(st, res, fix)
    pre_compare = res.copy()
    highest, rb2 = refcounts.compare(st, res, 0)
    rebuild = rebuild or rb2
    if rebuild and fix & FIX_ERRORS:
        highest = _rebuild(st, res, fix, highest)
    elif fix:
        if rebuild:
            st.log("ERROR need to rebuild refcount structures")
            res.check_errors += 1
            raise Abort(errno.EIO)
        if res.leaks or res.corruptions:
            res.restore(pre_compare)
            highest, _ = refcounts.compare(st, res, fix)
    check_oflag_copied(st, res, fix)
    res.image_end_offset = (highest + 1) * st.cs


def _rebuild(st: State, res: CheckResult, fix: int, highest: int) -> int:
    """Write a new refcount structure, then count again (QEMU's check after
    rebuild_refcount_structure); returns the highest cluster in use."""
    old = res.copy()
    fresh_leaks = 0
    st.log("Rebuilding refcount structure")
    st.exact = False
    refcounts.rebuild(st)
    res.corruptions = 0
    res.leaks = 0
    st.imrt[:] = 0
    _calculate(st, res, 0)
    if fix & FIX_LEAKS:
        saved = res.copy()
        tmp = CheckResult()
        highest, still = refcounts.compare(st, tmp, FIX_LEAKS)
        if still:
            st.log("ERROR rebuilt refcount structure is still broken")
        fresh_leaks = tmp.leaks
        res.restore(saved)
    if res.corruptions < old.corruptions:
        res.corruptions_fixed += old.corruptions - res.corruptions
    if res.leaks < old.leaks:
        res.leaks_fixed += old.leaks - res.leaks
    res.leaks += fresh_leaks
    return highest


# -- one pass ----------------------------------------------------------------------
def _run_pass(st: State) -> CheckResult:
    """qcow2_co_check_locked: the snapshot table, the refcounts, then the snapshot
    table repair; the dirty and corrupt bits are cleared after a clean repair."""
    result = CheckResult()
    snap_res = CheckResult()
    ref_res = CheckResult()
    st.res = ref_res
    try:
        check_table(st, snap_res)
    except Abort:
        result.add(snap_res, False)
        raise
    try:
        _check_refcounts(st, ref_res)
    except Abort:
        result.add(ref_res, True)
        result.add(snap_res, False)
        raise
    result.add(ref_res, True)
    try:
        fix_table(st, snap_res)
    finally:
        result.add(snap_res, False)
    if st.fix and not result.check_errors and not result.corruptions:
        _mark_clean(st)
    return result


def _mark_clean(st: State) -> None:
    """qcow2_mark_clean + qcow2_mark_consistent: clear the dirty and corrupt bits."""
    h = st.h
    if h.version < 3:
        return
    at = C.HDR_INCOMPATIBLE_FEATURES
    raw = struct.unpack(">Q", st.f.read(8, at))[0]
    new = raw & ~(C.INCOMPAT_DIRTY | C.INCOMPAT_CORRUPT)
    if new != raw:
        st.f.sync()
        st.f.write(struct.pack(">Q", new), at)
        st.f.sync()
        h.incompatible_features = new


def run_pass(f: CheckedFile, fix: int, log) -> CheckResult:
    """One check pass over ``f``; CheckFailedError when it cannot complete."""
    try:
        return _run_pass(State(f, fix, log))
    except Abort as exc:
        raise CheckFailedError(f"Check failed: {os.strerror(exc.err)}", errno_=exc.err) from None
    except MemoryError:
        raise CheckFailedError(f"Check failed: {os.strerror(errno.ENOMEM)}",
                               errno_=errno.ENOMEM) from None


def check_file(f: CheckedFile, fix: int = 0, log=None) -> CheckResult:
    """Check (and with ``fix``, a FIX_* mask, repair) the qcow2 image in ``f`` as
    ``qemu-img check`` does: after a repair the image is checked again, and the
    result carries what the repair fixed.  ``log(line)`` receives the per-problem
    messages.  Raises CheckFailedError when the check cannot complete."""
    res = run_pass(f, fix, log)
    if not (res.corruptions_fixed or res.leaks_fixed):
        return res
    fixed = (res.leaks_fixed, res.corruptions_fixed)
    repaired = {"leaks-fixed": fixed[0], "corruptions-fixed": fixed[1]}
    if f.marked_corrupt:
        # QEMU makes an image it marked corrupt unusable: no double check
        raise CheckFailedError(f"Check failed: {os.strerror(errno.ENOMEDIUM)}",
                               errno_=errno.ENOMEDIUM, repaired=repaired)
    try:
        res = run_pass(f, 0, log)
    except CheckFailedError as exc:
        exc.repaired = repaired
        raise
    res.leaks_fixed, res.corruptions_fixed = fixed
    return res
