"""create: images qemu-img agrees with, for every option combination qemu-img accepts.

Oracles (qemu-img 7.2): ``qemu-img check`` (clean, no leaks), ``qemu-img info`` equal
to qemu-img's own image for the same command (but for ``actual-size`` and paths),
``qemu-img compare`` / ``map`` against qemu-img's image, byte-identical files where
the layouts coincide (no preallocation), the same refusals for invalid combinations,
and the same "Formatting ..." line.
"""

from __future__ import annotations

import errno
import itertools
import json
import os
import random
import shutil
import subprocess
import sys
import tracemalloc

import pytest

import qcow2
from qcow2 import creator
from qcow2.errors import InvalidOptionError, Qcow2Error, UnsafeImageError
from qcow2.layout import qcow2_layout, refblock
from qcow2.options import QCOW2_OPTIONS

QEMU_IMG = shutil.which("qemu-img")
QEMU_IO = shutil.which("qemu-io")
needs_qemu = pytest.mark.skipif(QEMU_IMG is None or QEMU_IO is None,
                                reason="qemu-img/qemu-io not installed (apt-get install "
                                       "qemu-utils): they are the oracles")

SIZE = (3 << 20) + 1000          # not a multiple of 512: QEMU rounds up


def qimg(*args, cwd=None, check=True):
    proc = subprocess.run([QEMU_IMG, *map(str, args)], capture_output=True, text=True,
                          cwd=cwd)
    if check and proc.returncode:
        raise AssertionError(f"qemu-img {' '.join(map(str, args))}: rc={proc.returncode} "
                             f"{proc.stderr.strip()}")
    return proc


def cli(*args, cwd=None):
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in [os.path.dirname(os.path.dirname(
        qcow2.__file__)), env.get("PYTHONPATH", "")] if p)
    return subprocess.run([sys.executable, "-m", "qcow2", *map(str, args)],
                          capture_output=True, text=True, cwd=cwd, env=env)


def info(path, cwd=None):
    return json.loads(qimg("info", "-U", "--output=json", path, cwd=cwd).stdout)


def check_clean(path, cwd=None):
    proc = qimg("check", "--output=json", path, cwd=cwd, check=False)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    res = json.loads(proc.stdout)
    for key in ("corruptions", "leaks", "check-errors"):
        assert not res.get(key), res
    return res


def strip(d, *keys):
    return {k: v for k, v in d.items() if k not in ("actual-size", "filename", *keys)}


def no_leftovers(d):
    return sorted(n for n in os.listdir(d) if n.endswith(".part"))


# ----------------------------------------------------------------------- fixtures

@pytest.fixture(scope="module")
def shared(tmp_path_factory):
    """Backing files with data: a qcow2 (written with qemu-io) and an odd-sized raw."""
    if QEMU_IMG is None or QEMU_IO is None:
        pytest.skip("qemu-img/qemu-io not installed")
    d = tmp_path_factory.mktemp("create") / "shared"
    d.mkdir()
    qimg("create", "-q", "-f", "qcow2", d / "base.qcow2", "3M")
    subprocess.run([QEMU_IO, "-f", "qcow2", "-c", "write -P 0x5a 0 1M",
                    "-c", "write -P 0xa5 2M 64k", d / "base.qcow2"], check=True,
                   capture_output=True)
    with open(d / "base.raw", "wb") as f:
        f.write(b"\x77" * 300000)
        f.truncate((2 << 20) + 1000)
    return d


# --------------------------------------------------------------------- the matrix

PARAMS = {
    "compat": ["0.10", "1.1"],
    "cluster_size": [512, 4096, 65536, 2 << 20],
    "refcount_bits": [1, 8, 16, 64],
    "extended_l2": [False, True],
    "compression_type": ["zlib", "zstd"],
    "lazy_refcounts": [False, True],
    "preallocation": ["off", "metadata", "falloc", "full"],
    "backing": ["none", "qcow2-abs", "raw-rel"],
    "data": ["none", "file", "raw"],
}


def valid(c: dict) -> bool:
    """The combinations qemu-img accepts (see test_invalid_combinations_refused)."""
    if c["compat"] == "0.10" and (c["refcount_bits"] != 16 or c["extended_l2"]
                                  or c["compression_type"] != "zlib" or c["lazy_refcounts"]
                                  or c["data"] != "none"):
        return False
    if c["extended_l2"] and c["cluster_size"] < 16384:
        return False
    if c["backing"] != "none" and c["preallocation"] != "off" and not c["extended_l2"]:
        return False
    if c["data"] == "raw" and c["backing"] != "none":
        return False
    return True


