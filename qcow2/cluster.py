"""Guest to host cluster mapping: the L1/L2 entry rules (spec: "Cluster mapping",
"Extended L2 Entries", "Compressed Clusters Descriptor").

The one Python home of these rules.  :class:`Geometry` holds the sizes that follow from
``cluster_bits`` and extended L2 entries.  Every entry rule has two entry points:

* a scalar one for one entry (``int`` in, ``int`` out): :func:`cluster_type`,
  :func:`subcluster_type`, :func:`has_data`, :func:`compressed_extent`,
  :func:`compressed_entry`;
* a batched one for whole tables at once (numpy ``uint64`` arrays): :class:`L2Batch`,
  whose masks say the same as the scalar functions entry by entry (a test holds them
  equal, and equal to the kernels' ``l2_runs``, native and Python, which decode the same
  rules for the read path).

Cluster and subcluster types use the kernels' vocabulary (``constants.KIND_*``), which
is QEMU's: ``KIND_UNALLOC`` (QCOW2_CLUSTER_UNALLOCATED, or the subcluster type
UNALLOCATED_PLAIN), ``KIND_UNALLOC_ALLOC`` (subclusters only: the cluster is allocated,
the subcluster not), ``KIND_ZERO`` (ZERO_PLAIN), ``KIND_ZERO_ALLOC``, ``KIND_DATA``
(NORMAL) and ``KIND_COMPRESSED``.
"""

from __future__ import annotations

from . import constants as C

_U64_MASK = (1 << 64) - 1


# ---------------------------------------------------------------------------
# geometry
# ---------------------------------------------------------------------------

class Geometry:
    """Sizes that follow from the cluster size and the L2 entry width."""

    __slots__ = ("cluster_bits", "extended", "cluster_size", "l2_entry_size", "l2_bits",
                 "l2_entries", "l2_span_bits", "subclusters", "subcluster_bits",
                 "subcluster_size", "csize_shift", "csize_mask", "coffset_mask")

    def __init__(self, cluster_bits: int, extended: bool = False):
        self.cluster_bits = cluster_bits
        self.extended = bool(extended)
        self.cluster_size = 1 << cluster_bits
        self.l2_entry_size = 16 if extended else C.L1E_SIZE
        #: log2 of the entries of one L2 table (one cluster)
        self.l2_bits = cluster_bits - (4 if extended else 3)
        self.l2_entries = 1 << self.l2_bits
        #: log2 of the guest bytes one L2 table maps
        self.l2_span_bits = cluster_bits + self.l2_bits
        self.subclusters = C.SUBCLUSTERS_PER_CLUSTER if extended else 1
        self.subcluster_bits = cluster_bits - (5 if extended else 0)
        self.subcluster_size = 1 << self.subcluster_bits
        # "Compressed Clusters Descriptor": x = 62 - (cluster_bits - 8) offset bits,
        # then the number of additional 512-byte sectors
        self.csize_shift = C.L2E_COMPRESSED_FIELD_BITS - (cluster_bits - 8)
        self.csize_mask = (1 << (cluster_bits - 8)) - 1
        self.coffset_mask = (1 << self.csize_shift) - 1

    @classmethod
    def of(cls, header) -> "Geometry":
        return cls(header.cluster_bits, header.extended_l2)

    def __repr__(self) -> str:
        return f"Geometry(cluster_bits={self.cluster_bits}, extended={self.extended})"

    def l1_index(self, guest_offset: int) -> int:
        return guest_offset >> self.l2_span_bits

    def l2_index(self, guest_offset: int) -> int:
        return (guest_offset >> self.cluster_bits) & (self.l2_entries - 1)

    def subcluster_index(self, guest_offset: int) -> int:
        return (guest_offset >> self.subcluster_bits) & (self.subclusters - 1)

    def l1_entries(self, size: int) -> int:
        """L1 entries needed to map ``size`` guest bytes (QEMU's size_to_l1)."""
        return (size + (1 << self.l2_span_bits) - 1) >> self.l2_span_bits


# ---------------------------------------------------------------------------
# one entry
# ---------------------------------------------------------------------------

def cluster_type(entry: int, *, extended: bool = False, data_file: bool = False) -> int:
    """QEMU's qcow2_get_cluster_type for one L2 descriptor, as a ``KIND_*`` value.

    Bit 0 makes a cluster read as zeros only without extended L2 entries; with an
    external data file an entry with only the COPIED flag maps the data file's cluster
    at offset 0."""
    if entry & C.OFLAG_COMPRESSED:
        return C.KIND_COMPRESSED
    off = entry & C.L2E_OFFSET_MASK
    if not extended and entry & C.OFLAG_ZERO:
        return C.KIND_ZERO_ALLOC if off else C.KIND_ZERO
    if off or (data_file and entry & C.OFLAG_COPIED):
        return C.KIND_DATA
    return C.KIND_UNALLOC


