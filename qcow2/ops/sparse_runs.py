"""Which ranges of a buffer qemu-img convert writes as data for ``-S MIN``.

qemu-img looks at 512-byte sectors: a run of zero sectors is left unwritten only when
it is at least MIN long; shorter ones after data are written with it.  A data run's end
is rounded up to the alignment (MIN rounded down to a power of two), a zero run's end
down, and a zero run no longer than the distance to the next aligned sector counts as
data.  The rules matter when MIN exceeds the output's cluster size; otherwise they
coincide with "a cluster of zeros is not written".
"""

from __future__ import annotations


def _pow2floor(n: int) -> int:
    return 1 << (n.bit_length() - 1) if n > 0 else 0


def _run(flags, i: int, n: int, sector: int, align: int) -> tuple[bool, int]:
    """(is zero, length) of the run starting at ``i``, its end aligned as qemu-img
    does (``sector``: the absolute sector number of ``i``)."""
    zero = flags[i]
    j = i + 1
    while j < n and flags[j] == zero:
        j += 1
    length = j - i
    if j == n:
        return zero, length
    tail = (sector + length) & (align - 1)
    if tail:
        if zero and length <= tail:
            zero = False              # a short zero run before an aligned boundary
        if not zero:
            length = min(length + align - tail, n - i)
        else:
            length -= tail
    return zero, length


def sparse_data_runs(flags, first_sector: int, min_sectors: int):
    """The (start, end) sector ranges (relative to ``flags``, one flag per sector,
    True for a zero sector; ``first_sector``: the absolute number of the first) that
    qemu-img's ``-S`` of ``min_sectors`` sectors writes as data."""
    n = len(flags)
    align = max(_pow2floor(min_sectors), 1)
    i = 0
    while i < n:
        left = n - i
        minimum = min(min_sectors, left)
        zero, length = _run(flags, i, n, first_sector + i, align)
        if zero:
            i += length
            continue
        used = checked = length
        while i + checked < n:
            zero, length = _run(flags, i + checked, n, first_sector + i + checked, align)
            checked += length
            if not zero:
                used = checked
            elif length >= minimum:
                break
        yield i, i + used
        i += used


__all__ = ["sparse_data_runs"]
