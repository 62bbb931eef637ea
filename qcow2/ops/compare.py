"""compare: do two images (any format, any backing chain) hold the same guest data?

Semantics are ``qemu-img compare``'s (QEMU's ``img_compare``):

* the common part is compared range by range from the allocation maps: ranges that
  read as zeros in both images are not read at all; a range that reads as zeros in
  one image only needs a zero check of the other; only data against data is read
  from both sides;
* a larger image must read as zeros past the end of the smaller one ("Warning: Image
  size mismatch!"); only its allocated, non-zero ranges are read;
* the first mismatch is reported as qemu-img reports it: the start of the first
  differing 512-byte sector, counted from the start of the range being compared
  (qemu's ``compare_buffers`` / ``find_nonzero``);
* strict mode (``-s``) also fails on a size difference and on the first offset where
  the two images' block status differs (data/zero/allocated/offset-valid/EOF flags,
  exactly as QEMU's ``bdrv_block_status_above`` reports them: see
  :func:`_first_status_mismatch`).

Speed: the plan comes from metadata only; data is read in chunks of :data:`IO_CHUNK`
by a small thread pool (reads and decompression release the GIL), compared with one
``memcmp`` per chunk (``bytearray == memoryview``) and zero-checked with the native
``is_zero`` kernel; numpy locates the differing byte only in the one chunk that
differs.  Chunks are consumed in offset order, so the first mismatch found is the
first in the image, and everything queued after it is cancelled.
"""

from __future__ import annotations

import os
import threading

from ..errors import Qcow2Error
from ..image import ST_DATA, ST_OFFSET_VALID, ST_ZERO
from ..lightweight import record
from ..opener import open_image
from ..pool import run

IO_CHUNK = 4 << 20          # bytes read per task (2-8 MiB measured alike; 4 fits L3 x 2 workers)
SECTOR = 512                # qemu-img reports mismatches at sector granularity
QEMU_IO_BUF = 2 << 20       # qemu-img's IO_BUF_SIZE: its read step (strict emulation)
INT_MAX = (1 << 31) - 1     # qcow2_co_block_status answers at most this many bytes

# Block status flags as QEMU's block layer returns them (own values; only equality matters).
BS_DATA = 0x01
BS_ZERO = 0x02
BS_OFFSET_VALID = 0x04
BS_ALLOCATED = 0x10
BS_EOF = 0x20

# Task kinds: read both and compare, or zero-check one side.
_CMP, _ZERO_A, _ZERO_B = 0, 1, 2

# Exit statuses of qemu-img compare for errors (set as ``exit_code`` on the exception).
EXIT_OPEN = 2
EXIT_STATUS = 3
EXIT_READ = 4


TYPE_CHECKING = False
if TYPE_CHECKING:        # (importing typing costs every CLI process ~3 ms)
    from typing import Callable, Iterator


class Mismatch(record("Mismatch", "offset reason")):
    """Where and why two images differ: ``offset`` (int); ``reason`` is "content",
    "block status" or "size" (strict mode only)."""
    __slots__ = ()


class Comparison(record("Comparison", "size_a size_b mismatch")):
    """The outcome: both sizes, and the first :class:`Mismatch` or None."""
    __slots__ = ()

    @property
    def identical(self) -> bool:
        return self.mismatch is None


def compare(a, b, *, fmt_a: str | None = None, fmt_b: str | None = None,
            strict: bool = False, progress: Callable[[float], None] | None = None,
            force_share: bool = False, workers: int = 2, untrusted: bool = False,
            keys=None) -> Mismatch | None:
    """Compare the guest content of images ``a`` and ``b`` like ``qemu-img compare``.

    Returns None when they are identical, else a :class:`Mismatch` (always true, even
    at offset 0: ``if compare(a, b):`` reads "they differ") whose ``offset`` is the one
    qemu-img reports (the first differing sector; in strict mode also the first
    block-status difference, or the smaller size when the sizes differ) and ``reason``
    says which.  ``progress`` is called with a percentage.  Raises Qcow2Error (with
    ``exit_code`` 2, 3 or 4 as qemu-img exits) on errors.
    """
    res = compare_images(a, b, fmt_a=fmt_a, fmt_b=fmt_b, strict=strict, progress=progress,
                         force_share=force_share, workers=workers, untrusted=untrusted,
                         keys=keys)
    return res.mismatch


