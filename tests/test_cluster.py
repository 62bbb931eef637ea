"""qcow2.cluster: the L1/L2 entry rules.

The scalar functions against hand-made entries and the spec; the batched entry point
(:class:`qcow2.cluster.L2Batch`) against the scalar one on random entries; and both
against the kernels' ``l2_runs`` (native and Python) on random tables, so that the
rule the check and untrusted mode apply cannot drift from the one the reads decode.
"""

from __future__ import annotations

import os
import struct

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from qcow2 import constants as C
from qcow2.cluster import (Geometry, L2Batch, cluster_type, compressed_entry,
                           compressed_extent, has_data, split_table, subcluster_type,
                           zeroed_bitmap)
from qcow2.errors import CorruptImageError

SETTINGS = settings(max_examples=int(os.environ.get("QCOW2_TEST_EXAMPLES", "200")),
                    deadline=None,
                    suppress_health_check=[HealthCheck.too_slow,
                                           HealthCheck.function_scoped_fixture])
U64 = (1 << 64) - 1




# -- geometry ---------------------------------------------------------------------------

@pytest.mark.parametrize("cbits", [9, 12, 16, 21])
@pytest.mark.parametrize("extended", [False, True])
def test_geometry(cbits, extended):
    g = Geometry(cbits, extended)
    cs = 1 << cbits
    assert g.cluster_size == cs
    assert g.l2_entry_size == (16 if extended else 8)
    assert g.l2_entries == cs // g.l2_entry_size == 1 << g.l2_bits
    assert 1 << g.l2_span_bits == g.l2_entries * cs
    assert g.subclusters * g.subcluster_size == cs
    guest = (5 << g.l2_span_bits) + (7 << cbits) + (3 << g.subcluster_bits) * extended + 1
    assert g.l1_index(guest) == 5
    assert g.l2_index(guest) == 7
    assert g.subcluster_index(guest) == (3 if extended else 0)
    assert g.l1_entries(0) == 0
    assert g.l1_entries(1) == 1
    assert g.l1_entries(1 << g.l2_span_bits) == 1
    assert g.l1_entries((1 << g.l2_span_bits) + 1) == 2


def test_geometry_of_header(tmp_path):
    import qcow2
    p = tmp_path / "a.qcow2"
    qcow2.create(str(p), 1 << 30, cluster_size=16384, extended_l2=True)
    with qcow2.open(str(p)) as img:
        g = Geometry.of(img.header)
        assert (g.cluster_bits, g.extended) == (14, True)
        assert g.l2_entries == 1 << img.header.l2_bits
        assert g.l1_entries(img.size) == img.header.l1_entries_needed()


# -- one entry --------------------------------------------------------------------------

OFF = 0x50000


@pytest.mark.parametrize("entry, extended, data_file, kind", [
    (0, False, False, C.KIND_UNALLOC),
    (C.OFLAG_COPIED, False, False, C.KIND_UNALLOC),
    (C.OFLAG_COPIED, False, True, C.KIND_DATA),           # data file offset 0
    (OFF, False, False, C.KIND_DATA),
    (OFF | C.OFLAG_COPIED, False, False, C.KIND_DATA),
    (C.OFLAG_ZERO, False, False, C.KIND_ZERO),
    (OFF | C.OFLAG_ZERO, False, False, C.KIND_ZERO_ALLOC),
    (C.OFLAG_ZERO, True, False, C.KIND_UNALLOC),           # bit 0 means nothing here
    (OFF | C.OFLAG_ZERO, True, False, C.KIND_DATA),
    (C.OFLAG_COMPRESSED | 0x1234, False, False, C.KIND_COMPRESSED),
    (C.OFLAG_COMPRESSED | C.OFLAG_ZERO, False, False, C.KIND_COMPRESSED),
])
def test_cluster_type(entry, extended, data_file, kind):
    assert cluster_type(entry, extended=extended, data_file=data_file) == kind
    b = L2Batch(np.array([entry], np.uint64), extended=extended, data_file=data_file)
    assert b.types().tolist() == [kind]


