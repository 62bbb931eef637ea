"""The base-image cache inside a Ceph pool (images_type=rbd).

nova, with ``images_type=rbd``, downloads every image into the host's ``_base``
directory and ``rbd import``s a full copy of it for each instance, unless glance keeps
the image in the same cluster.  Here the image is imported once per pool and every
instance disk is a copy-on-write clone of it:

* the base of an image is the RBD image ``<sha1 of the image id>`` (nova's cache name)
  in ``images_rbd_pool`` with a protected snapshot ``snap``; the clones hang off that
  snapshot.  It is made under the image's host lock (``locks/nova-<sha1>``, so one
  import per host) as a temporary image ``.<sha1>.<random>.part``: the source is
  checked (untrusted, declared format, sha256) and streamed into it as raw, zero blocks
  left unwritten (no RADOS object for a hole), then snapshotted, protected and renamed
  into place.  A rename is atomic in RADOS, so two hosts importing one image at once
  end with one base (the loser discards its copy); a failed import removes its
  temporary image, and one left by a killed process is removed by the cache manager.
* metadata keys on the base: ``qcow2.image_id`` (what it is) and ``qcow2.last_used``
  (epoch seconds: set at import, at each clone and when the cache manager finds it in
  use) -- the cache manager's age of a pool base, as a file's mtime is for a file base.
* sources: a local path, an http(s) URL (a raw body streams straight into the pool; a
  qcow2 body is first written to a temporary file in the host's cache directory, as a
  qcow2 cannot be decoded from a stream, and converted from there), or
  ``rbd://FSID/POOL/IMAGE/SNAP`` (a glance image in Ceph: cloned directly when the
  fsid is this cluster's, nothing imported).
"""

from __future__ import annotations

import errno
import hashlib
import os
import re
import time
import urllib.parse

from ..backends.rbd import Cluster, RbdBackend
from ..backends.rbdadmin import Image, clone, list_images, pool_lock, remove, rename
from ..errors import Qcow2Error
from ..rbdname import format_rbd_name
from .errors import ComputeError, ImageFormatMismatchError
from .fetch import (CHUNK, TIMEOUT, SpaceWatch, check_space, inspect_source, is_url,
                    locked_base, open_url, parse_checksum, probe_format, read_body,
                    refuse_format, sha256_file, stream_body, verify_checksum, write_sparse)
from .locks import base_name

SNAP = "snap"
KEY_IMAGE_ID = "qcow2.image_id"
KEY_LAST_USED = "qcow2.last_used"
_BASE = re.compile(r"^[0-9a-f]{40}$")
_TEMP = re.compile(r"^\.([0-9a-f]{40})\.[0-9a-f]{12}\.part$")


class RbdError(ComputeError):
    """The Ceph cluster refused or failed an operation (the message says which)."""


def is_base(name: str) -> bool:
    return bool(_BASE.match(name))


def temp_owner(name: str) -> str | None:
    """The base a temporary import image ``name`` was made for, or None."""
    m = _TEMP.match(name)
    return m.group(1) if m else None


def connect(opts) -> Cluster:
    """A connection to ``images_rbd_pool`` as ``rbd_user`` (``images_rbd_ceph_conf``,
    else librados' search), waiting at most ``rbd_connect_timeout`` seconds."""
    try:
        return Cluster(opts.images_rbd_pool, conf=opts.images_rbd_ceph_conf,
                       user=opts.rbd_user, connect_timeout=float(opts.rbd_connect_timeout))
    except OSError as exc:
        raise RbdError(f"Ceph pool '{opts.images_rbd_pool}': {exc.strerror or exc}") from None


def rbd_name(opts, image: str, snapshot: str | None = None) -> str:
    """The ``rbd:`` name of an image of the pool, with the flow's conf and user."""
    timeout = float(opts.rbd_connect_timeout)
    extra = () if timeout == 5 else (("client_mount_timeout", f"{timeout:g}"),
                                     ("rados_mon_op_timeout", f"{timeout:g}"))
    return format_rbd_name(opts.images_rbd_pool, image, snapshot=snapshot,
                           conf=opts.images_rbd_ceph_conf, user=opts.rbd_user, options=extra)


def _backend(opts, image: str, **kw) -> RbdBackend:
    try:
        return RbdBackend(image, pool=opts.images_rbd_pool, conf=opts.images_rbd_ceph_conf,
                          user=opts.rbd_user, connect_timeout=float(opts.rbd_connect_timeout),
                          **kw)
    except OSError as exc:
        raise RbdError(f"Ceph pool '{opts.images_rbd_pool}': {exc.strerror or exc}") from None


def _rbd_error(exc: OSError) -> RbdError:
    return RbdError(exc.strerror or str(exc))


def touch(cl: Cluster, name: str, now: float | None = None) -> None:
    """Record that the base ``name`` was used (its age restarts)."""
    with Image(cl, name) as im:
        im.metadata_set(KEY_LAST_USED, f"{time.time() if now is None else now:.3f}")


