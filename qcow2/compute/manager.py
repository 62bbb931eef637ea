"""The image cache manager: which bases are in use, and removal of the unused ones.

The cache files are classified by name as nova's ``_scan_base_images`` does:

===============================  ============  =====================================
name                              kind          removed when unused and at least
===============================  ============  =====================================
40 characters (sha1 of image id)  original      remove_unused_original_minimum_age_seconds
40 characters, ``_``, more        resized       remove_unused_resized_minimum_age_seconds
``swap_<MiB>``                    swap          remove_unused_original_minimum_age_seconds
``ephemeral_<GiB>_<7 hex>``       ephemeral     remove_unused_original_minimum_age_seconds
anything else                     --            never (left alone, reported as ignored)
===============================  ============  =====================================

Swap and ephemeral bases follow nova's separate swap pass (``_age_and_verify_swap_images``
/ ``_remove_swap_file``: the *original* age, not the resized one).  ``swap_<N>b`` and
``ephemeral_<N>b_<hash>`` are this flow's spelling of sizes that are not whole MiB/GiB.

In use means: a disk of an instance under instances_path (made here or by nova) names the
file as its backing file (resolved as QEMU does, relative to the disk); or, for swap and
ephemeral bases, an instance has a ``disk.swap`` / ``disk.local`` of the base's size --
the equivalent of nova's block-device mappings, so raw (flat) copies that do not point at
their base keep it too.  Bases in use are touched.  Age is ``now - mtime``; nova's rule
``age < maxage`` is too young (at exactly the limit the file goes).  Each removal happens
under the file's lock (not waited for: a held lock means the file is being written, and
it is left alone) after a re-check that it is still unused and old enough.

A guest writes its disks, so their content is never trusted for their format
(CVE-2026-24708: nova once probed a raw disk, found a qcow2 header a guest had written
and followed its backing file).  The format of each disk is what the instance's
``disk.info`` records (a host file, written when the disk was made, here and by nova):
only a disk recorded as qcow2 has its header read, and only for its backing file's
name, which is never opened.  A disk recorded as raw is never parsed; files that are
not disks (``console.log``, ...) are never read.  A disk nova would have recorded that
``disk.info`` does not list (or an unreadable ``disk.info``) could use any base: while
one exists nothing is removed (``unrecorded_disks``), as for a qcow2 disk whose header
cannot be read (``unreadable_disks``).
"""

from __future__ import annotations

import json
import os
import re
import time

from ..errors import Qcow2Error
from ..header import Header
from ..paths import temp_owner
from .locks import try_image_lock

_SWAP = re.compile(r"^swap_([0-9]+)(b?)$")
_EPHEMERAL = re.compile(r"^ephemeral_([0-9]+)(b?)_([0-9a-f]{7})$")
_SKIP_DIRS = {"locks", "snapshots"}
#: file names of image-backed disks in nova's instance layout
_DISK_NAME = re.compile(r"^disk(\.local|\.swap|\.eph[0-9]+|\.rescue)?$")
_DIGEST = 40                      # hex digits of a sha1: nova's cache names


def kind_of(name: str) -> str | None:
    """``original``, ``resized``, ``swap``, ``ephemeral`` or None (not a cache file)."""
    if name.startswith("."):
        return None
    if len(name) == _DIGEST:
        return "original"
    if len(name) > _DIGEST + 2 and name[_DIGEST] == "_":
        return "resized"
    if _SWAP.match(name):
        return "swap"
    if _EPHEMERAL.match(name):
        return "ephemeral"
    return None


def size_of_name(name: str) -> int | None:
    """The disk size a swap/ephemeral base name stands for (None for other names)."""
    m = _SWAP.match(name)
    if m:
        return int(m.group(1)) * (1 if m.group(2) else 1 << 20)
    m = _EPHEMERAL.match(name)
    if m:
        return int(m.group(1)) * (1 if m.group(2) else 1 << 30)
    return None


def _resolve_backing(disk: str, name: str) -> str:
    """The absolute, normalised path of the backing file ``name`` of ``disk``."""
    if name.startswith("file:"):
        name = name[len("file:"):]
    return os.path.normpath(os.path.join(os.path.dirname(os.path.abspath(disk)), name))


#: describe_disk's backing file for a qcow2 disk whose header the engine refuses (a
#: future feature bit, damage): it may use any base, so while one exists nothing is
#: removed (nova, whose qemu-img info fails on such a disk, removes nothing either).
UNREADABLE = "<unreadable>"


