"""The image corpus: qcow2 and raw images built with qemu-img / qemu-io.

Every case is a small frozen dataclass (:class:`Case`) describing one image (or the top
of a backing chain): its id, format, create options, the features it exercises and
whether it is ``slow``.  :func:`cases` lists them all; :func:`build` builds one into
``<root>/<case id>/`` and is idempotent: a stamp file records a fingerprint of this
module's source, the qemu-img version and the root path, so a cache directory
(``QCOW2_CORPUS_DIR``) is reused across runs and rebuilt only when a recipe changes.

The matrix is {compat 0.10, 1.1} x cluster sizes {512, 4K, 64K, 2M} x {plain, zlib,
zstd} x extended_l2 x refcount_bits {1, 16, 64} x {no backing, two shapes of a raw <-
qcow2 <- qcow2 chain}, restricted to what qemu-img 7.2 accepts:

* zstd compression, extended_l2 and refcount widths other than 16 need compat 1.1;
* extended_l2 needs clusters of at least 16 KiB.

The default (non-slow) set is a greedy pairwise covering of that product plus the
special cases (snapshots, data files, dirty bit, bitmaps, preallocation, encryption,
patched headers, raw images, ...).  The rest of the product is marked ``slow``.

Run ``python tests/corpus.py --help`` to build the corpus by hand and time it.
"""

from __future__ import annotations

import fcntl
import hashlib
import itertools
import os
import random
import shutil
import struct
import subprocess
import sys
import tempfile
import time
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable

from oracle import run_pbkdf

QEMU_IMG = shutil.which("qemu-img")
QEMU_IO = shutil.which("qemu-io")

KiB = 1024
MiB = 1024 * KiB
GiB = 1024 * MiB

# qcow2 header extension types (docs/interop/qcow2.txt)
EXT_END = 0x00000000
EXT_BACKING_FORMAT = 0xE2792ACA
EXT_FEATURE_TABLE = 0x6803F857
EXT_UNKNOWN = 0x7A7A7A01  # not defined by the spec: readers must skip it

LUKS_SECRET = "123456"

SUBPROCESS_TIMEOUT = 300


# --------------------------------------------------------------------------- cases

@dataclass(frozen=True)
class Case:
    """One corpus image.

    ``options`` are the ``-o`` options the top image was created with (informative);
    ``features`` are tags tests select on ("v2", "v3", "compressed", "zstd", "backing",
    "snapshots", "data_file", "encrypted", ...).  ``readable`` is False when reading
    the guest data without a key must raise (encrypted images: ``InvalidKeyError`` for
    LUKS, ``UnsupportedFeatureError`` for the old AES method).
    ``big`` marks images whose virtual size is too large to hold in memory.
    """

    id: str
    fmt: str
    options: tuple[tuple[str, str], ...] = ()
    features: frozenset[str] = frozenset()
    slow: bool = False
    filename: str = "disk.qcow2"
    snapshots: tuple[str, ...] = ()
    readable: bool = True
    big: bool = False
    recipe: Callable[[Path, "Case"], None] | None = field(
        default=None, compare=False, repr=False)
    params: tuple[tuple[str, object], ...] = ()

    def param(self, name, default=None):
        return dict(self.params).get(name, default)

    def directory(self, root: Path | str) -> Path:
        return Path(root) / self.id

    def path(self, root: Path | str) -> Path:
        return self.directory(root) / self.filename

    @property
    def cluster_size(self) -> int:
        return int(dict(self.options).get("cluster_size", 65536))


@dataclass(frozen=True)
class Built:
    """A case built under a root directory."""

    case: Case
    root: Path

    @property
    def id(self) -> str:
        return self.case.id

    @property
    def dir(self) -> Path:
        return self.case.directory(self.root)

    @property
    def path(self) -> str:
        """Absolute path of the top image, as a string (what tests pass around)."""
        return str(self.case.path(self.root))

    @property
    def fmt(self) -> str:
        return self.case.fmt


# --------------------------------------------------------------------- qemu helpers

class BuildError(RuntimeError):
    pass


def run(args: list[str], *, cwd: Path | str | None = None, check: bool = True,
        timeout: float = SUBPROCESS_TIMEOUT) -> subprocess.CompletedProcess:
    proc = subprocess.run(args, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                          timeout=timeout)
    if check and proc.returncode != 0:
        raise BuildError("command failed (exit %d): %s\n%s%s" % (
            proc.returncode, " ".join(map(str, args)),
            proc.stdout.decode(errors="replace"), proc.stderr.decode(errors="replace")))
    return proc


def qemu_img(*args, cwd=None, check=True) -> subprocess.CompletedProcess:
    return run([QEMU_IMG, *map(str, args)], cwd=cwd, check=check)


def qemu_io(path, cmds: Iterable[str], *, fmt="qcow2", cwd=None, extra=(),
            check=True) -> subprocess.CompletedProcess:
    """Run qemu-io commands on one image; any failed command is a BuildError."""
    args = [QEMU_IO]
    if fmt is not None:
        args += ["-f", fmt]
    args += list(extra)
    for c in cmds:
        args += ["-c", c]
    args.append(str(path))
    proc = run(args, cwd=cwd, check=check)
    out = (proc.stdout + proc.stderr).decode(errors="replace")
    if check and ("failed" in out or "rror" in out):
        raise BuildError("qemu-io reported a failure on %s:\n%s" % (path, out))
    return proc


def qemu_img_version() -> str:
    if not QEMU_IMG:
        return "missing"
    return qemu_img("--version").stdout.decode().splitlines()[0]


