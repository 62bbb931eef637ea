"""Images: open, read, map and describe qcow2 and raw images and their backing chains.

An :class:`Image` is the engine's one interface to a disk: ``size``, ``pread`` /
``readinto``, ``extents()`` (allocation runs, like ``qemu-img map``), ``info()`` (like
``qemu-img info``) and ``file()``.  :func:`open_image` probes the format, validates the
header, and opens the backing chain (with loop and depth checks).

Reads are planned from metadata: one L2 table slice is decoded per call into runs of
(kind, host offset) by a batch kernel (``qcow2.kernels``), so Python works per run, never
per byte; data runs are read with ``preadv`` straight into the caller's buffer,
compressed clusters are read in one piece per batch and decoded in one kernel call.
"""

from __future__ import annotations

import io
import os
import struct
import threading
from collections import namedtuple
TYPE_CHECKING = False
if TYPE_CHECKING:        # (importing typing costs every CLI process ~3 ms)
    from typing import Iterator

from . import constants as C
from .backends import Backend, FileBackend
from .cache import TableCache
from .errors import (CorruptImageError, DecompressionError, Qcow2Error, ReadOnlyError, UnsafeImageError, UnsupportedFeatureError)
from .header import Header
from .paths import check_file_name, combine_path
from .refcount import RefcountReader
from .snapshot import Snapshot, find_snapshot, read_snapshot_table

# Block status flags (the meaning QEMU's block layer gives them).
ST_DATA = 1
ST_ZERO = 2
ST_OFFSET_VALID = 4
ST_ALLOCATED = 8

_ZEROS = memoryview(bytes(1 << 20))
_HOST_KINDS = (C.KIND_DATA, C.KIND_ZERO_ALLOC, C.KIND_UNALLOC_ALLOC)
# any bit but COPIED and the offset: not a plain data entry (compressed, zero, reserved)
_NOT_PLAIN_DATA = ~(C.L2E_OFFSET_MASK | C.OFLAG_COPIED) & 0xFFFFFFFFFFFFFFFF
_unpack_u64 = struct.Struct(">Q").unpack_from
_scratch = threading.local()            # pread's reused buffer, one per thread
_SCRATCH_MIN = 64 << 10                 # reads from this size use it
_SCRATCH_MAX = 4 << 20                  # kept per thread at most
_serial = threading.local()             # .on: this thread does not split decodes
_SPLIT_MIN = 512 << 10                  # decoded bytes worth a helper thread
_pool = None                            # (executor, pid) of the decode helpers
_pool_lock = threading.Lock()


def _decode_pool():
    """The helper threads that decode half of a big batch of compressed clusters
    (one fewer than the usable CPUs; None with one CPU).  Made on first use, and
    again in a forked child (the parent's threads do not exist there)."""
    global _pool
    pid = os.getpid()
    p = _pool
    if p is None or p[1] != pid:
        with _pool_lock:
            p = _pool
            if p is None or p[1] != pid:
                try:
                    cpus = len(os.sched_getaffinity(0))
                except (AttributeError, OSError):
                    cpus = os.cpu_count() or 1
                ex = None
                if cpus > 1:
                    from concurrent.futures import ThreadPoolExecutor
                    ex = ThreadPoolExecutor(max_workers=cpus - 1,
                                            thread_name_prefix="qcow2-decode")
                p = _pool = (ex, pid)
    return p[0]


def _by_host(c):
    return c[2]


def _decode_into(dec, mv, src, full, offset: int) -> None:
    """One kernel call for whole clusters ``((guest, n, host, csize), buffer offset)``;
    ``dec`` may be a callable returning this thread's decompressor."""
    if not hasattr(dec, "decompress_into"):
        dec = dec()
    dec.decompress_into(mv, src, [so for _c, so in full], [c[3] for c, _so in full],
                        dest_offsets=[c[0] - offset for c, _so in full])


class serial_reads:
    """Within this context the calling thread decodes compressed clusters itself,
    never with helper threads: for callers that already run one reader per core."""

    def __enter__(self):
        self._prev = getattr(_serial, "on", False)
        _serial.on = True
        return self

    def __exit__(self, *exc) -> None:
        _serial.on = self._prev


def _zero_fill(mv: memoryview) -> None:
    n = len(mv)
    i = 0
    while i < n:
        k = min(n - i, len(_ZEROS))
        mv[i:i + k] = _ZEROS[:k]
        i += k


class Extent(namedtuple("Extent", "start length depth present zero data offset")):
    """One run of ``qemu-img map``: ``start``, ``length``, ``depth`` (ints),
    ``present``, ``zero``, ``data`` (bools), ``offset`` (int, or None when qemu
    prints none)."""
    __slots__ = ()

    def as_dict(self) -> dict:
        d = {"start": self.start, "length": self.length, "depth": self.depth,
             "present": self.present, "zero": self.zero, "data": self.data}
        if self.offset is not None:
            d["offset"] = self.offset
        return d


# ---------------------------------------------------------------------------
# opening
# ---------------------------------------------------------------------------

