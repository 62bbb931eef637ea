"""The ``-o`` options of qemu-img for qcow2 and raw images: their names, types,
defaults and help, the syntax of their values, the checks of their values and
combinations, and the messages qemu-img gives for each.  ``create``, ``measure``,
``convert`` (``-o``) and ``amend`` all take their options from here.

Where qemu-img itself words the same check differently in two commands (``create``
goes through QEMU's QAPI visitor, ``measure`` and ``amend`` through
``qcow2_opt_get_*``), the function takes that as a parameter: one table of messages,
each command gets qemu-img's wording.
"""

from __future__ import annotations

import os

from . import constants as C
from .errors import ImageTooLargeError, InvalidOptionError, Qcow2Error, UnsupportedFeatureError
from .lightweight import record

# -- the tables -----------------------------------------------------------------------

# Option names per format, in the order qemu-img 7.2 prints them on its "Formatting"
# line (the order of the format driver's option list).
# The file protocol's hints, taken by create for either format (printed last).
PROTOCOL_HINTS = ("nocow", "extent_size_hint")
QCOW2_OPTIONS = ("cluster_size", "extended_l2", "preallocation", "compression_type", "size",
                 "compat", "backing_file", "backing_fmt", "data_file", "data_file_raw",
                 "lazy_refcounts", "refcount_bits") + PROTOCOL_HINTS
RAW_OPTIONS = ("size", "preallocation") + PROTOCOL_HINTS
# The file protocol driver's options (qemu-img measure accepts them on top of the format's).
FILE_OPTIONS = ("size", "preallocation", "nocow", "extent_size_hint")
# qcow2's encryption options: qemu knows them, this engine does not implement them.
CRYPT_OPTIONS = ("encryption", "encrypt.format", "encrypt.key-secret", "encrypt.cipher-alg",
                 "encrypt.cipher-mode", "encrypt.ivgen-alg", "encrypt.ivgen-hash-alg",
                 "encrypt.hash-alg", "encrypt.iter-time")
# What amend can change, and what it refuses (qcow2_amend_options' messages).
AMEND_OPTIONS = ("compat", "lazy_refcounts", "refcount_bits", "backing_file", "backing_fmt",
                 "size")
AMEND_REFUSED = {
    "data_file": "data-file can only be set for images that use an external data file",
    "data_file_raw": "data-file-raw cannot be set on existing images",
}
# Creation options amend does not know (qemu-img: "Invalid parameter" and a hint).
AMEND_CREATE_ONLY = ("cluster_size", "extended_l2", "compression_type", "preallocation",
                     "encryption", "encrypt.format", "encrypt.key-secret", "encrypt.cipher-alg",
                     "encrypt.cipher-mode", "encrypt.ivgen-alg", "encrypt.ivgen-hash-alg",
                     "encrypt.hash-alg")

# Options printed on the Formatting line even when not given, with qemu-img's default.
QCOW2_SHOWN_DEFAULTS = {"cluster_size": str(C.DEFAULT_CLUSTER_SIZE), "extended_l2": "off",
                        "compression_type": "zlib", "lazy_refcounts": "off",
                        "refcount_bits": str(C.DEFAULT_REFCOUNT_BITS)}

# The type of each option's value (a string when not listed).
_KIND = {"size": "size", "cluster_size": "size", "extent_size_hint": "size",
         "refcount_bits": "number", "encrypt.iter-time": "number",
         "extended_l2": "bool", "data_file_raw": "bool", "lazy_refcounts": "bool",
         "nocow": "bool", "encryption": "bool"}
_FILE_NAMES = {"backing_file", "data_file"}

