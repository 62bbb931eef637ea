"""Create qcow2 and raw images, like ``qemu-img create``.

Two stages, in the order qemu-img runs them (so that errors come out in the same
order and the CLI can print qemu-img's "Formatting ..." line between them):

* :func:`prepare` -- the generic stage (QEMU's ``bdrv_img_create``): the format, the
  option names and the syntax of their values, the backing file (opened, unless
  ``unsafe``, to check it and to take the virtual size from it) and the size.  It
  returns a :class:`CreateRequest`; ``request.formatting_line()`` is the line
  qemu-img prints.
* :meth:`CreateRequest.run` -- the driver stage (QEMU's ``qcow2_co_create`` and the
  raw driver): enumerated values and option combinations are validated with
  qemu-img's messages, then the image is written.

A qcow2 image is laid out in closed form (compare QEMU's ``qcow2_calc_prealloc_size``),
every piece contiguous and in this order::

    header | refcount table | refcount blocks | L1 table | L2 tables | data clusters

L2 tables and data clusters exist only with preallocation (data clusters only without
an external data file).  Every cluster up to the end has refcount 1 and no other
cluster is allocated, so the refcount blocks are a repeated pattern.  For a small
image without preallocation this is exactly the file qemu-img writes (header at
cluster 0, refcount table at 1, refcount block at 2, L1 table at 3, the file ending
with the L1 table).  Metadata is streamed in bounded chunks (at most a few MiB in
memory), and an image without preallocation costs O(1) writes: the L1 table and the
header's tail are left as holes, which read as zeros.

Outputs go through :class:`qcow2.atomic.AtomicOutput`: nothing appears under the
destination name until the image is complete and flushed; an existing file is
replaced.  An external data file is committed just before the image that names it.
"""

from __future__ import annotations

import errno
import os
import stat
import struct
from collections import namedtuple

from . import constants as C
from .atomic import AtomicOutput
from .errors import (ImageTooLargeError, InvalidOptionError, Qcow2Error,  # noqa: F401
                     UnsupportedFeatureError)
from .header import Header, pack_header


def _too_large(fmt: str, hint: bool, detail: str = "") -> ImageTooLargeError:
    """qemu-img's EFBIG message; the hint only when a cluster size was given."""
    return ImageTooLargeError(f"The image size is too large for file format '{fmt}'"
                              + (" (try using a larger cluster size)" if hint else "")
                              + (f": {detail}" if detail else ""))


# -- option tables --------------------------------------------------------------------

# Option names per format, in the order qemu-img 7.2 prints them on its "Formatting"
# line (the order of the format driver's option list).
QCOW2_OPTIONS = ("cluster_size", "extended_l2", "preallocation", "compression_type", "size",
                 "compat", "backing_file", "backing_fmt", "data_file", "data_file_raw",
                 "lazy_refcounts", "refcount_bits")
RAW_OPTIONS = ("size", "preallocation")

# Options printed even when not given, with the default qemu-img prints.
_QCOW2_SHOWN_DEFAULTS = {"cluster_size": "65536", "extended_l2": "off", "compression_type": "zlib",
                         "lazy_refcounts": "off", "refcount_bits": "16"}

_SIZE_OPTS = {"size", "cluster_size"}
_NUMBER_OPTS = {"refcount_bits"}
_BOOL_OPTS = {"extended_l2", "data_file_raw", "lazy_refcounts"}
_FILE_OPTS = {"backing_file", "data_file"}

_HELP = {
    "backing_file": "<str>     - File name of a base image",
    "backing_fmt": "<str>      - Image format of the base image",
    "cluster_size": "<size>    - qcow2 cluster size",
    "compat": "<str>           - Compatibility level (v2 [0.10] or v3 [1.1])",
    "compression_type": "<str> - Compression method used for image cluster compression",
    "data_file": "<str>        - File name of an external data file",
    "data_file_raw": "<bool (on/off)> - The external data file must stay valid as a raw image",
    "extended_l2": "<bool (on/off)> - Extended L2 tables",
    "lazy_refcounts": "<bool (on/off)> - Postpone refcount updates",
    "preallocation": "<str>    - Preallocation mode (allowed values: off, metadata, falloc, "
                     "full)",
    "refcount_bits": "<num>    - Width of a reference count entry in bits",
    "size": "<size>            - Virtual disk size",
}

# Options qemu-img knows for these formats that this engine does not implement.
_UNSUPPORTED_OPTS = {
    "encryption": "encryption", "encrypt.format": "encryption",
    "encrypt.key-secret": "encryption", "encrypt.cipher-alg": "encryption",
    "encrypt.cipher-mode": "encryption", "encrypt.ivgen-alg": "encryption",
    "encrypt.ivgen-hash-alg": "encryption", "encrypt.hash-alg": "encryption",
    "encrypt.iter-time": "encryption", "nocow": "nocow", "extent_size_hint": "extent_size_hint",
}

