"""Describing (not decrypting) the LUKS header of an encrypted qcow2 image."""

from __future__ import annotations

import struct

from .errors import CorruptImageError

_HDR = struct.Struct(">6sH32s32s32sII20s32sI40s")   # 208 bytes
_SLOT = struct.Struct(">II32sII")                     # 48 bytes
_SLOT_ENABLED = 0x00AC71F3
_MAGIC = b"LUKS\xba\xbe"
_SIZE = _HDR.size + 8 * _SLOT.size


def _s(raw: bytes) -> str:
    return raw.split(b"\0", 1)[0].decode("ascii", "replace")


def luks_info(read, offset: int, length: int, file_size: int) -> dict:
    """The ``encrypt`` dict that qemu-img info prints for a LUKS-encrypted qcow2."""
    if length < _SIZE or offset + _SIZE > file_size:
        raise CorruptImageError(f"LUKS header at {offset:#x} is truncated", offset=offset,
                                size=length, what="LUKS header")
    buf = read(_SIZE, offset)
    (magic, version, cipher, mode, hash_spec, payload, key_bytes, _digest, _salt,
     mk_iters, uuid) = _HDR.unpack_from(buf, 0)
    if magic != _MAGIC:
        raise CorruptImageError(f"Volume is not in LUKS format (at offset {offset:#x})",
                                offset=offset, size=6, what="LUKS header")
    if version != 1:
        raise CorruptImageError(f"LUKS version {version} is not supported", offset=offset + 6,
                                size=2, what="LUKS header")
    cipher, mode, hash_spec = _s(cipher), _s(mode), _s(hash_spec)
    cmode, _, ivgen = mode.partition("-")
    ivgen_alg, _, ivgen_hash = ivgen.partition(":")
    kbits = key_bytes * 8 // (2 if cmode == "xts" else 1)
    cipher_alg = cipher if cipher in ("sm4",) else f"{cipher}-{kbits}"
    d = {"ivgen-alg": ivgen_alg}
    if ivgen_alg == "essiv":
        d["ivgen-hash-alg"] = ivgen_hash
    d.update({"hash-alg": hash_spec, "cipher-alg": cipher_alg, "uuid": _s(uuid),
              "format": "luks", "cipher-mode": cmode})
    slots = []
    for i in range(8):
        active, iters, _slt, key_off, stripes = _SLOT.unpack_from(buf, _HDR.size + i * _SLOT.size)
        if active == _SLOT_ENABLED:
            slots.append({"active": True, "iters": iters, "key-offset": key_off * 512,
                          "stripes": stripes})
        else:
            slots.append({"active": False, "key-offset": key_off * 512})
    d["slots"] = slots
    d["payload-offset"] = payload * 512
    d["master-key-iters"] = mk_iters
    return d
