"""qcow2 snapshot [-f FMT] [-l | -c NAME | -a NAME | -d NAME] [-U] [-q] FILE"""

from __future__ import annotations

from ..errors import InvalidOptionError
from .common import add_file, add_format, add_quiet, add_share


def add_parser(sub):
    p = sub.add_parser("snapshot", help="list, create, apply or delete internal snapshots "
                                        "(like qemu-img snapshot)")
    add_format(p)
    g = p.add_mutually_exclusive_group()
    g.add_argument("-l", dest="list", action="store_true", help="list snapshots")
    g.add_argument("-c", dest="create", metavar="NAME", help="create a snapshot")
    g.add_argument("-a", dest="apply", metavar="NAME", help="revert to a snapshot")
    g.add_argument("-d", dest="delete", metavar="NAME", help="delete a snapshot")
    add_quiet(p)
    add_share(p)
    add_file(p, run)


def run(args) -> int:
    from ..ops import snapshot as ops
    from .output import snapshot_table

    if args.create is not None:
        ops.create_snapshot(args.filename, args.create, format=args.format)
    elif args.apply is not None:
        ops.apply_snapshot(args.filename, args.apply, format=args.format)
    elif args.delete is not None:
        ops.delete_snapshot(args.filename, args.delete, format=args.format)
    elif args.list:
        snaps = ops.list_snapshots(args.filename, format=args.format,
                                   force_share=args.force_share)
        if snaps:                       # (qemu-img prints nothing for no snapshots)
            for line in snapshot_table(snaps):
                print(line)
    else:
        raise InvalidOptionError("Expecting one of -l, -c, -a or -d")
    return 0
