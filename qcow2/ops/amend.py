"""amend: change the options of an existing qcow2 image (qemu-img amend -o ...).

Supported: ``compat`` (0.10 <-> 1.1), ``lazy_refcounts``, ``refcount_bits`` (the
refcount structure is rewritten with the new width), ``size`` (as ``resize``);
``backing_file``/``backing_fmt`` only as the image already has them (qemu-img 7.2
refuses a change: use ``rebase``).  Options that would
rewrite every cluster (cluster_size, extended_l2, compression_type, data_file,
encryption, preallocation) are refused as qemu-img refuses them.  LUKS key slots:
``encrypt.state=active`` with ``encrypt.new-secret`` (and ``encrypt.keyslot``,
``encrypt.iter-time``), ``encrypt.state=inactive`` with ``encrypt.keyslot`` or
``encrypt.old-secret`` (``qcow2.encrypted.amend_keyslots``).

The engine makes each change (``qcow2.reshape``): new structures are written first,
made durable, and only then the header fields that point at them are switched.  This
module checks the options as qemu-img does and applies them in qemu-img's order.
"""

from __future__ import annotations

from ..encryptopts import AMEND_NAMES, amend_keyslots
from ..errors import InvalidOptionError, UnsupportedFeatureError
from ..opener import open_image
from ..options import (check_amend_names, check_refcount_bits, compat_version, needs_v3,
                       option_dict, parse_bool_option)
from ..units import parse_size
from ..writer import WritableQcow2Image
from .outputopts import check_cache

def amend(path, options, *, format: str | None = None, force: bool = False,
          key=None, progress=None, cache: str = "writeback") -> None:
    """Apply ``options`` (dict, or qemu-img's "k=v,k=v" text) to the image at ``path``.
    ``key``: the passphrase of an encrypted image (needed to open it for writing, and
    to change its LUKS key slots with ``encrypt.*``).  ``progress(percent)``: called
    as the work goes, with qemu-img's figures (see :class:`Progress`); the caller
    reports 0 before and 100 after, as qemu-img amend does.  ``cache`` (-t): "unsafe"
    syncs nothing, so the changes lose their crash ordering (QEMU's cache=unsafe)."""
    check_cache(cache)
    opts = option_dict(options)
    if not opts:
        raise InvalidOptionError("No options given")
    crypt = {k: opts.pop(k) for k in AMEND_NAMES if k in opts}
    check_amend_names(opts)
    slots = amend_keyslots(crypt)
    with open_image(path, "r+", format=format, backing=False, key=key) as img:
        if not isinstance(img, WritableQcow2Image):
            raise UnsupportedFeatureError("Format driver 'raw' does not support option "
                                          "amendment", feature="amend raw")
        if cache == "unsafe":
            img.ignore_flushes()
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
        bits = None
        if "refcount_bits" in opts:                # checked before anything changes
            bits = _check_refcount_bits(opts["refcount_bits"], version or h.version)
        work = Progress(progress, (version is not None and version != h.version)
                        + (bits is not None and bits != h.refcount_bits) + (slots is not None))
        if version == 3:
            img.set_version(3, work.operation())   # first: the options below may need it
        if "lazy_refcounts" in opts:
            on = parse_bool_option("lazy_refcounts", opts["lazy_refcounts"])
            if on and h.version < 3:
                raise needs_v3("lazy_refcounts", hint="compat=1.1")
            img.set_lazy_refcounts(on)
        if "refcount_bits" in opts:
            _refcount_bits(img, opts["refcount_bits"], version, work.operation())
        if "size" in opts:
            img.resize(parse_size(opts["size"]), shrink=True)
        if version == 2:
            img.set_version(2, work.operation())   # last: the options above may need v3
        img.flush()
        if slots is not None:
            from ..luks_image import amend_keyslots as change_keyslots
            from ..secrets import key_for
            change_keyslots(img, slots, key if key is not None else key_for(img.filename),
                            force=force)


def _check_refcount_bits(value, version: int) -> int:
    """qemu-img amend's checks of refcount_bits for the version the image will have."""
    bits = int(parse_size(value, what="refcount_bits"))
    check_refcount_bits(bits, 3, hint="compat=1.1")
    if version < 3 and bits != 16:
        raise InvalidOptionError("Refcount widths other than 16 bits require compatibility "
                                 "level 1.1 or above (use compat=1.1 or greater)")
    return bits


def _refcount_bits(img: WritableQcow2Image, value, version: int | None, progress) -> None:
    bits = int(parse_size(value, what="refcount_bits"))
    check_refcount_bits(bits, 3 if version == 3 else img.header.version, hint="compat=1.1")
    if bits != img.header.refcount_bits:
        img.change_refcount_width(bits, progress)


class Progress:
    """amend's progress as qemu-img reports it.  Each operation that changes something
    (version, refcount width, encryption key slots; ``operations`` of them) reports
    ``(done, total)`` in its own units.  Operations finished add up; the one under
    way counts as reported; the ones not started yet are assumed as long, on average,
    as those seen so far (``total`` so far x the ones left / the ones seen, rounded
    down).  ``report(percent)`` gets done / (seen + assumed)."""

    def __init__(self, report, operations: int):
        self.report = report
        self.operations = max(1, operations)
        self.finished = 0              # operations done
        self.finished_work = 0         # their total work
        self.current = None            # the operation reporting now
        self.current_work = 0

    def operation(self):
        """The ``progress(done, total)`` callback of the next operation (None when
        nobody listens)."""
        if self.report is None:
            return None
        token = object()

        def step(done: int, total: int) -> None:
            if self.current is not token:
                if self.current is not None:
                    self.finished += 1
                    self.finished_work += self.current_work
                self.current = token
            self.current_work = total
            seen = self.finished_work + total
            ahead = seen * (self.operations - self.finished - 1) // (self.finished + 1)
            self.report(100.0 * (self.finished_work + done) / max(1, seen + ahead))

        return step
