"""Reads of every corpus image, compared with qemu-img.

For each image: the whole guest data (``pread``) equals ``qemu-img convert -O raw``;
random (offset, length) reads, ``readinto`` and the ``file()`` view agree with it;
``info()`` equals ``qemu-img info --output=json`` (whole dict); ``extents()`` equals
``qemu-img map --output=json`` (whole list); internal snapshots read like
``qemu-img convert -l``; encrypted images open for ``info`` but refuse to read.

The engine implementation is whatever QCOW2_IMPL selected for this process.
"""

from __future__ import annotations

import hashlib
import io
import os
import zlib

import pytest

import corpus
import oracle

CHUNK = 4 << 20

readable = corpus.params(lambda c: c.readable)
with_snapshots = corpus.params(lambda c: bool(c.snapshots))
encrypted = corpus.params(lambda c: not c.readable)
small = corpus.params(lambda c: c.readable and not c.big)
everything = corpus.params()


def _seed(case) -> int:
    return zlib.crc32(case.id.encode())


def _subcluster(case) -> int:
    cs = case.cluster_size
    return cs // 32 if "extended_l2" in case.features else cs


def _compare_stream(read_chunk, expected_path, size, what):
    """Compare ``read_chunk(n, off)`` over [0, size) with the file at expected_path;
    report the first differing offset and both sha256 digests on mismatch."""
    h_got, h_exp = hashlib.sha256(), hashlib.sha256()
    first_bad = None
    with open(expected_path, "rb") as f:
        off = 0
        while off < size:
            n = min(CHUNK, size - off)
            got = read_chunk(n, off)
            exp = f.read(n)
            h_got.update(got)
            h_exp.update(exp)
            if first_bad is None and got != exp:
                first_bad = off + oracle.first_difference(got, exp)
            off += n
    if first_bad is not None:
        pytest.fail("%s differs from qemu-img convert -O raw; first difference at offset "
                    "%d (0x%x); sha256 %s != %s" % (what, first_bad, first_bad,
                                                    h_got.hexdigest(), h_exp.hexdigest()))


# ------------------------------------------------------------------- guest data

@pytest.mark.parametrize("case", readable)
def test_full_read(case, built, engine):
    expected = oracle.raw_path(built.path, case.fmt)
    size = expected.stat().st_size
    with engine.open(built.path) as img:
        assert img.size == size
        assert img.format == case.fmt
        _compare_stream(img.pread, expected, size, "pread")
        assert img.pread(CHUNK, size) == b""


@pytest.mark.parametrize("case", readable)
def test_convert_to_raw(case, built, engine, tmp_path):
    """The library's convert to raw (planned from the map, plain data copied with
    copy_file_range from whichever file of the chain holds it) equals qemu-img's."""
    expected = oracle.raw_path(built.path, case.fmt)
    dst = tmp_path / "out.raw"
    engine.convert(built.path, dst, out_format="raw", cache="unsafe")
    assert dst.stat().st_size == expected.stat().st_size
    with open(dst, "rb") as f:
        _compare_stream(lambda n, off: os.pread(f.fileno(), n, off), expected,
                        expected.stat().st_size, "convert -O raw")


@pytest.mark.parametrize("case", small)
def test_full_read_sha256(case, built, engine):
    """One pread of the whole disk, compared by digest (exercises large requests)."""
    with engine.open(built.path, format=case.fmt) as img:
        data = img.pread(img.size + 12345, 0)
    expected = oracle.raw_sha256(built.path, case.fmt)
    if hashlib.sha256(data).hexdigest() != expected:
        exp = oracle.raw_bytes(built.path, case.fmt)
        off = oracle.first_difference(data, exp)
        pytest.fail("whole-disk pread differs from qemu at offset %d (0x%x); got %d bytes, "
                    "expected %d" % (off, off, len(data), len(exp)))


