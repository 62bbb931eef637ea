"""Instance disks in a Ceph pool (images_type=rbd), named as nova names them.

In ``images_rbd_pool``: ``<instance uuid>_disk`` (the root disk: a copy-on-write clone
of the pool base ``<sha1>@snap``, or of a glance ``rbd://`` snapshot, grown to the root
size), ``<uuid>_disk.local`` (ephemeral) and ``<uuid>_disk.swap``, each a raw import of
the host's cached ``ephemeral_*`` / ``swap_*`` base (data only: holes create no
object).  As nova, no ``disk.info`` entry is written for RBD disks (nova's Rbd image
backend has none: the format is always raw); the instance directory is made for the
rest of the instance's files.  The ext file system of the root disk is grown only with
``resize_fs_using_block_device`` and a root size larger than the image (as nova, which
needs a block device for it): here through a working copy in the instance directory
(``growfs``), no kernel mapping.  On failure every image made for the instance is
removed.

``destroy`` removes the instance's ``<uuid>_*`` images, their own snapshots first
(unprotected), retrying a busy image (open by a client: a running guest) every
``rbd_destroy_volume_retry_interval`` seconds, ``rbd_destroy_volume_retries`` times in
all, as nova.
"""

from __future__ import annotations

import errno
import os
import shutil
import time

from ..backends.rbdadmin import Image, close_ioctx, list_images, open_ioctx, remove
from .errors import ComputeError
from .rbdcache import (SNAP, RbdError, check_cloneable, clone, connect, discard,
                       fetch_pool_base, rbd_name, touch)
from .templates import ephemeral_base, instance_dir, swap_base


def disk_image(instance: str, disk: str) -> str:
    """nova's RBD image name of an instance disk: ``<uuid>_disk``, ``<uuid>_disk.local``."""
    return f"{instance}_{disk}"


def spawn_rbd(opts, instance: str, image_id: str, source: str, root_size: int, *,
              disk_format=None, checksum=None, ephemeral_size=None, swap_size=None,
              progress=None) -> dict:
    inst_dir = instance_dir(opts, instance)
    with connect(opts) as cl:
        made: list[str] = []
        made_dir = not os.path.isdir(inst_dir)
        try:
            root = disk_image(instance, "disk")
            _refuse_existing(cl, instance)
            if source.startswith("rbd://"):
                pool, parent, snap, vsize = check_cloneable(opts, cl, source, disk_format,
                                                            checksum)
                base = source
                _check_root_size(root_size, vsize)
                os.makedirs(inst_dir, exist_ok=True)
                made.append(root)
                _clone(cl, pool, parent, snap, root, root_size)
            else:
                os.makedirs(inst_dir, exist_ok=True)
                made.append(root)
                parent, vsize = _clone_pool_base(opts, cl, image_id, source, root, root_size,
                                                 disk_format, checksum, progress)
                base = rbd_name(opts, parent, SNAP)
            result = {"base": base, "base_format": "raw", "disks": {}}
            result["disks"]["disk"] = {"path": rbd_name(opts, root), "format": "raw"}
            if opts.resize_fs_using_block_device and root_size > vsize:
                from .growfs import grow_image_fs
                res = grow_image_fs(rbd_name(opts, root), "raw", inst_dir)
                if res is not None:
                    result["disks"]["disk"]["fs_grown"] = res
            for disk, size, make in (("disk.local", ephemeral_size, ephemeral_base),
                                     ("disk.swap", swap_size, swap_base)):
                if size:
                    local = make(opts, size)
                    img = disk_image(instance, disk)
                    made.append(img)
                    _import(opts, local, img)
                    result["disks"][disk] = {"path": rbd_name(opts, img), "format": "raw"}
        except BaseException:
            for img in reversed(made):
                discard(cl, img)
            if made_dir:
                shutil.rmtree(inst_dir, ignore_errors=True)
            raise
    return result


def _check_root_size(root_size: int, vsize: int) -> None:
    if root_size < vsize:
        raise ComputeError(f"root size {root_size} is smaller than the image "
                           f"({vsize} bytes): refused")


