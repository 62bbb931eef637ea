"""How fast can a conversion be on this machine?  The bounds the benchmark ratios are
read against (benchmarks/README.md, "Where the time goes").

    .venv/bin/python benchmarks/limits.py [IMAGE.qcow2 ...]

For each compressed qcow2 given (default: the benchmark corpus's zlib and zstd
images): decode throughput of its compressed clusters with the native kernels, on one
thread and on every core (the kernels release the GIL); and the encode throughput of
the same clusters for ``convert -c`` with the image's algorithm, the default
compressor (libdeflate for zlib, the newer libzstd for zstd) and QEMU's own calls on
the system libraries (``strict``), on one thread and on every core.  Then the page-cache bounds
for writing the same amount of output: ``pwrite`` from a buffer, ``copy_file_range``
from a cached file, and the ``fsync`` that follows.  Nothing here asserts anything.
"""

from __future__ import annotations

import os
import sys
import threading
import time
from pathlib import Path


def _clusters(path):
    """(file bytes, [(offset, length)] of every compressed cluster, cluster size, algo)."""
    import qcow2
    from qcow2 import constants as C

    with qcow2.open(path) as img:
        cs = img.cluster_size
        algo = img.header.compression_type
        runs = [(host, csize) for _a, _n, kind, host, csize in img._runs(0, img.size)
                if kind == C.KIND_COMPRESSED]
    return Path(path).read_bytes(), runs, cs, algo


def decode_rate(path, threads: int) -> float:
    """MB/s of decompressed output, ``threads`` threads sharing the clusters."""
    from qcow2 import kernels

    data, runs, cs, algo = _clusters(path)
    padded = data + bytes(cs)
    parts = [runs[i::threads] for i in range(threads)]
    batch = 64

    def work(part):
        dec = kernels.Decompressor(algo, cs)
        out = bytearray(batch * cs)
        for i in range(0, len(part), batch):
            b = part[i:i + batch]
            lo = min(h for h, _ in b)
            hi = max(h + n for h, n in b)
            dec.decompress_into(out, padded[lo:hi], [h - lo for h, _ in b], [n for _, n in b])

    dt = _timed_threads(work, parts)
    return len(runs) * cs / dt / 1e6


def _timed_threads(work, args) -> float:
    """Seconds for one thread per item of ``args`` running ``work(item)``."""
    ts = [threading.Thread(target=work, args=(a,)) for a in args]
    t0 = time.perf_counter()
    for t in ts:
        t.start()
    for t in ts:
        t.join()
    return time.perf_counter() - t0


def encode_rate(path, threads: int, strict: bool) -> tuple[float, int]:
    """(MB/s of input, compressed bytes) compressing the image's clusters again
    (decoded first), ``threads`` threads sharing them, 64 clusters per call."""
    from qcow2 import kernels

    data, runs, cs, algo = _clusters(path)
    padded = data + bytes(cs)
    dec = kernels.Decompressor(algo, cs)
    plain = bytearray(len(runs) * cs)
    dec.decompress_into(plain, padded, [h for h, _ in runs], [n for _, n in runs])
    batch = 64
    chunks = [(i, min(batch, len(runs) - i)) for i in range(0, len(runs), batch)]
    parts = [chunks[i::threads] for i in range(threads)]
    sizes = [0] * threads

    def work(k):
        comp = kernels.Compressor(algo, cs, strict=strict)
        mv = memoryview(plain)
        for i, n in parts[k]:
            sizes[k] += sum(cs if c is None else len(c)
                            for c in comp.compress_many(mv[i * cs:], n))

    dt = _timed_threads(work, range(threads))
    return len(runs) * cs / dt / 1e6, sum(sizes)


def write_rates(nbytes: int, directory: str) -> dict:
    """Page-cache write bandwidth (MB/s) and the fsync after it, for nbytes."""
    chunk = 4 << 20
    buf = memoryview(os.urandom(chunk))
    out = {}
    src_path = os.path.join(directory, ".limits-src")
    with open(src_path, "wb") as f:
        for _ in range(0, nbytes, chunk):
            f.write(buf)
    try:
        for mode in ("pwrite", "copy_file_range"):
            dst_path = os.path.join(directory, ".limits-dst")
            os.sync()
            fd = os.open(dst_path, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o600)
            sfd = os.open(src_path, os.O_RDONLY)
            try:
                t0 = time.perf_counter()
                for off in range(0, nbytes, chunk):
                    if mode == "pwrite":
                        os.pwrite(fd, buf, off)
                    else:
                        done = 0
                        while done < chunk:
                            done += os.copy_file_range(sfd, fd, chunk - done, off + done,
                                                       off + done)
                t1 = time.perf_counter()
                os.fsync(fd)
                t2 = time.perf_counter()
            finally:
                os.close(fd)
                os.close(sfd)
                os.unlink(dst_path)
            out[mode] = (nbytes / (t1 - t0) / 1e6, t2 - t1)
    finally:
        os.unlink(src_path)
    return out


def main(argv) -> None:
    if argv:
        images = argv
    else:
        root = Path(os.environ.get("QCOW2_BENCH_DIR", Path.home() / ".cache" / "qcow2-bench"))
        images = sorted(str(p) for p in root.glob("*/*.qcow2")
                        if p.name.startswith(("zlib", "zstd")))
    cores = os.cpu_count() or 1
    for img in images:
        one = decode_rate(img, 1)
        many = decode_rate(img, cores)
        print(f"decode {img}: {one:.0f} MB/s on 1 thread, {many:.0f} MB/s on {cores}")
        for strict in (False, True):
            (one, size), (many, _) = encode_rate(img, 1, strict), encode_rate(img, cores, strict)
            print(f"encode {img} ({'strict, as QEMU' if strict else 'default'}): "
                  f"{one:.0f} MB/s on 1 thread, {many:.0f} MB/s on {cores}, "
                  f"{size} bytes")
    n = int(os.environ.get("QCOW2_LIMITS_BYTES", str(512 << 20)))
    for mode, (rate, fs) in write_rates(n, os.environ.get("TMPDIR", "/tmp")).items():
        print(f"write {n >> 20} MiB with {mode}: {rate:.0f} MB/s into the page cache, "
              f"then fsync {fs:.2f} s")


if __name__ == "__main__":
    main(sys.argv[1:])
