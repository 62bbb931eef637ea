"""RBD images (Ceph's block device) through librbd's C API.

The binding is ``qcow2.backends._rbd``, a cffi extension in API mode over
``rados/librados.h`` and ``rbd/librbd.h`` (``native/build_rbd.py``).  cffi releases the
GIL around every librbd call, so threads read and write an image in parallel.  When
the extension was not built (no librbd-dev), :func:`unavailable_reason` says why and
opening raises ``OSError(ENOSYS)`` with that reason.

One :class:`RbdBackend` holds one cluster connection (like QEMU's rbd driver):
``rados_create`` as the cephx user, the ceph.conf read (the named one, or librados'
default search), bounded waits set (``client_mount_timeout`` and
``rados_mon_op_timeout`` to the connect timeout, 5 s as nova's
``rbd_connect_timeout``; ``rados_osd_op_timeout`` to the op timeout), then the
name's ``KEY=VALUE`` options in order (so they override all of the above).  Failures
become one-line ``OSError`` messages that say what is wrong: a missing ceph.conf or
keyring, no monitors, a cluster that does not answer, cephx refusing the key, an
unknown pool, image or snapshot.

Semantics, as QEMU's rbd driver has them: writes past the end grow the image first;
reads stop at the end; ``punch_hole`` is librbd's write-zeroes (objects wholly inside
are removed, the edges zeroed), ``write_zeros`` the thick-provisioned variant;
``data_regions`` asks the object map (``rbd_diff_iterate2`` at object granularity)
when fast-diff is valid, under QEMU's conditions for trusting it, so ``map`` agrees
with qemu-img's; a snapshot (``@SNAP``) opens read-only.  A writer takes the image's
exclusive lock explicitly (when the image has that feature), so that a second writer
is refused rather than taking turns; readers take nothing (QEMU takes no lock on RBD).
"""

from __future__ import annotations

import errno
import os

from .base import Backend, ResizableWhenWritable

TYPE_CHECKING = False
if TYPE_CHECKING:        # (importing typing costs every CLI process ~3 ms)
    from typing import Hashable, Iterator

#: the binding's version this module was written for (native/build_rbd.py VERSION)
BINDING_VERSION = 2
#: seconds to wait for the monitors (nova's rbd_connect_timeout default)
CONNECT_TIMEOUT = 5.0
#: seconds an OSD operation may take before it fails with ETIMEDOUT
OP_TIMEOUT = 30.0
#: seconds the removal of a failed output keeps trying while the cluster does not answer
REMOVE_PATIENCE = 60.0
_CHUNK = 1 << 30                # per librbd call (its lengths are size_t, results ssize_t)
_DIFF_WINDOW = 1 << 30          # diff_iterate2 is asked about this much at a time
_DEFAULT_CONF_PATHS = ("$CEPH_CONF", "/etc/ceph/ceph.conf", "~/.ceph/config", "./ceph.conf")

try:
    from . import _rbd
    if _rbd.lib.qcow2rbd_version() != BINDING_VERSION:
        _REASON = (f"qcow2.backends._rbd is version {_rbd.lib.qcow2rbd_version()} but this "
                   f"package needs {BINDING_VERSION}; reinstall the package")
        _rbd = None
    else:
        _REASON = None
except ImportError as exc:
    _rbd = None
    _REASON = ("the RBD binding qcow2.backends._rbd is not built (librbd-dev was missing "
               "when the package was installed); install librbd-dev and reinstall the "
               "package" if "cannot import name" in str(exc) else
               f"the RBD binding qcow2.backends._rbd cannot be loaded: {exc}")


def unavailable_reason() -> str | None:
    """Why RBD images cannot be opened here, or None when they can."""
    return _REASON


def _lib():
    if _rbd is None:
        raise OSError(errno.ENOSYS, _REASON)
    return _rbd.ffi, _rbd.lib


def binding():
    """(ffi, lib) of the librbd binding (``OSError(ENOSYS)`` when it is not built): for
    the pool administration in ``qcow2.backends.rbdadmin``."""
    return _lib()


