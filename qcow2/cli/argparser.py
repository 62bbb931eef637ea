"""The ``qcow2`` command line's argparse parser: help, usage errors, and every
command line ``quickparse`` leaves to it (importing argparse costs a process ~8 ms,
which plain command lines do not pay)."""

from __future__ import annotations

import argparse
import importlib
import os
import sys

from .usage import COMMANDS, UsageError

_WIDTH: int | None = None


def _width() -> int:
    """argparse's help width, computed once (argparse asks for it on every
    add_argument, through shutil, which costs the start-up of every command)."""
    global _WIDTH
    if _WIDTH is None:
        try:
            cols = int(os.environ.get("COLUMNS", ""))
        except ValueError:
            try:
                cols = os.get_terminal_size(sys.__stdout__.fileno()).columns
            except (AttributeError, ValueError, OSError):
                cols = 80
        _WIDTH = max(cols - 2, 11)
    return _WIDTH


class _Formatter(argparse.HelpFormatter):
    def __init__(self, prog, indent_increment=2, max_help_position=24, width=None):
        super().__init__(prog, indent_increment, max_help_position,
                         _width() if width is None else width)


class _Parser(argparse.ArgumentParser):
    def __init__(self, *args, **kwargs):
        kwargs.setdefault("formatter_class", _Formatter)
        self.option_arity: dict[str, bool] = {}   # option string -> takes a value (getopt)
        self.commands: dict[str, argparse.ArgumentParser] = {}
        super().__init__(*args, **kwargs)

    def _record(self, action):
        for opt in action.option_strings:
            self.option_arity[opt] = action.nargs != 0
        return action

    def add_argument(self, *args, **kwargs):
        return self._record(super().add_argument(*args, **kwargs))

    def add_mutually_exclusive_group(self, **kwargs):
        group = super().add_mutually_exclusive_group(**kwargs)
        add = group.add_argument
        group.add_argument = lambda *a, **k: self._record(add(*a, **k))
        return group

    def error(self, message):  # one line, exit 1 like qemu-img
        raise UsageError(message)


def build_parser(only: str | None = None) -> argparse.ArgumentParser:
    """The parser; with ``only`` (a command name) just that subcommand's (each
    subcommand module is imported to build its parser: a command line that names
    its command need not pay for the others)."""
    p = _Parser(prog="qcow2", description="qcow2/raw disk image tool (qemu-img compatible)")
    p.add_argument("--version", action="store_true", help="print the version and exit")
    sub = p.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    for name in COMMANDS:
        if only is not None and name != only:
            continue
        importlib.import_module(f".{name}", __package__).add_parser(sub)
    p.commands = sub.choices
    return p


__all__ = ["build_parser"]
