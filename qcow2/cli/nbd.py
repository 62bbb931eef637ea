"""qcow2 nbd [options] FILE: serve an image over NBD, spelled like qemu-nbd.

    qcow2 nbd -k /tmp/disk.sock -x disk disk.qcow2        # nbd+unix:///disk?socket=/tmp/disk.sock
    qcow2 nbd -r -t -e 0 -p 10809 disk.qcow2             # read-only, many clients, forever

The server (``qcow2.nbd``) runs in this process until its last client leaves (or,
with ``-t``, until SIGTERM/SIGINT); ``--fork`` returns once it listens.  ``-s`` serves
a temporary overlay over FILE (the file is never written; the overlay is deleted at
exit); ``-l`` serves an internal snapshot, read-only.  ``--untrusted`` opens FILE as
``qemu-img --untrusted`` would: nothing but FILE, metadata scanned first, read-only.
"""

from __future__ import annotations

import logging
import os
import signal
import sys

from ..errors import InvalidOptionError


def add_parser(sub):
    from .common import add_file, add_untrusted
    p = sub.add_parser("nbd", help="serve an image over NBD (like qemu-nbd)")
    p.add_argument("-k", "--socket", metavar="PATH", help="listen on a Unix socket")
    p.add_argument("-b", "--bind", metavar="ADDR", default=None,
                   help="TCP address to listen on (default 0.0.0.0)")
    p.add_argument("-p", "--port", type=int, default=None, help="TCP port (default 10809)")
    p.add_argument("-x", "--export-name", dest="export_name", default="", metavar="NAME",
                   help='the export\'s name (default "")')
    p.add_argument("-D", "--description", default="", help="the export's description")
    p.add_argument("-f", "--format", dest="format", choices=("qcow2", "raw"), default=None,
                   help="image format (probed when omitted)")
    p.add_argument("-r", "--read-only", dest="read_only", action="store_true",
                   help="export read-only")
    p.add_argument("-s", "--snapshot", action="store_true",
                   help="write to a temporary overlay, never to FILE")
    p.add_argument("-l", "--load-snapshot", dest="load_snapshot", metavar="SNAPSHOT",
                   help="serve an internal snapshot (id, name, or snapshot.id=/snapshot.name=), "
                        "read-only")
    p.add_argument("-t", "--persistent", action="store_true",
                   help="keep serving after the last client disconnects")
    p.add_argument("-e", "--shared", type=int, default=1, metavar="N",
                   help="clients served at once (default 1, 0 for no limit)")
    p.add_argument("--pid-file", dest="pid_file", metavar="PATH",
                   help="write the server's process id there")
    p.add_argument("--fork", action="store_true", help="return once the server listens")
    p.add_argument("--cache", default="writeback",
                   choices=("none", "writeback", "writethrough", "directsync", "unsafe"),
                   help="writethrough/directsync: every write durable before its reply")
    p.add_argument("--discard", default="ignore", choices=("ignore", "off", "unmap", "on"),
                   help="TRIM requests: ignore (default) or unmap")
    p.add_argument("--detect-zeroes", dest="detect_zeroes", default="off",
                   choices=("off", "on", "unmap"), help="turn all-zero writes into zero writes")
    p.add_argument("--force-share", dest="force_share", action="store_true",
                   help="open FILE with shared permissions (read-only exports)")
    p.add_argument("-v", "--verbose", action="store_true", help="log connections to stderr")
    add_untrusted(p)
    add_file(p, run)


def _check(args) -> None:
    if args.socket and (args.bind is not None or args.port is not None):
        raise InvalidOptionError("-k/--socket cannot be combined with -b/--bind or -p/--port")
    if args.port is not None and not 0 <= args.port <= 65535:
        raise InvalidOptionError(f"Invalid port '{args.port}'")
    if args.shared < 0:
        raise InvalidOptionError(f"Invalid shared device number '{args.shared}'")
    if args.snapshot and args.load_snapshot is not None:
        raise InvalidOptionError("-s and -l cannot be combined")
    if args.snapshot and args.untrusted:
        raise InvalidOptionError("--untrusted serves FILE read-only; -s cannot be combined")
    if args.force_share and not (args.read_only or args.untrusted or args.load_snapshot):
        raise InvalidOptionError("--force-share requires --read-only")


def _open(args, stack):
    """The image to serve (and, with -s, the overlay made for it)."""
    import qcow2
    from .common import snapshot_arg

    readonly = args.read_only or args.untrusted or args.load_snapshot is not None
    if not args.snapshot:
        img = qcow2.open(args.filename, "r" if readonly else "r+", format=args.format,
                         untrusted=args.untrusted, snapshot=snapshot_arg(args.load_snapshot),
                         force_share=args.force_share)
        stack.append(img.close)
        return img, readonly
    import tempfile

    from ..rbdname import is_rbd_name
    base = args.filename if is_rbd_name(args.filename) else os.path.abspath(args.filename)
    with qcow2.open(base, format=args.format, backing=False, force_share=True) as b:
        fmt = b.format
    fd, overlay = tempfile.mkstemp(prefix="qcow2-nbd-", suffix=".qcow2",
                                   dir=os.environ.get("TMPDIR", "/var/tmp"))
    os.close(fd)
    stack.append(lambda: os.unlink(overlay))
    qcow2.create(overlay, backing_file=base, backing_format=fmt)
    img = qcow2.open(overlay, "r" if args.read_only else "r+")
    stack.append(img.close)
    return img, args.read_only


def run(args) -> int:
    from ..nbd import Export, NBDServer

    _check(args)
    logging.basicConfig(stream=sys.stderr, format="qcow2 nbd: %(message)s",
                        level=logging.INFO if args.verbose else logging.WARNING)
    stack: list = []
    try:
        img, readonly = _open(args, stack)
        export = Export(img, args.export_name, description=args.description,
                        readonly=readonly, discard=args.discard,
                        detect_zeroes=args.detect_zeroes, cache=args.cache)
        server = NBDServer([export], socket_path=args.socket, host=args.bind,
                           port=10809 if args.port is None else args.port,
                           shared=args.shared, persistent=args.persistent)
        stack.append(server.close)
        server.listen()
        ready_fd = _fork() if args.fork else None
        if args.pid_file:
            _write_pid(args.pid_file)
            stack.append(lambda: _unlink(args.pid_file))
        for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
            signal.signal(sig, lambda *_: server.shutdown())
        if ready_fd is not None:
            _detach(ready_fd)
        server.serve_forever()
    finally:
        while stack:
            stack.pop()()
    return 0


def _fork() -> int:
    """Fork: the parent waits until the child is ready (``_detach``), then exits 0; the
    child gets the descriptor to say so on."""
    r, w = os.pipe()
    pid = os.fork()
    if pid:
        os.close(w)
        ok = os.read(r, 1)
        os._exit(0 if ok == b"1" else 1)
    os.close(r)
    os.setsid()
    return w


def _detach(w: int) -> None:
    """In the forked server: tell the parent we are ready, leave the terminal."""
    os.write(w, b"1")
    os.close(w)
    null = os.open(os.devnull, os.O_RDWR)
    for fd in (0, 1, 2):
        os.dup2(null, fd)
    os.close(null)


def _write_pid(path: str) -> None:
    tmp = f"{path}.{os.getpid()}.tmp"
    with open(tmp, "w") as f:
        f.write(f"{os.getpid()}\n")
    os.replace(tmp, path)


def _unlink(path: str) -> None:
    try:
        os.unlink(path)
    except OSError:
        pass
