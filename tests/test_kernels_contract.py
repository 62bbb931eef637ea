"""Constants are a contract: ``qcow2/constants.py``, the C header
``native/qcow2_native.h`` (its text, and the values the compiled ``qcow2._native``
exposes) and the Python twin agree on every number they share.

Each ``#define`` of the header is one of: a format constant (named in
constants.py), a return code or the version (named in ``qcow2.kernels.contract``),
or a flag of the C interface alone (listed below).  A new ``#define`` must be
filed under one of them, or this test fails.
"""

from __future__ import annotations

import ast
import os
import re
import struct
from pathlib import Path

import pytest

from qcow2 import constants as C
from qcow2 import kernels
from qcow2.errors import CorruptImageError, NativeUnavailableError
from qcow2.kernels import contract
from qcow2.kernels import python as twin

ROOT = Path(__file__).resolve().parent.parent
HEADER = ROOT / "native" / "qcow2_native.h"
TWIN_SOURCE = ROOT / "qcow2" / "kernels" / "python.py"
CLUSTER_SOURCE = ROOT / "qcow2" / "cluster.py"
REQUIRE_NATIVE = os.environ.get("QCOW2_REQUIRE_NATIVE", "") not in ("", "0")

# QCOW2N_<name> -> the name in qcow2/constants.py
FORMAT = {
    "KIND_UNALLOC": "KIND_UNALLOC", "KIND_UNALLOC_ALLOC": "KIND_UNALLOC_ALLOC",
    "KIND_ZERO": "KIND_ZERO", "KIND_ZERO_ALLOC": "KIND_ZERO_ALLOC",
    "KIND_DATA": "KIND_DATA", "KIND_COMPRESSED": "KIND_COMPRESSED",
    "ALGO_ZLIB": "COMPRESSION_ZLIB", "ALGO_ZSTD": "COMPRESSION_ZSTD",
    "MIN_CLUSTER_BITS": "MIN_CLUSTER_BITS", "MAX_CLUSTER_BITS": "MAX_CLUSTER_BITS",
    "MIN_CLUSTER_SIZE": "MIN_CLUSTER_SIZE", "MAX_CLUSTER_SIZE": "MAX_CLUSTER_SIZE",
    "SUBCLUSTERS": "SUBCLUSTERS_PER_CLUSTER",
    "L2E_SIZE": "L2E_SIZE", "L2E_EXTENDED_SIZE": "L2E_EXTENDED_SIZE",
    "L2E_OFFSET_MASK": "L2E_OFFSET_MASK", "L2E_STD_RESERVED_MASK": "L2E_STD_RESERVED_MASK",
    "OFLAG_COPIED": "OFLAG_COPIED", "OFLAG_COMPRESSED": "OFLAG_COMPRESSED",
    "OFLAG_ZERO": "OFLAG_ZERO",
    "L2_BITMAP_ALLOC_MASK": "L2_BITMAP_ALLOC_MASK",
    "L2_BITMAP_ZERO_SHIFT": "L2_BITMAP_ZERO_SHIFT",
    "L2E_COMPRESSED_FIELD_BITS": "L2E_COMPRESSED_FIELD_BITS",
    "COMPRESSED_SECTOR_SIZE": "COMPRESSED_SECTOR_SIZE",
}
# QCOW2N_<name> -> the name in qcow2.kernels.contract
CONTRACT = {
    "VERSION": "NATIVE_VERSION", "OK": "OK", "EINVAL": "EINVAL", "ENOMEM": "ENOMEM",
    "ENOSPC": "ENOSPC", "EUNSUPPORTED": "EUNSUPPORTED", "ESRCRANGE": "ESRCRANGE",
    "EDSTRANGE": "EDSTRANGE", "EL2RESERVED": "EL2RESERVED", "EL2BITMAP": "EL2BITMAP",
    "EL2UNALIGNED": "EL2UNALIGNED", "EDATA": "EDATA", "ESHORT": "ESHORT", "ELONG": "ELONG",
    "ALGO_ZLIB": "ALGO_ZLIB", "ALGO_ZSTD": "ALGO_ZSTD",
}
# flags of the C interface only (the Python wrappers read them from the module)
C_ONLY = {"FEATURE_ZSTD", "FEATURE_LIBDEFLATE", "DCTX_STRICT", "L2_EXTENDED",
          "L2_DATA_FILE", "L2_STRICT", "ZSTD_API_FNS"}


