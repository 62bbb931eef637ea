"""qemu-img's getopt argument order: options anywhere on the command line (GNU
permutation), ``--`` ends them, and ``resize`` takes a negative size as a size.  Each
command run with its options after the operands must print and write exactly what the
same command with its options first does."""

from __future__ import annotations

import hashlib
import json
import os

import pytest

from qcow2.cli import main
from qcow2.cli.getopt import permute, reorder


def _setup(d):
    """A small chain in ``d``: base.qcow2 (some data, a snapshot) <- top.qcow2, and
    data.raw."""
    assert main(["create", "-q", "-f", "qcow2", "base.qcow2", "4M"]) == 0
    assert main(["create", "-q", "-f", "raw", "data.raw", "4M"]) == 0
    with open(d / "data.raw", "r+b") as f:
        f.seek(65536)
        f.write(b"\x5a" * 70000)
    assert main(["convert", "-q", "-f", "raw", "-O", "qcow2", "data.raw", "base.qcow2"]) == 0
    assert main(["create", "-q", "-f", "qcow2", "-b", "base.qcow2", "-F", "qcow2",
                 "top.qcow2"]) == 0
    with open(d / "alt.raw", "wb") as f:
        f.truncate(4 << 20)


def _run(tmp_path, capsys, monkeypatch, name, argv):
    """``argv`` in a fresh directory holding ``_setup``'s files: exit status, stdout,
    stderr, and the digest of every file left (snapshot tables hold the time: those
    images are compared by their snapshot names)."""
    d = tmp_path / name
    d.mkdir()
    monkeypatch.chdir(d)
    _setup(d)
    capsys.readouterr()
    rc = main(argv)
    out, err = capsys.readouterr()
    files = {}
    for entry in sorted(os.listdir(d)):
        if argv[0] == "snapshot" and entry.endswith(".qcow2"):
            assert main(["info", "--output=json", entry]) == 0
            info = json.loads(capsys.readouterr()[0])
            files[entry] = [s["name"] for s in info.get("snapshots", [])]
        else:
            files[entry] = hashlib.sha256((d / entry).read_bytes()).hexdigest()
    return rc, out, err, files


CASES = {
    "create": (["create", "-f", "qcow2", "-b", "base.qcow2", "-F", "qcow2", "new.qcow2", "6M"],
               ["create", "-f", "qcow2", "-b", "base.qcow2", "new.qcow2", "-F", "qcow2", "6M"]),
    "create-o": (["create", "-f", "qcow2", "-o", "cluster_size=4k,lazy_refcounts=on",
                  "new.qcow2", "1M"],
                 ["create", "new.qcow2", "-o", "cluster_size=4k,lazy_refcounts=on", "1M",
                  "-f", "qcow2"]),
    "convert": (["convert", "-O", "raw", "top.qcow2", "out.raw"],
                ["convert", "top.qcow2", "-O", "raw", "out.raw"]),
    "convert-sources": (["convert", "-f", "raw", "-O", "qcow2", "-c", "data.raw", "alt.raw",
                         "out.qcow2"],
                        ["convert", "data.raw", "-f", "raw", "alt.raw", "-c", "out.qcow2",
                         "-O", "qcow2"]),
    "info": (["info", "--output=json", "--backing-chain", "top.qcow2"],
             ["info", "top.qcow2", "--output=json", "--backing-chain"]),
    "info-separate": (["info", "--output", "json", "top.qcow2"],
                      ["info", "top.qcow2", "--output", "json"]),
    "check": (["check", "-f", "qcow2", "--output=json", "top.qcow2"],
              ["check", "top.qcow2", "--output=json", "-f", "qcow2"]),
    "resize": (["resize", "-f", "qcow2", "base.qcow2", "8M"],
               ["resize", "base.qcow2", "-f", "qcow2", "8M"]),
    "resize-negative": (["resize", "--shrink", "-f", "raw", "data.raw", "-1M"],
                        ["resize", "data.raw", "--shrink", "-f", "raw", "-1M"]),
    "rebase": (["rebase", "-u", "-b", "", "top.qcow2"],
               ["rebase", "top.qcow2", "-u", "-b", ""]),
    "commit": (["commit", "-f", "qcow2", "-d", "top.qcow2"],
               ["commit", "top.qcow2", "-d", "-f", "qcow2"]),
    "compare": (["compare", "-f", "qcow2", "-F", "raw", "base.qcow2", "data.raw"],
                ["compare", "base.qcow2", "-F", "raw", "data.raw", "-f", "qcow2"]),
    "compare-differs": (["compare", "-s", "base.qcow2", "alt.raw"],
                        ["compare", "base.qcow2", "alt.raw", "-s"]),
    "measure": (["measure", "-O", "qcow2", "--output=json", "-o", "cluster_size=4k",
                 "top.qcow2"],
                ["measure", "top.qcow2", "-o", "cluster_size=4k", "--output=json",
                 "-O", "qcow2"]),
    "map": (["map", "--output=json", "-f", "qcow2", "top.qcow2"],
            ["map", "top.qcow2", "-f", "qcow2", "--output=json"]),
    "snapshot": (["snapshot", "-c", "s1", "base.qcow2"],
                 ["snapshot", "base.qcow2", "-c", "s1"]),
    "amend": (["amend", "-o", "lazy_refcounts=on", "base.qcow2"],
              ["amend", "base.qcow2", "-o", "lazy_refcounts=on"]),
}


