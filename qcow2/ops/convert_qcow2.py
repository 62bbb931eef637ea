"""convert into a qcow2 output: created under a temporary name beside DST (or an
existing image with -n), filled window by window by the workers (read, zero scan,
compression in parallel; cluster allocation in guest order), renamed into place on
success.  See :mod:`qcow2.ops.convert`."""

from __future__ import annotations

import os
import threading

from ..atomic import BackgroundSync, drop_pages, io_buffer, start_writeback, sync_new_name
from ..errors import Qcow2Error
from ..paths import combine_path, temp_name
from .outputopts import discard_output, name_the_output
from .windows import windows
from .progress import PROGRESS_STEP, Progress
from .sparse_runs import sparse_data_runs
from .sparse_write import zero_fill
from ..pool import run
from ..reader import serial_reads
from ..units import ceil_div
from .convert_plan import BACKING, CHUNK, DATA, ZERO, Work, data_total, plan

OUTPUT_L2_CACHE = 8 << 20           # L2 tables of a new qcow2 output kept in memory


def to_qcow2(images, dst, size, *, opts, compress, sparse_size, sync, workers, progress,
              no_create, target_is_zero, backing_file, backing_format,
              out_of_order=False, bitmaps=None, limit=None) -> None:
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
                          prog=Progress(data_total(images, top_only,
                                                     progress), progress, limit))
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


class _Qcow2Fill(Work):
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
        return ((w, segs) for w, segs in windows(plan(images, top_only=top_only),
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


__all__ = ["to_qcow2"]
