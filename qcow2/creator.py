"""Create qcow2 and raw images, like ``qemu-img create``.

Two stages, in the order qemu-img runs them (so that errors come out in the same
order and the CLI can print qemu-img's "Formatting ..." line between them):

* :func:`prepare` -- the generic stage (QEMU's ``bdrv_img_create``): the format, the
  option names and the syntax of their values (:mod:`qcow2.options`), the backing file
  (opened, unless ``unsafe``, to check it and to take the virtual size from it) and the
  size.  It returns a :class:`CreateRequest`; ``request.formatting_line()`` is the line
  qemu-img prints.
* :meth:`CreateRequest.run` -- the driver stage (QEMU's ``qcow2_co_create`` and the
  raw driver): enumerated values and option combinations are validated with
  qemu-img's messages, then the image is written where :mod:`qcow2.layout` puts it.

(The module is not called ``create``: importing ``qcow2.create`` would replace the
package's ``qcow2.create()`` function with the module.)

Outputs go through :class:`qcow2.atomic.AtomicOutput`: nothing appears under the
destination name until the image is complete and flushed; an existing file is
replaced.  An external data file is committed just before the image that names it.
"""

from __future__ import annotations

import errno
import os
import stat

from . import options as O
from .atomic import AtomicOutput, pwrite_all
from .errors import ImageTooLargeError, InvalidOptionError, Qcow2Error, UnsupportedFeatureError
from .lightweight import record
from .layout import CHUNK, cow_end, metadata_writes, qcow2_header_bytes, qcow2_layout
from .paths import check_file_name, combine_path
from .rbdname import is_rbd_name, open_rbd
from .rbdoutput import create_rbd_output, publish_rbd_output

# Image formats qemu-img can create that this engine cannot (so the error says
# "not supported" rather than "unknown").
_OTHER_QEMU_FORMATS = {"qcow", "qed", "vdi", "vhdx", "vmdk", "vpc", "parallels",
                       "cloop", "dmg", "bochs", "vvfat", "file", "host_device"}


# -- the generic stage ----------------------------------------------------------------------

class CreateRequest:
    """A creation request that passed qemu-img's generic checks (see :func:`prepare`).

    (Plain classes and namedtuples here rather than dataclasses: importing
    ``dataclasses`` costs every ``create`` process ~20 ms.)"""

    __slots__ = ("path", "format", "size", "options", "shown", "cluster_size_given", "key")

    def __init__(self, path: str, format: str, size: int, options: dict | None = None,
                 shown: dict | None = None, cluster_size_given: bool = False, key=None):
        self.path = path
        self.format = format
        self.size = size                        # as requested (not yet rounded)
        self.options = {} if options is None else options  # parsed values of the options
        self.shown = {} if shown is None else shown  # option -> text for the Formatting line
        self.cluster_size_given = cluster_size_given
        self.key = key                          # passphrase of an encrypted image (Python)

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
        order = _option_order(self.format)
        parts = [f"Formatting '{self.path}', fmt={self.format}"]
        for name in order:
            if name == "size":
                parts.append(f"size={self.size}")
            elif name in self.shown:
                parts.append(f"{name}={self.shown[name]}")
            elif self.format == "qcow2" and name in O.QCOW2_SHOWN_DEFAULTS:
                parts.append(f"{name}={O.QCOW2_SHOWN_DEFAULTS[name]}")
        return " ".join(parts)

    def run(self, *, durable: bool = True) -> None:
        """Validate the options as the format driver does, then write the image
        (``durable=False``: without syncing it, for a caller that syncs it later)."""
        if self.format == "luks":
            _create_luks(self, durable)
        elif self.format == "raw":
            _create_raw(self, durable)
        else:
            spec = Qcow2Spec.from_request(self)
            if is_rbd_name(self.path):
                _create_qcow2_rbd(spec, durable)
            else:
                _create_qcow2(spec, durable)