def librbd_version() -> tuple[int, int, int]:
    """librbd's (major, minor, extra) as the loaded library reports it."""
    ffi, lib = _lib()
    v = ffi.new("int[3]")
    lib.rbd_version(v, v + 1, v + 2)
    return (v[0], v[1], v[2])


if _rbd is not None:
    @_rbd.ffi.def_extern()
    def qcow2rbd_diff_cb(offset, length, exists, arg):
        """rbd_diff_iterate2's callback: collect (offset, length, exists)."""
        _rbd.ffi.from_handle(arg).append((offset, length, exists))
        return 0


def _b(s: str | None):
    return _rbd.ffi.NULL if s is None else s.encode()


def _fail(code: int, message: str, name: str | None = None) -> OSError:
    return OSError(code, message) if name is None else OSError(code, message, name)


class Cluster:
    """A connection to a Ceph cluster and an I/O context on one pool (namespace).

    ``close`` (or the ``with`` block) shuts it down; RbdBackend owns one each."""

    def __init__(self, pool: str, *, namespace: str = "", conf: str | None = None,
                 user: str | None = None, options=(), connect_timeout: float = CONNECT_TIMEOUT,
                 op_timeout: float = OP_TIMEOUT):
        ffi, lib = _lib()
        self.pool, self.namespace = pool, namespace
        self.conf, self.user = conf, user or "admin"
        try:            # (for messages; librados judges the value itself)
            self.connect_timeout = float(dict(options).get("client_mount_timeout",
                                                           connect_timeout))
        except ValueError:
            self.connect_timeout = connect_timeout
        self.cluster = self.ioctx = None
        p = ffi.new("rados_t *")
        r = lib.rados_create(p, _b(user))
        if r < 0:
            raise _fail(-r, f"cannot set up librados for client.{self.user}: "
                            f"{os.strerror(-r)}")
        self.cluster = p[0]
        try:
            self._configure(conf, options, connect_timeout, op_timeout)
            # no monitor address: say so now (librados would print its DNS SRV failure
            # on stderr, then fail with ENOENT); DNS SRV discovery is not supported
            r = -errno.ENOENT if not self.conf_get("mon_host") else \
                lib.rados_connect(self.cluster)
            if r < 0:
                raise self._connect_error(-r)
            io = ffi.new("rados_ioctx_t *")
            r = lib.rados_ioctx_create(self.cluster, pool.encode(), io)
            if r < 0:
                if r == -errno.ENOENT:
                    raise _fail(errno.ENOENT, f"pool '{pool}' does not exist")
                raise _fail(-r, f"cannot open pool '{pool}': {os.strerror(-r)}")
            self.ioctx = io[0]
            if namespace:
                lib.rados_ioctx_set_namespace(self.ioctx, namespace.encode())
        except BaseException:
            self.close()
            raise

    def _configure(self, conf, options, connect_timeout: float, op_timeout: float) -> None:
        lib = _rbd.lib
        r = lib.rados_conf_read_file(self.cluster, _b(conf))
        if conf is not None and r < 0:
            if not os.path.exists(conf):
                raise _fail(errno.ENOENT, f"ceph.conf '{conf}' does not exist")
            raise _fail(-r, f"cannot read ceph.conf '{conf}': {os.strerror(-r)}")
        settings = [("client_mount_timeout", f"{connect_timeout:g}"),
                    ("rados_mon_op_timeout", f"{connect_timeout:g}"),
                    ("rados_osd_op_timeout", f"{op_timeout:g}"),
                    # errors are ours to report, in one line: librados prints none
                    ("log_to_stderr", "false"), ("err_to_stderr", "false")]
        for key, value in settings + list(options):
            r = lib.rados_conf_set(self.cluster, key.encode(), value.encode())
            if r < 0:
                raise _fail(errno.EINVAL, f"invalid conf option {key}: {os.strerror(-r)}")

    def conf_get(self, key: str) -> str:
        """A librados option's value as this connection sees it ("" when unset)."""
        ffi, lib = _rbd.ffi, _rbd.lib
        buf = ffi.new("char[]", 8192)
        r = lib.rados_conf_get(self.cluster, key.encode(), buf, len(buf))
        return ffi.string(buf).decode(errors="replace") if r == 0 else ""

    def _connect_error(self, code: int) -> OSError:
        """The one-line reason rados_connect failed with -``code``."""
        who = f"client.{self.user}"
        mons = self.conf_get("mon_host")
        if code == errno.ETIMEDOUT:
            return _fail(code, f"the Ceph monitors ({mons or 'none known'}) did not answer "
                               f"within {self.connect_timeout:g} s (is the cluster down?)")
        if code in (errno.EACCES, errno.EPERM):
            return _fail(code, f"cephx refused {who}: its key is wrong or unknown to the "
                               f"cluster ({os.strerror(code)})")
        if code in (errno.ENOENT, errno.EINVAL):
            if not mons:
                where = (f"ceph.conf '{self.conf}' names none (mon_host)"
                         if self.conf is not None else
                         "no ceph.conf was found (" + ", ".join(_DEFAULT_CONF_PATHS)
                         + ") and no mon_host was given")
                return _fail(errno.ENOENT, f"no Ceph monitors to connect to: {where}")
            missing = self._missing_keyring()
            if missing is not None:
                return _fail(errno.ENOENT, f"no keyring for {who}: {missing}")
        return _fail(code, f"cannot connect to the Ceph cluster as {who}: {os.strerror(code)}")

    def _missing_keyring(self) -> str | None:
        """Why no key for the user can be found, or None when one may be."""
        if "none" in self.conf_get("auth_client_required").split(",") \
                or self.conf_get("key") or self.conf_get("keyfile"):
            return None
        paths = [p.strip() for p in self.conf_get("keyring").replace(";", ",").split(",")
                 if p.strip()]
        if not any(os.path.exists(os.path.expanduser(p)) for p in paths):
            return "none of " + ", ".join(paths or ["(keyring unset)"]) + " exists"
        return None

    def fsid(self) -> str:
        ffi, lib = _rbd.ffi, _rbd.lib
        buf = ffi.new("char[]", 64)
        r = lib.rados_cluster_fsid(self.cluster, buf, len(buf))
        return ffi.string(buf).decode() if r >= 0 else ""

    def pool_id(self) -> int:
        return int(_rbd.lib.rados_ioctx_get_id(self.ioctx))

    def create_image(self, image: str, size: int, order: int = 0) -> None:
        """Create an RBD image of ``size`` bytes (the cluster's default features);
        EEXIST when one of that name exists."""
        ffi, lib = _rbd.ffi, _rbd.lib
        r = lib.rbd_create(self.ioctx, image.encode(), size, ffi.new("int *", order))
        if r < 0:
            if r == -errno.EEXIST:
                raise _fail(errno.EEXIST, f"image '{image}' already exists in pool "
                                          f"'{self.pool}'")
            if r == -errno.ETIMEDOUT:
                # the outcome is unknown: the image may exist, half made, or be someone
                # else's that appeared meanwhile; not removed blindly
                raise _fail(errno.ETIMEDOUT, f"the OSDs did not answer creating image "
                                             f"'{image}' in pool '{self.pool}': it may "
                                             f"exist half made (see 'rbd info "
                                             f"{self.pool}/{image}' once the cluster answers)")
            raise _fail(-r, f"cannot create image '{image}' in pool '{self.pool}': "
                            f"{os.strerror(-r)}")

    def image_exists(self, image: str) -> bool:
        """Whether an image of that name is in the pool (it is opened read-only and
        closed again; any error but "no such image" is raised)."""
        ffi, lib = _rbd.ffi, _rbd.lib
        p = ffi.new("rbd_image_t *")
        r = lib.rbd_open_read_only(self.ioctx, image.encode(), p, ffi.NULL)
        if r == 0:
            lib.rbd_close(p[0])
            return True
        if r == -errno.ENOENT:
            return False
        raise _fail(-r, f"cannot look for image '{image}' in pool '{self.pool}': "
                        f"{os.strerror(-r)}")

    def remove_image(self, image: str) -> None:
        """Remove an image (ENOENT when there is none; EBUSY while open or with
        snapshots)."""
        r = _rbd.lib.rbd_remove(self.ioctx, image.encode())
        if r < 0:
            raise _fail(-r, f"cannot remove image '{image}' from pool '{self.pool}': "
                            f"{os.strerror(-r)}")

    def close(self) -> None:
        lib = _rbd.lib
        if self.ioctx is not None:
            lib.rados_ioctx_destroy(self.ioctx)
            self.ioctx = None
        if self.cluster is not None:
            lib.rados_shutdown(self.cluster)
            self.cluster = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


