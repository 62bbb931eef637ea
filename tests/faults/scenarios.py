"""The operations the fault and crash tests run, and their oracles (qemu-img).

A :class:`Scenario` builds its input images in a folder, names the command line
(our CLI's arguments, run in that folder) and says what must hold of the folder
after a failure or a crash: which images were changed in place (``qemu-img check``:
leaks at most; an image left with the dirty bit must come out of the next writable
open clean) and which views of them read as before, as after, or byte by byte as
one or the other.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

QCOW2 = [sys.executable, "-m", "qcow2"]


# -- oracles ------------------------------------------------------------------------

def sh(*argv, cwd=None):
    r = subprocess.run([str(a) for a in argv], cwd=cwd, capture_output=True, text=True)
    assert r.returncode == 0, (argv, r.stdout, r.stderr)
    return r.stdout


def raw(w: Path, name: str, snapshot: str | None = None) -> bytes:
    out = w.parent / f"{w.name}.view.raw"
    argv = ["qemu-img", "convert", "-U", "-O", "raw"]
    if snapshot:
        argv += ["-l", f"snapshot.name={snapshot}"]
    sh(*argv, name, out, cwd=w)
    try:
        return out.read_bytes()
    finally:
        out.unlink()


def info(w: Path, name: str) -> dict:
    return json.loads(sh("qemu-img", "info", "-U", "--output=json", name, cwd=w))


def snapshots(w: Path, name: str) -> tuple:
    return tuple(s["name"] for s in info(w, name).get("snapshots", []))


def qemu_check(w: Path, name: str) -> tuple[int, dict]:
    r = subprocess.run(["qemu-img", "check", "-U", "--output=json", name], cwd=w,
                       capture_output=True, text=True)
    try:
        return r.returncode, json.loads(r.stdout)
    except ValueError:
        return r.returncode, {"stderr": r.stderr}


def qemu_io(w: Path, name: str, *cmds: str) -> None:
    argv = ["qemu-io", "-f", "qcow2"]
    for c in cmds:
        argv += ["-c", c]
    sh(*argv, name, cwd=w)


def image(w: Path, name: str, size: str = "4M", opts: str = "", *writes: str,
          backing: str | None = None) -> None:
    argv = ["qemu-img", "create", "-q", "-f", "qcow2"]
    if opts:
        argv += ["-o", opts]
    if backing:
        argv += ["-b", backing, "-F", "qcow2"]
    sh(*argv, name, size, cwd=w)
    if writes:
        qemu_io(w, name, *writes)


DATA = ("write -P 7 0 1M", "write -P 9 2M 64k", "write -P 3 3076k 4k", "write -z 1M 128k")


# -- scenarios ------------------------------------------------------------------------

@dataclass
class Scenario:
    name: str
    setup: Callable[[Path], None]
    argv: list[str]
    new: list[str] = field(default_factory=list)          # outputs the run creates
    inplace: list[str] = field(default_factory=list)      # images changed in place
    # view name -> (function of the folder, rule): "same" (as before), "either"
    # (as before or as after a clean run), "bytes" (each byte as before or after)
    views: dict = field(default_factory=dict)
    report: bool = False      # stderr carries a report (check -r) before the error line


def _src(w):
    image(w, "src.qcow2", "4M", "", *DATA)


def _big_src(w):
    # scattered data: many L2 tables and refcount blocks in a 4 KiB-cluster output
    image(w, "big.qcow2", "64M", "", *(f"write -P {k + 1} {k * 2 + 1}M 12k" for k in range(30)))


def _snap_img(w):
    image(w, "img.qcow2", "4M", "", *DATA)
    sh("qemu-img", "snapshot", "-c", "s1", "img.qcow2", cwd=w)
    qemu_io(w, "img.qcow2", "write -P 5 512k 1M", "write -P 6 3M 64k", "discard 2M 64k")


def _chain(w):
    image(w, "base.qcow2", "4M", "", "write -P 1 0 4M")
    image(w, "top.qcow2", "4M", "", "write -P 2 64k 192k", "write -P 4 2M 1M",
          "write -z 3584k 64k", backing="base.qcow2")


def _rebase(w):
    _chain(w)
    image(w, "base2.qcow2", "4M", "", "write -P 8 0 2M", "write -P 1 3M 1M")


def _leaky(w):
    image(w, "img.qcow2", "4M", "", *DATA)
    # drop the reference of the cluster at guest 2 MiB: it leaks
    l1 = int.from_bytes((w / "img.qcow2").read_bytes()[40:48], "big")
    with open(w / "img.qcow2", "r+b") as f:
        f.seek(l1)
        l2 = int.from_bytes(f.read(8), "big") & 0x00FFFFFFFFFFFE00
        f.seek(l2 + 32 * 8)
        f.write(bytes(8))


def _same_content(name, snapshot=None):
    return lambda w: raw(w, name, snapshot)


SCENARIOS = [
    Scenario("convert-raw", _src, ["convert", "-O", "raw", "src.qcow2", "dst.raw"],
             new=["dst.raw"]),
    Scenario("convert-qcow2", _src, ["convert", "-O", "qcow2", "src.qcow2", "dst.qcow2"],
             new=["dst.qcow2"]),
    Scenario("convert-qcow2-c", _src,
             ["convert", "-O", "qcow2", "-c", "src.qcow2", "dst.qcow2"], new=["dst.qcow2"]),
    Scenario("convert-qcow2-many", _big_src,
             ["convert", "-O", "qcow2", "-o", "cluster_size=4096", "big.qcow2", "dst.qcow2"],
             new=["dst.qcow2"]),
    Scenario("create-backing", _src,
             ["create", "-f", "qcow2", "-b", "src.qcow2", "-F", "qcow2", "ov.qcow2"],
             new=["ov.qcow2"]),
    Scenario("resize-grow", lambda w: image(w, "img.qcow2", "4M", "cluster_size=512", *DATA),
             ["resize", "img.qcow2", "+60M"], inplace=["img.qcow2"],
             views={"content": (_same_content("img.qcow2"), "either")}),
    Scenario("resize-falloc", lambda w: image(w, "img.qcow2", "4M", "", *DATA),
             ["resize", "--preallocation=falloc", "img.qcow2", "+2M"], inplace=["img.qcow2"],
             views={"content": (_same_content("img.qcow2"), "either")}),
    Scenario("resize-shrink", lambda w: image(w, "img.qcow2", "4M", "", *DATA),
             ["resize", "--shrink", "img.qcow2", "2M"], inplace=["img.qcow2"],
             views={"content": (_same_content("img.qcow2"), "either")}),
    Scenario("snapshot-create", _snap_img, ["snapshot", "-c", "s2", "img.qcow2"],
             inplace=["img.qcow2"],
             views={"active": (_same_content("img.qcow2"), "same"),
                    "s1": (_same_content("img.qcow2", "s1"), "same"),
                    "list": (lambda w: snapshots(w, "img.qcow2"), "either")}),
    Scenario("snapshot-apply", _snap_img, ["snapshot", "-a", "s1", "img.qcow2"],
             inplace=["img.qcow2"],
             views={"active": (_same_content("img.qcow2"), "either"),
                    "s1": (_same_content("img.qcow2", "s1"), "same"),
                    "list": (lambda w: snapshots(w, "img.qcow2"), "same")}),
    Scenario("snapshot-delete", _snap_img, ["snapshot", "-d", "s1", "img.qcow2"],
             inplace=["img.qcow2"],
             views={"active": (_same_content("img.qcow2"), "same"),
                    "list": (lambda w: snapshots(w, "img.qcow2"), "either")}),
    Scenario("commit", _chain, ["commit", "top.qcow2"], inplace=["top.qcow2", "base.qcow2"],
             views={"top": (_same_content("top.qcow2"), "same"),
                    "base": (_same_content("base.qcow2"), "bytes")}),
    Scenario("rebase", _rebase, ["rebase", "-b", "base2.qcow2", "-F", "qcow2", "top.qcow2"],
             inplace=["top.qcow2"],
             views={"top": (_same_content("top.qcow2"), "same"),
                    "backing": (lambda w: info(w, "top.qcow2").get("backing-filename"),
                                "either")}),
    Scenario("amend-compat", lambda w: image(w, "img.qcow2", "4M", "", *DATA),
             ["amend", "-o", "compat=0.10", "img.qcow2"], inplace=["img.qcow2"],
             views={"content": (_same_content("img.qcow2"), "same"),
                    "compat": (lambda w: info(w, "img.qcow2")["format-specific"]["data"]
                               ["compat"], "either")}),
    Scenario("amend-refcount", lambda w: image(w, "img.qcow2", "4M", "cluster_size=4096",
                                               *DATA),
             ["amend", "-o", "refcount_bits=64", "img.qcow2"], inplace=["img.qcow2"],
             views={"content": (_same_content("img.qcow2"), "same")}),
    Scenario("check-repair", _leaky, ["check", "-r", "all", "img.qcow2"],
             inplace=["img.qcow2"], views={"content": (_same_content("img.qcow2"), "same")},
             report=True),
]


def bytewise(got: bytes, before: bytes, after: bytes) -> str | None:
    import numpy as np
    n = max(len(got), len(before), len(after))
    g, b, a = (np.frombuffer(x.ljust(n, b"\0"), np.uint8) for x in (got, before, after))
    bad = np.flatnonzero((g != b) & (g != a))
    return None if bad.size == 0 else f"byte {int(bad[0])} is neither before nor after"


REPAIR = "import qcow2, sys; qcow2.open(sys.argv[1], 'r+').close()"


def check_image(w: Path, name: str, what: str) -> None:
    """Consistent by qemu-img check (leaks at most); an image left with the dirty bit
    must come out clean of the next writable open, ours and QEMU's alike."""
    with open(w / name, "rb") as f:
        head = f.read(80)
    dirty = int.from_bytes(head[4:8], "big") >= 3 and head[79] & 1
    if not dirty:
        rc, res = qemu_check(w, name)
        assert rc in (0, 3) and not res.get("corruptions"), f"{what}: {name}: {res}"
        return
    for opener in (QCOW2[:1] + ["-c", REPAIR], ["qemu-io", "-f", "qcow2", "-c", "quit"]):
        copy = f"{name}.reopened"
        shutil.copyfile(w / name, w / copy)
        sh(*opener, copy, cwd=w)
        rc, res = qemu_check(w, copy)
        (w / copy).unlink()
        assert rc == 0, f"{what}: {name} (dirty) after {opener[0]} opened it: {res}"


def views(sc: Scenario, w: Path) -> dict:
    return {k: fn(w) for k, (fn, _rule) in sc.views.items()}


def check_views(sc: Scenario, w: Path, before: dict, after: dict, what: str, *,
                finished: bool = False) -> None:
    """Every view as its rule says (``finished``: the operation completed)."""
    for k, (fn, rule) in sc.views.items():
        got = fn(w)
        if rule == "same" or finished:
            want = before[k] if rule == "same" else after[k]
            assert got == want, f"{what}: view {k} changed"
        elif rule == "either":
            assert got in (before[k], after[k]), f"{what}: view {k} is neither before nor after"
        else:
            why = bytewise(got, before[k], after[k])
            assert why is None, f"{what}: view {k}: {why}"
