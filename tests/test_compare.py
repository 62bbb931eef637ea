"""compare: exit status and text of ``qemu-img compare`` (7.2), the oracle, on many pairs.

The images hold the same guest data in different shapes (raw, qcow2 with 512 B / 64 KiB
/ 2 MiB clusters, compressed, extended L2, compat 0.10, a raw <- qcow2 chain, explicit
zero clusters, zero-filled data clusters, metadata preallocation) and variants that
differ in one byte at chosen offsets (first sector, sector and cluster edges, inside
data, inside a hole, across an 8 MiB read chunk, the last byte), or in size (a zero
tail, a zero-written tail, a tail with data, odd raw sizes).  Each pair runs through
``qemu-img compare`` and our CLI (in process), with and without ``-s``: same exit
status, same stdout.
"""

from __future__ import annotations

import io
import os
import shutil
import subprocess
from contextlib import redirect_stderr, redirect_stdout

import pytest

import qcow2
from qcow2.cli import main as cli_main
from qcow2.errors import Qcow2Error

QEMU_IMG = shutil.which("qemu-img")
QEMU_IO = shutil.which("qemu-io")
pytestmark = pytest.mark.skipif(QEMU_IMG is None or QEMU_IO is None,
                                reason="qemu-img/qemu-io not installed: they are the oracles")

KiB, MiB, GiB = 1 << 10, 1 << 20, 1 << 30
SIZE = 24 * MiB
REGIONS = [(0, 300 * KiB, 1), (MiB + 4 * KiB, 64 * KiB, 2), (5 * MiB, 4 * MiB, 3),
           (16 * MiB - 100, 300, 4), (SIZE - 64 * KiB, 64 * KiB, 5)]
POKES = [0, 511, 512, 65535, MiB + 4 * KiB + 100, 8 * MiB + 5, 12 * MiB + 777, 16 * MiB,
         SIZE - 1]


def run(*args, check=True):
    proc = subprocess.run([str(a) for a in args], capture_output=True, text=True)
    if check and proc.returncode:
        raise AssertionError(f"{' '.join(map(str, args))}: {proc.stderr.strip()}")
    return proc


def qio(path, *cmds, fmt="qcow2"):
    args = [QEMU_IO, "-f", fmt]
    for c in cmds:
        args += ["-c", c]
    run(*args, path)


def writes(regions):
    return [f"write -P {p} {o} {n}" for o, n, p in regions]


def poke_raw(path, offset, value=0x5A):
    with open(path, "r+b") as f:
        f.seek(offset)
        f.write(bytes([value]))


def ours(*args):
    """Our CLI in process: (exit status, stdout, stderr)."""
    out, err = io.StringIO(), io.StringIO()
    with redirect_stdout(out), redirect_stderr(err):
        rc = cli_main(["compare", *map(str, args)])
    return rc, out.getvalue(), err.getvalue()


def assert_like_qemu(*args):
    want = run(QEMU_IMG, "compare", *args, check=False)
    rc, out, err = ours(*args)
    assert (rc, out) == (want.returncode, want.stdout), (args, err, want.stderr)
    return rc, out


