"""What the CLI prints, formatted exactly as qemu-img prints it: the ``info`` text,
the snapshot table, sizes for humans, and QEMU's pretty JSON."""

from __future__ import annotations

import math
import time

try:                    # (json's C core: ``import json`` brings ``re`` in, ~5 ms a process)
    from _json import encode_basestring_ascii as _ascii
except ImportError:     # pragma: no cover - other interpreters
    from json.encoder import encode_basestring_ascii as _ascii

_SUFFIXES = ("", "Ki", "Mi", "Gi", "Ti", "Pi", "Ei")
_SNAPSHOT_ROW = "%-9s %-16s %8s%20s%13s%11s"
SNAPSHOT_HEADER = "%-10s%-17s%8s%20s%13s%11s" % ("ID", "TAG", "VM SIZE", "DATE", "VM CLOCK",
                                                 "ICOUNT")


def size_to_str(val: int) -> str:
    """QEMU's size_to_str: three significant digits, binary suffixes."""
    _m, e = math.frexp(val / (1000.0 / 1024.0))
    i = (e - 1) // 10 if e > 0 else 0
    i = max(0, min(i, len(_SUFFIXES) - 1))
    div = 1 << (i * 10)
    return f"{val / div:0.3g} {_SUFFIXES[i]}B"


def _dump(obj, indent: int, out: list[str]) -> None:
    pad = " " * (indent * 4)
    items = ((k.replace("-", " "), v) for k, v in obj.items()) if isinstance(obj, dict) \
        else ((f"[{i}]", v) for i, v in enumerate(obj))
    for key, v in items:
        if isinstance(v, (dict, list)):
            out.append(f"{pad}{key}:")
            _dump(v, indent + 1, out)
        else:
            out.append(f"{pad}{key}: {_scalar(v)}")


def _scalar(v) -> str:
    if v is True:
        return "true"
    if v is False:
        return "false"
    return str(v)


def _c_string(text: str, limit: int) -> str:
    """A snapshot's id or name as qemu-img shows it: up to the first NUL byte, at most
    ``limit`` characters (QEMU copies them into fixed buffers)."""
    return text.split("\0", 1)[0][:limit]


def snapshot_line(sn: dict) -> str:
    """One row of qemu-img's snapshot table (``sn`` as ``Image.snapshots()`` lists it)."""
    date = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(sn["date-sec"]))
    nsec = sn["vm-clock-sec"] * 1_000_000_000 + sn["vm-clock-nsec"]
    secs = nsec // 1_000_000_000
    clock = "%02d:%02d:%02d.%03d" % (secs // 3600, (secs // 60) % 60, secs % 60,
                                    (nsec // 1_000_000) % 1000)
    icount = str(sn["icount"]) if "icount" in sn else ""
    return _SNAPSHOT_ROW % (_c_string(sn["id"], 127), _c_string(sn["name"], 255),
                            size_to_str(sn["vm-state-size"]), date, clock, icount)


def snapshot_table(snapshots) -> list[str]:
    """The lines of qemu-img's "Snapshot list:" (info and ``snapshot -l`` alike)."""
    return ["Snapshot list:", SNAPSHOT_HEADER, *(snapshot_line(sn) for sn in snapshots)]


def _backing_line(info: dict) -> str:
    line = f"backing file: {info['backing-filename']}"
    full = info.get("full-backing-filename")
    if full is None:
        line += " (cannot determine actual path)"
    elif full != info["backing-filename"]:
        line += f" (actual path: {full})"
    return line


def format_human(info: dict) -> str:
    """The text `qemu-img info` prints for one image (``info`` as ``Image.info()``)."""
    out = [f"image: {info['filename']}",
           f"file format: {info['format']}",
           f"virtual size: {size_to_str(info['virtual-size'])} ({info['virtual-size']} bytes)",
           "disk size: " + (size_to_str(info["actual-size"]) if info.get("actual-size", -1) >= 0
                            else "unavailable")]
    if info.get("encrypted"):
        out.append("encrypted: yes")
    if "cluster-size" in info:
        out.append(f"cluster_size: {info['cluster-size']}")
    if info.get("dirty-flag"):
        out.append("cleanly shut down: no")
    if "backing-filename" in info:
        out.append(_backing_line(info))
    if "backing-filename-format" in info:
        out.append(f"backing file format: {info['backing-filename-format']}")
    if info.get("snapshots"):
        out.extend(snapshot_table(info["snapshots"]))
    if "format-specific" in info:
        out.append("Format specific information:")
        _dump(info["format-specific"]["data"], 1, out)
    return "\n".join(out) + "\n"


def rbd_info(info: dict, img) -> dict:
    """``info`` of an image stored in RBD as qemu-img shows it: under its json:
    pseudo-filename, with no disk size; a raw one with the object size as its cluster
    size and the RBD image's snapshots as its snapshot list."""
    from ..rbdname import qemu_filename

    raw = info.get("format") == "raw"
    out: dict = {}
    snaps = img.be.snapshots() if raw else []
    if snaps:
        out["snapshots"] = [{"icount": 0, "vm-clock-nsec": 0, "name": name, "date-sec": 0,
                             "date-nsec": 0, "vm-clock-sec": 0, "id": name,
                             "vm-state-size": size} for _id, name, size in snaps]
    for key, value in info.items():
        if key == "actual-size":
            continue
        if key == "filename":
            out[key] = qemu_filename(value, info["format"])
            if raw:
                out["cluster-size"] = img.be.object_size
            continue
        out[key] = value
    return out


_LOWER_HEX = frozenset("0123456789abcdef")


def _json_str(v: str) -> str:
    # QEMU escapes non-ASCII as \uXXXX with upper-case hex digits: every "\u" and
    # four lower-case hex digits, left to right (as a regular expression would)
    out = _ascii(v)
    i = out.find("\\u")
    if i < 0:
        return out
    parts = []
    start = 0
    while i >= 0:
        digits = out[i + 2:i + 6]
        if len(digits) == 4 and _LOWER_HEX.issuperset(digits):
            parts.append(out[start:i + 2])
            parts.append(digits.upper())
            start = i + 6
            i = out.find("\\u", start)
        else:
            i = out.find("\\u", i + 1)
    parts.append(out[start:])
    return "".join(parts)


def _json_scalar(v) -> str:
    """``json.dumps`` of a number, a bool or None."""
    if v is True:
        return "true"
    if v is False:
        return "false"
    if v is None:
        return "null"
    if type(v) is int:
        return int.__repr__(v)
    if type(v) is float and v == v and v not in (float("inf"), float("-inf")):
        return float.__repr__(v)
    import json
    return json.dumps(v)


def qemu_json(obj, level: int = 0) -> str:
    """JSON exactly as QEMU's pretty printer writes it (empty containers span two
    lines, non-ASCII escaped with upper-case hex)."""
    pad = "    " * level
    inner = "    " * (level + 1)
    if isinstance(obj, dict):
        if not obj:
            return "{\n" + pad + "}"
        items = ",\n".join(f"{inner}{_json_str(str(k))}: {qemu_json(v, level + 1)}"
                           for k, v in obj.items())
        return "{\n" + items + "\n" + pad + "}"
    if isinstance(obj, (list, tuple)):
        if not obj:
            return "[\n" + pad + "]"
        items = ",\n".join(inner + qemu_json(v, level + 1) for v in obj)
        return "[\n" + items + "\n" + pad + "]"
    if isinstance(obj, str):
        return _json_str(obj)
    return _json_scalar(obj)
