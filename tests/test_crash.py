"""Crash consistency: a child writes and flushes and is killed with SIGKILL at random
points, many times.  Each time the image must open, `qemu-img check` must find no
corruption (leaks are allowed), and every byte flushed before the kill must read back.

The child logs each operation durably *before* doing it and each completed flush
*after* it returns, so the parent knows which bytes are certain (flushed) and which
were in flight (may hold the old or the new value)."""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time

import pytest

import qcow2

pytestmark = pytest.mark.skipif(shutil.which("qemu-img") is None, reason="qemu-img not installed")

SIZE = 4 << 20

CHILD = r"""
import os, random, sys, qcow2
path, log, seed = sys.argv[1], sys.argv[2], int(sys.argv[3])
rng = random.Random(seed)
fd = os.open(log, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
def note(line):
    os.write(fd, (line + "\n").encode()); os.fsync(fd)
img = qcow2.open(path, "r+")
size = img.size
i = 0
while True:
    i += 1
    op = rng.choice(["w", "w", "w", "z", "d", "c", "f"])
    off = rng.randrange(0, size)
    n = min(rng.randrange(1, 300000), size - off)
    b = rng.randrange(1, 256)
    if op == "c":
        cs = img.cluster_size
        off = off // cs * cs
        n = min(cs, size - off)
    note(f"{op} {off} {n} {b}")
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
        note("flushed")
"""


def replay(log_lines, size, cs, backing):
    """Model after the last completed flush, plus the set of uncertain bytes."""
    model = bytearray(backing)
    ops = [ln.split() for ln in log_lines if ln.strip()]
    last_flush = max([i for i, o in enumerate(ops) if o[0] == "flushed"], default=-1)
    uncertain = bytearray(size)            # 1 where the value may be old or new
    pending = []
    for i, o in enumerate(ops):
        if o[0] in ("flushed", "f"):
            continue
        op, off, n, b = o[0], int(o[1]), int(o[2]), int(o[3])
        if op == "d":
            a = (off + cs - 1) // cs * cs
            e = (off + n) // cs * cs
            if off + n == size:
                e = size
            if a >= e:
                continue
            off, n = a, e - a
            val = 0                    # no backing file: discarded clusters read zeros
        elif op == "z":
            val = 0
        else:
            val = b
        if i < last_flush:
            model[off:off + n] = bytes([val]) * n
        else:
            uncertain[off:off + n] = b"\x01" * n
            pending.append((off, n, val))
    return model, uncertain, pending


@pytest.mark.parametrize("opts", ["cluster_size=65536", "cluster_size=4096,refcount_bits=1",
                                  "cluster_size=65536,extended_l2=on",
                                  "compat=0.10,cluster_size=1024"])
def test_sigkill_at_random_points(tmp_path, opts):
    rng = random.Random(opts)
    path = tmp_path / "img.qcow2"
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", "-o", opts, str(path), str(SIZE)],
                   check=True)
    with qcow2.open(path) as img:
        cs = img.cluster_size
    backing = bytes(SIZE)
    log = tmp_path / "ops.log"
    env = dict(os.environ)
    rounds = 10
    for r in range(rounds):
        log.unlink(missing_ok=True)
        p = subprocess.Popen([sys.executable, "-c", CHILD, str(path), str(log),
                              str(rng.randrange(1 << 30))], env=env, stderr=subprocess.PIPE)
        time.sleep(rng.uniform(0.2, 1.2))
        p.send_signal(signal.SIGKILL)
        _out, err = p.communicate()
        assert p.returncode == -signal.SIGKILL, err.decode()
        chk = subprocess.run(["qemu-img", "check", "--output=json", str(path)],
                             capture_output=True, text=True)
        info = json.loads(chk.stdout)
        assert chk.returncode in (0, 3), (chk.returncode, chk.stdout, chk.stderr)
        assert info.get("corruptions", 0) == 0, info
        lines = log.read_text().splitlines() if log.exists() else []
        model, uncertain, pending = replay(lines, SIZE, cs, backing)
        with qcow2.open(path) as img:
            got = img.pread(SIZE, 0)
        # certain bytes: exactly the flushed model
        import numpy as np
        g = np.frombuffer(got, np.uint8)
        m = np.frombuffer(bytes(model), np.uint8)
        u = np.frombuffer(bytes(uncertain), np.uint8).astype(bool)
        bad = np.flatnonzero((g != m) & ~u)
        assert bad.size == 0, f"round {r}: flushed byte at {int(bad[0])} lost " \
                              f"(got {g[bad[0]]}, flushed {m[bad[0]]})"
        # uncertain bytes: the old value or one of the values written in flight
        for off, n, _val in pending:
            seg = g[off:off + n]
            allowed = {int(x) for x in np.unique(m[off:off + n])}
            allowed.update(v for _o, _n, v in pending)
            allowed.add(0)
            assert set(int(x) for x in np.unique(seg)) <= allowed
        # the next round starts from the crashed image: repair leaks as a user would
        if chk.returncode == 3:
            subprocess.run(["qemu-img", "check", "-q", "-r", "leaks", str(path)], check=True)
        backing = got


# -- crash states: every write and flush recorded, every power cut replayed -------------

def _sweep_full() -> bool:
    return os.environ.get("QCOW2_FAULT_SWEEP", "") == "full"


def _bounds():
    """(flush cuts, random power cuts per cut) per operation."""
    return (10**6, 8) if _sweep_full() else (12, 2)


STATES_EXPLORED: dict[str, int] = {}


def _write_state(pristine, w, state) -> None:
    if w.exists():
        shutil.rmtree(w)
    shutil.copytree(pristine, w)
    for name, data in state.files.items():
        (w / name).write_bytes(bytes(data))


