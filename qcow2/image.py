"""The image interface: what every disk looks like to the rest of the engine.

An :class:`Image` is the engine's one interface to a disk: ``size``, ``pread`` /
``readinto``, ``block_status`` (one layer) and ``extents()`` (the whole chain, like
``qemu-img map``), ``info()`` (like ``qemu-img info``) and ``file()`` (a read-only
file object, :class:`ImageFile`).  :class:`RawImage` is the raw format; the qcow2
classes live in ``qcow2.reader`` (reading) and ``qcow2.writer`` (writing), and
``qcow2.opener`` picks one for a file or a store.
"""

from __future__ import annotations

import io

from .errors import ClosedImageError, InvalidOptionError, Qcow2Error, ReadOnlyError
from .lightweight import local, record

TYPE_CHECKING = False
if TYPE_CHECKING:        # (importing typing costs every CLI process ~3 ms)
    from typing import Iterator

    from .backends import Backend

# Block status flags (the meaning QEMU's block layer gives them).
ST_DATA = 1
ST_ZERO = 2
ST_OFFSET_VALID = 4
ST_ALLOCATED = 8

# Kinds of the pieces of a read plan (Image.read_plan).
READ_ZEROS = 0          # reads as zeros
READ_FILE = 1           # the bytes lie verbatim in a file: (fd, host offset); zeros past its end
READ_COPY = 2           # read through readinto (compressed, encrypted, any other store)

_ZEROS = memoryview(bytes(1 << 20))
_scratch = local()                      # pread's reused buffer, one per thread
_SCRATCH_MIN = 64 << 10                 # reads from this size use it
_SCRATCH_MAX = 4 << 20                  # kept per thread at most


def zero_fill(mv: memoryview) -> None:
    """Fill ``mv`` with zero bytes (from a shared block of zeros, no allocation)."""
    n = len(mv)
    i = 0
    while i < n:
        k = min(n - i, len(_ZEROS))
        mv[i:i + k] = _ZEROS[:k]
        i += k


def add_piece(plan: list, a: int, n: int, kind: int, fd: int = -1, host: int = 0) -> None:
    """Append a piece to a read plan, merged with the last one when it continues it
    (the same kind and, for file pieces, the same file and the next host byte)."""
    if plan:
        pa, pn, pk, pfd, ph = plan[-1]
        if pk == kind and pa + pn == a and (kind != READ_FILE or (pfd == fd and ph + pn == host)):
            plan[-1] = (pa, pn + n, kind, pfd, ph)
            return
    plan.append((a, n, kind, fd, host))


class Extent(record("Extent", "start length depth present zero data offset")):
    """One run of ``qemu-img map``: ``start``, ``length``, ``depth`` (ints),
    ``present``, ``zero``, ``data`` (bools), ``offset`` (int, or None when qemu
    prints none)."""
    __slots__ = ()

    def as_dict(self) -> dict:
        d = {"start": self.start, "length": self.length, "depth": self.depth,
             "present": self.present, "zero": self.zero, "data": self.data}
        if self.offset is not None:
            d["offset"] = self.offset
        return d


