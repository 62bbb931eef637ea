"""I/O errors: every write-side system call of an operation fails in turn.

An LD_PRELOAD shim (tests/faults/faultshim.c, built here with gcc) fails the N-th
pwrite/pwritev/write/fsync/fdatasync/ftruncate/fallocate/copy_file_range on the
files under the test's folder with EIO or ENOSPC, once or from then on.  For each
operation a clean run counts its calls; then faults are injected (a bounded sample
by default, every call x errno x mode with QCOW2_FAULT_SWEEP=full) and each run must:

- end with one line on stderr and a non-zero exit (the fault always surfaces: no
  success after a failed write or sync), or succeed when the fault never came;
- leave nothing new in the folder (no destination, no temporary file);
- leave every image it changed in place consistent by ``qemu-img check`` (leaks at
  worst), reading as before or as after the operation (commit's base: each byte).
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest

from faults.injector import Injector, build_shim, plan
from faults.scenarios import (QCOW2, SCENARIOS, check_image, check_views, image, info, raw,
                              views)

pytestmark = pytest.mark.skipif(shutil.which("qemu-img") is None or
                                shutil.which("qemu-io") is None,
                                reason="qemu-img/qemu-io not installed")


@pytest.fixture(scope="module")
def shim(tmp_path_factory):
    out = build_shim(tmp_path_factory.mktemp("shim"))
    if out is None:
        pytest.skip("no C compiler to build the fault injector")
    return out


def check_run(sc, w, out, before, after, files_before, what) -> None:
    if out.fired:
        assert out.returncode != 0, f"{what}: exit 0 after the fault {out.fired}"
        lines = out.stderr.strip().splitlines()
        if sc.report:
            lines = lines[-1:]
        assert len(lines) == 1 and "Traceback" not in out.stderr, \
            f"{what}: stderr is not one line: {out.stderr!r}"
        files = sorted(os.listdir(w))
        assert files == files_before, f"{what}: left behind {set(files) ^ set(files_before)}"
    else:
        assert out.returncode == 0, f"{what}: {out.stderr}"
    for name in sc.inplace:
        check_image(w, name, what)
    check_views(sc, w, before, after, what, finished=not out.fired)


@pytest.mark.parametrize("sc", SCENARIOS, ids=lambda s: s.name)
def test_fault_sweep(sc, shim, tmp_path):
    pristine = tmp_path / "pristine"
    pristine.mkdir()
    sc.setup(pristine)
    files_before = sorted(os.listdir(pristine))
    before = views(sc, pristine)
    w = tmp_path / "w"
    inj = Injector(shim, w, tmp_path / "calls.log")

    # a clean run: how many calls, and what "after" looks like
    shutil.copytree(pristine, w)
    clean = inj.run(QCOW2 + sc.argv, cwd=w)
    assert clean.returncode == 0, clean.stderr
    assert clean.count > 0
    after = views(sc, w)
    for name in sc.new:
        assert (w / name).exists()
    shutil.rmtree(w)

    faults = plan(clean.count, sc.name)
    print(f"{sc.name}: {clean.count} write-side calls, {len(faults)} faults injected")
    for n, err, sticky in faults:
        what = f"{sc.name}: call {n}/{clean.count} fails with {err}" \
               f"{' from then on' if sticky else ' once'}"
        shutil.copytree(pristine, w)
        out = inj.run(QCOW2 + sc.argv, cwd=w, at=n, err=err, sticky=sticky)
        what += f" ({out.fired[0] if out.fired else 'not reached'})"
        check_run(sc, w, out, before, after, files_before, what)
        shutil.rmtree(w)


# -- library writes with flushes ------------------------------------------------------

WRITER = r"""
import json, sys, qcow2
path, ops = sys.argv[1], json.loads(sys.argv[2])
img = qcow2.open(path, "r+")
try:
    for k, (op, off, n, b) in enumerate(ops):
        if op == "w":
            img.pwrite(bytes([b]) * n, off)
        elif op == "z":
            img.write_zeroes(off, n)
        elif op == "d":
            img.discard(off, n)
        elif op == "c":
            img.write_compressed(bytes([b]) * n, off)
        else:
            img.flush()
            print(k, flush=True)        # every op before k is durable
    img.close()
except OSError as exc:
    img.close()
    sys.exit(f"writer: {exc}")
