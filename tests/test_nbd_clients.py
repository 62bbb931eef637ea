"""Our NBD server (``qcow2 nbd``) driven by clients we did not write: libnbd's
``nbdinfo`` and ``nbdcopy``, ``qemu-img`` and ``qemu-io`` (QEMU's NBD client).

Oracles: ``qemu-img map`` / ``convert -O raw`` / ``check`` on the files, and qemu-nbd
serving the same image (its ``nbdinfo --map`` must equal ours).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess

import pytest
from nbdserver import Server, nbd_map, qemu_map_as_nbd, run

pytestmark = pytest.mark.skipif(
    not (shutil.which("nbdinfo") and shutil.which("nbdcopy") and shutil.which("qemu-img")
         and shutil.which("qemu-nbd")),
    reason="needs libnbd-bin (nbdinfo, nbdcopy) and qemu-utils (apt-get install libnbd-bin "
           "qemu-utils)")

MiB = 1 << 20


def qemu_io(path, *cmds, fmt="qcow2", readonly=False):
    argv = ["qemu-io", "-f", fmt] + (["-r"] if readonly else [])
    for c in cmds:
        argv += ["-c", c]
    run(*argv, path)


def _pattern(n: int, seed: int) -> bytes:
    """Compressible but not trivial bytes."""
    line = b"".join(b"%08d qcow2 nbd line %d\n" % (seed * 1000 + i, i) for i in range(256))
    return (line * (n // len(line) + 1))[:n]


def _images(d) -> dict[str, tuple[str, str]]:
    """name -> (path, format) for every kind of image the server must get right."""
    imgs = {}
    p = str(d / "mixed.qcow2")
    run("qemu-img", "create", "-f", "qcow2", "-o", "cluster_size=65536", p, "32M")
    qemu_io(p, "write -P 0x11 0 256k", "write -c -P 0x22 1M 64k", "write -P 0x33 2M 512k",
            "write -z 2M 256k", "write -P 0x44 5124k 8k", "write -P 0x55 31M 1M")
    imgs["mixed"] = (p, "qcow2")

    base = str(d / "base.qcow2")
    run("qemu-img", "create", "-f", "qcow2", base, "24M")
    qemu_io(base, "write -P 0xaa 0 8M", "write -P 0xab 20M 64k")
    top = str(d / "top.qcow2")
    run("qemu-img", "create", "-f", "qcow2", "-b", base, "-F", "qcow2", top, "24M")
    qemu_io(top, "write -P 0xbb 1M 1M", "write -z 4M 1M", "write -P 0xbc 12M 100k")
    imgs["backing"] = (top, "qcow2")

    raw = d / "src.raw"
    with open(raw, "wb") as f:
        f.truncate(16 * MiB)
        for i, off in enumerate((0, 3 * MiB, 9 * MiB + 65536)):
            f.seek(off)
            f.write(_pattern(MiB + 4096, i))
    for algo in ("zlib", "zstd"):
        c = str(d / f"comp-{algo}.qcow2")
        run("qemu-img", "convert", "-c", "-O", "qcow2", "-o", f"compression_type={algo}",
            "-f", "raw", raw, c)
        imgs[f"compressed-{algo}"] = (c, "qcow2")
    imgs["raw"] = (str(raw), "raw")
    return imgs


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    return _images(tmp_path_factory.mktemp("nbdimg"))


KINDS = ["mixed", "backing", "compressed-zlib", "compressed-zstd", "raw"]


def _reference_raw(path, fmt, out):
    run("qemu-img", "convert", "-f", fmt, "-O", "raw", path, out)
    return out


@pytest.mark.parametrize("kind", KINDS)
def test_nbdinfo_size_and_map(images, kind, tmp_path):
    path, fmt = images[kind]
    size = json.loads(run("qemu-img", "info", "--output=json", path).stdout)["virtual-size"]
    with Server(path, tmp_path, "-r", "-t", "-e", "0", "-f", fmt) as ours, \
            Server(path, tmp_path, "-r", "-t", "-e", "0", "-f", fmt, kind="qemu",
                   tag="q") as qemu:
        assert int(run("nbdinfo", "--size", ours.uri).stdout) == size
        got = nbd_map(ours.uri)
        assert got == qemu_map_as_nbd(path)
        assert got == nbd_map(qemu.uri)
        assert ours.alive()


@pytest.mark.parametrize("kind", KINDS)
def test_nbdcopy_is_identical_and_sparse(images, kind, tmp_path):
    path, fmt = images[kind]
    ref = _reference_raw(path, fmt, tmp_path / "ref.raw")
    out = tmp_path / "out.raw"
    with Server(path, tmp_path, "-r", "-t", "-e", "0", "-f", fmt) as srv:
        run("nbdcopy", srv.uri, out)
    assert out.read_bytes() == ref.read_bytes()
    data = sum(n for _o, n, t in qemu_map_as_nbd(path) if not t & 2)
    assert os.stat(out).st_blocks * 512 <= data + MiB, "nbdcopy wrote the holes"


@pytest.mark.parametrize("kind", ["mixed", "backing", "compressed-zstd"])
def test_qemu_img_as_client(images, kind, tmp_path):
    path, fmt = images[kind]
    with Server(path, tmp_path, "-r", "-t", "-e", "0", "-f", fmt) as srv:
        run("qemu-img", "compare", "-f", fmt, "-F", "raw", path, srv.uri)
        conv = tmp_path / "conv.qcow2"
        run("qemu-img", "convert", "-f", "raw", "-O", "qcow2", srv.uri, conv)
        run("qemu-img", "compare", "-f", fmt, "-F", "qcow2", path, conv)
        assert qemu_map_as_nbd(srv.uri, "-f", "raw") == qemu_map_as_nbd(path)
    assert qemu_map_as_nbd(conv) == qemu_map_as_nbd(path), "convert through NBD lost sparseness"


# inside every image (16 MiB at least): unaligned, zeroes (keeping or dropping the
# allocation), FUA, over compressed clusters and backing data, asynchronous
QEMU_IO_WRITES = ["write -P 0x61 0 4k", "write -P 0x62 65000 70000", "write -z 256k 128k",
                  "write -P 0x63 1000k 2M", "write -z 3M 64k", "aio_write -P 0x64 9M 1M",
                  "aio_write -P 0x66 10M 1M", "aio_flush", "write -P 0x65 15M 1M",
                  "write -f -P 0x67 5M 64k", "write -z -u 6M 128k", "write -z 7M 4k", "flush"]


@pytest.mark.parametrize("kind", ["mixed", "backing", "compressed-zstd", "raw"])
def test_qemu_io_writes_through_the_export(images, kind, tmp_path):
    src, fmt = images[kind]
    path = tmp_path / f"w.{fmt}"
    expect = tmp_path / f"expect.{fmt}"
    for p in (path, expect):
        shutil.copy(src, p)          # (the backing file is named by its absolute path)
    with Server(path, tmp_path, "-f", fmt) as srv:
        qemu_io(srv.uri, *QEMU_IO_WRITES, fmt="raw")
        assert srv.wait() == 0              # not persistent: ends with its client
    qemu_io(expect, *QEMU_IO_WRITES, fmt=fmt)
    if fmt == "qcow2":
        r = run("qemu-img", "check", path, check=False)
        assert r.returncode == 0, r.stdout + r.stderr
    run("qemu-img", "compare", "-f", fmt, "-F", fmt, expect, path)


def test_nbdcopy_into_a_writable_export_with_multi_conn(images, tmp_path):
    src, _fmt = images["raw"]
    path = tmp_path / "dst.qcow2"
    run("qemu-img", "create", "-f", "qcow2", path, "16M")
    with Server(path, tmp_path, "-e", "0", "-t") as srv:
        info = json.loads(run("nbdinfo", "--json", srv.uri).stdout)["exports"][0]
        assert info["can_multi_conn"] and info["can_fua"] and info["can_trim"]
        run("nbdcopy", "--connections=4", "--requests=16", src, srv.uri)
        run("qemu-img", "compare", "-f", "raw", "-F", "raw", src, srv.uri)
    r = run("qemu-img", "check", path, check=False)
    assert r.returncode == 0, r.stdout + r.stderr
    run("qemu-img", "compare", "-f", "raw", "-F", "qcow2", src, path)


def test_trim_and_detect_zeroes(tmp_path):
    path = tmp_path / "t.qcow2"
    run("qemu-img", "create", "-f", "qcow2", path, "8M")
    qemu_io(path, "write -P 0x7 0 4M")
    with Server(path, tmp_path, "--discard=unmap", "--detect-zeroes=unmap",
                "--cache=writethrough") as srv:
        qemu_io(srv.uri, "discard 0 1M", "write -P 0 2M 1M", "flush", fmt="raw")
        srv.wait()
    assert qemu_map_as_nbd(path)[:3] == [(0, MiB, 3), (MiB, MiB, 0), (2 * MiB, MiB, 3)]
    run("qemu-img", "check", path)


def test_snapshot_writes_go_to_a_temporary_overlay(images, tmp_path):
    src, _fmt = images["mixed"]
    path = tmp_path / "keep.qcow2"
    shutil.copy(src, path)
    before = path.read_bytes()
    tmpdir = tmp_path / "overlays"
    tmpdir.mkdir()
    srv = Server(path, tmp_path, "-s", "-t")
    srv_env = dict(os.environ, TMPDIR=str(tmpdir))
    with open(srv.log_path, "wb") as log:        # started by hand: its own TMPDIR
        srv.proc = subprocess.Popen(srv.argv(), stdout=log, stderr=log, env=srv_env)
    try:
        _wait_pid_file(srv)
        qemu_io(srv.uri, "write -P 0x99 0 1M", "flush", fmt="raw")
        qemu_io(srv.uri, "read -P 0x99 0 1M", fmt="raw")
        assert len(os.listdir(tmpdir)) == 1
    finally:
        srv.stop()
    assert path.read_bytes() == before
    assert os.listdir(tmpdir) == []


def _wait_pid_file(srv):
    import time
    for _ in range(3000):                   # a hang guard
        if os.path.exists(srv.pid_file):
            return
        assert srv.proc.poll() is None, srv.log()
        time.sleep(0.02)
    pytest.fail(f"no pid file: {srv.log()}")


def test_load_snapshot_serves_it_read_only(tmp_path):
    path = tmp_path / "s.qcow2"
    run("qemu-img", "create", "-f", "qcow2", path, "4M")
    qemu_io(path, "write -P 0x1 0 1M")
    run("qemu-img", "snapshot", "-c", "first", path)
    qemu_io(path, "write -P 0x2 0 2M")
    with Server(path, tmp_path, "-l", "first", "-t") as srv:
        info = json.loads(run("nbdinfo", "--json", srv.uri).stdout)["exports"][0]
        assert info["is_read_only"]
        qemu_io(srv.uri, "read -P 0x1 0 1M", "read -P 0 1M 3M", fmt="raw", readonly=True)
        r = subprocess.run(["qemu-io", "-f", "raw", "-c", "write 0 4k", srv.uri],
                           capture_output=True, text=True)
        assert "read-only" in (r.stdout + r.stderr).lower() or r.returncode != 0


def test_untrusted_export(images, tmp_path):
    path, _fmt = images["compressed-zstd"]
    with Server(path, tmp_path, "--untrusted", "-t") as srv:
        info = json.loads(run("nbdinfo", "--json", srv.uri).stdout)["exports"][0]
        assert info["is_read_only"]
        run("qemu-img", "compare", "-F", "raw", path, srv.uri)


def test_list_exports_and_description(images, tmp_path):
    path, _fmt = images["mixed"]
    with Server(path, tmp_path, "-r", "-t", "-D", "the mixed disk", name="mix") as srv:
        out = run("nbdinfo", "--list", "--json", f"nbd+unix:///?socket={srv.socket}").stdout
        exports = json.loads(out)["exports"]
        assert [(e["export-name"], e.get("description")) for e in exports] == \
            [("mix", "the mixed disk")]


def test_fork_and_pid_file(images, tmp_path):
    path, _fmt = images["mixed"]
    srv = Server(path, tmp_path, "-r", "-t", "--fork")
    r = subprocess.run(srv.argv(), capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    pid = int(open(srv.pid_file).read())
    try:
        assert int(run("nbdinfo", "--size", srv.uri).stdout) == 32 * MiB
    finally:
        os.kill(pid, 15)
        _wait_gone(pid)
    assert not os.path.exists(srv.pid_file)
    assert not os.path.exists(srv.socket)


def _wait_gone(pid):
    import time
    deadline = time.monotonic() + 60
    while True:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return
        if time.monotonic() > deadline:
            os.kill(pid, 9)
            return
        time.sleep(0.02)


def test_shared_one_client_at_a_time_no_multi_conn(images, tmp_path):
    path, _fmt = images["mixed"]
    with Server(path, tmp_path, "-r", "-t") as srv:
        info = json.loads(run("nbdinfo", "--json", srv.uri).stdout)["exports"][0]
        assert not info["can_multi_conn"]
        out = tmp_path / "o.raw"
        run("nbdcopy", srv.uri, out)        # one connection when multi-conn is off
        assert out.stat().st_size == 32 * MiB


def test_cli_refuses_bad_options(images, tmp_path):
    path, _fmt = images["mixed"]
    from helpers import cli
    for args in (["-k", tmp_path / "x.sock", "-p", "1"], ["-s", "-l", "x"], ["-e", "-1"]):
        r = cli("nbd", *args, path)
        assert r.returncode == 1 and r.stderr.count("\n") == 1, r.stderr
    r = cli("nbd", "-k", tmp_path / "x.sock", tmp_path / "missing.qcow2")
    assert r.returncode == 1 and "missing.qcow2" in r.stderr and r.stderr.count("\n") == 1
