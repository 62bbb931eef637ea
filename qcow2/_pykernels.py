"""Pure-Python twins of the native kernels (numpy, zlib, zstandard).

Every public name here has the same signature, results, exception types and
messages as its counterpart in ``qcow2._native`` (see ``qcow2/kernels.py``, which
picks one implementation and also uses the shared helpers below to validate
arguments and to build exceptions, so that both sides agree by construction).

numpy and zstandard are imported on first use only.
"""

from __future__ import annotations

import array
import operator
import threading
import zlib

from .errors import CorruptImageError, DecompressionError

# --------------------------------------------------------------------------
# Constants (mirror native/qcow2_native.h)

KIND_UNALLOC = 0        #: unallocated: read from the backing file, or zeros
KIND_UNALLOC_ALLOC = 1  #: extended L2: host cluster allocated, subcluster not
KIND_ZERO = 2           #: reads as zeros, no host cluster
KIND_ZERO_ALLOC = 3     #: reads as zeros, host cluster allocated
KIND_DATA = 4           #: data at the host offset
KIND_COMPRESSED = 5     #: one compressed cluster

KIND_NAMES = ("unalloc", "unalloc_alloc", "zero", "zero_alloc", "data",
              "compressed")

ALGO_ZLIB = 0           #: qcow2 header compression_type 0: raw deflate
ALGO_ZSTD = 1           #: qcow2 header compression_type 1: zstd
ALGO_NAMES = {ALGO_ZLIB: "zlib", ALGO_ZSTD: "zstd"}

# Return codes of the native kernels.
OK = 0
EINVAL = -1
ENOMEM = -2
ENOSPC = -3
EUNSUPPORTED = -4
ESRCRANGE = -5
EDSTRANGE = -6
EL2RESERVED = -10
EL2BITMAP = -11
EL2UNALIGNED = -12
EDATA = -20
ESHORT = -21
ELONG = -22

SUBCLUSTERS = 32
L2E_OFFSET_MASK = 0x00ff_ffff_ffff_fe00        # standard descriptor bits 9..55
L2E_STD_RESERVED_MASK = 0x3f00_0000_0000_01fe  # bits 1..8 and 56..61
OFLAG_COPIED = 1 << 63
OFLAG_COMPRESSED = 1 << 62
OFLAG_ZERO = 1

MIN_CLUSTER_SIZE = 512
MAX_CLUSTER_SIZE = 2 * 1024 * 1024

_np_mod = None


def _np():
    global _np_mod
    if _np_mod is None:
        import numpy
        _np_mod = numpy
    return _np_mod


# --------------------------------------------------------------------------
# Shared argument checks and error builders (used by both implementations)

def byte_view(obj, *, writable: bool = False, what: str = "buffer") -> memoryview:
    """A flat, byte-format memoryview of any C-contiguous buffer."""
    mv = obj if isinstance(obj, memoryview) else memoryview(obj)
    if writable and mv.readonly:
        raise TypeError(f"{what} must be a writable buffer")
    if mv.ndim != 1 or mv.format != "B":
        mv = mv.cast("B")  # TypeError unless C-contiguous
    return mv


def _index(value, name: str) -> int:
    try:
        return operator.index(value)
    except TypeError:
        raise TypeError(f"{name} must be an integer, not {type(value).__name__}") from None


def check_l2_args(table, first, count, cluster_bits, extended):
    """Validate l2_runs() arguments; returns (byte view, entry size)."""
    mv = byte_view(table, what="table")
    first = _index(first, "first")
    count = _index(count, "count")
    cluster_bits = _index(cluster_bits, "cluster_bits")
    if not 9 <= cluster_bits <= 21:
        raise ValueError(f"cluster_bits {cluster_bits} is outside 9..21")
    if first < 0 or count < 0:
        raise ValueError(f"L2 slice start {first} and length {count} must not be negative")
    esize = 16 if extended else 8
    entries = len(mv) // esize
    if first + count > entries:
        raise ValueError(
            f"L2 slice [{first}, {first + count}) exceeds the table of {entries} entries")
    if count * SUBCLUSTERS > 0xFFFF_FFFF:
        raise ValueError(f"L2 slice of {count} entries is too long")
    return mv, esize, first, count, cluster_bits


