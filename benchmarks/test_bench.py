"""Side by side with qemu-img on the same input in the same session.

Each benchmark times our command (a whole process, as a user runs it) with
pytest-benchmark and qemu-img (or cp) on the same input, and stores in extra_info:
(conversions run both tools with ``-t writeback``: both flush the output before they
exit, which is our default and what nova asks for with ``-t none``; qemu-img's own
default for convert is ``unsafe``, no flush at all; ``QCOW2_BENCH_CACHE=unsafe|none|
default`` runs them with another mode, "default" meaning no ``-t`` on either side)
``ours_s``/``theirs_s`` (medians of rounds that alternate ours and theirs), ``ratio``
(ours / theirs, lower is better), ``best_ratio``, ``cpu_ratio``, ``peak_rss_mib`` of our
process, ``corpus`` (its kind: "debian-minbase" or
"synthetic", see conftest.py).  ``python benchmarks/report.py`` prints the table.
Nothing here asserts timings.
"""

from __future__ import annotations

import os
import shutil
import statistics
import subprocess
import sys
import time

import pytest
from machine import page_reporting_ms

ROUNDS = int(os.environ.get("QCOW2_BENCH_ROUNDS", "3"))
# -t of both tools in the conversions: writeback (default here), unsafe, none, or
# "default" (no -t: ours flushes, qemu-img's convert does not)
CACHE = os.environ.get("QCOW2_BENCH_CACHE", "writeback")


def cache_args() -> list[str]:
    return [] if CACHE == "default" else ["-t", CACHE]


def cp_sync() -> str:
    """What follows ``cp`` where the mode flushes (cp itself never does)."""
    return "" if CACHE in ("unsafe", "default") else " && sync {out}"
# The installed console script, as users run it (``qcow2 info ...``); ``python -m qcow2``
# where the package is not installed (runpy adds ~5 ms to every process).
_SCRIPT = os.path.join(os.path.dirname(sys.executable), "qcow2")
QCOW2 = [_SCRIPT] if os.access(_SCRIPT, os.X_OK) else [sys.executable, "-m", "qcow2"]


def need(corpus, key):
    if key not in corpus:
        pytest.skip(f"the {corpus.kind} corpus has no {key!r} image")
    return corpus[key]


def run_process(cmd, env=None) -> tuple[float, float]:
    """Wall seconds and peak RSS (MiB) of one process (dirty pages of earlier runs are
    written back first, so no run pays for another's output)."""
    wall, _cpu, peak = run_measured(cmd, env)
    return wall, peak


# GNU time as a small intermediate process: ru_maxrss survives exec, so a command
# forked (or vforked) straight from pytest reports at least pytest's own peak (~34 MiB).
# time forks the command from its own small address space and reports that child's
# peak alone (%M); without it, the direct measurement (an upper bound).
_GNU_TIME = "/usr/bin/time" if os.access("/usr/bin/time", os.X_OK) else None


def run_measured(cmd, env=None) -> tuple[float, float, float]:
    """Wall seconds, CPU seconds (user + system of the process and its children, from
    ``wait4``) and peak RSS (MiB) of one process, after ``sync``."""
    import tempfile
    os.sync()
    with tempfile.NamedTemporaryFile("r", prefix="rss-", suffix=".txt") as rep:
        run = [_GNU_TIME, "-f", "%M", "-o", rep.name, *cmd] if _GNU_TIME else list(cmd)
        t0 = time.perf_counter()
        p = subprocess.Popen(run, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=env)
        _pid, status, ru = os.wait4(p.pid, 0)
        dt = time.perf_counter() - t0
        err = p.stderr.read().decode()
        p.stderr.close()
        p.returncode = os.waitstatus_to_exitcode(status)
        assert p.returncode == 0, f"{cmd}: {err}"
        peak = ru.ru_maxrss
        if _GNU_TIME:
            lines = rep.read().split()
            peak = int(lines[-1]) if lines and lines[-1].isdigit() else peak
    return dt, ru.ru_utime + ru.ru_stime, peak / 1024


