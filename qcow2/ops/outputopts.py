"""convert's qcow2 output: its ``-o`` options checked for the output format (``-B``/``-F``
given as ``-o backing_file=/backing_fmt=``), and its temporary file (errors name the
user's file; removed after a failure)."""

from __future__ import annotations

import os

from ..errors import InvalidOptionError


def output_options(out_format: str, options, no_create: bool, backing_file,
                    backing_format) -> tuple[dict, str | None, str | None]:
    """The output's -o options checked, and its backing file and format: -o
    backing_file=/backing_fmt= are -B/-F spelled as creation options (the -o value
    wins, as in qemu-img).  With ``no_create`` (-n) a backing file only means that
    what the source's backing chain holds is not copied."""
    if no_create and options:
        raise InvalidOptionError("-o has no effect when skipping image creation")
    from ..options import option_dict
    opts = option_dict(options)
    if out_format == "raw" and opts:
        from ..options import RAW_OPTIONS, create_option_error, parse_options
        parse_options(opts, RAW_OPTIONS, create_option_error("raw"))
    if opts.get("backing_file") is not None:
        backing_file = opts.pop("backing_file")
    if opts.get("backing_fmt") is not None:
        backing_format = opts.pop("backing_fmt")
    if backing_file is not None and out_format != "qcow2":
        raise InvalidOptionError("Backing file not supported for file format 'raw'")
    return opts, backing_file, backing_format


def name_the_output(exc: Exception, tmp: str, dst: str) -> None:
    """An error about the temporary output names the user's file instead."""
    if exc.args and isinstance(exc.args[0], str) and tmp in exc.args[0]:
        exc.args = (exc.args[0].replace(tmp, dst),) + tuple(exc.args[1:])
    lines = getattr(exc, "lines", None)
    if lines:
        exc.lines = [ln.replace(tmp, dst) for ln in lines]


def discard_output(out, tmp) -> None:
    """After a failure: close the output, remove the temporary file."""
    if out is not None:
        try:
            out.close()
        except Exception:  # noqa: BLE001 - the original error matters more
            pass
    if tmp is not None:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass


__all__ = ["output_options", "name_the_output", "discard_output"]
