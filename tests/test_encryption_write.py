"""LUKS-encrypted qcow2 images written and created by us (issue 17, the write side).

qemu-img and qemu-io are the oracles: images they encrypt take our writes and still
check clean and compare equal with the same secret; images we create (library and CLI,
every AES combination) open in qemu-io with that secret, and convert/amend/measure match
qemu-img's results.  Wrong keys, damaged headers and unsupported ciphers are refused
with nothing written; the passphrase never shows in output or in the files we write.
"""

from __future__ import annotations

import hashlib
import os
import random
import shutil
import struct
import subprocess
import sys

import pytest

import qcow2
from oracle import run_pbkdf
from qcow2 import secrets
from qcow2.errors import InvalidOptionError

pytestmark = pytest.mark.skipif(not (shutil.which("qemu-img") and shutil.which("qemu-io")),
                                reason="qemu-img/qemu-io (the oracles) are not installed")
MiB = 1 << 20
SECRET = "correct horse battery staple"
OBJ = ["--object", f"secret,id=sec0,data={SECRET}"]


def _spec(path, sec="sec0"):
    return f"driver=qcow2,file.filename={path},encrypt.key-secret={sec}"


def _run(cmd, **kw):
    return subprocess.run(cmd, capture_output=True, text=True, **kw)


def qemu_create(path, size=8 * MiB, extra="", secret=SECRET, backing=None):
    o = f"encrypt.format=luks,encrypt.key-secret=sec0,encrypt.iter-time=10{extra}"
    more = ["-u", "-b", backing, "-F", "qcow2"] if backing else []
    p = run_pbkdf(["qemu-img", "create", "--object", f"secret,id=sec0,data={secret}",
                   "-f", "qcow2", *more, "-o", o, path, size])
    assert p.returncode == 0, p.stderr


def _qemu_create(args):
    """qemu-img create with the secret sec0 (made again if its PBKDF2 timing fails)."""
    p = run_pbkdf(["qemu-img", "create", "-q", *OBJ, *args])
    assert p.returncode == 0, p.stderr


def qemu_io(path, *cmds, secret=SECRET):
    args = ["qemu-io", "--object", f"secret,id=sec0,data={secret}", "--image-opts"]
    for c in cmds:
        args += ["-c", c]
    return _run([*args, _spec(path)])


def qemu_raw(path, tmp_path, secret=SECRET) -> bytes:
    out = tmp_path / f"raw-{os.urandom(3).hex()}"
    p = _run(["qemu-img", "convert", "--object", f"secret,id=sec0,data={secret}",
              "--image-opts", _spec(path), "-O", "raw", str(out)])
    assert p.returncode == 0, p.stderr
    try:
        return out.read_bytes()
    finally:
        out.unlink()


def qemu_check(path, secret=SECRET):
    p = _run(["qemu-img", "check", "--object", f"secret,id=sec0,data={secret}",
              "--image-opts", _spec(path)])
    assert p.returncode == 0, p.stdout + p.stderr
    assert "No errors were found" in p.stdout


def ours(*args, **kw):
    """Our CLI, run as a separate process (its --object registry is per process)."""
    return _run([sys.executable, "-P", "-m", "qcow2", *map(str, args)], **kw)


def _random_writes(q, ref: bytearray, n=150, seed=1, maxlen=150000):
    rng = random.Random(seed)
    for _ in range(n):
        off = rng.randrange(0, q.size - 1)
        ln = rng.randrange(1, min(maxlen, q.size - off) + 1)
        data = rng.randbytes(ln)
        q.pwrite(data, off)
        ref[off:off + ln] = data


# -- writing images qemu-img encrypted ------------------------------------------------------

