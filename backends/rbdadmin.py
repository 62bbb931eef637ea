"""Administration of RBD images in a pool: listing, snapshots, clones, metadata.

What the compute flow's pool cache needs beyond a byte store (``rbd.RbdBackend``):
the images of a pool, snapshots (create, protect, unprotect, remove), copy-on-write
clones of a protected snapshot, the children of a snapshot, image metadata (key/value
pairs kept with the image in the cluster), renames and removal.  Everything runs on an
open :class:`rbd.Cluster` (one connection, one pool), so a pass over many images costs
no new connection.  Errors are ``OSError`` with librbd's errno and a one-line message
naming the image, as in ``rbd``.
"""

from __future__ import annotations

import contextlib
import errno
import os
import time

from .rbd import Cluster, binding

#: names of the snapshots listed per call before asking again with a larger buffer
_LIST_START = 64


def _err(r: int, what: str) -> OSError:
    return OSError(-r, f"{what}: {os.strerror(-r)}")


def _listing(ctype: str, count_type: str, call):
    """librbd's list calls: ``call(array, count)`` fills an array of ``ctype`` and
    returns its result; -ERANGE (too small) is retried with the size librbd asked for.
    Returns (result, array, count)."""
    ffi = binding()[0]
    n = _LIST_START
    while True:
        items = ffi.new(f"{ctype}[]", n)
        count = ffi.new(f"{count_type} *", n)
        r = call(items, count)
        if r != -errno.ERANGE:
            return r, items, int(count[0])
        n = max(n * 2, int(count[0]))


def list_images(cluster: Cluster) -> list[str]:
    """The names of the images in the cluster's pool (namespace), sorted."""
    ffi, lib = binding()
    r, specs, count = _listing("rbd_image_spec_t", "size_t",
                               lambda a, c: lib.rbd_list2(cluster.ioctx, a, c))
    if r < 0:
        raise _err(r, f"cannot list the images of pool '{cluster.pool}'")
    try:
        return sorted(ffi.string(specs[i].name).decode(errors="replace") for i in range(count))
    finally:
        lib.rbd_image_spec_list_cleanup(specs, count)


def rename(cluster: Cluster, src: str, dst: str) -> None:
    """Rename an image (EEXIST when ``dst`` exists: the rename is atomic in RADOS)."""
    _, lib = binding()
    r = lib.rbd_rename(cluster.ioctx, src.encode(), dst.encode())
    if r < 0:
        raise _err(r, f"cannot rename image '{src}' to '{dst}' in pool '{cluster.pool}'")


def remove(cluster: Cluster, name: str) -> None:
    """Remove an image: EBUSY while a client has it open (a watcher), ENOTEMPTY while
    it has snapshots, ENOENT when there is none."""
    _, lib = binding()
    r = lib.rbd_remove(cluster.ioctx, name.encode())
    if r < 0:
        raise _err(r, f"cannot remove image '{name}' from pool '{cluster.pool}'")


def open_ioctx(cluster: Cluster, pool: str):
    """An I/O context on another pool of the same connection (for a clone whose parent
    lives elsewhere); give it back with :func:`close_ioctx`."""
    ffi, lib = binding()
    io = ffi.new("rados_ioctx_t *")
    r = lib.rados_ioctx_create(cluster.cluster, pool.encode(), io)
    if r < 0:
        if r == -errno.ENOENT:
            raise OSError(errno.ENOENT, f"pool '{pool}' does not exist")
        raise _err(r, f"cannot open pool '{pool}'")
    return io[0]


def close_ioctx(ioctx) -> None:
    binding()[1].rados_ioctx_destroy(ioctx)


def clone(cluster: Cluster, parent: str, snap: str, child: str, *,
          parent_ioctx=None) -> None:
    """Make ``child`` (in the cluster's pool) a copy-on-write clone of
    ``parent@snap`` (in the same pool, or the pool of ``parent_ioctx``).  The snapshot
    must be protected (EINVAL otherwise); EEXIST when ``child`` exists."""
    ffi, lib = binding()
    opts = ffi.new("rbd_image_options_t *")
    lib.rbd_image_options_create(opts)
    try:
        p_io = cluster.ioctx if parent_ioctx is None else parent_ioctx
        r = lib.rbd_clone3(p_io, parent.encode(), snap.encode(), cluster.ioctx,
                           child.encode(), opts[0])
    finally:
        lib.rbd_image_options_destroy(opts[0])
    if r < 0:
        raise _err(r, f"cannot clone '{parent}@{snap}' to '{child}' in pool "
                      f"'{cluster.pool}'")


