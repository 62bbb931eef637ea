"""The NBD wire format: magics, option and command numbers, flags, error numbers and
the packers of every message this server sends (NetworkBlockDevice ``doc/proto.md``).

Everything is big-endian ("network byte order").  Names follow the specification with
the ``NBD_`` prefix dropped; sections of proto.md are named in the comments.
"""

from __future__ import annotations

import errno
import os
import struct

# -- handshake ("Newstyle negotiation") -------------------------------------------------
NBDMAGIC = 0x4E42444D41474943            # "NBDMAGIC"
IHAVEOPT = 0x49484156454F5054            # "IHAVEOPT"
REPLY_MAGIC = 0x3E889045565A9            # option reply magic

# handshake flags (server, 16 bits) and client flags (32 bits)
FLAG_FIXED_NEWSTYLE = 1 << 0
FLAG_NO_ZEROES = 1 << 1
FLAG_C_FIXED_NEWSTYLE = 1 << 0
FLAG_C_NO_ZEROES = 1 << 1

# option types ("Option types")
OPT_EXPORT_NAME = 1
OPT_ABORT = 2
OPT_LIST = 3
OPT_STARTTLS = 5
OPT_INFO = 6
OPT_GO = 7
OPT_STRUCTURED_REPLY = 8
OPT_LIST_META_CONTEXT = 9
OPT_SET_META_CONTEXT = 10
OPT_EXTENDED_HEADERS = 11

OPTION_NAMES = {OPT_EXPORT_NAME: "EXPORT_NAME", OPT_ABORT: "ABORT", OPT_LIST: "LIST",
                OPT_STARTTLS: "STARTTLS", OPT_INFO: "INFO", OPT_GO: "GO",
                OPT_STRUCTURED_REPLY: "STRUCTURED_REPLY",
                OPT_LIST_META_CONTEXT: "LIST_META_CONTEXT",
                OPT_SET_META_CONTEXT: "SET_META_CONTEXT",
                OPT_EXTENDED_HEADERS: "EXTENDED_HEADERS"}

# option reply types ("Option reply types"); errors have bit 31 set
REP_ACK = 1
REP_SERVER = 2
REP_INFO = 3
REP_META_CONTEXT = 4
REP_ERR_UNSUP = (1 << 31) + 1
REP_ERR_POLICY = (1 << 31) + 2
REP_ERR_INVALID = (1 << 31) + 3
REP_ERR_PLATFORM = (1 << 31) + 4
REP_ERR_TLS_REQD = (1 << 31) + 5
REP_ERR_UNKNOWN = (1 << 31) + 6
REP_ERR_SHUTDOWN = (1 << 31) + 7
REP_ERR_BLOCK_SIZE_REQD = (1 << 31) + 8
REP_ERR_TOO_BIG = (1 << 31) + 9

# information types of NBD_OPT_INFO / NBD_OPT_GO ("NBD_REP_INFO")
INFO_EXPORT = 0
INFO_NAME = 1
INFO_DESCRIPTION = 2
INFO_BLOCK_SIZE = 3

# transmission flags ("Transmission flags", 16 bits)
FLAG_HAS_FLAGS = 1 << 0
FLAG_READ_ONLY = 1 << 1
FLAG_SEND_FLUSH = 1 << 2
FLAG_SEND_FUA = 1 << 3
FLAG_ROTATIONAL = 1 << 4
FLAG_SEND_TRIM = 1 << 5
FLAG_SEND_WRITE_ZEROES = 1 << 6
FLAG_SEND_DF = 1 << 7
FLAG_CAN_MULTI_CONN = 1 << 8
FLAG_SEND_RESIZE = 1 << 9
FLAG_SEND_CACHE = 1 << 10
FLAG_SEND_FAST_ZERO = 1 << 11

# -- transmission ------------------------------------------------------------------------
REQUEST_MAGIC = 0x25609513
SIMPLE_REPLY_MAGIC = 0x67446698
STRUCTURED_REPLY_MAGIC = 0x668E33EF

