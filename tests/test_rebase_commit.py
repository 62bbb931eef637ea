"""rebase and commit against qemu-img: same guest content, images check clean."""

from __future__ import annotations

import json
import shutil

import pytest

from helpers import clean, cli, info, run

pytestmark = pytest.mark.skipif(shutil.which("qemu-img") is None, reason="qemu-img not installed")






@pytest.fixture
def chain(tmp_path):
    """b1.raw <- o.qcow2, and an unrelated b2 (qcow2) of another content."""
    run("qemu-img", "create", "-q", "-f", "raw", str(tmp_path / "b1.raw"), "6M")
    run("qemu-io", "-f", "raw", "-c", "write -P 0x31 0 4M", "-c", "write -P 0x32 5M 1M",
        str(tmp_path / "b1.raw"))
    run("qemu-img", "create", "-q", "-f", "qcow2", str(tmp_path / "b2.qcow2"), "5M")
    run("qemu-io", "-c", "write -P 0x41 0 1M", "-c", "write -P 0x31 1M 1M",
        str(tmp_path / "b2.qcow2"))
    run("qemu-img", "create", "-q", "-f", "qcow2", "-b", "b1.raw", "-F", "raw",
        str(tmp_path / "o.qcow2"), "8M")
    run("qemu-io", "-c", "write -P 0x51 512k 100k", "-c", "write -z 3M 64k",
        "-c", "write -P 0x52 7M 4k", str(tmp_path / "o.qcow2"))
    return tmp_path


def snapshot_view(path, out):
    run("qemu-img", "convert", "-O", "raw", str(path), str(out))
    return out.read_bytes()


@pytest.mark.parametrize("new,fmt", [("b2.qcow2", "qcow2"), ("", None)])
def test_safe_rebase_keeps_guest_view(chain, new, fmt):
    o = chain / "o.qcow2"
    before = snapshot_view(o, chain / "before.raw")
    args = ["rebase", "-b", new] + (["-F", fmt] if fmt else []) + [str(o)]
    r = cli(*args, cwd=chain)
    assert r.returncode == 0, r.stderr
    clean(o)
    assert snapshot_view(o, chain / "after.raw") == before
    i = info(o)
    if new:
        assert i["backing-filename"] == new and i["backing-filename-format"] == fmt
    else:
        assert "backing-filename" not in i


def test_unsafe_rebase_only_changes_the_header(chain):
    o = chain / "o.qcow2"
    theirs = chain / "t.qcow2"
    shutil.copy(o, theirs)
    assert cli("rebase", "-u", "-b", "b2.qcow2", "-F", "qcow2", str(o)).returncode == 0
    run("qemu-img", "rebase", "-u", "-b", "b2.qcow2", "-F", "qcow2", str(theirs))
    run("qemu-img", "compare", str(o), str(theirs))
    assert info(o)["backing-filename"] == "b2.qcow2"
    clean(o)


def test_rebase_needs_format(chain):
    r = cli("rebase", "-b", "b2.qcow2", str(chain / "o.qcow2"))
    assert r.returncode == 1 and "backing format must be specified" in r.stderr


def test_nova_rebase_lines(chain):
    """nova: rebase -b BASE -F FMT (and -b "" to flatten), with absolute paths."""
    o = chain / "o.qcow2"
    before = snapshot_view(o, chain / "before.raw")
    r = cli("rebase", "-b", str(chain / "b2.qcow2"), "-F", "qcow2", str(o))
    assert r.returncode == 0, r.stderr
    r = cli("rebase", "-b", "", str(o))
    assert r.returncode == 0, r.stderr
    assert "backing-filename" not in info(o)
    assert snapshot_view(o, chain / "after.raw") == before
    clean(o)


@pytest.mark.parametrize("keep", [False, True])
def test_commit_into_raw_backing(chain, keep):
    o = chain / "o.qcow2"
    ours_view = snapshot_view(o, chain / "before.raw")
    args = ["commit"] + (["-d"] if keep else []) + [str(o)]
    r = cli(*args)
    assert r.returncode == 0 and "Image committed." in r.stdout, r.stderr
    b1 = (chain / "b1.raw").read_bytes()
    assert b1 == ours_view                     # base grown to 8M and holding everything
    clean(o)
    if not keep:
        m = json.loads(run("qemu-img", "map", "--output=json", str(o)).stdout)
        assert all(e["depth"] == 1 for e in m)  # top emptied
    assert snapshot_view(o, chain / "after.raw") == ours_view