def probe_format(backend: Backend) -> str:
    """qcow2 when the magic is there and the version is at least 2 (QEMU's rule: the
    magic with version 1 is the older qcow format, not ours); raw otherwise."""
    head = backend.pread(8, 0)
    if len(head) == 8 and head[:4] == C.MAGIC and struct.unpack(">I", head[4:])[0] >= 2:
        return "qcow2"
    return "raw"


def _dirty_v3(backend: Backend) -> bool:
    head = backend.pread(0x50, 0)
    return (len(head) == 0x50 and head[:4] == C.MAGIC
            and struct.unpack_from(">I", head, 4)[0] >= 3
            and bool(struct.unpack_from(">Q", head, 0x48)[0] & C.INCOMPAT_DIRTY))


def open_image(path, mode: str = "r", *, format: str | None = None, untrusted: bool = False,
               snapshot: str | int | None = None, force_share: bool = False,
               backing: bool = True, max_backing_depth: int | None = None,
               limits=None, _chain: tuple = (), _depth: int = 0) -> "Image":
    """Open an image file (see ``qcow2.open``)."""
    if mode not in ("r", "rb", "r+", "rb+", "r+b"):
        raise ValueError(f"invalid mode {mode!r} (use 'r' or 'r+')")
    writable = "+" in mode
    if max_backing_depth is None:
        max_backing_depth = (limits.max_backing_depth if limits is not None
                             else C.MAX_BACKING_DEPTH)
    if untrusted and writable:
        raise UnsafeImageError("an untrusted image is opened read-only (it is never "
                               "written or repaired in place)")
    if format not in (None, "qcow2", "raw"):
        raise UnsupportedFeatureError(f"Unknown or unsupported image format {format!r} "
                                      f"(supported: qcow2, raw)", feature=f"format {format}")
    filename = os.fspath(path)
    try:
        be = FileBackend(filename, writable=writable)
    except OSError as exc:
        raise _open_error(filename, exc) from None
    if writable and format != "raw" and _dirty_v3(be):
        # Refcounts may lag behind (lazy refcounts, then a crash): rebuild them before
        # anything is allocated, as QEMU does when it opens such an image read-write.
        be.close()
        from .ops.check import rebuild_if_dirty
        rebuild_if_dirty(filename)
        try:
            be = FileBackend(filename, writable=writable)
        except OSError as exc:
            raise _open_error(filename, exc) from None
    try:
        try:
            be.lock(write=writable, force_share=force_share and not writable)
        except OSError as exc:
            raise Qcow2Error(f"Could not open '{filename}': {exc.strerror or exc}") from None
        st = be.stat()
        ident = (st.st_dev, st.st_ino)
        if ident in _chain:
            raise UnsafeImageError(f"backing chain loop: {filename!r} is already in the chain")
        chain = _chain + (ident,)
        fmt = format or probe_format(be)
        if untrusted:
            from . import untrusted as U
            limits = U.resolve(limits)
            U.check_format(be, fmt, explicit=format is not None)
        if fmt == "qcow2":
            cls = Qcow2Image
            if writable:
                from .writer import WritableQcow2Image as cls
            img: Image = cls(be, filename, untrusted=untrusted, snapshot=snapshot,
                             open_backing=backing, max_backing_depth=max_backing_depth,
                             chain=chain, depth=_depth, force_share=force_share,
                             limits=limits)
        else:
            if snapshot is not None:
                raise UnsupportedFeatureError("raw images have no snapshots",
                                              feature="snapshot")
            img = RawImage(be, filename, writable=writable)
            if untrusted and img.size > limits.max_virtual_size:
                raise UnsafeImageError(f"virtual size {img.size} of raw image '{filename}' "
                                       f"exceeds the limit of {limits.max_virtual_size} bytes")
        return img
    except BaseException:
        be.close()
        raise


def _open_error(filename: str, exc: OSError) -> Qcow2Error:
    err = Qcow2Error(f"Could not open '{filename}': {exc.strerror or exc}")
    err.errno = exc.errno  # type: ignore[attr-defined]
    return err


# ---------------------------------------------------------------------------
# the common interface
# ---------------------------------------------------------------------------

