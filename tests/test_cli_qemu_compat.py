"""The CLI as a drop-in for qemu-img: behaviours found by QEMU's own iotests, each
checked here against qemu-img itself (the oracle) without needing that suite."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import pytest

pytestmark = pytest.mark.skipif(shutil.which("qemu-img") is None, reason="qemu-img not installed")

SCRIPT = shutil.which("qcow2", path=os.path.dirname(sys.executable))


@pytest.fixture()
def ours(tmp_path):
    """Our CLI invoked under the name qemu-img (a link), so its error lines read as
    qemu-img's do."""
    if SCRIPT is None:
        pytest.skip("the qcow2 console script is not installed")
    link = tmp_path / "bin" / "qemu-img"
    link.parent.mkdir()
    link.symlink_to(SCRIPT)
    return str(link)


def run(prog, *args, cwd=None):
    return subprocess.run([prog, *map(str, args)], capture_output=True, text=True, cwd=cwd)


def both(ours, *args, cwd=None, setup=None):
    """Run the same command with qemu-img and with ours (``setup()`` before each, to
    start from the same files); returns both results."""
    if setup:
        setup()
    theirs = run("qemu-img", *args, cwd=cwd)
    if setup:
        setup()
    mine = run(ours, *args, cwd=cwd)
    return theirs, mine


def assert_same(theirs, mine):
    assert (mine.returncode != 0) == (theirs.returncode != 0), (theirs, mine)
    assert mine.stderr == theirs.stderr
    assert mine.stdout == theirs.stdout


def info(path):
    r = subprocess.run(["qemu-img", "info", "--output=json", str(path)], capture_output=True,
                       text=True, check=True)
    return json.loads(r.stdout)


def qemu_io(path, *cmds):
    args = ["qemu-io"]
    for c in cmds:
        args += ["-c", c]
    subprocess.run([*args, str(path)], check=True, capture_output=True)


def mkimg(path, size="1M", *opts):
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", *opts, str(path), size],
                   check=True, capture_output=True)


# -- convert ------------------------------------------------------------------------

def test_convert_o_backing_file_is_B(ours, tmp_path):
    base, top, out = tmp_path / "b.qcow2", tmp_path / "t.qcow2", tmp_path / "o.qcow2"
    mkimg(base)
    mkimg(top, "1M", "-b", "b.qcow2", "-F", "qcow2")
    qemu_io(base, "write -P 1 0 1M")
    qemu_io(top, "write -P 2 64k 64k")
    r = run(ours, "convert", "-O", "qcow2", "-o", "backing_file=b.qcow2,backing_fmt=qcow2",
            top, out)
    assert r.returncode == 0, r.stderr
    i = info(out)
    assert i["backing-filename"] == "b.qcow2" and i["backing-filename-format"] == "qcow2"
    assert run("qemu-img", "compare", top, out).returncode == 0
    # only the top layer was written
    m = json.loads(run("qemu-img", "map", "--output=json", out).stdout)
    assert [(e["start"], e["length"]) for e in m if e["depth"] == 0] == [(65536, 65536)]


@pytest.mark.parametrize("args", [
    ["-O", "raw", "-o", "backing_file=b.qcow2"],
    ["-O", "raw", "-o", "cluster_size=64k"],
    ["-O", "qcow2", "-o", "backing_file=b.qcow2", "-B", "x"],   # -o wins; then no format
])
def test_convert_backing_option_errors(ours, tmp_path, args):
    mkimg(tmp_path / "b.qcow2")
    mkimg(tmp_path / "t.qcow2", "1M", "-b", "b.qcow2", "-F", "qcow2")
    theirs, mine = both(ours, "convert", *args, "t.qcow2", "o.img", cwd=tmp_path)
    assert_same(theirs, mine)
    assert not (tmp_path / "o.img").exists()