def test_subcluster_type():
    bm = (1 << 0) | (1 << 1) | (1 << (32 + 1)) | (1 << (32 + 2))
    kinds = [subcluster_type(OFF, bm, i, extended=True) for i in range(4)]
    assert kinds == [C.KIND_DATA, C.KIND_ZERO_ALLOC, C.KIND_ZERO_ALLOC, C.KIND_UNALLOC_ALLOC]
    kinds = [subcluster_type(0, bm & ~3, i, extended=True) for i in range(4)]
    assert kinds == [C.KIND_UNALLOC, C.KIND_ZERO, C.KIND_ZERO, C.KIND_UNALLOC]
    assert subcluster_type(OFF | C.OFLAG_ZERO, 0, 5) == C.KIND_ZERO_ALLOC
    assert has_data(OFF, 0) and not has_data(OFF | C.OFLAG_ZERO, 0)
    assert has_data(OFF, 1, extended=True) and not has_data(OFF, 1 << 32, extended=True)


@pytest.mark.parametrize("cbits", [9, 12, 16, 21])
def test_compressed_descriptor(cbits):
    shift = 62 - (cbits - 8)
    # two sectors from 0x12345 (QEMU: sectors beyond the first in the count field)
    e = C.OFLAG_COMPRESSED | (1 << shift) | 0x12345
    coff, length, start, nbytes = compressed_extent(e, cbits)
    assert (coff, start, nbytes) == (0x12345, 0x12200, 1024)
    assert length == 1024 - 0x145
    # the encoder writes the sectors the data touches
    for host, n in ((0x12345, 100), (0x12200, 512), (0x123FF, 2), (1 << 40, 1 << cbits)):
        e = compressed_entry(host, n, cbits)
        coff, length, start, nbytes = compressed_extent(e, cbits)
        assert coff == host and length >= n and start + nbytes >= host + n
        assert nbytes - 512 < (host - start) + n       # no sector too many
        assert cluster_type(e) == C.KIND_COMPRESSED


def test_zeroed_bitmap():
    assert zeroed_bitmap(0) == 0
    assert zeroed_bitmap(0b101) == 0b101 << 32
    assert zeroed_bitmap((0b11 << 32) | 0b100) == 0b111 << 32
    assert zeroed_bitmap(U64) == 0xFFFFFFFF << 32


def test_split_table():
    t = np.arange(8, dtype=np.uint64).reshape(2, 4)
    e, b = split_table(t, True)
    assert e.tolist() == [[0, 2], [4, 6]] and b.tolist() == [[1, 3], [5, 7]]
    e, b = split_table(t, False)
    assert e is t and b is None


# -- random entries ---------------------------------------------------------------------

def _entries(cbits: int):
    """Interesting L2 descriptors for clusters of 2**cbits bytes."""
    cs = 1 << cbits
    shift = 62 - (cbits - 8)
    flags = st.sampled_from([0, C.OFLAG_COPIED])
    standard = st.builds(
        lambda host, low, zero, copied, reserved: (host * cs) | low | zero | copied | reserved,
        st.integers(0, (1 << (56 - cbits)) - 1) | st.integers(0, 64),
        st.just(0) | st.integers(0, cs - 1).map(lambda v: v & ~1 & ~511) |
        st.integers(1, 255).map(lambda v: v << 1),
        st.sampled_from([0, C.OFLAG_ZERO]), flags,
        st.just(0) | st.integers(1, 63).map(lambda v: v << 56))
    compressed = st.builds(
        lambda coff, nsec, copied: C.OFLAG_COMPRESSED | copied | (nsec << shift) | coff,
        st.integers(0, (1 << shift) - 1), st.integers(0, (1 << (cbits - 8)) - 1), flags)
    return st.just(0) | standard | compressed | st.integers(0, U64)