@pytest.mark.parametrize("case", readable)
def test_random_reads(case, built, engine):
    size = oracle.raw_size(built.path, case.fmt)
    ranges = oracle.random_ranges(_seed(case), size, case.cluster_size, n=50,
                                  subcluster_size=_subcluster(case))
    with engine.open(built.path) as img:
        for off, n in ranges:
            got = img.pread(n, off)
            exp = oracle.raw_pread(built.path, n, off, case.fmt)
            if got != exp:
                d = oracle.first_difference(got, exp)
                pytest.fail("pread(%d, %d) differs from qemu at offset %d (got %d bytes, "
                            "expected %d)" % (n, off, off + d, len(got), len(exp)))


@pytest.mark.parametrize("case", readable)
def test_readinto(case, built, engine):
    size = oracle.raw_size(built.path, case.fmt)
    ranges = oracle.random_ranges(_seed(case) + 1, size, case.cluster_size, n=20,
                                  subcluster_size=_subcluster(case))
    with engine.open(built.path) as img:
        for off, n in ranges:
            exp = oracle.raw_pread(built.path, n, off, case.fmt)
            buf = bytearray(b"\xa5" * n)
            got = img.readinto(buf, off)
            assert got == len(exp), "readinto(%d bytes, %d) returned %r" % (n, off, got)
            assert bytes(buf[:got]) == exp, "readinto(%d bytes, %d) data differs" % (n, off)
            assert buf[got:] == b"\xa5" * (n - got), "readinto wrote past the data it read"
            # into a slice of a larger buffer, through a memoryview
            big = bytearray(n + 64)
            mv = memoryview(big)[32:32 + n]
            assert img.readinto(mv, off) == len(exp)
            assert bytes(big[32:32 + len(exp)]) == exp
            assert big[:32] == bytes(32) and big[32 + n:] == bytes(32)


@pytest.mark.parametrize("case", readable)
def test_file_view(case, built, engine):
    size = oracle.raw_size(built.path, case.fmt)
    expected = oracle.raw_path(built.path, case.fmt)
    ranges = oracle.random_ranges(_seed(case) + 2, size, case.cluster_size, n=15)
    with engine.open(built.path) as img, open(expected, "rb") as ref:
        f = img.file()
        assert isinstance(f, io.RawIOBase)
        assert f.readable() and f.seekable()
        for off, n in ranges:
            assert f.seek(off) == off == ref.seek(off)
            assert f.read(n) == ref.read(n), "file().read(%d) at %d" % (n, off)
            assert f.tell() == ref.tell()
        # relative and end-relative seeks, read() to the end, readinto
        back = min(size, 3 * 512 + 7)
        assert f.seek(-back, os.SEEK_END) == ref.seek(-back, os.SEEK_END)
        assert f.read() == ref.read()
        assert f.read(10) == b""
        if size > 1000:
            f.seek(100)
            ref.seek(100)
            assert f.seek(313, os.SEEK_CUR) == ref.seek(313, os.SEEK_CUR) == 413
            buf = bytearray(777)
            assert f.readinto(buf) == ref.readinto(bytearray(777))
            ref.seek(413)
            assert bytes(buf) == ref.read(777)


# ------------------------------------------------------------------ metadata

@pytest.mark.parametrize("case", everything)
def test_info(case, built, engine):
    with engine.open(built.path) as img:
        got = img.info()
    assert got == oracle.info_json(built.path)


@pytest.mark.parametrize("case", readable)
def test_extents(case, built, engine):
    with engine.open(built.path) as img:
        got = [oracle.extent_dict(e) for e in img.extents()]
    expected = oracle.map_json(built.path)
    if got != expected:
        for i, (g, e) in enumerate(zip(got, expected, strict=False)):
            if g != e:
                pytest.fail("extent %d differs from qemu-img map:\n  engine %r\n  qemu   %r\n"
                            "(%d engine extents, %d qemu extents)"
                            % (i, g, e, len(got), len(expected)))
        pytest.fail("engine returned %d extents, qemu-img map %d; first extra: %r"
                    % (len(got), len(expected), (got + expected)[min(len(got), len(expected))]))