# commands ("Request types")
CMD_READ = 0
CMD_WRITE = 1
CMD_DISC = 2
CMD_FLUSH = 3
CMD_TRIM = 4
CMD_CACHE = 5
CMD_WRITE_ZEROES = 6
CMD_BLOCK_STATUS = 7

COMMAND_NAMES = {CMD_READ: "READ", CMD_WRITE: "WRITE", CMD_DISC: "DISC", CMD_FLUSH: "FLUSH",
                 CMD_TRIM: "TRIM", CMD_CACHE: "CACHE", CMD_WRITE_ZEROES: "WRITE_ZEROES",
                 CMD_BLOCK_STATUS: "BLOCK_STATUS"}

# command flags ("Command flags")
CMD_FLAG_FUA = 1 << 0
CMD_FLAG_NO_HOLE = 1 << 1
CMD_FLAG_DF = 1 << 2
CMD_FLAG_REQ_ONE = 1 << 3
CMD_FLAG_FAST_ZERO = 1 << 4

# structured reply flags and chunk types ("Structured reply types")
REPLY_FLAG_DONE = 1 << 0
REPLY_TYPE_NONE = 0
REPLY_TYPE_OFFSET_DATA = 1
REPLY_TYPE_OFFSET_HOLE = 2
REPLY_TYPE_BLOCK_STATUS = 5
REPLY_TYPE_ERROR = (1 << 15) + 1
REPLY_TYPE_ERROR_OFFSET = (1 << 15) + 2

# the one metadata context ("Metadata contexts"): base:allocation and its flags
BASE_ALLOCATION = "base:allocation"
STATE_HOLE = 1 << 0
STATE_ZERO = 1 << 1

# error values ("Error values"): the wire numbers, whatever the host's errno says
EPERM = 1
EIO = 5
ENOMEM = 12
EINVAL = 22
ENOSPC = 28
EOVERFLOW = 75
ENOTSUP = 95
ESHUTDOWN = 108

_HOST_TO_WIRE = {errno.EPERM: EPERM, errno.EACCES: EPERM, errno.EROFS: EPERM, errno.EIO: EIO,
                 errno.ENOMEM: ENOMEM, errno.EINVAL: EINVAL, errno.ENOSPC: ENOSPC,
                 errno.EDQUOT: ENOSPC, errno.EFBIG: EINVAL, errno.EOVERFLOW: EOVERFLOW,
                 errno.ENOTSUP: ENOTSUP, errno.ESHUTDOWN: ESHUTDOWN}


def wire_errno(host_errno: int | None) -> int:
    """The NBD error value for a host errno (anything unknown is EIO)."""
    return _HOST_TO_WIRE.get(host_errno or 0, EIO)


# -- limits ---------------------------------------------------------------------------------
MAX_REQUEST = 32 << 20          # largest READ/WRITE payload (as qemu-nbd): bigger drops or EINVAL
MAX_OPTION = 64 << 10           # largest option payload we read; bigger drops the connection
MAX_STRING = 4096               # proto.md: strings MUST be no longer than this
MAX_EXTENTS = 1 << 16           # block status descriptors in one reply (a client sees a prefix)

# -- packers ----------------------------------------------------------------------------------
HELLO = struct.Struct(">QQH")                # NBDMAGIC, IHAVEOPT, handshake flags
CLIENT_FLAGS = struct.Struct(">I")
OPTION = struct.Struct(">QII")               # IHAVEOPT, option, length
OPTION_REPLY = struct.Struct(">QIII")        # REPLY_MAGIC, option, reply type, length
EXPORT_NAME_REPLY = struct.Struct(">QH")     # size, transmission flags (+124 zeros)
REQUEST = struct.Struct(">IHHQQI")           # magic, flags, type, cookie, offset, length
SIMPLE_REPLY = struct.Struct(">IIQ")         # magic, error, cookie
CHUNK = struct.Struct(">IHHQI")              # magic, flags, type, cookie, length
U16 = struct.Struct(">H")
U32 = struct.Struct(">I")
U64 = struct.Struct(">Q")