def l2_error(code: int, index: int, mv: memoryview, *, cluster_bits: int,
             extended: bool, table_offset: int) -> CorruptImageError:
    """The CorruptImageError for L2 error @code at table index @index."""
    esize = 16 if extended else 8
    pos = index * esize
    entry = int.from_bytes(mv[pos:pos + 8], "big")
    bitmap = int.from_bytes(mv[pos + 8:pos + 16], "big") if extended else 0
    offset = table_offset + pos
    where = f"L2 entry {index} at offset {offset:#x}"
    if code == EL2RESERVED:
        if entry & OFLAG_COMPRESSED:
            msg = (f"{where}: compressed cluster with a nonzero subcluster "
                   f"bitmap {bitmap:#018x}")
        else:
            mask = L2E_STD_RESERVED_MASK | (OFLAG_ZERO if extended else 0)
            msg = (f"{where}: reserved bits {entry & mask:#x} set in "
                   f"descriptor {entry:#018x}")
    elif code == EL2BITMAP:
        msg = (f"{where}: invalid subcluster bitmap {bitmap:#018x} for "
               f"descriptor {entry:#018x}")
    elif code == EL2UNALIGNED:
        msg = (f"{where}: cluster allocation offset "
               f"{entry & L2E_OFFSET_MASK:#x} unaligned to the cluster size "
               f"{1 << cluster_bits:#x}")
    else:  # pragma: no cover - the kernels return no other L2 code
        msg = f"{where}: error {code}"
    return CorruptImageError(msg, offset=offset, size=esize, what="L2 entry")


def check_codec_args(algo, cluster_size):
    algo = _index(algo, "algo")
    cluster_size = _index(cluster_size, "cluster_size")
    if algo not in ALGO_NAMES:
        raise ValueError(f"unknown compression algorithm {algo} (0 = zlib, 1 = zstd)")
    if (not MIN_CLUSTER_SIZE <= cluster_size <= MAX_CLUSTER_SIZE
            or cluster_size & (cluster_size - 1)):
        raise ValueError(f"cluster size {cluster_size} is not a power of two in 512..2M")
    return algo, cluster_size


def check_level(algo: int, level) -> int:
    """Normalise a compression level: None means the library default."""
    if level is None:
        return -1 if algo == ALGO_ZLIB else 3
    level = _index(level, "level")
    if algo == ALGO_ZLIB and not -1 <= level <= 9:
        raise ValueError(f"zlib level {level} is outside -1..9")
    if algo == ALGO_ZSTD and not (1 <= level <= 22 or -(1 << 17) <= level < 0):
        raise ValueError(f"zstd level {level} is outside -131072..-1 or 1..22")
    return level


def _int_array(x, typecode: str, limit: int, name: str):
    if hasattr(x, "__array_interface__") and hasattr(x, "dtype"):
        np = _np()
        a = np.asarray(x)
        want = np.uint64 if typecode == "Q" else np.uint32
        if a.ndim != 1:
            raise ValueError(f"{name} must be one-dimensional")
        if a.dtype != want:
            if a.dtype.kind not in "iu":
                raise TypeError(f"{name} must hold integers, not {a.dtype}")
            if a.size and (int(a.min()) < 0 or int(a.max()) > limit):
                raise ValueError(f"{name} holds values outside 0..{limit:#x}")
            a = a.astype(want)
        return np.ascontiguousarray(a)
    try:
        return array.array(typecode, x)
    except OverflowError:
        raise ValueError(f"{name} holds values outside 0..{limit:#x}") from None


def prepare_batch(dest, src, src_offsets, src_lengths, dest_offsets):
    """Validate decompress_into() arguments (the ranges are checked later)."""
    dmv = byte_view(dest, writable=True, what="dest")
    smv = byte_view(src, what="src")
    so = _int_array(src_offsets, "Q", (1 << 64) - 1, "src_offsets")
    sl = _int_array(src_lengths, "I", 0xFFFF_FFFF, "src_lengths")
    do = None if dest_offsets is None else _int_array(
        dest_offsets, "Q", (1 << 64) - 1, "dest_offsets")
    n = len(so)
    if len(sl) != n or (do is not None and len(do) != n):
        raise ValueError("src_offsets, src_lengths and dest_offsets differ in length")
    return dmv, smv, so, sl, do, n