def test_convert_B_refused_with_several_sources(ours, tmp_path):
    for n in ("b", "1", "2"):
        mkimg(tmp_path / f"{n}.qcow2")
    theirs, mine = both(ours, "convert", "-O", "qcow2", "-B", "b.qcow2", "1.qcow2", "2.qcow2",
                        "o.qcow2", cwd=tmp_path)
    assert_same(theirs, mine)
    assert not (tmp_path / "o.qcow2").exists()


# -- sizes and option values: qemu's syntax and messages ------------------------------

@pytest.mark.parametrize("args", [
    ["x.qcow2", "1024.0"], ["x.qcow2", "1024.0b"], ["x.qcow2", "1.5k"], ["x.qcow2", "1.0005k"],
    ["x.qcow2", "--", "-1024"], ["x.qcow2", "1.5"], ["x.qcow2", "foobar"], ["x.qcow2", "16E"],
    ["x.qcow2", "1kilobyte"], ["-o", "size=-1k", "x.qcow2"], ["-o", "size=1024.0", "x.qcow2"],
    ["-o", "cluster_size=1024.0", "x.qcow2", "64M"], ["-o", "cluster_size=1.5", "x.qcow2", "1M"],
    ["-o", "compat=0.42", "x.qcow2", "1M"], ["-o", "preallocation=1234", "x.qcow2", "1M"],
    ["-o", "compression_type=foo", "x.qcow2", "1M"],
    ["-o", "lazy_refcounts=maybe", "x.qcow2", "1M"],
    ["-o", "refcount_bits=abc", "x.qcow2", "1M"], ["-b", "", "x.qcow2", "1M"],
])
def test_create_sizes_and_values(ours, tmp_path, args):
    theirs, mine = both(ours, "create", "-f", "qcow2", *args, cwd=tmp_path,
                        setup=lambda: (tmp_path / "x.qcow2").unlink(missing_ok=True))
    assert_same(theirs, mine)           # the Formatting line shows the size parsed


def test_strtosz():
    from qcow2.units import strtosz
    assert strtosz("1024.0") == strtosz("1024.0b") == strtosz("1k") == 1024
    assert strtosz("1.0005k") == 1025 and strtosz("0.5k") == 512 and strtosz("0x10") == 16
    assert strtosz("1.5G") == 3 << 29
    for bad in ("1.5", "1.5b", "-1", "1kb", "0x1.5", "", "k", "1 k"):
        with pytest.raises(ValueError):
            strtosz(bad)
    with pytest.raises(OverflowError):
        strtosz("16E")


# -- create: hint lines; info --backing-chain loops ----------------------------------

@pytest.mark.parametrize("args", [
    ["-b", "b.qcow2", "x.qcow2"],                   # format detected: a hint line
    ["-b", "missing.qcow2", "-F", "qcow2", "x.qcow2"],   # "Could not open backing image."
])
def test_create_backing_hints(ours, tmp_path, args):
    mkimg(tmp_path / "b.qcow2")
    theirs, mine = both(ours, "create", "-f", "qcow2", *args, cwd=tmp_path)
    assert_same(theirs, mine)
    assert len(mine.stderr.splitlines()) == 2


def test_info_backing_chain_loop(ours, tmp_path):
    for n in ("a", "b", "c"):
        mkimg(tmp_path / f"{n}.qcow2")
    for img, back in (("a", "b"), ("b", "c"), ("c", "b")):      # c points back at b
        subprocess.run(["qemu-img", "rebase", "-u", "-b", f"{back}.qcow2", "-F", "qcow2",
                        f"{img}.qcow2"], cwd=tmp_path, check=True)
    for args in (["info", "--backing-chain", "a.qcow2"], ["info", "a.qcow2"],
                 ["info", "--backing-chain", "--output=json", "c.qcow2"]):
        assert_same(*both(ours, *args, cwd=tmp_path))


