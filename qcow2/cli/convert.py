"""qcow2 convert [-f FMT] [-O FMT] [-c] [-o OPTIONS] [-S SIZE] [-n] [--target-is-zero]
[-B BACKING] [-F BACKING_FMT] [-l SNAPSHOT] [-m N] [-W] [-t CACHE] [-T CACHE] [-r RATE]
[-p] [-U] SRC... DST"""

from __future__ import annotations

import sys

from ..errors import InvalidOptionError
from ..units import parse_size
from .common import (add_format, add_progress, add_quiet, add_rate, add_share,
                     add_untrusted, creatable_format, end_progress, gather_options,
                     parse_rate, progress_for, snapshot_arg)


def add_parser(sub):
    p = sub.add_parser("convert", help="convert an image (like qemu-img convert)")
    add_format(p)
    p.add_argument("-O", dest="out_format", default="raw", metavar="FMT",
                   help="output format: raw or qcow2")
    p.add_argument("-c", dest="compress", action="store_true", help="compress the output")
    p.add_argument("-o", dest="options", action="append", default=[],
                   help="output creation options (key=value,...)")
    p.add_argument("-S", dest="sparse_size", default=None,
                   help="minimum run of zeros to leave unwritten (0: write everything)")
    p.add_argument("-n", dest="no_create", action="store_true",
                   help="do not create the output: write into an existing image")
    p.add_argument("--target-is-zero", action="store_true",
                   help="with -n: the target reads as zeros already")
    p.add_argument("-B", dest="backing_file", default=None, help="backing file of the output")
    p.add_argument("-F", dest="backing_format", default=None, help="format of that backing file")
    p.add_argument("-t", dest="cache", default="writeback", help="output cache mode")
    p.add_argument("-T", dest="src_cache", default="writeback", help="source cache mode")
    p.add_argument("-m", dest="workers", type=int, default=None, help="parallel workers")
    add_rate(p)
    p.add_argument("-W", dest="out_of_order", action="store_true",
                   help="allow out-of-order writes")
    p.add_argument("-C", dest="copy_offload", action="store_true",
                   help="copy offloading (copy_file_range): used whenever possible anyway; "
                        "refused with -S, -c and --salvage as in qemu-img")
    p.add_argument("--bitmaps", action="store_true",
                   help="copy the source's persistent bitmaps (qcow2 to qcow2)")
    p.add_argument("--skip-broken-bitmaps", dest="skip_broken_bitmaps", action="store_true",
                   help="with --bitmaps: leave out the bitmaps in use")
    p.add_argument("--salvage", action="store_true",
                   help="go on past read errors: unreadable sectors are written as zeros")
    add_progress(p)
    add_quiet(p)
    p.add_argument("-l", dest="snapshot", default=None, help="read an internal snapshot")
    add_share(p)
    add_untrusted(p)
    p.add_argument("--max-output", default=None, metavar="SIZE",
                   help="refuse to produce more than SIZE bytes of output")
    p.add_argument("--target-image-opts", dest="target_image_opts", action="store_true",
                   help="with -n: DST is block options (driver=qcow2,file.filename=PATH"
                        "[,encrypt.key-secret=ID])")
    p.add_argument("files", nargs="*", metavar="SRC... DST")
    p.set_defaults(func=run)


def run(args) -> int:
    from ..ops.convert import convert
    from ..options import help_text, wants_help

    options = gather_options(args.options)
    _check_flags(args)
    rate = parse_rate(args.rate_limit)
    if wants_help(options):
        fmt = creatable_format(args.out_format)
        sys.stdout.write(help_text(fmt, protocol=len(args.files) >= 2))
        return 0
    if len(args.files) < 2:
        raise InvalidOptionError("Expecting image file name" if args.files else
                                 "Must specify image file name")
    *srcs, dst = args.files
    if args.target_image_opts:
        if not args.no_create:
            raise InvalidOptionError("--target-image-opts requires use of -n flag")
        from ..imageopts import options_name
        dst, driver = options_name(dst)
        args.out_format = driver or args.out_format
    progress = progress_for(args)
    convert(srcs if len(srcs) > 1 else srcs[0], dst, src_format=args.format,
            out_format=args.out_format, compress=args.compress, options=options or None,
            sparse_size=_sparse_size(args.sparse_size), cache=args.cache,
            workers=args.workers, out_of_order=args.out_of_order, no_create=args.no_create,
            target_is_zero=args.target_is_zero, backing_file=args.backing_file,
            backing_format=args.backing_format, progress=progress, untrusted=args.untrusted,
            force_share=args.force_share, snapshot=snapshot_arg(args.snapshot),
            bitmaps=args.bitmaps, skip_broken_bitmaps=args.skip_broken_bitmaps,
            salvage=_warn if args.salvage else None,
            max_output=(parse_size(args.max_output, what="max output")
                        if args.max_output is not None else None),
            rate_limit=rate)
    end_progress(progress)
    return 0


def _check_flags(args) -> None:
    """qemu-img's refusals of -C with what it cannot combine with."""
    if args.copy_offload:
        if args.compress:
            raise InvalidOptionError("Cannot enable copy offloading when -c is used")
        if args.sparse_size is not None:
            raise InvalidOptionError("Cannot enable copy offloading when -S is used")
        if args.salvage:
            raise InvalidOptionError("Cannot use copy offloading in salvaging mode")


def _sparse_size(text) -> int:
    """-S in bytes (4 KiB when not given): qemu-img's syntax and message."""
    from ..units import size_error, strtosz
    if text is None:
        return 4096
    try:
        return strtosz(text)
    except (ValueError, OverflowError):
        raise size_error("buffer size for sparse output") from None


def _warn(message: str) -> None:
    from .common import error_line
    error_line(f"warning: {message}")
