"""A real guest on our disks: QEMU (``qemu-system-x86_64 -accel tcg``, no KVM needed)
boots Debian's cloud kernel and a busybox initramfs from an instance disk made by our
compute flow (a qcow2 overlay over a cached raw base holding an ext4), once with
QEMU opening the file itself and once through our NBD export.  The guest checks a
known file, writes new ones, unmounts and powers off; our engine then reads back
exactly what the guest wrote, ``qemu-img check`` is clean and e2fsck finds the file
system clean.

The kernel comes from Debian's ``linux-image-cloud-amd64`` (its kernel package,
fetched with ``apt-get download`` and unpacked, never installed) and is kept in
``QCOW2_VM_DIR`` (default ``~/.cache/qcow2-vm``); busybox from ``busybox-static``.
Skipped, with the reason, when any of them cannot be had.
"""

from __future__ import annotations

import gzip
import hashlib
import os
import re
import shutil
import stat
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
from nbdserver import Server, run

MiB = 1 << 20
MODULES = ["virtio_ring", "virtio", "virtio_pci_legacy_dev", "virtio_pci_modern_dev",
           "virtio_pci", "virtio_blk"]                  # in load order (their depends=)
BOOT_LIMIT = 900                                       # seconds: only bounds a hung guest
QEMU = shutil.which("qemu-system-x86_64")

pytestmark = [
    pytest.mark.skipif(QEMU is None, reason="qemu-system-x86_64 is not installed "
                       "(apt-get install qemu-system-x86)"),
    pytest.mark.skipif(not os.path.exists("/bin/busybox"),
                       reason="busybox-static is not installed (apt-get install busybox-static)"),
    pytest.mark.skipif(not (shutil.which("mkfs.ext4") and shutil.which("debugfs")),
                       reason="e2fsprogs is not installed"),
]

INIT = r"""#!/bin/busybox sh
/bin/busybox --install -s /bin
mount -t proc proc /proc
mount -t sysfs sys /sys
mount -t devtmpfs dev /dev
for m in MODULES; do insmod /lib/modules/$m.ko || echo "GUEST-FAIL: insmod $m"; done
tag=$(sed -n 's/.* qtag=\([a-z0-9]*\).*/\1/p' /proc/cmdline)
i=0
while [ ! -b /dev/vda ] && [ $i -lt 600 ]; do sleep 0.1; i=$((i+1)); done
if mount -t ext4 /dev/vda /mnt; then
    echo "GUEST-KNOWN: $(sha256sum /mnt/known.bin | cut -d' ' -f1)"
    echo "GUEST-MOTD: $(cat /mnt/etc/motd)"
    echo "written by the guest in boot $tag" > /mnt/guest-$tag.txt
    dd if=/dev/urandom of=/mnt/guest-$tag.bin bs=65536 count=40 2>/dev/null
    echo "GUEST-WROTE: $(sha256sum /mnt/guest-$tag.bin | cut -d' ' -f1)"
    sync
    umount /mnt && echo "GUEST-UMOUNTED"
else
    echo "GUEST-FAIL: mount"
fi
echo "GUEST-DONE"
poweroff -f
"""


def _newc(entries) -> bytes:
    """A cpio archive in the kernel's "newc" format: (name, mode, data) entries."""
    out = bytearray()
    for ino, (name, mode, data) in enumerate([*entries, ("TRAILER!!!", 0, b"")], 1):
        raw = name.encode() + b"\0"
        fields = [ino, mode, 0, 0, 1, 0, len(data), 0, 0, 0, 0, len(raw), 0]
        out += b"070701" + b"".join(b"%08X" % f for f in fields) + raw
        out += bytes(-len(out) % 4)
        out += data
        out += bytes(-len(out) % 4)
    return bytes(out)


def _kernel_dir() -> Path:
    """vmlinuz and the virtio modules of Debian's cloud kernel, fetched once."""
    root = Path(os.environ.get("QCOW2_VM_DIR", Path.home() / ".cache" / "qcow2-vm"))
    done = root / "done"
    if done.exists():
        return root
    if not shutil.which("apt-get") or not shutil.which("dpkg-deb"):
        pytest.skip("needs apt-get and dpkg-deb to fetch linux-image-cloud-amd64")
    deps = subprocess.run(["apt-cache", "depends", "linux-image-cloud-amd64"],
                          capture_output=True, text=True)
    pkg = re.search(r"Depends: (linux-image-\S+-cloud-amd64)", deps.stdout)
    if pkg is None:
        pytest.skip(f"linux-image-cloud-amd64 not known to apt: {deps.stderr.strip()}")
    root.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=root) as tmp:
        got = subprocess.run(["apt-get", "download", pkg.group(1)], cwd=tmp,
                             capture_output=True, text=True)
        debs = list(Path(tmp).glob("*.deb"))
        if got.returncode or not debs:
            pytest.skip(f"apt-get download {pkg.group(1)} failed: {got.stderr.strip()}")
        tree = Path(tmp) / "tree"
        run("dpkg-deb", "-x", debs[0], tree)
        shutil.copy(next((tree / "boot").glob("vmlinuz-*")), root / "vmlinuz")
        for m in MODULES:
            src = next(tree.glob(f"lib/modules/*/kernel/drivers/**/{m}.ko"))
            shutil.copy(src, root / f"{m}.ko")
    done.write_text(pkg.group(1) + "\n")
    return root