def pairwise_cases() -> list[dict]:
    """A deterministic covering set: every pair of values that some valid combination
    has appears in at least one case (greedy over seeded random candidates)."""
    names = list(PARAMS)
    space = [dict(zip(names, vals, strict=True)) for vals in itertools.product(*PARAMS.values())]
    space = [c for c in space if valid(c)]

    def pairs(c):
        return {(a, c[a], b, c[b]) for a, b in itertools.combinations(names, 2)}

    todo = set().union(*(pairs(c) for c in space))
    rng = random.Random(20240607)
    out = []
    while todo:
        best = max(rng.sample(space, min(400, len(space))), key=lambda c: len(pairs(c) & todo))
        if not pairs(best) & todo:       # sample missed: take a case for a remaining pair
            a, va, b, vb = min(todo, key=repr)
            best = next(c for c in space if c[a] == va and c[b] == vb)
        out.append(best)
        todo -= pairs(best)
    return out


MATRIX = pairwise_cases()


def case_id(c):
    parts = [f"v{'2' if c['compat'] == '0.10' else '3'}", f"cs{c['cluster_size']}",
             f"rb{c['refcount_bits']}", c["preallocation"]]
    if c["extended_l2"]:
        parts.append("extl2")
    if c["compression_type"] != "zlib":
        parts.append(c["compression_type"])
    if c["lazy_refcounts"]:
        parts.append("lazy")
    if c["backing"] != "none":
        parts.append(c["backing"])
    if c["data"] != "none":
        parts.append("data-" + c["data"])
    return "-".join(parts)


def options_for(c: dict, shared) -> tuple[dict, list[str]]:
    """(keyword options for qcow2.create, the same as qemu-img -o/-b/-F arguments)."""
    kw = {"compat": c["compat"], "cluster_size": c["cluster_size"],
          "refcount_bits": c["refcount_bits"], "extended_l2": c["extended_l2"],
          "compression_type": c["compression_type"], "lazy_refcounts": c["lazy_refcounts"],
          "preallocation": c["preallocation"]}
    if c["backing"] == "qcow2-abs":
        kw["backing_file"], kw["backing_format"] = str(shared / "base.qcow2"), "qcow2"
    elif c["backing"] == "raw-rel":
        kw["backing_file"], kw["backing_format"] = "../shared/base.raw", "raw"
    if c["data"] != "none":
        kw["data_file"] = "disk.data"
        kw["data_file_raw"] = c["data"] == "raw"
    o = []
    for k in ("compat", "cluster_size", "refcount_bits", "extended_l2", "compression_type",
              "lazy_refcounts", "preallocation", "data_file", "data_file_raw"):
        if k in kw:
            v = kw[k]
            o.append(f"{k}={('on' if v else 'off') if isinstance(v, bool) else v}")
    args = ["-o", ",".join(o)]
    if "backing_file" in kw:
        args += ["-b", kw["backing_file"], "-F", kw["backing_format"]]
    return kw, args


def test_matrix_covers_every_value():
    for name, values in PARAMS.items():
        assert {c[name] for c in MATRIX} == set(values), name
    assert 15 <= len(MATRIX) <= 60


