"""The check's fast paths give the general check's answer, message for message.

* the quick check (:mod:`qcow2.checker.quick`, no numpy) answers only for a
  consistent image, with the general check's counts;
* the native fast path of the general check (:mod:`qcow2.checker.fast`, clean L2
  tables counted in C) gives the same result, messages and repaired bytes as the
  all-numpy path, on clean images and on every corruption of tests/test_check.py,
  with and without repair.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import struct
import subprocess

import pytest
from test_check import CORRUPT, Img, _base

import corpus
from qcow2.backends import FileBackend
from qcow2.checker import fast, quick, run
from qcow2.checker.file import CheckedFile
from qcow2.checker.result import CheckFailedError

NATIVE = fast._load() is not None   # noqa: SLF001 -- the switch under test

pytestmark = pytest.mark.skipif(not NATIVE, reason="native core not built")

QCOW2_CASES = [pytest.param(c, id=c.id) for c in corpus.cases()
               if not c.slow and c.fmt == "qcow2"]


def _general(path, fix, native: bool, monkeypatch):
    """(result or failure, messages, file digest) of the general check."""
    monkeypatch.setattr(fast, "_NATIVE", fast._load() if native else None)
    log = []
    be = FileBackend(path, writable=bool(fix))
    try:
        try:
            out = run.check_file(CheckedFile(be), fix, log.append)
        except CheckFailedError as exc:
            out = ("failed", str(exc), exc.errno)
    finally:
        be.close()
    with open(path, "rb") as f:
        digest = hashlib.sha256(f.read()).hexdigest()
    return out, log, digest


def _quick(path):
    be = FileBackend(path, writable=False)
    try:
        return quick.quick_check(CheckedFile(be))
    finally:
        be.close()


@pytest.mark.parametrize("case", QCOW2_CASES)
def test_corpus_same_answer(built, case, monkeypatch):
    path = str(built.path)
    with_c = _general(path, 0, True, monkeypatch)
    without = _general(path, 0, False, monkeypatch)
    assert with_c == without
    q = _quick(path)
    if q is not None:               # only ever the answer for a clean image
        assert (q, [], with_c[2]) == with_c
    if case.id.startswith("prealloc-metadata"):
        assert q is not None


def test_quick_answers_clean_images(tmp_path):
    """The quick check does answer for the usual layouts (16, 8 and 64-bit refcounts,
    4 KiB to 2 MiB clusters, a compressed cluster among the others)."""
    for i, opts in enumerate(["cluster_size=65536", "refcount_bits=8,cluster_size=4096",
                              "compat=0.10,cluster_size=4096",
                              "refcount_bits=64,cluster_size=2097152"]):
        d = tmp_path / str(i)
        d.mkdir()
        path = _base(str(d), opts=opts, size=256 << 20)
        q = _quick(path)
        assert q is not None, opts
        assert q.compressed_clusters == 1


@pytest.mark.parametrize("case", sorted(CORRUPT))
@pytest.mark.parametrize("fix", [0, 1, 3], ids=["check", "leaks", "all"])
def test_corruptions_same_answer(tmp_path, case, fix, monkeypatch):
    poke, kw = CORRUPT[case]
    src = _base(str(tmp_path), **kw)
    poke(Img(src))
    a, b = str(tmp_path / "a.qcow2"), str(tmp_path / "b.qcow2")
    shutil.copy(src, a)
    shutil.copy(src, b)
    assert _general(a, fix, True, monkeypatch) == _general(b, fix, False, monkeypatch)
    if fix == 0:
        assert _quick(src) is None


def test_compressed_extent_into_the_next_cluster(tmp_path, monkeypatch):
    """A compressed cluster whose sectors run less than a cluster past the end of the
    file references the cluster after the last: the general check grows its IMRT
    there (QEMU does); the fast path must leave that table to it."""
    path = str(tmp_path / "img.qcow2")
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", "-o", "cluster_size=4096",
                    path, "1M"], check=True)
    subprocess.run(["qemu-io", "-f", "qcow2", "-c", "write -c -P 7 0 4k", path],
                   check=True, capture_output=True)
    size = os.path.getsize(path)
    with open(path, "r+b") as f:
        f.truncate((size + 4095) // 4096 * 4096)
        size = (size + 4095) // 4096 * 4096
        f.seek(40)
        l1_off = struct.unpack(">Q", f.read(8))[0]
        f.seek(l1_off)
        l2_off = struct.unpack(">Q", f.read(8))[0] & 0x00FFFFFFFFFFFE00
        f.seek(l2_off)
        e = struct.unpack(">Q", f.read(8))[0]
        assert e & (1 << 62)
        shift = 62 - (12 - 8)
        coff = e & ((1 << shift) - 1)
        start = coff & ~511
        sectors = (size + 512 - start) // 512          # ends 512 bytes past the file
        assert 1 <= sectors <= 16
        e = (e & ~(15 << shift)) | ((sectors - 1) << shift)
        f.seek(l2_off)
        f.write(struct.pack(">Q", e))
    a, b = str(tmp_path / "a.qcow2"), str(tmp_path / "b.qcow2")
    shutil.copy(path, a)
    shutil.copy(path, b)
    assert _general(a, 0, True, monkeypatch) == _general(b, 0, False, monkeypatch)
    assert _quick(path) is None