_BITMAPS = (st.just(0) | st.just(0xFFFFFFFF) | st.just(0xFFFFFFFF << 32) |
            st.integers(0, 0xFFFFFFFF) | st.integers(0, 0xFFFFFFFF).map(lambda v: v << 32) |
            st.integers(0, U64))


@st.composite
def tables(draw):
    cbits = draw(st.integers(9, 21))
    extended = draw(st.booleans()) and cbits >= 14       # QEMU: >= 16 KiB clusters
    n = draw(st.integers(1, 24))
    entries = draw(st.lists(_entries(cbits), min_size=n, max_size=n))
    bitmaps = draw(st.lists(_BITMAPS, min_size=n, max_size=n)) if extended else None
    return cbits, extended, draw(st.booleans()), entries, bitmaps


def _batch(entries, bitmaps, extended, data_file):
    e = np.array(entries, dtype=np.uint64)
    b = np.array(bitmaps, dtype=np.uint64) if bitmaps is not None else None
    return L2Batch(e, b, extended=extended, data_file=data_file)


@SETTINGS
@given(tables())
def test_batch_matches_scalar(t):
    cbits, extended, data_file, entries, bitmaps = t
    cs = 1 << cbits
    b = _batch(entries, bitmaps, extended, data_file)
    kinds = b.types().tolist()
    coff, clen, start, nbytes = b.compressed_extents(cbits)
    for k, e in enumerate(entries):
        bm = bitmaps[k] if bitmaps is not None else 0
        kind = cluster_type(e, extended=extended, data_file=data_file)
        assert kinds[k] == kind
        alloc = kind in (C.KIND_DATA, C.KIND_ZERO_ALLOC)
        assert b.allocated[k] == alloc
        assert b.compressed[k] == (kind == C.KIND_COMPRESSED)
        assert b.unallocated[k] == (kind == C.KIND_UNALLOC)
        assert b.zero_plain[k] == (kind == C.KIND_ZERO)
        assert b.has_data()[k] == has_data(e, bm, extended=extended)
        if kind == C.KIND_COMPRESSED:
            assert (int(coff[k]), int(clen[k]), int(start[k]), int(nbytes[k])) == \
                compressed_extent(e, cbits)
        else:
            assert int(b.offset[k]) == e & C.L2E_OFFSET_MASK
        lo, hi = bm & 0xFFFFFFFF, bm >> 32
        assert b.bitmap_conflict()[k] == (alloc and bool(lo & hi))
        assert b.bitmap_unallocated()[k] == (kind == C.KIND_UNALLOC and bool(lo))
        assert b.unaligned(cs)[k] == (alloc and bool(e & C.L2E_OFFSET_MASK & (cs - 1)))
        assert b.reserved()[k] == (kind != C.KIND_COMPRESSED and
                                   bool(e & C.L2E_STD_RESERVED_MASK))


# -- against the kernels ----------------------------------------------------------------

def _expected_error(b: L2Batch, cs: int, strict: bool):
    """(index, what) of the first entry the kernels refuse, by this module's rules
    (reserved bits only in strict mode, what QEMU's reads refuse)."""
    none = np.zeros(len(b.entry), bool)
    checks = [(b.reserved(strict=True) if strict else none, "reserved"),
              (b.bitmap_conflict() | b.bitmap_unallocated(), "bitmap"),
              (b.unaligned(cs), "unaligned")]
    bad = np.zeros(len(b.entry), bool)
    for mask, _ in checks:
        bad |= mask
    if not bad.any():
        return None
    k = int(np.argmax(bad))
    return k, next(what for mask, what in checks if mask[k])