def subcluster_type(entry: int, bitmap: int, index: int, *, extended: bool = False,
                    data_file: bool = False) -> int:
    """The ``KIND_*`` of subcluster ``index`` of an entry (the cluster's type without
    extended L2 entries); a zero bit wins over an allocation bit, as the read path
    decodes it."""
    kind = cluster_type(entry, extended=extended, data_file=data_file)
    if not extended or kind == C.KIND_COMPRESSED:
        return kind
    zero = (bitmap >> (C.L2_BITMAP_ZERO_SHIFT + index)) & 1
    if kind == C.KIND_DATA:
        if zero:
            return C.KIND_ZERO_ALLOC
        return C.KIND_DATA if (bitmap >> index) & 1 else C.KIND_UNALLOC_ALLOC
    return C.KIND_ZERO if zero else C.KIND_UNALLOC


def has_data(entry: int, bitmap: int, *, extended: bool = False) -> bool:
    """Whether an allocated cluster holds data (QEMU's check: some subcluster is
    allocated, or, without subclusters, the zero flag is clear)."""
    if extended:
        return bool(bitmap & C.L2_BITMAP_ALLOC_MASK)
    return not entry & C.OFLAG_ZERO


def compressed_extent(entry: int, cluster_bits: int) -> tuple[int, int, int, int]:
    """Decode a compressed cluster descriptor: (data offset, data length as QEMU reads
    it, first 512-byte sector start, bytes of the sectors it touches -- what its
    references cover)."""
    shift = C.L2E_COMPRESSED_FIELD_BITS - (cluster_bits - 8)
    coff = entry & ((1 << shift) - 1)
    nbytes = (((entry >> shift) & ((1 << (cluster_bits - 8)) - 1)) + 1) \
        * C.COMPRESSED_SECTOR_SIZE
    start = coff & ~(C.COMPRESSED_SECTOR_SIZE - 1)
    return coff, nbytes - (coff - start), start, nbytes


def compressed_entry(host: int, length: int, cluster_bits: int) -> int:
    """The descriptor of ``length`` compressed bytes at ``host`` (the inverse of
    :func:`compressed_extent`: the sector count covers the last byte's sector)."""
    sector = C.COMPRESSED_SECTOR_SIZE.bit_length() - 1
    extra = ((host + length - 1) >> sector) - (host >> sector)
    shift = C.L2E_COMPRESSED_FIELD_BITS - (cluster_bits - 8)
    return C.OFLAG_COMPRESSED | (extra << shift) | host


def zeroed_bitmap(bitmap: int) -> int:
    """An extended entry's bitmap with every allocated subcluster turned into a zero
    one (nothing allocated any more)."""
    zeros = bitmap | (bitmap << C.L2_BITMAP_ZERO_SHIFT)
    return zeros & (C.L2_BITMAP_ALLOC_MASK << C.L2_BITMAP_ZERO_SHIFT) & _U64_MASK


# ---------------------------------------------------------------------------
# whole tables (numpy)
# ---------------------------------------------------------------------------

def split_table(words, extended: bool):
    """(entries, bitmaps) of L2 tables given as native ``uint64`` words (any shape
    whose last axis is a whole table or run of entries); bitmaps is None without
    extended L2 entries."""
    if extended:
        return words[..., 0::2], words[..., 1::2]
    return words, None


