"""Compressed clusters packed a run at a time (``CompressedWrites._pack_run``) land
exactly where the one-by-one path (``_alloc_bytes``, QEMU's qcow2_alloc_bytes) puts
them: the same file byte for byte -- data, L2 entries, refcounts -- for random runs
of compressible and incompressible clusters, over L2 table boundaries, narrow
refcounts, clusters that end exactly on a boundary, overwrites and freed holes; and
the result passes ``qemu-img check`` and reads back what was written."""

from __future__ import annotations

import random
import subprocess

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from qcow2 import compressed_writes


def _make(path, cluster_bits: int, refcount_bits: int) -> None:
    import qcow2
    qcow2.create(str(path), 8 << 20, cluster_size=1 << cluster_bits,
                 refcount_bits=refcount_bits)


def _clusters(rng: random.Random, n: int, cs: int, kinds: list) -> bytes:
    """``n`` clusters: 0 zeros-ish (compress well), 1 text-like, 2 random (do not)."""
    out = bytearray()
    for k in range(n):
        kind = kinds[k % len(kinds)]
        if kind == 0:
            out += bytes([rng.randrange(256)]) * cs
        elif kind == 1:
            words = [b"qcow2", b"cluster", b"refcount", b"L2", b"zstd", b"\n"]
            chunk = bytearray()
            while len(chunk) < cs:
                chunk += rng.choice(words) + bytes([rng.randrange(32, 127)]) * rng.randrange(1, 400)
            out += chunk[:cs]
        else:
            out += rng.randbytes(cs)
    return bytes(out)


def _write(path, steps, *, batched: bool, monkeypatch) -> bytes:
    import qcow2
    if not batched:
        monkeypatch.setattr(compressed_writes.CompressedWrites, "_pack_run",
                            lambda self, comps, k, a: (0, k))
    with qcow2.open(str(path), "r+") as img:
        cs = img.cluster_size
        comp = img.kernels.Compressor(img.header.compression_type, cs)
        for op, offset, data in steps:
            if op == "c":
                comps = comp.compress_many(data, len(data) // cs)
                img.write_compressed_many(offset, comps, data)
            elif op == "d":
                img.discard(offset, len(data))
            else:
                img.pwrite(data, offset)
        img.flush()
    monkeypatch.undo()
    return path.read_bytes()


def _steps(seed: int, cs: int, size: int):
    rng = random.Random(seed)
    steps = []
    for _ in range(rng.randrange(2, 7)):
        op = rng.choice("ccccdw")
        n = rng.randrange(1, 90)
        first = rng.randrange(0, size // cs - n)
        kinds = [rng.choice([0, 1, 1, 1, 2]) for _ in range(rng.randrange(1, 6))]
        steps.append((op, first * cs, _clusters(rng, n, cs, kinds)))
    return steps


@settings(max_examples=25, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(seed=st.integers(0, 2**32), cluster_bits=st.sampled_from([9, 12, 16]),
       refcount_bits=st.sampled_from([1, 2, 16]))
def test_packed_runs_are_where_one_by_one_puts_them(tmp_path_factory, monkeypatch, seed,
                                                    cluster_bits, refcount_bits):
    d = tmp_path_factory.mktemp("pack")
    steps = _steps(seed, 1 << cluster_bits, 8 << 20)
    files = []
    for batched in (True, False):
        p = d / f"{batched}.qcow2"
        _make(p, cluster_bits, refcount_bits)
        files.append(_write(p, steps, batched=batched, monkeypatch=monkeypatch))
    assert files[0] == files[1]
    r = subprocess.run(["qemu-img", "check", str(d / "True.qcow2")], capture_output=True,
                       text=True)
    assert r.returncode == 0, r.stdout + r.stderr


def test_packed_run_reads_back(tmp_path, monkeypatch):
    """A long run over several L2 tables (512-byte clusters: 64 entries a table) reads
    back as written, qemu-img sees the same, and the batched path did the packing."""
    import qcow2
    p = tmp_path / "p.qcow2"
    _make(p, 9, 16)
    rng = random.Random(5)
    data = _clusters(rng, 400, 512, [1, 1, 0, 2, 1])
    calls = []
    real = compressed_writes.CompressedWrites._pack_run

    def spy(self, comps, k, a):
        got = real(self, comps, k, a)
        calls.append(got[1] - k if got[0] else 0)      # (clusters packed)
        return got
    monkeypatch.setattr(compressed_writes.CompressedWrites, "_pack_run", spy)
    with qcow2.open(str(p), "r+") as img:
        comp = img.kernels.Compressor(img.header.compression_type, 512)
        img.write_compressed_many(1 << 20, comp.compress_many(data, 400), data)
    assert sum(calls) > 250                     # most clusters went through in runs
    with qcow2.open(str(p)) as img:
        assert img.pread(len(data), 1 << 20) == data
    raw = tmp_path / "p.raw"
    subprocess.run(["qemu-img", "convert", "-O", "raw", str(p), str(raw)], check=True)
    assert raw.read_bytes()[1 << 20:(1 << 20) + len(data)] == data
    r = subprocess.run(["qemu-img", "check", str(p)], capture_output=True, text=True)
    assert r.returncode == 0, r.stdout


@pytest.mark.parametrize("first_size", [100, 511])
def test_run_ending_on_a_cluster_boundary(tmp_path, monkeypatch, first_size):
    """Compressed sizes chosen so that a cluster ends exactly at a host cluster's end:
    the next one starts wherever a fresh allocation goes, as one by one."""
    import qcow2
    outs = []
    for batched in (True, False):
        p = tmp_path / f"{batched}.qcow2"
        _make(p, 9, 16)
        if not batched:
            monkeypatch.setattr(compressed_writes.CompressedWrites, "_pack_run",
                                lambda self, comps, k, a: (0, k))
        with qcow2.open(str(p), "r+") as img:
            sizes = [first_size, 512 - first_size, 200, 312, 100, 300, 50]
            comps = [bytes([i + 1]) * s for i, s in enumerate(sizes)]
            raw = bytes(512 * len(sizes))
            img.write_compressed_many(0, [comps[0]], raw[:512])
            img.write_compressed_many(512, comps[1:], raw[512:])
        monkeypatch.undo()
        outs.append(p.read_bytes())
    assert outs[0] == outs[1]
