"""The library's argument and usage errors are qcow2.errors exceptions (that also
subclass the builtin a generic handler expects), and its results cannot be misread."""

from __future__ import annotations

import errno
import subprocess
import sys

import pytest

import qcow2
from qcow2.errors import (ClosedImageError, ImageOpenError, InvalidOptionError, Qcow2Error)


@pytest.fixture
def image(tmp_path):
    path = tmp_path / "a.qcow2"
    qcow2.create(str(path), 1 << 20)
    return str(path)


def test_open_a_directory(tmp_path):
    with pytest.raises(ImageOpenError) as ei:
        qcow2.open(str(tmp_path))
    assert isinstance(ei.value, OSError) and isinstance(ei.value, Qcow2Error)
    assert ei.value.errno == errno.EISDIR and ei.value.filename == str(tmp_path)
    assert str(ei.value) == f"Could not open '{tmp_path}': Is a directory"


def test_open_a_missing_file(tmp_path):
    missing = str(tmp_path / "missing.qcow2")
    with pytest.raises(ImageOpenError) as ei:
        qcow2.open(missing)
    assert ei.value.errno == errno.ENOENT
    assert str(ei.value) == f"Could not open '{missing}': No such file or directory"


def test_bad_mode(image):
    with pytest.raises(InvalidOptionError, match="invalid mode 'w'"):
        qcow2.open(image, "w")


def test_writes_outside_the_disk(image):
    with qcow2.open(image, "r+") as img:
        for call in (lambda: img.pwrite(b"x", -1), lambda: img.pwrite(b"x", 1 << 20),
                     lambda: img.write_zeroes(-512, 512), lambda: img.discard(0, 2 << 20)):
            with pytest.raises(InvalidOptionError):
                call()
        with pytest.raises(ValueError):          # still a ValueError for generic handlers
            img.pwrite(b"x", -1)


def test_use_after_close(image):
    img = qcow2.open(image, "r+")
    img.close()
    for call in (lambda: img.pwrite(b"x", 0), lambda: img.flush()):
        with pytest.raises(ClosedImageError):
            call()
    img.close()                                  # closing twice is harmless


def test_compare_result_reads_right(tmp_path, image):
    other = tmp_path / "b.qcow2"
    qcow2.create(str(other), 1 << 20)
    with qcow2.open(str(other), "r+") as img:
        img.pwrite(b"\x01" * 512, 0)
    assert qcow2.compare(image, image) is None
    got = qcow2.compare(image, str(other))
    assert got, "a difference at offset 0 reads as a difference"
    assert (got.offset, got.reason) == (0, "content")


def _cli(*args, cwd=None):
    return subprocess.run([sys.executable, "-P", "-m", "qcow2", *args], capture_output=True,
                          text=True, cwd=cwd, timeout=120)


def test_spawn_help_names_units_and_uuid():
    out = _cli("compute", "spawn", "--help").stdout
    assert "--instance UUID" in out and "UUID" in out.split("--instance UUID", 1)[1]
    assert "--root-size SIZE" in out and "suffix" in out


def test_unset_instances_path_is_announced(tmp_path):
    conf = tmp_path / "nova.conf"
    conf.write_text("[DEFAULT]\n")
    res = _cli("compute", "usage", "--config", str(conf), "--output=json")
    assert "sets no [DEFAULT] instances_path" in res.stderr
    assert "/var/lib/nova/instances" in res.stderr
    conf.write_text(f"[DEFAULT]\ninstances_path = {tmp_path / 'inst'}\n")
    res = _cli("compute", "usage", "--config", str(conf))
    assert res.returncode == 0 and res.stderr == ""


def test_reads_and_extents_checked(image):
    img = qcow2.open(image)
    for call in (lambda: img.pread(10, -5), lambda: img.pread(-1, 0),
                 lambda: list(img.extents(-5000, 10)), lambda: img.file().seek(-1)):
        with pytest.raises(InvalidOptionError):
            call()
    f = img.file()
    img.close()
    for call in (lambda: img.pread(10, 0), lambda: list(img.extents()),
                 lambda: img.readinto(bytearray(4), 0)):
        with pytest.raises(ClosedImageError):
            call()
    f.close()
    with pytest.raises(ClosedImageError):
        f.read(1)


def test_fast_reads_after_close(tmp_path):
    """The lock-free read path of a read-only image stops at close too (it must never
    read through a descriptor number the process may have reused)."""
    path = str(tmp_path / "d.qcow2")
    qcow2.create(path, 1 << 20)
    with qcow2.open(path, "r+") as img:
        img.pwrite(b"\x07" * 65536, 0)
    img = qcow2.open(path)
    assert img.pread(4096, 0) == b"\x07" * 4096       # the table is now cached
    img.close()
    with pytest.raises(ClosedImageError):
        img.pread(4096, 0)
    with pytest.raises(ClosedImageError):
        img.readinto(bytearray(4096), 0)
