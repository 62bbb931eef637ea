"""Build of the qcow2 engine.

The native core (``qcow2._native``) is a cffi extension in API mode, built from
``native/``.  It is optional: when no compiler or header is available the build of
that extension is skipped and the package falls back to its pure-Python kernels
(``qcow2.implementation == "python"``).  Set ``QCOW2_REQUIRE_NATIVE=1`` to make any
native build failure fatal (CI does).

The ``qcow2`` command is a small native launcher (``native/launcher/``): it
answers a plain ``qcow2 info`` without starting Python and hands everything else to
the Python command.  Where it cannot be compiled the command is the Python script
``native/launcher/qcow2`` instead (same behaviour, slower ``info``); with
``QCOW2_REQUIRE_NATIVE=1`` a failed compile is fatal.

The RBD binding (``qcow2.backends._rbd``, built from ``native/build_rbd.py`` against
librbd-dev) is optional the same way, under its own switch ``QCOW2_REQUIRE_RBD=1``:
without it, ``rbd:`` names are refused with a clear error.
"""

import os
import shlex
import subprocess
import sys
import sysconfig

from setuptools import setup
from setuptools.command.build_ext import build_ext

from distutils.command.build_scripts import build_scripts  # noqa: E402 (setuptools' copy)


REQUIRE_NATIVE = os.environ.get("QCOW2_REQUIRE_NATIVE", "") not in ("", "0")
REQUIRE_RBD = os.environ.get("QCOW2_REQUIRE_RBD", "") not in ("", "0")
RBD_EXTENSION = "qcow2.backends._rbd"


class optional_build_ext(build_ext):
    """build_ext that degrades to the Python kernels instead of failing."""

    def run(self):
        try:
            super().run()
        except Exception as exc:  # noqa: BLE001 - any toolchain failure
            if REQUIRE_NATIVE:
                raise
            self._warn(exc)

    def build_extension(self, ext):
        try:
            super().build_extension(ext)
        except Exception as exc:  # noqa: BLE001
            if REQUIRE_RBD if ext.name == RBD_EXTENSION else REQUIRE_NATIVE:
                raise
            if ext.name == RBD_EXTENSION:
                sys.stderr.write("WARNING: the RBD binding could not be built (%s); "
                                 "rbd: names will be refused.\n" % (exc,))
                return
            self._warn(exc)

    @staticmethod
    def _warn(exc):
        sys.stderr.write(
            "WARNING: the qcow2 native core could not be built (%s); "
            "the pure-Python kernels will be used.\n" % (exc,))


class launcher_build_scripts(build_scripts):
    """build_scripts that replaces the Python ``qcow2`` script by the native launcher
    when it compiles (the script stays where it does not)."""

    LAUNCHER = [os.path.join("native", "launcher", f)
                for f in ("launcher.c", "image.c", "print.c", "convert.c")]
    # convert.c's work needs libzstd, libdeflate and threads; without them the
    # launcher is built with every convert going to Python (QCOW2_NO_CONVERT)
    CONVERT_LIBS = ["-lzstd", "-ldeflate", "-lpthread"]

    def run(self):
        super().run()
        target = os.path.join(self.build_dir, "qcow2")
        try:
            self._compile(target)
        except Exception as exc:  # noqa: BLE001 - any toolchain failure
            if REQUIRE_NATIVE:
                raise
            sys.stderr.write("WARNING: the native qcow2 launcher could not be built (%s); "
                             "the qcow2 command is the Python script.\n" % (exc,))

    def _compile(self, target):
        cc = shlex.split(os.environ.get("CC") or sysconfig.get_config_var("CC") or "cc")
        tmp = target + ".native"
        # the interpreter that builds is the one the command runs (the launcher also
        # finds the one beside it in a virtual environment)
        python = os.path.abspath(sys.executable)
        base = cc + ["-O2", "-Wall", "-Wextra", "-std=c99",
                     "-DQCOW2_PYTHON=%s" % _c_string(python), *self.LAUNCHER, "-o", tmp]
        flags = (shlex.split(os.environ.get("CFLAGS", ""))
                 + shlex.split(os.environ.get("LDFLAGS", "")))
        res = None
        for extra in (self.CONVERT_LIBS, ["-DQCOW2_NO_CONVERT"]):
            cmd = base + ["-lm"] + extra + flags
            res = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                 timeout=300)
            if res.returncode == 0:
                break
            if REQUIRE_NATIVE:
                break
            if extra is self.CONVERT_LIBS:
                sys.stderr.write("WARNING: the launcher's native convert could not be "
                                 "built; every convert goes to Python.\n")
        if res.returncode != 0:
            raise RuntimeError("%s failed: %s" % (" ".join(cmd),
                                                  res.stdout.decode(errors="replace")))
        os.chmod(tmp, 0o755)
        os.replace(tmp, target)


def _c_string(text):
    """``text`` as a C string literal."""
    return '"%s"' % text.replace("\\", "\\\\").replace('"', '\\"')


setup(
    name="qcow2",
    version="0.1.0",
    description="A Python engine for QEMU's qcow2 disk-image format with a small C core",
    python_requires=">=3.11",
    packages=["qcow2", "qcow2.cli", "qcow2.ops", "qcow2.compute", "qcow2.backends",
              "qcow2.checker", "qcow2.kernels", "qcow2.untrusted", "qcow2.nbd"],
    package_dir={"qcow2.backends": "backends"},
    setup_requires=["cffi>=1.16"],
    cffi_modules=["native/build_native.py:ffibuilder", "native/build_rbd.py:ffibuilder"],
    install_requires=["cffi>=1.16", "numpy>=1.24", "zstandard>=0.21", "cryptography>=41"],
    extras_require={
        "test": ["pytest>=7", "hypothesis>=6", "pytest-benchmark>=4"],
        "fuzz": ["atheris>=2.3"],
    },
    scripts=["native/launcher/qcow2"],
    cmdclass={"build_ext": optional_build_ext, "build_scripts": launcher_build_scripts},
    zip_safe=False,
)
