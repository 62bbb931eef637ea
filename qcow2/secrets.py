"""Secrets for encrypted images, as qemu-img takes them: ``--object secret,id=ID,...``.

A secret is named by its ``id`` and holds ``data=TEXT`` or the contents of
``file=PATH``; ``format=base64`` decodes either.  Images name the secret that unlocks
them with ``encrypt.key-secret=ID`` (``--image-opts``, ``-o`` of create/convert/amend).

The command line registers its ``--object`` arguments here (:func:`take_objects`);
naming an image's secret binds the passphrase to that file (:func:`bind`), and an
encrypted image opened without an explicit key looks its file up
(:func:`key_for`).  Library callers pass ``key=``/``keys=`` instead and never need this
registry.  Passphrases are kept in bytearrays that :func:`clear` zeroes; they are never
printed.
"""

from __future__ import annotations

import base64
import binascii
import os

from .errors import InvalidOptionError
from .lightweight import Lock

_lock = Lock()
_SECRETS: dict[str, bytearray] = {}
_FILE_KEYS: dict[str, bytearray] = {}


def _file_key(path) -> str:
    return os.path.realpath(os.fsdecode(path))


def add_object(text: str) -> None:
    """Register one ``--object`` argument (``secret,id=ID,data=...`` or the JSON form);
    only ``secret`` objects are known here."""
    from .units import parse_option_list
    if text.lstrip().startswith("{"):
        import json
        try:
            props = json.loads(text)
        except ValueError:
            raise InvalidOptionError("Invalid --object JSON") from None
        if not isinstance(props, dict):
            raise InvalidOptionError("Invalid --object JSON")
        props = {str(k): v if isinstance(v, str) else str(v) for k, v in props.items()}
        qom = props.pop("qom-type", None)
    else:
        qom, _, rest = text.partition(",")
        props = parse_option_list(rest) if rest else {}
        if "=" in qom:
            key, _, value = qom.partition("=")
            if key != "qom-type":
                raise InvalidOptionError("Parameter 'qom-type' is missing")
            qom = value
    if qom != "secret":
        from .errors import UnsupportedFeatureError
        raise UnsupportedFeatureError(f"Object type '{qom}' is not supported by this engine "
                                      f"(secret is)", feature=f"object {qom}")
    ident = props.pop("id", None)
    if not ident:
        raise InvalidOptionError("Parameter 'id' is missing")
    data, path = props.pop("data", None), props.pop("file", None)
    fmt = props.pop("format", "raw")
    props.pop("loaded", None)
    if props:
        raise InvalidOptionError(f"Property 'secret.{sorted(props)[0]}' not found")
    if fmt not in ("raw", "base64"):
        raise InvalidOptionError(f"Parameter 'format' does not accept value '{fmt}'")
    if (data is None) == (path is None):
        raise InvalidOptionError("Either 'file' or 'data' must be provided" if data is None
                                 else "'data' and 'file' are mutually exclusive")
    if data is not None:
        raw = bytearray(data.encode("utf-8"))
    else:
        try:
            with open(path, "rb") as f:
                raw = bytearray(f.read())
        except OSError as exc:
            raise InvalidOptionError(f"Unable to read {path}: {exc.strerror}") from None
    if fmt == "base64":
        try:
            dec = bytearray(base64.b64decode(bytes(raw), validate=True))
        except (binascii.Error, ValueError):
            wipe(raw)
            raise InvalidOptionError("Unable to decode base64 secret data") from None
        wipe(raw)
        raw = dec
    with _lock:
        if ident in _SECRETS:
            wipe(raw)
            raise InvalidOptionError(f"attempt to add duplicate property '{ident}' to "
                                     f"object (type 'container')")
        _SECRETS[ident] = raw


def take_objects(argv: list) -> list:
    """``argv`` without its ``--object VALUE`` / ``--object=VALUE`` arguments, each
    registered (in order, as qemu-img creates them before anything else).  Stops at a
    ``--`` that ends the options."""
    import atexit
    atexit.register(clear)                 # zeroed when the command ends
    out: list = []
    i = 0
    while i < len(argv):
        a = argv[i]
        if a == "--":
            out.extend(argv[i:])
            break
        if a == "--object" and i + 1 < len(argv):
            add_object(argv[i + 1])
            i += 2
            continue
        if isinstance(a, str) and a.startswith("--object="):
            add_object(a[len("--object="):])
            i += 1
            continue
        out.append(a)
        i += 1
    return out


def secret(ident: str) -> bytes:
    """The bytes of secret ``ident`` (qemu's message when there is none)."""
    with _lock:
        value = _SECRETS.get(ident)
    if value is None:
        raise InvalidOptionError(f"No secret with id '{ident}'")
    return bytes(value)


def add_secret(ident: str, value) -> None:
    """Register a secret from Python (tests, embedding programs)."""
    with _lock:
        _SECRETS[ident] = bytearray(value.encode("utf-8") if isinstance(value, str) else value)


def bind(path, passphrase) -> None:
    """Remember that ``passphrase`` unlocks the image file at ``path``."""
    key = bytearray(passphrase.encode("utf-8") if isinstance(passphrase, str) else passphrase)
    with _lock:
        old = _FILE_KEYS.get(_file_key(path))
        if old is not None:
            wipe(old)
        _FILE_KEYS[_file_key(path)] = key


def bind_secret(path, ident: str) -> None:
    """``encrypt.key-secret=ident`` named for the image at ``path``."""
    bind(path, secret(ident))


def key_for(path) -> bytes | None:
    """The passphrase bound to the file at ``path`` (None: none)."""
    if not isinstance(path, (str, bytes, os.PathLike)):
        return None
    with _lock:
        value = _FILE_KEYS.get(_file_key(path))
    return None if value is None else bytes(value)


def wipe(buf) -> None:
    """Zero a bytearray holding key material."""
    if isinstance(buf, bytearray):
        buf[:] = bytes(len(buf))


def clear() -> None:
    """Forget (and zero) every registered secret and bound key."""
    with _lock:
        for d in (_SECRETS, _FILE_KEYS):
            for v in d.values():
                wipe(v)
            d.clear()


__all__ = ["add_object", "take_objects", "secret", "add_secret", "bind", "bind_secret",
           "key_for", "wipe", "clear"]