# Image formats qemu-img can create that this engine cannot (so the error says
# "not supported" rather than "unknown").
_OTHER_QEMU_FORMATS = {"qcow", "qed", "vdi", "vhdx", "vmdk", "vpc", "luks", "parallels",
                       "cloop", "dmg", "bochs", "vvfat", "file", "host_device"}

_BOOL_WORDS = {"on": True, "yes": True, "true": True, "y": True,
               "off": False, "no": False, "false": False, "n": False}
_COMPAT = {"0.10": 2, "v2": 2, "1.1": 3, "v3": 3}
_COMPRESSION = {"zlib": C.COMPRESSION_ZLIB, "zstd": C.COMPRESSION_ZSTD}
QCOW2_PREALLOC = ("off", "metadata", "falloc", "full")
RAW_PREALLOC = ("off", "falloc", "full")

DEFAULT_CLUSTER_SIZE = 65536
MIN_EXTL2_CLUSTER_SIZE = 512 * C.SUBCLUSTERS_PER_CLUSTER      # 16 KiB
_MAX_IMAGE_SIZE = (1 << 63) - 1
_CHUNK = 4 << 20                                            # bytes of metadata per write


def help_text(fmt: str = "qcow2") -> str:
    """What ``qemu-img create -f FMT -o help`` lists (the options this engine takes)."""
    names = sorted(QCOW2_OPTIONS) if fmt == "qcow2" else list(RAW_OPTIONS)
    lines = [f"Supported {fmt} options:"]
    for n in names:
        text = _HELP[n]
        if fmt == "raw" and n == "preallocation":
            text = "<str>    - Preallocation mode (allowed values: off, falloc, full)"
        lines.append(f"  {n}={text}")
    return "\n".join(lines) + "\n"


# -- value parsing (the syntax checks of QEMU's QemuOpts) ----------------------------------

def _bad_size(name: str, value) -> InvalidOptionError:
    return InvalidOptionError(
        f"Parameter '{name}' expects a non-negative number below 2^64. Optional suffix k, "
        f"M, G, T, P or E means kilo-, mega-, giga-, tera-, peta- and exabytes, "
        f"respectively. (got {value!r})")


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
    raise InvalidOptionError(f"Parameter '{name}' expects a number (got {value!r})")


def parse_bool_option(name: str, value) -> bool:
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and value in _BOOL_WORDS:
        return _BOOL_WORDS[value]
    raise InvalidOptionError(f"Parameter '{name}' expects 'on' or 'off' (got {value!r})")


def parse_string_option(name: str, value) -> str:
    if name in _FILE_OPTS and isinstance(value, os.PathLike):
        value = os.fspath(value)
    if isinstance(value, bytes) and name in _FILE_OPTS:
        value = os.fsdecode(value)
    if not isinstance(value, str):
        raise InvalidOptionError(f"Parameter '{name}' expects a string (got {value!r})")
    return value


def _escape(text: str) -> str:
    """QEMU's escaped_print: a comma in a value is printed doubled."""
    return text.replace(",", ",,")


def parse_size_arg(size) -> int:
    """The SIZE argument: an int, or qemu-img's size syntax (k, M, G, T, P, E suffixes)."""
    if isinstance(size, bool) or not isinstance(size, (int, str)):
        raise InvalidOptionError(f"Invalid image size specified: {size!r}")
    if isinstance(size, str):
        from .units import parse_size
        try:
            size = parse_size(size)
        except Qcow2Error as exc:
            raise InvalidOptionError(str(exc)) from None
    if not 0 <= size <= _MAX_IMAGE_SIZE:
        raise InvalidOptionError(f"Invalid image size specified. Must be between 0 and "
                                 f"{_MAX_IMAGE_SIZE}.")
    return size


# -- the generic stage ----------------------------------------------------------------------

class CreateRequest:
    """A creation request that passed qemu-img's generic checks (see :func:`prepare`).

    (Plain classes and namedtuples here rather than dataclasses: importing
    ``dataclasses`` costs every ``create`` process ~20 ms.)"""

    __slots__ = ("path", "format", "size", "options", "shown", "cluster_size_given")

    def __init__(self, path: str, format: str, size: int, options: dict | None = None,
                 shown: dict | None = None, cluster_size_given: bool = False):
        self.path = path
        self.format = format
        self.size = size                        # as requested (not yet rounded)
        self.options = {} if options is None else options  # parsed values of the options
        self.shown = {} if shown is None else shown  # option -> text for the Formatting line
        self.cluster_size_given = cluster_size_given

    def __repr__(self) -> str:
        return (f"CreateRequest(path={self.path!r}, format={self.format!r}, "
                f"size={self.size!r}, options={self.options!r})")

    def __eq__(self, other):
        if not isinstance(other, CreateRequest):
            return NotImplemented
        return all(getattr(self, k) == getattr(other, k) for k in self.__slots__)

    __hash__ = None  # type: ignore[assignment]

    def formatting_line(self) -> str:
        """The line qemu-img 7.2 prints before creating the image (same keys, same order)."""
        order = QCOW2_OPTIONS if self.format == "qcow2" else RAW_OPTIONS
        parts = [f"Formatting '{self.path}', fmt={self.format}"]
        for name in order:
            if name == "size":
                parts.append(f"size={self.size}")
            elif name in self.shown:
                parts.append(f"{name}={self.shown[name]}")
            elif self.format == "qcow2" and name in _QCOW2_SHOWN_DEFAULTS:
                parts.append(f"{name}={_QCOW2_SHOWN_DEFAULTS[name]}")
        return " ".join(parts)

    def run(self, *, durable: bool = True) -> None:
        """Validate the options as the format driver does, then write the image
        (``durable=False``: without syncing it, for a caller that syncs it later)."""
        if self.format == "raw":
            _create_raw(self, durable)
        else:
            spec = Qcow2Spec.from_request(self)
            _create_qcow2(spec, durable)


