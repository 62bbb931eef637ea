"""Dirty images: a qcow2 version 3 image left with the dirty bit (lazy refcounts, then
a crash) has its refcounts rebuilt before it is opened for writing, as QEMU does.

No numpy at import: the opener asks :func:`needs_rebuild` on every writable open."""

from __future__ import annotations

import os
import struct

from .. import constants as C
from ..backends import Backend, FileBackend
from ..errors import CorruptImageError, Qcow2Error
from ..rbdname import is_rbd_name, open_rbd
from .result import FIX_ERRORS, FIX_LEAKS


def needs_rebuild(be: Backend) -> bool:
    """A qcow2 version 3 image with the dirty bit set (lazy refcounts, then a crash):
    its refcounts must be rebuilt before anything is allocated."""
    end = C.HDR_INCOMPATIBLE_FEATURES + 8
    head = be.pread(end, 0)
    return (len(head) == end and head[:4] == C.MAGIC
            and struct.unpack_from(">I", head, C.HDR_VERSION)[0] >= 3
            and bool(struct.unpack_from(">Q", head, C.HDR_INCOMPATIBLE_FEATURES)[0]
                     & C.INCOMPAT_DIRTY))


def rebuild_if_dirty(path) -> bool:
    """Repair an image left dirty by lazy refcounts (QEMU does this when it opens a
    dirty image read-write): returns True if it repaired, False if the image was not
    dirty.  ``path`` is a file name (its write lock is taken for the duration;
    afterwards the image opens r+) or a writable :class:`~qcow2.backends.Backend`."""
    if isinstance(path, Backend):
        return _rebuild_backend(path, path.name)
    filename = os.fspath(path)
    be = open_locked(filename, writable=True)
    try:
        return _rebuild_backend(be, filename)
    finally:
        be.close()


def open_locked(filename: str, *, writable: bool, force_share: bool = False,
                for_image: str | None = None) -> Backend:
    """The file (or the RBD image of an ``rbd:`` name) opened and locked as qemu-img
    opens an image to check it (errors as "Could not open 'NAME': REASON"; for a
    companion file of ``for_image``, an error opening it names that image first)."""
    context = f"Could not open '{for_image}': " if for_image is not None else ""
    try:
        if is_rbd_name(filename):
            be = open_rbd(filename, writable=writable)
        else:
            be = FileBackend(filename, writable=writable)
    except Qcow2Error as exc:
        raise Qcow2Error(f"{context}{exc}") from None
    except OSError as exc:
        raise Qcow2Error(f"{context}Could not open '{filename}': "
                         f"{exc.strerror or exc}") from None
    try:
        be.lock(write=writable, force_share=force_share and not writable)
    except OSError as exc:
        be.close()
        raise Qcow2Error(f"Could not open '{filename}': {exc.strerror or exc}") from None
    return be


def _rebuild_backend(be: Backend, filename: str) -> bool:
    if not needs_rebuild(be):
        return False
    from .run import run_pass               # (numpy: only when there is work)
    from .state import CheckedFile, read_header
    f = CheckedFile(be)
    res = run_pass(f, FIX_LEAKS | FIX_ERRORS, None)
    if res.check_errors:
        raise CorruptImageError(f"Could not repair dirty image '{filename}': "
                                f"{res.check_errors} errors during the check",
                                what="refcounts")
    if read_header(f).dirty:
        raise CorruptImageError(
            f"Could not repair dirty image '{filename}': {res.corruptions} corruptions "
            f"remain; run check -r all and inspect the image", what="refcounts")
    return True