def compare_images(a, b, *, fmt_a: str | None = None, fmt_b: str | None = None,
                   strict: bool = False, progress: Callable[[float], None] | None = None,
                   force_share: bool = False, workers: int = 2,
                   untrusted: bool = False, keys=None) -> Comparison:
    """:func:`compare` with the details the CLI prints: both sizes and the mismatch."""
    names = (os.fspath(a), os.fspath(b))
    imgs = []
    try:
        for name, fmt in zip(names, (fmt_a, fmt_b), strict=True):
            try:
                imgs.append(open_image(name, format=fmt, force_share=force_share,
                                       untrusted=untrusted, key=(keys or {}).get(name),
                                       keys=keys))
            except Qcow2Error as exc:
                exc.exit_code = EXIT_OPEN  # type: ignore[attr-defined]
                raise
        return _compare(imgs[0], imgs[1], names, strict, progress, max(1, workers))
    finally:
        for img in imgs:
            img.close()


def _compare(img1, img2, names, strict: bool, progress, workers: int) -> Comparison:
    s1, s2 = img1.size, img2.size
    common = min(s1, s2)
    if progress is not None:
        progress(0.0)
    if strict and s1 != s2:
        return Comparison(s1, s2, Mismatch(common, "size"))
    limit = common
    status_at = None
    if strict:
        try:
            status_at = _first_status_mismatch(img1, img2, common)
        except Qcow2Error as exc:
            exc.exit_code = EXIT_STATUS  # type: ignore[attr-defined]
            raise
        if status_at is not None:
            limit = status_at

    def tasks():
        try:
            yield from _plan_common(img1, img2, limit)
            if status_at is None and s1 != s2:
                big, kind = (img1, _ZERO_A) if s1 > s2 else (img2, _ZERO_B)
                yield from _plan_tail(big, kind, common)
        except Qcow2Error as exc:           # the allocation map is unreadable
            exc.exit_code = EXIT_STATUS  # type: ignore[attr-defined]
            raise

    prog = _Progress(max(s1, s2), progress)
    found = _run(tasks(), (img1, img2), names, workers, prog)
    if found is not None:
        return Comparison(s1, s2, Mismatch(found, "content"))
    if status_at is not None:
        return Comparison(s1, s2, Mismatch(status_at, "block status"))
    prog.finish()
    return Comparison(s1, s2, None)


# ---------------------------------------------------------------------------
# planning (metadata only)

