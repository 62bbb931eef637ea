"""measure: the numbers and the text of ``qemu-img measure`` (7.2), the oracle.

* ``--size``: a grid of sizes (0 .. 16 TiB, odd ones) x output options (cluster sizes,
  refcount widths, extended L2, compat 0.10, preallocation, backing file, raw);
* input images built with qemu-img / qemu-io: sparse and odd-sized raw files, qcow2
  with data and zero clusters, compressed, extended L2 with subclusters, metadata
  preallocation, v2, a raw <- qcow2 <- qcow2 chain with a short backing file, internal
  snapshots (``-l``) and persistent bitmaps;
* the CLI's human and JSON text byte for byte, and the same refusals.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import pytest

import qcow2
from qcow2.errors import Qcow2Error

QEMU_IMG = shutil.which("qemu-img")
QEMU_IO = shutil.which("qemu-io")
pytestmark = pytest.mark.skipif(QEMU_IMG is None or QEMU_IO is None,
                                reason="qemu-img/qemu-io not installed: they are the oracles")

KiB, MiB, GiB, TiB = 1 << 10, 1 << 20, 1 << 30, 1 << 40


def qimg(*args, check=True):
    proc = subprocess.run([QEMU_IMG, *map(str, args)], capture_output=True, text=True)
    if check and proc.returncode:
        raise AssertionError(f"qemu-img {' '.join(map(str, args))}: {proc.stderr.strip()}")
    return proc


def qio(path, *cmds, fmt="qcow2"):
    args = [QEMU_IO, "-f", fmt]
    for c in cmds:
        args += ["-c", c]
    subprocess.run(args + [str(path)], check=True, capture_output=True)


def cli(*args):
    env = dict(os.environ)
    root = os.path.dirname(os.path.dirname(qcow2.__file__))
    env["PYTHONPATH"] = os.pathsep.join(p for p in (root, env.get("PYTHONPATH", "")) if p)
    return subprocess.run([sys.executable, "-m", "qcow2", *map(str, args)],
                          capture_output=True, text=True, env=env)


def opt_args(opts: dict) -> list[str]:
    return ["-o", ",".join(f"{k}={v}" for k, v in opts.items())] if opts else []


def oracle(out_fmt: str, opts: dict, *, size=None, path=None, snapshot=None, fmt=None):
    """qemu-img's JSON (a dict) or None when it refuses."""
    args = ["measure", "--output=json", "-O", out_fmt, *opt_args(opts)]
    if size is not None:
        args += ["--size", size]
    if fmt is not None:
        args += ["-f", fmt]
    if snapshot is not None:
        args += ["-l", snapshot]
    if path is not None:
        args.append(path)
    proc = qimg(*args, check=False)
    return json.loads(proc.stdout) if proc.returncode == 0 else None


def ours(out_fmt: str, opts: dict, *, size=None, path=None, snapshot=None, fmt=None):
    try:
        return qcow2.measure(path, size=size, fmt=fmt, out_format=out_fmt, options=opts,
                             snapshot=snapshot)
    except Qcow2Error:
        return None


def assert_same(out_fmt, opts, **kw):
    want = oracle(out_fmt, opts, **kw)
    got = ours(out_fmt, opts, **kw)
    assert got == want, (out_fmt, opts, kw)
    if want is not None:                            # the key order is QEMU's too
        assert list(got) == list(want)


# --------------------------------------------------------------------------- --size

SIZES = [0, 1, 512, 1000, MiB, 12345679, GiB + 3, TiB, 16 * TiB, "1.5G"]
SIZE_OPTIONS = [
    {},
    {"cluster_size": 512},
    {"cluster_size": "4k"},
    {"cluster_size": "2M"},
    {"refcount_bits": 1},
    {"refcount_bits": 64, "cluster_size": 4096},
    {"extended_l2": "on"},
    {"extended_l2": "on", "cluster_size": "2M", "refcount_bits": 1},
    {"compat": "0.10"},
    {"compat": "0.10", "extended_l2": "on"},          # measure accepts what create refuses
    {"preallocation": "metadata"},
    {"preallocation": "full", "cluster_size": "4k"},
    {"preallocation": "falloc", "extended_l2": "on", "cluster_size": "16k"},
    {"backing_file": "base.img", "preallocation": "full"},
    {"lazy_refcounts": "on", "compression_type": "zstd", "nocow": "on"},
]


@pytest.mark.parametrize("opts", SIZE_OPTIONS, ids=lambda o: ",".join(f"{k}={v}" for k, v in
                                                                       o.items()) or "default")
def test_size_grid_qcow2(opts):
    for size in SIZES:
        assert_same("qcow2", opts, size=size)