def test_commit_through_a_chain_to_qcow2_base(tmp_path):
    run("qemu-img", "create", "-q", "-f", "qcow2", str(tmp_path / "base.qcow2"), "4M")
    run("qemu-io", "-c", "write -P 0x11 0 4M", str(tmp_path / "base.qcow2"))
    run("qemu-img", "create", "-q", "-f", "qcow2", "-b", "base.qcow2", "-F", "qcow2",
        str(tmp_path / "mid.qcow2"))
    run("qemu-io", "-c", "write -P 0x22 1M 1M", str(tmp_path / "mid.qcow2"))
    run("qemu-img", "create", "-q", "-f", "qcow2", "-b", "mid.qcow2", "-F", "qcow2",
        str(tmp_path / "top.qcow2"))
    run("qemu-io", "-c", "write -P 0x33 1536k 1M", "-c", "write -z 0 64k",
        str(tmp_path / "top.qcow2"))
    view = snapshot_view(tmp_path / "top.qcow2", tmp_path / "v.raw")
    r = cli("commit", "-b", str(tmp_path / "base.qcow2"), str(tmp_path / "top.qcow2"))
    assert r.returncode == 0, r.stderr
    for name in ("base.qcow2", "mid.qcow2", "top.qcow2"):
        clean(tmp_path / name)
    assert snapshot_view(tmp_path / "base.qcow2", tmp_path / "b.raw") == view


def test_commit_without_backing_fails(tmp_path):
    run("qemu-img", "create", "-q", "-f", "qcow2", str(tmp_path / "a.qcow2"), "1M")
    r = cli("commit", str(tmp_path / "a.qcow2"))
    assert r.returncode == 1 and "backing file" in r.stderr


def _three(d):
    """sub/base <- sub/mid <- sub/top (relative names), each layer with data."""
    s = d / "sub"
    s.mkdir()
    run("qemu-img", "create", "-q", "-f", "qcow2", s / "base.qcow2", "2M")
    run("qemu-io", "-c", "write -P 0x11 0 2M", s / "base.qcow2")
    run("qemu-img", "create", "-q", "-f", "qcow2", "-b", "base.qcow2", "-F", "qcow2",
        s / "mid.qcow2")
    run("qemu-io", "-c", "write -P 0x22 0 1M", s / "mid.qcow2")
    run("qemu-img", "create", "-q", "-f", "qcow2", "-b", "mid.qcow2", "-F", "qcow2",
        s / "top.qcow2")
    run("qemu-io", "-c", "write -P 0x33 512k 64k", s / "top.qcow2")


def _maps(d):
    return [run("qemu-img", "map", "--output=json", d / "sub" / n).stdout
            for n in ("base.qcow2", "mid.qcow2", "top.qcow2")]


@pytest.mark.parametrize("base", ["mid.qcow2", "sub/mid.qcow2", "{abs}/sub/mid.qcow2",
                                  "base.qcow2", "{abs}/sub/base.qcow2", None])
def test_commit_b_like_qemu_img(tmp_path, base):
    """-b implies -d (the top keeps its clusters, even onto its immediate backing
    file); a relative -b is looked up as each overlay resolves it."""
    results = []
    for who in ("theirs", "ours"):
        d = tmp_path / who
        d.mkdir()
        _three(d)
        args = ["commit"] + (["-b", base.format(abs=d)] if base else []) + ["sub/top.qcow2"]
        r = run("qemu-img", *args, cwd=d, check=False) if who == "theirs" else cli(*args, cwd=d)
        results.append((r.returncode, r.stdout, r.stderr.replace(str(d), "D")
                        .replace("qcow2: ", "qemu-img: ", 1), _maps(d)))
    assert results[1] == results[0]


@pytest.mark.parametrize("old_size", [None, "128k", "384k"])
def test_rebase_writes_like_qemu_img(tmp_path, old_size):
    """Differences are copied per sector; past the old backing file's end (or with no
    old backing file) they are written as zeros: zero clusters, as qemu-img leaves."""
    maps = []
    for who in ("theirs", "ours"):
        d = tmp_path / who
        d.mkdir()
        run("qemu-img", "create", "-q", "-f", "qcow2", d / "t.qcow2", "384k")
        if old_size:
            run("qemu-img", "create", "-q", "-f", "qcow2", d / "old.qcow2", old_size)
            run("qemu-io", "-c", "write -P 0x33 0 64k", d / "old.qcow2")
            run("qemu-img", "rebase", "-u", "-b", "old.qcow2", "-F", "qcow2", d / "t.qcow2")
        run("qemu-img", "create", "-q", "-f", "qcow2", d / "new.qcow2", "384k")
        run("qemu-io", "-c", "write -P 0x22 0 128k", "-c", "write -P 0x11 128k 64k",
            "-c", "write -P 0x11 256k 1k", "-c", "write -P 0x11 320k 64k", d / "new.qcow2")
        run("qemu-io", "-c", "write -P 0x22 0 64k", d / "t.qcow2")
        args = ["rebase", "-b", "new.qcow2", "-F", "qcow2", "t.qcow2"]
        r = run("qemu-img", *args, cwd=d) if who == "theirs" else cli(*args, cwd=d)
        assert r.returncode == 0, r.stderr
        clean(d / "t.qcow2")
        m = json.loads(run("qemu-img", "map", "--output=json", d / "t.qcow2").stdout)
        maps.append([{k: v for k, v in e.items() if k != "offset"} for e in m])
    assert maps[1] == maps[0]
    run("qemu-img", "compare", tmp_path / "theirs" / "t.qcow2", tmp_path / "ours" / "t.qcow2")