class RbdBackend(ResizableWhenWritable, Backend):
    """An RBD image (or a snapshot of one, read-only) as a byte store.

    ``RbdBackend("img", pool="rbd", writable=True)``; the other keywords are those of
    an ``rbd:`` name (``qcow2.rbdname.RbdName.backend_args()``) and the timeouts.
    ``create=SIZE`` makes the image first (EEXIST when it exists) and opens it for
    writing; :meth:`remove` closes and deletes it (a failed output's clean-up).
    """

    def __init__(self, image: str, *, pool: str = "rbd", snapshot: str | None = None,
                 namespace: str = "", conf: str | None = None, user: str | None = None,
                 options=(), writable: bool = False, create: int | None = None,
                 name: str | None = None, connect_timeout: float = CONNECT_TIMEOUT,
                 op_timeout: float = OP_TIMEOUT):
        ffi, lib = _lib()
        self.image_name, self.pool, self.snapshot = image, pool, snapshot
        self.namespace = namespace
        spec = f"{namespace}/{image}" if namespace else image
        self.name = name or f"rbd:{pool}/{spec}" + (f"@{snapshot}" if snapshot else "")
        if snapshot is not None and (writable or create is not None):
            raise _fail(errno.EROFS, f"RBD snapshot '{spec}@{snapshot}' is read-only")
        self.writable = writable or create is not None
        self.image = None
        self._locked = False
        self.cluster = Cluster(pool, namespace=namespace, conf=conf, user=user,
                               options=options, connect_timeout=connect_timeout,
                               op_timeout=op_timeout)
        created = False
        try:
            if create is not None:
                self.cluster.create_image(image, create)
                created = True
            self.image = self._open(ffi, lib, spec)
            info = ffi.new("rbd_image_info_t *")
            r = lib.rbd_stat(self.image, info, ffi.sizeof("rbd_image_info_t"))
            if r < 0:
                raise _fail(-r, f"cannot stat image '{spec}': {os.strerror(-r)}")
            self._size = int(info.size)
            self.object_size = int(info.obj_size)
            self.features = self._u64(lib.rbd_get_features)
            self.has_parent = self._has_parent(ffi, lib)
        except BaseException:
            if created:                 # an image we made and cannot use: not left behind
                try:
                    self.remove()
                except OSError:
                    pass                # (the original error matters more)
            self.close()
            raise

    def _open(self, ffi, lib, spec: str):
        p = ffi.new("rbd_image_t *")
        image, snap = self.image_name.encode(), _b(self.snapshot)
        if self.writable:
            r = lib.rbd_open(self.cluster.ioctx, image, p, ffi.NULL)
        else:
            r = lib.rbd_open_read_only(self.cluster.ioctx, image, p, snap)
        if r == 0:
            return p[0]
        where = f"in pool '{self.pool}'"
        if r == -errno.ENOENT:
            if self.snapshot is not None and \
                    lib.rbd_open_read_only(self.cluster.ioctx, image, p, ffi.NULL) == 0:
                lib.rbd_close(p[0])
                raise _fail(errno.ENOENT, f"image '{spec}' {where} has no snapshot "
                                          f"'{self.snapshot}'")
            raise _fail(errno.ENOENT, f"image '{spec}' does not exist {where}")
        if r in (-errno.EPERM, -errno.EACCES):
            raise _fail(-r, f"client.{self.cluster.user} may not open image '{spec}' "
                            f"{where} (cephx caps: {os.strerror(-r)})")
        if r == -errno.ETIMEDOUT:
            raise _fail(-r, f"the OSDs did not answer opening image '{spec}' {where} "
                            f"(is the cluster down?)")
        raise _fail(-r, f"cannot open image '{spec}' {where}: {os.strerror(-r)}")

    def _u64(self, fn) -> int:
        v = _rbd.ffi.new("uint64_t *")
        r = fn(self.image, v)
        if r < 0:
            raise self._io_error(r, fn.__name__)
        return int(v[0])

    def _has_parent(self, ffi, lib) -> bool:
        spec = ffi.new("rbd_linked_image_spec_t *")
        snap = ffi.new("rbd_snap_spec_t *")
        r = lib.rbd_get_parent(self.image, spec, snap)
        if r == 0:
            lib.rbd_linked_image_spec_cleanup(spec)
            lib.rbd_snap_spec_cleanup(snap)
        return r == 0

    def _io_error(self, r: int, what: str) -> OSError:
        if self.image is None:
            return _fail(errno.EBADF, "RBD image is closed", self.name)
        return _fail(-r, f"{what} failed: {os.strerror(-r)}", self.name)

    def _handle(self):
        if self.image is None:
            raise _fail(errno.EBADF, "RBD image is closed", self.name)
        return self.image

    def snapshots(self) -> list[tuple[int, str, int]]:
        """The image's RBD snapshots: (id, name, size in bytes), oldest first."""
        ffi, lib = _rbd.ffi, _rbd.lib
        n = ffi.new("int *", 16)
        while True:
            snaps = ffi.new("rbd_snap_info_t[]", n[0])
            r = lib.rbd_snap_list(self._handle(), snaps, n)
            if r != -errno.ERANGE:
                break
        if r < 0:
            raise self._io_error(r, "rbd_snap_list")
        out = [(int(snaps[i].id), ffi.string(snaps[i].name).decode(errors="replace"),
                int(snaps[i].size)) for i in range(r)]
        lib.rbd_snap_list_end(snaps)
        return sorted(out)

    # -- capabilities ------------------------------------------------------
    @property
    def can_seek_data(self) -> bool:
        """The object map can be trusted for allocation, under QEMU's conditions
        (fast-diff valid; before librbd 1.17 also no striping v2 and no parent)."""
        if self.image is None or not self.features & _rbd.lib.RBD_FEATURE_FAST_DIFF:
            return False
        flags = _rbd.ffi.new("uint64_t *")
        if _rbd.lib.rbd_get_flags(self.image, flags) < 0 \
                or flags[0] & _rbd.lib.RBD_FLAG_FAST_DIFF_INVALID:
            return False
        if (_rbd.lib.LIBRBD_VER_MAJOR, _rbd.lib.LIBRBD_VER_MINOR) < (1, 17):
            # https://tracker.ceph.com/issues/53784: offsets reported wrong unless
            # object aligned, which only holds without striping and parent
            return not (self.features & _rbd.lib.RBD_FEATURE_STRIPINGV2 or self.has_parent)
        return True

    @property
    def preallocation_modes(self) -> tuple[str, ...]:
        """Only "off", as QEMU's rbd driver: RBD allocates as it is written."""
        return ("off",)

    def identity(self) -> Hashable:
        ffi = _rbd.ffi
        buf = ffi.new("char[]", 128)
        r = _rbd.lib.rbd_get_id(self._handle(), buf, len(buf))
        image_id = ffi.string(buf).decode() if r == 0 else self.image_name
        return ("rbd", self.cluster.fsid(), self.cluster.pool_id(), self.namespace, image_id,
                self.snapshot)

    def lock(self, *, write: bool, force_share: bool = False) -> None:
        """A writer takes the exclusive lock (images with that feature); a second
        writer is then refused instead of taking turns.  Readers take nothing."""
        if not write or not self.writable or self._locked \
                or not self.features & _rbd.lib.RBD_FEATURE_EXCLUSIVE_LOCK:
            return
        r = _rbd.lib.rbd_lock_acquire(self._handle(), _rbd.lib.RBD_LOCK_MODE_EXCLUSIVE)
        if r < 0:
            if r in (-errno.EROFS, -errno.EBUSY, -errno.EAGAIN):
                raise _fail(errno.EAGAIN, "the image is in use: another client holds its "
                                          "exclusive lock", self.name)
            raise self._io_error(r, "taking the exclusive lock")
        self._locked = True

    # -- reading -----------------------------------------------------------
    def size(self) -> int:
        self._size = self._u64(_rbd.lib.rbd_get_size)
        return self._size

    def readinto(self, buf, offset: int) -> int:
        mv = memoryview(buf).cast("B")
        img = self._handle()
        n = len(mv)
        if offset + n > self._size:
            self.size()                          # another client may have grown it
        n = max(0, min(n, self._size - offset))
        ffi, lib = _rbd.ffi, _rbd.lib
        done = 0
        while done < n:
            k = min(_CHUNK, n - done)
            r = lib.rbd_read2(img, offset + done,
                              k, ffi.from_buffer("char[]", mv[done:done + k],
                                                 require_writable=True), 0)
            if r < 0:
                raise self._io_error(r, f"read of {k} bytes at {offset + done:#x}")
            done += r
            if r < k:                            # shrunk under us: the end
                break
        return done

    def data_regions(self, start: int = 0, end: int | None = None) -> Iterator[tuple[int, int]]:
        start, end = self.clip(start, end)
        if start >= end:
            return
        if not self.can_seek_data:
            yield (start, end - start)
            return
        pending = None                           # a region not yet yielded (merging)
        for off, n in self._diff(start, end, include_parent=True, whole_object=True):
            off, stop = max(off, start), min(off + n, end)
            if stop <= off:
                continue
            if pending is not None and pending[1] == off:
                pending = (pending[0], stop)
                continue
            if pending is not None:
                yield (pending[0], pending[1] - pending[0])
            pending = (off, stop)
        if pending is not None:
            yield (pending[0], pending[1] - pending[0])

    def _diff(self, start: int, end: int, *, include_parent: bool, whole_object: bool):
        """(offset, length) of the extents rbd_diff_iterate2 reports as existing in
        [start, end), asked a window at a time from object-aligned offsets."""
        ffi, lib = _rbd.ffi, _rbd.lib
        img = self._handle()
        pos = start - start % self.object_size
        while pos < end:
            stop = min(end, pos + _DIFF_WINDOW)
            found: list[tuple[int, int, int]] = []
            handle = ffi.new_handle(found)
            r = lib.rbd_diff_iterate2(img, ffi.NULL, pos, stop - pos, include_parent,
                                      whole_object, lib.qcow2rbd_diff_cb, handle)
            if r < 0:
                raise self._io_error(r, "rbd_diff_iterate2")
            for off, n, exists in sorted(found):
                if exists:
                    yield off, n
            pos = stop

    def allocated_size(self) -> int:
        """Bytes of the image's own objects that hold data (``rbd du``: whole objects
        where the object map is valid, exact extents otherwise)."""
        exact = not self.can_seek_data
        return sum(n for _off, n in self._diff(0, self.size(), include_parent=False,
                                               whole_object=not exact))

    # -- writing -----------------------------------------------------------
    def pwrite(self, data, offset: int) -> int:
        if not self.writable:
            return super().pwrite(data, offset)
        mv = memoryview(data).cast("B")
        img = self._handle()
        if offset + len(mv) > self._size and offset + len(mv) > self.size():
            self.truncate(offset + len(mv))      # librbd writes only inside the image
        ffi, lib = _rbd.ffi, _rbd.lib
        done = 0
        while done < len(mv):
            k = min(_CHUNK, len(mv) - done)
            r = lib.rbd_write2(img, offset + done, k,
                               ffi.from_buffer("char[]", mv[done:done + k]), 0)
            if r != k:
                raise self._io_error(r if r < 0 else -errno.EIO,
                                     f"write of {k} bytes at {offset + done:#x}")
            done += k
        return done

    def truncate(self, size: int) -> None:
        if not self.writable:
            return super().truncate(size)
        r = _rbd.lib.rbd_resize(self._handle(), size)
        if r < 0:
            raise self._io_error(r, f"resize to {size} bytes")
        self._size = size

    def _zeroes(self, offset: int, length: int, flags: int, what: str) -> None:
        img = self._handle()
        end = min(offset + length, self.size())
        while offset < end:
            k = min(_CHUNK, end - offset)
            r = _rbd.lib.rbd_write_zeroes(img, offset, k, flags, 0)
            if r < 0:
                raise self._io_error(r, f"{what} of {k} bytes at {offset:#x}")
            offset += k

    def punch_hole(self, offset: int, length: int) -> None:
        if not self.writable:
            return super().punch_hole(offset, length)
        # librbd's write-zeroes: objects wholly inside are removed, the edges zeroed
        # (rbd_discard would skip pieces below rbd_discard_granularity_bytes)
        self._zeroes(offset, length, 0, "punch hole")

    def write_zeros(self, offset: int, length: int) -> None:
        if not self.writable:
            return super().write_zeros(offset, length)
        if offset + length > self.size():
            self.truncate(offset + length)
        self._zeroes(offset, length, _rbd.lib.RBD_WRITE_ZEROES_FLAG_THICK_PROVISION,
                     "write zeroes")

    def flush(self) -> None:
        if self.writable and self.image is not None:
            r = _rbd.lib.rbd_flush(self.image)
            if r < 0:
                raise self._io_error(r, "flush")

    # -- lifetime ----------------------------------------------------------
    def close(self) -> None:
        image, self.image = getattr(self, "image", None), None
        if image is not None:
            _rbd.lib.rbd_close(image)            # (releases the exclusive lock)
        cluster = getattr(self, "cluster", None)
        if cluster is not None:
            cluster.close()

    def close_image(self) -> None:
        """Close the image but keep the connection (an output about to be renamed:
        librbd renames an image nobody has open)."""
        image, self.image = self.image, None
        if image is not None:
            _rbd.lib.rbd_close(image)

    def remove(self, patience: float | None = None) -> None:
        """Close the image and delete it from its pool (an output that failed).

        A cluster that does not answer (ETIMEDOUT) or a watch of ours the OSD still
        holds (EBUSY, after a close that timed out) is waited out, up to ``patience``
        seconds (default :data:`REMOVE_PATIENCE`); then the ``OSError`` says that the
        partial image is left and how to remove it."""
        import time
        image, self.image = self.image, None
        if image is not None:
            _rbd.lib.rbd_close(image)
        deadline = time.monotonic() + (REMOVE_PATIENCE if patience is None else patience)
        pause = 0.25
        try:
            while True:
                try:
                    self.cluster.remove_image(self.image_name)
                    return
                except OSError as exc:
                    if exc.errno == errno.ENOENT:
                        return
                    if exc.errno not in (errno.ETIMEDOUT, errno.EBUSY, errno.EAGAIN) \
                            or time.monotonic() + pause > deadline:
                        raise _fail(exc.errno, f"the partial image was left in the pool "
                                               f"({exc.strerror}): remove it with 'rbd rm "
                                               f"{self.pool}/{self.image_name}'") from None
                time.sleep(pause)
                pause = min(4.0, pause * 2)
        finally:
            self.cluster.close()

    def __del__(self):
        try:
            self.close()
        except Exception:  # noqa: BLE001 - interpreter shutdown
            pass


__all__ = ["BINDING_VERSION", "CONNECT_TIMEOUT", "Cluster", "OP_TIMEOUT", "REMOVE_PATIENCE",
           "RbdBackend",
           "librbd_version", "unavailable_reason"]
