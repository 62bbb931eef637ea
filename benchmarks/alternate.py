"""Time two shell commands alternately, outside pytest, and print medians.

    python benchmarks/alternate.py -n 7 -c 'rm -f out.raw' \\
        'qcow2 convert -t unsafe -O raw in.qcow2 out.raw' \\
        'qemu-img convert -t unsafe -O raw in.qcow2 out.raw'

Each round runs the cleanup, ``sync``, then one command, for each command in turn,
after one untimed warm-up round.  Prints per command the median and best wall seconds
and the median CPU seconds (user + system of the whole process tree), and the ratios
of each command to the last one.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import time

from machine import page_reporting_ms


def run(cmd: str) -> tuple[float, float]:
    os.sync()
    t0 = time.perf_counter()
    p = subprocess.Popen(["sh", "-c", cmd], stdout=subprocess.DEVNULL)
    _pid, status, ru = os.wait4(p.pid, 0)
    wall = time.perf_counter() - t0
    if os.waitstatus_to_exitcode(status) != 0:
        raise SystemExit(f"failed: {cmd}")
    return wall, ru.ru_utime + ru.ru_stime


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("-n", type=int, default=5, help="timed rounds (default 5)")
    ap.add_argument("-c", "--cleanup", default="", help="shell command run before each run")
    ap.add_argument("commands", nargs="+")
    a = ap.parse_args()
    res: list[list[tuple[float, float]]] = [[] for _ in a.commands]
    for rnd in range(a.n + 1):
        for i, cmd in enumerate(a.commands):
            if a.cleanup:
                subprocess.run(["sh", "-c", a.cleanup], check=True)
            r = run(cmd)
            if rnd:
                res[i].append(r)
    ref_w = statistics.median(w for w, _ in res[-1])
    ref_c = statistics.median(c for _, c in res[-1])
    for cmd, rs in zip(a.commands, res, strict=True):
        w = statistics.median(x for x, _ in rs)
        c = statistics.median(x for _, x in rs)
        print(f"{w:7.3f} s (best {min(x for x, _ in rs):.3f})  cpu {c:6.3f} s  "
              f"ratio {w / ref_w:5.2f}  cpu ratio {c / ref_c if ref_c else 0:5.2f}  {cmd}")
    print(f"load average {os.getloadavg()[0]:.2f}, free page reporting after "
          f"{page_reporting_ms()} ms (see machine.py)")


if __name__ == "__main__":
    main()
