"""The cache audit (``qcow2 compute audit``) and the rule behind CVE-2026-24708: no
compute command ever probes the format of a disk a guest can write, nor opens a file
named inside one.

The trap for the second: a FIFO named as the backing file in a qcow2 header that a
"guest" wrote into its flat (raw) disk.  Opening a FIFO for reading blocks until a
writer comes, so any command that follows the name hangs (caught by a timeout); qemu-img
itself, told to show the disk's chain, is the positive control."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import pytest

MiB = 1 << 20
U1 = "11111111-2222-3333-4444-555555555555"
U2 = "11111111-2222-3333-4444-666666666666"
U3 = "11111111-2222-3333-4444-777777777777"
CLI = [sys.executable, "-P", "-m", "qcow2"]

pytestmark = pytest.mark.skipif(not (shutil.which("qemu-img") and shutil.which("mkfs.ext4")),
                                reason="qemu-img and e2fsprogs are needed")


@pytest.fixture(scope="module")
def image(tmp_path_factory):
    d = tmp_path_factory.mktemp("auditimg")
    raw = d / "img.raw"
    with open(raw, "wb") as f:
        f.truncate(32 * MiB)
    subprocess.run(["mkfs.ext4", "-q", "-F", str(raw)], check=True)
    qc = d / "img.qcow2"
    subprocess.run(["qemu-img", "convert", "-O", "qcow2", str(raw), str(qc)], check=True)
    return {"raw": str(raw), "qcow2": str(qc)}


def opts_for(tmp_path, **kw):
    from qcow2 import compute
    return compute.Options(instances_path=str(tmp_path / "instances"), **kw)


def _qcow2_header_naming(tmp_path, target: str) -> bytes:
    """The bytes of a small qcow2 image whose backing file is ``target`` (never opened)."""
    p = tmp_path / f"hdr-{os.urandom(3).hex()}.qcow2"
    subprocess.run(["qemu-img", "create", "-f", "qcow2", "-u", "-b", target, "-F", "raw",
                    str(p), "16M"], check=True, capture_output=True)
    data = p.read_bytes()
    p.unlink()
    return data


def _guest_writes(disk: str, data: bytes) -> None:
    with open(disk, "r+b") as f:
        f.write(data)


def _conf(tmp_path, images_type="flat"):
    c = tmp_path / "nova.conf"
    c.write_text(f"[DEFAULT]\ninstances_path = {tmp_path / 'instances'}\n[libvirt]\n"
                 f"images_type = {images_type}\n")
    return c


def test_clean_cache_has_no_findings(tmp_path, image):
    from qcow2 import compute
    for images_type, u in (("qcow2", U1), ("flat", U2)):
        compute.spawn(opts_for(tmp_path, images_type=images_type), u, "img", image["qcow2"],
                      64 * MiB, swap_size=MiB, ephemeral_size=8 * MiB)
    rep = compute.audit(opts_for(tmp_path))
    assert rep["problems"] == 0, rep
    assert len(rep["bases"]) == 3 and len(rep["disks"]) == 6
    p = subprocess.run([*CLI, "compute", "audit", "--config", str(_conf(tmp_path))],
                       capture_output=True, text=True, timeout=120)
    assert p.returncode == 0 and p.stdout.strip().endswith("0 problems"), p.stderr


def test_bad_bases_and_quarantine(tmp_path, image):
    from qcow2 import compute
    o = opts_for(tmp_path, images_type="qcow2")
    compute.spawn(o, U1, "img", image["raw"], 64 * MiB)
    used_base = os.path.join(o.base_dir, compute.base_name("img"))
    # a base made bad after the fact (in use by U1's overlay), and two unused bad ones
    _guest_writes(used_base, _qcow2_header_naming(tmp_path, "/etc/shadow"))
    poly = os.path.join(o.base_dir, compute.base_name("other"))
    shutil.copy(image["raw"], poly)
    _guest_writes(poly, _qcow2_header_naming(tmp_path, "/etc/passwd"))
    vmdk = os.path.join(o.base_dir, compute.base_name("vmdk"))
    with open(vmdk, "wb") as f:
        f.write(b"# Disk DescriptorFile\nversion=1\nRW 2048 FLAT \"/etc/shadow\" 0\n")
        f.truncate(MiB)
    rep = compute.audit(o)
    bad = {e["path"]: e["reason"] for e in rep["bases"] if e["status"] == "bad"}
    assert set(bad) == {used_base, poly, vmdk}
    assert "parse as qcow2" in bad[poly] and "'/etc/passwd'" in bad[poly]
    assert "vmdk" in bad[vmdk].lower()
    rep = compute.audit(o, quarantine=True)
    assert rep["left_in_use"] == [used_base] and os.path.exists(used_base)
    moved = {q["path"]: q["to"] for q in rep["quarantined"]}
    assert set(moved) == {poly, vmdk}
    for src, dst in moved.items():
        assert not os.path.exists(src) and os.path.exists(dst)
        assert os.path.dirname(dst) == os.path.join(o.instances_path, "_quarantine")
    assert compute.audit(o)["problems"] == 1                 # only the one in use is left


def test_bad_disks(tmp_path, image):
    from qcow2 import compute
    o = opts_for(tmp_path, images_type="flat")
    compute.spawn(o, U1, "img", image["raw"], 64 * MiB)
    oq = o.replace(images_type="qcow2")
    compute.spawn(oq, U2, "img", image["raw"], 64 * MiB)
    flat = os.path.join(o.instances_path, U1, "disk")
    _guest_writes(flat, _qcow2_header_naming(tmp_path, "/etc/shadow"))
    overlay = os.path.join(o.instances_path, U2, "disk")
    outside = tmp_path / "outside.raw"
    outside.write_bytes(bytes(MiB))
    subprocess.run(["qemu-img", "rebase", "-u", "-b", str(outside), "-F", "raw", overlay],
                   check=True)
    d3 = os.path.join(o.instances_path, U3)
    os.makedirs(d3)
    shutil.copy(image["raw"], os.path.join(d3, "disk"))          # not in any disk.info
    rep = compute.audit(o)
    bad = {e["path"]: e["reason"] for e in rep["disks"] if e["status"] == "bad"}
    assert set(bad) == {flat, overlay, os.path.join(d3, "disk")}
    assert "records raw" in bad[flat] and "'/etc/shadow'" in bad[flat]
    assert "outside the cache" in bad[overlay]
    assert "not recorded" in bad[os.path.join(d3, "disk")]
    # quarantine never touches an instance disk
    rep = compute.audit(o, quarantine=True)
    assert rep["quarantined"] == [] and all(os.path.exists(p) for p in bad)
    p = subprocess.run([*CLI, "compute", "audit", "--config", str(_conf(tmp_path)),
                        "--output=json"], capture_output=True, text=True, timeout=120)
    assert p.returncode == 2 and json.loads(p.stdout)["problems"] == 3


def test_guest_written_header_is_never_followed(tmp_path, image):
    """CVE-2026-24708's lesson: a flat disk (disk.info: raw) holding a qcow2 header that
    names a host file.  spawn (another instance), clean, usage, audit and destroy must
    not open, touch or read the named file: it is a FIFO, so an open would hang."""
    from qcow2 import compute
    fifo = tmp_path / "host-secret"
    os.mkfifo(fifo)
    o = opts_for(tmp_path, images_type="flat")
    compute.spawn(o, U1, "img", image["raw"], 64 * MiB, swap_size=MiB)
    disk = os.path.join(o.instances_path, U1, "disk")
    swap = os.path.join(o.instances_path, U1, "disk.swap")
    for d in (disk, swap):
        _guest_writes(d, _qcow2_header_naming(tmp_path, str(fifo)))
    console = os.path.join(o.instances_path, U1, "console.log")   # the guest writes it too
    with open(console, "wb") as f:
        f.write(_qcow2_header_naming(tmp_path, str(fifo)))
    # positive control: a tool that follows the header does open the FIFO, and hangs
    with pytest.raises(subprocess.TimeoutExpired):
        subprocess.run(["qemu-img", "info", "--backing-chain", "-U", "-f", "qcow2", disk],
                       capture_output=True, timeout=3)
    before = os.stat(fifo)
    conf = _conf(tmp_path)
    far = str(2_000_000_000)
    for args in (["spawn", "--instance", U2, "--image", "img2", "--source", image["qcow2"],
                  "--root-size", "64M", "-q"],
                 ["clean", "--dry-run", "--now", far], ["clean", "--now", far], ["usage"],
                 ["audit"], ["audit", "--quarantine"], ["destroy", "--instance", U2]):
        p = subprocess.run([*CLI, "compute", *args, "--config", str(conf)],
                           capture_output=True, text=True, timeout=120)
        assert p.returncode in (0, 2), (args, p.stderr)
        assert "Traceback" not in p.stderr
    after = os.stat(fifo)
    assert (after.st_mtime_ns, after.st_ctime_ns) == (before.st_mtime_ns, before.st_ctime_ns)
    # the guest's disks are still there (audit reports them, never moves them)
    assert os.path.exists(disk) and os.path.exists(swap)
    rep = compute.audit(o)
    assert {e["path"] for e in rep["disks"] if e["status"] == "bad"} == {disk, swap}
