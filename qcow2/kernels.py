"""The qcow2 kernels: one API, a native (cffi) and a pure-Python implementation.

Choose with the environment variable ``QCOW2_IMPL`` (read once, at import):

``auto`` (default)
    the native core ``qcow2._native`` when it imports and its version matches,
    else the Python twins;
``native``
    the native core or NativeUnavailableError; ``QCOW2_REQUIRE_NATIVE=1`` turns
    ``auto`` into ``native`` (an explicit ``QCOW2_IMPL=python`` still wins);
``python``
    the Python twins (numpy, zlib, zstandard), even when the native core exists.

``implementation`` says which one is live ("native" or "python") and
``features`` names the native kernels in use (empty for Python): "l2", "zero",
"zlib", and when the build found them "zstd" and "libdeflate".  A native core
built without zstd keeps every other kernel native and decodes zstd with the
Python twin.

``get("native")`` / ``get("python")`` return either implementation as a
namespace with the same attributes as this module, for tests and benchmarks.

API (identical in both implementations)::

    l2_runs(table, first, count, *, cluster_bits, extended, data_file=False,
            strict=False, table_offset=0) -> (kinds, starts, lens, hosts, csizes)
    Decompressor(algo, cluster_size, *, strict=False)
        .decompress(src) -> bytes
        .decompress_into(dest, src, src_offsets, src_lengths, dest_offsets=None,
                         *, src_file_offset=None) -> None
    Compressor(algo, cluster_size, level=None)
        .compress(src_cluster) -> bytes | None
        .compress_many(buf, n) -> list[bytes | None]
    zero_blocks(buf, block_size) -> memoryview of format "?" (bools)
    is_zero(buf) -> bool

Native calls release the GIL; codec objects hold a reusable context and must
be used by one thread at a time (one object per thread; concurrent use raises
RuntimeError).  ``Decompressor(strict=True)`` decodes zlib clusters with zlib
only, refusing exactly what QEMU refuses; the default uses libdeflate when it
was built in (twice as fast, same bytes on every valid stream, but it accepts
a few malformed streams zlib rejects).  ``decompress_into`` writes straight
into ``dest`` (any writable buffer: bytearray, memoryview slice, numpy array);
``src_file_offset`` (the file offset of ``src[0]``) puts file offsets into
DecompressionError.offset.
"""

from __future__ import annotations

import os
import threading
import types

from . import _pykernels as _py
from ._pykernels import (  # noqa: F401 - re-exported constants
    ALGO_NAMES, ALGO_ZLIB, ALGO_ZSTD, KIND_COMPRESSED, KIND_DATA, KIND_NAMES,
    KIND_UNALLOC, KIND_UNALLOC_ALLOC, KIND_ZERO, KIND_ZERO_ALLOC,
)
from .errors import NativeUnavailableError

#: QCOW2N_VERSION this module was written against.
NATIVE_VERSION = 1

_API = ("l2_runs", "Decompressor", "Compressor", "zero_blocks", "is_zero")
_CONSTANTS = ("KIND_UNALLOC", "KIND_UNALLOC_ALLOC", "KIND_ZERO", "KIND_ZERO_ALLOC",
              "KIND_DATA", "KIND_COMPRESSED", "KIND_NAMES", "ALGO_ZLIB",
              "ALGO_ZSTD", "ALGO_NAMES")


def _namespace(implementation, features, **api):
    ns = types.SimpleNamespace(implementation=implementation,
                               features=frozenset(features), **api)
    for name in _CONSTANTS:
        setattr(ns, name, getattr(_py, name))
    return ns


_PYTHON = _namespace("python", (), **{name: getattr(_py, name) for name in _API})


# --------------------------------------------------------------------------
# Native wrappers

