"""Fetching an image into the base cache, once per image, safely.

``fetch_base(opts, image_id, source)`` leaves the image at
``<instances_path>/<subdirectory_name>/<sha1(image_id)>`` and returns its path and
format.  The per-image lock (``locks/nova-<sha1>``) makes concurrent requests for one
image fetch it once; the others find the finished file.

Sources: a local path or an http(s) URL (streamed).  The image is checked in untrusted
mode -- a backing file, an external data file, or a format other than the declared one
refuses it -- and an optional ``sha256:HEX`` checksum is verified before anything is
placed.  With ``force_raw_images`` a qcow2 image becomes a sparse raw base.

Passes:
  * raw over http: one pass -- streamed straight into the (anonymous, ``O_TMPFILE``)
    output, zero blocks left as holes, hashed on the way; linked in place after the
    checksum matched and the data is fsynced.
  * qcow2 over http: the body is written to a temporary ``.<name>.<rand>.part`` next
    to the base (a qcow2 cannot be decoded from the stream alone: its tables point
    anywhere in the file).  With force_raw and a header that names no other file, it is
    converted while it arrives (:mod:`qcow2.compute.stream`: one pass, the untrusted
    open of the complete file before anything is placed; a flat root disk can be
    written in the same pass, ``copy_to``); otherwise it is checked, then converted
    (force_raw) or renamed into place.  The temporary file is removed on every path,
    and stale ones left by a killed process are removed under the lock before the
    next attempt.
  * a local source: read in place (untrusted), converted or sparse-copied straight into
    the base: no temporary copy.
Free space is checked first against what the result needs (``qcow2.measure`` for a
conversion, the allocated size for a copy, Content-Length for a download -- for a qcow2
that becomes a raw base, plus room for the raw data, up to its virtual size).  While a
download streams, free space is looked at again every ``STREAM_CHECK_EVERY`` bytes (one
``statvfs``): with a known length it must still hold the rest of the body (and the raw
base to come); without one (chunked transfer encoding) it must hold the next stretch plus
``STREAM_RESERVE`` and, for a qcow2 that becomes raw, as much raw data as has arrived (up
to the virtual size the header gave).  Otherwise the download stops with
:class:`InsufficientSpaceError`, leaving nothing behind.  A qcow2 converted while it
downloads has its raw size unknown until its tables arrive: free space is looked at
again every ``stream.ROOM_EVERY`` bytes of raw data written, the same way.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import re

from .. import constants as C
from ..atomic import AtomicOutput, replace
from ..errors import Qcow2Error
from ..paths import is_temp_for, make_temp
from .errors import (ChecksumError, ComputeError, DownloadError, ImageFormatMismatchError,
                     InsufficientSpaceError)
from .locks import base_name, image_lock
from .stream import can_stream, convert_streaming

CHUNK = 1 << 20
BLOCK = 4096
TIMEOUT = 60.0
STREAM_CHECK_EVERY = 64 << 20     # bytes of body between two free-space checks
STREAM_RESERVE = 64 << 20         # left free on top of the next stretch (unknown length)


def parse_checksum(checksum: str | None) -> str | None:
    """``sha256:HEX`` -> HEX (lower case); None stays None."""
    if checksum is None:
        return None
    m = re.fullmatch(r"sha256:([0-9a-fA-F]{64})", checksum.strip())
    if not m:
        raise ComputeError(f"invalid checksum {checksum!r} (expected sha256:<64 hex digits>)")
    return m.group(1).lower()


def is_url(source: str) -> bool:
    return source.startswith(("http://", "https://"))


def clean_stale_temps(base_dir: str, name: str) -> list[str]:
    """Remove temporary files of ``name`` left by a killed fetch (call under its lock)."""
    removed = []
    try:
        entries = os.listdir(base_dir)
    except FileNotFoundError:
        return removed
    for entry in entries:
        if is_temp_for(entry, name):
            try:
                os.unlink(os.path.join(base_dir, entry))
                removed.append(entry)
            except FileNotFoundError:
                pass
    return removed


def free_space(path: str) -> int:
    st = os.statvfs(path)
    return st.f_bavail * st.f_frsize


def check_space(path: str, need: int, what: str) -> None:
    have = free_space(path)
    if need > have:
        raise InsufficientSpaceError(f"not enough space in {path} for {what}: "
                                     f"{need} bytes needed, {have} available")


def probe_format(head: bytes) -> str:
    return "qcow2" if head[:len(C.MAGIC)] == C.MAGIC else "raw"


@contextlib.contextmanager
def locked_base(opts, name: str):
    """Hold the lock of the cache file ``name`` (in a cache directory that exists, its
    stale temporaries removed) and give its path: whoever holds it makes the file."""
    base_dir = opts.base_dir
    os.makedirs(base_dir, exist_ok=True)
    with image_lock(opts.lock_dir, name):
        clean_stale_temps(base_dir, name)
        yield os.path.join(base_dir, name)


def fetch_base(opts, image_id: str, source: str, *, disk_format: str | None = None,
               checksum: str | None = None, progress=None, name: str | None = None,
               timeout: float = TIMEOUT, copy_to: str | None = None) -> tuple[str, str]:
    """Make sure the base file of ``image_id`` is in the cache; (path, format).

    ``disk_format`` is the declared format ("qcow2" or "raw"; None accepts either);
    ``checksum`` "sha256:HEX"; ``progress`` a callable taking a percentage;
    ``copy_to``: a new file that gets a copy of a raw base converted now, in the same
    pass (a flat instance disk); it is left alone (and not made) otherwise.
    """
    if disk_format not in (None, "raw", "qcow2"):
        raise ComputeError(f"unsupported disk format {disk_format!r} (raw or qcow2)")
    want = parse_checksum(checksum)
    with locked_base(opts, name or base_name(image_id)) as path:
        if os.path.exists(path):
            try:
                os.utime(path)          # used again: its age restarts, as nova's touch
            except OSError:
                pass
            return path, file_format(path)
        copies = () if copy_to is None else (copy_to,)
        if is_url(source):
            fmt = _fetch_url(opts, source, path, disk_format, want, progress, timeout,
                             copies)
        else:
            fmt = _fetch_local(opts, source, path, disk_format, want, progress, copies)
    return path, fmt


def file_format(path: str) -> str:
    with open(path, "rb") as f:
        return probe_format(f.read(4))


def refuse_format(actual: str, declared: str | None, source: str) -> None:
    if declared is not None and actual != declared:
        raise ImageFormatMismatchError(f"image {source} is {actual}, but was declared "
                                       f"{declared}: refused")


def inspect_source(path: str, declared: str | None, source: str) -> str:
    """Open untrusted: refuses backing/data files; returns the probed format."""
    import qcow2
    with qcow2.open(path, untrusted=True) as img:
        fmt = img.format
    refuse_format(fmt, declared, source)
    return fmt


def sha256_file(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while True:
            b = f.read(CHUNK)
            if not b:
                return h.hexdigest()
            h.update(b)


def verify_checksum(got: str | None, want: str | None, source: str) -> None:
    if want is not None and got != want:
        raise ChecksumError(f"checksum mismatch for {source}: expected sha256:{want}, "
                            f"got sha256:{got}")


def _place(opts, src: str, fmt: str, dst: str, progress, copies=()) -> str:
    """Put the checked image ``src`` at ``dst`` (raw: sparse copy; qcow2: converted
    with force_raw_images, else sparse copy).  Returns the base's format."""
    import qcow2
    base_dir = os.path.dirname(dst)
    if fmt == "qcow2" and opts.force_raw_images:
        need = qcow2.measure(src, fmt="qcow2", out_format="raw")["required"]
        check_space(base_dir, need, f"the raw base of {src}")
        # writeback, then one fsync before the rename (convert's default): durable as
        # nova's -t none, and faster than O_DIRECT writes here (measured: 0.85x)
        qcow2.convert(src, dst, src_format="qcow2", out_format="raw", untrusted=True,
                      progress=progress, copies=copies)
        return "raw"
    st = os.stat(src)
    check_space(base_dir, min(st.st_size, st.st_blocks * 512), f"a copy of {src}")
    qcow2.sparse_copy(src, dst, progress=progress)
    return fmt


