"""Library reads from the page cache, side by side with the same reads of the raw file.

The plain qcow2 of the corpus against ``disk.raw``, its raw equivalent (the same guest
bytes), both files read once before timing so that both are cached.  In one process,
alternating ours and theirs round by round (QCOW2_BENCH_ROUNDS rounds, 5 by default
here), median of the rounds:

- random 4 KiB reads (``Image.pread`` against ``os.pread`` at the same offsets, and
  ``Image.readinto`` against ``os.preadv`` into one buffer), over the whole disk
  (mostly holes on the Debian corpus: 633 MiB of 4 GiB hold data) and over the data
  extents only;
- sequential 1 MiB reads over the whole disk: ``Image.pread`` against ``os.pread``
  (both return new ``bytes``) and ``Image.readinto`` against ``os.preadv`` into one
  reused buffer.

``extra_info``: ``ours_us`` / ``theirs_us`` per call (random) or ``ours_gbs`` /
``theirs_gbs`` (sequential), and ``ratio`` (ours / theirs in time, lower is better).
Nothing here asserts timings.
"""

from __future__ import annotations

import os
import random
import statistics
import time

import pytest

ROUNDS = int(os.environ.get("QCOW2_BENCH_READ_ROUNDS", "5"))
RANDOM_READS = 20000
MiB = 1 << 20


def _warm(path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        buf = bytearray(8 * MiB)
        off = 0
        while True:
            got = os.preadv(fd, [buf], off)
            if not got:
                break
            off += got
    finally:
        os.close(fd)


def _side_by_side(benchmark, ours, theirs, per: int, unit: str):
    """Alternate ``ours()`` and ``theirs()`` ROUNDS times (after one warm-up each);
    record medians in ``benchmark.extra_info``.  ``per``: calls (unit "us") or bytes
    (unit "gbs") per round."""
    ours()
    theirs()
    a, b = [], []
    for _ in range(ROUNDS):
        t0 = time.perf_counter()
        ours()
        a.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        theirs()
        b.append(time.perf_counter() - t0)
    benchmark.pedantic(ours, rounds=1, iterations=1)
    ma, mb = statistics.median(a), statistics.median(b)
    if unit == "us":
        benchmark.extra_info.update({"ours_us": round(ma / per * 1e6, 3),
                                     "theirs_us": round(mb / per * 1e6, 3)})
    else:
        benchmark.extra_info.update({"ours_gbs": round(per / ma / 1e9, 2),
                                     "theirs_gbs": round(per / mb / 1e9, 2)})
    benchmark.extra_info.update({"theirs_s": round(mb, 4), "ours_s": round(ma, 4),
                                 "ratio": round(ma / mb, 3),
                                 "impl": os.environ.get("QCOW2_IMPL", "auto")})


@pytest.fixture(scope="module")
def plain_and_raw(corpus):
    if "plain" not in corpus or "raw" not in corpus:
        pytest.skip("needs the corpus' plain qcow2 and its raw disk")
    for p in (corpus["plain"], corpus["raw"]):
        _warm(p)
    return corpus["plain"], corpus["raw"]


def _data_offsets(img, rng, count: int) -> list[int]:
    runs = [(e.start, e.length) for e in img.extents() if e.data and e.length >= 4096]
    total = sum(n for _s, n in runs)
    out = []
    for _ in range(count):
        k = rng.randrange(total // 4096) * 4096
        for s, n in runs:
            if k < n:
                out.append(s + k)
                break
            k -= n
    return out


@pytest.mark.parametrize("call", ["pread", "readinto"])
@pytest.mark.parametrize("where", ["anywhere", "data"])
def test_random_4k(benchmark, plain_and_raw, where, call):
    import qcow2

    plain, raw = plain_and_raw
    rng = random.Random(4)
    with qcow2.open(plain) as img:
        size = img.size
        if where == "data":
            offsets = _data_offsets(img, rng, RANDOM_READS)
        else:
            offsets = [rng.randrange(size // 4096) * 4096 for _ in range(RANDOM_READS)]
        fd = os.open(raw, os.O_RDONLY)
        buf = bytearray(4096)
        try:
            if call == "pread":
                def ours():
                    r = img.pread
                    for off in offsets:
                        r(4096, off)

                def theirs():
                    p = os.pread
                    for off in offsets:
                        p(fd, 4096, off)
            else:
                def ours():
                    r = img.readinto
                    for off in offsets:
                        r(buf, off)

                def theirs():
                    p = os.preadv
                    for off in offsets:
                        p(fd, [buf], off)

            _side_by_side(benchmark, ours, theirs, len(offsets), "us")
        finally:
            os.close(fd)
    benchmark.extra_info["what"] = (f"{RANDOM_READS} random 4 KiB {call}s ({where}), plain "
                                    f"qcow2 vs os.{'pread' if call == 'pread' else 'preadv'} "
                                    f"of the raw disk")


@pytest.mark.parametrize("call", ["pread", "readinto"])
def test_sequential_1m(benchmark, plain_and_raw, call):
    import qcow2

    plain, raw = plain_and_raw
    with qcow2.open(plain) as img:
        size = img.size - img.size % MiB
        fd = os.open(raw, os.O_RDONLY)
        buf = bytearray(MiB)
        try:
            if call == "pread":
                def ours():
                    r = img.pread
                    for off in range(0, size, MiB):
                        r(MiB, off)

                def theirs():
                    for off in range(0, size, MiB):
                        os.pread(fd, MiB, off)
            else:
                def ours():
                    r = img.readinto
                    for off in range(0, size, MiB):
                        r(buf, off)

                def theirs():
                    for off in range(0, size, MiB):
                        os.preadv(fd, [buf], off)

            _side_by_side(benchmark, ours, theirs, size, "gbs")
        finally:
            os.close(fd)
    benchmark.extra_info["what"] = (f"sequential 1 MiB {call} over {size >> 20} MiB, plain "
                                    f"qcow2 vs the raw disk")
