"""Argument helpers shared by the subcommands."""

from __future__ import annotations

from ..units import parse_size  # noqa: F401  (re-exported for the subcommands)


def add_output(p) -> None:
    p.add_argument("--output", choices=("human", "json"), default="human",
                   help="output format")


def add_format(p, flag: str = "-f", dest: str = "format") -> None:
    p.add_argument(flag, dest=dest, choices=("qcow2", "raw"), default=None,
                   help="image format (probed when omitted)")


def add_share(p) -> None:
    p.add_argument("-U", "--force-share", dest="force_share", action="store_true",
                   help="open the image with shared permissions")


def add_untrusted(p) -> None:
    p.add_argument("--untrusted", action="store_true",
                   help="treat the image as hostile: open nothing but the named file, "
                        "check its format and scan all its metadata before reading")


class ProgressPrinter:
    """qemu-img's progress line: "    (NN.NN/100%)" rewritten in place, printed only
    when it moved by at least one percent (and at 100)."""

    def __init__(self, stream=None):
        import sys
        self.stream = stream or sys.stdout
        self.last = -100.0

    def __call__(self, pct: float) -> None:
        if pct - self.last < 1.0 and not (pct >= 100.0 > self.last):
            return
        self.last = pct
        self.stream.write("    (%.2f/100%%)\r" % pct)
        self.stream.flush()

    def done(self) -> None:
        self.stream.write("\n")
        self.stream.flush()