class Image:
    """A disk: a guest view of ``size`` bytes over one layer and its backing chain.

    Subclasses supply ``_read`` (a range inside the disk) and ``block_status`` (this
    layer's allocation); writable ones override the writing methods, which refuse
    here.  An image closes its own backend on ``close()`` unless it was opened on a
    store the caller handed in (``owns_backend`` False: the caller closes that).
    """

    format: str = "?"
    filename: str
    size: int
    backing: "Image | None" = None
    be: "Backend"
    owns_backend: bool = True
    closed: bool = False

    # -- reading -------------------------------------------------------------
    def readinto(self, buf, offset: int) -> int:
        """Read into ``buf`` from guest ``offset``; short only at the end of the disk."""
        if offset < 0:
            raise InvalidOptionError(f"negative offset {offset}")
        if self.closed:
            raise ClosedImageError("I/O operation on closed image")
        mv = memoryview(buf).cast("B")
        n = max(0, min(len(mv), self.size - offset))
        if n:
            self._read(mv[:n], offset)
        return n

    def pread(self, n: int, offset: int) -> bytes:
        if n < 0:
            raise InvalidOptionError(f"negative length {n}")
        n = max(0, min(n, self.size - offset)) if offset >= 0 else n
        if n >= _SCRATCH_MIN:
            # Large reads go through a page-aligned buffer, reused per thread up to
            # 4 MiB: a fresh bytearray is zeroed and page-faulted on every call (1 MiB
            # reads ran 5x slower that way), and the kernel copies faster into
            # aligned memory.
            buf = getattr(_scratch, "buf", None)
            if buf is None or len(buf) < n:
                from .atomic import io_buffer
                buf = io_buffer(max(n, 1 << 20))
                if n <= _SCRATCH_MAX:
                    _scratch.buf = buf
            got = self.readinto(buf[:n], offset)
            return bytes(buf[:got])
        buf = bytearray(n)
        got = self.readinto(buf, offset)
        return bytes(buf) if got == n else bytes(buf[:got])

    def _read(self, mv: memoryview, offset: int) -> None:  # pragma: no cover - abstract
        raise NotImplementedError

    def read_plan(self, offset: int, n: int, buffer=None) -> list[tuple[int, int, int, int, int]]:
        """How to produce guest bytes [offset, offset + n) without copying what lies
        verbatim in a file: (guest offset, length, kind, fd, host offset) pieces in
        order, ``kind`` one of READ_ZEROS, READ_FILE (the bytes are those of file
        descriptor ``fd`` from ``host``, zeros past its end: a server may send them
        with ``sendfile``) or READ_COPY (bytes that must be read); adjacent pieces of
        a kind merged.  With ``buffer`` (a callable returning a writable buffer of at
        least the bytes asked for), copy pieces are read here, packed into the one
        buffer it returns, and their ``fd`` says where each starts in it.  Only
        images that never change under the caller (read-only ones) hand out file
        pieces; the range must lie inside the disk."""
        plan = [(offset, n, READ_COPY, -1, 0)] if n > 0 else []
        if buffer is not None:
            self._fill_copies(plan, buffer)
        return plan

    def _fill_copies(self, plan: list, buffer, read=None) -> None:
        """Read the copy pieces of ``plan`` into ``buffer(total)``, packed (``read``:
        how to read one piece, default ``readinto``)."""
        total = sum(p[1] for p in plan if p[2] == READ_COPY)
        if not total:
            return
        buf = memoryview(buffer(total)).cast("B")
        pos = 0
        for i, (a, ln, kind, _fd, _host) in enumerate(plan):
            if kind != READ_COPY:
                continue
            view = buf[pos:pos + ln]
            if read is None or not read(view, a):
                got = self.readinto(view, a)
                if got != ln:
                    raise OSError(5, f"short read at {a}: {got} of {ln} bytes")
            plan[i] = (a, ln, READ_COPY, pos, 0)
            pos += ln

    def _read_clipped(self, mv: memoryview, offset: int) -> None:
        """Read a range that may extend past this image's end (zeros there)."""
        n = max(0, min(len(mv), self.size - offset))
        if n:
            self._read(mv[:n], offset)
        if n < len(mv):
            zero_fill(mv[n:])

    # -- allocation ------------------------------------------------------------
    def block_status(self, start: int, end: int) -> Iterator[tuple[int, int, int, int]]:
        """This layer alone: (offset, length, flags, host) covering [start, end)."""
        raise NotImplementedError  # pragma: no cover

    def chain_status(self, start: int, end: int, depth: int = 0):
        """The whole chain over [start, end), run by run (``extents`` merges them):
        (offset, length, depth, flags, host), ``depth`` counting from this layer's."""
        for a, n, flags, host in self.block_status(start, end):
            if flags & (ST_DATA | ST_ZERO):
                yield a, n, depth, flags | ST_ALLOCATED, host
                continue
            bk = self.backing
            if bk is None:
                yield a, n, depth, flags | ST_ZERO, host
                continue
            mid = max(a, min(a + n, bk.size))
            if a < mid:
                yield from bk.chain_status(a, mid, depth + 1)
            if mid < a + n:
                yield mid, a + n - mid, depth, flags | ST_ZERO, host + (mid - a)

    def extents(self, start: int = 0, end: int | None = None) -> Iterator[Extent]:
        """Allocation runs over the whole chain, merged exactly as ``qemu-img map`` does."""
        if start < 0:
            raise InvalidOptionError(f"negative start offset {start}")
        if self.closed:
            raise ClosedImageError("I/O operation on closed image")
        if end is None or end > self.size:
            end = self.size
        cur: list | None = None
        for a, n, depth, flags, host in self.chain_status(start, end):
            offset = host if flags & ST_OFFSET_VALID else None
            present = bool(flags & ST_ALLOCATED)
            zero = bool(flags & ST_ZERO)
            data = bool(flags & ST_DATA)
            if cur is not None and cur[0] + cur[1] == a and cur[2] == depth and \
                    cur[3] == present and cur[4] == zero and cur[5] == data and \
                    ((cur[6] is None and offset is None) or
                     (cur[6] is not None and offset is not None and cur[6] + cur[1] == offset)):
                cur[1] += n
                continue
            if cur is not None:
                yield Extent(*cur)
            cur = [a, n, depth, present, zero, data, offset]
        if cur is not None:
            yield Extent(*cur)
        elif start >= end:
            # qemu-img map prints one empty entry for an empty range; so do we.
            yield Extent(start, 0, 0, False, False, False, None)

    # -- description -----------------------------------------------------------
    def info(self) -> dict:  # pragma: no cover - abstract
        raise NotImplementedError

    def backing_chain(self) -> list["Image"]:
        out = []
        img: Image | None = self
        while img is not None:
            out.append(img)
            img = img.backing
        return out

    # -- writing: read-only unless opened with mode "r+" -----------------------------
    writable = False

    def pwrite(self, data, offset: int) -> int:
        raise ReadOnlyError(f"image '{self.filename}' is open read-only")

    def write_zeroes(self, offset: int, n: int) -> None:
        raise ReadOnlyError(f"image '{self.filename}' is open read-only")

    def discard(self, offset: int, n: int) -> None:
        raise ReadOnlyError(f"image '{self.filename}' is open read-only")

    def flush(self) -> None:
        """Nothing to make durable in a read-only image."""

    def ignore_flushes(self) -> None:
        """QEMU's ``cache=unsafe`` (``-t unsafe``): from now on nothing is synced to
        disk; a crash may lose or tear what was written.  Nothing to do when read-only."""
        return None

    def _check_resize(self, new_size: int, *, shrink: bool, preallocation: str) -> None:
        """The rules every format's resize shares (qemu-img's messages)."""
        if new_size < self.size:
            if not shrink:
                raise Qcow2Error("Use the --shrink option to perform a shrink operation.")
            if preallocation != "off":
                raise Qcow2Error("Preallocation can't be used for shrinking an image")

    def _actual_size(self) -> int:
        """Bytes the image's store occupies (qemu-img info's actual-size; -1 unknown)."""
        try:
            return self.be.allocated_size()
        except OSError:
            return -1

    def _close_backend(self) -> None:
        if self.owns_backend:
            self.be.close()

    # -- file object -------------------------------------------------------------
    def file(self) -> "ImageFile":
        return ImageFile(self)

    # -- lifetime -----------------------------------------------------------------
    def close(self) -> None:
        self.closed = True
        if self.backing is not None:
            self.backing.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


