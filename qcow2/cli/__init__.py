"""The ``qcow2`` command line, spelled like qemu-img.

Each subcommand of ``COMMANDS`` lives in its own module with ``add_parser(subparsers)``
and ``run(args) -> int``; ``common`` holds the argument helpers they share and
``output`` what they print in qemu-img's layouts (info text, snapshot table, QEMU's
JSON).  Errors become one line on stderr and a non-zero exit status; never a traceback
(set QCOW2_DEBUG=1 to see one).
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys

COMMANDS = ("create", "info", "map", "convert", "check", "compare", "measure", "resize",
            "rebase", "commit", "snapshot", "amend", "dd", "bitmap", "compute")
COMMANDS += ("nbd",)


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


class UsageError(Exception):
    pass


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
        importlib.import_module(f".{name}", __name__).add_parser(sub)
    p.commands = sub.choices
    return p


class _Terminated(BaseException):
    """SIGTERM or SIGHUP arrived: unwind (temporary outputs are removed on the way),
    then die of the signal."""


def _on_signal(signum, frame):
    import signal
    signal.signal(signum, signal.SIG_IGN)       # a second one must not cut the clean-up
    raise _Terminated(signum)


def _catch_termination():
    """Turn SIGTERM/SIGHUP into an exception while a command runs (the previous
    handlers, to restore after), so that they clean up as Ctrl-C does."""
    import signal
    import threading
    if threading.current_thread() is not threading.main_thread():
        return {}
    old = {}
    for sig in (signal.SIGTERM, signal.SIGHUP):
        if signal.getsignal(sig) == signal.SIG_DFL:
            old[sig] = signal.signal(sig, _on_signal)
    return old


def main(argv=None) -> int:
    import signal
    old = _catch_termination()
    try:
        return _main(argv)
    except _Terminated as exc:
        signum = exc.args[0]
        for sig, handler in old.items():
            signal.signal(sig, handler)
        old = {}
        os.kill(os.getpid(), signum)            # the exit status says which signal
        return 128 + signum
    finally:
        for sig, handler in old.items():
            signal.signal(sig, handler)


def _main(argv) -> int:
    from ..errors import Qcow2Error

    argv = sys.argv[1:] if argv is None else list(argv)
    try:
        if "--object" in argv or any(str(a).startswith("--object=") for a in argv):
            from ..secrets import take_objects
            argv = take_objects(argv)            # qemu-img's secrets (qcow2.secrets)
        parser = build_parser(argv[0] if argv and argv[0] in COMMANDS else None)
        if argv and argv[0] in COMMANDS and argv[0] != "compute":
            from .getopt import reorder
            argv = reorder(parser, argv)     # options anywhere, as qemu-img's getopt
        args = parser.parse_args(argv)
        if args.version:
            from .. import __version__
            print(f"qcow2 version {__version__}")
            return 0
        if not args.command:
            parser.print_help()
            return 1
        from .common import apply_image_opts
        apply_image_opts(args)
        return int(args.func(args) or 0)
    except UsageError as exc:
        _err(str(exc))
        return 1
    except KeyboardInterrupt:
        _err("interrupted")
        return 130
    except BrokenPipeError:
        try:
            sys.stdout = None  # type: ignore[assignment]
        except Exception:  # noqa: BLE001
            pass
        return 1
    except Qcow2Error as exc:
        _debug()
        from .common import report_error
        report_error(exc)
        return getattr(exc, "exit_code", 1)
    except OSError as exc:
        _debug()
        where = f" '{exc.filename}'" if exc.filename else ""
        _err(f"{exc.strerror or exc}{where}".strip())
        return 1
    except MemoryError:
        _err("out of memory")
        return 1
    except Exception as exc:  # noqa: BLE001 - the CLI never shows a traceback
        _debug()
        _err(f"internal error: {type(exc).__name__}: {exc}")
        return 1


def _err(msg: str) -> None:
    from .common import error_line
    error_line(msg)                      # exactly one line


def _debug() -> None:
    if os.environ.get("QCOW2_DEBUG"):
        import traceback
        traceback.print_exc()
