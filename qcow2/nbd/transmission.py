"""The transmission phase of one connection: requests in, replies out.

A few worker threads per connection take turns reading a request (and a WRITE's
payload) and serve what they read while the next one reads (the engine's C kernels
release the GIL, so reads of compressed clusters decode in parallel); replies go out
whole under the channel's send lock.  A worker reading a READ also takes the adjacent
READs the client has already sent (up to 1 MiB in all) and serves them with one read
plan and one ``sendmsg``, each still with its own reply.  Memory is bounded per
connection: a request carries at most 32 MiB (as qemu-nbd), and the reader stops
taking requests while the payloads and read buffers of requests in flight would pass
``budget`` bytes.

A request that breaks the framing (bad magic, a WRITE longer than 32 MiB, whose
payload cannot be skipped safely) ends the connection with a log line; a request
that is well framed but wrong (out of range, unknown command or flag, a write to a
read-only export) gets an error reply and the connection goes on.  However the
connection ends (DISC, a vanished client, a protocol error), requests in flight are
finished and a writable export is flushed before the socket is closed.
"""

from __future__ import annotations

import logging
import threading

from ..atomic import io_buffer
from ..errors import Qcow2Error, UnsupportedFeatureError
from ..image import READ_COPY, READ_FILE, READ_ZEROS
from ..reader import serial_reads
from . import protocol as P
from .handshake import META_CONTEXT_ID

log = logging.getLogger("qcow2.nbd")

_PLAN_MIN = 64 << 10         # reads from this size send their zero blocks as holes
_SCRATCH_KEEP = 4 << 20      # read buffers up to this size are kept per worker thread
_MIN_COST = 16 << 10         # budget charged for a request without data
_BLOCK_STATUS_COST = 8 * P.MAX_EXTENTS + 64
_BATCH_MAX = 1 << 20         # adjacent READs already received, served by one plan
_ALLOWED_FLAGS = {
    P.CMD_READ: P.CMD_FLAG_DF,
    P.CMD_WRITE: P.CMD_FLAG_FUA,
    P.CMD_FLUSH: P.CMD_FLAG_FUA,
    P.CMD_TRIM: P.CMD_FLAG_FUA,
    P.CMD_WRITE_ZEROES: P.CMD_FLAG_FUA | P.CMD_FLAG_NO_HOLE,
    P.CMD_BLOCK_STATUS: P.CMD_FLAG_REQ_ONE,
}


class RequestError(Exception):
    """A request refused with an NBD error value (the connection goes on)."""

    def __init__(self, error: int, message: str):
        super().__init__(message)
        self.error = error


def error_value(exc: BaseException) -> int:
    """The NBD error value for an exception raised by the image."""
    if isinstance(exc, RequestError):
        return exc.error
    if isinstance(exc, PermissionError):
        return P.EPERM
    if isinstance(exc, UnsupportedFeatureError):
        return P.ENOTSUP
    if isinstance(exc, Qcow2Error):
        return P.EIO
    if isinstance(exc, OSError):
        return P.wire_errno(exc.errno)
    if isinstance(exc, ValueError):
        return P.EINVAL
    if isinstance(exc, MemoryError):
        return P.ENOMEM
    return P.EIO


class _Request:
    __slots__ = ("flags", "kind", "cookie", "offset", "length", "payload", "cost", "batch")

    def __init__(self, flags, kind, cookie, offset, length, payload, cost):
        self.flags = flags
        self.kind = kind
        self.cookie = cookie
        self.offset = offset
        self.length = length
        self.payload = payload
        self.cost = cost                  # (with the batch's)
        self.batch = None                 # adjacent READs served with this one


