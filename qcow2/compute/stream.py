"""Decoding a qcow2 download while it streams (a base cache fill with
``force_raw_images``): one pass, download and conversion in parallel.

A qcow2 cannot be converted from the stream itself: its tables point anywhere in the
file.  So the body still goes to the temporary ``.part`` file, written by a download
thread, while the conversion reads the same file through :class:`GrowingFile`, whose
reads wait until the bytes they ask for have arrived.  An image written by qemu-img
keeps its header, L1 table and first L2 table at the front and its data in guest
order, so the conversion follows the download a few MiB behind instead of starting
after it.

The untrusted guarantees are kept by ordering, not weakened:

* before anything is converted, the header (the first bytes) must show an image that
  opens no other file and needs no key: no backing file, no external data file, no
  encryption, no dirty or corrupt bit, a known version, a virtual size within the
  untrusted limits, a known body length; otherwise the old two-step path runs
  (download, then the untrusted open, then the conversion);
* the conversion writes only into anonymous outputs (``O_TMPFILE``: nothing is
  visible, a kill leaves nothing);
* once the body is complete (and its checksum matches) the untrusted open runs on the
  whole ``.part`` -- every metadata structure scanned, exactly as before -- and only
  if it accepts the image are the outputs linked into place.  The bytes it scanned
  are the bytes the conversion read (a read waits until its whole range has arrived,
  and nothing rewrites it), so an accepted image gives the output the old path gives.

A hostile image meanwhile meets the ordinary reader, which answers malformed tables
with :mod:`qcow2.errors` (bounded memory, no hang: a read past the declared length
returns short, a failed download wakes every waiting read with its error).  What the
scan would refuse (tables pointing many times at the same clusters) could make the
output far larger than the body: before the scan's verdict the data written is
bounded (``SPECULATIVE_FACTOR`` x the body + ``SPECULATIVE_BASE``), past that the
conversion waits for the verdict.
"""

from __future__ import annotations

import os
import threading

from .. import constants as C
from ..backends import Backend
from .errors import DownloadError

_SAFE_INCOMPAT = C.INCOMPAT_COMPRESSION | C.INCOMPAT_EXTL2
#: data written before the untrusted scan has accepted the image: at most this many
#: times the body's length, plus SPECULATIVE_BASE (a real image's data is a few times
#: its compressed size; past the bound the conversion waits for the scan)
SPECULATIVE_FACTOR = 16
SPECULATIVE_BASE = 256 << 20
ROOM_EVERY = 64 << 20           # bytes of data written between two free-space checks


def _u(head: bytes, off: int, n: int) -> int:
    return int.from_bytes(head[off:off + n], "big")


def can_stream(head: bytes, length: int | None) -> bool:
    """Whether the qcow2 whose first bytes are ``head`` may be converted as it arrives
    (see the module doc); False sends it the old way, where the untrusted open
    decides."""
    from ..untrusted import resolve
    if length is None or len(head) < 0x68 or head[:4] != C.MAGIC:
        return False
    version = _u(head, 4, 4)
    if version not in (2, 3) or _u(head, 0x08, 8) or _u(head, C.HDR_CRYPT_METHOD, 4):
        return False
    if version == 3 and _u(head, C.HDR_INCOMPATIBLE_FEATURES, 8) & ~_SAFE_INCOMPAT:
        return False
    return 0 < _u(head, C.HDR_SIZE, 8) <= resolve(None).max_virtual_size


class Arrival:
    """How much of the body is in the file; reads wait on it."""

    def __init__(self, length: int):
        self.length = length
        self.pos = 0
        self.done = False
        self.error: BaseException | None = None
        self.cancelled = False
        self.cond = threading.Condition()

    def advance(self, pos: int) -> None:
        with self.cond:
            if self.cancelled:
                raise _Cancelled()
            self.pos = pos
            self.cond.notify_all()

    def finish(self, error: BaseException | None = None) -> None:
        with self.cond:
            self.done = True
            self.error = error
            self.cond.notify_all()

    def cancel(self) -> None:
        with self.cond:
            self.cancelled = True
            self.cond.notify_all()

    def wait_for(self, end: int) -> None:
        with self.cond:
            while self.pos < end and not self.done and not self.cancelled:
                self.cond.wait()
            if self.error is not None:
                raise DownloadError(f"the download stopped: {self.error}")
            if self.cancelled:
                raise DownloadError("the download was cancelled")


class _Cancelled(Exception):
    """The conversion failed: the download stops."""