@pytest.mark.parametrize("case", everything)
def test_explicit_format(case, built, engine):
    """format= given or probed: the same image."""
    with engine.open(built.path, format=case.fmt) as a, engine.open(built.path) as b:
        assert a.format == b.format == case.fmt
        assert a.size == b.size
        assert a.info() == b.info()


# --------------------------------------------------------------------- snapshots

@pytest.mark.parametrize("case", with_snapshots)
def test_snapshot_list(case, built, engine):
    info = oracle.info_json(built.path)
    assert [s["name"] for s in info["snapshots"]] == list(case.snapshots)
    with engine.open(built.path) as img:
        assert img.snapshots() == info["snapshots"]


@pytest.mark.parametrize("case", with_snapshots)
def test_snapshot_reads(case, built, engine):
    """Each snapshot by name and by id reads like ``qemu-img convert -l``.

    qemu resolves a bare snapshot argument as an id first, then as a name (the
    ``snapshots`` case has a snapshot *named* "1" whose id is "2").  qemu 7.2 also reads
    a snapshot with the *current* virtual size (see ``snapshot-resized``)."""
    info = oracle.info_json(built.path)
    first = info["snapshots"][0]["id"]
    assert oracle.raw_sha256(built.path, case.fmt, snapshot=first) != \
        oracle.raw_sha256(built.path, case.fmt), "corpus: the first snapshot should differ"
    for snap in info["snapshots"]:
        for key in (snap["name"], snap["id"]):
            expected = oracle.raw_path(built.path, case.fmt, snapshot=key)
            with engine.open(built.path, snapshot=key) as img:
                size = expected.stat().st_size
                assert img.size == size, "snapshot %r" % key
                _compare_stream(img.pread, expected, size, "snapshot %r" % key)
                # a few unaligned reads too
                for off, n in oracle.random_ranges(key, size, case.cluster_size, n=10):
                    assert img.pread(n, off) == oracle.raw_pread(
                        built.path, n, off, case.fmt, snapshot=key), (key, off, n)


@pytest.mark.parametrize("case", with_snapshots[:1])
def test_snapshot_unknown(case, built, engine, errors):
    with pytest.raises(errors.Qcow2Error):
        with engine.open(built.path, snapshot="no-such-snapshot") as img:
            img.pread(1, 0)


# --------------------------------------------------------------------- encryption

@pytest.mark.parametrize("case", encrypted)
def test_encrypted_info_but_no_read(case, built, engine, errors):
    with engine.open(built.path) as img:
        assert img.info() == oracle.info_json(built.path)
        assert img.info()["encrypted"] is True
        assert img.size == oracle.info_json(built.path)["virtual-size"]
        # no key, no data (InvalidKeyError), LUKS and the old AES method alike (the
        # latter is read with its key: tests/test_encryption_write.py)
        expected = errors.InvalidKeyError
        with pytest.raises(expected):
            img.pread(512, 0)
        with pytest.raises(expected):
            img.readinto(bytearray(512), 0)
    if case.param("encrypt") == "luks":
        from corpus import LUKS_SECRET
        with engine.open(built.path, key=LUKS_SECRET) as img:
            data = img.pread(img.size, 0)
        assert data[:65536] == b"\x11" * 65536 and data[100000:105000] == b"\x22" * 5000
        assert data.count(0) == len(data) - 65536 - 5000


# --------------------------------------------------------------------- process

def test_implementation_matches_environment(engine):
    """QCOW2_IMPL=native|python must be honoured (CI runs the suite under each)."""
    want = os.environ.get("QCOW2_IMPL", "auto")
    assert engine.implementation in ("native", "python")
    if want in ("native", "python"):
        assert engine.implementation == want
