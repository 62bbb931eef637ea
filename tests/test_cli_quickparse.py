"""``qcow2.cli.quickparse``: the command lines it parses without argparse give exactly
argparse's namespace; every other one it leaves to argparse (None)."""

from __future__ import annotations

import pytest

from qcow2.cli import COMMANDS, UsageError, build_parser
from qcow2.cli.getopt import reorder
from qcow2.cli.quickparse import quick_parse, spec_of

LINES = [
    ["info", "a.qcow2"], ["info", "--output=json", "a.qcow2"], ["info", "a", "--output", "json"],
    ["info", "--output=xml", "a"], ["info", "-U", "--backing-chain", "a"], ["info"],
    ["info", "a", "b"], ["info", "--out", "json", "a"], ["info", "-h"], ["info", "--help"],
    ["info", "-f", "qcow2", "a"], ["info", "-fqcow2", "a"], ["info", "-f=qcow2", "a"],
    ["info", "--force-share", "a"], ["info", "--untrusted", "--image-opts", "driver=raw"],
    ["info", "--bogus", "a"], ["info", "--backing-chain=1", "a"], ["info", "-Uf", "raw", "a"],
    ["info", "", "--output=json"], ["info", "-", "-f", "raw"], ["info", "--", "-a"],
    ["create", "-f", "qcow2", "x", "1G"], ["create", "x"], ["create"], ["create", "x", "1G", "2"],
    ["create", "-f", "qcow2", "-o", "backing_file=b,backing_fmt=qcow2", "-o", "size=1G", "x"],
    ["create", "-q", "-u", "-b", "b", "-F", "raw", "x", "1M"], ["create", "x", "-o", "help"],
    ["create", "-o", "-x", "y"], ["create", "-f"], ["create", "-qu", "x", "1M"],
    ["resize", "x", "2G"], ["resize", "x", "+1G"], ["resize", "--shrink", "x", "-1G"],
    ["resize", "--preallocation=full", "x", "2G"], ["resize", "--preallocation=bogus", "x", "1"],
    ["resize", "-q", "--image-opts", "driver=raw,file.filename=x", "1M"], ["resize", "x"],
    ["convert", "-O", "raw", "a", "b"], ["convert", "a", "b", "-O", "qcow2", "-c", "-p"],
    ["convert", "-m", "4", "-W", "a", "b"], ["convert", "-m", "x", "a", "b"], ["convert"],
    ["convert", "-t", "unsafe", "-T", "none", "-S", "0", "-o", "cluster_size=1M", "a", "b", "c"],
    ["convert", "-n", "--target-is-zero", "--target-image-opts", "a", "driver=raw"],
    ["convert", "-l", "snapshot.name=s", "-B", "base", "-F", "qcow2", "a", "b"],
    ["convert", "--bitmaps", "--skip-broken-bitmaps", "--salvage", "-C", "a", "b"],
    ["convert", "--max-output", "1G", "-U", "--untrusted", "a", "b"], ["convert", "-cpO", "raw"],
    ["check", "a"], ["check", "-r", "all", "a"], ["check", "-r", "leaks", "--output=json", "a"],
    ["map", "a"], ["map", "--output=json", "--start-offset=1M", "--max-length", "2M", "a"],
    ["compare", "a", "b"], ["compare", "-s", "-q", "-f", "raw", "-F", "qcow2", "a", "b"],
    ["measure", "--size", "1G", "-O", "qcow2"], ["measure", "-O", "qcow2", "a"], ["measure"],
    ["rebase", "-b", "", "a"], ["rebase", "-u", "-b", "x", "-F", "raw", "a"],
    ["commit", "a"], ["commit", "-d", "-b", "base", "a"],
    ["snapshot", "-l", "a"], ["snapshot", "-c", "s1", "a"], ["snapshot", "-l", "-c", "s", "a"],
    ["snapshot", "-a", "s", "-d", "t", "a"], ["amend", "-o", "compat=0.10", "a"], ["amend"],
    ["dd", "if=a", "of=b", "bs=1M"], ["dd", "-O", "raw", "if=a", "of=b"],
    ["bitmap", "--add", "a", "b0"], ["bitmap", "a", "b0"],
    ["nbd", "-r", "-p", "10810", "a"], ["nbd", "-p", "x", "a"], ["nbd", "--port", "1", "a"],
]


def _argparse(argv):
    parser = build_parser(argv[0])
    try:
        return vars(parser.parse_args(reorder(parser, argv)))
    except UsageError:
        return "error"
    except SystemExit:
        return "exit"


@pytest.mark.parametrize("argv", LINES, ids=" ".join)
def test_same_namespace_as_argparse(argv, capsys):
    try:
        quick = quick_parse(argv[0], argv)
    except UsageError:
        quick = "error"
    want = _argparse(argv)
    capsys.readouterr()
    if quick is None:
        return                          # argparse decides (and may accept)
    if quick == "error":
        assert want == "error"          # the getopt permutation's own usage error
        return
    assert vars(quick) == want
    assert list(vars(quick)) == list(want)


