"""Sector ciphers of LUKS-encrypted images: AES in XTS or CBC mode, 512-byte sectors,
IVs from the sector number (``plain``, ``plain64``) or ESSIV.

The block cipher is pyca ``cryptography``'s AES (OpenSSL underneath, releasing the
GIL); nothing cryptographic is written here.  What is ours is only the batching: a
Python call per 512-byte sector would cost more than the AES itself, so a whole buffer
goes through one ECB call and the per-block masks of XTS (the encrypted sector tweak
times alpha^j in GF(2^128)) and the chaining of CBC are computed for every sector at
once with numpy.  Both are the textbook definitions (IEEE 1619 for XTS), checked in the
tests against ``cryptography``'s own XTS and CBC modes sector by sector, and against
images qemu-img encrypted.

``SectorCipher.decrypt(buf, sector)`` / ``encrypt(buf, sector)`` work in place on a
writable buffer whose length is a multiple of 512; ``sector`` is the number of its
first sector (for qcow2: the host offset / 512, QEMU's "physical" IVs).
"""

from __future__ import annotations

import hashlib
import threading

import numpy as np

from .errors import UnsupportedFeatureError

SECTOR = 512
_BLOCKS = SECTOR // 16                # AES blocks per sector
_CHUNK = 1 << 20                      # bytes per numpy pass (bounds the temporaries)
_U64 = np.dtype("<u8")
_LSHIFTS = np.arange(1, _BLOCKS, dtype=np.uint64)[None, :]     # blocks 1..31 of a sector
_RSHIFTS = np.uint64(64) - _LSHIFTS
_ONE, _TWO, _SEVEN = np.uint64(1), np.uint64(2), np.uint64(7)
_tls = threading.local()


class _Scratch:
    """One thread's buffers for a chunk of ``size`` bytes: the masks (low and high
    halves), their temporaries, the masked data and the cipher's output."""

    def __init__(self, size: int):
        n = size // 16                       # AES blocks
        self.size = size
        self.lo, self.hi = np.empty(n, dtype=_U64), np.empty(n, dtype=_U64)
        self.carry, self.tmp = np.empty(n, dtype=_U64), np.empty(n, dtype=_U64)
        self.mixed = np.empty(2 * n, dtype=_U64)
        self.out = memoryview(bytearray(size + 16))

    @staticmethod
    def plane(buf: np.ndarray, rows: int, cols: int) -> np.ndarray:
        return buf[:rows * cols].reshape(rows, cols)


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


