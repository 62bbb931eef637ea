"""qemu-img bitmap: the same bitmaps (info), the same measure, the same refusals as
qemu-img, and images that check clean."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import pytest

pytestmark = pytest.mark.skipif(shutil.which("qemu-img") is None, reason="qemu-img not installed")

SCRIPT = shutil.which("qcow2", path=os.path.dirname(sys.executable))


def _ours(tmp_path):
    if SCRIPT is None:
        pytest.skip("the qcow2 console script is not installed")
    link = tmp_path / "bin" / "qemu-img"
    link.parent.mkdir(exist_ok=True)
    if not link.exists():
        link.symlink_to(SCRIPT)
    return str(link)


def _run(prog, *args):
    return subprocess.run([prog, *map(str, args)], capture_output=True, text=True)


def _bitmaps(path):
    r = _run("qemu-img", "info", "--output=json", path)
    return json.loads(r.stdout)["format-specific"]["data"].get("bitmaps")


STEPS = [
    [["--add", "b1"]],
    [["--add", "-g", "512", "b1"], ["--add", "-g", "2M", "b2"]],
    [["--add", "b1"], ["--disable", "b1"], ["--add", "--disable", "b2"]],
    [["--add", "b1"], ["--add", "b2"], ["--remove", "b1"]],
    [["--add", "b1"], ["--clear", "--disable", "b1"], ["--enable", "b1"]],
    [["--add", "b1"], ["--add", "b1"]],
    [["--remove", "nope"]],
    [["--add", "-g", "1000", "b1"]],
    [["-g", "64k", "--remove", "b1"]],
    [["b1"]],
    [["--add"]],
    [["--disable", "--add", "b3"]],
    [["--add", "b1"], ["--remove", "--remove", "b1"]],
]


@pytest.mark.parametrize("steps", STEPS, ids=[" / ".join(" ".join(a) for a in s) for s in STEPS])
def test_bitmap_like_qemu_img(tmp_path, steps):
    ours = _ours(tmp_path)
    results = []
    for who, prog in (("theirs", "qemu-img"), ("ours", ours)):
        img = tmp_path / f"{who}.qcow2"
        subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(img), "64M"], check=True)
        outs = []
        for args in steps:
            *opts, name = args
            operands = [img] if name.startswith("-") else [img, name]
            flags = opts + ([name] if name.startswith("-") else [])
            r = _run(prog, "bitmap", *flags, *operands)
            outs.append((r.returncode, r.stdout, r.stderr.replace(str(img), "IMG")))
        assert _run("qemu-img", "check", img).returncode == 0
        results.append((outs, _bitmaps(img),
                        _run("qemu-img", "measure", "-O", "qcow2", img).stdout))
    assert results[1] == results[0]


def test_bitmaps_survive_and_measure_like_qemu_img(tmp_path):
    """The bitmaps qemu-img measures (190's huge image)."""
    ours = _ours(tmp_path)
    sizes = []
    for who, prog in (("theirs", "qemu-img"), ("ours", ours)):
        img = tmp_path / f"{who}.qcow2"
        subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", "-o", "cluster_size=2M",
                        str(img), "2T"], check=True)
        for args in (["--add", "--granularity", "512"], ["--add", "-g", "2M"]):
            r = _run(prog, "bitmap", *args, "-f", "qcow2", img, f"b{len(args)}{args[-1]}")
            assert r.returncode == 0, r.stderr
        sizes.append((os.path.getsize(img),
                      _run("qemu-img", "measure", "-O", "qcow2", "-o", "cluster_size=64k",
                           "-f", "qcow2", img).stdout))
    assert sizes[1] == sizes[0]


def test_bitmap_data_kept_like_qemu_img(tmp_path):
    """Bitmaps with data (written by QEMU as qemu-io dirties them) survive our bitmap
    operations, laid out as qemu-img lays them out (303)."""
    ours = _ours(tmp_path)
    dumps = []
    for who, prog in (("theirs", "qemu-img"), ("ours", ours)):
        img = tmp_path / f"{who}.qcow2"
        subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(img), "10M"], check=True)
        for num, (begin, end, extra) in enumerate(((0, 6, []), (6, 8, ["--disable"])), 1):
            r = _run(prog, "bitmap", "--add", "-g", str(1 << (14 + num)), "-f", "qcow2", img,
                     f"bitmap-{num}", *extra)
            assert r.returncode == 0, r.stderr
            for i in range(begin, end):
                subprocess.run(["qemu-io", "-c", f"write {i}M 1M", str(img)], check=True,
                               capture_output=True)
        r = _run(ours if who == "ours" else "qemu-img", "bitmap", "--clear", "-f", "qcow2",
                 img, "bitmap-2")
        assert r.returncode == 0, r.stderr
        assert _run("qemu-img", "check", img).returncode == 0
        dumps.append((_bitmaps(img), os.path.getsize(img)))
    assert dumps[1] == dumps[0]


