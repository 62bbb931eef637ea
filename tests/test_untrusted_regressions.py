"""The fuzz regression corpus (tests/fuzz_regressions/, see its README): every image
there is replayed through ``qcow2.open(untrusted=True)`` and reads, and through
``info --untrusted`` and ``convert --untrusted`` on the CLI under a 1 GiB address-space
limit.  ``NAME.qcow2.gz`` must be refused with a Qcow2Error (the CLI: one line on
stderr, a non-zero exit, no traceback); ``NAME.ok.qcow2.gz`` must read cleanly.

The seed images were made by :func:`build_seeds` (``python
tests/test_untrusted_regressions.py``, needs qemu-img); the fuzzer in test_untrusted.py
adds the minimal input of any failure it finds."""

from __future__ import annotations

import gzip
import shutil
import struct
import sys
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent
if str(HERE) not in sys.path:
    sys.path.insert(0, str(HERE))

from test_untrusted import (COPIED, CS, REGRESSIONS, _cli, big_snapshot_table,  # noqa: E402
                            exercise, l1_off, l2_off, move_l1, poke, poke64, qemu_img,
                            qemu_io, reftable_off, round_up, u64)

CASES = sorted(REGRESSIONS.glob("*.qcow2.gz")) if REGRESSIONS.is_dir() else []


def _unpack(src: Path, dst_dir: Path) -> Path:
    dst = dst_dir / src.name[:-3]
    with gzip.open(src, "rb") as f:
        dst.write_bytes(f.read())
    return dst


def test_the_corpus_is_there():
    assert len(CASES) >= 10, REGRESSIONS
    for c in CASES:
        assert c.stat().st_size < 64 << 10, c          # keep the repository small


@pytest.mark.parametrize("case", CASES, ids=[c.name[:-len(".qcow2.gz")] for c in CASES])
def test_regression(case, tmp_path):
    import qcow2
    from qcow2 import Qcow2Error
    p = _unpack(case, tmp_path)
    ok = case.name.endswith(".ok.qcow2.gz")
    opened = True
    if ok:
        exercise(p, deep=True)
    else:
        try:
            with qcow2.open(p, untrusted=True):
                pass
        except Qcow2Error:
            opened = False
        try:                                # no other exception out of the check
            qcow2.check(p, untrusted=True)
        except Qcow2Error:
            pass
        with pytest.raises(Qcow2Error) as ei:
            exercise(p, deep=True)
        # a refusal names where in the file the problem is
        assert getattr(ei.value, "offset", None) is not None, repr(ei.value)
    out = tmp_path / "out.raw"
    for argv in (["info", "--untrusted", p],
                 ["convert", "--untrusted", "-O", "raw", p, out]):
        r = _cli(*argv)
        assert "Traceback" not in r.stderr and "internal error" not in r.stderr, r.stderr
        assert r.returncode >= 0, (argv, r.returncode)            # no signal
        if ok or (argv[0] == "info" and opened):
            # refused only when reading guest data: info describes it
            if ok:
                assert r.returncode == 0, (argv, r.stderr)
            continue
        assert r.returncode != 0, (argv, r.stdout)
        assert len(r.stderr.splitlines()) == 1, (argv, r.stderr)
    if not ok:
        assert not out.exists()


# ---------------------------------------------------------------------------
# the seed images (run this file as a script to rebuild them)
# ---------------------------------------------------------------------------

def _small(d: Path, name: str, *opts: str) -> Path:
    p = d / f"{name}.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", *opts, p, "1M")
    qemu_io(p, "write -P 1 0 64k", "write -P 2 192k 64k")
    return p


