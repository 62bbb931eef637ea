"""Sector ciphers of LUKS-encrypted images: AES in XTS or CBC mode, 512-byte sectors,
IVs from the sector number (``plain``, ``plain64``) or ESSIV.

The block cipher is pyca ``cryptography``'s AES (OpenSSL underneath, releasing the
GIL); nothing cryptographic is written here.  What is ours is only the batching: a
Python call per 512-byte sector would cost more than the AES itself, so a whole chunk
goes through one ECB call and the arithmetic around it is done for every sector at once
by the sector-cipher kernels (``qcow2.kernels``: native/xts.c, or their numpy twins):
the plain IVs; XTS's masks (the encrypted sector tweak times alpha^j in GF(2^128)),
made on the fly and XORed before and after the ECB pass; CBC's chaining after the ECB
pass when decrypting, and when encrypting the 32 blocks of every sector as 32 "lanes",
one ECB call each.  Both modes are the textbook definitions (IEEE 1619 for XTS),
checked in the tests against ``cryptography``'s own XTS and CBC modes sector by sector,
and against images qemu-img encrypted.  numpy is not imported on the native path.

``SectorCipher.decrypt(buf, sector)`` / ``encrypt(buf, sector)`` work in place on a
writable buffer whose length is a multiple of 512; ``sector`` is the number of its
first sector (for qcow2: the host offset / 512, QEMU's "physical" IVs).
"""

from __future__ import annotations

import hashlib

from . import kernels
from .errors import UnsupportedFeatureError
from .lightweight import local

SECTOR = 512
_CHUNK = 1 << 19                      # bytes per pass (the scratch stays in cache)
_LANE_CHUNK = 1 << 21                 # bytes per CBC encryption pass (66 calls each)
_tls = local()


class _Scratch:
    """One thread's buffers for chunks of up to ``size`` bytes: the masked data and
    the cipher's output (room for ``update_into``'s extra block)."""

    def __init__(self, size: int):
        self.size = size
        self.mixed = memoryview(bytearray(size))
        self.out = memoryview(bytearray(size + 16))


def _scratch(size: int) -> _Scratch:
    s = getattr(_tls, "scratch", None)
    if s is None or s.size < size:
        s = _tls.scratch = _Scratch(max(size, _CHUNK))
    return s


def _aes():
    try:
        from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
    except ImportError:                                  # pragma: no cover
        raise UnsupportedFeatureError("encrypted images need the 'cryptography' package "
                                      "(pip install cryptography)",
                                      feature="encryption") from None
    return Cipher, algorithms, modes


def _ecb(key: bytes):
    Cipher, algorithms, modes = _aes()
    return Cipher(algorithms.AES(key), modes.ECB())