def _option_order(format: str) -> tuple:
    """The options of ``format`` in the order qemu-img lists them."""
    if format == "qcow2":
        return O.CRYPT_OPTIONS + O.QCOW2_OPTIONS
    if format == "luks":
        from .encryptopts import LUKS_FORMAT_OPTIONS
        return LUKS_FORMAT_OPTIONS
    return O.RAW_OPTIONS


def _check_format(format) -> None:
    if not isinstance(format, str):
        raise InvalidOptionError(f"Unknown file format {format!r}")
    if format not in ("qcow2", "raw", "luks"):
        if format in _OTHER_QEMU_FORMATS:
            raise UnsupportedFeatureError(
                f"Image creation in format '{format}' is not supported (supported: qcow2, "
                f"raw)", feature=f"create -f {format}")
        raise InvalidOptionError(f"Unknown file format '{format}'")


def _add_backing(format: str, parsed: dict, shown: dict, name: str, value,
                 what: str) -> str | None:
    """The -b/-F argument ``value`` (None: not given) as option ``name``."""
    if value is None:
        return None
    if format == "raw":
        raise InvalidOptionError(f"{what} not supported for file format 'raw'")
    value = O.parse_string_option(name, value)
    parsed[name] = value
    shown[name] = O.escape(value)
    return value


def _same_file_error() -> InvalidOptionError:
    return InvalidOptionError("Error: Trying to create an image with the same filename as "
                              "the backing file")


def _check_backing(path: str, backing_file: str, backing_format, size, unsafe: bool):
    """bdrv_img_create's checks of the backing file; returns the size (the backing
    file's virtual size when none was given)."""
    if backing_file == path:
        raise _same_file_error()
    check_file_name(backing_file, "backing file")
    full = combine_path(path, backing_file)
    if os.path.exists(path) and os.path.exists(full) and os.path.samefile(path, full):
        raise _same_file_error()
    if backing_format is not None and backing_format not in ("qcow2", "raw"):
        raise InvalidOptionError(f"Parameter 'backing_fmt' does not accept value "
                                 f"'{backing_format}' (backing files can be qcow2 or raw)")
    if unsafe:
        if backing_format is None:
            raise InvalidOptionError("Backing file specified without backing format")
        return size
    detected = _open_backing(full, backing_format)
    if backing_format is None:
        err = InvalidOptionError(f"Backing file specified without backing format. "
                                 f"Detected format of {detected[0]}.")
        # qemu-img's CLI: the error line, then its hint line
        err.lines = ["Backing file specified without backing format"]  # type: ignore[attr-defined]
        err.hint = f"Detected format of {detected[0]}."  # type: ignore[attr-defined]
        raise err
    return detected[1] if size is None else size


def prepare(path, size=None, *, format: str = "qcow2", backing_file=None, backing_format=None,
            unsafe: bool = False, key=None, **options) -> CreateRequest:
    """The generic checks of ``qemu-img create`` (QEMU's ``bdrv_img_create``).

    ``options`` use qemu-img's names (``cluster_size``, ``compat``, ``lazy_refcounts``,
    ``refcount_bits``, ``extended_l2``, ``compression_type``, ``preallocation``,
    ``backing_fmt``, ``data_file``, ``data_file_raw``) and take Python values or the
    strings qemu-img's ``-o`` takes; None means "not given".  ``unsafe`` (``-u``)
    does not open the backing file; a size is then required.  Encryption: the
    ``encrypt.*`` options (``qcow2.encryptopts``; pass them as ``**{"encrypt.format":
    "luks"}``) with ``key=`` the passphrase, or ``encrypt.key-secret`` naming a secret.
    """
    path = os.fspath(path)
    if isinstance(path, bytes):
        path = os.fsdecode(path)
    _check_format(format)

    # -- option names and value syntax (qemu_opts_do_parse) ---------------------------
    fmt_backing = options.pop("backing_fmt", None)
    if fmt_backing is not None and backing_format is not None and fmt_backing != backing_format:
        raise InvalidOptionError(f"backing format given twice: backing_fmt={fmt_backing!r} "
                                 f"and backing_format={backing_format!r}")
    if backing_format is None:
        backing_format = fmt_backing
    allowed = _option_order(format)
    parsed = O.parse_options(options, allowed, O.create_option_error(format))
    shown = {name: O.shown_value(name, options[name], value) for name, value in parsed.items()}
    backing_file = _add_backing(format, parsed, shown, "backing_file", backing_file,
                                "Backing file")
    backing_format = _add_backing(format, parsed, shown, "backing_fmt", backing_format,
                                  "Backing file format")
    if size is not None:
        size = O.parse_size_arg(size)
    if backing_file is not None:
        size = _check_backing(path, backing_file, backing_format, size, unsafe)
    if size is None:
        raise InvalidOptionError("Image creation needs a size parameter")
    return CreateRequest(path=path, format=format, size=size, options=parsed, shown=shown,
                         cluster_size_given="cluster_size" in parsed, key=key)