def test_info_backing_chain_layers(ours, tmp_path):
    mkimg(tmp_path / "b.qcow2")
    os.mkdir(tmp_path / "sub")
    mkimg(tmp_path / "sub" / "t.qcow2", "1M", "-b", "../b.qcow2", "-F", "qcow2")
    for out in ("human", "json"):
        assert_same(*both(ours, "info", f"--output={out}", "--backing-chain", "sub/t.qcow2",
                          cwd=tmp_path))


def _map(path):
    m = json.loads(run("qemu-img", "map", "--output=json", path).stdout)
    for e in m:
        e.pop("offset", None)
    return m


@pytest.mark.parametrize("args", [
    ["-S", "0"], ["-c", "-S", "0"], ["-S", "0", "-B", "{base}", "-F", "qcow2"],
    ["-S", "4k", "-o", "cluster_size=1k"], ["-S", "8k", "-o", "cluster_size=1k"],
    ["-c", "-S", "8k", "-o", "cluster_size=1k"], ["-S", "64k", "-o", "cluster_size=4k"],
    ["-S", "4k"],
])
def test_convert_sparse_size_like_qemu_img(ours, tmp_path, args):
    """-S 0 writes every cluster as data (zeros and what the backing file holds
    included); a -S larger than a cluster writes short zero runs with the data."""
    base, src = tmp_path / "base.qcow2", tmp_path / "src.qcow2"
    mkimg(base, "8M", "-o", "cluster_size=1k")
    qemu_io(base, "write -P 7 0 2M")
    mkimg(src, "8M", "-o", "cluster_size=1k", "-b", str(base), "-F", "qcow2")
    qemu_io(src, "write -P 0 2M 64k", "write 2M 1k", "write 2056k 1k", "write 2065k 1k",
            "write -P 0 2113k 1k", "write -z 3M 64k", "write -P 9 5M 3k")
    args = [a.format(base=base) for a in args]
    outs = []
    for prog, name in (("qemu-img", "theirs.qcow2"), (ours, "mine.qcow2")):
        r = run(prog, "convert", "-O", "qcow2", *args, src, tmp_path / name)
        assert r.returncode == 0, r.stderr
        outs.append(_map(tmp_path / name))
    assert outs[1] == outs[0]
    assert run("qemu-img", "compare", tmp_path / "theirs.qcow2", tmp_path / "mine.qcow2"
               ).returncode == 0


def test_convert_n_with_B_and_o(ours, tmp_path):
    mkimg(tmp_path / "b.qcow2", "4M")
    mkimg(tmp_path / "s.qcow2", "4M")
    qemu_io(tmp_path / "s.qcow2", "write -P 3 1M 64k")
    for args in (["-B", "b.qcow2", "-n"], ["-o", "preallocation=metadata", "-n"]):
        theirs, mine = both(ours, "convert", "-O", "qcow2", *args, "s.qcow2", "o.qcow2",
                            cwd=tmp_path, setup=lambda: mkimg(tmp_path / "o.qcow2", "4M"))
        assert_same(theirs, mine)


# -- feature bits ---------------------------------------------------------------------

def _set_u64(path, offset, value):
    import struct
    with open(path, "r+b") as f:
        f.seek(offset)
        f.write(struct.pack(">Q", value))


def _replace_feature_table(path, payload: bytes):
    """Drop the image's feature name table extension and append ``payload`` as the
    new one (the extension area is rewritten in place after the header)."""
    import struct
    data = bytearray(path.read_bytes())
    hdr_len = struct.unpack_from(">I", data, 100)[0]
    pos, exts = hdr_len, []
    while True:
        magic, length = struct.unpack_from(">II", data, pos)
        if magic == 0:
            break
        body = bytes(data[pos + 8: pos + 8 + length])
        if magic != 0x6803F857:
            exts.append((magic, body))
        pos += 8 + (length + 7) // 8 * 8
    exts.append((0x6803F857, payload))
    out = b"".join(struct.pack(">II", m, len(b)) + b + bytes(-len(b) % 8) for m, b in exts)
    out += bytes(8)
    data[hdr_len: hdr_len + len(out)] = out
    path.write_bytes(bytes(data))


