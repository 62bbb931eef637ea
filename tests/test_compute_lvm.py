"""images_type=lvm for real: lvm2 on a loop device made by the test (as root).

The volume writer is also checked on a bare loop device (no device-mapper needed): the
image's data regions written, everything else -- pre-filled with garbage -- zeroed.
Loop devices, volume groups and physical volumes are removed even when a test fails.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import uuid

import pytest

MiB = 1 << 20
QEMU_IMG = shutil.which("qemu-img")
UUID1 = "22222222-2222-3333-4444-555555555555"
ENV = dict(os.environ, LVM_SUPPRESS_FD_WARNINGS="1")

pytestmark = [
    pytest.mark.skipif(os.geteuid() != 0, reason="LVM and loop devices need root"),
    pytest.mark.skipif(not QEMU_IMG, reason="qemu-img (the test oracle) is not installed"),
    pytest.mark.skipif(not shutil.which("losetup"), reason="util-linux losetup is missing"),
]


def run(*args, check=True):
    env = dict(ENV)
    for name in ("E2FSPROGS_FAKE_TIME", "E2FSCK_TIME"):   # a test pins e2fsprogs' clock
        if name in os.environ:
            env[name] = os.environ[name]
    return subprocess.run(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                          check=check, timeout=120, env=env)


@pytest.fixture
def loop_factory(tmp_path):
    made = []

    def make(size):
        img = tmp_path / f"loop{len(made)}.img"
        with open(img, "wb") as f:
            f.write(b"\xa5" * size)        # garbage: whatever is not written must be zeroed
        res = run("losetup", "-f", "--show", str(img), check=False)
        if res.returncode != 0:
            pytest.skip(f"cannot make a loop device here: {res.stderr.strip()}")
        dev = res.stdout.strip()
        made.append(dev)
        return dev

    try:
        yield make
    finally:
        for dev in made:
            run("losetup", "-d", dev, check=False)


def _device_mapper_missing() -> str | None:
    """Why the kernel cannot do device-mapper here (None when it can)."""
    try:
        with open("/proc/misc") as f:
            if any(line.split()[1:] == ["device-mapper"] for line in f):
                return None
    except OSError:
        return None                                  # cannot tell: let lvcreate try
    return ("the running kernel has no device-mapper driver (no device-mapper in "
            "/proc/misc; load dm-mod): lvcreate cannot make volumes")


@pytest.fixture
def vg(loop_factory):
    if not shutil.which("lvcreate"):
        pytest.skip("lvm2 is not installed")
    why = _device_mapper_missing()
    if why:
        pytest.skip(why)
    dev = loop_factory(256 * MiB)
    name = f"qcow2test{uuid.uuid4().hex[:8]}"
    try:
        run("pvcreate", "-q", "-y", dev)
        run("vgcreate", "-q", name, dev)
        probe = run("lvcreate", "-y", "-q", "-W", "n", "-Z", "n", "-L", "4m", "-n", "probe",
                    name, check=False)
        if probe.returncode != 0:
            pytest.skip("lvm2 cannot create volumes here (device-mapper unavailable?): "
                        + (probe.stderr.strip().splitlines() or ["?"])[0])
        run("lvremove", "-f", "-q", f"{name}/probe")
        yield name
    finally:
        run("vgremove", "-f", "-q", name, check=False)
        run("pvremove", "-q", "-y", dev, check=False)


@pytest.fixture(scope="module")
def image(tmp_path_factory):
    if not shutil.which("mkfs.ext4"):
        pytest.skip("e2fsprogs is not installed")
    d = tmp_path_factory.mktemp("lvimg")
    content = d / "content"
    content.mkdir()
    (content / "hello").write_bytes(os.urandom(2 * MiB))
    raw = d / "img.raw"
    with open(raw, "wb") as f:
        f.truncate(48 * MiB)
    run("mkfs.ext4", "-q", "-F", "-d", str(content), str(raw))
    qc = d / "img.qcow2"
    run(QEMU_IMG, "convert", "-O", "qcow2", str(raw), str(qc))
    return {"raw": str(raw), "qcow2": str(qc), "hello": (content / "hello").read_bytes()}


def test_volume_writer_on_a_block_device(tmp_path, image, loop_factory, monkeypatch):
    """The lvm disk path with lvcreate replaced by a loop device: data + zeros exactly."""
    from qcow2 import compute
    from qcow2.backends import lvm
    # e2fsck/resize2fs stamp the superblock with the time: the same time on both sides
    monkeypatch.setenv("E2FSPROGS_FAKE_TIME", "1700000000")
    monkeypatch.setenv("E2FSCK_TIME", "1700000000")          # e2fsck reads its own
    dev = loop_factory(96 * MiB)
    removed = []
    monkeypatch.setattr(lvm, "create_volume", lambda vg, name, size: dev)
    monkeypatch.setattr(lvm, "remove_volume", lambda vg, name: removed.append(name))
    monkeypatch.setattr(shutil, "which", lambda name, *a, **k: "/usr/sbin/" + name)
    o = compute.Options(instances_path=str(tmp_path / "inst"), images_type="lvm",
                        images_volume_group="fakevg")
    res = compute.spawn(o, UUID1, "img", image["qcow2"], 96 * MiB, disk_format="qcow2")
    assert res["disks"]["disk"] == {"path": dev, "format": "raw"}
    run(QEMU_IMG, "check", "-f", "raw", dev, check=False)
    # the file system was grown to the device and its file is intact
    run("e2fsck", "-fn", dev)
    got = subprocess.run(["debugfs", "-R", "cat /hello", dev], stdout=subprocess.PIPE,
                         stderr=subprocess.DEVNULL).stdout
    assert got == image["hello"]
    # no garbage left anywhere: byte for byte what resize2fs makes of the image grown
    # as a sparse file (zeros past the image)
    ref = tmp_path / "ref.raw"
    shutil.copy(image["raw"], ref)
    os.truncate(ref, 96 * MiB)
    run("e2fsck", "-fp", str(ref), check=False)
    run("resize2fs", str(ref))
    run(QEMU_IMG, "compare", "-f", "raw", "-F", "raw", str(ref), dev)
    assert removed == []
    assert not os.path.exists(os.path.join(o.instances_path, UUID1, "disk.info"))


def test_lvm_end_to_end(tmp_path, image, vg):
    from qcow2 import compute
    o = compute.Options(instances_path=str(tmp_path / "inst"), images_type="lvm",
                        images_volume_group=vg)
    res = compute.spawn(o, UUID1, "img", image["qcow2"], 64 * MiB, disk_format="qcow2",
                        ephemeral_size=16 * MiB, swap_size=8 * MiB)
    lvs = run("lvs", "--noheadings", "-o", "lv_name", vg).stdout.split()
    assert sorted(lvs) == sorted([f"{UUID1}_disk", f"{UUID1}_disk_local", f"{UUID1}_disk_swap"])
    dev = res["disks"]["disk"]["path"]
    assert dev == f"/dev/{vg}/{UUID1}_disk"
    run("e2fsck", "-fn", dev)
    got = subprocess.run(["debugfs", "-R", "cat /hello", dev], stdout=subprocess.PIPE,
                         stderr=subprocess.DEVNULL).stdout
    assert got == image["hello"]
    blkid = run("blkid", "-p", "-o", "export", res["disks"]["disk.swap"]["path"]).stdout
    assert "TYPE=swap" in blkid
    blkid = run("blkid", "-p", "-o", "export", res["disks"]["disk.local"]["path"]).stdout
    assert "LABEL=ephemeral0" in blkid
    removed = compute.destroy(o, UUID1)
    assert len(removed) == 4
    assert run("lvs", "--noheadings", "-o", "lv_name", vg).stdout.split() == []


def test_lvm_failure_removes_volume(tmp_path, image, vg, monkeypatch):
    from qcow2 import compute
    from qcow2.compute import disks
    o = compute.Options(instances_path=str(tmp_path / "inst"), images_type="lvm",
                        images_volume_group=vg)

    def boom(path):
        raise compute.ToolError("resize2fs failed")
    monkeypatch.setattr(disks, "grow_fs", boom)
    with pytest.raises(compute.ToolError):
        compute.spawn(o, UUID1, "img", image["raw"], 64 * MiB, disk_format="raw")
    assert run("lvs", "--noheadings", "-o", "lv_name", vg).stdout.split() == []
    assert not os.path.exists(os.path.join(o.instances_path, UUID1))
