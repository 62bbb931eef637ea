"""Progress of a copy, reported as qemu-img reports it."""

from __future__ import annotations

import threading

PROGRESS_STEP = 2 * 1024 * 1024     # qemu-img's request size: its progress steps


class Progress:
    """A copy's progress as a percentage of ``total`` bytes, reported to ``callback``
    (never backwards: reports are serialised)."""

    def __init__(self, total: int, callback):
        self.total = max(total, 1)
        self.done = 0
        self.cb = callback
        self.lock = threading.Lock()

    def add(self, n: int) -> None:
        if self.cb is None:
            return
        with self.lock:
            self.done += n
            pct = min(100.0, 100.0 * self.done / self.total)
            self.cb(pct)

    def add_split(self, d: int, n: int, unit: int = PROGRESS_STEP) -> None:
        """Report [d, d+n) done in the steps qemu-img reports it in (its requests: up
        to 2 MiB, one cluster when compressing), split at multiples of ``unit``."""
        if self.cb is None:
            return
        end = d + n
        while d < end:
            k = min(end, (d // unit + 1) * unit) - d
            self.add(k)
            d += k


__all__ = ["Progress", "PROGRESS_STEP"]
