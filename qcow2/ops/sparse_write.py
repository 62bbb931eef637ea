"""convert's writes of plain (raw) output: runs of zero blocks left as holes (``-S``),
data copied by the kernel (``copy_file_range``) where it lies in a file, zeros punched
or written where they must be explicit."""

from __future__ import annotations

import os
import threading

from ..atomic import copy_range, pwrite_all


_ZEROS = memoryview(bytes(1 << 20))


def zero_fill(mv: memoryview) -> None:
    n = len(mv)
    for i in range(0, n, len(_ZEROS)):
        k = min(n - i, len(_ZEROS))
        mv[i:i + k] = _ZEROS[:k]


def is_blockdev(fd: int) -> bool:
    import stat
    return stat.S_ISBLK(os.fstat(fd).st_mode)


def punch_or_zero(fd: int, off: int, n: int) -> None:
    from ..backends import fallocate
    try:
        fallocate.punch_hole(fd, off, n)
        return
    except OSError:
        pass
    z = memoryview(bytes(min(n, 1 << 20)))
    pos = off
    while pos < off + n:
        k = min(len(z), off + n - pos)
        pwrite_all(fd, z[:k], pos)
        pos += k


# Copies and writes into one output file serialize on its inode lock anyway; taking
# turns here makes the waiting thread sleep instead of spinning in the kernel
# (perf: rwsem_spin_on_owner was 13 % of the CPU; 25 % less CPU, same wall time).
COPY_LOCK = threading.Lock()


def copy_run(fd: int, mv: memoryview, off: int, src, tees=()) -> None:
    """Write ``mv`` (the bytes at ``src``) at ``off``: by copy_file_range from
    ``src = (fd, offset, state)`` when the kernel can, else from the buffer.  A
    refusal turns offload off for the rest of the convert (``state[0]``).  ``tees``:
    more outputs getting the same bytes, copied in the kernel from ``fd`` (its pages
    were just written: no second read of the source, no second pass later)."""
    _copy_once(fd, mv, off, src)
    for tee in tees:
        _copy_once(tee, mv, off, (fd, off, _TEE_OFFLOAD))


_TEE_OFFLOAD = [True]


def _copy_once(fd: int, mv: memoryview, off: int, src) -> None:
    done = 0
    if src is not None and src[2][0]:
        with COPY_LOCK:
            done = copy_range(src[0], src[1], fd, off, len(mv))
        if done < 0:
            src[2][0] = False
            done = 0
        if done >= len(mv):
            return
    # the rest from the buffer (past the source's end it holds zeros); pwrites too
    # take turns (on a busy machine: CPU 0.37 -> 0.30 s, wall 0.70 -> 0.49 s for
    # 633 MiB qcow2 -> raw, medians of 7 at load 6.6)
    with COPY_LOCK:
        pwrite_all(fd, mv[done:], off + done)


def sparse_runs(mv: memoryview, off: int, block: int, kernels):
    """(start, end, zero) of the runs of ``mv`` (which lands at output offset ``off``):
    the piece before the first ``block`` boundary, then runs of whole blocks (the last
    maybe short), all zero or holding data."""
    n = len(mv)
    head = min((-off) % block, n)
    if head:
        yield 0, head, kernels.is_zero(mv[:head])
    if head >= n:
        return
    flags = kernels.zero_blocks(mv[head:], block).tobytes()     # 1: an all-zero block
    nb = len(flags)
    i = 0
    while i < nb:
        zero = flags[i]
        j = flags.find(0 if zero else 1, i)
        if j < 0:
            j = nb
        yield head + i * block, min(head + j * block, n), bool(zero)
        i = j


def write_sparse(fd: int, mv: memoryview, off: int, block: int, kernels,
                 explicit_zeros: bool = False, src=None, tees=()) -> None:
    """Write the non-zero blocks of ``mv`` (aligned to ``block`` in output terms);
    ``src`` (fd, offset, state): where ``mv``'s bytes lie in a file, to copy them
    with copy_file_range; ``tees``: see :func:`copy_run`."""
    for a, b, zero in sparse_runs(mv, off, block, kernels):
        if not zero:
            copy_run(fd, mv[a:b], off + a,
                     None if src is None else (src[0], src[1] + a, src[2]), tees)
        elif explicit_zeros:
            punch_or_zero(fd, off + a, b - a)


__all__ = ["COPY_LOCK", "zero_fill", "is_blockdev", "punch_or_zero", "copy_run", "sparse_runs",
           "write_sparse"]