def describe_disk(path: str, fmt: str = "qcow2") -> tuple[str | None, int | None]:
    """(backing file, guest size) of an instance disk recorded as ``fmt``: for a qcow2
    disk, as the engine's header parser reads it -- the absolute backing file (None:
    none; :data:`UNREADABLE`: not a qcow2 after all, or a header the engine refuses, so
    its backing file cannot be known) and the virtual size; for any other format the
    file is not read at all (no backing file, its size).  Only the first cluster of a
    qcow2 disk is read: no backing file is opened and no lock is taken (the instance
    may be running), and a scan of many disks stays cheap."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except OSError:
        return None, None
    try:
        size = os.fstat(fd).st_size
        if fmt != "qcow2":
            return None, size
        header = Header.parse(lambda n, offset: os.pread(fd, n, offset), size)
    except Qcow2Error:
        return UNREADABLE, None
    except OSError:
        return None, None
    finally:
        os.close(fd)
    name = header.backing_file
    return (_resolve_backing(path, name) if name else None), header.size


def recorded_formats(inst_dir: str) -> dict[str, str] | None:
    """{file name: format} from the instance's ``disk.info`` ({} when there is none;
    None when it cannot be read or parsed)."""
    path = os.path.join(inst_dir, "disk.info")
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read(1 << 20)
    except FileNotFoundError:
        return {}
    except (OSError, ValueError):
        return None
    try:
        info = json.loads(text) if text.strip() else {}
    except ValueError:
        return None
    if not isinstance(info, dict):
        return None
    here = {os.path.normpath(inst_dir), os.path.normpath(os.path.abspath(inst_dir))}
    out = {}
    for key, fmt in info.items():
        if isinstance(key, str) and isinstance(fmt, str) and \
                os.path.dirname(os.path.normpath(os.path.abspath(key))) in here:
            out[os.path.basename(key)] = fmt
    return out


def _instance_dirs(opts):
    """(instance dir entry, its path) of every instance directory."""
    try:
        entries = os.listdir(opts.instances_path)
    except FileNotFoundError:
        return
    for entry in entries:
        d = os.path.join(opts.instances_path, entry)
        if entry == opts.subdirectory_name or entry in _SKIP_DIRS or entry.startswith(".") \
                or not os.path.isdir(d) or os.path.islink(d):
            continue
        yield entry, d


def instance_disks(opts):
    """(path, recorded format or None, file name) of every disk of every instance: the
    files ``disk.info`` lists, and files with a disk's name that it does not (format
    None: unknown, never probed).  An unreadable ``disk.info`` makes every disk-named
    file unknown."""
    for _entry, d in _instance_dirs(opts):
        try:
            files = sorted(os.listdir(d))
        except OSError:
            continue
        recorded = recorded_formats(d)
        for fname in files:
            p = os.path.join(d, fname)
            if not os.path.isfile(p) or os.path.islink(p):
                continue
            fmt = recorded.get(fname) if recorded is not None else None
            if fmt is not None or _DISK_NAME.match(fname):
                yield p, fmt, fname


def bases_in_use(opts) -> dict[str, list[str]]:
    """{base path: [disks using it]} for the bases in the cache directory: backing files
    of instance disks, and swap/ephemeral bases of the size of an instance's
    ``disk.swap`` / ``disk.local``.  Bases named but missing are included (see
    :func:`clean`'s ``missing``)."""
    return _scan_instances(opts)[0]


def _scan_instances(opts) -> tuple[dict[str, list[str]], list[str], list[str]]:
    """:func:`bases_in_use`, the qcow2 disks whose header is unreadable, and the disks
    whose format ``disk.info`` does not record."""
    base_dir = os.path.normpath(os.path.abspath(opts.base_dir))
    used: dict[str, list[str]] = {}
    unreadable: list[str] = []
    unrecorded: list[str] = []
    sized: dict[tuple[str, int], list[str]] = {}
    for p, fmt, fname in instance_disks(opts):
        if fmt is None:
            unrecorded.append(p)
            continue
        b, size = describe_disk(p, fmt)
        if b is UNREADABLE:
            unreadable.append(p)
        elif b is not None and os.path.dirname(b) == base_dir:
            used.setdefault(b, []).append(p)
        kind = {"disk.swap": "swap", "disk.local": "ephemeral"}.get(fname)
        if kind is not None and size is not None:
            sized.setdefault((kind, size), []).append(p)
    if sized:
        for p in cached_files(opts):
            name = os.path.basename(p)
            users = sized.get((kind_of(name), size_of_name(name)))
            if users:
                lst = used.setdefault(os.path.normpath(os.path.abspath(p)), [])
                lst.extend(u for u in users if u not in lst)
    return used, unreadable, unrecorded


def cached_files(opts) -> list[str]:
    try:
        names = sorted(os.listdir(opts.base_dir))
    except FileNotFoundError:
        return []
    return [os.path.join(opts.base_dir, n) for n in names
            if not n.startswith(".") and os.path.isfile(os.path.join(opts.base_dir, n))]


def max_age(opts, path: str) -> int | None:
    """The age at which an unused cache file goes (None: never, not a cache file)."""
    kind = kind_of(os.path.basename(path))
    if kind is None:
        return None
    if kind == "resized":
        return opts.remove_unused_resized_minimum_age_seconds
    return opts.remove_unused_original_minimum_age_seconds


def usage(opts) -> dict:
    """Disk usage of the cache: per file and in total (allocated and apparent bytes);
    with images_type=rbd also the pool cache (``pool``: ``rbdmanager.pool_usage``)."""
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
    out = {"directory": opts.base_dir, "files": files, "count": len(files),
           "allocated": total, "size": apparent}
    if opts.backend == "rbd":
        from .rbdmanager import pool_usage
        out["pool"] = pool_usage(opts)
    return out


def clean(opts, *, dry_run: bool = False, now: float | None = None) -> dict:
    """One pass of the cache manager; returns what it found and did.

    Keys: ``in_use`` (touched unless dry run), ``removed`` / ``would_remove`` (dry run),
    ``too_young``, ``busy`` (lock held: being written), ``kept`` (removal disabled, or
    the re-check under the lock found it used or young again), ``ignored`` (names that
    are not cache files), ``missing`` (bases named by instance disks but absent),
    ``kinds`` ({path: original|resized|swap|ephemeral}), ``unreadable_disks`` (qcow2
    instance disks whose header the engine refuses: while there is one, every base is
    kept), ``unrecorded_disks`` (disks ``disk.info`` does not record: the same),
    ``stale_temporaries``, ``usage``; with images_type=rbd also ``pool``, the
    pass over the pool bases (``rbdmanager.clean_pool``).
    """
    now = time.time() if now is None else now
    used, unreadable, unrecorded = _scan_instances(opts)
    files = cached_files(opts)
    present = set(files)
    report = {"in_use": sorted(p for p in used if p in present), "removed": [],
              "would_remove": [], "too_young": [], "busy": [], "kept": [], "ignored": [],
              "missing": sorted(p for p in used if p not in present and not os.path.exists(p)),
              "kinds": {}, "unreadable_disks": sorted(unreadable),
              "unrecorded_disks": sorted(unrecorded)}
    for b in report["in_use"]:
        if not dry_run:
            try:
                os.utime(b)
            except OSError:
                pass
    for p in files:
        limit = max_age(opts, p)
        if limit is None:
            report["ignored"].append(p)
            continue
        report["kinds"][p] = kind_of(os.path.basename(p))
        if p in used:
            continue
        if not opts.remove_unused_base_images or unreadable or unrecorded:
            report["kept"].append(p)
            continue
        young = _too_young(p, now, limit)
        if young is None:
            continue
        if young:
            report["too_young"].append(p)
        elif dry_run:
            report["would_remove"].append(p)
        else:
            outcome = _remove_unused(opts, p, now, limit)
            if outcome is not None:
                report[outcome].append(p)
    _clean_temps(opts, report, dry_run)
    if opts.backend == "rbd":
        from .rbdmanager import clean_pool
        report["pool"] = clean_pool(opts, dry_run=dry_run, now=now)
    report["usage"] = usage(opts)
    return report


def _too_young(path: str, now: float, limit: int) -> bool | None:
    """nova's ``age < maxage`` (None: the file is gone)."""
    try:
        return now - os.stat(path).st_mtime < limit
    except FileNotFoundError:
        return None


def _remove_unused(opts, path: str, now: float, limit: int) -> str | None:
    """Remove an unused cache file old enough to go, under its lock (not waited for:
    a held lock means the file is being written) after a re-check that it is still
    unused and old enough.  Returns the report's key for it: ``removed``, ``busy`` or
    ``kept`` (None: it went meanwhile)."""
    with try_image_lock(opts.lock_dir, os.path.basename(path)) as got:
        if not got:
            return "busy"
        young = _too_young(path, now, limit)
        if young is None:
            return None
        used, unreadable, unrecorded = _scan_instances(opts)
        if young or path in used or unreadable or unrecorded:
            return "kept"
        os.unlink(path)
        return "removed"


def _clean_temps(opts, report, dry_run: bool) -> None:
    """Temporary ``.<name>.<rand>.part`` files whose image lock is free are stale (a
    killed fetch): removed (or, dry run, listed)."""
    report["stale_temporaries"] = []
    try:
        entries = sorted(os.listdir(opts.base_dir))
    except FileNotFoundError:
        return
    for entry in entries:
        owner = temp_owner(entry)
        if owner is None:
            continue
        p = os.path.join(opts.base_dir, entry)
        with try_image_lock(opts.lock_dir, owner) as got:
            if not got:
                continue
            if not dry_run:
                try:
                    os.unlink(p)
                except FileNotFoundError:
                    continue
            report["stale_temporaries"].append(p)