def last_used(im: Image) -> float:
    """When a base was last used: its ``qcow2.last_used`` metadata, else its creation."""
    value = im.metadata_get(KEY_LAST_USED)
    try:
        return float(value) if value is not None else im.created()
    except ValueError:
        return im.created()


def base_state(cl: Cluster, name: str) -> str | None:
    """``ready`` (the image with its protected snapshot), ``incomplete`` (an image of
    that name without one) or None (no image)."""
    try:
        with Image(cl, name, read_only=True) as im:
            ok = SNAP in im.snapshots() and im.snap_is_protected(SNAP)
    except OSError as exc:
        if exc.errno == errno.ENOENT:
            return None
        raise _rbd_error(exc) from None
    return "ready" if ok else "incomplete"


def discard(cl: Cluster, name: str) -> None:
    """Remove an image and its snapshots, as far as it goes (a failed import's clean-up:
    errors are swallowed, the manager retries stale ones later)."""
    try:
        with Image(cl, name) as im:
            for snap in im.snapshots():
                if im.snap_is_protected(snap):
                    im.snap_unprotect(snap)
                im.snap_remove(snap)
        remove(cl, name)
    except OSError:
        pass


# -- import --------------------------------------------------------------------------------

def fetch_pool_base(opts, cl: Cluster, image_id: str, source: str, *,
                    disk_format: str | None = None, checksum: str | None = None,
                    progress=None, timeout: float = TIMEOUT) -> str:
    """Make sure the pool base of ``image_id`` exists (import it from ``source`` if
    not); returns its image name (clone ``NAME@snap``)."""
    if disk_format not in (None, "raw", "qcow2"):
        raise ComputeError(f"unsupported disk format {disk_format!r} (raw or qcow2)")
    want = parse_checksum(checksum)
    name = base_name(image_id)
    with locked_base(opts, name):
        state = base_state(cl, name)
        if state == "incomplete":
            _drop_unfinished(cl, name, image_id)
        if state == "ready":
            touch(cl, name)
            return name
        tmp = f".{name}.{os.urandom(6).hex()}.part"
        try:
            if is_url(source):
                _import_url(opts, tmp, source, disk_format, want, progress, timeout)
            else:
                _import_local(opts, tmp, source, disk_format, want, progress)
            _finish(cl, tmp, name, image_id)
        except BaseException:
            discard(cl, tmp)
            raise
    return name


def _drop_unfinished(cl: Cluster, name: str, image_id: str) -> None:
    """A base of ``image_id`` without its protected snapshot is one the cache manager
    did not finish removing: remove it (one of another origin is refused)."""
    try:
        with Image(cl, name, read_only=True) as im:
            ours = im.metadata_get(KEY_IMAGE_ID) == image_id
    except OSError as exc:
        if exc.errno == errno.ENOENT:
            return
        raise _rbd_error(exc) from None
    if not ours:
        raise RbdError(f"image '{name}' in pool '{cl.pool}' has no protected snapshot "
                       f"'{SNAP}' and is not a base of this cache: refused")
    discard(cl, name)
    if base_state(cl, name) is not None:
        raise RbdError(f"image '{name}' in pool '{cl.pool}' is a base the cache manager "
                       f"did not finish removing, and it cannot be removed now")


def publish_lock(cl: Cluster, name: str):
    """The pool-wide lock under which a base is published or removed (every host)."""
    return pool_lock(cl, f"qcow2_base_lock.{name}")


def _finish(cl: Cluster, tmp: str, name: str, image_id: str) -> None:
    """Snapshot and protect the imported ``tmp``, then rename it to ``name`` under the
    pool-wide publish lock (an RBD rename alone is not atomic against a concurrent one
    to the same name); another host's finished base of the same name wins, and ours is
    discarded."""
    try:
        with Image(cl, tmp) as im:
            im.metadata_set(KEY_IMAGE_ID, image_id)
            im.metadata_set(KEY_LAST_USED, f"{time.time():.3f}")
            im.snap_create(SNAP)
            im.snap_protect(SNAP)
        with publish_lock(cl, name):
            state = base_state(cl, name)
            if state is None:
                rename(cl, tmp, name)
                return
        if state != "ready":
            raise RbdError(f"image '{name}' appeared in pool '{cl.pool}' during the import "
                           f"and is not a finished base: refused")
    except OSError as exc:
        raise _rbd_error(exc) from None
    discard(cl, tmp)


def _convert_into(opts, src: str, fmt: str, tmp: str, progress) -> None:
    """``src`` converted into the new image ``tmp``: made here, and written with -n
    (a convert's own output would go under yet another temporary name, which the
    cache manager would not know to clean up after a crash)."""
    import qcow2
    with qcow2.open(src, format=fmt, untrusted=True) as img:
        size = img.size
    _backend(opts, tmp, create=size).close()
    qcow2.convert(src, rbd_name(opts, tmp), src_format=fmt, out_format="raw",
                  untrusted=True, progress=progress, no_create=True, target_is_zero=True)


def _import_local(opts, tmp: str, source: str, declared, want, progress) -> None:
    if not os.path.exists(source):
        raise ComputeError(f"image source {source} does not exist")
    fmt = inspect_source(source, declared, source)
    if want is not None:
        verify_checksum(sha256_file(source), want, source)
    _convert_into(opts, source, fmt, tmp, progress)


