"""Print the ratio table from a pytest-benchmark JSON file.

    pytest benchmarks --benchmark-json=bench.json && python benchmarks/report.py bench.json

Columns: medians of ours and theirs (rounds alternate), the ratio of the medians, of the
best rounds and of the median CPU seconds, our peak RSS, the load average at the end,
and after how many ms free pages were reported to the hypervisor (see machine.py);
then any more commands timed in the same rounds (``floor`` in test_bench_floor.py):
their median, their ratio to qemu-img, and ours to theirs.
"""

import json
import sys


def _more(x: dict) -> list[str]:
    """The names of more commands timed in the same rounds (side_by_side's ``more``)."""
    return [k[len("ours_to_"):] for k in x if k.startswith("ours_to_")]


def _f(v, fmt):
    return format(v, fmt) if isinstance(v, (int, float)) else "-"


def main(path: str) -> None:
    data = json.load(open(path))
    print(f"{'case':45} {'ours s':>8} {'theirs s':>9} {'ratio':>6} {'best':>6} {'cpu':>6} "
          f"{'RSS MiB':>8} {'load':>5} {'report':>6} corpus")
    for b in data["benchmarks"]:
        x = b.get("extra_info", {})
        print(f"{b['name']:45} {_f(x.get('ours_s', b['stats']['min']), '8.3f')} "
              f"{_f(x.get('theirs_s'), '9.4f')} {_f(x.get('ratio'), '6.3f')} "
              f"{_f(x.get('best_ratio'), '6.3f')} {_f(x.get('cpu_ratio'), '6.3f')} "
              f"{_f(x.get('peak_rss_mib'), '8.1f')} {_f(x.get('load_avg'), '5.2f')} "
              f"{_f(x.get('page_reporting_ms'), '6d')} {x.get('corpus', '')}"
              + "".join(f"  [{k} {_f(x.get(k + '_s'), '.3f')} s, ratio "
                        f"{_f(x.get(k + '_ratio'), '.3f')}, ours/{k} {x['ours_to_' + k]:.3f}]"
                        for k in _more(x)))


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "bench.json")
