"""qcow2 resize [-f FMT] [--shrink] [--preallocation=off|metadata|falloc|full] [-q]
             FILE [+|-]SIZE"""

from __future__ import annotations

from .common import add_format, add_quiet


def add_parser(sub):
    p = sub.add_parser("resize", help="grow or shrink an image (like qemu-img resize)")
    add_format(p)
    p.add_argument("--shrink", action="store_true", help="allow shrinking")
    p.add_argument("--preallocation", default="off",
                   choices=("off", "metadata", "falloc", "full"))
    add_quiet(p)
    p.add_argument("--image-opts", dest="image_opts", action="store_true",
                   help="the image name is block options (driver=qcow2,file.filename=PATH)")
    p.add_argument("filename")
    p.add_argument("size", help="new size, or +SIZE / -SIZE relative to the current one")
    p.set_defaults(func=run)


def run(args) -> int:
    from ..ops.resize import resize

    resize(args.filename, args.size, format=args.format, shrink=args.shrink,
           preallocation=args.preallocation)
    if not args.quiet:
        print("Image resized.")
    return 0