@needs_qemu
@pytest.mark.parametrize("c", MATRIX, ids=case_id)
def test_matrix_matches_qemu(shared, c):
    root = shared.parent
    ours_dir, theirs_dir = root / f"o-{case_id(c)}", root / f"q-{case_id(c)}"
    ours_dir.mkdir()
    theirs_dir.mkdir()
    ours, theirs = ours_dir / "disk.qcow2", theirs_dir / "disk.qcow2"
    kw, args = options_for(c, shared)
    qcow2.create(ours, SIZE, **kw)
    qimg("create", "-q", "-f", "qcow2", *args, "disk.qcow2", SIZE, cwd=theirs_dir)

    check_clean(ours, cwd=ours_dir)
    mine, ref = info(ours, cwd=ours_dir), info(theirs, cwd=theirs_dir)
    assert strip(mine, "full-backing-filename") == strip(ref, "full-backing-filename")
    assert mine["virtual-size"] == (SIZE + 511) & ~511
    if "backing_file" in kw:
        assert mine["backing-filename"] == kw["backing_file"]      # stored as given
    # our own reader describes the image as qemu-img does
    with qcow2.open(ours) as img:
        assert strip(img.info()) == strip(mine)

    # same guest content as qemu-img's image (through the backing file, if any)
    if c["data"] == "none":
        qimg("compare", "-q", ours, theirs)
    else:
        spec = {"driver": "qcow2", "file": {"driver": "file", "filename": str(theirs)},
                "data-file": {"driver": "file", "filename": str(theirs_dir / "disk.data")}}
        qimg("compare", "-q", ours, "json:" + json.dumps(spec), cwd=ours_dir)
        st = os.stat(ours_dir / "disk.data")
        assert st.st_size == os.stat(theirs_dir / "disk.data").st_size
        if c["preallocation"] in ("falloc", "full"):
            assert st.st_blocks * 512 >= st.st_size
    # same allocation status, extent by extent (host offsets differ with preallocation,
    # except with a data file, where they are the guest offsets)
    m1 = json.loads(qimg("map", "--output=json", ours, cwd=ours_dir).stdout)
    m2 = json.loads(qimg("map", "--output=json", theirs, cwd=theirs_dir).stdout)
    if c["data"] == "none" and c["preallocation"] != "off":
        m1 = [{k: v for k, v in e.items() if k != "offset"} for e in m1]
        m2 = [{k: v for k, v in e.items() if k != "offset"} for e in m2]
    assert m1 == m2
    # Without preallocation (and with a data file, where the L2 tables map 1:1), the
    # layout is QEMU's: the very same bytes.
    if c["preallocation"] == "off" and not (c["data"] == "raw"):
        assert ours.read_bytes() == theirs.read_bytes()
    if c["preallocation"] in ("falloc", "full") and c["data"] == "none":
        st = os.stat(ours)
        assert st.st_blocks * 512 >= SIZE
    assert no_leftovers(ours_dir) == []


# ------------------------------------------------------------- byte-level layout checks

@needs_qemu
@pytest.mark.parametrize("opts", [
    "preallocation=metadata",
    "preallocation=metadata,cluster_size=2M",
    "data_file=disk.data,data_file_raw=on",
    "data_file=disk.data,preallocation=full,extended_l2=on",
    "cluster_size=512,refcount_bits=1,compat=1.1",
    "cluster_size=4096,lazy_refcounts=on,compression_type=zstd",
    "compat=0.10,cluster_size=512",
])
def test_small_images_are_byte_identical(tmp_path, opts):
    """Where QEMU's allocation order coincides with the closed-form layout (one L2
    table), the files are identical, header extensions and refcounts included."""
    a, b = tmp_path / "a", tmp_path / "b"
    a.mkdir()
    b.mkdir()
    assert cli("create", "-q", "-f", "qcow2", "-o", opts, "disk.qcow2", "10M",
               cwd=a).returncode == 0
    qimg("create", "-q", "-f", "qcow2", "-o", opts, "disk.qcow2", "10M", cwd=b)
    assert (a / "disk.qcow2").read_bytes() == (b / "disk.qcow2").read_bytes()
    check_clean(a / "disk.qcow2", cwd=a)


@needs_qemu
@pytest.mark.parametrize("cluster_size", [512, 4096, 8192])
def test_backing_name_in_small_clusters(tmp_path, shared, cluster_size):
    """QEMU 7.2 writes no feature table with clusters of 4 KiB or less, leaving room
    for the backing file name; the header must be the same bytes."""
    a, b = tmp_path / "a", tmp_path / "b"
    a.mkdir()
    b.mkdir()
    for d in (a, b):
        shutil.copy(shared / "base.raw", d / "base.raw")
    assert cli("create", "-q", "-f", "qcow2", "-o", f"cluster_size={cluster_size}",
               "-b", "base.raw", "-F", "raw", "disk.qcow2", "1M", cwd=a).returncode == 0
    qimg("create", "-q", "-f", "qcow2", "-o", f"cluster_size={cluster_size}", "-b",
         "base.raw", "-F", "raw", "disk.qcow2", "1M", cwd=b)
    assert (a / "disk.qcow2").read_bytes() == (b / "disk.qcow2").read_bytes()


def test_backing_name_too_long_for_512_byte_cluster(tmp_path):
    name = "b" * 400
    with pytest.raises(InvalidOptionError, match="more than one cluster"):
        qcow2.create(tmp_path / "x.qcow2", "1M", backing_file=name, backing_format="raw",
                     unsafe=True, cluster_size=512)
    with pytest.raises(InvalidOptionError, match="at most 1023"):
        qcow2.create(tmp_path / "x.qcow2", "1M", backing_file="b" * 1024,
                     backing_format="raw", unsafe=True)
    assert os.listdir(tmp_path) == []


