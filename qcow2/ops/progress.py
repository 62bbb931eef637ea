"""Progress of a copy, reported as qemu-img reports it, and its pace (``-r``)."""

from __future__ import annotations

import threading
import time

from ..errors import InvalidOptionError

PROGRESS_STEP = 2 * 1024 * 1024     # qemu-img's request size: its progress steps


class RateLimit:
    """qemu-img's ``-r``: at most ``rate`` bytes of data per second.

    Each piece of data copied books ``n / rate`` seconds of the link: :meth:`consume`
    (from any thread, as a piece is counted) sleeps until the pieces booked before it
    have had their time.  Time left unused is not saved up (as in QEMU's rate limit,
    whose unused quota of a time slice is lost): after a pause the copy goes on at
    the rate, not faster.  Holes and zero ranges cost nothing (they move no data), as
    in qemu-img's commit."""

    def __init__(self, rate: int, *, clock=time.monotonic, sleep=time.sleep):
        if rate <= 0:
            raise ValueError("a rate limit is a positive number of bytes per second")
        self.rate = rate
        self.clock, self.sleep = clock, sleep
        self.lock = threading.Lock()
        self.free_at = clock()        # when the pieces booked so far have had their time
        self.done = 0

    def consume(self, n: int) -> None:
        with self.lock:
            now = self.clock()
            start = max(self.free_at, now)
            self.free_at = start + n / self.rate
            self.done += n
        if start > now:
            self.sleep(start - now)


def check_rate(rate) -> None:
    """A rate limit is a whole number of bytes per second, 0 or None for none."""
    if rate is not None and (type(rate) is not int or rate < 0):
        raise InvalidOptionError(f"Invalid rate limit: {rate!r} (bytes per second, "
                                 f"0 for no limit)")


def rate_limit(rate: int | None) -> RateLimit | None:
    """The :class:`RateLimit` of ``rate`` bytes per second; None for 0 or None (no
    limit, as qemu-img's ``-r 0``)."""
    return RateLimit(rate) if rate else None


class Progress:
    """A copy's progress as a percentage of ``total`` bytes, reported to ``callback``
    (never backwards: reports are serialised); with a ``limit``, the copy is held to
    its pace as the bytes are counted."""

    def __init__(self, total: int, callback, limit: RateLimit | None = None):
        self.total = max(total, 1)
        self.done = 0
        self.cb = callback
        self.limit = limit
        self.lock = threading.Lock()

    def add(self, n: int) -> None:
        if self.limit is not None:
            self.limit.consume(n)
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
            if self.limit is not None:
                self.limit.consume(n)
            return
        end = d + n
        while d < end:
            k = min(end, (d // unit + 1) * unit) - d
            self.add(k)
            d += k


__all__ = ["Progress", "PROGRESS_STEP", "RateLimit", "check_rate", "rate_limit"]
