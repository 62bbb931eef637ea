"""Instance disks, as nova's libvirt image backends make them.

In ``<instances_path>/<instance uuid>/``:
  * ``disk``: for qcow2 a qcow2 overlay on the base (absolute backing file, backing
    format set, the flavor's root size); for raw/flat a sparse copy of the base extended
    to the root size; for lvm a logical volume ``<uuid>_disk`` in images_volume_group
    holding the raw image (data regions written, the rest zeroed).
  * ``disk.local`` (ephemeral, from a cached ``ephemeral_<size>_<hash>`` base formatted
    with default_ephemeral_format, label ``ephemeral0``) and ``disk.swap`` (from a
    cached ``swap_<MiB>`` base made by mkswap), made the same way as ``disk``.
  * ``disk.info``: JSON mapping each file disk's path to its format, as nova writes it.
preallocate_images=space reserves the space (fallocate; for a qcow2 overlay
``fallocate --keep-size`` over the virtual size, as nova does).  Raw disks that hold an
unpartitioned ext2/3/4 file system get it grown (``e2fsck -fp``, ``resize2fs``); qcow2
disks only with resize_fs_using_block_device, through a working copy of the guest view
whose changed clusters are written back into the overlay (``growfs``), and only when the
root size is larger than the image (as nova).
A root size smaller than the image is refused before any instance disk is created;
on failure everything made for the instance is removed.
"""

from __future__ import annotations

import json
import os
import shutil

from ..atomic import AtomicOutput
from .errors import ComputeError
from .fetch import check_space, fetch_base
from .templates import (ephemeral_base, grow_fs, instance_dir, swap_base,
                        virtual_size)

# -- one disk from a base -------------------------------------------------------------------

def _fallocate_keep_size(path: str, size: int) -> None:
    from ..backends.fallocate import FALLOC_FL_KEEP_SIZE, fallocate
    fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)
    try:
        fallocate(fd, FALLOC_FL_KEEP_SIZE, 0, size)
        os.fsync(fd)
    finally:
        os.close(fd)


def _file_disk(opts, base: str, base_fmt: str, path: str, size: int, grow: bool,
               stats: dict | None = None, premade: bool = False) -> str:
    """Make the file disk ``path``; returns its format.  ``stats`` receives what growing
    the file system of a qcow2 disk did (``growfs.grow_qcow2_fs``).  ``premade``: a
    flat disk whose copy of the base was written with the base (same pass)."""
    import qcow2
    space = opts.preallocate_images == "space"
    if opts.backend == "qcow2":
        if space:
            check_space(os.path.dirname(path), size, f"the disk {path}")
        qcow2.create(path, size, backing_file=os.path.abspath(base), backing_format=base_fmt,
                     cluster_size=65536)
        if grow and opts.resize_fs_using_block_device:
            old = virtual_size(base)
            if size > old:                       # nova: only when the disk was extended
                from .growfs import grow_qcow2_fs
                res = grow_qcow2_fs(path)
                if stats is not None and res is not None:
                    stats.update(res)
        if space:
            _fallocate_keep_size(path, size)
        return "qcow2"
    # flat / raw: a sparse raw copy, extended to the root size
    check_space(os.path.dirname(path), size if space else 0, f"the disk {path}")
    if premade:
        if space:                    # (preallocation wants its own pwrite copy)
            os.unlink(path)
            qcow2.sparse_copy(base, path, preallocate=True)
    elif base_fmt == "raw":
        qcow2.sparse_copy(base, path, preallocate=space)
    else:
        qcow2.convert(base, path, src_format=base_fmt, out_format="raw", untrusted=True)
    with open(path, "rb+") as f:
        if os.fstat(f.fileno()).st_size < size:
            os.ftruncate(f.fileno(), size)
        if space:
            from ..backends.fallocate import allocate
            allocate(f.fileno(), 0, size)
        os.fsync(f.fileno())
    if grow:
        grow_fs(path)
    return "raw"


def _lvm_disk(opts, base: str, base_fmt: str, lv_name: str, size: int, grow: bool) -> str:
    """A volume holding the raw image: data regions written, the rest zeroed."""
    import qcow2
    from ..backends import lvm
    vg = opts.images_volume_group
    dev = lvm.create_volume(vg, lv_name, size)
    try:
        out = lvm.BlockDeviceBackend(dev, writable=True)
        try:
            dev_size = out.size()
            with qcow2.open(base, untrusted=True, format=base_fmt) as img:
                buf = bytearray(4 << 20)
                pos = 0
                for e in img.extents():
                    if e.data and not e.zero:
                        off, end = e.start, e.start + e.length
                        while off < end:
                            n = min(len(buf), end - off)
                            mv = memoryview(buf)[:n]
                            img.readinto(mv, off)
                            out.pwrite(mv, off)
                            off += n
                    else:
                        out.zero_range(e.start, e.length)
                    pos = e.start + e.length
                out.zero_range(pos, dev_size - pos)
            out.flush()
        finally:
            out.close()
        if grow:
            grow_fs(dev)
    except BaseException:
        try:
            lvm.remove_volume(vg, lv_name)
        except OSError:
            pass
        raise
    return dev