def create(path, size: int, *, fmt="qcow2", opts: dict | None = None,
           backing: str | None = None, backing_fmt: str | None = None,
           extra=()) -> None:
    """qemu-img create.  With ``backing`` and no ``backing_fmt`` the image is created
    with the format given in ``opts['_probe_as']`` and the backing-format header
    extension is stripped afterwards (qemu-img 7.2 refuses -b without -F)."""
    opts = dict(opts or {})
    args = ["create", "-q", "-f", fmt, *extra]
    strip = False
    if backing is not None:
        args += ["-b", backing]
        if backing_fmt is None:
            strip = True
            backing_fmt = opts.pop("_probe_as")
        args += ["-F", backing_fmt]
        args += ["-u"]  # do not open the backing file (it may be relative to path)
    opts.pop("_probe_as", None)
    if opts:
        args += ["-o", ",".join("%s=%s" % kv for kv in opts.items())]
    # run in the image's folder: qemu-img 7.2 creates a relative data_file there
    args += [Path(path).name, str(size)]
    qemu_img(*args, cwd=Path(path).parent)
    if strip:
        strip_backing_format(path)


# ------------------------------------------------------------------ header patching

def _read_header(f):
    f.seek(0)
    h = f.read(512)
    magic, version = struct.unpack(">4sI", h[:8])
    if magic != b"QFI\xfb":
        raise BuildError("not a qcow2 image")
    header_length = struct.unpack(">I", h[100:104])[0] if version >= 3 else 72
    cluster_bits = struct.unpack(">I", h[20:24])[0]
    return version, header_length, 1 << cluster_bits


def read_extensions(path) -> list[tuple[int, bytes]]:
    with open(path, "rb") as f:
        _, hl, cs = _read_header(f)
        f.seek(0)
        h = f.read(cs)
    exts, off = [], hl
    while off + 8 <= len(h):
        etype, elen = struct.unpack(">II", h[off:off + 8])
        if etype == EXT_END:
            break
        exts.append((etype, h[off + 8:off + 8 + elen]))
        off += 8 + ((elen + 7) & ~7)
    return exts


def rewrite_extensions(path, fn: Callable[[list], list]) -> None:
    """Replace the header extensions of a qcow2 image by ``fn(extensions)``.

    The backing file name, which qemu stores after the extensions, is moved right
    after the new end marker; everything must fit in the first cluster.
    """
    with open(path, "r+b") as f:
        _, hl, cs = _read_header(f)
        f.seek(0)
        h = f.read(cs)
        bfo, bfs = struct.unpack(">QI", h[8:20])
        exts, off = [], hl
        while True:
            etype, elen = struct.unpack(">II", h[off:off + 8])
            if etype == EXT_END:
                break
            exts.append((etype, h[off + 8:off + 8 + elen]))
            off += 8 + ((elen + 7) & ~7)
        old_end = max(off + 8, bfo + bfs if bfo else 0)
        name = h[bfo:bfo + bfs] if bfo else b""
        body = b""
        for etype, data in fn(exts):
            body += struct.pack(">II", etype, len(data)) + data + b"\0" * (-len(data) % 8)
        body += b"\0" * 8
        new_bfo = hl + len(body) if bfo else 0
        body += name
        if hl + len(body) > cs:
            raise BuildError("header extensions do not fit in one cluster of %s" % path)
        f.seek(hl)
        f.write(body.ljust(max(old_end - hl, len(body)), b"\0"))
        f.seek(8)
        f.write(struct.pack(">Q", new_bfo))


def strip_backing_format(path) -> None:
    """Remove the backing-format extension: readers then have to probe."""
    rewrite_extensions(path, lambda exts: [e for e in exts if e[0] != EXT_BACKING_FORMAT])


def set_feature_bits(path, *, incompatible=0, compatible=0, autoclear=0) -> None:
    """OR bits into the v3 header feature fields (offsets 72, 80, 88)."""
    with open(path, "r+b") as f:
        version, _, _ = _read_header(f)
        if version < 3:
            raise BuildError("feature bits need a v3 header")
        for off, bits in ((72, incompatible), (80, compatible), (88, autoclear)):
            f.seek(off)
            (val,) = struct.unpack(">Q", f.read(8))
            f.seek(off)
            f.write(struct.pack(">Q", val | bits))


def header_field(path, offset: int, fmt: str):
    with open(path, "rb") as f:
        f.seek(offset)
        return struct.unpack(fmt, f.read(struct.calcsize(fmt)))[0]


# ------------------------------------------------------------------------- patterns

def pattern(seed: int, n: int, kind: str = "text") -> bytes:
    """Deterministic, position-dependent bytes.

    ``text``: 4 KiB blocks, each a 16-byte header naming (seed, block) followed by a
    per-write random hex string -- compressible (about 2:1) and never equal at two
    positions.  ``random``: incompressible bytes.
    """
    rng = random.Random(seed)
    if kind == "random":
        return rng.randbytes(n)
    body = rng.randbytes(2040).hex().encode()
    nblocks = (n + 4095) // 4096
    out = b"".join(b"%06x%09x\n" % (seed & 0xFFFFFF, i) + body for i in range(nblocks))
    return out[:n]


