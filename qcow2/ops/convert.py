"""convert: read an image (qcow2 or raw, any backing chain) and write it out.

The work is planned from metadata first: the source's allocation map (``extents()``,
the same walk ``qemu-img map`` does) says which guest ranges hold data; ranges that
read as zeros are never read and never written, so a raw output stays sparse.  Data
ranges are cut into chunks that a small pool of threads reads, decodes (the kernels
release the GIL, so compressed images decode on every core), scans for zero blocks
and writes with ``pwrite``, in any order.  Memory is bounded by workers x chunk size.

The output is an anonymous file (``O_TMPFILE``; a hidden temporary name where that is
unsupported) linked into place only when everything succeeded (and was flushed, unless
the cache mode is ``unsafe``): a failing or killed convert never leaves a half-written
image under DST.
"""

from __future__ import annotations

import os
import threading
from concurrent.futures import FIRST_COMPLETED, ThreadPoolExecutor, wait

from .._atomic import AtomicOutput
from ..errors import Qcow2Error, UnsupportedFeatureError

CHUNK = 4 * 1024 * 1024
_CACHE_MODES = ("none", "writeback", "unsafe", "writethrough", "directsync")


def _plan(img, chunk: int):
    """Guest ranges to copy: data extents, cut into aligned chunks."""
    for e in img.extents():
        if not e.data or e.zero:
            continue
        pos, end = e.start, e.start + e.length
        while pos < end:
            stop = min(end, (pos // chunk + 1) * chunk)
            yield pos, stop - pos
            pos = stop


class _Progress:
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


def convert(src, dst, *, src_format: str | None = None, out_format: str = "raw",
            sparse_size: int = 4096, cache: str = "writeback", workers: int | None = None,
            progress=None, untrusted: bool = False, force_share: bool = False,
            snapshot=None) -> None:
    """Convert image ``src`` to ``dst``.

    ``out_format``: "raw" (sparse).  ``sparse_size``: zero runs of at least this many
    bytes (aligned) become holes; 0 writes every data byte.  ``cache``: "none" and
    "writeback" flush the output before returning, "unsafe" does not.  ``progress``:
    a callable taking a percentage (0..100).
    """
    from ..image import open_image

    if out_format != "raw":
        raise UnsupportedFeatureError(f"output format {out_format!r} is not supported yet",
                                      feature=f"convert -O {out_format}")
    if cache not in _CACHE_MODES:
        raise Qcow2Error(f"Invalid cache option: {cache}")
    if sparse_size < 0 or (sparse_size and sparse_size % 512):
        raise Qcow2Error("Invalid buffer size for sparse output specified: "
                         f"{sparse_size} (must be a multiple of 512)")
    workers = workers or min(4, os.cpu_count() or 1)
    dst = os.fspath(dst)

    with open_image(src, format=src_format, untrusted=untrusted, snapshot=snapshot,
                    force_share=force_share) as img:
        size = img.size
        with AtomicOutput(dst) as out:
            os.ftruncate(out.fd, size)
            plan = list(_plan(img, CHUNK))
            prog = _Progress(sum(n for _o, n in plan), progress)
            if progress is not None:
                progress(0.0)
            _copy_raw(img, out.fd, plan, sparse_size, workers, prog)
            out.commit(sync=cache != "unsafe")
        if progress is not None:
            progress(100.0)


def _copy_raw(img, fd: int, plan, sparse_size: int, workers: int, prog: _Progress) -> None:
    from .. import kernels

    def work(job):
        off, n = job
        buf = bytearray(n)
        img.readinto(buf, off)
        mv = memoryview(buf)
        if sparse_size:
            _write_sparse(fd, mv, off, sparse_size, kernels)
        else:
            _pwrite_all(fd, mv, off)
        prog.add(n)

    if workers <= 1 or len(plan) <= 1:
        for job in plan:
            work(job)
        return
    with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="qcow2-convert") as pool:
        pending = set()
        for job in plan:
            pending.add(pool.submit(work, job))
            if len(pending) >= workers * 2:      # bound memory: 2 chunks per worker in flight
                done, pending = wait(pending, return_when=FIRST_COMPLETED)
                for f in done:
                    f.result()
        for f in pending:
            f.result()


def _write_sparse(fd: int, mv: memoryview, off: int, block: int, kernels) -> None:
    """Write the non-zero blocks of ``mv`` (aligned to ``block`` in guest terms)."""
    n = len(mv)
    head = (-off) % block
    if head:
        head = min(head, n)
        if not kernels.is_zero(mv[:head]):
            _pwrite_all(fd, mv[:head], off)
    body = mv[head:]
    if not len(body):
        return
    zeros = kernels.zero_blocks(body, block)
    i = 0
    nb = len(zeros)
    zl = zeros.tolist()
    while i < nb:
        if zl[i]:
            i += 1
            continue
        j = i + 1
        while j < nb and not zl[j]:
            j += 1
        a, b = i * block, min(j * block, len(body))
        _pwrite_all(fd, body[a:b], off + head + a)
        i = j


def _pwrite_all(fd: int, mv: memoryview, off: int) -> None:
    done = 0
    while done < len(mv):
        done += os.pwritev(fd, [mv[done:]], off + done)
