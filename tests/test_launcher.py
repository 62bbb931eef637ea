"""The native ``qcow2`` command (``native/launcher/``): ``qcow2 info`` of a
plain qcow2 file or a raw file answered without Python, printing exactly what the Python command
prints; every other command line, and every image it is not sure of, handed to the
Python command with the same arguments.

The Python command is the twin: every case runs both and compares stdout, stderr and
the exit status byte for byte -- corpus images, command-line spellings, images locked
by a writer, and hostile headers and snapshot tables (hypothesis)."""

from __future__ import annotations

import os
import re
import shutil
import struct
import subprocess
import sys
import time
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import corpus
from helpers import READ_LOCK_BYTE, lock_held

ROOT = Path(__file__).resolve().parent.parent
SOURCE = ROOT / "native" / "launcher" / "launcher.h"         # (its constants)
#: the launcher under test: the installed command, or QCOW2_LAUNCHER (tests/faults/
#: asan.sh builds one with the sanitizers)
COMMAND = (os.environ.get("QCOW2_LAUNCHER")
           or shutil.which("qcow2", path=os.path.dirname(sys.executable)))
PYTHON_COMMAND = [sys.executable, "-P", "-c",
                  "import sys; sys.argv[0] = 'qcow2'; from qcow2.cli import run; run()"]
#: the launcher's trace line: last when it answered, first when it handed off
TRACE = re.compile(rb"^qcow2 launcher: (native|python \((.*)\))\n", re.M)


def _is_native(path: str) -> bool:
    with open(path, "rb") as f:
        return f.read(4) == b"\x7fELF"


@pytest.fixture(scope="module")
def launcher() -> str:
    if COMMAND is None:
        pytest.skip("the qcow2 command is not installed")
    if not _is_native(COMMAND):
        if os.environ.get("QCOW2_REQUIRE_NATIVE", "") not in ("", "0"):
            pytest.fail("QCOW2_REQUIRE_NATIVE=1 but the installed qcow2 command is not the "
                        "native launcher")
        pytest.skip("the native launcher was not built: the qcow2 command is the Python "
                    "script")
    return COMMAND


def _env(**extra) -> dict:
    env = {k: v for k, v in os.environ.items()
           if k not in ("QCOW2_IMPL", "QCOW2_LAUNCHER_TRACE")}
    env.update(extra)
    return env


class Ran:
    def __init__(self, res: subprocess.CompletedProcess, path: str | None = None):
        self.rc, self.out, self.err, self.path = res.returncode, res.stdout, res.stderr, path

    def same(self):
        return (self.rc, self.out, self.err)


def run_launcher(launcher, *args, cwd=None, env=None) -> Ran:
    """The launcher, with its trace line (which path it took) taken off stderr."""
    res = subprocess.run([launcher, *map(str, args)], capture_output=True, cwd=cwd,
                         env=env or _env(QCOW2_LAUNCHER_TRACE="1"), timeout=60)
    m = TRACE.search(res.stderr)
    assert m, res.stderr
    if m.group(1) == b"native":
        path = "native"
        res.stderr = res.stderr[:m.start()]
    else:
        path = "python: " + m.group(2).decode()
        res.stderr = res.stderr[:m.start()] + res.stderr[m.end():]
    return Ran(res, path)


def run_python(*args, cwd=None) -> Ran:
    return Ran(subprocess.run([*PYTHON_COMMAND, *map(str, args)], capture_output=True, cwd=cwd,
                              env=_env(), timeout=60))


def both(launcher, *args, cwd=None) -> Ran:
    """Run both; assert they printed the same; the launcher's run (with its path)."""
    ours, twin = run_launcher(launcher, *args, cwd=cwd), run_python(*args, cwd=cwd)
    assert ours.same() == twin.same(), (args, ours.path)
    return ours


def qemu_img(*args, cwd=None):
    subprocess.run(["qemu-img", *map(str, args)], check=True, capture_output=True, cwd=cwd)


# -- corpus: every image qemu-img makes -----------------------------------------------------

CORPUS = corpus.params(lambda c: not c.big)
#: features the launcher leaves to Python (every other qcow2 image is answered natively)
HANDED_OFF = {"encrypted", "bitmaps", "data_file"}


