"""measure: the space an image would need in a format, as ``qemu-img measure`` reports it.

Two numbers (and a third for qcow2 inputs):

``required``
    bytes a new image needs for the data that is really there: metadata of the fully
    allocated image (QEMU over-counts it on purpose) plus one cluster for every guest
    cluster holding data;
``fully-allocated``
    bytes of the image with every guest cluster allocated
    (QEMU's ``qcow2_calc_prealloc_size``);
``bitmaps``
    bytes the input's persistent dirty bitmaps would take in a qcow2 v3 output; QEMU
    reports it only when both the output (compat 1.1) and the input (a qcow2 v3
    image) can hold bitmaps.

The data is measured from metadata only: the allocation map of the whole backing chain
(``Image.extents()``, the block status qemu-img walks), never the guest bytes.  The
options are QEMU's ``-o`` names and are checked in ``qcow2_measure``'s order, with its
messages; like QEMU, measure accepts combinations ``create`` refuses (e.g.
``extended_l2`` with ``compat=0.10``), since nothing is created.
"""

from __future__ import annotations

import os

from ..create_image import (DEFAULT_CLUSTER_SIZE, MIN_EXTL2_CLUSTER_SIZE, QCOW2_OPTIONS,
                            RAW_OPTIONS, parse_bool_option, parse_number_option, parse_size_option,
                            parse_size_arg)
from .. import constants as C
from ..errors import ImageTooLargeError, InvalidOptionError, UnsupportedFeatureError

# Options of the file protocol driver, which qemu-img measure accepts on top of the
# format's (QEMU appends bdrv_file's create options).
_FILE_OPTIONS = ("size", "preallocation", "nocow", "extent_size_hint")
# Encryption options qemu knows for qcow2 (accepted, not used, unless encrypt.format=luks).
_QCOW2_CRYPT_OPTIONS = ("encryption", "encrypt.format", "encrypt.key-secret",
                        "encrypt.cipher-alg", "encrypt.cipher-mode", "encrypt.ivgen-alg",
                        "encrypt.ivgen-hash-alg", "encrypt.hash-alg", "encrypt.iter-time")
_SIZE_OPTS = {"size", "cluster_size", "extent_size_hint"}
_BOOL_OPTS = {"extended_l2", "data_file_raw", "lazy_refcounts", "nocow", "encryption"}
_NUMBER_OPTS = {"refcount_bits", "encrypt.iter-time"}
_PREALLOC_MODES = ("off", "metadata", "falloc", "full")

_BITMAP_DIR_ENTRY = 24          # Qcow2BitmapDirEntry without name and extra data
_BITMAP_TABLE_ENTRY = 8


def measure(path=None, *, size=None, fmt: str | None = None, out_format: str = "qcow2",
            options: dict | None = None, snapshot=None, force_share: bool = False,
            untrusted: bool = False) -> dict:
    """What ``qemu-img measure -O OUT_FORMAT [-o OPTIONS] (--size SIZE | [-f FMT] [-l SN] PATH)``
    prints, as a dict in QEMU's JSON key order: ``{"bitmaps": N,`` (only when qemu
    prints it) ``"required": N, "fully-allocated": N}``.

    ``size``: bytes or qemu-img's size syntax ("20G"), instead of an input image.
    ``options``: qemu-img's ``-o`` options as a dict (``cluster_size``, ``compat``,
    ``refcount_bits``, ``extended_l2``, ``preallocation``, ``backing_file``, ...), values
    as Python values or the strings ``-o`` takes.  ``snapshot``: measure an internal
    snapshot (id or name) of the input.  Raises InvalidOptionError (a ValueError) with
    qemu-img's message for bad arguments.
    """
    if path is not None and size is not None:
        raise InvalidOptionError("--size N cannot be used together with a filename.")
    if path is None and (fmt is not None or snapshot is not None):
        raise InvalidOptionError("--image-opts, -f, and -l require a filename argument.")
    if path is None and size is None:
        raise InvalidOptionError("Either --size N or one filename must be specified.")
    if size is not None:
        size = parse_size_arg(size)

    if path is None:
        return _measure(None, size, out_format, options)
    from ..opener import open_image
    with open_image(os.fspath(path), format=fmt, snapshot=snapshot,
                    force_share=force_share, untrusted=untrusted) as img:
        return _measure(img, size, out_format, options)


