"""convert's plan: the output cut into pieces (data, zeros, left to a backing file) from
the sources' allocation maps, the data cut into chunks for the workers, and what the
workers of every output kind share (:class:`Work`).  See :mod:`qcow2.ops.convert`."""

from __future__ import annotations

import threading

from ..atomic import io_buffer
from .windows import chunks

CHUNK = 4 * 1024 * 1024

DATA, ZERO, BACKING = "data", "zero", "backing"


class Piece:
    __slots__ = ("dst", "src", "off", "n", "kind", "host")

    def __init__(self, dst: int, src, off: int, n: int, kind: str, host=None):
        self.dst = dst        # offset in the output
        self.src = src        # source Image
        self.off = off        # offset in the source
        self.n = n
        self.kind = kind
        self.host = host      # (fd, offset): where a plain data run lies in a file


def _host_fd(img, depth: int):
    """The file descriptor holding the data of layer ``depth`` of ``img``'s chain."""
    chain = img.backing_chain()
    if depth >= len(chain):
        return None
    layer = chain[depth]
    be = getattr(layer, "data_be", None) or getattr(layer, "be", None)
    fd = getattr(be, "fd", None)
    return fd if isinstance(fd, int) and fd >= 0 else None


def plan(sources, *, top_only: bool):
    """Pieces covering the whole output, in order."""
    base = 0
    for img in sources:
        fds: dict = {}
        for e in img.extents():
            if not e.length:
                continue
            if top_only and e.depth > 0:
                kind = BACKING
            elif e.data and not e.zero:
                kind = DATA
            else:
                kind = ZERO if (not top_only or e.present) else BACKING
            host = None
            if kind == DATA and e.offset is not None and not getattr(img, "encrypted", False):
                fd = fds.get(e.depth, -1)
                if fd == -1:
                    fd = fds[e.depth] = _host_fd(img, e.depth)
                if fd is not None:
                    host = (fd, e.offset)
            yield Piece(base + e.start, img, e.start, e.length, kind, host)
        base += img.size


def data_total(images, top_only: bool, progress) -> int:
    """Bytes of data to copy (for the progress percentage only: a metadata walk)."""
    if progress is None:
        return 0
    return sum(p.n for p in plan(images, top_only=top_only) if p.kind == DATA)


def raw_jobs(images, zero_writes: bool):
    """(piece, output offset, source offset, n) per chunk of data; with ``zero_writes``
    also the zero ranges, as n < 0.  Generated as the workers take them: memory does
    not grow with the image (a map can have millions of extents)."""
    for p in plan(images, top_only=False):
        if p.kind == DATA:
            for d, o, n in chunks(p, CHUNK):
                yield p, d, o, n
        elif zero_writes:
            for d, o, n in chunks(p, CHUNK):
                yield p, d, o, -n


class Work:
    """What the workers of one convert share, whatever the output."""

    def __init__(self, *, sparse_size: int, zero_writes: bool, prog):
        from .. import kernels
        self.kernels = kernels
        self.sparse_size = sparse_size     # -S: zero runs this long are not written
        self.zero_writes = zero_writes     # zeros must be written (-n, or -B)
        self.prog = prog
        self.tls = threading.local()       # per-thread buffers and compressors
        self.syncs: list = []              # BackgroundSync of the outputs (flushing modes)

    def close(self, *, check: bool = True) -> None:
        """Wait for the background syncs (``check``: raise their error)."""
        errors = []
        for s in self.syncs:
            try:
                s.close(check=check)
            except OSError as exc:
                errors.append(exc)
        if errors:
            raise errors[0]

    def read_chunk(self, piece, offset: int, n: int) -> memoryview:
        """``n`` bytes of ``piece``'s source from ``offset``, into this thread's buffer:
        one per thread, reused (a fresh 4 MiB buffer per chunk costs a page fault per
        4 KiB, since readinto fills all of it, holes included)."""
        whole = getattr(self.tls, "buf", None)
        if whole is None:
            whole = self.tls.buf = io_buffer(CHUNK)
        mv = whole[:n]
        piece.src.readinto(mv, offset)
        return mv


__all__ = ["CHUNK", "DATA", "ZERO", "BACKING", "Piece", "plan", "data_total", "raw_jobs", "Work"]