def _fetch_local(opts, source, dst, declared, want, progress, copies=()) -> str:
    if not os.path.exists(source):
        raise ComputeError(f"image source {source} does not exist")
    fmt = inspect_source(source, declared, source)
    if want is not None:
        verify_checksum(sha256_file(source), want, source)
    return _place(opts, source, fmt, dst, progress, copies)


# -- http ------------------------------------------------------------------------------

def open_url(url: str, timeout: float):
    import urllib.error                 # (only for downloads: ~55 ms of every start)
    import urllib.request
    try:
        resp = urllib.request.urlopen(url, timeout=timeout)
    except urllib.error.HTTPError as exc:
        raise DownloadError(f"cannot fetch {url}: HTTP {exc.code} {exc.reason}") from None
    except (urllib.error.URLError, OSError) as exc:
        reason = getattr(exc, "reason", exc)
        raise DownloadError(f"cannot fetch {url}: {reason}") from None
    length = resp.headers.get("Content-Length")
    return resp, (int(length) if length and length.isdigit() else None)


def read_body(resp, url: str, n: int) -> bytes:
    try:
        return resp.read(n)
    except Exception as exc:  # noqa: BLE001 - http.client raises several kinds
        raise DownloadError(f"download of {url} failed: {type(exc).__name__}: {exc}") from None


