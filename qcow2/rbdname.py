"""RBD image names in qemu-img's protocol syntax, parsed in one place.

    rbd:POOL/[NAMESPACE/]IMAGE[@SNAP][:conf=PATH][:id=USER][:KEY=VALUE...]

The rules are QEMU's (``block/rbd.c``, ``qemu_rbd_parse_filename``): a backslash
escapes the next character wherever the name is split (``\\:``, ``\\@``, ``\\/``,
``\\=``, ``\\\\``); the pool ends at the first unescaped ``/``; when an unescaped ``@``
follows anywhere, the image ends there and the snapshot runs to the next ``:``,
otherwise the image runs to the first ``:``; a ``/`` inside the image part separates a
namespace; the rest is ``KEY=VALUE`` pairs separated by ``:``, where ``conf`` names
the ceph.conf to read (absent: librados' default search), ``id`` the cephx user
(absent: ``admin``) and every other key is a librados option (``mon_host``,
``keyring``, ``key``, ``client_mount_timeout``...), applied in order after the conf.
"""

from __future__ import annotations

from .errors import InvalidOptionError, Qcow2Error

PREFIX = "rbd:"


def is_rbd_name(name) -> bool:
    """True for a name in the ``rbd:`` protocol syntax."""
    return isinstance(name, str) and name.startswith(PREFIX)


class RbdName:
    """One parsed ``rbd:`` name (``text`` is the name as given, used in messages).

    (A plain class: dataclasses would cost every CLI start its import.)"""

    __slots__ = ("pool", "image", "snapshot", "namespace", "conf", "user", "options", "text")

    def __init__(self, pool: str, image: str, snapshot: str | None = None,
                 namespace: str = "", conf: str | None = None, user: str | None = None,
                 options: tuple[tuple[str, str], ...] = (), text: str = ""):
        self.pool, self.image, self.snapshot = pool, image, snapshot
        self.namespace, self.conf, self.user = namespace, conf, user
        self.options, self.text = tuple(options), text

    def _key(self) -> tuple:
        return (self.pool, self.image, self.snapshot, self.namespace, self.conf, self.user,
                self.options)

    def __eq__(self, other) -> bool:
        return isinstance(other, RbdName) and self._key() == other._key()

    def __hash__(self) -> int:
        return hash(self._key())

    def __repr__(self) -> str:
        return f"RbdName({str(self)!r})"

    def __str__(self) -> str:
        return self.text or format_rbd_name(self.pool, self.image, snapshot=self.snapshot,
                                            namespace=self.namespace, conf=self.conf,
                                            user=self.user, options=self.options)

    def sibling(self, image: str) -> "RbdName":
        """Another image of the same pool and namespace, reached the same way (how a
        relative backing file name of an image in RBD resolves)."""
        return RbdName(self.pool, image, None, self.namespace, self.conf, self.user,
                       self.options, format_rbd_name(self.pool, image,
                                                     namespace=self.namespace,
                                                     conf=self.conf, user=self.user,
                                                     options=self.options))

    def backend_args(self) -> dict:
        """Keyword arguments of ``qcow2.backends.rbd.RbdBackend`` for this name."""
        return {"pool": self.pool, "image": self.image, "snapshot": self.snapshot,
                "namespace": self.namespace, "conf": self.conf, "user": self.user,
                "options": self.options, "name": str(self)}


def _find(s: str, delim: str) -> int:
    """Index of the first ``delim`` not escaped by a backslash, or -1."""
    i = 0
    while i < len(s):
        c = s[i]
        if c == delim:
            return i
        if c == "\\" and i + 1 < len(s):
            i += 1
        i += 1
    return -1


def _split(s: str, delim: str) -> tuple[str, str | None]:
    """(token before the first unescaped ``delim``, rest after it or None)."""
    i = _find(s, delim)
    return (s, None) if i < 0 else (s[:i], s[i + 1:])


def unescape(s: str) -> str:
    """Drop the backslash of every escaped character (a trailing one stays)."""
    out = []
    i = 0
    while i < len(s):
        if s[i] == "\\" and i + 1 < len(s):
            i += 1
        out.append(s[i])
        i += 1
    return "".join(out)


def escape(s: str, also: str = "") -> str:
    """Escape what the syntax would split on (the inverse of :func:`unescape`): a
    backslash, ``:`` and ``@`` (an ``@`` anywhere starts a snapshot) everywhere, and
    ``also`` (``/`` in pool and image names, ``=`` in keys)."""
    return "".join("\\" + c if c in "\\:@" or c in also else c for c in s)