@pytest.mark.parametrize("bits,table", [
    (1 << 63, b"\x00\x3fTest feature"),                 # a short, one-entry table
    (7 << 61, b"\x00\x3dtest1" + bytes(41) + b"\x00\x3etest2" + bytes(41)),
    (1 << 63, None),
])
def test_unknown_incompatible_features_named(ours, tmp_path, bits, table):
    img = tmp_path / "t.qcow2"
    mkimg(img)
    if table is not None:
        _replace_feature_table(img, table)
    _set_u64(img, 72, bits)
    assert_same(*both(ours, "info", img))


def test_check_repair_clears_unknown_autoclear_bits(ours, tmp_path):
    import struct
    for who, prog in (("theirs", "qemu-img"), ("ours", ours)):
        img = tmp_path / f"{who}.qcow2"
        mkimg(img)
        _set_u64(img, 88, 1 << 63)
        r = run(prog, "check", "-r", "all", img)
        assert r.returncode == 0, r.stderr
        assert struct.unpack_from(">Q", img.read_bytes(), 88)[0] == 0


@pytest.mark.parametrize("args", [["-O", "raw"], ["-O", "qcow2"], ["-O", "qcow2", "-c"]])
@pytest.mark.parametrize("writes", [["write 0 1M", "write 2M 1M", "write 4M 1M", "write 32M 1M"],
                                    ["write 0 24M"], []])
def test_convert_progress_lines(ours, tmp_path, args, writes):
    """-p prints qemu-img's lines: a step per request (2 MiB, a cluster when
    compressing), a line when it moved by more than 1 %, 100 twice at the end."""
    src = tmp_path / "s.qcow2"
    mkimg(src, "64M")
    if writes:
        qemu_io(src, *writes)
    theirs, mine = both(ours, "convert", "-p", *args, src, tmp_path / "o")
    assert_same(theirs, mine)


# -- -o help, repeated options, option lists, -C --------------------------------------

@pytest.mark.parametrize("args", [
    ["create", "-f", "qcow2", "-o", "help", "t.qcow2", "1M"],
    ["create", "-f", "qcow2", "-o", "cluster_size=4k,?"],
    ["create", "-f", "raw", "-o", "help", "t.raw"],
    ["create", "-o", "help"],
    ["create", "-f", "bochs", "-o", "help"],
    ["create", "-f", "foo", "-o", "help"],
    ["create", "-f", "qcow2", "-o", "backing_file=t.qcow2,", "-o", "help", "t.qcow2", "1M"],
    ["create", "-f", "qcow2", "-o", "backing_file=t.qcow2", "-o", ",help", "t.qcow2", "1M"],
    ["create", "-f", "qcow2", "-o", ",,", "-o", "help", "t.qcow2", "1M"],
    ["convert", "-O", "qcow2", "-o", "help", "s.qcow2", "o.qcow2"],
    ["convert", "-O", "qcow2", "-o", "help"],
    ["convert", "-o", "help"],
    ["convert", "-O", "bochs", "-o", "help"],
    ["convert", "-C", "-S", "4k", "-O", "qcow2", "s.qcow2", "o.qcow2"],
    ["convert", "-C", "-c", "-O", "qcow2", "s.qcow2", "o.qcow2"],
    ["convert", "-C", "--salvage", "-O", "qcow2", "s.qcow2", "o.qcow2"],
    ["convert", "-O", "foo", "-O", "qcow2", "s.qcow2", "o.qcow2"],
    ["convert", "-f", "foo", "-f", "qcow2", "s.qcow2", "o.raw"],
    ["convert", "-O", "qcow2", "-o", "backing_fmt=qcow2,backing_file=s.qcow2,,help",
     "s.qcow2", "o.qcow2"],
    ["amend", "-f", "qcow2", "-o", "help", "s.qcow2"],
    ["amend", "-o", "help", "s.qcow2"],
    ["amend", "-f", "qcow2", "-o", "help"],
    ["amend", "-o", "help"],
    ["amend", "-f", "raw", "-o", "help", "s.qcow2"],
    ["amend", "-f", "bochs", "-o", "help"],
    ["amend", "-f", "foo", "-f", "qcow2", "-o", "size=2M,size=3M", "s.qcow2"],
    ["amend", "-f", "qcow2", "-o", "backing_file=s.qcow2,,help", "s.qcow2"],
    ["measure", "-O", "qcow2", "-o", "help", "--size", "1M"],
])
def test_option_help_and_lists_like_qemu_img(ours, tmp_path, args):
    def setup():
        for n in os.listdir(tmp_path):
            if n != "bin":
                os.unlink(tmp_path / n)
        mkimg(tmp_path / "s.qcow2")
    theirs, mine = both(ours, *args, cwd=tmp_path, setup=setup)
    assert_same(theirs, mine)
    if theirs.returncode == 0 and "size=2M,size=3M" in args:
        assert info(tmp_path / "s.qcow2")["virtual-size"] == 3 << 20


