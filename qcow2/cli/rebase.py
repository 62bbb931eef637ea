"""qcow2 rebase [-f FMT] [-t CACHE] [-T SRC_CACHE] [-u] [-b BACKING] [-F FMT] [-p] [-q] [-U]
FILE"""

from __future__ import annotations

from .common import (add_cache, add_file, add_format, add_progress, add_quiet, add_share,
                     end_progress, progress_for)


def add_parser(sub):
    p = sub.add_parser("rebase", help="change the backing file (like qemu-img rebase)")
    add_format(p)
    add_cache(p)
    add_cache(p, "-T", "src_cache", "the backing files read")
    p.add_argument("-u", dest="unsafe", action="store_true",
                   help="only rewrite the header (no data copied)")
    p.add_argument("-b", dest="backing_file", default=None,
                   help="new backing file ('' flattens the image)")
    p.add_argument("-F", dest="backing_format", default=None, help="its format")
    add_progress(p)
    add_quiet(p)
    add_share(p)
    add_file(p, run)


def run(args) -> int:
    from ..errors import InvalidOptionError
    from ..ops.rebase import rebase

    progress = progress_for(args)
    if args.backing_file is None and not args.unsafe:
        raise InvalidOptionError("Must specify backing file (-b)")
    rebase(args.filename, args.backing_file or "", format=args.format,
           backing_format=args.backing_format, unsafe=args.unsafe, progress=progress,
           force_share=args.force_share, cache=args.cache, src_cache=args.src_cache)
    end_progress(progress)
    return 0
