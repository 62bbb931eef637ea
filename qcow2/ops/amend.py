"""amend: change the options of an existing qcow2 image (qemu-img amend -o ...).

Supported: ``compat`` (0.10 <-> 1.1), ``lazy_refcounts``, ``refcount_bits`` (the
refcount structure is rewritten with the new width), ``size`` (as ``resize``);
``backing_file``/``backing_fmt`` only as the image already has them (qemu-img 7.2
refuses a change: use ``rebase``).  Options that would
rewrite every cluster (cluster_size, extended_l2, compression_type, data_file,
encryption, preallocation) are refused as qemu-img refuses them.

The engine makes each change (``qcow2.reshape``): new structures are written first,
made durable, and only then the header fields that point at them are switched.  This
module checks the options as qemu-img does and applies them in qemu-img's order.
"""

from __future__ import annotations

from ..errors import InvalidOptionError, UnsupportedFeatureError
from ..opener import open_image
from ..options import (check_amend_names, check_refcount_bits, compat_version, needs_v3,
                       option_dict, parse_bool_option)
from ..units import parse_size
from ..writer import WritableQcow2Image

def amend(path, options, *, format: str | None = None, force: bool = False) -> None:
    """Apply ``options`` (dict, or qemu-img's "k=v,k=v" text) to the image at ``path``."""
    opts = option_dict(options)
    if not opts:
        raise InvalidOptionError("No options given")
    check_amend_names(opts)
    with open_image(path, "r+", format=format, backing=False) as img:
        if not isinstance(img, WritableQcow2Image):
            raise UnsupportedFeatureError("Format driver 'raw' does not support option "
                                          "amendment", feature="amend raw")
        h = img.header
        if "backing_file" in opts or "backing_fmt" in opts:
            # qemu-img amend only accepts the backing file and format the image has
            if (opts.get("backing_file") != h.backing_file
                    or opts.get("backing_fmt") != h.backing_format):
                err = UnsupportedFeatureError("Cannot amend the backing file",
                                              feature="amend backing_file")
                err.hint = "You can use 'qemu-img rebase' instead.\n"  # type: ignore[attr-defined]
                raise err
        version = None
        if "compat" in opts:
            version = compat_version(str(opts["compat"]), qapi=False)
        if "refcount_bits" in opts:                # checked before anything changes
            _check_refcount_bits(opts["refcount_bits"], version or h.version)
        if version == 3:
            img.set_version(3)                  # first: the options below may need it
        if "lazy_refcounts" in opts:
            on = parse_bool_option("lazy_refcounts", opts["lazy_refcounts"])
            if on and h.version < 3:
                raise needs_v3("lazy_refcounts", hint="compat=1.1")
            img.set_lazy_refcounts(on)
        if "refcount_bits" in opts:
            _refcount_bits(img, opts["refcount_bits"], version)
        if "size" in opts:
            img.resize(parse_size(opts["size"]), shrink=True)
        if version == 2:
            img.set_version(2)                  # last: the options above may need v3
        img.flush()


def _check_refcount_bits(value, version: int) -> None:
    """qemu-img amend's checks of refcount_bits for the version the image will have."""
    bits = int(parse_size(value, what="refcount_bits"))
    check_refcount_bits(bits, 3, hint="compat=1.1")
    if version < 3 and bits != 16:
        raise InvalidOptionError("Refcount widths other than 16 bits require compatibility "
                                 "level 1.1 or above (use compat=1.1 or greater)")


def _refcount_bits(img: WritableQcow2Image, value, version: int | None) -> None:
    bits = int(parse_size(value, what="refcount_bits"))
    check_refcount_bits(bits, 3 if version == 3 else img.header.version, hint="compat=1.1")
    if bits != img.header.refcount_bits:
        img.change_refcount_width(bits)
