"""Backing chains: path resolution, format selection, loops, depth, missing files.

Each test builds its own small chain with qemu-img in ``tmp_path``.  Where qemu
reads the chain the same way the engine must, the engine is compared with qemu
(``qemu-img convert`` / ``info`` / ``map``); where the engine is deliberately
stricter (loops, depth, probing only qcow2-or-raw), the expected behaviour is
asserted directly.  qemu-img itself never runs on a looping chain: qemu 7.2 recurses
until it runs out of memory.
"""

from __future__ import annotations

import faulthandler
import os
import shutil
from pathlib import Path

import pytest

import corpus
import oracle

MiB = 1 << 20


@pytest.fixture(autouse=True)
def _no_hang():
    """A looping engine must not hang the suite: dump stacks and exit after 120 s."""
    faulthandler.dump_traceback_later(120, exit=True)
    yield
    faulthandler.cancel_dump_traceback_later()


def fill(path, cmds, fmt="qcow2"):
    corpus.qemu_io(Path(path).name, cmds, fmt=fmt, cwd=Path(path).parent)


def raw_file(path, size, seed, *, head=b""):
    """A raw file of ``size`` bytes: pattern data, holes, optional leading bytes."""
    corpus.raw_base(Path(path), size, 65536, seed)
    if head:
        with open(path, "r+b") as f:
            f.write(head)


def assert_reads_like_qemu(engine, path, fmt=None, *, cwd=None):
    """Whole content, a few unaligned reads and the extents equal qemu's."""
    expected = oracle.raw_bytes(path, fmt) if cwd is None else _raw_in(path, cwd)
    with engine.open(str(path)) as img:
        assert img.size == len(expected)
        got = img.pread(img.size, 0)
        if got != expected:
            off = oracle.first_difference(got, expected)
            pytest.fail("%s differs from qemu at offset %d (0x%x)" % (path, off, off))
        for off, n in oracle.random_ranges(str(path), img.size, 65536, n=20):
            assert img.pread(n, off) == expected[off:off + n], (off, n)
    return expected


def _raw_in(path, cwd):
    """qemu-img convert run from ``cwd`` with ``path`` as given (may be relative)."""
    out = Path(cwd).resolve() / ".oracle-out.raw"
    oracle.qemu_img("convert", "-U", "-O", "raw", str(path), str(out), cwd=cwd)
    data = out.read_bytes()
    out.unlink()
    return data


# -------------------------------------------------------------- path resolution

def test_relative_backing_resolved_against_overlay_folder(engine, tmp_path, monkeypatch,
                                                          qemu):
    """top -> "sub/mid.qcow2" (no backing_fmt) -> "../base.qcow2": both relative to
    the folder of the image that names them, never to the working directory."""
    imgs = tmp_path / "imgs"
    (imgs / "sub").mkdir(parents=True)
    corpus.create(imgs / "base.qcow2", 3 * MiB, opts={"cluster_size": 4096})
    fill(imgs / "base.qcow2", ["write -P 0x11 0 3M", "write -P 0x12 1M 4096"])
    corpus.create(imgs / "sub" / "mid.qcow2", 3 * MiB, backing="../base.qcow2",
                  backing_fmt="qcow2")
    fill(imgs / "sub" / "mid.qcow2", ["write -P 0x21 65536 100000"])
    corpus.create(imgs / "top.qcow2", 3 * MiB, backing="sub/mid.qcow2",
                  opts={"_probe_as": "qcow2"})
    fill(imgs / "top.qcow2", ["write -P 0x31 1536 1000", "write -z 2M 65536"])

    # decoys where a cwd-relative lookup would look
    elsewhere = tmp_path / "elsewhere"
    (elsewhere / "sub").mkdir(parents=True)
    corpus.create(elsewhere / "sub" / "mid.qcow2", 3 * MiB)
    fill(elsewhere / "sub" / "mid.qcow2", ["write -P 0xee 0 3M"])
    shutil.copy(elsewhere / "sub" / "mid.qcow2", elsewhere / "base.qcow2")
    monkeypatch.chdir(elsewhere)

    expected = assert_reads_like_qemu(engine, imgs / "top.qcow2")
    assert expected[1536:2536] == b"\x31" * 1000
    assert expected[65536 + 100000:65536 + 100001] == b"\x11"
    # by a relative path, from the other folder
    rel = os.path.relpath(imgs / "top.qcow2", elsewhere)
    with engine.open(rel) as img:
        assert img.pread(len(expected), 0) == expected
        assert img.info() == oracle.info_json(rel, cwd=elsewhere)
        assert [oracle.extent_dict(e) for e in img.extents()] == \
            oracle.map_json(rel, cwd=elsewhere)


