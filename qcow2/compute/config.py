"""Options of the compute-host image flow, with nova's names, sections and defaults.

Read from a nova.conf-style INI file (``Options.from_file``), overridable in code
(``Options(instances_path=..., images_type="raw")`` or ``opts.replace(...)``).  Unknown
values are a clear :class:`InvalidOptionError` naming the option (``[libvirt]
images_type``).
"""

from __future__ import annotations

import configparser
import os
from dataclasses import dataclass, fields, replace

from ..errors import InvalidOptionError

_IMAGES_TYPES = ("default", "raw", "flat", "qcow2", "lvm", "rbd")
_PREALLOCATE = ("none", "space")
_FS = ("ext2", "ext3", "ext4", "xfs", "vfat", "ntfs")

# (attribute, section, option name, kind)
_SCHEMA = (
    ("instances_path", "DEFAULT", "instances_path", "str"),
    ("force_raw_images", "DEFAULT", "force_raw_images", "bool"),
    ("use_cow_images", "DEFAULT", "use_cow_images", "bool"),
    ("preallocate_images", "DEFAULT", "preallocate_images", "str"),
    ("default_ephemeral_format", "DEFAULT", "default_ephemeral_format", "str"),
    ("resize_fs_using_block_device", "DEFAULT", "resize_fs_using_block_device", "bool"),
    ("images_type", "libvirt", "images_type", "str"),
    ("images_volume_group", "libvirt", "images_volume_group", "str"),
    ("images_rbd_pool", "libvirt", "images_rbd_pool", "str"),
    ("images_rbd_ceph_conf", "libvirt", "images_rbd_ceph_conf", "str"),
    ("rbd_user", "libvirt", "rbd_user", "str"),
    ("rbd_connect_timeout", "libvirt", "rbd_connect_timeout", "int"),
    ("rbd_destroy_volume_retries", "libvirt", "rbd_destroy_volume_retries", "int"),
    ("rbd_destroy_volume_retry_interval", "libvirt", "rbd_destroy_volume_retry_interval",
     "int"),
    ("subdirectory_name", "image_cache", "subdirectory_name", "str"),
    ("manager_interval", "image_cache", "manager_interval", "int"),
    ("remove_unused_base_images", "image_cache", "remove_unused_base_images", "bool"),
    ("remove_unused_original_minimum_age_seconds", "image_cache",
     "remove_unused_original_minimum_age_seconds", "int"),
    ("remove_unused_resized_minimum_age_seconds", "image_cache",
     "remove_unused_resized_minimum_age_seconds", "int"),
)
_BOOL = {"1": True, "yes": True, "true": True, "on": True,
         "0": False, "no": False, "false": False, "off": False}