def build_seeds(out: Path) -> list[Path]:
    """Representative hostile images, each one field poked into a qemu-img-made image."""
    import tempfile
    made = []
    with tempfile.TemporaryDirectory() as tmp:
        d = Path(tmp)
        seeds = {}

        p = _small(d, "plain1")
        poke64(p, l1_off(p), u64(p, l1_off(p)) | 2)
        seeds["l1-entry-reserved-bits"] = p

        p = _small(d, "plain2")
        l2 = l2_off(p)
        poke64(p, l2 + 8, COPIED | l2)                  # the L2 table as its own data
        seeds["l2-self-reference"] = p

        p = _small(d, "plain3")
        poke64(p, l2_off(p) + 8, COPIED | (l1_off(p) & ~(CS - 1)))
        seeds["l2-data-on-the-l1-table"] = p

        p = _small(d, "plain4")
        poke64(p, l2_off(p) + 24, u64(p, l2_off(p)))
        seeds["l2-double-reference"] = p

        p = _small(d, "plain5")
        move_l1(p, 2)
        poke64(p, l1_off(p) + 8, u64(p, l1_off(p)))
        seeds["l1-entries-share-an-l2-table"] = p

        p = _small(d, "plain6")
        poke64(p, reftable_off(p) + 8, l1_off(p) & ~(CS - 1))
        seeds["refcount-block-overlaps-the-l1-table"] = p

        p = _small(d, "plain7")
        poke64(p, reftable_off(p) + 8, 0xFFFFFFFFFFFF0000)
        seeds["refcount-table-entry-wraps"] = p

        p = _small(d, "plain8")
        size = 32 << 40
        poke64(p, 0x18, size)
        move_l1(p, size // (CS * CS // 8))
        seeds["huge-virtual-size"] = p

        p = _small(d, "plain9")
        poke64(p, 0x48, u64(p, 0x48) | 2)
        seeds["corrupt-bit"] = p                        # described, never read

        p = _small(d, "plain10")
        poke(p, 0x8001, b"CD001")
        seeds["iso-qcow2-polyglot"] = p

        src = _small(d, "src")
        p = d / "comp.qcow2"
        qemu_img("convert", "-c", "-O", "qcow2", src, p)
        e = u64(p, l2_off(p))
        shift = 62 - (16 - 8)
        coff = (p.stat().st_size - 512) & ~511
        poke64(p, l2_off(p), (1 << 62) | (7 << shift) | coff)
        seeds["compressed-descriptor-overruns-the-file"] = p

        p = d / "comp2.qcow2"
        qemu_img("convert", "-c", "-O", "qcow2", src, p)
        e = u64(p, l2_off(p))
        coff = e & ((1 << shift) - 1)
        poke(p, coff, b"\xff" * 64)                     # garbage deflate stream
        seeds["compressed-garbage"] = p

        p = _small(d, "ext", "-o", "extended_l2=on")
        l2 = l2_off(p)
        poke64(p, l2 + 8, u64(p, l2 + 8) | (1 << 32))
        seeds["extended-l2-allocated-and-zero"] = p

        p = _small(d, "snap")
        qemu_img("snapshot", "-c", "s1", p)
        poke(p, 0x3C, struct.pack(">I", 65536))
        seeds["snapshot-count-huge"] = p

        p = _small(d, "snap2")
        qemu_img("snapshot", "-c", "s1", p)
        big_snapshot_table(p, 64)
        poke(p, u64(p, 0x40) + 36, struct.pack(">I", 0xFFFFFFFF))   # extra data size
        seeds["snapshot-extra-data-huge"] = p

        for name, how in (("bitmap-directory-past-eof", "dir"),
                          ("bitmap-granularity-too-small", "gran"),
                          ("bitmap-data-on-the-l1-table", "data"),
                          ("bitmap-table-size-mismatch", "tsize")):
            p = _small(d, name)
            qemu_img("bitmap", "--add", p, "b0")
            qemu_io(p, "write -P 3 512k 64k")
            i = p.read_bytes().index(struct.pack(">I", 0x23852875), 0, CS) + 8
            doff = u64(p, i + 16)
            if how == "dir":
                poke64(p, i + 16, round_up(p.stat().st_size) + 4 * CS)
            elif how == "gran":
                poke(p, doff + 17, b"\x08")
            elif how == "data":
                poke64(p, u64(p, doff), l1_off(p) & ~(CS - 1))
            else:
                poke(p, doff + 8, struct.pack(">I", 3))
            seeds[name] = p

        out.mkdir(exist_ok=True)
        for name, p in seeds.items():
            dst = out / f"{name}.qcow2.gz"
            with open(dst, "wb") as raw, gzip.GzipFile(fileobj=raw, mode="wb", mtime=0,
                                                       compresslevel=9) as f:
                f.write(p.read_bytes())
            made.append(dst)
    return made


if __name__ == "__main__":
    if not shutil.which("qemu-img"):
        sys.exit("qemu-img is needed to build the seed images")
    for path in build_seeds(REGRESSIONS):
        print(path.relative_to(HERE.parent), path.stat().st_size)