def test_absolute_backing_path(engine, tmp_path, qemu):
    corpus.create(tmp_path / "base.qcow2", 2 * MiB)
    fill(tmp_path / "base.qcow2", ["write -P 0x44 0 2M"])
    (tmp_path / "o").mkdir()
    corpus.create(tmp_path / "o" / "top.qcow2", 2 * MiB,
                  backing=str(tmp_path / "base.qcow2"), backing_fmt="qcow2")
    fill(tmp_path / "o" / "top.qcow2", ["write -P 0x55 4096 4096"])
    assert_reads_like_qemu(engine, tmp_path / "o" / "top.qcow2")


def test_data_file_relative_from_other_cwd(engine, corpus_root, tmp_path, monkeypatch):
    """A relative external data file is found next to the image whatever the cwd
    (qemu 7.2 looks in the cwd instead; the oracle runs in the image's folder)."""
    b = corpus.build(corpus.by_id()["data-file"], corpus_root)
    monkeypatch.chdir(tmp_path)
    expected = oracle.raw_bytes(b.path)
    with engine.open(b.path) as img:
        assert img.pread(img.size, 0) == expected


# ------------------------------------------------------------ format selection

def test_backing_fmt_raw_with_qcow2_magic_is_raw(engine, tmp_path, qemu):
    """backing_fmt=raw is honoured even when the raw data looks like a qcow2 header."""
    fake = b"QFI\xfb" + (3).to_bytes(4, "big") + bytes(range(8, 200))
    raw_file(tmp_path / "base.raw", 2 * MiB, seed=5, head=fake)
    corpus.create(tmp_path / "top.qcow2", 2 * MiB, backing="base.raw", backing_fmt="raw")
    fill(tmp_path / "top.qcow2", ["write -P 0x66 65536 512"])
    expected = assert_reads_like_qemu(engine, tmp_path / "top.qcow2")
    assert expected[:len(fake)] == fake
    with engine.open(str(tmp_path / "top.qcow2")) as img:
        assert img.pread(4, 0) == b"QFI\xfb"
        assert img.info() == oracle.info_json(tmp_path / "top.qcow2")
        assert img.info()["backing-filename-format"] == "raw"


def test_probed_backing_with_qcow2_magic_is_qcow2(engine, errors, tmp_path, qemu):
    """Without backing_fmt the same file is probed as qcow2 -- and is not a valid one."""
    fake = b"QFI\xfb" + (0xDEAD).to_bytes(4, "big") + bytes(200)
    raw_file(tmp_path / "base.raw", 2 * MiB, seed=6, head=fake)
    corpus.create(tmp_path / "top.qcow2", 2 * MiB, backing="base.raw",
                  opts={"_probe_as": "raw"})
    assert oracle.qemu_img("convert", "-O", "raw", tmp_path / "top.qcow2",
                           tmp_path / "x.raw", check=False).returncode == 1
    with pytest.raises(errors.Qcow2Error):
        with engine.open(str(tmp_path / "top.qcow2")) as img:
            img.pread(4096, 0)


