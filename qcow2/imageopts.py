"""Images named by QEMU's block options rather than by a path: ``json:{...}`` file
names, qemu-img's ``--image-opts`` (``driver=qcow2,file.filename=PATH``) and the
explicit ``file:`` protocol prefix (``file:a:b.qcow2``).

Both describe a tree of block nodes; this engine opens the trees that come down to one
image file: a ``qcow2`` or ``raw`` node over a ``file`` node (or a ``file.filename``
key), optionally through a ``blkdebug`` node (its rules given to
``qcow2.backends.blkdebug``, which the opener puts over the file) or a ``quorum`` node
over files (``qcow2.backends.quorum``), and the ``null-co`` driver (zeros of a size).
:func:`resolve` turns such a name into ``(path, format)`` (the path a
``BlkdebugTarget`` or ``QuorumTarget`` for those nodes); anything else (other drivers
and protocols) is refused with :class:`~qcow2.errors.UnsupportedFeatureError`.  The JSON is
QEMU's dialect: strings may be single-quoted.
"""

from __future__ import annotations

from .backends import Backend
from .errors import InvalidOptionError, UnsupportedFeatureError

_FORMATS = ("qcow2", "raw")
# blkdebug keys that leave the data as it is
_BLKDEBUG_KEYS = ("driver", "align", "set-state", "inject-error", "image", "node-name")


def is_json_name(name) -> bool:
    return isinstance(name, str) and name.startswith("json:")


def is_option_name(name) -> bool:
    """A name that is block options rather than a path: ``json:{...}``, or a path
    behind the explicit ``file:`` protocol prefix."""
    return isinstance(name, str) and (name.startswith("json:") or name.startswith("file:"))


def file_path(name: str) -> str:
    """The path of a ``file:PATH`` name, as QEMU shows it: with ``./`` in front when a
    colon before any slash could read as a protocol prefix (``file:a:b`` is ``./a:b``)."""
    path = name[len("file:"):]
    head = path.split("/", 1)[0]
    return f"./{path}" if ":" in head else path


class _Parser:
    """QEMU's JSON: objects, arrays, strings in single or double quotes, numbers,
    true/false/null."""

    def __init__(self, text: str):
        self.s = text
        self.i = 0

    def fail(self, what: str = "Expecting a JSON value"):
        return InvalidOptionError(f"Could not parse the json: filename: {what} at "
                                  f"character {self.i}")

    def ws(self) -> None:
        while self.i < len(self.s) and self.s[self.i] in " \t\r\n":
            self.i += 1

    def value(self):
        self.ws()
        if self.i >= len(self.s):
            raise self.fail()
        c = self.s[self.i]
        if c == "{":
            return self.obj()
        if c == "[":
            return self.arr()
        if c in "'\"":
            return self.string()
        for word, val in (("true", True), ("false", False), ("null", None)):
            if self.s.startswith(word, self.i):
                self.i += len(word)
                return val
        j = self.i
        while j < len(self.s) and self.s[j] in "+-0123456789.eE":
            j += 1
        if j == self.i:
            raise self.fail()
        text, self.i = self.s[self.i:j], j
        try:
            return float(text) if any(ch in text for ch in ".eE") else int(text)
        except ValueError:
            raise self.fail("Invalid number") from None

    def string(self) -> str:
        quote = self.s[self.i]
        self.i += 1
        out = []
        while self.i < len(self.s):
            c = self.s[self.i]
            self.i += 1
            if c == quote:
                return "".join(out)
            if c == "\\" and self.i < len(self.s):
                e = self.s[self.i]
                self.i += 1
                if e == "u":
                    out.append(chr(int(self.s[self.i:self.i + 4], 16)))
                    self.i += 4
                else:
                    out.append({"n": "\n", "t": "\t", "r": "\r", "b": "\b",
                                "f": "\f"}.get(e, e))
            else:
                out.append(c)
        raise self.fail("Unterminated string")

    def obj(self) -> dict:
        self.i += 1
        out: dict = {}
        self.ws()
        if self.s.startswith("}", self.i):
            self.i += 1
            return out
        while True:
            self.ws()
            if self.i >= len(self.s) or self.s[self.i] not in "'\"":
                raise self.fail("Expecting a key")
            key = self.string()
            self.ws()
            if not self.s.startswith(":", self.i):
                raise self.fail("Expecting ':'")
            self.i += 1
            out[key] = self.value()
            self.ws()
            if self.s.startswith(",", self.i):
                self.i += 1
                continue
            if self.s.startswith("}", self.i):
                self.i += 1
                return out
            raise self.fail("Expecting ',' or '}'")

    def arr(self) -> list:
        self.i += 1
        out: list = []
        self.ws()
        if self.s.startswith("]", self.i):
            self.i += 1
            return out
        while True:
            out.append(self.value())
            self.ws()
            if self.s.startswith(",", self.i):
                self.i += 1
                continue
            if self.s.startswith("]", self.i):
                self.i += 1
                return out
            raise self.fail("Expecting ',' or ']'")


