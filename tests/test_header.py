"""Open-time validation: poke one header field or table at a time into an image qemu-img
made, and assert the exact refusal (exception type and offset), as qemu-iotests 060/080 do."""

from __future__ import annotations

import shutil
import struct
import subprocess

import pytest

import qcow2
from qcow2.errors import (CorruptImageError, DecompressionError, NotQcow2Error, Qcow2Error,
                          UnsafeImageError, UnsupportedFeatureError)

pytestmark = pytest.mark.skipif(shutil.which("qemu-img") is None, reason="qemu-img not installed")


def run(*args):
    subprocess.run(args, check=True, capture_output=True)


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    """A v3 image with data in two L2 tables' worth of space (4K clusters)."""
    d = tmp_path_factory.mktemp("hdr")
    p = d / "base.qcow2"
    run("qemu-img", "create", "-f", "qcow2", "-o", "cluster_size=4096", str(p), "8M")
    run("qemu-io", "-c", "write -P 0x5a 0 64k", "-c", "write -P 0x33 4M 8k", str(p))
    return p


def header(path):
    raw = path.read_bytes()
    return raw


def poke(src, dst, offset, fmt, value):
    data = bytearray(src.read_bytes())
    struct.pack_into(fmt, data, offset, value)
    dst.write_bytes(bytes(data))
    return dst


def field_case(offset, fmt, value, exc, err_offset=None, match=None):
    return pytest.param(offset, fmt, value, exc, err_offset, match,
                        id=f"{offset:#x}={value:#x}")


@pytest.mark.parametrize("offset,fmt,value,exc,err_offset,match", [
    field_case(0x04, ">I", 4, UnsupportedFeatureError, None, "version 4"),
    field_case(0x04, ">I", 1, UnsupportedFeatureError, None, "version 1"),
    field_case(0x14, ">I", 8, CorruptImageError, 0x14, "cluster size"),
    field_case(0x14, ">I", 22, CorruptImageError, 0x14, "cluster size"),
    field_case(0x64, ">I", 100, CorruptImageError, 0x64, "too short"),
    field_case(0x64, ">I", 8192, CorruptImageError, 0x64, "exceeds cluster size"),
    field_case(0x08, ">Q", 8192, CorruptImageError, 0x8, "backing file offset"),
    field_case(0x68, ">B", 2, UnsupportedFeatureError, None, "compression type"),
    field_case(0x68, ">B", 1, CorruptImageError, 0x48, "must be set"),
    field_case(0x48, ">Q", 1 << 3, CorruptImageError, 0x48, "must not be set"),
    field_case(0x48, ">Q", 1 << 5, UnsupportedFeatureError, None,
               "Unknown incompatible feature: 20"),
    field_case(0x60, ">I", 7, CorruptImageError, 0x60, "64 bits"),
    field_case(0x20, ">I", 3, UnsupportedFeatureError, None, "encryption method 3"),
    field_case(0x38, ">I", 0, CorruptImageError, 0x38, "reference count table"),
    field_case(0x30, ">Q", 0x10200, CorruptImageError, 0x30,
               "Reference count table offset invalid"),
    field_case(0x38, ">I", 0x10000000, CorruptImageError, 0x30, "Reference count table too large"),
    field_case(0x3C, ">I", 70000, CorruptImageError, 0x3C, "Snapshot table too large"),
    field_case(0x40, ">Q", 0x123, CorruptImageError, 0x40, "Snapshot table offset invalid"),
    field_case(0x24, ">I", 0x10000000, CorruptImageError, 0x28, "Active L1 table too large"),
    field_case(0x28, ">Q", 0x1001, CorruptImageError, 0x28, "Active L1 table offset invalid"),
    field_case(0x28, ">Q", 0xFFFFFFFFFFFFF000, CorruptImageError, 0x28, "offset invalid"),
    field_case(0x24, ">I", 0, CorruptImageError, 0x24, "L1 table is too small"),
    field_case(0x18, ">Q", 1 << 62, CorruptImageError, None, None),
    field_case(0x48, ">Q", 1 << 2, CorruptImageError, 0x48, "data-file"),
    field_case(0x58, ">Q", 1 << 1, CorruptImageError, 0x58, "data-file-raw requires a data file"),
    field_case(0x20, ">I", 2, CorruptImageError, 0x20, "Missing CRYPTO header"),
])
def test_header_field(base, tmp_path, offset, fmt, value, exc, err_offset, match):
    bad = poke(base, tmp_path / "bad.qcow2", offset, fmt, value)
    with pytest.raises(exc, match=match) as info:
        qcow2.open(bad, format="qcow2")
    if err_offset is not None:
        assert info.value.offset == err_offset