def test_probed_raw_backing(engine, tmp_path, qemu):
    raw_file(tmp_path / "base.img", 3 * MiB + 1000, seed=7)
    corpus.create(tmp_path / "top.qcow2", 4 * MiB, backing="base.img",
                  opts={"_probe_as": "raw"})
    fill(tmp_path / "top.qcow2", ["write -P 0x77 1M 70000"])
    assert_reads_like_qemu(engine, tmp_path / "top.qcow2")
    with engine.open(str(tmp_path / "top.qcow2")) as img:
        assert img.info() == oracle.info_json(tmp_path / "top.qcow2")
        assert "backing-filename-format" not in img.info()


def test_probing_knows_only_qcow2_and_raw(engine, tmp_path, qemu):
    """With no backing_fmt, anything that is not qcow2 is raw: a VMDK backing file is
    read as its bytes (qemu would probe and parse it as VMDK -- the engine does not
    parse formats it was not asked for)."""
    corpus.qemu_img("create", "-q", "-f", "vmdk", tmp_path / "base.vmdk", "1M")
    fill(tmp_path / "base.vmdk", ["write -P 0x99 0 65536"], fmt="vmdk")
    corpus.create(tmp_path / "top.qcow2", 2 * MiB, backing="base.vmdk",
                  opts={"_probe_as": "vmdk"})
    base = (tmp_path / "base.vmdk").read_bytes()
    assert base[:4] == b"KDMV"
    with engine.open(str(tmp_path / "top.qcow2")) as img:
        n = min(len(base), img.size)
        assert img.pread(n, 0) == base[:n]
        assert img.pread(img.size - n, n) == bytes(img.size - n)


def test_backing_fmt_other_than_qcow2_or_raw_is_refused(engine, errors, tmp_path, qemu):
    corpus.qemu_img("create", "-q", "-f", "vmdk", tmp_path / "base.vmdk", "1M")
    corpus.create(tmp_path / "top.qcow2", MiB, backing="base.vmdk", backing_fmt="vmdk")
    with pytest.raises(errors.Qcow2Error):
        with engine.open(str(tmp_path / "top.qcow2")) as img:
            img.pread(512, 0)


# ----------------------------------------------------------- loops and depth

def _rebase_unsafe(path, backing, fmt="qcow2"):
    corpus.qemu_img("rebase", "-u", "-b", backing, "-F", fmt, Path(path).name,
                    cwd=Path(path).parent)


def test_backing_loop_self(engine, errors, tmp_path, qemu):
    corpus.create(tmp_path / "a.qcow2", MiB)
    _rebase_unsafe(tmp_path / "a.qcow2", "a.qcow2")
    with pytest.raises(errors.Qcow2Error):
        with engine.open(str(tmp_path / "a.qcow2")) as img:
            img.pread(512, 0)


def test_backing_loop_self_probed(engine, errors, tmp_path, qemu):
    corpus.create(tmp_path / "a.qcow2", MiB)
    _rebase_unsafe(tmp_path / "a.qcow2", "./a.qcow2")
    corpus.strip_backing_format(tmp_path / "a.qcow2")
    with pytest.raises(errors.Qcow2Error):
        with engine.open(str(tmp_path / "a.qcow2")) as img:
            img.pread(512, 0)


def test_backing_loop_of_two(engine, errors, tmp_path, qemu):
    corpus.create(tmp_path / "a.qcow2", MiB)
    corpus.create(tmp_path / "b.qcow2", MiB)
    _rebase_unsafe(tmp_path / "a.qcow2", "b.qcow2")
    # b names a through another spelling of the same path
    _rebase_unsafe(tmp_path / "b.qcow2", str(tmp_path) + "/./a.qcow2")
    with pytest.raises(errors.Qcow2Error):
        with engine.open(str(tmp_path / "a.qcow2")) as img:
            img.pread(512, 0)


def _chain(tmp_path, depth):
    """depth qcow2 images: img0 (bottom, with data) <- img1 <- ... <- img{depth-1}."""
    corpus.create(tmp_path / "img0.qcow2", MiB, opts={"cluster_size": 4096})
    fill(tmp_path / "img0.qcow2", ["write -P 0x01 0 1M"])
    for i in range(1, depth):
        corpus.create(tmp_path / ("img%d.qcow2" % i), MiB, opts={"cluster_size": 4096},
                      backing="img%d.qcow2" % (i - 1), backing_fmt="qcow2")
        fill(tmp_path / ("img%d.qcow2" % i), ["write -P 0x%02x %d 4096" % (i + 1, i * 8192)])
    return tmp_path / ("img%d.qcow2" % (depth - 1))


