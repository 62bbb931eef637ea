"""New RBD images as outputs: made under a temporary name beside the final one and
renamed into place once complete, as file outputs are (``qcow2.atomic``), so that a
name in the pool shows a whole image or none, whatever happens while it is written.
Used by convert (``-O raw rbd:``) and create (``-f qcow2 rbd:``)."""

from __future__ import annotations

import errno

from .errors import Qcow2Error
from .paths import temp_entry
from .rbdname import parse_rbd_name


def create_rbd_output(name: str, size: int, **timeouts):
    """A new RBD image of ``size`` bytes for the output ``name``, made under a
    temporary name beside it (``.IMAGE.RANDOM.part``, as file outputs are), so that
    the name shows a complete image or none, whatever happens meanwhile.  Refused
    (EEXIST) when an image has the final name.  Returns (backend, final image name):
    give them to :func:`publish_rbd_output` once written and flushed, ``remove()`` the
    backend on failure.  The backend's messages name ``name``."""
    spec = parse_rbd_name(name)
    args = spec.backend_args()
    args["image"] = temp_entry(spec.image)
    from .backends.rbd import RbdBackend        # (librados loads only for rbd: names)
    try:
        be = RbdBackend(**args, create=size, **timeouts)
        try:
            taken = be.cluster.image_exists(spec.image)
        except BaseException:
            be.remove()
            raise
    except OSError as exc:
        raise _create_error(name, exc) from None
    if taken:
        try:
            be.remove()
        except OSError:
            pass                    # (the refusal is the news; remove() named what is left)
        raise _create_error(name, OSError(errno.EEXIST, f"image '{spec.image}' already "
                                                        f"exists in pool '{spec.pool}'"))
    return be, spec.image


def publish_rbd_output(be, name: str, final: str) -> None:
    """Give an output made by :func:`create_rbd_output` its final name; on failure
    (an image of that name appeared meanwhile, the cluster does not answer) it is
    removed and the error names ``name``."""
    try:
        _rename_into_place(be, final)
    except OSError as exc:
        try:
            be.remove()
        except OSError as left:
            raise _create_error(name, OSError(exc.errno, f"{exc.strerror}; "
                                                         f"{left.strerror}")) from None
        raise _create_error(name, exc) from None


def _rename_into_place(be, final: str) -> None:
    """Rename the image of ``be`` (complete and flushed) to ``final`` and close it.
    The check that no image has that name and the rename run under a pool-wide lock
    (an RBD rename alone does not exclude a concurrent one to the same name); EEXIST
    when one has it (``be`` then keeps its image, open to :meth:`remove`)."""
    from .backends.rbdadmin import pool_lock, remove_object, rename
    be.close_image()
    cluster = be.cluster
    key = f"qcow2_publish.{final}"
    with pool_lock(cluster, key, wait=60.0):
        if cluster.image_exists(final):
            raise OSError(errno.EEXIST, f"image '{final}' already exists in pool "
                                        f"'{be.pool}'")
        rename(cluster, be.image_name, final)
        be.image_name = final
        # the lock's object goes while it is held (removed after the unlock, it could
        # take with it the lock of a client that got it meanwhile)
        try:
            remove_object(cluster, key)
        except OSError:
            pass                        # (a lock object of a few bytes; harmless)
    be.close()


def _create_error(name: str, exc: OSError) -> Qcow2Error:
    err = Qcow2Error(f"Could not create '{name}': {exc.strerror or exc}")
    err.errno = exc.errno  # type: ignore[attr-defined]
    return err


__all__ = ["create_rbd_output", "publish_rbd_output"]
