"""qemu-img's syntaxes -- sizes (bytes, or a number with a k/M/G/T/P/E suffix) and
``-o key=value,...`` option lists -- and the rounding of sizes to units."""

from __future__ import annotations

import re

from .errors import InvalidOptionError, Qcow2Error

_SUFFIX = {"": 1, "b": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40,
           "p": 1 << 50, "e": 1 << 60}
# (compiled on first use, by re's cache: importing this module stays cheap for the
# operations that only round)
_SIZE_PATTERN = r"^\s*(0[xX][0-9a-fA-F]+|\d+(?:\.\d+)?)\s*([bkmgtpe]?)\s*$"


def ceil_div(n: int, unit: int) -> int:
    """How many ``unit``-sized pieces hold ``n`` (n >= 0): n / unit rounded up."""
    return -(-n // unit)


def round_up(n: int, unit: int) -> int:
    """``n`` rounded up to a multiple of ``unit``."""
    return ceil_div(n, unit) * unit


def parse_size(text, *, what: str = "size") -> int:
    """qemu-img's size syntax: bytes (decimal or 0x hex), or a number with a k, M, G,
    T, P or E suffix (binary multiples); fractions only with a suffix."""
    if isinstance(text, int) and not isinstance(text, bool):
        if text < 0:
            raise InvalidOptionError(f"Invalid {what} specified: {text}")
        return text
    m = re.match(_SIZE_PATTERN, str(text), re.I)
    if not m:
        raise InvalidOptionError(f"Invalid {what} specified: {text!r}. You may use k, M, G, "
                                 f"T, P or E suffixes for kilobytes, megabytes, gigabytes, "
                                 f"terabytes, petabytes and exabytes.")
    num, suf = m.groups()
    mult = _SUFFIX[suf.lower()]
    if num[:2].lower() == "0x":
        val = int(num, 16) * mult
    elif "." in num:
        if mult == 1:
            raise InvalidOptionError(f"Invalid {what} specified: {text!r}")
        val = int(float(num) * mult)
    else:
        val = int(num) * mult
    if val >= 1 << 63:
        raise InvalidOptionError(f"Invalid {what} specified: {text!r} is too large")
    return val


def parse_option_list(text: str) -> dict[str, str]:
    """qemu's ``key=value,key=value`` syntax; ``,,`` is a literal comma, a bare ``key``
    is ``key=on``; a later key wins.  An empty item is an error, as in qemu-img."""
    items: list[str] = []
    cur: list[str] = []
    i = 0
    while i < len(text):
        ch = text[i]
        if ch == ",":
            if text.startswith(",,", i):
                cur.append(",")
                i += 2
                continue
            items.append("".join(cur))
            cur = []
        else:
            cur.append(ch)
        i += 1
    items.append("".join(cur))
    out: dict[str, str] = {}
    for item in items:
        key, eq, value = item.partition("=")
        if not key:
            raise Qcow2Error(f"Invalid option list: {text}")
        out[key] = value if eq else "on"
    return out