def _cut(kind: int, start: int, stop: int) -> Iterator[tuple[int, int, int, int]]:
    """Tasks (kind, start, stop, base) over [start, stop) in IO_CHUNK-aligned pieces;
    ``base`` is the start of the compared range, from which qemu counts sectors."""
    pos = start
    while pos < stop:
        end = min(stop, (pos // IO_CHUNK + 1) * IO_CHUNK)
        yield kind, pos, end, start
        pos = end


def _plan_common(img1, img2, end: int) -> Iterator[tuple[int, int, int, int]]:
    """What to read in [0, end): img_compare's decisions per range of equal status."""
    if end <= 0:
        return
    it1, it2 = img1.extents(0, end), img2.extents(0, end)
    e1, e2 = next(it1), next(it2)
    pos = 0
    while pos < end:
        while e1.start + e1.length <= pos:
            e1 = next(it1)
        while e2.start + e2.length <= pos:
            e2 = next(it2)
        stop = min(e1.start + e1.length, e2.start + e2.length, end)
        kind = _decide(e1, e2)
        if kind is not None:
            yield from _cut(kind, pos, stop)
        pos = stop


def _decide(e1, e2) -> int | None:
    """QEMU: both zero -> nothing; allocation differs -> the allocated side must read as
    zeros; both allocated -> compare (a zero side reads as zeros, so checking the other
    is enough); both unallocated -> nothing."""
    if e1.zero and e2.zero:
        return None
    if e1.present != e2.present:
        if e1.present:
            return None if e1.zero else _ZERO_A
        return None if e2.zero else _ZERO_B
    if not e1.present:
        return None
    if e1.zero:
        return _ZERO_B
    if e2.zero:
        return _ZERO_A
    return _CMP


def _plan_tail(img, kind: int, start: int) -> Iterator[tuple[int, int, int, int]]:
    """Past the smaller image: the allocated, non-zero ranges of the bigger one."""
    for e in img.extents(start, img.size):
        if e.present and not e.zero and e.length:
            yield from _cut(kind, e.start, e.start + e.length)


# ---------------------------------------------------------------------------
# execution

class _Progress:
    def __init__(self, total: int, callback):
        self.total = max(total, 1)
        self.cb = callback
        self.last = -1.0

    def at(self, offset: int) -> None:
        if self.cb is None:
            return
        pct = min(100.0, 100.0 * offset / self.total)
        if pct - self.last >= 0.01:
            self.last = pct
            self.cb(pct)

    def finish(self) -> None:
        if self.cb is not None:
            self.cb(100.0)


class _Worker:
    """Per-thread read buffers (reused: allocating 8 MiB costs as much as comparing it)."""

    def __init__(self, imgs, names):
        self.imgs = imgs
        self.names = names
        self.tls = threading.local()

    def _bufs(self):
        bufs = getattr(self.tls, "bufs", None)
        if bufs is None:
            bufs = self.tls.bufs = (bytearray(IO_CHUNK), bytearray(IO_CHUNK))
        return bufs

    def _read(self, which: int, buf, start: int) -> None:
        try:
            self.imgs[which].readinto(buf, start)
        except Qcow2Error as exc:
            exc.exit_code = EXIT_READ  # type: ignore[attr-defined]
            raise
        except OSError as exc:
            err = Qcow2Error(f"Error while reading offset {start} of {self.names[which]}: "
                             f"{exc.strerror or exc}")
            err.exit_code = EXIT_READ  # type: ignore[attr-defined]
            err.offset = start         # type: ignore[attr-defined]
            err.sizes = tuple(img.size for img in self.imgs)  # type: ignore[attr-defined]
            raise err from None

    def __call__(self, task) -> tuple[int, int | None]:
        """(the end of the task's range, the offset qemu-img reports for it or None
        if it matches)."""
        kind, start, stop, base = task
        n = stop - start
        full1, full2 = self._bufs()
        if kind == _CMP:
            # ``bytearray == memoryview`` is one memcmp; both operands need length n.
            buf1 = full1 if n == IO_CHUNK else bytearray(n)
            buf2 = memoryview(full2)[:n]
            self._read(0, buf1, start)
            self._read(1, buf2, start)
            if buf1 == buf2:
                return stop, None
            d = _first_difference(buf1, buf2)
        else:
            from .. import kernels
            buf = memoryview(full1)[:n]
            self._read(0 if kind == _ZERO_A else 1, buf, start)
            if kernels.is_zero(buf):
                return stop, None
            d = _first_nonzero(buf)
        pos = start + d
        return stop, base + (pos - base) // SECTOR * SECTOR


def _first_difference(a, b) -> int:
    import numpy as np
    x = np.frombuffer(a, np.uint8)
    y = np.frombuffer(b, np.uint8)
    step = 1 << 16
    for i in range(0, len(x), step):          # memcmp per 64 KiB, then numpy in one
        if bytes(x[i:i + step].data) != bytes(y[i:i + step].data):
            return i + int(np.argmax(x[i:i + step] != y[i:i + step]))
    raise AssertionError("buffers differ but no differing byte found")  # pragma: no cover


def _first_nonzero(buf) -> int:
    import numpy as np
    x = np.frombuffer(buf, np.uint8)
    return int(np.argmax(x != 0))


def _run(tasks, imgs, names, workers: int, prog: _Progress) -> int | None:
    """Run the tasks (results taken in offset order), return the first reported
    mismatch; the tasks after it are not started."""
    found: list = []

    def take(result) -> bool:
        stop, mismatch = result
        if mismatch is not None:
            found.append(mismatch)
            return True
        prog.at(stop)
        return False

    run(tasks, _Worker(imgs, names), workers, apply=take, ordered=True, name="qcow2-compare")
    return found[0] if found else None


# ---------------------------------------------------------------------------
# strict mode: QEMU's block status, call for call

class _Layer:
    """One image of a chain with a forward-only cursor over its own block-status runs,
    cut where QEMU cuts them: at L2 table boundaries for qcow2 (one call never spans
    two tables), data/hole boundaries for raw files; compressed clusters one by one.
    (Metadata-preallocated qcow2 data is split at the file's holes, as QEMU's
    BDRV_BLOCK_RECURSE does; the RECURSE flag itself never reaches the caller.)"""

    def __init__(self, img):
        self.img = img
        self.size = img.size
        self.qcow2 = img.format == "qcow2"
        self.backing = _Layer(img.backing) if img.backing is not None else None
        self._runs = self._gen()
        self._cur = (0, 0, 0)

    def _gen(self):
        img = self.img
        runs = ((a, n, _bs_flags(st)) for a, n, st, _host in img.block_status(0, self.size))
        if not self.qcow2:
            for a, n, flags in runs:
                yield a, a + n, flags
            return
        span = img.l2_span
        for a, n, flags in runs:
            end = a + n
            while a < end:                     # unallocated L1 ranges: one table per call
                stop = min(end, (a // span + 1) * span)
                yield a, stop, flags
                a = stop

    def run_at(self, offset: int) -> tuple[int, int, int]:
        cur = self._cur
        while cur[1] <= offset:
            cur = self._cur = next(self._runs)
        return cur

    def status(self, offset: int, nbytes: int) -> tuple[int, int]:
        """QEMU's bdrv_co_block_status for this node: (flags, pnum)."""
        if offset >= self.size:
            return BS_EOF, 0
        nbytes = min(nbytes, self.size - offset)
        _s, end, flags = self.run_at(offset)
        pnum = min(end - offset, nbytes)
        if self.qcow2:
            pnum = min(pnum, INT_MAX)
        if flags & (BS_DATA | BS_ZERO):
            flags |= BS_ALLOCATED
        elif self.qcow2:
            if self.backing is None or offset >= self.backing.size:
                flags |= BS_ZERO
        if offset + pnum == self.size:
            flags |= BS_EOF
        return flags, pnum


def _bs_flags(st: int) -> int:
    """An image layer's status flags (qcow2.image.ST_*) in QEMU's terms."""
    return ((BS_DATA if st & ST_DATA else 0) | (BS_ZERO if st & ST_ZERO else 0)
            | (BS_OFFSET_VALID if st & ST_OFFSET_VALID else 0))


def _status_above(top: _Layer, offset: int, nbytes: int) -> tuple[int, int]:
    """QEMU's bdrv_co_common_block_status_above(top, NULL): the first layer that
    allocates the range decides; a short backing file reads as allocated zeros."""
    ret, pnum = top.status(offset, nbytes)
    if pnum == 0 or ret & BS_ALLOCATED:
        return ret, pnum
    eof = offset + pnum if ret & BS_EOF else 0
    nbytes = pnum
    p = top.backing
    while p is not None:
        ret, pnum = p.status(offset, nbytes)
        if pnum == 0:
            ret, pnum = BS_ZERO | BS_ALLOCATED, nbytes
            break
        if ret & BS_ALLOCATED:
            ret &= ~BS_EOF
            break
        nbytes = pnum
        p = p.backing
    if offset + pnum == eof:
        ret |= BS_EOF
    return ret, pnum


def _first_status_mismatch(img1, img2, size: int) -> int | None:
    """The first offset where img_compare's strict check fails, replaying its loop:
    query both images, stop if the flags differ, advance by the shorter answer (by
    qemu's 2 MiB read steps inside data whose answer was cut at INT_MAX, where a later
    query may see EOF; elsewhere a re-query inside the same run answers the same)."""
    l1, l2 = _Layer(img1), _Layer(img2)
    o = 0
    while o < size:
        s1, p1 = _status_above(l1, o, size - o)
        s2, p2 = _status_above(l2, o, size - o)
        if s1 != s2:
            return o
        chunk = min(p1, p2)
        if (s1 & BS_ALLOCATED and not s1 & BS_ZERO) and max(p1, p2) >= INT_MAX:
            chunk = min(chunk, QEMU_IO_BUF)
        o += chunk
    return None


__all__ = ["compare", "compare_images", "Comparison", "Mismatch", "IO_CHUNK"]