def prepare(path, size=None, *, format: str = "qcow2", backing_file=None, backing_format=None,
            unsafe: bool = False, **options) -> CreateRequest:
    """The generic checks of ``qemu-img create`` (QEMU's ``bdrv_img_create``).

    ``options`` use qemu-img's names (``cluster_size``, ``compat``, ``lazy_refcounts``,
    ``refcount_bits``, ``extended_l2``, ``compression_type``, ``preallocation``,
    ``backing_fmt``, ``data_file``, ``data_file_raw``) and take Python values or the
    strings qemu-img's ``-o`` takes; None means "not given".  ``unsafe`` (``-u``)
    does not open the backing file; a size is then required.
    """
    path = os.fspath(path)
    if isinstance(path, bytes):
        path = os.fsdecode(path)
    if not isinstance(format, str):
        raise InvalidOptionError(f"Unknown file format {format!r}")
    if format not in ("qcow2", "raw"):
        if format in _OTHER_QEMU_FORMATS:
            raise UnsupportedFeatureError(
                f"Image creation in format '{format}' is not supported (supported: qcow2, "
                f"raw)", feature=f"create -f {format}")
        raise InvalidOptionError(f"Unknown file format '{format}'")

    # -- option names and value syntax (qemu_opts_do_parse) ---------------------------
    fmt_backing = options.pop("backing_fmt", None)
    if fmt_backing is not None and backing_format is not None and fmt_backing != backing_format:
        raise InvalidOptionError(f"backing format given twice: backing_fmt={fmt_backing!r} "
                                 f"and backing_format={backing_format!r}")
    if backing_format is None:
        backing_format = fmt_backing

    allowed = QCOW2_OPTIONS if format == "qcow2" else RAW_OPTIONS
    parsed: dict = {}
    shown: dict = {}
    for name, value in options.items():
        if value is None:
            continue
        if name not in allowed:
            if name in _UNSUPPORTED_OPTS and (format == "qcow2" or name in ("nocow",
                                                                             "extent_size_hint")):
                raise UnsupportedFeatureError(
                    f"Option '{name}' is not supported by this engine",
                    feature=_UNSUPPORTED_OPTS[name])
            raise InvalidOptionError(f"Invalid parameter '{name}'")
        if name in _SIZE_OPTS:
            parsed[name] = parse_size_option(name, value)
            shown[name] = str(parsed[name])
        elif name in _NUMBER_OPTS:
            parsed[name] = parse_number_option(name, value)
            shown[name] = str(parsed[name])
        elif name in _BOOL_OPTS:
            parsed[name] = parse_bool_option(name, value)
            shown[name] = value if isinstance(value, str) else ("on" if value else "off")
        else:
            parsed[name] = parse_string_option(name, value)
            shown[name] = _escape(parsed[name])

    if backing_file is not None:
        if format == "raw":
            raise InvalidOptionError("Backing file not supported for file format 'raw'")
        backing_file = parse_string_option("backing_file", backing_file)
        parsed["backing_file"] = backing_file
        shown["backing_file"] = _escape(backing_file)
    if backing_format is not None:
        if format == "raw":
            raise InvalidOptionError("Backing file format not supported for file format 'raw'")
        backing_format = parse_string_option("backing_fmt", backing_format)
        parsed["backing_fmt"] = backing_format
        shown["backing_fmt"] = _escape(backing_format)

    if size is not None:
        size = parse_size_arg(size)

    # -- the backing file --------------------------------------------------------------
    if backing_file is not None:
        from .paths import check_file_name, combine_path

        if backing_file == path:
            raise InvalidOptionError("Error: Trying to create an image with the same filename "
                                     "as the backing file")
        check_file_name(backing_file, "backing file")
        full = combine_path(path, backing_file)
        if os.path.exists(path) and os.path.exists(full) and os.path.samefile(path, full):
            raise InvalidOptionError("Error: Trying to create an image with the same filename "
                                     "as the backing file")
        if backing_format is not None and backing_format not in ("qcow2", "raw"):
            raise InvalidOptionError(f"Parameter 'backing_fmt' does not accept value "
                                     f"'{backing_format}' (backing files can be qcow2 or raw)")
        if not unsafe:
            detected = _open_backing(full, backing_format)
            if backing_format is None:
                raise InvalidOptionError(f"Backing file specified without backing format. "
                                         f"Detected format of {detected[0]}.")
            if size is None:
                size = detected[1]
        elif backing_format is None:
            raise InvalidOptionError("Backing file specified without backing format")

    if size is None:
        raise InvalidOptionError("Image creation needs a size parameter")
    return CreateRequest(path=path, format=format, size=size, options=parsed, shown=shown,
                         cluster_size_given="cluster_size" in parsed)