"""

LIB_SIZE = 4 << 20


def _lib_ops(seed, cs: int) -> list:
    import random
    rng = random.Random(seed)
    ops = []
    for _ in range(24):
        op = rng.choice("wwwzdcf")
        off = rng.randrange(LIB_SIZE)
        n = min(rng.randrange(1, 200000), LIB_SIZE - off)
        if op == "c":
            off = off // cs * cs
            n = min(cs, LIB_SIZE - off)
        ops.append((op, off, n, rng.randrange(1, 256)))
    return ops + [("f", 0, 0, 0)]


def _lib_model(ops, upto: int, cs: int, base: bytearray) -> bytearray:
    m = bytearray(base)
    for op, off, n, b in ops[:upto]:
        if op == "d":           # whole clusters only; no backing file: they read zeros
            a, e = (off + cs - 1) // cs * cs, (off + n) // cs * cs
            if off + n == LIB_SIZE:
                e = LIB_SIZE
            if a < e:
                m[a:e] = bytes(e - a)
        elif op != "f":
            m[off:off + n] = bytes(n) if op == "z" else bytes([b]) * n
    return m


@pytest.mark.parametrize("opts", ["cluster_size=65536", "cluster_size=4096,refcount_bits=1",
                                  "cluster_size=65536,extended_l2=on",
                                  "compat=0.10,cluster_size=1024",
                                  "cluster_size=65536,lazy_refcounts=on"])
def test_fault_sweep_library_writes(opts, shim, tmp_path):
    import numpy as np
    pristine = tmp_path / "pristine"
    pristine.mkdir()
    image(pristine, "img.qcow2", "4M", opts, "write -P 17 0 4M")
    cs = info(pristine, "img.qcow2")["cluster-size"]
    base = bytearray(raw(pristine, "img.qcow2"))
    ops = _lib_ops(opts, cs)
    argv = QCOW2[:1] + ["-c", WRITER, "img.qcow2", json.dumps(ops)]
    w = tmp_path / "w"
    inj = Injector(shim, w, tmp_path / "calls.log")
    shutil.copytree(pristine, w)
    clean = inj.run(argv, cwd=w)
    assert clean.returncode == 0, clean.stderr
    assert raw(w, "img.qcow2") == bytes(_lib_model(ops, len(ops), cs, base))
    shutil.rmtree(w)
    faults = plan(clean.count, opts, samples=10)
    print(f"writes {opts}: {clean.count} write-side calls, {len(faults)} faults injected")
    for n, err, sticky in faults:
        what = f"writes {opts}: call {n}/{clean.count} fails with {err}" \
               f"{' from then on' if sticky else ' once'}"
        shutil.copytree(pristine, w)
        out = inj.run(argv, cwd=w, at=n, err=err, sticky=sticky)
        what += f" ({out.fired[0] if out.fired else 'not reached'})"
        if out.fired:
            assert out.returncode != 0, what
        check_image(w, "img.qcow2", what)
        durable = int(out.stdout.split()[-1]) if out.stdout.split() else 0
        model = np.frombuffer(bytes(_lib_model(ops, durable, cs, base)), np.uint8)
        got = np.frombuffer(raw(w, "img.qcow2"), np.uint8)
        # bytes of the ops after the last completed flush: the flushed value or any
        # value written since
        allowed = [model]
        for k in range(durable + 1, len(ops) + 1):
            allowed.append(np.frombuffer(bytes(_lib_model(ops, k, cs, base)), np.uint8))
        ok = np.zeros(len(got), bool)
        for a in allowed:
            ok |= got == a
        bad = np.flatnonzero(~ok)
        assert bad.size == 0, f"{what}: byte {int(bad[0])} lost (got {got[bad[0]]}, " \
                              f"flushed {model[bad[0]]})"
        shutil.rmtree(w)


# -- compute spawn from a local source -------------------------------------------------

def _tree(root: Path) -> dict:
    """Every file under ``root``: relative name -> bytes."""
    return {str(p.relative_to(root)): p.read_bytes()
            for p in sorted(root.rglob("*")) if p.is_file()}


def test_fault_sweep_compute_spawn(shim, tmp_path):
    src = tmp_path / "src.qcow2"
    image(tmp_path, "src.qcow2", "8M", "", "write -P 7 0 1M", "write -P 9 5M 64k")
    conf = tmp_path / "nova.conf"
    w = tmp_path / "w"
    conf.write_text(f"[DEFAULT]\ninstances_path = {w}/instances\n")
    uuid = "11111111-2222-3333-4444-555555555555"
    argv = QCOW2 + ["compute", "spawn", "--config", conf, "--instance", uuid, "--image",
                    "img1", "--source", src, "--root-size", "16M", "-q"]
    inj = Injector(shim, w, tmp_path / "calls.log")
    clean = inj.run(argv, cwd=tmp_path)
    assert clean.returncode == 0, clean.stderr
    done = _tree(w)
    bases = {k for k in done if k.startswith("instances/_base/")}
    assert bases and f"instances/{uuid}/disk" in done
    shutil.rmtree(w)
    faults = plan(clean.count, "spawn")
    print(f"compute spawn: {clean.count} write-side calls, {len(faults)} faults injected")
    for n, err, sticky in faults:
        what = f"spawn: call {n}/{clean.count} fails with {err}" \
               f"{' from then on' if sticky else ' once'}"
        out = inj.run(argv, cwd=tmp_path, at=n, err=err, sticky=sticky)
        what += f" ({out.fired[0] if out.fired else 'not reached'})"
        left = _tree(w) if w.exists() else {}
        if out.fired:
            assert out.returncode != 0, what
            assert len(out.stderr.strip().splitlines()) == 1, f"{what}: {out.stderr!r}"
            # a base is cached complete or not at all; nothing else but lock files
            for name, data in left.items():
                if name in bases:
                    assert data == done[name], f"{what}: {name} is incomplete"
                else:
                    assert name.startswith("instances/locks/"), f"{what}: left {name}"
        else:
            assert out.returncode == 0 and left == done, what
        shutil.rmtree(w, ignore_errors=True)


# -- the library: the first failed write poisons a writable image ----------------------

def test_failed_flush_poisons_the_image(tmp_path):
    import errno

    import qcow2
    from qcow2.backends import MemoryBackend

    image(tmp_path, "img.qcow2", "4M", "", "write -P 1 0 1M")

    class Failing(MemoryBackend):
        fail = False

        def flush(self):
            if self.fail:
                self.fail = False                    # once: a retry would "succeed"
                raise OSError(errno.EIO, "injected")

    store = Failing(bytearray((tmp_path / "img.qcow2").read_bytes()))
    img = qcow2.open(store, "r+")
    img.pwrite(b"x" * 70000, 3 << 20)
    store.fail = True
    with pytest.raises(OSError):
        img.flush()
    snapshot = bytes(store.pread(store.size(), 0))
    with pytest.raises(OSError, match="earlier write"):
        img.flush()                                  # never a success after a failure
    with pytest.raises(OSError, match="earlier write"):
        img.pwrite(b"y", 0)
    img.close()                                      # writes nothing more
    assert bytes(store.pread(store.size(), 0)) == snapshot