class Image:
    format: str = "?"
    filename: str
    size: int
    backing: "Image | None" = None

    # -- reading -------------------------------------------------------------
    def readinto(self, buf, offset: int) -> int:
        """Read into ``buf`` from guest ``offset``; short only at the end of the disk."""
        if offset < 0:
            raise ValueError("negative offset")
        mv = memoryview(buf).cast("B")
        n = max(0, min(len(mv), self.size - offset))
        if n:
            self._read(mv[:n], offset)
        return n

    def pread(self, n: int, offset: int) -> bytes:
        if n < 0:
            raise ValueError("negative length")
        n = max(0, min(n, self.size - offset)) if offset >= 0 else n
        if n >= _SCRATCH_MIN:
            # Large reads go through a page-aligned buffer, reused per thread up to
            # 4 MiB: a fresh bytearray is zeroed and page-faulted on every call (1 MiB
            # reads ran 5x slower that way), and the kernel copies faster into
            # aligned memory.
            buf = getattr(_scratch, "buf", None)
            if buf is None or len(buf) < n:
                from .atomic import io_buffer
                buf = io_buffer(max(n, 1 << 20))
                if n <= _SCRATCH_MAX:
                    _scratch.buf = buf
            got = self.readinto(buf[:n], offset)
            return bytes(buf[:got])
        buf = bytearray(n)
        got = self.readinto(buf, offset)
        return bytes(buf) if got == n else bytes(buf[:got])

    def _read(self, mv: memoryview, offset: int) -> None:  # pragma: no cover - abstract
        raise NotImplementedError

    def _read_clipped(self, mv: memoryview, offset: int) -> None:
        """Read a range that may extend past this image's end (zeros there)."""
        n = max(0, min(len(mv), self.size - offset))
        if n:
            self._read(mv[:n], offset)
        if n < len(mv):
            _zero_fill(mv[n:])

    # -- allocation ------------------------------------------------------------
    def _status_runs(self, start: int, end: int) -> Iterator[tuple[int, int, int, int]]:
        """This layer alone: (offset, length, flags, host) covering [start, end)."""
        raise NotImplementedError  # pragma: no cover

    def _chain_status(self, start: int, end: int, depth: int):
        for a, n, flags, host in self._status_runs(start, end):
            if flags & (ST_DATA | ST_ZERO):
                yield a, n, depth, flags | ST_ALLOCATED, host
                continue
            bk = self.backing
            if bk is None:
                yield a, n, depth, flags | ST_ZERO, host
                continue
            mid = max(a, min(a + n, bk.size))
            if a < mid:
                yield from bk._chain_status(a, mid, depth + 1)
            if mid < a + n:
                yield mid, a + n - mid, depth, flags | ST_ZERO, host + (mid - a)

    def extents(self, start: int = 0, end: int | None = None) -> Iterator[Extent]:
        """Allocation runs over the whole chain, merged exactly as ``qemu-img map`` does."""
        if end is None or end > self.size:
            end = self.size
        cur: list | None = None
        for a, n, depth, flags, host in self._chain_status(start, end, 0):
            offset = host if flags & ST_OFFSET_VALID else None
            present = bool(flags & ST_ALLOCATED)
            zero = bool(flags & ST_ZERO)
            data = bool(flags & ST_DATA)
            if cur is not None and cur[0] + cur[1] == a and cur[2] == depth and \
                    cur[3] == present and cur[4] == zero and cur[5] == data and \
                    ((cur[6] is None and offset is None) or
                     (cur[6] is not None and offset is not None and cur[6] + cur[1] == offset)):
                cur[1] += n
                continue
            if cur is not None:
                yield Extent(*cur)
            cur = [a, n, depth, present, zero, data, offset]
        if cur is not None:
            yield Extent(*cur)
        elif start >= end:
            # qemu-img map prints one empty entry for an empty range; so do we.
            yield Extent(start, 0, 0, False, False, False, None)

    # -- description -----------------------------------------------------------
    def info(self) -> dict:  # pragma: no cover - abstract
        raise NotImplementedError

    def backing_chain(self) -> list["Image"]:
        out = []
        img: Image | None = self
        while img is not None:
            out.append(img)
            img = img.backing
        return out

    # -- writing: read-only unless opened with mode "r+" -----------------------------
    writable = False

    def pwrite(self, data, offset: int) -> int:
        raise ReadOnlyError(f"image '{self.filename}' is open read-only")

    def write_zeroes(self, offset: int, n: int) -> None:
        raise ReadOnlyError(f"image '{self.filename}' is open read-only")

    def discard(self, offset: int, n: int) -> None:
        raise ReadOnlyError(f"image '{self.filename}' is open read-only")

    def flush(self) -> None:
        pass

    # -- file object -------------------------------------------------------------
    def file(self) -> "ImageFile":
        return ImageFile(self)

    # -- lifetime -----------------------------------------------------------------
    def close(self) -> None:
        if self.backing is not None:
            self.backing.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def _actual_size(be: Backend) -> int:
    try:
        return be.allocated_size()
    except OSError:
        return -1


# ---------------------------------------------------------------------------
# raw
# ---------------------------------------------------------------------------

