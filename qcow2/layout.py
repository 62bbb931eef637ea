"""Where a new qcow2 image's structures go, in closed form (compare QEMU's
``qcow2_calc_prealloc_size``), and what they hold.

Every piece is contiguous and in this order::

    header | refcount table | refcount blocks | L1 table | L2 tables | data clusters

L2 tables and data clusters exist only with preallocation (data clusters only without
an external data file).  Every cluster up to the end has refcount 1 and no other
cluster is allocated, so the refcount blocks are a repeated pattern.  For a small
image without preallocation this is exactly the file qemu-img writes (header at
cluster 0, refcount table at 1, refcount block at 2, L1 table at 3, the file ending
with the L1 table).  :func:`metadata_writes` yields the metadata in bounded chunks (at
most a few MiB in memory); without preallocation the L1 table and the header's tail
are left out: holes, which read as zeros.

The same arithmetic gives ``qemu-img measure``'s fully allocated size
(:func:`qcow2_prealloc_size`), without the limits ``create`` enforces.
"""

from __future__ import annotations

import struct

from . import constants as C
from .errors import ImageTooLargeError, InvalidOptionError
from .header import Header, pack_header
from .lightweight import record
from .units import ceil_div, round_up

CHUNK = 4 << 20                 # bytes of metadata per write


class Qcow2Layout(record("Qcow2Layout", (
        "cluster_bits refcount_order l2_entry_size l1_size l1_offset l1_clusters "
        "reftable_offset reftable_clusters refblock_offset refblocks l2_offset l2_tables "
        "data_offset data_clusters mapped_clusters total_clusters file_size"))):
    """Where everything goes; all offsets in bytes, counts in clusters (immutable).

    ``l1_size`` counts entries; ``l1_offset`` is 0 when l1_size is 0 (as QEMU writes
    it); ``data_clusters``: data clusters in the image file (0 with a data file);
    ``mapped_clusters``: guest clusters mapped by the L2 tables; ``total_clusters``:
    the clusters with refcount 1, [0, total_clusters)."""

    __slots__ = ()

    @property
    def cluster_size(self) -> int:
        return 1 << self.cluster_bits

    @property
    def refcounts_per_block(self) -> int:
        return (self.cluster_size * 8) >> self.refcount_order


def l2_entry_size(extended_l2: bool) -> int:
    return C.L2E_EXTENDED_SIZE if extended_l2 else C.L2E_SIZE


