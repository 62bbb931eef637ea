"""qcow2 create [-f FMT] [-b BACKING] [-F BACKING_FMT] [-o OPTIONS] [-u] [-q] FILE [SIZE]

Like ``qemu-img create``: ``-o`` takes ``key=value,key=value`` (``,,`` is a literal
comma, a bare ``key`` means ``key=on``, ``-o help`` lists the options) and may be
repeated; ``-b``/``-F`` win over ``backing_file``/``backing_fmt`` in ``-o``.  The
"Formatting ..." line is printed (unless ``-q``) once the generic checks pass and
before the format's own checks, as qemu-img 7.2 does.  The format defaults to qcow2
(qemu-img defaults to raw).
"""

from __future__ import annotations

import sys

from ..errors import Qcow2Error
from .common import add_quiet, creatable_format, gather_options


def add_parser(sub):
    p = sub.add_parser("create", help="create an image (like qemu-img create)")
    p.add_argument("-f", dest="format", default="raw",
                   help="image format (qcow2 or raw; raw when omitted, as qemu-img)")
    p.add_argument("-b", dest="backing_file", default=None, help="backing file name")
    p.add_argument("-F", dest="backing_format", default=None, help="backing file format")
    p.add_argument("-o", dest="options", action="append", default=[],
                   help="options: key=value[,key=value...] ('-o help' lists them)")
    p.add_argument("-u", dest="unsafe", action="store_true",
                   help="do not open the backing file (a size is then required)")
    add_quiet(p, help="quiet: print nothing")
    p.add_argument("filename", nargs="?")
    p.add_argument("size", nargs="?")
    p.set_defaults(func=run)


def run(args) -> int:
    from ..creator import prepare
    from ..options import help_text, parse_size_arg, parse_size_option, wants_help

    options = gather_options(args.options)
    if wants_help(options):
        fmt = creatable_format(args.format)
        sys.stdout.write(help_text(fmt, protocol=args.filename is not None))
        return 0
    if not args.filename:
        raise Qcow2Error("Expecting image file name")
    size = args.size
    if size is not None:
        size = parse_size_arg(size)
    if "size" in options:
        if size is not None:
            raise Qcow2Error(f"{args.filename}: The image size must be specified only once")
        size = options.pop("size")
        try:
            size = parse_size_option("size", size)        # QemuOpts' syntax and message
        except Qcow2Error as exc:
            exc.args = (f"{args.filename}: {exc}",)
            raise
    backing_file = options.pop("backing_file", None)
    if args.backing_file is not None:
        backing_file = args.backing_file
    backing_format = options.pop("backing_fmt", None)
    if args.backing_format is not None:
        backing_format = args.backing_format
    path = args.filename
    if path.startswith("file:"):                  # the explicit file protocol prefix
        from ..imageopts import file_path
        path = file_path(path)
    try:
        if backing_file == "":
            raise Qcow2Error("Expected backing file name, got empty string")
        req = prepare(path, size, format=args.format, backing_file=backing_file,
                      backing_format=backing_format, unsafe=args.unsafe, **options)
        if not args.quiet:
            line = req.formatting_line()
            if path != args.filename:             # named as the user named it
                line = line.replace(f"Formatting '{path}'", f"Formatting '{args.filename}'", 1)
            sys.stdout.write(line + "\n")
            sys.stdout.flush()
        req.run()
        _file_hints(path, req.options)
    except Qcow2Error as exc:
        # qemu-img names the file first: "qemu-img: FILE: message"
        exc.args = (f"{args.filename}: {exc}",) + tuple(exc.args[1:])
        lines = getattr(exc, "lines", None)
        if lines:
            exc.lines = [f"{args.filename}: {lines[0]}", *lines[1:]]
        raise
    return 0


def _file_hints(path: str, options: dict) -> None:
    """The file protocol's hints on the new file (best effort, as QEMU's file driver)."""
    if not options.get("nocow") and not options.get("extent_size_hint"):
        return
    from ..ops.filehints import apply_file_hints
    from .common import error_line
    warning = apply_file_hints(path, nocow=bool(options.get("nocow")),
                               extent_size_hint=options.get("extent_size_hint"))
    if warning:
        error_line(f"warning: {warning}")
