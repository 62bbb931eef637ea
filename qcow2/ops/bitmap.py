"""bitmap: add, remove, clear, enable and disable persistent dirty bitmaps
(``qemu-img bitmap``).

The actions apply in the order given, as qemu-img applies them; all are checked on a
read-only open first, so a refused action changes nothing (a writer's open marks the
image's bitmaps stale until they are stored again).  The bitmaps are then stored once
(:meth:`qcow2.reshape.Reshape.store_bitmaps`): tables anew, directory, header, old
structures freed.  A new bitmap is empty and enabled (``--disable``: not tracking).
``--merge`` ORs a bitmap (of this image or of another, ``-b``/``-F``) into the named one;
granularities may differ, disk sizes may not.
"""

from __future__ import annotations

from .. import constants as C
from ..errors import InvalidOptionError, Qcow2Error
from ..opener import open_image

ACTIONS = ("add", "remove", "clear", "enable", "disable", "merge")


def _fail(action: str, name: str, why: str) -> Qcow2Error:
    return Qcow2Error(f"Operation {action} on bitmap {name} failed: {why}")


def default_granularity(cluster_size: int) -> int:
    """QEMU's default bitmap granularity: the cluster size, at least 4 KiB."""
    return max(4096, cluster_size)


def _check(path, actions, name: str, granularity, format, names: list, version: int):
    """How many of ``actions`` qemu-img carries out, and the error that stops it (None):
    found before anything is written."""
    present = set(names)
    for done, action in enumerate(actions):
        try:
            _check_one(path, action, name, granularity, present, version)
        except Qcow2Error as exc:
            return done, exc
    return len(actions), None


def _check_one(path, action: str, name: str, granularity, present: set, version: int):
    """Refuse one action as qemu-img refuses it (``present``: the names so far)."""
    if isinstance(action, tuple):               # ("merge", source name, source image)
        if name not in present:
            raise _fail("merge", name, f"Dirty bitmap '{name}' not found")
        return
    if action == "add":
        if name in present:
            raise _fail(action, name, f"Bitmap already exists: {name}")
        if granularity is not None and (granularity < 512 or granularity & (granularity - 1)
                                        or granularity > 1 << 31):
            raise _fail(action, name, "Granularity must be power of 2 and at least 512")
        if version < 3:
            raise _fail(action, name, f"Can't make bitmap '{name}' persistent in "
                                      f"'{path}': Cannot store dirty bitmaps in qcow2 v2 "
                                      f"files")
        present.add(name)
    elif name not in present:
        raise _fail(action, name, f"Dirty bitmap '{name}' not found")
    elif action == "remove":
        present.discard(name)


def bitmap(path, name: str, actions, *, granularity: int | None = None,
           format: str | None = None, source_file=None, source_format=None) -> None:
    """Apply ``actions`` (a sequence of ``ACTIONS``; a merge is ``("merge", SOURCE)``:
    the bitmap SOURCE of ``source_file``, default this image, OR-ed into ``name``) to the
    bitmap ``name`` of the qcow2 image at ``path``."""
    actions = [("merge", a[1], (source_file, source_format)) if isinstance(a, tuple)
               else a for a in actions]
    for action in actions:
        if not isinstance(action, tuple) and action not in ACTIONS:
            raise InvalidOptionError(f"unknown bitmap action {action!r}")
    with open_image(path, format=format, backing=False) as img:
        if img.format != "qcow2":
            raise _fail(_verb(actions[0]), name, "Can't store persistent bitmaps to this image: "
                                          "Operation not supported")
        done, error = _check(path, actions, name, granularity, format,
                             [b["name"] for b in img.bitmaps()], img.header.version)
    if done:
        _apply(path, name, actions[:done], granularity)
    if error is not None:                 # (qemu-img keeps what the actions before did)
        raise error


def _apply(path, name: str, actions: list, granularity) -> None:
    from ..reshape import Bitmap

    with open_image(path, "r+", format="qcow2", backing=False) as img:
        bitmaps = img.load_bitmaps()
        key = name.encode("utf-8", "surrogateescape")
        for action in actions:
            found = next((b for b in bitmaps if b.name == key), None)
            if isinstance(action, tuple):
                _merge(img, found, name, action[1], action[2], bitmaps)
            elif action == "add":
                gran = granularity or default_granularity(img.cluster_size)
                bits = -(-img.size // gran)
                entries = -(-bits // (8 * img.cluster_size))
                bitmaps.append(Bitmap(key, C.BME_FLAG_AUTO, gran.bit_length() - 1,
                                      [0] * entries))
            elif action == "remove":
                bitmaps.remove(found)
            elif action == "clear":
                found.table = [0] * len(found.table)
            elif action == "enable":
                found.flags |= C.BME_FLAG_AUTO
            elif action == "disable":
                found.flags &= ~C.BME_FLAG_AUTO
        img.store_bitmaps(bitmaps)            # (frees the data of dropped and cleared ones)


def _verb(action) -> str:
    return action[0] if isinstance(action, tuple) else action


def _merge(img, target, name: str, source: str, where, bitmaps: list) -> None:
    """OR the bitmap ``source`` (of the image ``where`` = (file, format), or of this
    one) into ``target``; granularities may differ, the disk sizes may not."""
    import numpy as np

    from ..reshape import bitmap_data, read_bitmaps

    src_file, src_fmt = where
    key = source.encode("utf-8", "surrogateescape")
    other = open_image(src_file, format=src_fmt, backing=False) if src_file else None
    try:
        pool = read_bitmaps(other) if other is not None else bitmaps
        src = next((b for b in pool if b.name == key), None)
        if src is None:
            raise _fail("merge", name, f"Dirty bitmap '{source}' not found")
        src_size = other.size if other is not None else img.size
        if src_size != img.size:
            raise _fail("merge", name, "Bitmaps are incompatible and can't be merged")
        src_bits = np.unpackbits(np.frombuffer(bitmap_data(src, src_size), np.uint8),
                                 bitorder="little")
    finally:
        if other is not None:
            other.close()
    tgt = np.unpackbits(np.frombuffer(bitmap_data(target, img.size), np.uint8),
                        bitorder="little").copy()
    ngt = -(-img.size // (1 << target.granularity_bits))
    gs, gt = 1 << src.granularity_bits, 1 << target.granularity_bits
    for j in np.flatnonzero(src_bits[:-(-img.size // gs)]):
        lo = int(j) * gs
        hi = min(lo + gs, img.size) - 1
        tgt[lo // gt:min(hi // gt, ngt - 1) + 1] = 1
    target.data = np.packbits(tgt, bitorder="little").tobytes()


__all__ = ["bitmap", "ACTIONS", "default_granularity"]
