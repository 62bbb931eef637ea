"""Untrusted mode: limits, format checks and the metadata scan run before any data read.

``qcow2.open(path, untrusted=True)`` opens exactly one file and, before the first guest
read, walks every metadata structure of the image once (header fields, the refcount
table, the active and every snapshot's L1 table, every L2 table those reach, the
snapshot table, the refcount blocks, the bitmap directory and every bitmap table with
the bitmap data clusters they name) and refuses anything a hostile image could use to
make a reader go astray: unaligned entries, reserved bits, references past the end of
the file, host clusters referenced twice from one L1 table, L2 tables or data clusters
that overlap other metadata (or each other), compressed descriptors that overrun the
file, zero flags in a v2 image, extended-L2 subclusters that are both allocated and
zero, bitmap directory entries QEMU would not load, and (unless the image is dirty)
clusters in use whose refcount is 0.  Every table is charged against
``Limits.max_metadata`` before it is read (the snapshot table as it is read, from the
open onwards).

Plain corruption (a field that is malformed on its own) raises ``CorruptImageError``;
aliasing and exceeded limits raise ``UnsafeImageError``.  Both carry ``offset`` (the
file offset of the offending entry or field), ``size`` and ``what``.

The caps live in :class:`Limits`; every one can be overridden by the caller::

    qcow2.open(path, untrusted=True, limits=qcow2.Limits(max_metadata=256 << 20))
    qcow2.open(path, untrusted=True, max_virtual_size=1 << 50)      # same, one field

The scan is vectorised with numpy: L2 tables are read and classified a batch at a
time, Python only formats the first problem found.
"""

from __future__ import annotations

import struct
import time

from . import constants as C
from .errors import CorruptImageError, UnsafeImageError

TiB = 1 << 40
MiB = 1 << 20

_L1E_RESERVED = 0x7F000000000001FF
_L2E_STD_RESERVED = 0x3F000000000001FE      # bits 1-8 and 56-61 of a standard entry
_REFT_RESERVED = 0x1FF
_ALL_ALLOC = 0xFFFFFFFF
# persistent dirty bitmaps (docs/interop/qcow2.rst "Bitmaps"; QEMU's qcow2-bitmap.c)
_BME_ENTRY = struct.Struct(">QIIBBHI")      # a bitmap directory entry's fixed part
_BME_TABLE_RESERVED = 0xFF000000000001FE
_BME_OFFSET_MASK = 0x00FFFFFFFFFFFE00
_BME_ALL_ONES = 1
_BME_MAX_TABLE_SIZE = 0x8000000
_BME_MAX_PHYS_SIZE = 0x20000000
_BME_MIN_GRANULARITY_BITS = 9
_BME_MAX_GRANULARITY_BITS = 31
_BME_MAX_NAME_SIZE = 1023
_BME_RESERVED_FLAGS = 0xFFFFFFFC
_BME_FLAG_IN_USE = 1
_BT_DIRTY_TRACKING = 1
_BATCH_TABLES = 256

# Signatures of other image formats: (offset, bytes, name).  An untrusted file showing
# one of these is not read as something else.
_SIGNATURES = (
    (0, b"QFI\xfb", "qcow"),
    (0, b"QED\x00", "qed"),
    (0, b"KDMV", "vmdk"),
    (0, b"# Disk DescriptorFile", "vmdk"),
    (0, b"vhdxfile", "vhdx"),
    (0, b"conectix", "vpc"),
    (0, b"LUKS\xba\xbe", "luks"),
    (0x40, b"\x7f\x10\xda\xbe", "vdi"),
    (0, b"WithoutFreeSpace", "parallels"),
    (0, b"WithouFreSpacExt", "parallels"),
    (0x8001, b"CD001", "iso"),
)


