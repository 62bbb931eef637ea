"""Build of the qcow2 engine.

The native core (``qcow2._native``) is a cffi extension in API mode, built from
``native/``.  It is optional: when no compiler or header is available the build of
that extension is skipped and the package falls back to its pure-Python kernels
(``qcow2.implementation == "python"``).  Set ``QCOW2_REQUIRE_NATIVE=1`` to make any
native build failure fatal (CI does).

The RBD binding (``qcow2.backends._rbd``, built from ``native/build_rbd.py`` against
librbd-dev) is optional the same way, under its own switch ``QCOW2_REQUIRE_RBD=1``:
without it, ``rbd:`` names are refused with a clear error.
"""

import os
import sys

from setuptools import setup
from setuptools.command.build_ext import build_ext


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
    entry_points={"console_scripts": ["qcow2=qcow2.cli:run"]},
    cmdclass={"build_ext": optional_build_ext},
    zip_safe=False,
)
