"""Benchmark corpus: built once, cached outside the repo (QCOW2_BENCH_DIR, default
~/.cache/qcow2-bench), in a folder named after its kind and recipe version (rebuilt
when RECIPE changes).

Two kinds (QCOW2_BENCH_CORPUS=auto|debian|synthetic, default auto):

- ``debian`` ("debian-minbase"): a minimal Debian bookworm root file system
  (``debootstrap --variant=minbase`` plus a kernel and a few services), packed into a
  sparse 4 GiB raw ext4 image with ``mkfs.ext4 -d`` (clock, UUID, hash seed and every
  file time pinned), and its qcow2 versions made by qemu-img: plain, zlib, zstd.
  Needs root and Debian's mirror; debootstrap is installed with apt-get if missing.
- ``synthetic``: a sparse raw disk of QCOW2_BENCH_SIZE bytes (default 1 GiB), about half
  of it allocated in 1 MiB pieces of text-like (compressible), random and explicit-zero
  data, its qcow2 versions (plain, zlib, zstd), and 0 % ("raw0"/"plain0") and 100 %
  ("raw100") allocated variants of the same size.

``auto`` builds debian and falls back to synthetic when it cannot (not root, no
debootstrap and apt-get cannot install it, no network), saying why; ``debian`` fails
instead of falling back.

Both kinds also have an empty 1 TiB qcow2 ("empty1t") and a fully allocated one
("full": 1 GiB, every cluster written with non-zero data by qemu-img convert of a
fully written raw, text-like and random 1 MiB pieces, no zeros and no holes).
"""

from __future__ import annotations

import fcntl
import json
import os
import random
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent
if str(HERE) not in sys.path:        # --import-mode=importlib: test_bench_rbd imports test_bench
    sys.path.insert(0, str(HERE))

RECIPE = 2
SIZE = int(os.environ.get("QCOW2_BENCH_SIZE", str(1 << 30)))
FULL_SIZE = 1 << 30
DEBIAN_SIZE = "4G"
DEBIAN_SUITE = "bookworm"
DEBIAN_MIRROR = os.environ.get("QCOW2_BENCH_MIRROR", "http://deb.debian.org/debian")
DEBIAN_INCLUDE = "linux-image-amd64,openssh-server,systemd-sysv,cron,rsyslog"
# Every file time in the tree, and mke2fs' clock: bookworm's release day (2023-06-10).
EPOCH = 1686355200
FS_UUID = "6a1b2c3d-0000-4000-8000-00000000b005"
HASH_SEED = "6a1b2c3d-0000-4000-8000-00000000b006"

QIMG = ["qemu-img", "convert", "-O", "qcow2"]
QCOW2_VARIANTS = {"plain": [], "zlib": ["-c"], "zstd": ["-c", "-o", "compression_type=zstd"]}


class Corpus(dict):
    """name -> Path, plus ``kind`` ("debian-minbase" or "synthetic") and ``note`` (why
    the fallback was taken, or "")."""

    kind = ""
    note = ""


class CannotBuild(Exception):
    pass


def _fill(path: Path, size: int, holes: bool = True, zeros: bool = True) -> None:
    """Write a raw disk in 1 MiB pieces: about 45 % left unallocated if ``holes``, the
    rest text-like (8 of 11), random (2 of 11) and, if ``zeros``, explicit zeros (1 of
    11). The defaults are recipe 1's disk, byte for byte."""
    rng = random.Random(5)
    words = [w.encode() for w in (
        "the quick brown fox jumps over lazy dog kernel module systemd journal libc "
        "usr bin share doc locale python3 perl apt dpkg status lib x86_64 linux gnu "
        "ELF \x00\x00\x00 \x7fELF config etc passwd shadow group hosts").split(" ")]
    text = b" ".join(rng.choice(words) for _ in range(1 << 19))
    chunk = 1 << 20
    with open(path, "wb") as f:
        f.truncate(size)
        for off in range(0, size, chunk):
            r = rng.random()
            if r < 0.45:
                if holes:
                    continue                 # hole
                r = 0.45 + rng.random() * (0.55 if zeros else 0.50)
            elif not zeros and r >= 0.95:
                r = 0.45 + rng.random() * 0.50
            f.seek(off)
            if r < 0.85:
                start = rng.randrange(len(text) - chunk)
                f.write(text[start:start + chunk])
            elif r < 0.95:
                f.write(rng.randbytes(chunk))
            else:
                f.write(bytes(chunk))        # explicit zeros (data region, all zero)


