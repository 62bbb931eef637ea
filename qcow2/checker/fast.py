"""The check's native fast path (``native/check.c``): clean L2 tables counted in C.

Nearly every L2 table of a real image has nothing to report.  For images with
standard L2 entries and no external data file, :func:`count_tables` counts the
references of such tables straight into the IMRT (one pass over their bytes, no
numpy temporaries) and :func:`copied_tables` checks their COPIED flags against the
refcounts; every table with something to say -- a compressed entry, reserved bits,
an unaligned or out-of-file offset, a count that would overflow, a COPIED flag that
disagrees -- is handed back, unchanged, to the general numpy path, which reports it
in QEMU's order.  Without the native core (or with ``QCOW2_IMPL=python``) the
general path does everything; the results are the same either way."""

from __future__ import annotations

import os

import numpy as np

from .state import State


def _load():
    if os.environ.get("QCOW2_IMPL", "auto") == "python":
        return None
    try:
        from .. import _native
    except ImportError:
        return None
    lib = _native.lib
    if not hasattr(lib, "qcow2c_l2_count"):
        return None
    return _native.ffi, lib


_NATIVE = _load()


def usable(st: State) -> bool:
    """Whether the fast path applies to this image."""
    return _NATIVE is not None and not st.extended and not st.data_file


class Counted:
    """What the fast path counted in a batch: the rows it left to the general path,
    allocation info, and its references (standard, compressed) already in the IMRT."""

    __slots__ = ("rows", "allocated", "fragmented", "compressed", "std_refs", "comp_refs")

    def __init__(self, rows: np.ndarray, stats: np.ndarray):
        self.rows = rows
        (self.allocated, self.fragmented, self.std_refs, self.compressed,
         self.comp_refs) = (int(x) for x in stats)


def count_tables(st: State, raw: bytearray, skip: np.ndarray) -> Counted:
    """Count the clean tables of ``raw`` (on-disk bytes of ``skip.size`` tables) into
    the IMRT; rows set in ``skip`` are not looked at.  A reference at or past ``st.nb``
    (a compressed extent ending in the cluster after the file's last) flags its table:
    the general path grows the IMRT, as QEMU does."""
    ffi, lib = _NATIVE
    flags = skip.astype(np.uint8)
    stats = np.zeros(6, dtype=np.uint64)
    imrt = st.imrt
    got = lib.qcow2c_l2_count(
        ffi.from_buffer("uint8_t[]", raw), flags.size, st.l2_entries, st.cbits, st.f.size,
        ffi.from_buffer(imrt, require_writable=True), imrt.dtype.itemsize, st.nb,
        st.rmax, ffi.from_buffer("uint8_t[]", flags, require_writable=True),
        ffi.from_buffer("uint64_t[]", stats, require_writable=True), ffi.NULL, 0)
    if got < 0:
        raise ValueError("qcow2c_l2_count: bad arguments")
    return Counted(np.flatnonzero(flags), stats[:5])


def copied_tables(st: State, raw: bytearray, ntables: int) -> np.ndarray:
    """Rows of ``raw`` whose COPIED flags need the general path, taking the IMRT as
    the stored refcounts (the caller knows they are equal)."""
    ffi, lib = _NATIVE
    flags = np.zeros(ntables, dtype=np.uint8)
    imrt = st.imrt
    got = lib.qcow2c_copied(
        ffi.from_buffer("uint8_t[]", raw), ntables, st.l2_entries, st.cbits, ffi.from_buffer(imrt),
        imrt.dtype.itemsize, st.nb, ffi.from_buffer("uint8_t[]", flags, require_writable=True))
    if got < 0:
        raise ValueError("qcow2c_copied: bad arguments")
    return np.flatnonzero(flags)