class Ops:
    """Collects qemu-io commands for one image; data comes from files in ``src``."""

    def __init__(self, src: Path, size: int, seed: int):
        self.src, self.size, self.seed = src, size, seed
        self.cmds: list[str] = []
        self.n = 0

    def _clip(self, off, n):
        off = max(0, off)
        n = min(n, self.size - off)
        return off, n

    def _file(self, n, kind):
        """Write the data of one write to a file; return its path relative to the
        image's folder, which is qemu-io's working directory (keeps paths short and
        free of spaces, and relative data-file names resolve as qemu 7.2 wants)."""
        self.n += 1
        name = "w%d-%d.bin" % (self.seed, self.n)
        (self.src / name).write_bytes(pattern(self.seed * 1000 + self.n, n, kind))
        return "@@/" + name

    def data(self, off, n, kind="text"):
        off, n = self._clip(off, n)
        if n > 0:
            self.cmds.append("write -s %s %d %d" % (self._file(n, kind), off, n))

    def fill(self, off, n, byte):
        off, n = self._clip(off, n)
        if n > 0:
            self.cmds.append("write -P 0x%02x %d %d" % (byte, off, n))

    def compressed(self, off, n, kind="text", byte=None):
        off, n = self._clip(off, n)
        if n <= 0:
            return
        if byte is not None:
            self.cmds.append("write -c -P 0x%02x %d %d" % (byte, off, n))
        else:
            self.cmds.append("write -c -s %s %d %d" % (self._file(n, kind), off, n))

    def zero(self, off, n, unmap=False):
        off, n = self._clip(off, n)
        if n > 0:
            self.cmds.append("write -z %s%d %d" % ("-u " if unmap else "", off, n))

    def discard(self, off, n):
        off, n = self._clip(off, n)
        if n > 0:
            self.cmds.append("discard %d %d" % (off, n))

    def commands(self, path) -> list[str]:
        rel = os.path.relpath(self.src, Path(path).parent)
        return [c.replace("@@", rel) for c in self.cmds]

    def apply(self, path, fmt="qcow2", extra=(), tail=()):
        if self.cmds or tail:
            qemu_io(Path(path).name, self.commands(path) + list(tail), fmt=fmt,
                    cwd=Path(path).parent, extra=extra)