class SpaceWatch:
    """Free-space checks while a body streams into ``directory`` (see the module doc).

    ``raw_cap``: the body is a qcow2 that becomes a raw base afterwards, whose data can
    take up to ``raw_cap`` bytes (its virtual size); None when nothing follows.
    """

    def __init__(self, directory: str, url: str, length: int | None, raw_cap: int | None):
        self.dir, self.url, self.length, self.raw_cap = directory, url, length, raw_cap
        self.every = STREAM_CHECK_EVERY
        self.reserve = STREAM_RESERVE
        self.next_at = 0

    def later(self, pos: int) -> int:
        """Room the raw base will need after the download, as far as known at ``pos``."""
        if self.raw_cap is None:
            return 0
        return min(self.raw_cap, self.length if self.length is not None else pos)

    def __call__(self, pos: int) -> None:
        if pos < self.next_at:
            return
        self.next_at = pos + self.every
        if self.length is not None:
            body, what = max(0, self.length - pos), f"the remaining {self.length - pos} bytes"
        else:
            body = self.every + self.reserve
            what = f"the next {self.every} bytes and a reserve of {self.reserve} bytes"
        later = self.later(pos)
        if later:
            what += f" and {later} bytes for the raw base"
        have = free_space(self.dir)
        if have < body + later:
            raise InsufficientSpaceError(
                f"not enough space in {self.dir} to go on with the download of {self.url} "
                f"after {pos} bytes: {have} bytes available, {body + later} needed ({what})")


def _qcow2_virtual_size(head: bytes) -> int | None:
    """The virtual size the first bytes of a qcow2 declare (an estimate of the raw data
    to come while the body streams: the image is checked once it has arrived)."""
    end = C.HDR_SIZE + 8
    return int.from_bytes(head[C.HDR_SIZE:end], "big") if len(head) >= end else None


def stream_body(resp, url, length, head: bytes, write, hasher, progress, watch=None) -> int:
    """Feed the body (``head`` already read) to ``write(data, offset)``; returns its size.
    ``watch(pos)`` is called before each write (the free-space checks)."""
    pos = 0
    buf = head
    while True:
        if buf:
            if watch is not None:
                watch(pos)
            if hasher is not None:
                hasher.update(buf)
            write(buf, pos)
            pos += len(buf)
            if progress is not None and length:
                progress(min(100.0, 100.0 * pos / length))
        buf = read_body(resp, url, CHUNK)
        if not buf:
            break
    if length is not None and pos != length:
        raise DownloadError(f"download of {url} ended after {pos} of {length} bytes")
    return pos