@pytest.mark.parametrize("case", CORPUS)
def test_corpus_info_is_the_python_commands(case, built, launcher):
    native = case.fmt == "raw" or not (HANDED_OFF & case.features)
    for args in ([], ["--output=json"], ["-U", "--output", "human"], ["-f", "qcow2"],
                 ["-f", "raw", "--output=json"]):
        ran = both(launcher, "info", *args, built.path)
        if args[:2] == ["-f", "raw"] or (native and not (args == ["-f", "qcow2"]
                                                         and case.fmt == "raw")):
            assert ran.path == "native", (args, ran.path)
        else:
            assert ran.path.startswith("python"), (args, ran.path)


# -- images made here: every branch of the native path ---------------------------------------

@pytest.fixture(scope="module")
def images(tmp_path_factory, launcher):
    """name -> path of small images covering what the native path prints."""
    d = tmp_path_factory.mktemp("launcher")
    (d / "sub").mkdir()
    out = {}

    def make(name, *args):
        qemu_img("create", "-f", "qcow2", *args, d / name, "64M")
        out[name] = d / name

    make("v3.qcow2")
    make("v2.qcow2", "-o", "compat=0.10")
    make("lazy-zstd.qcow2", "-o", "lazy_refcounts=on,compression_type=zstd")
    make("xl2.qcow2", "-o", "extended_l2=on,cluster_size=128k,refcount_bits=64")
    make("c512.qcow2", "-o", "cluster_size=512,refcount_bits=1")
    make("c2m.qcow2", "-o", "cluster_size=2M")
    # (info opens no backing file: this one names a file that is not there)
    qemu_img("create", "-f", "qcow2", "-u", "-b", "v3.qcow2", "-F", "qcow2",
             d / "sub" / "rel.qcow2", "64M")
    out["sub/rel.qcow2"] = d / "sub" / "rel.qcow2"
    make("abs.qcow2", "-b", d / "v3.qcow2", "-F", "qcow2")
    make("snaps.qcow2")
    for tag in ("first", "second with spaces", "\"quoted\\"):
        qemu_img("snapshot", "-c", tag, d / "snaps.qcow2")
    make("snaps-v2.qcow2", "-o", "compat=0.10,cluster_size=4k")
    qemu_img("snapshot", "-c", "old", d / "snaps-v2.qcow2")
    make("dirty.qcow2", "-o", "lazy_refcounts=on")
    _set_incompat(d / "dirty.qcow2", 1)
    make("corrupt.qcow2")
    _set_incompat(d / "corrupt.qcow2", 2)
    make("weird name's \"$x\" [1].qcow2")
    # raw files, as the probe sees them (qcow2 magic with version 1 is the older qcow)
    for name, data in (("empty.raw", b""), ("odd.raw", b"\x01" * 1000001),
                       ("magic-only.raw", b"QFI\xfb\x00"),
                       ("qcow1.raw", b"QFI\xfb\x00\x00\x00\x01" + bytes(504))):
        (d / name).write_bytes(data)
        out[name] = d / name
    with open(d / "sparse.raw", "wb") as f:
        f.truncate(5 << 30)
    out["sparse.raw"] = d / "sparse.raw"
    return d, out


def _set_incompat(path, bits: int) -> None:
    with open(path, "r+b") as f:
        f.seek(72)
        old = struct.unpack(">Q", f.read(8))[0]
        f.seek(72)
        f.write(struct.pack(">Q", old | bits))


def test_made_images_are_answered_natively(images, launcher):
    d, made = images
    for name in made:
        for args in (["info", name], ["info", "--output=json", name], ["info", "-U", name],
                     ["info", f"./{name}"], ["info", str(d / name)]):
            ran = both(launcher, *args, cwd=d)
            assert ran.rc == 0 and ran.path == "native", (args, ran.path, ran.err)


def test_backing_names_and_the_actual_path(images, launcher):
    d, _ = images
    ran = both(launcher, "info", "sub/rel.qcow2", cwd=d)
    assert b"backing file: v3.qcow2 (actual path: sub/v3.qcow2)\n" in ran.out
    ran = both(launcher, "info", "--output=json", str(d / "sub" / "rel.qcow2"), cwd=d)
    assert f'"full-backing-filename": "{d}/sub/v3.qcow2"'.encode() in ran.out
    ran = both(launcher, "info", "abs.qcow2", cwd=d)
    assert f"backing file: {d}/v3.qcow2\n".encode() in ran.out


@pytest.mark.parametrize("tz", ["UTC", "America/New_York", "Asia/Kolkata"])
def test_snapshot_table_in_each_time_zone(images, launcher, tz, monkeypatch):
    d, _ = images
    monkeypatch.setenv("TZ", tz)
    for args in (["info", "snaps.qcow2"], ["info", "--output=json", "snaps.qcow2"],
                 ["info", "snaps-v2.qcow2"]):
        ran = both(launcher, *args, cwd=d)
        assert ran.path == "native" and (b"Snapshot list:" in ran.out
                                         or b'"snapshots": [' in ran.out)


