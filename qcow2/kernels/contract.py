"""The kernels' contract: what the native and the Python implementation share.

Both implementations validate their arguments with the checks below and build
their exceptions with the error builders below, so that they agree by
construction: same signature, same results, same exception types and messages.
The numbers come from ``qcow2.constants`` (the format) and mirror
``native/qcow2_native.h`` (the return codes); tests/test_kernels_contract.py
checks that the three agree.

The codec classes of both implementations derive from ``DecompressorBase`` and
``CompressorBase``, which hold the documentation and the shared methods.
"""

from __future__ import annotations

import array
import operator

from ..constants import (
    COMPRESSION_NAMES, COMPRESSION_ZLIB, COMPRESSION_ZSTD, L2E_EXTENDED_SIZE,
    L2E_OFFSET_MASK, L2E_SIZE, L2E_STD_RESERVED_MASK, MAX_CLUSTER_BITS, MAX_CLUSTER_SIZE,
    MIN_CLUSTER_BITS, MIN_CLUSTER_SIZE, OFLAG_COMPRESSED, OFLAG_ZERO,
    SUBCLUSTERS_PER_CLUSTER,
)
from ..errors import CorruptImageError, DecompressionError
from ..lightweight import Lock

#: QCOW2N_VERSION of native/qcow2_native.h this package was written against.
NATIVE_VERSION = 3

# --------------------------------------------------------------------------
# Names of the public API (the run kinds themselves are qcow2.constants.KIND_*)

KIND_NAMES = ("unalloc", "unalloc_alloc", "zero", "zero_alloc", "data", "compressed")

ALGO_ZLIB = COMPRESSION_ZLIB        #: qcow2 header compression_type 0: raw deflate
ALGO_ZSTD = COMPRESSION_ZSTD        #: qcow2 header compression_type 1: zstd
ALGO_NAMES = COMPRESSION_NAMES

# Return codes of the native kernels (QCOW2N_* in native/qcow2_native.h); the
# Python twin uses the same ones internally.
OK, EINVAL, ENOMEM, ENOSPC, EUNSUPPORTED, ESRCRANGE, EDSTRANGE = 0, -1, -2, -3, -4, -5, -6
EL2RESERVED, EL2BITMAP, EL2UNALIGNED = -10, -11, -12     # a bad L2 entry
EDATA, ESHORT, ELONG = -20, -21, -22                      # a bad compressed cluster

#: Run starts and lengths are uint32: a slice may hold at most this many units.
MAX_UNITS = 0xFFFF_FFFF

#: array.array typecodes and item sizes of l2_runs()'s five results (uint8,
#: uint32, uint32, uint64, uint32 on every platform CPython supports).
RUN_TYPECODES = ("B", "I", "I", "Q", "I")
RUN_ITEMSIZES = (1, 4, 4, 8, 4)
for _tc, _size in zip(RUN_TYPECODES, RUN_ITEMSIZES, strict=True):
    assert array.array(_tc).itemsize == _size, _tc

_np_mod = None


def numpy():
    """The numpy module, imported on first use (the native reader never needs it)."""
    global _np_mod
    if _np_mod is None:
        import numpy as np
        _np_mod = np
    return _np_mod


# --------------------------------------------------------------------------
# Argument checks

def byte_view(obj, *, writable: bool = False, what: str = "buffer") -> memoryview:
    """A flat, byte-format memoryview of any C-contiguous buffer."""
    mv = obj if isinstance(obj, memoryview) else memoryview(obj)
    if writable and mv.readonly:
        raise TypeError(f"{what} must be a writable buffer")
    if mv.ndim != 1 or mv.format != "B":
        mv = mv.cast("B")  # TypeError unless C-contiguous
    return mv


def as_index(value, name: str) -> int:
    """``value`` as an int (operator.index), or TypeError naming ``name``."""
    try:
        return operator.index(value)
    except TypeError:
        raise TypeError(f"{name} must be an integer, not {type(value).__name__}") from None


def check_l2_args(table, first, count, cluster_bits, extended):
    """Validate l2_runs() arguments: (byte view, entry size, first, count, cluster_bits)."""
    mv = byte_view(table, what="table")
    first = as_index(first, "first")
    count = as_index(count, "count")
    cluster_bits = as_index(cluster_bits, "cluster_bits")
    if not MIN_CLUSTER_BITS <= cluster_bits <= MAX_CLUSTER_BITS:
        raise ValueError(f"cluster_bits {cluster_bits} is outside "
                         f"{MIN_CLUSTER_BITS}..{MAX_CLUSTER_BITS}")
    if first < 0 or count < 0:
        raise ValueError(f"L2 slice start {first} and length {count} must not be negative")
    esize = L2E_EXTENDED_SIZE if extended else L2E_SIZE
    entries = len(mv) // esize
    if first + count > entries:
        raise ValueError(
            f"L2 slice [{first}, {first + count}) exceeds the table of {entries} entries")
    if count * SUBCLUSTERS_PER_CLUSTER > MAX_UNITS:
        raise ValueError(f"L2 slice of {count} entries is too long")
    return mv, esize, first, count, cluster_bits