def layer_ops(ops: Ops, *, k: int, cs: int, sub: int, l2_coverage: int,
              compression: bool, rng: random.Random) -> None:
    """The standard write pattern of layer ``k`` (0 = standalone / bottom qcow2).

    Writes cross cluster, subcluster and L2-table boundaries at byte granularity,
    zero and discard whole and partial clusters, compress aligned clusters and then
    overwrite parts of them.  ``k`` shifts the positions so stacked layers overlap
    partially.  Uses cluster indices below 16; the image should have >= 16 clusters.
    """
    size = ops.size
    shift = k * (cs // 2 + 512)
    if compression:
        # compressed writes must go to clusters this layer has not allocated yet
        ops.compressed(12 * cs, 3 * cs)                 # compressible: stored compressed
        ops.compressed(15 * cs, cs, kind="random")      # incompressible: qemu stores it plain
        ops.compressed(2 * cs, cs, byte=0x60 + k)       # highly compressible ...
        ops.discard(2 * cs, cs)                         # ... and discarded right away
    ops.data(shift, cs + 1536)                          # crosses a cluster boundary
    ops.data(3 * cs - 1 + k, 2)                         # two bytes straddling a boundary
    ops.data(5 * cs + sub - 512 - 512 * k, sub + 1024)  # crosses a subcluster boundary
    ops.data(7 * cs, 2 * cs)                            # two whole clusters
    ops.fill(4 * cs + 512 * (k + 1), 1024, 0x40 + k)
    if l2_coverage < size:
        ops.data(l2_coverage - 700 - 1000 * k, 1400)    # crosses an L2 table boundary
    ops.zero(7 * cs + cs // 2 + 512 * k, cs)            # partial zero of written clusters
    ops.zero(10 * cs - k * sub, 2 * cs)                 # whole zero clusters
    ops.discard(8 * cs, cs)
    if sub < cs:
        ops.discard(11 * cs + sub, 2 * sub)             # partial discard: two subclusters
    else:
        ops.discard(11 * cs + cs // 4, cs // 2)         # partial discard: ignored by qemu
    if compression:
        ops.data(12 * cs + cs // 4 + k, cs // 2)        # partial overwrite of a compressed cluster
        ops.zero(13 * cs, cs)                           # zero over a compressed cluster
    keep = (14 * cs, 15 * cs) if compression else (0, 0)  # stays compressed
    cap = min(3 * cs, MiB)
    for _ in range(6):
        while True:
            off = rng.randrange(size)
            n = rng.choice((rng.randint(1, 600), rng.randint(1, cap)))
            if off + n <= keep[0] or off >= keep[1]:
                break
        ops.data(off, n)
    ops.data(size - 1000 - 3 * k, 1000 + 3 * k)         # the last bytes of the disk


def raw_base(path: Path, size: int, unit: int, seed: int) -> None:
    """A sparse raw file of exactly ``size`` bytes: data blocks separated by holes."""
    step = max(unit, 64 * KiB) * 3 // 2
    with open(path, "wb") as f:
        f.truncate(size)
        for i, off in enumerate(range(0, size, step)):
            n = min(step // 2 + 777 * i, size - off)
            f.seek(off)
            f.write(pattern(seed * 1000 + i, n))
        f.seek(size - 100)
        f.write(pattern(seed * 1000 + 999, 100))


def qcow2_geometry(cs: int, xl2: bool) -> tuple[int, int]:
    """(subcluster size, bytes of guest data one L2 table maps)."""
    entry = 16 if xl2 else 8
    return (cs // 32 if xl2 else cs), cs * (cs // entry)


def _size_for(cs: int) -> int:
    return max(4 * MiB, 16 * cs)


def _fsync_tree(d: Path) -> None:
    for p in d.rglob("*"):
        if p.is_file():
            fd = os.open(p, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)


# ----------------------------------------------------------------- matrix recipes

DIMENSIONS: dict[str, tuple] = {
    "compat": ("1.1", "0.10"),
    "cluster": (65536, 4096, 512, 2 * MiB),
    "compression": ("none", "zlib", "zstd"),
    "extended_l2": (False, True),
    "refcount_bits": (16, 1, 64),
    "backing": ("none", "chainA", "chainB"),
}


def valid_combo(c: dict) -> bool:
    v3 = c["compat"] == "1.1"
    if c["compression"] == "zstd" and not v3:
        return False
    if c["extended_l2"] and (not v3 or c["cluster"] < 16 * KiB):
        return False
    if c["refcount_bits"] != 16 and not v3:
        return False
    return True


def all_combos() -> list[dict]:
    names = list(DIMENSIONS)
    out = []
    for values in itertools.product(*(DIMENSIONS[n] for n in names)):
        c = dict(zip(names, values, strict=True))
        if valid_combo(c):
            out.append(c)
    return out


def pairwise(combos: list[dict]) -> list[dict]:
    """Greedy all-pairs covering: every pair of values that some valid combination
    holds is held by at least one chosen combination.  Deterministic; ties go to
    the cheaper combination (smaller clusters first after 64K, no chain)."""
    names = list(DIMENSIONS)

    def pairs(c):
        return {(a, c[a], b, c[b]) for a, b in itertools.combinations(names, 2)}

    def cost(c):
        return (c["cluster"] == 2 * MiB, c["backing"] != "none")

    uncovered = set().union(*(pairs(c) for c in combos))
    chosen = []
    while uncovered:
        best = max(combos, key=lambda c: (len(pairs(c) & uncovered), not cost(c)[0],
                                          not cost(c)[1]))
        chosen.append(best)
        uncovered -= pairs(best)
    return chosen


def combo_id(c: dict) -> str:
    cs = c["cluster"]
    csname = "%dm" % (cs // MiB) if cs >= MiB else ("%dk" % (cs // KiB) if cs >= KiB else str(cs))
    parts = ["v2" if c["compat"] == "0.10" else "v3", "c" + csname, c["compression"]]
    if c["extended_l2"]:
        parts.append("xl2")
    parts.append("rb%d" % c["refcount_bits"])
    parts.append({"none": "solo", "chainA": "chainA", "chainB": "chainB"}[c["backing"]])
    return "-".join(parts)


def combo_options(c: dict) -> dict:
    opts = {"compat": c["compat"], "cluster_size": c["cluster"]}
    if c["compression"] != "none":
        opts["compression_type"] = c["compression"]
    if c["extended_l2"]:
        opts["extended_l2"] = "on"
    if c["refcount_bits"] != 16:
        opts["refcount_bits"] = c["refcount_bits"]
    return opts


def build_matrix(d: Path, case: Case) -> None:
    """Standalone image, or a raw <- qcow2 <- qcow2 chain.

    chainA: layers side by side; mid -> "base.raw" (relative, backing_fmt=raw),
            top -> "mid.qcow2" (relative, no backing_fmt: must be probed).
            All qcow2 layers use the matrix options.
    chainB: layers in the "layers/" sub-folder; mid -> absolute path of base.raw
            without backing_fmt (probed: raw), top -> "layers/mid.qcow2" with
            backing_fmt=qcow2.  mid uses qemu's default options (64K clusters), so
            the chain mixes cluster sizes.
    """
    c = dict(case.params)
    opts = combo_options(c)
    cs = c["cluster"]
    xl2 = c["extended_l2"]
    compression = c["compression"] != "none"
    size = _size_for(cs)
    rng = random.Random(case.id)
    top = d / case.filename
    with tempfile.TemporaryDirectory(dir=d) as src:
        src = Path(src)
        if c["backing"] == "none":
            create(top, size, opts=opts)
        else:
            layers = d if c["backing"] == "chainA" else d / "layers"
            layers.mkdir(exist_ok=True)
            base_size = 3 * size // 4 + 1000          # not a multiple of 512
            mid_size = size - 2 * cs
            raw_base(layers / "base.raw", base_size, cs, seed=zlib_crc(case.id) & 0xFFFF)
            if c["backing"] == "chainA":
                mid_opts, mid_cs, mid_xl2, mid_comp = opts, cs, xl2, compression
                create(layers / "mid.qcow2", mid_size, opts=mid_opts,
                       backing="base.raw", backing_fmt="raw")
                create(top, size, opts={**opts, "_probe_as": "qcow2"}, backing="mid.qcow2")
            else:
                mid_opts, mid_cs, mid_xl2, mid_comp = {}, 65536, False, False
                create(layers / "mid.qcow2", mid_size,
                       opts={"_probe_as": "raw"}, backing=str(layers / "base.raw"))
                create(top, size, opts=opts, backing="layers/mid.qcow2", backing_fmt="qcow2")
            sub, l2c = qcow2_geometry(mid_cs, mid_xl2)
            ops = Ops(src, mid_size, seed=1)
            layer_ops(ops, k=1, cs=mid_cs, sub=sub, l2_coverage=l2c,
                      compression=mid_comp, rng=rng)
            ops.apply(layers / "mid.qcow2")
        sub, l2c = qcow2_geometry(cs, xl2)
        ops = Ops(src, size, seed=2)
        layer_ops(ops, k=0 if c["backing"] == "none" else 2, cs=cs, sub=sub,
                  l2_coverage=l2c, compression=compression, rng=rng)
        ops.apply(top)


def zlib_crc(s: str) -> int:
    return zlib.crc32(s.encode())


def matrix_cases() -> list[Case]:
    combos = all_combos()
    default = {combo_id(c) for c in pairwise(combos)}
    out = []
    for c in combos:
        feats = {"v2" if c["compat"] == "0.10" else "v3", "matrix",
                 "cluster:%d" % c["cluster"], "refcount_bits:%d" % c["refcount_bits"]}
        if c["compression"] != "none":
            feats |= {"compressed", c["compression"]}
        if c["extended_l2"]:
            feats.add("extended_l2")
        if c["backing"] != "none":
            feats |= {"backing", "raw_backing", "probe_backing", c["backing"]}
            if c["backing"] == "chainA":
                feats.add("relative_backing")
        opts = combo_options(c)
        cid = combo_id(c)
        out.append(Case(
            id=cid, fmt="qcow2",
            options=tuple((k, str(v)) for k, v in opts.items()),
            features=frozenset(feats), slow=cid not in default,
            recipe=build_matrix, params=tuple(c.items())))
    return out


# ---------------------------------------------------------------- special recipes

def _std_ops(d: Path, path, size, cs=65536, xl2=False, compression=False, k=0, seed=3,
             fmt="qcow2", extra=(), tail=()):
    sub, l2c = qcow2_geometry(cs, xl2)
    with tempfile.TemporaryDirectory(dir=d) as src:
        ops = Ops(Path(src), size, seed=seed)
        layer_ops(ops, k=k, cs=cs, sub=sub, l2_coverage=l2c, compression=compression,
                  rng=random.Random(str(path)[-40:] + str(seed)))
        ops.apply(path, fmt=fmt, extra=extra, tail=tail)


def _simple_ops(d: Path, path, size, fn: Callable[[Ops], None], *, seed=5, fmt="qcow2",
                extra=(), tail=()):
    with tempfile.TemporaryDirectory(dir=d) as src:
        ops = Ops(Path(src), size, seed=seed)
        fn(ops)
        ops.apply(path, fmt=fmt, extra=extra, tail=tail)


def build_raw(d: Path, case: Case) -> None:
    size = case.param("size")
    raw_base(d / case.filename, size, 65536, seed=7)


def build_convert_c(d: Path, case: Case) -> None:
    """A whole image compressed by ``qemu-img convert -c``."""
    opts = dict(case.options)
    cs = int(opts["cluster_size"])
    size = _size_for(cs)
    src = d / "src.raw"
    raw_base(src, size, cs, seed=11)
    with open(src, "r+b") as f:      # a few clusters of random (incompressible) data
        for i in (1, 5):
            f.seek(i * cs + 3 * 512)
            f.write(pattern(i, cs, "random"))
        f.seek(9 * cs)               # and a cluster of zeros written as data
        f.write(b"\0" * cs)
    qemu_img("convert", "-c", "-f", "raw", "-O", "qcow2", "-o",
             ",".join("%s=%s" % kv for kv in opts.items()), src, d / case.filename)
    src.unlink()


def build_snapshots(d: Path, case: Case) -> None:
    """Writes, snapshot, more writes, snapshot, more writes: three different states.

    The second snapshot is named "1" while its id is "2": qemu resolves a bare
    "1" as an id first.
    """
    opts = dict(case.options)
    cs = int(opts.get("cluster_size", 65536))
    xl2 = opts.get("extended_l2") == "on"
    size = case.param("size", 4 * MiB)
    top = d / case.filename
    backing = case.param("backing")
    if backing:
        create(d / "base.qcow2", size, opts={"cluster_size": 4096})
        _simple_ops(d, d / "base.qcow2", size,
                    lambda o: (o.data(0, size), o.discard(size // 2, size // 4)), seed=31)
        create(top, size, opts=opts, backing="base.qcow2", backing_fmt="qcow2")
    else:
        create(top, size, opts=opts)
    _std_ops(d, top, size, cs=cs, xl2=xl2, k=0, seed=21,
             compression="compression_type" in opts)
    names = case.snapshots
    qemu_img("snapshot", "-c", names[0], top)
    _std_ops(d, top, size, cs=cs, xl2=xl2, k=1, seed=22)
    if case.param("resize"):
        qemu_img("resize", "-q", top, str(case.param("resize")))
        size = case.param("resize")
        _simple_ops(d, top, size, lambda o: o.data(size - 3 * cs - 1000, 3 * cs + 1000),
                    seed=23)
    if len(names) > 1:
        qemu_img("snapshot", "-c", names[1], top)
        _std_ops(d, top, size, cs=cs, xl2=xl2, k=2, seed=24)
        _simple_ops(d, top, size, lambda o: (o.zero(0, 3 * cs), o.discard(6 * cs, 2 * cs)),
                    seed=25)
    for name in names[2:]:
        qemu_img("snapshot", "-c", name, top)


def build_data_file(d: Path, case: Case) -> None:
    opts = dict(case.options)
    cs = int(opts.get("cluster_size", 65536))
    xl2 = opts.get("extended_l2") == "on"
    size = 4 * MiB
    top = d / case.filename
    if case.param("absolute"):
        opts["data_file"] = str(d / opts["data_file"])
    # A relative data_file name is resolved against the image's folder by the engine
    # but against the *working directory* by qemu 7.2: oracles run qemu in the
    # image's folder.
    create(top, size, opts=opts)
    _std_ops(d, top, size, cs=cs, xl2=xl2, seed=41)


def build_dirty(d: Path, case: Case) -> None:
    """lazy_refcounts=on, then qemu-io is killed (SIGKILL) after some writes: the dirty
    bit stays set and the refcounts are stale.  (No flush before the kill: a flush
    writes the refcounts and clears the dirty bit.)  Which table updates reached the
    file is whatever qemu wrote before dying; the oracles read the same file."""
    top = d / case.filename
    size = 4 * MiB
    create(top, size, opts=dict(case.options))
    _std_ops(d, top, size, seed=51)
    with tempfile.TemporaryDirectory(dir=d) as src:
        ops = Ops(Path(src), size, seed=52)
        ops.data(8 * 64 * KiB + 100, 5000)      # cluster 8 was discarded: new allocation
        ops.data(100 * KiB + 3, 300 * KiB)
        ops.zero(MiB, 128 * KiB)
        ops.discard(0, 64 * KiB)
        proc = qemu_io(top.name, ops.commands(top) + ["sigraise 9"], cwd=d,
                       check=False)
    if proc.returncode != -9:
        raise BuildError("qemu-io was not killed: exit %s" % proc.returncode)
    if not header_field(top, 72, ">Q") & 1:
        # Whether QEMU had set the bit before the kill depends on which of the writes
        # needed a new allocation and on timing; the case is about reading an image
        # with the bit set, so set it the way QEMU would have (bit 0 at offset 72).
        with open(top, "r+b") as f:
            f.seek(72)
            val = int.from_bytes(f.read(8), "big") | 1
            f.seek(72)
            f.write(val.to_bytes(8, "big"))


def build_bitmaps(d: Path, case: Case) -> None:
    top = d / case.filename
    size = 4 * MiB
    create(top, size, opts=dict(case.options))
    qemu_img("bitmap", "--add", top, "bm0")
    qemu_img("bitmap", "--add", "-g", "128k", "--disable", top, "bitmap-one")
    _std_ops(d, top, size, seed=61)          # recorded in bm0
    if case.param("in_use"):
        # killed while open read-write: the bitmaps keep their in-use flag
        proc = qemu_io(top, ["write -P 0x5a 65536 4096", "flush", "sigraise 9"],
                       check=False)
        if proc.returncode != -9:
            raise BuildError("qemu-io was not killed: exit %s" % proc.returncode)


def build_prealloc(d: Path, case: Case) -> None:
    """preallocation=metadata|falloc|full, then a few writes, a zero and a discard.
    qemu-img map looks into the host file of metadata-preallocated images (see
    qcow2_detect_metadata_preallocation): file holes show up as zero data."""
    opts = dict(case.options)
    cs = int(opts.get("cluster_size", 65536))
    size = 4 * MiB
    top = d / case.filename
    create(top, size, opts=opts)
    _simple_ops(d, top, size, lambda o: (
        o.data(1536, 3000), o.data(cs + 512, 2 * cs), o.zero(5 * cs, cs + 4096),
        o.discard(9 * cs, cs), o.data(size - 777, 777)), seed=71)


def build_encrypted(d: Path, case: Case) -> None:
    top = d / case.filename
    size = 4 * MiB
    fmt_ = case.param("encrypt")
    secret = ["--object", "secret,id=sec0,data=%s" % LUKS_SECRET]
    opts = {"encrypt.format": fmt_, "encrypt.key-secret": "sec0"}
    if fmt_ == "luks":
        opts["encrypt.iter-time"] = 10
    proc = run_pbkdf([QEMU_IMG, "create", "-q", "-f", "qcow2", *secret, "-o",
                      ",".join("%s=%s" % kv for kv in opts.items()), top, size],
                     timeout=SUBPROCESS_TIMEOUT)
    if proc.returncode != 0:
        raise BuildError("qemu-img create (LUKS) failed: %s" % proc.stderr.strip())
    qemu_io("driver=qcow2,file.filename=%s,encrypt.key-secret=sec0" % top,
            ["write -P 0x11 0 65536", "write -P 0x22 100000 5000"], fmt=None,
            extra=[*secret, "--image-opts"])


def build_unknown_ext(d: Path, case: Case) -> None:
    """An unknown header extension, an unknown autoclear bit and an unknown compatible
    bit: all must be ignored by a reader (qemu does)."""
    top = d / case.filename
    size = 4 * MiB
    create(top, size, opts=dict(case.options))
    _std_ops(d, top, size, seed=81)
    rewrite_extensions(top, lambda exts: exts[:1] + [(EXT_UNKNOWN, b"hello, qcow2 reader!")]
                       + exts[1:])
    set_feature_bits(top, autoclear=1 << 40, compatible=1 << 33)


def build_empty(d: Path, case: Case) -> None:
    create(d / case.filename, case.param("size"), opts=dict(case.options))


def build_odd_tail(d: Path, case: Case) -> None:
    """Virtual size not a multiple of the cluster size; data and a compressed partial
    cluster at the very end."""
    top = d / case.filename
    cs = 65536
    size = 5 * MiB + 1536
    create(top, size, opts=dict(case.options))
    last = size // cs * cs
    _simple_ops(d, top, size, lambda o: (
        o.compressed(last, size - last), o.data(last - 1000, 700),
        o.compressed(cs, cs), o.data(size - 5, 5)), seed=91)


def build_extl2_chain(d: Path, case: Case) -> None:
    """16 KiB clusters with extended L2 (512-byte subclusters) over a qcow2 backing
    file: partial-subcluster writes must copy from the backing file."""
    top = d / case.filename
    opts = dict(case.options)
    cs = 16 * KiB
    size = 4 * MiB
    create(d / "base.qcow2", size, opts={"cluster_size": 4096, "compat": "0.10"})
    _simple_ops(d, d / "base.qcow2", size, lambda o: o.data(0, size - 64 * KiB), seed=101)
    create(top, size, opts={**opts, "_probe_as": "qcow2"}, backing="base.qcow2")
    _std_ops(d, top, size, cs=cs, xl2=True, k=2, seed=102)
    _simple_ops(d, top, size, lambda o: (
        o.data(cs * 20 + 100, 10), o.zero(cs * 21 + 512, 512), o.discard(cs * 22, 1024),
        o.zero(cs * 23, cs), o.discard(cs * 24, cs)), seed=103)


def build_zero_backing(d: Path, case: Case) -> None:
    """write -z / discard over data in a backing file: v3 stores zero clusters, v2 has
    no zero flag and writes zero data (or keeps the cluster)."""
    top = d / case.filename
    opts = dict(case.options)
    size = 4 * MiB
    create(d / "base.qcow2", size, opts=opts)
    _simple_ops(d, d / "base.qcow2", size, lambda o: o.data(0, size), seed=111)
    create(top, size, opts=opts, backing="base.qcow2", backing_fmt="qcow2")
    cs = 65536
    _simple_ops(d, top, size, lambda o: (
        o.data(cs, cs), o.zero(0, 3 * cs), o.zero(4 * cs, cs, unmap=True),
        o.zero(6 * cs + 1000, 5000), o.discard(8 * cs, 2 * cs), o.discard(11 * cs + 512, 1024),
        o.data(20 * cs, 4 * cs), o.zero(21 * cs, cs), o.zero(22 * cs, cs, unmap=True),
        o.discard(23 * cs, cs)), seed=112)


def build_large(d: Path, case: Case) -> None:
    top = d / case.filename
    size = case.param("size")
    create(top, size, opts=dict(case.options))
    _simple_ops(d, top, size, lambda o: (
        o.data(0, 70000), o.data(4 * GiB - 1000, 2000), o.data(2 * GiB + 12345, 100000),
        o.zero(4 * GiB + 65536, 65536), o.compressed(4 * GiB + 64 * MiB, 3 * 65536),
        o.data(size - 1234, 1234)), seed=121)


def special_cases() -> list[Case]:
    def C(id, recipe, *, fmt="qcow2", options=None, features=(), slow=False,
          filename="disk.qcow2", **kw):
        snaps = kw.pop("snapshots", ())
        readable = kw.pop("readable", True)
        big = kw.pop("big", False)
        opts = tuple((k, str(v)) for k, v in (options or {}).items())
        feats = set(features) | {"special"}
        if fmt == "qcow2":
            feats.add("v2" if dict(opts).get("compat") == "0.10" else "v3")
        return Case(id=id, fmt=fmt, options=opts, features=frozenset(feats), slow=slow,
                    filename=filename, snapshots=tuple(snaps), readable=readable, big=big,
                    recipe=recipe, params=tuple(kw.items()))

    v3 = {"compat": "1.1"}
    return [
        C("raw", build_raw, fmt="raw", filename="disk.raw", features={"raw"}, size=4 * MiB),
        C("raw-oddsize", build_raw, fmt="raw", filename="disk.raw", features={"raw"},
          size=1000000),
        C("convert-c-zlib-c4k", build_convert_c, features={"compressed", "zlib"},
          options={**v3, "cluster_size": 4096, "compression_type": "zlib"}),
        C("convert-c-zstd-c64k", build_convert_c, features={"compressed", "zstd"},
          options={**v3, "cluster_size": 65536, "compression_type": "zstd"}),
        C("convert-c-zlib-v2-c512", build_convert_c, features={"compressed", "zlib"},
          options={"compat": "0.10", "cluster_size": 512}),
        C("convert-c-zstd-xl2-c2m", build_convert_c, slow=True,
          features={"compressed", "zstd", "extended_l2"},
          options={**v3, "cluster_size": 2 * MiB, "compression_type": "zstd",
                   "extended_l2": "on"}),
        C("snapshots", build_snapshots, features={"snapshots"}, options=v3,
          snapshots=("first", "1", "last")),
        C("snapshots-v2-c4k", build_snapshots, features={"snapshots"},
          options={"compat": "0.10", "cluster_size": 4096}, snapshots=("a", "b")),
        C("snapshots-xl2-zstd", build_snapshots,
          features={"snapshots", "extended_l2", "compressed", "zstd"},
          options={**v3, "extended_l2": "on", "cluster_size": 32768,
                   "compression_type": "zstd"}, snapshots=("s1", "s2")),
        C("snapshot-resized", build_snapshots, features={"snapshots", "resized"}, options=v3,
          snapshots=("small", "big"), resize=6 * MiB),
        C("snapshot-chain", build_snapshots, features={"snapshots", "backing"}, options=v3,
          snapshots=("on-backing",), backing=True),
        C("data-file", build_data_file, features={"data_file"},
          options={**v3, "data_file": "disk.data"}),
        C("data-file-raw", build_data_file, features={"data_file", "data_file_raw"},
          options={**v3, "data_file": "disk.data", "data_file_raw": "on"}, absolute=True),
        C("data-file-xl2", build_data_file, slow=True, features={"data_file", "extended_l2"},
          options={**v3, "data_file": "disk.data", "extended_l2": "on"}),
        C("dirty", build_dirty, features={"dirty", "lazy_refcounts"},
          options={**v3, "lazy_refcounts": "on"}),
        C("bitmaps", build_bitmaps, features={"bitmaps"}, options=v3),
        C("bitmaps-in-use", build_bitmaps, features={"bitmaps"}, options=v3, in_use=True),
        C("prealloc-metadata", build_prealloc, features={"prealloc"},
          options={**v3, "preallocation": "metadata"}),
        C("prealloc-metadata-v2-c4k", build_prealloc, features={"prealloc"},
          options={"compat": "0.10", "cluster_size": 4096, "preallocation": "metadata"}),
        C("prealloc-metadata-xl2", build_prealloc, slow=True,
          features={"prealloc", "extended_l2"},
          options={**v3, "preallocation": "metadata", "extended_l2": "on"}),
        C("prealloc-falloc", build_prealloc, features={"prealloc"},
          options={**v3, "preallocation": "falloc"}),
        C("prealloc-full", build_prealloc, features={"prealloc"},
          options={**v3, "preallocation": "full"}),
        C("luks", build_encrypted, features={"encrypted"}, readable=False, encrypt="luks"),
        C("aes", build_encrypted, features={"encrypted"}, readable=False, encrypt="aes"),
        C("unknown-ext", build_unknown_ext, features={"unknown_ext"}, options=v3),
        C("empty", build_empty, options=v3, features={"empty"}, size=MiB),
        C("empty-v2", build_empty, options={"compat": "0.10"}, features={"empty"}, size=MiB),
        C("zero-size", build_empty, options=v3, features={"empty"}, size=0),
        C("odd-tail", build_odd_tail, features={"compressed"}, options=v3),
        C("xl2-c16k-chain", build_extl2_chain,
          features={"extended_l2", "backing", "probe_backing", "relative_backing"},
          options={**v3, "cluster_size": 16384, "extended_l2": "on"}),
        C("zero-v3-backing", build_zero_backing, features={"backing", "zero_clusters"},
          options=v3),
        C("zero-v2-backing", build_zero_backing, features={"backing", "zero_clusters"},
          options={"compat": "0.10"}),
        C("large-sparse", build_large, slow=True, big=True, features={"big", "compressed"},
          options=v3, size=4 * GiB + 128 * MiB),
    ]


def cases() -> list[Case]:
    """Every case, default ones first (stable order)."""
    allc = matrix_cases() + special_cases()
    ids = [c.id for c in allc]
    assert len(ids) == len(set(ids)), "duplicate case ids"
    return sorted(allc, key=lambda c: c.slow)


def by_id() -> dict[str, Case]:
    return {c.id: c for c in cases()}


def params(select: Callable[[Case], bool] = lambda c: True):
    """pytest parameters (with the ``slow`` mark) for the cases ``select`` accepts."""
    import pytest
    return [pytest.param(c, id=c.id, marks=[pytest.mark.slow] if c.slow else [])
            for c in cases() if select(c)]


# ----------------------------------------------------------------------- building

_SOURCE_DIGEST = hashlib.sha256(Path(__file__).read_bytes()).hexdigest()
_VERSION = None


def fingerprint(case: Case, root: Path) -> str:
    global _VERSION
    if _VERSION is None:
        _VERSION = qemu_img_version()
    h = hashlib.sha256()
    key = repr((case.id, case.fmt, case.options, sorted(case.features), case.filename,
                case.snapshots, case.readable, case.big, case.params))  # no set order
    for part in (_SOURCE_DIGEST, _VERSION, str(Path(root).resolve()), key):
        h.update(part.encode() + b"\0")
    return h.hexdigest()


def build(case: Case, root: Path | str) -> Built:
    """Build ``case`` under ``root`` unless an up-to-date build is there already.

    Safe against concurrent builders (threads or processes) through a lock file per
    case.  A failed build leaves no stamp, so the next call starts over.
    """
    if not (QEMU_IMG and QEMU_IO):
        raise BuildError("qemu-img and qemu-io are needed to build the corpus")
    root = Path(root).resolve()
    root.mkdir(parents=True, exist_ok=True)
    d = case.directory(root)
    stamp = root / (".%s.stamp" % case.id)
    fp = fingerprint(case, root)
    with open(root / (".%s.lock" % case.id), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if stamp.exists() and stamp.read_text() == fp and case.path(root).exists():
            return Built(case, root)
        stamp.unlink(missing_ok=True)
        if d.exists():
            shutil.rmtree(d)
        d.mkdir()
        case.recipe(d, case)
        if not case.path(root).exists():
            raise BuildError("recipe of %s did not create %s" % (case.id, case.path(root)))
        _fsync_tree(d)
        stamp.write_text(fp)
    return Built(case, root)


def build_many(selected: Iterable[Case], root: Path | str, jobs: int | None = None
               ) -> dict[str, Built]:
    from concurrent.futures import ThreadPoolExecutor
    selected = list(selected)
    jobs = jobs or max(2, (os.cpu_count() or 2))
    def one(c):
        try:
            return build(c, root)
        except BuildError:
            return None       # only this case's tests fail: the ``built`` fixture retries it

    with ThreadPoolExecutor(jobs) as pool:
        built = list(pool.map(one, selected))
    return {b.id: b for b in built if b is not None}


def main(argv=None) -> int:
    import argparse
    p = argparse.ArgumentParser(description="Build the qcow2 test corpus and time it.")
    p.add_argument("--out", default=os.environ.get("QCOW2_CORPUS_DIR") or "corpus-out")
    p.add_argument("--slow", action="store_true", help="also build the slow cases")
    p.add_argument("--list", action="store_true", help="only list the cases")
    p.add_argument("--jobs", type=int, default=None)
    p.add_argument("ids", nargs="*", help="build only these case ids")
    a = p.parse_args(argv)
    sel = [c for c in cases() if (a.slow or not c.slow) and (not a.ids or c.id in a.ids)]
    if a.list:
        for c in sel:
            print("%-40s %-5s %s%s" % (c.id, c.fmt, ",".join(sorted(c.features)),
                                       "  [slow]" if c.slow else ""))
        print("%d cases (%d default)" % (len(sel), sum(not c.slow for c in sel)))
        return 0
    t0 = time.monotonic()
    build_many(sel, a.out, a.jobs)
    print("built %d cases in %s in %.1f s" % (len(sel), a.out, time.monotonic() - t0))
    return 0


if __name__ == "__main__":
    sys.exit(main())
