"""qcow2 map [-f FMT] [--output=human|json] [--start-offset=OFFSET] [--max-length=LENGTH] [-U]
FILE"""

from __future__ import annotations

import sys

from ..errors import Qcow2Error
from ..rbdname import is_rbd_name, qemu_filename
from .common import add_file, add_format, add_output, add_share, add_untrusted


def add_parser(sub):
    p = sub.add_parser("map", help="print the allocation map (like qemu-img map)")
    add_format(p)
    add_output(p)
    add_share(p)
    add_untrusted(p)
    p.add_argument("--start-offset", dest="start_offset", default=None, metavar="OFFSET",
                   help="map from this guest offset")
    p.add_argument("--max-length", dest="max_length", default=None, metavar="LENGTH",
                   help="map at most this many bytes")
    add_file(p, run)


def _size_arg(text, what: str) -> int | None:
    """--start-offset/--max-length: qemu-img's size syntax and message."""
    from ..units import size_error, strtosz
    if text is None:
        return None
    try:
        return strtosz(text)
    except (ValueError, OverflowError):
        raise size_error(what) from None


def _hex(v: int) -> str:
    return f"{v:#x}" if v else "0"


def run(args) -> int:
    import qcow2

    out = sys.stdout
    start = _size_arg(args.start_offset, "start offset") or 0
    length = _size_arg(args.max_length, "max length")
    with qcow2.open(args.filename, format=args.format, untrusted=args.untrusted,
                    force_share=args.force_share) as img:
        end = img.size if length is None else min(img.size, start + length)
        if args.output == "json":
            if start >= end:                    # (qemu-img's one empty entry)
                out.write('[{ "start": %d, "length": 0, "depth": 0, "present": false, '
                          '"zero": false, "data": false}]\n' % start)
                return 0
            first = True
            out.write("[")
            for e in img.extents(start, end):
                d = e.as_dict()
                line = ('{ "start": %d, "length": %d, "depth": %d, "present": %s, '
                        '"zero": %s, "data": %s' % (
                            d["start"], d["length"], d["depth"], _b(d["present"]),
                            _b(d["zero"]), _b(d["data"])))
                if "offset" in d:
                    line += ', "offset": %d' % d["offset"]
                out.write(("" if first else ",\n") + line + "}")
                first = False
            out.write("]\n")
            return 0
        chain = img.backing_chain()
        out.write("%-16s%-16s%-16s%s\n" % ("Offset", "Length", "Mapped to", "File"))
        # Human output ignores the difference between zero and unallocated runs and
        # merges them; data runs print with the file that holds them.
        cur = None
        for e in (img.extents(start, end) if start < end else ()):
            if e.data and e.offset is None:
                raise Qcow2Error("File contains external, encrypted or compressed clusters.")
            rec = [e.start, e.length, e.data and not e.zero, e.depth, e.offset]
            if cur is not None and not rec[2] and not cur[2] and cur[0] + cur[1] == rec[0]:
                cur[1] += rec[1]
                continue
            if cur is not None and rec[2] and cur[2] and cur[3] == rec[3] and \
                    cur[0] + cur[1] == rec[0] and cur[4] + cur[1] == rec[4]:
                cur[1] += rec[1]
                continue
            _emit(out, cur, chain)
            cur = rec
        _emit(out, cur, chain)
    return 0


def _emit(out, rec, chain) -> None:
    if rec is None or not rec[2]:
        return
    layer = chain[rec[3]]
    fname = getattr(layer, "data_display_name", None) or layer.filename
    if is_rbd_name(fname):
        fname = qemu_filename(fname)                # the rbd node, as qemu-img shows it
    out.write("%-16s%-16s%-16s%s\n" % (_hex(rec[0]), _hex(rec[1]), _hex(rec[4] or 0), fname))


def _b(v: bool) -> str:
    return "true" if v else "false"
