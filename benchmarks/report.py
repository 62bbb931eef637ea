"""Print the ratio table from a pytest-benchmark JSON file.

    pytest benchmarks --benchmark-json=bench.json && python benchmarks/report.py bench.json
"""

import json
import sys


def main(path: str) -> None:
    data = json.load(open(path))
    rows = []
    for b in data["benchmarks"]:
        x = b.get("extra_info", {})
        rows.append((b["name"], x.get("ours_s", b["stats"]["min"]), x.get("theirs_s"),
                     x.get("ratio"), x.get("peak_rss_mib"), x.get("impl", ""),
                     x.get("corpus", "")))
    print(f"{'case':45} {'ours s':>8} {'theirs s':>9} {'ratio':>6} {'RSS MiB':>8} impl  corpus")
    for name, ours, theirs, ratio, rss, impl, corpus in rows:
        print(f"{name:45} {ours:8.3f} {theirs if theirs is not None else '-':>9} "
              f"{ratio if ratio is not None else '-':>6} {rss if rss is not None else '-':>8} "
              f"{impl:5} {corpus}")


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "bench.json")
