"""qcow2.bitmap: the bitmap directory and bitmap tables, parsed and validated once.

A directory made by ``qemu-img bitmap --add`` is read as ``qemu-img info`` lists it and
loaded with QEMU's rules; each rule is then broken one field at a time and the first
problem must name that field.  The space the bitmaps need is compared with
``qemu-img measure``."""

from __future__ import annotations

import json
import shutil
import struct
import subprocess

import numpy as np
import pytest

from helpers import qemu_img, qemu_io
from qcow2 import constants as C
from qcow2.bitmap import (data_clusters, entry_problem, load_directory, read_directory,
                          required_size, supports_persistent, table_problem)
from qcow2.errors import CorruptImageError

pytestmark = pytest.mark.skipif(not (shutil.which("qemu-img") and shutil.which("qemu-io")),
                                reason="qemu-img/qemu-io not installed")

CS = 65536
SIZE = 64 << 20


@pytest.fixture(scope="module")
def image(tmp_path_factory):
    """Two bitmaps (one of granularity 512), written while enabled."""
    p = tmp_path_factory.mktemp("bitmap") / "b.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", p, str(SIZE))
    qemu_img("bitmap", "--add", p, "bm0")
    qemu_img("bitmap", "--add", "-g", "512", p, "bitmap-one")
    qemu_io(p, "write -P 2 1M 64k", "write -P 3 40M 64k")
    return p


@pytest.fixture
def directory(image):
    """(directory bytes, directory offset, bitmap count) of the image."""
    import qcow2
    with qcow2.open(str(image)) as img:
        nb, dsize, doff = img.header.bitmaps_ext
        return bytearray(img.be.pread(dsize, doff)), doff, nb


def test_read_directory_is_what_info_lists(image, directory):
    import qcow2
    buf, doff, nb = directory
    entries = read_directory(buf, doff, nb)
    with qcow2.open(str(image)) as img:
        assert [e.info() for e in entries] == img.bitmaps()
    assert [e.name for e in entries] == [b"bm0", b"bitmap-one"]
    assert [e.granularity for e in entries] == [CS, 512]
    assert entries[0].offset == doff
    assert entries[1].offset == doff + entries[0].size
    with pytest.raises(CorruptImageError) as ei:
        read_directory(buf[:40], doff, nb)
    assert ei.value.offset == doff + entries[0].size


def test_load_directory(directory):
    buf, doff, nb = directory
    entries = load_directory(buf, doff, nb, CS, SIZE, exact_size=True)
    assert [e.label() for e in entries] == ["bm0", "bitmap-one"]
    for e in entries:
        assert e.table_size == e.table_entries_needed(SIZE, CS)
        assert e.table_offset % CS == 0 and not e.in_use
        assert entry_problem(e, CS, SIZE, exact_size=True) is None


def _field(buf, entry_pos, field, fmt, value):
    struct.pack_into(fmt, buf, entry_pos + field, value)


