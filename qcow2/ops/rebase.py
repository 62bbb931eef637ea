"""rebase: change an overlay's backing file (qemu-img rebase).

Safe mode keeps the guest view: every range the overlay does not hold itself is read
through the old backing chain and through the new one, and where they differ the old
content is copied into the overlay before the header changes.  ``-u`` (unsafe) only
rewrites the header.  An empty backing name flattens the image (compared with zeros).
"""

from __future__ import annotations

from ..errors import InvalidOptionError, Qcow2Error, UnsupportedFeatureError
from ..image import ST_DATA, ST_ZERO
from ..opener import open_image
from ..paths import combine_path
from ..writer import WritableQcow2Image
from .outputopts import check_cache

CHUNK = 2 * 1024 * 1024


def rebase(path, backing_file, *, format: str | None = None, backing_format: str | None = None,
           unsafe: bool = False, progress=None, force_share: bool = False,
           cache: str = "writeback", src_cache: str = "writeback") -> None:
    """Change ``path``'s backing file to ``backing_file`` ('' flattens), keeping what
    the guest sees unless ``unsafe`` (-u).  ``cache`` (-t): "unsafe" syncs nothing;
    ``src_cache`` (-T): how the backing files are read (the same reads in every mode
    here: checked as qemu-img checks it)."""
    check_cache(cache)
    check_cache(src_cache, source=True)
    backing_file = backing_file or ""
    if backing_file and not backing_format:
        raise InvalidOptionError(f"Could not change the backing file to '{backing_file}': "
                                 f"backing format must be specified")
    with open_image(path, "r+", format=format, backing=not unsafe) as img:
        if cache == "unsafe":
            img.ignore_flushes()
        if not isinstance(img, WritableQcow2Image):
            raise UnsupportedFeatureError("rebase works on qcow2 images only",
                                          feature="rebase raw")
        if not unsafe:
            new = None
            if backing_file:
                try:
                    new = open_image(combine_path(img.filename, backing_file),
                                     format=backing_format, force_share=force_share)
                except Qcow2Error as exc:
                    raise Qcow2Error(f"Could not open new backing file "
                                     f"'{backing_file}': {exc}") from None
            try:
                _copy_differences(img, new, progress)
            finally:
                if new is not None:
                    new.close()
        img.set_backing(backing_file or None, backing_format if backing_file else None)
    if progress is not None:
        progress(100.0)


def _copy_differences(img, new, progress) -> None:
    old = img.backing
    size = img.size
    holes = [(a, n) for a, n, flags, _h in img.block_status(0, size)
             if not flags & (ST_DATA | ST_ZERO)]
    total = sum(n for _a, n in holes) or 1
    done = 0
    if progress is not None:
        progress(0.0)
    old_size = old.size if old is not None else 0
    for a, n in holes:
        pos = a
        while pos < a + n:
            k = min(CHUNK, a + n - pos)
            if pos < old_size < pos + k:
                k = old_size - pos            # past the old backing's end: zeros written
            ob = bytearray(k)                  # (what lies past an image's end: zeros)
            nb = bytearray(k)
            if old is not None:
                old.readinto(ob, pos)
            if new is not None:
                new.readinto(nb, pos)
            if ob != nb:
                _write_diffs(img, memoryview(ob), memoryview(nb), pos,
                             zeros=pos >= old_size)
            pos += k
            done += k
            if progress is not None:
                progress(min(99.9, 100.0 * done / total))


def _write_diffs(img, ob, nb, base: int, *, zeros: bool, sector: int = 512) -> None:
    """Copy the runs of sectors where the old view differs from the new one (qemu-img's
    granularity); where the old view lies past the old backing file's end (``zeros``)
    the runs are written as zeros, which a qcow2 v3 image records as zero clusters."""
    n = len(ob)
    i = 0
    while i < n:
        differ = ob[i:i + sector] != nb[i:i + sector]
        j = i + sector
        while j < n and (ob[j:j + sector] != nb[j:j + sector]) == differ:
            j += sector
        j = min(j, n)
        if differ:
            if zeros:
                _zero_run(img, base + i, base + j)
            else:
                img.pwrite(ob[i:j], base + i)
        i = j


def _zero_run(img, a: int, b: int) -> None:
    """Zeros over [a, b), the partial clusters at its edges widened to whole ones where
    the rest already reads as zeros (QEMU's zero write), so a v3 image records zero
    clusters there as qemu-img's does."""
    cs = img.cluster_size
    ca, cb = a // cs * cs, min(img.size, -(-b // cs) * cs)
    if ca < a and not any(_read(img, ca, a - ca)):
        a = ca
    if b < cb and not any(_read(img, b, cb - b)):
        b = cb
    img.write_zeroes(a, b - a)


def _read(img, offset: int, n: int) -> bytearray:
    buf = bytearray(n)
    img.readinto(buf, offset)
    return buf
