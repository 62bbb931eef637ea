"""qcow2: a Python engine for QEMU's qcow2 disk-image format with a small C core.

    import qcow2
    with qcow2.open("disk.qcow2") as img:
        img.size, img.pread(4096, 0), list(img.extents()), img.info()

``qcow2.implementation`` ("native" or "python") and ``qcow2.features`` say which
kernels are live (``QCOW2_IMPL=auto|native|python`` chooses).  Heavy modules (numpy,
the native core) load only when a command needs them.
"""

from __future__ import annotations

from . import errors
from .errors import (CorruptImageError, DecompressionError, FormatError, InvalidKeyError,
                     NativeUnavailableError, NotQcow2Error, Qcow2Error, ReadOnlyError,
                     UnsafeImageError, UnsupportedFeatureError)

__version__ = "0.1.0"


def open(path, mode: str = "r", *, format: str | None = None, untrusted: bool = False,
         snapshot: str | int | None = None, force_share: bool = False, backing: bool = True,
         limits=None, key=None, keys=None, **limit_overrides):
    """Open a qcow2 or raw image: ``path`` names a file or, in qemu-img's syntax, an
    RBD image (``rbd:POOL/IMAGE[@SNAP][:conf=PATH][:id=USER]``, see ``qcow2.rbdname``),
    or is a store (a ``qcow2.backends.Backend``, e.g. ``MemoryBackend(data)``) that the
    image then reads and writes through and leaves open on close (see
    ``qcow2.opener``).

    ``format`` None probes (qcow2 or raw); ``snapshot`` reads an internal snapshot (by id
    or name) instead of the active layer; ``backing=False`` leaves the backing chain
    closed (enough for ``info``); ``untrusted=True`` opens nothing but the named file,
    read-only, after checking its format and scanning all its metadata (see
    ``qcow2.untrusted``).  ``limits`` (a ``qcow2.Limits``) or keyword overrides of its
    fields (``max_virtual_size=``, ``max_metadata=``, ``max_scan_cpu=``,
    ``max_backing_depth=``) set the caps.  ``key``: the passphrase (str or bytes) of a
    LUKS-encrypted image; ``keys``: passphrases of the images of its backing chain, by
    file name as the chain names them (``{"base.qcow2": "..."}``).
    """
    from .opener import open_image
    if limits is not None or limit_overrides:
        from .untrusted import resolve
        limits = resolve(limits, **limit_overrides)
    return open_image(path, mode, format=format, untrusted=untrusted, snapshot=snapshot,
                      force_share=force_share, backing=backing, limits=limits, key=key,
                      keys=keys)


def create(path, size=None, *, format: str = "qcow2", backing_file=None, backing_format=None,
           **options):
    """Create an image (see ``qcow2.creator.create``)."""
    from .creator import create as _create
    return _create(path, size, format=format, backing_file=backing_file,
                   backing_format=backing_format, **options)


def convert(src, dst, **options):
    """Convert ``src`` to ``dst`` (see ``qcow2.ops.convert.convert``)."""
    from .ops.convert import convert as _convert
    return _convert(src, dst, **options)


def check(path, **options):
    """Check (and with ``repair="leaks"|"all"`` repair) an image; see qcow2.ops.check."""
    from .ops.check import check as _check
    return _check(path, **options)


def compare(a, b, **options):
    """Compare the guest content of two images; see qcow2.ops.compare."""
    from .ops.compare import compare as _compare
    return _compare(a, b, **options)


def measure(path=None, **options):
    """Space needed to store an image in a format; see qcow2.ops.measure."""
    from .ops.measure import measure as _measure
    return _measure(path, **options)


def sparse_copy(src, dst, preallocate: bool = False, **options):
    """Copy a raw file keeping holes as holes; see qcow2.ops.sparse."""
    from .ops.sparse import sparse_copy as _sparse_copy
    return _sparse_copy(src, dst, preallocate=preallocate, **options)


def resize(path, size, **options):
    """Grow or shrink an image; see qcow2.ops.resize."""
    from .ops.resize import resize as _resize
    return _resize(path, size, **options)


def rebase(path, backing_file, **options):
    """Change an overlay's backing file; see qcow2.ops.rebase."""
    from .ops.rebase import rebase as _rebase
    return _rebase(path, backing_file, **options)


def commit(path, **options):
    """Write an overlay's data into its backing file; see qcow2.ops.commit."""
    from .ops.commit import commit as _commit
    return _commit(path, **options)


def __getattr__(name):
    if name == "Limits":
        from .untrusted import Limits
        return Limits
    if name in ("implementation", "features"):
        from . import kernels
        return getattr(kernels, name)
    raise AttributeError(f"module 'qcow2' has no attribute {name!r}")


__all__ = ["open", "Limits", "create", "convert", "check", "compare", "measure", "sparse_copy",
           "resize", "rebase", "commit", "errors", "Qcow2Error", "FormatError", "NotQcow2Error",
           "CorruptImageError", "DecompressionError", "UnsupportedFeatureError",
           "UnsafeImageError", "ReadOnlyError", "NativeUnavailableError", "InvalidKeyError",
           "__version__"]