def l1_entries(size: int, cluster_size: int, extended_l2: bool = False) -> int:
    """L1 entries (= L2 tables) that map ``size`` guest bytes."""
    l2_span = (cluster_size // l2_entry_size(extended_l2)) * cluster_size
    return ceil_div(size, l2_span)


def refcount_clusters(clusters: int, cluster_size: int, refcount_order: int) -> tuple[int, int]:
    """(refcount blocks, refcount table clusters) that count ``clusters`` other
    clusters and themselves: the fixed point, as QEMU finds it."""
    per_block = (cluster_size * 8) >> refcount_order
    blocks = table = 0
    while True:
        nblocks = ceil_div(clusters + blocks + table, per_block)
        ntable = ceil_div(nblocks * C.REFTE_SIZE, cluster_size)
        if (nblocks, ntable) == (blocks, table):
            return blocks, table
        blocks, table = nblocks, ntable


def qcow2_prealloc_size(size: int, cluster_size: int, refcount_order: int,
                        extended_l2: bool = False) -> int:
    """Bytes of a qcow2 image of virtual ``size`` with every cluster allocated: header,
    L2 and L1 tables, refcount structures and data (QEMU's qcow2_calc_prealloc_size).

    This is the total of :func:`qcow2_layout` with ``preallocation="full"`` (the same
    fixed point), without the limits ``create`` enforces (measure reports sizes QEMU
    could never create, as qemu-img does).
    """
    cs = cluster_size
    data = ceil_div(size, cs)
    l2_tables = l1_entries(size, cs, extended_l2)
    l1_clusters = ceil_div(l2_tables * C.L1E_SIZE, cs)
    clusters = 1 + l2_tables + l1_clusters + data
    blocks, table = refcount_clusters(clusters, cs, refcount_order)
    return (clusters + blocks + table) * cs


def cow_end(size: int, cluster_bits: int, extended_l2: bool) -> int:
    """Where QEMU's preallocation stops writing: the end of the (sub)cluster holding
    the last guest byte (it copies-on-write zeros over the rest of that unit)."""
    return round_up(size, 1 << (cluster_bits - (5 if extended_l2 else 0)))


def qcow2_layout(size: int, cluster_bits: int, refcount_order: int = 4, *,
                 extended_l2: bool = False, preallocation: str = "off",
                 external_data: bool = False) -> Qcow2Layout:
    """The closed-form layout of a new image of virtual ``size`` (a multiple of 512).

    With preallocation every guest cluster is mapped (to the image file's data area,
    or 1:1 to the external data file).  The file ends where QEMU's would: after the L1
    entries without preallocation; with ``metadata`` at the end of the (sub)cluster
    holding the last guest byte (QEMU copies-on-write only up to there); with
    ``falloc``/``full`` after the last data cluster.

    Raises ImageTooLargeError when the image exceeds QEMU's limits (L1 table of 32 MiB,
    refcount table of 8 MiB, 56-bit host offsets).
    """
    preallocate = preallocation != "off"
    cs = 1 << cluster_bits
    l1_size = l1_entries(size, cs, extended_l2)
    if l1_size > C.MAX_L1_SIZE // C.L1E_SIZE:
        raise ImageTooLargeError(f"the L1 table would have {l1_size} entries, at most "
                                 f"{C.MAX_L1_SIZE // C.L1E_SIZE} are allowed")
    l1_clusters = ceil_div(l1_size * C.L1E_SIZE, cs)
    mapped = ceil_div(size, cs) if preallocate else 0
    l2_tables = l1_size if preallocate else 0
    data = 0 if external_data else mapped
    base = 1 + l1_clusters + l2_tables + data
    rb, rt = refcount_clusters(base, cs, refcount_order)
    if rt * cs > C.MAX_REFTABLE_SIZE:
        raise ImageTooLargeError(f"the refcount table would need {rt * cs} bytes, at most "
                                 f"{C.MAX_REFTABLE_SIZE} are allowed")
    rt_off = cs
    rb_off = rt_off + rt * cs
    l1_off = rb_off + rb * cs
    l2_off = l1_off + l1_clusters * cs
    data_off = l2_off + l2_tables * cs
    end = data_off + data * cs
    if end > C.L2E_OFFSET_MASK:
        raise ImageTooLargeError(f"host offsets would reach {end:#x}, beyond 56 bits")
    if preallocate and l2_tables:
        file_size = end
        if data and preallocation == "metadata":
            file_size = data_off + cow_end(size, cluster_bits, extended_l2)
    else:
        file_size = l1_off + l1_size * C.L1E_SIZE      # QEMU writes just the L1 entries
    return Qcow2Layout(cluster_bits=cluster_bits, refcount_order=refcount_order,
                       l2_entry_size=l2_entry_size(extended_l2), l1_size=l1_size,
                       l1_offset=l1_off if l1_size else 0, l1_clusters=l1_clusters,
                       reftable_offset=rt_off, reftable_clusters=rt, refblock_offset=rb_off,
                       refblocks=rb, l2_offset=l2_off, l2_tables=l2_tables,
                       data_offset=data_off, data_clusters=data, mapped_clusters=mapped,
                       total_clusters=base + rb + rt, file_size=file_size)


# -- content --------------------------------------------------------------------------

def qcow2_header(spec, layout: Qcow2Layout) -> Header:
    """The header of a new image: ``spec`` holds the checked options (version,
    cluster_bits, size, refcount_order, extended_l2, lazy_refcounts, compression_type,
    backing_file, backing_format, data_file, data_file_raw)."""
    incompat = 0
    if spec.data_file is not None:
        incompat |= C.INCOMPAT_DATA_FILE
    if spec.compression_type != C.COMPRESSION_ZLIB:
        incompat |= C.INCOMPAT_COMPRESSION
    if spec.extended_l2:
        incompat |= C.INCOMPAT_EXTL2
    return Header(
        version=spec.version, backing_file_offset=0, backing_file_size=0,
        cluster_bits=spec.cluster_bits, size=spec.size, header_size_field=spec.size,
        crypt_method=C.CRYPT_NONE, l1_size=layout.l1_size,
        l1_table_offset=layout.l1_offset, refcount_table_offset=layout.reftable_offset,
        refcount_table_clusters=layout.reftable_clusters, nb_snapshots=0,
        snapshots_offset=0, incompatible_features=incompat,
        compatible_features=C.COMPAT_LAZY_REFCOUNTS if spec.lazy_refcounts else 0,
        autoclear_features=C.AUTOCLEAR_DATA_FILE_RAW if spec.data_file_raw else 0,
        refcount_order=spec.refcount_order, header_length=0,
        compression_type=spec.compression_type, backing_file=spec.backing_file,
        backing_format=spec.backing_format, data_file=spec.data_file)


def qcow2_header_bytes(spec, layout: Qcow2Layout) -> bytes:
    """The first cluster's content (without its zero tail), as QEMU 7.2 writes it;
    InvalidOptionError with qemu-img's message when the backing file's name does not fit."""
    h = qcow2_header(spec, layout)
    if h.backing_file is not None:
        n = len(h.backing_file.encode("utf-8", "surrogateescape"))
        if n > C.MAX_BACKING_FILE_NAME:
            raise InvalidOptionError(
                f"Could not assign backing file '{h.backing_file}' with format "
                f"'{h.backing_format}': the name is {n} bytes long, at most "
                f"{C.MAX_BACKING_FILE_NAME} are allowed")
    try:
        return pack_header(h)
    except ValueError:
        raise InvalidOptionError(
            f"Could not assign backing file '{h.backing_file}' with format "
            f"'{h.backing_format}': the header, its extensions and the name need more than "
            f"one cluster ({layout.cluster_size} bytes): No space left on device") from None


def refblock(cs: int, order: int, used: int) -> bytes:
    """A refcount block whose first ``used`` entries are 1 (sub-byte widths LSB-first,
    as :func:`qcow2.refcount.encode_block` packs them; without numpy, which a small
    ``create`` never loads)."""
    bits = 1 << order
    if bits >= 8:
        one = (1).to_bytes(bits // 8, "big")
        body = one * used
    else:
        per_byte = 8 // bits
        full, part = divmod(used, per_byte)
        body = bytes([sum(1 << (i * bits) for i in range(per_byte))]) * full
        if part:
            body += bytes([sum(1 << (i * bits) for i in range(part))])
    return body + bytes(cs - len(body))


def _table_chunks(first_value: int, count: int, step: int, flags: int):
    """Big-endian 64-bit entries ``(first_value + i*step) | flags`` for i < count, in
    chunks: (index of the first entry, bytes)."""
    if count <= 8192:
        # small tables (every image without preallocation): no numpy import (start-up)
        yield 0, struct.pack(f">{count}Q", *(((first_value + i * step) | flags)
                                             for i in range(count)))
        return
    import numpy as np

    per = CHUNK // 8
    for start in range(0, count, per):
        n = min(per, count - start)
        vals = np.arange(start, start + n, dtype=np.uint64) * np.uint64(step)
        vals += np.uint64(first_value)
        if flags:
            vals |= np.uint64(flags)
        yield start, vals.astype(">u8").tobytes()


def _l2_tables(lay: Qcow2Layout, host_base: int):
    """(offset, bytes) of the L2 tables: every guest cluster mapped to ``host_base +
    index * cluster_size``, COPIED; an extended entry's subcluster bitmap stays 0, as
    QEMU preallocates (reads then come from the backing file or as zeros)."""
    import numpy as np

    cs = lay.cluster_size
    per_table = cs // lay.l2_entry_size
    tables_per_chunk = max(1, CHUNK // cs)
    ext = lay.l2_entry_size == C.L2E_EXTENDED_SIZE
    for t0 in range(0, lay.l2_tables, tables_per_chunk):
        nt = min(tables_per_chunk, lay.l2_tables - t0)
        g0 = t0 * per_table
        n = nt * per_table
        used = max(0, min(n, lay.mapped_clusters - g0))
        vals = np.zeros(n, dtype=np.uint64)
        if used:
            v = np.arange(g0, g0 + used, dtype=np.uint64) * np.uint64(cs)
            v += np.uint64(host_base)
            v |= np.uint64(C.OFLAG_COPIED)
            vals[:used] = v
        if ext:
            out = np.zeros(2 * n, dtype=">u8")
            out[0::2] = vals
        else:
            out = vals.astype(">u8")
        yield lay.l2_offset + t0 * cs, out.tobytes()


def _refblocks(lay: Qcow2Layout):
    """(offset, bytes) of the refcount blocks: [0, total_clusters) at refcount 1."""
    cs = lay.cluster_size
    per = lay.refcounts_per_block
    full_blocks = lay.total_clusters // per
    if full_blocks:
        batch = max(1, min(full_blocks, CHUNK // cs))
        buf = refblock(cs, lay.refcount_order, per) * batch
        for b in range(0, full_blocks, batch):
            n = min(batch, full_blocks - b)
            yield lay.refblock_offset + b * cs, memoryview(buf)[:n * cs]
    rest = lay.total_clusters - full_blocks * per
    if rest:
        yield lay.refblock_offset + full_blocks * cs, refblock(cs, lay.refcount_order, rest)


def metadata_writes(lay: Qcow2Layout, header: bytes, data_base: int):
    """(offset, bytes) of everything a new image's file holds but zeros: the header,
    the refcount structures and, with preallocation, the L1 and L2 tables mapping guest
    cluster i to ``data_base + i * cluster_size``."""
    cs = lay.cluster_size
    yield 0, header
    for i, chunk in _table_chunks(lay.refblock_offset, lay.refblocks, cs, 0):
        yield lay.reftable_offset + i * C.REFTE_SIZE, chunk
    yield from _refblocks(lay)
    if lay.l2_tables:
        for i, chunk in _table_chunks(lay.l2_offset, lay.l2_tables, cs, C.OFLAG_COPIED):
            yield lay.l1_offset + i * C.L1E_SIZE, chunk
        yield from _l2_tables(lay, data_base)


__all__ = ["Qcow2Layout", "qcow2_layout", "qcow2_prealloc_size", "l1_entries", "l2_entry_size",
           "refcount_clusters", "cow_end", "qcow2_header", "qcow2_header_bytes", "refblock",
           "metadata_writes", "CHUNK"]
