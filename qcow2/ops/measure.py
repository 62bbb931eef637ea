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

from .. import constants as C
from ..bitmap import required_size, supports_persistent
from ..errors import InvalidOptionError, UnsupportedFeatureError
from ..layout import l1_entries, qcow2_prealloc_size
from ..options import (CRYPT_OPTIONS, FILE_OPTIONS, MEASURE_COMPAT_LEVELS, QCOW2_OPTIONS,
                       QCOW2_PREALLOC, RAW_OPTIONS, check_cluster_size, check_preallocation,
                       check_refcount_bits, compat_version, parse_options, parse_size_arg,
                       too_large)
from ..units import round_up



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
    """The syntax checks qemu_opts_do_parse makes: known names, typed values (the
    format's options and the file driver's; for qcow2 also the encryption ones)."""
    known = set(FILE_OPTIONS)
    known.update(QCOW2_OPTIONS + CRYPT_OPTIONS if out_format == "qcow2" else RAW_OPTIONS)
    try:
        return parse_options(options, known, strict_strings=False)
    except InvalidOptionError as exc:
        err = InvalidOptionError(f"{exc}. Invalid options for file format '{out_format}'")
        # qemu-img: the error, its hint, then a line of its own for the format
        err.hint = getattr(exc, "hint", None)  # type: ignore[attr-defined]
        err.lines = [str(exc)]  # type: ignore[attr-defined]
        err.after = [f"Invalid options for file format '{out_format}'"]  # type: ignore[attr-defined]
        raise err from None


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
    cs = opts.get("cluster_size", C.DEFAULT_CLUSTER_SIZE)
    check_cluster_size(cs, extended_l2)
    compat = opts.get("compat")
    version = 3
    if compat is not None:
        version = compat_version(compat, MEASURE_COMPAT_LEVELS, qapi=False)
    refcount_bits = opts.get("refcount_bits", C.DEFAULT_REFCOUNT_BITS)
    check_refcount_bits(refcount_bits, version, hint="compat=1.1")
    prealloc = opts.get("preallocation", "off")
    check_preallocation(prealloc, QCOW2_PREALLOC, qapi=False)
    has_backing_file = "backing_file" in opts
    luks = _luks_header_size(opts, cs)

    virtual_size = round_up(opts.get("size", 0), cs)
    if l1_entries(virtual_size, cs, extended_l2) * C.L1E_SIZE > C.MAX_L1_SIZE:
        # QEMU checks the size option only: not an input image's size.
        raise too_large(None, True)

    required = 0
    if img is not None:
        virtual_size = round_up(img.size, cs)
        if has_backing_file:
            # The new image's backing file may share nothing with the input: count all.
            required = virtual_size
        else:
            required = _data_clusters(img, cs) * cs
    if prealloc in ("full", "falloc"):
        required = virtual_size

    fully = qcow2_prealloc_size(virtual_size, cs, refcount_bits.bit_length() - 1, extended_l2)
    out: dict = {}
    if (version >= 3 and img is not None
            and supports_persistent(img.format, getattr(img, "header", None))):
        # bitmaps cover the active layer, even with -l
        out["bitmaps"] = required_size(
            img.header.size, [(b["granularity"], b["name"]) for b in img.bitmaps()], cs)
    # Metadata is counted as for the fully allocated image: an over-estimate, as QEMU's.
    out["required"] = fully - virtual_size + required + luks
    out["fully-allocated"] = fully + luks
    return out


def _luks_header_size(opts: dict, cs: int) -> int:
    """The clusters a LUKS header of ``encrypt.*`` options takes (0: no LUKS); the
    secret must be named, as for qemu-img, which builds the header to measure it."""
    if opts.get("encrypt.format") != "luks":
        return 0
    from ..encryptopts import create_encryption
    from ..luks import area_length
    enc = create_encryption(opts)
    enc.wipe()
    return round_up(area_length(enc.params.key_bytes), cs)


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


__all__ = ["measure"]
