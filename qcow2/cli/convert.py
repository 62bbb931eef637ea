"""qcow2 convert [-f FMT] [-O FMT] [-S SIZE] [-t CACHE] [-T CACHE] [-m N] [-W] [-p] [-U] SRC DST"""

from __future__ import annotations

import sys

from ..errors import Qcow2Error
from .common import add_format, add_share, add_untrusted, parse_size


def add_parser(sub):
    p = sub.add_parser("convert", help="convert an image (like qemu-img convert)")
    add_format(p)
    p.add_argument("-O", dest="out_format", default="raw", help="output format")
    p.add_argument("-S", dest="sparse_size", default="4k",
                   help="minimum run of zeros to leave as a hole (0: write everything)")
    p.add_argument("-t", dest="cache", default="writeback", help="output cache mode")
    p.add_argument("-T", dest="src_cache", default="writeback", help="source cache mode")
    p.add_argument("-m", dest="workers", type=int, default=None, help="parallel workers")
    p.add_argument("-W", dest="out_of_order", action="store_true",
                   help="allow out-of-order writes (always on for raw output)")
    p.add_argument("-p", dest="progress", action="store_true", help="show progress")
    p.add_argument("-l", dest="snapshot", default=None, help="read an internal snapshot")
    add_share(p)
    add_untrusted(p)
    p.add_argument("src")
    p.add_argument("dst")
    p.set_defaults(func=run)


def _snapshot_arg(text):
    if text is None:
        return None
    if "=" not in text:
        return text
    opts = dict(part.split("=", 1) for part in text.split(",") if "=" in part)
    return opts.get("snapshot.id") or opts.get("snapshot.name")


def run(args) -> int:
    from ..ops.convert import convert

    if args.workers is not None and not 1 <= args.workers <= 16:
        raise Qcow2Error("Invalid number of coroutines. Allowed number of coroutines is "
                         "between 1 and 16")
    progress = None
    if args.progress:
        def progress(pct):
            sys.stdout.write("    (%.2f/100%%)\r" % pct)
            sys.stdout.flush()
    convert(args.src, args.dst, src_format=args.format, out_format=args.out_format,
            sparse_size=parse_size(args.sparse_size, what="sparse size"), cache=args.cache,
            workers=args.workers, progress=progress, untrusted=args.untrusted,
            force_share=args.force_share, snapshot=_snapshot_arg(args.snapshot))
    if args.progress:
        sys.stdout.write("\n")
    return 0
