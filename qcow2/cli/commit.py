"""qcow2 commit [-f FMT] [-b BASE] [-d] [-p] [-q] FILE"""

from __future__ import annotations

from .common import ProgressPrinter, add_format


def add_parser(sub):
    p = sub.add_parser("commit", help="write an overlay into its backing file "
                                      "(like qemu-img commit)")
    add_format(p)
    p.add_argument("-b", dest="base", default=None, help="commit down to this image")
    p.add_argument("-d", dest="keep", action="store_true",
                   help="do not empty the image after committing")
    p.add_argument("-p", dest="progress", action="store_true", help="show progress")
    p.add_argument("-q", dest="quiet", action="store_true", help="quiet")
    p.add_argument("filename")
    p.set_defaults(func=run)



def run(args) -> int:
    from ..ops.commit import commit

    progress = ProgressPrinter() if args.progress and not args.quiet else None
    commit(args.filename, format=args.format, base=args.base, keep=args.keep,
           progress=progress)
    if progress is not None:
        progress.done()
    if not args.quiet:
        print("Image committed.")
    return 0
