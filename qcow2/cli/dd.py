"""qcow2 dd [-f FMT] [-O OUTPUT_FMT] [-U] [bs=BLOCK_SIZE] [count=BLOCKS] [skip=BLOCKS]
if=INPUT of=OUTPUT

Like ``qemu-img dd``: the operands are ``KEY=VALUE``; sizes take qemu-img's suffixes
(``bs=64k``, ``count=1k`` blocks)."""

from __future__ import annotations

from ..errors import InvalidOptionError
from .common import add_format, add_share


def add_parser(sub):
    p = sub.add_parser("dd", help="copy an image block by block (like qemu-img dd)")
    add_format(p)
    p.add_argument("-O", dest="out_format", default="raw", metavar="FMT",
                   help="output format: raw (default) or qcow2")
    add_share(p)
    p.add_argument("operands", nargs="*", metavar="KEY=VALUE",
                   help="bs=BYTES, count=BLOCKS, skip=BLOCKS, if=INPUT, of=OUTPUT")
    p.set_defaults(func=run)


_NUMBERS = ("bs", "count", "skip")


def run(args) -> int:
    from ..ops.dd import dd
    from ..units import size_error, strtosz
    from .common import creatable_format

    vals: dict = {}
    for op in args.operands:
        key, eq, value = op.partition("=")
        if not eq or key not in _NUMBERS + ("if", "of"):
            raise InvalidOptionError(f"unrecognized operand {key}")
        if key in _NUMBERS:
            try:
                vals[key] = strtosz(value)
            except (ValueError, OverflowError):
                raise size_error(key) from None
        else:
            vals[key] = value
    if not vals.get("if") or not vals.get("of"):
        raise InvalidOptionError("Must specify both input and output files")
    dd(vals["if"], vals["of"], bs=vals.get("bs", 512), count=vals.get("count"),
       skip=vals.get("skip", 0), src_format=args.format,
       out_format=creatable_format(args.out_format), force_share=args.force_share)
    return 0