@pytest.mark.parametrize("name", sorted(CASES))
def test_options_after_operands(tmp_path, capsys, monkeypatch, name):
    first, anywhere = CASES[name]
    a = _run(tmp_path, capsys, monkeypatch, "first", first)
    b = _run(tmp_path, capsys, monkeypatch, "anywhere", anywhere)
    assert a == b
    assert a[0] == (1 if name == "compare-differs" else 0), a


def test_dash_dash_ends_options(tmp_path, capsys, monkeypatch):
    """After ``--`` a ``-f`` is a file name: create sees three operands and refuses."""
    monkeypatch.chdir(tmp_path)
    assert main(["create", "-f", "raw", "x.raw", "--", "-f", "1M"]) == 1
    assert not (tmp_path / "x.raw").exists()
    assert main(["create", "-f", "raw", "--", "-f", "1M"]) == 0
    assert (tmp_path / "-f").stat().st_size == 1 << 20


def test_resize_negative_size(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert main(["create", "-q", "-f", "raw", "d.raw", "4M"]) == 0
    for argv in (["resize", "--shrink", "d.raw", "-1M"], ["resize", "d.raw", "--shrink", "-1M"],
                 ["resize", "d.raw", "--shrink", "--", "-1M"],
                 ["resize", "-f", "raw", "--shrink", "d.raw", "-512K"]):
        before = (tmp_path / "d.raw").stat().st_size
        assert main(argv) == 0, argv
        assert (tmp_path / "d.raw").stat().st_size == before - (1 << 20 if "-1M" in argv
                                                                else 512 << 10)
    assert main(["resize", "d.raw", "1M", "--shrink"]) == 0     # a positive size, options last
    assert (tmp_path / "d.raw").stat().st_size == 1 << 20


def test_permute_reorders_as_getopt():
    from qcow2.cli import build_parser
    parser = build_parser("convert")
    assert reorder(parser, ["convert", "a", "-O", "raw", "b", "-oA=1,B=2", "-p"]) == \
        ["convert", "-O", "raw", "-oA=1,B=2", "-p", "a", "b"]
    assert reorder(parser, ["convert", "a", "-cpO", "qcow2", "b"]) == \
        ["convert", "-cpO", "qcow2", "a", "b"]
    assert reorder(parser, ["convert", "a", "-o", "-x", "--", "-b", "c"]) == \
        ["convert", "-o-x", "--", "a", "-b", "c"]
    assert reorder(parser, ["convert", "-", "b"]) == ["convert", "-", "b"]
    sub = build_parser("info").commands["info"]
    assert permute(sub, ["x", "--output", "json", "--backing-chain"]) == \
        ["--output", "json", "--backing-chain", "x"]
    assert permute(sub, ["x", "--out", "json"]) == ["--out", "json", "x"]   # abbreviation


def test_errors_unchanged(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert main(["info", "x.qcow2", "--bogus"]) == 1
    assert "unrecognized arguments: --bogus" in capsys.readouterr()[1]
    assert main(["convert", "a", "-O"]) == 1
    assert "missing argument for option '-O'" in capsys.readouterr()[1]   # qemu-img's words
