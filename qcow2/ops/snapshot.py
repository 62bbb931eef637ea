"""Internal snapshots: list, create, apply and delete (qemu-img snapshot).

A snapshot is a copy of the active L1 table plus one more reference on every cluster
reachable from it, so that the active layer copies on write from then on (COPIED
flags say where a cluster is the active layer's alone).  The order of every change
is chosen so that a crash leaves leaks, never a reference to a cluster with too low
a refcount: references are counted before they are published and uncounted only
after they are gone from the disk.
"""

from __future__ import annotations

import struct
import time

from .. import constants as C
from ..errors import Qcow2Error, UnsupportedFeatureError
from ..snapshot import Snapshot, find_snapshot, pack_table



def _open_rw(path, format):
    from ..image import open_image
    from ..writer import WritableQcow2Image

    img = open_image(path, "r+", format=format, backing=False)
    if not isinstance(img, WritableQcow2Image):
        img.close()
        raise UnsupportedFeatureError("internal snapshots need a qcow2 image",
                                      feature="snapshot on raw")
    return img


def list_snapshots(path, *, format=None, force_share=False) -> list[dict]:
    from ..image import open_image
    with open_image(path, format=format, backing=False, force_share=force_share) as img:
        return img.snapshots() if hasattr(img, "snapshots") else []


# -- the reference walk -------------------------------------------------------------

