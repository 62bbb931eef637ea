"""The LUKS1 header of an encrypted qcow2 image (and of QEMU's ``luks`` format): what
``info`` prints, unlocking a key slot (PBKDF2, anti-forensic merge, master key digest),
and writing new headers and key slots (random master key, AF split, PBKDF2 iterations
timed to ``iter-time`` as QEMU and cryptsetup do).  Layout as QEMU writes it: the
592-byte header, then 8 key slots of ``key_bytes * 4000`` bytes each starting on 4 KiB
boundaries, then the payload.  All cryptography is hashlib's PBKDF2 and the sector
ciphers of ``qcow2.ciphers``."""

from __future__ import annotations

import os
import struct

from .errors import CorruptImageError, InvalidKeyError

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


# -- unlocking ----------------------------------------------------------------------------

_STRIPES = 4000                 # the only anti-forensic stripe count LUKS1 (and QEMU) use
_DIGEST_LEN = 20
#: PBKDF2 iterations beyond which a key slot or the master key digest is refused as
#: hostile (cryptsetup and qemu-img pick ~1-2 million for a 2 s unlock on a fast CPU):
#: an image must not make us compute for minutes
MAX_PBKDF2_ITERATIONS = 50_000_000
_HASHES = ("sha1", "sha224", "sha256", "sha384", "sha512", "ripemd160")


def _xor(a: bytes, b: bytes) -> bytes:
    return (int.from_bytes(a, "little") ^ int.from_bytes(b, "little")).to_bytes(len(a),
                                                                               "little")


