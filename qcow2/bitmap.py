"""Persistent dirty bitmaps (spec: "Bitmaps extension", "Bitmap directory", "Bitmap
table"): the directory and the bitmap tables, parsed and validated in one place.

* :func:`read_directory` parses the directory as ``qemu-img info`` lists it (only what
  is needed to walk it is checked);
* :func:`load_directory` parses it with every rule QEMU's ``bitmap_list_load`` and
  ``check_dir_entry`` apply (the check and untrusted mode use it), raising
  :class:`~qcow2.errors.CorruptImageError` for the first problem;
* :func:`table_problem` finds the first bad entry of a bitmap table (numpy);
* :func:`required_size` is the space a set of bitmaps takes in an image (measure).
"""

from __future__ import annotations

import struct

from . import constants as C
from .errors import CorruptImageError

_ENTRY = struct.Struct(">QIIBBHI")          # a directory entry's fixed part (24 bytes)


class BitmapEntry:
    """One bitmap directory entry (a plain class: see header.Header)."""

    __slots__ = ("index", "offset", "table_offset", "table_size", "flags", "type",
                 "granularity_bits", "name_size", "extra_data_size", "name", "size",
                 "granularity", "in_use")

    def __init__(self, index: int, offset: int, fields: tuple, name: bytes):
        self.index = index
        self.offset = offset                # file offset of the entry
        (self.table_offset, self.table_size, self.flags, self.type, self.granularity_bits,
         self.name_size, self.extra_data_size) = fields
        self.name = name                    # raw bytes, as stored
        #: bytes the entry takes in the directory, padding included
        self.size = (C.BME_ENTRY_SIZE + self.name_size + self.extra_data_size + 7) & ~7
        self.granularity = 1 << self.granularity_bits
        self.in_use = bool(self.flags & C.BME_FLAG_IN_USE)

    def label(self) -> str:
        """The name for messages (at most 64 characters)."""
        return self.name.decode("utf-8", "backslashreplace")[:64]

    def info(self) -> dict:
        """The bitmap as ``qemu-img info --output=json`` lists it."""
        flags = []
        if self.flags & C.BME_FLAG_IN_USE:
            flags.append("in-use")
        if self.flags & C.BME_FLAG_AUTO:
            flags.append("auto")
        return {"flags": flags, "name": self.name.decode("utf-8", "surrogateescape"),
                "granularity": self.granularity}

    def table_entries_needed(self, disk_size: int, cluster_size: int) -> int:
        """Bitmap table entries a disk of ``disk_size`` bytes needs at this granularity."""
        bits = (disk_size + self.granularity - 1) >> self.granularity_bits
        return (bits + 8 * cluster_size - 1) // (8 * cluster_size)


def _parse(buf, pos: int, index: int, dir_offset: int) -> BitmapEntry:
    """The entry at ``pos`` of the directory (``buf`` holds its fixed part)."""
    fields = _ENTRY.unpack_from(buf, pos)
    start = pos + C.BME_ENTRY_SIZE + fields[6]          # the name follows the extra data
    return BitmapEntry(index, dir_offset + pos, fields, bytes(buf[start:start + fields[5]]))


def read_directory(buf, dir_offset: int, count: int) -> list[BitmapEntry]:
    """The ``count`` entries of the directory in ``buf`` (read at ``dir_offset``), as
    ``qemu-img info`` lists them: only an entry overrunning the directory is refused."""
    out = []
    pos = 0
    for i in range(count):
        if pos + C.BME_ENTRY_SIZE <= len(buf):
            e = _parse(buf, pos, i, dir_offset)
            if pos + C.BME_ENTRY_SIZE + e.extra_data_size + e.name_size <= len(buf):
                out.append(e)
                pos += e.size
                continue
        raise CorruptImageError(f"bitmap directory entry {i} at {dir_offset + pos:#x} "
                                f"overruns the directory", offset=dir_offset + pos,
                                what="bitmap directory")
    return out