def _measure(img, size, out_format: str, options: dict | None) -> dict:
    if out_format not in ("qcow2", "raw"):
        raise UnsupportedFeatureError(f"Block driver '{out_format}' does not support size "
                                      f"measurement (supported here: qcow2, raw)",
                                      feature=f"measure -O {out_format}")
    opts = _parse_options(out_format, options or {})
    if size is not None:                 # --size wins over -o size=
        opts["size"] = size
    if out_format == "raw":
        return _measure_raw(img, opts)
    return _measure_qcow2(img, opts)


def _parse_options(out_format: str, options: dict) -> dict:
    """The syntax checks qemu_opts_do_parse makes: known names, typed values."""
    known = set(_FILE_OPTIONS)
    known.update(QCOW2_OPTIONS + _QCOW2_CRYPT_OPTIONS if out_format == "qcow2" else RAW_OPTIONS)
    parsed: dict = {}
    for name, value in options.items():
        if value is None:
            continue
        if name not in known:
            raise InvalidOptionError(f"Invalid parameter '{name}'. Invalid options for file "
                                     f"format '{out_format}'")
        try:
            if name in _SIZE_OPTS:
                value = parse_size_option(name, value)
            elif name in _BOOL_OPTS:
                value = parse_bool_option(name, value)
            elif name in _NUMBER_OPTS:
                value = parse_number_option(name, value)
            elif isinstance(value, os.PathLike):
                value = os.fspath(value)
        except InvalidOptionError as exc:
            raise InvalidOptionError(f"{exc}. Invalid options for file format "
                                     f"'{out_format}'") from None
        parsed[name] = value
    return parsed


# -- raw ------------------------------------------------------------------------------------

def _measure_raw(img, opts: dict) -> dict:
    """QEMU's raw_measure: the virtual size; unallocated sectors still take file space."""
    if img is not None:
        required = img.size
    else:
        required = (opts.get("size", 0) + 511) & ~511
    return {"required": required, "fully-allocated": required}


# -- qcow2 ----------------------------------------------------------------------------------

