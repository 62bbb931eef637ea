"""What the instance disks are made from on the host, whatever the images_type: the
instance directory's name, ``ephemeral_<size>_<hash>`` and ``swap_<MiB>`` bases made
once in the cache (``mkfs`` / ``mkswap`` on a sparse file, under the base's lock, renamed
into place), the external tools (``run_tool``) and growing an ext file system in a raw
disk (``e2fsck -fp``, ``resize2fs``), as nova does them.
"""

from __future__ import annotations

import os
import re
import subprocess

from ..atomic import replace
from ..paths import make_temp
from .errors import ComputeError, ToolError
from .fetch import check_space, locked_base
from .locks import ephemeral_name, swap_name

_UUID = re.compile(r"^[0-9a-fA-F]{8}-?[0-9a-fA-F]{4}-?[0-9a-fA-F]{4}-?[0-9a-fA-F]{4}-?"
                   r"[0-9a-fA-F]{12}$")
EPHEMERAL_LABEL = "ephemeral0"


def run_tool(args, *, ok=(0,)) -> str:
    try:
        res = subprocess.run(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    except FileNotFoundError:
        raise ToolError(f"{args[0]} is not installed") from None
    if res.returncode not in ok:
        raise ToolError(f"{' '.join(args)} failed (exit {res.returncode}): "
                        f"{res.stderr.strip()}")
    return res.stdout


def instance_dir(opts, instance: str) -> str:
    if not _UUID.match(instance):
        raise ComputeError(f"invalid instance uuid {instance!r}")
    return os.path.join(opts.instances_path, instance)


def virtual_size(path: str) -> int:
    import qcow2
    with qcow2.open(path, untrusted=True) as img:
        return img.size


# -- file systems ----------------------------------------------------------------------

def mkfs(fs: str, path: str, label: str | None) -> None:
    """nova's utils.mkfs: ``mkfs -t FS [-F] [-L|-n LABEL] PATH``."""
    args = ["mkfs", "-t", fs]
    if fs in ("ext2", "ext3", "ext4", "ntfs"):
        args.append("-F")
    elif fs == "xfs":
        args.append("-f")
    if label:
        args += ["-n" if fs in ("msdos", "vfat") else "-L", label]
    run_tool(args + [path])


def is_extendable_fs(path: str) -> bool:
    """nova's check: e2label succeeds on the whole disk (an unpartitioned ext2/3/4)."""
    res = subprocess.run(["e2label", path], stdout=subprocess.DEVNULL,
                         stderr=subprocess.DEVNULL)
    return res.returncode == 0


def grow_fs(path: str) -> bool:
    """``e2fsck -fp`` then ``resize2fs`` when ``path`` holds an unpartitioned ext fs."""
    if not is_extendable_fs(path):
        return False
    run_tool(["e2fsck", "-fp", path], ok=(0, 1, 2))
    run_tool(["resize2fs", path])
    return True


# -- cached bases made here (ephemeral, swap) ---------------------------------------------

def _make_base(opts, name: str, size: int, fill) -> str:
    """Create the cached base ``name`` of ``size`` bytes with ``fill(path)`` once."""
    base_dir = opts.base_dir
    with locked_base(opts, name) as path:
        if os.path.exists(path):
            return path
        check_space(base_dir, size // 16, f"the base {name}")
        fd, tmp = make_temp(name, base_dir)
        try:
            os.ftruncate(fd, size)
            fill(tmp)
            os.fsync(fd)
            os.chmod(tmp, 0o644)
            replace(tmp, path)          # (a failed directory sync removes it again)
        finally:
            os.close(fd)
            if os.path.exists(tmp):
                os.unlink(tmp)
    return path


def ephemeral_base(opts, size: int) -> str:
    fs = opts.ephemeral_format
    return _make_base(opts, ephemeral_name(size, fs), size,
                      lambda p: mkfs(fs, p, EPHEMERAL_LABEL))


def swap_base(opts, size: int) -> str:
    return _make_base(opts, swap_name(size), size, lambda p: run_tool(["mkswap", p]))