def option_reply(option: int, reply: int, data: bytes = b"") -> bytes:
    return OPTION_REPLY.pack(REPLY_MAGIC, option, reply, len(data)) + data


def info_export(size: int, flags: int) -> bytes:
    return struct.pack(">HQH", INFO_EXPORT, size, flags)


def info_string(kind: int, text: str) -> bytes:
    return U16.pack(kind) + text.encode()


def info_block_size(minimum: int, preferred: int, maximum: int) -> bytes:
    return struct.pack(">HIII", INFO_BLOCK_SIZE, minimum, preferred, maximum)


def simple_reply(cookie: int, error: int = 0) -> bytes:
    return SIMPLE_REPLY.pack(SIMPLE_REPLY_MAGIC, error, cookie)


def chunk(cookie: int, kind: int, length: int, done: bool) -> bytes:
    """The header of one structured reply chunk whose payload is ``length`` bytes."""
    return CHUNK.pack(STRUCTURED_REPLY_MAGIC, REPLY_FLAG_DONE if done else 0, kind, cookie,
                      length)


def chunk_done(cookie: int) -> bytes:
    return chunk(cookie, REPLY_TYPE_NONE, 0, True)


def chunk_hole(cookie: int, offset: int, length: int, done: bool) -> bytes:
    return chunk(cookie, REPLY_TYPE_OFFSET_HOLE, 12, done) + struct.pack(">QI", offset, length)


def chunk_error(cookie: int, error: int, message: str = "") -> bytes:
    msg = message.encode()[:MAX_STRING]
    body = struct.pack(">IH", error, len(msg)) + msg
    return chunk(cookie, REPLY_TYPE_ERROR, len(body), True) + body


def chunk_block_status(cookie: int, context_id: int, extents, done: bool) -> bytes:
    """``extents``: (length, flags) pairs."""
    body = bytearray(U32.pack(context_id))
    for n, flags in extents:
        body += struct.pack(">II", n, flags)
    return chunk(cookie, REPLY_TYPE_BLOCK_STATUS, len(body), done) + body


# -- the socket ----------------------------------------------------------------------------
_ZEROS = memoryview(bytes(1 << 20))
_RECV_BUFFER = 64 << 10
_SENDFILE_UNSUPPORTED = (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP, errno.ESPIPE)


def zero_views(n: int) -> list[memoryview]:
    """``n`` zero bytes as views of one shared block (nothing allocated)."""
    full, rest = divmod(n, len(_ZEROS))
    return [_ZEROS] * full + ([_ZEROS[:rest]] if rest else [])


class Disconnected(Exception):
    """The peer closed the connection (or it broke) where a message was expected."""


class ProtocolError(Exception):
    """The peer broke the protocol in a way that ends the connection."""