class RawImage(Image):
    format = "raw"

    def __init__(self, backend: Backend, filename: str, *, writable: bool = False):
        self.be = backend
        self.filename = filename
        self.writable = writable
        # QEMU sizes block nodes in 512-byte sectors, rounding a raw file's length up.
        self.file_size = backend.size()
        self.size = (self.file_size + 511) & ~511

    def _read(self, mv, offset):
        got = self.be.readinto(mv, offset)
        if got < len(mv):
            _zero_fill(mv[got:])

    def _status_runs(self, start, end):
        pos = start
        for off, n in self.be.data_regions(start, min(end, self.file_size)):
            if off > pos:
                yield pos, off - pos, ST_ZERO | ST_OFFSET_VALID, pos
            stop = min(off + n, end)
            yield off, stop - off, ST_DATA | ST_OFFSET_VALID, off
            pos = stop
        if pos < end:
            yield pos, end - pos, ST_ZERO | ST_OFFSET_VALID, pos

    # -- writing (mode "r+") ------------------------------------------------------
    def _check_write(self, offset: int, n: int) -> None:
        if not self.writable:
            raise ReadOnlyError(f"image '{self.filename}' is open read-only")
        if offset < 0 or n < 0 or offset + n > self.size:
            raise ValueError(f"range {offset}+{n} is outside the disk (size {self.size})")

    def pwrite(self, data, offset: int) -> int:
        mv = memoryview(data).cast("B")
        self._check_write(offset, len(mv))
        return self.be.pwrite(mv, offset)

    def write_zeroes(self, offset: int, n: int) -> None:
        self._check_write(offset, n)
        if n and self.be.can_punch_holes:
            try:
                self.be.punch_hole(offset, n)
                return
            except OSError:
                pass
        chunk = bytes(min(n, 1 << 20))
        pos = offset
        while pos < offset + n:
            k = min(len(chunk), offset + n - pos)
            self.be.pwrite(memoryview(chunk)[:k], pos)
            pos += k

    def discard(self, offset: int, n: int) -> None:
        self.write_zeroes(offset, n)

    def flush(self) -> None:
        if self.writable:
            self.be.flush()

    def info(self) -> dict:
        return {"virtual-size": self.size, "filename": self.filename, "format": "raw",
                "actual-size": _actual_size(self.be), "dirty-flag": False}

    def close(self):
        self.be.close()


# ---------------------------------------------------------------------------
# qcow2
# ---------------------------------------------------------------------------