@contextlib.contextmanager
def pool_lock(cluster: Cluster, key: str, *, duration: float = 60.0, wait: float = 300.0):
    """Hold a cluster-wide advisory lock ``key`` (a RADOS object lock on the object
    ``key`` of the pool), for a short critical section shared by every host using the
    pool.  The lock expires ``duration`` seconds after it was taken, so a holder that
    dies frees it; a busy lock is waited for, up to ``wait`` seconds (then ETIMEDOUT)."""
    ffi, lib = binding()
    cookie = os.urandom(8).hex().encode()
    tv = ffi.new("struct timeval *")
    tv.tv_sec = int(duration)
    deadline = time.monotonic() + wait
    pause = 0.05
    while True:
        r = lib.rados_lock_exclusive(cluster.ioctx, key.encode(), b"qcow2", cookie,
                                     b"qcow2 pool cache", tv, 0)
        if r == 0:
            break
        if r not in (-errno.EBUSY, -errno.EEXIST):
            raise _err(r, f"cannot lock '{key}' in pool '{cluster.pool}'")
        if time.monotonic() > deadline:
            raise OSError(errno.ETIMEDOUT, f"lock '{key}' in pool '{cluster.pool}' still "
                                           f"held by another client after {wait:g} s")
        time.sleep(pause)
        pause = min(1.0, pause * 2)
    try:
        yield
    finally:
        lib.rados_unlock(cluster.ioctx, key.encode(), b"qcow2", cookie)


def remove_object(cluster: Cluster, key: str) -> None:
    """Remove a RADOS object of the pool (a lock object no longer needed); ENOENT is
    not an error."""
    r = binding()[1].rados_remove(cluster.ioctx, key.encode())
    if r < 0 and r != -errno.ENOENT:
        raise _err(r, f"cannot remove object '{key}' from pool '{cluster.pool}'")