class L2Batch:
    """A batch of L2 entries classified at once (``uint64`` arrays of one shape).

    The masks say, entry by entry, what :func:`cluster_type` and the predicates above
    say for one entry: ``compressed``, ``normal`` (KIND_DATA), ``zero_alloc``,
    ``zero_plain``, ``unallocated`` and ``allocated`` (normal or zero_alloc: a host
    cluster is in use); ``offset`` is the standard descriptor's host offset.  The
    problem masks (methods) are computed on demand."""

    __slots__ = ("entry", "bitmap", "extended", "data_file", "compressed", "standard",
                 "offset", "zero", "normal", "zero_alloc", "unallocated", "allocated",
                 "_np")

    def __init__(self, entry, bitmap=None, *, extended: bool = False,
                 data_file: bool = False):
        import numpy as np
        self._np = np
        u = np.uint64
        self.entry = entry
        self.bitmap = bitmap if bitmap is not None else np.zeros(entry.shape, u)
        self.extended = bool(extended)
        self.data_file = bool(data_file)
        self.compressed = (entry & u(C.OFLAG_COMPRESSED)) != 0
        self.standard = ~self.compressed
        self.offset = entry & u(C.L2E_OFFSET_MASK)
        has_off = self.offset != 0
        if self.extended:
            self.zero = np.zeros(entry.shape, bool)
        else:
            self.zero = self.standard & ((entry & u(C.OFLAG_ZERO)) != 0)
        plain = self.standard & ~self.zero
        normal = plain & has_off
        if self.data_file:
            normal |= plain & ((entry & u(C.OFLAG_COPIED)) != 0)
        self.normal = normal
        self.zero_alloc = self.zero & has_off
        self.unallocated = plain & ~normal
        self.allocated = normal | self.zero_alloc

    @property
    def zero_plain(self):
        return self.zero & (self.offset == 0)

    def types(self):
        """The ``KIND_*`` of every entry (uint8), as :func:`cluster_type`."""
        np = self._np
        kind = np.full(self.entry.shape, C.KIND_UNALLOC, np.uint8)
        kind[self.zero_plain] = C.KIND_ZERO
        kind[self.zero_alloc] = C.KIND_ZERO_ALLOC
        kind[self.normal] = C.KIND_DATA
        kind[self.compressed] = C.KIND_COMPRESSED
        return kind

    # -- flags and reserved bits ------------------------------------------------------
    def zero_bit(self):
        """Standard entries with bit 0 set (whatever it means for this image)."""
        return self.standard & ((self.entry & self._np.uint64(C.OFLAG_ZERO)) != 0)

    def reserved(self, *, strict: bool = False):
        """Standard entries with reserved bits set; ``strict`` also counts bit 0 of an
        extended entry and a compressed entry's nonzero bitmap (the kernels' strict
        mode, what QEMU's reads refuse)."""
        u = self._np.uint64
        bad = self.standard & ((self.entry & u(C.L2E_STD_RESERVED_MASK)) != 0)
        if strict and self.extended:
            bad |= self.zero_bit() | self.compressed_with_bitmap()
        return bad

    def copied_compressed(self):
        """Compressed entries with the COPIED flag (which they never carry)."""
        return self.compressed & ((self.entry & self._np.uint64(C.OFLAG_COPIED)) != 0)

    def compressed_with_bitmap(self):
        """Compressed entries whose subcluster bitmap is not zero."""
        return self.compressed & (self.bitmap != 0)

    # -- subcluster bitmaps ----------------------------------------------------------
    def alloc_bits(self):
        """The allocation half of every bitmap (zero without extended entries)."""
        return self.bitmap & self._np.uint64(C.L2_BITMAP_ALLOC_MASK)

    def both_bits(self):
        """Standard entries with a subcluster both allocated and zero."""
        u = self._np.uint64
        both = self.alloc_bits() & (self.bitmap >> u(C.L2_BITMAP_ZERO_SHIFT))
        return self.standard & (both != 0)

    def bitmap_conflict(self):
        """Allocated clusters with a subcluster both allocated and zero."""
        return self.allocated & self.both_bits()

    def bitmap_unallocated(self):
        """Unallocated clusters with allocated subclusters."""
        return self.unallocated & (self.alloc_bits() != 0)

    def has_data(self):
        """As :func:`has_data`, for every entry."""
        if self.extended:
            return self.alloc_bits() != 0
        return (self.entry & self._np.uint64(C.OFLAG_ZERO)) == 0

    # -- host offsets ----------------------------------------------------------------
    def unaligned(self, cluster_size: int):
        """Allocated clusters whose host offset is not cluster-aligned."""
        return self.allocated & ((self.offset & self._np.uint64(cluster_size - 1)) != 0)

    def compressed_extents(self, cluster_bits: int):
        """As :func:`compressed_extent` for every entry (meaningful where
        ``compressed``): (data offset, data length, first sector start, bytes of the
        sectors touched)."""
        u = self._np.uint64
        g = Geometry(cluster_bits)
        coff = self.entry & u(g.coffset_mask)
        nbytes = (((self.entry >> u(g.csize_shift)) & u(g.csize_mask)) + u(1)) \
            * u(C.COMPRESSED_SECTOR_SIZE)
        start = coff & ~u(C.COMPRESSED_SECTOR_SIZE - 1)
        return coff, nbytes - (coff - start), start, nbytes


__all__ = ["Geometry", "cluster_type", "subcluster_type", "has_data", "compressed_extent",
           "compressed_entry", "zeroed_bitmap", "split_table", "L2Batch"]
