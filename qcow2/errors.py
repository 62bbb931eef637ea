"""Exception hierarchy of the qcow2 engine.

Every error inherits from a builtin too, so generic handlers (``except ValueError``,
``except OSError``) keep working.  Messages name the offsets and indices involved.

    Qcow2Error
    +-- FormatError(ValueError)
    |   +-- NotQcow2Error            bad magic: try another format
    |   +-- CorruptImageError        .offset, .size, .what
    |       +-- DecompressionError
    +-- InvalidOptionError(ValueError)   bad option or size; ImageTooLargeError
    +-- UnsupportedFeatureError(NotImplementedError)   .feature
    +-- UnsafeImageError             backing/data file not allowed, limits exceeded
    +-- ReadOnlyError(PermissionError)
    +-- ClosedImageError(ValueError)    an operation on a closed image
    +-- ImageOpenError(OSError)         the file cannot be opened: .errno, .filename
    +-- NativeUnavailableError(ImportError)
"""

from __future__ import annotations


class Qcow2Error(Exception):
    """Base class of every error the engine raises on purpose."""


class FormatError(Qcow2Error, ValueError):
    """The input is not a valid image of the expected format."""


class NotQcow2Error(FormatError):
    """The file does not start with the qcow2 magic."""


class CorruptImageError(FormatError):
    """A structure inside the image is inconsistent.

    ``offset`` and ``size`` locate the offending bytes in the image file (None when
    unknown); ``what`` names the structure ("header", "L1 table", "L2 entry", ...).
    """

    def __init__(self, message: str, *, offset: int | None = None,
                 size: int | None = None, what: str | None = None):
        super().__init__(message)
        self.offset = offset
        self.size = size
        self.what = what


class DecompressionError(CorruptImageError):
    """A compressed cluster does not decode to exactly one cluster."""

    def __init__(self, message: str, *, offset: int | None = None,
                 size: int | None = None, what: str | None = "compressed cluster",
                 index: int | None = None):
        super().__init__(message, offset=offset, size=size, what=what)
        self.index = index


class InvalidOptionError(Qcow2Error, ValueError):
    """An option, an argument, or a combination of them is invalid (qemu-img: EINVAL):
    also a negative offset or length, or a range outside the disk."""


class ImageTooLargeError(InvalidOptionError):
    """The virtual size exceeds a limit of the format or of the file system (EFBIG)."""


class UnsupportedFeatureError(Qcow2Error, NotImplementedError):
    """The image uses a feature this engine does not implement (yet)."""

    def __init__(self, message: str, *, feature: str | None = None):
        super().__init__(message)
        self.feature = feature


class UnsafeImageError(Qcow2Error):
    """Opening or reading the image would break a safety rule or a limit."""


class InvalidKeyError(Qcow2Error, PermissionError):
    """An encrypted image cannot be unlocked: no key given, or no key slot opens with
    the one given."""


class ReadOnlyError(Qcow2Error, PermissionError):
    """A write was attempted on an image opened read-only."""


class ClosedImageError(Qcow2Error, ValueError):
    """An operation on an image (or its file object) after ``close()``."""


class ImageOpenError(Qcow2Error, OSError):
    """The file (or device, or RBD image) cannot be opened; ``errno`` and ``filename``
    say which and why.  ``str()`` is the one-line message qemu-img prints."""

    def __init__(self, message: str, *, errno: int | None = None,
                 filename: str | None = None):
        super().__init__(errno, message, filename)
        self.message = message

    def __str__(self) -> str:
        return self.message


class NativeUnavailableError(Qcow2Error, ImportError):
    """The native core was required (QCOW2_IMPL=native / QCOW2_REQUIRE_NATIVE=1) but is missing."""


__all__ = [
    "Qcow2Error", "FormatError", "NotQcow2Error", "CorruptImageError", "DecompressionError",
    "InvalidOptionError", "ImageTooLargeError", "UnsupportedFeatureError", "UnsafeImageError",
    "ReadOnlyError", "NativeUnavailableError", "InvalidKeyError", "ClosedImageError",
    "ImageOpenError",
]