def side_by_side(benchmark, ours, theirs, cleanup=None, env=None, more=None):
    """Ours and theirs alternate round by round (the machine's load changes between
    rounds; both see the same), after one untimed warm-up round of each.  ``ratio`` is
    the ratio of the medians, ``best_ratio`` that of the best rounds, ``cpu_ratio`` that
    of the median CPU seconds.  ``more`` ({name: command}) are timed in the same rounds
    (after ours and theirs) and reported as ``<name>_s``, ``<name>_ratio`` (to theirs)
    and ``ours_to_<name>``."""
    more = dict(more or {})
    runs: dict = {"ours": [], "theirs": [], **{k: [] for k in more}}

    def once(name, cmd, e=None):
        if cleanup:
            cleanup()
        return run_measured(cmd, e)

    once("ours", ours, env)
    once("theirs", theirs)
    for k, cmd in more.items():
        once(k, cmd)

    def pair():
        runs["ours"].append(once("ours", ours, env))
        runs["theirs"].append(once("theirs", theirs))
        for k, cmd in more.items():
            runs[k].append(once(k, cmd))
        return runs["ours"][-1][0]

    benchmark.pedantic(pair, rounds=ROUNDS, iterations=1, warmup_rounds=0)
    if cleanup:
        cleanup()
    med = {k: (statistics.median(r[0] for r in v), statistics.median(r[1] for r in v))
           for k, v in runs.items()}
    best = {k: min(r[0] for r in v) for k, v in runs.items()}
    benchmark.extra_info.update({
        "ours_s": round(med["ours"][0], 4), "theirs_s": round(med["theirs"][0], 4),
        "ratio": round(med["ours"][0] / med["theirs"][0], 3),
        "best_ratio": round(best["ours"] / best["theirs"], 3),
        "ours_cpu_s": round(med["ours"][1], 3), "theirs_cpu_s": round(med["theirs"][1], 3),
        "cpu_ratio": round(med["ours"][1] / med["theirs"][1], 3) if med["theirs"][1] else None,
        "peak_rss_mib": round(max(r[2] for r in runs["ours"]), 1),
        "impl": os.environ.get("QCOW2_IMPL", "auto"), "cache": CACHE,
        "load_avg": round(os.getloadavg()[0], 2), "page_reporting_ms": page_reporting_ms(),
    })
    for k in more:
        benchmark.extra_info.update({
            f"{k}_s": round(med[k][0], 4), f"{k}_cpu_s": round(med[k][1], 3),
            f"{k}_ratio": round(med[k][0] / med["theirs"][0], 3),
            f"ours_to_{k}": round(med["ours"][0] / med[k][0], 3)})


@pytest.mark.parametrize("kind", ["plain", "zlib", "zstd", "full", "plain0"])
def test_qcow2_to_raw(benchmark, corpus, scratch, kind):
    out = scratch / "out.raw"
    need(corpus, kind)

    def rm():
        out.unlink(missing_ok=True)
    side_by_side(benchmark, QCOW2 + ["convert", *cache_args(), "-O", "raw",
                                      str(corpus[kind]), str(out)],
                  ["qemu-img", "convert", *cache_args(), "-O", "raw", str(corpus[kind]),
                   str(out)], rm)


@pytest.mark.parametrize("mode", ["plain", "zlib", "zstd"])
def test_raw_to_qcow2(benchmark, corpus, scratch, mode):
    out = scratch / "out.qcow2"
    extra = {"plain": [], "zlib": ["-c"], "zstd": ["-c", "-o", "compression_type=zstd"]}[mode]

    def rm():
        out.unlink(missing_ok=True)
    side_by_side(benchmark,
                  QCOW2 + ["convert", *cache_args(), "-O", "qcow2", *extra,
                           str(corpus["raw"]), str(out)],
                  ["qemu-img", "convert", *cache_args(), "-O", "qcow2", *extra,
                   str(corpus["raw"]), str(out)], rm)


def test_raw_sparse_copy(benchmark, corpus, scratch):
    out = scratch / "out.raw"

    def rm():
        out.unlink(missing_ok=True)
    side_by_side(benchmark,
                  QCOW2 + ["convert", *cache_args(), "-f", "raw", "-O", "raw", str(corpus["raw"]),
                           str(out)],
                  ["sh", "-c", f"cp --sparse=always {corpus['raw']} {out}"
                   + cp_sync().format(out=out)], rm)