class Limits:
    """Caps applied to untrusted images (``max_backing_depth`` applies in every mode).

    ``max_virtual_size``: bytes of guest disk (default 16 TiB); ``max_metadata``: bytes
    of snapshot table, L1 tables, L2 tables, refcount structures, bitmap directory and
    bitmap tables the open and the scan read and hold, each charged before it is read
    (default 64 MiB; the scan's working set is at most about twice that);
    ``max_output``: bytes a ``convert`` may produce (default None: unlimited);
    ``max_backing_depth``: images in a backing chain (default 16); ``max_scan_cpu``:
    seconds of CPU time (``time.process_time``) the metadata scan may take (default 60).
    """

    __slots__ = ("max_virtual_size", "max_metadata", "max_output", "max_backing_depth",
                 "max_scan_cpu")

    def __init__(self, *, max_virtual_size: int = 16 * TiB, max_metadata: int = 64 * MiB,
                 max_output: int | None = None,
                 max_backing_depth: int = C.MAX_BACKING_DEPTH,
                 max_scan_cpu: float = 60.0):
        self.max_virtual_size = max_virtual_size
        self.max_metadata = max_metadata
        self.max_output = max_output
        self.max_backing_depth = max_backing_depth
        self.max_scan_cpu = max_scan_cpu

    def replace(self, **overrides) -> "Limits":
        kw = {k: getattr(self, k) for k in self.__slots__}
        for k, v in overrides.items():
            if k not in self.__slots__:
                raise TypeError(f"unknown limit {k!r} (known: {', '.join(self.__slots__)})")
            kw[k] = v
        return Limits(**kw)

    def __repr__(self) -> str:
        return "Limits(" + ", ".join(f"{k}={getattr(self, k)!r}" for k in self.__slots__) + ")"


def resolve(limits: "Limits | None" = None, **overrides) -> Limits:
    base = limits if limits is not None else Limits()
    overrides = {k: v for k, v in overrides.items() if v is not None}
    return base.replace(**overrides) if overrides else base


def _unsafe(msg: str, offset: int | None = None, size: int | None = None,
            what: str | None = None) -> UnsafeImageError:
    err = UnsafeImageError(msg if offset is None else f"{msg} (at offset {offset:#x})")
    err.offset = offset          # type: ignore[attr-defined]
    err.size = size              # type: ignore[attr-defined]
    err.what = what              # type: ignore[attr-defined]
    return err


class Budget:
    """Bytes of metadata read and held for one untrusted image, against
    ``Limits.max_metadata``: charged *before* each read, so an image whose tables
    would pass the cap is refused without reading them."""

    __slots__ = ("limit", "held")

    def __init__(self, limits: Limits):
        self.limit = limits.max_metadata
        self.held = 0

    def hold(self, n: int, what: str, offset: int | None = None) -> None:
        self.held += n
        if self.held > self.limit:
            raise _unsafe(f"metadata of {self.held} bytes (reading {what}) exceeds the "
                          f"limit of {self.limit} bytes", offset, None, "metadata")

    def charge_snapshot_table(self, n: int) -> None:
        """``read_snapshot_table``'s ``charge``: the header's table offset is named."""
        self.hold(n, "the snapshot table", 0x40)


def _corrupt(msg: str, offset: int, size: int, what: str) -> CorruptImageError:
    return CorruptImageError(f"{msg} (at offset {offset:#x})", offset=offset, size=size,
                             what=what)


# ---------------------------------------------------------------------------
# formats
# ---------------------------------------------------------------------------

def signatures(be) -> list[str]:
    """Names of the image formats whose signature the file carries."""
    found = []
    for off, sig, name in _SIGNATURES:
        got = be.pread(len(sig), off)
        if got == sig and name not in found:
            found.append(name)
    return found


def check_format(be, fmt: str, explicit: bool) -> None:
    """The file must be ``fmt`` and nothing else (OpenStack's format-inspector rules)."""
    names = signatures(be)
    if fmt == "raw":
        names = [n for n in names if n != "iso"]     # an ISO image is raw data
        if names:
            kind = "qcow2" if names[0] == "qcow" and _qcow_version(be) >= 2 else names[0]
            raise _unsafe(f"'{getattr(be, 'path', '?')}' is a {kind} image named as raw; "
                          f"untrusted mode reads it as nothing else", 0, None, "format")
        return
    others = [n for n in names if n != "qcow"]
    if others and not explicit:
        raise _unsafe(f"file could be read as qcow2 and as {others[0]}; refusing to guess "
                      f"the format of an untrusted image (give the format)", 0, None,
                      "format")


def _qcow_version(be) -> int:
    raw = be.pread(4, 4)
    return int.from_bytes(raw, "big") if len(raw) == 4 else 0


# ---------------------------------------------------------------------------
# header-only checks (before any table is read)
# ---------------------------------------------------------------------------

def check_header(h, file_size: int, limits: Limits) -> None:
    if h.size > limits.max_virtual_size:
        raise _unsafe(f"virtual size {h.size} exceeds the limit of {limits.max_virtual_size} "
                      f"bytes", 0x18, 8, "header")


# ---------------------------------------------------------------------------
# the scan
# ---------------------------------------------------------------------------