@pytest.mark.parametrize("opt", ["cluster_size=4k", "extended_l2=on", "compression_type=zstd",
                                 "preallocation=full", "encryption=on", "nonsense=1",
                                 "data_file_raw=on"])
def test_amend_refusals_like_qemu_img(ours, tmp_path, opt):
    theirs, mine = both(ours, "amend", "-o", opt, "s.qcow2", cwd=tmp_path,
                        setup=lambda: mkimg(tmp_path / "s.qcow2"))
    assert_same(theirs, mine)


def test_check_names_an_image_refused_at_open(ours, tmp_path):
    img = tmp_path / "s.qcow2"
    mkimg(img)
    _set_u64(img, 72, 1 << 60)                 # an unknown incompatible feature
    theirs, mine = both(ours, "check", img)
    assert mine.returncode == 1
    assert mine.stderr.startswith(f"qemu-img: Could not open '{img}': ")
    assert_same(theirs, mine)


# -- json: names and --image-opts ----------------------------------------------------

@pytest.mark.parametrize("name", [
    'json:{"driver":"qcow2","file.filename":"IMG"}',
    "json:{'driver':'qcow2','file':{'driver':'file','filename':'IMG'}}",
    "json:{'driver': 'qcow2', 'file': {'driver': 'blkdebug', 'image': {'driver': 'file', "
    "'filename': 'IMG'}, 'set-state': [{'event': 'read_aio', 'new_state': 42}]}}",
])
def test_json_names_like_qemu_img(ours, tmp_path, name):
    mkimg(tmp_path / "b.qcow2")
    img = tmp_path / "t.qcow2"
    mkimg(img, "1M", "-b", "b.qcow2", "-F", "qcow2")
    qemu_io(img, "write -P 5 64k 64k")
    name = name.replace("IMG", str(img))
    for args in (["info", name], ["map", "--output=json", name], ["check", name]):
        theirs, mine = both(ours, *args)
        assert mine.returncode == theirs.returncode == 0, mine.stderr
        if "blkdebug" not in name or args[0] == "map":
            assert mine.stdout == theirs.stdout


@pytest.mark.parametrize("opts", ["driver=qcow2,file.driver=file,file.filename=IMG",
                                  "driver=blkdebug,image.driver=qcow2,image.file.driver=file,"
                                  "image.file.filename=IMG,align=4k"])
