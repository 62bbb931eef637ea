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
import threading

from ..atomic import (AtomicOutput, BackgroundSync, drop_pages, io_buffer, pwrite_all,
                      start_writeback, sync_new_name)
from ..errors import InvalidOptionError, Qcow2Error, UnsupportedFeatureError
from ..paths import combine_path, temp_name
from .outputopts import (bitmaps_to_copy, check_modes, default_workers, discard_output,
                         name_the_output, output_options)
from .windows import chunks, windows
from .progress import PROGRESS_STEP, Progress
from .sparse_runs import sparse_data_runs
from .sparse_write import (copy_run, is_blockdev, punch_or_zero, sparse_runs, write_sparse,
                           zero_fill)
from ..pool import run
from ..reader import serial_reads
from ..rbdname import is_rbd_name
from ..units import ceil_div

CHUNK = 4 * 1024 * 1024
OUTPUT_L2_CACHE = 8 << 20           # L2 tables of a new qcow2 output kept in memory

DATA, ZERO, BACKING = "data", "zero", "backing"


class _Piece:
    __slots__ = ("dst", "src", "off", "n", "kind", "host")

    def __init__(self, dst: int, src, off: int, n: int, kind: str, host=None):
        self.dst = dst        # offset in the output
        self.src = src        # source Image
        self.off = off        # offset in the source
        self.n = n
        self.kind = kind
        self.host = host      # (fd, offset): where a plain data run lies in a file


def _host_fd(img, depth: int):
    """The file descriptor holding the data of layer ``depth`` of ``img``'s chain."""
    chain = img.backing_chain()
    if depth >= len(chain):
        return None
    layer = chain[depth]
    be = getattr(layer, "data_be", None) or getattr(layer, "be", None)
    fd = getattr(be, "fd", None)
    return fd if isinstance(fd, int) and fd >= 0 else None


def _plan(sources, *, top_only: bool):
    """Pieces covering the whole output, in order."""
    base = 0
    for img in sources:
        fds: dict = {}
        for e in img.extents():
            if not e.length:
                continue
            if top_only and e.depth > 0:
                kind = BACKING
            elif e.data and not e.zero:
                kind = DATA
            else:
                kind = ZERO if (not top_only or e.present) else BACKING
            host = None
            if kind == DATA and e.offset is not None and not getattr(img, "encrypted", False):
                fd = fds.get(e.depth, -1)
                if fd == -1:
                    fd = fds[e.depth] = _host_fd(img, e.depth)
                if fd is not None:
                    host = (fd, e.offset)
            yield _Piece(base + e.start, img, e.start, e.length, kind, host)
        base += img.size


