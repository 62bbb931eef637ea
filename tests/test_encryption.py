"""LUKS-encrypted qcow2 images: reading them with a key (issue 17, the read side).

Images are made and written by qemu-img / qemu-io with ``--object secret`` (the
oracle), in every cipher combination qemu-img offers for AES; our reads must equal
``qemu-img convert -O raw`` of them byte for byte.  The sector ciphers are also pinned
to pyca cryptography's own XTS and CBC modes, sector by sector.
"""

from __future__ import annotations

import hashlib
import os
import random
import shutil
import struct
import subprocess

import pytest

import qcow2
from oracle import run_pbkdf
from qcow2.ciphers import SectorCipher

pytestmark = pytest.mark.skipif(not shutil.which("qemu-img"),
                                reason="qemu-img (the oracle) is not installed")
MiB = 1 << 20
SECRET = "correct horse battery staple"


def _secret_args(secret=SECRET):
    return ["--object", f"secret,id=sec0,data={secret}"]


def _opts(path):
    return f"driver=qcow2,file.filename={path},encrypt.key-secret=sec0"


def make_encrypted(path, size=8 * MiB, extra="", writes=(), secret=SECRET, backing=None):
    o = f"encrypt.format=luks,encrypt.key-secret=sec0,encrypt.iter-time=10{extra}"
    cmd = ["qemu-img", "create", *_secret_args(secret), "-f", "qcow2", "-o", o]
    if backing:
        cmd += ["-b", backing, "-F", "qcow2"]
    p = run_pbkdf([*cmd, path, size])
    assert p.returncode == 0, p.stderr
    if writes:
        io = ["qemu-io", *_secret_args(secret), "--image-opts"]
        for w in writes:
            io += ["-c", w]
        subprocess.run([*io, _opts(path)], check=True, capture_output=True)


def oracle_raw(path, tmp_path, secret=SECRET) -> bytes:
    out = tmp_path / f"oracle-{os.urandom(3).hex()}.raw"
    subprocess.run(["qemu-img", "convert", *_secret_args(secret), "--image-opts",
                    _opts(path), "-O", "raw", str(out)], check=True, capture_output=True)
    try:
        return out.read_bytes()
    finally:
        out.unlink()


WRITES = ("write -P 0x61 1000 300000", "write -P 0x62 3M 64k", "write -P 0x63 8000000 4608",
          "write -z 1M 64k")


@pytest.mark.parametrize("extra", [
    "",                                                        # aes-256-xts-plain64, sha256
    ",encrypt.cipher-alg=aes-128",
    ",encrypt.cipher-alg=aes-192,encrypt.hash-alg=sha512",
    ",encrypt.cipher-mode=cbc,encrypt.ivgen-alg=essiv,encrypt.ivgen-hash-alg=sha256",
    ",encrypt.cipher-mode=cbc,encrypt.ivgen-alg=plain64,encrypt.cipher-alg=aes-128",
    ",encrypt.cipher-mode=cbc,encrypt.ivgen-alg=plain,encrypt.hash-alg=sha1",
])
def test_reads_equal_qemu(tmp_path, extra):
    img = tmp_path / "enc.qcow2"
    make_encrypted(img, extra=extra, writes=WRITES)
    ref = oracle_raw(img, tmp_path)
    with qcow2.open(str(img), key=SECRET) as q:
        assert q.pread(q.size, 0) == ref
        rng = random.Random(1)
        for _ in range(200):                    # reads that start and end mid-sector
            off = rng.randrange(0, q.size - 1)
            n = rng.randrange(1, min(70000, q.size - off) + 1)
            assert q.pread(n, off) == ref[off:off + n]


def test_key_errors_and_info_without_key(tmp_path):
    img = tmp_path / "enc.qcow2"
    make_encrypted(img, writes=WRITES[:1])
    with qcow2.open(str(img)) as q:                  # info needs no key (as qemu-img)
        assert q.info()["encrypted"] is True
        with pytest.raises(qcow2.InvalidKeyError, match="a key is needed"):
            q.pread(10, 0)
    with qcow2.open(str(img), key="wrong") as q:
        with pytest.raises(qcow2.InvalidKeyError, match="cannot unlock any keyslot"):
            q.pread(10, 0)
    with qcow2.open(str(img), key=SECRET.encode()) as q:   # bytes work as well
        assert q.pread(4, 1000) == b"aaaa"


def test_backing_chain_keys(tmp_path):
    base = tmp_path / "base.qcow2"
    make_encrypted(base, writes=("write -P 0x41 0 1M",), secret="base-secret")
    top = tmp_path / "top.qcow2"
    subprocess.run(["qemu-img", "create", "-f", "qcow2", "-b", "base.qcow2", "-F", "qcow2",
                    "-u", str(top), "8M"], check=True, capture_output=True)
    with qcow2.open(str(top), keys={"base.qcow2": "base-secret"}) as q:
        assert q.pread(MiB, 0) == b"A" * MiB
    with qcow2.open(str(top)) as q, pytest.raises(qcow2.InvalidKeyError):
        q.pread(10, 0)