def test_image_opts_like_qemu_img(ours, tmp_path, opts):
    mkimg(tmp_path / "b.qcow2")
    img = tmp_path / "t.qcow2"
    mkimg(img, "1M", "-b", "b.qcow2", "-F", "qcow2")
    qemu_io(img, "write -P 5 64k 64k")
    opts = opts.replace("IMG", str(img))
    cmds = [["map", "--image-opts", opts], ["compare", "--image-opts", opts, opts]]
    if not opts.startswith("driver=blkdebug"):    # (qemu-img shows the filter node there)
        cmds.append(["info", "--backing-chain", "--image-opts", opts])
    for args in cmds:
        assert_same(*both(ours, *args))
    r = run(ours, "convert", "--image-opts", opts, tmp_path / "o.raw")
    assert r.returncode == 0, r.stderr
    assert run("qemu-img", "compare", img, tmp_path / "o.raw").returncode == 0


@pytest.mark.parametrize("name", [
    "json:{'driver':'qcow2','file':{'driver':'quorum','children':[]}}",
    "json:{'driver':'vmdk','file':{'driver':'file','filename':'x'}}",
    "json:{'driver':'qcow2','file':{'driver':'blkdebug','inject-error':[{'event':'read_aio'}],"
    "'image':{'driver':'file','filename':'x'}}}",
    "json:{'driver':'qcow2'",
])
def test_json_names_refused(ours, name):
    r = run(ours, "info", name)
    assert r.returncode == 1 and r.stderr.count("\n") == 1 and "Traceback" not in r.stderr


def test_file_protocol_prefix_like_qemu_img(ours, tmp_path):
    """file:PATH names a file whose name has colons (shown as ./a:b when the colon
    comes before any slash)."""
    res = []
    for prog in ("qemu-img", ours):
        d = tmp_path / ("t" if prog == "qemu-img" else "o")
        d.mkdir()
        out = [run(prog, "create", "-f", "qcow2", "base.qcow2", "1M", cwd=d),
               run(prog, "create", "-f", "qcow2", "-b", "base.qcow2", "-F", "qcow2",
                   "file:image:top.qcow2", cwd=d),
               run(prog, "info", "file:image:top.qcow2", cwd=d),
               run(prog, "create", "-f", "qcow2", f"file:{d}/a:b.qcow2", "1M", cwd=d)]
        res.append([(r.returncode, "".join(ln for ln in r.stdout.replace(str(d), "D")
                                           .splitlines(True) if "disk size" not in ln),
                     r.stderr) for r in out])
        assert (d / "a:b.qcow2").exists() and (d / "image:top.qcow2").exists()
    assert res[1] == res[0]


@pytest.mark.parametrize("args", [
    ["-f", "qcow2", "-o", "preallocation=off,extent_size_hint=0", "x.img", "64M"],
    ["-f", "qcow2", "-o", "preallocation=metadata,extent_size_hint=0", "x.img", "64M"],
    ["-f", "raw", "-o", "extent_size_hint=1M", "x.img", "1M"],
    ["-f", "qcow2", "-o", "nocow=on", "x.img", "1M"],
    ["-f", "qcow2", "-o", "extent_size_hint=foo", "x.img", "1M"],
])
def test_create_protocol_hints_like_qemu_img(ours, tmp_path, args):
    theirs, mine = both(ours, "create", *args, cwd=tmp_path,
                        setup=lambda: (tmp_path / "x.img").unlink(missing_ok=True))
    assert_same(theirs, mine)
    if theirs.returncode == 0:
        assert os.path.getsize(tmp_path / "x.img") > 0


@pytest.mark.parametrize("sparse", ["512", "0"])
def test_convert_from_null_co_like_qemu_img(ours, tmp_path, sparse):
    src = "json:{ 'driver': 'null-co', 'size': 1048576, 'read-zeroes': true }"
    maps = []
    for prog, name in (("qemu-img", "t.qcow2"), (ours, "o.qcow2")):
        r = run(prog, "convert", "-O", "qcow2", "-S", sparse, src, tmp_path / name)
        assert r.returncode == 0, r.stderr
        maps.append(_map(tmp_path / name))
    assert maps[1] == maps[0]