class Channel:
    """A connected socket with exact reads and complete writes.  Sends are serialised
    by ``send_lock`` so that replies of concurrent requests never interleave.  Reads
    are buffered (one ``recv`` takes every request header a client has queued) and
    must come from one thread at a time."""

    def __init__(self, sock):
        import threading
        self.sock = sock
        self.send_lock = threading.Lock()
        self._rbuf = bytearray(_RECV_BUFFER)
        self._rmv = memoryview(self._rbuf)
        self._rpos = 0                  # buffered bytes: _rbuf[_rpos:_rend]
        self._rend = 0

    def recv_exact(self, n: int) -> bytes:
        p = self._rpos
        if self._rend - p >= n:
            self._rpos = p + n
            return bytes(self._rmv[p:p + n])
        if n > _RECV_BUFFER // 2:
            buf = bytearray(n)
            self.recv_into(memoryview(buf))
            return bytes(buf)
        have = self._rend - p
        self._rbuf[:have] = self._rmv[p:self._rend]          # (same size: no resize)
        self._rpos, self._rend = 0, have
        while self._rend < n:
            self._rend += self._recv_some(self._rmv[self._rend:])
        self._rpos = n
        return bytes(self._rmv[:n])

    def peek(self, n: int):
        """The next ``n`` bytes if they are already buffered (not consumed), else None."""
        p = self._rpos
        if self._rend - p >= n:
            return self._rmv[p:p + n]
        return None

    def skip(self, n: int) -> None:
        """Consume ``n`` bytes ``peek`` has shown."""
        self._rpos += n

    def recv_into(self, mv: memoryview) -> None:
        n = len(mv)
        got = min(n, self._rend - self._rpos)
        if got:
            mv[:got] = self._rmv[self._rpos:self._rpos + got]
            self._rpos += got
        while got < n:
            got += self._recv_some(mv[got:])

    def _recv_some(self, mv: memoryview) -> int:
        try:
            k = self.sock.recv_into(mv)
        except (ConnectionError, TimeoutError) as exc:
            raise Disconnected(str(exc)) from None
        except OSError as exc:
            raise Disconnected(exc.strerror or str(exc)) from None
        if k == 0:
            raise Disconnected("end of stream")
        return k

    def discard(self, n: int) -> None:
        """Read and drop ``n`` bytes (a payload we refuse), 64 KiB at a time."""
        scratch = memoryview(bytearray(min(n, 64 << 10)))
        while n:
            k = min(n, len(scratch))
            self.recv_into(scratch[:k])
            n -= k

    def send(self, *parts) -> None:
        """Send every part (bytes-like) in order, as one message."""
        with self.send_lock:
            self._send_locked(parts)

    def send_mixed(self, parts) -> None:
        """Send ``parts`` in order, as one message: bytes-like objects, and
        ``(fd, offset, count)`` tuples whose bytes the kernel copies from that file
        (``sendfile``: no copy through this process; zeros past the file's end)."""
        with self.send_lock:
            pending = []
            for p in parts:
                if type(p) is tuple:
                    if pending:
                        self._send_locked(pending)
                        pending = []
                    self._sendfile_locked(*p)
                else:
                    pending.append(p)
            if pending:
                self._send_locked(pending)

    def _sendfile_locked(self, fd: int, offset: int, count: int) -> None:
        sock = self.sock.fileno()
        while count > 0:
            try:
                k = os.sendfile(sock, fd, offset, count)
            except BlockingIOError:             # (a socket with a timeout)
                import select
                select.select([], [sock], [])
                continue
            except OSError as exc:
                if exc.errno in _SENDFILE_UNSUPPORTED:
                    self._send_copy_locked(fd, offset, count)
                    return
                # the reply's header is out: nothing but the end of the connection
                # can tell the client (a socket error, or the file's read error)
                raise Disconnected(exc.strerror or str(exc)) from None
            if k == 0:                          # the file ends here: zeros
                self._send_locked(zero_views(count))
                return
            offset += k
            count -= k

    def _send_copy_locked(self, fd: int, offset: int, count: int) -> None:
        """``sendfile`` refused (a file system without it): read and send."""
        while count > 0:
            try:
                data = os.pread(fd, min(count, 1 << 20), offset)
            except OSError as exc:
                raise Disconnected(exc.strerror or str(exc)) from None
            if not data:
                self._send_locked(zero_views(count))
                return
            self._send_locked([data])
            offset += len(data)
            count -= len(data)

    def _send_locked(self, parts) -> None:
        views = [memoryview(p).cast("B") for p in parts if len(p)]
        try:
            while views:
                sent = self.sock.sendmsg(views)
                while views and sent >= len(views[0]):
                    sent -= len(views[0])
                    views.pop(0)
                if views and sent:
                    views[0] = views[0][sent:]
        except OSError as exc:
            raise Disconnected(exc.strerror or str(exc)) from None

    def shutdown(self) -> None:
        """End both directions (a thread blocked in recv returns); the descriptor stays
        open until ``close()``, so no other thread's call can land on a reused one."""
        import socket
        try:
            self.sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass

    def close(self) -> None:
        self.shutdown()
        self.sock.close()