@pytest.fixture(scope="module")
def guest(tmp_path_factory):
    """(kernel, initramfs) paths."""
    kdir = _kernel_dir()
    d = tmp_path_factory.mktemp("guest")
    entries = [(p, stat.S_IFDIR | 0o755, b"") for p in
               ("bin", "dev", "proc", "sys", "mnt", "lib", "lib/modules")]
    entries.append(("bin/busybox", stat.S_IFREG | 0o755, Path("/bin/busybox").read_bytes()))
    entries.append(("init", stat.S_IFREG | 0o755,
                    INIT.replace("MODULES", " ".join(MODULES)).encode()))
    entries += [(f"lib/modules/{m}.ko", stat.S_IFREG | 0o644, (kdir / f"{m}.ko").read_bytes())
                for m in MODULES]
    initrd = d / "initrd.gz"
    initrd.write_bytes(gzip.compress(_newc(entries), 6))
    return kdir / "vmlinuz", initrd


@pytest.fixture(scope="module")
def instance_disk(tmp_path_factory):
    """An instance disk from our compute flow: a qcow2 overlay (64 MiB root) over the
    cached raw base of an ext4 image with a known file."""
    from qcow2 import compute
    d = tmp_path_factory.mktemp("inst")
    content = d / "content"
    (content / "etc").mkdir(parents=True)
    known = os.urandom(3 * MiB + 12345)
    (content / "known.bin").write_bytes(known)
    (content / "etc" / "motd").write_text("hello from the image\n")
    raw = d / "image.raw"
    with open(raw, "wb") as f:
        f.truncate(32 * MiB)
    run("mkfs.ext4", "-q", "-F", "-L", "root", "-d", content, raw)
    opts = compute.Options(instances_path=str(d / "instances"))
    uuid = "0b5e55ed-0000-4000-8000-000000000016"
    compute.spawn(opts, uuid, "img", str(raw), 64 * MiB, disk_format="raw")
    disk = d / "instances" / uuid / "disk"
    assert run("qemu-img", "info", disk).stdout.count("backing file") >= 1
    return disk, hashlib.sha256(known).hexdigest()


def _boot(kernel, initrd, drive: str, tag: str, log: Path) -> str:
    argv = [QEMU, "-accel", "tcg", "-m", "256", "-nodefaults", "-display", "none",
            "-no-reboot", "-serial", f"file:{log}", "-kernel", kernel, "-initrd", initrd,
            "-append", f"console=ttyS0 panic=-1 quiet qtag={tag}",
            "-drive", f"{drive},if=virtio,cache=writeback"]
    subprocess.run([str(a) for a in argv], check=True, timeout=BOOT_LIMIT,
                   capture_output=True)
    return log.read_text(errors="replace")


def _read_back(disk: Path, tmp: Path, tag: str) -> tuple[str, str]:
    """Our engine reads the guest's disk (qcow2 convert -O raw); debugfs reads the files."""
    out = tmp / f"back-{tag}.raw"
    r = subprocess.run([sys.executable, "-m", "qcow2", "convert",
                        "-O", "raw", str(disk), str(out)], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    fsck = subprocess.run(["e2fsck", "-fn", str(out)], capture_output=True, text=True)
    assert fsck.returncode == 0, fsck.stdout + fsck.stderr
    blob = subprocess.run(["debugfs", "-R", f"cat /guest-{tag}.bin", str(out)],
                          capture_output=True).stdout
    text = subprocess.run(["debugfs", "-R", f"cat /guest-{tag}.txt", str(out)],
                          capture_output=True, text=True).stdout
    out.unlink()
    return hashlib.sha256(blob).hexdigest() if len(blob) == 40 * 65536 else "", text


def _check_guest(console: str, known_sha: str, tag: str) -> str:
    assert "GUEST-FAIL" not in console and "GUEST-DONE" in console, console[-3000:]
    assert f"GUEST-KNOWN: {known_sha}" in console, console[-3000:]
    assert "GUEST-MOTD: hello from the image" in console
    assert "GUEST-UMOUNTED" in console
    return re.search(r"GUEST-WROTE: ([0-9a-f]{64})", console).group(1)


def test_guest_boots_from_the_file_and_through_our_nbd_export(guest, instance_disk, tmp_path):
    kernel, initrd = guest
    disk, known_sha = instance_disk

    console = _boot(kernel, initrd, f"file={disk},format=qcow2", "file", tmp_path / "a.log")
    wrote = _check_guest(console, known_sha, "file")
    run("qemu-img", "check", disk)
    assert _read_back(disk, tmp_path, "file") == (wrote, "written by the guest in boot file\n")

    with Server(disk, tmp_path, "-f", "qcow2") as srv:      # ends when QEMU disconnects
        console = _boot(kernel, initrd, f"file={srv.uri},format=raw", "nbd",
                        tmp_path / "b.log")
        assert srv.wait() == 0, srv.log()
    wrote_nbd = _check_guest(console, known_sha, "nbd")
    run("qemu-img", "check", disk)
    assert _read_back(disk, tmp_path, "nbd") == (wrote_nbd, "written by the guest in boot nbd\n")
    assert _read_back(disk, tmp_path, "file")[0] == wrote    # the first boot's files remain