def test_empty_1t_to_raw(benchmark, corpus, scratch):
    out = scratch / "out.raw"

    def rm():
        out.unlink(missing_ok=True)
    side_by_side(benchmark, QCOW2 + ["convert", *cache_args(), "-O", "raw",
                                      str(corpus["empty1t"]), str(out)],
                  ["qemu-img", "convert", *cache_args(), "-O", "raw",
                   str(corpus["empty1t"]), str(out)], rm)


def test_overlay_create_and_resize(benchmark, corpus, scratch):
    out = scratch / "disk"
    script = (f"{' '.join(QCOW2)} create -q -f qcow2 -o backing_file={corpus['raw']},"
              f"backing_fmt=raw,cluster_size=65536 {out} 21474836480 && "
              f"{' '.join(QCOW2)} resize -q -f qcow2 {out} 42949672960")
    theirs = (f"qemu-img create -q -f qcow2 -o backing_file={corpus['raw']},backing_fmt=raw,"
              f"cluster_size=65536 {out} 21474836480 && "
              f"qemu-img resize -q -f qcow2 {out} 42949672960")
    side_by_side(benchmark, ["sh", "-c", script], ["sh", "-c", theirs])


@pytest.mark.parametrize("which", ["small", "large"])
def test_info_process(benchmark, corpus, which):
    path = corpus["empty1t"] if which == "small" else corpus["zlib"]
    side_by_side(benchmark, QCOW2 + ["info", "--output=json", str(path)],
                  [sys.executable, "-c", "pass"])


def test_library_reads(benchmark, corpus):
    """Sequential 1 MiB reads and random 4 KiB reads through pread (zlib image)."""
    import random

    import qcow2

    with qcow2.open(corpus["zlib"]) as img:
        size = img.size
        rng = random.Random(1)
        offsets = [rng.randrange(0, size - 4096) for _ in range(2000)]

        def work():
            for off in range(0, min(size, 256 << 20), 1 << 20):
                img.pread(1 << 20, off)
            for off in offsets:
                img.pread(4096, off)
        benchmark.pedantic(work, rounds=ROUNDS, iterations=1)
    benchmark.extra_info["what"] = "256 MiB sequential + 2000 random 4 KiB reads"


@pytest.mark.parametrize("kind", ["plain", "zlib"])
def test_reads_process(benchmark, corpus, kind, tmp_path):
    """The same reads as test_library_reads, as whole processes on both sides: ours a
    Python program over ``qcow2.open(...).pread``, theirs ``qemu-io -r`` with one
    ``read`` command per request.  256 sequential 1 MiB reads, then 2000 random 4 KiB
    reads (512-aligned: qemu-io's requirement)."""
    import random

    if shutil.which("qemu-io") is None:
        pytest.skip("qemu-io is needed for this comparison")
    path = str(corpus[kind])
    import qcow2
    with qcow2.open(path) as img:
        size = img.size
    rng = random.Random(1)
    seq = [(off, 1 << 20) for off in range(0, min(size, 256 << 20), 1 << 20)]
    rnd = [(rng.randrange(0, (size - 4096) // 512) * 512, 4096) for _ in range(2000)]
    reqs = seq + rnd
    plan = tmp_path / "reads.txt"
    plan.write_text("".join(f"{o} {n}\n" for o, n in reqs))
    prog = ("import sys, qcow2\n"
            "img = qcow2.open(sys.argv[1])\n"
            "for line in open(sys.argv[2]):\n"
            "    o, n = map(int, line.split())\n"
            "    img.pread(n, o)\n")
    theirs = ["qemu-io", "-r", "-f", "qcow2"]
    for o, n in reqs:
        theirs += ["-c", f"read -q {o} {n}"]
    side_by_side(benchmark, [sys.executable, "-P", "-c", prog, path, str(plan)], theirs + [path])
    benchmark.extra_info["what"] = "256 x 1 MiB sequential + 2000 x 4 KiB random preads"