@pytest.mark.parametrize("order", range(7))
def test_refblock_packing(order):
    """Sub-byte refcounts are packed LSB-first; wider ones are big-endian."""
    cs = 512
    bits = 1 << order
    per = cs * 8 // bits
    for used in (0, 1, 3, per // 2 + 1, per - 1, per):
        block = refblock(cs, order, used)
        assert len(block) == cs
        as_int = int.from_bytes(block, "big")
        for i in range(per):
            if bits >= 8:
                val = (as_int >> ((per - 1 - i) * bits)) & ((1 << bits) - 1)
            else:
                val = (block[i * bits // 8] >> ((i * bits) % 8)) & ((1 << bits) - 1)
            assert val == (1 if i < used else 0), (bits, used, i)


def test_layout_refcounts_cover_everything():
    """Refcount blocks cover every cluster, the table covers every block, nothing
    overlaps, for sizes and geometries that make the structures span clusters."""
    rng = random.Random(7)
    for _ in range(300):
        cb = rng.randint(9, 21)
        order = rng.randint(0, 6)
        ext = cb >= 14 and rng.random() < 0.5
        size = rng.choice([0, 512, rng.randrange(1 << 20, 1 << 34, 512)])
        pre = rng.choice(["off", "metadata", "falloc", "full"])
        try:
            lay = qcow2_layout(size, cb, order, extended_l2=ext, preallocation=pre,
                                  external_data=rng.random() < 0.3)
        except InvalidOptionError:
            continue
        cs = 1 << cb
        assert lay.refblocks * lay.refcounts_per_block >= lay.total_clusters
        assert lay.reftable_clusters * cs // 8 >= lay.refblocks
        end = lay.data_offset + lay.data_clusters * cs
        assert end == lay.total_clusters * cs
        assert lay.file_size <= end and lay.file_size > lay.refblock_offset
        if pre != "off" and size:
            assert lay.l2_tables == lay.l1_size
            assert lay.mapped_clusters == -(-size // cs)


# ------------------------------------------------------------------- nova, overlays

NOVA = ["-f", "qcow2", "-o", "backing_file={base},backing_fmt=raw,cluster_size=65536",
        "{disk}", "21474836480"]


@needs_qemu
def test_nova_command_line(tmp_path, shared):
    a, b = tmp_path / "a", tmp_path / "b"
    a.mkdir()
    b.mkdir()
    base = shared / "base.raw"
    args = [x.format(base=base, disk="disk") for x in NOVA]
    ours = cli("create", *args, cwd=a)
    theirs = qimg("create", *args, cwd=b)
    assert ours.returncode == 0, ours.stderr
    assert ours.stdout == theirs.stdout
    assert ours.stdout.startswith("Formatting 'disk', fmt=qcow2 cluster_size=65536 ")
    check_clean(a / "disk", cwd=a)
    assert strip(info(a / "disk")) == strip(info(b / "disk"))
    assert (a / "disk").read_bytes() == (b / "disk").read_bytes()
    qimg("compare", "-q", a / "disk", b / "disk")


@needs_qemu
@pytest.mark.parametrize("base,fmt,expect", [("base.qcow2", "qcow2", 3 << 20),
                                             ("base.raw", "raw", (2 << 20) + 1024)])
def test_overlay_takes_backing_size(tmp_path, shared, base, fmt, expect):
    d = tmp_path / "d"
    d.mkdir()
    rel = os.path.relpath(shared / base, d)
    qcow2.create(d / "ov.qcow2", backing_file=rel, backing_format=fmt)
    i = info(d / "ov.qcow2")
    assert i["virtual-size"] == expect
    assert i["backing-filename"] == rel                # relative stays relative
    assert i["backing-filename-format"] == fmt
    check_clean(d / "ov.qcow2")
    qimg("compare", "-q", d / "ov.qcow2", shared / base)
    # the CLI prints the size it took, as qemu-img does
    out = cli("create", "-f", "qcow2", "-b", rel, "-F", fmt, "ov2.qcow2", cwd=d)
    ref = qimg("create", "-f", "qcow2", "-b", rel, "-F", fmt, "ov3.qcow2", cwd=d)
    assert out.stdout.replace("ov2", "ov3") == ref.stdout


@needs_qemu
def test_unsafe_with_missing_backing(tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    a.mkdir()
    b.mkdir()
    args = ["-f", "qcow2", "-u", "-b", "missing.qcow2", "-F", "qcow2", "disk.qcow2", "1G"]
    ours, theirs = cli("create", *args, cwd=a), qimg("create", *args, cwd=b)
    assert ours.returncode == 0, ours.stderr
    assert ours.stdout == theirs.stdout
    assert (a / "disk.qcow2").read_bytes() == (b / "disk.qcow2").read_bytes()
    with qcow2.open(a / "disk.qcow2", backing=False) as img:
        assert img.info()["backing-filename"] == "missing.qcow2"
    # without -u the missing backing file is an error; with -u a size is required
    r = cli("create", "-f", "qcow2", "-b", "missing.qcow2", "-F", "qcow2", "x.qcow2", "1G",
            cwd=a)
    assert r.returncode == 1 and "Could not open backing image" in r.stderr
    r = cli("create", "-f", "qcow2", "-u", "-b", "missing.qcow2", "-F", "qcow2", "x.qcow2",
            cwd=a)
    assert r.returncode == 1 and "Image creation needs a size parameter" in r.stderr
    assert not (a / "x.qcow2").exists()


def test_protocol_and_json_backing_refused(tmp_path):
    for name in ("json:{\"file.filename\": \"/etc/passwd\"}", "nbd://host/export",
                 "http://example.com/x.img"):
        with pytest.raises(UnsafeImageError):
            qcow2.create(tmp_path / "x.qcow2", "1M", backing_file=name, backing_format="raw",
                         unsafe=True)
        with pytest.raises(UnsafeImageError):
            qcow2.create(tmp_path / "x.qcow2", "1M", data_file=name)
    assert os.listdir(tmp_path) == []


# ------------------------------------------------------------------ invalid options

INVALID = [
    # (qemu-img create arguments after -f qcow2, message both print)
    (["-o", "compat=0.10,lazy_refcounts=on"], "Lazy refcounts only supported"),
    (["-o", "compat=0.10,refcount_bits=8"], "Different refcount widths than 16 bits"),
    (["-o", "compat=0.10,extended_l2=on"], "Extended L2 entries are only supported with "
                                            "compatibility level 1.1"),
    (["-o", "compat=0.10,compression_type=zstd"], "Non-zlib compression type"),
    (["-o", "compat=0.10,data_file=d.raw"], "External data files are only supported"),
    (["-o", "extended_l2=on,cluster_size=8k"], "cluster sizes of at least 16384 bytes"),
    (["-o", "cluster_size=1000"], "Cluster size must be a power of two between 512 and 2048k"),
    (["-o", "cluster_size=256"], "Cluster size must be a power of two"),
    (["-o", "cluster_size=4M"], "Cluster size must be a power of two"),
    (["-o", "refcount_bits=3"], "Refcount width must be a power of two"),
    (["-o", "refcount_bits=128"], "Refcount width must be a power of two"),
    (["-o", "refcount_bits=0"], "Refcount width must be a power of two"),
    (["-o", "data_file_raw=on"], "data-file-raw requires data-file"),
    (["-o", "backing_fmt=raw"], "Backing format cannot be used without backing file"),
    (["-F", "raw"], "Backing format cannot be used without backing file"),
    (["-b", "{base}", "-F", "raw", "-o", "preallocation=metadata"],
     "Backing file and preallocation can only be used at the same time if extended_l2 is on"),
    (["-b", "{base}", "-F", "raw", "-o", "data_file=d.raw,data_file_raw=on"],
     "Backing file and data-file-raw cannot be used at the same time"),
    (["-b", "{base}"], "Backing file specified without backing format"),
    (["-u", "-b", "{base}"], "Backing file specified without backing format"),
    (["-b", "missing", "-F", "raw"], "Could not open backing image"),
    (["-b", "{base}", "-F", "qcow2"], "Could not open backing image"),
    (["-o", "foo=bar"], "Invalid parameter 'foo'"),
    (["-o", "compat=2"], "does not accept value '2'"),
    (["-o", "compression_type=lz4"], "does not accept value 'lz4'"),
    (["-o", "preallocation=foo"], "does not accept value 'foo'"),
    (["-o", "extended_l2=maybe"], "expects 'on' or 'off'"),
    (["-o", "lazy_refcounts=YES"], "expects 'on' or 'off'"),
    (["-o", "refcount_bits=abc"], "expects a number"),
    (["-o", "cluster_size=abc"], "expects a non-negative number below 2^64"),
    (["-o", "lazy_refcounts=on,"], "Invalid option list"),
    (["-o", "size=2M"], "The image size must be specified only once"),
]


@needs_qemu
@pytest.mark.parametrize("args,message", INVALID, ids=[" ".join(a) for a, _ in INVALID])
def test_invalid_combinations_refused(tmp_path, shared, args, message):
    a, b = tmp_path / "a", tmp_path / "b"
    a.mkdir()
    b.mkdir()
    args = [x.format(base=shared / "base.raw") for x in args]
    full = ["-f", "qcow2", *args, "disk.qcow2", "1M"]
    theirs = qimg("create", *full, cwd=b, check=False)
    ours = cli("create", *full, cwd=a)
    assert theirs.returncode == 1 and message in theirs.stderr, theirs.stderr
    assert ours.returncode == 1 and message in ours.stderr, ours.stderr
    # qemu-img's lines: the error, then any hint lines it adds
    assert len(ours.stderr.strip().splitlines()) == len(theirs.stderr.strip().splitlines())
    assert ours.stdout == theirs.stdout           # "Formatting" printed (or not) alike
    assert os.listdir(a) == []                   # nothing left behind, not even a stub


@needs_qemu
@pytest.mark.parametrize("args,message,hint", [
    (["disk.qcow2", "2049T"], "The image size is too large for file format 'qcow2'", False),
    (["-o", "cluster_size=512", "disk.qcow2", "129G"],
     "The image size is too large for file format 'qcow2' (try using a larger cluster size)",
     True),
    (["-o", "cluster_size=2M", "disk.qcow2", "4E"], "too large for file format 'qcow2'", True),
])
def test_too_large(tmp_path, args, message, hint):
    a, b = tmp_path / "a", tmp_path / "b"
    a.mkdir()
    b.mkdir()
    theirs = qimg("create", "-f", "qcow2", *args, cwd=b, check=False)
    ours = cli("create", "-f", "qcow2", *args, cwd=a)
    assert theirs.returncode == 1 and message in theirs.stderr
    assert ours.returncode == 1 and message in ours.stderr, ours.stderr
    # qemu-img's line exactly (after the program name): no detail appended
    assert ours.stderr.split(": ", 1)[1] == theirs.stderr.split(": ", 1)[1]
    assert ours.stdout == theirs.stdout
    assert os.listdir(a) == []


@needs_qemu
def test_largest_sizes_accepted(tmp_path):
    """The L1 table may have 4 Mi entries, exactly: 2 PiB with 64 KiB clusters."""
    qcow2.create(tmp_path / "a.qcow2", "2P")
    qcow2.create(tmp_path / "b.qcow2", "128G", cluster_size=512)
    for p in ("a.qcow2", "b.qcow2"):
        check_clean(tmp_path / p)
    assert info(tmp_path / "a.qcow2")["virtual-size"] == 1 << 51


def test_library_errors_are_typed(tmp_path):
    p = tmp_path / "x.qcow2"
    with pytest.raises(ValueError):
        qcow2.create(p, "1M", compat="0.10", lazy_refcounts=True)
    with pytest.raises(InvalidOptionError, match="Invalid parameter 'clustersize'"):
        qcow2.create(p, "1M", clustersize=4096)
    with pytest.raises(InvalidOptionError, match="cluster_size"):
        qcow2.create(p, "1M", cluster_size=True)
    with pytest.raises(InvalidOptionError, match="needs a size"):
        qcow2.create(p)
    with pytest.raises(InvalidOptionError, match="Invalid image size"):
        qcow2.create(p, -1)
    with pytest.raises(InvalidOptionError, match="Unknown file format 'foo'"):
        qcow2.create(p, "1M", format="foo")
    with pytest.raises(qcow2.UnsupportedFeatureError):
        qcow2.create(p, "1M", format="vmdk")
    with pytest.raises(InvalidOptionError, match="'encrypt.key-secret' is required"):
        qcow2.create(p, "1M", encryption=True)        # (as qemu-img: the key is missing)
    with pytest.raises(InvalidOptionError, match="Unsupported preallocation mode: metadata"):
        qcow2.create(p, "1M", format="raw", preallocation="metadata")
    with pytest.raises(InvalidOptionError, match="Backing file not supported"):
        qcow2.create(p, "1M", format="raw", backing_file="b", backing_format="raw")
    with pytest.raises(InvalidOptionError, match="same filename as the backing file"):
        qcow2.create(p, "1M", backing_file=str(p), backing_format="qcow2")
    with pytest.raises(InvalidOptionError, match="cannot be the image itself"):
        qcow2.create(p, "1M", data_file="x.qcow2")
    assert os.listdir(tmp_path) == []


def test_python_values_and_strings(tmp_path):
    """Keywords take Python values or the strings -o takes; None means 'not given'."""
    a, b = tmp_path / "a.qcow2", tmp_path / "b.qcow2"
    qcow2.create(a, 1 << 30, cluster_size=2 << 20, extended_l2=True, lazy_refcounts=True,
                 refcount_bits=8, compat="1.1", preallocation=None)
    qcow2.create(b, "1G", cluster_size="2M", extended_l2="on", lazy_refcounts="true",
                 refcount_bits="8", compat="v3")
    assert a.read_bytes() == b.read_bytes()
    with qcow2.open(a) as img:
        d = img.info()
    assert d["cluster-size"] == 2 << 20
    assert d["format-specific"]["data"]["extended-l2"] is True
    assert d["format-specific"]["data"]["refcount-bits"] == 8
    assert d["format-specific"]["data"]["lazy-refcounts"] is True


# ----------------------------------------------------------------------------- raw

@needs_qemu
@pytest.mark.parametrize("prealloc", ["off", "falloc", "full"])
def test_raw(tmp_path, prealloc):
    a, b = tmp_path / "a", tmp_path / "b"
    a.mkdir()
    b.mkdir()
    args = ["-f", "raw", "-o", f"preallocation={prealloc}", "disk.raw", (5 << 20) + 1000]
    ours, theirs = cli("create", *args, cwd=a), qimg("create", *args, cwd=b)
    assert ours.returncode == 0, ours.stderr
    assert ours.stdout == theirs.stdout
    sa, sb = os.stat(a / "disk.raw"), os.stat(b / "disk.raw")
    assert sa.st_size == sb.st_size == (5 << 20) + 1024
    if prealloc == "off":
        assert sa.st_blocks == 0
    else:
        assert sa.st_blocks * 512 >= sa.st_size         # really allocated
    assert (a / "disk.raw").read_bytes() == bytes(sa.st_size)
    assert strip(info(a / "disk.raw")) == strip(info(b / "disk.raw"))


# ------------------------------------------------------------------------- big sizes

@needs_qemu
def test_16_tib_without_preallocation_is_tiny(tmp_path):
    a, b = tmp_path / "a.qcow2", tmp_path / "b.qcow2"
    qcow2.create(a, "16T")
    qimg("create", "-q", "-f", "qcow2", b, "16T")
    st = os.stat(a)
    assert st.st_blocks * 512 <= 256 << 10       # holes where QEMU writes a zero L1 table
    assert st.st_size == os.stat(b).st_size == 3 * 65536 + (16 << 40 >> 29) * 8
    assert a.read_bytes() == b.read_bytes()
    check_clean(a)


@needs_qemu
def test_1_tib_metadata_preallocation_streams(tmp_path):
    """128 MiB of L2 tables and 32 MiB of refcount blocks, written with a few MiB of
    memory; data clusters stay holes."""
    p = tmp_path / "big.qcow2"
    tracemalloc.start()
    try:
        qcow2.create(p, "1T", preallocation="metadata")
        _cur, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 48 << 20, peak
    st = os.stat(p)
    lay = qcow2_layout(1 << 40, 16, 4, preallocation="metadata")
    assert st.st_size == lay.file_size
    assert st.st_blocks * 512 < 256 << 20                     # metadata only
    res = check_clean(p)
    assert res["allocated-clusters"] == res["total-clusters"] == 1 << 24
    with qcow2.open(p) as img:
        assert strip(img.info()) == strip(info(p))


# -------------------------------------------------------------- CLI output, atomicity

@needs_qemu
@pytest.mark.parametrize("args", [
    ["-f", "qcow2", "disk.qcow2", "1G"],
    ["-f", "qcow2", "-o", "compat=0.10,preallocation=metadata", "disk.qcow2", "1M"],
    ["-f", "qcow2", "-o", "extended_l2=on,preallocation=full,lazy_refcounts=on,refcount_bits=8,"
     "compression_type=zstd,data_file=x.data,data_file_raw=on", "disk.qcow2", "1M"],
    ["-f", "qcow2", "-o", "cluster_size=2M,lazy_refcounts=true,extended_l2=yes,compat=v3",
     "disk.qcow2", "1.5M"],
    ["-f", "qcow2", "-o", "cluster_size=64K", "-o", "cluster_size=0.5k", "disk.qcow2", "1000"],
    ["-f", "qcow2", "-u", "-b", "a,,b", "-F", "raw", "disk.qcow2", "1M"],
    ["-f", "qcow2", "-u", "-o", "backing_file=a,,b,backing_fmt=raw", "disk.qcow2", "1M"],
    ["-f", "qcow2", "-o", "preallocation=off,data_file=d.raw,data_file_raw=on", "disk.qcow2",
     "1M"],
    ["-f", "qcow2", "-o", "size=1M,lazy_refcounts", "disk.qcow2"],
    ["-f", "raw", "disk.raw", "1G"],
    ["-f", "raw", "-o", "preallocation=falloc", "disk.raw", "1M"],
])
def test_formatting_line(tmp_path, args):
    a, b = tmp_path / "a", tmp_path / "b"
    a.mkdir()
    b.mkdir()
    ours, theirs = cli("create", *args, cwd=a), qimg("create", *args, cwd=b)
    assert ours.returncode == theirs.returncode == 0, ours.stderr
    assert ours.stdout == theirs.stdout
    quiet = cli("create", "-q", *args, cwd=a)
    assert quiet.returncode == 0 and quiet.stdout == ""


def test_option_list_parsing():
    from qcow2.units import parse_option_list
    assert parse_option_list("a=b,,c,d=1") == {"a": "b,c", "d": "1"}
    assert parse_option_list("lazy_refcounts") == {"lazy_refcounts": "on"}
    assert parse_option_list("x=1,x=2") == {"x": "2"}
    for bad in ("a=1,", ",a=1", "a=1,,,", "=1"):
        with pytest.raises(Qcow2Error, match="Invalid option list"):
            parse_option_list(bad)


def test_help_lists_options():
    r = cli("create", "-f", "qcow2", "-o", "help")
    assert r.returncode == 0
    for name in QCOW2_OPTIONS:
        # the file protocol's options only when a file name is given, as qemu-img
        assert (f"  {name}=" in r.stdout) == (name not in ("nocow", "extent_size_hint"))
    r = cli("create", "-f", "qcow2", "-o", "help", "x.qcow2")
    for name in QCOW2_OPTIONS:
        assert f"  {name}=" in r.stdout


def test_existing_destination_replaced(tmp_path):
    p = tmp_path / "disk.qcow2"
    p.write_bytes(b"old content" * 100000)
    qcow2.create(p, "1M")
    with qcow2.open(p) as img:
        assert img.size == 1 << 20
    assert os.path.getsize(p) == 3 * 65536 + 8
    # a refused request leaves the old image alone
    before = p.read_bytes()
    with pytest.raises(InvalidOptionError):
        qcow2.create(p, "1M", compat="0.10", extended_l2=True)
    assert p.read_bytes() == before


def test_symlink_destination_written_through(tmp_path):
    target = tmp_path / "real.qcow2"
    target.write_bytes(b"x")
    link = tmp_path / "link.qcow2"
    link.symlink_to(target)
    qcow2.create(link, "1M")
    assert link.is_symlink()
    with qcow2.open(target) as img:
        assert img.size == 1 << 20


def test_failure_leaves_nothing(tmp_path, monkeypatch):
    """A failure after the metadata is written (here: preallocation) leaves neither a
    half image nor a data file nor a temporary name; an old file stays as it was."""
    def boom(fd, offset, length, mode):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(creator, "_allocate_data", boom)
    with pytest.raises(Qcow2Error, match="No space left on device"):
        qcow2.create(tmp_path / "new.qcow2", "10M", preallocation="full")
    with pytest.raises(Qcow2Error, match="No space left on device"):
        qcow2.create(tmp_path / "new.qcow2", "10M", preallocation="falloc",
                     data_file="new.data")
    with pytest.raises(Qcow2Error, match="No space left on device"):
        qcow2.create(tmp_path / "new.raw", "10M", format="raw", preallocation="full")
    assert os.listdir(tmp_path) == []
    old = tmp_path / "old.qcow2"
    old.write_bytes(b"keep me")
    with pytest.raises(Qcow2Error):
        qcow2.create(old, "10M", preallocation="full")
    assert old.read_bytes() == b"keep me"
    assert sorted(os.listdir(tmp_path)) == ["old.qcow2"]


def test_destination_folder_missing(tmp_path):
    r = cli("create", tmp_path / "nope" / "x.qcow2", "1M")
    assert r.returncode == 1
    assert "Could not create" in r.stderr and "No such file or directory" in r.stderr
