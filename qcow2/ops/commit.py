"""commit: write an overlay's data into its backing file (qemu-img commit).

Every range held by a layer above the base (data or zero clusters) is read through
the top image and written into the base, which grows if it is smaller; then the top
is emptied (all its clusters dropped), unless ``keep`` (qemu-img's ``-d``, implied by
a base named with ``-b``).  The base
is flushed before the top is touched, so a crash in between leaves both readable,
with the data in both places.
"""

from __future__ import annotations

import os

from ..errors import Qcow2Error
from ..image import ST_DATA, ST_ZERO
from ..opener import open_image
from ..paths import combine_path
from ..writer import WritableQcow2Image
from .outputopts import check_cache
from .progress import check_rate, rate_limit as rate_limit_of

CHUNK = 4 * 1024 * 1024


def _same_file(a: str, b: str) -> bool:
    try:
        return os.path.samefile(a, b)
    except OSError:
        return os.path.realpath(a) == os.path.realpath(b)


def _find_base(chain, base: str, path) -> int:
    """The index in ``chain`` of the image ``base`` names (QEMU's
    bdrv_find_backing_image): an absolute name is compared with each backing file, a
    relative one as each overlay would resolve it (against the overlay's folder), or
    as the overlay stores it."""
    for k in range(1, len(chain)):
        parent, layer = chain[k - 1], chain[k]
        if os.path.isabs(base):
            if _same_file(base, layer.filename):
                return k
            continue
        stored = getattr(parent, "header", None)
        if stored is not None and stored.backing_file == base:
            return k
        if _same_file(combine_path(parent.filename, base), layer.filename):
            return k
    raise Qcow2Error(f"Did not find '{base}' in the backing chain of '{path}'")


def _empty(top: WritableQcow2Image, path) -> None:
    """Drop every cluster of the committed top image (qemu-img's make_empty): rebuilt
    from scratch where it can be (the file shrinks to a few clusters), else cluster
    by cluster."""
    try:
        if top.can_empty_completely():
            top.empty_and_close()
        else:
            top.discard_all()
            top.flush()
    except OSError as exc:
        raise Qcow2Error(f"Failed to empty {path}: {exc.strerror or exc}") from None


def commit(path, *, format: str | None = None, base: str | None = None, keep: bool = False,
           progress=None, cache: str = "writeback", rate_limit: int | None = None) -> None:
    """Commit ``path`` into its backing file (or into ``base``, further down the chain).
    ``keep`` (qemu-img's ``-d``): leave the top image as it is.  A ``base`` implies
    ``keep``, as in qemu-img: the images between the top and the base no longer read as
    they did, the top (still on its old backing file) does.  ``cache`` (-t): "unsafe"
    syncs nothing (the other modes make the base durable before the top is emptied);
    ``rate_limit`` (-r): at most that many bytes of data copied per second."""
    check_cache(cache)
    check_rate(rate_limit)
    limit = rate_limit_of(rate_limit)
    if base is not None:
        keep = True
    top = open_image(path, "r+" if not keep else "r", format=format)
    if cache == "unsafe":
        top.ignore_flushes()
    try:
        chain = top.backing_chain()
        if len(chain) < 2:
            raise Qcow2Error(f"Image '{path}' does not have a backing file")
        idx = 1 if base is None else _find_base(chain, base, path)
        # reopen the base for writing in place of its read-only self
        above = chain[idx - 1]
        old_base = chain[idx]
        fmt = old_base.format
        # the name it was opened by (a json: name keeps its blkdebug rules)
        bname = getattr(above, "full_backing_filename", None) or old_base.filename
        below = old_base.backing
        old_base.backing = None
        old_base.close()
        wbase = open_image(bname, "r+", format=fmt, backing=False)
        if cache == "unsafe":
            wbase.ignore_flushes()
        wbase.backing = below
        above.backing = wbase
        if wbase.size < top.size:
            wbase.resize(top.size)
        # the ranges the layers above the base hold
        runs = [(a, n, flags) for a, n, depth, flags, _h in top.chain_status(0, top.size)
                if depth < idx and flags & (ST_DATA | ST_ZERO)]
        try:
            _copy(top, wbase, runs, progress, limit)
            wbase.flush()
        except OSError as exc:
            raise Qcow2Error(f"Block job failed: {exc.strerror or exc}") from None
        if not keep and isinstance(top, WritableQcow2Image):
            _empty(top, path)
    finally:
        top.close()
    if progress is not None:
        progress(100.0)


def _copy(top, wbase, runs, progress, limit) -> None:
    """Write the ranges ``runs`` of ``top`` into ``wbase`` (data at ``limit``'s pace)."""
    total = sum(n for _a, n, _f in runs) or 1
    done = 0
    if progress is not None:
        progress(0.0)
    for a, n, flags in runs:
        if not flags & ST_DATA:
            wbase.write_zeroes(a, n)
        else:
            pos = a
            while pos < a + n:
                k = min(CHUNK, a + n - pos)
                buf = bytearray(k)
                if limit is not None:
                    limit.consume(k)
                top.readinto(buf, pos)
                wbase.pwrite(buf, pos)
                pos += k
        done += n
        if progress is not None:
            progress(min(99.9, 100.0 * done / total))
