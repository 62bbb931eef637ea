"""qcow2 compare [-f FMT] [-F FMT] [-T CACHE] [-p] [-q] [-s] [-U] A B

Exit status and text as ``qemu-img compare``: 0 and "Images are identical.", 1 and
"Content mismatch at offset N!" (with -s also "Strict mode: Image size mismatch!" or
"Strict mode: Offset N block status mismatch!"), preceded by "Warning: Image size
mismatch!" when the sizes differ and the common part is identical; on errors one line
on stderr and 2 (cannot open), 3 (allocation map unreadable) or 4 (read error).
"""

from __future__ import annotations

import sys

from ..errors import Qcow2Error
from .common import (add_progress, add_quiet, add_share, add_untrusted, end_progress,
                     progress_for, report_error)

_CACHE_MODES = ("none", "writeback", "unsafe", "writethrough", "directsync")


def add_parser(sub):
    p = sub.add_parser("compare", help="compare the guest data of two images "
                                       "(like qemu-img compare)")
    p.add_argument("-f", dest="fmt_a", default=None, help="format of the first image")
    p.add_argument("-F", dest="fmt_b", default=None, help="format of the second image")
    p.add_argument("-T", dest="cache", default="writeback", help="source cache mode")
    add_progress(p)
    add_quiet(p, help="print nothing")
    p.add_argument("-s", dest="strict", action="store_true",
                   help="strict: sizes and block status must match too")
    add_share(p)
    add_untrusted(p)
    p.add_argument("image_a")
    p.add_argument("image_b")
    p.set_defaults(func=run)


def run(args) -> int:
    from ..ops.compare import compare_images

    if args.cache not in _CACHE_MODES:
        err = Qcow2Error(f"Invalid source cache option: {args.cache}")
        err.exit_code = 2  # type: ignore[attr-defined]
        raise err
    out = sys.stdout
    progress = progress_for(args, out)

    # one open per image, scanned first when untrusted (no gap between check and use)
    try:
        res = compare_images(args.image_a, args.image_b, fmt_a=args.fmt_a, fmt_b=args.fmt_b,
                             strict=args.strict, progress=progress,
                             force_share=args.force_share, untrusted=args.untrusted)
    except Qcow2Error as exc:
        sizes = getattr(exc, "sizes", None)
        if (sizes and sizes[0] != sizes[1] and not args.strict and not args.quiet
                and getattr(exc, "offset", -1) >= min(sizes)):
            # the common part compared equal, so qemu-img has warned (on stdout, which
            # reaches a pipe at its exit: after the error line)
            report_error(exc)
            out.write("Warning: Image size mismatch!\n")
            return getattr(exc, "exit_code", 1)
        raise
    end_progress(progress)
    common = min(res.size_a, res.size_b)
    lines = []
    m = res.mismatch
    if m is not None and m.reason == "size":
        lines.append("Strict mode: Image size mismatch!")
    elif m is not None and m.reason == "block status":
        lines.append(f"Strict mode: Offset {m.offset} block status mismatch!")
    else:
        if res.size_a != res.size_b and (m is None or m.offset >= common):
            lines.append("Warning: Image size mismatch!")
        lines.append("Images are identical." if m is None else
                     f"Content mismatch at offset {m.offset}!")
    if not args.quiet:
        out.write("".join(line + "\n" for line in lines))
    return 0 if m is None else 1