# qemu-img's help line of each option: (type shown, description).
_HELP = {
    "backing_file": ("<str>", "File name of a base image"),
    "backing_fmt": ("<str>", "Image format of the base image"),
    "cluster_size": ("<size>", "qcow2 cluster size"),
    "compat": ("<str>", "Compatibility level (v2 [0.10] or v3 [1.1])"),
    "compression_type": ("<str>", "Compression method used for image cluster compression"),
    "data_file": ("<str>", "File name of an external data file"),
    "data_file_raw": ("<bool (on/off)>", "The external data file must stay valid as a raw "
                                         "image"),
    "encrypt.cipher-alg": ("<str>", "Name of encryption cipher algorithm"),
    "encrypt.cipher-mode": ("<str>", "Name of encryption cipher mode"),
    "encrypt.format": ("<str>", "Encrypt the image, format choices: 'aes', 'luks'"),
    "encrypt.hash-alg": ("<str>", "Name of encryption hash algorithm"),
    "encrypt.iter-time": ("<num>", "Time to spend in PBKDF in milliseconds"),
    "encrypt.ivgen-alg": ("<str>", "Name of IV generator algorithm"),
    "encrypt.ivgen-hash-alg": ("<str>", "Name of IV generator hash algorithm"),
    "encrypt.key-secret": ("<str>", "ID of secret providing qcow AES key or LUKS passphrase"),
    "encrypt.keyslot": ("<num>", "Select a single keyslot to modify explicitly"),
    "encrypt.new-secret": ("<str>", "New secret to set in the matching keyslots. Empty "
                                    "string to erase"),
    "encrypt.old-secret": ("<str>", "Select all keyslots that match this password"),
    "encrypt.state": ("<str>", "Select new state of affected keyslots (active/inactive)"),
    "encryption": ("<bool (on/off)>", "Encrypt the image with format 'aes'. (Deprecated in "
                                      "favor of encrypt.format=aes)"),
    "extended_l2": ("<bool (on/off)>", "Extended L2 tables"),
    "extent_size_hint": ("<size>", "Extent size hint for the image file, 0 to disable"),
    "lazy_refcounts": ("<bool (on/off)>", "Postpone refcount updates"),
    "nocow": ("<bool (on/off)>", "Turn off copy-on-write (valid only on btrfs)"),
    "preallocation": ("<str>", "Preallocation mode (allowed values: off, metadata, falloc, "
                               "full)"),
    "refcount_bits": ("<num>", "Width of a reference count entry in bits"),
    "size": ("<size>", "Virtual disk size"),
}
_RAW_PREALLOC_HELP = ("<str>", "Preallocation mode (allowed values: off, falloc, full)")
# What amend -o help lists for qcow2 (QEMU's amend option list, encryption included).
AMEND_HELP = ("backing_file", "backing_fmt", "compat", "data_file", "data_file_raw",
              "encrypt.iter-time", "encrypt.keyslot", "encrypt.new-secret",
              "encrypt.old-secret", "encrypt.state", "lazy_refcounts", "refcount_bits", "size")

# Options qemu-img knows for these formats that this engine does not implement, with
# the feature they belong to (encryption only for qcow2).
_UNSUPPORTED: dict = {}
_UNSUPPORTED_QCOW2 = {name: "encryption" for name in CRYPT_OPTIONS}

_BOOL_WORDS = {"on": True, "yes": True, "true": True, "y": True,
               "off": False, "no": False, "false": False, "n": False}
# compat as create takes it (the QAPI names and their aliases) and as measure does
COMPAT_LEVELS = {"0.10": 2, "v2": 2, "1.1": 3, "v3": 3}
MEASURE_COMPAT_LEVELS = {"0.10": 2, "1.1": 3}
COMPRESSION_TYPES = {"zlib": C.COMPRESSION_ZLIB, "zstd": C.COMPRESSION_ZSTD}
QCOW2_PREALLOC = ("off", "metadata", "falloc", "full")
RAW_PREALLOC = ("off", "falloc", "full")

# What needs compat=1.1: the first half of qemu-img's message.
_V3_ONLY = {
    "extended_l2": "Extended L2 entries are only supported with compatibility level 1.1 "
                   "and above",
    "lazy_refcounts": "Lazy refcounts only supported with compatibility level 1.1 and above",
    "refcount_bits": "Different refcount widths than 16 bits require compatibility level 1.1 "
                     "or above",
    "data_file": "External data files are only supported with compatibility level 1.1 and "
                 "above",
    "compression_type": "Non-zlib compression type is only supported with compatibility "
                        "level 1.1 and above",
}