def _entry_error(e: BitmapEntry, text: str, field: int, size: int) -> CorruptImageError:
    where = e.offset + field
    return CorruptImageError(f"bitmap directory entry {e.index} at {e.offset:#x}: {text} "
                             f"(at offset {where:#x})", offset=where, size=size,
                             what="bitmap directory entry")


def entry_problem(e: BitmapEntry, cluster_size: int, disk_size: int, *,
                  directory: tuple[int, int] | None = None,
                  exact_size: bool = False) -> tuple[str, int, int] | None:
    """The first of QEMU's check_dir_entry rules the entry breaks, as (text, field
    offset in the entry, field size), or None.  ``directory`` (its offset and size)
    also refuses an entry running past its end; ``exact_size`` a bitmap not in use
    whose table is bigger than the disk needs (QEMU refuses only a smaller one)."""
    if e.extra_data_size != 0:
        return f"has {e.extra_data_size} bytes of extra data (not supported)", 20, 4
    if e.name_size > C.BME_MAX_NAME_SIZE:
        return f"name of {e.name_size} bytes exceeds {C.BME_MAX_NAME_SIZE}", 18, 2
    if directory is not None and e.offset + e.size > directory[0] + directory[1]:
        return (f"name of {e.name_size} bytes overruns the directory ({directory[1]} "
                f"bytes at {directory[0]:#x})", 18, 2)
    return _field_problem(e, cluster_size) or _size_problem(e, cluster_size, disk_size,
                                                            exact_size)


def _field_problem(e: BitmapEntry, cluster_size: int) -> tuple[str, int, int] | None:
    if e.flags & C.BME_RESERVED_FLAGS:
        return f"flags {e.flags:#x} have reserved bits set", 12, 4
    if e.type != C.BME_TYPE_DIRTY_TRACKING:
        return f"type {e.type} is not a dirty tracking bitmap (1)", 16, 1
    lo, hi = C.BME_MIN_GRANULARITY_BITS, C.BME_MAX_GRANULARITY_BITS
    if not lo <= e.granularity_bits <= hi:
        return f"granularity 2^{e.granularity_bits} is out of range (2^{lo}..2^{hi})", 17, 1
    if e.table_offset == 0 or e.table_offset & (cluster_size - 1):
        what = "zero" if e.table_offset == 0 else "not cluster-aligned"
        return f"bitmap table offset {e.table_offset:#x} is {what}", 0, 8
    return None


