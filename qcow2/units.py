"""qemu-img's syntaxes -- sizes (bytes, or a number with a k/M/G/T/P/E suffix) and
``-o key=value,...`` option lists -- and the rounding of sizes to units."""

from __future__ import annotations

from .errors import InvalidOptionError, Qcow2Error

_SUFFIX = {"b": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40,
           "p": 1 << 50, "e": 1 << 60}
# QEMU's qemu_strtosz: decimal with an optional fraction, or 0x hex without one; then
# an optional suffix (b, k, M, G, T, P, E; any case).  (re and fractions are imported
# on first use: the common sizes, digits with an optional suffix, need neither, and
# their imports were ~6 ms of every create and resize)
_SIZE_PATTERN = r"\s*\+?(?:(0[xX][0-9a-fA-F]+)|(\d+)(\.\d*)?)([bkmgtpe]?)"
SUFFIX_WORDS = ("You may use k, M, G, T, P or E suffixes for",
                "kilobytes, megabytes, gigabytes, terabytes, petabytes and exabytes.")


def ceil_div(n: int, unit: int) -> int:
    """How many ``unit``-sized pieces hold ``n`` (n >= 0): n / unit rounded up."""
    return -(-n // unit)


def round_up(n: int, unit: int) -> int:
    """``n`` rounded up to a multiple of ``unit``."""
    return ceil_div(n, unit) * unit


def strtosz(text: str) -> int:
    """qemu's size syntax (qemu_strtosz): bytes in decimal or 0x hex, or a number with
    a suffix (binary multiples); a fraction needs a suffix other than b and is rounded
    half up to bytes ("1.0005k" is 1025).  ValueError when ``text`` is not one,
    OverflowError when it is 2^64 or more."""
    head, last = text[:-1], text[-1:]
    if text.isascii() and text.isdigit():                   # bytes: "21474836480"
        val = int(text)
    elif head.isascii() and head.isdigit() and last.lower() in _SUFFIX:  # "20G"
        val = int(head) * _SUFFIX[last.lower()]
    else:
        val = _strtosz_general(text)
    if val >= 1 << 64:
        raise OverflowError(text)
    return val


def _strtosz_general(text: str) -> int:
    import re
    from fractions import Fraction

    m = re.fullmatch(_SIZE_PATTERN, text, re.I)
    if not m:
        raise ValueError(text)
    hexa, whole, frac, suf = m.groups()
    mult = _SUFFIX.get(suf.lower(), 1)
    if hexa is not None:
        val = int(hexa, 16) * mult
    else:
        exact = int(whole) + (Fraction(frac[1:] or "0") / 10 ** len(frac[1:]) if frac else 0)
        if mult == 1 and exact != int(whole):
            raise ValueError(text)
        val = int(exact * mult + Fraction(1, 2))
    return val


def size_error(what: str) -> InvalidOptionError:
    """qemu-img's refusal of a size argument that is not one: "Invalid WHAT specified.
    You may use k, M, G, ... suffixes" (printed by the CLI on two lines, as qemu-img
    does: ``.lines``)."""
    first = f"Invalid {what} specified. {SUFFIX_WORDS[0]}"
    err = InvalidOptionError(f"{first} {SUFFIX_WORDS[1]}")
    err.lines = [first, SUFFIX_WORDS[1]]  # type: ignore[attr-defined]
    return err


def check_range(what: str, value: int, lo: int, hi: int) -> int:
    """``value`` if lo <= value <= hi, else qemu-img's refusal ("Invalid WHAT
    specified. Must be between LO and HI.")."""
    if not lo <= value <= hi:
        raise InvalidOptionError(f"Invalid {what} specified. Must be between {lo} and {hi}.")
    return value


def cvtnum(what: str, text: str, lo: int = 0, hi: int = (1 << 63) - 1) -> int:
    """qemu-img's cvtnum_full: ``text`` in the size syntax (:func:`strtosz`), within
    [lo, hi]; refused in qemu-img's words when it is not a size or out of range."""
    try:
        value = strtosz(text)
    except ValueError:
        raise size_error(what) from None
    except OverflowError:
        value = 1 << 64
    return check_range(what, value, lo, hi)


def parse_size(text, *, what: str = "size") -> int:
    """qemu-img's size syntax (see :func:`strtosz`), below 2^63."""
    if isinstance(text, int) and not isinstance(text, bool):
        if text < 0:
            raise InvalidOptionError(f"Invalid {what} specified: {text}")
        return text
    try:
        val = strtosz(str(text))
    except ValueError:
        raise InvalidOptionError(f"Invalid {what} specified: {text!r}. {SUFFIX_WORDS[0]} "
                                 f"{SUFFIX_WORDS[1]}") from None
    except OverflowError:
        val = 1 << 64
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