def _open_backing(full: str, fmt: str | None) -> tuple[str, int]:
    """Open the backing file (not its own chain) as qemu-img does: (format, virtual size)."""
    from .opener import open_image

    try:
        with open_image(full, format=fmt, backing=False) as img:
            return img.format, img.size
    except Qcow2Error as exc:
        exc.args = (f"{exc}. Could not open backing image.",)
        raise


def create(path, size=None, *, format: str = "qcow2", backing_file=None, backing_format=None,
           unsafe: bool = False, **options) -> None:
    """Create an image, like ``qemu-img create [-f FMT] [-b BACKING -F FMT] [-u] [-o ...]``.

    ``size``: bytes (int) or qemu-img's size syntax ("20G"); None takes the backing
    file's virtual size.  ``format``: "qcow2" or "raw".  ``backing_file`` is stored
    exactly as given; a relative name is resolved against the new image's folder to
    open it.  ``backing_format`` is required with a backing file (as in qemu-img 7.2).
    ``unsafe``: do not open the backing file (a size is then required).  ``options``:
    qemu-img's ``-o`` options, e.g. ``cluster_size=65536``, ``compat="0.10"``,
    ``extended_l2=True``, ``preallocation="falloc"``, ``data_file="disk.data"``.

    Raises :class:`InvalidOptionError` (a ``ValueError``) with qemu-img's message for a
    bad option or combination; the destination is replaced only on success.
    """
    prepare(path, size, format=format, backing_file=backing_file,
            backing_format=backing_format, unsafe=unsafe, **options).run()


# -- the qcow2 driver stage -------------------------------------------------------------