def _bitmap_data(path):
    """{name: the bitmap's serialized bytes} read from the file (the spec's layout)."""
    import struct
    data = path.read_bytes()
    cs = 1 << struct.unpack_from(">I", data, 20)[0]
    size = struct.unpack_from(">Q", data, 24)[0]
    hdr_len = struct.unpack_from(">I", data, 100)[0]
    pos, out = hdr_len, {}
    while True:
        magic, length = struct.unpack_from(">II", data, pos)
        if magic == 0:
            return out
        if magic == 0x23852875:
            nb, _r, _dsize, doff = struct.unpack_from(">IIQQ", data, pos + 8)
            p = doff
            for _ in range(nb):
                toff, tsize, _flags, _t, gbits, nsize, esize = struct.unpack_from(
                    ">QIIBBHI", data, p)
                name = data[p + 24:p + 24 + nsize].decode()
                bits = (size + (1 << gbits) - 1) >> gbits
                total = (bits + 7) // 8
                blob = b""
                for e in struct.unpack_from(f">{tsize}Q", data, toff):
                    off = e & 0x00FFFFFFFFFFFE00
                    blob += data[off:off + cs] if off else (b"\xff" if e & 1 else b"\0") * cs
                out[name] = blob[:total].ljust(total, b"\0")
                p += (24 + nsize + esize + 7) // 8 * 8
        pos += 8 + (length + 7) // 8 * 8


@pytest.mark.parametrize("opts", [[], ["-o", "cluster_size=4k"], ["-c"]])
def test_convert_bitmaps_like_qemu_img(tmp_path, opts):
    ours = _ours(tmp_path)
    src = tmp_path / "src.qcow2"
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(src), "10M"], check=True)
    for args in (["--add", "-g", "32k", "b1"], ["--add", "-g", "64k", "--disable", "b2"]):
        subprocess.run(["qemu-img", "bitmap", *args[:-1], str(src), args[-1]], check=True)
        subprocess.run(["qemu-io", "-c", "write 1M 3M", "-c", "write 7M 64k", str(src)],
                       check=True, capture_output=True)
    got = []
    for prog, name in (("qemu-img", "theirs.qcow2"), (ours, "mine.qcow2")):
        out = tmp_path / name
        r = _run(prog, "convert", "--bitmaps", "-O", "qcow2", *opts, src, out)
        assert r.returncode == 0, r.stderr
        assert _run("qemu-img", "check", out).returncode == 0
        got.append((_bitmaps(out), _bitmap_data(out)))
    assert got[1] == got[0]
    assert got[0][1] == _bitmap_data(src) and any(any(v) for v in got[0][1].values())


@pytest.mark.parametrize("args", [
    ["-O", "raw", "SRC", "OUT"], ["-O", "qcow2", "SRC", "SRC", "OUT"],
    ["-O", "qcow2", "RAW", "OUT"], ["-O", "qcow2", "-o", "compat=0.10", "SRC", "OUT"],
])
def test_convert_bitmaps_refusals_like_qemu_img(tmp_path, args):
    ours = _ours(tmp_path)
    src, raw = tmp_path / "s.qcow2", tmp_path / "r.raw"
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(src), "1M"], check=True)
    subprocess.run(["qemu-img", "create", "-q", "-f", "raw", str(raw), "1M"], check=True)
    subprocess.run(["qemu-img", "bitmap", "--add", str(src), "b"], check=True)
    res = []
    for prog in ("qemu-img", ours):
        a = [str(src) if x == "SRC" else str(raw) if x == "RAW" else
             str(tmp_path / "o") if x == "OUT" else x for x in args]
        r = _run(prog, "convert", "--bitmaps", *a)
        res.append((r.returncode, r.stderr))
    assert res[1] == res[0] and res[0][0] == 1


def _bits(path):
    """{bitmap name: (granularity bits, set granules)} read through our engine."""
    import qcow2
    from qcow2.reshape import bitmap_data, read_bitmaps
    with qcow2.open(str(path)) as img:
        out = {}
        for b in read_bitmaps(img):
            d = bitmap_data(b, img.size)
            out[b.name] = (b.granularity_bits,
                           [i for i in range(len(d) * 8) if d[i // 8] >> (i % 8) & 1])
        return out


def test_merge_like_qemu_img(tmp_path):
    """--merge (same image, other granularities, another image with -b) sets the bits
    qemu-img sets; the image checks clean."""
    if shutil.which("qemu-io") is None:
        pytest.skip("qemu-io not installed")
    ours = _ours(tmp_path)
    a = tmp_path / "a.qcow2"
    _run("qemu-img", "create", "-q", "-f", "qcow2", a, "64M")
    _run("qemu-img", "bitmap", "--add", a, "b1")
    _run("qemu-io", "-c", "write 0 64k", "-c", "write 10M 1M", a)
    _run("qemu-img", "bitmap", "--add", "-g", "128k", a, "b2")
    _run("qemu-io", "-c", "write 20M 64k", "-c", "write 40M 512", a)
    _run("qemu-img", "bitmap", "--add", a, "b3")
    _run("qemu-img", "bitmap", "--disable", a, "b1")
    _run("qemu-io", "-c", "write 50M 64k", a)
    src = tmp_path / "s.qcow2"
    shutil.copy(a, src)
    results = []
    for prog in ("qemu-img", ours):
        img = tmp_path / f"{os.path.basename(prog)}-{len(results)}.qcow2"
        shutil.copy(a, img)
        for args in (["--merge", "b1", img, "b3"], ["--merge", "b3", img, "b2"],
                     ["--merge", "b2", "-b", src, "-F", "qcow2", img, "b1"]):
            r = _run(prog, "bitmap", *args)
            assert r.returncode == 0, r.stderr
        assert _run("qemu-img", "check", img).returncode == 0
        results.append(_bits(img))
    assert results[0] == results[1]
    assert results[0] != _bits(a)
    for args in (["--merge", "nope", a, "b1"], ["-b", src, "--add", a, "x"],
                 ["-F", "qcow2", "--merge", "b1", a, "b2"]):
        theirs, mine = _run("qemu-img", "bitmap", *args), _run(ours, "bitmap", *args)
        assert (mine.returncode, mine.stderr) == (theirs.returncode, theirs.stderr)
