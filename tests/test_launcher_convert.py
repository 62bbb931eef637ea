"""The native ``qcow2 convert`` (``native/launcher/convert.c``): a plain local qcow2
into a new raw file, converted without Python; anything else, and any image it is not
sure of, handed to the Python command, which is the twin.

Every case runs both commands and compares the exit status, stdout, stderr and the
output file byte for byte (and with qemu-img's reading): corpus images, command-line
spellings, hostile L1/L2 tables and compressed clusters (hypothesis), a frame that does
not decode half-way through, locked images; and what a convert leaves in the folder
(nothing but the output, with the umask's mode)."""

from __future__ import annotations

import os
import struct
import subprocess
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from helpers import QemuIoWriter
from test_launcher import COMMAND, run_launcher, run_python

import corpus
import oracle

@pytest.fixture(scope="module")
def cmd() -> str:
    """The installed native command (skipped where it is the Python script)."""
    if COMMAND is None:
        pytest.skip("the qcow2 command is not installed")
    with open(COMMAND, "rb") as f:
        if f.read(4) != b"\x7fELF":
            if os.environ.get("QCOW2_REQUIRE_NATIVE", "") not in ("", "0"):
                pytest.fail("QCOW2_REQUIRE_NATIVE=1 but the qcow2 command is not native")
            pytest.skip("the native launcher was not built")
    return COMMAND


CORPUS = corpus.params(lambda c: not c.big and c.fmt == "qcow2")
#: what sends a corpus image to Python (every other one is converted natively)
HANDED_OFF = {"encrypted", "bitmaps", "data_file", "backing", "extended_l2", "dirty"}


def _convert_both(cmd, src, d: Path, *opts):
    """Both commands into d/native.raw and d/python.raw: (launcher's run, python's)."""
    for name in ("native.raw", "python.raw"):
        (d / name).unlink(missing_ok=True)
    ours = run_launcher(cmd, "convert", *opts, src, d / "native.raw")
    twin = run_python("convert", *opts, src, d / "python.raw")
    if "-p" in opts:                        # (the progress steps depend on the threads)
        assert ours.rc == twin.rc, ours.path
    else:
        assert (ours.rc, ours.out, ours.err.replace(b"native.raw", b"X")) == \
            (twin.rc, twin.out, twin.err.replace(b"python.raw", b"X")), ours.path
    assert (d / "native.raw").exists() == (d / "python.raw").exists()
    if (d / "native.raw").exists():
        assert _same_file(d / "native.raw", d / "python.raw")
    return ours, twin


def _same_file(a: Path, b: Path) -> bool:
    if a.stat().st_size != b.stat().st_size:
        return False
    with open(a, "rb") as fa, open(b, "rb") as fb:
        while True:
            x, y = fa.read(1 << 20), fb.read(1 << 20)
            if x != y:
                return False
            if not x:
                return True


def _native_env() -> dict:
    """This environment, traced, without QCOW2_IMPL (=python hands everything off)."""
    env = {k: v for k, v in os.environ.items() if k != "QCOW2_IMPL"}
    env["QCOW2_LAUNCHER_TRACE"] = "1"
    return env


def _leftovers(d: Path) -> list[str]:
    return sorted(p.name for p in d.iterdir() if p.name.startswith("."))


@pytest.mark.parametrize("case", CORPUS)
def test_corpus_converts_as_python(case, built, cmd, tmp_path):
    src = built.path
    ours, _ = _convert_both(cmd, src, tmp_path, "-t", "unsafe")
    native = not (case.features & HANDED_OFF) and case.id != "zero-size"
    assert (ours.path == "native") == native, ours.path
    if ours.rc == 0:
        assert oracle.raw_bytes(src) == (tmp_path / "native.raw").read_bytes()
    assert _leftovers(tmp_path) == []