@pytest.mark.parametrize("args", [
    ["--start-offset=64k", "--max-length=128k", "--output=json"],
    ["--start-offset=100", "--max-length=1000", "--output=json"],
    ["--start-offset=2M", "--output=json"], ["--start-offset=2M"],
    ["--start-offset=32k", "--max-length=100k"],
    ["--start-offset=foo"], ["--max-length=-1"],
])
def test_map_range_like_qemu_img(ours, tmp_path, args):
    mkimg(tmp_path / "b.qcow2")
    img = tmp_path / "t.qcow2"
    mkimg(img, "1M", "-b", "b.qcow2", "-F", "qcow2")
    qemu_io(tmp_path / "b.qcow2", "write -P 1 0 64k")
    qemu_io(img, "write -P 5 64k 64k", "write -z 192k 64k")
    assert_same(*both(ours, "map", *args, img))


def test_snapshot_list_empty_like_qemu_img(ours, tmp_path):
    mkimg(tmp_path / "t.qcow2")
    assert_same(*both(ours, "snapshot", "-l", tmp_path / "t.qcow2"))


@pytest.mark.parametrize("out_format", ["raw", "qcow2"])
def test_convert_salvage_like_qemu_img(ours, tmp_path, out_format):
    """--salvage: a compressed cluster that does not decode is read sector by sector,
    each unreadable sector reported and written as zeros, as qemu-img does."""
    import struct
    plain, comp = tmp_path / "p.qcow2", tmp_path / "c.qcow2"
    mkimg(plain)
    qemu_io(plain, "write -P 0x55 0 1M")
    subprocess.run(["qemu-img", "convert", "-c", "-O", "qcow2", str(plain), str(comp)],
                   check=True)
    data = bytearray(comp.read_bytes())
    l1 = struct.unpack_from(">Q", data, 40)[0]
    l2 = struct.unpack_from(">Q", data, l1)[0] & 0x00FFFFFFFFFFFE00
    entry = struct.unpack_from(">Q", data, l2 + 8)[0]       # guest cluster 1
    host = entry & ((1 << 54) - 1)
    data[host:host + 64] = b"\xaa" * 64
    comp.write_bytes(bytes(data))
    outs = []
    for prog, name in (("qemu-img", "t"), (ours, "o")):
        r = run(prog, "convert", "--salvage", "-O", out_format, comp, tmp_path / name)
        outs.append((r.returncode, r.stdout, r.stderr))
    assert outs[1] == outs[0] and outs[0][0] == 0 and outs[0][2].count("\n") == 128
    assert run("qemu-img", "compare", tmp_path / "t", tmp_path / "o").returncode == 0
    r = run(ours, "convert", "-O", out_format, comp, tmp_path / "x")
    assert r.returncode == 1 and not (tmp_path / "x").exists()


# -- every option qemu-img's usage lists: -t / -T / -r / --image-opts -----------------------

def _pair(tmp_path):
    """An overlay (data in its first 512 KiB) over a 1 MiB base."""
    base, top = tmp_path / "base.qcow2", tmp_path / "top.qcow2"
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(base), "1M"], check=True)
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", "-b", "base.qcow2", "-F", "qcow2",
                    str(top)], check=True)
    assert subprocess.run(["qemu-io", "-c", "write -P 5 0 512k", str(top)],
                          capture_output=True).returncode == 0
    return base, top


