"""qcow2 check [-f FMT] [-r leaks|all] [--output=human|json] [-T SRC_CACHE] [-U] [-q] FILE

Exit status as qemu-img: 0 no problems, 1 the check could not complete (or had
internal errors), 2 corruptions, 3 leaked clusters only, 63 the format has no checks.
Per-problem messages go to stderr, the summary to stdout.
"""

from __future__ import annotations

import sys

from ..errors import UnsafeImageError
from .common import add_cache, add_format, add_output, add_share, add_untrusted, program_name


def add_parser(sub):
    p = sub.add_parser("check", help="check (and repair) an image's consistency "
                                     "(like qemu-img check)")
    add_format(p)
    add_output(p)
    add_share(p)
    add_untrusted(p)
    add_cache(p, "-T", "src_cache", "the image read")
    p.add_argument("-r", "--repair", default=None, metavar="leaks|all",
                   help="repair leaked clusters, or all errors (opens the image read-write)")
    p.add_argument("-q", "--quiet", action="store_true", help="print only errors")
    p.add_argument("filename")
    p.set_defaults(func=run)


#: Check messages qemu-img reports as errors (prefixed with the program's name); the
#: other lines of a check go to stderr as they are.
_REPORTED = ("ERROR failed to read the snapshot table:", "ERROR snapshot table too large")


def _stderr_line(msg: str) -> None:
    if msg.startswith(_REPORTED):
        msg = f"{program_name()}: {msg}"
    sys.stderr.write(msg + "\n")
    sys.stderr.flush()


def exit_status(result: dict) -> int:
    """qemu-img check's exit status for a result: 1 check errors, 2 corruptions,
    3 leaks only, 0 clean."""
    if result.get("check-errors"):
        return 1
    if result.get("corruptions"):
        return 2
    if result.get("leaks"):
        return 3
    return 0


def format_repaired(result: dict) -> str:
    """What `qemu-img check -r` prints before it checks the repaired image again."""
    lf, cf = result.get("leaks-fixed", 0), result.get("corruptions-fixed", 0)
    if not (lf or cf):
        return ""
    return ("The following inconsistencies were found and repaired:\n\n"
            f"    {lf} leaked clusters\n    {cf} corruptions\n\n"
            "Double checking the fixed image now...\n")


def _problems(result: dict) -> list[str]:
    corr = result.get("corruptions", 0)
    leaks = result.get("leaks", 0)
    errs = result.get("check-errors", 0)
    if not (corr or leaks or errs):
        return ["No errors were found on the image.\n"]
    out = []
    if corr:
        out.append(f"\n{corr} errors were found on the image.\nData may be corrupted, or "
                   f"further writes to the image may corrupt it.\n")
    if leaks:
        out.append(f"\n{leaks} leaked clusters were found on the image.\nThis means waste "
                   f"of disk space, but no harm to data.\n")
    if errs:
        out.append(f"\n{errs} internal errors have occurred during the check.\n")
    return out


def format_human(result: dict) -> str:
    """The text `qemu-img check` prints on stdout for a result."""
    out = [format_repaired(result)] + _problems(result)
    total = result.get("total-clusters", 0)
    alloc = result.get("allocated-clusters", 0)
    if total and alloc:
        frag = result.get("fragmented-clusters", 0)
        comp = result.get("compressed-clusters", 0)
        out.append("%d/%d = %0.2f%% allocated, %0.2f%% fragmented, %0.2f%% compressed "
                   "clusters\n" % (alloc, total, alloc * 100.0 / total, frag * 100.0 / alloc,
                                   comp * 100.0 / alloc))
    if result.get("image-end-offset"):
        out.append(f"Image end offset: {result['image-end-offset']}\n")
    return "".join(out)


def run(args) -> int:
    from ..checker import CheckFailedError
    from ..ops.check import check
    from .output import qemu_json

    from ..ops.outputopts import check_cache
    check_cache(args.src_cache, source=True)
    if args.untrusted and args.repair:
        raise UnsafeImageError("an untrusted image is never repaired in place "
                               "(--untrusted with -r)")
    try:
        # untrusted: one open, scanned, then checked (no gap for a swapped file)
        result = check(args.filename, format=args.format, repair=args.repair,
                       force_share=args.force_share, log=_stderr_line,
                       untrusted=args.untrusted)
    except CheckFailedError as exc:
        if exc.repaired and args.output == "human" and not args.quiet:
            sys.stdout.write(format_repaired(exc.repaired))     # as qemu-img, before failing
            sys.stdout.flush()
        raise
    if not args.quiet:
        if args.output == "json":
            print(qemu_json(result))
        else:
            sys.stdout.write(format_human(result))
        sys.stdout.flush()
    status = exit_status(result)
    if status == 1:
        _stderr_line(f"{program_name()}: Check failed")
    return status
