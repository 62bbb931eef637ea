"""Untrusted mode: limits, format checks and the metadata scan run before any data read.

``qcow2.open(path, untrusted=True)`` opens exactly one file and, before the first guest
read, walks every metadata structure of the image once (header fields, the refcount
table, the active and every snapshot's L1 table, every L2 table those reach, the
snapshot table, the refcount blocks, the bitmap directory and every bitmap table with
the bitmap data clusters they name) and refuses anything a hostile image could use to
make a reader go astray: unaligned entries, reserved bits, references past the end of
the file, host clusters referenced twice from one L1 table, L2 tables or data clusters
that overlap other metadata (or each other), compressed descriptors that overrun the
file, zero flags in a v2 image, extended-L2 subclusters that are both allocated and
zero, bitmap directory entries QEMU would not load, and (unless the image is dirty)
clusters in use whose refcount is 0.  Every table is charged against
``Limits.max_metadata`` before it is read (the snapshot table as it is read, from the
open onwards).

Plain corruption (a field that is malformed on its own) raises ``CorruptImageError``;
aliasing and exceeded limits raise ``UnsafeImageError``.  Both carry ``offset`` (the
file offset of the offending entry or field), ``size`` and ``what``.

The caps live in :class:`Limits`; every one can be overridden by the caller::

    qcow2.open(path, untrusted=True, limits=qcow2.Limits(max_metadata=256 << 20))
    qcow2.open(path, untrusted=True, max_virtual_size=1 << 50)      # same, one field

The scan is vectorised with numpy: L2 tables are read and classified a batch at a
time, Python only formats the first problem found.

Modules: ``limits`` (the caps, the metadata budget, the errors), ``formats`` (which
format a file may be read as), ``metadata`` (the metadata scan).  No numpy at import.
"""

from __future__ import annotations

from .formats import check_format, signatures
from .limits import Budget, Limits, check_header, resolve
from .metadata import scan

__all__ = ["Limits", "resolve", "Budget", "check_header", "check_format", "signatures",
           "scan"]