class GrowingFile(Backend):
    """The ``.part`` file as it is written: its size is the body's length; a read
    returns once its range has arrived (short past the end, as a file's).  It has no
    ``fd`` attribute on purpose: nothing may copy from the file behind its back
    (``copy_file_range`` would not wait)."""

    def __init__(self, fd: int, name: str, arrival: Arrival):
        self._fd = fd
        self.name = name
        self.arrival = arrival

    def identity(self):
        st = os.fstat(self._fd)
        return ("file", st.st_dev, st.st_ino)

    def size(self) -> int:
        return self.arrival.length

    def readinto(self, buf, offset: int) -> int:
        mv = memoryview(buf).cast("B")
        n = len(mv)
        self.arrival.wait_for(min(offset + n, self.arrival.length))
        total = 0
        while total < n:
            got = os.preadv(self._fd, [mv[total:]], offset + total)
            if got == 0:
                break
            total += got
        return total


def convert_streaming(resp, url: str, length: int, head: bytes, part_fd: int,
                      part_path: str, dst: str, *, stream_body, after_body,
                      copies=(), room=None) -> None:
    """Download the rest of the body (``stream_body(write)``, in a thread) into
    ``part_fd`` while converting it into the raw file ``dst`` (and ``copies``).
    ``after_body()`` runs once the body is complete (in the download thread, while the
    conversion finishes), and must succeed before anything is linked in place: the
    checksum and the untrusted open of the whole file; an exception there discards
    the outputs.  ``room(written)`` is called every ``ROOM_EVERY`` bytes of data
    written (the free-space check: a stream of unknown raw size).  Once every read of
    the body is over, its pages are freed in the background while the outputs are
    flushed (the caller removes the file afterwards)."""
    import qcow2
    arrival = Arrival(length)

    def write(data, pos: int) -> None:
        mv = memoryview(data)
        done = 0
        while done < len(mv):
            done += os.pwrite(part_fd, mv[done:], pos + done)
        arrival.advance(pos + len(mv))

    checked: list = []

    def download() -> None:
        try:
            stream_body(write)
        except BaseException as exc:  # noqa: BLE001 - handed to the waiting side
            arrival.finish(exc)
            return
        arrival.finish()
        # the checks of the complete body run here, while the conversion finishes
        try:
            after_body()
        except BaseException as exc:  # noqa: BLE001 - raised by before_commit
            checked.append(exc)
        else:
            checked.append(None)

    t = threading.Thread(target=download, name="qcow2-download", daemon=True)
    t.start()

    budget = [SPECULATIVE_FACTOR * length + SPECULATIVE_BASE]
    budget_lock = threading.Lock()
    written = [0, ROOM_EVERY]                   # data so far, next free-space check

    def on_data(n: int) -> None:
        """Before the untrusted scan has accepted the image, the data written is
        bounded (a hostile image's tables could point many times at the same bytes);
        past the bound the conversion waits for the scan's verdict."""
        with budget_lock:
            budget[0] -= n
            written[0] += n
            check = room is not None and written[0] >= written[1]
            if check:
                written[1] = written[0] + ROOM_EVERY
            ok = budget[0] >= 0
        if check:
            room(written[0])
        if ok:
            return
        t.join()
        if arrival.error is not None:
            raise DownloadError(f"the download stopped: {arrival.error}")
        if not checked or checked[0] is not None:
            raise DownloadError("the image was refused")   # (before_commit says why)

    released: list[threading.Thread] = []

    def before_commit() -> None:
        t.join()
        # every read of the body is over (the conversion has written every byte, the
        # scan has ended): its pages are freed in the background while the outputs
        # are flushed, not after (218 MiB of page cache: 10-100 ms of a spawn)
        r = threading.Thread(target=_drop_body, args=(part_fd,), name="qcow2-drop-body",
                             daemon=True)
        r.start()
        released.append(r)
        if arrival.error is not None:
            raise arrival.error
        if not checked:
            raise DownloadError("the checks of the download did not run")
        if checked[0] is not None:
            raise checked[0]

    try:
        qcow2.convert([GrowingFile(part_fd, part_path, arrival)], dst, src_format="qcow2",
                      out_format="raw", copies=copies, before_commit=before_commit,
                      on_data=on_data)
    except BaseException:
        arrival.cancel()
        t.join()
        err = arrival.error
        if err is not None and not isinstance(err, _Cancelled):
            raise err from None        # the download's own failure comes first
        raise
    finally:
        for r in released:
            r.join()
        resp.close()


def _drop_body(fd: int) -> None:
    """Free the pages of the temporary body file (it is removed afterwards anyway)."""
    try:
        os.ftruncate(fd, 0)
    except OSError:
        pass


__all__ = ["can_stream", "convert_streaming", "GrowingFile", "Arrival"]