def _open_backing(full: str, fmt: str | None) -> tuple[str, int]:
    """Open the backing file (not its own chain) as qemu-img does: (format, virtual size)."""
    from .opener import open_image

    try:
        with open_image(full, format=fmt, backing=False) as img:
            return img.format, img.size
    except Qcow2Error as exc:
        exc.lines = [str(exc)]  # type: ignore[attr-defined]  # qemu-img's CLI: then the hint
        exc.hint = "Could not open backing image.\n"  # type: ignore[attr-defined]
        exc.args = (f"{exc}. Could not open backing image.",)
        raise


def create(path, size=None, *, format: str = "qcow2", backing_file=None, backing_format=None,
           unsafe: bool = False, key=None, **options) -> None:
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
            backing_format=backing_format, unsafe=unsafe, key=key, **options).run()


# -- the qcow2 driver stage -------------------------------------------------------------

class Qcow2Spec(record("Qcow2Spec", (
        "path size requested_size version cluster_bits refcount_order extended_l2 "
        "lazy_refcounts compression_type preallocation backing_file backing_format "
        "data_file data_file_raw cluster_size_given encryption"), defaults=(None,))):
    """Validated, final parameters of a qcow2 image to create (immutable): ``size`` is
    the virtual size, a multiple of 512; ``requested_size`` as asked."""

    __slots__ = ()

    @classmethod
    def from_request(cls, req: CreateRequest) -> "Qcow2Spec":
        """QEMU's checks, in QEMU's order (qcow2_co_create_opts, then qcow2_co_create)."""
        o = O.qcow2_create_options(req.options)
        if o.data_file is not None:
            check_file_name(o.data_file, "external data file")
            full = _data_file_path(req.path, o.data_file)
            if os.path.abspath(full) == os.path.abspath(req.path) or (
                    os.path.exists(full) and os.path.exists(req.path)
                    and os.path.samefile(full, req.path)):
                raise InvalidOptionError("The external data file cannot be the image itself")
        O.check_compression_version(o.compression_type, o.version)
        enc = _encryption(req, o)
        return cls(encryption=enc,
                   path=req.path, size=(req.size + 511) & ~511,  # QEMU rounds up to sectors
                   requested_size=req.size, version=o.version,
                   cluster_bits=o.cluster_size.bit_length() - 1,
                   refcount_order=o.refcount_bits.bit_length() - 1,
                   extended_l2=o.extended_l2, lazy_refcounts=o.lazy_refcounts,
                   compression_type=o.compression_type, preallocation=o.preallocation,
                   backing_file=o.backing_file, backing_format=o.backing_format,
                   data_file=o.data_file, data_file_raw=o.data_file_raw,
                   cluster_size_given=req.cluster_size_given)


def _encryption(req: CreateRequest, o):
    """The encryption asked for (``qcow2.encryptopts``), None for none."""
    from .encryptopts import create_encryption
    enc = create_encryption(req.options, req.key)
    if enc is None:
        return None
    if o.data_file is not None or is_rbd_name(req.path):
        enc.wipe()
        raise UnsupportedFeatureError("Encrypted images with an external data file or in "
                                      "RBD are not supported by this engine",
                                      feature="encryption")
    if o.preallocation != "off":
        enc.wipe()
        raise UnsupportedFeatureError(f"Preallocation mode '{o.preallocation}' of encrypted "
                                      f"images is not supported by this engine",
                                      feature="encryption with preallocation")
    return enc