def test_chain_of_eight_reads(engine, tmp_path, qemu):
    top = _chain(tmp_path, 8)
    assert_reads_like_qemu(engine, top)
    with engine.open(str(top)) as img:
        assert [oracle.extent_dict(e) for e in img.extents()] == oracle.map_json(top)
        assert max(e.depth for e in img.extents()) == 7


def test_chain_deeper_than_16_refused(engine, errors, tmp_path, qemu):
    top = _chain(tmp_path, 24)
    with pytest.raises(errors.Qcow2Error):
        with engine.open(str(top)) as img:
            img.pread(512, 0)


def test_missing_backing_file_named(engine, errors, tmp_path, qemu):
    corpus.create(tmp_path / "top.qcow2", MiB, backing="gone-away.qcow2",
                  backing_fmt="qcow2")
    with pytest.raises(errors.Qcow2Error) as info:
        with engine.open(str(tmp_path / "top.qcow2")) as img:
            img.pread(512, 0)
    assert "gone-away.qcow2" in str(info.value)


def test_missing_data_file_named(engine, errors, tmp_path, qemu):
    corpus.create(tmp_path / "top.qcow2", MiB, opts={"data_file": "vanished.data"})
    (tmp_path / "vanished.data").unlink()
    with pytest.raises(errors.Qcow2Error) as info:
        with engine.open(str(tmp_path / "top.qcow2")) as img:
            img.pread(512, 0)
    assert "vanished.data" in str(info.value)


# ------------------------------------------------------------ size mismatches

@pytest.mark.parametrize("base_fmt", ["raw", "qcow2"])
def test_backing_shorter_than_overlay_reads_zeros(engine, tmp_path, base_fmt, qemu):
    base = tmp_path / ("base." + base_fmt)
    if base_fmt == "raw":
        base.write_bytes(b"\x77" * (MiB + 1000))     # qemu rounds the size up to 512
    else:
        corpus.create(base, MiB, opts={"cluster_size": 4096})
        fill(base, ["write -P 0x77 0 1M"])
    corpus.create(tmp_path / "top.qcow2", 3 * MiB, backing=base.name, backing_fmt=base_fmt)
    fill(tmp_path / "top.qcow2", ["write -P 0x88 512 1024", "write -P 0x89 2M 4096"])
    expected = assert_reads_like_qemu(engine, tmp_path / "top.qcow2")
    with engine.open(str(tmp_path / "top.qcow2")) as img:
        tail_start = MiB + 1000 if base_fmt == "raw" else MiB
        assert img.pread(2 * MiB - tail_start, tail_start) == bytes(2 * MiB - tail_start)
        assert img.pread(10, MiB - 10) == b"\x77" * 10
        assert expected[2 * MiB:2 * MiB + 4096] == b"\x89" * 4096
        assert [oracle.extent_dict(e) for e in img.extents()] == \
            oracle.map_json(tmp_path / "top.qcow2")


def test_backing_longer_than_overlay(engine, tmp_path, qemu):
    corpus.create(tmp_path / "base.qcow2", 4 * MiB)
    fill(tmp_path / "base.qcow2", ["write -P 0x12 0 4M"])
    corpus.create(tmp_path / "top.qcow2", MiB + 512, backing="base.qcow2",
                  backing_fmt="qcow2")
    fill(tmp_path / "top.qcow2", ["write -P 0x13 1M 512"])
    assert_reads_like_qemu(engine, tmp_path / "top.qcow2")
    with engine.open(str(tmp_path / "top.qcow2")) as img:
        assert img.size == MiB + 512
        assert img.pread(4096, MiB) == b"\x13" * 512
