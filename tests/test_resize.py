"""resize against qemu-img: same content and size, check clean, snapshots kept."""

from __future__ import annotations

import json
import os
import shutil

import pytest

from helpers import clean, cli, info, run

import qcow2

pytestmark = pytest.mark.skipif(shutil.which("qemu-img") is None, reason="qemu-img not installed")






def twins(tmp_path, opts="cluster_size=65536", size="3M", writes=()):
    a, b = tmp_path / "ours.qcow2", tmp_path / "theirs.qcow2"
    run("qemu-img", "create", "-q", "-f", "qcow2", "-o", opts, str(a), size)
    for w in writes:
        run("qemu-io", "-c", w, str(a))
    shutil.copy(a, b)
    return a, b


@pytest.mark.parametrize("opts", ["cluster_size=65536", "cluster_size=512",
                                  "cluster_size=4096,refcount_bits=1",
                                  "compat=0.10,cluster_size=4096",
                                  "cluster_size=65536,extended_l2=on"])
@pytest.mark.parametrize("new", ["+1G", "100M", "5M", "3149824"])
def test_grow_like_qemu(tmp_path, opts, new):
    a, b = twins(tmp_path, opts, writes=["write -P 0x61 1000k 1500k", "write -z 0 64k"])
    r = cli("resize", str(a), new)
    assert r.returncode == 0 and r.stdout == "Image resized.\n", r.stderr
    run("qemu-img", "resize", "-q", str(b), new)
    assert info(a)["virtual-size"] == info(b)["virtual-size"]
    clean(a)
    run("qemu-img", "compare", str(a), str(b))


@pytest.mark.parametrize("opts", ["cluster_size=65536", "cluster_size=512",
                                  "cluster_size=65536,extended_l2=on"])
def test_shrink_needs_flag_and_then_regrow_reads_zeros(tmp_path, opts):
    a, b = twins(tmp_path, opts, size="8M", writes=["write -P 0x62 0 8M"])
    r = cli("resize", str(a), "-3M")
    assert r.returncode == 1 and "--shrink" in r.stderr
    r = cli("resize", "--shrink", str(a), "-3M")
    assert r.returncode == 0, r.stderr
    run("qemu-img", "resize", "-q", "--shrink", str(b), "-3M")
    assert info(a)["virtual-size"] == 5 << 20
    clean(a)
    run("qemu-img", "compare", str(a), str(b))
    # odd size, then back up: the bytes cut off must not come back
    assert cli("resize", "--shrink", str(a), "4719104").returncode == 0   # 4.5M + 512
    assert cli("resize", str(a), "8M").returncode == 0
    clean(a)
    with qcow2.open(a) as img:
        assert img.pread(4719104, 0) == b"\x62" * 4719104
        assert img.pread(8 * 2**20 - 4719104, 4719104) == bytes(8 * 2**20 - 4719104)


def test_grow_overlay_hides_longer_backing(tmp_path):
    base = tmp_path / "base.raw"
    run("qemu-img", "create", "-q", "-f", "raw", str(base), "8M")
    run("qemu-io", "-f", "raw", "-c", "write -P 0x63 0 8M", str(base))
    a = tmp_path / "o.qcow2"
    run("qemu-img", "create", "-q", "-f", "qcow2", "-b", "base.raw", "-F", "raw", str(a), "2M")
    b = tmp_path / "t.qcow2"
    shutil.copy(a, b)
    assert cli("resize", str(a), "8M").returncode == 0
    run("qemu-img", "resize", "-q", str(b), "8M")
    run("qemu-img", "compare", str(a), str(b))
    with qcow2.open(a) as img:
        assert img.pread(4096, 3 << 20) == bytes(4096)
    clean(a)


def test_snapshots_survive_resize(tmp_path):
    a, _ = twins(tmp_path, size="4M", writes=["write -P 0x64 0 4M"])
    run("qemu-img", "snapshot", "-c", "s1", str(a))
    assert cli("resize", str(a), "1G").returncode == 0
    assert cli("resize", "--shrink", str(a), "2M").returncode == 0
    clean(a)
    out = tmp_path / "s1.raw"
    run("qemu-img", "convert", "-l", "s1", "-O", "raw", str(a), str(out))
    assert out.read_bytes()[:2 << 20] == b"\x64" * (2 << 20)
    assert info(a)["snapshots"][0]["name"] == "s1"