@pytest.mark.parametrize("extra", [
    "",
    ",encrypt.cipher-alg=aes-128,encrypt.hash-alg=sha1",
    ",encrypt.cipher-mode=cbc,encrypt.ivgen-alg=essiv,encrypt.ivgen-hash-alg=sha256",
    ",encrypt.cipher-mode=cbc,encrypt.ivgen-alg=plain,encrypt.cipher-alg=aes-128",
    ",encrypt.cipher-alg=aes-192",
    ",cluster_size=16k,extended_l2=on",
])
def test_writes_to_qemu_images(tmp_path, extra):
    img = tmp_path / "enc.qcow2"
    qemu_create(img, extra=extra)
    assert qemu_io(img, "write -P 0x5a 0 200k", "write -P 0x11 3M 9k").returncode == 0
    ref = bytearray(qemu_raw(img, tmp_path))
    with qcow2.open(str(img), "r+", key=SECRET) as q:
        _random_writes(q, ref)
        q.write_zeroes(5 * MiB + 100, 70000)
        ref[5 * MiB + 100:5 * MiB + 70100] = bytes(70000)
        q.discard(6 * MiB, MiB)
        ref[6 * MiB:7 * MiB] = bytes(MiB)
        q.flush()
        assert q.pread(q.size, 0) == bytes(ref)
    qemu_check(img)
    assert qemu_raw(img, tmp_path) == bytes(ref)
    # and qemu-io reads what we wrote, sector-unaligned
    rng = random.Random(2)
    off = rng.randrange(0, 7 * MiB)
    byte = ref[off]
    assert qemu_io(img, f"read -P {byte} {off} 1").returncode == 0


def test_backing_file_cow_is_decrypted_then_reencrypted(tmp_path):
    base = tmp_path / "base.qcow2"
    qemu_create(base, secret="base-secret")
    assert qemu_io(base, "write -P 0x41 0 2M", secret="base-secret").returncode == 0
    top = tmp_path / "top.qcow2"
    qemu_create(top, backing="base.qcow2")
    with qcow2.open(str(top), "r+", key=SECRET, keys={"base.qcow2": "base-secret"}) as q:
        q.pwrite(b"\x42" * 1000, 70000)            # partial cluster: COW from the base
    with qcow2.open(str(top), key=SECRET, keys={"base.qcow2": "base-secret"}) as q:
        got = q.pread(2 * MiB, 0)
    want = bytearray(b"\x41" * 2 * MiB)
    want[70000:71000] = b"\x42" * 1000
    assert got == bytes(want)
    spec = (f"{_spec(top)},backing.driver=qcow2,backing.file.filename={base},"
            f"backing.encrypt.key-secret=sec1")
    r = _run(["qemu-io", *OBJ, "--object", "secret,id=sec1,data=base-secret", "--image-opts",
              "-c", "read -P 0x41 0 70000", "-c", "read -P 0x42 70000 1000",
              "-c", "read -P 0x41 71000 1000000", spec])
    assert r.returncode == 0 and "verification failed" not in r.stdout, r.stdout + r.stderr
    c = _run(["qemu-img", "check", *OBJ, "--object", "secret,id=sec1,data=base-secret",
              "--image-opts", spec])
    assert c.returncode == 0 and "No errors were found" in c.stdout, c.stdout + c.stderr


# -- creating encrypted images --------------------------------------------------------------

@pytest.mark.parametrize("extra", [
    "",
    ",encrypt.cipher-alg=aes-128",
    ",encrypt.cipher-alg=aes-192,encrypt.ivgen-alg=plain64",
    ",encrypt.cipher-mode=cbc,encrypt.ivgen-alg=essiv,encrypt.hash-alg=sha512",
    ",encrypt.ivgen-alg=plain,encrypt.hash-alg=sha1,cluster_size=4k",
])
def test_created_images_open_in_qemu(tmp_path, extra):
    img = tmp_path / "ours.qcow2"
    o = f"encrypt.format=luks,encrypt.key-secret=sec0,encrypt.iter-time=10{extra}"
    p = ours("create", *OBJ, "-f", "qcow2", "-o", o, img, "4M")
    assert p.returncode == 0, p.stderr
    assert SECRET not in p.stdout + p.stderr
    qemu_check(img)
    assert qemu_io(img, "write -P 0x61 1000 300000", "read -P 0x61 1000 300000").returncode == 0
    with qcow2.open(str(img), "r+", key=SECRET) as q:
        q.pwrite(b"\x62" * 5000, 2 * MiB + 7)
    r = qemu_io(img, "read -P 0x61 1000 300000", "read -P 0x62 2097159 5000",
                "read -P 0 2102159 1000")
    assert r.returncode == 0 and "Pattern verification failed" not in r.stdout, r.stdout
    qemu_check(img)
    assert SECRET.encode() not in img.read_bytes()
    info = qcow2.open(str(img)).info()
    assert info["encrypted"] is True


