"""RBD images as a store of the engine, against a real Ceph cluster.

* the ``rbd:`` name syntax (qemu-img's rules) and the names the tree accepts (no
  cluster needed);
* the binding (``qcow2.backends._rbd``) and :class:`RbdBackend` through the backend
  conformance class;
* ``qcow2.open``/the CLI on ``rbd:`` names with qemu-img (``qemu-block-extra``'s rbd
  driver) as the oracle: content, writes read back, info/map/check output, create,
  resize, snapshots, the exclusive lock;
* the errors: one line each, bounded waits.

The cluster is the ``ceph`` session fixture (tests/cephcluster.py); where Ceph cannot
start, these tests skip and say why.
"""

from __future__ import annotations

import errno
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path

import pytest

from helpers import random_writes
from test_backends import BackendConformance, _data

import qcow2
from qcow2.backends import MemoryBackend
from qcow2.rbdname import (RbdName, escape, format_rbd_name, is_rbd_name, parse_rbd_name,
                           qemu_filename, unescape)

MiB = 1 << 20
ROOT = Path(__file__).resolve().parent.parent
QCOW2_CLI = [sys.executable, "-P", "-m", "qcow2"]
# a well-formed cephx key that no cluster knows
WRONG_KEY = "AQBBBBBBAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA=="


def _rbd_module():
    from qcow2.backends import rbd
    return rbd


# ---------------------------------------------------------------------------------------
# names (no cluster)
# ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("name, fields", [
    ("rbd:p/img", ("p", "img", None, "", None, None, ())),
    ("rbd:p/img@snap", ("p", "img", "snap", "", None, None, ())),
    ("rbd:p/ns/img@s:conf=/etc/c.conf:id=u",
     ("p", "img", "s", "ns", "/etc/c.conf", "u", ())),
    ("rbd:p/img:mon_host=127.0.0.1\\:6789:key=AQ==:rbd_cache=false",
     ("p", "img", None, "", None, None,
      (("mon_host", "127.0.0.1:6789"), ("key", "AQ=="), ("rbd_cache", "false")))),
    # escapes: \: \@ \/ \\ stay inside their field
    ("rbd:p\\/q/im\\:g\\@x@sn\\:ap:conf=/a\\:b", ("p/q", "im:g@x", "sn:ap", "", "/a:b", None,
                                                   ())),
    ("rbd:p/a\\\\b", ("p", "a\\b", None, "", None, None, ())),
    # QEMU's quirks: an unescaped @ anywhere after the pool starts the snapshot, and a
    # / in what precedes it then separates a namespace
    ("rbd:p/img:conf=/x@y", ("p", "x", "y", "img:conf=", None, None, ())),
    # the last of a repeated conf/id wins, as in QEMU's QDict
    ("rbd:p/img:id=a:id=b", ("p", "img", None, "", None, "b", ())),
])
def test_parse(name, fields):
    n = parse_rbd_name(name)
    assert (n.pool, n.image, n.snapshot, n.namespace, n.conf, n.user, n.options) == fields
    assert str(n) == name
    again = parse_rbd_name(format_rbd_name(n.pool, n.image, snapshot=n.snapshot,
                                           namespace=n.namespace, conf=n.conf, user=n.user,
                                           options=n.options))
    assert again == n


@pytest.mark.parametrize("name, message", [
    ("rbd:pool", "Pool name is required"),
    ("rbd:/img", "the pool name is empty"),
    ("rbd:p/", "the image name is empty"),
    ("rbd:p/img@", "the snapshot name is empty"),
    ("rbd:p/img:conf", "conf option conf has no value"),
    ("rbd:p/img:a=1:b", "conf option b has no value"),
    ("rbd:p/i\0mg", "NUL"),
    ("file:x", "must start with 'rbd:'"),
])
def test_parse_errors(name, message):
    with pytest.raises(qcow2.errors.InvalidOptionError, match=re.escape(message)):
        parse_rbd_name(name)


def test_escape_round_trip():
    rng = random.Random(5)
    for _ in range(300):
        s = "".join(rng.choice("ab:@/=\\ é") for _ in range(rng.randrange(1, 12)))
        assert unescape(escape(s)) == s
        n = parse_rbd_name(format_rbd_name(s, s, snapshot=s, conf=s, user=s,
                                           options=[("k" + s, s)]))
        assert (n.pool, n.image, n.snapshot, n.conf, n.user, n.options) == (
            s, s, s, s, s, (("k" + s, s),))


def test_qemu_names():
    """qemu-img shows an image in RBD under a json: name of its strong options in
    QEMU's QDict order (checked against qemu-img itself in test_cli_info_map)."""
    assert qemu_filename("rbd:rbd/q1@s:conf=/x/c:id=admin:mon_host=1", "raw") == (
        'json:{"driver": "raw", "file": {"pool": "rbd", "image": "q1", "conf": "/x/c", '
        '"snapshot": "s", "driver": "rbd", "namespace": "", "user": "admin"}}')
    assert qemu_filename("rbd:rbd/q1") == (
        'json:{"pool": "rbd", "image": "q1", "driver": "rbd", "namespace": ""}')
    assert qemu_filename("rbd:p/ns/é") == (
        'json:{"pool": "p", "image": "\\u00E9", "driver": "rbd", "namespace": "ns"}')


