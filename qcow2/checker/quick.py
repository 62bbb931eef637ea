"""The quick check: a consistent image proved consistent without numpy.

Most images a check sees are fine, and on those the check's cost was mostly its
start (numpy's import alone is slower than ``qemu-img check`` of a 16 TiB image with
scattered writes).  :func:`quick_check` counts the same references as the general
check (:mod:`qcow2.checker.run`) -- the header cluster, the active L1 table, each L2
table, each cluster its entries use, the refcount table and blocks -- with the native
kernels of ``native/check.c``, compares them with the stored refcounts and checks the
COPIED flags.  It only answers when there is nothing to report: at the first thing
the general check would say anything about, or for an image with snapshots, bitmaps,
encryption, extended L2 entries, an external data file or refcounts narrower than 8
bits, it returns None and the general check runs from the start.  So its answer is
the general check's answer: no message, the same counts.  Read-only checks only."""

from __future__ import annotations

import os
import struct

from .. import constants as C
from .file import CheckedFile, read_header
from .result import CheckResult, memory_budget

#: bytes of L2 tables read at once
BATCH_BYTES = 2 << 20
#: allocated L2 entries recorded for the COPIED check (8 bytes each); with more, the
#: tables are read a second time
RECORD = 1 << 18


class _Bail(Exception):
    """Something to report: the general check takes over."""


def _native():
    if os.environ.get("QCOW2_IMPL", "auto") == "python":
        return None
    try:
        from .. import _native
    except ImportError:
        return None
    if not hasattr(_native.lib, "qcow2c_compare"):
        return None
    return _native.ffi, _native.lib


def quick_check(f: CheckedFile) -> CheckResult | None:
    """The result of a read-only check of ``f`` when the image is consistent and of a
    layout the quick check knows; None when the general check must run."""
    nat = _native()
    if nat is None:
        return None
    try:
        return _Quick(f, *nat).run()
    except Exception:       # _Bail, or anything else: the general check says what it is
        return None


