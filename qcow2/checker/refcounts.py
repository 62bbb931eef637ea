"""Stored against computed refcounts (QEMU's check_refblocks, compare_refcounts and
rebuild_refcount_structure): the refcount blocks themselves are counted, every
cluster's stored refcount is compared with the IMRT, and with ``-r`` leaks and
corruptions are fixed -- in place, or by writing a new refcount structure into
clusters the IMRT says are free, durable before the header points at it."""

from __future__ import annotations

import errno
import os
import struct

import numpy as np

from .. import constants as C
from ..refcount import decode_block, encode_block
from .result import FIX_ERRORS, FIX_LEAKS, Abort, CheckResult
from .state import U64, State

#: clusters compared per step
CHUNK = 1 << 20


# -- refcount blocks (check_refblocks) ------------------------------------------------
def check_refblocks(st: State, res: CheckResult) -> bool:
    """QEMU's check_refblocks (run after every other reference is counted); returns
    whether the refcount structure must be rebuilt."""
    cs = st.cs
    live = np.flatnonzero(st.reftable)
    ents = st.reftable[live]
    clusters = ((ents & U64(C.REFT_OFFSET_MASK)) >> U64(st.cbits)).astype(np.int64)
    if (live.size and not (ents & U64(C.REFT_RESERVED_MASK | (cs - 1))).any()
            and int(clusters.max()) < st.nb
            and int(clusters.max()) << st.cbits < st.f.size
            and np.unique(clusters).size == clusters.size
            and not st.imrt[clusters].any()):
        st.imrt[clusters] = 1     # the usual case: each block counted once, nothing to say
        return False
    rebuild = False
    for i in live.tolist():
        rebuild |= _check_refblock(st, res, i, int(st.reftable[i]))
    return rebuild


def _check_refblock(st: State, res: CheckResult, i: int, e: int) -> bool:
    cs = st.cs
    if e & C.REFT_RESERVED_MASK:
        st.log(f"ERROR refcount table entry {i} has reserved bits set")
        res.corruptions += 1
        return True
    off = e & C.REFT_OFFSET_MASK
    cluster = off >> st.cbits
    if off & (cs - 1):
        st.log(f"ERROR refcount block {i} is not cluster aligned; refcount table entry "
               f"corrupted")
        res.corruptions += 1
        return True
    if cluster >= st.nb:
        res.corruptions += 1
        fixing = bool(st.fix & FIX_ERRORS)
        st.log(f"{'Repairing' if fixing else 'ERROR'} refcount block {i} is outside image")
        if not fixing:
            return False
        err = _grow_file(st, off, cluster)
        if err is None:
            res.corruptions -= 1
            res.corruptions_fixed += 1
            st.inc_now(res, off)
            return False
        st.log(f"ERROR could not resize image: {os.strerror(err)}")
        return True
    if off:
        st.inc_now(res, off)
        rc = int(st.imrt[cluster])
        if rc != 1:
            st.log(f"ERROR refcount block {i} refcount={rc}")
            res.corruptions += 1
            return True
    return False


