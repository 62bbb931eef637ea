"""Benchmark corpus: built once, cached outside the repo (QCOW2_BENCH_DIR, default
~/.cache/qcow2-bench), rebuilt when its recipe version changes.

The corpus is synthetic (a realistic Debian root file system needs debootstrap; see
README.md): a sparse raw disk of BENCH_SIZE bytes (default 1 GiB), about half of it
allocated with a mix of text-like (compressible), random and zero data, plus qcow2
versions made by qemu-img: plain, zlib-compressed, zstd-compressed; and an empty
1 TiB qcow2.
"""

from __future__ import annotations

import os
import random
import shutil
import subprocess
from pathlib import Path

import pytest

RECIPE = 1
SIZE = int(os.environ.get("QCOW2_BENCH_SIZE", str(1 << 30)))


def _fill(path: Path, size: int) -> None:
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
                continue                     # hole
            f.seek(off)
            if r < 0.85:
                start = rng.randrange(len(text) - chunk)
                f.write(text[start:start + chunk])
            elif r < 0.95:
                f.write(rng.randbytes(chunk))
            else:
                f.write(bytes(chunk))        # explicit zeros (data region, all zero)


@pytest.fixture(scope="session")
def corpus() -> dict[str, Path]:
    if shutil.which("qemu-img") is None:
        pytest.skip("qemu-img is needed for the side-by-side benchmarks")
    root = Path(os.environ.get("QCOW2_BENCH_DIR", Path.home() / ".cache" / "qcow2-bench"))
    d = root / f"r{RECIPE}-{SIZE}"
    stamp = d / "done"
    files = {"raw": d / "disk.raw", "plain": d / "plain.qcow2", "zlib": d / "zlib.qcow2",
             "zstd": d / "zstd.qcow2", "empty1t": d / "empty1t.qcow2"}
    if not stamp.exists():
        d.mkdir(parents=True, exist_ok=True)
        _fill(files["raw"], SIZE)
        q = ["qemu-img", "convert", "-O", "qcow2"]
        subprocess.run(q + [str(files["raw"]), str(files["plain"])], check=True)
        subprocess.run(q + ["-c", str(files["raw"]), str(files["zlib"])], check=True)
        subprocess.run(q + ["-c", "-o", "compression_type=zstd", str(files["raw"]),
                            str(files["zstd"])], check=True)
        subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(files["empty1t"]), "1T"],
                       check=True)
        stamp.write_text("ok\n")
    return files


@pytest.fixture
def scratch(tmp_path_factory):
    d = tmp_path_factory.mktemp("out")
    yield d
    shutil.rmtree(d, ignore_errors=True)