def _help_line(name: str, entry) -> str:
    kind, text = entry
    return f"  {name + '=' + kind:<22} - {text}"


def help_text(fmt: str = "qcow2", *, protocol: bool = False) -> str:
    """What ``qemu-img create -f FMT -o help`` lists: the format's options (and with
    ``protocol``, when a file name was given, the file protocol's too).  Listed as
    qemu-img lists them: the encryption options of qcow2 appear although this engine
    refuses them (see the README)."""
    entries = {}
    if protocol:
        for n in FILE_OPTIONS:
            entries[n] = _RAW_PREALLOC_HELP if n == "preallocation" else _HELP[n]
    names = QCOW2_OPTIONS + CRYPT_OPTIONS if fmt == "qcow2" else ("size",)
    for n in names:
        if n in PROTOCOL_HINTS and not protocol:
            continue
        entries[n] = _HELP[n]
    lines = ["Supported options:" if protocol else f"Supported {fmt} options:"]
    lines += [_help_line(n, entries[n]) for n in sorted(entries)]
    if not protocol:
        lines += ["", "The protocol level may support further options.",
                  "Specify the target filename to include those options."]
    return "\n".join(lines) + "\n"


def amend_help_text(fmt: str = "qcow2") -> str:
    """What ``qemu-img amend -f qcow2 -o help`` lists."""
    return "\n".join([f"Amend options for '{fmt}':"] +
                     [_help_line(n, _HELP[n]) for n in AMEND_HELP]) + "\n"


def valid_option_list(text: str) -> bool:
    """qemu-img's check of one ``-o`` argument: not empty, not starting with a comma,
    not ending in an unescaped (odd) run of commas."""
    if not text or text[0] == ",":
        return False
    trailing = len(text) - len(text.rstrip(","))
    return trailing % 2 == 0


def wants_help(options: dict) -> bool:
    """Whether parsed ``-o`` options ask for the list of options (help or ?)."""
    return any(k in ("help", "?") for k in options)


def option_dict(options) -> dict:
    """``-o`` options as a dict: None, a dict, or qemu's "k=v,k=v" text."""
    if options is None:
        return {}
    if isinstance(options, str):
        from .units import parse_option_list
        return parse_option_list(options)
    return dict(options)


# -- value syntax (the checks of QEMU's QemuOpts) --------------------------------------

SIZE_HINT = ("Optional suffix k, M, G, T, P or E means kilo-, mega-, giga-, tera-, peta-\n"
             "and exabytes, respectively.\n")


def _bad_size(name: str, value) -> InvalidOptionError:
    err = InvalidOptionError(f"Parameter '{name}' expects a non-negative number below 2^64")
    err.hint = SIZE_HINT  # type: ignore[attr-defined]   # the CLI prints it as qemu-img
    return err


def parse_size_option(name: str, value) -> int:
    if isinstance(value, bool):
        raise _bad_size(name, value)
    if isinstance(value, int):
        if value < 0:
            raise _bad_size(name, value)
        return value
    if isinstance(value, str):
        from .units import parse_size
        try:
            return parse_size(value, what=name)
        except Qcow2Error:
            raise _bad_size(name, value) from None
    raise _bad_size(name, value)


def parse_number_option(name: str, value) -> int:
    if isinstance(value, int) and not isinstance(value, bool):
        return value
    if isinstance(value, str):
        try:
            return int(value.strip(), 0)
        except ValueError:
            pass
    raise InvalidOptionError(f"Parameter '{name}' expects a number")


def parse_bool_option(name: str, value) -> bool:
    """qemu's words for a bool: on/yes/true/y, off/no/false/n."""
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and value in _BOOL_WORDS:
        return _BOOL_WORDS[value]
    raise InvalidOptionError(f"Parameter '{name}' expects 'on' or 'off'")


