"""The native implementation: cffi wrappers over the C kernels in ``qcow2._native``.

Importing this module raises NativeUnavailableError when the extension is
missing, was built from another ``native/qcow2_native.h`` (QCOW2N_VERSION) or
disagrees with ``qcow2.constants`` / the contract on a shared number.  The
wrappers validate their arguments and build their exceptions with
``qcow2.kernels.contract``, exactly as the Python twin does.  A build without
zstd keeps every other kernel native and decodes zstd with the Python twin; zstd
clusters are compressed by the C loop on python-zstandard's libzstd where that
release is newer than the system's or the system's is not built in (see
:func:`_bundled_zstd_api`), else on the system's.

cffi releases the GIL around every C call, so threads run kernels in parallel.
"""

from __future__ import annotations

from array import array

from .. import constants as C
from ..errors import NativeUnavailableError
from ..lightweight import local
from . import contract
from .contract import (
    ALGO_ZSTD, EL2BITMAP, EL2RESERVED, EL2UNALIGNED, ENOMEM, ENOSPC, NATIVE_VERSION,
    RUN_ITEMSIZES, RUN_TYPECODES, CompressorBase, DecompressorBase, byte_view,
    SECTOR, check_block_size, check_codec_args, check_ivs, check_lane, check_l2_args, check_sectors,
    empty_runs, l2_error,
)

try:
    from .. import _native
except ImportError as exc:
    raise NativeUnavailableError(
        f"the native core qcow2._native is not available ({exc}); build it "
        f"with 'python setup.py build_ext --inplace' or use QCOW2_IMPL=python"
    ) from exc

ffi, lib = _native.ffi, _native.lib

if lib.qcow2n_version() != NATIVE_VERSION:
    raise NativeUnavailableError(
        f"qcow2._native is version {lib.qcow2n_version()} but this package needs "
        f"{NATIVE_VERSION}; rebuild it")

#: Python-side value of every number the extension also defines (QCOW2N_<name>).
SHARED_NUMBERS = {
    **{name: getattr(contract, name) for name in (
        "OK", "EINVAL", "ENOMEM", "ENOSPC", "EUNSUPPORTED", "ESRCRANGE", "EDSTRANGE",
        "EL2RESERVED", "EL2BITMAP", "EL2UNALIGNED", "EDATA", "ESHORT", "ELONG",
        "ALGO_ZLIB", "ALGO_ZSTD")},
    **{name: getattr(C, name) for name in (
        "KIND_UNALLOC", "KIND_UNALLOC_ALLOC", "KIND_ZERO", "KIND_ZERO_ALLOC", "KIND_DATA",
        "KIND_COMPRESSED", "MIN_CLUSTER_BITS", "MAX_CLUSTER_BITS", "MIN_CLUSTER_SIZE",
        "MAX_CLUSTER_SIZE", "L2E_SIZE", "L2E_EXTENDED_SIZE", "L2E_OFFSET_MASK",
        "L2E_STD_RESERVED_MASK", "OFLAG_COPIED", "OFLAG_COMPRESSED", "OFLAG_ZERO",
        "L2_BITMAP_ALLOC_MASK", "L2_BITMAP_ZERO_SHIFT", "L2E_COMPRESSED_FIELD_BITS",
        "COMPRESSED_SECTOR_SIZE")},
    "SUBCLUSTERS": C.SUBCLUSTERS_PER_CLUSTER,
}
for _name, _value in SHARED_NUMBERS.items():
    if getattr(lib, "QCOW2N_" + _name) != _value:
        raise NativeUnavailableError(
            f"qcow2._native disagrees with qcow2.constants on {_name}; rebuild it")

HAVE_ZSTD = bool(lib.qcow2n_features() & lib.QCOW2N_FEATURE_ZSTD)
IMPLEMENTATION = "native"
FEATURES = frozenset({"l2", "zero", "zlib", "xts"}
                     | ({"zstd"} if HAVE_ZSTD else set())
                     | ({"libdeflate"} if lib.qcow2n_features() & lib.QCOW2N_FEATURE_LIBDEFLATE
                        else set()))

if not hasattr(lib, "qcow2n_xts_xor"):
    raise NativeUnavailableError("qcow2._native has no sector-cipher kernels (xts.c); "
                                 "rebuild it")

NULL = ffi.NULL
L2_EXTENDED = lib.QCOW2N_L2_EXTENDED
L2_DATA_FILE = lib.QCOW2N_L2_DATA_FILE
L2_STRICT = lib.QCOW2N_L2_STRICT
DCTX_STRICT = lib.QCOW2N_DCTX_STRICT


class _NoBuffer:
    """Stands for ffi.from_buffer() of an absent array: NULL."""

    def __enter__(self):
        return NULL

    def __exit__(self, *exc):
        return False