class Transmission:
    """Serve ``session`` (a ``handshake.Session``) on channel ``ch`` until the end.

    ``workers``: threads serving this connection's requests; ``budget``: bytes of
    payloads and read buffers in flight at most (a single request may use up to 32
    MiB whatever the budget)."""

    def __init__(self, ch: P.Channel, session, *, peer: str = "client", workers: int = 4,
                 budget: int = 64 << 20):
        self.ch = ch
        self.session = session
        self.export = session.export
        self.peer = peer
        self.workers = max(1, workers)
        self.budget = max(budget, P.MAX_REQUEST)
        self.in_flight = 0
        self.cond = threading.Condition(threading.Lock())
        self.waiting = 0                  # threads waiting in _reserve
        self.read_lock = threading.Lock()
        self.done = False                 # no more requests: DISC, EOF or a protocol error
        self.dead = False                 # the client is gone: replies are not sent
        self.scratch = threading.local()

    # -- the loop: each worker in turn reads one request, then serves it -----------
    def run(self) -> None:
        threads = [threading.Thread(target=self._work, name=f"nbd-worker-{i}", daemon=True)
                   for i in range(self.workers)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        self._flush_on_close()

    def _work(self) -> None:
        """Leader/followers: the thread holding ``read_lock`` reads the next request
        (and a WRITE's payload, or a batch of adjacent READs), lets the next thread
        read, and serves what it read: no queue and no hand-off between threads per
        request; at most ``workers`` requests (or batches) of a connection in flight."""
        while True:
            with self.read_lock:
                if self.done:
                    return
                try:
                    req = self._next_request()
                except P.Disconnected as exc:
                    if not self.dead:
                        log.info("%s: connection closed (%s)", self.peer, exc)
                    req = None
                except P.ProtocolError as exc:
                    log.warning("%s: protocol error, dropping the connection: %s", self.peer,
                                exc)
                    self.dead = True            # replies still in flight are not sent
                    self.ch.shutdown()
                    req = None
                if req is None:
                    self.done = True
                    return
            try:
                if not self.dead:
                    self._serve(req)
            except P.Disconnected:
                self._die()
            finally:
                req.payload = None
                self._release(req.cost)

    def _next_request(self) -> _Request | None:
        """The next request off the socket, its budget reserved; None for DISC."""
        ch = self.ch
        magic, flags, kind, cookie, offset, length = P.REQUEST.unpack(
            ch.recv_exact(P.REQUEST.size))
        if magic != P.REQUEST_MAGIC:
            raise P.ProtocolError(f"bad request magic {magic:#x}")
        if kind == P.CMD_DISC:
            log.debug("%s: disconnect requested", self.peer)
            return None
        payload = None
        # every request counts against the budget (replies may wait in memory for a
        # client that does not read them): at least 16 KiB, a block status reply's
        # largest size, or the payload / data read
        cost = _BLOCK_STATUS_COST if kind == P.CMD_BLOCK_STATUS else _MIN_COST
        if kind == P.CMD_WRITE:
            if length > P.MAX_REQUEST:
                raise P.ProtocolError(f"write of {length} bytes at {offset} exceeds the "
                                      f"{P.MAX_REQUEST}-byte request limit")
            cost = max(cost, length)
            self._reserve(cost)
            payload = bytearray(length)
            try:
                ch.recv_into(memoryview(payload))
            except BaseException:
                self._release(cost)
                raise
        else:
            if kind == P.CMD_READ and length <= P.MAX_REQUEST:
                cost = max(cost, length)
            self._reserve(cost)
        req = _Request(flags, kind, cookie, offset, length, payload, cost)
        if (kind == P.CMD_READ and not flags and 0 < length < _BATCH_MAX
                and self.session.structured):
            self._gather(req)
        return req

    def _gather(self, req: _Request) -> None:
        """Join to ``req`` the READs that follow it on the disk and are already in the
        receive buffer (nbdcopy sends 256 KiB reads in order, many in flight), up to
        ``_BATCH_MAX`` bytes and while the budget allows without waiting: one read plan
        serves them all (the engine's cost per call is paid once, ~20 us per request)."""
        ch = self.ch
        end = req.offset + req.length
        total = req.length
        more = []
        size = P.REQUEST.size
        while True:
            head = ch.peek(size)
            if head is None:
                break
            magic, flags, kind, cookie, offset, length = P.REQUEST.unpack(head)
            if (magic != P.REQUEST_MAGIC or kind != P.CMD_READ or flags or offset != end
                    or not 0 < length <= _BATCH_MAX - total):
                break
            cost = max(length, _MIN_COST)
            if not self._try_reserve(cost):
                break
            ch.skip(size)
            more.append(_Request(flags, kind, cookie, offset, length, None, cost))
            req.cost += cost
            end += length
            total += length
        if more:
            req.batch = more

    def _reserve(self, cost: int) -> None:
        with self.cond:
            while self.in_flight and self.in_flight + cost > self.budget:
                self.waiting += 1
                try:
                    self.cond.wait()
                finally:
                    self.waiting -= 1
            self.in_flight += cost

    def _try_reserve(self, cost: int) -> bool:
        with self.cond:
            if self.in_flight + cost > self.budget:
                return False
            self.in_flight += cost
            return True

    def _release(self, cost: int) -> None:
        if cost:
            with self.cond:
                self.in_flight -= cost
                if self.waiting:
                    self.cond.notify_all()

    def _flush_on_close(self) -> None:
        if self.export.readonly:
            return
        try:
            self.export.flush()
        except Exception as exc:  # noqa: BLE001 - logged; the server goes on
            log.error("%s: flush on disconnect failed: %s", self.peer, exc)

    # -- serving ----------------------------------------------------------------------
    def _die(self) -> None:
        """The client went away mid-reply: stop reading (the recv in progress fails)."""
        if not self.dead:
            self.dead = True
            log.info("%s: client vanished while a reply was sent", self.peer)
            self.ch.shutdown()

    def _serve(self, req: _Request) -> None:
        if req.batch is None:
            self._serve_one(req)
            return
        reqs = [req, *req.batch]
        try:
            for r in reqs:
                self._check(r)
            with serial_reads():                # (in parallel: the other workers)
                plan, buf = self._plan(req.offset, sum(r.length for r in reqs))
        except P.Disconnected:
            raise
        except Exception:  # noqa: BLE001 - each request then gets its own reply
            for r in reqs:
                self._serve_one(r)
            return
        parts = []
        for r in reqs:
            parts += self._chunks(r, _slice(plan, r.offset, r.length), buf)
        self.ch.send_mixed(parts)

    def _serve_one(self, req: _Request) -> None:
        try:
            self._check(req)
            self._dispatch(req)
        except P.Disconnected:
            raise
        except Exception as exc:  # noqa: BLE001 - every failure becomes an error reply
            err = error_value(exc)
            if err == P.EIO and not isinstance(exc, (OSError, Qcow2Error)):
                log.exception("%s: %s failed", self.peer, P.COMMAND_NAMES.get(req.kind, req.kind))
            else:
                log.debug("%s: %s refused: %s", self.peer, P.COMMAND_NAMES.get(req.kind), exc)
            self._reply_error(req, err, str(exc))

    def _check(self, req: _Request) -> None:
        exp = self.export
        name = P.COMMAND_NAMES.get(req.kind)
        if req.kind not in _ALLOWED_FLAGS:
            raise RequestError(P.EINVAL, f"unknown or unsupported command {req.kind}")
        if req.flags & ~_ALLOWED_FLAGS[req.kind]:
            raise RequestError(P.EINVAL, f"flags {req.flags:#x} not allowed with {name}")
        if req.flags & P.CMD_FLAG_DF and not self.session.structured:
            raise RequestError(P.EINVAL, "NBD_CMD_FLAG_DF needs structured replies")
        if req.kind == P.CMD_FLUSH:
            return
        if req.kind in (P.CMD_WRITE, P.CMD_TRIM, P.CMD_WRITE_ZEROES) and exp.readonly:
            raise RequestError(P.EPERM, "the export is read-only")
        if req.kind == P.CMD_READ and req.length > P.MAX_REQUEST:
            raise RequestError(P.EINVAL, f"read of {req.length} bytes exceeds the "
                                         f"{P.MAX_REQUEST}-byte request limit")
        if req.kind == P.CMD_BLOCK_STATUS:
            if not self.session.base_allocation:
                raise RequestError(P.EINVAL, "no metadata context was negotiated")
            if not req.length:
                raise RequestError(P.EINVAL, "block status of an empty range")
        if req.offset + req.length > exp.size:
            raise RequestError(P.EINVAL, f"{name} of {req.length} bytes at {req.offset} is "
                                         f"past the end of the export ({exp.size})")

    def _dispatch(self, req: _Request) -> None:
        exp = self.export
        fua = bool(req.flags & P.CMD_FLAG_FUA)
        kind = req.kind
        if kind == P.CMD_READ:
            self._read(req)
            return
        if kind == P.CMD_BLOCK_STATUS:
            extents = exp.block_status(req.offset, req.length,
                                       one=bool(req.flags & P.CMD_FLAG_REQ_ONE))
            self.ch.send(P.chunk_block_status(req.cookie, META_CONTEXT_ID, extents, True))
            return
        if kind == P.CMD_WRITE:
            if req.length:
                exp.write(req.payload, req.offset, fua)
        elif kind == P.CMD_WRITE_ZEROES:
            if req.length:
                exp.write_zeroes(req.offset, req.length, fua)
        elif kind == P.CMD_TRIM:
            if req.length:
                exp.trim(req.offset, req.length, fua)
        elif kind == P.CMD_FLUSH:
            exp.flush()
        self.ch.send(P.simple_reply(req.cookie))

    # -- reads ---------------------------------------------------------------------------
    def _buffer(self, n: int) -> memoryview:
        buf = getattr(self.scratch, "buf", None)
        if buf is None or len(buf) < n:
            buf = io_buffer(max(n, 1 << 20))
            if n > _SCRATCH_KEEP:
                return memoryview(buf)[:n]
            self.scratch.buf = buf
        return memoryview(buf)[:n]

    def _read(self, req: _Request) -> None:
        """A READ from the export's read plan: zeros become hole chunks (or zero bytes
        where the reply is one piece), data lying in a file is sent from it by the
        kernel (``sendfile``), and only the rest (compressed clusters, writable or
        encrypted images) is read into a buffer here, before the send lock is taken
        (decoding never holds up the connection's other replies); from 64 KiB such
        data is scanned for zero blocks, which become holes."""
        if req.length == 0 and self.session.structured:
            self.ch.send(P.chunk_done(req.cookie))
            return
        plan, buf = self._plan(req.offset, req.length)
        if not self.session.structured or req.flags & P.CMD_FLAG_DF:
            head = (P.simple_reply(req.cookie) if not self.session.structured else
                    P.chunk(req.cookie, P.REPLY_TYPE_OFFSET_DATA, 8 + req.length, True)
                    + P.U64.pack(req.offset))
            parts = [head]
            for _a, n, kind, fd, host in plan:
                if kind == READ_FILE:
                    parts.append((fd, host, n))
                elif kind == READ_ZEROS:
                    parts.extend(P.zero_views(n))
                else:
                    parts.append(buf[fd:fd + n])
            self.ch.send_mixed(parts)
            return
        self.ch.send_mixed(self._chunks(req, plan, buf))

    def _plan(self, offset: int, length: int):
        """(the export's read plan of the range, the buffer its copy pieces are in)."""
        bufs = []
        slots = self.export.decode_slots
        held = []

        def buffer(n: int) -> memoryview:
            # asked for only when something must be read (decoded) here: that work
            # takes one of the export's slots (one per CPU), released below
            if not held:
                slots.acquire()
                held.append(True)
            bufs.append(self._buffer(n))
            return bufs[-1]

        try:
            plan = self.export.read_plan(offset, length, buffer)
        finally:
            if held:
                slots.release()
        return plan, (bufs[-1] if bufs else None)

    def _chunks(self, req: _Request, plan, buf) -> list:
        """The structured reply's chunks for ``plan`` (the last one marked done)."""
        pieces = []                             # (offset, length, kind, payload)
        scan = req.length >= _PLAN_MIN
        for a, n, kind, fd, host in plan:
            if kind != READ_COPY:
                pieces.append((a, n, kind, (fd, host, n) if kind == READ_FILE else None))
                continue
            mv = buf[fd:fd + n]
            runs = self.export.zero_runs(mv) if scan else [(0, n, False)]
            for start, k, zero in runs:
                pieces.append((a + start, k, READ_ZEROS if zero else READ_COPY,
                               None if zero else mv[start:start + k]))
        parts = []
        last = len(pieces) - 1
        cookie = req.cookie
        for i, (a, n, kind, payload) in enumerate(pieces):
            if kind == READ_ZEROS:
                parts.append(P.chunk_hole(cookie, a, n, i == last))
            else:
                parts.append(P.chunk(cookie, P.REPLY_TYPE_OFFSET_DATA, 8 + n, i == last)
                             + P.U64.pack(a))
                parts.append(payload)
        return parts

    def _reply_error(self, req: _Request, err: int, message: str) -> None:
        if self.session.structured:
            self.ch.send(P.chunk_error(req.cookie, err, message))
        else:
            self.ch.send(P.simple_reply(req.cookie, err))


def _slice(plan, start: int, n: int) -> list:
    """The pieces of ``plan`` (contiguous, in order) that cover [start, start + n)."""
    end = start + n
    out = []
    for a, k, kind, fd, host in plan:
        if a + k <= start:
            continue
        if a >= end:
            break
        lo = a if a > start else start
        hi = a + k if a + k < end else end
        if lo != a:
            if kind == READ_COPY:
                fd += lo - a
            elif kind == READ_FILE:
                host += lo - a
        out.append((lo, hi - lo, kind, fd, host))
    return out
