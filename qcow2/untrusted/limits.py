"""The caps of untrusted mode (:class:`Limits`), the metadata budget and the errors
the checks raise."""

from __future__ import annotations

from .. import constants as C
from ..errors import CorruptImageError, UnsafeImageError

TiB = 1 << 40
MiB = 1 << 20


class Limits:
    """Caps applied to untrusted images (``max_backing_depth`` applies in every mode).

    ``max_virtual_size``: bytes of guest disk (default 16 TiB); ``max_metadata``: bytes
    of snapshot table, L1 tables, L2 tables, refcount structures, bitmap directory and
    bitmap tables the open and the scan read and hold, each charged before it is read
    (default 64 MiB; the scan's working set is at most about twice that);
    ``max_output``: bytes a ``convert`` may produce (default None: unlimited);
    ``max_backing_depth``: images in a backing chain (default 16); ``max_scan_cpu``:
    seconds of CPU time (``time.process_time``) the metadata scan may take (default 60).
    """

    __slots__ = ("max_virtual_size", "max_metadata", "max_output", "max_backing_depth",
                 "max_scan_cpu")

    def __init__(self, *, max_virtual_size: int = 16 * TiB, max_metadata: int = 64 * MiB,
                 max_output: int | None = None,
                 max_backing_depth: int = C.MAX_BACKING_DEPTH,
                 max_scan_cpu: float = 60.0):
        self.max_virtual_size = max_virtual_size
        self.max_metadata = max_metadata
        self.max_output = max_output
        self.max_backing_depth = max_backing_depth
        self.max_scan_cpu = max_scan_cpu

    def replace(self, **overrides) -> "Limits":
        kw = {k: getattr(self, k) for k in self.__slots__}
        for k, v in overrides.items():
            if k not in self.__slots__:
                raise TypeError(f"unknown limit {k!r} (known: {', '.join(self.__slots__)})")
            kw[k] = v
        return Limits(**kw)

    def __repr__(self) -> str:
        return "Limits(" + ", ".join(f"{k}={getattr(self, k)!r}" for k in self.__slots__) + ")"


def resolve(limits: "Limits | None" = None, **overrides) -> Limits:
    base = limits if limits is not None else Limits()
    overrides = {k: v for k, v in overrides.items() if v is not None}
    return base.replace(**overrides) if overrides else base


def unsafe(msg: str, offset: int | None = None, size: int | None = None,
           what: str | None = None) -> UnsafeImageError:
    """An UnsafeImageError naming the offending offset (aliasing, limits)."""
    err = UnsafeImageError(msg if offset is None else f"{msg} (at offset {offset:#x})")
    err.offset = offset          # type: ignore[attr-defined]
    err.size = size              # type: ignore[attr-defined]
    err.what = what              # type: ignore[attr-defined]
    return err


def corrupt(msg: str, offset: int, size: int, what: str) -> CorruptImageError:
    """A CorruptImageError naming the offending offset (a malformed field)."""
    return CorruptImageError(f"{msg} (at offset {offset:#x})", offset=offset, size=size,
                             what=what)


class Budget:
    """Bytes of metadata read and held for one untrusted image, against
    ``Limits.max_metadata``: charged *before* each read, so an image whose tables
    would pass the cap is refused without reading them."""

    __slots__ = ("limit", "held")

    def __init__(self, limits: Limits):
        self.limit = limits.max_metadata
        self.held = 0

    def hold(self, n: int, what: str, offset: int | None = None) -> None:
        self.held += n
        if self.held > self.limit:
            raise unsafe(f"metadata of {self.held} bytes (reading {what}) exceeds the "
                         f"limit of {self.limit} bytes", offset, None, "metadata")

    def charge_snapshot_table(self, n: int) -> None:
        """``read_snapshot_table``'s ``charge``: the header's table offset is named."""
        self.hold(n, "the snapshot table", C.HDR_SNAPSHOTS_OFFSET)


def check_header(h, file_size: int, limits: Limits) -> None:
    """Header-only checks, before any table is read."""
    if h.size > limits.max_virtual_size:
        raise unsafe(f"virtual size {h.size} exceeds the limit of {limits.max_virtual_size} "
                     f"bytes", C.HDR_SIZE, 8, "header")
