"""amend: change the options of an existing qcow2 image (qemu-img amend -o ...).

Supported: ``compat`` (0.10 <-> 1.1), ``lazy_refcounts``, ``refcount_bits`` (the
refcount structure is rewritten with the new width), ``backing_file``/``backing_fmt``
(the header only, as ``rebase -u``), ``size`` (as ``resize``).  Options that would
rewrite every cluster (cluster_size, extended_l2, compression_type, data_file,
encryption, preallocation) are refused as qemu-img refuses them.

Every change writes new structures first, makes them durable, and only then switches
the header fields that point at them, within the first 512-byte sector.
"""

from __future__ import annotations

import struct

from .. import constants as C
from ..errors import InvalidOptionError, Qcow2Error, UnsupportedFeatureError

_CANNOT = {
    "cluster_size": "Changing the cluster size is not supported",
    "extended_l2": "Toggling extended L2 entries is not supported",
    "compression_type": "Changing the compression type is not supported",
    "encrypt.format": "Changing the encryption format is not supported",
    "encryption": "Changing the encryption flag is not supported",
    "preallocation": "Cannot change preallocation mode",
    "data_file": "data-file can only be set for images that use an external data file",
    "data_file_raw": "data-file-raw can only be set for images that use an external "
                     "data file",
}
_KNOWN = {"compat", "lazy_refcounts", "refcount_bits", "backing_file", "backing_fmt", "size"}


def _bool(name, v) -> bool:
    if isinstance(v, bool):
        return v
    s = str(v).lower()
    if s in ("on", "yes", "true", "1"):
        return True
    if s in ("off", "no", "false", "0"):
        return False
    raise InvalidOptionError(f"Parameter '{name}' expects 'on' or 'off'")


def amend(path, options, *, format: str | None = None, force: bool = False) -> None:
    """Apply ``options`` (dict, or qemu-img's "k=v,k=v" text) to the image at ``path``."""
    from ..image import open_image
    from ..units import parse_option_list, parse_size
    from ..writer import WritableQcow2Image, _resize_qcow2, set_backing

    opts = parse_option_list(options) if isinstance(options, str) else dict(options)
    if not opts:
        raise InvalidOptionError("No options given")
    for k in opts:
        if k in _CANNOT:
            raise UnsupportedFeatureError(_CANNOT[k], feature=f"amend {k}")
        if k not in _KNOWN:
            raise InvalidOptionError(f"Invalid parameter '{k}'")
    with open_image(path, "r+", format=format, backing=False) as img:
        if not isinstance(img, WritableQcow2Image):
            raise UnsupportedFeatureError("Format driver 'raw' does not support option "
                                          "amendment", feature="amend raw")
        h = img.header
        if "compat" in opts:
            want = {"0.10": 2, "v2": 2, "1.1": 3, "v3": 3}.get(str(opts["compat"]))
            if want is None:
                raise InvalidOptionError(f"Invalid compatibility level: '{opts['compat']}'")
            if want == 3 and h.version == 2:
                _upgrade(img)
        if "lazy_refcounts" in opts:
            on = _bool("lazy_refcounts", opts["lazy_refcounts"])
            if on and h.version < 3:
                raise InvalidOptionError("Lazy refcounts only supported with compatibility "
                                         "level 1.1 and above (use compat=1.1 or greater)")
            img.flush()
            if on:
                h.compatible_features |= C.COMPAT_LAZY_REFCOUNTS
            else:
                h.compatible_features &= ~C.COMPAT_LAZY_REFCOUNTS
            if h.version >= 3:
                img.be.pwrite(struct.pack(">Q", h.compatible_features), 0x50)
                img._sync()
        if "refcount_bits" in opts:
            bits = int(parse_size(opts["refcount_bits"], what="refcount_bits"))
            if bits < 1 or bits > 64 or bits & (bits - 1):
                raise InvalidOptionError("Refcount width must be a power of two and may not "
                                         "exceed 64 bits")
            if bits != 16 and (h.version < 3 and not ("compat" in opts and
                                                      str(opts["compat"]) in ("1.1", "v3"))):
                raise InvalidOptionError("Different refcount widths than 16 bits require "
                                         "compatibility level 1.1 or above (use compat=1.1 or "
                                         "greater)")
            if bits != h.refcount_bits:
                _change_refcount_width(img, bits)
        if "backing_file" in opts or "backing_fmt" in opts:
            name = opts.get("backing_file", h.backing_file)
            fmt = opts.get("backing_fmt", h.backing_format)
            if name and fmt is None:
                raise InvalidOptionError("backing format must be specified")
            set_backing(img, name or None, fmt)
        if "size" in opts:
            new = parse_size(opts["size"])
            _resize_qcow2(img, new, shrink=True, preallocation="off")
        if "compat" in opts and h.version == 3 and str(opts["compat"]) in ("0.10", "v2"):
            _downgrade(img)
        img.flush()


def _rewrite_header(img) -> None:
    """Write the whole header area again from ``img.header`` (after a flush)."""
    from ..header import pack_header
    img.flush()
    old_extent = img._header_extent()
    packed = pack_header(img.header)
    img.be.pwrite(packed + bytes(max(0, old_extent - len(packed))), 0)
    img._sync()


def _upgrade(img) -> None:
    h = img.header
    h.version = 3
    h.header_length = 0            # pack_header picks the v3 length
    _rewrite_header(img)


