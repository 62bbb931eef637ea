"""Coverage-guided fuzzing of the C kernels (libFuzzer harnesses in native/fuzz/).

    python tests/faults/fuzz_native.py build [OUTDIR]
    python tests/faults/fuzz_native.py run TARGET [libFuzzer options] [CORPUS_DIR...]
    python tests/faults/fuzz_native.py replay [TARGET...]
    python tests/faults/fuzz_native.py seeds IMAGE...

Targets: ``decompress`` (qcow2n_decompress: zlib, zstd, the libdeflate fast path),
``l2`` (qcow2n_l2_runs), ``zero`` (qcow2n_zero_blocks, qcow2n_is_zero), ``check``
(the check's kernels of native/check.c).  Each is built with clang and
``-fsanitize=fuzzer,address,undefined`` from the kernel sources themselves (not the
Python extension), into OUTDIR (default: $QCOW2_FUZZ_BUILD or
.fuzz-native-build).  ``run`` fuzzes one target from its seeds
(native/fuzz/seeds/TARGET/) and regressions (native/fuzz/regressions/TARGET/); a
crash is written to the regressions folder (crash-<sha1>) and the exit status is
non-zero.  ``replay`` runs every seed and regression once.  ``seeds`` cuts seeds
from qcow2 images: their L2 tables and compressed clusters.

A long run, e.g. an hour of the decompressor on both cores:

    python tests/faults/fuzz_native.py run decompress -max_total_time=3600 -jobs=2 \\
        -workers=2 /tmp/decompress-corpus

tests/test_faults_fuzz.py runs each target for QCOW2_FUZZ_NATIVE_SECONDS (10 by
default) and replays the regressions; it skips when clang or its libFuzzer runtime
is missing (Debian: ``apt-get install clang libclang-rt-14-dev``).
"""

from __future__ import annotations

import os
import shutil
import struct
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
NATIVE = ROOT / "native"
FUZZ = NATIVE / "fuzz"
TARGETS = ["decompress", "l2", "zero", "check"]
KERNELS = ["codec.c", "l2.c", "zero.c", "check.c"]
SANITIZE = ["-fsanitize=fuzzer,address,undefined", "-fno-sanitize-recover=undefined",
            "-fno-omit-frame-pointer", "-g", "-O1"]
#: libFuzzer options of every run: bounded memory, one input at most this long
RUN_OPTIONS = ["-rss_limit_mb=1024", "-timeout=30", "-max_len=70000"]


def clang() -> str | None:
    return os.environ.get("QCOW2_FUZZ_CC") or shutil.which("clang")


def missing() -> str | None:
    """Why the harnesses cannot be built here (None: they can)."""
    cc = clang()
    if cc is None:
        return "clang is not installed (apt-get install clang libclang-rt-14-dev)"
    with tempfile.TemporaryDirectory() as d:
        src = Path(d) / "t.c"
        src.write_text("#include <stdint.h>\n#include <stddef.h>\n"
                       "int LLVMFuzzerTestOneInput(const uint8_t *d, size_t n)"
                       " { (void)d; (void)n; return 0; }\n")
        r = subprocess.run([cc, *SANITIZE, str(src), "-o", str(Path(d) / "t")],
                           capture_output=True, text=True)
        if r.returncode:
            return (f"{cc} cannot build a libFuzzer harness (the libFuzzer runtime, "
                    f"libclang-rt-*-dev on Debian, is missing?): "
                    f"{r.stderr.strip().splitlines()[-1] if r.stderr.strip() else r.returncode}")
    return None


def _have(header: str) -> bool:
    return any((Path(p) / header).exists() for p in ("/usr/include", "/usr/local/include"))


def build(out: Path) -> dict[str, Path]:
    """Build every harness into ``out``; returns target -> binary."""
    out.mkdir(parents=True, exist_ok=True)
    cc = clang()
    defs, libs = [], ["-lz"]
    if _have("zstd.h"):
        defs.append("-DHAVE_ZSTD=1")
        libs.append("-lzstd")
    if _have("libdeflate.h"):
        defs.append("-DHAVE_LIBDEFLATE=1")
        libs.append("-ldeflate")
    made = {}
    for t in TARGETS:
        exe = out / f"fuzz_{t}"
        cmd = [cc, *SANITIZE, "-std=c99", "-Wall", "-Wextra", f"-I{NATIVE}", f"-I{FUZZ}",
               *defs, str(FUZZ / f"fuzz_{t}.c"), *(str(NATIVE / k) for k in KERNELS),
               *libs, "-o", str(exe)]
        subprocess.run(cmd, check=True)
        made[t] = exe
    return made


def build_dir() -> Path:
    return Path(os.environ.get("QCOW2_FUZZ_BUILD") or ROOT / ".fuzz-native-build")


def inputs(target: str) -> list[Path]:
    """The seed and regression folders of a target (those that exist)."""
    return [d for d in (FUZZ / "seeds" / target, FUZZ / "regressions" / target) if d.is_dir()]