def _build_native():
    """The native namespace; raises NativeUnavailableError."""
    try:
        from . import _native  # type: ignore[attr-defined]
    except ImportError as exc:
        raise NativeUnavailableError(
            f"the native core qcow2._native is not available ({exc}); build it "
            f"with 'python setup.py build_ext --inplace' or use QCOW2_IMPL=python"
        ) from exc
    ffi, lib = _native.ffi, _native.lib
    version = lib.qcow2n_version()
    if version != NATIVE_VERSION:
        raise NativeUnavailableError(
            f"qcow2._native is version {version} but this package needs "
            f"{NATIVE_VERSION}; rebuild it")
    built = lib.qcow2n_features()
    have_zstd = bool(built & lib.QCOW2N_FEATURE_ZSTD)
    have_libdeflate = bool(built & lib.QCOW2N_FEATURE_LIBDEFLATE)
    features = {"l2", "zero", "zlib"}
    if have_zstd:
        features.add("zstd")
    if have_libdeflate:
        features.add("libdeflate")
    # The return codes are shared with the Python side: keep them in step.
    for name in ("EINVAL", "ENOMEM", "ENOSPC", "ESRCRANGE", "EDSTRANGE",
                 "EL2RESERVED", "EL2BITMAP", "EL2UNALIGNED", "EDATA", "ESHORT",
                 "ELONG", "KIND_UNALLOC", "KIND_UNALLOC_ALLOC", "KIND_ZERO",
                 "KIND_ZERO_ALLOC", "KIND_DATA", "KIND_COMPRESSED", "ALGO_ZLIB",
                 "ALGO_ZSTD"):
        if getattr(lib, "QCOW2N_" + name) != getattr(_py, name):
            raise NativeUnavailableError(
                f"qcow2._native disagrees with qcow2._pykernels on {name}; rebuild it")

    NULL = ffi.NULL
    QCOW2N_L2_EXTENDED = lib.QCOW2N_L2_EXTENDED
    QCOW2N_L2_DATA_FILE = lib.QCOW2N_L2_DATA_FILE
    QCOW2N_L2_STRICT = lib.QCOW2N_L2_STRICT
    QCOW2N_ENOSPC = lib.QCOW2N_ENOSPC

    class _NoBuffer:
        def __enter__(self):
            return NULL

        def __exit__(self, *exc):
            return False

    _NO_BUFFER = _NoBuffer()

    scratch = threading.local()
    SCRATCH_MAX = 1 << 16       # runs; larger outputs get their own arrays
    RUN_CTYPES = ("uint8_t[]", "uint32_t[]", "uint32_t[]", "uint64_t[]", "uint32_t[]")
    RUN_SIZES = (1, 4, 4, 8, 4)
    RUN_TYPECODES = _py.RUN_TYPECODES
    _array = __import__("array").array

    def run_arrays(cap):
        """(capacity, C arrays, qcow2n_runs *) with room for at least cap runs.
        C-owned memory: no Python buffer stays exported between calls."""
        cached = getattr(scratch, "runs", None)
        if cached is not None and cached[0] >= cap:
            return cached
        size = max(cap, 1024) if cap <= SCRATCH_MAX else cap
        arrays = tuple(ffi.new(ct, size) for ct in RUN_CTYPES)
        entry = (size, arrays, ffi.new("qcow2n_runs *", arrays))
        if size <= SCRATCH_MAX:
            scratch.runs = entry       # one per thread: calls may run in parallel
        return entry

    def l2_runs(table, first, count, *, cluster_bits, extended, data_file=False,
                strict=False, table_offset=0):
        mv, esize, first, count, cluster_bits = _py.check_l2_args(
            table, first, count, cluster_bits, extended)
        if count == 0:
            return _py._empty_runs()
        flags = ((QCOW2N_L2_EXTENDED if extended else 0)
                 | (QCOW2N_L2_DATA_FILE if data_file else 0)
                 | (QCOW2N_L2_STRICT if strict else 0))
        # Without subclusters there is at most one run per entry; with them
        # try a small capacity first and go to the worst case if needed.
        need = count if not extended else count * 2 + 64
        n_runs = ffi.new("size_t[2]")
        while True:
            cap, arrays, runs = run_arrays(need)
            # The table's buffer is released before any exception can be
            # raised: a memoryview with a live export caught in a garbage
            # cycle (an exception's traceback) crashes CPython's collector.
            with ffi.from_buffer(mv) as src:
                ret = lib.qcow2n_l2_runs(runs, cap, src, len(mv), first, count,
                                         cluster_bits, flags, n_runs, n_runs + 1)
            if ret == QCOW2N_ENOSPC and need < count * _py.SUBCLUSTERS:
                need = count * _py.SUBCLUSTERS
                continue
            break
        if ret < 0:
            if ret in (_py.EL2RESERVED, _py.EL2BITMAP, _py.EL2UNALIGNED):
                raise _py.l2_error(ret, n_runs[1], mv, cluster_bits=cluster_bits,
                                   extended=bool(extended),
                                   table_offset=table_offset)
            raise ValueError(f"qcow2n_l2_runs failed with code {ret}")  # pragma: no cover
        n = n_runs[0]
        out = []
        for tc, size, a in zip(RUN_TYPECODES, RUN_SIZES, arrays):
            r = _array(tc)
            r.frombytes(ffi.buffer(a, n * size))
            out.append(r)
        return tuple(out)

    class Decompressor:
        __doc__ = _py.Decompressor.__doc__

        def __new__(cls, algo, cluster_size, *, strict=False):
            algo, cluster_size = _py.check_codec_args(algo, cluster_size)
            if algo == _py.ALGO_ZSTD and not have_zstd:
                # per-kernel fallback
                return _py.Decompressor(algo, cluster_size, strict=strict)
            return super().__new__(cls)

        def __init__(self, algo, cluster_size, *, strict=False):
            self.algo, self.cluster_size = _py.check_codec_args(algo, cluster_size)
            self.strict = bool(strict)
            ctx = lib.qcow2n_dctx_new(self.algo, self.cluster_size,
                                      lib.QCOW2N_DCTX_STRICT if strict else 0)
            if ctx == NULL:
                raise MemoryError("cannot allocate a decompression context")
            self._ctx = ffi.gc(ctx, lib.qcow2n_dctx_free)
            self._bad = ffi.new("size_t *")
            self._guard = _py._Guard()

        def decompress(self, src) -> bytes:
            dest = bytearray(self.cluster_size)
            self.decompress_into(dest, src, (0,), (len(_py.byte_view(src)),))
            return bytes(dest)

        def decompress_into(self, dest, src, src_offsets, src_lengths,
                            dest_offsets=None, *, src_file_offset=None) -> None:
            dmv, smv, so, sl, do, n = _py.prepare_batch(
                dest, src, src_offsets, src_lengths, dest_offsets)
            if n == 0:
                return
            with self._guard, \
                    ffi.from_buffer(dmv, require_writable=True) as dp, \
                    ffi.from_buffer(smv) as sp, \
                    ffi.from_buffer("uint64_t[]", so) as sop, \
                    ffi.from_buffer("uint32_t[]", sl) as slp, \
                    (_NO_BUFFER if do is None else ffi.from_buffer("uint64_t[]", do)) as dop:
                ret = lib.qcow2n_decompress(self._ctx, dp, len(dmv), sp, len(smv),
                                            sop, slp, dop, n, self._bad)
                bad = self._bad[0]
            if ret != 0:
                raise _py.batch_error(
                    ret, bad, algo=self.algo, cluster_size=self.cluster_size,
                    src_size=len(smv), dest_size=len(dmv), src_offsets=so,
                    src_lengths=sl, dest_offsets=do, src_file_offset=src_file_offset)

    Decompressor.decompress.__doc__ = _py.Decompressor.decompress.__doc__
    Decompressor.decompress_into.__doc__ = _py.Decompressor.decompress_into.__doc__

    class Compressor:
        __doc__ = _py.Compressor.__doc__

        def __new__(cls, algo, cluster_size, level=None):
            algo, cluster_size = _py.check_codec_args(algo, cluster_size)
            if algo == _py.ALGO_ZSTD and not have_zstd:
                return _py.Compressor(algo, cluster_size, level)
            return super().__new__(cls)

        def __init__(self, algo, cluster_size, level=None):
            self.algo, self.cluster_size = _py.check_codec_args(algo, cluster_size)
            self.level = _py.check_level(self.algo, level)
            ctx = lib.qcow2n_cctx_new(self.algo, self.cluster_size, self.level)
            if ctx == NULL:
                raise MemoryError("cannot allocate a compression context")
            self._ctx = ffi.gc(ctx, lib.qcow2n_cctx_free)
            self._guard = _py._Guard()

        def _run(self, mv, n):
            cs = self.cluster_size
            out = bytearray(n * cs)
            sizes = ffi.new("int64_t[]", n)
            with self._guard, ffi.from_buffer(out) as dp, ffi.from_buffer(mv) as sp:
                ret = lib.qcow2n_compress(self._ctx, dp, len(out), sp, len(mv), n, sizes)
            if ret == _py.ENOMEM:
                raise MemoryError("compression failed: out of memory")
            if ret != 0:  # pragma: no cover - arguments are checked above
                raise ValueError(f"qcow2n_compress failed with code {ret}")
            omv = memoryview(out)
            return [bytes(omv[i * cs:i * cs + s]) if s >= 0 else None
                    for i, s in enumerate(sizes)]

        def compress(self, src):
            mv = _py.byte_view(src, what="src")
            if len(mv) != self.cluster_size:
                raise ValueError(f"compress() takes one cluster ({self.cluster_size} "
                                 f"bytes), not {len(mv)} bytes")
            return self._run(mv, 1)[0]

        def compress_many(self, buf, n):
            mv = _py.byte_view(buf, what="buf")
            n = _py._index(n, "n")
            cs = self.cluster_size
            if n < 0 or n * cs > len(mv):
                raise ValueError(f"{n} clusters of {cs} bytes do not fit in a buffer "
                                 f"of {len(mv)} bytes")
            if n == 0:
                return []
            return self._run(mv[:n * cs], n)

    Compressor.compress.__doc__ = _py.Compressor.compress.__doc__
    Compressor.compress_many.__doc__ = _py.Compressor.compress_many.__doc__

    def zero_blocks(buf, block_size):
        mv = _py.byte_view(buf, what="buf")
        bs = _py._index(block_size, "block_size")
        if bs <= 0:
            raise ValueError(f"block size {bs} must be positive")
        n = len(mv) // bs + (len(mv) % bs != 0)
        if not n:
            return memoryview(b"").cast("?")
        out = bytearray(n)
        with ffi.from_buffer(mv) as sp, ffi.from_buffer(out) as op:
            ret = lib.qcow2n_zero_blocks(op, n, sp, len(mv), bs)
        assert ret == 0, ret
        return memoryview(bytes(out)).cast("?")

    def is_zero(buf) -> bool:
        mv = _py.byte_view(buf, what="buf")
        with ffi.from_buffer(mv) as sp:
            return bool(lib.qcow2n_is_zero(sp, len(mv)))

    l2_runs.__doc__ = _py.l2_runs.__doc__
    zero_blocks.__doc__ = _py.zero_blocks.__doc__
    is_zero.__doc__ = _py.is_zero.__doc__
    return _namespace("native", features, l2_runs=l2_runs, Decompressor=Decompressor,
                      Compressor=Compressor, zero_blocks=zero_blocks, is_zero=is_zero)