def test_plain_lines_skip_argparse():
    for argv in (["info", "--output=json", "a"], ["create", "-f", "qcow2", "-o", "size=1G", "x"],
                 ["resize", "x", "2G"], ["convert", "-O", "raw", "a", "b"], ["check", "a"],
                 ["map", "--output=json", "a"]):
        assert quick_parse(argv[0], argv) is not None, argv
    for argv in (["info", "-h"], ["info", "--out", "json", "a"], ["resize", "x", "-1G"],
                 ["convert", "-m", "x", "a", "b"], ["info", "--bogus", "a"]):
        assert quick_parse(argv[0], argv) is None, argv


def test_every_command_but_compute_is_recorded():
    for name in COMMANDS:
        spec = spec_of(name)
        assert (spec is None) == (name == "compute"), name


def test_plain_process_imports_no_argparse(tmp_path):
    import subprocess
    import sys
    code = ("import sys; from qcow2.cli import main; main(['info', '--output=json', sys.argv[1]]);"
            " bad = [m for m in ('argparse', 're', 'enum', 'json', 'signal') if m in sys.modules];"
            " sys.exit(1 if 'argparse' in bad else 0)")
    raw = tmp_path / "d.raw"
    raw.write_bytes(bytes(4096))
    out = subprocess.run([sys.executable, "-c", code, str(raw)], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr


# Modules a plain command must not import: each costs every CLI process 1-80 ms of
# start-up (threading 3.8, collections 1.7, typing 3, numpy 80), where the interpreter
# itself takes 10 ms.  qcow2.lightweight has what the start-up paths need instead.
_HEAVY = ("argparse", "re", "enum", "json", "typing", "threading", "collections",
          "contextlib", "dataclasses", "functools", "numpy", "cffi", "array")

_PROBE = """
import sys
from qcow2.cli import main
try:
    rc = main(sys.argv[2:])
except SystemExit as exc:
    rc = exc.code
with open(sys.argv[1], "w") as f:
    f.write(" ".join(m for m in {heavy!r} if m in sys.modules))
sys.exit(rc or 0)
"""


@pytest.mark.parametrize("argv", [
    ["create", "-q", "-f", "qcow2", "{d}/n.qcow2", "1G"],
    ["create", "-q", "-f", "qcow2", "-b", "{d}/a.qcow2", "-F", "qcow2", "{d}/o.qcow2"],
    ["info", "{d}/a.qcow2"],
    ["info", "--output=json", "{d}/a.qcow2"],
    ["check", "{d}/a.qcow2"],
    ["resize", "-q", "{d}/a.qcow2", "2G"],
    ["snapshot", "-c", "s1", "{d}/a.qcow2"],
    ["snapshot", "-l", "{d}/a.qcow2"],
    ["amend", "-o", "compat=v3", "{d}/a.qcow2"],
    ["rebase", "-u", "-b", "", "{d}/a.qcow2"],
], ids=lambda a: " ".join(a[:2]).replace("{d}/", ""))
def test_plain_commands_import_nothing_heavy(tmp_path, argv):
    import subprocess
    import sys
    import qcow2
    from qcow2 import create
    if argv[0] == "check" and qcow2.implementation == "python":
        pytest.skip("check's kernels are numpy in the Python twin (QCOW2_IMPL=python)")
    create(str(tmp_path / "a.qcow2"), 1 << 30)
    report = tmp_path / "modules"
    args = [a.format(d=tmp_path) for a in argv]
    out = subprocess.run([sys.executable, "-c", _PROBE.format(heavy=_HEAVY), str(report), *args],
                         capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert report.read_text() == "", f"{' '.join(argv[:2])} imported {report.read_text()}"


def test_quick_exit_flushes_everything(tmp_path):
    # A plain command leaves through os._exit (qcow2.cli.run): its whole output must
    # be out first, here ~200 KiB of map through a pipe, and its status kept.
    import json
    import subprocess
    import sys
    import qcow2
    path = str(tmp_path / "a.qcow2")
    qcow2.create(path, 1 << 30)
    with qcow2.open(path, "r+") as img:
        for i in range(0, 1 << 30, 1 << 20):
            img.pwrite(b"x", i)
    out = subprocess.run([sys.executable, "-m", "qcow2", "map", "--output=json", path],
                         capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    runs = json.loads(out.stdout)
    assert len(out.stdout) > 150_000 and len(runs) == 2048
    assert sum(r["length"] for r in runs) == 1 << 30
    bad = subprocess.run([sys.executable, "-m", "qcow2", "info", str(tmp_path / "none")],
                         capture_output=True, text=True)
    assert bad.returncode == 1 and bad.stdout == "" and len(bad.stderr.splitlines()) == 1
