"""The ``qcow2`` command line, spelled like qemu-img.

Each subcommand of ``COMMANDS`` lives in its own module with ``add_parser(subparsers)``
and ``run(args) -> int``; ``common`` holds the argument helpers they share and
``output`` what they print in qemu-img's layouts (info text, snapshot table, QEMU's
JSON).  Errors become one line on stderr and a non-zero exit status; never a traceback
(set QCOW2_DEBUG=1 to see one).  A plain command line is parsed by ``quickparse``
(argparse's import alone costs a process ~8 ms); help, usage errors and the rest by
argparse (``argparser``).
"""

from __future__ import annotations

import os
import sys

from .usage import COMMANDS, UsageError


def build_parser(only: str | None = None):
    """The argparse parser (``qcow2.cli.argparser``); with ``only`` (a command name)
    just that subcommand's."""
    from .argparser import build_parser as build
    return build(only)


class _Terminated(BaseException):
    """SIGTERM or SIGHUP arrived: unwind (temporary outputs are removed on the way),
    then die of the signal."""


def _on_signal(signum, frame):
    import _signal
    _signal.signal(signum, _signal.SIG_IGN)     # a second one must not cut the clean-up
    raise _Terminated(signum)


def _catch_termination():
    """Turn SIGTERM/SIGHUP into an exception while a command runs (the previous
    handlers, to restore after), so that they clean up as Ctrl-C does.  Through
    ``_signal``, the C core of ``signal`` (which imports ``enum``: ~4 ms a process);
    outside the main thread Python refuses handlers, and none are set."""
    import _signal
    old = {}
    for sig in (_signal.SIGTERM, _signal.SIGHUP):
        if _signal.getsignal(sig) == _signal.SIG_DFL:
            try:
                old[sig] = _signal.signal(sig, _on_signal)
            except ValueError:                  # not the main thread
                break
    return old


def main(argv=None) -> int:
    import _signal
    old = _catch_termination()
    try:
        return _main(argv)
    except _Terminated as exc:
        signum = exc.args[0]
        for sig, handler in old.items():
            _signal.signal(sig, handler)
        old = {}
        os.kill(os.getpid(), signum)            # the exit status says which signal
        return 128 + signum
    finally:
        for sig, handler in old.items():
            _signal.signal(sig, handler)


def run() -> None:
    """The ``qcow2`` command (the console script and ``python -m qcow2``): :func:`main`,
    then exit with its status.

    A command that leaves no other thread alive and registered no exit handler
    (``info``, ``create``, ``check``, ``convert``...; not one on RBD, whose connection
    is closed by librbd at exit) ends with ``os._exit`` once its output is flushed:
    everything it wrote is already on its way (images are flushed and closed before
    the command returns), and the interpreter's own shutdown, which tears down every
    module, would add 2.4 ms to a 19 ms process.  Anything else, or a failed flush,
    exits the normal way (waiting for threads, running exit handlers)."""
    rc = main()
    mods = sys.modules
    if "atexit" in mods or "qcow2.backends.rbd" in mods:
        sys.exit(rc)
    threading = mods.get("threading")
    if threading is not None and threading.active_count() != 1:
        sys.exit(rc)
    try:
        for stream in (sys.stdout, sys.stderr):
            if stream is not None:
                stream.flush()
    except Exception:  # noqa: BLE001 - Python's own exit reports it, as before
        sys.exit(rc)
    os._exit(rc)


def _main(argv) -> int:
    from ..errors import Qcow2Error

    argv = sys.argv[1:] if argv is None else list(argv)
    try:
        if "--object" in argv or any(str(a).startswith("--object=") for a in argv):
            from ..secrets import take_objects
            argv = take_objects(argv)            # qemu-img's secrets (qcow2.secrets)
        command = argv[0] if argv and argv[0] in COMMANDS else None
        args = None
        if command is not None and command != "compute":
            from .quickparse import quick_parse
            args = quick_parse(command, argv)    # plain command lines: no argparse
        if args is None:
            parser = build_parser(command)
            if command is not None and command != "compute":
                from .getopt import reorder
                argv = reorder(parser, argv)     # options anywhere, as qemu-img's getopt
            args = parser.parse_args(argv)
        if args.version:
            from .. import __version__
            print(f"qcow2 version {__version__}")
            return 0
        if not args.command:
            build_parser().print_help()
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