def _size_problem(e: BitmapEntry, cluster_size: int, disk_size: int,
                  exact: bool) -> tuple[str, int, int] | None:
    most = min(C.BME_MAX_TABLE_SIZE, C.BME_MAX_PHYS_SIZE // cluster_size)
    if e.table_size == 0 or e.table_size > most:
        return f"bitmap table size {e.table_size} is out of range (1..{most} entries)", 8, 4
    if not e.in_use:
        # a bitmap saved cleanly covers the disk (one in use may lag behind a resize:
        # QEMU does not load its data)
        want = e.table_entries_needed(disk_size, cluster_size)
        if e.table_size < want or (exact and e.table_size != want):
            return (f"bitmap table of {e.table_size} entries, but a disk of {disk_size} "
                    f"bytes at granularity 2^{e.granularity_bits} needs {want}", 8, 4)
    return None


def load_directory(buf, dir_offset: int, count: int, cluster_size: int, disk_size: int,
                   *, exact_size: bool = False,
                   count_offset: int | None = None) -> list[BitmapEntry]:
    """The directory in ``buf`` (``len(buf)`` bytes read at ``dir_offset``, ``count``
    entries as the header extension says, its field at ``count_offset``) with QEMU's
    bitmap_list_load rules; raises CorruptImageError naming the first problem and its
    offset."""
    size = len(buf)
    if size == 0 or size > C.MAX_BITMAP_DIRECTORY_SIZE:
        raise CorruptImageError(f"bitmap directory of {size} bytes at {dir_offset:#x} is "
                                f"empty or too big", offset=dir_offset, size=size,
                                what="bitmap directory")
    out: list[BitmapEntry] = []
    pos = 0
    while pos < size:
        at, i = dir_offset + pos, len(out)
        if pos + C.BME_ENTRY_SIZE > size:
            raise CorruptImageError(f"bitmap directory entry {i} at {at:#x} overruns the "
                                    f"directory ({size} bytes at {dir_offset:#x}) (at offset "
                                    f"{at:#x})", offset=at, size=size - pos,
                                    what="bitmap directory entry")
        if i + 1 > count:
            raise CorruptImageError(f"bitmap directory has more entries than the {count} "
                                    f"the header extension names (entry {i} at {at:#x}) (at "
                                    f"offset {at:#x})", offset=at, size=C.BME_ENTRY_SIZE,
                                    what="bitmap directory entry")
        e = _parse(buf, pos, i, dir_offset)
        problem = entry_problem(e, cluster_size, disk_size, directory=(dir_offset, size),
                                exact_size=exact_size)
        if problem is not None:
            raise _entry_error(e, *problem)
        out.append(e)
        pos += e.size
    if len(out) != count:
        at = dir_offset if count_offset is None else count_offset
        raise CorruptImageError(f"bitmap directory has {len(out)} entries, the header "
                                f"extension names {count} (at offset {at:#x})", offset=at,
                                size=4, what="header extension")
    return out


def table_problem(table, cluster_size: int, file_size: int | None = None):
    """The first bad entry of a bitmap table (native ``uint64`` numpy array) as (index,
    text), or None: reserved bits, a data cluster together with the all-ones flag, an
    unaligned data cluster and, given ``file_size``, one past the end of the file."""
    import numpy as np
    u = np.uint64
    off = table & u(C.BME_TABLE_OFFSET_MASK)
    has = off != 0
    checks = [
        ((table & u(C.BME_TABLE_RESERVED_MASK)) != 0, "has reserved bits set"),
        (has & ((table & u(C.BME_TABLE_ALL_ONES)) != 0),
         "has a data cluster and the all-ones flag"),
        (has & ((off & u(cluster_size - 1)) != 0), "points at an unaligned cluster"),
    ]
    if file_size is not None:
        checks.append((has & (off + u(cluster_size) > u(file_size)),
                       f"points past the end of the file (size {file_size:#x})"))
    for mask, text in checks:
        k = np.flatnonzero(mask)
        if len(k):
            return int(k[0]), text
    return None


def data_clusters(table):
    """(indices, host offsets) of a bitmap table's entries that name a data cluster."""
    import numpy as np
    off = table & np.uint64(C.BME_TABLE_OFFSET_MASK)
    k = np.flatnonzero(off)
    return k, off[k]


def required_size(disk_size: int, bitmaps, cluster_size: int) -> int:
    """Bytes that bitmaps (``(granularity, name)`` pairs) take in an image of
    ``cluster_size`` covering ``disk_size`` bytes: each fully allocated, its table, and
    its share of the directory (QEMU's qcow2_get_persistent_dirty_bitmap_size)."""
    total = 0
    dir_size = 0
    cs = cluster_size
    for granularity, name in bitmaps:
        bits = (disk_size + granularity - 1) // granularity
        clusters = ((bits + 7) // 8 + cs - 1) // cs
        total += clusters * cs
        total += (clusters * C.BME_TABLE_ENTRY_SIZE + cs - 1) // cs * cs
        name_len = len(name.encode("utf-8", "surrogateescape"))
        dir_size += (C.BME_ENTRY_SIZE + name_len + 7) & ~7
    return total + (dir_size + cs - 1) // cs * cs


def supports_persistent(fmt: str, header) -> bool:
    """QEMU's bdrv_supports_persistent_dirty_bitmap: a qcow2 version 3 image (``header``
    its parsed header, None for other formats)."""
    return fmt == "qcow2" and header is not None and header.version >= 3


__all__ = ["BitmapEntry", "read_directory", "load_directory", "entry_problem",
           "table_problem", "data_clusters", "required_size", "supports_persistent"]
