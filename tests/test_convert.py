"""convert (read side): byte-identical sparse raw output, and nothing left behind on failure."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time

import pytest

import qcow2
from qcow2.errors import CorruptImageError, Qcow2Error

pytestmark = pytest.mark.skipif(shutil.which("qemu-img") is None, reason="qemu-img not installed")


def run(*args):
    subprocess.run(args, check=True, capture_output=True)


def cli(*args, cwd=None):
    return subprocess.run([sys.executable, "-m", "qcow2", *args], capture_output=True,
                          text=True, cwd=cwd)


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    d = tmp_path_factory.mktemp("conv")
    raw = d / "src.raw"
    with open(raw, "wb") as f:
        f.truncate(48 << 20)
        for i, off in enumerate(range(0, 48 << 20, 3 << 20)):
            f.seek(off + 4096 * i)
            f.write((b"block %d " % i) * 20000)
            f.seek(off + (1 << 20))
            f.write(os.urandom(300000))
            f.seek(off + (2 << 20))
            f.write(bytes(65536))               # explicit zeros: must become a hole
    out = {"raw": raw}
    for name, opts in (("plain", []), ("zlib", ["-c"]),
                       ("zstd", ["-c", "-o", "compression_type=zstd"])):
        p = d / f"{name}.qcow2"
        run("qemu-img", "convert", "-O", "qcow2", *opts, str(raw), str(p))
        out[name] = p
    return out


def leftovers(d):
    return sorted(n for n in os.listdir(d) if n.endswith(".part"))


@pytest.mark.parametrize("kind", ["plain", "zlib", "zstd", "raw"])
@pytest.mark.parametrize("workers", [1, 2])
def test_convert_matches_qemu(images, tmp_path, kind, workers):
    src = images[kind]
    ours, theirs = tmp_path / "ours.raw", tmp_path / "theirs.raw"
    qcow2.convert(src, ours, workers=workers)
    run("qemu-img", "convert", "-O", "raw", str(src), str(theirs))
    assert ours.read_bytes() == theirs.read_bytes()
    assert os.stat(ours).st_blocks <= os.stat(theirs).st_blocks + 8
    assert leftovers(tmp_path) == []


def test_zero_blocks_become_holes(images, tmp_path):
    ours = tmp_path / "o.raw"
    qcow2.convert(images["plain"], ours)
    st = os.stat(ours)
    assert st.st_blocks * 512 < st.st_size // 2
    full = tmp_path / "full.raw"
    qcow2.convert(images["plain"], full, sparse_size=0)
    assert full.read_bytes() == ours.read_bytes()
    assert os.stat(full).st_blocks >= st.st_blocks


def test_nova_convert_line(images, tmp_path):
    r = cli("convert", "-t", "none", "-O", "raw", "-f", "qcow2", str(images["zlib"]),
            str(tmp_path / "base.raw"))
    assert r.returncode == 0, r.stderr
    assert (tmp_path / "base.raw").read_bytes() == images["raw"].read_bytes()


def test_progress_callback(images, tmp_path):
    seen = []
    qcow2.convert(images["zstd"], tmp_path / "p.raw", progress=seen.append)
    assert seen[0] == 0.0 and seen[-1] == 100.0
    assert seen == sorted(seen)


def test_failure_leaves_nothing(images, tmp_path):
    bad = tmp_path / "bad.qcow2"
    data = bytearray(images["zlib"].read_bytes())
    # wreck every compressed cluster's bytes after the metadata
    data[1 << 20:] = b"\xff" * (len(data) - (1 << 20))
    bad.write_bytes(bytes(data))
    dst = tmp_path / "dst.raw"
    with pytest.raises(CorruptImageError):
        qcow2.convert(bad, dst)
    assert not dst.exists()
    assert leftovers(tmp_path) == []
    r = cli("convert", "-O", "raw", str(bad), str(dst))
    assert r.returncode == 1
    assert len(r.stderr.strip().splitlines()) == 1 and "Traceback" not in r.stderr
    assert not dst.exists() and leftovers(tmp_path) == []


def test_failure_keeps_existing_destination(images, tmp_path):
    dst = tmp_path / "dst.raw"
    dst.write_bytes(b"precious")
    with pytest.raises(Qcow2Error):
        qcow2.convert(tmp_path / "missing.qcow2", dst)
    assert dst.read_bytes() == b"precious"


def test_killed_convert_leaves_nothing(images, tmp_path):
    """SIGKILL in the middle: the destination never appears, no temporary name remains."""
    dst = tmp_path / "k.raw"
    slow = ("import qcow2, time\n"
            "from qcow2.ops import sparse_write as c\n"
            "orig = c.pwrite_all\n"
            "def slow(*a):\n"
            "    time.sleep(0.05)\n"
            "    orig(*a)\n"
            "c.pwrite_all = slow\n"
            f"qcow2.convert({str(images['zlib'])!r}, {str(dst)!r}, workers=1)\n")
    p = subprocess.Popen([sys.executable, "-c", slow])
    time.sleep(1.5)
    p.send_signal(signal.SIGKILL)
    p.wait()
    assert not dst.exists()
    assert leftovers(tmp_path) == []


# ---------------------------------------------------------------------------
# qcow2 output
# ---------------------------------------------------------------------------

def check_clean(path):
    r = subprocess.run(["qemu-img", "check", "--output=json", str(path)], capture_output=True,
                       text=True)
    assert r.returncode == 0, r.stdout + r.stderr
    info = json.loads(r.stdout)
    assert info.get("leaks", 0) == 0 and info.get("corruptions", 0) == 0


def same(a, b, *extra):
    r = subprocess.run(["qemu-img", "compare", *extra, str(a), str(b)], capture_output=True,
                       text=True)
    assert r.returncode == 0, r.stdout + r.stderr


@pytest.mark.parametrize("opts,compress", [
    ({}, False),
    ({"cluster_size": "4k"}, False),
    ({"cluster_size": "2M"}, False),
    ({"compat": "0.10", "cluster_size": "512"}, False),
    ({"extended_l2": "on", "cluster_size": "128k"}, False),
    ({}, True),
    ({"compression_type": "zstd"}, True),
    ({"compression_type": "zstd", "cluster_size": "16k", "refcount_bits": "1"}, True),
])
@pytest.mark.parametrize("kind", ["raw", "zlib"])
def test_convert_to_qcow2_round_trip(images, tmp_path, opts, compress, kind):
    out = tmp_path / "out.qcow2"
    qcow2.convert(images[kind], out, out_format="qcow2", compress=compress, options=opts)
    check_clean(out)
    same(images["raw"], out)
    back = tmp_path / "back.raw"
    qcow2.convert(out, back)
    assert back.read_bytes() == images["raw"].read_bytes()
    info = json.loads(subprocess.run(["qemu-img", "info", "--output=json", str(out)],
                                     capture_output=True, text=True).stdout)
    want_cs = parse(opts.get("cluster_size", "64k"))
    assert info["cluster-size"] == want_cs
    data = info["format-specific"]["data"]
    assert data["compression-type"] == opts.get("compression_type", "zlib")
    if compress:
        plain = tmp_path / "plain.qcow2"
        qcow2.convert(images[kind], plain, out_format="qcow2", options=opts)
        assert os.path.getsize(out) < os.path.getsize(plain)
    assert leftovers(tmp_path) == []


def parse(text):
    from qcow2.units import parse_size
    return parse_size(text)


def test_convert_cli_compressed_zstd_like_qemu(images, tmp_path):
    ours, theirs = tmp_path / "o.qcow2", tmp_path / "t.qcow2"
    r = cli("convert", "-c", "-O", "qcow2", "-o", "compression_type=zstd", str(images["raw"]),
            str(ours))
    assert r.returncode == 0, r.stderr
    run("qemu-img", "convert", "-c", "-O", "qcow2", "-o", "compression_type=zstd",
        str(images["raw"]), str(theirs))
    check_clean(ours)
    same(ours, theirs)
    # same order of magnitude as qemu-img's own compressed image
    assert os.path.getsize(ours) < 1.5 * os.path.getsize(theirs) + 65536


def test_convert_with_backing_B(tmp_path, images):
    base = tmp_path / "base.qcow2"
    run("qemu-img", "convert", "-O", "qcow2", str(images["raw"]), str(base))
    top = tmp_path / "top.qcow2"
    run("qemu-img", "create", "-q", "-f", "qcow2", "-b", "base.qcow2", "-F", "qcow2", str(top))
    run("qemu-io", "-c", "write -P 0x44 100k 300k", "-c", "write -z 5M 128k",
        "-c", "write -P 0x45 47M 1M", str(top))
    out = tmp_path / "out.qcow2"
    r = cli("convert", "-O", "qcow2", "-B", "base.qcow2", "-F", "qcow2", str(top), str(out))
    assert r.returncode == 0, r.stderr
    check_clean(out)
    same(top, out)
    info = json.loads(subprocess.run(["qemu-img", "info", "--output=json", str(out)],
                                     capture_output=True, text=True).stdout)
    assert info["backing-filename"] == "base.qcow2"
    # only the top layer's data was written: far smaller than the whole disk
    assert info["actual-size"] < 4 << 20


def test_convert_no_create_and_target_is_zero(images, tmp_path):
    tgt = tmp_path / "t.qcow2"
    run("qemu-img", "create", "-q", "-f", "qcow2", str(tgt), str(48 << 20))
    run("qemu-io", "-c", "write -P 0x77 0 48M", str(tgt))     # garbage to be overwritten
    r = cli("convert", "-n", "-O", "qcow2", str(images["zstd"]), str(tgt))
    assert r.returncode == 0, r.stderr
    check_clean(tgt)
    same(images["raw"], tgt)
    raw_tgt = tmp_path / "t.raw"
    raw_tgt.write_bytes(b"\x55" * (48 << 20))
    r = cli("convert", "-n", "-O", "raw", str(images["plain"]), str(raw_tgt))
    assert r.returncode == 0, r.stderr
    assert raw_tgt.read_bytes() == images["raw"].read_bytes()
    fresh = tmp_path / "z.raw"
    fresh.write_bytes(b"")
    os.truncate(fresh, 48 << 20)
    r = cli("convert", "-n", "--target-is-zero", "-O", "raw", str(images["plain"]), str(fresh))
    assert r.returncode == 0, r.stderr
    assert fresh.read_bytes() == images["raw"].read_bytes()
    r = cli("convert", "--target-is-zero", "-O", "raw", str(images["plain"]), str(fresh))
    assert r.returncode == 1 and "-n" in r.stderr


def test_convert_concatenates_sources(images, tmp_path):
    a = tmp_path / "a.qcow2"
    run("qemu-img", "create", "-q", "-f", "qcow2", str(a), "3M")
    run("qemu-io", "-c", "write -P 0x11 1M 1536k", str(a))
    for fmt in ("raw", "qcow2"):
        ours, theirs = tmp_path / f"o.{fmt}", tmp_path / f"t.{fmt}"
        r = cli("convert", "-O", fmt, str(a), str(images["zlib"]), str(a), str(ours))
        assert r.returncode == 0, r.stderr
        run("qemu-img", "convert", "-O", fmt, str(a), str(images["zlib"]), str(a), str(theirs))
        same(ours, theirs)
        if fmt == "qcow2":
            check_clean(ours)


@pytest.mark.parametrize("flag", [[], ["-W"]])
def test_convert_in_order_unless_W(images, tmp_path, flag):
    out = tmp_path / "o.qcow2"
    r = cli("convert", "-m", "4", *flag, "-O", "qcow2", str(images["raw"]), str(out))
    assert r.returncode == 0, r.stderr
    check_clean(out)
    same(images["raw"], out)
    if not flag:
        m = json.loads(subprocess.run(["qemu-img", "map", "--output=json", str(out)],
                                      capture_output=True, text=True).stdout)
        offs = [e["offset"] for e in m if e.get("data") and "offset" in e]
        assert offs == sorted(offs)          # host layout follows the guest order


@pytest.mark.parametrize("extra", [[], ["-S", "0"], ["-c"], ["-c", "-S", "0"], ["-m", "1"]])
def test_convert_to_qcow2_reused_buffers(images, tmp_path, extra):
    """Window buffers are reused: stale bytes of an earlier window never reach the
    output, whether zero ranges are skipped (default -S) or written (-S 0, -n)."""
    fresh = tmp_path / "f.qcow2"
    r = cli("convert", "-O", "qcow2", *extra, str(images["raw"]), str(fresh))
    assert r.returncode == 0, r.stderr
    check_clean(fresh)
    same(images["raw"], fresh)
    if "-c" in extra:
        return
    tgt = tmp_path / "t.qcow2"
    run("qemu-img", "create", "-q", "-f", "qcow2", str(tgt), str(48 << 20))
    run("qemu-io", "-c", "write -P 0x77 0 48M", str(tgt))     # garbage to be overwritten
    r = cli("convert", "-n", "-O", "qcow2", *extra, str(images["zstd"]), str(tgt))
    assert r.returncode == 0, r.stderr
    check_clean(tgt)
    same(images["raw"], tgt)


@pytest.mark.parametrize("compress", [False, True])
def test_convert_B_writes_only_what_differs(tmp_path, compress):
    """-B BACKING: the output holds only the clusters that do not read the same through
    its new backing file (qemu-img writes every cluster of a source that does not
    share that backing chain)."""
    base = tmp_path / "base.qcow2"
    run("qemu-img", "create", "-q", "-f", "qcow2", str(base), "8M")
    run("qemu-io", "-c", "write -P 0x11 0 4M", "-c", "write -P 0x12 6M 1M", str(base))
    src = tmp_path / "flat.raw"
    run("qemu-img", "convert", "-O", "raw", str(base), str(src))
    run("qemu-io", "-f", "raw", "-c", "write -P 0x33 1M 64k", "-c", "write -z 2M 128k",
        "-c", "write -P 0x44 7M 64k", str(src))
    out = tmp_path / "out.qcow2"
    r = cli("convert", "-O", "qcow2", *(["-c"] if compress else []), "-B", "base.qcow2",
            "-F", "qcow2", str(src), str(out))
    assert r.returncode == 0, r.stderr
    check_clean(out)
    assert subprocess.run(["qemu-img", "compare", str(src), str(out)]).returncode == 0
    m = json.loads(subprocess.run(["qemu-img", "map", "--output=json", str(out)],
                                  capture_output=True, text=True).stdout)
    top = [(e["start"], e["length"]) for e in m if e["depth"] == 0]
    assert top == [(1 << 20, 65536), (2 << 20, 131072), (7 << 20, 65536)]


def test_convert_errors_name_the_destination(tmp_path, images):
    """Never our temporary name: the file the user asked for."""
    dst = tmp_path / "nodir" / "x.qcow2"
    r = cli("convert", "-O", "qcow2", str(images["raw"]), str(dst))
    assert r.returncode == 1
    assert r.stderr == f"qcow2: Could not create '{dst}': No such file or directory\n"