def batch_error(code: int, index: int, *, algo: int, cluster_size: int,
                src_size: int, dest_size: int, src_offsets, src_lengths,
                dest_offsets, src_file_offset) -> Exception:
    """The exception for decompression error @code on cluster @index."""
    so = int(src_offsets[index])
    sl = int(src_lengths[index])
    if code == ESRCRANGE:
        return ValueError(
            f"compressed cluster {index}: source range {so:#x}+{sl:#x} is "
            f"outside the source buffer of {src_size:#x} bytes")
    if code == EDSTRANGE:
        do = (int(dest_offsets[index]) if dest_offsets is not None
              else index * cluster_size)
        return ValueError(
            f"compressed cluster {index}: destination slot {do:#x}+"
            f"{cluster_size:#x} is outside the destination buffer of "
            f"{dest_size:#x} bytes")
    if code == ENOMEM:
        return MemoryError(f"compressed cluster {index}: out of memory")
    name = ALGO_NAMES[algo]
    if src_file_offset is None:
        where, offset = f"compressed cluster {index}", None
    else:
        offset = src_file_offset + so
        where = f"compressed cluster {index} at offset {offset:#x}"
    if code == EDATA:
        msg = f"{where}: invalid {name} data"
    elif code == ESHORT:
        msg = f"{where}: {name} data ends before a full cluster"
    elif code == ELONG:
        msg = f"{where}: {name} frame goes on past the end of the cluster"
    else:  # pragma: no cover
        msg = f"{where}: {name} error {code}"
    return DecompressionError(msg, offset=offset, size=sl, index=index)


def check_ranges(n, smv, dmv, so, sl, do, cluster_size):
    """(code, index) of the first out-of-range cluster, or (0, 0)."""
    src_size, dest_size = len(smv), len(dmv)
    so = so.tolist()
    sl = sl.tolist()
    do = do.tolist() if do is not None else None
    for i in range(n):
        if so[i] > src_size or sl[i] > src_size - so[i]:
            return ESRCRANGE, i
        d = do[i] if do is not None else i * cluster_size
        if d > dest_size or cluster_size > dest_size - d:
            return EDSTRANGE, i
    return OK, 0


class _Guard:
    """Refuse concurrent use of one codec object from two threads."""

    __slots__ = ("_lock",)

    def __init__(self):
        self._lock = threading.Lock()

    def __enter__(self):
        if not self._lock.acquire(blocking=False):
            raise RuntimeError("codec object used from two threads at once; "
                               "create one per thread")

    def __exit__(self, *exc):
        self._lock.release()


# --------------------------------------------------------------------------
# L2 tables

#: array.array typecodes of l2_runs()'s five results (uint8, uint32, uint32,
#: uint64, uint32 on every platform CPython supports).
RUN_TYPECODES = ("B", "I", "I", "Q", "I")
for _tc, _size in zip(RUN_TYPECODES, (1, 4, 4, 8, 4)):
    assert array.array(_tc).itemsize == _size, _tc


def _empty_runs():
    return tuple(array.array(tc) for tc in RUN_TYPECODES)


def _runs_arrays(*cols):
    """numpy columns -> the array.array results both implementations return."""
    out = []
    for tc, col in zip(RUN_TYPECODES, cols):
        a = array.array(tc)
        a.frombytes(col.astype(f"={tc}").tobytes())
        out.append(a)
    return tuple(out)