def _tree(img, l1: list[int]):
    """(l1 index, L2 offset, [(entry index, descriptor)]) for every L2 table of ``l1``."""
    esz = img.header.l2_entry_size
    n = img._l2_entries
    for i, e in enumerate(l1):
        off = e & C.L1E_OFFSET_MASK
        if not off:
            continue
        t = img._l2_table(i, off)
        entries = struct.unpack(f">{n * esz // 8}Q", bytes(t))[::esz // 8]
        yield i, off, entries


def _data_ranges(img, entry: int):
    """Host byte ranges an L2 descriptor holds a reference on."""
    if entry & C.OFLAG_COMPRESSED:
        _coff, _csize, start, n = C.compressed_extent(entry, img.cluster_bits)
        return [(start, n)]
    off = entry & C.L2E_OFFSET_MASK
    if off and not img.header.has_data_file:
        return [(off, img.cluster_size)]
    return []


def _add_tree(img, l1: list[int], delta: int) -> None:
    """+1 / -1 on every L2 table of ``l1`` and every cluster its entries reach."""
    refs = img.refs
    for _i, off, entries in _tree(img, l1):
        for e in entries:
            for start, length in _data_ranges(img, e):
                _add_range(refs, start, length, delta)
        _add_range(refs, off, img.cluster_size, delta)


def _add_range(refs, start: int, length: int, delta: int) -> None:
    if delta > 0:
        refs.increment(start, length)
    else:
        first = start >> refs.cbits
        last = (start + length - 1) >> refs.cbits
        for c in range(first, last + 1):
            refs._add(c, -1)


def _fix_copied(img) -> None:
    """Set COPIED exactly where the active layer is a cluster's only user."""
    refs = img.refs
    esz = img.header.l2_entry_size
    l1 = img._l1
    for i, off, entries in list(_tree(img, l1)):
        want = C.OFLAG_COPIED if refs.get(off >> img.cluster_bits) == 1 else 0
        if (l1[i] & C.OFLAG_COPIED) != want:
            l1[i] = (l1[i] & ~C.OFLAG_COPIED) | want
            img._l1_dirty.add(i)
        table = img._l2_table(i, off)
        changed = False
        for k, e in enumerate(entries):
            if e & C.OFLAG_COMPRESSED:
                continue
            host = e & C.L2E_OFFSET_MASK
            if not host:
                continue
            if img.header.has_data_file:
                w = C.OFLAG_COPIED
            else:
                w = C.OFLAG_COPIED if refs.get(host >> img.cluster_bits) == 1 else 0
            if (e & C.OFLAG_COPIED) != w:
                struct.pack_into(">Q", table, k * esz, (e & ~C.OFLAG_COPIED) | w)
                changed = True
        if changed:
            img._l2c.mark_dirty(off)


# -- the snapshot table ---------------------------------------------------------------

def _write_table(img, snaps: list[Snapshot]) -> None:
    """Write the table to new clusters and point the header at it (old one freed)."""
    h = img.header
    data = pack_table(snaps, img.size)
    old_off = h.snapshots_offset
    old_len = sum(s.entry_size for s in img.snapshots_list) if h.nb_snapshots else 0
    new_off = 0
    if data:
        n = (len(data) + img.cluster_size - 1) // img.cluster_size
        new_off = img.refs.alloc(n)
        img._claim(new_off, n * img.cluster_size, "the snapshot table")
        img._write_meta(data + bytes(n * img.cluster_size - len(data)), new_off,
                        "the snapshot table")
    img.flush()                       # refcounts, tables, the new snapshot table
    img.be.pwrite(struct.pack(">IQ", len(snaps), new_off), 0x3C)
    img._sync()
    h.nb_snapshots, h.snapshots_offset = len(snaps), new_off
    if old_off and old_len:
        img.refs.free(old_off, old_len)
        img.refs.block_freed(old_off, old_len)
    img.snapshots_list = snaps
    pos = 0
    for k, s in enumerate(snaps):
        s.index = k
        start = pos
        pos = start + len(pack_table([s], img.size))
        if k + 1 < len(snaps):
            pos += (-pos) % 8
        s.entry_offset, s.entry_size = new_off + start, pos - start


# -- operations ------------------------------------------------------------------------

def create_snapshot(path, name: str, *, format=None) -> dict:
    img = _open_rw(path, format)
    try:
        with img._lock:
            img._mark_modified()
            img.flush()
            cs = img.cluster_size
            l1 = list(img._l1)
            ids = [int(s.id) for s in img.snapshots_list if s.id.isdigit()]
            sid = str(max(ids, default=0) + 1)
            # 1. one more reference on everything the active tree reaches
            _add_tree(img, l1, +1)
            _fix_copied(img)
            # 2. the snapshot's own copy of the L1 table (COPIED means nothing there)
            n = (len(l1) * 8 + cs - 1) // cs
            l1_off = img.refs.alloc(max(n, 1))
            img._claim(l1_off, max(n, 1) * cs, "a snapshot L1 table")
            copy = [e & ~C.OFLAG_COPIED for e in img._l1]
            img._write_meta(struct.pack(f">{len(copy)}Q", *copy)
                            + bytes(max(n, 1) * cs - len(copy) * 8), l1_off,
                            "a snapshot L1 table")
            now = time.time_ns()
            sn = Snapshot(index=len(img.snapshots_list), l1_table_offset=l1_off,
                          l1_size=len(l1), id=sid, name=name, date_sec=now // 10**9,
                          date_nsec=(now % 10**9) // 1000 * 1000, vm_clock_nsec=0,
                          vm_state_size=0, disk_size=img.size, icount=0, extra_data_size=24,
                          entry_offset=0, extra=struct.pack(">QQQ", 0, img.size, 0))
            # 3. publish: the table (and the header) last
            _write_table(img, list(img.snapshots_list) + [sn])
            img.flush()
            return sn.info()
    finally:
        img.close()


def _find(img, key):
    sn = find_snapshot(img.snapshots_list, key)
    if sn is None:
        raise Qcow2Error("snapshot not found")
    img.header.validate_snapshot_l1(sn)
    if sn.l1_table_offset + sn.l1_size * 8 > img.file_size:
        raise Qcow2Error(f"the L1 table of snapshot {sn.id} lies past the end of the file")
    return sn


def _read_l1(img, sn) -> list[int]:
    raw = img._read_meta(sn.l1_size * 8, sn.l1_table_offset) if sn.l1_size else b""
    return list(struct.unpack(f">{sn.l1_size}Q", raw))


def delete_snapshot(path, key, *, format=None) -> None:
    img = _open_rw(path, format)
    try:
        with img._lock:
            try:
                sn = _find(img, key)
            except Qcow2Error as exc:
                raise Qcow2Error(f"Could not delete snapshot '{key}': {exc}") from None
            img._mark_modified()
            sl1 = _read_l1(img, sn)
            # 1. unpublish it (a crash after this leaks its clusters, nothing worse)
            _write_table(img, [s for s in img.snapshots_list if s is not sn])
            # 2. drop its references, then its L1 table
            _add_tree(img, sl1, -1)
            n = (sn.l1_size * 8 + img.cluster_size - 1) // img.cluster_size
            if n:
                _add_range(img.refs, sn.l1_table_offset, n * img.cluster_size, -1)
            img.flush()
            # 3. clusters the active layer now owns alone get COPIED back
            _fix_copied(img)
            img.flush()
    finally:
        img.close()


def apply_snapshot(path, key, *, format=None) -> None:
    from ..writer import _grow_l1, _resize_qcow2

    img = _open_rw(path, format)
    try:
        with img._lock:
            try:
                sn = _find(img, key)
            except Qcow2Error as exc:
                raise Qcow2Error(f"Could not apply snapshot '{key}': Failed to load "
                                 f"snapshot: {exc}") from None
            img._mark_modified()
            if sn.disk_size is not None and sn.disk_size != img.size:
                _resize_qcow2(img, sn.disk_size, shrink=True, preallocation="off")
            if sn.l1_size > len(img._l1):
                _grow_l1(img, sn.l1_size)
            img.flush()
            sl1 = _read_l1(img, sn)
            new = sl1 + [0] * (len(img._l1) - len(sl1))
            old = list(img._l1)
            # 1. count the snapshot's tree for the active layer too, durably
            _add_tree(img, sl1, +1)
            img.flush()
            # 2. switch the active L1 table on disk
            img._write_meta(struct.pack(f">{len(new)}Q", *new), img._l1_offset,
                            "the active L1 table")
            img._sync()
            img._l1[:] = new
            img._l1_dirty.clear()
            # 3. the old active tree loses its reference
            _add_tree(img, old, -1)
            img.flush()
            _fix_copied(img)
            img.flush()
    finally:
        img.close()