def check_codec_args(algo, cluster_size):
    """Validate a codec's algorithm and cluster size: (algo, cluster_size)."""
    algo = as_index(algo, "algo")
    cluster_size = as_index(cluster_size, "cluster_size")
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
    level = as_index(level, "level")
    if algo == ALGO_ZLIB and not -1 <= level <= 9:
        raise ValueError(f"zlib level {level} is outside -1..9")
    if algo == ALGO_ZSTD and not (1 <= level <= 22 or -(1 << 17) <= level < 0):
        raise ValueError(f"zstd level {level} is outside -131072..-1 or 1..22")
    return level


def check_block_size(block_size) -> int:
    """Validate zero_blocks()' block size."""
    bs = as_index(block_size, "block_size")
    if bs <= 0:
        raise ValueError(f"block size {bs} must be positive")
    return bs


MAX_SECTOR = 4096        # largest sector of the sector-cipher kernels (native/xts.h)
SECTOR = 512             # their default: the sectors of LUKS data in qcow2


def check_sectors(sector_size, *buffers, per_sector=()):
    """Validate the sector-cipher kernels' arguments (xts_xor, cbc_unchain, cbc_lane):
    ``buffers`` are (view, name) pairs of whole sectors, all the same length;
    ``per_sector`` (view, name) pairs of 16 bytes per sector.  Returns the sector
    size and the number of sectors."""
    ss = as_index(sector_size, "sector_size")
    if ss <= 0 or ss % 16 or ss > MAX_SECTOR:
        raise ValueError(f"sector size {ss} must be a multiple of 16 up to {MAX_SECTOR}")
    size = len(buffers[0][0])
    for mv, name in buffers:
        if len(mv) != size or len(mv) % ss:
            raise ValueError(f"{name} is {len(mv)} bytes: expected {size}, whole "
                             f"{ss}-byte sectors")
    n = size // ss
    for mv, name in per_sector:
        if len(mv) != 16 * n:
            raise ValueError(f"{name} is {len(mv)} bytes: expected 16 per sector "
                             f"({16 * n})")
    return ss, n


def check_lane(data, lane, ivs, sector_size, j):
    """Validate cbc_lane()'s arguments: (data, lane, ivs views, sector size, sectors,
    step, blocks per sector)."""
    dmv = byte_view(data, writable=True, what="data")
    lmv = byte_view(lane, writable=True, what="lane")
    imv = byte_view(ivs, what="ivs")
    ss, n = check_sectors(sector_size, (dmv, "data"),
                          per_sector=((lmv, "lane"), (imv, "ivs")))
    j, blocks = as_index(j, "j"), ss // 16
    if j > blocks:
        raise ValueError(f"step {j} is past the {blocks} blocks of a sector")
    return dmv, lmv, imv, ss, n, j, blocks


def check_ivs(dest, first, mask):
    """Validate sector_ivs()' arguments: (dest view, first, mask)."""
    dmv = byte_view(dest, writable=True, what="dest")
    if len(dmv) % 16:
        raise ValueError(f"dest is {len(dmv)} bytes: expected 16 per sector")
    first, mask = as_index(first, "first"), as_index(mask, "mask")
    if first + len(dmv) // 16 > 1 << 64 or mask >= 1 << 64:
        raise ValueError("sector numbers and the mask must fit 64 bits")
    return dmv, first, mask


def _int_array(x, typecode: str, limit: int, name: str):
    if hasattr(x, "__array_interface__") and hasattr(x, "dtype"):
        np = numpy()
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
    """Validate decompress_into() arguments (the ranges are checked later):
    (dest view, src view, src offsets, src lengths, dest offsets or None, n)."""
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


# --------------------------------------------------------------------------
# Error builders

def l2_error(code: int, index: int, mv: memoryview, *, cluster_bits: int,
             extended: bool, table_offset: int) -> CorruptImageError:
    """The CorruptImageError for L2 error @code at table index @index."""
    esize = L2E_EXTENDED_SIZE if extended else L2E_SIZE
    pos = index * esize
    entry = int.from_bytes(mv[pos:pos + L2E_SIZE], "big")
    bitmap = int.from_bytes(mv[pos + L2E_SIZE:pos + esize], "big") if extended else 0
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