class _Quick:
    def __init__(self, f: CheckedFile, ffi, lib):
        self.f, self.ffi, self.lib = f, ffi, lib
        self.h = h = read_header(f)
        if (h.extended_l2 or h.has_data_file or h.bitmaps_ext is not None
                or h.crypto_header is not None or h.nb_snapshots or h.refcount_bits < 8
                or h.snapshots_offset & (h.cluster_size - 1)
                or h.snapshots_offset > C.INT64_MAX):
            raise _Bail
        self.cs, self.cbits, self.bits = h.cluster_size, h.cluster_bits, h.refcount_bits
        self.width = self.bits // 8
        self.rmax = (1 << self.bits) - 1
        self.nb = nb = (f.size + self.cs - 1) // self.cs
        if nb > C.INT_MAX or nb * (2 * self.width + 1) > memory_budget():
            raise _Bail
        self.buf = bytearray(nb * self.width)
        self.imrt = memoryview(self.buf).cast({1: "B", 2: "H", 4: "I", 8: "Q"}[self.width])

    def inc(self, offset: int, size: int) -> None:
        """One reference to each cluster of a range (a range past the end: bail)."""
        if size <= 0:
            return
        if offset + size - self.f.size >= self.cs:
            raise _Bail
        for k in range(offset >> self.cbits, ((offset + size - 1) >> self.cbits) + 1):
            if k >= self.nb or (self.bits < 64 and self.imrt[k] >= self.rmax):
                raise _Bail
            self.imrt[k] += 1

    def run(self) -> CheckResult:
        h, f, cs = self.h, self.f, self.cs
        res = CheckResult(total_clusters=(h.size + cs - 1) // cs)
        self.inc(0, cs)
        l1 = []
        if h.l1_size:
            self.inc(h.l1_table_offset, h.l1_size * 8)
            l1 = struct.unpack(f">{h.l1_size}Q", f.read(h.l1_size * 8, h.l1_table_offset))
        tables = [(i, e & C.L1E_OFFSET_MASK) for i, e in enumerate(l1) if e]
        imrt, cbits, rmax = self.imrt, self.cbits, self.rmax
        for i, t in tables:        # each L2 table: one cluster in the file
            if not t or t & (cs - 1) or t >= f.size or l1[i] & C.L1E_RESERVED_MASK:
                raise _Bail
            k = t >> cbits
            if self.bits < 64 and imrt[k] >= rmax:
                raise _Bail
            imrt[k] += 1
        self.count_tables([t for _i, t in tables], res)
        self.inc(h.refcount_table_offset, h.refcount_table_clusters * cs)
        reftable = struct.unpack(f">{h.refcount_table_clusters * cs // 8}Q",
                                 f.read(h.refcount_table_clusters * cs, h.refcount_table_offset))
        self.count_blocks(reftable)
        res.image_end_offset = (self.compare(reftable) + 1) * cs
        for i, t in tables:
            if (self.imrt[t >> self.cbits] == 1) != bool(l1[i] & C.OFLAG_COPIED):
                raise _Bail
        self.copied([t for _i, t in tables])
        return res

    def batches(self, offsets: list[int]):
        """(offsets, on-disk bytes) of a batch of L2 tables at a time (one buffer,
        reused; zeros past the end of the file)."""
        cs = self.cs
        per = max(1, BATCH_BYTES // cs)
        buf = bytearray(min(per, len(offsets)) * cs)
        mv = memoryview(buf)
        for a in range(0, len(offsets), per):
            offs = offsets[a:a + per]
            t = 0
            while t < len(offs):
                u = t + 1
                while u < len(offs) and offs[u] == offs[u - 1] + cs:
                    u += 1
                got = self.f.be.readinto(mv[t * cs:u * cs], offs[t])
                if got < (u - t) * cs:
                    mv[t * cs + got:u * cs] = bytes((u - t) * cs - got)
                t = u
            yield offs, mv[:len(offs) * cs]

    def count_tables(self, offsets: list[int], res: CheckResult) -> None:
        """Every L2 table counted in C; the allocated entries are recorded for the
        COPIED check when there are not too many of them."""
        ffi, lib = self.ffi, self.lib
        stats = ffi.new("uint64_t[6]")
        self.rec = ffi.new("uint64_t[]", RECORD)
        imrt = ffi.from_buffer("uint8_t[]", self.buf, require_writable=True)
        for offs, buf in self.batches(offsets):
            flags = ffi.new("uint8_t[]", len(offs))
            if lib.qcow2c_l2_count(ffi.from_buffer("uint8_t[]", buf), len(offs),
                                   self.cs // 8, self.cbits, self.f.size, imrt, self.width,
                                   self.nb, self.rmax, flags, stats, self.rec, RECORD):
                raise _Bail
        res.allocated_clusters = int(stats[0])
        res.fragmented_clusters = int(stats[1])
        res.compressed_clusters = int(stats[3])
        self.recorded = int(stats[5])

    def count_blocks(self, reftable) -> None:
        """The refcount blocks, each counted once (QEMU's check_refblocks, when it has
        nothing to say)."""
        seen = set()
        for e in reftable:
            if not e:
                continue
            off = e & C.REFT_OFFSET_MASK
            k = off >> self.cbits
            if (e & (C.REFT_RESERVED_MASK | (self.cs - 1)) or k >= self.nb
                    or off >= self.f.size or k in seen):
                raise _Bail
            seen.add(k)
        for k in seen:
            if self.imrt[k]:
                raise _Bail
            self.imrt[k] = 1

    def compare(self, reftable) -> int:
        """Stored refcounts against the IMRT; the highest cluster in use."""
        ffi, lib = self.ffi, self.lib
        per = self.cs * 8 // self.bits
        imrt = ffi.from_buffer("uint8_t[]", self.buf)
        highest = ffi.new("uint64_t *", 0)
        for bi in range((self.nb + per - 1) // per):
            lo = bi * per
            n = min(self.nb, lo + per) - lo
            off = reftable[bi] & C.REFT_OFFSET_MASK if bi < len(reftable) else 0
            if off and (off & (self.cs - 1) or off + self.cs > self.f.size):
                raise _Bail
            block = ffi.from_buffer("uint8_t[]", self.f.read(self.cs, off)) if off \
                else ffi.NULL
            if lib.qcow2c_compare(block, self.bits, imrt, self.width, lo, n, highest):
                raise _Bail
        return int(highest[0])

    def copied(self, offsets: list[int]) -> None:
        """The COPIED flags of the L2 entries: from the record, or the tables again."""
        ffi, lib = self.ffi, self.lib
        imrt = ffi.from_buffer("uint8_t[]", self.buf)
        if self.recorded <= RECORD:
            if lib.qcow2c_copied_list(self.rec, self.recorded, imrt, self.width, self.nb):
                raise _Bail
            return
        for offs, buf in self.batches(offsets):
            flags = ffi.new("uint8_t[]", len(offs))
            if lib.qcow2c_copied(ffi.from_buffer("uint8_t[]", buf), len(offs), self.cs // 8,
                                 self.cbits, imrt, self.width, self.nb, flags):
                raise _Bail