_native_ns = None
_native_exc = None


def get(name: str = "auto"):
    """An implementation as a namespace: "native", "python" or "auto".

    "native" raises NativeUnavailableError when the native core is missing or
    does not match this package.
    """
    global _native_ns, _native_exc
    if name == "python":
        return _PYTHON
    if name not in ("native", "auto"):
        raise ValueError(f"unknown kernel implementation {name!r} "
                         f"(auto, native or python)")
    if _native_ns is None and _native_exc is None:
        try:
            _native_ns = _build_native()
        except NativeUnavailableError as exc:
            _native_exc = exc
    if _native_ns is not None:
        return _native_ns
    if name == "auto":
        return _PYTHON
    raise NativeUnavailableError(str(_native_exc)) from _native_exc


def _select():
    choice = os.environ.get("QCOW2_IMPL", "auto").strip().lower() or "auto"
    if choice not in ("auto", "native", "python"):
        raise ValueError(f"QCOW2_IMPL={choice!r}: expected auto, native or python")
    if os.environ.get("QCOW2_REQUIRE_NATIVE", "") not in ("", "0") and choice != "python":
        choice = "native"
    return get(choice)


_active = _select()

implementation: str = _active.implementation
features: frozenset = _active.features
l2_runs = _active.l2_runs
Decompressor = _active.Decompressor
Compressor = _active.Compressor
zero_blocks = _active.zero_blocks
is_zero = _active.is_zero

__all__ = ["implementation", "features", "get", "NATIVE_VERSION", *_API, *_CONSTANTS]