_NO_BUFFER = _NoBuffer()


# --------------------------------------------------------------------------
# L2 tables

_scratch = local()
SCRATCH_MAX = 1 << 16       # runs; larger outputs get their own arrays
RUN_CTYPES = ("uint8_t[]", "uint32_t[]", "uint32_t[]", "uint64_t[]", "uint32_t[]")


def _run_arrays(cap):
    """(capacity, columns, qcow2n_runs *) with room for at least cap runs; a
    column is (typecode, item size, C array) for one of the five results.
    C-owned memory: no Python buffer stays exported between calls."""
    cached = getattr(_scratch, "runs", None)
    if cached is not None and cached[0] >= cap:
        return cached
    size = max(cap, 1024) if cap <= SCRATCH_MAX else cap
    arrays = tuple(ffi.new(ct, size) for ct in RUN_CTYPES)
    columns = tuple(zip(RUN_TYPECODES, RUN_ITEMSIZES, arrays, strict=True))
    entry = (size, columns, ffi.new("qcow2n_runs *", arrays))
    if size <= SCRATCH_MAX:
        _scratch.runs = entry      # one per thread: calls may run in parallel
    return entry


def l2_runs(table, first, count, *, cluster_bits, extended, data_file=False,
            strict=False, table_offset=0):
    """Decode entries [first, first + count) of an L2 table into runs (the contract
    and the results are those of :func:`qcow2.kernels.python.l2_runs`)."""
    mv, _esize, first, count, cluster_bits = check_l2_args(
        table, first, count, cluster_bits, extended)
    if count == 0:
        return empty_runs()
    flags = ((L2_EXTENDED if extended else 0)
             | (L2_DATA_FILE if data_file else 0)
             | (L2_STRICT if strict else 0))
    # Without subclusters there is at most one run per entry; with them
    # try a small capacity first and go to the worst case if needed.
    need = count if not extended else count * 2 + 64
    n_runs = ffi.new("size_t[2]")
    while True:
        cap, columns, runs = _run_arrays(need)
        # The table's buffer is released before any exception can be
        # raised: a memoryview with a live export caught in a garbage
        # cycle (an exception's traceback) crashes CPython's collector.
        with ffi.from_buffer(mv) as src:
            ret = lib.qcow2n_l2_runs(runs, cap, src, len(mv), first, count,
                                     cluster_bits, flags, n_runs, n_runs + 1)
        if ret == ENOSPC and need < count * C.SUBCLUSTERS_PER_CLUSTER:
            need = count * C.SUBCLUSTERS_PER_CLUSTER
            continue
        break
    if ret < 0:
        if ret in (EL2RESERVED, EL2BITMAP, EL2UNALIGNED):
            raise l2_error(ret, n_runs[1], mv, cluster_bits=cluster_bits,
                           extended=bool(extended), table_offset=table_offset)
        raise ValueError(f"qcow2n_l2_runs failed with code {ret}")  # pragma: no cover
    n = n_runs[0]
    out = []
    for tc, size, a in columns:
        r = array(tc)
        r.frombytes(ffi.buffer(a, n * size))
        out.append(r)
    return tuple(out)




# --------------------------------------------------------------------------
# Codecs

class Decompressor(DecompressorBase):
    __doc__ = DecompressorBase.__doc__

    def __new__(cls, algo, cluster_size, *, strict=False):
        algo, cluster_size = check_codec_args(algo, cluster_size)
        if algo == ALGO_ZSTD and not HAVE_ZSTD:
            from . import python as twin     # per-kernel fallback (not imported otherwise)
            return twin.Decompressor(algo, cluster_size, strict=strict)
        return super().__new__(cls)

    def __init__(self, algo, cluster_size, *, strict=False):
        super().__init__(algo, cluster_size, strict=strict)
        ctx = lib.qcow2n_dctx_new(self.algo, self.cluster_size,
                                  DCTX_STRICT if strict else 0)
        if ctx == NULL:
            raise MemoryError("cannot allocate a decompression context")
        self._ctx = ffi.gc(ctx, lib.qcow2n_dctx_free)
        self._bad = ffi.new("size_t *")

    def _decompress_batch(self, dmv, smv, so, sl, do, n):
        with self._guard, \
                ffi.from_buffer(dmv, require_writable=True) as dp, \
                ffi.from_buffer(smv) as sp, \
                ffi.from_buffer("uint64_t[]", so) as sop, \
                ffi.from_buffer("uint32_t[]", sl) as slp, \
                (_NO_BUFFER if do is None else ffi.from_buffer("uint64_t[]", do)) as dop:
            ret = lib.qcow2n_decompress(self._ctx, dp, len(dmv), sp, len(smv),
                                        sop, slp, dop, n, self._bad)
            return ret, self._bad[0]


