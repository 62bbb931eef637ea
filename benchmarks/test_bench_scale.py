"""Cost as images grow (issue 15): check, map, info and convert on very large images,
time and peak memory side by side with qemu-img.

* ``prealloc1t``: a 1 TiB image made with ``preallocation=metadata`` (161 MiB of L2
  tables and refcount blocks, every cluster mapped);
* ``prealloc1t-snap``: the same with an internal snapshot (every refcount 2, no COPIED
  flag): the check's general path (numpy, with the clean L2 tables counted in C), not
  its numpy-free quick check, which only takes images without snapshots;
* ``scattered{1,4,16}t``: 1, 4 and 16 TiB images with 2000 scattered 64 KiB writes
  (qemu-io), so the metadata grows with the virtual size while the data does not.

Convert writes a qcow2 (a 16 TiB raw file is at the edge of what ext4 allows).  Peak
RSS is the command's own ru_maxrss, through a small intermediate process (GNU time,
see test_bench.run_measured; straight from pytest it would include pytest's peak).
The tools alternate, one round each after a warm-up round of both (not counted);
``ours_s``/``theirs_s`` are the best rounds, the medians are in ``*_median_s``.
Nothing here asserts timings or memory.
"""

from __future__ import annotations

import random
import statistics
import subprocess

import pytest
from test_bench import QCOW2, ROUNDS, run_process

CASES = ["prealloc1t", "prealloc1t-snap", "scattered1t", "scattered4t", "scattered16t"]


@pytest.fixture(scope="module")
def big_images(tmp_path_factory):
    d = tmp_path_factory.mktemp("scale")
    made = {}
    p = d / "prealloc1t.qcow2"
    subprocess.run(["qemu-img", "create", "-f", "qcow2", "-o", "preallocation=metadata",
                    str(p), "1T"], check=True, capture_output=True)
    made["prealloc1t"] = p
    p = d / "prealloc1t-snap.qcow2"
    subprocess.run(["qemu-img", "create", "-f", "qcow2", "-o", "preallocation=metadata",
                    str(p), "1T"], check=True, capture_output=True)
    subprocess.run(["qemu-img", "snapshot", "-c", "s1", str(p)], check=True,
                   capture_output=True)
    made["prealloc1t-snap"] = p
    for tib in (1, 4, 16):
        p = d / f"scattered{tib}t.qcow2"
        subprocess.run(["qemu-img", "create", "-f", "qcow2", str(p), f"{tib}T"], check=True,
                       capture_output=True)
        rng = random.Random(tib)
        clusters = (tib << 40) >> 16
        cmds = "\n".join(f"write -P {i % 250 + 1} {rng.randrange(clusters) << 16} 64k"
                         for i in range(2000))
        subprocess.run(["qemu-io", "-f", "qcow2", str(p)], input=cmds, text=True,
                       check=True, capture_output=True)
        made[f"scattered{tib}t"] = p
    return made


@pytest.mark.parametrize("op", ["check", "map", "info", "convert"])
@pytest.mark.parametrize("case", CASES)
def test_scale(benchmark, big_images, scratch, case, op):
    src = str(big_images[case])
    out = scratch / "out.qcow2"

    def cmd(tool):
        if op == "convert":
            return [*tool, "convert", "-O", "qcow2", src, str(out)]
        return [*tool, op, src]
    rss, ours_t = [], []
    theirs_t, their_rss = [], []

    def one():
        """One round of each tool, alternating (the page cache and the machine's load
        then treat both alike); the time is the process's, not this function's."""
        out.unlink(missing_ok=True)
        dt, peak = run_process(cmd(QCOW2))
        rss.append(peak)
        ours_t.append(dt)
        out.unlink(missing_ok=True)
        dt, peak = run_process(cmd(["qemu-img"]))
        their_rss.append(peak)
        theirs_t.append(dt)
    benchmark.pedantic(one, rounds=ROUNDS, iterations=1, warmup_rounds=1)
    out.unlink(missing_ok=True)
    ours, best = min(ours_t[1:]), min(theirs_t[1:])
    benchmark.extra_info.update({
        "theirs_s": round(best, 4), "ours_s": round(ours, 4),
        "ratio": round(ours / best, 3) if best else None,
        "ours_median_s": round(statistics.median(ours_t[1:]), 4),
        "theirs_median_s": round(statistics.median(theirs_t[1:]), 4),
        "peak_rss_mib": round(max(rss), 1), "theirs_peak_rss_mib": round(max(their_rss), 1),
        "what": f"{op} on {case}"})