def _diffuse(block: bytes, hash_name: str) -> bytes:
    """LUKS's AF diffusion: each digest-sized piece j becomes H(be32(j) || piece)."""
    import hashlib
    ds = hashlib.new(hash_name).digest_size
    out = []
    for j in range(0, len(block), ds):
        piece = block[j:j + ds]
        h = hashlib.new(hash_name)
        h.update((j // ds).to_bytes(4, "big"))
        h.update(piece)
        out.append(h.digest()[:len(piece)])
    return b"".join(out)


def af_merge(material: bytes, key_bytes: int, stripes: int, hash_name: str) -> bytes:
    """The key that LUKS's anti-forensic splitter spread over ``stripes`` blocks."""
    d = bytes(key_bytes)
    for i in range(stripes - 1):
        d = _diffuse(_xor(d, material[i * key_bytes:(i + 1) * key_bytes]), hash_name)
    return _xor(d, material[(stripes - 1) * key_bytes:stripes * key_bytes])


class LuksHeader:
    """The fields of a LUKS1 header that unlocking needs, checked as QEMU checks them."""

    def __init__(self, buf: bytes, offset: int, length: int):
        (magic, version, cipher, mode, hash_spec, payload, key_bytes, digest, salt,
         mk_iters, _uuid) = _HDR.unpack_from(buf, 0)
        where = dict(offset=offset, size=_SIZE, what="LUKS header")
        if magic != _MAGIC or version != 1:
            raise CorruptImageError(f"LUKS header at {offset:#x} is not a LUKS1 header",
                                    **where)
        self.cipher, self.hash = _s(cipher), _s(hash_spec)
        mode = _s(mode)
        self.mode, _, ivgen = mode.partition("-")
        self.ivgen, _, ivhash = ivgen.partition(":")
        self.ivgen_hash = ivhash or None
        self.key_bytes, self.digest, self.salt = key_bytes, digest, salt
        self.iterations = mk_iters
        if self.hash not in _HASHES:
            raise CorruptImageError(f"LUKS hash {self.hash!r} is not supported", **where)
        if not 16 <= key_bytes <= 64:
            raise CorruptImageError(f"LUKS key size {key_bytes} is not valid", **where)
        if not 0 < mk_iters <= MAX_PBKDF2_ITERATIONS:
            raise CorruptImageError(f"LUKS master key iterations {mk_iters} out of range "
                                    f"(1 to {MAX_PBKDF2_ITERATIONS})", **where)
        self.slots = []
        material = key_bytes * _STRIPES
        for i in range(8):
            active, iters, slt, key_off, stripes = _SLOT.unpack_from(buf, _HDR.size
                                                                      + i * _SLOT.size)
            if active != _SLOT_ENABLED:
                continue
            start = key_off * 512
            if stripes != _STRIPES or not 0 < iters <= MAX_PBKDF2_ITERATIONS \
                    or start < _SIZE or start + material > length:
                raise CorruptImageError(f"LUKS key slot {i} is corrupted (stripes {stripes}, "
                                        f"iterations {iters}, key material at {start:#x})",
                                        **where)
            self.slots.append((i, iters, slt, start))

    def sector_cipher(self, key: bytes):
        from .ciphers import SectorCipher
        from .errors import UnsupportedFeatureError
        if self.cipher != "aes":
            raise UnsupportedFeatureError(f"LUKS cipher {self.cipher!r} is not supported "
                                          f"(aes)", feature=f"encryption {self.cipher}")
        return SectorCipher(key, self.mode, self.ivgen, self.ivgen_hash)

    def unlock(self, read, passphrase: bytes) -> bytes:
        """The master key, from the first key slot ``passphrase`` opens (its digest
        checked); ``read(n, offset)`` reads the LUKS area (offsets from its start)."""
        if not self.slots:
            raise InvalidKeyError("the LUKS header has no active key slot")
        probe = self.sector_cipher(bytes(self.key_bytes))     # refuses unknown ciphers
        del probe
        for slot in self.slots:
            candidate = self.open_slot(read, slot, passphrase)
            if candidate is not None:
                return candidate
        raise InvalidKeyError("Invalid password, cannot unlock any keyslot")

    def open_slot(self, read, slot, passphrase: bytes) -> bytes | None:
        """The master key if ``passphrase`` opens key slot ``slot`` (an entry of
        ``self.slots``), else None."""
        import hashlib
        import hmac
        _i, iters, salt, start = slot
        slot_key = bytearray(hashlib.pbkdf2_hmac(self.hash, passphrase, salt, iters,
                                                 self.key_bytes))
        material = bytearray(read(self.key_bytes * _STRIPES, start))
        material += bytes(-len(material) % 512)
        try:
            self.sector_cipher(bytes(slot_key)).decrypt(material, 0)
            candidate = af_merge(bytes(material), self.key_bytes, _STRIPES, self.hash)
        finally:
            slot_key[:] = bytes(len(slot_key))
            material[:] = bytes(len(material))
        check = hashlib.pbkdf2_hmac(self.hash, candidate, self.salt, self.iterations,
                                    _DIGEST_LEN)
        return candidate if hmac.compare_digest(check, self.digest) else None


def read_luks_header(read, offset: int, length: int, file_size: int) -> LuksHeader:
    """The LUKS header of the encryption header area [offset, offset + length)."""
    if length < _SIZE or offset + length > file_size:
        raise CorruptImageError(f"LUKS header at {offset:#x} is truncated", offset=offset,
                                size=length, what="LUKS header")
    return LuksHeader(read(_SIZE, offset), offset, length)


# -- writing (create, amend) --------------------------------------------------------------

_SLOT_DISABLED = 0x0000DEAD
_SLOT_ALIGN = 4096              # key material of each slot starts on a 4 KiB boundary
_MIN_SLOT_ITERS = 1000          # floors QEMU and cryptsetup apply to timed counts
_MIN_DIGEST_ITERS = 1000


def af_split(key: bytes, stripes: int, hash_name: str) -> bytearray:
    """LUKS's anti-forensic split of ``key`` into ``stripes`` blocks (the inverse of
    :func:`af_merge`): random blocks but the last, which makes the merge give ``key``."""
    n = len(key)
    out = bytearray(os.urandom(n * (stripes - 1))) + bytearray(n)
    d = bytes(n)
    for i in range(stripes - 1):
        d = _diffuse(_xor(d, bytes(out[i * n:(i + 1) * n])), hash_name)
    out[(stripes - 1) * n:] = _xor(d, key)
    return out


def pbkdf2_iterations(hash_name: str, key_bytes: int, iter_time_ms: int) -> int:
    """PBKDF2 iterations that take about ``iter_time_ms`` here (QEMU's and cryptsetup's
    way of choosing them): a timed run, scaled."""
    import hashlib
    import time
    n = 1 << 12
    while True:
        t0 = time.thread_time()
        hashlib.pbkdf2_hmac(hash_name, b"qcow2 pbkdf2 benchmark", bytes(32), n, key_bytes)
        spent = time.thread_time() - t0
        if spent >= 0.05 or n >= 1 << 24:
            break
        n <<= 2
    per_ms = n / max(spent * 1000, 1e-3)
    return min(MAX_PBKDF2_ITERATIONS, int(per_ms * iter_time_ms))


def slot_stride(key_bytes: int) -> int:
    """Bytes between the key material of two slots."""
    return -(-(key_bytes * _STRIPES) // _SLOT_ALIGN) * _SLOT_ALIGN


def area_length(key_bytes: int) -> int:
    """The LUKS area (header and the 8 slots' material): the payload offset."""
    return _SLOT_ALIGN + 8 * slot_stride(key_bytes)


class LuksParams:
    """What a new LUKS header says: cipher ("aes"), key bytes, mode ("xts", "cbc"),
    IV generator ("plain", "plain64", "essiv" with ``ivgen_hash``), PBKDF2 hash, and
    the milliseconds to spend in PBKDF2 per key slot."""

    def __init__(self, key_bytes: int = 64, mode: str = "xts", ivgen: str = "plain64",
                 ivgen_hash: str | None = None, hash: str = "sha256",
                 iter_time: int = 2000):
        self.cipher, self.key_bytes, self.mode = "aes", key_bytes, mode
        self.ivgen, self.ivgen_hash, self.hash = ivgen, ivgen_hash, hash
        self.iter_time = iter_time

    @property
    def mode_spec(self) -> str:
        spec = f"{self.mode}-{self.ivgen}"
        return f"{spec}:{self.ivgen_hash}" if self.ivgen == "essiv" else spec


def _pack_slot(buf: bytearray, i: int, active: bool, iters: int, salt: bytes,
               key_bytes: int) -> None:
    off = (_SLOT_ALIGN + i * slot_stride(key_bytes)) // 512
    _SLOT.pack_into(buf, _HDR.size + i * _SLOT.size, _SLOT_ENABLED if active else
                    _SLOT_DISABLED, iters, salt, off, _STRIPES)


def _store_key(area: bytearray, header: "LuksHeader", slot: int, passphrase: bytes,
               master: bytes, iter_time: int) -> None:
    """Key slot ``slot`` of ``area`` (the whole LUKS area) opens ``master`` with
    ``passphrase`` from now on."""
    import hashlib
    kb = header.key_bytes
    iters = max(_MIN_SLOT_ITERS, pbkdf2_iterations(header.hash, kb, iter_time))
    salt = os.urandom(32)
    slot_key = bytearray(hashlib.pbkdf2_hmac(header.hash, passphrase, salt, iters, kb))
    material = af_split(master, _STRIPES, header.hash)
    n = len(material)
    material += bytes(-n % 512)
    try:
        header.sector_cipher(bytes(slot_key)).encrypt(material, 0)
        start = _SLOT_ALIGN + slot * slot_stride(kb)
        area[start:start + n] = material[:n]
        _pack_slot(area, slot, True, iters, salt, kb)
    finally:
        slot_key[:] = bytes(len(slot_key))
        material[:] = bytes(len(material))


def new_area(params: LuksParams, passphrase: bytes) -> bytearray:
    """A LUKS area for a new image: a random master key, its digest, key slot 0
    opened by ``passphrase``; the master key itself is not kept."""
    import hashlib
    import uuid
    kb = params.key_bytes
    length = area_length(kb)
    area = bytearray(length)
    master = bytearray(os.urandom(kb))
    try:
        iters = max(_MIN_DIGEST_ITERS,
                    pbkdf2_iterations(params.hash, kb, params.iter_time) // 8)
        salt = os.urandom(32)
        digest = hashlib.pbkdf2_hmac(params.hash, bytes(master), salt, iters, _DIGEST_LEN)
        _HDR.pack_into(area, 0, _MAGIC, 1, params.cipher.encode(), params.mode_spec.encode(),
                       params.hash.encode(), length // 512, kb, digest, salt, iters,
                       str(uuid.uuid4()).encode())
        for i in range(8):
            _pack_slot(area, i, False, 0, bytes(32), kb)
        header = LuksHeader(bytes(area[:_SIZE]), 0, length)
        _store_key(area, header, 0, passphrase, bytes(master), params.iter_time)
    finally:
        master[:] = bytes(kb)
    return area


def add_key(area: bytearray, header: LuksHeader, slot: int, passphrase: bytes, master: bytes,
            iter_time: int) -> None:
    """Key slot ``slot`` of ``area`` (a whole LUKS area, header included) opens
    ``master`` with ``passphrase`` from now on."""
    _store_key(area, header, slot, passphrase, master, iter_time)


def erase_key(area: bytearray, header: LuksHeader, slot: int) -> None:
    """Key slot ``slot`` of ``area`` disabled and its key material overwritten with
    random bytes (the master key can no longer be recovered from it)."""
    kb = header.key_bytes
    start = _SLOT_ALIGN + slot * slot_stride(kb)
    n = kb * _STRIPES
    area[start:start + n] = os.urandom(n)
    _pack_slot(area, slot, False, 0, bytes(32), kb)


def active_slots(area: bytes) -> list:
    """Indices of the active key slots of a LUKS area."""
    return [i for i in range(8)
            if _SLOT.unpack_from(area, _HDR.size + i * _SLOT.size)[0] == _SLOT_ENABLED]


def slot_range(key_bytes: int, slot: int) -> tuple[int, int]:
    """(start, length) of key slot ``slot``'s material in the LUKS area."""
    return _SLOT_ALIGN + slot * slot_stride(key_bytes), key_bytes * _STRIPES


HEADER_SIZE = _SIZE