class Qcow2Image(Image):
    format = "qcow2"

    def __init__(self, backend: Backend, filename: str, *, untrusted: bool = False,
                 snapshot=None, open_backing: bool = True,
                 max_backing_depth: int = C.MAX_BACKING_DEPTH, chain: tuple = (),
                 depth: int = 0, l2_cache_bytes: int = C.DEFAULT_L2_CACHE_BYTES,
                 force_share: bool = False, limits=None):
        self.be = backend
        self.filename = filename
        self.untrusted = untrusted
        self._force_share = force_share
        self.file_size = backend.size()
        self.header = h = Header.parse(self._read_meta, self.file_size)
        charge = None
        if untrusted:
            from . import untrusted as U
            limits = U.resolve(limits)
            U.check_header(h, self.file_size, limits)
            self._budget = U.Budget(limits)     # metadata bytes, charged before reads
            charge = self._budget.charge_snapshot_table
        self.cluster_size = h.cluster_size
        self.cluster_bits = h.cluster_bits
        self.size = h.size
        self.encrypted = h.crypt_method != C.CRYPT_NONE
        self._l2_entries = 1 << h.l2_bits
        self._l2_span_bits = h.cluster_bits + h.l2_bits
        self._unit_shift = h.cluster_bits - (5 if h.extended_l2 else 0)
        # reads within one cluster of a plain L2 entry skip the run decoder
        self._fast_reads = not h.extended_l2 and not h.has_data_file
        # compressed clusters per batch: 4 MiB of output (2 clusters of 2 MiB), which
        # bounds the read buffer to ~8 MiB whatever the cluster size
        self._batch_max = max(2, (4 << 20) >> h.cluster_bits)
        self._l1: list[int] | None = None
        self._l1_offset = h.l1_table_offset
        self._l1_entries = h.l1_size
        self._l1_what = "active L1 table"
        self._lock = threading.RLock()
        self._l2c = TableCache(h.cluster_size, l2_cache_bytes, self._read_meta, self._write_meta,
                               on_pressure=self._cache_pressure)
        self._tls = threading.local()
        self._meta_prealloc: bool | None = None
        self._kernels = None
        self.snapshots_list: list[Snapshot] = read_snapshot_table(
            self._read_meta, h.snapshots_offset, h.nb_snapshots, self.file_size, charge)
        self.snapshot: Snapshot | None = None
        self.data_be: Backend = backend
        self.data_filename: str | None = None
        self.data_display_name: str | None = None
        self.backing = None
        self.backing_filename = h.backing_file
        self.full_backing_filename = (combine_path(filename, h.backing_file)
                                      if h.backing_file else None)
        try:
            if snapshot is not None:
                self._select_snapshot(snapshot)
            if h.has_data_file and (open_backing or self.be.writable):
                self._open_data_file()
            elif h.has_data_file:
                # info without the chain: the data file is named, not opened (reads of
                # guest data refuse instead of looking in the wrong file)
                self.data_be = None
            if h.backing_file and open_backing:
                self._open_backing(max_backing_depth, chain, depth)
            if untrusted:
                # before the first data read: every L1/L2/refcount entry is checked
                U.scan(self, limits)
        except BaseException:
            self.close()
            raise

    # -- helpers ---------------------------------------------------------------
    def _read_meta(self, n: int, offset: int) -> bytes:
        return self.be.pread(n, offset)

    @property
    def kernels(self):
        if self._kernels is None:
            from . import kernels
            self._kernels = kernels
        return self._kernels

    def _select_snapshot(self, key) -> None:
        sn = find_snapshot(self.snapshots_list, key)
        if sn is None:
            raise Qcow2Error(f"Failed to load snapshot: snapshot {key!r} not found "
                             f"in '{self.filename}'")
        self.header.validate_snapshot_l1(sn)
        self.snapshot = sn
        self._l1_offset = sn.l1_table_offset
        self._l1_entries = sn.l1_size
        self._l1_what = f"L1 table of snapshot {sn.id}"

    def _open_data_file(self) -> None:
        name = self.header.data_file
        check_file_name(name, "external data file")
        if self.untrusted:
            raise UnsafeImageError(f"image '{self.filename}' uses an external data file "
                                   f"{name!r}; untrusted mode opens no other file")
        path = combine_path(self.filename, name)
        try:
            self.data_be = FileBackend(path, writable=self.be.writable)
            try:
                self.data_be.lock(write=self.be.writable, force_share=self._force_share)
            except OSError as exc:
                raise Qcow2Error(f"Could not open '{path}': {exc.strerror or exc}") from None
        except OSError as exc:
            raise _open_error(path, exc) from None
        self.data_filename = path
        self.data_display_name = name      # as stored: what qemu-img map prints

    def _open_backing(self, max_depth: int, chain: tuple, depth: int) -> None:
        name = self.header.backing_file
        check_file_name(name, "backing file")
        if self.untrusted:
            raise UnsafeImageError(f"image '{self.filename}' has a backing file {name!r}; "
                                   f"untrusted mode opens no other file")
        if depth + 1 > max_depth:
            raise UnsafeImageError(f"backing chain of '{self.filename}' is deeper than "
                                   f"{max_depth} images")
        fmt = self.header.backing_format
        if fmt is not None and fmt not in ("qcow2", "raw"):
            raise UnsupportedFeatureError(f"backing file format {fmt!r} of "
                                          f"'{self.filename}' is not supported",
                                          feature=f"format {fmt}")
        self.backing = open_image(self.full_backing_filename, format=fmt,
                                  force_share=self._force_share,
                                  max_backing_depth=max_depth, _chain=chain, _depth=depth + 1)

    # -- metadata tables --------------------------------------------------------
    def _l1_table(self) -> list[int]:
        if self._l1 is None:
            n, off = self._l1_entries, self._l1_offset
            if n and off + n * 8 > self.file_size:
                raise CorruptImageError(
                    f"{self._l1_what} at {off:#x} ({n} entries) extends past the end of "
                    f"the file (size {self.file_size:#x})", offset=off, size=n * 8,
                    what="L1 table")
            raw = self._read_meta(n * 8, off) if n else b""
            self._l1 = list(struct.unpack(f">{n}Q", raw))
        return self._l1

    def _write_meta(self, data, offset: int) -> None:
        raise ReadOnlyError(f"image '{self.filename}' is open read-only")

    def _cache_pressure(self) -> None:
        pass

    def _l2_table(self, l1_index: int, l2_offset: int):
        with self._lock:
            if l2_offset in self._l2c:
                return self._l2c.get(l2_offset)
        if l2_offset & (self.cluster_size - 1):
            raise CorruptImageError(
                f"L2 table offset {l2_offset:#x} unaligned (L1 index: {l1_index:#x})",
                offset=self._l1_offset + l1_index * 8, size=8, what="L1 entry")
        if l2_offset + self.cluster_size > self.file_size:
            raise CorruptImageError(
                f"L2 table for L1 index {l1_index} at {l2_offset:#x} extends past the end "
                f"of the file (size {self.file_size:#x})", offset=l2_offset,
                size=self.cluster_size, what="L2 table")
        with self._lock:
            return self._l2c.get(l2_offset)

    def _runs(self, start: int, end: int) -> Iterator[tuple[int, int, int, int, int]]:
        """Decode the mapping of [start, end) into runs (guest, length, kind, host, csize).

        For data-carrying kinds ``host`` is the host offset of ``guest``; for compressed
        clusters it is the compressed data offset of the whole cluster.
        """
        l1 = self._l1_table()
        span_bits = self._l2_span_bits
        mask = C.L1E_OFFSET_MASK
        cbits = self.cluster_bits
        ushift = self._unit_shift
        h = self.header
        k = self.kernels
        pos = start
        n_l1 = len(l1)
        while pos < end:
            idx = pos >> span_bits
            l2_off = l1[idx] & mask if idx < n_l1 else 0
            if l2_off == 0:
                j = idx + 1
                while (j << span_bits) < end and (j >= n_l1 or not l1[j] & mask):
                    j += 1
                stop = min(end, j << span_bits)
                yield pos, stop - pos, C.KIND_UNALLOC, 0, 0
                pos = stop
                continue
            table_end = min(end, (idx + 1) << span_bits)
            table = self._l2_table(idx, l2_off)
            first = (pos >> cbits) & (self._l2_entries - 1)
            last = ((table_end - 1) >> cbits) & (self._l2_entries - 1)
            kinds, starts, lens, hosts, csizes = k.l2_runs(
                table, first, last - first + 1, cluster_bits=cbits, extended=h.extended_l2,
                data_file=h.has_data_file, table_offset=l2_off)
            base = (idx << span_bits) + (first << cbits)
            for kind, s, n, host, csize in zip(kinds.tolist(), starts.tolist(), lens.tolist(),
                                               hosts.tolist(), csizes.tolist()):
                g = base + (s << ushift)
                gend = g + (n << ushift)
                a = g if g > pos else pos
                b = gend if gend < table_end else table_end
                if a >= b:
                    continue
                if kind == C.KIND_COMPRESSED:
                    yield a, b - a, kind, host, csize
                elif kind in _HOST_KINDS:
                    yield a, b - a, kind, host + (a - g), 0
                else:
                    yield a, b - a, kind, 0, 0
            pos = table_end

    # -- reading ------------------------------------------------------------------
    def _decompressor(self):
        d = getattr(self._tls, "dec", None)
        if d is None:
            # Untrusted images decode with zlib's exact rules (libdeflate, the fast
            # default, accepts a few malformed streams that QEMU refuses).
            d = self._tls.dec = self.kernels.Decompressor(self.header.compression_type,
                                                          self.cluster_size,
                                                          strict=self.untrusted)
        return d

    def _require_readable(self) -> None:
        if self.data_be is None:
            raise Qcow2Error(f"'{self.filename}' was opened without its external data file "
                             f"{self.header.data_file!r} (backing=False): its data cannot "
                             f"be read")
        if self.untrusted and self.header.corrupt:
            at = C.HEADER_INCOMPATIBLE_OFFSET
            err = UnsafeImageError(f"image '{self.filename}' is marked corrupt; untrusted "
                                   f"mode does not read it (at offset {at:#x})")
            err.offset, err.size, err.what = at, 8, "header"  # type: ignore[attr-defined]
            raise err
        if self.encrypted:
            raise UnsupportedFeatureError(
                f"reading encrypted images is not supported ('{self.filename}' uses "
                f"{'LUKS' if self.header.crypt_method == C.CRYPT_LUKS else 'AES'} encryption)",
                feature="encryption")

    def _one_cluster(self, offset: int):
        """Fast path for reads inside one cluster (random 4 KiB reads): the host offset
        of ``offset`` for a plain data entry, -1 for an unallocated one, None for any
        other entry (zero flags, compressed, reserved bits, ...: the kernel decodes
        those, with its checks)."""
        l1 = self._l1
        if l1 is None:
            l1 = self._l1_table()
        idx = offset >> self._l2_span_bits
        if idx >= len(l1):
            return None
        l2_off = l1[idx] & C.L1E_OFFSET_MASK
        if not l2_off:
            return -1
        table = self._l2_table(idx, l2_off)
        index = (offset >> self.cluster_bits) & (self._l2_entries - 1)
        entry = _unpack_u64(table, index << 3)[0]
        if not entry:
            return -1
        cmask = self.cluster_size - 1
        if entry & _NOT_PLAIN_DATA or not entry & C.L2E_OFFSET_MASK or entry & cmask:
            return None
        return (entry & C.L2E_OFFSET_MASK) + (offset & cmask)

    def _read(self, mv: memoryview, offset: int) -> None:
        self._require_readable()
        n = len(mv)
        end = offset + n
        cbits = self.cluster_bits
        if self._fast_reads and offset >> cbits == (end - 1) >> cbits:
            host = self._one_cluster(offset)
            if host is not None:
                if host >= 0:
                    got = self.data_be.readinto(mv, host)
                    if got < n:
                        _zero_fill(mv[got:])
                elif self.backing is None:
                    _zero_fill(mv)
                else:
                    self.backing._read_clipped(mv, offset)
                return
        batch: list[tuple[int, int, int, int]] = []
        for a, n, kind, host, csize in self._runs(offset, end):
            dst = mv[a - offset:a - offset + n]
            if kind == C.KIND_DATA:
                # (compressed clusters keep collecting: each run has its own part of mv)
                got = self.data_be.readinto(dst, host)
                if got < n:
                    _zero_fill(dst[got:])
            elif kind == C.KIND_COMPRESSED:
                batch.append((a, n, host, csize))
                if len(batch) >= self._batch_max:
                    self._read_compressed(mv, offset, batch)
                    batch = []
            elif kind in (C.KIND_ZERO, C.KIND_ZERO_ALLOC):
                _zero_fill(dst)
            else:
                if self.backing is None:
                    _zero_fill(dst)
                else:
                    self.backing._read_clipped(dst, a)
        if batch:
            self._read_compressed(mv, offset, batch)

    def _src_buffer(self, n: int) -> memoryview:
        """A per-thread buffer for compressed data, reused (a fresh one per batch
        costs a page fault per 4 KiB)."""
        buf = getattr(self._tls, "src", None)
        if buf is None or len(buf) < n:
            if n > 8 << 20:                     # (rare, big clusters): not kept
                return memoryview(bytearray(n))
            from .atomic import io_buffer
            buf = self._tls.src = io_buffer(max(n, 1 << 20))
        return buf[:n]

    def _read_compressed(self, mv: memoryview, offset: int, batch) -> None:
        """Decode a batch of compressed clusters ``(guest, length, host, csize)``.

        Their host ranges are read into one buffer with as few reads as possible
        (clusters less than a cluster -- at most 64 KiB -- apart share a read; qemu-img
        writes them back to back, with plain clusters in between), then all whole
        clusters are decoded by one kernel call, split across threads when big."""
        cs = self.cluster_size
        gap = min(cs, 64 << 10)
        groups: list[list[int]] = []            # [host start, host end, buffer offset]
        placed = []                             # (cluster, its offset in the buffer)
        pos = 0
        for c in sorted(batch, key=_by_host):
            h, e = c[2], c[2] + c[3]
            g = groups[-1] if groups else None
            if g is not None and h - g[1] <= gap:
                if e > g[1]:
                    g[1] = e
            else:
                if g is not None:
                    pos += g[1] - g[0]
                g = [h, e, pos]
                groups.append(g)
            placed.append((c, g[2] + h - g[0]))
        g = groups[-1]
        src = self._src_buffer(pos + g[1] - g[0])
        for glo, ghi, at in groups:
            got = self.be.readinto(src[at:at + ghi - glo], glo)
            if got < ghi - glo:
                _zero_fill(src[at + got:at + ghi - glo])   # zeros past EOF, as QEMU reads
        full = [p for p in placed if p[0][1] == cs]
        dec = self._decompressor()
        bad = None
        try:
            if full:
                bad = full
                self._decode_full(dec, mv, src, full, offset)
            for p in placed:
                if p[0][1] != cs:
                    bad = [p]
                    (a, n, _host, csize), so = p
                    cl = dec.decompress(src[so:so + csize])
                    within = a & (cs - 1)
                    mv[a - offset:a - offset + n] = memoryview(cl)[within:within + n]
        except DecompressionError as exc:
            idx = exc.index if exc.index is not None and exc.index < len(bad) else 0
            (a, _n, host, csize), _so = bad[idx]
            raise DecompressionError(
                f"compressed cluster at host offset {host:#x} (guest offset "
                f"{a & ~(cs - 1):#x}) does not decode to a full cluster: {exc}",
                offset=host, size=csize, index=idx) from None

    def _decode_full(self, dec, mv, src, full, offset: int) -> None:
        """Decode whole clusters ``(cluster, buffer offset)`` into ``mv``; big batches
        are split with a helper thread (the kernels release the GIL), unless this
        thread is already one of several workers (convert: ``serial_reads``)."""
        half = len(full) // 2
        if (half and len(full) * self.cluster_size >= _SPLIT_MIN
                and not getattr(_serial, "on", False)):
            pool = _decode_pool()
            try:
                fut = pool.submit(_decode_into, self._decompressor, mv, src, full[half:],
                                  offset) if pool is not None else None
            except RuntimeError:                # (interpreter shutting down)
                fut = None
            if fut is not None:
                try:
                    _decode_into(dec, mv, src, full[:half], offset)
                finally:
                    # the helper writes into mv and reads src: never leave before it
                    # is done, whatever happened here
                    exc = fut.exception()
                if exc is not None:
                    if isinstance(exc, DecompressionError) and exc.index is not None:
                        exc.index += half
                    raise exc
                return
        _decode_into(dec, mv, src, full, offset)

    # -- allocation status ----------------------------------------------------------
    def _metadata_preallocated(self) -> bool:
        """QEMU's qcow2_detect_metadata_preallocation: many more clusters referenced
        than the file really allocates means metadata-only preallocation."""
        if self._meta_prealloc is None:
            real_clusters = max(0, _actual_size(self.be)) // self.cluster_size
            threshold = max(real_clusters * 10 // 9, real_clusters + 2)
            end_cluster = (self.file_size + self.cluster_size - 1) // self.cluster_size
            rc = RefcountReader(self.header, self._read_meta, self.file_size)
            self._meta_prealloc = rc.count_referenced(end_cluster, threshold) >= threshold
        return self._meta_prealloc

    def _status_runs(self, start, end):
        self._require_readable()
        crypto = self.encrypted
        recurse = None
        for a, n, kind, host, _csize in self._runs(start, end):
            if kind == C.KIND_DATA:
                flags = ST_DATA
            elif kind == C.KIND_COMPRESSED:
                yield a, n, ST_DATA, 0
                continue
            elif kind == C.KIND_ZERO:
                yield a, n, ST_ZERO, 0
                continue
            elif kind == C.KIND_ZERO_ALLOC:
                flags = ST_ZERO
            elif kind == C.KIND_UNALLOC_ALLOC:
                flags = 0
            else:
                yield a, n, 0, 0
                continue
            if crypto:
                yield a, n, flags, 0
                continue
            flags |= ST_OFFSET_VALID
            if flags & ST_DATA:
                if recurse is None:
                    recurse = self._metadata_preallocated()
                if recurse:
                    yield from self._recurse_file(a, n, host)
                    continue
            yield a, n, flags, host

    def _recurse_file(self, a: int, n: int, host: int):
        """Data clusters of a metadata-preallocated image: the file's holes read as zeros."""
        be = self.data_be
        fsize = be.size()
        pos = host
        end = host + n
        flags = ST_DATA | ST_OFFSET_VALID
        for off, ln in be.data_regions(host, min(end, fsize)):
            if off > pos:
                yield a + (pos - host), off - pos, flags | ST_ZERO, pos
            stop = min(off + ln, end)
            yield a + (off - host), stop - off, flags, off
            pos = stop
        if pos < end:
            yield a + (pos - host), end - pos, flags | ST_ZERO, pos

    # -- description ------------------------------------------------------------------
    def snapshots(self) -> list[dict]:
        return [sn.info() for sn in self.snapshots_list]

    def bitmaps(self) -> list[dict]:
        """The persistent dirty bitmaps as qemu-img info lists them."""
        h = self.header
        if h.bitmaps_ext is None:
            return []
        nb, dsize, doff = h.bitmaps_ext
        if doff + dsize > self.file_size:
            raise CorruptImageError(
                f"bitmap directory at {doff:#x} ({dsize} bytes) extends past the end of the "
                f"file (size {self.file_size:#x})", offset=doff, size=dsize,
                what="bitmap directory")
        buf = self._read_meta(dsize, doff)
        out = []
        pos = 0
        for i in range(nb):
            if pos + 24 > len(buf):
                raise CorruptImageError(f"bitmap directory entry {i} at {doff + pos:#x} "
                                        f"overruns the directory", offset=doff + pos,
                                        what="bitmap directory")
            (_tab_off, _tab_size, flags, _btype, gbits, name_size,
             extra) = struct.unpack_from(">QIIBBHI", buf, pos)
            end = pos + 24 + extra + name_size
            if end > len(buf):
                raise CorruptImageError(f"bitmap directory entry {i} at {doff + pos:#x} "
                                        f"overruns the directory", offset=doff + pos,
                                        what="bitmap directory")
            name = buf[pos + 24 + extra:end].decode("utf-8", "surrogateescape")
            fl = []
            if flags & 1:
                fl.append("in-use")
            if flags & 2:
                fl.append("auto")
            out.append({"flags": fl, "name": name, "granularity": 1 << gbits})
            pos = (end + 7) & ~7
        return out

    def format_specific(self) -> dict:
        h = self.header
        comp = C.COMPRESSION_NAMES[h.compression_type]
        if h.version == 2:
            d = {"compat": "0.10", "compression-type": comp, "refcount-bits": h.refcount_bits}
            if self.encrypted:
                d["encrypt"] = self._encrypt_info()
            return d
        d = {"compat": "1.1", "compression-type": comp, "lazy-refcounts": h.lazy_refcounts}
        bms = self.bitmaps()
        if bms:
            d["bitmaps"] = bms
        d["refcount-bits"] = h.refcount_bits
        if self.encrypted:
            d["encrypt"] = self._encrypt_info()
        if h.data_file is not None:
            d["data-file"] = h.data_file
        if h.has_data_file:
            d["data-file-raw"] = h.data_file_raw
        d["corrupt"] = h.corrupt
        d["extended-l2"] = h.extended_l2
        return d

    def _encrypt_info(self) -> dict:
        if self.header.crypt_method == C.CRYPT_AES:
            return {"format": "aes"}
        from .luks import luks_info
        off, length = self.header.crypto_header
        return luks_info(self._read_meta, off, length, self.file_size)

    def info(self) -> dict:
        h = self.header
        d: dict = {}
        if h.backing_format is not None:
            d["backing-filename-format"] = h.backing_format
        if self.snapshots_list:
            d["snapshots"] = self.snapshots()
        d["virtual-size"] = self.size
        d["filename"] = self.filename
        d["cluster-size"] = self.cluster_size
        d["format"] = "qcow2"
        d["actual-size"] = _actual_size(self.be)
        d["format-specific"] = {"type": "qcow2", "data": self.format_specific()}
        if self.encrypted:
            d["encrypted"] = True
        if h.backing_file is not None:
            d["full-backing-filename"] = self.full_backing_filename
            d["backing-filename"] = h.backing_file
        d["dirty-flag"] = h.dirty
        return d

    def close(self) -> None:
        super().close()
        if self.data_be is not None and self.data_be is not self.be:
            self.data_be.close()
        self.be.close()


# ---------------------------------------------------------------------------
# file object view
# ---------------------------------------------------------------------------

class ImageFile(io.RawIOBase):
    """A read-only, seekable file object over an image's guest view."""

    def __init__(self, image: Image):
        super().__init__()
        self._img = image
        self._pos = 0

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def readinto(self, b) -> int:
        if self.closed:
            raise ValueError("I/O operation on closed file")
        n = self._img.readinto(b, self._pos)
        self._pos += n
        return n

    def read(self, size: int = -1) -> bytes:
        if size is None or size < 0:
            return self.readall()
        if self.closed:
            raise ValueError("I/O operation on closed file")
        data = self._img.pread(size, self._pos)    # (RawIOBase's read zeroes a new
        self._pos += len(data)                      # bytearray per call, then copies)
        return data

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        if whence == io.SEEK_SET:
            pos = offset
        elif whence == io.SEEK_CUR:
            pos = self._pos + offset
        elif whence == io.SEEK_END:
            pos = self._img.size + offset
        else:
            raise ValueError(f"invalid whence {whence}")
        if pos < 0:
            raise ValueError("negative seek position")
        self._pos = pos
        return pos

    def tell(self) -> int:
        return self._pos

    @property
    def size(self) -> int:
        return self._img.size


__all__ = ["Image", "Qcow2Image", "RawImage", "Extent", "ImageFile", "open_image", "serial_reads",
           "probe_format"]