def _qcow2_versions(raw: Path, d: Path) -> None:
    for name, opts in QCOW2_VARIANTS.items():
        subprocess.run(QIMG + opts + [str(raw), str(d / f"{name}.qcow2")], check=True)


def _common(d: Path) -> None:
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(d / "empty1t.qcow2"), "1T"],
                   check=True)
    raw = d / "full.raw"
    _fill(raw, FULL_SIZE, holes=False, zeros=False)
    subprocess.run(QIMG + [str(raw), str(d / "full.qcow2")], check=True)
    raw.unlink()


def _build_synthetic(d: Path) -> dict:
    _fill(d / "disk.raw", SIZE)
    _qcow2_versions(d / "disk.raw", d)
    with open(d / "raw0.raw", "wb") as f:
        f.truncate(SIZE)
    subprocess.run(QIMG + [str(d / "raw0.raw"), str(d / "plain0.qcow2")], check=True)
    _fill(d / "raw100.raw", SIZE, holes=False)
    _common(d)
    return {}


def _mounts_under(path: Path) -> list[str]:
    prefix = str(path.resolve()) + "/"
    out = []
    with open("/proc/self/mounts") as f:
        for line in f:
            mnt = line.split()[1].replace("\\040", " ")
            if mnt.startswith(prefix) or mnt == prefix[:-1]:
                out.append(mnt)
    return out


def _remove_tree(path: Path) -> None:
    """rm -rf a debootstrap target, but never through a mount left inside it (debootstrap
    binds the host's /dev in a container)."""
    for mnt in sorted(_mounts_under(path), key=len, reverse=True):
        subprocess.run(["umount", "-l", mnt], check=False)
    left = _mounts_under(path)
    if left:
        raise RuntimeError(f"still mounted under {path}: {left}; not removing it")
    shutil.rmtree(path, ignore_errors=True)


def _debootstrap() -> str:
    if os.geteuid() != 0:
        raise CannotBuild("not root (debootstrap and mkfs.ext4 -d of a root tree need root)")
    exe = shutil.which("debootstrap") or (
        "/usr/sbin/debootstrap" if os.path.exists("/usr/sbin/debootstrap") else None)
    if exe is None:
        if shutil.which("apt-get") is None:
            raise CannotBuild("debootstrap is missing and there is no apt-get")
        env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
        p = subprocess.run(["apt-get", "install", "-y", "debootstrap"], env=env,
                           capture_output=True, text=True)
        if p.returncode != 0:
            subprocess.run(["apt-get", "update"], env=env, capture_output=True)
            p = subprocess.run(["apt-get", "install", "-y", "debootstrap"], env=env,
                               capture_output=True, text=True)
        exe = shutil.which("debootstrap") or (
            "/usr/sbin/debootstrap" if os.path.exists("/usr/sbin/debootstrap") else None)
        if p.returncode != 0 or exe is None:
            raise CannotBuild("debootstrap is missing and `apt-get install -y debootstrap` "
                              f"failed: {(p.stderr or p.stdout).strip()[-300:]}")
    for tool in ("mkfs.ext4", "debugfs", "dumpe2fs", "chroot"):
        if shutil.which(tool) is None and not os.path.exists(f"/usr/sbin/{tool}"):
            raise CannotBuild(f"{tool} is missing")
    return exe


def _used_inodes(raw: Path) -> list[int]:
    """In-use inode numbers of an ext4 image, from dumpe2fs' per-group free ranges."""
    out = subprocess.run(["dumpe2fs", str(raw)], check=True, capture_output=True,
                         text=True).stdout
    count = per_group = 0
    free: set[int] = set()
    group_first = None
    for line in out.splitlines():
        s = line.strip()
        if s.startswith("Inode count:"):
            count = int(s.split(":")[1])
        elif s.startswith("Inodes per group:"):
            per_group = int(s.split(":")[1])
        elif s.startswith("Group ") and per_group:
            group_first = int(s.split()[1].rstrip(":")) * per_group + 1
        elif s.startswith("Free inodes:") and group_first is not None:
            for part in s.split(":", 1)[1].split(","):
                part = part.strip()
                if part:
                    a, _, b = part.partition("-")
                    free.update(range(int(a), int(b or a) + 1))
    return [i for i in range(1, count + 1) if i not in free]