def test_library_create_matches_qemu_info(tmp_path):
    img = tmp_path / "lib.qcow2"
    qcow2.create(str(img), 16 * MiB, key=b"pass\x00word",
                 **{"encrypt.format": "luks", "encrypt.iter-time": 10})
    with qcow2.open(str(img), "r+", key=b"pass\x00word") as q:
        q.pwrite(b"x" * 4096, 0)
    ours_info = _run(["qemu-img", "info", "--output=json", str(img)]).stdout
    import json
    enc = json.loads(ours_info)["format-specific"]["data"]["encrypt"]
    assert enc["cipher-alg"] == "aes-256" and enc["cipher-mode"] == "xts"
    assert enc["payload-offset"] == 2068480 and enc["slots"][0]["active"] is True
    assert [s["key-offset"] for s in enc["slots"]] == [4096 + i * 258048 for i in range(8)]
    # the layout qemu-img gives the same image: header clusters after the L1 table
    twin = tmp_path / "twin.qcow2"
    qemu_create(twin, 16 * MiB)
    assert img.stat().st_size >= twin.stat().st_size
    with qcow2.open(str(img)) as a, qcow2.open(str(twin)) as b:
        assert a.header.crypto_header == b.header.crypto_header


def test_create_errors_match_qemu(tmp_path):
    img = tmp_path / "e.qcow2"
    cases = [
        ("encrypt.format=luks", "Parameter 'encrypt.key-secret' is required for cipher"),
        ("encrypt.format=luks,encrypt.key-secret=nope", "No secret with id 'nope'"),
        ("encrypt.format=luks,encrypt.key-secret=sec0,encrypt.cipher-alg=foo",
         "Parameter 'cipher-alg' does not accept value 'foo'"),
        ("encryption=on,encrypt.format=luks,encrypt.key-secret=sec0",
         "'encrypt.format' and its alias 'encryption' can't be used at the same time"),
        ("encrypt.key-secret=sec0", "Parameter 'encrypt.format' is missing"),
    ]
    for o, msg in cases:
        q = _run(["qemu-img", "create", *OBJ, "-f", "qcow2", "-o", o, str(img), "1M"])
        p = ours("create", *OBJ, "-f", "qcow2", "-o", o, img, "1M")
        assert p.returncode == q.returncode == 1
        assert msg in p.stderr and msg in q.stderr, (p.stderr, q.stderr)
        img.unlink(missing_ok=True)
    for o in ("encrypt.cipher-alg=twofish-128",
              # qemu-img 7.2 aborts on this one (key material not a whole sector count)
              "encrypt.cipher-alg=aes-192,encrypt.cipher-mode=cbc"):
        p = ours("create", *OBJ, "-f", "qcow2", "-o",
                 f"encrypt.format=luks,encrypt.key-secret=sec0,{o}", img, "1M")
        assert p.returncode == 1 and "not supported" in p.stderr
        assert not img.exists()


def test_secret_objects_file_and_base64(tmp_path):
    import base64
    key_file = tmp_path / "key"
    key_file.write_text(SECRET)
    img = tmp_path / "f.qcow2"
    p = ours("create", "--object", f"secret,id=k,file={key_file}", "-f", "qcow2", "-o",
             "encrypt.format=luks,encrypt.key-secret=k,encrypt.iter-time=10", img, "1M")
    assert p.returncode == 0, p.stderr
    b64 = base64.b64encode(SECRET.encode()).decode()
    p = ours("check", "--object", f"secret,id=k,data={b64},format=base64", "--image-opts",
             _spec(img, "k"))
    assert p.returncode == 0, p.stderr
    assert qemu_io(img, "read 0 512").returncode == 0
    p = ours("compare", "--object", "secret,id=k,data=wrong", "--image-opts",
             _spec(img, "k"), f"driver=qcow2,file.filename={img},encrypt.key-secret=k")
    assert p.returncode != 0 and "Invalid password, cannot unlock any keyslot" in p.stderr
    assert "wrong" not in p.stderr


