"""The write path against a model: random pwrite / write_zeroes / discard / compressed
writes / flush / close-reopen on images of many shapes (with and without a backing
chain), then `qemu-img check` must find no errors and no leaks and `qemu-img compare`
must find the image equal to the model."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import tempfile

import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, rule

import qcow2

pytestmark = pytest.mark.skipif(shutil.which("qemu-img") is None, reason="qemu-img not installed")


def run(*args):
    return subprocess.run(args, capture_output=True, text=True)


CONFIGS = [
    # (id, create options, backing kind)
    ("v3-64k", "cluster_size=65536", None),
    ("v3-512-rb1", "cluster_size=512,refcount_bits=1", None),
    ("v3-4k-rb64-zstd", "cluster_size=4096,refcount_bits=64,compression_type=zstd", "qcow2"),
    ("v2-4k", "compat=0.10,cluster_size=4096", "raw"),
    ("v2-512", "compat=0.10,cluster_size=512", None),
    # a refcount block covers 64 clusters: single writes need runs longer than that
    ("v3-512-rb64", "cluster_size=512,refcount_bits=64", "raw"),
    ("v3-xl2-64k", "cluster_size=65536,extended_l2=on", "raw"),
    ("v3-xl2-32k-nob", "cluster_size=32768,extended_l2=on", None),
    ("v3-1k-lazy-backing", "cluster_size=1024,lazy_refcounts=on,refcount_bits=4", "qcow2"),
    ("v3-4k-snapshot", "cluster_size=4096", "snapshot"),
    ("v3-xl2-64k-snapshot", "cluster_size=65536,extended_l2=on", "snapshot"),
    ("v2-64k-snapshot", "compat=0.10", "snapshot"),
]


def make_machine(cfg_id, opts, backing_kind, size):
    class WriteMachine(RuleBasedStateMachine):
        @initialize()
        def setup(self):
            self.dir = tempfile.mkdtemp(prefix="qcow2-sm-")
            self.path = os.path.join(self.dir, "img.qcow2")
            self.model = bytearray(size)
            self.backing = None
            self.snap = None
            args = ["qemu-img", "create", "-q", "-f", "qcow2", "-o", opts]
            if backing_kind and backing_kind != "snapshot":
                bsize = size - 3 * 4096            # shorter than the overlay: tail reads zeros
                bpath = os.path.join(self.dir, "base." + backing_kind)
                run("qemu-img", "create", "-q", "-f", backing_kind, bpath, str(bsize))
                r = run("qemu-io", "-f", backing_kind, "-c", f"write -P 0x6b 0 {bsize}",
                        "-c", "write -z 8192 65536", bpath)
                assert r.returncode == 0, r.stderr
                base = bytearray(b"\x6b" * bsize)
                base[8192:8192 + 65536] = bytes(65536)
                self.backing = bytes(base) + bytes(size - bsize)
                self.model[:] = self.backing
                args += ["-b", os.path.basename(bpath), "-F", backing_kind]
            r = run(*args, self.path, str(size))
            assert r.returncode == 0, r.stderr
            if backing_kind == "snapshot":
                # data, some of it compressed, then an internal snapshot sharing it all
                # (qemu-io compresses only into unallocated clusters: that write first)
                r = run("qemu-io", "-c", "write -c -P 0x22 0 65536",
                        "-c", f"write -P 0x21 65536 {size // 2 - 65536}",
                        "-c", f"write -z {size // 4} 8192", self.path)
                assert r.returncode == 0, r.stderr
                self.model[:size // 2] = b"\x21" * (size // 2)
                self.model[0:65536] = b"\x22" * 65536
                self.model[size // 4:size // 4 + 8192] = bytes(8192)
                r = run("qemu-img", "snapshot", "-c", "snap", self.path)
                assert r.returncode == 0, r.stderr
                self.snap = bytes(self.model)
            self.img = qcow2.open(self.path, "r+")
            self.cs = self.img.cluster_size
            self.v3 = self.img.header.version >= 3

        def teardown(self):
            if not hasattr(self, "img"):
                return
            try:
                self.img.close()
                r = run("qemu-img", "check", "--output=json", self.path)
                info = json.loads(r.stdout) if r.stdout else {}
                assert r.returncode == 0, (r.returncode, r.stdout, r.stderr)
                assert info.get("leaks", 0) == 0 and info.get("corruptions", 0) == 0, info
                ref = os.path.join(self.dir, "model.raw")
                with open(ref, "wb") as f:
                    f.write(self.model)
                r = run("qemu-img", "compare", "-f", "qcow2", "-F", "raw", self.path, ref)
                assert r.returncode == 0, r.stdout + r.stderr
                if self.snap is not None:
                    out = os.path.join(self.dir, "snap.raw")
                    r = run("qemu-img", "convert", "-l", "snap", "-O", "raw", self.path, out)
                    assert r.returncode == 0, r.stderr
                    with open(out, "rb") as f:
                        assert f.read() == self.snap, "the snapshot changed"
            finally:
                shutil.rmtree(self.dir, ignore_errors=True)

        offsets = st.integers(0, size - 1)

        @rule(off=offsets, n=st.integers(1, 3 * 65536), byte=st.integers(1, 255))
        def write(self, off, n, byte):
            n = min(n, size - off)
            data = bytes([byte]) * n
            self.img.pwrite(data, off)
            self.model[off:off + n] = data

        @rule(off=offsets, n=st.integers(1, 4 * 65536))
        def write_zeroes(self, off, n):
            n = min(n, size - off)
            self.img.write_zeroes(off, n)
            self.model[off:off + n] = bytes(n)

        @rule(off=offsets, n=st.integers(1, 4 * 65536))
        def discard(self, off, n):
            n = min(n, size - off)
            self.img.discard(off, n)
            cs = self.cs
            a = (off + cs - 1) // cs * cs
            b = (off + n) // cs * cs
            if off + n == size:
                b = size
            if a < b:
                if self.v3 or self.backing is None:
                    self.model[a:b] = bytes(b - a)
                else:
                    self.model[a:b] = self.backing[a:b]

        @rule(cl=st.integers(0, size // 4096), kind=st.sampled_from(["text", "zero", "rand"]))
        def write_compressed(self, cl, kind):
            cs = self.cs
            off = (cl * 4096) // cs * cs
            if off >= size:
                return
            n = min(cs, size - off)
            if kind == "text":
                data = (b"compress me %d " % cl) * (n // 10 + 1)
            elif kind == "zero":
                data = bytes(n)
            else:
                data = os.urandom(n)
            data = data[:n]
            self.img.write_compressed(data, off)
            self.model[off:off + n] = data

        @rule()
        def flush(self):
            self.img.flush()

        @rule()
        def reopen(self):
            self.img.close()
            self.img = qcow2.open(self.path, "r+")

        @rule(off=offsets, n=st.integers(1, 200000))
        def read(self, off, n):
            got = self.img.pread(n, off)
            assert got == bytes(self.model[off:off + n])

    WriteMachine.__name__ = f"WriteMachine_{cfg_id}"
    return WriteMachine


@pytest.mark.parametrize("cfg_id,opts,backing", CONFIGS, ids=[c[0] for c in CONFIGS])
def test_write_state_machine(cfg_id, opts, backing):
    size = 1 << 20 if "512" in cfg_id else 3 * (1 << 20) + 4096
    machine = make_machine(cfg_id, opts, backing, size)
    examples = 40 if os.environ.get("QCOW2_RUN_SLOW") == "1" else 12
    machine.TestCase.settings = settings(max_examples=examples, stateful_step_count=30,
                                         deadline=None,
                                         suppress_health_check=list(HealthCheck))
    machine.TestCase().runTest()


def test_round_trip_qemu_io_reads_ours(tmp_path):
    """An image we wrote reads back identically through qemu-img."""
    p = tmp_path / "a.qcow2"
    run("qemu-img", "create", "-q", "-f", "qcow2", str(p), "4M")
    data = os.urandom(1 << 20)
    with qcow2.open(p, "r+") as img:
        img.pwrite(data, 12345)
        img.write_compressed(b"xyz" * 21845 + b"x", 2 << 20)
    r = run("qemu-io", "-c", "read -v 12345 16", str(p))
    assert r.returncode == 0
    out = tmp_path / "a.raw"
    run("qemu-img", "convert", "-O", "raw", str(p), str(out))
    raw = out.read_bytes()
    assert raw[12345:12345 + len(data)] == data
    assert raw[2 << 20:(2 << 20) + 65536] == b"xyz" * 21845 + b"x"


def test_readonly_refuses_writes(tmp_path):
    p = tmp_path / "a.qcow2"
    run("qemu-img", "create", "-q", "-f", "qcow2", str(p), "1M")
    with qcow2.open(p) as img:
        with pytest.raises(qcow2.ReadOnlyError):
            img.pwrite(b"x", 0)


def test_corrupt_bit_refuses_rw(tmp_path):
    p = tmp_path / "a.qcow2"
    run("qemu-img", "create", "-q", "-f", "qcow2", str(p), "1M")
    data = bytearray(p.read_bytes())
    data[0x48 + 7] |= 2
    p.write_bytes(bytes(data))
    with pytest.raises(qcow2.Qcow2Error, match="corrupt"):
        qcow2.open(p, "r+")
    with qcow2.open(p) as img:        # reading is still allowed in trusted mode
        assert img.pread(4, 0) == bytes(4)


def test_locking_is_compatible_with_qemu(tmp_path):
    p = tmp_path / "a.qcow2"
    run("qemu-img", "create", "-q", "-f", "qcow2", str(p), "1M")
    with qcow2.open(p, "r+"):
        r = run("qemu-io", "-c", "write 0 512", str(p))          # a QEMU writer is refused
        assert r.returncode != 0 and "lock" in r.stderr
        r = run("qemu-img", "info", str(p))                       # so is a sharing reader
        assert r.returncode != 0 and "lock" in r.stderr
        assert run("qemu-img", "info", "-U", str(p)).returncode == 0   # -U reads anyway
        with pytest.raises(qcow2.Qcow2Error, match="lock"):
            qcow2.open(p, "r+")                                   # and so are we, twice
    # while QEMU writes, we may neither write nor read without force_share
    holder = subprocess.Popen(["qemu-io", "-c", "write 0 512", "-c", "sleep 3000", str(p)],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        import time
        time.sleep(1.0)
        with pytest.raises(qcow2.Qcow2Error, match="lock"):
            qcow2.open(p, "r+")
        with pytest.raises(qcow2.Qcow2Error, match="lock"):
            qcow2.open(p)
        with qcow2.open(p, force_share=True) as img:
            img.pread(512, 0)
    finally:
        holder.wait()
    with qcow2.open(p, "r+") as img:                              # free again
        img.pwrite(b"x", 0)


def test_threads_share_one_image(tmp_path):
    """Several threads writing disjoint ranges and reading through one image object."""
    import threading

    p = tmp_path / "t.qcow2"
    run("qemu-img", "create", "-q", "-f", "qcow2", "-o", "cluster_size=4096", str(p), "16M")
    errors = []
    with qcow2.open(p, "r+") as img:
        def worker(k):
            try:
                for i in range(40):
                    off = (k * 40 + i) * 100_000
                    data = bytes([k + 1]) * 70_000
                    img.pwrite(data, off)
                    assert img.pread(70_000, off) == data
                    if i % 10 == 0:
                        img.flush()
            except Exception as exc:  # noqa: BLE001
                errors.append(exc)
        threads = [threading.Thread(target=worker, args=(k,)) for k in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    assert not errors, errors
    r = run("qemu-img", "check", str(p))
    assert r.returncode == 0, r.stdout
    with qcow2.open(p) as img:
        for k in range(4):
            for i in range(40):
                off = (k * 40 + i) * 100_000
                assert img.pread(70_000, off) == bytes([k + 1]) * 70_000


def test_overlap_marks_image_corrupt(tmp_path):
    """A refcount block that says the L1 table's cluster is free must not make us write
    guest data over the L1 table: the image is marked corrupt and writes refused."""
    import struct

    p = tmp_path / "o.qcow2"
    run("qemu-img", "create", "-q", "-f", "qcow2", str(p), "4M")
    data = bytearray(p.read_bytes())
    l1_off = struct.unpack_from(">Q", data, 0x28)[0]
    rt_off = struct.unpack_from(">Q", data, 0x30)[0]
    rb_off = struct.unpack_from(">Q", data, rt_off)[0]
    # zero the refcounts of every cluster from the L1 table on (16-bit entries)
    cl = l1_off // 65536
    data[rb_off + cl * 2:rb_off + cl * 2 + 2] = b"\0\0"
    p.write_bytes(bytes(data))
    with pytest.raises(qcow2.CorruptImageError, match="overlap"):
        with qcow2.open(p, "r+") as img:
            img.pwrite(b"x" * 65536, 0)
    info = json.loads(run("qemu-img", "info", "--output=json", str(p)).stdout)
    assert info["format-specific"]["data"]["corrupt"] is True
    assert struct.unpack_from(">Q", p.read_bytes(), l1_off)[0] == 0   # L1 untouched
    with pytest.raises(qcow2.Qcow2Error, match="corrupt"):
        qcow2.open(p, "r+")


def test_dirty_image_is_repaired_before_writing(tmp_path):
    """lazy_refcounts and a crash (qemu-io killed): opening read-write rebuilds the
    refcounts first, then writes are safe and qemu-img check is clean."""
    import signal

    p = tmp_path / "d.qcow2"
    run("qemu-img", "create", "-q", "-f", "qcow2", "-o", "lazy_refcounts=on", str(p), "8M")
    r = run("qemu-io", "-c", "write -P 0x17 0 3M", "-c", "write -P 0x18 5M 1M",
            "-c", "sigraise 9", str(p))
    assert r.returncode == -signal.SIGKILL
    with qcow2.open(p, "r+") as img:
        assert img.pread(4, 0) == b"\x17" * 4
        img.pwrite(b"\x19" * 100000, 6 << 20)
    r = run("qemu-img", "check", str(p))
    assert r.returncode == 0, r.stdout
    info = json.loads(run("qemu-img", "info", "--output=json", str(p)).stdout)
    assert info["dirty-flag"] is False
    with qcow2.open(p) as img:
        assert img.pread(4, 5 << 20) == b"\x18" * 4
        assert img.pread(4, 6 << 20) == b"\x19" * 4


@pytest.mark.parametrize("opts", ["cluster_size=65536", "cluster_size=16384,extended_l2=on",
                                  "compat=0.10,cluster_size=512"])
def test_pwrite_with_source_file(tmp_path, opts):
    """pwrite(..., source=(fd, offset)): whole clusters may come from the file by
    copy_file_range; unaligned edges, in-place rewrites and a source the kernel
    refuses (a pipe) all give the same image as plain writes."""
    img_path = tmp_path / "a.qcow2"
    assert run("qemu-img", "create", "-q", "-f", "qcow2", "-o", opts, str(img_path),
               "8M").returncode == 0
    data = os.urandom(8 << 20)
    src = tmp_path / "src.bin"
    src.write_bytes(b"\x99" * 4096 + data)
    model = bytearray(8 << 20)
    with open(src, "rb") as sf, qcow2.open(img_path, "r+") as img:
        fd = sf.fileno()
        for off, n in ((0, 3 << 20), (5000, 70000), (3 << 20, 1 << 20), (0, 1 << 20),
                       ((8 << 20) - 12345, 12345)):
            img.pwrite(data[off:off + n], off, source=(fd, 4096 + off))
            model[off:off + n] = data[off:off + n]
        r, w = os.pipe()
        try:
            img.pwrite(b"\x42" * 200000, 6 << 20, source=(r, 0))
            model[6 << 20:(6 << 20) + 200000] = b"\x42" * 200000
        finally:
            os.close(r)
            os.close(w)
        assert img.pread(8 << 20, 0) == bytes(model)
    model_path = tmp_path / "model.raw"
    model_path.write_bytes(bytes(model))
    chk = run("qemu-img", "check", "--output=json", str(img_path))
    assert chk.returncode == 0, chk.stdout + chk.stderr
    assert run("qemu-img", "compare", "-f", "raw", "-F", "qcow2", str(model_path),
               str(img_path)).returncode == 0
