"""The image cache manager: which bases are in use, and removal of the unused ones.

A base is in use when a qcow2 disk of an instance under instances_path (made here or by
nova) names it as its backing file (resolved as QEMU does, relative to the disk).
Bases in use are touched.  An unused original (a file named by the sha1 of an image id)
is removed once its age (now - mtime) reaches remove_unused_original_minimum_age_seconds,
any other unused base (resized, ephemeral_*, swap_*) at
remove_unused_resized_minimum_age_seconds -- nova's rule: ``age < maxage`` is too
young.  Each removal happens under the image's lock (not waited for: a held lock means
the file is being written, and it is left alone) after a re-check that it is still
unused and old enough.
"""

from __future__ import annotations

import os
import re
import struct
import time

from .locks import try_image_lock

_ORIGINAL = re.compile(r"^[0-9a-f]{40}$")
_SKIP_DIRS = {"locks", "snapshots"}


def backing_file_of(path: str) -> str | None:
    """The absolute backing file of a qcow2 file, or None (not qcow2 / no backing)."""
    try:
        with open(path, "rb") as f:
            head = f.read(20)
            if len(head) < 20 or head[:4] != b"QFI\xfb":
                return None
            off, size = struct.unpack(">QI", head[8:20])
            if not off or not size or size > 1023:
                return None
            f.seek(off)
            name = f.read(size).decode("utf-8", "replace")
    except OSError:
        return None
    if name.startswith(("json:", "file:")):
        name = name.split(":", 1)[1] if name.startswith("file:") else name
    return os.path.normpath(os.path.join(os.path.dirname(os.path.abspath(path)), name))


def bases_in_use(opts) -> dict[str, list[str]]:
    """{base path: [disks using it]} for the bases in the cache directory."""
    base_dir = os.path.normpath(os.path.abspath(opts.base_dir))
    used: dict[str, list[str]] = {}
    try:
        entries = os.listdir(opts.instances_path)
    except FileNotFoundError:
        return used
    for entry in entries:
        d = os.path.join(opts.instances_path, entry)
        if entry == opts.subdirectory_name or entry in _SKIP_DIRS or entry.startswith(".") \
                or not os.path.isdir(d) or os.path.islink(d):
            continue
        try:
            files = os.listdir(d)
        except OSError:
            continue
        for fname in files:
            p = os.path.join(d, fname)
            if not os.path.isfile(p):
                continue
            b = backing_file_of(p)
            if b is not None and os.path.dirname(b) == base_dir:
                used.setdefault(b, []).append(p)
    return used


def cached_files(opts) -> list[str]:
    try:
        names = sorted(os.listdir(opts.base_dir))
    except FileNotFoundError:
        return []
    return [os.path.join(opts.base_dir, n) for n in names
            if not n.startswith(".") and os.path.isfile(os.path.join(opts.base_dir, n))]


def max_age(opts, path: str) -> int:
    if _ORIGINAL.match(os.path.basename(path)):
        return opts.remove_unused_original_minimum_age_seconds
    return opts.remove_unused_resized_minimum_age_seconds


def usage(opts) -> dict:
    """Disk usage of the cache: per file and in total (allocated and apparent bytes)."""
    files = []
    total = apparent = 0
    for p in cached_files(opts):
        try:
            st = os.stat(p)
        except FileNotFoundError:
            continue
        files.append({"path": p, "size": st.st_size, "allocated": st.st_blocks * 512,
                      "mtime": int(st.st_mtime)})
        total += st.st_blocks * 512
        apparent += st.st_size
    return {"directory": opts.base_dir, "files": files, "count": len(files),
            "allocated": total, "size": apparent}


def clean(opts, *, dry_run: bool = False, now: float | None = None) -> dict:
    """One pass of the cache manager; returns what it found and did."""
    now = time.time() if now is None else now
    used = bases_in_use(opts)
    report = {"in_use": sorted(used), "removed": [], "would_remove": [], "too_young": [],
              "busy": [], "kept": []}
    for b in used:
        if not dry_run and os.path.exists(b):
            try:
                os.utime(b)
            except OSError:
                pass
    for p in cached_files(opts):
        if p in used:
            continue
        if not opts.remove_unused_base_images:
            report["kept"].append(p)
            continue
        try:
            age = now - os.stat(p).st_mtime
        except FileNotFoundError:
            continue
        if age < max_age(opts, p):
            report["too_young"].append(p)
            continue
        if dry_run:
            report["would_remove"].append(p)
            continue
        name = os.path.basename(p)
        with try_image_lock(opts.lock_dir, name) as got:
            if not got:
                report["busy"].append(p)
                continue
            # re-check under the lock: still unused, still old enough
            try:
                age = now - os.stat(p).st_mtime
            except FileNotFoundError:
                continue
            if p in bases_in_use(opts) or age < max_age(opts, p):
                report["kept"].append(p)
                continue
            os.unlink(p)
            report["removed"].append(p)
    _clean_temps(opts, report, dry_run)
    report["usage"] = usage(opts)
    return report


def _clean_temps(opts, report, dry_run: bool) -> None:
    """Temporary ``.<name>.<rand>.part`` files whose image lock is free are stale (a
    killed fetch): removed (or, dry run, listed)."""
    report["stale_temporaries"] = []
    try:
        entries = sorted(os.listdir(opts.base_dir))
    except FileNotFoundError:
        return
    for entry in entries:
        m = re.match(r"^\.(.+)\.[^.]+\.part$", entry)
        if not m:
            continue
        p = os.path.join(opts.base_dir, entry)
        with try_image_lock(opts.lock_dir, m.group(1)) as got:
            if not got:
                continue
            if not dry_run:
                try:
                    os.unlink(p)
                except FileNotFoundError:
                    continue
            report["stale_temporaries"].append(p)