def test_convert_and_compare_with_keys(tmp_path):
    """Decrypting to a plain image: convert and compare take the passphrases by file
    name (the source's and its chain's)."""
    img = tmp_path / "enc.qcow2"
    make_encrypted(img, writes=WRITES)
    ref = oracle_raw(img, tmp_path)
    keys = {str(img): SECRET}
    for fmt in ("raw", "qcow2"):
        out = tmp_path / f"plain.{fmt}"
        qcow2.convert(str(img), str(out), out_format=fmt, keys=keys)
        with qcow2.open(str(out)) as q:
            assert q.pread(q.size, 0) == ref
        assert qcow2.compare(str(img), str(out), keys=keys) is None
    with pytest.raises(qcow2.InvalidKeyError):
        qcow2.convert(str(img), str(tmp_path / "nokey.raw"), out_format="raw")
    assert not (tmp_path / "nokey.raw").exists()


def test_writes_need_the_key(tmp_path):
    """(Writing is covered by test_encryption_write.py; opening for writing unlocks.)"""
    img = tmp_path / "enc.qcow2"
    make_encrypted(img)
    with pytest.raises(qcow2.InvalidKeyError):
        qcow2.open(str(img), "r+")


# -- hostile LUKS headers --------------------------------------------------------------------

def _luks_offset(path) -> int:
    with qcow2.open(str(path)) as q:
        return q.header.crypto_header[0]


@pytest.mark.parametrize("field, value, message", [
    ("slot_iters", 0xFFFFFFFF, "key slot 0 is corrupted"),
    ("slot_stripes", 3999, "key slot 0 is corrupted"),
    ("slot_offset", 0x7FFFFFFF, "key slot 0 is corrupted"),
    ("mk_iters", 0xFFFFFFFF, "master key iterations"),
    ("hash", b"md4", "hash 'md4' is not supported"),
    ("magic", b"XXXX", "not a LUKS1 header"),
])
def test_hostile_luks_header(tmp_path, field, value, message):
    img = tmp_path / "enc.qcow2"
    make_encrypted(img, writes=WRITES[:1])
    at = _luks_offset(img)
    offsets = {"magic": (0, None), "hash": (72, None), "mk_iters": (164, ">I"),
               "slot_iters": (208 + 4, ">I"), "slot_offset": (208 + 40, ">I"),
               "slot_stripes": (208 + 44, ">I")}
    off, fmt = offsets[field]
    with open(img, "r+b") as f:
        f.seek(at + off)
        f.write(struct.pack(fmt, value) if fmt else value.ljust(4, b"\0"))
    with qcow2.open(str(img), key=SECRET) as q:
        with pytest.raises(qcow2.CorruptImageError, match=message):
            q.pread(10, 0)


# -- the sector ciphers against cryptography's own modes ---------------------------------------

def _reference(key, mode, ivgen, data, sector):
    from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
    out = []
    for i in range(len(data) // 512):
        n = sector + i
        iv = (n & (0xFFFFFFFF if ivgen == "plain" else (1 << 64) - 1)).to_bytes(16, "little")
        if ivgen == "essiv":
            e = Cipher(algorithms.AES(hashlib.sha256(key).digest()), modes.ECB()).encryptor()
            iv = e.update(iv) + e.finalize()
        m = modes.XTS(iv) if mode == "xts" else modes.CBC(iv)
        enc = Cipher(algorithms.AES(key), m).encryptor()
        out.append(enc.update(data[i * 512:(i + 1) * 512]) + enc.finalize())
    return b"".join(out)


@pytest.mark.parametrize("mode, keylen, ivgen", [
    ("xts", 32, "plain64"), ("xts", 64, "plain64"), ("xts", 64, "plain"),
    ("cbc", 16, "plain64"), ("cbc", 32, "essiv"), ("cbc", 24, "plain"),
])
def test_sector_cipher_matches_cryptography(mode, keylen, ivgen):
    rng = random.Random(keylen)
    for sector in (0, 1, 0xFFFFFFFF - 3, 1 << 40):
        key = rng.randbytes(keylen)
        data = rng.randbytes(512 * rng.randrange(1, 40))
        c = SectorCipher(key, mode, ivgen, "sha256")
        buf = bytearray(data)
        c.encrypt(buf, sector)
        assert bytes(buf) == _reference(key, mode, ivgen, data, sector)
        c.decrypt(buf, sector)
        assert bytes(buf) == data


@pytest.mark.parametrize("mode, keylen, ivgen", [
    ("xts", 64, "plain64"), ("cbc", 32, "essiv"), ("cbc", 16, "plain"),
])
def test_sector_cipher_across_passes(mode, keylen, ivgen):
    """Buffers over several of the cipher's internal passes (512 KiB, 2 MiB for CBC
    encryption) and not a whole number of them, from a sector near 2^32 (``plain``
    wraps there)."""
    rng = random.Random(keylen + 7)
    key = rng.randbytes(keylen)
    data = rng.randbytes((5 << 20) + 512 * 3)
    sector = (1 << 32) - 5000
    c = SectorCipher(key, mode, ivgen, "sha256")
    buf = bytearray(data)
    c.encrypt(buf, sector)
    assert bytes(buf) == _reference(key, mode, ivgen, data, sector)
    c.decrypt(buf, sector)
    assert bytes(buf) == data
