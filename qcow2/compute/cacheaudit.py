"""The cache audit: every cached base and instance disk checked against what it is
recorded as (``qcow2 compute audit``).

OpenStack conceded (OSSA-2024-002) that nova cannot find a malicious image once it is in
its cache.  This pass looks, and reports each finding with its reason:

* a base: with ``force_raw_images`` every base must be raw, so one whose bytes parse as
  qcow2 -- or, raw or not, as another format (a VMDK descriptor, an ISO/qcow2 polyglot:
  the untrusted format check) -- is bad; a qcow2 base (``force_raw_images=False``) must
  pass the untrusted open (no backing file, no data file, consistent metadata);
* an instance disk: its format is what ``disk.info`` records; a disk recorded as raw
  whose content looks like another format is reported (a guest may have written it:
  it is read, never followed), one recorded as qcow2 that is not one, or whose backing
  file lies outside the cache, or that names an external data file, is bad; a disk
  that ``disk.info`` does not record is reported.

Nothing named inside a disk or a base is ever opened: headers are parsed for the names
only.  ``quarantine=True`` moves bad bases that no instance uses into
``<instances_path>/_quarantine/`` (never an instance disk, never a base in use: those
are reported, left in place).
"""

from __future__ import annotations

import os
import time

from .. import constants as C
from ..errors import Qcow2Error
from ..header import Header
from .locks import try_image_lock
from .manager import UNREADABLE, bases_in_use, cached_files, describe_disk, instance_disks, \
    kind_of

QUARANTINE = "_quarantine"


def _untrusted_reason(path: str, fmt: str) -> str | None:
    """Why ``path`` does not open as ``fmt`` in untrusted mode (None: it does)."""
    import qcow2
    try:
        with qcow2.open(path, format=fmt, untrusted=True, force_share=True):
            return None
    except Qcow2Error as exc:
        return str(exc).splitlines()[0]


def _qcow2_names(path: str) -> str:
    """What a qcow2 header at the start of ``path`` names (read, never followed)."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except OSError as exc:
        return f" (unreadable: {exc.strerror})"
    try:
        h = Header.parse(lambda n, o: os.pread(fd, n, o), os.fstat(fd).st_size)
    except Qcow2Error:
        return ""
    finally:
        os.close(fd)
    parts = []
    if h.backing_file:
        parts.append(f"backing file {h.backing_file!r}")
    if h.data_file:
        parts.append(f"data file {h.data_file!r}")
    return f" naming {' and '.join(parts)}" if parts else ""


def _starts_as_qcow2(path: str) -> bool:
    try:
        with open(path, "rb") as f:
            return f.read(len(C.MAGIC)) == C.MAGIC
    except OSError:
        return False


def _base_problem(opts, path: str) -> str | None:
    if _starts_as_qcow2(path):
        if opts.force_raw_images or kind_of(os.path.basename(path)) in ("swap", "ephemeral"):
            return ("a raw base (force_raw_images) whose bytes parse as qcow2"
                    + _qcow2_names(path))
        return _untrusted_reason(path, "qcow2")
    return _untrusted_reason(path, "raw")


def _disk_problem(opts, path: str, fmt: str | None) -> str | None:
    if fmt is None:
        return "not recorded in the instance's disk.info (its format is unknown)"
    if fmt == "raw":
        if _starts_as_qcow2(path):
            return ("disk.info records raw, but its content is a qcow2 header"
                    + _qcow2_names(path) + " (written by the guest?)")
        reason = _untrusted_reason(path, "raw")
        return None if reason is None else f"disk.info records raw, but {reason}"
    if fmt != "qcow2":
        return f"disk.info records the format {fmt!r}, which this flow does not make"
    backing, _size = describe_disk(path, "qcow2")
    if backing is UNREADABLE:
        return "disk.info records qcow2, but it is not a readable qcow2 image"
    problems = []
    base_dir = os.path.normpath(os.path.abspath(opts.base_dir))
    if backing is not None and os.path.dirname(backing) != base_dir:
        problems.append(f"its backing file {backing} lies outside the cache {base_dir}")
    names = _qcow2_names(path)
    if "data file" in names:
        problems.append("it names an external data file")
    return "; ".join(problems) or None


def audit(opts, *, quarantine: bool = False) -> dict:
    """One audit pass; returns ``{"bases": [...], "disks": [...], "quarantined": [...],
    "left_in_use": [...], "problems": N}`` (each entry ``{"path", "status", "reason"}``;
    status "ok" or "bad")."""
    rep: dict = {"bases": [], "disks": [], "quarantined": [], "left_in_use": []}
    used = bases_in_use(opts)
    bad_bases = []
    for path in cached_files(opts):
        if kind_of(os.path.basename(path)) is None:
            continue
        reason = _base_problem(opts, path)
        rep["bases"].append({"path": path, "status": "bad" if reason else "ok",
                             "reason": reason})
        if reason:
            bad_bases.append(path)
    for path, fmt, _name in instance_disks(opts):
        reason = _disk_problem(opts, path, fmt)
        rep["disks"].append({"path": path, "format": fmt, "status": "bad" if reason else "ok",
                             "reason": reason})
    if quarantine:
        for path in bad_bases:
            _quarantine(opts, path, used, rep)
    rep["problems"] = sum(e["status"] == "bad" for e in rep["bases"] + rep["disks"])
    return rep


def _quarantine(opts, path: str, used: dict, rep: dict) -> None:
    """Move a bad base aside, under its lock, unless an instance uses it."""
    if os.path.normpath(os.path.abspath(path)) in used:
        rep["left_in_use"].append(path)
        return
    name = os.path.basename(path)
    with try_image_lock(opts.lock_dir, name) as got:
        if not got:
            rep["left_in_use"].append(path)         # being written: not ours to move
            return
        dest_dir = os.path.join(opts.instances_path, QUARANTINE)
        os.makedirs(dest_dir, mode=0o700, exist_ok=True)
        dest = os.path.join(dest_dir, f"{name}.{int(time.time())}")
        os.rename(path, dest)
        rep["quarantined"].append({"path": path, "to": dest})


__all__ = ["QUARANTINE", "audit"]