# --------------------------------------------------------------------------
# Shared pieces of the implementations

def empty_runs():
    """l2_runs()' result for an empty slice."""
    return tuple(array.array(tc) for tc in RUN_TYPECODES)


class Guard:
    """Refuse concurrent use of one codec object from two threads."""

    __slots__ = ("_lock",)

    def __init__(self):
        self._lock = Lock()

    def __enter__(self):
        if not self._lock.acquire(blocking=False):
            raise RuntimeError("codec object used from two threads at once; "
                               "create one per thread")

    def __exit__(self, *exc):
        self._lock.release()


class DecompressorBase:
    """Decompress qcow2 compressed clusters (one object per thread).

    ``algo``: 0 = zlib (raw deflate), 1 = zstd: the header's compression_type.
    A cluster decodes iff it yields exactly ``cluster_size`` bytes the way
    QEMU's decoder accepts it; output never exceeds the cluster.

    ``strict`` matters to the native implementation only: by default it
    decodes zlib clusters with libdeflate when built in (about twice as fast,
    identical on every valid stream, but lenient with a few malformed ones
    that zlib refuses); ``strict=True`` uses zlib alone, so that exactly the
    clusters QEMU refuses raise.  The Python twin is always strict.

    The object keeps a reusable decoder context, so it must not be used from
    two threads at once (a RuntimeError says so); create one per thread.
    """

    def __init__(self, algo, cluster_size, *, strict=False):
        self.algo, self.cluster_size = check_codec_args(algo, cluster_size)
        self.strict = bool(strict)
        self._guard = Guard()

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
        code, index = self._decompress_batch(dmv, smv, so, sl, do, n)
        if code != OK:
            raise batch_error(code, index, algo=self.algo, cluster_size=self.cluster_size,
                              src_size=len(smv), dest_size=len(dmv), src_offsets=so,
                              src_lengths=sl, dest_offsets=do, src_file_offset=src_file_offset)

    def _decompress_batch(self, dmv, smv, so, sl, do, n) -> tuple[int, int]:
        """Decode ``n`` >= 1 clusters (arguments as prepare_batch() returns them):
        (OK, 0), or (error code, index of the cluster it concerns)."""
        raise NotImplementedError  # each implementation defines it


class CompressorBase:
    """Compress whole clusters the way QEMU writes them (one per thread).

    ``compress()`` returns None when QEMU would not store the result (it does
    not fit in ``cluster_size - 1`` bytes; for zlib, exactly as QEMU's call,
    ``cluster_size - 2``): QEMU then writes the cluster uncompressed.

    zlib clusters are always compressed with the system zlib and QEMU's
    parameters (a 4 KiB window): the same bytes in both implementations and as
    qemu-img.  (libdeflate's compressor would be 1.7x faster, but its matches
    reach 32 KiB back, which decoders that honour the 4 KiB window refuse.)
    ``strict`` matters to zstd in the native implementation only: by default
    clusters go to the newer of the system's libzstd and python-zstandard's
    (the same level and parameters); ``strict=True`` keeps QEMU's very call on
    the system library.  zstd output may differ in bytes between libzstd
    releases but always decodes to the same cluster.
    """

    def __init__(self, algo, cluster_size, level=None, *, strict=False):
        self.algo, self.cluster_size = check_codec_args(algo, cluster_size)
        self.level = check_level(self.algo, level)
        self.strict = bool(strict)
        self._guard = Guard()

    def compress(self, src):
        """Compress exactly one cluster; bytes, or None if it does not fit."""
        mv = byte_view(src, what="src")
        if len(mv) != self.cluster_size:
            raise ValueError(f"compress() takes one cluster ({self.cluster_size} "
                             f"bytes), not {len(mv)} bytes")
        return self._compress_one(mv)

    def compress_many(self, buf, n):
        """Compress the first ``n`` clusters of ``buf``: a list of bytes/None."""
        mv = byte_view(buf, what="buf")
        n = as_index(n, "n")
        cs = self.cluster_size
        if n < 0 or n * cs > len(mv):
            raise ValueError(f"{n} clusters of {cs} bytes do not fit in a buffer "
                             f"of {len(mv)} bytes")
        if n == 0:
            return []
        return self._compress_clusters(mv[:n * cs], n)

    def _compress_one(self, mv: memoryview):
        """Compress the one cluster ``mv`` holds (under the guard)."""
        raise NotImplementedError  # each implementation defines it

    def _compress_clusters(self, mv: memoryview, n: int) -> list:
        """Compress the ``n`` clusters that fill ``mv`` (under the guard)."""
        raise NotImplementedError  # each implementation defines it
