"""One export: an open image and the policy it is served under (read-only, discard,
zero detection, write-through), speaking in the terms of the NBD commands.

Everything here goes through the image's public interface (``readinto``, ``pwrite``,
``write_zeroes``, ``discard``, ``flush``, ``extents``), so an export serves whatever
``qcow2.open`` opens: raw or qcow2, backing chains, compressed clusters, an internal
snapshot.  All connections of an export share its one image object, whose cache and
lock are the same for every connection: a flush on one connection makes every write
acknowledged on any connection durable, which is what NBD's multi-conn asks for.
"""

from __future__ import annotations

import threading
from contextlib import nullcontext
from functools import partial
from queue import SimpleQueue

from ..image import READ_COPY
from ..kernels import is_zero, zero_blocks
from . import protocol as P

_CACHE_MODES = ("none", "writeback", "writethrough", "directsync", "unsafe")
_DISCARD_MODES = ("ignore", "off", "unmap", "on")
_DETECT_ZEROES = ("off", "on", "unmap")
_HOLE_MIN = 4096          # reads are scanned for zeros in blocks of this size


def _cpus() -> int:
    import os
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):
        return max(1, os.cpu_count() or 1)


class DecodeSlots:
    """``n`` slots: ``acquire()`` waits for one, ``release()`` gives it back.  Tokens in
    a ``SimpleQueue``, so both are single C calls and a waiter blocks in C (a
    ``BoundedSemaphore`` runs ~2.4 us of Python per pair uncontended, more through its
    condition when eight workers share two slots)."""

    __slots__ = ("acquire", "release")

    def __init__(self, n: int):
        tokens: SimpleQueue = SimpleQueue()
        for _ in range(max(1, n)):
            tokens.put(None)
        self.acquire = tokens.get
        self.release = partial(tokens.put, None)


