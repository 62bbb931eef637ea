"""convert into raw outputs: a new file (an anonymous one linked into place on
success, with more copies in the same pass if asked), an existing file or device
(-n), or an RBD image streamed from the workers.  See :mod:`qcow2.ops.convert`."""

from __future__ import annotations

import os

from ..atomic import AtomicOutput, BackgroundSync, pwrite_all, start_writeback
from ..errors import Qcow2Error
from .progress import Progress
from .sparse_write import copy_run, is_blockdev, punch_or_zero, sparse_runs, write_sparse
from ..pool import run
from ..reader import serial_reads
from .convert_plan import Work, data_total, raw_jobs


class _RawCopy(Work):
    """Copies one job of :func:`raw_jobs` into the raw output ``fd`` (any thread)."""

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


def to_raw(images, dst, size, *, sparse_size, sync, workers, progress, no_create,
            target_is_zero, copies=(), before_commit=None, on_data=None,
            limit=None) -> None:
    prog = Progress(data_total(images, False, progress), progress, limit)
    zero_writes = no_create and not target_is_zero
    tees: list = []

    def copy(fd: int) -> None:
        if progress is not None:
            progress(0.0)
        work = _RawCopy(fd, sparse_size=sparse_size, zero_writes=zero_writes, sync=sync,
                        prog=prog, tees=tuple(t.fd for t in tees), on_data=on_data)
        try:
            run(raw_jobs(images, zero_writes), work, workers, context=serial_reads,
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

def to_rbd(images, dst, size, *, sparse_size, sync, workers, progress, no_create,
            target_is_zero, limit=None) -> None:
    """Raw output streamed into an RBD image, by the workers in parallel (librbd runs
    with the GIL released): only data is written, so no RADOS object is created for a
    hole; no local file.  A new image (refused when one of that name exists, unless
    -n) is made under a temporary name and renamed once complete and flushed, as file
    outputs are; on failure, even an interrupt, it is removed."""
    from ..rbdname import open_rbd
    from ..rbdoutput import create_rbd_output, publish_rbd_output

    final = None
    try:
        if no_create:
            be = open_rbd(dst, writable=True)
        else:
            be, final = create_rbd_output(dst, size)
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
                        prog=Progress(data_total(images, False, progress), progress,
                                      limit))
        run(raw_jobs(images, work.zero_writes), work, workers, context=serial_reads,
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
    if final is None:
        be.close()
    else:
        publish_rbd_output(be, dst, final)
    if progress is not None:
        progress(100.0)


def _reason(exc: BaseException) -> str:
    """One line for an error of the RBD output (an OSError's text and the image)."""
    if isinstance(exc, OSError) and exc.strerror:
        return f"{exc.strerror}" + (f" '{exc.filename}'" if exc.filename else "")
    return str(exc)


class _RbdCopy(Work):
    """Copies one job of :func:`raw_jobs` into the RBD image ``be`` (any thread)."""

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


__all__ = ["to_raw", "to_rbd"]