def parse_json_name(name: str) -> dict:
    """The options of a ``json:{...}`` name, flattened to dotted keys (QEMU's
    qdict_flatten: ``{"file": {"filename": X}}`` is ``file.filename=X``)."""
    p = _Parser(name[len("json:"):])
    tree = p.value()
    p.ws()
    if p.i != len(p.s) or not isinstance(tree, dict):
        raise p.fail("Expecting one JSON object")
    return flatten(tree)


def flatten(tree: dict, prefix: str = "") -> dict:
    out: dict = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            out.update(flatten(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def parse_image_opts(text: str) -> dict:
    """``--image-opts`` text (``key=value,...``; ``,,`` a literal comma)."""
    from .units import parse_option_list
    return parse_option_list(text)


def _sub(flat: dict, prefix: str) -> dict:
    return {k[len(prefix):]: v for k, v in flat.items() if k.startswith(prefix)}


def _unsupported(what: str) -> UnsupportedFeatureError:
    return UnsupportedFeatureError(f"{what} is not supported by this engine (block options "
                                   f"naming one qcow2 or raw image file are)",
                                   feature="block options")


def _protocol(flat: dict) -> str:
    """The path of a protocol node's options (``driver=file`` or none, ``filename``)."""
    driver = flat.get("driver", "file")
    if driver == "blkdebug":
        return _blkdebug(flat, _protocol)
    if driver == "quorum":
        return _quorum(flat)
    if driver != "file":
        raise _unsupported(f"Block protocol '{driver}'")
    extra = set(flat) - {"driver", "filename", "locking", "aio", "node-name"}
    if extra:
        raise _unsupported(f"Option '{sorted(extra)[0]}' of the file protocol")
    if not isinstance(flat.get("filename"), str) or not flat["filename"]:
        raise InvalidOptionError("The 'file' block driver requires a file name")
    return flat["filename"]


def _quorum(flat: dict):
    """A quorum node over files: a :class:`~qcow2.backends.quorum.QuorumTarget`."""
    from .backends.quorum import QuorumTarget
    extra = set(flat) - {"driver", "children", "vote-threshold", "node-name"}
    if extra:
        raise _unsupported(f"Option '{sorted(extra)[0]}' of the quorum driver")
    children = flat.get("children")
    if not isinstance(children, list) or not all(isinstance(c, dict) for c in children):
        raise InvalidOptionError("Parameter 'children' expects a list of block nodes")
    paths = [_protocol(flatten(c)) for c in children]
    if not all(isinstance(p, str) for p in paths):
        raise _unsupported("A quorum child other than a file")
    threshold = flat.get("vote-threshold")
    if not isinstance(threshold, int) or isinstance(threshold, bool):
        raise InvalidOptionError("Parameter 'vote-threshold' is missing")
    if not 1 <= threshold <= len(paths):
        raise InvalidOptionError("threshold may not exceed children count")
    return QuorumTarget(paths, threshold)


def _blkdebug(flat: dict, below):
    """What the node below a blkdebug node gives, its path wrapped in a
    :class:`~qcow2.backends.blkdebug.BlkdebugTarget` when the node injects errors."""
    from .backends.blkdebug import BlkdebugConfigError, BlkdebugTarget, rules_from_options
    extra = {k.split(".", 1)[0] for k in flat} - set(_BLKDEBUG_KEYS)
    if extra:
        raise _unsupported(f"blkdebug option '{sorted(extra)[0]}'")
    image = _sub(flat, "image.")
    if not image and isinstance(flat.get("image"), str):
        image = {"filename": flat["image"]}
    result = below(image)
    if not flat.get("inject-error"):
        return result             # (states alone change no I/O)
    try:
        rules = rules_from_options(flat.get("inject-error") or [], flat.get("set-state") or [])
    except BlkdebugConfigError as exc:
        raise InvalidOptionError(str(exc)) from None
    if isinstance(result, tuple):
        return BlkdebugTarget(result[0], rules), result[1]
    return BlkdebugTarget(result, rules)


class NullBackend(Backend):
    """QEMU's ``null-co`` block driver: a store of ``size`` bytes that reads as zeros
    (``read-zeroes``; without it QEMU leaves read buffers untouched, here they read as
    zeros too), holds no data and takes no writes."""

    can_seek_data = True

    def __init__(self, size: int, name: str = "null-co"):
        self._size = size
        self.name = name

    def size(self) -> int:
        return self._size

    def readinto(self, buf, offset: int) -> int:
        mv = memoryview(buf).cast("B")
        n = max(0, min(len(mv), self._size - offset))
        mv[:n] = bytes(n)
        return n

    def data_regions(self, start: int = 0, end: int | None = None):
        return iter(())


def _null(flat: dict, name: str) -> NullBackend:
    extra = set(flat) - {"driver", "size", "read-zeroes", "latency-ns", "node-name"}
    if extra:
        raise _unsupported(f"Option '{sorted(extra)[0]}' of the null driver")
    size = flat.get("size", 1 << 30)
    if isinstance(size, str):
        from .units import parse_size
        size = parse_size(size)
    if not isinstance(size, int) or isinstance(size, bool) or size < 0:
        raise InvalidOptionError("Parameter 'size' expects a non-negative number below 2^64")
    return NullBackend(size, name)


def _node(flat: dict, name: str = "null-co"):
    """(path or store, format) of a format node's options (format None: probe it)."""
    driver = flat.get("driver")
    if driver in ("null-co", "null-aio"):
        return _null(flat, name), "raw"
    if driver == "blkdebug":
        return _blkdebug(flat, _node)
    if driver == "file" or (driver is None and "filename" in flat):
        return _protocol(flat), "raw"              # the file's bytes as they are
    if driver is not None and driver not in _FORMATS:
        raise _unsupported(f"Block driver '{driver}'")
    child = _sub(flat, "file.")
    if not child and isinstance(flat.get("file"), str):
        child = {"filename": flat["file"]}
    if not child:
        raise InvalidOptionError("A block device must be specified for \"file\"")
    extra = {k for k in flat if not k.startswith("file.")} - {"driver", "file", "node-name",
                                                              *_ENCRYPT_KEYS}
    if extra:
        raise _unsupported(f"Option '{sorted(extra)[0]}' of the {driver or 'image'} driver")
    path = _protocol(child)
    _bind_key(flat, path, driver)
    return path, driver


# the encryption options of a format node: the secret that unlocks the image
_ENCRYPT_KEYS = ("encrypt.key-secret", "encrypt.format")


def _bind_key(flat: dict, path: str, driver) -> None:
    """``encrypt.key-secret=ID``: the image at ``path`` is unlocked with secret ID
    (``qcow2.secrets``); ``encrypt.format`` may only say what the image holds."""
    fmt = flat.get("encrypt.format")
    if fmt is not None and fmt not in ("luks", "aes"):
        raise InvalidOptionError(f"Parameter 'encrypt.format' does not accept value '{fmt}'")
    ident = flat.get("encrypt.key-secret")
    if ident is None:
        return
    if driver == "raw":
        raise _unsupported("Option 'encrypt.key-secret' of the raw driver")
    from .secrets import bind_secret
    bind_secret(path, str(ident))


def options_name(text: str) -> tuple[str, str | None]:
    """``--image-opts`` text as the equivalent ``json:{...}`` name, and the format its
    ``driver`` names (None: none)."""
    import json
    tree: dict = {}
    flat = parse_image_opts(text)
    for key, value in flat.items():
        node = tree
        *path, last = key.split(".")
        for part in path:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise InvalidOptionError(f"Option '{key}' conflicts with another option")
        node[last] = value
    return "json:" + json.dumps(tree), flat.get("driver")


def resolve(flat: dict, name: str = "null-co"):
    """``(path, format)`` of flattened block options (format None: probe it); a
    ``null-co`` node gives a :class:`NullBackend` (named ``name``) in place of a path."""
    return _node(flat, name)


def resolve_name(name: str):
    """``(path or store, format)`` of a ``json:{...}`` or ``file:PATH`` name (format
    None: probe it)."""
    if name.startswith("file:"):
        return file_path(name), None
    return resolve(parse_json_name(name), name)


__all__ = ["is_json_name", "is_option_name", "file_path", "parse_json_name", "options_name",
           "parse_image_opts", "flatten", "resolve", "resolve_name", "NullBackend"]
