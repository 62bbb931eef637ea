"""Into Ceph RBD (issue 12), side by side with qemu-img / nova's commands.

A single-node cluster (scripts/ceph.sh, bluestore on a sparse file) is started for
these cases.  ``test_bench``'s helpers time whole processes, best of ROUNDS; nothing
here asserts timings.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import uuid
from pathlib import Path

import pytest
from test_bench import QCOW2, ROUNDS, need, run_process, side_by_side

# ---------------------------------------------------------------------------
# Into Ceph RBD (issue 12): a single-node cluster (scripts/ceph.sh, bluestore on a
# sparse file) is started for these cases.  The zstd
# qcow2 of the corpus goes into a new RBD image: ours (``qcow2 convert -O raw SRC
# rbd:...``, streamed, only data written) against ``qemu-img convert -O raw SRC rbd:...``
# (qemu-block-extra), and against nova's way without Ceph-backed glance (``qemu-img
# convert -t none -O raw`` to a file, then ``rbd import``).  The image is removed
# before every run, so each run creates it.
# ---------------------------------------------------------------------------

ROOT = Path(__file__).resolve().parent.parent
CEPH_SH = ROOT / "scripts" / "ceph.sh"


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    missing = [t for t in ("ceph-mon", "ceph-osd", "ceph-mgr", "rbd") if not shutil.which(t)]
    if missing:
        pytest.skip(f"Ceph unavailable: {', '.join(missing)} not installed")
    d = tmp_path_factory.mktemp("ceph")
    # bluestore on a sparse file: memstore's space accounting was seen to wrap after
    # images of this size were removed (16 EiB "used", the OSD full, writes hanging)
    env = dict(os.environ, CEPH_OBJECTSTORE=os.environ.get("CEPH_OBJECTSTORE", "bluestore"))
    r = subprocess.run(["bash", str(CEPH_SH), "start", str(d)], capture_output=True,
                       text=True, timeout=180, stdin=subprocess.DEVNULL, env=env)
    if r.returncode != 0:
        pytest.skip(f"Ceph unavailable: {(r.stderr or r.stdout).strip()}")
    try:
        yield d / "ceph.conf"
    finally:
        subprocess.run(["bash", str(CEPH_SH), "stop", str(d)], timeout=60,
                       stdin=subprocess.DEVNULL, check=False)


def _rbd(conf, *args, check=True):
    env = dict(os.environ, CEPH_CONF=str(conf))
    return subprocess.run(["rbd", *args], env=env, capture_output=True, text=True,
                          timeout=600, check=check)


def _remover(conf, name):
    def rm():
        _rbd(conf, "rm", "--no-progress", f"rbd/{name}", check=False)
    return rm


@pytest.mark.parametrize("kind", ["zstd"])
def test_qcow2_to_rbd_vs_qemu_img(benchmark, corpus, cluster, kind):
    need(corpus, kind)
    name = "bench-qemu"
    target = f"rbd:rbd/{name}:conf={cluster}"
    side_by_side(benchmark,
                  QCOW2 + ["convert", "-O", "raw", str(corpus[kind]), target],
                  ["qemu-img", "convert", "-O", "raw", str(corpus[kind]), target],
                  _remover(cluster, name), env=dict(os.environ, CEPH_CONF=str(cluster)))
    used = _rbd(cluster, "du", "--exact", f"rbd/{name}").stdout.split("\n")[-2]
    benchmark.extra_info["rbd_du_exact"] = " ".join(used.split())
    _remover(cluster, name)()


@pytest.mark.parametrize("kind", ["zstd"])
def test_qcow2_to_rbd_vs_nova(benchmark, corpus, cluster, scratch, kind):
    """nova's libvirt driver without Ceph-backed glance: convert to a raw file in the
    base cache, then ``rbd import`` it into the pool."""
    need(corpus, kind)
    name = "bench-nova"
    raw = scratch / "base.raw"
    theirs = ("qemu-img convert -t none -O raw {src} {raw} && "
              "CEPH_CONF={conf} rbd import --no-progress --image-format=2 {raw} rbd/{name} "
              "&& rm -f {raw}").format(src=corpus[kind], raw=raw, conf=cluster, name=name)
    side_by_side(benchmark,
                  QCOW2 + ["convert", "-O", "raw", str(corpus[kind]),
                           f"rbd:rbd/{name}:conf={cluster}"],
                  ["sh", "-c", theirs], _remover(cluster, name))
    _remover(cluster, name)()


# ---------------------------------------------------------------------------
# The compute flow with images_type=rbd: a spawn from the zstd qcow2 (its first, which
# imports the image into the pool cache, and a later one, which only clones) against
# nova's commands for the same job with the image already downloaded into _base:
# ``qemu-img info``, ``qemu-img convert -t none -O raw`` to a file, ``qemu-img info``,
# ``mv``, ``rbd import`` of the whole raw base as the instance disk, ``rbd resize``
# (nova imports a full copy per instance; glance in the same Ceph would clone).
# ---------------------------------------------------------------------------

ROOT_SIZE = "8G"


def _nova_conf(tmp: Path, conf: Path) -> Path:
    c = tmp / "nova.conf"
    c.write_text(f"[DEFAULT]\ninstances_path = {tmp / 'instances'}\n[libvirt]\n"
                 f"images_type = rbd\nimages_rbd_pool = rbd\nimages_rbd_ceph_conf = {conf}\n")
    return c


def _purge_pool(conf):
    """Remove every image of the pool (clones first, then bases and their snapshots)."""
    names = _rbd(conf, "ls", "rbd").stdout.split()
    for n in sorted(names, key=lambda n: len(n) == 40):
        if len(n) == 40:
            _rbd(conf, "snap", "unprotect", f"rbd/{n}@snap", check=False)
            _rbd(conf, "snap", "purge", f"rbd/{n}", check=False)
        _rbd(conf, "rm", "--no-progress", f"rbd/{n}", check=False)


@pytest.mark.parametrize("kind", ["zstd"])
def test_compute_rbd_first_spawn(benchmark, corpus, cluster, scratch, kind):
    need(corpus, kind)
    nconf = _nova_conf(scratch, cluster)
    env = dict(os.environ, CEPH_CONF=str(cluster))
    ids = iter(range(1000))

    def ours_cmd():
        return QCOW2 + ["compute", "spawn", "--config", str(nconf), "--instance",
                        str(uuid.uuid4()), "--image", f"img-{next(ids)}", "--source",
                        str(corpus[kind]), "--root-size", ROOT_SIZE, "-q"]
    base = scratch / "_base"
    base.mkdir(exist_ok=True)
    part = base / "img.part"
    raw = base / hashlib.sha1(b"img").hexdigest()
    theirs = ("cp --reflink=auto {src} {part} && qemu-img info {part} >/dev/null && "
              "qemu-img convert -t none -O raw {part} {conv} && "
              "qemu-img info {conv} >/dev/null && mv {conv} {raw} && rm -f {part} && "
              "CEPH_CONF={conf} rbd import --no-progress --image-format=2 {raw} rbd/inst_disk"
              " && CEPH_CONF={conf} rbd resize --no-progress --size {size} rbd/inst_disk"
              ).format(src=corpus[kind], part=part, conv=str(part) + ".converted", raw=raw,
                       conf=cluster, size=ROOT_SIZE)

    def clean():
        _purge_pool(cluster)
        for f in base.iterdir():
            f.unlink()
    _side_by_side_fresh(benchmark, ours_cmd, ["sh", "-c", theirs], clean, env)
    benchmark.extra_info["what"] = ("ours: import into the pool cache + clone; theirs: "
                                    "nova's commands from a downloaded file (cp of it "
                                    "counted as its download)")
    clean()


@pytest.mark.parametrize("kind", ["zstd"])
def test_compute_rbd_second_spawn(benchmark, corpus, cluster, scratch, kind):
    need(corpus, kind)
    nconf = _nova_conf(scratch, cluster)
    env = dict(os.environ, CEPH_CONF=str(cluster))
    _purge_pool(cluster)
    first = QCOW2 + ["compute", "spawn", "--config", str(nconf), "--instance",
                     str(uuid.uuid4()), "--image", "img", "--source", str(corpus[kind]),
                     "--root-size", ROOT_SIZE, "-q"]
    run_process(first, env)                                       # the import (not timed)
    raw = scratch / "base.raw"
    subprocess.run(["qemu-img", "convert", "-O", "raw", str(corpus[kind]), str(raw)],
                   check=True)

    def ours_cmd():
        return QCOW2 + ["compute", "spawn", "--config", str(nconf), "--instance",
                        str(uuid.uuid4()), "--image", "img", "--source", str(corpus[kind]),
                        "--root-size", ROOT_SIZE, "-q"]
    theirs = ("CEPH_CONF={conf} rbd import --no-progress --image-format=2 {raw} rbd/inst_disk"
              " && CEPH_CONF={conf} rbd resize --no-progress --size {size} rbd/inst_disk"
              ).format(raw=raw, conf=cluster, size=ROOT_SIZE)

    def clean():
        _rbd(cluster, "rm", "--no-progress", "rbd/inst_disk", check=False)
    _side_by_side_fresh(benchmark, ours_cmd, ["sh", "-c", theirs], clean, env)
    benchmark.extra_info["what"] = ("a spawn of a cached image: ours clones the pool base; "
                                    "theirs: nova's rbd import of the cached raw base")
    _purge_pool(cluster)
    raw.unlink()


def _side_by_side_fresh(benchmark, ours_cmd, theirs, cleanup, env):
    """:func:`test_bench.side_by_side` with a new command line per round (a fresh
    instance, or image, each time)."""
    rss = []

    def one():
        cleanup()
        dt, peak = run_process(ours_cmd(), env)
        rss.append(peak)
        return dt
    benchmark.pedantic(one, rounds=ROUNDS, iterations=1, warmup_rounds=0)
    best = float("inf")
    for _ in range(ROUNDS):
        cleanup()
        best = min(best, run_process(theirs, env)[0])
    ours_best = benchmark.stats.stats.min
    benchmark.extra_info.update({
        "theirs_s": round(best, 4), "ours_s": round(ours_best, 4),
        "ratio": round(ours_best / best, 3) if best else None,
        "peak_rss_mib": round(max(rss), 1), "impl": os.environ.get("QCOW2_IMPL", "auto")})