def run(exe: Path, target: str, options: list[str], corpora: list[str],
        timeout: float | None = None) -> subprocess.CompletedProcess:
    """Fuzz: new inputs go to the first corpus folder given (else a temporary one),
    never into the seeds; a crash lands in the regressions folder."""
    reg = FUZZ / "regressions" / target
    reg.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        work = corpora or [tmp]
        argv = [str(exe), *RUN_OPTIONS, f"-artifact_prefix={reg}/", *options, *work,
                *(str(d) for d in inputs(target))]
        env = dict(os.environ, ASAN_OPTIONS="detect_leaks=1:abort_on_error=0",
                   UBSAN_OPTIONS="print_stacktrace=1:halt_on_error=1")
        return subprocess.run(argv, capture_output=True, text=True, timeout=timeout, env=env)


def replay(exe: Path, target: str) -> subprocess.CompletedProcess:
    """Every seed and regression of a target, once each."""
    files = [str(p) for d in inputs(target) for p in sorted(d.iterdir()) if p.is_file()]
    if not files:
        return subprocess.CompletedProcess([str(exe)], 0, "", "")
    return subprocess.run([str(exe), *RUN_OPTIONS, *files], capture_output=True, text=True)


# -- seeds from images ----------------------------------------------------------------
def _tables(data: bytes):
    """(cluster bits, extended, [L2 table offsets]) of a qcow2 image in ``data``."""
    (_magic, version, _bo, _bs, cbits, _size, _cm, l1_size, l1_off) = \
        struct.unpack_from(">IIQIIQIIQ", data, 0)
    incompat = struct.unpack_from(">Q", data, 72)[0] if version >= 3 else 0
    ext = bool(incompat & 16)
    l1 = struct.unpack_from(f">{l1_size}Q", data, l1_off)
    return cbits, ext, [e & 0x00FFFFFFFFFFFE00 for e in l1 if e & 0x00FFFFFFFFFFFE00]


def seeds(images: list[str]) -> None:
    """Seeds for every target from the L2 tables and compressed clusters of images."""
    out = {t: FUZZ / "seeds" / t for t in TARGETS}
    for d in out.values():
        d.mkdir(parents=True, exist_ok=True)
    for img in images:
        data = Path(img).read_bytes()
        name = Path(img).parent.name or Path(img).stem
        algo = 1 if data[104:105] == b"\x01" and struct.unpack_from(">I", data, 4)[0] >= 3 \
            and struct.unpack_from(">I", data, 100)[0] >= 105 else 0
        cbits, ext, l2s = _tables(data)
        cs = 1 << cbits
        esize = 16 if ext else 8
        if cbits > 16:
            continue
        for k, off in enumerate(l2s[:2]):
            table = data[off:off + cs]
            n = cs // esize
            (out["l2"] / f"{name}-{k}").write_bytes(
                struct.pack(">BBHHH", cbits - 9, int(ext), 0, n, min(n, 2047)) + table)
            if not ext and cbits <= 16:
                clusters = min(0xFFFF, max(0, (len(data) >> cbits) - 1))
                (out["check"] / f"{name}-{k}").write_bytes(
                    struct.pack(">BBHHB", cbits - 9, 1, clusters, clusters, 0) + table
                    + data[:64])
            comp = 0
            for i in range(n):
                e = struct.unpack_from(">Q", table, i * esize)[0]
                if not e & (1 << 62) or comp >= 2 or cbits > 16:
                    continue
                shift = 62 - (cbits - 8)
                coff = e & ((1 << shift) - 1)
                end = (coff & ~511) + (((e >> shift) & ((1 << (cbits - 8)) - 1)) + 1) * 512
                (out["decompress"] / f"{name}-{k}-{i}").write_bytes(
                    bytes([algo | ((cbits - 9) << 2), 0]) + data[coff:end])
                comp += 1
        (out["zero"] / name).write_bytes(struct.pack(">HBB", 512, 0, 1) + data[:8192])


def main(argv: list[str]) -> int:
    if not argv or argv[0] not in ("build", "run", "replay", "seeds"):
        print(__doc__)
        return 2
    cmd, rest = argv[0], argv[1:]
    if cmd == "seeds":
        seeds(rest)
        return 0
    why = missing()
    if why:
        print(f"fuzz_native: {why}", file=sys.stderr)
        return 2
    if cmd == "build":
        build(Path(rest[0]) if rest else build_dir())
        return 0
    exes = build(build_dir())
    if cmd == "replay":
        status = 0
        for t in rest or TARGETS:
            r = replay(exes[t], t)
            print(f"{t}: {'ok' if r.returncode == 0 else 'FAILED'}")
            if r.returncode:
                print(r.stderr[-4000:], file=sys.stderr)
                status = 1
        return status
    target, more = rest[0], rest[1:]
    opts = [a for a in more if a.startswith("-")]
    dirs = [a for a in more if not a.startswith("-")]
    r = run(exes[target], target, opts, dirs)
    sys.stderr.write(r.stderr[-8000:])
    return r.returncode


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