@pytest.mark.parametrize("args", [
    ["convert", "-r", "1x", "-O", "raw", "IMG", "OUT"],
    ["convert", "-r", "99999999999999999999", "-O", "raw", "IMG", "OUT"],
    ["convert", "-r", "-5", "-O", "raw", "IMG", "OUT"],
    ["commit", "-r", "12q", "TOP"],
    ["commit", "-t", "bogus", "TOP"],
    ["rebase", "-t", "bogus", "-u", "-b", "base.qcow2", "-F", "qcow2", "TOP"],
    ["rebase", "-T", "bogus", "-u", "-b", "base.qcow2", "-F", "qcow2", "TOP"],
    ["check", "-T", "bogus", "IMG"],
    ["amend", "-t", "bogus", "-o", "lazy_refcounts=on", "IMG"],
    ["commit", "--image-opts", "-f", "qcow2", "driver=qcow2,file.filename=TOP"],
])
def test_cache_rate_and_image_opts_errors_like_qemu_img(ours, tmp_path, args):
    base, top = _pair(tmp_path)
    names = {"IMG": str(base), "TOP": str(top), "OUT": str(tmp_path / "out.raw")}
    args = [names.get(a, a).replace("TOP", str(top)) for a in args]
    theirs, mine = both(ours, *args)
    assert theirs.returncode != 0
    assert_same(theirs, mine)
    assert not (tmp_path / "out.raw").exists()


@pytest.mark.parametrize("cache", ["none", "writeback", "unsafe", "writethrough", "directsync"])
def test_commit_rebase_amend_take_cache_modes(ours, tmp_path, cache):
    base, top = _pair(tmp_path)
    r = run(ours, "commit", "-t", cache, "-r", "1G", "-d", top)
    assert r.returncode == 0 and r.stdout == "Image committed.\n", r.stderr
    r = run(ours, "rebase", "-t", cache, "-T", cache, "-b", "", top)
    assert r.returncode == 0, r.stderr
    r = run(ours, "amend", "-t", cache, "-o", "lazy_refcounts=on", base)
    assert r.returncode == 0, r.stderr
    r = run(ours, "check", "-T", cache, base)
    assert r.returncode == 0, r.stdout + r.stderr
    assert info(base)["format-specific"]["data"]["lazy-refcounts"] is True
    assert info(top).get("backing-filename") is None
    want = tmp_path / "want.raw"
    want.write_bytes(b"\x05" * (512 << 10) + bytes(512 << 10))
    for img in (base, top):
        c = subprocess.run(["qemu-img", "compare", str(img), str(want)], capture_output=True)
        assert c.returncode == 0, c.stdout
        assert subprocess.run(["qemu-img", "check", str(img)], capture_output=True).returncode == 0


def test_commit_and_bitmap_take_image_opts(ours, tmp_path):
    base, top = _pair(tmp_path)
    r = run(ours, "commit", "--image-opts", "-r", "64M", f"driver=qcow2,file.filename={top}")
    assert r.returncode == 0 and r.stdout == "Image committed.\n", r.stderr
    want = tmp_path / "want.raw"
    want.write_bytes(b"\x05" * (512 << 10) + bytes(512 << 10))
    assert subprocess.run(["qemu-img", "compare", str(base), str(want)]).returncode == 0
    r = run(ours, "bitmap", "--add", "--image-opts", f"driver=qcow2,file.filename={base}", "b0")
    assert r.returncode == 0, r.stderr
    bitmaps = info(base)["format-specific"]["data"]["bitmaps"]
    assert [b["name"] for b in bitmaps] == ["b0"]


@pytest.mark.parametrize("out_args", [["-O", "raw"], ["-O", "qcow2"], ["-O", "qcow2", "-c"]])
def test_convert_rate_limited_output_is_the_same(ours, tmp_path, out_args):
    # -r paces the copy (RateLimit, tested with a fake clock in test_ops_progress); the
    # output is what an unlimited convert writes
    base, top = _pair(tmp_path)
    a, b = tmp_path / "a.img", tmp_path / "b.img"
    assert run(ours, "convert", "-r", "1G", *out_args, top, a).returncode == 0
    assert run(ours, "convert", *out_args, top, b).returncode == 0
    fmt = out_args[1]
    c = subprocess.run(["qemu-img", "compare", "-f", fmt, "-F", fmt, str(a), str(b)],
                       capture_output=True)
    assert c.returncode == 0, c.stdout
