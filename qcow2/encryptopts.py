"""qemu-img's encryption options of qcow2 (``-o encryption=on``, ``encrypt.*``), checked
with qemu-img's messages, for ``create`` (and convert's output) and ``amend``.

``create``: ``encrypt.format=luks`` (or ``aes``, the legacy method; ``encryption=on`` is
its old alias), ``encrypt.key-secret=ID`` naming a ``qcow2.secrets`` secret (or the
library's ``key=``), and for LUKS ``encrypt.cipher-alg`` (aes-128/192/256),
``encrypt.cipher-mode`` (xts, cbc), ``encrypt.ivgen-alg`` (plain, plain64, essiv),
``encrypt.ivgen-hash-alg``, ``encrypt.hash-alg`` (PBKDF2's and the AF splitter's) and
``encrypt.iter-time`` (milliseconds of PBKDF2 per key slot).

``amend`` (LUKS key slots): ``encrypt.state=active`` with ``encrypt.new-secret=ID``
(``encrypt.keyslot=N`` to pick the slot, ``encrypt.iter-time``), or
``encrypt.state=inactive`` with ``encrypt.keyslot=N`` or ``encrypt.old-secret=ID``.
"""

from __future__ import annotations

from .errors import InvalidOptionError, UnsupportedFeatureError

CREATE_NAMES = ("encryption", "encrypt.format", "encrypt.key-secret", "encrypt.cipher-alg",
                "encrypt.cipher-mode", "encrypt.ivgen-alg", "encrypt.ivgen-hash-alg",
                "encrypt.hash-alg", "encrypt.iter-time")
AMEND_NAMES = ("encrypt.state", "encrypt.keyslot", "encrypt.new-secret",
               "encrypt.old-secret", "encrypt.iter-time")

# what QEMU knows (values outside are "does not accept value"), and what we implement
_CIPHERS = ("aes-128", "aes-192", "aes-256", "des", "3des", "cast5-128", "serpent-128",
            "serpent-192", "serpent-256", "twofish-128", "twofish-192", "twofish-256", "sm4")
_MODES = ("ecb", "cbc", "xts", "ctr")
_IVGENS = ("plain", "plain64", "essiv")
_HASHES = ("md5", "sha1", "sha224", "sha256", "sha384", "sha512", "ripemd160")
_OUR_HASHES = ("sha1", "sha224", "sha256", "sha384", "sha512", "ripemd160")
DEFAULT_ITER_TIME = 2000


def _choice(name: str, value, allowed) -> str:
    if value not in allowed:
        raise InvalidOptionError(f"Parameter '{name}' does not accept value '{value}'")
    return value


def _unsupported(what: str) -> UnsupportedFeatureError:
    return UnsupportedFeatureError(f"{what} is not supported by this engine (aes-128/192/256 "
                                   f"in xts or cbc mode with plain, plain64 or essiv IVs are)",
                                   feature="encryption cipher")


def _iter_time(opts: dict) -> int:
    value = opts.get("encrypt.iter-time", DEFAULT_ITER_TIME)
    try:
        value = int(value)
    except (TypeError, ValueError):
        raise InvalidOptionError("Parameter 'encrypt.iter-time' expects a number") from None
    if value < 0:
        raise InvalidOptionError("Parameter 'iter-time' expects uint64")
    return value


class CreateEncryption:
    """The encryption of a new image: ``format`` "luks" or "aes", the passphrase, and
    for LUKS its :class:`qcow2.luks.LuksParams`."""

    def __init__(self, format: str, passphrase: bytearray, params=None):
        self.format, self.passphrase, self.params = format, passphrase, params

    def wipe(self) -> None:
        self.passphrase[:] = bytes(len(self.passphrase))


def create_encryption(opts: dict, key=None) -> CreateEncryption | None:
    """The encryption that create options ``opts`` (parsed qcow2 options) ask for (None:
    none), checked in QEMU's order; ``key``: the passphrase, from Python, in place of
    ``encrypt.key-secret``."""
    given = [n for n in CREATE_NAMES if n in opts]
    if not given and key is None:
        return None
    fmt = opts.get("encrypt.format")
    if "encryption" in opts:
        if fmt is not None:
            raise InvalidOptionError("'encrypt.format' and its alias 'encryption' can't be "
                                     "used at the same time")
        fmt = "aes" if opts["encryption"] else None
    if fmt is None:
        if given == ["encryption"]:
            return None                                   # encryption=off
        raise InvalidOptionError("Parameter 'encrypt.format' is missing")
    fmt = _choice("format", fmt, ("aes", "luks"))
    if fmt == "aes":
        extra = [n for n in given if n not in ("encryption", "encrypt.format",
                                                "encrypt.key-secret")]
        if extra:
            raise InvalidOptionError(f"Parameter '{extra[0]}' is unexpected")
    else:
        params = luks_params(opts)
    passphrase = _passphrase(opts, key)
    if fmt == "aes":
        return CreateEncryption("aes", passphrase)
    return CreateEncryption("luks", passphrase, params)


def _passphrase(opts: dict, key) -> bytearray:
    if key is not None:
        return bytearray(key.encode("utf-8") if isinstance(key, str) else key)
    ident = opts.get("encrypt.key-secret")
    if ident is None:
        raise InvalidOptionError("Parameter 'encrypt.key-secret' is required for cipher")
    from .secrets import secret
    return bytearray(secret(str(ident)))


