"""Consistency check and repair of an image file (``qemu-img check [-r leaks|all]``).

The operation: open the image as qemu-img does (its backing chain and external data
file too: qemu-img refuses an image whose companions cannot be opened), run the
engine's check (:mod:`qcow2.checker`) and return the dict ``qemu-img check
--output=json`` prints.  The rules, messages, counts and exit statuses are QEMU 7.2's;
unlike qemu-img, which needs the key to open a LUKS-encrypted image, the check reads
no guest data and so works on encrypted images without one.
"""

from __future__ import annotations

import os

from ..checker import REPAIR_MODES, CheckNotSupportedError, open_locked
from ..checker.file import CheckedFile, read_header
from ..checker.quick import quick_check
from ..errors import (FormatError, InvalidOptionError, Qcow2Error, UnsafeImageError,
                      UnsupportedFeatureError)
from ..imageopts import is_option_name, resolve_name
from ..opener import open_image
from ..probe import probe_format
from ..paths import check_file_name, combine_path


def _open(filename: str, fmt: str | None, writable: bool, force_share: bool):
    """The image file, locked as qemu-img locks it, and its format."""
    if fmt not in (None, "qcow2", "raw"):
        raise UnsupportedFeatureError(f"Unknown or unsupported image format {fmt!r} "
                                      f"(supported: qcow2, raw)", feature=f"format {fmt}")
    if writable and force_share:
        raise InvalidOptionError(f"Could not open '{filename}': force-share=on can only be "
                                 f"used with read-only images")
    be = open_locked(filename, writable=writable, force_share=force_share)
    try:
        return be, fmt or probe_format(be)
    except BaseException:
        be.close()
        raise


def _open_data_file(filename: str, name: str, force_share: bool, writable: bool):
    check_file_name(name, "external data file")
    return open_locked(combine_path(filename, name), writable=writable,
                       force_share=force_share, for_image=filename)


def _open_companions(f: CheckedFile, filename: str, force_share: bool,
                     writable: bool) -> list:
    """Open the backing chain and the external data file as qemu-img check does;
    returns what to close."""
    try:
        h = read_header(f)
    except (FormatError, UnsupportedFeatureError) as exc:
        if not str(exc).startswith("Could not open "):     # qemu-img names the image
            exc.args = (f"Could not open '{filename}': {exc}",) + tuple(exc.args[1:])
        raise
    opened = []
    try:
        if h.has_data_file:
            opened.append(_open_data_file(filename, h.data_file, force_share, writable))
        if h.backing_file:
            check_file_name(h.backing_file, "backing file")
            bpath = combine_path(filename, h.backing_file)
            try:
                opened.append(open_image(bpath, format=h.backing_format,
                                         force_share=force_share))
            except (Qcow2Error, OSError) as exc:
                raise Qcow2Error(f"Could not open '{filename}': Could not open backing file: "
                                 f"{exc}") from None
    except BaseException:
        for o in opened:
            o.close()
        raise
    return opened


def _clear_unknown_autoclear(f: CheckedFile) -> None:
    """An image opened for writing loses the autoclear bits this engine does not know
    (their meaning cannot be maintained), as QEMU's open clears them."""
    import struct

    from .. import constants as C

    h = read_header(f)
    if h.version < 3 or not h.autoclear_features & ~C.AUTOCLEAR_MASK:
        return
    f.be.pwrite(struct.pack(">Q", h.autoclear_features & C.AUTOCLEAR_MASK),
                C.HDR_AUTOCLEAR_FEATURES)
    f.be.flush()


def check(path, *, format: str | None = None, repair: str | None = None,
          force_share: bool = False, log=None, untrusted: bool = False,
          limits=None) -> dict:
    """Check (and with ``repair="leaks"|"all"`` repair) an image, as ``qemu-img check``.

    Returns the dict ``qemu-img check --output=json`` prints.  ``log(line)`` receives
    the per-problem messages qemu-img writes to stderr ("Leaked cluster 5 refcount=1
    reference=0", ...).  Raises :class:`~qcow2.checker.CheckNotSupportedError` for raw
    images (qemu-img's exit status 63) and :class:`~qcow2.checker.CheckFailedError`
    when the check could not complete (exit status 1).

    ``untrusted=True`` opens the file once, in untrusted mode (format checks and the
    metadata scan of :mod:`qcow2.untrusted`, with ``limits``), and checks that same
    open file: nothing else is opened and the file is not re-opened between the scan
    and the check.  An untrusted image is never repaired.
    """
    if repair not in REPAIR_MODES:
        raise InvalidOptionError(f"Unknown option value for -r (expecting 'leaks' or 'all'): "
                                 f"{repair}")
    fix = REPAIR_MODES[repair]
    filename = os.fspath(path)
    if isinstance(filename, bytes):
        filename = os.fsdecode(filename)
    if is_option_name(filename):            # block options naming one image file
        filename, named = resolve_name(filename)
        format = format or named
        if not isinstance(filename, str):
            raise CheckNotSupportedError("This image format does not support checks",
                                         feature="check")
    if untrusted:
        return _check_untrusted(filename, format, fix, force_share, log, limits)
    be, fmt = _open(filename, format, bool(fix), force_share)
    companions: list = []
    try:
        if fmt != "qcow2":
            raise CheckNotSupportedError("This image format does not support checks",
                                         feature="check")
        f = CheckedFile(be)
        companions = _open_companions(f, filename, force_share, bool(fix))
        if fix:
            _clear_unknown_autoclear(f)
        return _check_file(f, fix, log).as_dict(filename, fmt)
    finally:
        for c in companions:
            c.close()
        be.close()


def _check_file(f: CheckedFile, fix: int, log):
    """The quick check (no numpy) when it has the answer, else the general check."""
    if not fix:
        res = quick_check(f)
        if res is not None:
            return res
    from ..checker.run import check_file
    return check_file(f, fix, log)


def _check_untrusted(filename: str, fmt: str | None, fix: int, force_share: bool, log,
                     limits) -> dict:
    """check(untrusted=True): one open_image (scanned), its file checked in place."""
    if fix:
        raise UnsafeImageError("an untrusted image is never repaired in place "
                               "(untrusted check with repair)")
    img = open_image(filename, format=fmt, untrusted=True, force_share=force_share,
                     limits=limits)
    try:
        if img.format != "qcow2":
            raise CheckNotSupportedError("This image format does not support checks",
                                         feature="check")
        # the scan refused backing and data files: there are no companions to open
        return _check_file(CheckedFile(img.be), 0, log).as_dict(filename, "qcow2")
    finally:
        img.close()


__all__ = ["check"]
