"""Format probing: which format a store holds, by QEMU's rule (qcow2_probe).

The one place that decides "qcow2 or raw" from the first bytes, for the opener and for
anything else that must agree with it (checks, the compute flow's downloads)."""

from __future__ import annotations

import struct

from . import constants as C

#: bytes of the start of a store that decide its format
PROBE_BYTES = C.HDR_VERSION + 4


def format_of(head: bytes) -> str:
    """qcow2 when ``head`` (the store's first bytes) has the magic and a version of at
    least 2 (the magic with version 1 is the older qcow format, not ours); raw
    otherwise."""
    if len(head) >= PROBE_BYTES and head[:4] == C.MAGIC and \
            struct.unpack_from(">I", head, C.HDR_VERSION)[0] >= 2:
        return "qcow2"
    return "raw"


def probe_format(backend) -> str:
    """The format of what ``backend`` (a ``qcow2.backends.Backend``) holds."""
    return format_of(backend.pread(PROBE_BYTES, 0))


__all__ = ["format_of", "probe_format", "PROBE_BYTES"]