class Qcow2Spec(namedtuple("Qcow2Spec", (
        "path size requested_size version cluster_bits refcount_order extended_l2 "
        "lazy_refcounts compression_type preallocation backing_file backing_format "
        "data_file data_file_raw cluster_size_given"))):
    """Validated, final parameters of a qcow2 image to create (immutable): ``size`` is
    the virtual size, a multiple of 512; ``requested_size`` as asked."""

    __slots__ = ()

    @classmethod
    def from_request(cls, req: CreateRequest) -> "Qcow2Spec":
        """QEMU's checks, in QEMU's order (qcow2_co_create_opts, then qcow2_co_create)."""
        o = req.options
        compat = o.get("compat")
        if compat is not None and compat not in _COMPAT:
            raise InvalidOptionError(f"Parameter 'compat' does not accept value '{compat}' "
                                     f"(use 0.10, 1.1, v2 or v3)")
        prealloc = o.get("preallocation", "off")
        if prealloc not in QCOW2_PREALLOC:
            raise InvalidOptionError(f"Parameter 'preallocation' does not accept value "
                                     f"'{prealloc}' (use off, metadata, falloc or full)")
        ctype = o.get("compression_type")
        if ctype is not None and ctype not in _COMPRESSION:
            raise InvalidOptionError(f"Parameter 'compression_type' does not accept value "
                                     f"'{ctype}' (use zlib or zstd)")
        size = (req.size + 511) & ~511          # QEMU silently rounds up to sectors
        version = _COMPAT[compat] if compat is not None else 3
        cluster_size = o.get("cluster_size", DEFAULT_CLUSTER_SIZE)
        extl2 = o.get("extended_l2", False)
        if extl2 and version < 3:
            raise InvalidOptionError("Extended L2 entries are only supported with compatibility "
                                     "level 1.1 and above (use version=v3 or greater)")
        if (not C.MIN_CLUSTER_BITS <= cluster_size.bit_length() - 1 <= C.MAX_CLUSTER_BITS
                or cluster_size & (cluster_size - 1)):
            raise InvalidOptionError(f"Cluster size must be a power of two between "
                                     f"{1 << C.MIN_CLUSTER_BITS} and "
                                     f"{1 << (C.MAX_CLUSTER_BITS - 10)}k")
        if extl2 and cluster_size < MIN_EXTL2_CLUSTER_SIZE:
            raise InvalidOptionError(f"Extended L2 entries are only supported with cluster "
                                     f"sizes of at least {MIN_EXTL2_CLUSTER_SIZE} bytes")
        backing = o.get("backing_file")
        if backing is not None and prealloc != "off" and not extl2:
            raise InvalidOptionError("Backing file and preallocation can only be used at the "
                                     "same time if extended_l2 is on")
        if "backing_fmt" in o and backing is None:
            raise InvalidOptionError("Backing format cannot be used without backing file")
        lazy = o.get("lazy_refcounts", False)
        if version < 3 and lazy:
            raise InvalidOptionError("Lazy refcounts only supported with compatibility level "
                                     "1.1 and above (use version=v3 or greater)")
        rbits = o.get("refcount_bits", 16)
        if not 0 < rbits <= 64 or rbits & (rbits - 1):
            raise InvalidOptionError("Refcount width must be a power of two and may not exceed "
                                     "64 bits")
        if version < 3 and rbits != 16:
            raise InvalidOptionError("Different refcount widths than 16 bits require "
                                     "compatibility level 1.1 or above (use version=v3 or "
                                     "greater)")
        data_file = o.get("data_file")
        raw = o.get("data_file_raw", False)
        if raw and data_file is None:
            raise InvalidOptionError("data-file-raw requires data-file")
        if raw and backing is not None:
            raise InvalidOptionError("Backing file and data-file-raw cannot be used at the "
                                     "same time")
        if raw and prealloc == "off":
            # The L1/L2 tables must map the data file 1:1 (qcow2_co_create).
            prealloc = "metadata"
        if data_file is not None:
            if version < 3:
                raise InvalidOptionError("External data files are only supported with "
                                         "compatibility level 1.1 and above (use version=v3 or "
                                         "greater)")
            from .paths import check_file_name
            check_file_name(data_file, "external data file")
            full = _data_file_path(req.path, data_file)
            if os.path.abspath(full) == os.path.abspath(req.path) or (
                    os.path.exists(full) and os.path.exists(req.path)
                    and os.path.samefile(full, req.path)):
                raise InvalidOptionError("The external data file cannot be the image itself")
        ctype_id = _COMPRESSION[ctype] if ctype is not None else C.COMPRESSION_ZLIB
        if ctype_id != C.COMPRESSION_ZLIB and version < 3:
            raise InvalidOptionError("Non-zlib compression type is only supported with "
                                     "compatibility level 1.1 and above (use version=v3 or "
                                     "greater)")
        return cls(path=req.path, size=size, requested_size=req.size, version=version,
                   cluster_bits=cluster_size.bit_length() - 1,
                   refcount_order=rbits.bit_length() - 1, extended_l2=extl2,
                   lazy_refcounts=lazy, compression_type=ctype_id, preallocation=prealloc,
                   backing_file=backing, backing_format=o.get("backing_fmt"),
                   data_file=data_file, data_file_raw=raw,
                   cluster_size_given=req.cluster_size_given)

    def header(self, layout: "Qcow2Layout") -> Header:
        incompat = 0
        if self.data_file is not None:
            incompat |= C.INCOMPAT_DATA_FILE
        if self.compression_type != C.COMPRESSION_ZLIB:
            incompat |= C.INCOMPAT_COMPRESSION
        if self.extended_l2:
            incompat |= C.INCOMPAT_EXTL2
        return Header(
            version=self.version, backing_file_offset=0, backing_file_size=0,
            cluster_bits=self.cluster_bits, size=self.size, header_size_field=self.size,
            crypt_method=C.CRYPT_NONE, l1_size=layout.l1_size,
            l1_table_offset=layout.l1_offset, refcount_table_offset=layout.reftable_offset,
            refcount_table_clusters=layout.reftable_clusters, nb_snapshots=0,
            snapshots_offset=0, incompatible_features=incompat,
            compatible_features=C.COMPAT_LAZY_REFCOUNTS if self.lazy_refcounts else 0,
            autoclear_features=C.AUTOCLEAR_DATA_FILE_RAW if self.data_file_raw else 0,
            refcount_order=self.refcount_order, header_length=0,
            compression_type=self.compression_type, backing_file=self.backing_file,
            backing_format=self.backing_format, data_file=self.data_file)


def _data_file_path(image_path: str, name: str) -> str:
    """Where the data file goes: resolved against the image's folder, as the engine
    resolves it on open (qemu-img 7.2 resolves it against the working directory)."""
    from .paths import combine_path
    return combine_path(image_path, name)


# -- layout -------------------------------------------------------------------------------

