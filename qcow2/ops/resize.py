"""resize: grow or shrink a raw or qcow2 image (qemu-img resize)."""

from __future__ import annotations

from ..errors import InvalidOptionError
from ..opener import open_image
from ..reshape import PREALLOCATION_MODES
from ..units import parse_size


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
    the new virtual size (of a raw image: its new length).  Shrinking needs
    ``shrink=True``, as in qemu-img; internal snapshots keep their own sizes and
    tables."""
    if preallocation not in PREALLOCATION_MODES:
        raise InvalidOptionError(f"Invalid preallocation mode: '{preallocation}'")
    with open_image(path, "r+", format=format) as img:
        new = parse_resize(size, img.size)
        img.resize(new, shrink=shrink, preallocation=preallocation)
        return img.size if img.format == "qcow2" else new


__all__ = ["resize", "parse_resize"]