def test_sibling_and_names_allowed():
    from qcow2.paths import check_file_name, combine_path
    base = "rbd:p/img:conf=/c\\:x:id=u"
    assert combine_path(base, "base.qcow2") == "rbd:p/base.qcow2:conf=/c\\:x:id=u"
    assert combine_path(base, "/abs/file") == "/abs/file"
    assert combine_path("/dir/top.qcow2", "rbd:p/x") == "rbd:p/x"
    check_file_name("rbd:p/x", "backing file")
    for bad in ("json:{}", "nbd:localhost", "http://x/y", "file:a", "RBD:p/x"):
        with pytest.raises(qcow2.UnsafeImageError, match="protocol prefix"):
            check_file_name(bad, "backing file")
    assert is_rbd_name("rbd:p/x") and not is_rbd_name("rbd") and not is_rbd_name(None)
    assert isinstance(parse_rbd_name("rbd:p/x"), RbdName)


def _qcow2_with_backing(tmp_path, backing: str) -> bytes:
    p = tmp_path / "top.qcow2"
    r = subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", "-u", "-b", backing,
                        "-F", "raw", str(p), "4M"], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    return p.read_bytes()


@pytest.mark.skipif(shutil.which("qemu-img") is None, reason="qemu-img not installed")
def test_untrusted_refuses_rbd_backing(tmp_path):
    """An rbd: backing name is a name like any other for untrusted mode: refused
    before anything is opened (no connection attempted)."""
    be = MemoryBackend(_qcow2_with_backing(tmp_path, "rbd:rbd/secret:conf=/etc/x"))
    with pytest.raises(qcow2.UnsafeImageError, match="untrusted"):
        qcow2.open(be, untrusted=True)
    with qcow2.open(be, backing=False) as img:
        assert img.info()["backing-filename"] == "rbd:rbd/secret:conf=/etc/x"


def test_binding_version_matches_builder():
    text = (ROOT / "native" / "build_rbd.py").read_text()
    assert f"VERSION = {_rbd_module().BINDING_VERSION}\n" in text


def test_binding_is_built():
    """Where librbd-dev is installed the binding must have been built (setup.sh
    installs it); elsewhere the reason is what users see."""
    rbd = _rbd_module()
    reason = rbd.unavailable_reason()
    if reason is not None:
        if os.path.exists("/usr/include/rbd/librbd.h") and \
                "rbd" not in os.environ.get("QCOW2_NATIVE_WITHOUT", ""):
            pytest.fail(f"librbd-dev is installed but the binding is not usable: {reason}")
        pytest.skip(f"librbd-dev not installed: {reason}")
    assert rbd.librbd_version() >= (1, 12, 0)


# ---------------------------------------------------------------------------------------
# the cluster
# ---------------------------------------------------------------------------------------

@pytest.fixture(scope="session")
def cluster(request):
    reason = _rbd_module().unavailable_reason()
    if reason is not None:
        pytest.skip(f"RBD binding unavailable: {reason}")
    return request.getfixturevalue("ceph")


class Pool:
    """Names and clean-up of this test's images in the cluster's pool."""

    def __init__(self, cluster):
        self.cluster = cluster
        self.made: list[str] = []

    def fresh(self, stem: str = "t") -> str:
        image = f"{stem}-{uuid.uuid4().hex[:10]}"
        self.made.append(image)
        return image

    def name(self, image: str, snap: str | None = None, **extra) -> str:
        c = self.cluster
        opts = [("keyring", str(c.keyring)), *extra.items()]
        return format_rbd_name(c.pool, image, snapshot=snap, conf=str(c.conf), user=c.user,
                               options=opts)

    def kwargs(self) -> dict:
        c = self.cluster
        return {"pool": c.pool, "conf": str(c.conf), "user": c.user,
                "options": (("keyring", str(c.keyring)),)}

    def image(self, data: bytes, stem: str = "t") -> str:
        """A new image holding ``data`` (written through our backend)."""
        from qcow2.backends.rbd import RbdBackend
        image = self.fresh(stem)
        with RbdBackend(image, **self.kwargs(), create=len(data)) as be:
            be.pwrite(data, 0)
        return image

    def imported(self, path: Path, stem: str = "t") -> str:
        """A new image with a local file's bytes (``rbd import``: holes stay holes)."""
        image = self.fresh(stem)
        self.cluster.rbd("import", str(path), f"{self.cluster.pool}/{image}")
        return image

    def remove_all(self) -> None:
        from qcow2.backends.rbd import Cluster
        with Cluster(**self.kwargs()) as c:
            for image in self.made:
                for _ in range(50):
                    try:
                        c.remove_image(image)
                    except OSError as exc:
                        if exc.errno == errno.ENOENT:
                            break
                        if exc.errno == errno.EBUSY:     # a watcher still going
                            time.sleep(0.1)
                            continue
                        _purge(self.cluster, image)     # snapshots first
                    break


def _purge(cluster, image: str) -> None:
    try:
        cluster.rbd("snap", "purge", f"{cluster.pool}/{image}")
        cluster.rbd("rm", f"{cluster.pool}/{image}")
    except Exception:  # noqa: BLE001 - best effort
        pass


@pytest.fixture
def pool(cluster):
    p = Pool(cluster)
    yield p
    p.remove_all()