@pytest.mark.parametrize("field, fmt, value, text", [
    (20, ">I", 8, "extra data"),
    (18, ">H", 1024, "exceeds 1023"),
    (18, ">H", 1000, "overruns the directory"),
    (12, ">I", 4, "reserved bits"),
    (16, ">B", 2, "not a dirty tracking bitmap"),
    (17, ">B", 8, "granularity"),
    (17, ">B", 32, "granularity"),
    (0, ">Q", 0, "is zero"),
    (0, ">Q", 0x10200, "not cluster-aligned"),
    (8, ">I", 0, "out of range"),
    (8, ">I", C.BME_MAX_PHYS_SIZE // CS + 1, "out of range"),
])
def test_each_rule_names_its_field(directory, field, fmt, value, text):
    buf, doff, nb = directory
    second = read_directory(buf, doff, nb)[1].offset - doff
    _field(buf, second, field, fmt, value)
    with pytest.raises(CorruptImageError, match=text) as ei:
        load_directory(buf, doff, nb, CS, SIZE)
    assert ei.value.offset == doff + second + field
    assert ei.value.what == "bitmap directory entry"


def test_table_size_against_the_disk(directory):
    buf, doff, nb = directory
    e = read_directory(buf, doff, nb)[1]
    pos = e.offset - doff
    disk = 1 << 32                                      # 2^23 bits: 16 table entries
    want = e.table_entries_needed(disk, CS)
    assert want == 16 and e.table_size == 1
    with pytest.raises(CorruptImageError, match=f"needs {want}") as ei:
        load_directory(buf, doff, nb, CS, disk)       # too small: QEMU refuses
    assert ei.value.offset == e.offset + 8
    _field(buf, pos, 8, ">I", want + 1)                # too big: only exact_size refuses
    load_directory(buf, doff, nb, CS, disk)
    with pytest.raises(CorruptImageError, match=f"needs {want}"):
        load_directory(buf, doff, nb, CS, disk, exact_size=True)
    _field(buf, pos, 12, ">I", e.flags | C.BME_FLAG_IN_USE)    # in use: may lag behind
    load_directory(buf, doff, nb, CS, disk, exact_size=True)
    _field(buf, pos, 8, ">I", 1)
    load_directory(buf, doff, nb, CS, disk, exact_size=True)


def test_entry_count(directory):
    buf, doff, nb = directory
    with pytest.raises(CorruptImageError, match="more entries than the 1") as ei:
        load_directory(buf, doff, 1, CS, SIZE)
    assert ei.value.offset == read_directory(buf, doff, nb)[1].offset
    with pytest.raises(CorruptImageError, match="has 2 entries, the header extension "
                                                "names 3") as ei:
        load_directory(buf, doff, 3, CS, SIZE, count_offset=0x1234)
    assert ei.value.offset == 0x1234 and ei.value.what == "header extension"
    with pytest.raises(CorruptImageError, match="overruns"):
        load_directory(buf + bytes(8), doff, nb, CS, SIZE)
    with pytest.raises(CorruptImageError, match="empty or too big"):
        load_directory(b"", doff, 0, CS, SIZE)


def test_table_problem():
    cs = 4096
    ok = np.array([0, 1, 0x3000, 0x5000], dtype=np.uint64)
    assert table_problem(ok, cs) is None
    k, off = data_clusters(ok)
    assert k.tolist() == [2, 3] and off.tolist() == [0x3000, 0x5000]
    assert table_problem(ok, cs, file_size=0x6000) is None
    assert table_problem(ok, cs, file_size=0x5800) == (3, "points past the end of the file "
                                                          "(size 0x5800)")
    bad = ok.copy()
    bad[1] = 2                                        # reserved bit 1
    bad[3] = 0x5200                                   # unaligned
    assert table_problem(bad, cs) == (1, "has reserved bits set")
    bad[1] = 0x3001                                   # data and all-ones
    assert table_problem(bad, cs) == (1, "has a data cluster and the all-ones flag")
    bad[1] = 0
    assert table_problem(bad, cs) == (3, "points at an unaligned cluster")


def test_required_size_is_what_qemu_measures(image, directory):
    buf, doff, nb = directory
    r = subprocess.run(["qemu-img", "measure", "--output=json", "-O", "qcow2", str(image)],
                       capture_output=True, text=True, check=True)
    want = json.loads(r.stdout)["bitmaps"]
    entries = read_directory(buf, doff, nb)
    pairs = [(e.granularity, e.info()["name"]) for e in entries]
    assert required_size(SIZE, pairs, CS) == want
    assert required_size(SIZE, [], CS) == 0
    import qcow2
    with qcow2.open(str(image)) as img:
        assert supports_persistent(img.format, img.header)
        img.header.version = 2
        assert not supports_persistent(img.format, img.header)
    assert not supports_persistent("raw", None)
