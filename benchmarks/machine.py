"""What the machine was doing while a benchmark ran, recorded beside the numbers."""

from __future__ import annotations


def page_reporting_ms() -> int | None:
    """How long a free page waits before the guest reports it to the hypervisor
    (Linux free page reporting, ``page_reporting.min_free_ms``), or None where the
    kernel does not report.  Reported pages are given back to the host; the next
    process to take them pays a host fault per page.  On this project's VMs
    (Firecracker, reporting order 9, 0 ms) that is 0.3-0.5 s more system time for
    writing 633 MiB into the page cache, in about one run of four of either tool:
    medians of 5 then swing by 50 %.  Benchmarks record the value; set it to 60000
    (as root) for steady numbers and say so beside them."""
    try:
        with open("/sys/module/page_reporting/parameters/min_free_ms") as f:
            return int(f.read())
    except (OSError, ValueError):
        return None
