"""The compute-host image flow (what nova's libvirt driver does with images).

    from qcow2 import compute
    opts = compute.Options.from_file("/etc/nova/nova.conf", instances_path="/srv/inst")
    compute.spawn(opts, instance_uuid, image_id, "https://.../img.qcow2", 20 << 30,
                  disk_format="qcow2", checksum="sha256:...")
    compute.clean(opts, dry_run=True)
    compute.destroy(opts, instance_uuid)

Modules: ``config`` (options), ``locks`` (names, per-image locks), ``fetch`` (the base
cache), ``disks`` (instance disks), ``growfs`` (growing the file system of a qcow2 disk),
``manager`` (the cache manager), ``cacheaudit`` (the cache audit: not ``audit``, which
would shadow the function); with images_type=rbd ``rbdcache``, ``rbddisks``,
``rbdmanager``.
"""

from __future__ import annotations

from .cacheaudit import audit
from .config import Options, read_options
from .disks import destroy, spawn
from .errors import (ChecksumError, ComputeError, DownloadError, ImageFormatMismatchError,
                     InsufficientSpaceError, ToolError)
from .fetch import fetch_base
from .locks import base_name, ephemeral_name, swap_name
from .manager import bases_in_use, clean, usage

__all__ = ["Options", "read_options", "spawn", "destroy", "fetch_base", "clean", "usage", "audit",
           "bases_in_use", "base_name", "ephemeral_name", "swap_name", "ComputeError",
           "DownloadError", "ChecksumError", "ImageFormatMismatchError", "InsufficientSpaceError",
           "ToolError"]
