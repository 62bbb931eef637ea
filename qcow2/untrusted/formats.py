"""Which format an untrusted file may be read as (OpenStack's format-inspector rules):
a file that carries another format's signature is not read as something else."""

from __future__ import annotations

from .. import constants as C
from .limits import unsafe

# Signatures of other image formats: (offset, bytes, name).
_SIGNATURES = (
    (0, C.MAGIC, "qcow"),
    (0, b"QED\x00", "qed"),
    (0, b"KDMV", "vmdk"),
    (0, b"# Disk DescriptorFile", "vmdk"),
    (0, b"vhdxfile", "vhdx"),
    (0, b"conectix", "vpc"),
    (0, b"LUKS\xba\xbe", "luks"),
    (0x40, b"\x7f\x10\xda\xbe", "vdi"),
    (0, b"WithoutFreeSpace", "parallels"),
    (0, b"WithouFreSpacExt", "parallels"),
    (0x8001, b"CD001", "iso"),
)


def signatures(be) -> list[str]:
    """Names of the image formats whose signature the file carries."""
    found = []
    for off, sig, name in _SIGNATURES:
        got = be.pread(len(sig), off)
        if got == sig and name not in found:
            found.append(name)
    return found


def check_format(be, fmt: str, explicit: bool) -> None:
    """The file must be ``fmt`` and nothing else (OpenStack's format-inspector rules)."""
    names = signatures(be)
    if fmt == "raw":
        names = [n for n in names if n != "iso"]     # an ISO image is raw data
        if names:
            kind = "qcow2" if names[0] == "qcow" and _qcow_version(be) >= 2 else names[0]
            raise unsafe(f"'{getattr(be, 'path', '?')}' is a {kind} image named as raw; "
                         f"untrusted mode reads it as nothing else", 0, None, "format")
        return
    others = [n for n in names if n != "qcow"]
    if others and not explicit:
        raise unsafe(f"file could be read as qcow2 and as {others[0]}; refusing to guess "
                     f"the format of an untrusted image (give the format)", 0, None,
                     "format")


def _qcow_version(be) -> int:
    raw = be.pread(4, C.HDR_VERSION)
    return int.from_bytes(raw, "big") if len(raw) == 4 else 0
