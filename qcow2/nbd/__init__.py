"""Serve images over NBD (the Network Block Device protocol) with our own server.

Any NBD client -- QEMU, ``nbdcopy``/``nbdinfo`` (libnbd), the kernel's ``nbd-client``,
libguestfs -- can then read and write an image through the engine::

    import qcow2, qcow2.nbd
    with qcow2.open("disk.qcow2", "r+") as img:
        qcow2.nbd.serve(img, socket_path="/run/disk.sock")       # until the client leaves

    # several exports, in the background
    exports = [qcow2.nbd.Export(a, "a"), qcow2.nbd.Export(b, "b", readonly=True)]
    with qcow2.nbd.NBDServer(exports, socket_path=path, persistent=True, shared=0) as srv:
        ...                                                      # clients connect here

Modules, one concern each: ``protocol`` (the wire: constants, packers, the socket),
``handshake`` (fixed newstyle negotiation and options), ``transmission`` (commands of
one connection), ``export`` (an image under a serving policy), ``server`` (listening,
connections, shutdown).  The command ``qcow2 nbd`` is the front end.
"""

from __future__ import annotations

from .export import Export
from .server import DEFAULT_PORT, NBDServer


def serve(exports, *, socket_path: str | None = None, host: str | None = None,
          port: int = DEFAULT_PORT, shared: int = 1, persistent: bool = False,
          ready=None) -> None:
    """Serve ``exports`` (an open image, an ``Export``, or a list of them) until the
    last client leaves (or forever with ``persistent``); ``ready(server)`` is called
    once clients can connect.  The images stay open: the caller closes them."""
    server = NBDServer(exports, socket_path=socket_path, host=host, port=port, shared=shared,
                       persistent=persistent)
    try:
        server.listen()
        if ready is not None:
            ready(server)
        server.serve_forever()
    finally:
        server.close()


__all__ = ["Export", "NBDServer", "serve", "DEFAULT_PORT"]