def test_convert_to_and_from_encrypted_cli(tmp_path):
    src = tmp_path / "src.qcow2"
    subprocess.run(["qemu-img", "create", "-f", "qcow2", str(src), "8M"], check=True,
                   capture_output=True)
    subprocess.run(["qemu-io", "-c", "write -P 7 1000 1M", "-c", "write -P 9 5M 64k",
                    str(src)], check=True, capture_output=True)
    enc = tmp_path / "enc.qcow2"
    p = ours("convert", *OBJ, "-O", "qcow2", "-o",
             "encrypt.format=luks,encrypt.key-secret=sec0,encrypt.iter-time=10", src, enc)
    assert p.returncode == 0, p.stderr
    qemu_check(enc)
    p = _run(["qemu-img", "compare", *OBJ, "--image-opts",
              f"driver=qcow2,file.filename={src}", _spec(enc)])
    assert p.returncode == 0, p.stdout + p.stderr
    back = tmp_path / "back.raw"
    p = ours("convert", *OBJ, "--image-opts", _spec(enc), "-O", "raw", back)
    assert p.returncode == 0, p.stderr
    p = _run(["qemu-img", "compare", "-f", "qcow2", "-F", "raw", str(src), str(back)])
    assert p.returncode == 0, p.stdout
    p = ours("compare", *OBJ, "--image-opts", _spec(enc), f"driver=raw,file.filename={back}")
    assert p.returncode == 0 and "Images are identical" in p.stdout, p.stderr


def test_measure_matches_qemu():
    for o in ("encrypt.format=luks,encrypt.key-secret=sec0",
              "encrypt.format=luks,encrypt.key-secret=sec0,encrypt.cipher-alg=aes-128,"
              "encrypt.cipher-mode=cbc,cluster_size=4k", "encrypt.format=aes",
              "encrypt.format=luks"):
        q = run_pbkdf(["qemu-img", "measure", *OBJ, "-O", "qcow2", "-o", o, "--size", "1G"])
        p = ours("measure", *OBJ, "-O", "qcow2", "-o", o, "--size", "1G")
        assert (p.returncode, p.stdout, p.stderr.replace("qcow2:", "qemu-img:")) == \
            (q.returncode, q.stdout, q.stderr)


# -- amend: key slots -----------------------------------------------------------------------

def test_amend_key_slots(tmp_path):
    img = tmp_path / "a.qcow2"
    qemu_create(img, 4 * MiB)
    assert qemu_io(img, "write -P 0x77 0 64k").returncode == 0
    objs = [*OBJ, "--object", "secret,id=sec1,data=second", "--object",
            "secret,id=sec2,data=third"]
    p = ours("amend", *objs, "--image-opts", _spec(img), "-o",
             "encrypt.state=active,encrypt.new-secret=sec1,encrypt.iter-time=10,"
             "encrypt.keyslot=3")
    assert p.returncode == 0, p.stderr
    assert qemu_io(img, "read -P 0x77 0 64k", secret="second").returncode == 0
    p = ours("amend", *objs, "--image-opts", _spec(img, "sec1"), "-o",
             "encrypt.state=active,encrypt.new-secret=sec2,encrypt.keyslot=3")
    assert p.returncode == 1
    assert "Refusing to overwrite active keyslot 3 - please erase it first" in p.stderr
    p = ours("amend", *objs, "--image-opts", _spec(img, "sec1"), "-o",
             "encrypt.state=inactive,encrypt.old-secret=sec0")
    assert p.returncode == 0, p.stderr
    r = qemu_io(img, "read 0 512")
    assert "Invalid password, cannot unlock any keyslot" in r.stdout + r.stderr
    p = ours("amend", *objs, "--image-opts", _spec(img, "sec1"), "-o",
             "encrypt.state=inactive,encrypt.keyslot=3")
    assert p.returncode == 1 and "Attempt to erase the only active keyslot 3" in p.stderr
    qemu_check(img, secret="second")
    with qcow2.open(str(img), key="second") as q:
        assert q.pread(65536, 0) == b"\x77" * 65536


# -- refusals: nothing written ---------------------------------------------------------------

