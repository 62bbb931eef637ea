"""qcow2 rebase [-f FMT] [-u] [-b BACKING] [-F FMT] [-p] [-q] [-U] FILE"""

from __future__ import annotations

from .common import ProgressPrinter, add_format, add_share


def add_parser(sub):
    p = sub.add_parser("rebase", help="change the backing file (like qemu-img rebase)")
    add_format(p)
    p.add_argument("-u", dest="unsafe", action="store_true",
                   help="only rewrite the header (no data copied)")
    p.add_argument("-b", dest="backing_file", default=None,
                   help="new backing file ('' flattens the image)")
    p.add_argument("-F", dest="backing_format", default=None, help="its format")
    p.add_argument("-p", dest="progress", action="store_true", help="show progress")
    p.add_argument("-q", dest="quiet", action="store_true", help="quiet")
    add_share(p)
    p.add_argument("filename")
    p.set_defaults(func=run)



def run(args) -> int:
    from ..errors import InvalidOptionError
    from ..ops.rebase import rebase

    progress = ProgressPrinter() if args.progress and not args.quiet else None
    if args.backing_file is None and not args.unsafe:
        raise InvalidOptionError("Must specify backing file (-b)")
    rebase(args.filename, args.backing_file or "", format=args.format,
           backing_format=args.backing_format, unsafe=args.unsafe,
           progress=progress,
           force_share=args.force_share)
    if progress is not None:
        progress.done()
    return 0