def _data_file_path(image_path: str, name: str) -> str:
    """Where the data file goes: resolved against the image's folder, as the engine
    resolves it on open (qemu-img 7.2 resolves it against the working directory)."""
    return combine_path(image_path, name)


# -- writing ----------------------------------------------------------------------------

def _write_cow_tail(fd: int, host_base: int, size: int, spec: Qcow2Spec) -> None:
    """Zeros from the guest end to the end of its (sub)cluster, as QEMU's preallocation
    writes them (so the last block is allocated, and ``qemu-img map`` agrees)."""
    end = cow_end(size, spec.cluster_bits, spec.extended_l2)
    if end > size:
        pwrite_all(fd, bytes(end - size), host_base + size)


def _allocate_data(fd: int, offset: int, length: int, mode: str) -> None:
    """falloc: reserve the blocks; full: write zeros (as QEMU's file driver does)."""
    if length <= 0 or mode in ("off", "metadata"):
        return
    if mode == "falloc":
        from .backends.fallocate import allocate
        allocate(fd, offset, length)
        return
    zeros = bytes(min(CHUNK, length))
    end = offset + length
    while offset < end:
        n = min(len(zeros), end - offset)
        pwrite_all(fd, memoryview(zeros)[:n], offset)
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
        return O.too_large(fmt, hint, exc.strerror or "")
    err = Qcow2Error(f"Could not create '{path}': {exc.strerror or exc}")
    err.errno = exc.errno  # type: ignore[attr-defined]
    return err


def _write_data_file(spec: Qcow2Spec) -> AtomicOutput:
    """The external data file, preallocated as asked (not yet committed)."""
    data_path = _data_file_path(spec.path, spec.data_file)
    data_out = _output(data_path)
    try:
        os.ftruncate(data_out.fd, spec.size)
        _allocate_data(data_out.fd, 0, spec.size, spec.preallocation)
        if spec.preallocation != "off":
            _write_cow_tail(data_out.fd, 0, spec.size, spec)
    except OSError as exc:
        data_out.close()
        raise _write_error(exc, data_path, "qcow2", spec.cluster_size_given) from None
    except BaseException:
        data_out.close()
        raise
    return data_out


def _write_qcow2(fd: int, spec: Qcow2Spec, lay, header: bytes) -> None:
    """The image file: metadata, then the data area as preallocation asks."""
    os.ftruncate(fd, lay.file_size)
    external = spec.data_file is not None
    for offset, chunk in metadata_writes(lay, header, 0 if external else lay.data_offset):
        pwrite_all(fd, chunk, offset)
    if not external:
        _allocate_data(fd, lay.data_offset, lay.data_clusters * lay.cluster_size,
                       spec.preallocation)
        if spec.preallocation == "metadata":
            _write_cow_tail(fd, lay.data_offset, spec.size, spec)


def _create_qcow2(spec: Qcow2Spec, durable: bool = True) -> None:
    try:
        lay = qcow2_layout(spec.size, spec.cluster_bits, spec.refcount_order,
                           extended_l2=spec.extended_l2,
                           preallocation=spec.preallocation,
                           external_data=spec.data_file is not None)
    except ImageTooLargeError as exc:
        raise O.too_large("qcow2", True, str(exc)) from None
    header = qcow2_header_bytes(spec, lay)       # fail early if the header cannot fit
    data_out = _write_data_file(spec) if spec.data_file is not None else None
    try:
        with _output(spec.path) as out:
            try:
                _write_qcow2(out.fd, spec, lay, header)
                if spec.encryption is not None:
                    from .luks_image import install_encryption
                    install_encryption(out.fd, spec.path, spec.encryption)
            except OSError as exc:
                raise _write_error(exc, spec.path, "qcow2", spec.cluster_size_given) from None
            if data_out is not None:
                data_out.commit(sync=durable)
            out.commit(sync=durable)
        if spec.encryption is not None:
            from .secrets import bind
            bind(spec.path, spec.encryption.passphrase)   # it opens with that key now
    finally:
        if spec.encryption is not None:
            spec.encryption.wipe()
        if data_out is not None:
            data_out.close()


