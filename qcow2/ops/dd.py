"""dd: copy an image into a new one block by block (``qemu-img dd``).

qemu-img's semantics, quirks included: ``count`` limits how much of the input is read
counted from its start (the skipped blocks included), ``skip`` blocks are then left
out, the output (raw or qcow2) is created with exactly the size that remains and every
block is written, zeros too.  Unlike qemu-img, which creates the output before finding
that ``skip`` is past the end, nothing is created on any failure: the output is built
under a temporary name and renamed when complete.
"""

from __future__ import annotations

import os

from ..errors import InvalidOptionError, Qcow2Error
from ..opener import open_image
from ..paths import temp_name

CHUNK = 1 << 20


def dd(src, dst, *, bs: int = 512, count: int | None = None, skip: int = 0,
       src_format: str | None = None, out_format: str = "raw",
       force_share: bool = False) -> int:
    """Copy ``src`` to a new image ``dst`` (``out_format``) in blocks of ``bs`` bytes:
    ``count`` blocks of the input at most (from its start), the first ``skip`` of them
    left out.  Returns the output's size."""
    from ..atomic import fsync_dir
    from ..creator import prepare

    if not 1 <= bs <= (1 << 31) - 1:
        raise InvalidOptionError("Invalid bs specified. Must be between 1 and 2147483647.")
    dst = os.fspath(dst)
    with open_image(src, format=src_format, force_share=force_share) as img:
        size = img.size
        if count is not None and size > count * bs:
            size = count * bs
        if skip * bs > size:
            raise Qcow2Error(f"{os.fspath(src)}: cannot skip to specified offset")
        out_size = size - skip * bs
        tmp = temp_name(dst)
        try:
            prepare(tmp, out_size, format=out_format).run(durable=False)
            with open_image(tmp, "r+", format=out_format) as out:
                step = bs * max(1, CHUNK // bs)      # whole blocks per read: same bytes
                pos = skip * bs
                buf = bytearray(step)
                while pos < size:
                    n = min(step, size - pos)
                    mv = memoryview(buf)[:n]
                    img.readinto(mv, pos)
                    out.pwrite(mv, pos - skip * bs)
                    pos += n
                out.flush()
            os.replace(tmp, dst)
            tmp = None
            fsync_dir(os.path.dirname(os.path.abspath(dst)))
        finally:
            if tmp is not None:
                try:
                    os.unlink(tmp)
                except FileNotFoundError:
                    pass
    return out_size


__all__ = ["dd"]