def header_defines() -> dict[str, int]:
    """QCOW2N_<name> -> value of every ``#define`` in the header, prefix dropped."""
    out = {}
    for line in HEADER.read_text().splitlines():
        m = re.match(r"\s*#define\s+(\w+)\s+(.*?)\s*(?:/\*.*)?$", line)
        if not m:
            continue
        name, text = m.groups()
        assert name.startswith("QCOW2N_"), f"{name}: not in the qcow2n namespace"
        lit = re.fullmatch(r"(-?(?:0[xX][0-9a-fA-F]+|\d+))[uUlL]*", text)
        assert lit, f"{name} = {text!r}: cdef() takes integer literals only"
        out[name[len("QCOW2N_"):]] = int(lit.group(1), 0)
    return out


DEFINES = header_defines()


def test_every_define_is_filed():
    unfiled = set(DEFINES) - set(FORMAT) - set(CONTRACT) - C_ONLY
    assert not unfiled, f"file these #defines under FORMAT, CONTRACT or C_ONLY: {unfiled}"
    assert not (set(FORMAT) | set(CONTRACT) | C_ONLY) - set(DEFINES)


@pytest.mark.parametrize("name", sorted(FORMAT))
def test_header_matches_constants(name):
    assert DEFINES[name] == getattr(C, FORMAT[name])


@pytest.mark.parametrize("name", sorted(CONTRACT))
def test_header_matches_contract(name):
    assert DEFINES[name] == getattr(contract, CONTRACT[name])


def test_constants_are_consistent():
    assert C.MIN_CLUSTER_SIZE == 1 << C.MIN_CLUSTER_BITS
    assert C.MAX_CLUSTER_SIZE == 1 << C.MAX_CLUSTER_BITS
    assert C.L2E_EXTENDED_SIZE == 2 * C.L2E_SIZE
    assert C.L2_BITMAP_ALLOC_MASK == (1 << C.SUBCLUSTERS_PER_CLUSTER) - 1
    assert C.L2_BITMAP_ZERO_SHIFT == C.SUBCLUSTERS_PER_CLUSTER
    assert C.OFLAG_COMPRESSED == 1 << C.L2E_COMPRESSED_FIELD_BITS
    # the masks of a standard descriptor do not overlap
    masks = [C.L2E_OFFSET_MASK, C.L2E_STD_RESERVED_MASK, C.OFLAG_COPIED,
             C.OFLAG_COMPRESSED, C.OFLAG_ZERO]
    assert sum(masks) == (1 << 64) - 1
    for i, a in enumerate(masks):
        for b in masks[i + 1:]:
            assert a & b == 0
    assert contract.KIND_NAMES[C.KIND_COMPRESSED] == "compressed"
    assert len(contract.KIND_NAMES) == 6


def test_compiled_module_matches_header():
    try:
        native = kernels.get("native")
    except NativeUnavailableError as exc:
        if REQUIRE_NATIVE:
            pytest.fail(f"QCOW2_REQUIRE_NATIVE=1 but the native core is unavailable: {exc}")
        pytest.skip(f"native core not built: {exc}")
    assert native.implementation == "native"
    from qcow2 import _native
    for name, value in DEFINES.items():
        assert getattr(_native.lib, "QCOW2N_" + name) == value, name
    assert _native.lib.qcow2n_version() == DEFINES["VERSION"]
    # the import-time check of qcow2.kernels.native covers every shared number
    from qcow2.kernels import native as wrappers
    assert set(wrappers.SHARED_NUMBERS) == set(DEFINES) - C_ONLY - {"VERSION"}


def test_public_names_come_from_the_contract():
    for ns in (kernels, kernels.get("python")):
        for name in ("KIND_UNALLOC", "KIND_UNALLOC_ALLOC", "KIND_ZERO", "KIND_ZERO_ALLOC",
                     "KIND_DATA", "KIND_COMPRESSED"):
            assert getattr(ns, name) == getattr(C, name)
        assert ns.ALGO_ZLIB == C.COMPRESSION_ZLIB and ns.ALGO_ZSTD == C.COMPRESSION_ZSTD
        assert ns.ALGO_NAMES == C.COMPRESSION_NAMES
        assert ns.KIND_NAMES == contract.KIND_NAMES


@pytest.mark.parametrize("source", [TWIN_SOURCE, CLUSTER_SOURCE], ids=["twin", "cluster"])
def test_twin_defines_no_format_number(source):
    """The twin, and qcow2.cluster whose L2 entry classification it runs on, name
    every mask and limit through qcow2.constants: no number of 512 or more, and no
    hexadecimal literal, in their source."""
    text = source.read_text()
    tree = ast.parse(text)
    lines = text.splitlines()
    bad = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Constant) and type(node.value) is int:
            src = lines[node.lineno - 1][node.col_offset:node.end_col_offset]
            if abs(node.value) >= 512 or src.lower().startswith("0x"):
                bad.append(f"line {node.lineno}: {src}")
    assert not bad, bad
    for name in ("OFLAG_COPIED", "OFLAG_COMPRESSED", "OFLAG_ZERO", "L2E_OFFSET_MASK",
                 "L2E_STD_RESERVED_MASK", "SUBCLUSTERS_PER_CLUSTER", "KIND_DATA"):
        assert getattr(twin, name, getattr(C, name)) is getattr(C, name), name


