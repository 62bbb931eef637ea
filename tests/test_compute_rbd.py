"""The compute flow with images_type=rbd, against the real Ceph cluster of the run.

Each test module gets its own pools (made and deleted here), so pool listings are
exact.  Checked with Ceph's own ``rbd`` tool and qemu-img (its rbd driver) as oracles:
content of every disk, clone parentage, sparseness (``rbd du --exact``), the second
spawn without a download, concurrent spawns importing once, failures leaving nothing,
glance ``rbd://`` sources, destroy with busy retries, the cache manager's age rules on
pool bases, and the one-line errors.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import threading
import time
import uuid

import pytest

from helpers import ImageServer

MiB = 1 << 20
QCOW2_CLI = [sys.executable, "-P", "-m", "qcow2"]
U1 = "11111111-2222-3333-4444-555555555555"
U2 = "11111111-2222-3333-4444-666666666666"
U3 = "11111111-2222-3333-4444-777777777777"


@pytest.fixture(scope="module")
def cluster(request):
    from qcow2.backends import rbd
    reason = rbd.unavailable_reason()
    if reason is not None:
        pytest.skip(f"RBD binding unavailable: {reason}")
    if not shutil.which("qemu-img") or not shutil.which("mkfs.ext4"):
        pytest.skip("qemu-img (the oracle) and e2fsprogs are needed")
    return request.getfixturevalue("ceph")


def _make_pool(cluster, stem: str) -> str:
    name = f"{stem}-{uuid.uuid4().hex[:8]}"
    cluster.ceph("osd", "pool", "create", name, "8", "8")
    cluster.rbd("pool", "init", name)
    return name


def _drop_pool(cluster, name: str) -> None:
    cluster.run("ceph", "osd", "pool", "delete", name, name,
                "--yes-i-really-really-mean-it", check=False)


@pytest.fixture
def pool(cluster):
    """A fresh pool for one test (cheap on the test cluster: well under a second)."""
    name = _make_pool(cluster, "compute")
    yield name
    _drop_pool(cluster, name)


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    """A 48 MiB raw disk holding an unpartitioned ext4 with files, and its qcow2."""
    d = tmp_path_factory.mktemp("rbdimages")
    raw = d / "img.raw"
    with open(raw, "wb") as f:
        f.truncate(48 * MiB)
    content = d / "content"
    (content / "etc").mkdir(parents=True)
    (content / "hello").write_bytes(os.urandom(3 * MiB))
    (content / "etc" / "motd").write_text("a small tree\n" * 100)
    subprocess.run(["mkfs.ext4", "-q", "-F", "-L", "root", "-d", str(content), str(raw)],
                   check=True)
    qc = d / "img.qcow2"
    subprocess.run(["qemu-img", "convert", "-O", "qcow2", "-c", str(raw), str(qc)], check=True)
    return {"raw": str(raw), "qcow2": str(qc), "bytes": raw.read_bytes()}


def opts_for(cluster, pool, tmp_path, **kw):
    from qcow2 import compute
    kw.setdefault("instances_path", str(tmp_path / "instances"))
    return compute.Options(images_type="rbd", images_rbd_pool=pool,
                           images_rbd_ceph_conf=str(cluster.conf), **kw)


def rbd_json(cluster, *args):
    return json.loads(cluster.rbd(*args, "--format", "json"))


def ls(cluster, pool) -> list[str]:
    return sorted(rbd_json(cluster, "ls", "-p", pool))


def content(cluster, pool, image, tmp_path, snap=None) -> bytes:
    """The image's bytes, read by qemu-img's rbd driver (the oracle)."""
    out = tmp_path / f"oracle-{uuid.uuid4().hex[:6]}.raw"
    at = f"@{snap}" if snap else ""
    cluster.run("qemu-img", "convert", "-f", "raw", "-O", "raw",
                f"rbd:{pool}/{image}{at}:conf={cluster.conf}", str(out))
    try:
        return out.read_bytes()
    finally:
        out.unlink()


def du_exact(cluster, pool, image) -> int:
    d = rbd_json(cluster, "du", "--exact", f"{pool}/{image}")
    return sum(i["used_size"] for i in d["images"] if i["name"] == image
               and "snapshot" not in i)


def sha(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


# -- options (no cluster) -------------------------------------------------------------------

def test_rbd_options_from_nova_conf(tmp_path):
    from qcow2 import compute
    conf = tmp_path / "nova.conf"
    conf.write_text("[DEFAULT]\ninstances_path = /x\n[libvirt]\nimages_type = rbd\n"
                    "images_rbd_pool = vms\nimages_rbd_ceph_conf = /etc/ceph/c.conf\n"
                    "rbd_user = nova\nrbd_connect_timeout = 3\n"
                    "rbd_destroy_volume_retries = 2\nrbd_destroy_volume_retry_interval = 1\n")
    o = compute.Options.from_file(conf)
    assert (o.backend, o.images_rbd_pool, o.images_rbd_ceph_conf, o.rbd_user,
            o.rbd_connect_timeout, o.rbd_destroy_volume_retries,
            o.rbd_destroy_volume_retry_interval) == ("rbd", "vms", "/etc/ceph/c.conf", "nova",
                                                     3, 2, 1)
    d = compute.Options(images_type="rbd")
    assert (d.images_rbd_pool, d.images_rbd_ceph_conf, d.rbd_user, d.rbd_connect_timeout,
            d.rbd_destroy_volume_retries, d.rbd_destroy_volume_retry_interval) == \
        ("rbd", None, None, 5, 12, 5)
    conf.write_text("[libvirt]\nimages_type = rbd\nimages_rbd_ceph_conf =\n")
    assert compute.Options.from_file(conf).images_rbd_ceph_conf is None


def test_rbd_refuses_force_raw_images_false():
    from qcow2 import compute
    from qcow2.errors import InvalidOptionError
    with pytest.raises(InvalidOptionError, match=r"images_type = rbd.*force_raw_images"):
        compute.Options(images_type="rbd", force_raw_images=False)
    for bad in ("", "a/b", "a@b"):
        with pytest.raises(InvalidOptionError, match="images_rbd_pool"):
            compute.Options(images_type="rbd", images_rbd_pool=bad)
    with pytest.raises(InvalidOptionError, match="rbd_connect_timeout"):
        compute.Options(images_type="rbd", rbd_connect_timeout=0)


# -- spawn ------------------------------------------------------------------------------------

def test_spawn_clones_the_pool_base(cluster, pool, images, tmp_path):
    from qcow2 import compute
    o = opts_for(cluster, pool, tmp_path)
    res = compute.spawn(o, U1, "img-a", images["qcow2"], 96 * MiB, disk_format="qcow2",
                        ephemeral_size=32 * MiB, swap_size=16 * MiB)
    base = compute.base_name("img-a")
    assert ls(cluster, pool) == sorted([base, f"{U1}_disk", f"{U1}_disk.local",
                                        f"{U1}_disk.swap"])
    assert res["base"].startswith(f"rbd:{pool}/{base}@snap") and res["base_format"] == "raw"
    assert res["disks"]["disk"]["path"].startswith(f"rbd:{pool}/{U1}_disk:")
    # the base: a protected snapshot, raw content of the image, only its data stored
    snaps = rbd_json(cluster, "snap", "ls", f"{pool}/{base}")
    assert [(s["name"], s["protected"]) for s in snaps] == [("snap", "true")]
    assert content(cluster, pool, base, tmp_path, "snap") == images["bytes"]
    data = sum(e["length"] for e in json.loads(subprocess.run(
        ["qemu-img", "map", "--output=json", images["raw"]], capture_output=True,
        text=True, check=True).stdout) if e["data"])
    assert du_exact(cluster, pool, base) <= data + 4 * MiB < 48 * MiB
    # the root disk: a clone of it, grown to the root size
    info = rbd_json(cluster, "info", f"{pool}/{U1}_disk")
    assert info["size"] == 96 * MiB
    assert (info["parent"]["pool"], info["parent"]["image"], info["parent"]["snapshot"]) == \
        (pool, base, "snap")
    assert content(cluster, pool, f"{U1}_disk", tmp_path) == \
        images["bytes"] + bytes(48 * MiB)
    assert du_exact(cluster, pool, f"{U1}_disk") == 0          # nothing copied
    # ephemeral and swap: imports of the host's bases (a file system / swap signature)
    eph = content(cluster, pool, f"{U1}_disk.local", tmp_path)
    assert len(eph) == 32 * MiB and eph[1024 + 56:1024 + 58] == b"\x53\xef"
    swap = content(cluster, pool, f"{U1}_disk.swap", tmp_path)
    assert len(swap) == 16 * MiB and swap[4096 - 10:4096] == b"SWAPSPACE2"
    # as nova's Rbd backend: no disk.info for RBD disks, the instance directory exists
    inst = os.path.join(o.instances_path, U1)
    assert os.path.isdir(inst) and not os.path.exists(os.path.join(inst, "disk.info"))
    subprocess.run(["qemu-img", "check", "-f", "raw",
                    f"rbd:{pool}/{U1}_disk:conf={cluster.conf}"], check=False)


def test_second_spawn_clones_without_download(cluster, pool, images, tmp_path):
    from qcow2 import compute
    o = opts_for(cluster, pool, tmp_path)
    s = ImageServer({"img.qcow2": open(images["qcow2"], "rb").read()})
    try:
        url = f"{s.base}/plain/img.qcow2"
        compute.spawn(o, U1, "img-b", url, 64 * MiB, checksum=sha(open(images["qcow2"],
                                                                       "rb").read()))
        assert s.hits == {"/plain/img.qcow2": 1}
        compute.spawn(o, U2, "img-b", url, 64 * MiB)
        assert s.hits == {"/plain/img.qcow2": 1}
    finally:
        s.close()
    base = compute.base_name("img-b")
    children = sorted(c["image"] for c in rbd_json(cluster, "children", f"{pool}/{base}@snap"))
    assert children == [f"{U1}_disk", f"{U2}_disk"]
    assert content(cluster, pool, f"{U2}_disk", tmp_path)[:48 * MiB] == images["bytes"]
    # the downloaded qcow2 went through a temporary file that is gone
    assert os.listdir(o.base_dir) == []


@pytest.mark.parametrize("route", ["plain", "chunked"])
def test_raw_over_http_streams_into_the_pool(cluster, pool, images, tmp_path, route):
    from qcow2 import compute
    o = opts_for(cluster, pool, tmp_path)
    body = images["bytes"]
    s = ImageServer({"img.raw": body})
    try:
        compute.spawn(o, U1, "img-c", f"{s.base}/{route}/img.raw", 48 * MiB,
                      disk_format="raw", checksum=sha(body))
    finally:
        s.close()
    base = compute.base_name("img-c")
    assert content(cluster, pool, base, tmp_path, "snap") == body
    assert du_exact(cluster, pool, base) < 24 * MiB            # zero blocks not written
    assert not os.path.exists(o.base_dir) or os.listdir(o.base_dir) == []


def test_failures_leave_nothing(cluster, pool, images, tmp_path, monkeypatch):
    from qcow2 import compute
    from qcow2.compute import rbddisks
    from qcow2.errors import UnsafeImageError
    o = opts_for(cluster, pool, tmp_path)
    body = images["bytes"]
    s = ImageServer({"img.raw": body, "img.qcow2": open(images["qcow2"], "rb").read()})
    try:
        for fmt in ("raw", "qcow2"):
            with pytest.raises(compute.ChecksumError):
                compute.spawn(o, U1, f"bad-{fmt}", f"{s.base}/plain/img.{fmt}", 64 * MiB,
                              checksum="sha256:" + "0" * 64)
            with pytest.raises(compute.DownloadError):
                compute.spawn(o, U1, f"drop-{fmt}", f"{s.base}/drop/img.{fmt}", 64 * MiB)
    finally:
        s.close()
    overlay = tmp_path / "overlay.qcow2"
    subprocess.run(["qemu-img", "create", "-f", "qcow2", "-b", images["raw"], "-F", "raw",
                    str(overlay)], check=True, capture_output=True)
    with pytest.raises(UnsafeImageError):
        compute.spawn(o, U1, "unsafe", str(overlay), 64 * MiB)
    with pytest.raises(compute.ComputeError, match="smaller than the image"):
        compute.spawn(o, U1, "img-d", images["raw"], 32 * MiB)
    assert ls(cluster, pool) == [compute.base_name("img-d")]   # the base stays cached
    # a failure after the clone removes the instance's images and directory

    def boom(*a, **k):
        raise compute.ToolError("mkswap failed")
    monkeypatch.setattr(rbddisks, "swap_base", boom)
    with pytest.raises(compute.ToolError):
        compute.spawn(o, U1, "img-d", images["raw"], 64 * MiB, ephemeral_size=16 * MiB,
                      swap_size=MiB)
    assert ls(cluster, pool) == [compute.base_name("img-d")]
    assert not os.path.exists(os.path.join(o.instances_path, U1))
    assert not os.path.exists(o.base_dir) or \
        [f for f in os.listdir(o.base_dir) if f.endswith(".part")] == []


def test_existing_disk_refused(cluster, pool, images, tmp_path):
    from qcow2 import compute
    o = opts_for(cluster, pool, tmp_path)
    compute.spawn(o, U1, "img-e", images["raw"], 64 * MiB)
    with pytest.raises(compute.ComputeError, match="already exists"):
        compute.spawn(o, U1, "img-e", images["raw"], 64 * MiB)
    assert len(rbd_json(cluster, "children", f"{pool}/{compute.base_name('img-e')}@snap")) == 1


def test_concurrent_spawns_import_once(cluster, pool, images, tmp_path):
    from qcow2 import compute
    o = opts_for(cluster, pool, tmp_path)
    s = ImageServer({"img.raw": images["bytes"]})
    errors = []

    def go(u):
        try:
            compute.spawn(o, u, "img-f", f"{s.base}/slow/img.raw", 64 * MiB)
        except Exception as exc:  # noqa: BLE001
            errors.append(exc)
    try:
        threads = [threading.Thread(target=go, args=(u,)) for u in (U1, U2, U3)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(120)
    finally:
        s.close()
    assert errors == []
    assert s.hits == {"/slow/img.raw": 1}
    assert len(ls(cluster, pool)) == 4


def test_import_race_between_hosts_keeps_one_base(cluster, pool, images, tmp_path,
                                                  monkeypatch):
    """Two hosts (two instances_paths: two lock directories) importing one image at
    once: the rename into place is atomic, the loser's copy is discarded."""
    from qcow2 import compute
    from qcow2.compute import rbdcache
    opts = [opts_for(cluster, pool, tmp_path / f"host{i}") for i in (1, 2)]
    barrier = threading.Barrier(2)
    real = rbdcache._finish
    errors = []

    def go(o, u):
        try:
            compute.spawn(o, u, "img-g", images["raw"], 64 * MiB)
        except Exception as exc:  # noqa: BLE001
            errors.append(exc)

    def finish(*a, **k):
        barrier.wait(30)                 # both imports done: both try to rename
        return real(*a, **k)
    monkeypatch.setattr(rbdcache, "_finish", finish)
    threads = [threading.Thread(target=go, args=(o, u))
               for o, u in zip(opts, (U1, U2), strict=True)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert errors == []
    base = compute.base_name("img-g")
    assert ls(cluster, pool) == sorted([base, f"{U1}_disk", f"{U2}_disk"])
    assert len(rbd_json(cluster, "children", f"{pool}/{base}@snap")) == 2


# -- glance images in Ceph ---------------------------------------------------------------------

def test_rbd_url_source_clones_directly(cluster, pool, images, tmp_path):
    from qcow2 import compute
    glance = _make_pool(cluster, "glance")
    try:
        cluster.rbd("import", images["raw"], f"{glance}/gimg")
        cluster.rbd("snap", "create", f"{glance}/gimg@snap")
        cluster.rbd("snap", "protect", f"{glance}/gimg@snap")
        fsid = cluster.ceph("fsid").strip()
        o = opts_for(cluster, pool, tmp_path)
        url = f"rbd://{fsid}/{glance}/gimg/snap"
        res = compute.spawn(o, U1, "gimg", url, 64 * MiB, checksum=sha(images["bytes"]))
        assert res["base"] == url
        assert ls(cluster, pool) == [f"{U1}_disk"]                # nothing imported
        parent = rbd_json(cluster, "info", f"{pool}/{U1}_disk")["parent"]
        assert (parent["pool"], parent["image"], parent["snapshot"]) == (glance, "gimg", "snap")
        assert content(cluster, pool, f"{U1}_disk", tmp_path)[:48 * MiB] == images["bytes"]
        with pytest.raises(compute.ComputeError, match="another Ceph cluster"):
            compute.spawn(o, U2, "gimg", f"rbd://{uuid.uuid4()}/{glance}/gimg/snap", 64 * MiB)
        with pytest.raises(compute.ComputeError, match="rbd://FSID/POOL/IMAGE/SNAP"):
            compute.spawn(o, U2, "gimg", f"rbd://{fsid}/{glance}/gimg", 64 * MiB)
        with pytest.raises(compute.ComputeError, match="no snapshot 'nosnap'"):
            compute.spawn(o, U2, "gimg", f"rbd://{fsid}/{glance}/gimg/nosnap", 64 * MiB)
        cluster.rbd("import", images["qcow2"], f"{glance}/qimg")
        cluster.rbd("snap", "create", f"{glance}/qimg@snap")
        with pytest.raises(compute.ImageFormatMismatchError, match="qcow2"):
            compute.spawn(o, U2, "qimg", f"rbd://{fsid}/{glance}/qimg/snap", 64 * MiB)
        assert ls(cluster, pool) == [f"{U1}_disk"]
        compute.destroy(o, U1)
    finally:
        cluster.run("rbd", "snap", "unprotect", f"{glance}/gimg@snap", check=False)
        _drop_pool(cluster, glance)


# -- destroy --------------------------------------------------------------------------------

_HOLDER = """
import sys, time
from qcow2.backends.rbd import RbdBackend
be = RbdBackend(sys.argv[1], pool=sys.argv[2], conf=sys.argv[3], writable=True)
print("open", flush=True)
time.sleep(float(sys.argv[4]))
be.close()
"""


def _hold(cluster, pool, image, seconds):
    """A client holding ``image`` open (a watcher, as a running guest) for a while."""
    p = subprocess.Popen([sys.executable, "-P", "-c", _HOLDER, image, pool, str(cluster.conf),
                          str(seconds)], stdout=subprocess.PIPE, text=True)
    assert p.stdout.readline().strip() == "open"
    return p


def test_destroy_removes_snapshots_and_retries_busy(cluster, pool, images, tmp_path):
    from qcow2 import compute
    o = opts_for(cluster, pool, tmp_path, rbd_destroy_volume_retries=1)
    compute.spawn(o, U1, "img-h", images["raw"], 64 * MiB, swap_size=MiB)
    compute.spawn(o, U2, "img-h", images["raw"], 64 * MiB)
    cluster.rbd("snap", "create", f"{pool}/{U1}_disk@nova-resize")
    cluster.rbd("snap", "protect", f"{pool}/{U1}_disk@nova-resize")
    holder = _hold(cluster, pool, f"{U2}_disk", 3600)
    try:
        with pytest.raises(compute.ComputeError, match="busy.*guest running.*tried 1 time"):
            compute.destroy(o, U2)
    finally:
        holder.kill()
        holder.wait()
    removed = compute.destroy(o, U1)
    assert sorted(r.split(":")[1] for r in removed if r.startswith("rbd:")) == \
        [f"{pool}/{U1}_disk", f"{pool}/{U1}_disk.swap"]
    assert not os.path.exists(os.path.join(o.instances_path, U1))
    # retried while the client still has it open, then removed
    o = o.replace(rbd_destroy_volume_retries=30, rbd_destroy_volume_retry_interval=1)
    holder = _hold(cluster, pool, f"{U2}_disk", 2)
    try:
        compute.destroy(o, U2)
    finally:
        holder.wait(60)
    assert ls(cluster, pool) == [compute.base_name("img-h")]


# -- the cache manager -----------------------------------------------------------------------

def test_manager_age_rules_on_pool_bases(cluster, pool, images, tmp_path):
    from qcow2 import compute
    day = 86400
    o = opts_for(cluster, pool, tmp_path)
    compute.spawn(o, U1, "img-i", images["raw"], 64 * MiB)
    compute.spawn(o, U2, "img-j", images["raw"], 64 * MiB)
    compute.destroy(o, U2)
    bi, bj = compute.base_name("img-i"), compute.base_name("img-j")
    # a stale temporary import (a killed import) and an image that is not ours
    cluster.rbd("create", "-s", "1M", f"{pool}/.{bj}.0123456789ab.part")
    cluster.rbd("create", "-s", "1M", f"{pool}/someone-elses")
    now = time.time()
    rep = compute.clean(o, now=now)["pool"]
    assert [r.split(":")[1] for r in rep["in_use"]] == [f"{pool}/{bi}"]
    assert [r.split(":")[1] for r in rep["too_young"]] == [f"{pool}/{bj}"]
    assert rep["removed"] == rep["stale_temporaries"] == []
    # a day later: the unused base goes (dry run first), the used one stays
    rep = compute.clean(o, now=now + day, dry_run=True)["pool"]
    assert [r.split(":")[1] for r in rep["would_remove"]] == [f"{pool}/{bj}"]
    assert [r.split(":")[1] for r in rep["stale_temporaries"]] == \
        [f"{pool}/.{bj}.0123456789ab.part"]
    assert bj in ls(cluster, pool)
    off = o.replace(remove_unused_base_images=False)
    assert [r.split(":")[1] for r in compute.clean(off, now=now + day)["pool"]["kept"]] == \
        [f"{pool}/{bj}"]
    rep = compute.clean(o, now=now + day)["pool"]
    assert [r.split(":")[1] for r in rep["removed"]] == [f"{pool}/{bj}"]
    assert ls(cluster, pool) == sorted([bi, f"{U1}_disk", "someone-elses"])
    # the base in use was touched: its age restarts at each pass
    got = cluster.rbd("image-meta", "get", f"{pool}/{bi}", "qcow2.last_used").strip()
    assert abs(float(got) - (now + day)) < 0.01
    compute.destroy(o, U1)
    assert compute.clean(o, now=now + 1.5 * day)["pool"]["too_young"] != []
    rep = compute.clean(o, now=now + 2 * day + 1)["pool"]
    assert [r.split(":")[1] for r in rep["removed"]] == [f"{pool}/{bi}"]
    assert ls(cluster, pool) == ["someone-elses"]
    # usage of the pool cache
    compute.spawn(o, U1, "img-i", images["raw"], 64 * MiB)
    u = compute.usage(o)["pool"]
    assert (u["pool"], u["count"], u["size"]) == (pool, 1, 48 * MiB)
    assert u["bases"][0]["clones"] == 1 and 0 < u["allocated"] < 48 * MiB


def test_cli_end_to_end(cluster, pool, images, tmp_path):
    conf = tmp_path / "nova.conf"
    conf.write_text(f"[DEFAULT]\ninstances_path = {tmp_path / 'inst'}\n[libvirt]\n"
                    f"images_type = rbd\nimages_rbd_pool = {pool}\n"
                    f"images_rbd_ceph_conf = {cluster.conf}\n")

    def cli(*args):
        return subprocess.run([*QCOW2_CLI, "compute", *args, "--config", str(conf)],
                              capture_output=True, text=True, timeout=300)
    p = cli("spawn", "--instance", U1, "--image", "img-k", "--source", images["qcow2"],
            "--root-size", "64M", "--swap-size", "1M", "-q")
    assert p.returncode == 0, p.stderr
    assert f"disk: rbd:{pool}/{U1}_disk:conf={cluster.conf} (raw)" in p.stdout
    p = cli("usage")
    assert p.returncode == 0 and f"pool {pool}: 1 bases" in p.stdout and "1 clones" in p.stdout
    p = cli("clean", "--dry-run")
    assert p.returncode == 0 and "pool base in use: rbd:" in p.stdout
    p = cli("destroy", "--instance", U1)
    assert p.returncode == 0 and f"removed rbd:{pool}/{U1}_disk:" in p.stdout
    conf.write_text(conf.read_text().replace(f"images_rbd_pool = {pool}",
                                             "images_rbd_pool = no-such-pool"))
    p = cli("spawn", "--instance", U1, "--image", "img-k", "--source", images["qcow2"],
            "--root-size", "64M", "-q")
    assert p.returncode != 0 and "Traceback" not in p.stderr
    assert p.stderr.strip().splitlines() == [
        "qcow2: Ceph pool 'no-such-pool': pool 'no-such-pool' does not exist"]


def test_cluster_unreachable_is_one_bounded_error(cluster, pool, images, tmp_path):
    from qcow2 import compute
    dead = tmp_path / "dead.conf"
    dead.write_text(cluster.conf.read_text().replace("mon host", "mon host = 127.0.0.1:9\n#"))
    o = opts_for(cluster, pool, tmp_path, rbd_connect_timeout=1).replace(
        images_rbd_ceph_conf=str(dead))
    with pytest.raises(compute.ComputeError, match="did not answer within 1 s"):
        compute.spawn(o, U1, "img-l", images["raw"], 64 * MiB)
    assert not os.path.exists(os.path.join(o.instances_path, U1))


def test_growing_the_root_file_system(cluster, pool, images, tmp_path):
    from qcow2 import compute
    o = opts_for(cluster, pool, tmp_path, resize_fs_using_block_device=True)
    res = compute.spawn(o, U1, "img-m", images["raw"], 96 * MiB)
    assert res["disks"]["disk"]["fs_grown"]["written"] > 0
    disk = tmp_path / "disk.raw"
    disk.write_bytes(content(cluster, pool, f"{U1}_disk", tmp_path))
    out = subprocess.run(["dumpe2fs", "-h", str(disk)], capture_output=True, text=True).stdout
    fields = {k.strip(): v.strip() for k, _, v in (ln.partition(":") for ln in out.splitlines())}
    assert int(fields["Block count"]) * int(fields["Block size"]) == 96 * MiB
    assert subprocess.run(["e2fsck", "-fn", str(disk)], capture_output=True).returncode == 0
    # the base is untouched, and without the option nothing is grown
    assert content(cluster, pool, compute.base_name("img-m"), tmp_path, "snap") == \
        images["bytes"]
    res = compute.spawn(o.replace(resize_fs_using_block_device=False), U2, "img-m",
                        images["raw"], 96 * MiB)
    assert "fs_grown" not in res["disks"]["disk"]
