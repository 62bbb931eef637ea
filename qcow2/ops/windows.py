"""convert's walk of the output in aligned pieces: the chunks of a source piece per
output window, and the grouping of pieces into windows (one job each).

A piece is anything with ``dst`` (its offset in the output), ``off`` (in its source)
and ``n`` (its length)."""

from __future__ import annotations


def chunks(piece, align: int):
    """(output offset, source offset, length) of ``piece`` cut at ``align``."""
    pos, end = piece.off, piece.off + piece.n
    delta = piece.dst - piece.off
    while pos < end:
        stop = min(end, ((pos + delta) // align + 1) * align - delta)
        yield pos + delta, pos, stop - pos
        pos = stop


def edge_chunks(piece, align: int):
    """:func:`chunks` of ``piece`` in the first and the last window it touches only:
    the windows in between hold nothing but this piece."""
    parts = chunks(piece, align)
    first = next(parts, None)
    if first is None:
        return
    yield first
    end = piece.dst + piece.n
    last_start = max(first[0] + first[2], (end - 1) // align * align)
    if last_start < end:
        yield last_start, piece.off + (last_start - piece.dst), end - last_start


def windows(pieces, window: int, wanted=None):
    """Group the pieces into disjoint, ``window``-aligned output windows: one job per
    window that holds anything to write, so no two jobs ever share an output cluster.
    ``wanted(piece)``: whether a piece has something to write; the windows wholly
    inside a piece that has not are skipped without being visited (a 16 TiB image
    with a few scattered writes is millions of windows of holes)."""
    cur = None
    segs: list = []
    for p in pieces:
        parts = chunks(p, window) if wanted is None or wanted(p) else edge_chunks(p, window)
        for d, o, n in parts:
            w = d // window
            if cur is not None and w != cur:
                yield cur * window, segs
                segs = []
            cur = w
            segs.append((p, d, o, n))
    if segs:
        yield cur * window, segs


__all__ = ["chunks", "edge_chunks", "windows"]
