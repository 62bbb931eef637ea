"""Consistency check and repair of qcow2 images: the engine under ``qemu-img check
[-r leaks|all]`` (``qcow2.ops.check``) and the refcount rebuild of a dirty image at
open (:func:`rebuild_if_dirty`).

The check rebuilds, from the image's own structures, the reference count every host
cluster should have -- the header cluster, the active L1 table, each L2 table once per
L1 table pointing at it, each data cluster once per (L1 table, L2 entry) reaching it,
every host cluster a compressed cluster's bytes touch, the refcount table and blocks,
the snapshot table and snapshot L1 tables, the bitmap directory, bitmap tables and
bitmap data, the LUKS header -- and compares it with the stored refcounts: a stored
refcount below the computed one is a corruption, above it a leak.  It also checks the
COPIED flags (set iff the refcount is 1), alignment, reserved bits, ranges past the
end of the file and the snapshot table.

The rules, counts, messages, the result and the failures are those of QEMU 7.2
(``qcow2_co_check_locked`` and ``qemu-img check``).  Memory is bounded by the file:
the computed and the stored refcounts are numpy arrays with one entry per host cluster
of the file (QEMU's limit of INT_MAX clusters applies, and a check that would need
more than half the machine's memory is refused).  L2 tables are classified with numpy
(:class:`qcow2.cluster.L2Batch`), a batch of tables per step; Python only visits the
entries that have something to report, in QEMU's order.  The check reads no guest
data, so it works on encrypted images without their key.

Repair writes in an order that never makes the image worse if interrupted: refcount
increases before anything relies on them, decreases only for clusters nothing
references, a rebuilt refcount structure is written to free clusters and made durable
before the header points at it, and the dirty and corrupt bits are cleared last.

Modules, one per concern of QEMU's check:

``result``     the result (BdrvCheckResult), repair modes, failures
``state``      the file under check (any Backend), the header in check mode, the IMRT,
               stored refcounts, metadata overlap, corruption signalling
``walk``       the L1/L2 walk and the references it counts
``snapshots``  the snapshot table: read, report, repair
``bitmaps``    the bitmap directory and tables
``refcounts``  refcount blocks, stored vs computed refcounts, leak/corruption repair,
               rebuilding the refcount structure
``copied``     the COPIED flags
``run``        the whole check, and the double check after a repair
``dirty``      the refcount rebuild of a dirty image at open (no numpy at import)
``file``       the file under check and its header in check mode (no numpy)
``fast``       clean L2 tables counted in C (``native/check.c``) inside the walk
``quick``      a consistent image proved consistent without numpy (read-only checks;
               the general check takes over at the first thing to report)

The package itself loads no numpy: ``qcow2.checker.run.check_file`` is the check.
"""

from __future__ import annotations

from .dirty import needs_rebuild, open_locked, rebuild_if_dirty
from .result import (FIX_ERRORS, FIX_LEAKS, REPAIR_MODES, CheckFailedError,
                     CheckNotSupportedError, CheckResult)

__all__ = ["rebuild_if_dirty", "needs_rebuild", "open_locked", "CheckResult", "CheckFailedError",
           "CheckNotSupportedError", "REPAIR_MODES", "FIX_LEAKS", "FIX_ERRORS"]