def write_disk_info(inst_dir: str, entries: dict) -> None:
    """disk.info as nova writes it: {"<disk path>": "<format>"}."""
    path = os.path.join(inst_dir, "disk.info")
    info = {}
    if os.path.exists(path):
        with open(path, encoding="utf-8") as f:
            try:
                info = json.load(f)
            except ValueError:
                info = {}
    info.update(entries)
    with AtomicOutput(path, 0o644) as out:
        os.write(out.fd, json.dumps(info).encode())
        out.commit(sync=True)


# -- the flow -------------------------------------------------------------------------------

def spawn(opts, instance: str, image_id: str, source: str, root_size: int, *,
          disk_format: str | None = None, checksum: str | None = None,
          ephemeral_size: int | None = None, swap_size: int | None = None,
          progress=None) -> dict:
    """Fetch the image into the cache and build the instance's disks.

    Returns {"base": path, "base_format": fmt, "disks": {name: {"path", "format"}}}.
    """
    backend = opts.backend
    if backend == "rbd":
        from .rbddisks import spawn_rbd
        return spawn_rbd(opts, instance, image_id, source, root_size, disk_format=disk_format,
                         checksum=checksum, ephemeral_size=ephemeral_size,
                         swap_size=swap_size, progress=progress)
    inst_dir = instance_dir(opts, instance)
    if backend == "lvm":
        if not shutil.which("lvcreate"):
            raise ComputeError("images_type lvm needs lvm2 (lvcreate) installed")
    made_dir = not os.path.isdir(inst_dir)
    made: list[tuple[str, str]] = []
    try:
        base, base_fmt, premade = _fetch_for(opts, inst_dir, image_id, source, disk_format,
                                             checksum, progress, made)
        vsize = virtual_size(base)
        if root_size < vsize:
            raise ComputeError(f"root size {root_size} is smaller than the image "
                               f"({vsize} bytes): refused")
    except BaseException:
        _undo(opts, made)
        if made_dir:
            shutil.rmtree(inst_dir, ignore_errors=True)
        raise
    wants = [("disk", base, base_fmt, root_size, True)]
    os.makedirs(inst_dir, exist_ok=True)
    result = {"base": base, "base_format": base_fmt, "disks": {}}
    try:
        if ephemeral_size:
            wants.append(("disk.local", ephemeral_base(opts, ephemeral_size), "raw",
                          ephemeral_size, False))
        if swap_size:
            wants.append(("disk.swap", swap_base(opts, swap_size), "raw", swap_size, False))
        info = {}
        for name, b, bfmt, size, is_root in wants:
            grow = is_root
            if backend == "lvm":
                lv = f"{instance}_{name.replace('.', '_')}"
                dev = _lvm_disk(opts, b, bfmt, lv, size, grow)
                made.append(("lv", lv))
                result["disks"][name] = {"path": dev, "format": "raw"}
            else:
                path = os.path.join(inst_dir, name)
                pre = is_root and premade
                if os.path.exists(path) and not pre:
                    raise ComputeError(f"{path} already exists")
                if not pre:
                    made.append(("file", path))
                stats: dict = {}
                fmt = _file_disk(opts, b, bfmt, path, size, grow, stats, premade=pre)
                info[path] = fmt
                result["disks"][name] = {"path": path, "format": fmt}
                if stats:
                    result["disks"][name]["fs_grown"] = stats
        if info:
            write_disk_info(inst_dir, info)
    except BaseException:
        _undo(opts, made)
        if made_dir:
            shutil.rmtree(inst_dir, ignore_errors=True)
        raise
    return result


def _fetch_for(opts, inst_dir: str, image_id: str, source: str, disk_format, checksum,
               progress, made: list) -> tuple[str, str, bool]:
    """fetch_base for a spawn: (base, format, whether the root disk was made with it).
    A flat disk is written in the same pass as a raw base converted now (no second
    pass over the data); ``made`` records it for the undo."""
    copy_to = None
    if opts.backend == "flat":
        copy_to = os.path.join(inst_dir, "disk")
        if os.path.exists(copy_to):
            raise ComputeError(f"{copy_to} already exists")
        os.makedirs(inst_dir, exist_ok=True)
    base, base_fmt = fetch_base(opts, image_id, source, disk_format=disk_format,
                                checksum=checksum, progress=progress, copy_to=copy_to)
    premade = copy_to is not None and os.path.exists(copy_to)
    if premade:
        made.append(("file", copy_to))
    return base, base_fmt, premade


def _undo(opts, made) -> None:
    from ..backends import lvm
    for kind, what in reversed(made):
        try:
            if kind == "lv":
                lvm.remove_volume(opts.images_volume_group, what)
            else:
                os.unlink(what)
        except OSError:
            pass


def destroy(opts, instance: str) -> list[str]:
    """Remove the instance's directory, its volumes (lvm) and its images in the pool
    (rbd); returns what was removed."""
    inst_dir = instance_dir(opts, instance)
    removed = []
    if opts.backend == "rbd":
        from .rbddisks import destroy_rbd
        removed += destroy_rbd(opts, instance)
    if opts.images_volume_group and shutil.which("lvs"):
        from ..backends import lvm
        try:
            names = lvm.list_volumes(opts.images_volume_group)
        except OSError:
            names = []
        for lv in names:
            if lv.startswith(f"{instance}_"):
                lvm.remove_volume(opts.images_volume_group, lv)
                removed.append(lvm.volume_path(opts.images_volume_group, lv))
    if os.path.isdir(inst_dir):
        shutil.rmtree(inst_dir)
        removed.append(inst_dir)
    return removed
