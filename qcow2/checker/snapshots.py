"""The snapshot table in the check (QEMU's qcow2_check_read_snapshot_table and
qcow2_check_fix_snapshot_table): read it as far as QEMU would, report (and with
``-r all`` drop) what it cannot keep, and rewrite it with the one table packer,
:func:`qcow2.snapshot.pack_table`."""

from __future__ import annotations

import errno
import struct

from .. import constants as C
from ..cache import TableCache
from ..errors import Qcow2Error
from ..refcount import Refcounts
from ..snapshot import ENTRY_HEADER, EXTRA, EXTRA_DATA_SIZE, Snapshot, pack_table
from .result import FIX_ERRORS, Abort, CheckResult
from .state import State, Window

_NB_AND_OFFSET = struct.Struct(">IQ")       # the header's nb_snapshots, snapshots_offset


def check_table(st: State, res: CheckResult) -> None:
    """Read the table as QEMU's check does; ``st.snapshots`` holds what it kept."""
    nb, off = _NB_AND_OFFSET.unpack(st.f.read(_NB_AND_OFFSET.size, C.HDR_NB_SNAPSHOTS))
    repair = bool(st.fix & FIX_ERRORS)
    reduced = 0
    if nb > C.MAX_SNAPSHOTS and repair:
        st.log(f"Discarding {nb - C.MAX_SNAPSHOTS} overhanging snapshots")
        reduced += nb - C.MAX_SNAPSHOTS
        nb = C.MAX_SNAPSHOTS
    if nb > C.MAX_SNAPSHOTS:
        res.check_errors += 1
        st.log("ERROR snapshot table too large")
        st.log(f"You can force-remove all {nb - C.MAX_SNAPSHOTS} overhanging snapshots with "
               f"qemu-img check -r all")
        raise Abort(errno.EFBIG)
    if C.INT64_MAX - nb * C.SNAPSHOT_HEADER_SIZE < off or off & (st.cs - 1):
        res.check_errors += 1
        st.log("ERROR snapshot table offset invalid")
        raise Abort(errno.EINVAL)
    snaps, end, dropped, cut = _read_entries(st, res, Window(st.f), nb, off)
    reduced += cut
    st.snapshots = snaps
    st.snapshots_offset = off
    st.snapshots_size = end - off if snaps else 0
    res.corruptions += reduced + dropped
    if reduced:
        st.f.write(struct.pack(">I", len(snaps)), C.HDR_NB_SNAPSHOTS)
        st.f.sync()
        res.corruptions_fixed += reduced
        res.corruptions -= reduced
    if st.h.version >= 3:
        for i, sn in enumerate(snaps):
            if sn.extra_data_size < C.SNAPSHOT_EXTRA_V3_MIN:
                res.corruptions += 1
                st.log(f"{'Repairing' if repair else 'ERROR'} snapshot table entry {i} is "
                       f"incomplete")


def _read_entries(st: State, res: CheckResult, f: Window, nb: int, off: int):
    """The entries QEMU keeps: (snapshots, end of the last, entries whose extra data
    was cut, entries dropped because the table grew too big)."""
    repair = bool(st.fix & FIX_ERRORS)
    snaps: list[Snapshot] = []
    pos = off
    length = 0
    dropped = 0
    for i in range(nb):
        pre = pos
        length = (length + 7) & ~7
        pos = (pos + 7) & ~7
        sn, pos, cut, size = _read_entry(st, res, f, i, pos)
        dropped += cut
        length += size
        if length > C.MAX_SNAPSHOTS_SIZE or pos - off > C.INT_MAX:
            if not repair:
                res.check_errors += 1
                st.log("ERROR failed to read the snapshot table: Snapshot table is too big")
                st.log(f"You can force-remove all {nb - i} overhanging snapshots with "
                       f"qemu-img check -r all")
                raise Abort(errno.EFBIG)
            st.log(f"Discarding {nb - i} overhanging snapshots (snapshot table is too big)")
            return snaps, pre, dropped, nb - i
        snaps.append(sn)
    return snaps, pos, dropped, 0


