"""resize: grow or shrink a raw or qcow2 image (qemu-img resize)."""

from __future__ import annotations



from ..errors import InvalidOptionError, Qcow2Error
from ..units import parse_size

PREALLOC = ("off", "metadata", "falloc", "full")


def parse_resize(text, current: int) -> int:
    """qemu-img's SIZE argument: absolute, or relative with a leading + or -."""
    if isinstance(text, int):
        return text
    t = str(text).strip()
    if t[:1] in "+-":
        delta = parse_size(t[1:])
        new = current + delta if t[0] == "+" else current - delta
        if new < 0:
            raise InvalidOptionError("New image size must be positive")
        return new
    return parse_size(t)


def resize(path, size, *, format: str | None = None, shrink: bool = False,
           preallocation: str = "off") -> int:
    """Resize the image at ``path`` to ``size`` (bytes, "10G", "+1G", "-512M"); returns
    the new virtual size.  Shrinking needs ``shrink=True``, as in qemu-img; internal
    snapshots keep their own sizes and tables."""
    from ..image import open_image
    from ..writer import WritableQcow2Image, _resize_qcow2

    if preallocation not in PREALLOC:
        raise InvalidOptionError(f"Invalid preallocation mode: '{preallocation}'")
    with open_image(path, "r+", format=format) as img:
        new = parse_resize(size, img.size)
        if isinstance(img, WritableQcow2Image):
            _resize_qcow2(img, new, shrink=shrink, preallocation=preallocation)
            return img.size
        return _resize_raw(img, new, shrink=shrink, preallocation=preallocation)


def _resize_raw(img, new: int, *, shrink: bool, preallocation: str) -> int:
    from ..backends import fallocate

    if preallocation == "metadata":
        raise InvalidOptionError("Unsupported preallocation mode: metadata")
    be = img.be
    old = be.size()
    if new < old:
        if not shrink:
            raise Qcow2Error("Use the --shrink option to perform a shrink operation.")
        if preallocation != "off":
            raise Qcow2Error("Preallocation can't be used for shrinking an image")
        be.truncate(new)
    elif new > old:
        be.truncate(new)
        if preallocation == "falloc":
            fallocate.allocate(be.fd, old, new - old)
        elif preallocation == "full":
            z = memoryview(bytes(1 << 20))
            p = old
            while p < new:
                k = min(len(z), new - p)
                be.pwrite(z[:k], p)
                p += k
    be.flush()
    return new


__all__ = ["resize", "parse_resize"]

