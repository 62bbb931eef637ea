"""qcow2 check [-f FMT] [-r leaks|all] [--output=human|json] [-U] [-q] FILE

Exit status as qemu-img: 0 no problems, 1 the check could not complete (or had
internal errors), 2 corruptions, 3 leaked clusters only, 63 the format has no checks.
Per-problem messages go to stderr, the summary to stdout.
"""

from __future__ import annotations

import sys

from ..errors import UnsafeImageError
from .common import add_format, add_output, add_share, add_untrusted


def add_parser(sub):
    p = sub.add_parser("check", help="check (and repair) an image's consistency "
                                     "(like qemu-img check)")
    add_format(p)
    add_output(p)
    add_share(p)
    add_untrusted(p)
    p.add_argument("-r", "--repair", default=None, metavar="leaks|all",
                   help="repair leaked clusters, or all errors (opens the image read-write)")
    p.add_argument("-q", "--quiet", action="store_true", help="print only errors")
    p.add_argument("filename")
    p.set_defaults(func=run)


def _stderr_line(msg: str) -> None:
    sys.stderr.write(msg + "\n")
    sys.stderr.flush()


def run(args) -> int:
    from ..ops.check import CheckFailedError, check, exit_status, format_human, format_repaired
    from .output import qemu_json

    if args.untrusted and args.repair:
        raise UnsafeImageError("an untrusted image is never repaired in place "
                               "(--untrusted with -r)")
    try:
        # untrusted: one open, scanned, then checked (no gap for a swapped file)
        result = check(args.filename, format=args.format, repair=args.repair,
                       force_share=args.force_share, log=_stderr_line,
                       untrusted=args.untrusted)
    except CheckFailedError as exc:
        if exc.repaired and args.output == "human" and not args.quiet:
            sys.stdout.write(format_repaired(exc.repaired))     # as qemu-img, before failing
            sys.stdout.flush()
        raise
    if not args.quiet:
        if args.output == "json":
            print(qemu_json(result))
        else:
            sys.stdout.write(format_human(result))
        sys.stdout.flush()
    status = exit_status(result)
    if status == 1:
        _stderr_line("qcow2: Check failed")
    return status
