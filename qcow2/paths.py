"""File names: which names an image may refer to, how a stored name is resolved, and
how the temporary names of outputs in progress are spelled.

Every module that makes or recognises a temporary output name goes through here, so
the cache manager's stale-temporary sweep and the writers always agree.
"""

from __future__ import annotations

import os

from .errors import UnsafeImageError
from .rbdname import is_rbd_name, parse_rbd_name

#: Suffix of every temporary output we create: ``.<final name>.<random>.part``.
TEMP_SUFFIX = ".part"

_PROTOCOL_FIRST = frozenset("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz")
_PROTOCOL_CHARS = _PROTOCOL_FIRST | frozenset("0123456789+.-")
_TEMP_PATTERN = r"^\.(.+)\.[^.]+\.part$"


def _protocol_prefix(name: str) -> bool:
    """Whether ``name`` starts with ``PROTOCOL:`` (a letter, then letters, digits,
    ``+``, ``.`` or ``-``): ``re`` would cost every process ~5 ms to import."""
    head, colon, _rest = name.partition(":")
    return bool(colon and head and head[0] in _PROTOCOL_FIRST
                and _PROTOCOL_CHARS.issuperset(head))


def check_file_name(name: str, what: str) -> None:
    """Refuse pseudo-file names that would make us open something other than a file
    or an RBD image (``rbd:``, the one protocol we speak; ``untrusted`` mode opens no
    other file at all, whatever its name)."""
    if "\0" in name:
        raise UnsafeImageError(f"{what} {name!r} contains a NUL byte")
    if is_rbd_name(name) or _injects_errors_into_one_file(name):
        return
    if name.startswith("json:") or _protocol_prefix(name):
        raise UnsafeImageError(f"{what} {name!r} uses a protocol prefix or json: "
                               f"pseudo-filename; only plain file names and rbd: names "
                               f"are allowed")


def _injects_errors_into_one_file(name: str) -> bool:
    """A ``json:`` name whose block options are one image file under a blkdebug node
    with rules (QEMU's error injection, for tests): it opens nothing a plain file name
    could not, and no plain name can say it.  Other ``json:`` names stay refused."""
    if not name.startswith("json:"):
        return False
    from .backends.blkdebug import BlkdebugTarget
    from .errors import Qcow2Error
    from .imageopts import resolve_name
    try:
        target, _fmt = resolve_name(name)
    except Qcow2Error:
        return False
    return isinstance(target, BlkdebugTarget) and isinstance(target.path, str)


def combine_path(base_filename: str, name: str) -> str:
    """Resolve a name stored in an image against the image's own folder (QEMU's
    path_combine).  An ``rbd:`` name stands for itself; a relative name stored in an
    image in RBD names another image of its pool, reached the same way."""
    if is_rbd_name(name) or os.path.isabs(name) or name.startswith("json:"):
        return name
    if is_rbd_name(base_filename):
        return str(parse_rbd_name(base_filename).sibling(name))
    return os.path.join(os.path.dirname(base_filename), name)


def temp_name(dst: str) -> str:
    """A fresh hidden temporary name beside ``dst`` (not created)."""
    d = os.path.dirname(os.path.abspath(dst)) or "."
    return os.path.join(d, temp_entry(os.path.basename(dst)))


def temp_entry(name: str) -> str:
    """A fresh temporary name for an entry ``name`` of a folder or a pool (an RBD
    image): ``.<name>.<random>.part``."""
    return f".{name}.{os.urandom(6).hex()}{TEMP_SUFFIX}"


def make_temp(dst: str, directory: str | None = None) -> tuple[int, str]:
    """Create a hidden temporary file for ``dst`` (in ``directory``, default beside
    it); returns ``(fd, path)`` as ``tempfile.mkstemp`` does."""
    import tempfile                     # not at import: ~10 ms of every CLI start

    d = directory or os.path.dirname(os.path.abspath(dst)) or "."
    return tempfile.mkstemp(prefix=f".{os.path.basename(dst)}.", suffix=TEMP_SUFFIX, dir=d)


def temp_owner(entry: str) -> str | None:
    """The final name a temporary output name ``entry`` was made for, or None."""
    import re
    m = re.match(_TEMP_PATTERN, entry)
    return m.group(1) if m else None


def is_temp_for(entry: str, name: str) -> bool:
    """True when ``entry`` is one of our temporary names for the output ``name``."""
    return entry.startswith(f".{name}.") and entry.endswith(TEMP_SUFFIX)