class SectorCipher:
    """One data cipher: ``aes`` with ``mode`` "xts" or "cbc", ``ivgen`` "plain",
    "plain64" or "essiv" (with ``ivgen_hash``), and the master ``key``."""

    def __init__(self, key: bytes, mode: str, ivgen: str, ivgen_hash: str | None = None):
        if mode not in ("xts", "cbc"):
            raise UnsupportedFeatureError(f"cipher mode {mode!r} is not supported (xts, cbc)",
                                          feature=f"encryption mode {mode}")
        if ivgen not in ("plain", "plain64", "essiv"):
            raise UnsupportedFeatureError(f"IV generator {ivgen!r} is not supported "
                                          f"(plain, plain64, essiv)",
                                          feature=f"encryption ivgen {ivgen}")
        sizes = (32, 48, 64) if mode == "xts" else (16, 24, 32)
        if len(key) not in sizes:
            raise UnsupportedFeatureError(f"a {len(key)}-byte AES-{mode} key is not "
                                          f"supported", feature="encryption key size")
        self.mode, self.ivgen = mode, ivgen
        if mode == "xts":
            half = len(key) // 2
            self._data = _ecb(key[:half])
            self._tweak = _ecb(key[half:])
        else:
            self._data = _ecb(key)
            self._tweak = None
        self._essiv = None
        if ivgen == "essiv":
            if ivgen_hash is None or ivgen_hash not in hashlib.algorithms_available:
                raise UnsupportedFeatureError(f"ESSIV hash {ivgen_hash!r} is not supported",
                                              feature="encryption essiv hash")
            digest = hashlib.new(ivgen_hash, key).digest()
            if len(digest) not in (16, 24, 32):
                raise UnsupportedFeatureError(f"ESSIV with {ivgen_hash} (a {len(digest)}-"
                                              f"byte digest) has no AES key size",
                                              feature="encryption essiv hash")
            self._essiv = _ecb(digest)

    # -- IVs ---------------------------------------------------------------------------
    def _sector_ivs(self, sector: int, count: int):
        """The IVs of ``count`` sectors from ``sector``, 16 bytes each."""
        iv = bytearray(16 * count)
        kernels.sector_ivs(iv, sector, 0xFFFFFFFF if self.ivgen == "plain" else (1 << 64) - 1)
        if self._essiv is not None:
            enc = self._essiv.encryptor()
            iv = enc.update(iv) + enc.finalize()
        return iv

    def _xts_tweaks(self, sector: int, count: int) -> bytes:
        """The first tweak of each sector: its IV encrypted with the tweak key."""
        enc = self._tweak.encryptor()
        return enc.update(self._sector_ivs(sector, count)) + enc.finalize()

    # -- the two directions ------------------------------------------------------------
    def decrypt(self, buf, sector: int) -> None:
        self._run(buf, sector, decrypt=True)

    def encrypt(self, buf, sector: int) -> None:
        self._run(buf, sector, decrypt=False)

    def _run(self, buf, sector: int, *, decrypt: bool) -> None:
        mv = memoryview(buf).cast("B")
        if len(mv) % SECTOR:
            raise ValueError(f"encrypted I/O must be whole {SECTOR}-byte sectors")
        if not len(mv):
            return
        sc = _scratch(min(len(mv), _CHUNK))
        # ECB keeps no state between whole blocks: one context for all the chunks
        op = self._data.decryptor() if decrypt else self._data.encryptor()
        step = _LANE_CHUNK if self.mode == "cbc" and not decrypt else _CHUNK
        for pos in range(0, len(mv), step):
            part = mv[pos:pos + step]
            first = sector + pos // SECTOR
            if self.mode == "xts":
                self._xts(op, sc, part, first)
            elif decrypt:
                self._cbc_decrypt(op, sc, part, first)
            else:
                self._cbc_encrypt(op, sc, part, first)
        op.finalize()

    def _xts(self, op, sc: _Scratch, part: memoryview, sector: int) -> None:
        # XTS: mask, AES-ECB, mask again (the masks are made on the fly by the kernel)
        n = len(part)
        tweaks = self._xts_tweaks(sector, n // SECTOR)
        mixed = sc.mixed[:n]
        kernels.xts_xor(mixed, part, tweaks, SECTOR)
        done = op.update_into(mixed, sc.out[:n + 16])
        assert done == n, done
        kernels.xts_xor(part, sc.out[:n], tweaks, SECTOR)

    def _cbc_decrypt(self, op, sc: _Scratch, part: memoryview, sector: int) -> None:
        # every block decrypts on its own; then each XORs the ciphertext before it
        n = len(part)
        done = op.update_into(part, sc.out[:n + 16])
        assert done == n, done
        kernels.cbc_unchain(part, sc.out[:n], part, self._sector_ivs(sector, n // SECTOR),
                            SECTOR)

    def _cbc_encrypt(self, op, sc: _Scratch, part: memoryview, sector: int) -> None:
        # CBC encryption chains block after block within a sector, but sectors are
        # independent: block j of every sector goes through one ECB call (a "lane"),
        # 32 calls in all, the kernel chaining and scattering between them
        n = len(part)
        count = n // SECTOR
        ivs = self._sector_ivs(sector, count)
        lanes = (sc.mixed[:count * 16], sc.out[:count * 16])
        room = (sc.mixed[:count * 16 + 16], sc.out[:count * 16 + 16])
        for j in range(SECTOR // 16):
            kernels.cbc_lane(part, lanes[j % 2], ivs, SECTOR, j)
            op.update_into(lanes[j % 2], room[1 - j % 2])
        kernels.cbc_lane(part, lanes[SECTOR // 16 % 2], ivs, SECTOR, SECTOR // 16)


__all__ = ["SECTOR", "SectorCipher"]
