"""qcow2 amend [-f FMT] [-t CACHE] -o OPTIONS [--force] [-p] [-q] FILE"""

from __future__ import annotations

import sys

from ..errors import InvalidOptionError, Qcow2Error, UnsupportedFeatureError
from .common import (READ_ONLY_DRIVERS, add_cache, add_format, add_progress, add_quiet,
                     gather_options, progress_for, report_error)


def add_parser(sub):
    p = sub.add_parser("amend", help="change image options (like qemu-img amend)")
    add_format(p)
    add_cache(p)
    p.add_argument("-o", dest="options", action="append", default=[],
                   help="options to change (key=value,...; 'help' lists them)")
    p.add_argument("--force", action="store_true",
                   help="allow unsafe key slot changes (encrypt.*)")
    p.add_argument("--image-opts", dest="image_opts", action="store_true",
                   help="the image name is block options (driver=qcow2,file.filename=PATH)")
    add_progress(p, help="show progress (as qemu-img counts the work of each change)")
    add_quiet(p)
    p.add_argument("filename", nargs="?")
    p.set_defaults(func=run)


def run(args) -> int:
    from ..ops.amend import amend
    from ..options import amend_help_text, wants_help

    opts = gather_options(args.options)
    if wants_help(opts):
        fmt = args.format
        if fmt is None:
            if not args.filename:
                raise InvalidOptionError("Expecting one image file name")
            fmt = _probe(args.filename)
        if fmt != "qcow2":
            if fmt == "raw" or fmt in READ_ONLY_DRIVERS:
                raise UnsupportedFeatureError(f"Format driver '{fmt}' does not support option "
                                              f"amendment", feature=f"amend {fmt}")
            raise UnsupportedFeatureError(f"Unknown file format '{fmt}'",
                                          feature=f"format {fmt}")
        sys.stdout.write(amend_help_text(fmt))
        return 0
    if not args.filename:
        raise InvalidOptionError("Expecting one image file name")
    if not args.options:
        raise InvalidOptionError("Must specify options (-o)")
    progress = progress_for(args)
    if progress is None:
        amend(args.filename, opts, format=args.format, force=args.force, cache=args.cache)
        return 0
    # qemu-img's order: 0, the work, 100 (also when amend failed), the error, the newline
    progress(0.0)
    try:
        amend(args.filename, opts, format=args.format, force=args.force, progress=progress,
              cache=args.cache)
    except Qcow2Error as exc:
        progress(100.0)
        report_error(exc)
        progress.done()
        return getattr(exc, "exit_code", 1)
    except BaseException:
        progress(100.0)
        progress.done()
        raise
    progress(100.0)
    progress.done()
    return 0


def _probe(filename: str) -> str:
    import qcow2
    with qcow2.open(filename, backing=False, force_share=True) as img:
        return img.format