def _clone_pool_base(opts, cl, image_id, source, root, root_size, disk_format, checksum,
                     progress) -> tuple[str, int]:
    """Import the image into the pool cache if needed and clone it to ``root``; returns
    (base name, image size).  A base removed by another host's cache manager between
    the look and the clone (the clone then finds its snapshot unprotected or gone) is
    imported again, once."""
    for attempt in (1, 2):
        parent = fetch_pool_base(opts, cl, image_id, source, disk_format=disk_format,
                                 checksum=checksum, progress=progress)
        try:
            with Image(cl, parent, snapshot=SNAP) as im:
                vsize = im.size()
            _check_root_size(root_size, vsize)
            _clone(cl, cl.pool, parent, SNAP, root, root_size)
        except RbdError as exc:
            if attempt == 2 or getattr(exc, "errno", None) not in (errno.EINVAL, errno.ENOENT):
                raise
            continue
        except OSError as exc:
            if attempt == 2 or exc.errno != errno.ENOENT:
                raise RbdError(exc.strerror or str(exc)) from None
            continue
        touch(cl, parent)
        return parent, vsize
    raise AssertionError("unreachable")


def _refuse_existing(cl, instance: str) -> None:
    try:
        names = list_images(cl)
    except OSError as exc:
        raise RbdError(exc.strerror or str(exc)) from None
    for disk in ("disk", "disk.local", "disk.swap"):
        img = disk_image(instance, disk)
        if img in names:
            raise ComputeError(f"image '{img}' already exists in pool '{cl.pool}'")


def _clone(cl, pool: str, parent: str, snap: str, child: str, size: int) -> None:
    io = None if pool == cl.pool else open_ioctx(cl, pool)
    try:
        clone(cl, parent, snap, child, parent_ioctx=io)
        with Image(cl, child) as im:
            if im.size() < size:
                im.resize(size)
    except OSError as exc:
        err = RbdError(exc.strerror or str(exc))
        err.errno = exc.errno
        raise err from None
    finally:
        if io is not None:
            close_ioctx(io)


def _import(opts, local: str, img: str) -> None:
    """A host base (raw) into a new image of the pool, data only."""
    import qcow2
    qcow2.convert(local, rbd_name(opts, img), src_format="raw", out_format="raw")


# -- destroy -----------------------------------------------------------------------------

def destroy_rbd(opts, instance: str, *, sleep=time.sleep) -> list[str]:
    """Remove the instance's images from the pool; returns their ``rbd:`` names."""
    prefix = f"{instance}_"
    removed = []
    with connect(opts) as cl:
        try:
            names = [n for n in list_images(cl) if n.startswith(prefix)]
        except OSError as exc:
            raise RbdError(exc.strerror or str(exc)) from None
        for name in names:
            if _destroy_image(opts, cl, name, sleep):
                removed.append(rbd_name(opts, name))
    return removed


def _destroy_image(opts, cl, name: str, sleep) -> bool:
    """Remove one image (its snapshots first), retrying while it is busy; False when it
    went meanwhile."""
    tries = opts.rbd_destroy_volume_retries
    for attempt in range(1, tries + 1):
        try:
            _remove_snapshots(cl, name)
            remove(cl, name)
            return True
        except OSError as exc:
            if exc.errno == errno.ENOENT:
                return False
            if exc.errno not in (errno.EBUSY, errno.ENOTEMPTY) or attempt == tries:
                hint = " (still open by a client: is the guest running?)" \
                    if exc.errno == errno.EBUSY else ""
                raise RbdError(f"{exc.strerror or exc}{hint}; tried {attempt} "
                               f"time{'s' if attempt > 1 else ''}") from None
        sleep(opts.rbd_destroy_volume_retry_interval)
    return False


def _remove_snapshots(cl, name: str) -> None:
    with Image(cl, name) as im:
        for snap in im.snapshots():
            if im.snap_is_protected(snap):
                im.snap_unprotect(snap)
            im.snap_remove(snap)
