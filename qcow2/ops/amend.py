"""amend: change the options of an existing qcow2 image (qemu-img amend -o ...).

Supported: ``compat`` (0.10 <-> 1.1), ``lazy_refcounts``, ``refcount_bits`` (the
refcount structure is rewritten with the new width), ``backing_file``/``backing_fmt``
(the header only, as ``rebase -u``), ``size`` (as ``resize``).  Options that would
rewrite every cluster (cluster_size, extended_l2, compression_type, data_file,
encryption, preallocation) are refused as qemu-img refuses them.

The engine makes each change (``qcow2.reshape``): new structures are written first,
made durable, and only then the header fields that point at them are switched.  This
module checks the options as qemu-img does and applies them in qemu-img's order.
"""

from __future__ import annotations

from ..errors import InvalidOptionError, UnsupportedFeatureError
from ..opener import open_image
from ..units import parse_option_list, parse_size
from ..writer import WritableQcow2Image

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
_VERSIONS = {"0.10": 2, "v2": 2, "1.1": 3, "v3": 3}


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
        version = None
        if "compat" in opts:
            version = _VERSIONS.get(str(opts["compat"]))
            if version is None:
                raise InvalidOptionError(f"Invalid compatibility level: '{opts['compat']}'")
            if version == 3:
                img.set_version(3)              # first: the options below may need it
        if "lazy_refcounts" in opts:
            on = _bool("lazy_refcounts", opts["lazy_refcounts"])
            if on and h.version < 3:
                raise InvalidOptionError("Lazy refcounts only supported with compatibility "
                                         "level 1.1 and above (use compat=1.1 or greater)")
            img.set_lazy_refcounts(on)
        if "refcount_bits" in opts:
            _refcount_bits(img, opts["refcount_bits"], version)
        if "backing_file" in opts or "backing_fmt" in opts:
            name = opts.get("backing_file", h.backing_file)
            fmt = opts.get("backing_fmt", h.backing_format)
            if name and fmt is None:
                raise InvalidOptionError("backing format must be specified")
            img.set_backing(name or None, fmt)
        if "size" in opts:
            img.resize(parse_size(opts["size"]), shrink=True)
        if version == 2:
            img.set_version(2)                  # last: the options above may need v3
        img.flush()


def _refcount_bits(img: WritableQcow2Image, value, version: int | None) -> None:
    bits = int(parse_size(value, what="refcount_bits"))
    if bits < 1 or bits > 64 or bits & (bits - 1):
        raise InvalidOptionError("Refcount width must be a power of two and may not "
                                 "exceed 64 bits")
    if bits != 16 and img.header.version < 3 and version != 3:
        raise InvalidOptionError("Different refcount widths than 16 bits require "
                                 "compatibility level 1.1 or above (use compat=1.1 or "
                                 "greater)")
    if bits != img.header.refcount_bits:
        img.change_refcount_width(bits)