@pytest.fixture(scope="module")
def imgs(tmp_path_factory):
    d = tmp_path_factory.mktemp("compare")
    p = {}

    def path(name):
        p[name] = d / name
        return p[name]

    full = path("full.qcow2")
    run(QEMU_IMG, "create", "-f", "qcow2", full, SIZE)
    qio(full, *writes(REGIONS))
    run(QEMU_IMG, "convert", "-O", "raw", full, path("full.raw"))
    for name, opts in (("c512.qcow2", "cluster_size=512"), ("c2m.qcow2", "cluster_size=2M"),
                       ("ext.qcow2", "extended_l2=on,cluster_size=64k"),
                       ("v2.qcow2", "compat=0.10,cluster_size=4k")):
        run(QEMU_IMG, "convert", "-O", "qcow2", "-o", opts, p["full.raw"], path(name))
    run(QEMU_IMG, "convert", "-c", "-O", "qcow2", "-o", "cluster_size=16k", p["full.raw"],
        path("comp.qcow2"))
    shutil.copy(full, path("copy.qcow2"))
    shutil.copy(p["full.raw"], path("copy.raw"))

    lower = path("lower.raw")                        # chain: raw base + qcow2 overlay
    run(QEMU_IMG, "create", "-f", "raw", lower, SIZE)
    qio(lower, *writes([REGIONS[0], REGIONS[2], (12 * MiB, MiB, 7)]), fmt="raw")
    top = path("top.qcow2")
    run(QEMU_IMG, "create", "-f", "qcow2", "-b", "lower.raw", "-F", "raw", top, SIZE)
    qio(top, *writes([REGIONS[1], REGIONS[3], REGIONS[4]]), f"write -z {12 * MiB} {MiB}")

    shutil.copy(full, path("zeroclusters.qcow2"))   # same data, other allocation
    qio(p["zeroclusters.qcow2"], f"write -z {10 * MiB} {MiB}")
    shutil.copy(full, path("zerodata.qcow2"))
    qio(p["zerodata.qcow2"], f"write -P 0 {10 * MiB} {MiB}")
    meta = path("meta.qcow2")
    run(QEMU_IMG, "create", "-f", "qcow2", "-o", "preallocation=metadata", meta, SIZE)
    qio(meta, *writes(REGIONS))

    for off in POKES:                                # one differing byte
        shutil.copy(p["full.raw"], path(f"poke{off}.raw"))
        poke_raw(p[f"poke{off}.raw"], off)
        shutil.copy(full, path(f"poke{off}.qcow2"))
        qio(p[f"poke{off}.qcow2"], f"write -P 0x5a {off} 1")
    shutil.copy(p["full.raw"], path("two.raw"))      # two differences: the first counts
    poke_raw(p["two.raw"], 12 * MiB + 777)
    poke_raw(p["two.raw"], 5 * MiB + 10, 0)

    # sizes differ
    shutil.copy(full, path("bigzero.qcow2"))
    run(QEMU_IMG, "resize", p["bigzero.qcow2"], 32 * MiB)
    shutil.copy(p["full.raw"], path("bigzero.raw"))
    os.truncate(p["bigzero.raw"], 32 * MiB + 1000)
    shutil.copy(p["bigzero.qcow2"], path("bigzerow.qcow2"))
    qio(p["bigzerow.qcow2"], f"write -z {26 * MiB} {2 * MiB}")
    shutil.copy(p["bigzero.qcow2"], path("bigdata.qcow2"))
    qio(p["bigdata.qcow2"], f"write -P 9 {30 * MiB + 1000} 1")
    shutil.copy(p["bigzero.raw"], path("bigdata.raw"))
    poke_raw(p["bigdata.raw"], 32 * MiB + 999)
    small = path("small.qcow2")                      # the bigger one has data in its tail
    run(QEMU_IMG, "create", "-f", "qcow2", small, 20 * MiB)
    qio(small, *writes(REGIONS[:4]))

    data = os.urandom(1000)                          # odd raw sizes (rounded to sectors)
    path("o1000.raw").write_bytes(data)
    path("o1024.raw").write_bytes(data + bytes(24))
    path("o1024x.raw").write_bytes(data + bytes(10) + b"\x01" + bytes(13))
    run(QEMU_IMG, "convert", "-O", "qcow2", p["o1000.raw"], path("o1000.qcow2"))
    return p


IDENTICAL = [
    ("full.qcow2", "full.raw"), ("full.raw", "full.qcow2"), ("full.qcow2", "copy.qcow2"),
    ("full.raw", "copy.raw"), ("full.qcow2", "c512.qcow2"), ("c2m.qcow2", "full.qcow2"),
    ("c512.qcow2", "c2m.qcow2"), ("comp.qcow2", "full.raw"), ("comp.qcow2", "c2m.qcow2"),
    ("ext.qcow2", "full.qcow2"), ("v2.qcow2", "full.raw"), ("top.qcow2", "full.raw"),
    ("full.qcow2", "top.qcow2"), ("zeroclusters.qcow2", "full.qcow2"),
    ("zerodata.qcow2", "full.qcow2"), ("zerodata.qcow2", "zeroclusters.qcow2"),
    ("meta.qcow2", "full.qcow2"), ("meta.qcow2", "full.raw"), ("o1000.raw", "o1024.raw"),
]


@pytest.mark.parametrize("strict", [False, True], ids=["plain", "strict"])
@pytest.mark.parametrize("a,b", IDENTICAL)
def test_same_data(imgs, a, b, strict):
    args = (["-s"] if strict else []) + [imgs[a], imgs[b]]
    rc, _out = assert_like_qemu(*args)
    if not strict:
        assert rc == 0


@pytest.mark.parametrize("off", POKES)
def test_one_byte_differs(imgs, off):
    for a, b in ((f"poke{off}.raw", "full.qcow2"), (f"poke{off}.qcow2", "full.raw"),
                 ("comp.qcow2", f"poke{off}.qcow2"), (f"poke{off}.raw", "top.qcow2"),
                 ("c512.qcow2", f"poke{off}.raw"), (f"poke{off}.qcow2", "zeroclusters.qcow2"),
                 (f"poke{off}.raw", "copy.raw")):
        rc, out = assert_like_qemu(imgs[a], imgs[b])
        assert rc == 1 and out.startswith("Content mismatch")
        assert_like_qemu("-s", imgs[a], imgs[b])
    got = qcow2.compare(imgs[f"poke{off}.raw"], imgs["full.qcow2"])
    assert got and got.offset == off - off % 512 and got.reason == "content"


