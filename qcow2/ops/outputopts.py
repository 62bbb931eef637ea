"""convert's options checked: the modes that need no image (``-t``, ``-S``, ``-c``...),
the output's ``-o`` options for the output format (``-B``/``-F`` given as ``-o
backing_file=/backing_fmt=``); and its temporary file (errors name the user's file;
removed after a failure)."""

from __future__ import annotations

import os

from .. import constants as C
from ..errors import InvalidOptionError
from ..rbdname import is_rbd_name


CACHE_MODES = ("none", "writeback", "unsafe", "writethrough", "directsync")


def check_cache(cache: str, *, source: bool = False) -> None:
    """qemu-img's check of a ``-t`` (``source``: ``-T``) cache mode."""
    if cache not in CACHE_MODES:
        raise InvalidOptionError(f"Invalid {'source ' if source else ''}cache option: "
                                 f"{cache}")


def check_modes(cache, sparse_size, compress, out_format, no_create, target_is_zero,
                extra_outputs, dst) -> None:
    """convert's option checks that need no image."""
    check_cache(cache)
    if sparse_size < 0 or (sparse_size and sparse_size % 512):
        raise InvalidOptionError("Invalid buffer size for sparse output specified: "
                                 f"{sparse_size} (must be a multiple of 512)")
    if compress and out_format != "qcow2":
        raise InvalidOptionError("Compression not supported for this file format")
    if target_is_zero and not no_create:
        raise InvalidOptionError("--target-is-zero requires use of -n flag")
    if extra_outputs and (
            out_format != "raw" or no_create or is_rbd_name(os.fspath(dst))):
        raise InvalidOptionError("copies, before_commit and on_data need a new raw file "
                                 "output")


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


def bitmaps_to_copy(images, out_format: str, opts: dict, skip_broken: bool) -> list:
    """convert --bitmaps: the source's persistent bitmaps (qemu-img's refusals: one
    qcow2 source, a qcow2 v3 output; a bitmap in use is refused, or skipped with
    --skip-broken-bitmaps)."""
    from ..errors import Qcow2Error, UnsupportedFeatureError
    from ..reshape import read_bitmaps

    if len(images) != 1:
        raise InvalidOptionError("Copying bitmaps only possible with single source")
    if out_format != "qcow2" or str(opts.get("compat", "")) in ("0.10", "v2"):
        raise UnsupportedFeatureError(f"Format driver '{out_format}' does not support "
                                      f"bitmaps", feature="convert --bitmaps")
    if images[0].format != "qcow2" or images[0].header.version < 3:
        raise UnsupportedFeatureError("Source lacks bitmap support",
                                      feature="convert --bitmaps")
    out = []
    for bm in read_bitmaps(images[0]):
        if bm.flags & C.BME_FLAG_IN_USE:
            if skip_broken:
                continue
            name = bm.name.decode("utf-8", "replace")
            err = Qcow2Error(f"Cannot copy inconsistent bitmap '{name}'")
            err.hint = ("Try --skip-broken-bitmaps, or use 'qemu-img bitmap --remove' to "  # type: ignore[attr-defined]
                        "delete it\n")
            raise err
        out.append(bm)
    return out


def default_workers(dst) -> int:
    """One worker per core (up to 4); into RBD two per core (up to 8): its writes wait
    on the network and the OSDs, and more in flight keep decoding going meanwhile
    (measured on 2 cores: 4 workers take 0.8x the time of 2, for ~25 MiB more)."""
    cores = os.cpu_count() or 1
    if is_rbd_name(dst):
        return min(8, max(4, 2 * cores))
    return min(4, cores)


__all__ = ["CACHE_MODES", "check_cache", "check_modes", "default_workers", "output_options",
           "name_the_output", "discard_output", "bitmaps_to_copy"]
