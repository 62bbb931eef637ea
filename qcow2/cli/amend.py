"""qcow2 amend [-f FMT] -o OPTIONS [--force] [-p] [-q] FILE"""

from __future__ import annotations

from ..errors import InvalidOptionError
from .common import add_format


def add_parser(sub):
    p = sub.add_parser("amend", help="change image options (like qemu-img amend)")
    add_format(p)
    p.add_argument("-o", dest="options", action="append", default=[],
                   help="options to change (key=value,...)")
    p.add_argument("--force", action="store_true", help="accepted for compatibility")
    p.add_argument("-p", dest="progress", action="store_true", help="accepted")
    p.add_argument("-q", dest="quiet", action="store_true", help="quiet")
    p.add_argument("filename")
    p.set_defaults(func=run)


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
