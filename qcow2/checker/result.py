"""What a check returns and how it fails: QEMU's BdrvCheckResult, its repair modes and
the dict ``qemu-img check --output=json`` prints."""

from __future__ import annotations

import os

from ..errors import Qcow2Error, UnsupportedFeatureError

# -- modes (QEMU's BdrvCheckMode) ------------------------------------------------------
FIX_LEAKS = 1
FIX_ERRORS = 2
#: ``repair=`` values (qemu-img check -r) and their modes
REPAIR_MODES = {None: 0, "leaks": FIX_LEAKS, "all": FIX_LEAKS | FIX_ERRORS}

# `qemu-img check --output=json` key order: QEMU's QDict iterates its hash buckets in
# order (tdb hash of the key modulo 512); for these keys that order is fixed.
_KEY_ORDER = ("image-end-offset", "compressed-clusters", "total-clusters", "corruptions",
              "corruptions-fixed", "check-errors", "leaks", "leaks-fixed",
              "allocated-clusters", "filename", "format", "fragmented-clusters")
_ALWAYS = ("check-errors", "filename", "format")


class CheckFailedError(Qcow2Error):
    """The check could not complete (qemu-img: "Check failed: ...", exit status 1)."""

    exit_code = 1

    def __init__(self, message: str, *, errno_: int | None = None,
                 repaired: dict | None = None):
        super().__init__(message)
        self.errno = errno_
        #: what a repair fixed before the check failed ({"leaks-fixed": n, ...}), if any
        self.repaired = repaired


class CheckNotSupportedError(UnsupportedFeatureError):
    """The image format has no consistency checks (raw); qemu-img exits with 63."""

    exit_code = 63


class Abort(Exception):
    """Stop the check with an errno, as QEMU's functions return -errno."""

    def __init__(self, err: int):
        super().__init__(os.strerror(err))
        self.err = err


_FIELDS = ("corruptions", "leaks", "check_errors", "corruptions_fixed", "leaks_fixed",
           "image_end_offset", "total_clusters", "allocated_clusters", "fragmented_clusters",
           "compressed_clusters")


class CheckResult:
    """QEMU's BdrvCheckResult (with its BlockFragInfo flattened in): counts, all 0 to
    start with.  (A plain class: dataclasses would cost every CLI start its import.)"""

    __slots__ = _FIELDS

    def __init__(self, **counts: int):
        for k in _FIELDS:
            setattr(self, k, counts.pop(k, 0))
        if counts:
            raise TypeError(f"unknown check result fields: {', '.join(counts)}")

    def __repr__(self) -> str:
        return "CheckResult(" + ", ".join(f"{k}={getattr(self, k)}" for k in _FIELDS) + ")"

    def __eq__(self, other) -> bool:
        if not isinstance(other, CheckResult):
            return NotImplemented
        return all(getattr(self, k) == getattr(other, k) for k in _FIELDS)

    def add(self, other: "CheckResult", allocation_info: bool) -> None:
        self.corruptions += other.corruptions
        self.leaks += other.leaks
        self.check_errors += other.check_errors
        self.corruptions_fixed += other.corruptions_fixed
        self.leaks_fixed += other.leaks_fixed
        if allocation_info:
            self.image_end_offset = other.image_end_offset
            self.total_clusters = other.total_clusters
            self.allocated_clusters = other.allocated_clusters
            self.fragmented_clusters = other.fragmented_clusters
            self.compressed_clusters = other.compressed_clusters

    def copy(self) -> "CheckResult":
        return CheckResult(**{k: getattr(self, k) for k in _FIELDS})

    def restore(self, saved: "CheckResult") -> None:
        for k in _FIELDS:
            setattr(self, k, getattr(saved, k))

    def as_dict(self, filename: str, fmt: str) -> dict:
        """The dict `qemu-img check --output=json` prints (optional keys only when
        nonzero)."""
        values = {
            "image-end-offset": self.image_end_offset,
            "compressed-clusters": self.compressed_clusters,
            "total-clusters": self.total_clusters, "corruptions": self.corruptions,
            "corruptions-fixed": self.corruptions_fixed, "check-errors": self.check_errors,
            "leaks": self.leaks, "leaks-fixed": self.leaks_fixed,
            "allocated-clusters": self.allocated_clusters, "filename": filename,
            "format": fmt, "fragmented-clusters": self.fragmented_clusters,
        }
        return {k: values[k] for k in _KEY_ORDER if k in _ALWAYS or values[k]}


def hex_alt(v: int) -> str:
    """C's ``%#x``: no prefix for zero."""
    return f"{v:#x}" if v else "0"


def memory_budget() -> int:
    """Half the physical memory (no limit where the system does not say)."""
    try:
        return os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE") // 2
    except (ValueError, OSError, AttributeError):
        return 1 << 62
