"""The sector-cipher kernels (native/xts.c and their numpy twins): xts_xor, cbc_unchain
and cbc_lane, against slow big-integer references written from the definitions (XTS:
IEEE 1619's multiplication by alpha in GF(2^128); CBC: each block XORed with the one
before), against pyca cryptography's XTS and CBC modes, and native against Python on
random inputs.  The whole ciphers (qcow2.ciphers) are checked in test_encryption.py,
and against images qemu-img encrypted there too."""

from __future__ import annotations

import random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from helpers import native_kernels
from qcow2 import kernels

SECTOR_SIZES = (16, 32, 512, 528, 1024, 4096)


def _times_alpha(t: int) -> int:
    t <<= 1
    return t ^ 0x87 ^ (1 << 128) if t >> 128 else t


def _ref_xts_xor(src: bytes, tweaks: bytes, ss: int) -> bytes:
    out = bytearray()
    for s in range(len(src) // ss):
        t = int.from_bytes(tweaks[16 * s:16 * s + 16], "little")
        for j in range(0, ss, 16):
            b = int.from_bytes(src[s * ss + j:s * ss + j + 16], "little")
            out += (b ^ t).to_bytes(16, "little")
            t = _times_alpha(t)
    return bytes(out)


def _xor(a: bytes, b: bytes) -> bytes:
    return bytes(x ^ y for x, y in zip(a, b, strict=True))


def _ref_cbc_unchain(plain: bytes, cipher: bytes, ivs: bytes, ss: int) -> bytes:
    out = bytearray()
    for s in range(len(plain) // ss):
        prev = ivs[16 * s:16 * s + 16]
        for j in range(s * ss, (s + 1) * ss, 16):
            out += _xor(plain[j:j + 16], prev)
            prev = cipher[j:j + 16]
    return bytes(out)


@pytest.fixture(scope="module")
def pair():
    return native_kernels(), kernels.get("python")


@pytest.mark.parametrize("ss", SECTOR_SIZES)
def test_xts_xor_reference(impl, ss):
    rng = random.Random(ss)
    for n in (0, 1, 3, 7, 8, 9, 17):
        src = rng.randbytes(n * ss)
        # tweaks with the top bit set and clear, all ones, zero
        tweaks = b"".join(rng.choice([rng.randbytes(16), b"\xff" * 16, bytes(16),
                                      bytes(15) + b"\x80"]) for _ in range(n))
        dest = bytearray(len(src))
        impl.xts_xor(dest, src, tweaks, ss)
        assert bytes(dest) == _ref_xts_xor(src, tweaks, ss)
        buf = bytearray(src)                  # in place
        impl.xts_xor(buf, buf, tweaks, ss)
        assert buf == dest
        impl.xts_xor(buf, buf, tweaks, ss)    # an involution
        assert bytes(buf) == src


@pytest.mark.parametrize("ss", SECTOR_SIZES)
def test_cbc_unchain_reference(impl, ss):
    rng = random.Random(ss + 1)
    for n in (0, 1, 5):
        plain, cipher, ivs = rng.randbytes(n * ss), rng.randbytes(n * ss), rng.randbytes(16 * n)
        want = _ref_cbc_unchain(plain, cipher, ivs, ss)
        dest = bytearray(n * ss)
        impl.cbc_unchain(dest, plain, cipher, ivs, ss)
        assert bytes(dest) == want
        buf = bytearray(cipher)               # in place over the ciphertext
        impl.cbc_unchain(buf, plain, buf, ivs, ss)
        assert bytes(buf) == want


def _ecb(key: bytes, decrypt: bool = False):
    from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
    c = Cipher(algorithms.AES(key), modes.ECB())
    return c.decryptor() if decrypt else c.encryptor()


def _cbc_encrypt(impl, key, data: bytearray, ivs: bytes, ss: int) -> None:
    n = len(data) // ss
    lane, out = bytearray(16 * n), bytearray(16 * n + 16)
    for j in range(ss // 16 + 1):
        impl.cbc_lane(data, lane, ivs, ss, j)
        if j < ss // 16:
            got = _ecb(key).update_into(lane, out)
            lane[:] = out[:got]


@pytest.mark.parametrize("ss", (16, 512, 4096))
def test_modes_match_cryptography(impl, ss):
    from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
    rng = random.Random(ss + 2)
    key1, key2 = rng.randbytes(32), rng.randbytes(32)
    n = 6
    data, ivs = rng.randbytes(n * ss), rng.randbytes(16 * n)
    xts_ref = b"".join(Cipher(algorithms.AES(key1 + key2), modes.XTS(ivs[16 * s:16 * s + 16]))
                       .encryptor().update(data[s * ss:(s + 1) * ss]) for s in range(n))
    cbc_ref = b"".join(Cipher(algorithms.AES(key1), modes.CBC(ivs[16 * s:16 * s + 16]))
                       .encryptor().update(data[s * ss:(s + 1) * ss]) for s in range(n))
    # XTS: tweaks from one ECB call, mask, ECB, mask
    tweaks = _ecb(key2).update(ivs)
    buf = bytearray(n * ss)
    impl.xts_xor(buf, data, tweaks, ss)
    buf = bytearray(_ecb(key1).update(bytes(buf)))
    impl.xts_xor(buf, buf, tweaks, ss)
    assert bytes(buf) == xts_ref
    # CBC: 32 lanes through ECB to encrypt, one ECB pass and unchain to decrypt
    buf = bytearray(data)
    _cbc_encrypt(impl, key1, buf, ivs, ss)
    assert bytes(buf) == cbc_ref
    impl.cbc_unchain(buf, _ecb(key1, decrypt=True).update(bytes(buf)), buf, ivs, ss)
    assert bytes(buf) == data


def test_argument_errors(impl):
    with pytest.raises(ValueError, match="sector size"):
        impl.xts_xor(bytearray(512), bytes(512), bytes(16), 500)
    with pytest.raises(ValueError, match="sector size"):
        impl.xts_xor(bytearray(8192), bytes(8192), bytes(16), 8192)
    with pytest.raises(ValueError, match="src is 500 bytes"):
        impl.xts_xor(bytearray(500), bytes(500), bytes(16), 512)
    with pytest.raises(ValueError, match="dest is 512 bytes"):
        impl.xts_xor(bytearray(512), bytes(1024), bytes(32), 512)
    with pytest.raises(ValueError, match="tweaks is 16 bytes"):
        impl.xts_xor(bytearray(1024), bytes(1024), bytes(16), 512)
    with pytest.raises(TypeError):
        impl.xts_xor(bytes(512), bytes(512), bytes(16), 512)
    with pytest.raises(ValueError, match="ivs is 0 bytes"):
        impl.cbc_unchain(bytearray(512), bytes(512), bytes(512), b"", 512)
    with pytest.raises(ValueError, match="past the 32 blocks"):
        impl.cbc_lane(bytearray(512), bytearray(16), bytes(16), 512, 33)
    with pytest.raises(ValueError, match="lane is 32 bytes"):
        impl.cbc_lane(bytearray(512), bytearray(32), bytes(16), 512, 0)


@settings(max_examples=60, deadline=None)
@given(data=st.data())
def test_native_equals_python(pair, data):
    native, python = pair
    ss = data.draw(st.sampled_from(SECTOR_SIZES))
    n = data.draw(st.integers(0, 12))
    src = data.draw(st.binary(min_size=n * ss, max_size=n * ss))
    tw = data.draw(st.binary(min_size=16 * n, max_size=16 * n))
    plain = data.draw(st.binary(min_size=n * ss, max_size=n * ss))
    outs = []
    for ns in pair:
        a = bytearray(n * ss)
        ns.xts_xor(a, src, tw, ss)
        b = bytearray(src)
        ns.cbc_unchain(b, plain, b, tw, ss)
        c, lane = bytearray(src), bytearray(plain[:16 * n])
        for j in range(ss // 16 + 1):
            ns.cbc_lane(c, lane, tw, ss, j)
        outs.append((bytes(a), bytes(b), bytes(c), bytes(lane)))
    assert outs[0] == outs[1]


def test_sector_ivs(impl):
    for first, n, mask in ((0, 5, (1 << 64) - 1), ((1 << 32) - 2, 4, 0xFFFFFFFF),
                           ((1 << 64) - 3, 3, (1 << 64) - 1), (1 << 40, 0, 0xFFFFFFFF)):
        dest = bytearray(b"\xaa" * 16 * n)
        impl.sector_ivs(dest, first, mask)
        assert bytes(dest) == b"".join(((first + i) & mask).to_bytes(16, "little")
                                       for i in range(n))
    with pytest.raises(ValueError, match="16 per sector"):
        impl.sector_ivs(bytearray(17), 0, 1)
    with pytest.raises(ValueError, match="fit 64 bits"):
        impl.sector_ivs(bytearray(32), (1 << 64) - 1, 1)
    with pytest.raises(TypeError):
        impl.sector_ivs(bytes(16), 0, 1)