@pytest.fixture(scope="module")
def zstd_image(tmp_path_factory):
    """A zstd image with plain, compressed, zero and unallocated clusters, 64 KiB
    clusters over three L2 tables' worth of guest space (1 MiB ... 2 GiB)."""
    d = tmp_path_factory.mktemp("conv")
    raw = d / "in.raw"
    with open(raw, "wb") as f:
        f.truncate(1 << 30)
        for off, n, b in ((0, 3 << 20, 0x41), (600 << 20, 1 << 20, 0x42),
                          ((1 << 30) - 70000, 70000, 0x43)):
            f.seek(off)
            f.write(os.urandom(n // 2) + bytes([b]) * (n - n // 2))
    img = d / "z.qcow2"
    subprocess.run(["qemu-img", "convert", "-c", "-O", "qcow2", "-o",
                    "compression_type=zstd", str(raw), str(img)], check=True)
    subprocess.run(["qemu-io", "-c", "write -P 0x44 5M 200k", "-c", "write -z 600M 64k",
                    "-c", "write -P 0 1M 64k", str(img)], check=True, capture_output=True)
    raw.unlink()
    return img


@pytest.mark.parametrize("opts", [
    [], ["-t", "unsafe"], ["-t", "none"], ["-t", "writeback"], ["-q", "-Oraw", "-fqcow2"],
    ["-U", "-O", "raw", "-f", "qcow2", "-t", "unsafe"], ["--force-share"],
])
def test_native_spellings(zstd_image, cmd, tmp_path, opts):
    ours, _ = _convert_both(cmd, zstd_image, tmp_path, *opts)
    assert ours.path == "native" and ours.rc == 0
    assert oracle.raw_bytes(zstd_image) == (tmp_path / "native.raw").read_bytes()
    assert _leftovers(tmp_path) == []


@pytest.mark.parametrize("opts", [
    ["-p"], ["-S", "0"], ["-m", "1"], ["-W"], ["-T", "none"], ["-t", "directsync"],
    ["-f", "raw"], ["-O", "qcow2"], ["-c", "-O", "qcow2"], ["--salvage"], ["-r", "1G"],
    ["--untrusted"], ["-t"],
])
def test_other_options_go_to_python(zstd_image, cmd, tmp_path, opts):
    ours, _ = _convert_both(cmd, zstd_image, tmp_path, *opts)
    assert ours.path.startswith("python")


def test_existing_destination_and_names_go_to_python(zstd_image, cmd, tmp_path):
    dst = tmp_path / "out.raw"
    dst.write_bytes(b"old")
    r = run_launcher(cmd, "convert", zstd_image, dst)
    assert r.path == "python: the destination exists" and r.rc == 0
    assert oracle.raw_bytes(zstd_image) == dst.read_bytes()
    r = run_launcher(cmd, "convert", zstd_image, tmp_path / "a:b.raw")
    assert r.path == "python: a file name that is not a plain path" and r.rc == 0
    (tmp_path / "a:b.raw").unlink()
    r = run_launcher(cmd, "convert", zstd_image, tmp_path / "missing" / "x.raw")
    assert r.path.startswith("python") and r.rc == 1
    assert _leftovers(tmp_path) == []


def test_output_mode_follows_the_umask(zstd_image, cmd, tmp_path):
    r = subprocess.run(["sh", "-c", 'umask 027 && exec "$0" convert -t unsafe "$1" "$2"',
                        cmd, str(zstd_image), str(tmp_path / "o.raw")],
                       env=_native_env(), capture_output=True)
    assert r.returncode == 0 and r.stderr.endswith(b"qcow2 launcher: native\n")
    assert (tmp_path / "o.raw").stat().st_mode & 0o777 == 0o640


def test_holes_where_python_leaves_them(zstd_image, cmd, tmp_path):
    """Zero blocks stay holes, as in the Python command's output (-S 4k)."""
    _convert_both(cmd, zstd_image, tmp_path, "-t", "unsafe")
    a, b = (os.stat(tmp_path / n).st_blocks for n in ("native.raw", "python.raw"))
    assert a == b


def _l2_of(data: bytes, index: int = 0) -> int:
    l1 = struct.unpack_from(">Q", data, 40)[0]
    return struct.unpack_from(">Q", data, l1 + 8 * index)[0] & 0x00FFFFFFFFFFFE00


def test_bad_frame_half_way_hands_off(zstd_image, cmd, tmp_path):
    """A compressed cluster that does not decode, found while converting: the native
    output is dropped and Python converts and reports (one line, exit 1)."""
    data = bytearray(zstd_image.read_bytes())
    l2 = _l2_of(data, 1)                        # the table of the second GiB... or first
    if not l2:
        l2 = _l2_of(data, 0)
    for i in range(8192):
        e = struct.unpack_from(">Q", data, l2 + 8 * i)[0]
        if e & (1 << 62) and i > 100:
            host = e & ((1 << 54) - 1)
            data[host + 8:host + 40] = bytes(range(32))
            break
    else:
        pytest.fail("no compressed cluster found")
    bad = tmp_path / "bad.qcow2"
    bad.write_bytes(bytes(data))
    out = tmp_path / "out"
    out.mkdir()
    ours, twin = _convert_both(cmd, bad, out, "-t", "unsafe")
    assert ours.path == "python: the native convert failed"
    assert ours.rc == 1 and ours.err.count(b"\n") == 1
    assert _leftovers(out) == [] and not (out / "native.raw").exists()


def test_locked_image_goes_to_python(zstd_image, cmd, tmp_path):
    with QemuIoWriter(zstd_image):
        r = run_launcher(cmd, "convert", "-t", "unsafe", zstd_image, tmp_path / "o")
        assert r.path == "python: the image is locked by another process", r.path
        assert r.rc == 1 and b"lock" in r.err
        r = run_launcher(cmd, "convert", "-U", "-t", "unsafe", zstd_image, tmp_path / "u")
        assert r.path == "native" and r.rc == 0


# -- hostile tables: whatever the bytes, the result is the Python command's ---------------

@pytest.fixture(scope="module")
def small_base(tmp_path_factory):
    """A 4 MiB zstd image with 4 KiB clusters: compressed, plain and zero clusters in
    two L2 tables, small enough to mutate at random."""
    d = tmp_path_factory.mktemp("small")
    raw = d / "in.raw"
    raw.write_bytes(os.urandom(300000) + b"\x55" * 700000 + bytes(1 << 20)
                    + os.urandom(5000))
    img = d / "s.qcow2"
    subprocess.run(["qemu-img", "convert", "-c", "-O", "qcow2", "-o",
                    "compression_type=zstd,cluster_size=4k", str(raw), str(img)], check=True)
    subprocess.run(["qemu-img", "resize", "-q", str(img), "4M"], check=True)
    subprocess.run(["qemu-io", "-c", "write -P 7 3M 40k", "-c", "write -z 100k 8k",
                    str(img)], check=True, capture_output=True)
    data = img.read_bytes()
    l1 = struct.unpack_from(">Q", data, 40)[0]
    l2s = [struct.unpack_from(">Q", data, l1 + 8 * i)[0] & 0x00FFFFFFFFFFFE00
           for i in range(struct.unpack_from(">I", data, 36)[0])]
    return data, l1, [t for t in l2s if t]


@settings(max_examples=60, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.lists(st.tuples(st.sampled_from(["l1", "l2", "data", "any"]),
                          st.integers(0, 1 << 20), st.integers(0, 255)),
                min_size=1, max_size=5), st.integers(0, 2))
def test_hostile_tables_convert_as_python(small_base, cmd, tmp_path_factory, edits, cut):
    data, l1, l2s = small_base
    data = bytearray(data)
    for where, pos, value in edits:
        if where == "l1":
            at = l1 + pos % 16
        elif where == "l2":
            at = l2s[pos % len(l2s)] + pos % 4096
        elif where == "data":
            at = 0x30000 + pos % max(1, len(data) - 0x30000)
        else:
            at = pos % len(data)
        if at < len(data):
            data[at] = value
    if cut:
        data = data[:len(data) - [0, 777, 40000][cut]]
    d = tmp_path_factory.mktemp("hostile")
    (d / "h.qcow2").write_bytes(bytes(data))
    _convert_both(cmd, d / "h.qcow2", d, "-t", "unsafe")
    assert _leftovers(d) == []


@pytest.mark.parametrize("sig", ["SIGTERM", "SIGINT"])
def test_signal_mid_convert_leaves_nothing(cmd, tmp_path_factory, sig):
    """A signal ends a native convert as it ends Python's: the process dies of it and
    leaves nothing (the output is an anonymous file until its name is given)."""
    import signal
    import time
    d = tmp_path_factory.mktemp("sig")
    img = d / "big.qcow2"
    raw = d / "in.raw"
    with open(raw, "wb") as f:
        block = b"".join(struct.pack(">Q", i * 2654435761) for i in range(8192))
        for i in range(384):
            f.write(block[i % 64:] + block[:i % 64])
    subprocess.run(["qemu-img", "convert", "-c", "-O", "qcow2", str(raw), str(img)],
                   check=True)
    raw.unlink()
    out = d / "out"
    out.mkdir()
    number = getattr(signal, sig)
    for _attempt in range(5):
        proc = subprocess.Popen([cmd, "convert", "-t", "writeback", str(img),
                                 str(out / "x.raw")], stderr=subprocess.PIPE,
                                env=_native_env(),
                                preexec_fn=lambda: signal.signal(number, signal.SIG_DFL))
        time.sleep(0.03)
        proc.send_signal(number)
        _, err = proc.communicate(timeout=120)
        if proc.returncode == -number:
            break
        (out / "x.raw").unlink(missing_ok=True)
    else:
        pytest.skip("the convert finished before the signal could be sent")
    assert b"python" not in err
    assert list(out.iterdir()) == []
