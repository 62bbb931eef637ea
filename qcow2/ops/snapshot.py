"""Internal snapshots: list, create, apply and delete (qemu-img snapshot).

Each operation opens the image, asks the engine (``WritableQcow2Image``'s
``create_snapshot`` / ``apply_snapshot`` / ``delete_snapshot``, see
``qcow2.internal_snapshots``) and closes it; the errors say what qemu-img says.
"""

from __future__ import annotations

import errno
import os

from ..errors import CorruptImageError, Qcow2Error, UnsupportedFeatureError
from ..opener import open_image
from ..writer import WritableQcow2Image


def _open_rw(path, format) -> WritableQcow2Image:
    img = open_image(path, "r+", format=format, backing=False)
    if not isinstance(img, WritableQcow2Image):
        img.close()
        raise UnsupportedFeatureError("internal snapshots need a qcow2 image",
                                      feature="snapshot on raw")
    return img


def _lookup(img: WritableQcow2Image, key, failure: str, *, load: bool = False):
    """The snapshot ``key`` names; errors begin with ``failure``.  ``load`` (apply): a
    snapshot whose L1 table is refused is reported as qemu-img reports a failed load,
    the reason on its own line, then FAILURE: STRERROR."""
    try:
        return img.lookup_snapshot(key)
    except CorruptImageError as exc:       # (kept: the CLI words it as qemu-img)
        reason = str(exc)
        exc.args = (f"{failure}: {reason}",) + tuple(exc.args[1:])
        if load:
            code = errno.EFBIG if "too large" in reason else errno.EINVAL
            exc.lines = [reason, f"{failure}: {os.strerror(code)}"]  # type: ignore[attr-defined]
        raise
    except Qcow2Error as exc:
        raise Qcow2Error(f"{failure}: {exc}") from None


def list_snapshots(path, *, format=None, force_share=False) -> list[dict]:
    with open_image(path, format=format, backing=False, force_share=force_share) as img:
        return img.snapshots() if hasattr(img, "snapshots") else []


def create_snapshot(path, name: str, *, format=None) -> dict:
    """Take a snapshot; a failure reads as qemu-img words it, "Could not create snapshot
    'NAME': -ERRNO (STRERROR)" (the engine's error is the ``__cause__`` and
    ``.detail``): EINVAL for a refcount that would overflow, as QEMU returns."""
    with _open_rw(path, format) as img:
        try:
            return img.create_snapshot(name).info()
        except (Qcow2Error, OSError) as exc:
            code = exc.errno if isinstance(getattr(exc, "errno", None), int) else errno.EINVAL
            err = Qcow2Error(f"Could not create snapshot '{name}': -{code} "
                             f"({os.strerror(code)})")
            err.errno = code                # type: ignore[attr-defined]
            err.detail = str(exc)           # type: ignore[attr-defined]
            raise err from exc


def delete_snapshot(path, key, *, format=None) -> None:
    failure = f"Could not delete snapshot '{key}'"
    with _open_rw(path, format) as img:
        sn = _lookup(img, key, failure)
        try:
            img.delete_snapshot(sn)
        except Qcow2Error as exc:
            exc.args = (f"{failure}: {exc}",) + tuple(exc.args[1:])   # (attributes kept)
            raise


def apply_snapshot(path, key, *, format=None) -> None:
    with _open_rw(path, format) as img:
        img.apply_snapshot(_lookup(img, key, f"Could not apply snapshot '{key}': Failed to "
                                             f"load snapshot", load=True))