def _measure_qcow2(img, opts: dict) -> dict:
    """QEMU's qcow2_measure, check for check."""
    extended_l2 = opts.get("extended_l2", False)
    cluster_size = opts.get("cluster_size", DEFAULT_CLUSTER_SIZE)
    _check_cluster_size(cluster_size, extended_l2)
    compat = opts.get("compat")
    if compat is None:
        version = 3
    elif compat == "0.10":
        version = 2
    elif compat == "1.1":
        version = 3
    else:
        raise InvalidOptionError(f"Invalid compatibility level: '{compat}'")
    refcount_bits = opts.get("refcount_bits", 16)
    if not 0 < refcount_bits <= 64 or refcount_bits & (refcount_bits - 1):
        raise InvalidOptionError("Refcount width must be a power of two and may not exceed "
                                 "64 bits")
    if version < 3 and refcount_bits != 16:
        raise InvalidOptionError("Different refcount widths than 16 bits require "
                                 "compatibility level 1.1 or above (use compat=1.1 or "
                                 "greater)")
    prealloc = opts.get("preallocation", "off")
    if prealloc not in _PREALLOC_MODES:
        raise InvalidOptionError(f"invalid parameter value: {prealloc}")
    has_backing_file = "backing_file" in opts
    if opts.get("encrypt.format") == "luks":
        raise UnsupportedFeatureError("measuring LUKS-encrypted qcow2 output is not "
                                      "supported", feature="encryption")

    cs = cluster_size
    l2e = 16 if extended_l2 else 8
    virtual_size = -(-opts.get("size", 0) // cs) * cs
    l2_tables = -(-(virtual_size // cs) // (cs // l2e))
    if l2_tables * C.L1E_SIZE > C.MAX_L1_SIZE:
        # QEMU checks the size option only: not an input image's size.
        raise ImageTooLargeError("The image size is too large (try using a larger cluster "
                                 "size)")

    required = 0
    if img is not None:
        virtual_size = -(-img.size // cs) * cs
        if has_backing_file:
            # The new image's backing file may share nothing with the input: count all.
            required = virtual_size
        else:
            required = _data_clusters(img, cs) * cs
    if prealloc in ("full", "falloc"):
        required = virtual_size

    fully = qcow2_prealloc_size(virtual_size, cs, refcount_bits.bit_length() - 1, extended_l2)
    out: dict = {}
    if version >= 3 and img is not None and _supports_bitmaps(img):
        out["bitmaps"] = _bitmaps_size(img, cs)
    # Metadata is counted as for the fully allocated image: an over-estimate, as QEMU's.
    out["required"] = fully - virtual_size + required
    out["fully-allocated"] = fully
    return out


def _check_cluster_size(cluster_size: int, extended_l2: bool) -> None:
    bits = cluster_size.bit_length() - 1
    if (cluster_size <= 0 or cluster_size & (cluster_size - 1)
            or not C.MIN_CLUSTER_BITS <= bits <= C.MAX_CLUSTER_BITS):
        raise InvalidOptionError(f"Cluster size must be a power of two between "
                                 f"{1 << C.MIN_CLUSTER_BITS} and "
                                 f"{1 << (C.MAX_CLUSTER_BITS - 10)}k")
    if extended_l2 and cluster_size < MIN_EXTL2_CLUSTER_SIZE:
        raise InvalidOptionError(f"Extended L2 entries are only supported with cluster "
                                 f"sizes of at least {MIN_EXTL2_CLUSTER_SIZE} bytes")


def qcow2_prealloc_size(size: int, cluster_size: int, refcount_order: int,
                        extended_l2: bool = False) -> int:
    """Bytes of a qcow2 image of virtual ``size`` with every cluster allocated: header,
    L2 and L1 tables, refcount structures and data (QEMU's qcow2_calc_prealloc_size).

    This is the total of :func:`qcow2.create_image.qcow2_layout` with
    ``preallocation="full"`` (the same fixed point), without the limits ``create``
    enforces (measure reports sizes QEMU could never create, as qemu-img does).
    """
    cs = cluster_size
    l2e = 16 if extended_l2 else 8
    data = -(-size // cs)
    l2_tables = -(-data // (cs // l2e))
    l1_clusters = -(-l2_tables // (cs // C.L1E_SIZE))
    clusters = 1 + l2_tables + l1_clusters + data
    per_block = (cs * 8) >> refcount_order
    blocks = table = 0
    while True:                # refcount blocks count themselves: find the fixed point
        nblocks = -(-(clusters + table + blocks) // per_block)
        ntable = -(-nblocks // (cs // 8))
        if (nblocks, ntable) == (blocks, table):
            break
        blocks, table = nblocks, ntable
    return (clusters + blocks + table) * cs


def _data_clusters(img, cs: int) -> int:
    """Output clusters (of ``cs`` bytes) holding any allocated data of the chain.

    QEMU walks the block status of the whole chain: zero ranges are skipped, a data
    range counts every output cluster it touches, each once.
    """
    count = 0
    last = -1                  # index of the last cluster counted
    for e in img.extents():
        if e.zero or not (e.data and e.present):
            continue
        first = e.start // cs
        end = (e.start + e.length - 1) // cs
        if first <= last:
            first = last + 1
        if end >= first:
            count += end - first + 1
            last = end
    return count


def _supports_bitmaps(img) -> bool:
    """QEMU's bdrv_supports_persistent_dirty_bitmap: a qcow2 v3 image."""
    header = getattr(img, "header", None)
    return img.format == "qcow2" and header is not None and header.version >= 3


def _bitmaps_size(img, cs: int) -> int:
    """QEMU's qcow2_get_persistent_dirty_bitmap_size: each bitmap fully allocated, its
    table, and its share of the bitmap directory."""
    total = 0
    dir_size = 0
    disk = img.header.size       # bitmaps cover the active layer, even with -l
    for bm in img.bitmaps():
        bits = -(-disk // bm["granularity"])
        clusters = -(-(-(-bits // 8)) // cs)
        total += clusters * cs
        total += -(-(clusters * _BITMAP_TABLE_ENTRY) // cs) * cs
        name = len(bm["name"].encode("utf-8", "surrogateescape"))
        dir_size += (_BITMAP_DIR_ENTRY + name + 7) & ~7
    return total + -(-dir_size // cs) * cs


__all__ = ["measure", "qcow2_prealloc_size"]