def _digest(path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_wrong_key_writes_nothing(tmp_path):
    img = tmp_path / "k.qcow2"
    qemu_create(img)
    before = _digest(img)
    with pytest.raises(qcow2.InvalidKeyError, match="cannot unlock any keyslot"):
        qcow2.open(str(img), "r+", key="wrong")
    with pytest.raises(qcow2.InvalidKeyError, match="a key is needed"):
        qcow2.open(str(img), "r+")
    assert _digest(img) == before
    p = ours("amend", "--object", "secret,id=sec0,data=wrong", "--image-opts", _spec(img),
             "-o", "lazy_refcounts=on")
    assert p.returncode == 1 and "Invalid password" in p.stderr and "wrong" not in p.stderr
    assert _digest(img) == before


@pytest.mark.parametrize("where", ["digest", "slot material"])
def test_damaged_key_material_is_refused(tmp_path, where):
    img = tmp_path / "d.qcow2"
    qemu_create(img)
    with qcow2.open(str(img)) as q:
        off = q.header.crypto_header[0]
    at = off + (124 if where == "digest" else 4096 + 1000)     # mk_digest / slot 0 material
    with open(img, "r+b") as f:
        f.seek(at)
        b = f.read(1)
        f.seek(at)
        f.write(bytes([b[0] ^ 0xFF]))
    before = _digest(img)
    with pytest.raises(qcow2.InvalidKeyError, match="cannot unlock any keyslot"):
        qcow2.open(str(img), "r+", key=SECRET)
    assert _digest(img) == before


def test_unsupported_cipher_is_refused(tmp_path):
    img = tmp_path / "tf.qcow2"
    qemu_create(img, extra=",encrypt.cipher-alg=twofish-128")
    before = _digest(img)
    with pytest.raises(qcow2.UnsupportedFeatureError, match="twofish"):
        qcow2.open(str(img), "r+", key=SECRET)
    assert _digest(img) == before


def test_compressed_writes_refused(tmp_path):
    img = tmp_path / "c.qcow2"
    qemu_create(img)
    with qcow2.open(str(img), "r+", key=SECRET) as q:
        with pytest.raises(qcow2.UnsupportedFeatureError, match="Compression and encryption"):
            q.write_compressed(bytes(q.cluster_size), 0)


def test_hostile_slot_offsets_refused_on_write(tmp_path):
    img = tmp_path / "h.qcow2"
    qemu_create(img)
    with qcow2.open(str(img)) as q:
        off = q.header.crypto_header[0]
    with open(img, "r+b") as f:
        f.seek(off + 208 + 40)
        f.write(struct.pack(">I", 0x7FFFFFFF))
    before = _digest(img)
    with pytest.raises(qcow2.CorruptImageError, match="key slot 0 is corrupted"):
        qcow2.open(str(img), "r+", key=SECRET)
    assert _digest(img) == before


def test_secrets_registry_wipes():
    secrets.add_secret("t-wipe", "abc")
    assert secrets.secret("t-wipe") == b"abc"
    secrets.clear()
    with pytest.raises(InvalidOptionError, match="No secret with id 't-wipe'"):
        secrets.secret("t-wipe")


def test_target_image_opts_and_resize(tmp_path):
    """convert -n --target-image-opts into an encrypted image; resize --image-opts."""
    src = tmp_path / "s.qcow2"
    subprocess.run(["qemu-img", "create", "-f", "qcow2", str(src), "4M"], check=True,
                   capture_output=True)
    subprocess.run(["qemu-io", "-c", "write -P 9 100k 2M", str(src)], check=True,
                   capture_output=True)
    dst = tmp_path / "t.qcow2"
    qemu_create(dst, 4 * MiB)
    p = ours("convert", *OBJ, "--target-image-opts", src, _spec(dst))
    assert p.returncode == 1 and "--target-image-opts requires use of -n flag" in p.stderr
    p = ours("convert", *OBJ, "-n", "--target-image-opts", src, _spec(dst))
    assert p.returncode == 0, p.stderr
    p = _run(["qemu-img", "compare", *OBJ, "--image-opts",
              f"driver=qcow2,file.filename={src}", _spec(dst)])
    assert p.returncode == 0, p.stdout + p.stderr
    p = ours("resize", *OBJ, "--image-opts", _spec(dst), "8M")
    assert p.returncode == 0, p.stderr
    assert qemu_io(dst, "read -P 9 100k 2M", "write -P 3 7M 4k",
                   "read -P 3 7M 4k").returncode == 0
    qemu_check(dst)


def test_legacy_aes_created_like_qemu_and_read(tmp_path):
    """encryption=on: the same file as qemu-img's; its data (written by qemu-io) reads
    as qemu-img reads it."""
    ours_img, theirs = tmp_path / "a.qcow2", tmp_path / "b.qcow2"
    o = "encryption=on,encrypt.key-secret=sec0"
    assert ours("create", *OBJ, "-f", "qcow2", "-o", o, ours_img, "8M").returncode == 0
    subprocess.run(["qemu-img", "create", "-q", *OBJ, "-f", "qcow2", "-o", o, str(theirs),
                    "8M"], check=True)
    assert ours_img.read_bytes() == theirs.read_bytes()
    assert qemu_io(ours_img, "write -P 0x61 1000 300000", "write -P 0x62 5M 70000"
                   ).returncode == 0
    ref = qemu_raw(ours_img, tmp_path)
    with qcow2.open(str(ours_img), key=SECRET) as q:
        assert q.pread(q.size, 0) == ref
        assert q.pread(777, 1001) == ref[1001:1778]


@pytest.mark.parametrize("extra", ["", ",cluster_size=4k", ",extended_l2=on",
                                   ",compat=0.10,cluster_size=512"])
def test_legacy_aes_written_like_qemu(tmp_path, extra):
    """Writes into a legacy AES image (IVs from the guest offset): partial sectors,
    partial clusters over data and over unallocated space, runs of whole clusters,
    rewrites; qemu-img reads what was written and finds the image clean, and the same
    writes made by qemu-io leave the same guest data."""
    img, twin = tmp_path / "a.qcow2", tmp_path / "b.qcow2"
    o = f"encrypt.format=aes,encrypt.key-secret=sec0{extra}"
    subprocess.run(["qemu-img", "create", "-q", *OBJ, "-f", "qcow2", "-o", o, str(img),
                    "6M"], check=True)
    assert qemu_io(img, "write -P 0x61 100k 300k").returncode == 0
    shutil.copyfile(img, twin)
    ref = bytearray(qemu_raw(img, tmp_path))
    rng = random.Random(extra)
    writes = []
    for _ in range(40):
        off = rng.randrange(0, 6 * MiB - 1)
        writes.append((off, rng.randrange(1, min(200000, 6 * MiB - off) + 1)))
    writes += [(0, 2 * MiB), (65536 * 3 + 7, 5), (6 * MiB - 513, 513)]
    with qcow2.open(str(img), "r+", key=SECRET) as q:
        for i, (off, ln) in enumerate(writes):
            data = bytes([i + 1]) * ln
            q.pwrite(data, off)
            ref[off:off + ln] = data
        assert q.pread(q.size, 0) == ref
    qemu_check(img)
    assert qemu_raw(img, tmp_path) == ref
    # the same writes made by qemu-io (which completes partial sectors as we do)
    cmds = [f"write -P {i + 1} {off} {ln}" for i, (off, ln) in enumerate(writes)]
    assert qemu_io(twin, *cmds).returncode == 0
    assert qemu_raw(twin, tmp_path) == ref


def test_legacy_aes_converted_like_qemu(tmp_path):
    """convert -O qcow2 -o encrypt.format=aes: byte for byte qemu-img's output; and
    an image with a backing file takes partial writes over the backing data."""
    src = tmp_path / "in.raw"
    rng = random.Random(5)
    src.write_bytes(rng.randbytes(1 * MiB) + bytes(MiB) + rng.randbytes(MiB + 4096))
    a, b = tmp_path / "a.qcow2", tmp_path / "b.qcow2"
    o = "encrypt.format=aes,encrypt.key-secret=sec0"
    p = ours("convert", *OBJ, "-O", "qcow2", "-o", o, src, a)
    assert p.returncode == 0, p.stderr
    subprocess.run(["qemu-img", "convert", *OBJ, "-O", "qcow2", "-o", o, str(src), str(b)],
                   check=True)
    assert a.read_bytes() == b.read_bytes()
    top = tmp_path / "top.qcow2"
    subprocess.run(["qemu-img", "create", "-q", *OBJ, "-f", "qcow2", "-o", o, "-b", str(a),
                    "-F", "qcow2", str(top)], check=True)
    ref = bytearray(src.read_bytes())
    with qcow2.open(str(top), "r+", key=SECRET, keys={str(a): SECRET}) as q:
        for off, ln in ((4096 + 3, 1000), (MiB - 100, 300), (2 * MiB + 65536, 70000)):
            q.pwrite(b"\x77" * ln, off)
            ref[off:off + ln] = b"\x77" * ln
        assert q.pread(q.size, 0) == ref
    spec = (f"{_spec(top)},backing.driver=qcow2,backing.file.filename={a},"
            f"backing.encrypt.key-secret=sec0")
    c = _run(["qemu-img", "check", *OBJ, "--image-opts", spec])
    assert c.returncode == 0 and "No errors were found" in c.stdout, c.stdout + c.stderr
    out = tmp_path / "top.raw"
    c = _run(["qemu-img", "convert", *OBJ, "--image-opts", spec, "-O", "raw", str(out)])
    assert c.returncode == 0, c.stderr
    assert out.read_bytes() == ref



@pytest.mark.parametrize("fmt", ["luks", "aes"])
def test_downgrade_writes_encrypted_zeros_into_snapshots(tmp_path, fmt):
    """amend -o compat=0.10 turns a snapshot's zero cluster (over a backing file) into a
    cluster of written zeros: encrypted ones here, so the snapshot still reads zeros
    (qemu-img 7.2 writes plain zeros, which the snapshot then reads as noise)."""
    base, top = tmp_path / "base.qcow2", tmp_path / "top.qcow2"
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(base), "1M"], check=True)
    assert _run(["qemu-io", "-c", "write -P 0x11 0 1M", str(base)]).returncode == 0
    o = f"encrypt.format={fmt},encrypt.key-secret=sec0"
    if fmt == "luks":
        o += ",encrypt.iter-time=10"
    _qemu_create(["-f", "qcow2", "-o", o, "-b", base, "-F", "qcow2", top])
    assert qemu_io(top, "write -z 0 64k", "write -P 0x33 64k 64k").returncode == 0
    p = _run(["qemu-img", "snapshot", *OBJ, "--image-opts", _spec(top), "-c", "s1"])
    assert p.returncode == 0, p.stderr
    assert qemu_io(top, "write -P 0x22 0 128k").returncode == 0
    p = ours("amend", *OBJ, "--image-opts", _spec(top), "-o", "compat=0.10")
    assert p.returncode == 0, p.stderr
    out = tmp_path / "s1.raw"
    p = _run(["qemu-img", "convert", *OBJ, "-l", "s1", "--image-opts", _spec(top), "-O", "raw",
              str(out)])
    assert p.returncode == 0, p.stderr
    want = bytes(64 << 10) + b"\x33" * (64 << 10) + b"\x11" * (MiB - (128 << 10))
    assert out.read_bytes() == want
    qemu_check(top)
    assert qemu_raw(top, tmp_path)[:128 << 10] == b"\x22" * (128 << 10)