def _create_qcow2_rbd(spec: Qcow2Spec, durable: bool = True) -> None:
    """A qcow2 image inside a new RBD image (refused when one of that name exists):
    the metadata is written into it and flushed; on failure the RBD image is removed.
    RBD allocates as it is written, so of the preallocation modes only ``off`` and
    ``metadata`` mean anything; an external data file is a local file, not offered."""
    if spec.data_file is not None:
        raise UnsupportedFeatureError(f"Could not create '{spec.path}': an external data "
                                      f"file for a qcow2 image in RBD is not supported",
                                      feature="create -o data_file rbd:")
    if spec.preallocation not in ("off", "metadata"):
        raise InvalidOptionError(f"Unsupported preallocation mode '{spec.preallocation}' "
                                 f"for a qcow2 image in RBD (off or metadata)")
    try:
        lay = qcow2_layout(spec.size, spec.cluster_bits, spec.refcount_order,
                           extended_l2=spec.extended_l2, preallocation=spec.preallocation,
                           external_data=False)
    except ImageTooLargeError as exc:
        raise O.too_large("qcow2", spec.cluster_size_given, str(exc)) from None
    header = qcow2_header_bytes(spec, lay)
    # under a temporary name, renamed once complete (as file outputs are)
    be, final = create_rbd_output(spec.path, lay.file_size)
    done = False
    try:
        for offset, chunk in metadata_writes(lay, header, lay.data_offset):
            be.pwrite(chunk, offset)
        if spec.preallocation == "metadata":
            end = cow_end(spec.size, spec.cluster_bits, spec.extended_l2)
            if end > spec.size:
                be.pwrite(bytes(end - spec.size), lay.data_offset + spec.size)
        if durable:
            be.flush()
        done = True
    except OSError as exc:
        raise _write_error(exc, spec.path, "qcow2", spec.cluster_size_given) from None
    finally:
        if not done:
            try:
                be.remove()
            except OSError:
                be.close()
    publish_rbd_output(be, spec.path, final)


# -- luks -----------------------------------------------------------------------------------

def _create_luks(req: CreateRequest, durable: bool = True) -> None:
    """QEMU's ``luks`` format: a LUKS header and key slots, then the encrypted data."""
    from .encryptopts import luks_format_encryption
    from .luks import new_area
    enc = luks_format_encryption(req.options, req.key)
    try:
        area = new_area(enc.params, bytes(enc.passphrase))
        with _output(req.path) as out:
            try:
                pwrite_all(out.fd, area, 0)
                os.ftruncate(out.fd, len(area) + ((req.size + 511) & ~511))
            except OSError as exc:
                raise _write_error(exc, req.path, "luks", False) from None
            out.commit(sync=durable)
    finally:
        enc.wipe()


# -- raw ----------------------------------------------------------------------------------

def _create_raw(req: CreateRequest, durable: bool = True) -> None:
    prealloc = req.options.get("preallocation", "off")
    if prealloc == "metadata":
        raise InvalidOptionError("Unsupported preallocation mode: metadata")
    O.check_preallocation(prealloc, O.RAW_PREALLOC)
    size = (req.size + 511) & ~511          # the file driver rounds up to sectors
    if is_rbd_name(req.path):
        # a new RBD image (refused when one of that name exists, as qemu-img does);
        # it allocates as it is written: only "off" means anything
        if prealloc != "off":
            raise InvalidOptionError(f"Unsupported preallocation mode '{prealloc}' for an "
                                     f"RBD image")
        open_rbd(req.path, create=size).close()
        return
    with _output(req.path) as out:
        try:
            os.ftruncate(out.fd, size)
            _allocate_data(out.fd, 0, size, prealloc)
        except OSError as exc:
            raise _write_error(exc, req.path, "raw", False) from None
        out.commit(sync=durable)


__all__ = ["create", "prepare", "CreateRequest", "Qcow2Spec"]