def test_first_of_two_differences(imgs):
    assert_like_qemu(imgs["two.raw"], imgs["full.qcow2"])
    assert qcow2.compare(imgs["full.raw"], imgs["two.raw"]).offset == 5 * MiB + 10 - 10


@pytest.mark.parametrize("a,b", [
    ("bigzero.qcow2", "full.qcow2"), ("full.raw", "bigzero.qcow2"), ("bigzero.raw", "full.raw"),
    ("full.qcow2", "bigzerow.qcow2"), ("bigdata.qcow2", "full.raw"), ("full.qcow2", "bigdata.raw"),
    ("small.qcow2", "full.raw"), ("full.qcow2", "small.qcow2"), ("poke512.raw", "bigdata.qcow2"),
    ("o1000.raw", "o1024x.raw"), ("o1024x.raw", "o1000.raw"), ("o1000.qcow2", "o1024x.raw"),
    ("bigzero.raw", "bigdata.raw"),
])
@pytest.mark.parametrize("strict", [False, True], ids=["plain", "strict"])
def test_sizes_differ(imgs, a, b, strict):
    assert_like_qemu(*(["-s"] if strict else []), imgs[a], imgs[b])


def test_library_api(imgs):
    assert qcow2.compare(imgs["full.qcow2"], imgs["full.raw"]) is None
    assert qcow2.compare(imgs["bigzero.qcow2"], imgs["full.raw"]) is None
    assert qcow2.compare(imgs["bigdata.qcow2"], imgs["full.raw"]).offset == 30 * MiB + 512
    got = qcow2.compare(imgs["bigzero.qcow2"], imgs["full.raw"], strict=True)
    assert got.offset == SIZE and got.reason in ("size", "block status")
    assert qcow2.compare(imgs["full.raw"], imgs["full.qcow2"], fmt_a="raw", fmt_b="qcow2",
                         workers=1) is None
    # a qcow2 file read as raw is a different disk
    got = qcow2.compare(imgs["full.qcow2"], imgs["full.raw"], fmt_a="raw")
    assert got.offset == 0
    assert got, "a difference at offset 0 must not read as identical"
    seen = []
    assert qcow2.compare(imgs["comp.qcow2"], imgs["full.raw"], progress=seen.append) is None
    assert seen[0] == 0.0 and seen[-1] == 100.0 and seen == sorted(seen)


def test_quiet_and_progress(imgs):
    rc, out, _ = ours("-q", imgs["poke0.raw"], imgs["full.raw"])
    assert (rc, out) == (1, "")
    rc, out, _ = ours("-p", imgs["full.qcow2"], imgs["full.raw"])
    assert rc == 0 and out.endswith("Images are identical.\n") and "(100.00/100%)" in out


def test_errors(imgs, tmp_path):
    rc, out, err = ours(imgs["full.raw"], tmp_path / "missing.qcow2")
    assert (rc, out) == (2, "") and "Could not open" in err
    want = run(QEMU_IMG, "compare", imgs["full.raw"], tmp_path / "missing.qcow2", check=False)
    assert want.returncode == 2
    rc, out, err = ours("-T", "bogus", imgs["full.raw"], imgs["full.raw"])
    assert rc == 2 and "Invalid source cache option: bogus" in err
    rc, _out, _err = ours(imgs["full.raw"])
    assert rc == 1                                   # usage error, as qemu-img's error_exit
    with pytest.raises(Qcow2Error) as info:
        qcow2.compare(imgs["full.raw"], tmp_path / "missing.qcow2")
    assert info.value.exit_code == 2

    bad = tmp_path / "bad.qcow2"                     # a corrupt L2 entry: read error, 4
    shutil.copy(imgs["comp.qcow2"], bad)
    img = qcow2.open(bad)
    l2_off = img._l1_table()[0] & 0x00FFFFFFFFFFFE00
    img.close()
    with open(bad, "r+b") as f:                      # compressed entry pointing past EOF
        f.seek(l2_off)
        f.write((0x4000_0000_0000_0000 | (1 << 40)).to_bytes(8, "big"))
    rc, out, err = ours(bad, imgs["full.raw"])
    assert rc == 4 and out == "" and err.count("\n") == 1
    assert run(QEMU_IMG, "compare", bad, imgs["full.raw"], check=False).returncode == 4

    badl1 = tmp_path / "badl1.qcow2"                 # unaligned L2 offset: no allocation map, 3
    shutil.copy(imgs["full.qcow2"], badl1)
    img = qcow2.open(badl1)
    l1_off, l1_0 = img._l1_offset, img._l1_table()[0]
    img.close()
    with open(badl1, "r+b") as f:
        f.seek(l1_off)
        f.write((l1_0 + 0x200).to_bytes(8, "big"))
    for args in ([badl1, imgs["full.raw"]], ["-s", badl1, imgs["full.raw"]]):
        rc, out, err = ours(*args)
        assert (rc, out) == (3, "") and err.count("\n") == 1
        assert run(QEMU_IMG, "compare", *args, check=False).returncode == 3