class _Scan:
    def __init__(self, img, limits: Limits):
        import numpy as np
        self.np = np
        self.img = img
        self.h = img.header
        self.limits = limits
        self.cs = img.cluster_size
        self.cbits = img.cluster_bits
        self.fsize = img.file_size
        self.t0 = time.process_time()
        # shared with the open, which charged the snapshot table before reading it
        self.budget = getattr(img, "_budget", None) or Budget(limits)
        # (cluster indices, what, file offset of the pointer) of every metadata structure
        self.meta: list[tuple] = []

    # -- budgets -------------------------------------------------------------------
    def _hold(self, n: int, what: str, offset: int | None = None) -> None:
        self.budget.hold(n, what, offset)

    def _tick(self) -> None:
        used = time.process_time() - self.t0
        if used > self.limits.max_scan_cpu:
            raise _unsafe(f"metadata scan took more than {self.limits.max_scan_cpu} s of CPU "
                          f"time ({used:.1f} s)")

    def _read_u64(self, offset: int, n: int):
        np = self.np
        raw = self.img._read_meta(n * 8, offset) if n else b""
        if len(raw) != n * 8:
            raise _corrupt(f"short read of {n * 8} bytes", offset, n * 8, "table")
        return np.frombuffer(raw, dtype=">u8").astype(np.uint64)

    def _region(self, offset: int, size: int, what: str, ptr: int) -> None:
        """A metadata region: inside the file, clusters recorded for overlap checks."""
        if size == 0:
            return
        if offset + size > self.fsize:
            raise _corrupt(f"{what} at {offset:#x} ({size} bytes) extends past the end of "
                           f"the file (size {self.fsize:#x})", ptr, 8, what)
        first = offset >> self.cbits
        last = (offset + size - 1) >> self.cbits
        self.meta.append((self.np.arange(first, last + 1, dtype=self.np.int64), what, ptr))

    # -- steps ---------------------------------------------------------------------
    def run(self) -> None:
        h, img = self.h, self.img
        np = self.np
        cs = self.cs
        # budget from the header alone, before anything is read
        l1s = [(h.l1_table_offset, h.l1_size, "active L1 table", 0x28)]
        for sn in img.snapshots_list:
            h.validate_snapshot_l1(sn)
            l1s.append((sn.l1_table_offset, sn.l1_size, f"L1 table of snapshot {sn.id}",
                        sn.entry_offset))
        self._hold(h.refcount_table_clusters * cs, "the refcount table", 0x38)
        for off, n, what, ptr in l1s:
            self._hold(n * 8, what, 0x24 if ptr == 0x28 else ptr + 8)   # the size field
        self._region(0, cs, "header", 0)
        self._region(h.refcount_table_offset, h.refcount_table_clusters * cs,
                     "refcount table", 0x30)
        if h.nb_snapshots:
            end = max(sn.entry_offset + sn.entry_size for sn in img.snapshots_list)
            self._region(h.snapshots_offset, end - h.snapshots_offset, "snapshot table", 0x40)
        if h.bitmaps_ext is not None:
            nb, dsize, doff = h.bitmaps_ext
            self._region(doff, dsize, "bitmap directory", h.bitmaps_ext_offset + 16)
        if h.crypto_header is not None:
            self._region(h.crypto_header[0], h.crypto_header[1], "encryption header", 0)
        for off, n, what, ptr in l1s:
            self._region(off, n * 8, what, ptr)
        self._refcount_table()
        self._bitmaps()
        # L1 tables -> the distinct L2 tables
        per_l1 = []
        for off, n, what, ptr in l1s:
            l1 = self._read_u64(off, n)
            idx = np.nonzero(l1)[0]
            ent = l1[idx]
            bad = np.nonzero(ent & np.uint64(_L1E_RESERVED))[0]
            if len(bad):
                i = int(idx[bad[0]])
                raise _corrupt(f"{what} entry {i} ({int(l1[i]):#x}) has reserved bits set",
                               off + i * 8, 8, "L1 entry")
            l2off = ent & np.uint64(C.L1E_OFFSET_MASK)
            bad = np.nonzero(l2off & np.uint64(cs - 1))[0]
            if len(bad):
                i = int(idx[bad[0]])
                raise _corrupt(f"{what} entry {i}: L2 table offset {int(l2off[bad[0]]):#x} "
                               f"is not cluster-aligned", off + i * 8, 8, "L1 entry")
            bad = np.nonzero(l2off + np.uint64(cs) > np.uint64(self.fsize))[0]
            if len(bad):
                i = int(idx[bad[0]])
                raise _corrupt(f"{what} entry {i}: L2 table at {int(l2off[bad[0]]):#x} "
                               f"extends past the end of the file (size {self.fsize:#x})",
                               off + i * 8, 8, "L1 entry")
            keep = l2off != 0       # an entry with only the COPIED flag points nowhere
            idx, l2off = idx[keep], l2off[keep]
            u, first, counts = np.unique(l2off, return_index=True, return_counts=True)
            if len(u) and counts.max() > 1:
                dup = int(np.argmax(counts > 1))
                j = np.nonzero(l2off == u[dup])[0]
                i = int(idx[j[1]])
                raise _unsafe(f"{what} entries {int(idx[j[0]])} and {i} both point at the "
                              f"L2 table at {int(u[dup]):#x}", off + i * 8, 8, "L1 entry")
            per_l1.append((off, what, idx, l2off))
        self._tick()
        all_l2 = np.unique(np.concatenate([p[3] for p in per_l1])) if per_l1 else \
            np.zeros(0, np.uint64)
        l2_bytes = cs if not h.extended_l2 else cs     # a table is one cluster either way
        self._hold(len(all_l2) * l2_bytes, f"{len(all_l2)} L2 tables", 0x28)
        # where each L2 table is pointed from (for messages): first L1 entry seen
        l2_ptr = {}
        for off, what, idx, l2off in per_l1:
            for i, o in zip(idx.tolist(), l2off.tolist()):
                l2_ptr.setdefault(o, off + i * 8)
        self.meta.append(((all_l2 >> np.uint64(self.cbits)).astype(np.int64), "L2 table",
                          None))
        meta_clusters, meta_what, meta_ptr = self._metadata_overlaps(l2_ptr, all_l2)
        # every L2 table: entries -> host clusters (data never on metadata)
        nclus = (self.fsize + cs - 1) >> self.cbits
        self.dtype = np.uint32 if nclus < (1 << 32) else np.int64
        self.meta_clusters, self.meta_what = meta_clusters, meta_what
        refs = {}           # L2 offset -> standard host cluster indices (uint32 or int64)
        comp = []           # host clusters touched by compressed data
        total = 0
        for b in range(0, len(all_l2), _BATCH_TABLES):
            offs = all_l2[b:b + _BATCH_TABLES].tolist()
            for o in offs:
                r, c = self._l2_table(o)
                refs[o] = r
                total += len(r)
                if c is not None:
                    comp.append(c)
            self._tick()
        comp_all = _uniq(np, np.concatenate(comp)) if comp else np.zeros(0, np.int64)
        # With a byte map over the file's clusters no bigger than the references
        # themselves, the checks below are linear and need no copy of all references.
        use_map = nclus <= max(4 * total, 1 << 20)
        if len(comp_all) and total:
            if use_map:
                mark = np.zeros(nclus, dtype=bool)
                for r in refs.values():
                    mark[r] = True
                hit = mark[comp_all]
                del mark
            else:
                hit = np.isin(comp_all, np.concatenate(list(refs.values())))
            if hit.any():
                c = int(comp_all[np.argmax(hit)])
                raise _unsafe(f"compressed data touches host cluster {c << self.cbits:#x}, "
                              f"which is also an uncompressed data cluster",
                              c << self.cbits, cs, "compressed data")
        self._tick()
        # one L1 table (one view of the disk) never reaches a host cluster twice;
        # snapshots may share clusters with each other and with the active layer
        for off, what, idx, l2off in per_l1:
            c = None
            if use_map:
                mark = np.zeros(nclus, dtype=bool)
                for o in l2off.tolist():
                    r = refs[o]
                    seen = mark[r]
                    if seen.any():
                        c = int(r[np.argmax(seen)])
                        break
                    mark[r] = True
                del mark
            else:
                tabs = [refs[o] for o in l2off.tolist()]
                arr = np.concatenate(tabs) if tabs else np.zeros(0, np.int64)
                s = np.sort(arr)
                d = np.nonzero(s[1:] == s[:-1])[0]
                if len(d):
                    c = int(s[d[0]])
            if c is not None:
                raise _unsafe(f"host cluster {c << self.cbits:#x} is referenced twice by the "
                              f"{what} (not compressed, not shared by a snapshot)",
                              self._find_entry(c, l2off, 2), 8, "L2 entry")
            self._tick()
        if not h.dirty:
            # (a dirty image may have lazy refcounts lagging behind: QEMU rebuilds them)
            self._refcounts(refs, comp_all, nclus, use_map)
        self._tick()

    def _refcounts(self, refs, comp_all, nclus: int, use_map: bool) -> None:
        """Every cluster in use -- metadata, data, compressed data -- has a refcount."""
        np = self.np
        from .refcount import decode_block
        h, cs, cbits = self.h, self.cs, self.cbits
        bits = h.refcount_bits
        span = cbits + 3 - h.refcount_order          # log2(entries per refcount block)
        parts = [m[0] for m in self.meta] + list(refs.values()) + [comp_all]
        rt = self.rt
        if use_map:
            mark = np.zeros(nclus, dtype=bool)
            for a in parts:
                mark[a] = True
            groups = ((b, b << span, np.flatnonzero(mark[b << span:(b + 1) << span]))
                      for b in range((nclus + (1 << span) - 1) >> span))
        else:
            want = np.sort(np.concatenate([a.astype(np.int64) for a in parts]))
            blk = want >> span
            cuts = [0] + (np.flatnonzero(blk[1:] != blk[:-1]) + 1).tolist() + [len(want)]
            groups = ((int(blk[cuts[j]]), int(blk[cuts[j]]) << span,
                       want[cuts[j]:cuts[j + 1]] - (int(blk[cuts[j]]) << span))
                      for j in range(len(cuts) - 1) if cuts[j] < cuts[j + 1])
        for j, (b, base, idx) in enumerate(groups):
            if not len(idx):
                continue
            bo = int(rt[b]) & C.REFT_OFFSET_MASK if b < len(rt) else 0
            if bo == 0:
                c = base + int(idx[0])
                raise _corrupt(f"host cluster {c << cbits:#x} is in use but has no refcount "
                               f"block (refcount table entry {b})",
                               h.refcount_table_offset + 8 * min(b, len(rt)), 8,
                               "refcount table entry")
            vals = decode_block(self.img._read_meta(cs, bo), bits)
            z = np.flatnonzero(vals[idx] == 0)
            if len(z):
                i = int(idx[z[0]])
                c = base + i
                raise _corrupt(f"host cluster {c << cbits:#x} is in use but its refcount "
                               f"is 0", bo + i * bits // 8, max(1, bits // 8), "refcount")
            if j % 64 == 63:
                self._tick()

    def _find_entry(self, cluster: int, l2offs, nth: int) -> int:
        """File offset of the ``nth`` L2 entry reaching ``cluster`` (for the message)."""
        seen = 0
        for o in l2offs.tolist():
            table = self._read_u64(o, self.img._l2_entries * (2 if self.h.extended_l2 else 1))
            step = 2 if self.h.extended_l2 else 1
            ent = table[::step]
            std = (ent & self.np.uint64(C.OFLAG_COMPRESSED)) == 0
            host = (ent & self.np.uint64(C.L2E_OFFSET_MASK)) >> self.np.uint64(self.cbits)
            hits = self.np.nonzero(std & (host == cluster) &
                                   ((ent & self.np.uint64(C.L2E_OFFSET_MASK)) != 0))[0]
            for k in hits.tolist():
                seen += 1
                if seen == nth:
                    return o + k * 8 * step
        return 0

    def _metadata_overlaps(self, l2_ptr, all_l2):
        np = self.np
        cl = np.concatenate([m[0] for m in self.meta])
        owner = np.concatenate([np.full(len(m[0]), i, dtype=np.int64)
                                for i, m in enumerate(self.meta)])
        order = np.argsort(cl, kind="stable")
        cl, owner = cl[order], owner[order]
        d = np.nonzero(cl[1:] == cl[:-1])[0]
        if len(d):
            k = int(d[0])
            a, b = self.meta[int(owner[k])], self.meta[int(owner[k + 1])]
            c = int(cl[k]) << self.cbits
            if b[1] == "L2 table":
                ptr = l2_ptr.get(c, c)
                # an L1 entry pointing an L2 table at other metadata: name the entry
                raise _unsafe(f"L2 table at {c:#x} overlaps the {a[1]}", ptr, 8, "L1 entry")
            ptr = b[2]
            if isinstance(ptr, np.ndarray):
                # one pointer per cluster (refcount blocks, bitmap data): the entry
                # reaching this one
                starts = np.cumsum([0] + [len(m[0]) for m in self.meta])
                ptr = int(ptr[int(order[k + 1]) - int(starts[int(owner[k + 1])])])
            raise _unsafe(f"{b[1]} overlaps the {a[1]} at host cluster {c:#x}",
                          ptr if ptr is not None else c, None, b[1])
        whats = [self.meta[int(o)][1] for o in owner.tolist()] if len(cl) < 4096 else \
            _LazyNames(self.meta, owner)
        return cl, whats, None

    def _bitmaps(self) -> None:
        """The bitmap directory and every bitmap table (QEMU's bitmap_list_load,
        check_dir_entry, bitmap_table_load and load_bitmap_data rules); the tables and
        the bitmap data clusters they point at join the metadata for the overlap,
        metadata-as-data and refcount checks."""
        h = self.h
        if h.bitmaps_ext is None:
            return
        np = self.np
        cs, cbits = self.cs, self.cbits
        nb, dsize, doff = h.bitmaps_ext
        ext = h.bitmaps_ext_offset        # nb_bitmaps at +0, size at +8, offset at +16
        self._hold(dsize, "the bitmap directory", ext + 8)
        d = self.img._read_meta(dsize, doff)
        if len(d) != dsize:
            raise _corrupt(f"short read of the bitmap directory ({len(d)} of {dsize} "
                           f"bytes)", ext + 16, 8, "bitmap directory")
        entries = []
        pos = 0
        while pos < dsize:
            e = doff + pos
            i = len(entries)
            if pos + _BME_ENTRY.size > dsize:
                raise _corrupt(f"bitmap directory entry {i} at {e:#x} overruns the "
                               f"directory ({dsize} bytes at {doff:#x})", e, dsize - pos,
                               "bitmap directory entry")
            if i + 1 > nb:
                raise _corrupt(f"bitmap directory has more entries than the {nb} the header "
                               f"extension names (entry {i} at {e:#x})", e,
                               _BME_ENTRY.size, "bitmap directory entry")
            toff, tsize, flags, btype, gbits, name_size, extra = _BME_ENTRY.unpack_from(d, pos)

            def bad(text, field, size):
                return _corrupt(f"bitmap directory entry {i} at {e:#x}: {text}", e + field,
                                size, "bitmap directory entry")

            if extra != 0:
                raise bad(f"has {extra} bytes of extra data (not supported)", 20, 4)
            if name_size > _BME_MAX_NAME_SIZE:
                raise bad(f"name of {name_size} bytes exceeds {_BME_MAX_NAME_SIZE}", 18, 2)
            nxt = pos + ((_BME_ENTRY.size + name_size + extra + 7) & ~7)
            if nxt > dsize:
                raise bad(f"name of {name_size} bytes overruns the directory ({dsize} "
                          f"bytes at {doff:#x})", 18, 2)
            if flags & _BME_RESERVED_FLAGS:
                raise bad(f"flags {flags:#x} have reserved bits set", 12, 4)
            if btype != _BT_DIRTY_TRACKING:
                raise bad(f"type {btype} is not a dirty tracking bitmap (1)", 16, 1)
            if not _BME_MIN_GRANULARITY_BITS <= gbits <= _BME_MAX_GRANULARITY_BITS:
                raise bad(f"granularity 2^{gbits} is out of range "
                          f"(2^{_BME_MIN_GRANULARITY_BITS}..2^{_BME_MAX_GRANULARITY_BITS})",
                          17, 1)
            if toff == 0 or toff & (cs - 1):
                raise bad(f"bitmap table offset {toff:#x} is "
                          f"{'zero' if toff == 0 else 'not cluster-aligned'}", 0, 8)
            if tsize == 0 or tsize > _BME_MAX_TABLE_SIZE or tsize * cs > _BME_MAX_PHYS_SIZE:
                raise bad(f"bitmap table size {tsize} is out of range (1.."
                          f"{min(_BME_MAX_TABLE_SIZE, _BME_MAX_PHYS_SIZE // cs)} entries)",
                          8, 4)
            if not flags & _BME_FLAG_IN_USE:
                # a bitmap saved cleanly has exactly the table the disk needs (one
                # that is in use may lag behind a resize: QEMU does not load its data)
                bits = (h.size + (1 << gbits) - 1) >> gbits
                want = (bits + 8 * cs - 1) // (8 * cs)
                if tsize != want:
                    raise bad(f"bitmap table of {tsize} entries, but a disk of {h.size} "
                              f"bytes at granularity 2^{gbits} needs {want}", 8, 4)
            entries.append((e, toff, tsize, bytes(d[pos + 24:pos + 24 + name_size])))
            pos = nxt
        if len(entries) != nb:
            raise _corrupt(f"bitmap directory has {len(entries)} entries, the header "
                           f"extension names {nb}", ext, 4, "header extension")
        # budget first, for every table, then read and check them
        for e, toff, tsize, name in entries:
            self._hold(tsize * 8, f"the bitmap table of bitmap entry at {e:#x}", e + 8)
        for e, toff, tsize, name in entries:
            label = name.decode("utf-8", "backslashreplace")[:64]
            what = f"bitmap table of bitmap {label!r}"
            self._region(toff, tsize * 8, what, e)
            t = self._read_u64(toff, tsize)
            off = t & np.uint64(_BME_OFFSET_MASK)
            has = off != 0
            checks = (
                ((t & np.uint64(_BME_TABLE_RESERVED)) != 0, "has reserved bits set"),
                (has & ((t & np.uint64(_BME_ALL_ONES)) != 0),
                 "has a data cluster and the all-ones flag"),
                (has & ((off & np.uint64(cs - 1)) != 0), "points at an unaligned cluster"),
                (has & (off + np.uint64(cs) > np.uint64(self.fsize)),
                 f"points past the end of the file (size {self.fsize:#x})"),
            )
            for mask, text in checks:
                k = np.flatnonzero(mask)
                if len(k):
                    k = int(k[0])
                    raise _corrupt(f"entry {k} of the {what} at {toff:#x} ({int(t[k]):#x}) "
                                   f"{text}", toff + 8 * k, 8, "bitmap table entry")
            k = np.flatnonzero(has)
            self.meta.append(((off[k] >> np.uint64(cbits)).astype(np.int64),
                              f"bitmap data of bitmap {label!r}", toff + 8 * k))
            self._tick()

    def _refcount_table(self) -> None:
        np = self.np
        h = self.h
        cs = self.cs
        off = h.refcount_table_offset
        n = h.refcount_table_clusters * cs // 8
        rt = self.rt = self._read_u64(off, n)
        idx = np.nonzero(rt)[0]
        ent = rt[idx]
        checks = (
            (ent & np.uint64(_REFT_RESERVED), "has reserved bits set", CorruptImageError),
            (ent & np.uint64(cs - 1), "is not cluster-aligned", CorruptImageError),
            (ent > np.uint64(self.fsize - cs) if self.fsize >= cs else ent == ent,
             f"extends past the end of the file (size {self.fsize:#x})", CorruptImageError),
        )
        for mask, text, _ in checks:
            bad = np.nonzero(mask)[0]
            if len(bad):
                i = int(idx[bad[0]])
                raise _corrupt(f"refcount table entry {i} ({int(rt[i]):#x}): refcount block "
                               f"{text}", off + i * 8, 8, "refcount table entry")
        self._hold(len(idx) * cs, "refcount blocks", 0x30)
        blocks = (ent >> np.uint64(self.cbits)).astype(np.int64)
        u, first, counts = np.unique(blocks, return_index=True, return_counts=True)
        if len(u) and counts.max() > 1:
            j = np.nonzero(blocks == u[int(np.argmax(counts > 1))])[0]
            i = int(idx[j[1]])
            raise _unsafe(f"refcount table entries {int(idx[j[0]])} and {i} point at the "
                          f"same refcount block", off + i * 8, 8, "refcount table entry")
        self.meta.append((blocks, "refcount block", off + idx.astype(np.int64) * 8))

    def _l2_table(self, o: int):
        """Check one L2 table; return (standard host clusters, compressed host clusters)."""
        np = self.np
        h = self.h
        cs, cbits = self.cs, self.cbits
        ext = h.extended_l2
        step = 2 if ext else 1
        t = self._read_u64(o, self.img._l2_entries * step)
        ent = t[::step]
        nz = np.nonzero(ent)[0] if not ext else np.nonzero(ent | t[1::2])[0]
        if not len(nz):
            return np.zeros(0, self.dtype), None
        e = ent[nz]
        compressed = (e & np.uint64(C.OFLAG_COMPRESSED)) != 0

        def fail(mask, text, cls=CorruptImageError):
            bad = np.nonzero(mask)[0]
            if len(bad):
                k = int(nz[bad[0]])
                msg = (f"L2 entry {k} of the L2 table at {o:#x} ({int(ent[k]):#x}) {text}")
                if cls is CorruptImageError:
                    raise _corrupt(msg, o + k * 8 * step, 8 * step, "L2 entry")
                raise _unsafe(msg, o + k * 8 * step, 8 * step, "L2 entry")

        std = ~compressed
        es = e & np.uint64(C.L2E_OFFSET_MASK)
        fail(std & ((e & np.uint64(_L2E_STD_RESERVED)) != 0), "has reserved bits set")
        zero = (e & np.uint64(C.OFLAG_ZERO)) != 0
        if h.version < 3:
            fail(std & zero, "has the zero flag, which a version 2 image does not have")
        if ext:
            fail(std & zero, "has bit 0 set, which is reserved with extended L2 entries")
        fail(std & ((es & np.uint64(cs - 1)) != 0), "points at an unaligned cluster")
        # a data cluster may be cut by the file's end (QEMU writes only the subclusters
        # or sectors it needs); one that starts at or past the end is refused
        # with an external data file, data clusters live in that (unopened) file: the
        # image file's size, metadata and refcounts say nothing about them
        elsewhere = h.has_data_file
        if not elsewhere:
            fail(std & (es != 0) & (es >= np.uint64(self.fsize)),
                 f"points past the end of the file (size {self.fsize:#x})")
        if ext:
            bm = t[1::2][nz]
            alloc = bm & np.uint64(_ALL_ALLOC)
            zbits = bm >> np.uint64(32)
            fail(std & ((alloc & zbits) != 0), "has subclusters both allocated and zero")
            fail(std & (es == 0) & (alloc != 0),
                 "has allocated subclusters but no host cluster")
            fail(compressed & (bm != 0), "is compressed but has a subcluster bitmap")
        host = (es[std & (es != 0)] >> np.uint64(cbits)).astype(self.dtype)
        hit = (_member(np, self.meta_clusters, host) if not elsewhere
               else np.zeros(len(host), bool))
        if hit.any():
            c = int(host[np.argmax(hit)])
            j = int(np.searchsorted(self.meta_clusters, c))
            fail(std & (es >> np.uint64(cbits) == np.uint64(c)),
                 f"points at host cluster {c << cbits:#x}, which is the {self.meta_what[j]}",
                 UnsafeImageError)
        if len(host) > 1:
            s = np.sort(host)
            d = np.nonzero(s[1:] == s[:-1])[0]
            if len(d):
                c = int(s[d[0]])
                k = np.nonzero(std & (es >> np.uint64(cbits) == np.uint64(c)))[0][1]
                fail(np.arange(len(e)) == k,
                     f"points at host cluster {c << cbits:#x} already used in this table",
                     UnsafeImageError)
        if elsewhere:
            host = host[:0]            # nothing of the image file's own
        if not compressed.any():
            return host, None
        fail(compressed & ((e & np.uint64(C.OFLAG_COPIED)) != 0),
             "is compressed and has the COPIED flag")
        ce = e[compressed]
        shift = 62 - (cbits - 8)
        coff = ce & np.uint64((1 << shift) - 1)
        nsec = ((ce >> np.uint64(shift)) & np.uint64((1 << (cbits - 8)) - 1)) + np.uint64(1)
        start = coff & ~np.uint64(511)
        end = start + nsec * np.uint64(512)
        # QEMU reads nsec sectors from the first one; the last may be cut by the file's
        # end (QEMU does not pad it), so a descriptor overruns when its sectors go past
        # the file's end rounded up to a sector.
        limit = np.uint64((self.fsize + 511) & ~511)
        over = np.zeros(len(e), bool)
        over[np.nonzero(compressed)[0]] = end > limit
        fail(over, f"has compressed data past the end of the file (size {self.fsize:#x})")
        first = (start >> np.uint64(cbits)).astype(np.int64)
        last = ((end - np.uint64(1)) >> np.uint64(cbits)).astype(np.int64)
        touched = np.concatenate([first, last[last != first]])
        hit = _member(np, self.meta_clusters, touched)
        if hit.any():
            c = int(touched[np.argmax(hit)])
            j = int(np.searchsorted(self.meta_clusters, c))
            cidx = np.nonzero(compressed)[0]
            k = np.zeros(len(e), bool)
            k[cidx[(first == c) | (last == c)]] = True
            fail(k, f"has compressed data in host cluster {c << cbits:#x}, which is the "
                    f"{self.meta_what[j]}", UnsafeImageError)
        return host, touched


def _uniq(np, a):
    """Sorted distinct values (numpy's hash-based unique is slow on big arrays)."""
    s = np.sort(a)
    return s[np.concatenate(([True], s[1:] != s[:-1]))] if len(s) else s


def _member(np, sorted_set, a):
    """``a in sorted_set``, element-wise."""
    if not len(sorted_set) or not len(a):
        return np.zeros(len(a), bool)
    pos = np.minimum(np.searchsorted(sorted_set, a), len(sorted_set) - 1)
    return sorted_set[pos] == a


class _LazyNames:
    def __init__(self, meta, owner):
        self.meta, self.owner = meta, owner

    def __getitem__(self, j):
        return self.meta[int(self.owner[j])][1]


def scan(img, limits: Limits) -> None:
    """Refuse the image unless every metadata structure is sane (see the module doc)."""
    _Scan(img, limits).run()