def _inplace_scenarios():
    from faults.scenarios import SCENARIOS
    return [sc for sc in SCENARIOS if sc.inplace]


@pytest.mark.parametrize("sc", _inplace_scenarios(), ids=lambda s: s.name)
def test_crash_states(sc, tmp_path, monkeypatch):
    from faults.recording import Log, crash_states, recording_files, replay
    from faults.scenarios import check_image, check_views, views
    from qcow2.cli import main

    pristine = tmp_path / "pristine"
    pristine.mkdir()
    sc.setup(pristine)
    before = views(sc, pristine)
    initial = {p.name: p.read_bytes() for p in pristine.iterdir()}
    w = tmp_path / "w"
    shutil.copytree(pristine, w)
    root = os.path.realpath(w)

    def key(path):
        real = os.path.realpath(path)
        return os.path.relpath(real, root) if real.startswith(root + os.sep) else None

    log = Log()
    monkeypatch.chdir(w)
    with recording_files(log, key):
        assert main(list(sc.argv)) == 0
    monkeypatch.chdir(tmp_path)
    after = views(sc, w)
    # the log holds every change: replayed, it gives the files the operation left
    for name, data in replay(initial, log.events).items():
        assert bytes(data) == (w / name).read_bytes(), f"{name}: a write was not recorded"
    cuts, subsets = _bounds()
    states = crash_states(initial, log, sc.name, max_cuts=cuts, subsets=subsets)
    for st in states:
        what = f"{sc.name}: crash {st.label}"
        _write_state(pristine, w, st)
        for name in sc.inplace:
            check_image(w, name, what)
        check_views(sc, w, before, after, what)
    STATES_EXPLORED[sc.name] = len(states)
    print(f"{sc.name}: {len(states)} crash states from {len(log.events)} events")


@pytest.mark.parametrize("opts", ["cluster_size=65536", "cluster_size=4096,refcount_bits=1",
                                  "cluster_size=65536,extended_l2=on",
                                  "compat=0.10,cluster_size=1024",
                                  "cluster_size=65536,lazy_refcounts=on"])
def test_crash_states_library_writes(opts, tmp_path):
    import numpy as np
    from faults.recording import (Log, RecordingBackend, crash_states, marker_before,
                                  Event)
    from faults.scenarios import check_image, image, info, raw
    from qcow2.backends import FileBackend

    size = 4 << 20
    pristine = tmp_path / "pristine"
    pristine.mkdir()
    image(pristine, "img.qcow2", "4M", opts, "write -P 17 0 4M")
    cs = info(pristine, "img.qcow2")["cluster-size"]
    base = raw(pristine, "img.qcow2")
    initial = {"img.qcow2": (pristine / "img.qcow2").read_bytes()}
    w = tmp_path / "w"
    shutil.copytree(pristine, w)
    rng = random.Random(opts)
    log = Log()
    ops = []
    checkpoints = {0: bytes(base)}      # op count -> guest content, at each library flush
    model = bytearray(base)
    store = RecordingBackend(FileBackend(w / "img.qcow2", writable=True), log, "img.qcow2")
    with qcow2.open(store, "r+") as img:
        for _ in range(40):
            op = rng.choice("wwwzdcf")
            off = rng.randrange(size)
            n = min(rng.randrange(1, 200000), size - off)
            if op == "c":
                off = off // cs * cs
                n = min(cs, size - off)
            o = (op, off, n, rng.randrange(1, 256))
            if op == "f":
                img.flush()
                checkpoints[len(ops)] = bytes(model)
                log.add(Event("img.qcow2", "m", len(ops)))
                continue
            _lib_op(img, o)
            _lib_apply(model, o, cs, size)
            ops.append(o)
    cuts, subsets = _bounds()
    states = crash_states(initial, log, opts, max_cuts=cuts * 3, subsets=subsets)
    for st in states:
        what = f"writes {opts}: crash {st.label}"
        _write_state(pristine, w, st)
        check_image(w, "img.qcow2", what)
        m = marker_before(log, st.cut)
        durable = m.offset if m is not None else 0
        got = np.frombuffer(raw(w, "img.qcow2"), np.uint8)
        cur = bytearray(checkpoints[durable])
        flushed = np.frombuffer(bytes(cur), np.uint8)
        ok = got == flushed
        # bytes of later ops: the flushed value or any value written since
        for o in ops[durable:]:
            _lib_apply(cur, o, cs, size)
            ok |= got == np.frombuffer(bytes(cur), np.uint8)
        bad = np.flatnonzero(~ok)
        assert bad.size == 0, f"{what}: byte {int(bad[0])} lost (got {got[bad[0]]}, " \
                              f"flushed {flushed[bad[0]]})"
    print(f"writes {opts}: {len(states)} crash states from {len(log.events)} events")


def _lib_op(img, o) -> None:
    op, off, n, b = o
    if op == "w":
        img.pwrite(bytes([b]) * n, off)
    elif op == "z":
        img.write_zeroes(off, n)
    elif op == "d":
        img.discard(off, n)
    else:
        img.write_compressed(bytes([b]) * n, off)


def _lib_apply(model: bytearray, o, cs: int, size: int) -> None:
    op, off, n, b = o
    if op == "d":               # whole clusters only; no backing file: they read zeros
        a, e = (off + cs - 1) // cs * cs, (off + n) // cs * cs
        if off + n == size:
            e = size
        if a < e:
            model[a:e] = bytes(e - a)
    else:
        model[off:off + n] = bytes(n) if op == "z" else bytes([b]) * n