class Qcow2Layout(namedtuple("Qcow2Layout", (
        "cluster_bits refcount_order l2_entry_size l1_size l1_offset l1_clusters "
        "reftable_offset reftable_clusters refblock_offset refblocks l2_offset l2_tables "
        "data_offset data_clusters mapped_clusters total_clusters file_size"))):
    """Where everything goes; all offsets in bytes, counts in clusters (immutable).

    ``l1_size`` counts entries; ``l1_offset`` is 0 when l1_size is 0 (as QEMU writes
    it); ``data_clusters``: data clusters in the image file (0 with a data file);
    ``mapped_clusters``: guest clusters mapped by the L2 tables; ``total_clusters``:
    the clusters with refcount 1, [0, total_clusters)."""

    __slots__ = ()

    @property
    def cluster_size(self) -> int:
        return 1 << self.cluster_bits

    @property
    def refcounts_per_block(self) -> int:
        return (self.cluster_size * 8) >> self.refcount_order


def qcow2_layout(size: int, cluster_bits: int, refcount_order: int = 4, *,
                 extended_l2: bool = False, preallocation: str = "off",
                 external_data: bool = False) -> Qcow2Layout:
    """The closed-form layout of a new image of virtual ``size`` (a multiple of 512).

    With preallocation every guest cluster is mapped (to the image file's data area,
    or 1:1 to the external data file).  The file ends where QEMU's would: after the L1
    entries without preallocation; with ``metadata`` at the end of the (sub)cluster
    holding the last guest byte (QEMU copies-on-write only up to there); with
    ``falloc``/``full`` after the last data cluster.

    Raises ImageTooLargeError when the image exceeds QEMU's limits (L1 table of 32 MiB,
    refcount table of 8 MiB, 56-bit host offsets).
    """
    preallocate = preallocation != "off"
    cs = 1 << cluster_bits
    l2e = 16 if extended_l2 else 8
    l2_span = (cs // l2e) * cs
    l1_size = -(-size // l2_span)
    if l1_size > C.MAX_L1_SIZE // C.L1E_SIZE:
        raise ImageTooLargeError(f"the L1 table would have {l1_size} entries, at most "
                                 f"{C.MAX_L1_SIZE // C.L1E_SIZE} are allowed")
    l1_clusters = -(-(l1_size * C.L1E_SIZE) // cs)
    mapped = -(-size // cs) if preallocate else 0
    l2_tables = l1_size if preallocate else 0
    data = 0 if external_data else mapped
    base = 1 + l1_clusters + l2_tables + data
    per_block = (cs * 8) >> refcount_order
    rb = rt = 0
    while True:                 # fixed point: the refcount structures count themselves
        total = base + rb + rt
        nrb = -(-total // per_block)
        nrt = -(-(nrb * 8) // cs)
        if (nrb, nrt) == (rb, rt):
            break
        rb, rt = nrb, nrt
    if rt * cs > C.MAX_REFTABLE_SIZE:
        raise ImageTooLargeError(f"the refcount table would need {rt * cs} bytes, at most "
                                 f"{C.MAX_REFTABLE_SIZE} are allowed")
    rt_off = cs
    rb_off = rt_off + rt * cs
    l1_off = rb_off + rb * cs
    l2_off = l1_off + l1_clusters * cs
    data_off = l2_off + l2_tables * cs
    end = data_off + data * cs
    if end > C.L2E_OFFSET_MASK:
        raise ImageTooLargeError(f"host offsets would reach {end:#x}, beyond 56 bits")
    if preallocate and l2_tables:
        file_size = end
        if data and preallocation == "metadata":
            file_size = data_off + _cow_end(size, cluster_bits, extended_l2)
    elif l1_size:
        file_size = l1_off + l1_size * C.L1E_SIZE      # QEMU writes just the L1 entries
    else:
        file_size = l1_off
    return Qcow2Layout(cluster_bits=cluster_bits, refcount_order=refcount_order,
                       l2_entry_size=l2e, l1_size=l1_size, l1_offset=l1_off if l1_size else 0,
                       l1_clusters=l1_clusters, reftable_offset=rt_off, reftable_clusters=rt,
                       refblock_offset=rb_off, refblocks=rb, l2_offset=l2_off,
                       l2_tables=l2_tables, data_offset=data_off, data_clusters=data,
                       mapped_clusters=mapped, total_clusters=base + rb + rt,
                       file_size=file_size)


def qcow2_header_bytes(spec: Qcow2Spec, layout: Qcow2Layout) -> bytes:
    """The first cluster's content (without its zero tail), as QEMU 7.2 writes it."""
    cs = layout.cluster_size
    h = spec.header(layout)
    if h.backing_file is not None:
        n = len(h.backing_file.encode("utf-8", "surrogateescape"))
        if n > C.MAX_BACKING_FILE_NAME:
            raise InvalidOptionError(
                f"Could not assign backing file '{h.backing_file}' with format "
                f"'{h.backing_format}': the name is {n} bytes long, at most "
                f"{C.MAX_BACKING_FILE_NAME} are allowed")
    try:
        out = pack_header(h)
    except ValueError:
        raise InvalidOptionError(
            f"Could not assign backing file '{h.backing_file}' with format "
            f"'{h.backing_format}': the header, its extensions and the name need more than "
            f"one cluster ({cs} bytes): No space left on device") from None
    return out


# -- writing ----------------------------------------------------------------------------

def _pwrite_all(fd: int, data, offset: int) -> None:
    mv = memoryview(data)
    while len(mv):
        n = os.pwrite(fd, mv, offset)
        mv = mv[n:]
        offset += n


def _refblock(cs: int, order: int, used: int) -> bytes:
    """A refcount block whose first ``used`` entries are 1 (sub-byte widths LSB-first)."""
    bits = 1 << order
    if bits >= 8:
        one = (1).to_bytes(bits // 8, "big")
        body = one * used
    else:
        per_byte = 8 // bits
        full, part = divmod(used, per_byte)
        body = bytes([sum(1 << (i * bits) for i in range(per_byte))]) * full
        if part:
            body += bytes([sum(1 << (i * bits) for i in range(part))])
    return body + bytes(cs - len(body))


def _cow_end(size: int, cluster_bits: int, extended_l2: bool) -> int:
    """Where QEMU's preallocation stops writing: the end of the (sub)cluster holding
    the last guest byte (it copies-on-write zeros over the rest of that unit)."""
    unit = 1 << (cluster_bits - (5 if extended_l2 else 0))
    return -(-size // unit) * unit


def _write_cow_tail(fd: int, host_base: int, size: int, spec: "Qcow2Spec") -> None:
    """Zeros from the guest end to the end of its (sub)cluster, as QEMU's preallocation
    writes them (so the last block is allocated, and ``qemu-img map`` agrees)."""
    end = _cow_end(size, spec.cluster_bits, spec.extended_l2)
    if end > size:
        _pwrite_all(fd, bytes(end - size), host_base + size)


def _table_chunks(first_value: int, count: int, step: int, flags: int):
    """Big-endian 64-bit entries ``(first_value + i*step) | flags`` for i < count, in chunks."""
    if count <= 8192:
        # small tables (every image without preallocation): no numpy import (start-up)
        yield 0, struct.pack(f">{count}Q", *(((first_value + i * step) | flags)
                                             for i in range(count)))
        return
    import numpy as np

    per = _CHUNK // 8
    for start in range(0, count, per):
        n = min(per, count - start)
        vals = np.arange(start, start + n, dtype=np.uint64) * np.uint64(step)
        vals += np.uint64(first_value)
        if flags:
            vals |= np.uint64(flags)
        yield start, vals.astype(">u8").tobytes()


def _write_l2_tables(fd: int, lay: Qcow2Layout, host_base: int) -> None:
    """Every guest cluster mapped to ``host_base + index * cluster_size``, COPIED; an
    extended entry's subcluster bitmap stays 0, as QEMU preallocates (reads then come
    from the backing file or as zeros)."""
    import numpy as np

    cs = lay.cluster_size
    per_table = cs // lay.l2_entry_size
    tables_per_chunk = max(1, _CHUNK // cs)
    ext = lay.l2_entry_size == 16
    for t0 in range(0, lay.l2_tables, tables_per_chunk):
        nt = min(tables_per_chunk, lay.l2_tables - t0)
        g0 = t0 * per_table
        n = nt * per_table
        used = max(0, min(n, lay.mapped_clusters - g0))
        vals = np.zeros(n, dtype=np.uint64)
        if used:
            v = np.arange(g0, g0 + used, dtype=np.uint64) * np.uint64(cs)
            v += np.uint64(host_base)
            v |= np.uint64(C.OFLAG_COPIED)
            vals[:used] = v
        if ext:
            out = np.zeros(2 * n, dtype=">u8")
            out[0::2] = vals
        else:
            out = vals.astype(">u8")
        _pwrite_all(fd, out.tobytes(), lay.l2_offset + t0 * cs)


def _write_qcow2_metadata(fd: int, spec: Qcow2Spec, lay: Qcow2Layout) -> None:
    cs = lay.cluster_size
    os.ftruncate(fd, lay.file_size)
    _pwrite_all(fd, qcow2_header_bytes(spec, lay), 0)
    for i, chunk in _table_chunks(lay.refblock_offset, lay.refblocks, cs, 0):
        _pwrite_all(fd, chunk, lay.reftable_offset + i * 8)
    per = lay.refcounts_per_block
    full_blocks = lay.total_clusters // per
    if full_blocks:
        batch = max(1, min(full_blocks, _CHUNK // cs))
        buf = _refblock(cs, lay.refcount_order, per) * batch
        for b in range(0, full_blocks, batch):
            n = min(batch, full_blocks - b)
            _pwrite_all(fd, memoryview(buf)[:n * cs], lay.refblock_offset + b * cs)
    rest = lay.total_clusters - full_blocks * per
    if rest:
        _pwrite_all(fd, _refblock(cs, lay.refcount_order, rest),
                    lay.refblock_offset + full_blocks * cs)
    if lay.l2_tables:
        for i, chunk in _table_chunks(lay.l2_offset, lay.l2_tables, cs, C.OFLAG_COPIED):
            _pwrite_all(fd, chunk, lay.l1_offset + i * 8)
        _write_l2_tables(fd, lay, 0 if spec.data_file is not None else lay.data_offset)


def _allocate_data(fd: int, offset: int, length: int, mode: str) -> None:
    """falloc: reserve the blocks; full: write zeros (as QEMU's file driver does)."""
    if length <= 0 or mode in ("off", "metadata"):
        return
    if mode == "falloc":
        from .backends.fallocate import allocate
        allocate(fd, offset, length)
        return
    zeros = bytes(min(_CHUNK, length))
    end = offset + length
    while offset < end:
        n = min(len(zeros), end - offset)
        _pwrite_all(fd, memoryview(zeros)[:n], offset)
        offset += n


def _output(path: str) -> AtomicOutput:
    """The atomic output for ``path`` (through a symlink to its target, as qemu-img
    writes through it); refuses to replace anything but a regular file."""
    target = os.path.realpath(path) if os.path.islink(path) else path
    try:
        st = os.stat(target)
    except FileNotFoundError:
        st = None
    except OSError as exc:
        raise Qcow2Error(f"Could not create '{path}': {exc.strerror}") from None
    if st is not None and not stat.S_ISREG(st.st_mode):
        raise UnsupportedFeatureError(f"Could not create '{path}': it exists and is not a "
                                      f"regular file", feature="create on a device")
    try:
        return AtomicOutput(target)
    except OSError as exc:
        raise Qcow2Error(f"Could not create '{path}': {exc.strerror}") from None


def _write_error(exc: OSError, path: str, fmt: str, hint: bool) -> Qcow2Error:
    if exc.errno == errno.EFBIG:
        return _too_large(fmt, hint, exc.strerror or "")
    err = Qcow2Error(f"Could not create '{path}': {exc.strerror or exc}")
    err.errno = exc.errno  # type: ignore[attr-defined]
    return err


def _create_qcow2(spec: Qcow2Spec, durable: bool = True) -> None:
    try:
        lay = qcow2_layout(spec.size, spec.cluster_bits, spec.refcount_order,
                           extended_l2=spec.extended_l2,
                           preallocation=spec.preallocation,
                           external_data=spec.data_file is not None)
    except ImageTooLargeError as exc:
        raise _too_large("qcow2", spec.cluster_size_given, str(exc)) from None
    header = qcow2_header_bytes(spec, lay)       # fail early if the header cannot fit
    del header
    data_out = None
    try:
        if spec.data_file is not None:
            data_path = _data_file_path(spec.path, spec.data_file)
            data_out = _output(data_path)
            try:
                os.ftruncate(data_out.fd, spec.size)
                _allocate_data(data_out.fd, 0, spec.size, spec.preallocation)
                if spec.preallocation != "off":
                    _write_cow_tail(data_out.fd, 0, spec.size, spec)
            except OSError as exc:
                raise _write_error(exc, data_path, "qcow2", spec.cluster_size_given) from None
        with _output(spec.path) as out:
            try:
                _write_qcow2_metadata(out.fd, spec, lay)
                if spec.data_file is None:
                    _allocate_data(out.fd, lay.data_offset, lay.data_clusters * lay.cluster_size,
                                   spec.preallocation)
                    if spec.preallocation == "metadata":
                        _write_cow_tail(out.fd, lay.data_offset, spec.size, spec)
            except OSError as exc:
                raise _write_error(exc, spec.path, "qcow2", spec.cluster_size_given) from None
            if data_out is not None:
                data_out.commit(sync=durable)
            out.commit(sync=durable)
    finally:
        if data_out is not None:
            data_out.close()


# -- raw ----------------------------------------------------------------------------------

def _create_raw(req: CreateRequest, durable: bool = True) -> None:
    prealloc = req.options.get("preallocation", "off")
    if prealloc == "metadata":
        raise InvalidOptionError("Unsupported preallocation mode: metadata")
    if prealloc not in RAW_PREALLOC:
        raise InvalidOptionError(f"Parameter 'preallocation' does not accept value "
                                 f"'{prealloc}' (use off, falloc or full)")
    size = (req.size + 511) & ~511          # the file driver rounds up to sectors
    with _output(req.path) as out:
        try:
            os.ftruncate(out.fd, size)
            _allocate_data(out.fd, 0, size, prealloc)
        except OSError as exc:
            raise _write_error(exc, req.path, "raw", False) from None
        out.commit(sync=durable)


__all__ = ["create", "prepare", "CreateRequest", "Qcow2Spec", "Qcow2Layout", "qcow2_layout",
           "qcow2_header_bytes", "InvalidOptionError", "ImageTooLargeError", "help_text",
           "parse_size_arg",
           "QCOW2_OPTIONS", "RAW_OPTIONS"]