_bundled_newer: list = []       # the answer of _bundled_zstd_is_newer, once known
_bundled_api: list = []         # the answer of _bundled_zstd_api, once known

#: python-zstandard's libzstd entry points a compression context calls, in the
#: order of qcow2n_cctx_new_zstd_api()
_ZSTD_API_NAMES = ("ZSTD_createCCtx", "ZSTD_freeCCtx", "ZSTD_CCtx_setParameter",
                   "ZSTD_compress2", "ZSTD_isError", "ZSTD_getErrorCode")


def _bundled_zstd_is_newer() -> bool:
    """True when python-zstandard's own libzstd is a newer release than the system's
    one linked here: newer releases compress faster at the same level (1.5.7 takes
    ~16% less CPU than 1.5.4 on 64 KiB clusters at level 3, and its frames are no
    larger)."""
    if not _bundled_newer:
        try:
            import zstandard
        except ImportError:                  # pragma: no cover - a dependency
            _bundled_newer.append(False)
        else:
            major, minor, release = zstandard.ZSTD_VERSION[:3]
            _bundled_newer.append(major * 10000 + minor * 100 + release
                                  > lib.qcow2n_zstd_version())
    return _bundled_newer[0]


def _bundled_zstd_api():
    """The entry points of python-zstandard's libzstd (its cffi module's), as the
    ``void *[]`` qcow2n_cctx_new_zstd_api() takes, or None where they cannot be had
    (no cffi module, another release than the package says, older than 1.4.0).

    The C loop then compresses a whole window of clusters on that copy of libzstd in
    one call without the GIL, where python-zstandard's own API takes a Python call,
    a new bytes object and a GIL round trip per cluster (about 9 us of 200)."""
    if not _bundled_api:
        api = None
        try:
            import zstandard
            from zstandard._cffi import ffi as zffi, lib as zlib_
        except ImportError:                  # pragma: no cover - wheels have both
            pass
        else:
            major, minor, release = zstandard.ZSTD_VERSION[:3]
            number = major * 10000 + minor * 100 + release
            if zlib_.ZSTD_versionNumber() == number >= 10400:
                try:
                    addrs = [int(zffi.cast("uintptr_t", zffi.addressof(zlib_, name)))
                             for name in _ZSTD_API_NAMES]
                except (AttributeError, TypeError):  # pragma: no cover
                    addrs = []
                if addrs and all(addrs):
                    # (the module stays loaded: it is in sys.modules and kept here)
                    api = (ffi.new("void *[]", [ffi.cast("void *", a) for a in addrs]),
                           zlib_)
        _bundled_api.append(api)
    return _bundled_api[0]


def _bundled_zstd_compresses(algo: int, strict: bool) -> bool:
    """True when python-zstandard's libzstd compresses these clusters: zstd ones, when
    the system's is not built in, or is older and ``strict`` does not ask for it."""
    return algo == ALGO_ZSTD and (not HAVE_ZSTD or (not strict and _bundled_zstd_is_newer()))


class Compressor(CompressorBase):
    __doc__ = CompressorBase.__doc__

    def __new__(cls, algo, cluster_size, level=None, *, strict=False):
        algo, cluster_size = check_codec_args(algo, cluster_size)
        if _bundled_zstd_compresses(algo, strict) and _bundled_zstd_api() is None:
            from . import python as twin     # per-kernel fallback
            return twin.Compressor(algo, cluster_size, level, strict=strict)
        return super().__new__(cls)

    def __init__(self, algo, cluster_size, level=None, *, strict=False):
        super().__init__(algo, cluster_size, level, strict=strict)
        if _bundled_zstd_compresses(self.algo, self.strict):
            # python-zstandard's libzstd, driven by the C loop
            fns, self._zstd_module = _bundled_zstd_api()
            ctx = lib.qcow2n_cctx_new_zstd_api(self.cluster_size, self.level, fns, len(fns))
        else:
            ctx = lib.qcow2n_cctx_new(self.algo, self.cluster_size, self.level)
        if ctx == NULL:
            raise MemoryError("cannot allocate a compression context")
        self._ctx = ffi.gc(ctx, lib.qcow2n_cctx_free)
        self._out = bytearray()              # reused: one compressor per thread
        self._sizes = ffi.new("int64_t[]", 0)

    def _compress_one(self, mv):
        return self._compress_clusters(mv, 1)[0]

    def _compress_clusters(self, mv, n):
        cs = self.cluster_size
        if len(self._out) < n * cs:          # (a fresh bytearray per call costs a
            self._out = bytearray(n * cs)    # memset and page faults per window)
            self._sizes = ffi.new("int64_t[]", n)
        out, sizes = self._out, self._sizes
        with self._guard:                    # (the buffers are this object's)
            with ffi.from_buffer(out) as dp, ffi.from_buffer(mv) as sp:
                ret = lib.qcow2n_compress(self._ctx, dp, len(out), sp, len(mv), n, sizes)
            if ret == ENOMEM:
                raise MemoryError("compression failed: out of memory")
            if ret != 0:  # pragma: no cover - arguments are checked above
                raise ValueError(f"qcow2n_compress failed with code {ret}")
            omv = memoryview(out)
            return [bytes(omv[i * cs:i * cs + s]) if s >= 0 else None
                    for i, s in zip(range(n), sizes, strict=False)]