def _read_entry(st: State, res: CheckResult, f: Window, i: int, pos: int):
    """Entry ``i`` at ``pos`` (QEMU's check-mode rules): (snapshot, position after
    it, 1 if its extra data was cut, bytes it counts for in the table size)."""
    (l1_off, l1_size, id_size, name_size, date_sec, date_nsec, clock, vm_state,
     extra_size) = ENTRY_HEADER.unpack(f.read(ENTRY_HEADER.size, pos))
    entry_offset = pos
    pos += ENTRY_HEADER.size
    cut = 0
    if extra_size > C.MAX_SNAPSHOT_EXTRA_DATA:
        if not st.fix & FIX_ERRORS:
            res.check_errors += 1
            st.log(f"ERROR failed to read the snapshot table: Too much extra metadata in "
                   f"snapshot table entry {i}")
            st.log("You can force-remove this extra metadata with qemu-img check -r all")
            raise Abort(errno.EFBIG)
        st.log(f"Discarding too much extra metadata in snapshot table entry {i} "
               f"({extra_size} > {C.MAX_SNAPSHOT_EXTRA_DATA})")
        cut = 1
    known = min(EXTRA_DATA_SIZE, extra_size)
    extra = f.read(known, pos) + bytes(EXTRA_DATA_SIZE - known)
    pos += known
    vm_large, disk_size, icount = EXTRA.unpack_from(extra)
    if extra_size > EXTRA_DATA_SIZE:
        end = pos + extra_size - EXTRA_DATA_SIZE
        if cut:
            extra_size = C.MAX_SNAPSHOT_EXTRA_DATA
        extra += f.read(extra_size - EXTRA_DATA_SIZE, pos)
        pos = end
    sid = f.read(id_size, pos).split(b"\0", 1)[0]
    pos += id_size
    name = f.read(name_size, pos).split(b"\0", 1)[0]
    pos += name_size
    sn = Snapshot(i, l1_off, l1_size, sid.decode("utf-8", "surrogateescape"),
                  name.decode("utf-8", "surrogateescape"), date_sec, date_nsec, clock,
                  vm_large if extra_size >= 8 else vm_state,
                  disk_size if extra_size >= 16 else None,
                  icount if extra_size >= 24 else None, extra_size, entry_offset,
                  bytes(extra), ((pos + 7) & ~7) - entry_offset)
    return sn, pos, cut, ENTRY_HEADER.size + extra_size + id_size + name_size


def fix_table(st: State, res: CheckResult) -> None:
    """QEMU's qcow2_check_fix_snapshot_table: with ``-r all``, corruptions found in the
    snapshot table are fixed by writing the table kept."""
    if not (res.corruptions and st.fix & FIX_ERRORS):
        return
    try:
        _write_table(st)
    except (Abort, OSError, Qcow2Error) as exc:
        res.check_errors += 1
        st.log(f"ERROR failed to update snapshot table: {exc}")
        raise Abort(getattr(exc, "err", None) or errno.EIO) from None
    res.corruptions_fixed += res.corruptions
    res.corruptions = 0


class _RefcountHost:
    """What qcow2.refcount.Refcounts needs from an image, over the file under repair."""

    def __init__(self, st: State):
        self.f = st.f
        self.header = st.h
        self.file_size = st.f.size

    def read(self, n: int, offset: int) -> bytes:
        return self.f.read(n, offset)

    def write(self, data, offset: int, _what: str | None = None) -> None:
        self.f.write(bytes(data), offset)
        self.file_size = max(self.file_size, self.f.size)

    # the names Refcounts calls
    _read_meta = read
    _write_meta = write

    def _sync(self) -> None:
        self.f.sync()


def _write_table(st: State) -> None:
    """QEMU's qcow2_write_snapshots: the table is written to newly allocated
    clusters, made durable with its refcounts, then the header switches to it and
    the old table is freed."""
    buf = pack_table(st.snapshots, st.h.size)
    if len(buf) > C.MAX_SNAPSHOTS_SIZE:
        raise Abort(errno.EFBIG)
    host = _RefcountHost(st)
    cache = TableCache(st.cs, 4 << 20, host.read, host.write)
    refs = Refcounts(host, cache)
    new_off = 0
    if buf:
        new_off = refs.alloc((len(buf) + st.cs - 1) // st.cs)
        _flush_refcounts(st, refs, cache)
        st.overlap_guard(new_off, len(buf))
        st.f.write(buf, new_off)
        st.f.sync()
    st.f.write(_NB_AND_OFFSET.pack(len(st.snapshots), new_off), C.HDR_NB_SNAPSHOTS)
    st.f.sync()
    if st.snapshots_size:
        refs.free(st.snapshots_offset, st.snapshots_size)
        refs.apply_pending_frees()
        _flush_refcounts(st, refs, cache)
    st.snapshots_offset = new_off
    st.snapshots_size = len(buf)


def _flush_refcounts(st: State, refs: Refcounts, cache: TableCache) -> None:
    """Refcount blocks first, then the table entries that point at new ones."""
    cache.write_dirty()
    st.f.sync()
    refs.write_table_entries()
    st.f.sync()