def parse_string_option(name: str, value) -> str:
    if name in _FILE_NAMES and isinstance(value, os.PathLike):
        value = os.fspath(value)
    if isinstance(value, bytes) and name in _FILE_NAMES:
        value = os.fsdecode(value)
    if not isinstance(value, str):
        raise InvalidOptionError(f"Parameter '{name}' expects a string (got {value!r})")
    return value


def parse_value(name: str, value, *, strict_strings: bool = True):
    """``value`` of option ``name`` checked and converted by the option's type.
    ``strict_strings=False`` (measure) takes any value for a string option as it is
    (a path-like as its path): the driver's own check then refuses it."""
    kind = _KIND.get(name)
    if kind == "size":
        return parse_size_option(name, value)
    if kind == "number":
        return parse_number_option(name, value)
    if kind == "bool":
        return parse_bool_option(name, value)
    if strict_strings:
        return parse_string_option(name, value)
    return os.fspath(value) if isinstance(value, os.PathLike) else value


def parse_size_arg(size) -> int:
    """The SIZE argument: an int, or qemu-img's size syntax (k, M, G, T, P, E suffixes)."""
    if isinstance(size, bool) or not isinstance(size, (int, str)):
        raise InvalidOptionError(f"Invalid image size specified: {size!r}")
    from .units import check_range, cvtnum
    if isinstance(size, str):
        return cvtnum("image size", size, 0, C.MAX_IMAGE_SIZE)
    return check_range("image size", size, 0, C.MAX_IMAGE_SIZE)


def escape(text: str) -> str:
    """QEMU's escaped_print: a comma in a value is printed doubled."""
    return text.replace(",", ",,")


def shown_value(name: str, given, value) -> str:
    """How the Formatting line shows an option: ``given`` as passed, ``value`` parsed
    (a bool as written when written as a word)."""
    kind = _KIND.get(name)
    if kind == "bool":
        return given if isinstance(given, str) else ("on" if value else "off")
    if kind is not None:
        return str(value)
    return escape(value)


# -- option names -------------------------------------------------------------------------

def parse_options(options: dict, allowed, unknown=None, *,
                  strict_strings: bool = True) -> dict:
    """The options given (a None value: not given), names checked against ``allowed``
    and values by their type, in the order given (the first bad one is reported).
    ``unknown(name)`` builds the error for a name not allowed (default: qemu-img's
    "Invalid parameter")."""
    parsed: dict = {}
    for name, value in options.items():
        if value is None:
            continue
        if name not in allowed:
            if unknown is not None:
                raise unknown(name)
            raise InvalidOptionError(f"Invalid parameter '{name}'")
        parsed[name] = parse_value(name, value, strict_strings=strict_strings)
    return parsed


def create_option_error(fmt: str):
    """For :func:`parse_options`: ``create``'s error for an option ``fmt`` does not take
    (UnsupportedFeatureError for one qemu-img knows but this engine lacks)."""
    def unknown(name: str) -> Qcow2Error:
        feature = _UNSUPPORTED.get(name) or (_UNSUPPORTED_QCOW2.get(name) if fmt == "qcow2"
                                             else None)
        if feature is not None:
            return UnsupportedFeatureError(f"Option '{name}' is not supported by this engine",
                                           feature=feature)
        return InvalidOptionError(f"Invalid parameter '{name}'")
    return unknown


def check_amend_names(options) -> None:
    """The option names ``amend`` takes (qcow2_amend_options: refused ones first)."""
    for name in options:
        if name in AMEND_CREATE_ONLY:
            err = InvalidOptionError(f"Invalid parameter '{name}'")
            err.hint = "This option is only supported for image creation\n"  # type: ignore[attr-defined]
            raise err
        if name in AMEND_REFUSED:
            raise UnsupportedFeatureError(AMEND_REFUSED[name], feature=f"amend {name}")
        if name not in AMEND_OPTIONS:
            raise InvalidOptionError(f"Invalid parameter '{name}'")


