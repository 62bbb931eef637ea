"""qcow2 commit [--image-opts] [-f FMT] [-t CACHE] [-b BASE] [-r RATE] [-d] [-p] [-q] FILE"""

from __future__ import annotations

from .common import (add_cache, add_file, add_format, add_image_opts, add_progress, add_quiet,
                     add_rate, end_progress, parse_rate, progress_for)


def add_parser(sub):
    p = sub.add_parser("commit", help="write an overlay into its backing file "
                                      "(like qemu-img commit)")
    add_format(p)
    add_image_opts(p)
    add_cache(p, what="the images written")
    p.add_argument("-b", dest="base", default=None, help="commit down to this image")
    add_rate(p)
    p.add_argument("-d", dest="keep", action="store_true",
                   help="do not empty the image after committing")
    add_progress(p)
    add_quiet(p)
    add_file(p, run)


def run(args) -> int:
    from ..ops.commit import commit

    rate = parse_rate(args.rate_limit)
    progress = progress_for(args)
    commit(args.filename, format=args.format, base=args.base, keep=args.keep,
           progress=progress, cache=args.cache, rate_limit=rate)
    end_progress(progress)
    if not args.quiet:
        print("Image committed.")
    return 0
