"""convert: read images (qcow2 or raw, any backing chain, several sources concatenated)
and write one out as sparse raw or as qcow2 (plain or compressed with zlib/zstd).

The work is planned from metadata first: each source's allocation map (``extents()``,
the walk ``qemu-img map`` does) says which guest ranges hold data, which read as
zeros and (with ``-B``) which are left to the new backing file.  Ranges that read as
zeros are never read; a raw output keeps them as holes, a qcow2 output leaves them
unallocated (or zero clusters where a backing file would show through).  Data ranges
are cut into cluster-aligned chunks that a small pool of threads (:mod:`qcow2.pool`)
reads, decodes (the kernels release the GIL, so compressed sources decode on every
core), scans for zero blocks and, for ``-c``, compresses; a raw output's writes go out
with ``pwrite``/``copy_file_range`` in any order, a qcow2 output's clusters are
allocated in guest order (unless ``-W``).  Memory is bounded by workers x chunk size.

Raw output is an anonymous file (``O_TMPFILE``) linked into place only on success; a
qcow2 output is built under a hidden temporary name next to DST and renamed into
place on success (removed on failure).  Either way DST never holds a half image.
"""

from __future__ import annotations

import os

from ..errors import InvalidOptionError, UnsupportedFeatureError
from .outputopts import bitmaps_to_copy, check_modes, default_workers, output_options
from ..rbdname import is_rbd_name
from .convert_raw import to_raw, to_rbd
from .convert_qcow2 import to_qcow2
from .progress import check_rate, rate_limit as rate_limit_of


def _sparse_copy_will_do(images, srcs, dst, out_format, no_create, sparse_size,
                         special) -> bool:
    """Whether the convert is a plain sparse copy of one raw file into a new one."""
    return bool(not special and out_format == "raw" and len(images) == 1
                and images[0].format == "raw"
                and images[0].file_size % 512 == 0 and not no_create and sparse_size
                and isinstance(srcs[0], (str, bytes, os.PathLike))
                and not is_rbd_name(os.fspath(srcs[0])) and not is_rbd_name(dst))


def _key_for(keys, src):
    """The passphrase ``keys`` holds for a source named by path (None: none given, or a
    store handed in)."""
    if not keys or not isinstance(src, (str, bytes, os.PathLike)):
        return None
    return keys.get(os.fsdecode(src))


