"""qemu-img as the oracle: what the engine's results are compared with.

* :func:`raw_path` / :func:`raw_bytes` / :func:`raw_sha256` -- the guest data, through
  ``qemu-img convert -O raw`` (``-l <snapshot>`` for internal snapshots), converted
  once per (image, format, snapshot) and cached for the session;
* :func:`info_json` / :func:`info_text` / :func:`map_json` / :func:`map_text` -- what
  ``qemu-img info`` / ``qemu-img map`` print (not cached: ``actual-size`` follows the
  file's allocation, and the calls are cheap);
* :func:`random_ranges` -- deterministic (offset, length) pairs for random reads;
* :func:`run_pbkdf` -- a qemu command that makes a LUKS key slot, made again when
  QEMU's PBKDF2 timing fails on a loaded machine.

qemu-img runs in the image's folder with the path as given: qemu 7.2 resolves a
relative external data-file name against the working directory (not against the
image's folder, as the engine does), so running there makes both agree.  Paths
should be absolute so that ``filename`` in the output is the same for both.

``-U`` (force share) is always passed: it does not change the output and keeps the
oracles working while something else has the image open.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import shutil
import subprocess
import tempfile
import threading
from pathlib import Path

QEMU_IMG = shutil.which("qemu-img")
TIMEOUT = 600

_cache_dir: Path | None = None
_raw_cache: dict[tuple, Path] = {}          # insertion order = least recently used first
# disk the cached raw files may hold (allocated bytes); the least recently used are
# removed past it, so a whole run's oracle outputs never pile up on a small /tmp
CACHE_LIMIT = int(os.environ.get("QCOW2_ORACLE_CACHE_MB", "1024")) << 20
_KEEP_RECENT = 8                            # never evict the newest few (callers hold paths)
_sha_cache: dict[Path, str] = {}
_lock = threading.Lock()


class OracleError(RuntimeError):
    """qemu-img failed where the test expected it to work."""


def set_cache_dir(path: Path | str) -> None:
    """Where converted raw files go (conftest points it at a session temp dir)."""
    global _cache_dir
    _cache_dir = Path(path)
    _cache_dir.mkdir(parents=True, exist_ok=True)


def cache_dir() -> Path:
    if _cache_dir is None:
        set_cache_dir(tempfile.mkdtemp(prefix="qcow2-oracle-"))
    return _cache_dir


def qemu_img(*args, cwd=None, check=True) -> subprocess.CompletedProcess:
    if not QEMU_IMG:
        raise OracleError("qemu-img is not installed")
    proc = subprocess.run([QEMU_IMG, *map(str, args)], cwd=cwd, stdout=subprocess.PIPE,
                          stderr=subprocess.PIPE, timeout=TIMEOUT)
    if check and proc.returncode != 0:
        raise OracleError("qemu-img %s failed (exit %d): %s" % (
            " ".join(map(str, args)), proc.returncode,
            proc.stderr.decode(errors="replace").strip()))
    return proc


# what qemu 7.2 says when its PBKDF2 timing run measured no CPU time at all
PBKDF_TIMING_FAILED = "Unable to get accurate CPU usage"


def run_pbkdf(cmd, attempts: int = 5, **kw) -> subprocess.CompletedProcess:
    """Run a qemu-img / qemu-io command that makes a LUKS key slot (create or convert to
    LUKS, amend with a new secret, measure with ``encrypt.format=luks``).  QEMU picks the
    PBKDF2 iterations by timing a run on the thread's CPU clock, which ticks coarsely: on
    a loaded machine the run now and then measures zero and the command fails with
    :data:`PBKDF_TIMING_FAILED`.  Such a run is made again (up to ``attempts`` times in
    all); any other outcome is returned as is.  ``kw`` goes to :func:`subprocess.run`
    (text output and captured streams unless given)."""
    kw.setdefault("capture_output", True)
    kw.setdefault("text", True)
    kw.setdefault("timeout", TIMEOUT)
    for _ in range(attempts):
        proc = subprocess.run([str(a) for a in cmd], **kw)
        err = proc.stderr if isinstance(proc.stderr, str) else \
            (proc.stderr or b"").decode(errors="replace")
        if proc.returncode == 0 or PBKDF_TIMING_FAILED not in err:
            break
    return proc


def _cwd_for(path) -> str | None:
    p = Path(path)
    return str(p.parent) if p.is_absolute() else None


def _identity(path) -> tuple:
    st = os.stat(path)
    return (os.path.realpath(path), st.st_mtime_ns, st.st_size, st.st_ino)


# ----------------------------------------------------------------------- guest data

def raw_path(path, fmt: str | None = None, snapshot: str | None = None) -> Path:
    """A raw file with the guest data of ``path`` (of ``snapshot`` when given, which
    qemu resolves as an id first, then as a name).  Sparse; cached per session."""
    key = (_identity(path), fmt, snapshot)
    with _lock:
        hit = _raw_cache.pop(key, None)
        if hit is not None:
            _raw_cache[key] = hit           # most recently used again
    if hit is not None and hit.exists():
        return hit
    digest = hashlib.sha256(repr(key).encode()).hexdigest()[:24]
    out = cache_dir() / ("%s.raw" % digest)
    tmp = cache_dir() / ("%s.%d.%d.tmp" % (digest, os.getpid(), threading.get_ident()))
    args = ["convert", "-U"]
    if fmt:
        args += ["-f", fmt]
    if snapshot is not None:
        args += ["-l", snapshot]
    args += ["-O", "raw", str(path), str(tmp)]
    qemu_img(*args, cwd=_cwd_for(path))
    os.replace(tmp, out)
    with _lock:
        _raw_cache[key] = out
        _evict_locked()
    return out


def _evict_locked() -> None:
    """Drop least recently used raw files while the cache holds more than its limit."""
    sizes = {}
    for k, p in _raw_cache.items():
        try:
            sizes[k] = os.stat(p).st_blocks * 512
        except OSError:
            sizes[k] = 0
    total = sum(sizes.values())
    for k in list(_raw_cache)[:-_KEEP_RECENT]:
        if total <= CACHE_LIMIT:
            break
        p = _raw_cache.pop(k)
        _sha_cache.pop(p, None)
        try:
            os.unlink(p)
        except OSError:
            pass
        total -= sizes[k]


def raw_bytes(path, fmt: str | None = None, snapshot: str | None = None) -> bytes:
    return raw_path(path, fmt, snapshot).read_bytes()


def raw_sha256(path, fmt: str | None = None, snapshot: str | None = None) -> str:
    rp = raw_path(path, fmt, snapshot)
    with _lock:
        hit = _sha_cache.get(rp)
    if hit is None:
        h = hashlib.sha256()
        with open(rp, "rb") as f:
            for chunk in iter(lambda: f.read(4 << 20), b""):
                h.update(chunk)
        hit = h.hexdigest()
        with _lock:
            _sha_cache[rp] = hit
    return hit


def raw_size(path, fmt: str | None = None, snapshot: str | None = None) -> int:
    return raw_path(path, fmt, snapshot).stat().st_size


def raw_pread(path, n: int, offset: int, fmt: str | None = None,
              snapshot: str | None = None) -> bytes:
    """os.pread on qemu's raw output: the expected result of ``Image.pread``."""
    fd = os.open(raw_path(path, fmt, snapshot), os.O_RDONLY)
    try:
        return os.pread(fd, n, offset)
    finally:
        os.close(fd)


