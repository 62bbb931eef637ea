"""The server: listening sockets, the accept loop, one thread per connection, the
exports by name, and an orderly shutdown.

Like qemu-nbd, a server takes at most ``shared`` clients at once (further ones wait
in the listen backlog until a slot frees; 0 means no limit) and, unless
``persistent``, stops when its last client has gone.  ``shutdown()`` (any thread, or
a signal handler) stops accepting, disconnects the clients, waits for their requests
in flight and their final flush, and returns; the images stay open (the caller owns
them).  A connection that fails, however it fails, is logged and dropped: the server
and the other connections go on.
"""

from __future__ import annotations

import logging
import os
import selectors
import socket
import stat
import threading

from . import protocol as P
from .export import Export
from .handshake import negotiate
from .transmission import Transmission

log = logging.getLogger("qcow2.nbd")

DEFAULT_PORT = 10809
HANDSHAKE_TIMEOUT = 60.0            # seconds a client may take to choose an export


class NBDServer:
    """Serve ``exports`` (``Export`` objects, or open images: each is then the export
    named "", read-only or writable as opened) on a Unix socket ``socket_path`` or on
    TCP ``host``:``port`` (port 0: any free port, see ``address``)."""

    def __init__(self, exports, *, socket_path: str | None = None, host: str | None = None,
                 port: int = DEFAULT_PORT, shared: int = 1, persistent: bool = False,
                 workers: int = 4, budget: int = 64 << 20):
        if not isinstance(exports, (list, tuple)):
            exports = [exports]
        if not exports:
            raise ValueError("no export to serve")
        self.exports: dict[str, Export] = {}
        for e in exports:
            exp = e if isinstance(e, Export) else Export(e)
            if exp.name in self.exports:
                raise ValueError(f"two exports named {exp.name!r}")
            self.exports[exp.name] = exp
        self.socket_path = socket_path
        self.host = host
        self.port = port
        self.shared = max(0, shared)
        self.persistent = persistent
        self.workers = workers
        self.budget = budget
        for exp in self.exports.values():
            # a client told "multi-conn" opens several connections: not with one slot
            exp.multi_conn = self.shared != 1
        self.listeners: list[socket.socket] = []
        self.clients: dict[int, P.Channel] = {}
        self.lock = threading.Condition()
        self.served = 0
        self.stopping = False
        self.wake_r, self.wake_w = os.pipe()
        self.thread: threading.Thread | None = None

    # -- what the handshake asks ------------------------------------------------------
    def lookup(self, name: str) -> Export | None:
        return self.exports.get(name)

    def list_exports(self) -> list[Export]:
        return list(self.exports.values())

    # -- listening ----------------------------------------------------------------------
    def listen(self) -> "NBDServer":
        """Bind and listen (idempotent); after this, clients can connect."""
        if self.listeners:
            return self
        if self.socket_path is not None:
            path = self.socket_path
            try:
                if stat.S_ISSOCK(os.lstat(path).st_mode):
                    os.unlink(path)          # a stale socket from a previous server
            except FileNotFoundError:
                pass
            s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            try:
                s.bind(path)
                s.listen(16)
            except BaseException:
                s.close()
                raise
            self.listeners.append(s)
            return self
        host = self.host if self.host is not None else "0.0.0.0"
        for family, kind, proto, _name, addr in socket.getaddrinfo(
                host, self.port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE):
            s = socket.socket(family, kind, proto)
            try:
                s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                if family == socket.AF_INET6:
                    s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
                s.bind(addr)
                s.listen(16)
            except BaseException:
                s.close()
                self.close_listeners()
                raise
            self.listeners.append(s)
            if self.port == 0:
                break                        # one socket: "any port" differs per family
        return self

    @property
    def address(self):
        """The bound address: the socket path, or (host, port) of the first listener."""
        if self.socket_path is not None:
            return self.socket_path
        return self.listeners[0].getsockname()[:2] if self.listeners else None

    def close_listeners(self) -> None:
        for s in self.listeners:
            s.close()
        self.listeners = []
        if self.socket_path is not None:
            try:
                os.unlink(self.socket_path)
            except OSError:
                pass

    # -- serving ---------------------------------------------------------------------------
    def serve_forever(self) -> None:
        """Accept clients until ``shutdown()`` or, unless persistent, until the last
        client of the first has gone; then disconnect everyone and return."""
        self.listen()
        sel = selectors.DefaultSelector()
        for s in self.listeners:
            sel.register(s, selectors.EVENT_READ)
        sel.register(self.wake_r, selectors.EVENT_READ)
        try:
            while self._wait_for_slot():
                for key, _ev in sel.select():
                    if key.fileobj == self.wake_r:
                        os.read(self.wake_r, 512)
                        continue
                    self._accept(key.fileobj)
        finally:
            sel.close()
            self._stop_clients()
            self.close_listeners()

    def _wait_for_slot(self) -> bool:
        """Block while ``shared`` clients are connected; False when it is time to stop."""
        with self.lock:
            while True:
                if self.stopping:
                    return False
                if not self.persistent and self.served and not self.clients:
                    return False
                if not self.shared or len(self.clients) < self.shared:
                    return True
                self.lock.wait()

    def _accept(self, listener) -> None:
        try:
            conn, addr = listener.accept()
        except OSError as exc:
            log.warning("accept failed: %s", exc)
            return
        peer = addr if isinstance(addr, str) and addr else (
            f"{addr[0]}:{addr[1]}" if isinstance(addr, tuple) else "unix client")
        try:
            conn.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4 << 20)
        except OSError:
            pass
        ch = P.Channel(conn)
        with self.lock:
            self.served += 1
            cid = self.served
            self.clients[cid] = ch
        t = threading.Thread(target=self._client, args=(cid, ch, f"client {cid} ({peer})"),
                             name=f"nbd-client-{cid}", daemon=True)
        t.start()

    def _client(self, cid: int, ch: P.Channel, peer: str) -> None:
        try:
            log.info("%s: connected", peer)
            ch.sock.settimeout(HANDSHAKE_TIMEOUT)
            session = negotiate(ch, self)
            if session is None:
                log.info("%s: negotiation aborted", peer)
                return
            ch.sock.settimeout(None)
            log.info("%s: serving export %r%s", peer, session.export.name,
                     " (structured replies)" if session.structured else "")
            Transmission(ch, session, peer=peer, workers=self.workers,
                         budget=self.budget).run()
        except P.Disconnected as exc:
            log.info("%s: disconnected during negotiation (%s)", peer, exc)
        except P.ProtocolError as exc:
            log.warning("%s: protocol error, dropping the connection: %s", peer, exc)
        except Exception:  # noqa: BLE001 - one connection's failure never stops the server
            log.exception("%s: connection failed", peer)
        finally:
            ch.close()
            with self.lock:
                self.clients.pop(cid, None)
                self.lock.notify_all()
            self._wake()
            log.info("%s: closed", peer)

    def _wake(self) -> None:
        try:
            os.write(self.wake_w, b"x")
        except OSError:
            pass

    def _stop_clients(self) -> None:
        """Disconnect every client and wait for their threads' final flushes."""
        with self.lock:
            self.stopping = True
            for ch in self.clients.values():
                ch.shutdown()
            while self.clients:
                self.lock.wait()

    # -- control ---------------------------------------------------------------------------
    def start(self) -> "NBDServer":
        """Listen and serve in a background thread; returns at once."""
        self.listen()
        self.thread = threading.Thread(target=self.serve_forever, name="nbd-server", daemon=True)
        self.thread.start()
        return self

    def shutdown(self) -> None:
        """Ask the server to stop (safe from a signal handler); ``wait()`` for it."""
        self.stopping = True
        self._wake()
        threading.Thread(target=self._notify, daemon=True).start()

    def _notify(self) -> None:
        with self.lock:                      # (not in a signal handler: the lock may be held)
            self.lock.notify_all()

    def wait(self, timeout: float | None = None) -> None:
        if self.thread is not None:
            self.thread.join(timeout)

    def close(self) -> None:
        self.shutdown()
        self.wait()
        self.close_listeners()
        for fd in (self.wake_r, self.wake_w):
            try:
                os.close(fd)
            except OSError:
                pass
        self.wake_r = self.wake_w = -1

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc):
        self.close()