# -- command lines -----------------------------------------------------------------------------

@pytest.mark.parametrize("args,path", [
    (["info", "-fqcow2", "v3.qcow2"], "native"),
    (["info", "v3.qcow2", "--output", "json", "-U"], "native"),
    (["info", "--force-share", "--output=human", "v3.qcow2"], "native"),
    (["info", "-f", "raw", "-f", "qcow2", "v3.qcow2"], "native"),
    (["info", "-f", "qcow2", "-f", "raw", "v3.qcow2"], "native"),
    (["info", "--output=json", "--output=human", "v3.qcow2"], "native"),
    (["info", "-f", "raw", "v3.qcow2"], "native"),
    (["info", "-f", "raw", "--output=json", "-U", "sparse.raw"], "native"),
    (["info", "-f", "luks", "v3.qcow2"], "python"),
    (["info", "-f", "qcow2", "odd.raw"], "python"),
    (["info", "--output=xml", "v3.qcow2"], "python"),
    (["info", "--out=json", "v3.qcow2"], "python"),
    (["info", "--backing-chain", "sub/rel.qcow2"], "python"),
    (["info", "--image-opts", "driver=qcow2,file.filename=v3.qcow2"], "python"),
    (["info", "v3.qcow2", "v2.qcow2"], "python"),
    (["info"], "python"),
    (["info", "-f"], "python"),
    (["info", "--output"], "python"),
    (["info", "--help"], "python"),
    (["info", "file:v3.qcow2"], "python"),
    (["info", "missing.qcow2"], "python"),
    (["info", "sub"], "python"),
    (["info", "-U", "--", "v3.qcow2"], "python"),
    (["check", "v3.qcow2"], "python"),
    (["--version"], "python"),
    ([], "python"),
])
def test_command_lines(images, launcher, args, path):
    d, _ = images
    ran = both(launcher, *args, cwd=d)
    assert ran.path.split(":")[0] == path, ran.path


def test_python_impl_hands_everything_off(images, launcher):
    d, _ = images
    ran = run_launcher(launcher, "info", "v3.qcow2", cwd=d,
                       env=_env(QCOW2_IMPL="python", QCOW2_LAUNCHER_TRACE="1"))
    assert ran.path == "python: QCOW2_IMPL=python"
    assert ran.same() == run_python("info", "v3.qcow2", cwd=d).same()


def test_error_lines_are_named_as_invoked(images, launcher, tmp_path):
    """Run as qemu-img (a link, as the iotests run it), the Python command it hands
    off to names itself qemu-img."""
    d, _ = images
    link = tmp_path / "qemu-img"
    link.symlink_to(launcher)
    ran = run_launcher(str(link), "info", "missing.qcow2", cwd=d)
    assert ran.rc == 1 and ran.err.startswith(b"qemu-img: Could not open 'missing.qcow2'")


def test_interpreter_beside_it_in_a_virtual_environment(tmp_path, launcher, images):
    """In a venv's bin folder, the launcher runs the interpreter beside it (a venv made
    from a wheel built elsewhere still runs its own)."""
    d, _ = images
    venv = tmp_path / "venv"
    (venv / "bin").mkdir(parents=True)
    (venv / "pyvenv.cfg").write_text("home = /usr/bin\n")
    shutil.copy(launcher, venv / "bin" / "qcow2")
    marker = tmp_path / "ran"
    py = venv / "bin" / os.path.basename(sys.executable)
    py.write_text(f"#!/bin/sh\ntouch {marker}\nexec {sys.executable} \"$@\"\n")
    py.chmod(0o755)
    ran = run_launcher(str(venv / "bin" / "qcow2"), "check", "v3.qcow2", cwd=d)
    assert ran.rc == 0 and marker.exists()


# -- locks -------------------------------------------------------------------------------------

def test_image_locked_by_a_writer(images, launcher):
    d, _ = images
    holder = subprocess.Popen(
        [sys.executable, "-P", "-c",
         "import sys, qcow2\nimg = qcow2.open(sys.argv[1], 'r+')\nprint('open', flush=True)\n"
         "sys.stdin.read()", str(d / "v3.qcow2")],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, env=_env())
    try:
        assert holder.stdout.readline() == b"open\n"
        ran = both(launcher, "info", "v3.qcow2", cwd=d)
        assert ran.rc == 1 and b"lock" in ran.err and ran.path.startswith("python")
        ran = both(launcher, "info", "-U", "v3.qcow2", cwd=d)
        assert ran.rc == 0 and ran.path == "native"
    finally:
        holder.stdin.close()
        holder.wait(timeout=30)