def luks_params(opts: dict):
    """:class:`qcow2.luks.LuksParams` of ``encrypt.*`` create options."""
    from .luks import LuksParams
    alg = _choice("cipher-alg", opts.get("encrypt.cipher-alg", "aes-256"), _CIPHERS)
    mode = _choice("cipher-mode", opts.get("encrypt.cipher-mode", "xts"), _MODES)
    ivgen = _choice("ivgen-alg", opts.get("encrypt.ivgen-alg", "plain64"), _IVGENS)
    ivhash = _choice("ivgen-hash-alg", opts.get("encrypt.ivgen-hash-alg", "sha256"), _HASHES)
    hash_alg = _choice("hash-alg", opts.get("encrypt.hash-alg", "sha256"), _HASHES)
    iter_time = _iter_time(opts)
    if not alg.startswith("aes-"):
        raise _unsupported(f"Cipher '{alg}'")
    if mode not in ("xts", "cbc"):
        raise _unsupported(f"Cipher mode '{mode}'")
    if hash_alg not in _OUR_HASHES:
        raise _unsupported(f"Hash '{hash_alg}'")
    if ivgen == "essiv" and ivhash not in ("md5", "sha256"):
        # the ESSIV key is the digest: it must be an AES key size
        raise _unsupported(f"ESSIV hash '{ivhash}'")
    key_bytes = int(alg[4:]) // 8 * (2 if mode == "xts" else 1)
    if key_bytes * 4000 % 512:
        # the key slots' material (4000 stripes) must be whole sectors; qemu-img 7.2
        # aborts on aes-192-cbc rather than refusing it
        raise _unsupported(f"Cipher '{alg}' in {mode} mode")
    return LuksParams(key_bytes=key_bytes, mode=mode, ivgen=ivgen,
                      ivgen_hash=ivhash if ivgen == "essiv" else None, hash=hash_alg,
                      iter_time=iter_time)


# QEMU's luks format: its create options, in qemu-img's order
LUKS_FORMAT_OPTIONS = ("size", "key-secret", "cipher-alg", "cipher-mode", "ivgen-alg",
                       "ivgen-hash-alg", "hash-alg", "iter-time", "preallocation")


def luks_format_encryption(opts: dict, key=None) -> CreateEncryption:
    """The encryption of a new ``luks`` format image (its options have no prefix)."""
    prealloc = opts.get("preallocation", "off")
    if prealloc != "off":
        raise UnsupportedFeatureError(f"Preallocation mode '{prealloc}' of luks images is "
                                      f"not supported by this engine",
                                      feature="luks preallocation")
    prefixed = {f"encrypt.{k}": v for k, v in opts.items() if k not in ("size",
                                                                        "preallocation")}
    params = luks_params(prefixed)
    if key is None and "encrypt.key-secret" not in prefixed:
        raise InvalidOptionError("Parameter 'key-secret' is required for cipher")
    return CreateEncryption("luks", _passphrase(prefixed, key), params)


class AmendKeyslots:
    """A key slot change asked of ``amend``."""

    def __init__(self, active: bool, keyslot: int | None, new_secret: str | None,
                 old_secret: str | None, iter_time: int):
        self.active, self.keyslot = active, keyslot
        self.new_secret, self.old_secret, self.iter_time = new_secret, old_secret, iter_time


def amend_keyslots(opts: dict) -> AmendKeyslots | None:
    """The key slot change of amend options ``opts`` (None: they ask for none)."""
    if not any(n in opts for n in AMEND_NAMES):
        return None
    state = opts.get("encrypt.state")
    if state is None:
        raise InvalidOptionError("Parameter 'state' is missing")
    state = _choice("state", state, ("active", "inactive"))
    slot = opts.get("encrypt.keyslot")
    if slot is not None:
        try:
            slot = int(slot)
        except (TypeError, ValueError):
            raise InvalidOptionError("Parameter 'keyslot' expects an integer") from None
        if not 0 <= slot < 8:
            raise InvalidOptionError(f"Invalid slot {slot} specified, must be between 0 "
                                     f"and 7")
    new, old = opts.get("encrypt.new-secret"), opts.get("encrypt.old-secret")
    if state == "active":
        if new is None:
            raise InvalidOptionError("'new-secret' is required to activate a keyslot")
        if old is not None:
            raise InvalidOptionError("'old-secret' must not be given when activating "
                                     "keyslots")
    else:
        if new is not None:
            raise InvalidOptionError("'new-secret' must not be given when erasing keyslots")
        if slot is None and old is None:
            raise InvalidOptionError("'keyslot' or 'old-secret' is required to erase "
                                     "keyslots")
        if slot is not None and old is not None:
            raise InvalidOptionError("Only one of 'keyslot' and 'old-secret' can be given")
    return AmendKeyslots(state == "active", slot, new, old, _iter_time(opts))


__all__ = ["LUKS_FORMAT_OPTIONS", "luks_format_encryption", "CREATE_NAMES", "AMEND_NAMES",
           "CreateEncryption", "create_encryption",
           "luks_params", "AmendKeyslots", "amend_keyslots"]
