"""The internal snapshot table (spec: "Snapshots")."""

from __future__ import annotations

import struct

from . import constants as C
from .errors import CorruptImageError

#: An entry's fixed part: l1_table_offset, l1_size, id_str_size, name_size, date_sec,
#: date_nsec, vm_clock_nsec, vm_state_size, extra_data_size (40 bytes).
ENTRY_HEADER = struct.Struct(">QIHHIIQII")
#: The extra data every entry we write carries (QEMU's QCowSnapshotExtraData):
#: vm_state_size_large, disk_size, icount.
EXTRA = struct.Struct(">QQQ")
EXTRA_DATA_SIZE = EXTRA.size


class Snapshot:
    """One entry of the snapshot table (a plain class: see header.Header)."""

    def __init__(self, index: int, l1_table_offset: int, l1_size: int, id: str, name: str,
                 date_sec: int, date_nsec: int, vm_clock_nsec: int, vm_state_size: int,
                 disk_size: int | None, icount: int | None, extra_data_size: int,
                 entry_offset: int, extra: bytes = b"", entry_size: int = 0):
        self.index = index
        self.l1_table_offset = l1_table_offset
        self.l1_size = l1_size
        self.id = id
        self.name = name
        self.date_sec = date_sec
        self.date_nsec = date_nsec
        self.vm_clock_nsec = vm_clock_nsec
        self.vm_state_size = vm_state_size
        self.disk_size = disk_size          # None: older entries, the image's size applies
        self.icount = icount
        self.extra_data_size = extra_data_size
        self.entry_offset = entry_offset
        self.extra = extra                  # the extra data as stored (kept on rewrite)
        self.entry_size = entry_size        # bytes it takes in the table, padding included

    def __repr__(self) -> str:
        return f"Snapshot(id={self.id!r}, name={self.name!r}, l1={self.l1_table_offset:#x})"

    def info(self) -> dict:
        """The entry as `qemu-img info --output=json` lists it."""
        d = {}
        if self.icount is not None:
            d["icount"] = self.icount
        d.update({
            "vm-clock-nsec": self.vm_clock_nsec % 1_000_000_000,
            "name": self.name,
            "date-sec": self.date_sec,
            "date-nsec": self.date_nsec,
            "vm-clock-sec": self.vm_clock_nsec // 1_000_000_000,
            "id": self.id,
            "vm-state-size": self.vm_state_size,
        })
        return d


def read_snapshot_table(read, offset: int, count: int, file_size: int,
                        charge=None) -> list[Snapshot]:
    """Parse ``count`` entries at ``offset`` (validated by the header already).

    The table is read incrementally, as far as its entries say it goes: it can be at
    most MAX_SNAPSHOTS_SIZE bytes long.  ``charge(n)``, when given, is called with the
    number of bytes about to be read before every read (untrusted mode counts them
    against its metadata budget and refuses there); then the table must also lie
    inside the file.  Without it, bytes past the end of the file read as zeros, as
    QEMU's file driver reads them (qemu-img opens such an image, lists the zeroed
    entries, and ``snapshot -c`` writes the table anew inside the file; ``check``
    reports the entries as incomplete).
    """
    if count == 0:
        return []
    strict = charge is not None
    limit = min(C.MAX_SNAPSHOTS_SIZE, max(0, file_size - offset)) if strict \
        else C.MAX_SNAPSHOTS_SIZE
    buf = bytearray()

    def need(n: int) -> bool:
        """Make ``buf`` hold ``n`` bytes (reading ahead at most 1 MiB); False past the end."""
        if n <= len(buf):
            return True
        if n > limit:
            return False
        want = min(limit, max(n, len(buf) + min(max(len(buf), 64 << 10), 1 << 20)))
        if charge is not None:
            charge(want - len(buf))
        got = read(want - len(buf), offset + len(buf))
        if not strict and len(got) < want - len(buf):
            got = bytes(got) + bytes(want - len(buf) - len(got))    # zeros past the end
        buf.extend(got)
        return n <= len(buf)

    out: list[Snapshot] = []
    pos = 0
    for i in range(count):
        pos = (pos + 7) & ~7
        if not need(pos + ENTRY_HEADER.size):
            raise _trunc(i, offset + pos, file_size)
        (l1_off, l1_size, id_size, name_size, date_sec, date_nsec, clock, vm_state,
         extra_size) = ENTRY_HEADER.unpack_from(buf, pos)
        entry_off = offset + pos
        pos += ENTRY_HEADER.size
        if extra_size > C.MAX_SNAPSHOT_EXTRA_DATA:
            exc = CorruptImageError(
                f"Too much extra metadata in snapshot table entry {i} "
                f"({extra_size} bytes, at offset {entry_off:#x})",
                offset=entry_off, size=ENTRY_HEADER.size, what="snapshot table entry")
            if not strict:      # (an untrusted image is never repaired in place)
                exc.hint = "You can force-remove this extra metadata with qemu-img check -r all\n"
            raise exc
        end = pos + extra_size + id_size + name_size
        if not need(end):
            if end > C.MAX_SNAPSHOTS_SIZE:
                exc = CorruptImageError(
                    f"Snapshot table is too big (entry {i} at offset {entry_off:#x})",
                    offset=entry_off, what="snapshot table")
                if not strict:
                    exc.hint = (f"You can force-remove all {count - i} overhanging "
                                f"snapshots with qemu-img check -r all\n")
                raise exc
            raise _trunc(i, entry_off, file_size)
        extra = buf[pos:pos + extra_size]
        pos += extra_size
        vm_state_size = vm_state
        disk_size = icount = None
        if extra_size >= 8:
            vm_state_size = struct.unpack_from(">Q", extra, 0)[0]
        if extra_size >= 16:
            disk_size = struct.unpack_from(">Q", extra, 8)[0]
        if extra_size >= 24:
            icount = struct.unpack_from(">Q", extra, 16)[0]
            if icount == C.SNAPSHOT_ICOUNT_UNKNOWN:
                icount = None
        sid = bytes(buf[pos:pos + id_size]).decode("utf-8", "surrogateescape")
        pos += id_size
        name = bytes(buf[pos:pos + name_size]).decode("utf-8", "surrogateescape")
        pos += name_size
        end = (pos + 7) & ~7
        out.append(Snapshot(i, l1_off, l1_size, sid, name, date_sec, date_nsec, clock,
                            vm_state_size, disk_size, icount, extra_size, entry_off,
                            bytes(extra), end - (entry_off - offset)))
    return out


