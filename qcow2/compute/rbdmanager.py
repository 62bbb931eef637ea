"""The cache manager's pass over the pool bases (images_type=rbd).

A pool base (``<sha1>`` with its protected snapshot ``snap``, see ``rbdcache``) is in
use while the snapshot has clones -- instance disks of any host, in any pool, trash
included; Ceph refuses to unprotect such a snapshot, which is the final guard.  A base
in use gets its ``qcow2.last_used`` restarted (as nova touches a file base).  An unused
base whose last use is at least ``remove_unused_original_minimum_age_seconds`` old
(nova's rule: ``age < maxage`` is too young) goes, under the image's host lock (not
waited for) and after a re-check: unprotect, remove the snapshot, remove the image.
Temporary import images (``.<sha1>.<random>.part``) are stale when their host lock is
free and they were made more than ``STALE_TEMP_AGE`` seconds ago (an import on
another host may still be running: only age tells), and are then removed.
"""

from __future__ import annotations

import errno
import time

from ..backends.rbdadmin import Image, list_images, remove, remove_object
from .locks import try_image_lock
from .rbdcache import (SNAP, RbdError, connect, discard, is_base, last_used, publish_lock,
                       rbd_name, temp_owner, touch)

#: seconds after which a temporary import image whose host lock is free is stale
STALE_TEMP_AGE = 3600
_KEYS = ("in_use", "removed", "would_remove", "too_young", "busy", "kept", "ignored",
         "stale_temporaries")


def clean_pool(opts, *, dry_run: bool = False, now: float | None = None) -> dict:
    """One pass over the pool; the report's lists hold ``rbd:`` names of bases (keys as
    :func:`manager.clean`'s) and ``clones`` maps each base in use to its clones."""
    now = time.time() if now is None else now
    rep: dict = {k: [] for k in _KEYS}
    rep["pool"] = opts.images_rbd_pool
    rep["clones"] = {}
    with connect(opts) as cl:
        try:
            names = list_images(cl)
            for name in names:
                if is_base(name):
                    outcome = _base_pass(opts, cl, name, now, dry_run, rep)
                elif temp_owner(name):
                    outcome = _temp_pass(opts, cl, name, now, dry_run)
                else:
                    continue
                if outcome is not None:
                    rep[outcome].append(rbd_name(opts, name))
        except OSError as exc:
            raise RbdError(exc.strerror or str(exc)) from None
    return rep


def _children(cl, name: str) -> list[str] | None:
    """``pool/image`` of the clones of ``name@snap`` (None: no such snapshot)."""
    try:
        with Image(cl, name, snapshot=SNAP) as snap:
            return [f"{p}/{i}" for p, i, _trash in snap.children()]
    except OSError as exc:
        if exc.errno == errno.ENOENT:
            return None
        raise


def _base_pass(opts, cl, name: str, now: float, dry_run: bool, rep: dict) -> str | None:
    kids = _children(cl, name)
    if kids is None:
        return "ignored"                    # not (or no longer) a finished base
    if kids:
        rep["clones"][rbd_name(opts, name)] = kids
        if not dry_run:
            touch(cl, name, now)
        return "in_use"
    if not opts.remove_unused_base_images:
        return "kept"
    limit = opts.remove_unused_original_minimum_age_seconds
    with Image(cl, name, read_only=True) as im:
        young = now - last_used(im) < limit
    if young:
        return "too_young"
    if dry_run:
        return "would_remove"
    with try_image_lock(opts.lock_dir, name) as got:
        if not got:
            return "busy"
        with publish_lock(cl, name):
            outcome = _remove_base(cl, name, now, limit)
        if outcome == "removed":
            try:
                remove_object(cl, f"qcow2_base_lock.{name}")
            except OSError:
                pass
        return outcome


def _remove_base(cl, name: str, now: float, limit: int) -> str:
    """Re-check, then unprotect (Ceph refuses while there are clones), remove the
    snapshot and the image.  ``removed`` or ``kept``."""
    with Image(cl, name) as im:
        if now - last_used(im) < limit:
            return "kept"
        try:
            im.snap_unprotect(SNAP)
        except OSError as exc:
            if exc.errno == errno.EBUSY:    # a clone was made since: in use
                return "kept"
            raise
        im.snap_remove(SNAP)
    for attempt in range(5):
        try:
            remove(cl, name)
            return "removed"
        except OSError as exc:
            if exc.errno == errno.ENOENT:
                return "removed"
            if exc.errno != errno.EBUSY or attempt == 4:
                raise
            time.sleep(0.2 * (attempt + 1))   # another client looking at it right now
    return "kept"


def _temp_pass(opts, cl, name: str, now: float, dry_run: bool) -> str | None:
    with Image(cl, name, read_only=True) as im:
        born = max(im.created(), im.modified())
    if now - born < STALE_TEMP_AGE:
        return None
    with try_image_lock(opts.lock_dir, temp_owner(name)) as got:
        if not got:
            return None
        if not dry_run:
            discard(cl, name)
    return "stale_temporaries"


def _usage(opts, cl) -> dict:
    bases = []
    size = allocated = 0
    for name in list_images(cl):
        if not is_base(name):
            continue
        try:
            with Image(cl, name, snapshot=SNAP) as snap:
                entry = {"name": rbd_name(opts, name), "size": snap.size(),
                         "allocated": snap.allocated(), "clones": len(snap.children())}
            with Image(cl, name, read_only=True) as im:
                entry["last_used"] = int(last_used(im))
        except OSError as exc:
            if exc.errno == errno.ENOENT:
                continue
            raise
        bases.append(entry)
        size += entry["size"]
        allocated += entry["allocated"]
    return {"pool": opts.images_rbd_pool, "bases": bases, "count": len(bases),
            "size": size, "allocated": allocated}


def pool_usage(opts) -> dict:
    """The pool cache: each base's virtual size, bytes allocated (``rbd du --exact``),
    number of clones and last use; totals."""
    with connect(opts) as cl:
        try:
            return _usage(opts, cl)
        except OSError as exc:
            raise RbdError(exc.strerror or str(exc)) from None