def _ivs(sector: int, count: int, ivgen: str) -> np.ndarray:
    """(count, 2) little-endian 128-bit IVs of the sectors from ``sector``."""
    n = np.arange(sector, sector + count, dtype=np.uint64)
    if ivgen == "plain":
        n &= np.uint64(0xFFFFFFFF)
    iv = np.zeros((count, 2), dtype=_U64)
    iv[:, 0] = n
    return iv


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
    def _sector_ivs(self, sector: int, count: int) -> np.ndarray:
        iv = _ivs(sector, count, "plain64" if self.ivgen == "essiv" else self.ivgen)
        if self._essiv is not None:
            enc = self._essiv.encryptor()
            iv = np.frombuffer(enc.update(iv.tobytes()) + enc.finalize(),
                               dtype=_U64).reshape(count, 2)
        return iv

    def _xts_masks(self, sector: int, count: int, sc: "_Scratch | None" = None):
        """The mask of each AES block of ``count`` sectors, E_k2(IV) * alpha^j, as two
        (count, 32) planes: the low and the high 64 bits (in ``sc``'s buffers)."""
        sc = sc or _Scratch(count * SECTOR)
        enc = self._tweak.encryptor()
        t0 = np.frombuffer(enc.update(self._sector_ivs(sector, count).tobytes())
                           + enc.finalize(), dtype=_U64).reshape(count, 2)
        plo, phi = sc.plane(sc.lo, count, _BLOCKS), sc.plane(sc.hi, count, _BLOCKS)
        carry, tmp = sc.plane(sc.carry, count, _BLOCKS - 1), sc.plane(sc.tmp, count, _BLOCKS - 1)
        plo[:, 0] = t0[:, 0]
        phi[:, 0] = t0[:, 1]
        lo, hi = t0[:, :1], t0[:, 1:]              # (count, 1) each
        mlo, mhi = plo[:, 1:], phi[:, 1:]
        # block j (1..31): the 128-bit tweak shifted left by j; the j bits shifted out
        # of the top fold back in as x^128 = x^7 + x^2 + x + 1 (no further overflow)
        np.right_shift(hi, _RSHIFTS, out=carry)
        np.left_shift(lo, _LSHIFTS, out=mlo)
        mlo ^= carry
        for k in (_ONE, _TWO, _SEVEN):
            np.left_shift(carry, k, out=tmp)
            mlo ^= tmp
        np.left_shift(hi, _LSHIFTS, out=mhi)
        np.right_shift(lo, _RSHIFTS, out=tmp)
        mhi |= tmp
        return plo, phi

    # -- the two directions ------------------------------------------------------------
    def decrypt(self, buf, sector: int) -> None:
        self._run(buf, sector, decrypt=True)

    def encrypt(self, buf, sector: int) -> None:
        self._run(buf, sector, decrypt=False)

    def _run(self, buf, sector: int, *, decrypt: bool) -> None:
        mv = memoryview(buf).cast("B")
        if len(mv) % SECTOR:
            raise ValueError(f"encrypted I/O must be whole {SECTOR}-byte sectors")
        for pos in range(0, len(mv), _CHUNK):
            part = mv[pos:pos + _CHUNK]
            first = sector + pos // SECTOR
            if self.mode == "xts":
                self._xts(part, first, decrypt)
            elif decrypt:
                self._cbc_decrypt(part, first)
            else:
                self._cbc_encrypt(part, first)

    def _xts(self, part: memoryview, sector: int, decrypt: bool) -> None:
        count = len(part) // SECTOR
        data = np.frombuffer(part, dtype=_U64).reshape(count, _BLOCKS, 2)
        sc = _scratch(len(part))
        plo, phi = self._xts_masks(sector, count, sc)
        mixed = sc.plane(sc.mixed, count, _BLOCKS * 2).reshape(count, _BLOCKS, 2)
        np.bitwise_xor(data[:, :, 0], plo, out=mixed[:, :, 0])
        np.bitwise_xor(data[:, :, 1], phi, out=mixed[:, :, 1])
        op = self._data.decryptor() if decrypt else self._data.encryptor()
        n = op.update_into(mixed.data.cast("B"), sc.out[:len(part) + 16])
        op.finalize()
        done = np.frombuffer(sc.out, dtype=_U64, count=n // 8).reshape(count, _BLOCKS, 2)
        np.bitwise_xor(done[:, :, 0], plo, out=data[:, :, 0])
        np.bitwise_xor(done[:, :, 1], phi, out=data[:, :, 1])

    def _cbc_decrypt(self, part: memoryview, sector: int) -> None:
        count = len(part) // SECTOR
        data = np.frombuffer(part, dtype=_U64).reshape(count, _BLOCKS, 2)
        op = self._data.decryptor()
        plain = np.frombuffer(op.update(part.tobytes()) + op.finalize(),
                              dtype=_U64).reshape(count, _BLOCKS, 2).copy()
        plain[:, 1:] ^= data[:, :-1]            # each block after the first: the last one
        plain[:, 0] ^= self._sector_ivs(sector, count)
        data[...] = plain

    def _cbc_encrypt(self, part: memoryview, sector: int) -> None:
        # CBC encryption chains block after block: one call per sector
        Cipher, algorithms, modes = _aes()
        ivs = self._sector_ivs(sector, len(part) // SECTOR)
        key_cipher = self._data
        for i in range(len(part) // SECTOR):
            enc = Cipher(key_cipher.algorithm, modes.CBC(ivs[i].tobytes())).encryptor()
            s = part[i * SECTOR:(i + 1) * SECTOR]
            s[:] = enc.update(s.tobytes()) + enc.finalize()


__all__ = ["SECTOR", "SectorCipher"]