def _trunc(i: int, off: int, file_size: int) -> CorruptImageError:
    return CorruptImageError(
        f"snapshot table entry {i} at offset {off:#x} extends past the end of the file "
        f"(size {file_size:#x})", offset=off, what="snapshot table entry")


def find_snapshot(snapshots: list[Snapshot], key: str | int) -> Snapshot | None:
    """Find by id first, then by name (as qemu-img convert -l does)."""
    key = str(key)
    for sn in snapshots:
        if sn.id == key:
            return sn
    for sn in snapshots:
        if sn.name == key:
            return sn
    return None


def pack_entry(sn: Snapshot, disk_size: int) -> bytes:
    """One table entry as QEMU's qcow2_write_snapshots writes it (no padding).

    The extra data is at least :data:`EXTRA_DATA_SIZE` bytes: the 64-bit VM state
    size, the disk size (``disk_size``, the image's, for older entries that had
    none) and icount (all ones when unknown); extra data beyond those fields is
    kept as read.  A VM state size that does not fit the 32-bit field is written as
    0 there, so that older readers see a disk-only snapshot rather than a
    truncated one."""
    sid = sn.id.encode("utf-8", "surrogateescape")
    name = sn.name.encode("utf-8", "surrogateescape")
    extra_size = max(EXTRA_DATA_SIZE, sn.extra_data_size)
    vm32 = sn.vm_state_size if sn.vm_state_size <= 0xFFFFFFFF else 0
    icount = C.SNAPSHOT_ICOUNT_UNKNOWN if sn.icount is None else sn.icount
    head = ENTRY_HEADER.pack(sn.l1_table_offset, sn.l1_size, len(sid), len(name), sn.date_sec,
                    sn.date_nsec, sn.vm_clock_nsec, vm32, extra_size)
    extra = EXTRA.pack(sn.vm_state_size,
                        disk_size if sn.disk_size is None else sn.disk_size, icount)
    unknown = bytes(sn.extra[EXTRA_DATA_SIZE:sn.extra_data_size])
    return head + extra + unknown + sid + name


def pack_table(snapshots: list[Snapshot], disk_size: int) -> bytes:
    """The whole table: entries at 8-byte aligned offsets, the last one unpadded (its
    length is the table size QEMU records)."""
    buf = bytearray()
    for sn in snapshots:
        buf.extend(bytes((-len(buf)) % 8))
        buf.extend(pack_entry(sn, disk_size))
    return bytes(buf)