def write_sparse(put, data: bytes, pos: int) -> None:
    """``put(view, offset)`` the runs of ``data`` (to go at ``pos``) that are not
    all-zero ``BLOCK``-aligned blocks: a new output gets holes for the rest."""
    n = len(data)
    if data.count(0) == n:
        return
    mv = memoryview(data)
    start = None
    i = 0
    while i < n:
        j = min(n, (pos + i) // BLOCK * BLOCK + BLOCK - pos)
        if data.count(0, i, j) == j - i:
            if start is not None:
                put(mv[start:i], pos + start)
                start = None
        elif start is None:
            start = i
        i = j
    if start is not None:
        put(mv[start:n], pos + start)


def _pwrite_all(fd: int, mv, offset: int) -> None:
    done = 0
    while done < len(mv):
        done += os.pwrite(fd, mv[done:], offset + done)


def _room_for_raw(base_dir: str, url: str, written: int, outputs: int) -> None:
    """While a qcow2 is converted as it downloads (its raw size unknown until its
    tables have arrived): room for the next stretch of raw data in every output."""
    from .stream import ROOM_EVERY
    need = outputs * ROOM_EVERY + STREAM_RESERVE
    have = free_space(base_dir)
    if have < need:
        raise InsufficientSpaceError(
            f"not enough space in {base_dir} for the raw base of {url} after {written} bytes "
            f"of data: {have} bytes available, {need} needed")


def _fetch_url(opts, url, dst, declared, want, progress, timeout, copies=()) -> str:
    resp, length = open_url(url, timeout)
    base_dir = os.path.dirname(dst)
    try:
        if length is not None:
            check_space(base_dir, length, f"the download of {url}")
        head = read_body(resp, url, CHUNK)
        fmt = probe_format(head)
        refuse_format(fmt, declared, url)
        raw_cap = None
        if fmt == "qcow2" and opts.force_raw_images:
            raw_cap = _qcow2_virtual_size(head)
        watch = SpaceWatch(base_dir, url, length, raw_cap)
        hasher = hashlib.sha256() if want is not None else None

        def digest() -> str | None:
            return None if hasher is None else hasher.hexdigest()
        if fmt == "raw":
            # one pass: the body goes straight into the anonymous output file
            with AtomicOutput(dst, 0o644) as out:
                size = stream_body(resp, url, length, head, lambda b, p: write_sparse(
                    lambda v, o: _pwrite_all(out.fd, v, o), b, p),
                               hasher, progress, watch)
                os.ftruncate(out.fd, size)
                verify_checksum(digest(), want, url)
                out.commit(sync=True)
            return "raw"
        fd, tmp = make_temp(dst, base_dir)
        try:
            if raw_cap is not None and can_stream(head, length):
                # decoded while it downloads (see qcow2.compute.stream)
                def after_body() -> None:
                    verify_checksum(digest(), want, url)
                    inspect_source(tmp, declared or "qcow2", url)
                try:
                    convert_streaming(resp, url, length, head, fd, tmp, dst, copies=copies,
                                      stream_body=lambda write: stream_body(
                                          resp, url, length, head, write, hasher, progress,
                                          watch),
                                      after_body=after_body,
                                      room=lambda n: _room_for_raw(base_dir, url, n,
                                                                   1 + len(copies)))
                finally:
                    os.close(fd)
                return "raw"
            try:
                stream_body(resp, url, length, head, lambda b, p: os.pwrite(fd, b, p) and None,
                        hasher, progress, watch)
            finally:
                os.close(fd)
            verify_checksum(digest(), want, url)
            inspect_source(tmp, declared or "qcow2", url)
            if opts.force_raw_images:
                return _place(opts, tmp, "qcow2", dst, None, copies)
            os.chmod(tmp, 0o644)
            with open(tmp, "rb+") as f:
                os.fsync(f.fileno())
            replace(tmp, dst)           # (a failed directory sync removes dst again)
            return "qcow2"
        finally:
            try:
                os.unlink(tmp)
            except FileNotFoundError:
                pass
    except Qcow2Error:
        raise
    finally:
        resp.close()