def test_bad_magic_is_not_qcow2(base, tmp_path):
    bad = poke(base, tmp_path / "bad.qcow2", 0, ">I", 0x12345678)
    with pytest.raises(NotQcow2Error):
        qcow2.open(bad, format="qcow2")
    # probing falls back to raw: the file is a perfectly good raw image
    with qcow2.open(bad) as img:
        assert img.format == "raw"


@pytest.mark.parametrize("length", [0, 3, 40, 71, 100])
def test_truncated_header(base, tmp_path, length):
    bad = tmp_path / "short.qcow2"
    bad.write_bytes(base.read_bytes()[:length])
    expected = NotQcow2Error if length < 4 else CorruptImageError
    with pytest.raises(expected):
        qcow2.open(bad, format="qcow2")


def test_unknown_autoclear_and_extension_tolerated(base, tmp_path):
    data = bytearray(base.read_bytes())
    struct.pack_into(">Q", data, 0x58, 1 << 40)  # unknown autoclear bit
    hl = struct.unpack_from(">I", data, 0x64)[0]
    # find the end-of-extensions marker and put an unknown extension there
    pos = hl
    while True:
        magic, ln = struct.unpack_from(">II", data, pos)
        if magic == 0:
            break
        pos += 8 + ((ln + 7) & ~7)
    struct.pack_into(">II8s", data, pos, 0x12345678, 5, b"hello")
    struct.pack_into(">II", data, pos + 16, 0, 0)
    p = tmp_path / "ok.qcow2"
    p.write_bytes(bytes(data))
    with qcow2.open(p) as img:
        assert img.pread(4, 0) == b"\x5a" * 4
        assert img.pread(4, 4 << 20) == b"\x33" * 4


def test_extension_too_large(base, tmp_path):
    data = bytearray(base.read_bytes())
    hl = struct.unpack_from(">I", data, 0x64)[0]
    struct.pack_into(">II", data, hl, 0x12345678, 1 << 20)
    p = tmp_path / "bad.qcow2"
    p.write_bytes(bytes(data))
    with pytest.raises(CorruptImageError, match="extension too large") as info:
        qcow2.open(p)
    assert info.value.offset == hl


def test_backing_format_extension_too_long(tmp_path):
    run("qemu-img", "create", "-f", "raw", str(tmp_path / "b.raw"), "1M")
    p = tmp_path / "o.qcow2"
    run("qemu-img", "create", "-f", "qcow2", "-b", "b.raw", "-F", "raw", str(p))
    data = bytearray(p.read_bytes())
    hl = struct.unpack_from(">I", data, 0x64)[0]
    magic, ln = struct.unpack_from(">II", data, hl)
    assert magic == 0xE2792ACA
    struct.pack_into(">I", data, hl + 4, 16)
    p.write_bytes(bytes(data))
    with pytest.raises(CorruptImageError, match="ext_backing_format"):
        qcow2.open(p)


def test_backing_name_too_long(tmp_path):
    run("qemu-img", "create", "-f", "raw", str(tmp_path / "b.raw"), "1M")
    p = tmp_path / "o.qcow2"
    run("qemu-img", "create", "-f", "qcow2", "-b", "b.raw", "-F", "raw", str(p))
    poke(p, p, 0x10, ">I", 2000)
    with pytest.raises(CorruptImageError, match="Backing file name too long") as info:
        qcow2.open(p)
    assert info.value.offset == 0x10


def _l1(path):
    data = path.read_bytes()
    l1_off = struct.unpack_from(">Q", data, 0x28)[0]
    return l1_off, struct.unpack_from(">Q", data, l1_off)[0]