def test_big_sparse_images(tmp_path):
    """8 GiB with 2 MiB clusters: QEMU's block-status answers are cut at INT_MAX bytes."""
    a, b, r = tmp_path / "a.qcow2", tmp_path / "b.qcow2", tmp_path / "r.raw"
    run(QEMU_IMG, "create", "-f", "qcow2", "-o", "cluster_size=2M", a, 8 * GiB)
    qio(a, f"write -P 1 {3 * GiB} {3 * MiB}", f"write -P 2 {8 * GiB - MiB} {MiB}")
    run(QEMU_IMG, "create", "-f", "qcow2", "-o", "cluster_size=64k", b, 8 * GiB)
    qio(b, f"write -P 1 {3 * GiB} {3 * MiB}", f"write -P 2 {8 * GiB - MiB} {MiB}")
    run(QEMU_IMG, "convert", "-O", "raw", a, r)
    for x, y in ((a, b), (a, r), (b, r), (a, a)):
        assert_like_qemu(x, y)
        assert_like_qemu("-s", x, y)
    qio(b, f"write -P 3 {7 * GiB + 12345} 1")
    assert_like_qemu(a, b)
    assert_like_qemu("-s", a, a)


def _random_image(path, rng, size, cmds, fmt=None, cluster_size=None):
    """An image of ``size`` shaped at random (format, cluster size, extended L2) with
    ``cmds`` (qemu-io writes) plus a few random writes, zero writes and zero-filled
    writes; returns the qemu-io commands used."""
    fmt = fmt or rng.choice(["qcow2", "qcow2", "raw"])
    if fmt == "raw":
        run(QEMU_IMG, "create", "-f", "raw", path, size)
    else:
        cs = cluster_size or rng.choice(["512", "4k", "64k", "128k", "2M"])
        opts = f"cluster_size={cs}"
        if cs in ("64k", "128k", "2M") and rng.random() < 0.3:
            opts += ",extended_l2=on"
        run(QEMU_IMG, "create", "-f", "qcow2", "-o", opts, path, size)
    cmds = list(cmds)
    if cluster_size is None:
        for _ in range(rng.randint(0, 4)):
            off = rng.randrange(0, size - 1)
            n = rng.randint(1, min(3 * MiB, size - off))
            r = rng.random()
            cmds.append(f"write -P {rng.randint(0, 3)} {off} {n}" if r < 0.4 else
                        f"write -z {off} {n}" if r < 0.7 else f"write -P 0 {off} {n}")
    if fmt == "raw":
        cmds = [c.replace("write -z", "write -P 0") for c in cmds]
    if cmds:
        qio(path, *cmds, fmt=fmt)
    return cmds


@pytest.mark.parametrize("seed", range(24))
def test_random_pairs(tmp_path, seed):
    """Differential: random shapes, some with the same data written the same way into
    another format (allocation differs, content does not), some of other sizes."""
    import random
    rng = random.Random(seed)
    size = rng.choice([MiB, 5 * MiB + 512, 16 * MiB, 40 * MiB])
    base = []
    for _ in range(3):
        off, n = rng.randrange(0, size - 4096), rng.randint(1, 2 * MiB)
        if off + n <= size:
            base.append(f"write -P 1 {off} {n}")
    a, b = tmp_path / "a.img", tmp_path / "b.img"
    cmds = _random_image(a, rng, size, base)
    if seed % 2:
        _random_image(b, rng, size, cmds, fmt=rng.choice(["qcow2", "raw"]),
                      cluster_size=rng.choice(["512", "4k", "64k", "1M"]))
    else:
        size2 = size if rng.random() < 0.7 else rng.choice([MiB, 8 * MiB, 16 * MiB + 512])
        _random_image(b, rng, size2, [c for c in base
                                      if int(c.split()[3]) + int(c.split()[4]) <= size2])
    assert_like_qemu(a, b)
    assert_like_qemu("-s", a, b)
