"""Storage backends: where the bytes of an image live.

A backend is a byte-addressed store with positional I/O.  The engine (``qcow2``)
only talks to this interface, so an image can live in a regular file, in memory, on a
block device or an LVM volume.  Backends raise plain ``OSError``; the engine turns
those into its own errors where it has something to add.

This package is installed as ``qcow2.backends`` (see setup.py).
"""

from .base import Backend
from .file import FileBackend
from .memory import MemoryBackend

__all__ = ["Backend", "FileBackend", "MemoryBackend"]
