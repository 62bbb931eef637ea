"""The test cluster itself (scripts/ceph.sh, tests/cephcluster.py, the ``ceph`` fixture):
healthy, a usable ``rbd`` pool, cephx enforced, qemu-img's rbd driver reads and writes
through it (the oracle of the RBD store's tests), and a stop leaves no process behind.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import time
import uuid
from pathlib import Path

import cephcluster
import pytest


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # a zombie is gone for our purposes (its parent has not reaped it yet)
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


def _processes_mentioning(text: str) -> list[int]:
    found = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            cmdline = (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode(
                errors="replace")
        except OSError:
            continue
        if text in cmdline and _alive(int(proc.name)):
            found.append(int(proc.name))
    return found


def _image_name() -> str:
    return f"t-{uuid.uuid4().hex[:12]}"


def test_cluster_is_healthy(ceph):
    assert ceph.ceph("health").strip() == "HEALTH_OK"
    status = json.loads(ceph.ceph("status", "--format", "json"))
    assert status["osdmap"]["num_up_osds"] == 1
    assert status["osdmap"]["num_in_osds"] == 1
    assert status["mgrmap"]["available"]


def test_pool_is_rbd_with_size_one(ceph):
    pools = {p["pool_name"]: p
             for p in json.loads(ceph.ceph("osd", "pool", "ls", "detail", "--format", "json"))}
    assert ceph.pool in pools
    assert "rbd" in pools[ceph.pool]["application_metadata"]
    if ceph.dir is not None:                 # a cluster the script made
        assert pools[ceph.pool]["size"] == 1


def test_rbd_create_info_rm(ceph):
    name = _image_name()
    ceph.rbd("create", "--size", "64M", f"{ceph.pool}/{name}")
    try:
        info = json.loads(ceph.rbd("info", "--format", "json", f"{ceph.pool}/{name}"))
        assert info["size"] == 64 << 20
        assert name in ceph.rbd("ls", ceph.pool).split()
    finally:
        ceph.rbd("rm", "--no-progress", f"{ceph.pool}/{name}")
    assert name not in ceph.rbd("ls", ceph.pool).split()


def _env_without_keyring(ceph) -> dict[str, str]:
    env = dict(ceph.env)
    env.pop("CEPH_ARGS", None)
    return env


def test_cephx_refuses_a_wrong_key(ceph, tmp_path):
    bad = tmp_path / "bad.keyring"
    key = subprocess.run(["ceph-authtool", "--gen-print-key"], capture_output=True,
                         text=True, check=True, env={**os.environ, "CEPH_CONF": "/dev/null"}
                         ).stdout.strip()
    bad.write_text(f"[client.{ceph.user}]\n\tkey = {key}\n")
    env = _env_without_keyring(ceph)
    for cmd in (["ceph", "--connect-timeout", "10"], ["rbd"]):
        p = subprocess.run([*cmd, "-c", str(ceph.conf), "--id", ceph.user,
                            "--keyring", str(bad), "--client-mount-timeout", "10",
                            *(["health"] if cmd[0] == "ceph" else ["ls", ceph.pool])],
                           env=env, capture_output=True, text=True, timeout=60)
        assert p.returncode != 0, p.stdout
        assert "permission denied" in p.stderr.lower() or "(13)" in p.stderr, p.stderr
    # the right key, given the same way, is accepted
    p = subprocess.run(["ceph", "-c", str(ceph.conf), "--id", ceph.user, "--keyring",
                        str(ceph.keyring), "health"], env=env, capture_output=True,
                       text=True, timeout=60)
    assert p.returncode == 0, p.stderr


def test_cephx_is_required(ceph):
    env = _env_without_keyring(ceph)
    p = subprocess.run(["ceph", "-c", str(ceph.conf), "--id", ceph.user,
                        "--auth-client-required", "none", "--client-mount-timeout", "10",
                        "health"], env=env, capture_output=True, text=True, timeout=60)
    assert p.returncode != 0, p.stdout
    assert "permission denied" in p.stderr.lower(), p.stderr
    if ceph.dir is not None:                 # the script's daemons run with cephx only
        for option in ("auth_cluster_required", "auth_service_required",
                       "auth_client_required"):
            assert ceph.ceph("config", "show", "mon.a", option).strip() == "cephx"


def _qemu_img_rbd(ceph):
    qemu_img = shutil.which("qemu-img")
    if qemu_img is None:
        pytest.skip("qemu-img not installed (apt-get install qemu-utils)")
    return qemu_img


def test_qemu_img_writes_and_reads_rbd(ceph, tmp_path):
    """qemu-img (its rbd driver, Debian's qemu-block-extra) converts into and out of the
    pool: the bytes survive both ways, and holes stay holes in the RBD image."""
    qemu_img = _qemu_img_rbd(ceph)
    src = tmp_path / "src.raw"
    size = 24 << 20
    blocks = {0: os.urandom(1 << 20), 9 << 20: os.urandom(256 << 10),
              (24 << 20) - 4096: os.urandom(4096)}
    with open(src, "wb") as f:
        f.truncate(size)
        for off, data in blocks.items():
            f.seek(off)
            f.write(data)
    name = _image_name()
    dest = ceph.rbd_name(name)
    p = ceph.run(qemu_img, "convert", "-O", "raw", str(src), dest, check=False)
    if p.returncode != 0 and "Unknown protocol" in p.stderr:
        pytest.skip("qemu-img has no rbd driver (apt-get install qemu-block-extra)")
    assert p.returncode == 0, p.stderr
    try:
        info = json.loads(ceph.run(qemu_img, "info", "--output=json", dest).stdout)
        assert info["virtual-size"] == size
        back = tmp_path / "back.raw"
        ceph.run(qemu_img, "convert", "-O", "raw", dest, str(back))
        assert back.read_bytes() == src.read_bytes()
        exported = tmp_path / "exported.raw"
        ceph.rbd("export", "--no-progress", f"{ceph.pool}/{name}", str(exported))
        assert exported.read_bytes() == src.read_bytes()
        # qemu-img writes only data: the 4 MiB objects of the holes are never created
        # (librbd reports an object from its start to its last byte: `rbd diff` and
        # `rbd du --exact` count holes inside a written object)
        extents = json.loads(ceph.rbd("diff", "--format", "json", f"{ceph.pool}/{name}"))
        objects = {(e["offset"] + i) >> 22 for e in extents for i in (0, e["length"] - 1)}
        assert objects == {off >> 22 for off in blocks}, extents
        du = json.loads(ceph.rbd("du", "--exact", "--format", "json", f"{ceph.pool}/{name}"))
        assert du["images"][0]["used_size"] == sum(e["length"] for e in extents), du
    finally:
        ceph.rbd("rm", "--no-progress", f"{ceph.pool}/{name}")


def test_script_refuses_without_ceph(tmp_path):
    """No Ceph binaries: one clear line, non-zero, nothing started."""
    bin_dir = tmp_path / "bin"              # the usual tools, but no Ceph
    bin_dir.mkdir()
    for tool in ("bash", "mkdir", "rm", "cat", "tr", "sort", "sed", "awk", "grep", "tail",
                 "cut", "date", "seq", "sleep", "python3"):
        if shutil.which(tool):
            (bin_dir / tool).symlink_to(shutil.which(tool))
    env = {**os.environ, "PATH": str(bin_dir)}
    bash = shutil.which("bash")
    p = subprocess.run([bash, str(cephcluster.SCRIPT), "start", str(tmp_path / "c")],
                       env=env, capture_output=True, text=True, timeout=60)
    assert p.returncode == 2
    lines = p.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("ceph.sh: Ceph is not installed"), p.stderr
    assert "ceph-mon" in lines[0]


def test_second_cluster_side_by_side_and_stop_leaves_nothing(ceph, tmp_path_factory):
    """A second cluster starts beside the session's (ports picked free), works, and its
    stop ends every daemon it started, OSD and mgr before the mon; the session's
    cluster is untouched."""
    if cephcluster.missing_tools():
        pytest.skip("Ceph daemons not installed here (the session's cluster is remote)")
    directory = tmp_path_factory.mktemp("ceph2")
    t0 = time.monotonic()
    try:
        other = cephcluster.start(directory)
    except cephcluster.CephUnavailable as e:
        pytest.fail(f"a second cluster did not start: {e}")
    started = time.monotonic() - t0
    try:
        pids = other.pids()
        assert set(pids) == {"mon.a", "mgr.x", "osd.0"}
        assert all(_alive(pid) for pid in pids.values())
        assert other.conf.read_text() != ceph.conf.read_text()
        assert other.ceph("health").strip() == "HEALTH_OK"
        assert other.rbd("ls", other.pool) == ""
        # a running cluster is not started twice in the same folder
        again = subprocess.run(["bash", str(cephcluster.SCRIPT), "start", str(directory)],
                               capture_output=True, text=True, timeout=60)
        assert again.returncode != 0
        assert "already running" in again.stderr
    finally:
        other.stop()
    assert not [n for n, pid in pids.items() if _alive(pid)]
    assert _processes_mentioning(str(directory / "ceph.conf")) == []
    assert not list((directory / "run").glob("*.pid"))
    # a second stop is harmless; the session's cluster still answers
    cephcluster.stop(directory)
    assert ceph.ceph("health").strip() == "HEALTH_OK"
    print(f"second cluster started in {started:.1f} s")
