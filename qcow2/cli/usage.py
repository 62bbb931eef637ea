"""What the command line's entry point and both of its parsers share: the
subcommands and the usage error (one line, exit status 1, as qemu-img)."""

from __future__ import annotations

COMMANDS = ("create", "info", "map", "convert", "check", "compare", "measure", "resize",
            "rebase", "commit", "snapshot", "amend", "dd", "bitmap", "compute")
COMMANDS += ("nbd",)


class UsageError(Exception):
    pass


__all__ = ["COMMANDS", "UsageError"]