def test_size_grid_raw():
    for size in SIZES:
        for opts in ({}, {"preallocation": "full"}, {"preallocation": "bogus"}):
            assert_same("raw", opts, size=size)


def test_limits_measure_has_but_create_lacks():
    # create refuses this refcount table size; measure reports it, as qemu-img does
    assert_same("qcow2", {"cluster_size": "4k", "refcount_bits": 64}, size=4 * TiB)
    assert_same("qcow2", {"cluster_size": 512, "refcount_bits": 64}, size=64 * GiB)
    # the L1 limit: refused
    assert ours("qcow2", {"cluster_size": 512}, size=TiB) is None


def test_prealloc_formula_matches_create_layout():
    from qcow2.layout import qcow2_layout, qcow2_prealloc_size
    for size in (0, 512, MiB, 12345 * 512, GiB, TiB):
        for cbits in (9, 12, 16, 21):
            for order in (0, 4, 6):
                for ext in (False, True):
                    if ext and cbits < 14:
                        continue
                    cs = 1 << cbits
                    aligned = -(-size // cs) * cs
                    try:
                        lay = qcow2_layout(aligned, cbits, order, extended_l2=ext,
                                           preallocation="full")
                    except Qcow2Error:
                        continue
                    assert lay.total_clusters * cs == qcow2_prealloc_size(size, cs, order, ext)


# --------------------------------------------------------------------------- inputs

@pytest.fixture(scope="module")
def images(tmp_path_factory):
    d = tmp_path_factory.mktemp("measure")
    out = {}

    raw = d / "sparse.raw"                       # holes, unaligned data
    with open(raw, "wb") as f:
        f.truncate(64 * MiB)
        for off, n in ((0, 4096), (100 * KiB + 7, 3000), (5 * MiB, MiB + 1), (63 * MiB, MiB)):
            f.seek(off)
            f.write(os.urandom(n))
    out["raw-sparse"] = (raw, None)

    odd = d / "odd.raw"
    odd.write_bytes(os.urandom(100_001))
    out["raw-odd"] = (odd, None)

    q = d / "data.qcow2"
    qimg("create", "-f", "qcow2", q, "100M")
    qio(q, "write -P 1 0 64k", "write -P 2 1M 10k", "write -z 2M 1M", "write -P 3 50M 3M",
        "write -P 0 80M 64k", "write -P 4 99M 1M")
    out["qcow2"] = (q, None)

    v2 = d / "v2.qcow2"
    qimg("create", "-f", "qcow2", "-o", "compat=0.10,cluster_size=4k", v2, "10M")
    qio(v2, "write -P 7 4k 8k")
    out["qcow2-v2"] = (v2, None)

    comp = d / "comp.qcow2"
    qimg("convert", "-c", "-O", "qcow2", "-o", "cluster_size=16k", raw, comp)
    out["compressed"] = (comp, None)

    ext = d / "extl2.qcow2"
    qimg("create", "-f", "qcow2", "-o", "extended_l2=on,cluster_size=128k", ext, "20M")
    qio(ext, "write -P 5 4k 4k", "write -P 6 300k 100k", "write -z 1M 512k")
    out["extl2"] = (ext, None)

    meta = d / "meta.qcow2"
    qimg("create", "-f", "qcow2", "-o", "preallocation=metadata", meta, "30M")
    qio(meta, "write -P 9 3M 128k")
    out["metadata-prealloc"] = (meta, None)

    base = d / "base.raw"                          # chain with a short raw base
    with open(base, "wb") as f:
        f.truncate(8 * MiB + 1000)
        f.seek(MiB)
        f.write(os.urandom(2 * MiB))
        f.seek(8 * MiB)
        f.write(b"\x01" * 1000)
    mid = d / "mid.qcow2"
    qimg("create", "-f", "qcow2", "-b", base.name, "-F", "raw", "-o", "cluster_size=4k",
         mid, "16M")
    qio(mid, "write -P 8 12M 100k", "write -z 1M 64k")
    top = d / "top.qcow2"
    qimg("create", "-f", "qcow2", "-b", mid.name, "-F", "qcow2", top, "40M")
    qio(top, "write -P 10 30M 1M", "write -P 11 2M 4k")
    out["chain"] = (top, None)

    sn = d / "snap.qcow2"
    qimg("create", "-f", "qcow2", sn, "64M")
    qio(sn, "write -P 3 0 1M")
    qimg("snapshot", "-c", "sn1", sn)
    qio(sn, "write -P 4 10M 5M")
    qimg("resize", sn, "128M")
    qimg("bitmap", "--add", sn, "bm0")
    qimg("bitmap", "--add", "-g", "4k", sn, "a-much-longer-bitmap-name")
    out["snapshot"] = (sn, "sn1")
    out["snapshot-by-param"] = (sn, "snapshot.name=sn1")
    out["bitmaps"] = (sn, None)
    return out


INPUT_OPTIONS = [
    ("qcow2", {}),
    ("qcow2", {"cluster_size": "4k"}),
    ("qcow2", {"cluster_size": "2M", "refcount_bits": 1}),
    ("qcow2", {"extended_l2": "on"}),
    ("qcow2", {"compat": "0.10"}),
    ("qcow2", {"preallocation": "full"}),
    ("qcow2", {"backing_file": "whatever.qcow2"}),
    ("qcow2", {"cluster_size": 512, "size": "1T"}),    # -o size: only for the L1 check
    ("raw", {}),
]

INPUTS = ["raw-sparse", "raw-odd", "qcow2", "qcow2-v2", "compressed", "extl2",
          "metadata-prealloc", "chain", "snapshot", "snapshot-by-param", "bitmaps"]


@pytest.mark.parametrize("name", INPUTS)
def test_input_images(images, name):
    path, snapshot = images[name]
    lib_snapshot = snapshot.split("=", 1)[1] if snapshot and "=" in snapshot else snapshot
    for out_fmt, opts in INPUT_OPTIONS:
        want = oracle(out_fmt, opts, path=path, snapshot=snapshot)
        got = ours(out_fmt, opts, path=path, snapshot=lib_snapshot)
        assert got == want, (name, out_fmt, opts)
        assert want is None or list(got) == list(want)


def test_input_forced_raw(images):
    path, _ = images["qcow2"]
    assert_same("qcow2", {}, path=path, fmt="raw")


# --------------------------------------------------------------------------- CLI text

@pytest.mark.parametrize("args", [
    ["--size", "1G", "-O", "qcow2"],
    ["--size", "1G", "-O", "raw"],
    ["--output=json", "--size", "16T", "-O", "qcow2", "-o", "cluster_size=2M,extended_l2=on"],
    ["--output=json", "--size", "0", "-O", "qcow2"],
    ["-O", "qcow2", "@bitmaps"],
    ["--output=json", "-O", "qcow2", "@bitmaps"],
    ["--output=json", "-O", "qcow2", "-o", "compat=0.10", "@bitmaps"],
    ["-O", "qcow2", "-l", "sn1", "@bitmaps"],
    ["-O", "qcow2", "-o", "cluster_size=4k", "-o", "refcount_bits=8", "@chain"],
    ["--output=json", "-O", "raw", "@raw-odd"],
    ["-O", "qcow2", "@raw-sparse"],
])
def test_cli_text(images, args):
    args = [str(images[a[1:]][0]) if a.startswith("@") else a for a in args]
    want = qimg("measure", *args)
    got = cli("measure", *args)
    assert got.returncode == 0, got.stderr
    assert got.stdout == want.stdout


@pytest.mark.parametrize("args", [
    [],                                                   # neither size nor file
    ["--size", "1G", "@qcow2"],                           # both
    ["-f", "qcow2", "--size", "1G"],                      # -f without a file
    ["-l", "sn1", "--size", "1G"],
    ["@qcow2", "@raw-odd"],                               # two files
    ["--size", "1G", "-O", "qcow2", "-o", "foo=bar"],
    ["--size", "1G", "-O", "raw", "-o", "cluster_size=4k"],
    ["--size", "1G", "-O", "qcow2", "-o", "cluster_size=abc"],
    ["--size", "1G", "-O", "qcow2", "-o", "cluster_size=3000"],
    ["--size", "1G", "-O", "qcow2", "-o", "cluster_size=4k,extended_l2=on"],
    ["--size", "1G", "-O", "qcow2", "-o", "extended_l2=maybe"],
    ["--size", "1G", "-O", "qcow2", "-o", "compat=v3"],
    ["--size", "1G", "-O", "qcow2", "-o", "refcount_bits=3"],
    ["--size", "1G", "-O", "qcow2", "-o", "compat=0.10,refcount_bits=8"],
    ["--size", "1G", "-O", "qcow2", "-o", "preallocation=bogus"],
    ["--size", "1T", "-O", "qcow2", "-o", "cluster_size=512"],
    ["--size", "-5", "-O", "qcow2"],
    ["-O", "qcow2", "-l", "nosuch", "@bitmaps"],
    ["-O", "qcow2", "/nonexistent/image"],
])
def test_cli_refusals(images, args):
    args = [str(images[a[1:]][0]) if a.startswith("@") else a for a in args]
    want = qimg("measure", *args, check=False)
    got = cli("measure", *args)
    assert want.returncode == 1, want.stdout
    assert (got.returncode, got.stdout) == (1, ""), got.stderr
    # as many lines as qemu-img's (it spreads a few messages over two)
    assert got.stderr.count("\n") == want.stderr.count("\n") and "Traceback" not in got.stderr