def parse_rbd_name(name: str) -> RbdName:
    """Parse an ``rbd:`` name; raises InvalidOptionError (one line) when malformed."""
    if not is_rbd_name(name):
        raise InvalidOptionError(f"'{name}': an RBD name must start with 'rbd:'")
    if "\0" in name:
        raise InvalidOptionError(f"'{name}': the RBD name contains a NUL byte")
    pool, rest = _split(name[len(PREFIX):], "/")
    if rest is None:
        raise InvalidOptionError(f"'{name}': Pool name is required "
                                 f"(rbd:POOL/IMAGE[@SNAP][:KEY=VALUE...])")
    snapshot = None
    if _find(rest, "@") >= 0:
        image, rest = _split(rest, "@")
        snap, rest = _split(rest, ":")
        snapshot = unescape(snap)
    else:
        image, rest = _split(rest, ":")
    namespace = ""
    if _find(image, "/") >= 0:
        ns, image = _split(image, "/")
        namespace = unescape(ns)
    pool, image = unescape(pool), unescape(image)
    conf = user = None
    options: list[tuple[str, str]] = []
    while rest is not None:
        key, rest = _split(rest, "=")
        key = unescape(key)
        if rest is None:
            raise InvalidOptionError(f"'{name}': conf option {key} has no value")
        value, rest = _split(rest, ":")
        value = unescape(value)
        if key == "conf":
            conf = value
        elif key == "id":
            user = value
        else:
            options.append((key, value))
    for what, val in (("pool", pool), ("image", image)):
        if not val:
            raise InvalidOptionError(f"'{name}': the {what} name is empty")
    if snapshot == "":
        raise InvalidOptionError(f"'{name}': the snapshot name is empty")
    return RbdName(pool, image, snapshot, namespace, conf, user, tuple(options), name)


def format_rbd_name(pool: str, image: str, *, snapshot: str | None = None,
                    namespace: str = "", conf: str | None = None, user: str | None = None,
                    options=()) -> str:
    """The ``rbd:`` name of an image, escaped so that :func:`parse_rbd_name` gives the
    same fields back."""
    out = [PREFIX, escape(pool, "/"), "/"]
    if namespace:
        out += [escape(namespace, "/"), "/"]
    out.append(escape(image, "/"))
    if snapshot is not None:
        out += ["@", escape(snapshot)]
    pairs = ([("conf", conf)] if conf is not None else []) + \
            ([("id", user)] if user is not None else []) + list(options)
    for key, value in pairs:
        out += [":", escape(key, "="), "=", escape(value)]
    return "".join(out)


# -- how QEMU names an image in RBD ---------------------------------------------------
# qemu-img turns an rbd: file name into options and shows the image under a json:
# pseudo-filename of them (bdrv_refresh_filename: the driver's strong options only,
# so conf keys other than conf and id never appear), with QEMU's QDict key order.

_QDICT_BUCKETS = 512


def _qdict_bucket(key: str) -> int:
    """The bucket of ``key`` in a QEMU QDict (qobject/qdict.c, tdb_hash)."""
    raw = key.encode()
    value = (0x238F13AF * len(raw)) & 0xFFFFFFFF
    for i, c in enumerate(raw):
        value = (value + (c << (i * 5 % 24))) & 0xFFFFFFFF
    return ((1103515243 * value + 12345) & 0xFFFFFFFF) % _QDICT_BUCKETS


def qdict_order(d: dict) -> dict:
    """``d``'s items in the order QEMU iterates a QDict built by inserting them in
    order: by bucket, the last inserted first within one."""
    items = list(d.items())
    order = sorted(range(len(items)), key=lambda i: (_qdict_bucket(items[i][0]), -i))
    return {items[i][0]: items[i][1] for i in order}


def qemu_node(spec: RbdName) -> dict:
    """The rbd block node's options as qemu-img shows them (QDict order)."""
    d = {"pool": spec.pool, "namespace": spec.namespace, "image": spec.image}
    if spec.conf is not None:
        d["conf"] = spec.conf
    if spec.snapshot is not None:
        d["snapshot"] = spec.snapshot
    if spec.user is not None:
        d["user"] = spec.user
    d["driver"] = "rbd"
    return qdict_order(d)


def qemu_filename(name: str, format: str | None = None) -> str:
    """The json: pseudo-filename qemu-img prints for the image an ``rbd:`` name
    names, opened as ``format`` (None: the rbd node itself, as ``map`` shows it)."""
    import json                 # (not on the start path of every command)
    node = qemu_node(parse_rbd_name(name))
    shown = node if format is None else qdict_order({"driver": format, "file": node})
    import re
    # QEMU escapes non-ASCII as \uXXXX with upper-case hex digits
    return "json:" + re.sub(r"\\u([0-9a-f]{4})", lambda m: "\\u" + m.group(1).upper(),
                            json.dumps(shown))


def open_rbd(name: str, *, writable: bool = False, create: int | None = None, **timeouts):
    """The store an ``rbd:`` name names (a ``qcow2.backends.rbd.RbdBackend``), opened
    for reading or writing, or created with ``create`` bytes first.  Failures are one
    line: "Could not open 'NAME': REASON" (``.errno`` set), as for files."""
    spec = parse_rbd_name(name)
    from .backends.rbd import RbdBackend        # (librados loads only for rbd: names)
    try:
        return RbdBackend(**spec.backend_args(), writable=writable, create=create,
                          **timeouts)
    except OSError as exc:
        verb = "create" if create is not None else "open"
        err = Qcow2Error(f"Could not {verb} '{name}': {exc.strerror or exc}")
        err.errno = exc.errno  # type: ignore[attr-defined]
        raise err from None


__all__ = ["PREFIX", "RbdName", "escape", "format_rbd_name", "is_rbd_name", "open_rbd",
           "parse_rbd_name", "qdict_order", "qemu_filename", "qemu_node", "unescape"]