class Image:
    """An open image (or one of its snapshots) for administration; a context manager.

    Opened read-write unless ``snapshot`` is given (a snapshot opens read-only);
    ``read_only=True`` opens the head read-only (no watcher that would make a removal
    by someone else fail with EBUSY is left longer than the handle is open)."""

    def __init__(self, cluster: Cluster, name: str, *, snapshot: str | None = None,
                 read_only: bool = False):
        ffi, lib = binding()
        self.cluster, self.name, self.snapshot = cluster, name, snapshot
        p = ffi.new("rbd_image_t *")
        if snapshot is None and not read_only:
            r = lib.rbd_open(cluster.ioctx, name.encode(), p, ffi.NULL)
        else:
            r = lib.rbd_open_read_only(cluster.ioctx, name.encode(), p,
                                       ffi.NULL if snapshot is None else snapshot.encode())
        if r < 0:
            what = name if snapshot is None else f"{name}@{snapshot}"
            if r == -errno.ENOENT:
                raise OSError(errno.ENOENT, f"image '{what}' does not exist in pool "
                                            f"'{cluster.pool}'")
            raise _err(r, f"cannot open image '{what}' in pool '{cluster.pool}'")
        self.handle = p[0]

    def close(self) -> None:
        if self.handle is not None:
            binding()[1].rbd_close(self.handle)
            self.handle = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def __del__(self):
        try:
            self.close()
        except Exception:  # noqa: BLE001 - interpreter shutdown
            pass

    def _check(self, r: int, what: str) -> int:
        if r < 0:
            raise _err(r, f"{what} of image '{self.name}' in pool '{self.cluster.pool}'")
        return r

    # -- size ---------------------------------------------------------------------------
    def size(self) -> int:
        ffi, lib = binding()
        v = ffi.new("uint64_t *")
        self._check(lib.rbd_get_size(self.handle, v), "cannot get the size")
        return int(v[0])

    def resize(self, size: int) -> None:
        self._check(binding()[1].rbd_resize(self.handle, size), "cannot resize")

    def allocated(self) -> int:
        """Bytes of data this image (or snapshot) holds itself, not counting a parent's
        (``rbd du --exact``)."""
        ffi, lib = binding()
        found: list = []             # (offset, length, exists), by rbd.qcow2rbd_diff_cb
        handle = ffi.new_handle(found)
        self._check(lib.rbd_diff_iterate2(self.handle, ffi.NULL, 0, self.size(), 0, 0,
                                          lib.qcow2rbd_diff_cb, handle),
                    "cannot read the allocation map")
        return sum(length for _, length, exists in found if exists)

    # -- snapshots -----------------------------------------------------------------------
    def snapshots(self) -> list[str]:
        ffi, lib = binding()
        r, snaps, _n = _listing("rbd_snap_info_t", "int",
                                lambda a, c: lib.rbd_snap_list(self.handle, a, c))
        self._check(r, "cannot list the snapshots")
        try:
            return [ffi.string(snaps[i].name).decode(errors="replace") for i in range(r)]
        finally:
            lib.rbd_snap_list_end(snaps)

    def snap_create(self, snap: str) -> None:
        self._check(binding()[1].rbd_snap_create(self.handle, snap.encode()),
                    f"cannot create snapshot '{snap}'")

    def snap_remove(self, snap: str) -> None:
        self._check(binding()[1].rbd_snap_remove(self.handle, snap.encode()),
                    f"cannot remove snapshot '{snap}'")

    def snap_protect(self, snap: str) -> None:
        self._check(binding()[1].rbd_snap_protect(self.handle, snap.encode()),
                    f"cannot protect snapshot '{snap}'")

    def snap_unprotect(self, snap: str) -> None:
        """EBUSY while the snapshot has clones."""
        self._check(binding()[1].rbd_snap_unprotect(self.handle, snap.encode()),
                    f"cannot unprotect snapshot '{snap}'")

    def snap_is_protected(self, snap: str) -> bool:
        ffi, lib = binding()
        v = ffi.new("int *")
        self._check(lib.rbd_snap_is_protected(self.handle, snap.encode(), v),
                    f"cannot inspect snapshot '{snap}'")
        return bool(v[0])

    def children(self) -> list[tuple[str, str, bool]]:
        """(pool, image, in trash) of the clones of the snapshot this handle was opened
        at (the image must be opened with ``snapshot``)."""
        ffi, lib = binding()
        r, specs, count = _listing("rbd_linked_image_spec_t", "size_t",
                                   lambda a, c: lib.rbd_list_children3(self.handle, a, c))
        self._check(r, "cannot list the clones")
        try:
            return [(ffi.string(specs[i].pool_name).decode(errors="replace"),
                     ffi.string(specs[i].image_name).decode(errors="replace"),
                     bool(specs[i].trash)) for i in range(count)]
        finally:
            lib.rbd_linked_image_spec_list_cleanup(specs, count)

    def parent(self) -> tuple[str, str, str] | None:
        """(pool, image, snapshot) this image was cloned from, or None."""
        ffi, lib = binding()
        spec = ffi.new("rbd_linked_image_spec_t *")
        snap = ffi.new("rbd_snap_spec_t *")
        r = lib.rbd_get_parent(self.handle, spec, snap)
        if r == -errno.ENOENT:
            return None
        self._check(r, "cannot get the parent")
        try:
            return (ffi.string(spec.pool_name).decode(errors="replace"),
                    ffi.string(spec.image_name).decode(errors="replace"),
                    ffi.string(snap.name).decode(errors="replace"))
        finally:
            lib.rbd_linked_image_spec_cleanup(spec)
            lib.rbd_snap_spec_cleanup(snap)

    # -- metadata and times --------------------------------------------------------------
    def metadata_get(self, key: str) -> str | None:
        ffi, lib = binding()
        n = 256
        while True:
            buf = ffi.new("char[]", n)
            length = ffi.new("size_t *", n)
            r = lib.rbd_metadata_get(self.handle, key.encode(), buf, length)
            if r == -errno.ERANGE and int(length[0]) > n:
                n = int(length[0])
                continue
            if r == -errno.ENOENT:
                return None
            self._check(r, f"cannot read metadata '{key}'")
            return ffi.string(buf).decode(errors="replace")

    def metadata_set(self, key: str, value: str) -> None:
        self._check(binding()[1].rbd_metadata_set(self.handle, key.encode(), value.encode()),
                    f"cannot set metadata '{key}'")

    def _timestamp(self, fn, what: str) -> float:
        ffi = binding()[0]
        ts = ffi.new("struct timespec *")
        self._check(fn(self.handle, ts), f"cannot get the {what} time")
        return ts.tv_sec + ts.tv_nsec / 1e9

    def created(self) -> float:
        return self._timestamp(binding()[1].rbd_get_create_timestamp, "creation")

    def modified(self) -> float:
        return self._timestamp(binding()[1].rbd_get_modify_timestamp, "modification")


__all__ = ["Image", "clone", "close_ioctx", "list_images", "open_ioctx", "pool_lock", "remove",
           "remove_object", "rename"]