class Export:
    """``image`` served as ``name``.

    ``readonly``: refuse writes (forced for an image not opened writable).
    ``discard``: "ignore" (TRIM succeeds and does nothing, qemu-nbd's default) or
    "unmap" (TRIM deallocates whole clusters).  ``detect_zeroes``: "off", "on" (an
    all-zero WRITE becomes a zero write) or "unmap" (and may deallocate, with
    ``discard="unmap"``).  ``cache``: qemu-nbd's modes; "writethrough" and
    "directsync" make every write durable before its reply (as FUA does); the others
    leave that to FLUSH ("unsafe" never skips a flush here).
    """

    def __init__(self, image, name: str = "", *, description: str = "",
                 readonly: bool | None = None, discard: str = "ignore",
                 detect_zeroes: str = "off", cache: str = "writeback"):
        if cache not in _CACHE_MODES:
            raise ValueError(f"invalid cache mode {cache!r} (use one of {', '.join(_CACHE_MODES)})")
        if discard not in _DISCARD_MODES:
            raise ValueError(f"invalid discard mode {discard!r} (use ignore or unmap)")
        if detect_zeroes not in _DETECT_ZEROES:
            raise ValueError(f"invalid detect-zeroes mode {detect_zeroes!r} (use off, on or unmap)")
        if len(name.encode()) > P.MAX_STRING or len(description.encode()) > P.MAX_STRING:
            raise ValueError("export names and descriptions are at most 4096 bytes")
        self.image = image
        self.name = name
        self.description = description
        writable = bool(getattr(image, "writable", False))
        self.readonly = (not writable) if readonly is None else (readonly or not writable)
        self.unmap = discard in ("unmap", "on")
        self.detect_zeroes = detect_zeroes
        self.writethrough = cache in ("writethrough", "directsync")
        self.multi_conn = True          # the server clears it when it takes one client
        # reads that decode (compressed clusters) run at most one per CPU across all
        # connections: more only take the CPU from the clients reading the replies
        # (nbdcopy from a zstd image on 2 busy cores: 1.8x qemu-nbd's time with a
        # decoder per worker thread, 1.3x with these slots)
        self.decode_slots = DecodeSlots(_cpus())
        # block status walks the tables outside the image's lock: on a writable image
        # it must not run while a write changes them (writes serialise anyway)
        self.meta_lock = threading.Lock() if not self.readonly else nullcontext()

    @property
    def size(self) -> int:
        return self.image.size

    def transmission_flags(self, structured: bool) -> int:
        """What the export offers: flush always; writes, FUA, trim and zero writes when
        writable; DF with structured replies; multi-conn (one shared image) unless
        the server takes a single client."""
        f = P.FLAG_HAS_FLAGS | P.FLAG_SEND_FLUSH
        if self.multi_conn:
            f |= P.FLAG_CAN_MULTI_CONN
        if self.readonly:
            f |= P.FLAG_READ_ONLY
        else:
            f |= P.FLAG_SEND_FUA | P.FLAG_SEND_TRIM | P.FLAG_SEND_WRITE_ZEROES
        if structured:
            f |= P.FLAG_SEND_DF
        return f

    # -- reads ---------------------------------------------------------------------
    def readinto(self, buf, offset: int) -> None:
        got = self.image.readinto(buf, offset)
        if got != len(buf):
            raise OSError(5, f"short read at {offset}: {got} of {len(buf)} bytes")

    def read_plan(self, offset: int, length: int, buffer) -> list[tuple[int, int, int, int, int]]:
        """How to produce [offset, offset + length): the image's ``read_plan`` (file
        pieces only from images that do not change: read-only ones; copy pieces read
        into ``buffer(n)``), checked to cover the range exactly (a reply's framing
        depends on it)."""
        plan = self.image.read_plan(offset, length, buffer)
        pos = offset
        for a, n, _kind, _fd, _host in plan:
            if a != pos or n <= 0:
                break
            pos += n
        else:
            if pos == offset + length:
                return plan
        self.readinto(buffer(length), offset)            # pragma: no cover - a bad plan
        return [(offset, length, READ_COPY, 0, 0)]

    @staticmethod
    def zero_runs(buf) -> list[tuple[int, int, bool]]:
        """``buf`` (data just read) as (start, length, is_zero) pieces, ``is_zero`` for
        runs of whole 4 KiB blocks of zeros: what a structured read reply sends as holes.
        One C scan (the GIL released) that stops at the first non-zero byte of every
        block, so data costs next to nothing; holes, zero clusters and explicit zeros
        alike become holes, whatever the layer or the format that holds them."""
        flags = zero_blocks(buf, _HOLE_MIN).tobytes()
        n = len(buf)
        if b"\x01" not in flags:
            return [(0, n, False)]
        out = []
        i = 0
        count = len(flags)
        while i < count:
            zero = flags[i] == 1
            j = flags.find(b"\x00" if zero else b"\x01", i)
            if j < 0:
                j = count
            out.append((i * _HOLE_MIN, min(j * _HOLE_MIN, n) - i * _HOLE_MIN, zero))
            i = j
        return out

    def block_status(self, offset: int, length: int, *, one: bool = False,
                     limit: int = P.MAX_EXTENTS) -> list[tuple[int, int]]:
        """``base:allocation`` extents from ``offset``: (length, flags) pairs, HOLE where
        the chain holds no data, ZERO where it reads as zeros, adjacent equal runs
        merged; at most ``limit`` (one with ``one``), covering at most ``length``."""
        out: list[list[int]] = []
        cap = 1 if one else limit
        with self.meta_lock:
            for e in self.image.extents(offset, offset + length):
                flags = (0 if e.data else P.STATE_HOLE) | (P.STATE_ZERO if e.zero else 0)
                if out and out[-1][1] == flags:
                    out[-1][0] += e.length
                    continue
                if len(out) >= cap:
                    break
                out.append([e.length, flags])
        return [(n, f) for n, f in out] or [(length, 0)]

    # -- writes ------------------------------------------------------------------------
    def write(self, data, offset: int, fua: bool) -> None:
        zero = self.detect_zeroes != "off" and is_zero(data)
        with self.meta_lock:
            if zero:
                self.image.write_zeroes(offset, len(data))
            else:
                self.image.pwrite(data, offset)
        self._settle(fua)

    def write_zeroes(self, offset: int, length: int, fua: bool) -> None:
        with self.meta_lock:
            self.image.write_zeroes(offset, length)
        self._settle(fua)

    def trim(self, offset: int, length: int, fua: bool) -> None:
        if self.unmap:
            with self.meta_lock:
                self.image.discard(offset, length)
        self._settle(fua)

    def flush(self) -> None:
        self.image.flush()

    def _settle(self, fua: bool) -> None:
        if fua or self.writethrough:
            self.image.flush()
