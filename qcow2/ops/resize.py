"""resize: grow or shrink a raw or qcow2 image (qemu-img resize)."""

from __future__ import annotations

from ..errors import InvalidOptionError
from ..opener import open_image
from ..options import parse_size_option
from ..reshape import PREALLOCATION_MODES


def parse_resize(text, current: int) -> int:
    """qemu-img's SIZE argument: absolute, or relative with a leading + or - (QemuOpts'
    size syntax and message); the result must be positive."""
    if isinstance(text, int):
        new = text
    else:
        t = str(text).strip()
        if t[:1] in "+-":
            delta = parse_size_option("size", t[1:])
            new = current + delta if t[0] == "+" else current - delta
        else:
            new = parse_size_option("size", t)
    if new <= 0:
        raise InvalidOptionError("New image size must be positive")
    return new


def resize(path, size, *, format: str | None = None, shrink: bool = False,
           preallocation: str = "off") -> int:
    """Resize the image at ``path`` to ``size`` (bytes, "10G", "+1G", "-512M"); returns
    the new virtual size (of a raw image: its new length).  Shrinking needs
    ``shrink=True``, as in qemu-img; internal snapshots keep their own sizes and
    tables."""
    if preallocation not in PREALLOCATION_MODES:
        raise InvalidOptionError(f"Invalid preallocation mode: '{preallocation}'")
    if not isinstance(size, int):                   # the syntax first, as qemu-img
        t = str(size).strip()
        parse_size_option("size", t[1:] if t[:1] in "+-" else t)
    with open_image(path, "r+", format=format) as img:
        new = parse_resize(size, img.size)
        img.resize(new, shrink=shrink, preallocation=preallocation)
        return img.size if img.format == "qcow2" else new


__all__ = ["resize", "parse_resize"]