# -- values and combinations (the format drivers' checks) -------------------------------

def needs_v3(name: str, hint: str = "version=v3") -> InvalidOptionError:
    """qemu-img's refusal of option ``name`` below compat=1.1; ``hint``: how the
    command spells the fix (create: version=v3, measure and amend: compat=1.1)."""
    return InvalidOptionError(f"{_V3_ONLY[name]} (use {hint} or greater)")


def compat_version(value, levels=COMPAT_LEVELS, *, qapi: bool = True) -> int:
    """The qcow2 version a ``compat`` value names; ``levels``: the names the command
    takes.  ``qapi``: create's message (QEMU's QAPI visitor), else the one of
    qcow2_opt_get_version_del (measure, amend)."""
    version = levels.get(value) if isinstance(value, str) else None
    if version is not None:
        return version
    if qapi:
        # (QEMU's QAPI member behind compat is named version)
        raise InvalidOptionError(f"Parameter 'version' does not accept value '{value}'")
    raise InvalidOptionError(f"Invalid compatibility level: '{value}'")


def check_preallocation(mode, modes=QCOW2_PREALLOC, *, qapi: bool = True) -> None:
    """A preallocation mode the format takes (``modes``); ``qapi=False``: measure's
    message (qapi_enum_parse)."""
    if mode in modes:
        return
    if not qapi:
        raise InvalidOptionError(f"invalid parameter value: {mode}")
    raise InvalidOptionError(f"Parameter 'preallocation' does not accept value '{mode}'")


def check_compression_type(name) -> int:
    """The header's compression type for a ``compression_type`` value (None: zlib)."""
    if name is None:
        return C.COMPRESSION_ZLIB
    if name not in COMPRESSION_TYPES:
        raise InvalidOptionError(f"Parameter 'compression-type' does not accept value "
                                 f"'{name}'")
    return COMPRESSION_TYPES[name]


def check_cluster_size(cluster_size: int, extended_l2: bool) -> None:
    """A power of two in qcow2's range; with extended L2 entries, 16 KiB at least."""
    bits = cluster_size.bit_length() - 1
    if (cluster_size <= 0 or cluster_size & (cluster_size - 1)
            or not C.MIN_CLUSTER_BITS <= bits <= C.MAX_CLUSTER_BITS):
        raise InvalidOptionError(f"Cluster size must be a power of two between "
                                 f"{1 << C.MIN_CLUSTER_BITS} and "
                                 f"{1 << (C.MAX_CLUSTER_BITS - 10)}k")
    if extended_l2 and cluster_size < C.MIN_EXTL2_CLUSTER_SIZE:
        raise InvalidOptionError(f"Extended L2 entries are only supported with cluster "
                                 f"sizes of at least {C.MIN_EXTL2_CLUSTER_SIZE} bytes")


def check_refcount_bits(bits: int, version: int, hint: str = "version=v3") -> None:
    """A power of two up to 64; other than 16 only from compat=1.1 on."""
    if not 0 < bits <= 64 or bits & (bits - 1):
        raise InvalidOptionError("Refcount width must be a power of two and may not exceed "
                                 "64 bits")
    if version < 3 and bits != C.DEFAULT_REFCOUNT_BITS:
        raise needs_v3("refcount_bits", hint)


def too_large(fmt: str | None, hint: bool, detail: str = "") -> ImageTooLargeError:
    """qemu-img's EFBIG message: create names the format (``fmt``), measure does not;
    the hint only when a cluster size can help."""
    words = ("The image size is too large" + (f" for file format '{fmt}'" if fmt else "")
             + (" (try using a larger cluster size)" if hint else ""))
    err = ImageTooLargeError(words + (f": {detail}" if detail else ""))
    err.lines = [words]  # type: ignore[attr-defined]   # the CLI: qemu-img's line, no detail
    return err