def _pin_inode_times(raw: Path, env: dict) -> None:
    """mkfs.ext4 -d copies each file's ctime (the time of our touch: now) and atime
    (bumped by reading the tree); set both to EPOCH in every inode in use."""
    cmds = "".join(f"sif <{i}> ctime @{EPOCH}\nsif <{i}> atime @{EPOCH}\n"
                   for i in _used_inodes(raw) if i == 2 or i >= 11)
    subprocess.run(["debugfs", "-w", "-f", "-", str(raw)], input=cmds, text=True, check=True,
                   capture_output=True, env=dict(env, E2FSPROGS_FAKE_TIME=str(EPOCH)))


def _build_debian(d: Path, work: Path) -> dict:
    exe = _debootstrap()
    target = work / "rootfs"
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive", SOURCE_DATE_EPOCH=str(EPOCH),
               LC_ALL="C.UTF-8")
    env["PATH"] = env.get("PATH", "") + ":/usr/sbin:/sbin"
    log = d / "debootstrap.log"
    try:
        with open(log, "w") as lf:
            p = subprocess.run([exe, "--variant=minbase", f"--include={DEBIAN_INCLUDE}",
                                DEBIAN_SUITE, str(target), DEBIAN_MIRROR],
                               env=env, stdout=lf, stderr=subprocess.STDOUT)
        if p.returncode != 0:
            tail = log.read_text(errors="replace").strip().splitlines()[-3:]
            raise CannotBuild(f"debootstrap failed ({p.returncode}): {' | '.join(tail)}")
        for mnt in sorted(_mounts_under(target), key=len, reverse=True):
            subprocess.run(["umount", "-l", mnt], check=False)
        packages = subprocess.run(
            ["chroot", str(target), "dpkg-query", "-W", "-f", "${Package} ${Version}\n"],
            check=True, capture_output=True, text=True, env=env).stdout
        # What differs between two builds of the same package set: downloaded indexes,
        # caches, logs, generated host keys and machine id; then every file time.
        for sub in ("var/lib/apt/lists", "var/cache/apt", "var/log", "var/cache/debconf",
                    "var/cache/ldconfig", "tmp", "var/tmp"):
            p_ = target / sub
            if p_.is_dir() and not p_.is_symlink():
                for child in p_.iterdir():
                    if child.is_dir() and not child.is_symlink():
                        shutil.rmtree(child)
                    else:
                        child.unlink()
        for key in (target / "etc/ssh").glob("ssh_host_*"):
            key.unlink()
        for mid in ("etc/machine-id", "var/lib/dbus/machine-id"):
            f = target / mid
            if f.exists() and not f.is_symlink():
                f.write_text("")
        (target / "etc/hostname").write_text("qcow2-bench\n")
        subprocess.run(["find", str(target), "-xdev", "-exec", "touch", "-h", "-d",
                        f"@{EPOCH}", "{}", "+"], check=True)
        du = subprocess.run(["du", "-sx", "--block-size=1", str(target)], check=True,
                            capture_output=True, text=True).stdout.split()[0]
        raw = d / "disk.raw"
        subprocess.run(["truncate", "-s", DEBIAN_SIZE, str(raw)], check=True)
        subprocess.run(["mkfs.ext4", "-q", "-F", "-L", "debian", "-U", FS_UUID,
                        "-E", f"hash_seed={HASH_SEED},root_owner=0:0",
                        "-d", str(target), str(raw)],
                       check=True, env=dict(env, E2FSPROGS_FAKE_TIME=str(EPOCH)))
        _pin_inode_times(raw, env)
    finally:
        _remove_tree(target)
    _qcow2_versions(raw, d)
    _common(d)
    return {"rootfs_du_bytes": int(du), "packages": packages.splitlines()}