# --------------------------------------------------------------------- info and map

def _fmt_args(fmt):
    return ["-f", fmt] if fmt else []


def info_text(path, *args, fmt: str | None = None, cwd=None) -> str:
    """``qemu-img info [args] path`` as printed (human output unless args say json)."""
    proc = qemu_img("info", "-U", *_fmt_args(fmt), *args, str(path),
                    cwd=cwd or _cwd_for(path))
    return proc.stdout.decode()


def info_json(path, *args, fmt: str | None = None, cwd=None):
    """``qemu-img info --output=json [args] path`` parsed: a dict, or a list of dicts
    with ``--backing-chain``."""
    return json.loads(info_text(path, "--output=json", *args, fmt=fmt, cwd=cwd))


def map_text(path, *args, fmt: str | None = None, cwd=None) -> str:
    proc = qemu_img("map", "-U", *_fmt_args(fmt), *args, str(path),
                    cwd=cwd or _cwd_for(path))
    return proc.stdout.decode()


def map_proc(path, *args, fmt: str | None = None, cwd=None) -> subprocess.CompletedProcess:
    """``qemu-img map`` as a finished process (it may fail: see test_map_human)."""
    return qemu_img("map", "-U", *_fmt_args(fmt), *args, str(path),
                    cwd=cwd or _cwd_for(path), check=False)


