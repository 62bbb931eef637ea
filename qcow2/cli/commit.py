"""qcow2 commit [-f FMT] [-b BASE] [-d] [-p] [-q] FILE"""

from __future__ import annotations

from .common import add_file, add_format, add_progress, add_quiet, end_progress, progress_for


def add_parser(sub):
    p = sub.add_parser("commit", help="write an overlay into its backing file "
                                      "(like qemu-img commit)")
    add_format(p)
    p.add_argument("-b", dest="base", default=None, help="commit down to this image")
    p.add_argument("-d", dest="keep", action="store_true",
                   help="do not empty the image after committing")
    add_progress(p)
    add_quiet(p)
    add_file(p, run)


def run(args) -> int:
    from ..ops.commit import commit

    progress = progress_for(args)
    commit(args.filename, format=args.format, base=args.base, keep=args.keep,
           progress=progress)
    end_progress(progress)
    if not args.quiet:
        print("Image committed.")
    return 0
