"""qcow2 amend [-f FMT] -o OPTIONS [--force] [-p] [-q] FILE"""

from __future__ import annotations

from ..errors import InvalidOptionError
from .common import add_file, add_format, add_progress, add_quiet


def add_parser(sub):
    p = sub.add_parser("amend", help="change image options (like qemu-img amend)")
    add_format(p)
    p.add_argument("-o", dest="options", action="append", default=[],
                   help="options to change (key=value,...)")
    p.add_argument("--force", action="store_true", help="accepted for compatibility")
    add_progress(p, help="accepted")
    add_quiet(p)
    add_file(p, run)


def run(args) -> int:
    from ..ops.amend import amend
    from ..units import parse_option_list

    if not args.options:
        raise InvalidOptionError("Must specify options (-o)")
    opts = {}
    for text in args.options:
        opts.update(parse_option_list(text))
    amend(args.filename, opts, format=args.format, force=args.force)
    return 0
