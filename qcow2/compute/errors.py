"""Errors of the compute-host image flow (all ``Qcow2Error``s)."""

from __future__ import annotations

from ..errors import Qcow2Error


class ComputeError(Qcow2Error):
    """The image flow could not do what was asked; nothing was left behind."""


class DownloadError(ComputeError, OSError):
    """The image could not be fetched (connection, HTTP status, short body)."""


class ChecksumError(ComputeError, ValueError):
    """The fetched image does not match the expected checksum."""


class ImageFormatMismatchError(ComputeError, ValueError):
    """The image is not in the format it was declared in."""


class InsufficientSpaceError(ComputeError, OSError):
    """Not enough free space for the result."""


class ToolError(ComputeError):
    """An external tool (mkfs, resize2fs, lvcreate, ...) failed."""