def _sizes(d: Path) -> dict:
    out = {}
    for f in sorted(d.iterdir()):
        if f.suffix in (".raw", ".qcow2"):
            st = f.stat()
            out[f.name] = {"apparent": st.st_size, "allocated": st.st_blocks * 512}
    return out


def _build(root: Path, kind: str) -> Path:
    """Build the corpus of ``kind`` into root/<kind>-r<RECIPE>[-size] unless done; a
    lock serializes builders, and the folder appears only complete (renamed in)."""
    name = f"{kind}-r{RECIPE}" + (f"-{SIZE}" if kind == "synthetic" else "")
    d = root / name
    if (d / "done").exists():
        return d
    root.mkdir(parents=True, exist_ok=True)
    with open(root / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if (d / "done").exists():
            return d
        work = Path(tempfile.mkdtemp(prefix=f".{name}-", dir=root))
        try:
            tmp = work / "corpus"
            tmp.mkdir()
            t0 = time.monotonic()
            info = _build_debian(tmp, work) if kind == "debian" else _build_synthetic(tmp)
            manifest = {"kind": kind, "recipe": RECIPE,
                        "build_seconds": round(time.monotonic() - t0, 1),
                        "built_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                        "qemu_img": subprocess.run(["qemu-img", "--version"],
                                                   capture_output=True, text=True
                                                   ).stdout.splitlines()[0],
                        "files": _sizes(tmp), **info}
            (tmp / "manifest.json").write_text(json.dumps(manifest, indent=1) + "\n")
            (tmp / "done").write_text("ok\n")
            if d.exists():
                shutil.rmtree(d)
            tmp.rename(d)
        finally:
            _remove_tree(work)
    return d


def _files(d: Path) -> dict[str, Path]:
    names = {"raw": "disk.raw", "plain": "plain.qcow2", "zlib": "zlib.qcow2",
             "zstd": "zstd.qcow2", "empty1t": "empty1t.qcow2", "full": "full.qcow2",
             "raw0": "raw0.raw", "plain0": "plain0.qcow2", "raw100": "raw100.raw"}
    return {k: d / v for k, v in names.items() if (d / v).exists()}


def build_corpus(which: str | None = None) -> Corpus:
    which = which or os.environ.get("QCOW2_BENCH_CORPUS", "auto")
    if which not in ("auto", "debian", "synthetic"):
        raise ValueError(f"QCOW2_BENCH_CORPUS={which!r}: auto, debian or synthetic")
    root = Path(os.environ.get("QCOW2_BENCH_DIR", Path.home() / ".cache" / "qcow2-bench"))
    c = Corpus()
    if which != "synthetic":
        try:
            c.update(_files(_build(root, "debian")))
            c.kind = "debian-minbase"
            return c
        except (CannotBuild, subprocess.CalledProcessError) as e:
            if which == "debian":
                raise
            c.note = f"debian corpus not built ({e}); using the synthetic one"
            print(f"qcow2-bench: {c.note}", file=sys.stderr)
    c.update(_files(_build(root, "synthetic")))
    c.kind = "synthetic"
    return c


@pytest.fixture(scope="session")
def corpus(request) -> Corpus:
    if shutil.which("qemu-img") is None:
        pytest.skip("qemu-img is needed for the side-by-side benchmarks")
    c = build_corpus()
    pm = request.config.pluginmanager
    tr, cm = pm.get_plugin("terminalreporter"), pm.get_plugin("capturemanager")
    if tr is not None and cm is not None:
        with cm.global_and_fixture_disabled():
            tr.write_line(f"\nbenchmark corpus: {c.kind} ({Path(c['raw']).parent})"
                          + (f"; {c.note}" if c.note else ""))
    return c


@pytest.fixture
def scratch(tmp_path_factory):
    d = tmp_path_factory.mktemp("out")
    yield d
    shutil.rmtree(d, ignore_errors=True)


@pytest.fixture(autouse=True)
def _corpus_kind(benchmark, corpus):
    benchmark.extra_info["corpus"] = corpus.kind
    if corpus.note:
        benchmark.extra_info["corpus_note"] = corpus.note