# ---------------------------------------------------------------------------
# raw
# ---------------------------------------------------------------------------

class RawImage(Image):
    """A raw image: the store's bytes are the guest's, holes read as zeros."""

    format = "raw"

    def __init__(self, backend: Backend, filename: str, *, writable: bool = False,
                 owns_backend: bool = True):
        self.be = backend
        self.filename = filename
        self._no_flush = False
        self.writable = writable
        self.owns_backend = owns_backend
        # QEMU sizes block nodes in 512-byte sectors, rounding a raw file's length up.
        self.file_size = backend.size()
        self.size = (self.file_size + 511) & ~511

    def _read(self, mv, offset):
        got = self.be.readinto(mv, offset)
        if got < len(mv):
            zero_fill(mv[got:])

    def read_plan(self, offset, n, buffer=None):
        fd = getattr(self.be, "fd", None)
        if self.writable or not isinstance(fd, int) or n <= 0:
            return super().read_plan(offset, n, buffer)
        out: list = []
        for a, ln, flags, host in self.block_status(offset, offset + n):
            add_piece(out, a, ln, READ_FILE if flags & ST_DATA else READ_ZEROS, fd, host)
        return out

    def block_status(self, start, end):
        pos = start
        for off, n in self.be.data_regions(start, min(end, self.file_size)):
            if off > pos:
                yield pos, off - pos, ST_ZERO | ST_OFFSET_VALID, pos
            stop = min(off + n, end)
            yield off, stop - off, ST_DATA | ST_OFFSET_VALID, off
            pos = stop
        if pos < end:
            yield pos, end - pos, ST_ZERO | ST_OFFSET_VALID, pos

    # -- writing (mode "r+") ------------------------------------------------------
    def _check_write(self, offset: int, n: int) -> None:
        if not self.writable:
            raise ReadOnlyError(f"image '{self.filename}' is open read-only")
        if offset < 0 or n < 0 or offset + n > self.size:
            raise InvalidOptionError(f"range {offset}+{n} is outside the disk (size {self.size})")

    def pwrite(self, data, offset: int) -> int:
        mv = memoryview(data).cast("B")
        self._check_write(offset, len(mv))
        return self.be.pwrite(mv, offset)

    def write_zeroes(self, offset: int, n: int) -> None:
        self._check_write(offset, n)
        if n and self.be.can_punch_holes:
            try:
                self.be.punch_hole(offset, n)
                return
            except OSError:
                pass
        self.be.write_zeros(offset, n)

    def discard(self, offset: int, n: int) -> None:
        self.write_zeroes(offset, n)

    def flush(self) -> None:
        if self.writable and not self._no_flush:
            self.be.flush()

    def ignore_flushes(self) -> None:
        self._no_flush = True

    def resize(self, new_size: int, *, shrink: bool = False, preallocation: str = "off") -> None:
        """Grow or shrink the store (qemu-img resize): ``preallocation`` "falloc"
        reserves the new space, "full" writes zeros there; "metadata" has no meaning
        for raw and is refused."""
        if not self.writable:
            raise ReadOnlyError(f"image '{self.filename}' is open read-only")
        if preallocation == "metadata":
            raise InvalidOptionError("Unsupported preallocation mode: metadata")
        be = self.be
        old = be.size()
        if new_size > old and preallocation not in be.preallocation_modes:
            raise InvalidOptionError(f"Unsupported preallocation mode '{preallocation}'")
        if new_size < old:
            self._check_resize(new_size, shrink=shrink, preallocation=preallocation)
            be.truncate(new_size)
        elif new_size > old:
            be.truncate(new_size)
            if preallocation == "falloc":
                be.allocate(old, new_size - old)
            elif preallocation == "full":
                be.write_zeros(old, new_size - old)
        be.flush()
        self.file_size = new_size
        self.size = (new_size + 511) & ~511

    def info(self) -> dict:
        return {"virtual-size": self.size, "filename": self.filename, "format": "raw",
                "actual-size": self._actual_size(), "dirty-flag": False}

    def close(self):
        self.closed = True
        self._close_backend()


