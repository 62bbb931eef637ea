"""cffi builder of ``qcow2._native`` (API mode, out-of-line).

setup.py names it in ``cffi_modules=["native/build_native.py:ffibuilder"]``; it can
also be run directly (``python native/build_native.py``) to build in place.

The declarations come verbatim from ``native/qcow2_native.h``.  At import the
builder try-compiles tiny programs to find zlib, zstd and libdeflate:

* zlib is required.  Without it the extension is still declared but its source
  stops at an ``#error``, so the compile step fails and setup.py's ``build_ext``
  falls back to the pure-Python kernels with a warning.
* zstd and libdeflate are optional (``HAVE_ZSTD``, ``HAVE_LIBDEFLATE``); only the
  libraries found are linked.
* ``QCOW2_REQUIRE_NATIVE=1`` (CI) makes any missing library an immediate error.
* ``QCOW2_NATIVE_WITHOUT=zstd,libdeflate`` (or ``zlib``) pretends libraries are
  missing, to test the fallbacks.
"""

from __future__ import annotations

import glob
import os
import shlex
import shutil
import subprocess
import sys
import sysconfig
import tempfile

from cffi import FFI

HERE = os.path.dirname(os.path.abspath(__file__))
HEADER = os.path.join(HERE, "qcow2_native.h")
#: declarations of other kernel groups, appended to HEADER for cdef() (their C
#: files are picked up by the *.c glob below)
EXTRA_HEADERS = [os.path.join(HERE, "qcow2_check.h"),
                 os.path.join(HERE, "xts.h")]      # xts.h: native/xts.c
REQUIRE_NATIVE = os.environ.get("QCOW2_REQUIRE_NATIVE", "") not in ("", "0")

CFLAGS = ["-O3", "-Wall", "-Wextra", "-std=c99", "-fno-strict-aliasing"]

# name -> (header, library, a program that must compile and link)
PROBES = {
    "zlib": ("zlib.h", "z",
             "#include <zlib.h>\n"
             "int main(void) { z_stream s = {0};"
             " return inflateInit2(&s, -12) == Z_OK ? inflateEnd(&s) : 1; }\n"),
    "zstd": ("zstd.h", "zstd",
             "#include <zstd.h>\n#include <zstd_errors.h>\n"
             "int main(void) { ZSTD_DCtx *d = ZSTD_createDCtx();"
             " ZSTD_DCtx_reset(d, ZSTD_reset_session_only);"
             " ZSTD_CCtx *c = ZSTD_createCCtx();"
             " (void)ZSTD_getErrorCode(0);"
             " ZSTD_CCtx_setParameter(c, ZSTD_c_compressionLevel, 3);"
             " (void)ZSTD_compress2(c, 0, 0, \"\", 0);"
             " ZSTD_freeCCtx(c); return (int)ZSTD_freeDCtx(d); }\n"),
    "libdeflate": ("libdeflate.h", "deflate",
                   "#include <libdeflate.h>\n"
                   "int main(void) { size_t a, b; char o[1];"
                   " struct libdeflate_decompressor *d ="
                   " libdeflate_alloc_decompressor();"
                   " libdeflate_deflate_decompress_ex(d, \"\", 0, o, 1, &a, &b);"
                   " libdeflate_free_decompressor(d); return 0; }\n"),
}


def _compiler() -> list[str]:
    cc = os.environ.get("CC") or sysconfig.get_config_var("CC") or "cc"
    return shlex.split(cc)


def _probe(name: str) -> bool:
    """True when the library's header and shared library are usable."""
    _header, lib, program = PROBES[name]
    tmp = tempfile.mkdtemp(prefix="qcow2-probe-")
    try:
        src = os.path.join(tmp, "probe.c")
        with open(src, "w") as f:
            f.write(program)
        cmd = _compiler() + [src, "-o", os.path.join(tmp, "probe"), "-l" + lib]
        cflags = os.environ.get("CFLAGS", "")
        ldflags = os.environ.get("LDFLAGS", "")
        cmd += shlex.split(cflags) + shlex.split(ldflags)
        try:
            res = subprocess.run(cmd, stdout=subprocess.DEVNULL,
                                 stderr=subprocess.DEVNULL, timeout=120)
        except (OSError, subprocess.SubprocessError):
            return False
        return res.returncode == 0
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _read_cdef() -> str:
    parts = []
    for path in (HEADER, *EXTRA_HEADERS):
        with open(path) as f:
            parts.append(f.read())
    return "\n".join(parts)


def _relative(path: str) -> str:
    # setuptools wants source paths relative to the directory setup.py runs in.
    try:
        return os.path.relpath(path)
    except ValueError:  # another drive on Windows
        return path


WITHOUT = {w.strip() for w in os.environ.get("QCOW2_NATIVE_WITHOUT", "").split(",")
           if w.strip()}
FOUND = {name: name not in WITHOUT and _probe(name) for name in PROBES}

if REQUIRE_NATIVE:
    missing = [name for name, ok in FOUND.items() if not ok]
    if missing:
        raise RuntimeError(
            "QCOW2_REQUIRE_NATIVE=1 but these libraries (headers + shared "
            "objects) were not found: %s" % ", ".join(missing))

define_macros = []
libraries = []
if FOUND["zlib"]:
    libraries.append("z")
    if FOUND["zstd"]:
        define_macros.append(("HAVE_ZSTD", "1"))
        libraries.append("zstd")
    if FOUND["libdeflate"]:
        define_macros.append(("HAVE_LIBDEFLATE", "1"))
        libraries.append("deflate")
    preamble = ""
else:
    # Fail at compile time (caught by setup.py's build_ext), not at import.
    preamble = '#error "zlib (zlib.h, -lz) not found: native core not built"\n'



def make_builder() -> FFI:
    """The FFI builder; source paths are relative to the current directory."""
    ffi = FFI()
    ffi.cdef(_read_cdef())
    ffi.set_source(
        "qcow2._native",
        preamble + '#include <stddef.h>\n#include <stdint.h>\n#include "qcow2_native.h"\n'
        '#include "qcow2_check.h"\n#include "xts.h"\n',
        sources=[_relative(p) for p in sorted(glob.glob(os.path.join(HERE, "*.c")))
                 if not os.path.basename(p).startswith("_")],
        include_dirs=[_relative(HERE)],
        define_macros=define_macros,
        libraries=libraries,
        extra_compile_args=CFLAGS,
    )
    return ffi


ffibuilder = make_builder()


if __name__ == "__main__":
    # Stand-alone build into the package directory next to this folder.
    sys.stderr.write("qcow2 native: %s\n" % ", ".join(
        "%s=%s" % (k, "yes" if v else "no") for k, v in FOUND.items()))
    os.chdir(os.path.dirname(HERE))   # cffi builds in tmpdir: make it the root
    make_builder().compile(tmpdir=".", verbose=True)
