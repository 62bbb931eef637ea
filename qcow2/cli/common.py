"""Argument helpers shared by the subcommands."""

from __future__ import annotations

import re

from ..errors import Qcow2Error

_SUFFIX = {"": 1, "b": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40,
           "p": 1 << 50, "e": 1 << 60}
_SIZE_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([bkmgtpe]?)\s*$", re.I)


def parse_size(text: str, *, what: str = "size") -> int:
    """qemu-img's size syntax: bytes, or a number with k, M, G, T, P, E suffix."""
    m = _SIZE_RE.match(str(text))
    if not m:
        raise Qcow2Error(f"Invalid {what} specified: {text!r}. You may use k, M, G, T, P "
                         f"or E suffixes for kilobytes, megabytes, gigabytes, terabytes, "
                         f"petabytes and exabytes.")
    num, suf = m.groups()
    mult = _SUFFIX[suf.lower()]
    if "." in num:
        if mult == 1:
            raise Qcow2Error(f"Invalid {what} specified: {text!r}")
        val = int(float(num) * mult)
    else:
        val = int(num) * mult
    if val >= 1 << 63:
        raise Qcow2Error(f"Invalid {what} specified: {text!r} is too large")
    return val


def add_output(p) -> None:
    p.add_argument("--output", choices=("human", "json"), default="human",
                   help="output format")


def add_format(p, flag: str = "-f", dest: str = "format") -> None:
    p.add_argument(flag, dest=dest, choices=("qcow2", "raw"), default=None,
                   help="image format (probed when omitted)")


def add_share(p) -> None:
    p.add_argument("-U", "--force-share", dest="force_share", action="store_true",
                   help="open the image with shared permissions")


def add_untrusted(p) -> None:
    p.add_argument("--untrusted", action="store_true",
                   help="open nothing but the named file (no backing or data files)")