def convert(src, dst, *, src_format: str | None = None, out_format: str = "raw",
            compress: bool = False, options=None, sparse_size: int = 4096,
            cache: str = "writeback", workers: int | None = None, out_of_order: bool = False,
            no_create: bool = False, target_is_zero: bool = False,
            backing_file: str | None = None, backing_format: str | None = None,
            progress=None, untrusted: bool = False, force_share: bool = False,
            snapshot=None, max_output: int | None = None, bitmaps: bool = False,
            skip_broken_bitmaps: bool = False, salvage=None, keys=None, copies=(),
            before_commit=None, on_data=None, rate_limit: int | None = None) -> None:
    """Convert image(s) ``src`` (a path or a list of paths, concatenated) to ``dst``.

    ``out_format`` "raw" (sparse) or "qcow2"; ``compress`` (-c) writes compressed
    clusters (``options["compression_type"]`` picks zlib or zstd); ``options`` are
    qemu-img's ``-o`` creation options (dict or "k=v,k=v"); ``sparse_size`` (-S):
    zero runs of at least this many bytes are not written (0 writes everything);
    ``backing_file``/``backing_format`` (-B/-F): the output gets that backing file and
    only what the source's top layer holds is written; ``no_create`` (-n): write into
    an existing DST; ``target_is_zero``: with -n, skip writing zeros; ``cache`` (-t)
    "none"/"writeback" flush the output before returning, "unsafe" does not;
    ``workers`` (-m) threads; ``progress``: a callable taking a percentage;
    ``max_output``: refuse (UnsafeImageError) when the output would exceed that many bytes;
    ``bitmaps`` (--bitmaps): copy the source's persistent bitmaps (qcow2 to qcow2), those
    in use refused unless ``skip_broken_bitmaps``; ``salvage`` (--salvage): called with a
    warning per unreadable source sector, written as zeros (one worker: warnings in order);
    ``keys``: passphrases of encrypted sources (and of their backing files) by file name;
    ``copies``: more paths that get the same raw output in the same pass (new files,
    each under a temporary name until the end, like DST); ``before_commit``: called
    once every byte is written, before DST (and the copies) appear: an exception
    there discards everything; ``on_data(n)``: called (from any worker) before each
    chunk of ``n`` bytes of data is read and written, may wait or raise (raw file
    output only); ``rate_limit`` (-r): at most that many bytes of data per second on
    average (0 or None: no limit; holes and zeros are free).
    """
    from ..opener import open_image

    if out_format not in ("raw", "qcow2"):
        raise UnsupportedFeatureError(f"output format {out_format!r} is not supported "
                                      f"(supported: raw, qcow2)",
                                      feature=f"convert -O {out_format}")
    check_modes(cache, sparse_size, compress, out_format, no_create, target_is_zero,
                 bool(copies) or before_commit is not None or on_data is not None, dst)
    check_rate(rate_limit)
    opts, backing_file, backing_format = output_options(out_format, options, no_create,
                                                         backing_file, backing_format)
    if workers is not None and not 1 <= workers <= 16:
        raise InvalidOptionError("Invalid number of coroutines. Allowed number of coroutines "
                                 "is between 1 and 16")
    workers = workers or default_workers(dst)
    srcs = [src] if isinstance(src, (str, bytes, os.PathLike)) else list(src)
    if not srcs:
        raise InvalidOptionError("Must specify image file name")
    if snapshot is not None and len(srcs) > 1:
        raise InvalidOptionError("No support for concatenating multiple snapshot")
    dst = os.fspath(dst)

    images = []
    try:
        for s in srcs:
            images.append(open_image(s, format=src_format, untrusted=untrusted,
                                     snapshot=snapshot, force_share=force_share,
                                     key=_key_for(keys, s), keys=keys))
        if backing_file is not None:
            if len(images) > 1:
                raise InvalidOptionError("Having a backing file for the target makes no sense "
                                         "when concatenating multiple input images")
            if backing_format is None and not no_create:
                raise InvalidOptionError("Use of backing file requires explicit backing "
                                         "format")
        copied = bitmaps_to_copy(images, out_format, opts, skip_broken_bitmaps) if bitmaps \
            else None
        if salvage is not None:
            from .salvage import SalvagingImage
            images[:] = [SalvagingImage(img, salvage) for img in images]
            workers = 1
        size = sum(img.size for img in images)
        if max_output is not None and size > max_output:
            from ..errors import UnsafeImageError
            raise UnsafeImageError(f"output of {size} bytes exceeds the limit of "
                                   f"{max_output} bytes (max_output)")
        sync = cache != "unsafe"
        limit = rate_limit_of(rate_limit)
        if _sparse_copy_will_do(images, srcs, dst, out_format, no_create, sparse_size,
                                salvage is not None or copies or before_commit is not None
                                or on_data is not None or limit is not None):
            # raw -> raw is a sparse copy: data regions only, copy offload
            from .sparse import sparse_copy
            images[0].close()
            sparse_copy(srcs[0], dst, progress=progress, sync=sync)
            return
        if is_rbd_name(dst):
            if out_format != "raw":
                raise UnsupportedFeatureError(f"Could not create '{dst}': convert writes "
                                              f"raw images into RBD (-O raw)",
                                              feature="convert -O qcow2 rbd:")
            to_rbd(images, dst, size, sparse_size=sparse_size, sync=sync, workers=workers,
                    progress=progress, no_create=no_create, target_is_zero=target_is_zero,
                    limit=limit)
        elif out_format == "raw":
            to_raw(images, dst, size, sparse_size=sparse_size, sync=sync, workers=workers,
                    progress=progress, no_create=no_create, target_is_zero=target_is_zero,
                    copies=copies, before_commit=before_commit, on_data=on_data,
                    limit=limit)
        else:
            to_qcow2(images, dst, size, opts=opts, compress=compress, sparse_size=sparse_size,
                      sync=sync, workers=workers, progress=progress, no_create=no_create,
                      target_is_zero=target_is_zero, backing_file=backing_file,
                      backing_format=backing_format, out_of_order=out_of_order,
                      bitmaps=copied, limit=limit)
    finally:
        for img in images:
            img.close()