class Qcow2Options(record("Qcow2Options", (
        "version cluster_size extended_l2 preallocation compression_type lazy_refcounts "
        "refcount_bits backing_file backing_format data_file data_file_raw"))):
    """The options of a new qcow2 image after qcow2_co_create's checks, made in QEMU's
    order by :func:`qcow2_create_options` (the data file's name is checked by the
    caller, which knows where the image goes).  ``compression_type``: the header's."""

    __slots__ = ()


def _qcow2_enums(o: dict) -> tuple[int, str, int]:
    """compat, preallocation and compression_type: values the driver knows."""
    compat = o.get("compat")
    version = compat_version(compat) if compat is not None else 3
    prealloc = o.get("preallocation", "off")
    check_preallocation(prealloc)
    return version, prealloc, check_compression_type(o.get("compression_type"))


def qcow2_create_options(o: dict) -> Qcow2Options:
    """``create``'s checks of parsed qcow2 options ``o`` (qcow2_co_create_opts, then
    qcow2_co_create), in QEMU's order, with its messages.  data_file_raw without
    preallocation becomes ``metadata`` (the tables must map the data file 1:1)."""
    version, prealloc, ctype = _qcow2_enums(o)
    cluster_size = o.get("cluster_size", C.DEFAULT_CLUSTER_SIZE)
    extl2 = o.get("extended_l2", False)
    if extl2 and version < 3:
        raise needs_v3("extended_l2")
    check_cluster_size(cluster_size, extl2)
    backing = o.get("backing_file")
    if backing is not None and prealloc != "off" and not extl2:
        raise InvalidOptionError("Backing file and preallocation can only be used at the "
                                 "same time if extended_l2 is on")
    if "backing_fmt" in o and backing is None:
        raise InvalidOptionError("Backing format cannot be used without backing file")
    lazy = o.get("lazy_refcounts", False)
    if version < 3 and lazy:
        raise needs_v3("lazy_refcounts")
    rbits = o.get("refcount_bits", C.DEFAULT_REFCOUNT_BITS)
    check_refcount_bits(rbits, version)
    data_file = o.get("data_file")
    raw = o.get("data_file_raw", False)
    if raw and data_file is None:
        raise InvalidOptionError("data-file-raw requires data-file")
    if raw and backing is not None:
        raise InvalidOptionError("Backing file and data-file-raw cannot be used at the "
                                 "same time")
    if raw and prealloc == "off":
        prealloc = "metadata"
    if data_file is not None and version < 3:
        raise needs_v3("data_file")
    return Qcow2Options(version=version, cluster_size=cluster_size, extended_l2=extl2,
                        preallocation=prealloc, compression_type=ctype,
                        lazy_refcounts=lazy, refcount_bits=rbits, backing_file=backing,
                        backing_format=o.get("backing_fmt"), data_file=data_file,
                        data_file_raw=raw)


def check_compression_version(compression_type: int, version: int) -> None:
    """Only zlib below compat=1.1 (checked after the data file, as QEMU does)."""
    if compression_type != C.COMPRESSION_ZLIB and version < 3:
        raise needs_v3("compression_type")


__all__ = ["PROTOCOL_HINTS", "QCOW2_OPTIONS", "RAW_OPTIONS", "FILE_OPTIONS", "CRYPT_OPTIONS",
           "AMEND_OPTIONS",
           "AMEND_REFUSED", "QCOW2_PREALLOC", "RAW_PREALLOC", "COMPAT_LEVELS",
           "MEASURE_COMPAT_LEVELS", "help_text", "amend_help_text", "valid_option_list",
           "wants_help", "option_dict", "parse_options",
           "parse_value", "parse_size_option", "parse_number_option", "parse_bool_option",
           "parse_string_option", "parse_size_arg", "shown_value", "create_option_error",
           "check_amend_names", "needs_v3", "compat_version", "check_preallocation",
           "check_compression_type", "check_cluster_size", "check_refcount_bits",
           "too_large", "Qcow2Options", "qcow2_create_options", "check_compression_version"]
