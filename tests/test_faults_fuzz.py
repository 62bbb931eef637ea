"""Coverage-guided fuzzing (atheris) of open/header parsing, the untrusted scan and
check, for a bounded time per target (QCOW2_FUZZ_SECONDS, 12 s by default; one input
may take QCOW2_FUZZ_TIMEOUT seconds, 20 by default, before it counts as a hang).

The C kernels are fuzzed too (test_native_fuzz): libFuzzer harnesses (native/fuzz/)
built with clang and -fsanitize=fuzzer,address,undefined, QCOW2_FUZZ_NATIVE_SECONDS
(8 by default) per target after a replay of their seeds and regressions
(native/fuzz/seeds/, native/fuzz/regressions/, where a crash is kept).  Skipped, with
the reason, without clang and its libFuzzer runtime.  Longer runs:
tests/faults/fuzz_native.py.

Seeds: the regression corpus (tests/fuzz_regressions/) and a few small images made
by qemu-img.  A crash, hang or memory blow-up is saved as
``tests/fuzz_regressions/atheris-TARGET-<sha256 prefix>.qcow2.gz`` (the regression
test replays it from then on) and fails the test.  Longer runs: see
tests/faults/fuzz.py.
"""

from __future__ import annotations

import gzip
import hashlib
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent
FUZZ = HERE / "faults" / "fuzz.py"
REGRESSIONS = HERE / "fuzz_regressions"
TARGETS = ["open", "untrusted", "check", "check-paths"]

try:
    import atheris  # noqa: F401
    _ATHERIS = True
except ImportError:
    _ATHERIS = False

needs_atheris = pytest.mark.skipif(not _ATHERIS, reason="atheris is not installed "
                                   "(pip install atheris; scripts/setup.sh does)")


@pytest.fixture(scope="module")
def seeds(tmp_path_factory):
    if not _ATHERIS:
        pytest.skip("atheris is not installed")
    d = tmp_path_factory.mktemp("seeds")
    for f in sorted(REGRESSIONS.glob("*.qcow2.gz")):
        with gzip.open(f, "rb") as g:
            (d / f.name[:-3]).write_bytes(g.read())
    if shutil.which("qemu-img") and shutil.which("qemu-io"):
        for name, opts, cmds in [
                ("plain", "cluster_size=4096", ["write -P 1 0 64k", "write -z 64k 8k"]),
                ("ext-l2", "cluster_size=16384,extended_l2=on", ["write -P 2 4k 4k"]),
                ("v2", "compat=0.10,cluster_size=4096", ["write -P 3 8k 4k"]),
                ("compressed", "cluster_size=4096", ["write -c -P 4 0 4k"])]:
            p = d / f"{name}.qcow2"
            subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", "-o", opts, str(p),
                            "256k"], check=True)
            argv = ["qemu-io", "-f", "qcow2"]
            for c in cmds:
                argv += ["-c", c]
            subprocess.run(argv + [str(p)], check=True, capture_output=True)
        subprocess.run(["qemu-img", "snapshot", "-c", "s1", str(d / "plain.qcow2")],
                       check=True)
    return d


def _save(target: str, data: bytes) -> Path:
    REGRESSIONS.mkdir(exist_ok=True)
    path = REGRESSIONS / f"atheris-{target}-{hashlib.sha256(data).hexdigest()[:16]}.qcow2.gz"
    with open(path, "wb") as raw, gzip.GzipFile(fileobj=raw, mode="wb", mtime=0) as f:
        f.write(data)
    return path


@needs_atheris
@pytest.mark.parametrize("target", TARGETS)
def test_fuzz(target, seeds, tmp_path):
    seconds = int(os.environ.get("QCOW2_FUZZ_SECONDS", "12"))
    corpus = tmp_path / "corpus"          # new inputs go here, not into the repository
    corpus.mkdir()
    art = tmp_path / "artifacts"
    art.mkdir()
    argv = [sys.executable, "-P", str(FUZZ), target, f"-max_total_time={seconds}",
            "-rss_limit_mb=1536", f"-timeout={os.environ.get('QCOW2_FUZZ_TIMEOUT', '20')}",
            "-max_len=262144",
            f"-seed={int(os.environ.get('QCOW2_FUZZ_SEED', '1'))}",
            f"-artifact_prefix={art}/", "-print_final_stats=1", str(corpus), str(seeds)]
    r = subprocess.run(argv, capture_output=True, text=True, timeout=seconds * 4 + 120)
    # crash-, timeout-, oom-, leak-: failures; slow-unit-: only a note (slow, not hung)
    found = sorted(p for p in art.iterdir() if p.is_file()
                   and p.name.startswith(("crash-", "timeout-", "oom-", "leak-")))
    saved = [str(_save(target, p.read_bytes())) for p in found]
    tail = "\n".join(r.stderr.splitlines()[-40:])
    assert r.returncode == 0 and not found, f"fuzzer found {saved}:\n{tail}"
    runs = [ln for ln in r.stderr.splitlines() if ln.startswith("stat::number_of_executed_units")]
    print(f"{target}: {runs[0].split(':')[-1].strip() if runs else '?'} inputs in {seconds} s")


# -- the C kernels (libFuzzer) -------------------------------------------------------
NATIVE_TARGETS = ["decompress", "l2", "zero", "check"]


@pytest.fixture(scope="module")
def native_fuzzers(tmp_path_factory):
    import importlib.util
    spec = importlib.util.spec_from_file_location("fuzz_native",
                                                  HERE / "faults" / "fuzz_native.py")
    fn = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(fn)
    why = fn.missing()
    if why:
        pytest.skip(f"C kernel fuzzing skipped: {why}")
    return fn, fn.build(tmp_path_factory.mktemp("fuzz-native"))


@pytest.mark.parametrize("target", NATIVE_TARGETS)
def test_native_fuzz(target, native_fuzzers, tmp_path):
    fn, exes = native_fuzzers
    r = fn.replay(exes[target], target)
    assert r.returncode == 0, "\n".join(r.stderr.splitlines()[-40:])
    seconds = int(os.environ.get("QCOW2_FUZZ_NATIVE_SECONDS", "8"))
    reg = fn.FUZZ / "regressions" / target
    before = set(reg.iterdir()) if reg.is_dir() else set()
    r = fn.run(exes[target], target,
               [f"-max_total_time={seconds}", "-print_final_stats=1",
                f"-seed={int(os.environ.get('QCOW2_FUZZ_SEED', '1'))}"],
               [str(tmp_path)], timeout=seconds * 4 + 120)
    found = sorted(str(p) for p in set(reg.iterdir()) - before)
    tail = "\n".join(r.stderr.splitlines()[-40:])
    assert r.returncode == 0 and not found, f"fuzzer found {found}:\n{tail}"
    runs = [ln for ln in r.stderr.splitlines() if ln.startswith("stat::number_of_executed_units")]
    print(f"{target}: {runs[0].split(':')[-1].strip() if runs else '?'} inputs in {seconds} s")