def test_reader_lock_is_qemus(images, launcher):
    """While the launcher's info runs no writer may open the image: its locks are
    QEMU's bytes (a reader lock taken here is seen by qemu-img as by our writer)."""
    d, _ = images
    img = d / "lockme.qcow2"
    shutil.copy(d / "v3.qcow2", img)
    # the launcher holds its locks until it has written everything: into a pipe filled
    # beforehand, its write waits there, locks held, until the pipe is read
    r, w = os.pipe()
    os.set_blocking(w, False)
    try:
        while True:
            os.write(w, b"x" * 65536)
    except BlockingIOError:
        pass
    os.set_blocking(w, True)
    proc = subprocess.Popen([launcher, "info", img.name], stdout=w, cwd=d,
                            env=_env(QCOW2_LAUNCHER_TRACE="1"), stderr=subprocess.PIPE)
    os.close(w)
    try:
        for _ in range(3000):                   # (a bounded wait, not a measurement)
            if lock_held(img, READ_LOCK_BYTE):
                break
            if proc.poll() is not None:
                pytest.fail("the launcher ended without holding its lock")
            time.sleep(0.01)
        else:
            pytest.fail("the launcher never took its lock")
        res = subprocess.run(["qemu-img", "resize", img.name, "+1M"], cwd=d,
                             capture_output=True, text=True)
        assert res.returncode != 0 and "lock" in res.stderr, res.stderr
    finally:
        with os.fdopen(r, "rb") as reader:
            out = reader.read()
        proc.wait(timeout=30)
    assert proc.returncode == 0 and out.endswith(b"extended l2: false\n")
    assert proc.stderr.read() == b"qcow2 launcher: native\n"
    assert not lock_held(img, READ_LOCK_BYTE)


# -- hostile headers ---------------------------------------------------------------------------

@pytest.fixture(scope="module")
def hostile_base(images):
    d, _ = images
    return (d / "snaps.qcow2").read_bytes()


# fields of the header and the first snapshot entry worth hitting hard
_HOT = [4, 7, 8, 15, 16, 19, 20, 23, 24, 31, 35, 39, 47, 55, 59, 63, 71, 72, 79, 87, 95, 99,
        103, 104]


@settings(max_examples=80, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.lists(st.tuples(st.one_of(st.sampled_from(_HOT), st.integers(0, 1023),
                                    st.integers(0, 1 << 20)),
                          st.integers(0, 255)), min_size=1, max_size=6),
       st.booleans(), st.integers(0, 3))
def test_hostile_images_print_what_python_prints(hostile_base, launcher, tmp_path_factory,
                                                 edits, json, cut):
    data = bytearray(hostile_base)
    snap_off = struct.unpack_from(">Q", data, 64)[0]
    for where, value in edits:
        if where >= 1024:                       # into the snapshot table
            where = snap_off + where % 512
        if where < len(data):
            data[where] = value
    if cut:                                     # and sometimes cut short
        data = data[:[len(data), 100, snap_off + 60, 4096][cut]]
    d = tmp_path_factory.mktemp("hostile")
    (d / "h.qcow2").write_bytes(bytes(data))
    args = ["info", "--output=json", "h.qcow2"] if json else ["info", "h.qcow2"]
    both(launcher, *args, cwd=d)


# -- the C constants are the engine's -------------------------------------------------------------

def test_constants_match_the_engine():
    from qcow2 import constants as C
    values: dict = {}
    for name, expr in re.findall(r"^#define (\w+)\s+(.+?)\s*(?:/\*.*)?$", SOURCE.read_text(),
                                 re.M):
        expr = re.sub(r"\b(0x[0-9A-Fa-f]+|\d+)(?:ull|u)\b", r"\1",
                      expr.replace("UINT64_MAX", str(2**64 - 1)))
        try:
            values[name] = eval(expr, {"__builtins__": {}}, dict(values))  # noqa: S307
        except (NameError, SyntaxError):
            continue                            # (not a number)
    checked = 0
    for name, value in values.items():
        if hasattr(C, name):
            want = getattr(C, name)
            if isinstance(want, bytes):
                want = int.from_bytes(want, "big")
            assert value == want, name
            checked += 1
    assert checked >= 30, checked