def _grow_file(st: State, off: int, cluster: int) -> int | None:
    """Extend the file over a refcount block past its end; an errno if that failed."""
    cs = st.cs
    if off > C.INT64_MAX - cs:
        return errno.EINVAL
    try:
        st.f.truncate(off + cs)
    except OSError as exc:
        return exc.errno or errno.EIO
    st.grow((st.f.size + cs - 1) // cs)
    return errno.EINVAL if cluster >= st.nb else None


# -- compare_refcounts ---------------------------------------------------------------
def compare(st: State, res: CheckResult, fix: int) -> tuple[int, bool]:
    """QEMU's compare_refcounts, a chunk of refcount blocks per step: (highest cluster
    in use, whether the structure must be rebuilt)."""
    nb = st.nb
    rebuild = False
    highest = 0
    fixes: dict[int, int] = {}
    exact = True
    step = max(st.per, CHUNK // st.per * st.per)
    for lo in range(0, nb, step):
        hi = min(nb, lo + step)
        stored, bad = st.stored_range(hi, lo)
        comp = st.imrt[lo:hi]
        used = np.flatnonzero(((stored != 0) | (comp != 0)) & ~bad)
        if used.size:
            highest = lo + int(used[-1])
        differ = np.flatnonzero((stored != comp) | bad).tolist()
        exact = exact and not differ
        for j in differ:
            if bad[j]:
                st.log(f"Can't get refcount for cluster {lo + j}: {os.strerror(errno.EIO)}")
                res.check_errors += 1
                continue
            rebuild |= _compare_one(st, res, fix, fixes, lo + j, int(stored[j]), int(comp[j]))
    if fixes:
        _apply_refcount_fixes(st, fixes)
    st.exact = exact
    return highest, rebuild


def _compare_one(st: State, res: CheckResult, fix: int, fixes: dict, i: int, r1: int,
                 r2: int) -> bool:
    """One cluster whose stored refcount ``r1`` is not the computed ``r2``."""
    fixed = None
    if r1 > r2 and r1 and fix & FIX_LEAKS:
        fixed = "leaks"
    elif r1 < r2 and r1 and fix & FIX_ERRORS:
        fixed = "corruptions"
    what = "Repairing" if fixed else ("ERROR" if r1 < r2 else "Leaked")
    st.log(f"{what} cluster {i} refcount={r1} reference={r2}")
    if fixed == "leaks":
        fixes[i] = r2
        res.leaks_fixed += 1
    elif fixed:
        fixes[i] = r2
        res.corruptions_fixed += 1
    elif r1 < r2:
        res.corruptions += 1
    else:
        res.leaks += 1
    return r1 == 0


def _apply_refcount_fixes(st: State, fixes: dict[int, int]) -> None:
    """Write new refcounts (QEMU's update_refcount), one block write per block;
    clusters whose refcount drops to 0 are discarded (holes punched)."""
    by_block: dict[int, list[int]] = {}
    for c in sorted(fixes):
        by_block.setdefault(c >> st.rb_bits, []).append(c)
    freed = []
    for bi, clusters in by_block.items():
        off = int(st.reftable[bi]) & C.REFT_OFFSET_MASK
        blk = decode_block(st.f.read(st.cs, off), st.bits).copy()
        for c in clusters:
            blk[c & (st.per - 1)] = fixes[c]
            if fixes[c] == 0:
                freed.append(c)
        st.f.write(encode_block(blk, st.bits), off)
    st.f.sync()
    st.blocks = {}
    be = st.f.be
    if freed and be.can_punch_holes:
        for c in freed:
            start = c << st.cbits
            if start >= st.f.size:
                continue
            try:
                be.punch_hole(start, min(st.cs, st.f.size - start))
            except OSError as exc:
                # a store that cannot punch holes: freeing is only a hint there; an
                # I/O error is an error
                if exc.errno not in (errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL):
                    raise
                break


# -- rebuilding the refcount structure -----------------------------------------------
def _first_fit(st: State, count: int, cluster: int) -> tuple[int, int]:
    """(start of the first run of ``count`` free IMRT entries at or after ``cluster``
    -- or where a run at the end could be extended --, first free cluster)."""
    nb = st.nb
    z = np.flatnonzero(st.imrt[cluster:nb] == 0)
    if not z.size:
        return nb, cluster
    first_free = cluster + int(z[0])
    if count == 1:
        return first_free, first_free
    breaks = np.flatnonzero(np.diff(z) != 1)
    run_starts = np.concatenate([[0], breaks + 1])
    run_ends = np.concatenate([breaks, [z.size - 1]])
    for a, b in zip(run_starts.tolist(), run_ends.tolist(), strict=True):
        if b - a + 1 >= count:
            return cluster + int(z[a]), first_free
    a, b = int(run_starts[-1]), int(run_ends[-1])
    if cluster + int(z[b]) == nb - 1:
        return cluster + int(z[a]), first_free
    return nb, first_free


def alloc_imrt(st: State, count: int, first_free: int) -> tuple[int, int]:
    """QEMU's alloc_clusters_imrt: first fit from ``first_free``; returns
    (cluster, new first_free)."""
    cluster, new_ff = first_free, first_free
    if cluster < st.nb:
        cluster, new_ff = _first_fit(st, count, cluster)
    if cluster + count > st.nb:
        st.grow(cluster + count)
    st.imrt[cluster:cluster + count] = 1
    return cluster, new_ff


def _write_refblocks(st: State, first: int, end: int, reftable: list[int]) -> bool:
    """QEMU's rebuild_refcounts_write_refblocks; ``reftable`` grows in place."""
    per = st.per
    first_free = 0
    grown = False
    bi = first >> st.rb_bits
    cluster = first
    while cluster < end:
        lo = max(cluster, bi * per)
        hi = min(end, (bi + 1) * per)
        if lo >= hi or not st.imrt[lo:hi].any():
            bi += 1
            cluster = bi * per
            continue
        start = bi * per
        if len(reftable) > bi and reftable[bi]:
            rb_off = reftable[bi]
        else:
            c, first_free = alloc_imrt(st, 1, max(first_free, start))
            rb_off = c << st.cbits
            end = max(end, c + 1)
            if len(reftable) <= bi:
                entries = ((bi + 1) * 8 + st.cs - 1) // st.cs * st.cs // 8
                reftable.extend([0] * (entries - len(reftable)))
                grown = True
            reftable[bi] = rb_off
        try:
            st.overlap_guard(rb_off, st.cs)
        except Abort as exc:
            st.log(f"ERROR writing refblock: {exc}")
            raise
        st.f.write(encode_block(st.imrt[start:start + per], st.bits), rb_off)
        bi += 1
        cluster = bi * per
    return grown


def rebuild(st: State) -> None:
    """QEMU's rebuild_refcount_structure: new refcount blocks and table in clusters
    the computed refcounts say are free, durable before the header switches."""
    reftable: list[int] = []
    changed = _write_refblocks(st, 0, st.nb, reftable)
    assert changed
    while True:
        rt_clusters = (len(reftable) * 8 + st.cs - 1) // st.cs
        c, _ff = alloc_imrt(st, rt_clusters, 0)
        if not _write_refblocks(st, c, c + rt_clusters, reftable):
            break
    rt_off = c << st.cbits
    data = struct.pack(f">{len(reftable)}Q", *reftable)
    try:
        st.overlap_guard(rt_off, len(data))
    except Abort as exc:
        st.log(f"ERROR writing reftable: {exc}")
        raise
    st.f.write(data, rt_off)
    st.f.sync()
    st.f.write(struct.pack(">QI", rt_off, rt_clusters), C.HDR_REFCOUNT_TABLE_OFFSET)
    st.f.sync()
    st.h.refcount_table_offset = rt_off
    st.h.refcount_table_clusters = rt_clusters
    st.load_reftable(rt_off, rt_clusters)
    # QEMU keeps exactly len(reftable) entries in memory (a multiple of cs/8)
    st.reftable = st.reftable[:len(reftable)]