@pytest.mark.parametrize("mode", ["metadata", "falloc", "full"])
def test_grow_with_preallocation(tmp_path, mode):
    a, b = twins(tmp_path, size="1M", writes=["write -P 0x65 0 100k"])
    r = cli("resize", f"--preallocation={mode}", str(a), "64M")
    assert r.returncode == 0, r.stderr
    run("qemu-img", "resize", "-q", f"--preallocation={mode}", str(b), "64M")
    clean(a)
    run("qemu-img", "compare", str(a), str(b))
    mapped = [e for e in json.loads(run("qemu-img", "map", "--output=json", str(a)).stdout)
              if e["start"] >= 1 << 20]
    assert all(e["present"] for e in mapped)
    if mode != "metadata":
        assert os.stat(a).st_blocks * 512 >= 63 << 20


def test_raw_resize(tmp_path):
    p = tmp_path / "r.raw"
    p.write_bytes(b"\x66" * 4096)
    assert cli("resize", "-f", "raw", str(p), "+1M").returncode == 0
    assert os.path.getsize(p) == 4096 + (1 << 20)
    assert cli("resize", "-f", "raw", str(p), "-4096").returncode == 1
    assert cli("resize", "-f", "raw", "--shrink", str(p), "-1M").returncode == 0
    assert p.read_bytes() == b"\x66" * 4096
    assert cli("resize", "-f", "raw", "--preallocation=falloc", str(p), "8M").returncode == 0
    assert os.stat(p).st_blocks * 512 >= 8 << 20


def test_nova_resize_line(tmp_path):
    base = tmp_path / "base.raw"
    run("qemu-img", "create", "-q", "-f", "raw", str(base), "1G")
    disk = tmp_path / "disk"
    run("qemu-img", "create", "-q", "-f", "qcow2", "-o",
        f"backing_file={base},backing_fmt=raw,cluster_size=65536", str(disk))
    r = cli("resize", "-f", "qcow2", str(disk), "21474836480")
    assert r.returncode == 0, r.stderr
    assert info(disk)["virtual-size"] == 21474836480
    clean(disk)


def _reftable_blocks(path):
    """The refcount blocks the table lists: (index, all zero?)."""
    import struct
    data = path.read_bytes()
    cs = 1 << struct.unpack_from(">I", data, 20)[0]
    table_off, table_clusters = struct.unpack_from(">QI", data, 48)
    n = table_clusters * cs // 8
    out = []
    for i, e in enumerate(struct.unpack_from(f">{n}Q", data, table_off)):
        if e:
            blk = data[e: e + cs]
            out.append((i, not any(blk)))
    return out


@pytest.mark.parametrize("prealloc", ["off", "metadata"])
def test_shrink_gives_space_back_like_qemu(tmp_path, prealloc):
    """A shrink drops refcount blocks left counting nothing, punches the freed clusters
    and cuts the file after its last used cluster (qemu-img does all three)."""
    sizes = []
    for who in ("theirs", "ours"):
        p = tmp_path / f"{who}.qcow2"
        run("qemu-img", "create", "-q", "-f", "qcow2", "-o",
            f"cluster_size=512,preallocation={prealloc}", str(p), "64M")
        run("qemu-io", "-c", "write -P 1 0 1M", "-c", "write -P 2 40M 8M",
            "-c", "write -P 3 60M 1M", str(p))
        before = os.stat(p).st_blocks
        r = (run("qemu-img", "resize", "-q", "--shrink", str(p), "2M") if who == "theirs"
             else cli("resize", "-q", "--shrink", str(p), "2M"))
        assert r.returncode == 0, r.stderr
        clean(p)
        assert [i for i, zero in _reftable_blocks(p) if zero] == []
        assert os.stat(p).st_blocks < before
        sizes.append(os.path.getsize(p))
    run("qemu-img", "compare", str(tmp_path / "theirs.qcow2"), str(tmp_path / "ours.qcow2"))
    assert sizes[1] <= sizes[0]


@pytest.mark.parametrize("size", ["0", "-1M", "-2M", "foo", "1.5"])
def test_resize_to_nothing_refused_like_qemu(tmp_path, size):
    for fmt in ("qcow2", "raw"):
        res = []
        for who in ("theirs", "ours"):
            p = tmp_path / f"{who}.{fmt}"
            run("qemu-img", "create", "-q", "-f", fmt, str(p), "1M")
            args = ["resize", "--shrink", "-f", fmt, str(p), "--", size]
            r = run("qemu-img", *args, check=False) if who == "theirs" else cli(*args)
            res.append((r.returncode, r.stdout, r.stderr.split(": ", 1)[1]))
        assert res[1] == res[0] and res[0][0] == 1
        assert info(tmp_path / f"ours.{fmt}")["virtual-size"] == 1 << 20
