"""Cost as images grow (issue 15): check, map, info and convert on very large images,
time and peak memory side by side with qemu-img.

* ``prealloc1t``: a 1 TiB image made with ``preallocation=metadata`` (161 MiB of L2
  tables and refcount blocks, every cluster mapped);
* ``scattered{1,4,16}t``: 1, 4 and 16 TiB images with 2000 scattered 64 KiB writes
  (qemu-io), so the metadata grows with the virtual size while the data does not.

Convert writes a qcow2 (a 16 TiB raw file is at the edge of what ext4 allows).  Peak
RSS is the process's ru_maxrss.  Nothing here asserts timings or memory.
"""

from __future__ import annotations

import random
import subprocess

import pytest
from test_bench import QCOW2, ROUNDS, run_process

CASES = ["prealloc1t", "scattered1t", "scattered4t", "scattered16t"]


@pytest.fixture(scope="module")
def big_images(tmp_path_factory):
    d = tmp_path_factory.mktemp("scale")
    made = {}
    p = d / "prealloc1t.qcow2"
    subprocess.run(["qemu-img", "create", "-f", "qcow2", "-o", "preallocation=metadata",
                    str(p), "1T"], check=True, capture_output=True)
    made["prealloc1t"] = p
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
    rss = []

    def one():
        out.unlink(missing_ok=True)
        dt, peak = run_process(cmd(QCOW2))
        rss.append(peak)
        return dt
    benchmark.pedantic(one, rounds=ROUNDS, iterations=1, warmup_rounds=0)
    best, their_rss = float("inf"), 0.0
    for _ in range(ROUNDS):
        out.unlink(missing_ok=True)
        dt, peak = run_process(cmd(["qemu-img"]))
        best, their_rss = min(best, dt), max(their_rss, peak)
    out.unlink(missing_ok=True)
    ours = benchmark.stats.stats.min
    benchmark.extra_info.update({
        "theirs_s": round(best, 4), "ours_s": round(ours, 4),
        "ratio": round(ours / best, 3) if best else None,
        "peak_rss_mib": round(max(rss), 1), "theirs_peak_rss_mib": round(their_rss, 1),
        "what": f"{op} on {case}"})