@dataclass(frozen=True)
class Options:
    instances_path: str = "/var/lib/nova/instances"
    force_raw_images: bool = True
    use_cow_images: bool = True
    preallocate_images: str = "none"
    default_ephemeral_format: str | None = None
    resize_fs_using_block_device: bool = False
    images_type: str = "default"
    images_volume_group: str | None = None
    images_rbd_pool: str = "rbd"
    images_rbd_ceph_conf: str | None = None      # None: librados' own search
    rbd_user: str | None = None
    rbd_connect_timeout: int = 5
    rbd_destroy_volume_retries: int = 12
    rbd_destroy_volume_retry_interval: int = 5
    subdirectory_name: str = "_base"
    manager_interval: int = 2400
    remove_unused_base_images: bool = True
    remove_unused_original_minimum_age_seconds: int = 86400
    remove_unused_resized_minimum_age_seconds: int = 3600

    def __post_init__(self):
        if self.images_type not in _IMAGES_TYPES:
            raise InvalidOptionError(f"[libvirt] images_type: invalid value "
                                     f"{self.images_type!r} (one of {', '.join(_IMAGES_TYPES)})")
        if self.preallocate_images not in _PREALLOCATE:
            raise InvalidOptionError(f"[DEFAULT] preallocate_images: invalid value "
                                     f"{self.preallocate_images!r} (none or space)")
        if self.default_ephemeral_format not in (None, *_FS):
            raise InvalidOptionError(f"[DEFAULT] default_ephemeral_format: invalid value "
                                     f"{self.default_ephemeral_format!r} "
                                     f"(one of {', '.join(_FS)})")
        if not self.instances_path:
            raise InvalidOptionError("[DEFAULT] instances_path: must not be empty")
        sub = self.subdirectory_name
        if not sub or "/" in sub or sub in (".", ".."):
            raise InvalidOptionError(f"[image_cache] subdirectory_name: invalid value {sub!r}")
        for name in ("manager_interval", "remove_unused_original_minimum_age_seconds",
                     "remove_unused_resized_minimum_age_seconds"):
            if getattr(self, name) < (-1 if name == "manager_interval" else 0):
                raise InvalidOptionError(f"[image_cache] {name}: must not be negative")
        self._check_rbd()
        if self.backend == "lvm" and not self.images_volume_group:
            raise InvalidOptionError("[libvirt] images_volume_group: required when "
                                     "images_type is lvm")

    def _check_rbd(self) -> None:
        if not self.images_rbd_pool or "/" in self.images_rbd_pool \
                or "@" in self.images_rbd_pool:
            raise InvalidOptionError(f"[libvirt] images_rbd_pool: invalid pool name "
                                     f"{self.images_rbd_pool!r}")
        if self.rbd_connect_timeout <= 0:
            raise InvalidOptionError("[libvirt] rbd_connect_timeout: must be positive")
        if self.rbd_destroy_volume_retries < 1:
            raise InvalidOptionError("[libvirt] rbd_destroy_volume_retries: must be at "
                                     "least 1")
        if self.rbd_destroy_volume_retry_interval < 0:
            raise InvalidOptionError("[libvirt] rbd_destroy_volume_retry_interval: must "
                                     "not be negative")
        if self.images_type == "rbd" and not self.force_raw_images:
            # as nova: a qcow2 base cannot be the parent of an RBD clone
            raise InvalidOptionError("[libvirt] images_type = rbd needs [DEFAULT] "
                                     "force_raw_images = True (RBD clones need a raw base); "
                                     "force_raw_images = False is refused")

    # -- derived ---------------------------------------------------------------------
    @property
    def backend(self) -> str:
        """images_type with ``default`` resolved: qcow2 with use_cow_images, else flat."""
        if self.images_type == "default":
            return "qcow2" if self.use_cow_images else "flat"
        return "flat" if self.images_type == "raw" else self.images_type

    @property
    def base_dir(self) -> str:
        return os.path.join(self.instances_path, self.subdirectory_name)

    @property
    def lock_dir(self) -> str:
        return os.path.join(self.instances_path, "locks")

    @property
    def ephemeral_format(self) -> str:
        return self.default_ephemeral_format or "ext4"

    def replace(self, **changes) -> "Options":
        return replace(self, **changes)

    # -- reading ---------------------------------------------------------------------
    @classmethod
    def from_file(cls, path, **overrides) -> "Options":
        """Options from a nova.conf-style INI file; ``overrides`` win."""
        values = read_options(path)
        values.update(overrides)
        return cls(**values)


def read_options(path) -> dict:
    """The options a nova.conf-style INI file sets, by attribute name, converted (those
    it leaves out are absent: nova's defaults apply)."""
    cp = configparser.ConfigParser(interpolation=None, strict=False)
    try:
        with open(path, encoding="utf-8") as f:
            cp.read_file(f)
    except configparser.Error as exc:
        raise InvalidOptionError(f"cannot parse {path}: {exc}".splitlines()[0]) from None
    values = {}
    for attr, section, name, kind in _SCHEMA:
        if section == "DEFAULT":
            raw = cp.defaults().get(name)
        else:
            raw = cp.get(section, name, fallback=None) if cp.has_section(section) else None
            if raw is not None and cp.defaults().get(name) == raw \
                    and not cp.has_option(section, name):
                raw = None
        if raw is None:
            continue
        values[attr] = _convert(section, name, kind, raw.strip())
    return values


def _convert(section: str, name: str, kind: str, raw: str):
    if kind == "bool":
        try:
            return _BOOL[raw.lower()]
        except KeyError:
            raise InvalidOptionError(f"[{section}] {name}: invalid boolean {raw!r}") from None
    if kind == "int":
        try:
            return int(raw)
        except ValueError:
            raise InvalidOptionError(f"[{section}] {name}: invalid integer {raw!r}") from None
    if name in ("default_ephemeral_format", "images_rbd_ceph_conf", "rbd_user") and raw == "":
        return None
    return raw


OPTION_NAMES = tuple(f.name for f in fields(Options))
