"""qcow2 measure [--output=human|json] [-O FMT] [-o OPTIONS]
                 [--size SIZE | [-f FMT] [-l SNAPSHOT] [-U] FILE]

Prints what ``qemu-img measure`` prints, in the same layout::

    required size: 524288
    fully allocated size: 10813440
    bitmaps size: 0                   (qcow2 v3 output of a qcow2 v3 input only)

The output format defaults to qcow2 (qemu-img defaults to raw), as ``qcow2 create`` does.
"""

from __future__ import annotations

import sys

from ..errors import Qcow2Error
from .common import add_format, add_output, add_share, add_untrusted, gather_options, snapshot_arg


def add_parser(sub):
    p = sub.add_parser("measure", help="space an image needs in a format (like qemu-img measure)")
    add_output(p)
    p.add_argument("-O", dest="out_format", default="raw",
                   help="output format (qcow2 or raw; raw when omitted, as qemu-img)")
    p.add_argument("-o", dest="options", action="append", default=[],
                   help="output options: key=value[,key=value...] ('-o help' lists them)")
    p.add_argument("--size", default=None, help="virtual size instead of an input image")
    add_format(p)
    p.add_argument("-l", dest="snapshot", default=None,
                   help="measure an internal snapshot (id, name, or snapshot.id=/snapshot.name=)")
    add_share(p)
    add_untrusted(p)
    p.add_argument("filenames", nargs="*", metavar="FILE")
    p.set_defaults(func=run)


def run(args) -> int:
    from ..ops.measure import measure
    from .output import qemu_json

    if len(args.filenames) > 1:
        raise Qcow2Error("At most one filename argument is allowed.")
    # (qemu-img measure has no -o help: "help" is refused as an unknown option)
    options = gather_options(args.options)
    info = measure(args.filenames[0] if args.filenames else None, size=args.size,
                   fmt=args.format, out_format=args.out_format, options=options,
                   snapshot=snapshot_arg(args.snapshot), force_share=args.force_share,
                   untrusted=args.untrusted)
    if args.output == "json":
        sys.stdout.write(qemu_json(info) + "\n")
    else:
        sys.stdout.write(f"required size: {info['required']}\n"
                         f"fully allocated size: {info['fully-allocated']}\n")
        if "bitmaps" in info:
            sys.stdout.write(f"bitmaps size: {info['bitmaps']}\n")
    return 0