def map_json(path, *args, fmt: str | None = None, cwd=None) -> list[dict]:
    """``qemu-img map --output=json path`` parsed: a list of extent dicts."""
    return json.loads(map_text(path, "--output=json", *args, fmt=fmt, cwd=cwd))


def extent_dict(e) -> dict:
    """An engine ``Extent`` in the form of a ``qemu-img map --output=json`` entry:
    same keys in the same order, ``offset`` only when it is not None."""
    d = {"start": e.start, "length": e.length, "depth": e.depth,
         "present": e.present, "zero": e.zero, "data": e.data}
    if e.offset is not None:
        d["offset"] = e.offset
    return d


# -------------------------------------------------------------------- random ranges

def random_ranges(seed, size: int, cluster_size: int = 65536, *, n: int = 50,
                  subcluster_size: int | None = None, max_len: int = 1 << 20
                  ) -> list[tuple[int, int]]:
    """``n`` deterministic (offset, length) pairs for reads of a disk of ``size``.

    A mix of: reads that straddle a cluster (or subcluster) boundary by a random
    amount on both sides; reads of 1 byte and of odd lengths at odd offsets; reads
    of whole clusters; reads that run up to and past the end of the disk; reads at
    and beyond the end (which return b""); and an empty read.  Lengths go from 1
    byte to a few clusters, capped at ``max_len``.
    """
    rng = random.Random(str(seed))
    cs = cluster_size
    sub = subcluster_size or cs
    cap = max(1, min(max_len, 3 * cs))
    out: list[tuple[int, int]] = [(0, 0), (size, 1), (size + cs + 7, 100)]
    if size:
        out += [(0, min(size, cap)), (size - 1, 1), (max(0, size - 1000), 5000)]
    while len(out) < n and size:
        kind = rng.randrange(6)
        if kind == 0:       # straddle a cluster boundary
            b = rng.randrange(1, max(2, size // cs + 1)) * cs
            before = rng.randint(1, min(cap - 1, cs) if cap > 1 else 1)
            length = before + rng.randint(1, max(1, cap - before))
            off = b - before
        elif kind == 1:     # straddle a subcluster boundary
            b = rng.randrange(1, max(2, size // sub + 1)) * sub
            before = rng.randint(1, min(sub, 4096))
            off, length = b - before, before + rng.randint(1, min(sub, 4096))
        elif kind == 2:     # tiny read at an odd place
            off, length = rng.randrange(size), rng.choice((1, 2, 3, 511, 513, 4097))
        elif kind == 3:     # whole clusters, aligned
            off = rng.randrange(max(1, size // cs)) * cs
            length = cs * rng.randint(1, max(1, cap // cs))
        elif kind == 4:     # up to / past the end
            off = max(0, size - rng.randint(1, cap))
            length = rng.randint(1, 2 * cap)
        else:               # anywhere
            off, length = rng.randrange(size), rng.randint(1, cap)
        out.append((max(0, off), max(1, length)))
    return out[:max(n, 3)]


def first_difference(a: bytes, b: bytes) -> int | None:
    """Offset of the first differing byte (or of the end of the shorter input)."""
    if a == b:
        return None
    n = min(len(a), len(b))
    lo, step = 0, 1 << 16
    while lo < n and a[lo:lo + step] == b[lo:lo + step]:
        lo += step
    for i in range(lo, min(n, lo + step)):
        if a[i] != b[i]:
            return i
    return n