# --------------------------------------------------------------------------
# Zero detection

def zero_blocks(buf, block_size):
    """One bool per ``block_size`` block of ``buf`` (the last may be short): True where
    the block is all zeros (as :func:`qcow2.kernels.python.zero_blocks`)."""
    mv = byte_view(buf, what="buf")
    bs = check_block_size(block_size)
    n = len(mv) // bs + (len(mv) % bs != 0)
    if not n:
        return memoryview(b"").cast("?")
    out = bytearray(n)
    with ffi.from_buffer(mv) as sp, ffi.from_buffer(out) as op:
        ret = lib.qcow2n_zero_blocks(op, n, sp, len(mv), bs)
    assert ret == 0, ret
    return memoryview(bytes(out)).cast("?")


def is_zero(buf) -> bool:
    """True when every byte of ``buf`` is zero."""
    mv = byte_view(buf, what="buf")
    with ffi.from_buffer(mv) as sp:
        return bool(lib.qcow2n_is_zero(sp, len(mv)))


# --------------------------------------------------------------------------
# Sector ciphers: the arithmetic around AES (native/xts.c)

def xts_xor(dest, src, tweaks, sector_size=SECTOR):
    """XTS masking (as :func:`qcow2.kernels.python.xts_xor`)."""
    dmv = byte_view(dest, writable=True, what="dest")
    smv, tmv = byte_view(src, what="src"), byte_view(tweaks, what="tweaks")
    ss, n = check_sectors(sector_size, (smv, "src"), (dmv, "dest"),
                          per_sector=((tmv, "tweaks"),))
    if not n:
        return
    with ffi.from_buffer(dmv, require_writable=True) as dp, ffi.from_buffer(smv) as sp, \
            ffi.from_buffer(tmv) as tp:
        ret = lib.qcow2n_xts_xor(dp, len(dmv), sp, len(smv), tp, len(tmv), ss)
    assert ret == 0, ret


def cbc_unchain(dest, plain, cipher, ivs, sector_size=SECTOR):
    """CBC chaining after ECB (as :func:`qcow2.kernels.python.cbc_unchain`)."""
    dmv = byte_view(dest, writable=True, what="dest")
    pmv, cmv = byte_view(plain, what="plain"), byte_view(cipher, what="cipher")
    imv = byte_view(ivs, what="ivs")
    ss, n = check_sectors(sector_size, (dmv, "dest"), (pmv, "plain"), (cmv, "cipher"),
                          per_sector=((imv, "ivs"),))
    if not n:
        return
    with ffi.from_buffer(dmv, require_writable=True) as dp, ffi.from_buffer(pmv) as pp, \
            ffi.from_buffer(cmv) as cp, ffi.from_buffer(imv) as ip:
        ret = lib.qcow2n_cbc_unchain(dp, len(dmv), pp, len(pmv), cp, len(cmv), ip,
                                     len(imv), ss)
    assert ret == 0, ret


def cbc_lane(data, lane, ivs, sector_size, j):
    """One step of CBC encryption across sectors (as
    :func:`qcow2.kernels.python.cbc_lane`)."""
    dmv, lmv, imv, ss, n, j, blocks = check_lane(data, lane, ivs, sector_size, j)
    if not n:
        return
    with ffi.from_buffer(dmv, require_writable=True) as dp, \
            ffi.from_buffer(lmv, require_writable=True) as lp, ffi.from_buffer(imv) as ip:
        ret = lib.qcow2n_cbc_lane(dp, len(dmv), lp, len(lmv), ip, len(imv), ss, j)
    assert ret == 0, ret


def sector_ivs(dest, first, mask):
    """The plain IVs of sectors (as :func:`qcow2.kernels.python.sector_ivs`)."""
    dmv, first, mask = check_ivs(dest, first, mask)
    if not len(dmv):
        return
    with ffi.from_buffer(dmv, require_writable=True) as dp:
        ret = lib.qcow2n_sector_ivs(dp, len(dmv), first, mask)
    assert ret == 0, ret
