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
"zlib", "xts" (the sector-cipher arithmetic), and when the build found them
"zstd" and "libdeflate".  A native core built without zstd keeps every other
kernel native and decodes zstd with the Python twin.

``get("native")`` / ``get("python")`` return either implementation as a
namespace with the same attributes as this module, for tests and benchmarks.

API (identical in both implementations)::

    l2_runs(table, first, count, *, cluster_bits, extended, data_file=False,
            strict=False, table_offset=0) -> (kinds, starts, lens, hosts, csizes)
    Decompressor(algo, cluster_size, *, strict=False)
        .decompress(src) -> bytes
        .decompress_into(dest, src, src_offsets, src_lengths, dest_offsets=None,
                         *, src_file_offset=None) -> None
    Compressor(algo, cluster_size, level=None, *, strict=False)
        .compress(src_cluster) -> bytes | None
        .compress_many(buf, n) -> list[bytes | None]
    zero_blocks(buf, block_size) -> memoryview of format "?" (bools)
    is_zero(buf) -> bool
    xts_xor(dest, src, tweaks, sector_size=512) -> None        # sector ciphers:
    cbc_unchain(dest, plain, cipher, ivs, sector_size=512) -> None  # the arithmetic
    cbc_lane(data, lane, ivs, sector_size, j) -> None          # around AES-ECB
    sector_ivs(dest, first, mask) -> None                      # (native/xts.h)

Native calls release the GIL; codec objects hold a reusable context and must
be used by one thread at a time (one object per thread; concurrent use raises
RuntimeError).  ``Decompressor(strict=True)`` decodes zlib clusters with zlib
only, refusing exactly what QEMU refuses; the default uses libdeflate when it
was built in (twice as fast, same bytes on every valid stream, but it accepts
a few malformed streams zlib rejects).  ``decompress_into`` writes straight
into ``dest`` (any writable buffer: bytearray, memoryview slice, numpy array);
``src_file_offset`` (the file offset of ``src[0]``) puts file offsets into
DecompressionError.offset.

The package, python-zstandard style: this module is the selection policy;
``contract`` holds what both implementations share (return codes, argument
checks, error builders, the codec base classes); ``python`` is the Python twin;
``native`` the cffi wrappers over ``qcow2._native`` (built from ``native/``).
"""

from __future__ import annotations

import os
import types

from ..constants import (
    KIND_COMPRESSED, KIND_DATA, KIND_UNALLOC, KIND_UNALLOC_ALLOC, KIND_ZERO, KIND_ZERO_ALLOC,
)
from ..errors import NativeUnavailableError
from .contract import ALGO_NAMES, ALGO_ZLIB, ALGO_ZSTD, KIND_NAMES, NATIVE_VERSION

_API = ("l2_runs", "Decompressor", "Compressor", "zero_blocks", "is_zero", "xts_xor",
        "cbc_unchain", "cbc_lane", "sector_ivs")
_CONSTANTS = {
    "KIND_UNALLOC": KIND_UNALLOC, "KIND_UNALLOC_ALLOC": KIND_UNALLOC_ALLOC,
    "KIND_ZERO": KIND_ZERO, "KIND_ZERO_ALLOC": KIND_ZERO_ALLOC, "KIND_DATA": KIND_DATA,
    "KIND_COMPRESSED": KIND_COMPRESSED, "KIND_NAMES": KIND_NAMES, "ALGO_ZLIB": ALGO_ZLIB,
    "ALGO_ZSTD": ALGO_ZSTD, "ALGO_NAMES": ALGO_NAMES,
}


def _namespace(module) -> types.SimpleNamespace:
    """An implementation module as a namespace with this module's attributes."""
    return types.SimpleNamespace(
        implementation=module.IMPLEMENTATION, features=module.FEATURES,
        **{name: getattr(module, name) for name in _API}, **_CONSTANTS)


_python_ns = None
_native_ns = None
_native_exc = None


def _python() -> types.SimpleNamespace:
    """The Python twin, imported on first use (a native process never needs it)."""
    global _python_ns
    if _python_ns is None:
        from . import python
        _python_ns = _namespace(python)
    return _python_ns


def get(name: str = "auto"):
    """An implementation as a namespace: "native", "python" or "auto".

    "native" raises NativeUnavailableError when the native core is missing or
    does not match this package.
    """
    global _native_ns, _native_exc
    if name == "python":
        return _python()
    if name not in ("native", "auto"):
        raise ValueError(f"unknown kernel implementation {name!r} "
                         f"(auto, native or python)")
    if _native_ns is None and _native_exc is None:
        try:
            # Imported on demand: QCOW2_IMPL=python never loads the extension.
            from . import native
            _native_ns = _namespace(native)
        except NativeUnavailableError as exc:
            _native_exc = exc
    if _native_ns is not None:
        return _native_ns
    if name == "auto":
        return _python()
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
xts_xor = _active.xts_xor
cbc_unchain = _active.cbc_unchain
cbc_lane = _active.cbc_lane
sector_ivs = _active.sector_ivs

__all__ = ["implementation", "features", "get", "NATIVE_VERSION", *_API, *_CONSTANTS]