def test_l2_offset_unaligned(base, tmp_path):
    l1_off, e = _l1(base)
    bad = poke(base, tmp_path / "bad.qcow2", l1_off, ">Q", e + 512)
    with qcow2.open(bad) as img:          # opening is fine: QEMU checks L2 offsets on use
        with pytest.raises(CorruptImageError, match="unaligned") as info:
            img.pread(512, 0)
    assert info.value.offset == l1_off


def test_l2_past_eof(base, tmp_path):
    l1_off, e = _l1(base)
    bad = poke(base, tmp_path / "bad.qcow2", l1_off, ">Q", (e & ~0xFFF) + (1 << 30))
    with qcow2.open(bad) as img:
        with pytest.raises(CorruptImageError, match="past the end") as info:
            img.pread(512, 0)
    assert info.value.what == "L2 table"


def test_l1_past_eof(base, tmp_path):
    bad = poke(base, tmp_path / "bad.qcow2", 0x28, ">Q", 1 << 30)
    with qcow2.open(bad) as img:
        with pytest.raises(CorruptImageError, match="L1 table") as info:
            img.pread(512, 0)
    assert info.value.offset == 1 << 30


def test_data_cluster_unaligned(base, tmp_path):
    _l1_off, l2_off = _l1(base)
    l2_off &= 0x00FFFFFFFFFFFE00
    data = base.read_bytes()
    e = struct.unpack_from(">Q", data, l2_off)[0]
    bad = poke(base, tmp_path / "bad.qcow2", l2_off, ">Q", e + 512)
    with qcow2.open(bad) as img:
        with pytest.raises(CorruptImageError) as info:
            img.pread(512, 0)
    assert info.value.offset == l2_off
    assert info.value.what == "L2 entry"


def test_garbage_compressed_cluster(tmp_path):
    raw = tmp_path / "src.raw"
    raw.write_bytes(b"compressible " * 100000)
    p = tmp_path / "c.qcow2"
    run("qemu-img", "convert", "-c", "-O", "qcow2", str(raw), str(p))
    data = bytearray(p.read_bytes())
    l1_off = struct.unpack_from(">Q", data, 0x28)[0]
    l2_off = struct.unpack_from(">Q", data, l1_off)[0] & 0x00FFFFFFFFFFFE00
    e = struct.unpack_from(">Q", data, l2_off)[0]
    assert e & (1 << 62)
    coff = e & ((1 << 54) - 1)      # 64K clusters: x = 62 - 8 = 54
    data[coff:coff + 64] = b"\xff" * 64
    p.write_bytes(bytes(data))
    with qcow2.open(p) as img:
        with pytest.raises(DecompressionError) as info:
            img.pread(4096, 0)
    assert info.value.offset == coff


def test_backing_json_and_protocol_names_refused(tmp_path):
    for name in ("json:{\"file.filename\":\"/etc/passwd\"}", "nbd://127.0.0.1/x",
                 "file:/etc/passwd"):
        p = tmp_path / "o.qcow2"
        run("qemu-img", "create", "-f", "qcow2", "-u", "-b", name, "-F", "raw", str(p), "1M")
        with pytest.raises(UnsafeImageError):
            qcow2.open(p)
        # info (backing not opened) still reports it
        with qcow2.open(p, backing=False) as img:
            assert img.info()["backing-filename"] == name


def test_untrusted_refuses_backing(tmp_path):
    run("qemu-img", "create", "-f", "raw", str(tmp_path / "b.raw"), "1M")
    p = tmp_path / "o.qcow2"
    run("qemu-img", "create", "-f", "qcow2", "-b", "b.raw", "-F", "raw", str(p))
    with pytest.raises(UnsafeImageError, match="b.raw"):
        qcow2.open(p, untrusted=True)


def test_missing_backing_file_is_named(tmp_path):
    p = tmp_path / "o.qcow2"
    run("qemu-img", "create", "-f", "qcow2", "-u", "-b", "gone.raw", "-F", "raw", str(p), "1M")
    with pytest.raises(Qcow2Error, match="gone.raw"):
        qcow2.open(p)
