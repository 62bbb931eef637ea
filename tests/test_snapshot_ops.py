"""snapshot -c/-a/-d/-l against a model: random writes and snapshot operations, then
qemu-img check is clean and every snapshot and the active layer read as the model."""

from __future__ import annotations

import json
import random
import shutil

import pytest

from helpers import cli, poke, run

import qcow2
from qcow2.ops import snapshot as snap

pytestmark = pytest.mark.skipif(shutil.which("qemu-img") is None, reason="qemu-img not installed")




@pytest.mark.parametrize("opts,seed", [("cluster_size=65536", 1), ("cluster_size=4096", 2),
                                       ("compat=0.10,cluster_size=4096", 3),
                                       ("cluster_size=65536,extended_l2=on", 4),
                                       ("cluster_size=512,refcount_bits=64", 5)])
def test_random_snapshot_operations(tmp_path, opts, seed):
    rng = random.Random(seed)
    size = 2 << 20
    p = tmp_path / "s.qcow2"
    run("qemu-img", "create", "-q", "-f", "qcow2", "-o", opts, str(p), str(size))
    model = bytearray(size)
    snaps: dict[str, bytes] = {}
    for step in range(40):
        op = rng.choice(["w", "w", "w", "c", "cz", "create", "apply", "delete"])
        if op in ("w", "c", "cz"):
            with qcow2.open(p, "r+") as img:
                cs = img.cluster_size
                if op == "w":
                    off = rng.randrange(size)
                    n = min(rng.randrange(1, 200000), size - off)
                    data = bytes([rng.randrange(1, 256)]) * n
                    img.pwrite(data, off)
                elif op == "c":
                    off = rng.randrange(size // cs) * cs
                    n = min(cs, size - off)
                    data = bytes([rng.randrange(1, 256)]) * n
                    img.write_compressed(data, off)
                else:
                    off = rng.randrange(size)
                    n = min(rng.randrange(1, 300000), size - off)
                    data = bytes(n)
                    img.write_zeroes(off, n)
            model[off:off + n] = data
        elif op == "create":
            name = f"s{step}"
            snap.create_snapshot(p, name)
            snaps[name] = bytes(model)
        elif op == "apply" and snaps:
            name = rng.choice(sorted(snaps))
            snap.apply_snapshot(p, name)
            model[:] = snaps[name]
        elif op == "delete" and snaps:
            name = rng.choice(sorted(snaps))
            snap.delete_snapshot(p, name)
            del snaps[name]
        r = run("qemu-img", "check", "--output=json", str(p), check=False)
        assert r.returncode == 0, (step, op, r.stdout, r.stderr)
    with qcow2.open(p) as img:
        assert img.pread(size, 0) == bytes(model)
    listed = {s["name"] for s in json.loads(run("qemu-img", "info", "--output=json",
                                                 str(p)).stdout).get("snapshots", [])}
    assert listed == set(snaps)
    for name, content in snaps.items():
        out = tmp_path / f"{name}.raw"
        run("qemu-img", "convert", "-l", name, "-O", "raw", str(p), str(out))
        assert out.read_bytes() == content, name


def test_cli_snapshot_commands_like_qemu(tmp_path):
    p = tmp_path / "a.qcow2"
    run("qemu-img", "create", "-q", "-f", "qcow2", str(p), "1M")
    run("qemu-io", "-c", "write -P 7 0 64k", str(p))
    assert cli("snapshot", "-c", "one", str(p)).returncode == 0
    run("qemu-img", "snapshot", "-c", "two", str(p))      # qemu's snapshot next to ours
    ours = cli("snapshot", "-l", str(p)).stdout
    theirs = run("qemu-img", "snapshot", "-l", str(p)).stdout
    assert ours == theirs
    run("qemu-io", "-c", "write -P 8 0 64k", str(p))
    assert cli("snapshot", "-a", "two", str(p)).returncode == 0
    with qcow2.open(p) as img:
        assert img.pread(4, 0) == b"\x07" * 4
    assert cli("snapshot", "-d", "one", str(p)).returncode == 0
    r = cli("snapshot", "-d", "nope", str(p))
    assert r.returncode == 1 and "snapshot not found" in r.stderr
    run("qemu-img", "snapshot", "-d", "two", str(p))
    run("qemu-img", "check", str(p))


def _table_past_eof(tmp_path, name: str, count: int):
    """A fresh image whose header says ``count`` snapshots at 16 MiB, past its end."""
    p = tmp_path / name
    run("qemu-img", "create", "-q", "-f", "qcow2", str(p), "64M")
    poke(p, 60, count.to_bytes(4, "big") + (16 << 20).to_bytes(8, "big"))
    return p


def test_snapshot_table_past_eof_reads_zeros(tmp_path):
    """qemu-img reads a snapshot table past the end of the file as zeros: it opens the
    image, lists the zeroed entries, and snapshot -c writes the table anew inside the
    file (check clean afterwards).  Untrusted mode still refuses such an image."""
    ours, theirs = (_table_past_eof(tmp_path, n, 2) for n in ("ours.qcow2", "theirs.qcow2"))
    assert cli("snapshot", "-l", ours).stdout == run("qemu-img", "snapshot", "-l",
                                                     str(theirs)).stdout
    with pytest.raises(qcow2.errors.Qcow2Error, match="past the end of the file"):
        qcow2.open(ours, untrusted=True)
    r = cli("snapshot", "-c", "x", ours)
    assert r.returncode == 0, r.stderr
    run("qemu-img", "check", str(ours))
    with qcow2.open(ours) as img:
        assert [s.name for s in img.snapshots_list] == ["", "", "x"]
        assert img.header.snapshots_offset < img.file_size


def test_snapshot_table_full(tmp_path):
    """65536 snapshots (here: a table past the end of the file, read as zeros) is the
    most the format allows: snapshot -c fails as qemu-img does and changes nothing."""
    p = _table_past_eof(tmp_path, "full.qcow2", 65536)
    before = p.read_bytes()
    r = cli("snapshot", "-c", "test", p)
    assert r.returncode == 1
    assert r.stderr.split(": ", 1)[1] == "Could not create snapshot 'test': -27 (File too large)\n"
    assert p.read_bytes() == before


@pytest.mark.parametrize("entry,message", [
    (0xBFFFFFFFFFFF0000, "-27 (File too large)"),
    (0x800000FFFFFF0000, "-11 (Resource temporarily unavailable)"),
])
def test_snapshot_of_uncounted_cluster_refused(tmp_path, entry, message):
    """An L2 entry pointing far past the end of the file has no refcount block: taking a
    snapshot would have to grow the refcount structure for it.  qemu-img fails there
    (EFBIG where the refcount table could not reach it, else EAGAIN); so do we, before
    anything changes: no dirty bit left, the file as it was, and the next try says the
    same."""
    p = tmp_path / "a.qcow2"
    run("qemu-img", "create", "-q", "-f", "qcow2", str(p), "64M")
    run("qemu-io", "-c", "write 0 512", str(p))
    poke(p, 0x40000, entry.to_bytes(8, "big"))
    before = p.read_bytes()
    for _ in range(2):
        r = cli("snapshot", "-c", "test", p)
        assert r.returncode == 1
        assert r.stderr.split(": ", 1)[1] == f"Could not create snapshot 'test': {message}\n"
        assert p.read_bytes() == before