def l2_runs(table, first, count, *, cluster_bits, extended, data_file=False,
            strict=False, table_offset=0):
    """Decode entries [first, first + count) of an L2 table into runs.

    Returns ``(kinds, starts, lens, hosts, csizes)``, ``array.array`` objects of
    typecodes B, I, I, Q, I (uint8, uint32, uint32, uint64, uint32: see
    RUN_TYPECODES), one element per run.  (Not numpy arrays: the native reader
    never imports numpy, which costs a CLI process ~0.1 s.)  The unit is a
    subcluster for extended L2 entries, else a cluster; ``starts`` count units
    from ``first``.  Raises CorruptImageError (what="L2 entry") for the first
    bad entry.
    """
    mv, esize, first, count, cluster_bits = check_l2_args(
        table, first, count, cluster_bits, extended)
    extended = bool(extended)
    if count == 0:
        return _empty_runs()
    np = _np()
    U = np.uint64
    words = np.frombuffer(mv, dtype=">u8", count=count * (esize // 8),
                          offset=first * esize).astype(U)
    if extended:
        e, bm = words[0::2], words[1::2]
    else:
        e, bm = words, None
    cs = 1 << cluster_bits

    # Cluster types, as QEMU's qcow2_get_cluster_type().
    comp = (e & U(OFLAG_COMPRESSED)) != 0
    off = e & U(L2E_OFFSET_MASK)
    has_off = off != 0
    if extended:
        zflag = np.zeros(count, bool)
    else:
        zflag = ((e & U(OFLAG_ZERO)) != 0) & ~comp
    plain = ~comp & ~zflag
    normal = plain & has_off
    if data_file:
        normal |= plain & ((e & U(OFLAG_COPIED)) != 0)
    unalloc = plain & ~normal
    zero_alloc = zflag & has_off
    zero_plain = zflag & ~has_off

    # Errors, in the native order: reserved bits, bitmap, alignment.
    if strict:
        reserved = U(L2E_STD_RESERVED_MASK | (OFLAG_ZERO if extended else 0))
        bad_res = ~comp & ((e & reserved) != 0)
        if extended:
            bad_res |= comp & (bm != 0)
    else:
        bad_res = np.zeros(count, bool)
    if extended:
        lo = bm & U(0xFFFF_FFFF)
        hi = bm >> U(32)
        bad_bm = (normal & ((lo & hi) != 0)) | (unalloc & (lo != 0))
    else:
        bad_bm = np.zeros(count, bool)
    bad_al = (normal | zero_alloc) & ((off & U(cs - 1)) != 0)
    bad = bad_res | bad_bm | bad_al
    if bad.any():
        i = int(np.argmax(bad))
        code = EL2RESERVED if bad_res[i] else EL2BITMAP if bad_bm[i] else EL2UNALIGNED
        raise l2_error(code, first + i, mv, cluster_bits=cluster_bits,
                       extended=extended, table_offset=table_offset)

    # Compressed descriptors: offset in bits 0..x-1, extra sectors above.
    shift = 62 - (cluster_bits - 8)
    coff = e & U((1 << shift) - 1)
    sectors = ((e >> U(shift)) & U((1 << (cluster_bits - 8)) - 1)) + U(1)
    csize = np.where(comp, sectors * U(512) - (coff & U(511)), U(0))

    # Per-entry kind when the whole cluster is one kind (always without
    # subclusters); extended entries with a mixed bitmap get 255 and are
    # split into 32 one-subcluster segments below.
    kind = np.full(count, KIND_UNALLOC, np.uint8)
    kind[comp] = KIND_COMPRESSED
    if not extended:
        unit = cs
        kind[zero_plain] = KIND_ZERO
        kind[zero_alloc] = KIND_ZERO_ALLOC
        kind[normal] = KIND_DATA
        seg_kind, seg_len = kind, np.ones(count, np.uint32)
        seg_host = np.where(normal | zero_alloc, off, np.where(comp, coff, U(0)))
        seg_csize, seg_first = csize, np.ones(count, bool)
    else:
        unit = cs // SUBCLUSTERS
        lo = bm & U(0xFFFF_FFFF)
        hi = bm >> U(32)
        full = U(0xFFFF_FFFF)
        mixed = np.zeros(count, bool)
        # normal: all zero / all allocated / none -> one kind for the cluster
        kind[normal & (hi == full)] = KIND_ZERO_ALLOC
        kind[normal & (hi == 0) & (lo == full)] = KIND_DATA
        kind[normal & (hi == 0) & (lo == 0)] = KIND_UNALLOC_ALLOC
        mixed |= normal & ~((hi == full) | ((hi == 0) & ((lo == full) | (lo == 0))))
        kind[unalloc & (hi == full)] = KIND_ZERO
        mixed |= unalloc & (hi != 0) & (hi != full)
        # Segments: one per uniform entry, 32 per mixed one.
        reps = np.where(mixed, SUBCLUSTERS, 1)
        ent = np.repeat(np.arange(count), reps)
        sc = (np.arange(ent.shape[0]) - np.repeat(np.cumsum(reps) - reps, reps)).astype(U)
        e_mixed = mixed[ent]
        abit = ((bm[ent] >> sc) & U(1)) != 0
        zbit = ((bm[ent] >> (sc + U(32))) & U(1)) != 0
        e_normal = normal[ent]
        mixed_kind = np.where(
            e_normal,
            np.where(zbit, KIND_ZERO_ALLOC, np.where(abit, KIND_DATA, KIND_UNALLOC_ALLOC)),
            np.where(zbit, KIND_ZERO, KIND_UNALLOC)).astype(np.uint8)
        seg_kind = np.where(e_mixed, mixed_kind, kind[ent])
        seg_len = np.where(e_mixed, 1, SUBCLUSTERS).astype(np.uint32)
        seg_host = np.where(e_normal, off[ent] + sc * U(unit),
                            np.where(comp[ent], coff[ent], U(0)))
        seg_csize = csize[ent]
        seg_first = sc == 0

    # Merge neighbouring segments into runs.
    nseg = seg_kind.shape[0]
    k1 = seg_kind[1:]
    hosted = (k1 == KIND_DATA) | (k1 == KIND_ZERO_ALLOC) | (k1 == KIND_UNALLOC_ALLOC)
    contiguous = seg_host[1:] == seg_host[:-1] + seg_len[:-1].astype(U) * U(unit)
    brk = np.empty(nseg, bool)
    brk[0] = True
    brk[1:] = ((k1 != seg_kind[:-1]) | ((k1 == KIND_COMPRESSED) & seg_first[1:])
               | (hosted & ~contiguous))
    seg_start = np.cumsum(seg_len, dtype=np.int64) - seg_len
    first_seg = np.flatnonzero(brk)
    starts = seg_start[first_seg]
    lens = np.diff(np.append(starts, count * (SUBCLUSTERS if extended else 1)))
    return _runs_arrays(seg_kind[first_seg], starts, lens, seg_host[first_seg],
                        seg_csize[first_seg])


# --------------------------------------------------------------------------
# Decompression

_zstd_cffi = None


def _zstd_lowlevel():
    """(ffi, lib) of python-zstandard's cffi backend, or None.

    With it the twin runs the very loop of the native kernel (and QEMU), so
    results match on any input; without it a frame-by-frame emulation on the
    public API is used (same on valid data, best effort on garbage).
    """
    global _zstd_cffi
    if _zstd_cffi is None:
        try:
            from zstandard._cffi import ffi, lib  # type: ignore[import-not-found]
            _zstd_cffi = (ffi, lib)
        except ImportError:
            _zstd_cffi = False
    return _zstd_cffi or None


class Decompressor:
    """Decompress qcow2 compressed clusters (one object per thread).

    ``algo``: 0 = zlib (raw deflate), 1 = zstd: the header's compression_type.
    A cluster decodes iff it yields exactly ``cluster_size`` bytes the way
    QEMU's decoder accepts it; output never exceeds the cluster.

    ``strict`` matters to the native implementation only: by default it
    decodes zlib clusters with libdeflate when built in (about twice as fast,
    identical on every valid stream, but lenient with a few malformed ones
    that zlib refuses); ``strict=True`` uses zlib alone, so that exactly the
    clusters QEMU refuses raise.  This twin is always strict.

    The object keeps a reusable decoder context, so it must not be used from
    two threads at once (a RuntimeError says so); create one per thread.
    """

    def __init__(self, algo, cluster_size, *, strict=False):
        self.algo, self.cluster_size = check_codec_args(algo, cluster_size)
        self.strict = bool(strict)
        self._guard = _Guard()
        self._dctx = None
        self._use_cffi = False
        if self.algo == ALGO_ZSTD:
            low = _zstd_lowlevel()
            if low is not None:
                ffi, lib = low
                dctx = lib.ZSTD_createDCtx()
                if dctx == ffi.NULL:
                    raise MemoryError("cannot allocate a zstd context")
                self._dctx = ffi.gc(dctx, lib.ZSTD_freeDCtx)
                self._in = ffi.new("ZSTD_inBuffer *")
                self._out = ffi.new("ZSTD_outBuffer *")
                self._use_cffi = True
            else:
                import zstandard
                self._zd = zstandard.ZstdDecompressor()

    def decompress(self, src) -> bytes:
        """Decompress one cluster from the whole of ``src``."""
        dest = bytearray(self.cluster_size)
        self.decompress_into(dest, src, (0,), (len(byte_view(src)),))
        return bytes(dest)

    def decompress_into(self, dest, src, src_offsets, src_lengths,
                        dest_offsets=None, *, src_file_offset=None) -> None:
        """Decompress n clusters from ``src`` straight into ``dest``.

        Cluster i is read from ``src[src_offsets[i]:][:src_lengths[i]]`` and
        written to ``dest[dest_offsets[i]:][:cluster_size]`` (default
        ``i * cluster_size``).  Offsets and lengths are sequences of ints or
        numpy integer arrays.  Ranges are all checked first (ValueError);
        then a bad cluster raises DecompressionError with ``.index`` = i (and
        ``.offset`` = ``src_file_offset + src_offsets[i]`` when the file
        offset of ``src`` is given); clusters before it are already written.
        """
        dmv, smv, so, sl, do, n = prepare_batch(
            dest, src, src_offsets, src_lengths, dest_offsets)
        if n == 0:
            return
        cs = self.cluster_size
        code, index = check_ranges(n, smv, dmv, so, sl, do, cs)
        if code == OK:
            with self._guard:
                if self.algo == ALGO_ZLIB:
                    code, index = self._zlib(dmv, smv, so, sl, do, n)
                elif self._use_cffi:
                    code, index = self._zstd_cffi(dmv, smv, so, sl, do, n)
                else:
                    code, index = self._zstd_public(dmv, smv, so, sl, do, n)
        if code != OK:
            raise batch_error(code, index, algo=self.algo, cluster_size=cs,
                              src_size=len(smv), dest_size=len(dmv),
                              src_offsets=so, src_lengths=sl, dest_offsets=do,
                              src_file_offset=src_file_offset)

    def _zlib(self, dmv, smv, so, sl, do, n):
        cs = self.cluster_size
        so, sl = so.tolist(), sl.tolist()
        do = do.tolist() if do is not None else range(0, n * cs, cs)
        for i in range(n):
            # A 32 KiB window where QEMU asks for 4 KiB: QEMU inflates a
            # whole cluster in one call, so back-references may reach any
            # byte already produced; zlib.decompressobj() works in chunks and
            # would refuse those beyond its window.  Same results otherwise.
            d = zlib.decompressobj(-15)
            try:
                out = d.decompress(smv[so[i]:so[i] + sl[i]], cs)
            except zlib.error:
                return EDATA, i
            if len(out) != cs:
                return ESHORT, i
            dmv[do[i]:do[i] + cs] = out
        return OK, 0

    def _zstd_cffi(self, dmv, smv, so, sl, do, n):
        ffi, lib = _zstd_lowlevel()
        cs = self.cluster_size
        so, sl = so.tolist(), sl.tolist()
        do = do.tolist() if do is not None else range(0, n * cs, cs)
        # Released on the way out (see kernels.py: live buffer exports in a
        # garbage cycle crash CPython's collector).
        with ffi.from_buffer(smv) as sp, ffi.from_buffer(dmv, require_writable=True) as dp:
            return self._zstd_loop(ffi, lib, sp, dp, so, sl, do, n)

    def _zstd_loop(self, ffi, lib, sp, dp, so, sl, do, n):
        cs = self.cluster_size
        inb, outb, dctx = self._in, self._out, self._dctx
        for i in range(n):
            lib.ZSTD_DCtx_reset(dctx, lib.ZSTD_reset_session_only)
            inb.src, inb.size, inb.pos = sp + so[i], sl[i], 0
            outb.dst, outb.size, outb.pos = dp + do[i], cs, 0
            zret = 0
            while outb.pos < cs:
                last_in, last_out = inb.pos, outb.pos
                zret = lib.ZSTD_decompressStream(dctx, outb, inb)
                if lib.ZSTD_isError(zret):
                    if lib.ZSTD_getErrorCode(zret) == lib.ZSTD_error_memory_allocation:
                        return ENOMEM, i
                    return EDATA, i
                if inb.pos <= last_in and outb.pos <= last_out:
                    return ESHORT, i
            if zret != 0:
                return ELONG, i
        return OK, 0

    def _zstd_public(self, dmv, smv, so, sl, do, n):
        """The zstd loop on python-zstandard's public API.

        Frame by frame, input fed 256 bytes at a time, so that a hostile frame
        never expands to more than a bounded amount past the cluster.  Equal
        to the native kernel on valid data; on corrupt data the kind of error
        may differ.
        """
        import zstandard
        cs = self.cluster_size
        so, sl = so.tolist(), sl.tolist()
        do = do.tolist() if do is not None else range(0, n * cs, cs)
        for i in range(n):
            data = smv[so[i]:so[i] + sl[i]]
            out = dmv[do[i]:do[i] + cs]
            produced = pos = 0
            while produced < cs:
                if pos >= len(data):
                    return ESHORT, i          # no frame left to start
                dobj = self._zd.decompressobj(write_size=cs)
                while True:
                    piece = data[pos:pos + 256]
                    if not piece:
                        # Input used up inside a frame.
                        return (ESHORT if produced < cs else ELONG), i
                    try:
                        chunk = dobj.decompress(piece)
                    except zstandard.ZstdError:
                        return (EDATA if produced < cs else ELONG), i
                    if produced + len(chunk) > cs:
                        return ELONG, i
                    out[produced:produced + len(chunk)] = chunk
                    produced += len(chunk)
                    if dobj.eof:
                        pos += len(piece) - len(dobj.unused_data)
                        break
                    pos += len(piece)
        return OK, 0


# --------------------------------------------------------------------------
# Compression

class Compressor:
    """Compress whole clusters the way QEMU writes them (one per thread).

    ``compress()`` returns None when QEMU would not store the result (it does
    not fit in ``cluster_size - 1`` bytes; for zlib, exactly as QEMU's call,
    ``cluster_size - 2``): QEMU then writes the cluster uncompressed.
    zlib output is byte-identical to the native kernel's (same system zlib);
    zstd output may differ in bytes (python-zstandard bundles its own libzstd)
    but always decodes to the same cluster.
    """

    def __init__(self, algo, cluster_size, level=None):
        self.algo, self.cluster_size = check_codec_args(algo, cluster_size)
        self.level = check_level(self.algo, level)
        self._guard = _Guard()
        if self.algo == ALGO_ZSTD:
            import zstandard
            self._zc = zstandard.ZstdCompressor(level=self.level)

    def _one(self, mv):
        if self.algo == ALGO_ZLIB:
            c = zlib.compressobj(self.level, zlib.DEFLATED, -12, 9,
                                 zlib.Z_DEFAULT_STRATEGY)
            out = c.compress(mv) + c.flush()
            # QEMU gives deflate(Z_FINISH) cluster_size - 1 bytes of room;
            # zlib reports Z_STREAM_END only with a byte to spare (an exactly
            # full buffer returns Z_OK), so a stream of cluster_size - 1
            # bytes is refused there too.
            limit = self.cluster_size - 2
        else:
            out = self._zc.compress(mv)
            limit = self.cluster_size - 1
        return out if len(out) <= limit else None

    def compress(self, src):
        """Compress exactly one cluster; bytes, or None if it does not fit."""
        mv = byte_view(src, what="src")
        if len(mv) != self.cluster_size:
            raise ValueError(f"compress() takes one cluster ({self.cluster_size} "
                             f"bytes), not {len(mv)} bytes")
        with self._guard:
            return self._one(mv)

    def compress_many(self, buf, n):
        """Compress the first ``n`` clusters of ``buf``: a list of bytes/None."""
        mv = byte_view(buf, what="buf")
        n = _index(n, "n")
        cs = self.cluster_size
        if n < 0 or n * cs > len(mv):
            raise ValueError(f"{n} clusters of {cs} bytes do not fit in a buffer "
                             f"of {len(mv)} bytes")
        with self._guard:
            return [self._one(mv[i * cs:(i + 1) * cs]) for i in range(n)]


# --------------------------------------------------------------------------
# Zero detection

def zero_blocks(buf, block_size):
    """Flags, one per block of ``buf``: True where block i is all zeros.

    The last block may be partial.  The result is a read-only memoryview of
    format "?" (``.tolist()`` gives bools, ``.tobytes()`` 0/1 bytes for
    ``bytes.find``), the same type from both implementations.
    """
    mv = byte_view(buf, what="buf")
    bs = _index(block_size, "block_size")
    if bs <= 0:
        raise ValueError(f"block size {bs} must be positive")
    np = _np()
    a = np.frombuffer(mv, np.uint8)
    size = a.shape[0]
    nfull = size // bs
    out = np.empty(nfull + (size % bs != 0), bool)
    if nfull:
        full = a[:nfull * bs]
        if bs % 8 == 0:
            full = full.view(np.uint64)
        out[:nfull] = ~full.reshape(nfull, -1).any(axis=1)
    if size % bs:
        out[nfull] = not a[nfull * bs:].any()
    return memoryview(out.tobytes()).cast("?")


def is_zero(buf) -> bool:
    """True when every byte of ``buf`` is zero (an empty buffer is)."""
    mv = byte_view(buf, what="buf")
    if not len(mv):
        return True
    np = _np()
    a = np.frombuffer(mv, np.uint8)
    if a.shape[0] % 8 == 0:
        a = a.view(np.uint64)
    return not a.any()