def _qemu(cluster, *args, check=True) -> subprocess.CompletedProcess:
    p = subprocess.run(["qemu-img", *map(str, args)], capture_output=True, text=True,
                       env=cluster.env, timeout=300)
    if check:
        assert p.returncode == 0, p.stderr
    return p


def _cli(*args, env=None, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run([*QCOW2_CLI, *map(str, args)], capture_output=True, text=True,
                          timeout=timeout, env=env)


def _raw_of(cluster, name: str, tmp_path, fmt: str | None = None) -> bytes:
    out = tmp_path / f"oracle-{uuid.uuid4().hex[:6]}.raw"
    _qemu(cluster, "convert", *(["-f", fmt] if fmt else []), "-O", "raw", name, out)
    data = out.read_bytes()
    out.unlink()
    return data


def _sparse_file(tmp_path, size: int, seed: int, name: str = "src.raw") -> tuple[Path, bytes]:
    """A raw file with data, zeros and holes."""
    rng = random.Random(seed)
    data = bytearray(size)
    for _ in range(12):
        off = rng.randrange(0, size - 300000)
        n = rng.randrange(1, 300000)
        data[off:off + n] = rng.randbytes(n)
    p = tmp_path / name
    with open(p, "wb") as f:
        f.truncate(size)
        for off in range(0, size, 65536):
            chunk = data[off:off + 65536]
            if any(chunk):
                f.seek(off)
                f.write(chunk)
    return p, bytes(data)


# ---------------------------------------------------------------------------------------
# the store: conformance
# ---------------------------------------------------------------------------------------

class TestRbdBackend(BackendConformance):
    """RbdBackend passes the conformance class (holes: librbd's write-zeroes)."""

    @pytest.fixture(autouse=True)
    def _pool(self, pool):
        self.pool = pool

    def make(self, tmp_path, data, writable):
        from qcow2.backends.rbd import RbdBackend
        image = self.pool.image(data)
        return RbdBackend(image, **self.pool.kwargs(), writable=writable)

    def test_identity_names_the_image(self, pool):
        from qcow2.backends.rbd import RbdBackend
        image = pool.image(_data())
        with RbdBackend(image, **pool.kwargs()) as a, \
                RbdBackend(image, **pool.kwargs(), writable=True) as b:
            assert a.identity() == b.identity()
            assert a.identity()[0] == "rbd" and a.object_size == 4 * MiB

    def test_data_regions_follow_the_object_map(self, pool):
        from qcow2.backends.rbd import RbdBackend
        image = pool.image(bytes(0))
        with RbdBackend(image, **pool.kwargs(), writable=True) as be:
            be.truncate(64 * MiB)
            be.pwrite(b"x" * 100, 9 * MiB)
            be.pwrite(b"y" * 100, 40 * MiB - 50)            # across two objects
            if not be.can_seek_data:
                pytest.skip("the cluster's images have no fast-diff")
            assert list(be.data_regions()) == [(8 * MiB, 4 * MiB), (36 * MiB, 8 * MiB)]
            assert list(be.data_regions(10 * MiB, 38 * MiB)) == [(10 * MiB, 2 * MiB),
                                                                 (36 * MiB, 2 * MiB)]
            assert be.allocated_size() == 12 * MiB
            be.punch_hole(0, 64 * MiB)
            assert list(be.data_regions()) == [] and be.allocated_size() == 0

    def test_threads_read_in_parallel(self, pool):
        """The GIL is released in librbd calls: reads from threads all complete and
        agree (a smoke test: cffi releases the GIL around every call)."""
        from qcow2.backends.rbd import RbdBackend
        data = random.Random(3).randbytes(8 * MiB)
        image = pool.image(data)
        errors = []
        with RbdBackend(image, **pool.kwargs()) as be:
            def reader(seed):
                rng = random.Random(seed)
                for _ in range(40):
                    off = rng.randrange(len(data))
                    n = rng.randrange(1, 300000)
                    if be.pread(n, off) != data[off:off + n]:
                        errors.append((off, n))
            threads = [threading.Thread(target=reader, args=(i,)) for i in range(4)]
            for t in threads:
                t.start()
            for t in threads:
                t.join()
        assert not errors

    def test_closed(self, pool):
        from qcow2.backends.rbd import RbdBackend
        be = RbdBackend(pool.image(b"z" * 4096), **pool.kwargs())
        be.close()
        with pytest.raises(OSError, match="closed"):
            be.pread(1, 0)


# ---------------------------------------------------------------------------------------
# the engine on rbd: names, qemu-img as the oracle
# ---------------------------------------------------------------------------------------

def test_raw_content_equals_qemu(cluster, pool, tmp_path):
    path, data = _sparse_file(tmp_path, 24 * MiB + 4096, 1)
    name = pool.name(pool.imported(path))
    with qcow2.open(name) as img:
        assert img.format == "raw" and img.size == len(data)
        assert img.pread(len(data), 0) == data
        rng = random.Random(2)
        for _ in range(50):
            off = rng.randrange(len(data))
            n = rng.randrange(1, 2 * MiB)
            assert img.pread(n, off) == data[off:off + n]
    assert _raw_of(cluster, name, tmp_path) == data


@pytest.mark.parametrize("opts", ["cluster_size=65536", "cluster_size=65536,compression_type=zstd",
                                  "compat=0.10,cluster_size=4096"])
def test_qcow2_in_rbd_reads_and_writes(cluster, pool, tmp_path, opts):
    """A qcow2 stored in an RBD image opens like a qcow2 file: reads equal qemu-img's,
    writes (data, zeros, compressed) read back by qemu-img, which checks it clean."""
    size = 16 * MiB
    src, data = _sparse_file(tmp_path, size, 7)
    q = tmp_path / "q.qcow2"
    _qemu(cluster, "convert", "-f", "raw", "-O", "qcow2", "-o", opts, "-c", src, q)
    name = pool.name(pool.imported(q))
    with qcow2.open(name) as img:
        assert img.format == "qcow2" and img.pread(size, 0) == data
    model = bytearray(data)
    rng = random.Random(opts)
    with qcow2.open(name, "r+") as img:
        random_writes(img, model, rng, 40, ["write", "write", "zero", "compressed"], 400000)
        img.resize(size + MiB)
        model.extend(bytes(MiB))
    r = _qemu(cluster, "check", name, check=False)
    assert r.returncode == 0, r.stdout + r.stderr
    assert _raw_of(cluster, name, tmp_path) == bytes(model)


def test_raw_writes_read_back_by_qemu(cluster, pool, tmp_path):
    image = pool.image(bytes(8 * MiB))
    name = pool.name(image)
    model = bytearray(8 * MiB)
    rng = random.Random(11)
    with qcow2.open(name, "r+", format="raw") as img:
        for _ in range(30):
            off = rng.randrange(8 * MiB)
            n = min(rng.randrange(1, 500000), 8 * MiB - off)
            if rng.random() < 0.7:
                blob = rng.randbytes(n)
                img.pwrite(blob, off)
                model[off:off + n] = blob
            else:
                img.write_zeroes(off, n)
                model[off:off + n] = bytes(n)
        img.flush()
    assert _raw_of(cluster, name, tmp_path, "raw") == bytes(model)


def _same(a: subprocess.CompletedProcess, b: subprocess.CompletedProcess) -> None:
    assert (b.returncode, b.stdout) == (a.returncode, a.stdout), (a.stderr, b.stderr)


@pytest.mark.skipif(shutil.which("qemu-img") is None, reason="qemu-img not installed")
def test_cli_info_map(cluster, pool, tmp_path):
    """info and map print what qemu-img prints for rbd: names (json: names, no disk
    size, the object size, RBD snapshots of a raw image, the object map)."""
    path, _data_ = _sparse_file(tmp_path, 40 * MiB, 3)
    raw = pool.imported(path)
    q = tmp_path / "q.qcow2"
    _qemu(cluster, "convert", "-f", "raw", "-O", "qcow2", path, q)
    qc = pool.imported(q)
    cluster.rbd("snap", "create", f"{cluster.pool}/{raw}@first")
    names = [pool.name(raw), pool.name(qc), pool.name(raw, "first"),
             f"rbd:{cluster.pool}/{qc}:conf={cluster.conf}:keyring={cluster.keyring}"]
    for name in names:
        for fmt in ([], ["-f", "raw"]):
            for out in ("human", "json"):
                _same(_qemu(cluster, "info", *fmt, f"--output={out}", name),
                      _cli("info", *fmt, f"--output={out}", name, env=cluster.env))
                _same(_qemu(cluster, "map", *fmt, f"--output={out}", name),
                      _cli("map", *fmt, f"--output={out}", name, env=cluster.env))


def test_cli_check_compare_convert(cluster, pool, tmp_path):
    path, data = _sparse_file(tmp_path, 12 * MiB, 4)
    q = tmp_path / "q.qcow2"
    _qemu(cluster, "convert", "-f", "raw", "-O", "qcow2", path, q)
    raw, qc = pool.name(pool.imported(path)), pool.name(pool.imported(q))
    for out in ("human", "json"):
        _same(_qemu(cluster, "check", f"--output={out}", qc, check=False),
              _cli("check", f"--output={out}", qc))
    r = _cli("check", raw)
    assert r.returncode == 63 and "does not support checks" in r.stderr
    _same(_qemu(cluster, "compare", raw, qc, check=False), _cli("compare", raw, qc))
    _same(_qemu(cluster, "compare", qc, path, check=False), _cli("compare", qc, path))
    for src in (raw, qc):
        for fmt in ("raw", "qcow2"):
            out = tmp_path / f"out.{fmt}"
            r = _cli("convert", "-O", fmt, src, out)
            assert r.returncode == 0, r.stderr
            assert _raw_of(cluster, str(out), tmp_path) == data
            out.unlink()


def test_cli_create_and_resize(cluster, pool, tmp_path):
    image = pool.fresh("created")
    name = pool.name(image)
    r = _cli("create", "-f", "raw", name, "10M")
    assert r.returncode == 0, r.stderr
    assert r.stdout == f"Formatting '{name}', fmt=raw size=10485760\n"
    assert "size 10 MiB in 3 objects" in cluster.rbd("info", f"{cluster.pool}/{image}")
    r = _cli("create", "-f", "raw", name, "1M")
    assert r.returncode == 1 and "already exists" in r.stderr and r.stderr.count("\n") == 1
    r = _cli("create", "-f", "raw", "-o", "preallocation=full", pool.name(pool.fresh()), "1M")
    assert r.returncode == 1 and "preallocation" in r.stderr
    r = _cli("create", "-f", "qcow2", "-o", "preallocation=full", pool.name(pool.fresh()), "1M")
    assert r.returncode == 1 and "preallocation" in r.stderr
    r = _cli("resize", name, "+6M")
    assert (r.returncode, r.stdout) == (0, "Image resized.\n"), r.stderr
    r = _cli("resize", "-f", "raw", name, "8M")
    assert r.returncode == 1 and "--shrink" in r.stderr
    r = _cli("resize", "-f", "raw", "--shrink", name, "8M")
    assert r.returncode == 0, r.stderr
    with qcow2.open(name) as img:
        assert img.size == 8 * MiB


@pytest.mark.parametrize("prealloc", ["off", "metadata"])
def test_cli_create_qcow2_in_rbd(cluster, pool, tmp_path, prealloc):
    """create -f qcow2 on an rbd: name writes the same bytes as qemu-img's rbd driver;
    the image then works as a qcow2 file does (our writes, qemu-img's check and read)."""
    ours, theirs = pool.fresh("q"), pool.fresh("q")
    r = _cli("create", "-f", "qcow2", "-o", f"preallocation={prealloc}", pool.name(ours),
             "16M")
    assert r.returncode == 0, r.stderr
    _qemu(cluster, "create", "-f", "qcow2", "-o", f"preallocation={prealloc}",
          pool.name(theirs), "16M")
    # (rbd export: qemu-img's rbd driver asserts on an image size that is not a
    # multiple of 512, which both images have)
    for image in (ours, theirs):
        cluster.rbd("export", f"{cluster.pool}/{image}", str(tmp_path / image))
    assert (tmp_path / ours).read_bytes() == (tmp_path / theirs).read_bytes()
    data = os.urandom(300000)
    with qcow2.open(pool.name(ours), "r+") as img:
        img.pwrite(data, 5 * MiB + 123)
        img.flush()
    assert "No errors were found" in _qemu(cluster, "check", pool.name(ours)).stdout
    got = _raw_of(cluster, pool.name(ours), tmp_path, "qcow2")
    assert got[5 * MiB + 123:5 * MiB + 123 + len(data)] == data and len(got) == 16 * MiB


def test_resize_preallocation_as_qemu(cluster, pool, tmp_path):
    """RBD allocates as it is written: resize --preallocation falloc/full is refused
    on a raw and on a qcow2 image in RBD, as qemu-img's rbd driver refuses it."""
    raw, qc = pool.fresh("r"), pool.fresh("q")
    assert _cli("create", "-f", "raw", pool.name(raw), "4M").returncode == 0
    assert _cli("create", "-f", "qcow2", pool.name(qc), "4M").returncode == 0
    for name, fmt in ((pool.name(raw), "raw"), (pool.name(qc), "qcow2")):
        for mode in ("falloc", "full"):
            ours = _cli("resize", "-f", fmt, f"--preallocation={mode}", name, "+1M")
            theirs = _qemu(cluster, "resize", "-f", fmt, f"--preallocation={mode}", name,
                           "+1M", check=False)
            assert ours.returncode == theirs.returncode == 1
            assert ours.stderr.split(": ", 1)[1] == theirs.stderr.split(": ", 1)[1]
        assert _cli("resize", "-f", fmt, name, "+1M").returncode == 0
    with qcow2.open(pool.name(qc)) as img:
        assert img.size == 5 * MiB
    assert "No errors were found" in _qemu(cluster, "check", pool.name(qc)).stdout


def test_snapshot_is_read_only(cluster, pool, tmp_path):
    data = random.Random(9).randbytes(2 * MiB)
    image = pool.image(data)
    cluster.rbd("snap", "create", f"{cluster.pool}/{image}@s1")
    with qcow2.open(pool.name(image), "r+", format="raw") as img:
        img.pwrite(b"\xff" * 4096, 0)
    with qcow2.open(pool.name(image, "s1")) as img:
        assert img.pread(len(data), 0) == data
        with pytest.raises(qcow2.ReadOnlyError):
            img.pwrite(b"x", 0)
    with pytest.raises(qcow2.Qcow2Error, match="snapshot 'rbd.*' is read-only|read-only"):
        qcow2.open(pool.name(image, "s1"), "r+")
    assert _raw_of(cluster, pool.name(image, "s1"), tmp_path, "raw") == data


def test_exclusive_lock_refuses_a_second_writer(cluster, pool):
    name = pool.name(pool.image(bytes(MiB)))
    with qcow2.open(name, "r+", format="raw") as img:
        img.pwrite(b"a" * 512, 0)
        r = _cli("resize", "-f", "raw", name, "2M")
        assert r.returncode == 1 and "exclusive lock" in r.stderr
        with qcow2.open(name, format="raw") as reader:      # readers take no lock
            assert reader.pread(1, 0) == b"a"
    r = _cli("resize", "-f", "raw", name, "2M")
    assert r.returncode == 0, r.stderr


# ---------------------------------------------------------------------------------------
# errors: one line, bounded
# ---------------------------------------------------------------------------------------

def _one_line_error(args, pattern: str, env=None, budget: float = 20.0) -> None:
    """One line, exit status 1; a command still waiting after ``budget`` seconds (a
    hang, not a slow answer) fails with TimeoutExpired."""
    r = _cli(*args, env=env, timeout=budget)
    assert r.returncode == 1, r.stdout
    assert r.stderr.count("\n") == 1, r.stderr
    assert re.search(pattern, r.stderr), r.stderr


def test_errors(cluster, pool, tmp_path):
    c = cluster
    image = pool.image(bytes(MiB))
    base = f"conf={c.conf}:keyring={c.keyring}"
    env = {k: v for k, v in os.environ.items() if k not in ("CEPH_CONF", "CEPH_ARGS")}
    env["HOME"] = str(tmp_path)                     # no ~/.ceph/config to be found
    cases = [
        (f"rbd:{c.pool}/{image}:conf={tmp_path}/none.conf", r"ceph.conf '.*none.conf' does "
                                                           r"not exist"),
        (f"rbd:{c.pool}/{image}:conf=/dev/null", r"no Ceph monitors .*names none"),
        (f"rbd:{c.pool}/{image}:conf={c.conf}:keyring={tmp_path}/none.keyring",
         r"no keyring for client.admin: none of .*none.keyring exists"),
        (f"rbd:nosuchpool/{image}:{base}", r"pool 'nosuchpool' does not exist"),
        (f"rbd:{c.pool}/nosuchimage:{base}", r"image 'nosuchimage' does not exist in pool"),
        (f"rbd:{c.pool}/{image}@nosnap:{base}", rf"image '{image}' .* has no snapshot "
                                                 r"'nosnap'"),
        (f"rbd:{c.pool}/{image}:{base}:key={WRONG_KEY}", r"cephx refused client.admin"),
        (f"rbd:{c.pool}/{image}:{base}:id=nobody", r"cephx refused client.nobody"),
        (f"rbd:{c.pool}/{image}:{base}:no_such_option=1", r"invalid conf option "
                                                          r"no_such_option"),
        (f"rbd:{c.pool}", r"Pool name is required"),
    ]
    for name, pattern in cases:
        _one_line_error(["info", name], "Could not open|" + pattern, env=env)
        _one_line_error(["info", name], pattern, env=env)
    if not os.path.exists("/etc/ceph/ceph.conf"):
        _one_line_error(["info", f"rbd:{c.pool}/{image}"], r"no ceph.conf was found", env=env)


def _temps_of(names, image: str) -> list:
    """The temporary images an output named ``image`` is made under."""
    return [n for n in names if n.startswith(f".{image}.") and n.endswith(".part")]


def test_cluster_stalls_mid_convert(cluster, pool, tmp_path):
    """The OSD stops answering while a convert streams into the pool (SIGSTOP, as a
    hung or partitioned OSD): the convert fails once its operations time out, with one
    line, and once the cluster answers again the image it made is gone."""
    pidfile = Path(cluster.conf).parent / "run" / "osd.0.pid"
    if not pidfile.exists():
        pytest.skip("the OSD's PID is unknown (a cluster not started by scripts/ceph.sh)")
    osd = int(pidfile.read_text().strip())
    src = tmp_path / "big.raw"
    with open(src, "wb") as f:
        for _ in range(96):
            f.write(os.urandom(4 * MiB))
    image = pool.fresh("stall")
    from qcow2.backends.rbd import Cluster
    from qcow2.backends.rbdadmin import list_images
    # -p: its first progress line comes once the image is created and open, so the
    # stop lands while it is opened or written (a stop inside the create itself leaves
    # an outcome nobody can know: that error says so, and removes nothing)
    p = subprocess.Popen([*QCOW2_CLI, "convert", "-p", "-O", "raw", str(src),
                          pool.name(image, rados_osd_op_timeout="3")],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    stopped = False
    try:
        seen = b""
        while b"%)" not in seen:            # (EOF: the convert ended; checked below)
            more = p.stdout.read1(64)
            if not more:
                break
            seen += more
        with Cluster(**pool.kwargs()) as c:
            names = list_images(c)
            # the output is made under a temporary name: the final one shows nothing
            # until the image is complete
            assert image not in names
            if not _temps_of(names, image) and p.poll() is None:
                pytest.fail("the convert reported progress without its image")
        os.kill(osd, signal.SIGSTOP)
        stopped = True
        try:
            p.wait(timeout=8)
        except subprocess.TimeoutExpired:
            pass
    finally:
        if stopped:
            os.kill(osd, signal.SIGCONT)
    out, err = p.communicate(timeout=120)
    err = err.decode()
    assert p.returncode == 1, (out, err)
    assert err.count("\n") == 1 and re.search(r"timed out|did not answer", err), err
    with Cluster(**pool.kwargs()) as c:
        for _ in range(300):                # the removal may still be waiting on the OSD
            names = list_images(c)
            if image not in names and not _temps_of(names, image):
                break
            time.sleep(0.2)
        else:
            pytest.fail("the failed convert left its image")


def test_cluster_down_is_a_bounded_wait(tmp_path):
    """Monitors that do not answer: the default connect timeout (5 s, nova's
    rbd_connect_timeout), then one line; a shorter one from the name."""
    if _rbd_module().unavailable_reason() is not None:
        pytest.skip(f"RBD binding unavailable: {_rbd_module().unavailable_reason()}")
    import socket
    s = socket.socket()
    s.bind(("127.0.0.1", 0))                         # a port where nothing listens
    port = s.getsockname()[1]
    name = f"rbd:rbd/x:conf=/dev/null:mon_host=127.0.0.1\\:{port}:key={WRONG_KEY}"
    try:
        # the message names the timeout that fired: the default, then the name's own
        _one_line_error(["info", name], r"did not answer within 5 s \(is the "
                                        r"cluster down\?\)")
        _one_line_error(["info", name + ":client_mount_timeout=1"],
                        r"did not answer within 1 s")
    finally:
        s.close()


# ---------------------------------------------------------------------------------------
# convert into RBD
# ---------------------------------------------------------------------------------------

def _used(cluster, image: str) -> int:
    """Bytes the image's objects hold (``rbd du --exact``)."""
    import json
    out = json.loads(cluster.rbd("du", "--exact", "--format", "json",
                                 f"{cluster.pool}/{image}"))
    return sum(i["used_size"] for i in out["images"])


@pytest.mark.parametrize("fmt", ["qcow2", "raw"])
def test_convert_into_rbd(cluster, pool, tmp_path, fmt):
    """Only data is written (RBD objects as few as qemu-img's, never more), the
    content is the source's; an existing image is refused unless -n."""
    path, data = _sparse_file(tmp_path, 48 * MiB, 21)
    src = path
    if fmt == "qcow2":
        src = tmp_path / "s.qcow2"
        _qemu(cluster, "convert", "-f", "raw", "-O", "qcow2", "-c", "-o",
              "compression_type=zstd", path, src)
    ours, theirs = pool.fresh("ours"), pool.fresh("theirs")
    r = _cli("convert", "-O", "raw", src, pool.name(ours))
    assert (r.returncode, r.stdout, r.stderr) == (0, "", "")
    _qemu(cluster, "convert", "-O", "raw", src, pool.name(theirs))
    assert _raw_of(cluster, pool.name(ours), tmp_path) == data
    assert 0 < _used(cluster, ours) <= _used(cluster, theirs)
    assert cluster.rbd("info", f"{cluster.pool}/{ours}").count("size 48 MiB") == 1
    r = _cli("convert", "-O", "raw", src, pool.name(ours))
    assert r.returncode == 1 and "already exists" in r.stderr and "-n" in r.stderr
    # -n: into the existing image, zeros written where the source has them
    with qcow2.open(pool.name(ours), "r+", format="raw") as img:
        img.pwrite(b"\xee" * MiB, 0)
        img.pwrite(b"\xee" * MiB, 47 * MiB)
    r = _cli("convert", "-n", src, pool.name(ours))
    assert r.returncode == 0, r.stderr
    assert _raw_of(cluster, pool.name(ours), tmp_path) == data


def test_convert_into_rbd_refusals(cluster, pool, tmp_path):
    path, _ = _sparse_file(tmp_path, 4 * MiB, 2)
    r = _cli("convert", "-O", "qcow2", path, pool.name(pool.fresh()))
    assert r.returncode == 1 and "-O raw" in r.stderr
    small = pool.image(bytes(MiB))
    r = _cli("convert", "-n", path, pool.name(small))
    assert r.returncode == 1 and "smaller than the source" in r.stderr
    r = _cli("convert", "-O", "raw", path, f"rbd:nosuchpool/x:conf={cluster.conf}")
    assert r.returncode == 1 and "pool 'nosuchpool' does not exist" in r.stderr


class _Failing(MemoryBackend):
    """A source whose reads fail (or are interrupted) after ``after`` of them."""

    def __init__(self, data: bytes, after: int, exc: BaseException):
        super().__init__(data, writable=False, name="failing.raw")
        self.after, self.exc = after, exc
        self.lock_ = threading.Lock()

    def readinto(self, buf, offset):
        with self.lock_:
            self.after -= 1
            if self.after < 0:
                raise self.exc
        return super().readinto(buf, offset)


@pytest.mark.parametrize("exc", [OSError(5, "Input/output error"), KeyboardInterrupt()])
def test_failed_convert_leaves_no_image(cluster, pool, exc):
    """A convert that fails half-way (a source error, an interrupt) removes the image
    it created: nothing is left in the pool."""
    data = random.Random(4).randbytes(32 * MiB)
    image = pool.fresh("failed")
    src = _Failing(data, 3, exc)
    with pytest.raises(type(exc)):
        qcow2.convert([src], pool.name(image), src_format="raw", workers=4)
    left = cluster.rbd("ls", cluster.pool).split()
    assert image not in left and not _temps_of(left, image)
    # -n: an existing image is the caller's; a failure leaves it
    existing = pool.image(bytes(32 * MiB))
    with pytest.raises(type(exc)):
        qcow2.convert([_Failing(data, 3, exc)], pool.name(existing), src_format="raw",
                      no_create=True)
    assert existing in cluster.rbd("ls", cluster.pool).split()


def test_dirty_qcow2_in_rbd_is_rebuilt(cluster, pool, tmp_path):
    """A dirty qcow2 (lazy refcounts, then a crash) stored in RBD has its refcounts
    rebuilt when opened for writing, as a file's are."""
    from qcow2 import constants as C
    p = tmp_path / "d.qcow2"
    _qemu(cluster, "create", "-q", "-f", "qcow2", "-o", "lazy_refcounts=on", p, 8 * MiB)
    subprocess.run(["qemu-io", "-f", "qcow2", "-c", "write -P 0x33 0 192k", str(p)],
                   check=True, capture_output=True)
    data = bytearray(p.read_bytes())
    data[C.HDR_INCOMPATIBLE_FEATURES + 7] |= C.INCOMPAT_DIRTY
    p.write_bytes(bytes(data))
    name = pool.name(pool.imported(p))
    with qcow2.open(name) as img:
        assert img.info()["dirty-flag"] is True
    with qcow2.open(name, "r+") as img:
        assert img.info()["dirty-flag"] is False
        img.pwrite(b"\x44" * 4096, MiB)
    assert _qemu(cluster, "check", name, check=False).returncode == 0
    with qcow2.open(name) as img:
        assert img.pread(4, 0) == b"\x33" * 4 and img.pread(4, MiB) == b"\x44" * 4


def test_clone_reads_through_its_parent(cluster, pool, tmp_path):
    """A copy-on-write clone reads its parent's data where it has none of its own; map
    agrees with qemu-img (which trusts no object map of a clone before librbd 1.17)."""
    path, data = _sparse_file(tmp_path, 16 * MiB, 8)
    parent = pool.imported(path)
    c = cluster
    c.rbd("snap", "create", f"{c.pool}/{parent}@base")
    c.rbd("snap", "protect", f"{c.pool}/{parent}@base")
    child = pool.fresh("clone")
    c.rbd("clone", f"{c.pool}/{parent}@base", f"{c.pool}/{child}")
    try:
        with qcow2.open(pool.name(child), "r+", format="raw") as img:
            assert img.pread(len(data), 0) == data
            img.pwrite(b"\x5a" * 4096, MiB)
        model = bytearray(data)
        model[MiB:MiB + 4096] = b"\x5a" * 4096
        assert _raw_of(c, pool.name(child), tmp_path, "raw") == bytes(model)
        for out in ("human", "json"):
            _same(_qemu(c, "map", "-f", "raw", f"--output={out}", pool.name(child)),
                  _cli("map", "-f", "raw", f"--output={out}", pool.name(child)))
    finally:
        _purge(c, child)
        c.rbd("snap", "unprotect", f"{c.pool}/{parent}@base")


def test_outputs_appear_complete_or_not_at_all(cluster, pool, tmp_path):
    """A convert or a qcow2 create into RBD writes under a temporary name beside the
    final one and renames it once complete and flushed: while it runs the final name
    shows nothing (a reader or a crash never meets half an image), afterwards it shows
    the whole image and no temporary is left."""
    from qcow2.backends.rbd import Cluster
    from qcow2.backends.rbdadmin import list_images
    data = random.Random(8).randbytes(16 * MiB)
    image = pool.fresh("whole")
    seen = []

    def progress(pct):
        with Cluster(**pool.kwargs()) as c:
            seen.append((pct, list_images(c)))
    src = MemoryBackend(data, writable=False, name="src.raw")
    qcow2.convert([src], pool.name(image), src_format="raw", progress=progress)
    assert seen and all(image not in names for pct, names in seen if pct < 100)
    assert any(_temps_of(names, image) for _pct, names in seen)
    names = cluster.rbd("ls", cluster.pool).split()
    assert image in names and not _temps_of(names, image)
    assert _raw_of(cluster, pool.name(image), tmp_path) == data
    # create -f qcow2: the same; qemu-img reads the result
    qc = pool.fresh("qc")
    r = _cli("create", "-f", "qcow2", pool.name(qc), "64M")
    assert r.returncode == 0, r.stderr
    names = cluster.rbd("ls", cluster.pool).split()
    assert qc in names and not _temps_of(names, qc)
    _qemu(cluster, "check", pool.name(qc))
    # an existing name is refused before anything is written, nothing left behind
    r = _cli("create", "-f", "qcow2", pool.name(qc), "64M")
    assert r.returncode == 1 and "already exists" in r.stderr and r.stderr.count("\n") == 1
    names = cluster.rbd("ls", cluster.pool).split()
    assert not _temps_of(names, qc)


def test_name_taken_while_converting(cluster, pool, tmp_path, monkeypatch):
    """An image of the output's name that appears while the convert runs wins: the
    convert fails with one line, its temporary is removed, the other image is kept."""
    from qcow2.backends.rbd import Cluster
    data = random.Random(9).randbytes(8 * MiB)
    image = pool.fresh("raced")
    made = []

    def progress(pct):
        if not made and pct < 100:
            with Cluster(**pool.kwargs()) as c:
                c.create_image(image, MiB)
            made.append(True)
    with pytest.raises(qcow2.errors.Qcow2Error, match="already exists"):
        src = MemoryBackend(data, writable=False, name="src.raw")
        qcow2.convert([src], pool.name(image), src_format="raw", progress=progress)
    names = cluster.rbd("ls", cluster.pool).split()
    assert image in names and not _temps_of(names, image)
    assert "size 1 MiB" in cluster.rbd("info", f"{cluster.pool}/{image}")
