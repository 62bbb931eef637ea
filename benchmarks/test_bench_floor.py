"""The floor under the compressed conversions (issue 15): how close any program can get.

``floor/convert_floor.c`` is the conversion of a compressed qcow2 to raw with nothing
around it (two threads, jobs of 64 clusters, one read per job, the system's libzstd
or libdeflate, zero scan, sparse pwrite; see its header).  It is compiled here and
timed in the same alternating rounds as ours and qemu-img, on the same input and with
the same ``-t`` mode (``writeback`` or ``none``: it fsyncs; ``unsafe``/``default``:
it does not).  Its output is first checked to be qemu-img's, byte for byte, so it is
a yardstick for the same job, not a shortcut.

Stored beside the usual columns: ``floor_s`` (its median), ``floor_ratio`` (floor /
qemu-img: the best ratio this machine allows any converter) and ``ours_to_floor``
(what our process costs above that floor).  Nothing here asserts timings.
"""

from __future__ import annotations

import filecmp
import os
import shutil
import subprocess
from pathlib import Path

import pytest
from test_bench import CACHE, QCOW2, cache_args, need, side_by_side

SOURCE = Path(__file__).with_name("floor") / "convert_floor.c"


@pytest.fixture(scope="session")
def floor_program(tmp_path_factory) -> str:
    cc = shutil.which(os.environ.get("CC", "cc")) or shutil.which("gcc")
    if cc is None:
        pytest.skip("no C compiler for the floor program")
    exe = tmp_path_factory.mktemp("floor") / "convert_floor"
    p = subprocess.run([cc, "-O2", "-o", str(exe), str(SOURCE), "-lzstd", "-ldeflate",
                        "-lpthread"], capture_output=True, text=True)
    if p.returncode != 0:
        pytest.skip(f"the floor program does not build here: {p.stderr.strip()[-300:]}")
    return str(exe)


@pytest.mark.parametrize("kind", ["zstd", "zlib"])
def test_compressed_to_raw_floor(benchmark, corpus, scratch, floor_program, kind):
    src = str(need(corpus, kind))
    out, ref = scratch / "out.raw", scratch / "ref.raw"
    sync = ["sync"] if CACHE in ("writeback", "none") else []
    floor = [floor_program, src, str(out), *sync]
    subprocess.run(floor, check=True)
    subprocess.run(["qemu-img", "convert", "-O", "raw", src, str(ref)], check=True)
    assert filecmp.cmp(out, ref, shallow=False), "the floor program's output is not qemu-img's"
    ref.unlink()

    def rm():
        out.unlink(missing_ok=True)
    side_by_side(benchmark, QCOW2 + ["convert", *cache_args(), "-O", "raw", src, str(out)],
                 ["qemu-img", "convert", *cache_args(), "-O", "raw", src, str(out)], rm,
                 more={"floor": floor})