def _units(entries, bitmaps, cbits, extended, data_file):
    """(kind, host, compressed size) of every unit (subcluster or cluster)."""
    g = Geometry(cbits, extended)
    out = []
    for k, e in enumerate(entries):
        bm = bitmaps[k] if extended else 0
        for sc in range(g.subclusters):
            kind = subcluster_type(e, bm, sc, extended=extended, data_file=data_file)
            host = csize = 0
            if kind == C.KIND_COMPRESSED:
                host, csize = compressed_extent(e, cbits)[:2]
            elif kind in (C.KIND_DATA, C.KIND_ZERO_ALLOC, C.KIND_UNALLOC_ALLOC):
                host = (e & C.L2E_OFFSET_MASK) + sc * g.subcluster_size
            out.append((kind, host, csize))
    return out


def _runs_to_units(runs, cbits, extended):
    g = Geometry(cbits, extended)
    out = []
    for kind, _start, length, host, csize in zip(*runs, strict=True):
        for u in range(length):
            if kind in (C.KIND_DATA, C.KIND_ZERO_ALLOC, C.KIND_UNALLOC_ALLOC):
                out.append((kind, host + u * g.subcluster_size, 0))
            elif kind == C.KIND_COMPRESSED:
                out.append((kind, host, csize))
            else:
                out.append((kind, 0, 0))
    return out


def _clean(t, strict):
    """The table with every entry the kernels would refuse cleared (so that long
    tables reach the run decoder too)."""
    cbits, extended, data_file, entries, bitmaps = t
    b = _batch(entries, bitmaps, extended, data_file)
    bad = b.bitmap_conflict() | b.bitmap_unallocated() | b.unaligned(1 << cbits)
    if strict:
        bad |= b.reserved(strict=True)
    entries = [0 if bad[k] else e for k, e in enumerate(entries)]
    if bitmaps is not None:
        bitmaps = [0 if bad[k] else m for k, m in enumerate(bitmaps)]
    return cbits, extended, data_file, entries, bitmaps


@SETTINGS
@given(tables(), st.booleans(), st.booleans())
def test_batch_matches_kernels(impl, t, strict, clean):
    if clean:
        t = _clean(t, strict)
    cbits, extended, data_file, entries, bitmaps = t
    cs = 1 << cbits
    if extended:
        raw = b"".join(struct.pack(">QQ", e, m) for e, m in zip(entries, bitmaps, strict=True))
    else:
        raw = b"".join(struct.pack(">Q", e) for e in entries)
    b = _batch(entries, bitmaps, extended, data_file)
    want = _expected_error(b, cs, strict)
    table_offset = 0x7000
    try:
        runs = impl.l2_runs(raw, 0, len(entries), cluster_bits=cbits, extended=extended,
                            data_file=data_file, strict=strict, table_offset=table_offset)
    except CorruptImageError as exc:
        assert want is not None, str(exc)
        k, what = want
        assert exc.offset == table_offset + k * (16 if extended else 8)
        text = {"reserved": ("reserved bits", "nonzero subcluster bitmap"),
                "bitmap": ("invalid subcluster bitmap",), "unaligned": ("unaligned",)}[what]
        assert any(s in str(exc) for s in text), (what, str(exc))
        return
    assert want is None
    assert _runs_to_units(runs, cbits, extended) == \
        _units(entries, bitmaps, cbits, extended, data_file)


# -- L2Batch on whole tables ------------------------------------------------------------

def test_batch_on_table_shapes():
    """The batch works on (tables, entries) arrays as the check passes them."""
    words = np.zeros((2, 8), np.uint64)
    words[0, 0] = OFF | C.OFLAG_COPIED
    words[1, 2] = C.OFLAG_ZERO
    e, bm = split_table(words, True)
    b = L2Batch(e, bm, extended=True)
    assert b.types().tolist() == [[C.KIND_DATA, 0, 0, 0], [0, 0, 0, 0]]
    assert b.zero_bit().tolist() == [[False] * 4, [False, True, False, False]]
    assert b.reserved(strict=True)[1, 1] and not b.reserved()[1, 1]