# ---------------------------------------------------------------------------
# file object view
# ---------------------------------------------------------------------------

class ImageFile(io.RawIOBase):
    """A read-only, seekable file object over an image's guest view."""

    def __init__(self, image: Image):
        super().__init__()
        self._img = image
        self._pos = 0

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def readinto(self, b) -> int:
        if self.closed:
            raise ClosedImageError("I/O operation on closed file")
        n = self._img.readinto(b, self._pos)
        self._pos += n
        return n

    def read(self, size: int = -1) -> bytes:
        if size is None or size < 0:
            return self.readall()
        if self.closed:
            raise ClosedImageError("I/O operation on closed file")
        data = self._img.pread(size, self._pos)    # (RawIOBase's read zeroes a new
        self._pos += len(data)                      # bytearray per call, then copies)
        return data

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        if whence == io.SEEK_SET:
            pos = offset
        elif whence == io.SEEK_CUR:
            pos = self._pos + offset
        elif whence == io.SEEK_END:
            pos = self._img.size + offset
        else:
            raise InvalidOptionError(f"invalid whence {whence}")
        if pos < 0:
            raise InvalidOptionError("negative seek position")
        self._pos = pos
        return pos

    def tell(self) -> int:
        return self._pos

    @property
    def size(self) -> int:
        return self._img.size


__all__ = ["Image", "RawImage", "Extent", "ImageFile", "zero_fill", "add_piece", "ST_DATA",
           "ST_ZERO", "ST_OFFSET_VALID", "ST_ALLOCATED", "READ_ZEROS", "READ_FILE", "READ_COPY"]