def _data_total(images, top_only: bool, progress) -> int:
    """Bytes of data to copy (for the progress percentage only: a metadata walk)."""
    if progress is None:
        return 0
    return sum(p.n for p in _plan(images, top_only=top_only) if p.kind == DATA)


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
            before_commit=None, on_data=None) -> None:
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
    output only).
    """
    from ..opener import open_image

    if out_format not in ("raw", "qcow2"):
        raise UnsupportedFeatureError(f"output format {out_format!r} is not supported "
                                      f"(supported: raw, qcow2)",
                                      feature=f"convert -O {out_format}")
    check_modes(cache, sparse_size, compress, out_format, no_create, target_is_zero,
                 bool(copies) or before_commit is not None or on_data is not None, dst)
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
        if _sparse_copy_will_do(images, srcs, dst, out_format, no_create, sparse_size,
                                salvage is not None or copies or before_commit is not None
                                or on_data is not None):
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
            _to_rbd(images, dst, size, sparse_size=sparse_size, sync=sync, workers=workers,
                    progress=progress, no_create=no_create, target_is_zero=target_is_zero)
        elif out_format == "raw":
            _to_raw(images, dst, size, sparse_size=sparse_size, sync=sync, workers=workers,
                    progress=progress, no_create=no_create, target_is_zero=target_is_zero,
                    copies=copies, before_commit=before_commit, on_data=on_data)
        else:
            _to_qcow2(images, dst, size, opts=opts, compress=compress, sparse_size=sparse_size,
                      sync=sync, workers=workers, progress=progress, no_create=no_create,
                      target_is_zero=target_is_zero, backing_file=backing_file,
                      backing_format=backing_format, out_of_order=out_of_order,
                      bitmaps=copied)
    finally:
        for img in images:
            img.close()


# ---------------------------------------------------------------------------
# raw output
# ---------------------------------------------------------------------------

def _raw_jobs(images, zero_writes: bool):
    """(piece, output offset, source offset, n) per chunk of data; with ``zero_writes``
    also the zero ranges, as n < 0.  Generated as the workers take them: memory does
    not grow with the image (a map can have millions of extents)."""
    for p in _plan(images, top_only=False):
        if p.kind == DATA:
            for d, o, n in chunks(p, CHUNK):
                yield p, d, o, n
        elif zero_writes:
            for d, o, n in chunks(p, CHUNK):
                yield p, d, o, -n


class _Work:
    """What the workers of one convert share, whatever the output."""

    def __init__(self, *, sparse_size: int, zero_writes: bool, prog):
        from .. import kernels
        self.kernels = kernels
        self.sparse_size = sparse_size     # -S: zero runs this long are not written
        self.zero_writes = zero_writes     # zeros must be written (-n, or -B)
        self.prog = prog
        self.tls = threading.local()       # per-thread buffers and compressors
        self.syncs: list = []              # BackgroundSync of the outputs (flushing modes)

    def close(self, *, check: bool = True) -> None:
        """Wait for the background syncs (``check``: raise their error)."""
        errors = []
        for s in self.syncs:
            try:
                s.close(check=check)
            except OSError as exc:
                errors.append(exc)
        if errors:
            raise errors[0]

    def read_chunk(self, piece, offset: int, n: int) -> memoryview:
        """``n`` bytes of ``piece``'s source from ``offset``, into this thread's buffer:
        one per thread, reused (a fresh 4 MiB buffer per chunk costs a page fault per
        4 KiB, since readinto fills all of it, holes included)."""
        whole = getattr(self.tls, "buf", None)
        if whole is None:
            whole = self.tls.buf = io_buffer(CHUNK)
        mv = whole[:n]
        piece.src.readinto(mv, offset)
        return mv


class _RawCopy(_Work):
    """Copies one job of :func:`_raw_jobs` into the raw output ``fd`` (any thread)."""

    def __init__(self, fd: int, *, sparse_size: int, zero_writes: bool, sync: bool, prog,
                 tees=(), on_data=None):
        super().__init__(sparse_size=sparse_size, zero_writes=zero_writes, prog=prog)
        self.fd = fd
        self.on_data = on_data
        self.tees = tees                  # more outputs getting the same bytes
        self.sync = sync
        # copy_file_range only where it shares blocks; elsewhere (ext4, tmpfs) pwrite
        # of the bytes read for the zero scan costs less in the serialized writes
        # (633 MiB into ext4: 0.13 s of pwrite, 0.17 s of copy_file_range)
        from .sparse import shares_extents
        self.offload = [hasattr(os, "copy_file_range") and shares_extents(fd)]
        # flushing modes: the outputs are synced in the background as the data comes
        self.syncs = [BackgroundSync(f) for f in (fd, *tees)] if sync else []

    def __call__(self, job) -> None:
        p, d, o, n = job
        fd = self.fd
        if n < 0:
            punch_or_zero(fd, d, -n)
            return
        if self.on_data is not None:
            self.on_data(n)
        mv = self.read_chunk(p, o, n)
        # plain data lying in a file that shares blocks: the kernel copies it
        # (copy_file_range), the buffer only serves the zero scan (and the fallback)
        src = None
        if p.host is not None and self.offload[0]:
            src = (p.host[0], p.host[1] + (o - p.off), self.offload)
        if self.sparse_size:
            write_sparse(fd, mv, d, self.sparse_size, self.kernels, self.zero_writes, src,
                         self.tees)
        elif src is not None or self.tees:
            copy_run(fd, mv, d, src, self.tees)
        else:
            pwrite_all(fd, mv, d)
        if self.sync:
            for f in (fd, *self.tees):
                start_writeback(f, d, n)
            for s in self.syncs:
                s.wrote(n)
        self.prog.add_split(d, n)


def _into_existing(dst: str, size: int, sync: bool, copy) -> None:
    """``copy(fd)`` into the existing raw file or device ``dst`` (-n)."""
    try:
        fd = os.open(dst, os.O_WRONLY | os.O_CLOEXEC)
    except OSError as exc:
        raise Qcow2Error(f"Could not open '{dst}': {exc.strerror}") from None
    try:
        if os.fstat(fd).st_size < size and not is_blockdev(fd):
            raise Qcow2Error(f"Target image '{dst}' is smaller than the source")
        copy(fd)
        if sync:
            os.fsync(fd)
    finally:
        os.close(fd)


def _to_raw(images, dst, size, *, sparse_size, sync, workers, progress, no_create,
            target_is_zero, copies=(), before_commit=None, on_data=None) -> None:
    prog = Progress(_data_total(images, False, progress), progress)
    zero_writes = no_create and not target_is_zero
    tees: list = []

    def copy(fd: int) -> None:
        if progress is not None:
            progress(0.0)
        work = _RawCopy(fd, sparse_size=sparse_size, zero_writes=zero_writes, sync=sync,
                        prog=prog, tees=tuple(t.fd for t in tees), on_data=on_data)
        try:
            run(_raw_jobs(images, zero_writes), work, workers, context=serial_reads,
                name="qcow2-convert")
        except BaseException:
            work.close(check=False)        # (the first error matters)
            raise
        work.close()

    if no_create:
        _into_existing(dst, size, sync, copy)
        return
    try:
        with AtomicOutput(dst) as out:
            for path in copies:
                tees.append(AtomicOutput(path))
            for o in (out, *tees):
                os.ftruncate(o.fd, size)
            copy(out.fd)
            if before_commit is not None:
                before_commit()
            out.commit(sync=sync)
            for t in tees:
                t.commit(sync=sync)
    finally:
        for t in tees:
            t.close()
    if progress is not None:
        progress(100.0)


# ---------------------------------------------------------------------------
# RBD output
# ---------------------------------------------------------------------------

def _to_rbd(images, dst, size, *, sparse_size, sync, workers, progress, no_create,
            target_is_zero) -> None:
    """Raw output streamed into an RBD image, by the workers in parallel (librbd runs
    with the GIL released): only data is written, so no RADOS object is created for a
    hole; no local file.  The image is created here (refused when it exists, unless
    -n) and removed again if the convert fails, even on an interrupt."""
    from ..rbdname import open_rbd

    try:
        be = open_rbd(dst, writable=True) if no_create else open_rbd(dst, create=size)
    except Qcow2Error as exc:
        if getattr(exc, "errno", None) == 17:                       # EEXIST
            raise Qcow2Error(f"{exc} (-n writes into an existing image)") from None
        raise
    try:
        be.lock(write=True)
        if be.size() < size:
            raise Qcow2Error(f"Target image '{dst}' is smaller than the source")
        if progress is not None:
            progress(0.0)
        work = _RbdCopy(be, sparse_size=sparse_size,
                        zero_writes=no_create and not target_is_zero,
                        prog=Progress(_data_total(images, False, progress), progress))
        run(_raw_jobs(images, work.zero_writes), work, workers, context=serial_reads,
            name="qcow2-convert")
        if sync:
            be.flush()
    except BaseException as exc:
        if no_create:
            be.close()
            raise
        try:
            be.remove()
        except OSError as left:         # the original error first, then what is left
            be.close()
            if isinstance(exc, (OSError, Qcow2Error)):
                raise Qcow2Error(f"{_reason(exc)}; {left.strerror}") from None
        raise
    be.close()
    if progress is not None:
        progress(100.0)


def _reason(exc: BaseException) -> str:
    """One line for an error of the RBD output (an OSError's text and the image)."""
    if isinstance(exc, OSError) and exc.strerror:
        return f"{exc.strerror}" + (f" '{exc.filename}'" if exc.filename else "")
    return str(exc)


class _RbdCopy(_Work):
    """Copies one job of :func:`_raw_jobs` into the RBD image ``be`` (any thread)."""

    def __init__(self, be, *, sparse_size: int, zero_writes: bool, prog):
        super().__init__(sparse_size=sparse_size, zero_writes=zero_writes, prog=prog)
        self.be = be

    def __call__(self, job) -> None:
        p, d, o, n = job
        be = self.be
        if n < 0:
            be.punch_hole(d, -n)
            return
        mv = self.read_chunk(p, o, n)
        if not self.sparse_size:
            be.pwrite(mv, d)
        else:
            for a, b, zero in sparse_runs(mv, d, self.sparse_size, self.kernels):
                if not zero:
                    be.pwrite(mv[a:b], d + a)
                elif self.zero_writes:
                    be.punch_hole(d + a, b - a)
        self.prog.add_split(d, n)


# ---------------------------------------------------------------------------
# qcow2 output
# ---------------------------------------------------------------------------

def _to_qcow2(images, dst, size, *, opts, compress, sparse_size, sync, workers, progress,
              no_create, target_is_zero, backing_file, backing_format,
              out_of_order=False, bitmaps=None) -> None:
    from ..creator import prepare
    from ..opener import open_image

    tmp = None
    out = None
    try:
        if no_create:
            out = open_image(dst, "r+", format="qcow2")
            if out.size < size:
                raise Qcow2Error(f"Target image '{dst}' is smaller than the source")
        else:
            # beside DST, so a relative backing name resolves the same for both
            tmp = temp_name(dst)
            # not synced here: the output's final flush syncs everything before the
            # rename makes it visible
            try:
                prepare(tmp, size, format="qcow2", backing_file=backing_file,
                        backing_format=backing_format, **opts).run(durable=False)
            except Qcow2Error as exc:
                if getattr(exc, "hint", None) != "Could not open backing image.\n":
                    name_the_output(exc, tmp, dst)
                    raise
                # qemu-img creates the output, then fails to open it with its backing file
                inner = exc.lines[0]
                if inner.startswith("Could not open '") and "': " in inner:
                    inner = (f"Could not open '{combine_path(dst, backing_file)}': "
                             f"{inner.split(chr(39) + ': ', 1)[1]}")
                raise Qcow2Error(f"Could not open '{dst}': Could not open backing file: "
                                 f"{inner}") from None
            out = open_image(tmp, "r+", format="qcow2")
            # invisible until renamed: one sync at the end (none with -t unsafe)
            out.set_unordered(durable=sync)
            # tables are filled in guest order: a few are enough (the default cache
            # holds 32 MiB, a scattered 16 TiB image fills it: 133 -> 86 MiB peak)
            out.limit_table_cache(OUTPUT_L2_CACHE)
        top_only = backing_file is not None
        fill = _Qcow2Fill(out, size, compress=compress, sparse_size=sparse_size,
                          zero_writes=(no_create and not target_is_zero)
                          or backing_file is not None,
                          deferred=tmp is not None, sync=sync,
                          # -B: what the new backing file shows already is not written
                          dedupe=tmp is not None and backing_file is not None
                          and sparse_size != 0,
                          prog=Progress(_data_total(images, top_only,
                                                     progress), progress))
        if progress is not None:
            progress(0.0)
        # jobs generated as the work goes (bounded memory whatever the map's size)
        try:
            run(fill.jobs(images, top_only=top_only), fill.compute, workers,
                apply=fill.apply, finish=fill.finish, ordered=not out_of_order,
                context=serial_reads, name="qcow2-convert")
        except BaseException:
            fill.close(check=False)            # (the first error matters)
            raise
        fill.close()
        if bitmaps:
            out.store_bitmaps(bitmaps)
        if sync:
            out.flush()
        out.close()
        out = None
        if tmp is not None:
            os.replace(tmp, dst)
            tmp = None
            if sync:
                sync_new_name(dst)          # removes dst if the name is not durable
    finally:
        discard_output(out, tmp)
    if progress is not None:
        progress(100.0)


def _hosted_source(hosted, ra: int, rb: int):
    """(fd, offset) of the file range holding all of [ra, rb) of the window, or None."""
    for ha, hb, fd, hoff in hosted:
        if ha <= ra and rb <= hb:
            return fd, hoff + (ra - ha)
    return None


class _Qcow2Fill(_Work):
    """convert's work for a qcow2 output, one window of the output per job (see
    :func:`qcow2.pool.run`): ``compute`` reads (and compresses) a window in parallel,
    ``apply`` allocates its clusters and updates the tables, one window at a time (in
    order unless -W), ``finish`` performs its data copies in parallel again.

    Window buffers are reused (a fresh 4 MiB bytearray per window costs a page fault
    per 4 KiB): taken by compute, given back by finish.  At most 2 x workers + 1
    windows are in flight, so the pool of buffers stays that small."""

    def __init__(self, out, size: int, *, compress: bool, sparse_size: int,
                 zero_writes: bool, deferred: bool, prog, dedupe: bool = False,
                 sync: bool = True):
        super().__init__(sparse_size=sparse_size, zero_writes=zero_writes, prog=prog)
        self.sync = sync                   # -t unsafe: no flush, no early writeback
        self.out = out
        self.dedupe = dedupe
        self.size = size
        self.cs = out.cluster_size
        self.window = max(self.cs, CHUNK // self.cs * self.cs)
        self.compress = compress
        # a temporary output (set_unordered): allocation in apply, data copies queued
        # for finish (see WritableQcow2Image.defer_data)
        self.deferred = deferred
        self.free_bufs: list = []
        self.bufs_lock = threading.Lock()
        # plain source data is copied by the kernel only where the output's file system
        # shares blocks (see _RawCopy): elsewhere pwrite from the window read anyway
        from .sparse import shares_extents
        fd = getattr(getattr(out, "data_be", None), "fd", None)
        self.offload = isinstance(fd, int) and fd >= 0 and shares_extents(fd)
        # flushing modes: the output is synced in the background as the data comes
        fds = {f for f in (getattr(out.be, "fd", None), fd) if isinstance(f, int) and f >= 0}
        self.syncs = [BackgroundSync(f) for f in sorted(fds)] if sync and deferred else []
        self.applied = 0                   # bytes written since the last writeback kick

    def jobs(self, images, *, top_only: bool):
        """(window offset, segments) of the windows holding anything to write."""
        zero_writes = self.zero_writes
        full = not self.sparse_size   # -S 0: every cluster written as data (but what
        #                               the output's backing file holds, with -B)
        def wanted(p) -> bool:
            return p.kind == DATA or (p.kind == ZERO and (zero_writes or full))
        return ((w, segs) for w, segs in windows(_plan(images, top_only=top_only),
                                                  self.window, wanted)
                if any(wanted(p) for p, *_ in segs))

    def _compressor(self):
        c = getattr(self.tls, "c", None)
        if c is None:
            c = self.tls.c = self.kernels.Compressor(self.out.header.compression_type, self.cs)
        return c

    def _take_buf(self):
        with self.bufs_lock:
            if self.free_bufs:
                return self.free_bufs.pop()
        return io_buffer(self.window)

    def compute(self, job):
        """Read (and compress) one window; returns the writes it needs."""
        w, segs = job
        end = min(self.size, w + self.window)
        buf = self._take_buf()
        mv = memoryview(buf)[:end - w]
        ncl = (end - w + self.cs - 1) // self.cs
        write, keep, known_zero, hosted, ndata = self._read(w, segs, mv, ncl)
        if self.sparse_size:
            zero = self._scan(mv, ncl, known_zero)
            if self.sparse_size > self.cs and not self.compress:
                self._absorb_short_zeros(w, segs, mv, zero)
            for ka, kb in known_zero:
                zero[ka:kb] = [True] * (kb - ka)
        else:
            zero = [False] * ncl
        if self.dedupe and any(write):
            self._drop_what_backing_shows(w, mv, write, zero)
        return buf, self._writes(w, end, mv, write, keep, zero, hosted), ndata, []

    def _scan(self, mv: memoryview, ncl: int, known_zero: list) -> list:
        """Per cluster of the window, whether it reads as zeros; those ``known_zero``
        (ascending ranges) are not scanned (their pages may not exist: drop_pages)."""
        cs = self.cs
        zero = [True] * ncl
        k = 0
        for ka, kb in (*known_zero, (ncl, ncl)):
            if k < ka:
                zero[k:ka] = self.kernels.zero_blocks(mv[k * cs:ka * cs], cs).tolist()
            k = max(k, kb)
        return zero

    def _drop_what_backing_shows(self, w: int, mv: memoryview, write: list,
                                 zero: list) -> None:
        """-B: clusters that read the same through the new backing file are left to it
        (the output holds only what differs from its backing file).  A cluster known
        to be zero (``zero``; the buffer may hold stale bytes there) is compared with
        zeros."""
        cs = self.cs
        view = bytearray(len(mv))
        self.out.readinto(view, w)            # (nothing of this window is written yet)
        vv = memoryview(view)
        zeros = bytes(cs)
        for k, todo in enumerate(write):
            if not todo:
                continue
            theirs = vv[k * cs:(k + 1) * cs]
            ours = zeros[:len(theirs)] if zero[k] else mv[k * cs:(k + 1) * cs]
            if theirs == ours:
                write[k] = False

    def _absorb_short_zeros(self, w: int, segs, mv: memoryview, zero: list) -> None:
        """With -S larger than a cluster, qemu-img decides per 512-byte sector: zero
        runs shorter than -S after data are written as data, and data runs end on a
        multiple of -S (rounded down to a power of two).  The clusters such runs touch
        are written, zero or not."""
        cs = self.cs
        for p, d, _o, n in segs:
            if p.kind != DATA:
                continue
            a = d - w
            flags = self.kernels.zero_blocks(mv[a:a + n], 512).tolist()
            for ra, rb in sparse_data_runs(flags, d // 512, self.sparse_size // 512):
                for k in range((a + ra * 512) // cs, (a + min(rb * 512, n) - 1) // cs + 1):
                    zero[k] = False

    def _read(self, w: int, segs, mv: memoryview, ncl: int):
        """Fill the window's buffer; per cluster whether this convert must set it
        (``write``) or leaves it to the backing file (``keep``); the cluster ranges
        known to read as zeros; the plain data lying in a file (a, b, fd, offset)."""
        cs = self.cs
        write = [False] * ncl
        keep = [False] * ncl
        known_zero = []
        hosted = []
        ndata = []                             # the (offset, length) of the data read
        for p, d, o, n in segs:
            a, b = d - w, d - w + n
            seg = mv[a:b]
            if p.kind == DATA:
                p.src.readinto(seg, o)
                ndata.append((d, n))
                if p.host is not None and not self.compress and self.offload:
                    hosted.append((a, b, p.host[0], p.host[1] + (o - p.off)))
            elif p.kind == BACKING:
                self.out.readinto(seg, d)      # what the new backing file shows there
            elif self.sparse_size:
                # (the buffer is reused) clusters wholly in this zero range are known
                # zero and never written from the buffer: only the partial ones at
                # its edges need clearing, so the scan sees what the guest reads
                ka = ceil_div(a, cs)
                kb = ncl if b == len(mv) else b // cs
                if ka < kb:
                    zero_fill(mv[a:ka * cs])
                    zero_fill(mv[kb * cs:b])
                    known_zero.append((ka, kb))
                else:
                    zero_fill(seg)
            else:
                zero_fill(seg)                     # -S 0 writes zero clusters from the buffer
            if p.kind == BACKING:
                marks = keep
            elif p.kind == DATA or self.zero_writes or not self.sparse_size:
                marks = write
            else:
                continue
            for k in range(a // cs, (b - 1) // cs + 1):
                marks[k] = True
        return write, keep, known_zero, hosted, ndata

    def _writes(self, w: int, end: int, mv: memoryview, write, keep, zero, hosted) -> list:
        """The window's writes: ("w", offset, data, source), ("z", offset, length,
        None), ("c", offset, compressed clusters, data)."""
        cs = self.cs
        ncl = len(write)
        comp = self._compressor() if self.compress else None
        ops = []
        k = 0
        while k < ncl:
            if not write[k]:
                k += 1
                continue
            a = w + k * cs
            if zero[k]:
                if self.zero_writes or keep[k]:
                    ops.append(("z", a, min(cs, end - a), None))
                k += 1
                continue
            j = k + 1
            while j < ncl and write[j] and not zero[j]:
                j += 1
            if comp is None:
                ra, rb = k * cs, min(j * cs, len(mv))
                ops.append(("w", a, mv[ra:rb], _hosted_source(hosted, ra, rb)))
            else:
                # one kernel call for the run of whole clusters, one for a short tail
                whole = min(j, (end - w) // cs) - k
                comps = comp.compress_many(mv[k * cs:], whole) if whole > 0 else []
                if k + whole < j:
                    tail = mv[(k + whole) * cs:]
                    comps.append(comp.compress(bytes(tail) + bytes(cs - len(tail))))
                ops.append(("c", a, comps, mv[k * cs:j * cs]))
            k = j
        return ops

    def apply(self, result) -> None:
        """Allocation and tables, one window at a time (in order unless -W); with a
        temporary output the data copies are only queued, for finish()."""
        _buf, ops, _ndata, pending = result
        out = self.out
        if self.deferred:
            out.defer_data(pending)
        try:
            for op, a, x, y in ops:
                if op == "w":
                    out.pwrite(x, a, source=y)
                elif op == "z":
                    out.write_zeroes(a, x)
                else:
                    out.write_compressed_many(a, x, y)
        finally:
            if self.deferred:
                out.defer_data(None)

    def finish(self, result) -> None:
        """The window's data copies (in parallel across windows), then its buffer
        goes back to the pool."""
        buf, ops, ndata, pending = result
        try:
            if pending:
                self.out.write_pending(pending)
        finally:
            n = sum(len(x) if op == "w" else 0 for op, _a, x, _y in ops) or sum(
                k for _d, k in ndata)
            del ops
            pending.clear()
            if n < self.window // 8:           # little data: keep little memory
                drop_pages(buf)
            with self.bufs_lock:
                self.free_bufs.append(buf)
                self.applied += n
                kick = self.sync and self.applied >= 64 << 20
                if kick:
                    self.applied = 0
        if kick:                               # let the disk work while we go on
            start_writeback(self.out.be.fd)
        for s in self.syncs:
            s.wrote(n)
        for d, k in ndata:
            self.prog.add_split(d, k, self.cs if self.compress else PROGRESS_STEP)