def _downgrade(img) -> None:
    h = img.header
    if h.refcount_bits != 16:
        raise Qcow2Error("compat=0.10 requires refcount_bits=16")
    if h.extended_l2 or h.has_data_file or h.compression_type != C.COMPRESSION_ZLIB:
        raise Qcow2Error("Cannot downgrade an image with extended L2 entries, an external "
                         "data file or a compression type other than zlib")
    if h.bitmaps_ext is not None:
        raise Qcow2Error("Cannot downgrade an image with bitmaps")
    if img.snapshots_list:
        raise UnsupportedFeatureError("Downgrading an image with internal snapshots is not "
                                      "supported", feature="amend compat with snapshots")
    _expand_zero_clusters(img)
    if h.lazy_refcounts:
        h.compatible_features &= ~C.COMPAT_LAZY_REFCOUNTS
    h.version = 2
    h.incompatible_features = h.compatible_features = h.autoclear_features = 0
    _rewrite_header(img)


def _expand_zero_clusters(img) -> None:
    """Version 2 has no zero flag: clusters marked zero become unallocated (no backing
    file) or written zeros (a backing file would show through)."""
    cs = img.cluster_size
    n = img._l2_entries
    for i, e in enumerate(list(img._l1)):
        off = e & C.L1E_OFFSET_MASK
        if not off:
            continue
        table, toff = img._l2_for_write(i)
        for k in range(n):
            d = struct.unpack_from(">Q", table, k * 8)[0]
            if d & C.OFLAG_COMPRESSED or not d & C.OFLAG_ZERO:
                continue
            guest = (i << img._l2_span_bits) + k * cs
            img._set_entry(table, toff, k, 0)
            img._free_entry(d)
            if img.header.backing_file is not None and guest < img.size:
                img.pwrite(bytes(min(cs, img.size - guest)), guest)
    img.flush()


def _change_refcount_width(img, bits: int) -> None:
    """Write a complete new refcount structure of ``bits``-wide entries after the end
    of the used space, make it durable, switch the header to it, then drop the old
    table and blocks (QEMU's qcow2_change_refcount_order)."""
    import numpy as np

    from ..refcount import decode_block, encode_block

    h = img.header
    cs = img.cluster_size
    img.flush()
    refs = img.refs
    end = refs.end_cluster
    # current refcounts of every cluster
    counts = np.zeros(end, dtype=np.uint64)
    per_old = refs.block_entries
    for bi in range((end + per_old - 1) // per_old):
        off = refs._block_offset(bi)
        if off:
            vals = decode_block(bytes(refs.cache.get(off)), h.refcount_bits)
            lo = bi * per_old
            hi = min(end, lo + per_old)
            counts[lo:hi] = vals[:hi - lo]
    maxv = (1 << bits) - 1
    if counts.size and int(counts.max()) > maxv:
        raise Qcow2Error(f"Cannot decrease refcount entry width to {bits} bits: a cluster "
                         f"has refcount {int(counts.max())}")
    old_table_off = h.refcount_table_offset
    old_table_clusters = h.refcount_table_clusters
    old_blocks = [refs._block_offset(bi) for bi in range(len(refs.table))]
    # new structure at [end, end + nb + tc): it must count itself
    per_new = cs * 8 // bits
    nb = tc = 0
    while True:
        total = end + nb + tc
        nb2 = (total + per_new - 1) // per_new
        tc2 = (nb2 * 8 + cs - 1) // cs
        if (nb2, tc2) == (nb, tc):
            break
        nb, tc = nb2, tc2
    total = end + nb + tc
    counts = np.concatenate([counts, np.ones(nb + tc, dtype=np.uint64)])
    counts = np.concatenate([counts, np.zeros(nb * per_new - total, dtype=np.uint64)])
    # the old table and blocks are dropped after the switch: not counted in the new one
    counts[old_table_off // cs:old_table_off // cs + old_table_clusters] -= 1
    for off in old_blocks:
        if off:
            counts[off // cs] -= 1
    blocks = encode_block(counts, bits)
    base = end * cs
    img._write_meta(blocks, base)
    table = struct.pack(f">{nb}Q", *[base + i * cs for i in range(nb)])
    img._write_meta(table + bytes(tc * cs - len(table)), base + nb * cs)
    img._sync()
    # the switch: offset, clusters and order live in the first sector (one write each,
    # in an order where every intermediate state points at a complete structure of the
    # width the header names): write the three fields with one pwrite of [0x30, 0x64)
    h.refcount_table_offset = base + nb * cs
    h.refcount_table_clusters = tc
    h.refcount_order = bits.bit_length() - 1
    head = bytearray(img.be.pread(0x64 - 0x30, 0x30))
    struct.pack_into(">QI", head, 0, h.refcount_table_offset, tc)
    struct.pack_into(">I", head, 0x60 - 0x30, h.refcount_order)
    img.be.pwrite(bytes(head), 0x30)
    img._sync()
    # reload the refcount machinery on the new structure
    from ..cache import TableCache
    from ..refcount import Refcounts
    img._rc_cache = TableCache(cs, 4 << 20, img._read_meta,
                               lambda d, o: img._write_meta(d, o, "refcount block"),
                               on_pressure=img._cache_pressure)
    img.file_size = max(img.file_size, base + (nb + tc) * cs)
    img.refs = Refcounts(img, img._rc_cache)
    img.refs.on_zero = img._meta_forget
    img._build_meta()