def _import_url(opts, tmp: str, url: str, declared, want, progress, timeout) -> None:
    from ..paths import make_temp
    resp, length = open_url(url, timeout)
    try:
        head = read_body(resp, url, CHUNK)
        fmt = probe_format(head)
        refuse_format(fmt, declared, url)
        hasher = hashlib.sha256()
        if fmt == "raw":
            _stream_into_pool(opts, tmp, resp, url, length, head, hasher, want, progress)
            return
        base_dir = opts.base_dir
        if length is not None:
            check_space(base_dir, length, f"the download of {url}")
        fd, part = make_temp(tmp.strip("."), base_dir)
        try:
            try:
                stream_body(resp, url, length, head, lambda b, p: os.pwrite(fd, b, p) and None,
                            hasher, progress, SpaceWatch(base_dir, url, length, None))
            finally:
                os.close(fd)
            verify_checksum(hasher.hexdigest(), want, url)
            inspect_source(part, "qcow2", url)
            _convert_into(opts, part, "qcow2", tmp, None)
        finally:
            try:
                os.unlink(part)
            except FileNotFoundError:
                pass
    finally:
        resp.close()


def _stream_into_pool(opts, tmp, resp, url, length, head, hasher, want, progress) -> None:
    """A raw body, straight into a new RBD image: only non-zero blocks are written."""
    be = _backend(opts, tmp, create=length or 0)
    done = False
    try:
        be.lock(write=True)
        size = stream_body(resp, url, length, head,
                           lambda b, p: write_sparse(be.pwrite, b, p), hasher, progress)
        if be.size() != size:
            be.truncate(size)
        verify_checksum(hasher.hexdigest(), want, url)
        be.flush()
        done = True
    except Qcow2Error:
        raise
    except OSError as exc:
        raise _rbd_error(exc) from None
    finally:
        if done:
            be.close()
        else:
            try:
                be.remove()
            except OSError:
                be.close()


# -- images glance keeps in Ceph (rbd://FSID/POOL/IMAGE/SNAP) ------------------------------

def parse_rbd_url(url: str) -> tuple[str, str, str, str]:
    """(fsid, pool, image, snapshot) of a glance RBD location (parts URL-unquoted, as
    nova's ``parse_url``)."""
    pieces = [urllib.parse.unquote(p) for p in url[len("rbd://"):].split("/")]
    if "" in pieces or len(pieces) != 4:
        raise ComputeError(f"invalid RBD image location {url!r} (expected "
                           f"rbd://FSID/POOL/IMAGE/SNAP)")
    return pieces[0], pieces[1], pieces[2], pieces[3]


def check_cloneable(opts, cl: Cluster, url: str, disk_format: str | None,
                    checksum: str | None) -> tuple[str, str, str, int]:
    """(pool, image, snapshot, size) of an ``rbd://`` source that can be cloned here:
    this cluster's fsid, a snapshot that exists, raw content (declared and probed),
    the checksum when one is given (read in full)."""
    fsid, pool, image, snap = parse_rbd_url(url)
    ours = cl.fsid()
    if fsid != ours:
        raise ComputeError(f"image {url} lives in another Ceph cluster (fsid {fsid}; this "
                           f"one is {ours}): it cannot be cloned")
    if disk_format not in (None, "raw"):
        raise ImageFormatMismatchError(f"image {url} is declared {disk_format}: only raw "
                                       f"images can be cloned in RBD")
    want = parse_checksum(checksum)
    be = _backend(opts, image, snapshot=snap, name=url) if pool == cl.pool else \
        _parent_backend(opts, pool, image, snap, url)
    try:
        buf = bytearray(CHUNK)
        n = be.readinto(memoryview(buf), 0)
        if probe_format(bytes(buf[:n])) != "raw":
            raise ImageFormatMismatchError(f"image {url} is a qcow2: only raw images can be "
                                           f"cloned in RBD")
        size = be.size()
        if want is not None:
            verify_checksum(_sha256_store(be, size, buf), want, url)
        return pool, image, snap, size
    except OSError as exc:
        raise _rbd_error(exc) from None
    finally:
        be.close()


def _parent_backend(opts, pool: str, image: str, snap: str, url: str) -> RbdBackend:
    return _backend(opts.replace(images_rbd_pool=pool), image, snapshot=snap, name=url)


def _sha256_store(be, size: int, buf: bytearray) -> str:
    h = hashlib.sha256()
    pos = 0
    mv = memoryview(buf)
    while pos < size:
        n = be.readinto(mv[:min(len(buf), size - pos)], pos)
        if n <= 0:
            break
        h.update(mv[:n])
        pos += n
    return h.hexdigest()


__all__ = ["KEY_IMAGE_ID", "KEY_LAST_USED", "SNAP", "RbdError",
           "base_state", "check_cloneable", "clone", "connect", "discard", "fetch_pool_base",
           "is_base", "last_used", "list_images", "parse_rbd_url", "publish_lock", "rbd_name",
           "temp_owner",
           "touch"]
