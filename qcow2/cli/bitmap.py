"""qcow2 bitmap (--add | --remove | --clear | --enable | --disable)... [-g GRANULARITY]
[-f FMT] FILE BITMAP

Like ``qemu-img bitmap``: the actions apply in the order given."""

from __future__ import annotations

import argparse

from ..errors import InvalidOptionError
from .common import add_format, add_image_opts, image_opts_name


class _Action(argparse.Action):
    def __call__(self, parser, namespace, values, option_string=None):
        acts = list(getattr(namespace, "actions", None) or [])
        acts.append(self.const if values is None or self.nargs == 0 else ("merge", values))
        namespace.actions = acts


def add_parser(sub):
    p = sub.add_parser("bitmap", help="change persistent dirty bitmaps (like qemu-img bitmap)")
    add_format(p)
    add_image_opts(p)
    for act in ("add", "remove", "clear", "enable", "disable"):
        p.add_argument(f"--{act}", action=_Action, nargs=0, const=act, dest="actions",
                       help=f"{act} the bitmap")
    p.add_argument("--merge", action=_Action, dest="actions", metavar="SOURCE",
                   help="merge the bitmap SOURCE into this one")
    p.add_argument("-g", "--granularity", default=None, help="granularity of a new bitmap")
    p.add_argument("-b", dest="source_file", default=None,
                   help="the image --merge's source bitmap is in")
    p.add_argument("-F", dest="source_format", default=None, help="the format of -b's image")
    p.add_argument("operands", nargs="*", metavar="FILE BITMAP")
    p.set_defaults(func=run, actions=[])


def run(args) -> int:
    from ..ops.bitmap import bitmap
    from ..units import size_error, strtosz

    actions = list(args.actions)
    if not actions:
        raise InvalidOptionError("Need at least one of --add, --remove, --clear, --enable, "
                                 "--disable, or --merge")
    if args.granularity is not None and "add" not in actions:
        raise InvalidOptionError("granularity only supported with --add")
    if args.source_format is not None and args.source_file is None:
        raise InvalidOptionError("-F only supported with -b")
    if args.source_file is not None and not any(isinstance(a, tuple) for a in actions):
        raise InvalidOptionError("Merge bitmap source file only supported with --merge")
    if len(args.operands) != 2:
        raise InvalidOptionError("Expecting filename and bitmap name")
    gran = None
    if args.granularity is not None:
        try:
            gran = strtosz(args.granularity)
        except (ValueError, OverflowError):
            raise size_error("granularity") from None
    filename, name = args.operands
    if args.image_opts:
        filename = image_opts_name(filename)       # (-f conflicts: refused before)
    bitmap(filename, name, actions, granularity=gran, format=args.format,
           source_file=args.source_file, source_format=args.source_format)
    return 0