def test_twin_classifies_with_the_engine_rule():
    """One Python statement of the L2 entry rule: the twin's batch classification is
    qcow2.cluster.L2Batch, the one check and untrusted mode use."""
    from qcow2 import cluster
    assert twin.L2Batch is cluster.L2Batch


# --------------------------------------------------------------------------
# Behaviour: entries built from constants.py decode to the kinds it names



def _runs(impl, entries, cluster_bits, *, bitmaps=None, strict=False):
    if bitmaps is None:
        raw = b"".join(struct.pack(">Q", e) for e in entries)
    else:
        raw = b"".join(struct.pack(">QQ", e, b) for e, b in zip(entries, bitmaps, strict=True))
    res = impl.l2_runs(raw, 0, len(entries), cluster_bits=cluster_bits,
                       extended=bitmaps is not None, strict=strict)
    return [tuple(int(x) for x in r) for r in zip(*res, strict=True)]


def test_standard_entries_by_constants(impl):
    cb = 16
    cs = 1 << cb
    host = 5 * cs
    # compressed: host offset in bits 0..x-1, additional sectors from bit x
    shift = C.L2E_COMPRESSED_FIELD_BITS - (cb - 8)
    comp = C.OFLAG_COMPRESSED | (2 << shift) | (host + 100)
    entries = [0, C.OFLAG_ZERO, C.OFLAG_ZERO | host, C.OFLAG_COPIED | host, comp]
    assert _runs(impl, entries, cb) == [
        (C.KIND_UNALLOC, 0, 1, 0, 0),
        (C.KIND_ZERO, 1, 1, 0, 0),
        (C.KIND_ZERO_ALLOC, 2, 1, host, 0),
        (C.KIND_DATA, 3, 1, host, 0),
        (C.KIND_COMPRESSED, 4, 1, host + 100,
         3 * C.COMPRESSED_SECTOR_SIZE - 100),
    ]


def test_extended_entries_by_constants(impl):
    cb = 16
    cs = 1 << cb
    unit = cs // C.SUBCLUSTERS_PER_CLUSTER
    all_zero = C.L2_BITMAP_ALLOC_MASK << C.L2_BITMAP_ZERO_SHIFT
    entries = [0, C.OFLAG_COPIED | cs, C.OFLAG_COPIED | 3 * cs]
    bitmaps = [all_zero, C.L2_BITMAP_ALLOC_MASK, 1 | (1 << (C.L2_BITMAP_ZERO_SHIFT + 1))]
    runs = _runs(impl, entries, cb, bitmaps=bitmaps)
    n = C.SUBCLUSTERS_PER_CLUSTER
    assert runs[:4] == [
        (C.KIND_ZERO, 0, n, 0, 0),
        (C.KIND_DATA, n, n, cs, 0),
        (C.KIND_DATA, 2 * n, 1, 3 * cs, 0),
        (C.KIND_ZERO_ALLOC, 2 * n + 1, 1, 3 * cs + unit, 0),
    ]
    assert runs[4] == (C.KIND_UNALLOC_ALLOC, 2 * n + 2, n - 2, 3 * cs + 2 * unit, 0)


@pytest.mark.parametrize("bit", [b for b in range(64) if C.L2E_STD_RESERVED_MASK >> b & 1])
def test_reserved_mask_is_what_strict_refuses(impl, bit):
    cs = 1 << 16
    entry = C.OFLAG_COPIED | cs | (1 << bit)
    with pytest.raises(CorruptImageError, match="reserved bits"):
        _runs(impl, [entry], 16, strict=True)
    assert _runs(impl, [entry & ~C.L2E_STD_RESERVED_MASK], 16, strict=True) == [
        (C.KIND_DATA, 0, 1, cs, 0)]


def test_cluster_size_limits_by_constants(impl):
    with pytest.raises(ValueError):
        impl.Decompressor(C.COMPRESSION_ZLIB, C.MIN_CLUSTER_SIZE // 2)
    with pytest.raises(ValueError):
        impl.Decompressor(C.COMPRESSION_ZLIB, C.MAX_CLUSTER_SIZE * 2)
    for cs in (C.MIN_CLUSTER_SIZE, C.MAX_CLUSTER_SIZE):
        assert impl.Decompressor(C.COMPRESSION_ZLIB, cs).cluster_size == cs
    for bits in (C.MIN_CLUSTER_BITS - 1, C.MAX_CLUSTER_BITS + 1):
        with pytest.raises(ValueError):
            impl.l2_runs(bytes(8), 0, 1, cluster_bits=bits, extended=False)