@pytest.mark.parametrize("mode", ["metadata", "falloc", "full"])
@pytest.mark.parametrize("fmt, extra", [("luks", ""), ("luks", ",compat=0.10"),
                                        ("luks", ",extended_l2=on"), ("aes", ""),
                                        ("aes", ",compat=0.10")])
def test_resize_preallocated_clusters_read_zeros(tmp_path, fmt, extra, mode):
    """resize --preallocation of an encrypted image: the new clusters read zeros (marked
    zero where version 3 allows, else encrypted zeros written); qemu-img 7.2 leaves
    holes or plain zeros there, which read as noise."""
    img = tmp_path / "r.qcow2"
    o = f"encrypt.format={fmt},encrypt.key-secret=sec0{extra}"
    if fmt == "luks":
        o += ",encrypt.iter-time=10"
    _qemu_create(["-f", "qcow2", "-o", o, str(img), "1M"])
    assert qemu_io(img, "write -P 0x44 0 1000000").returncode == 0
    p = ours("resize", *OBJ, "--image-opts", _spec(img), f"--preallocation={mode}", "3M")
    assert p.returncode == 0, p.stderr
    assert qemu_raw(img, tmp_path) == b"\x44" * 1000000 + bytes(3 * MiB - 1000000)
    qemu_check(img)
