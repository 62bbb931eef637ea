"""check --untrusted opens the image once: the file that is scanned is the file that is
checked (no window for a swapped file between a vetting open and the check's own)."""

from __future__ import annotations

import json
import os
import shutil
import struct
import subprocess

import pytest

pytestmark = pytest.mark.skipif(not (shutil.which("qemu-img") and shutil.which("qemu-io")),
                                reason="qemu-img/qemu-io not installed")


def _make(tmp_path):
    p = tmp_path / "c.qcow2"
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(p), "64M"], check=True)
    subprocess.run(["qemu-io", "-f", "qcow2", "-c", "write -P 1 0 256k", str(p)], check=True,
                   capture_output=True)
    return p


def _count_opens(monkeypatch, path):
    real = os.open
    target = os.path.realpath(path)
    opened = []

    def counting_open(name, *a, **kw):
        if isinstance(name, (str, bytes, os.PathLike)) and \
                os.path.realpath(os.fsdecode(name)) == target:
            opened.append(name)
        return real(name, *a, **kw)

    monkeypatch.setattr(os, "open", counting_open)
    return opened


def test_cli_check_untrusted_opens_the_file_once(tmp_path, monkeypatch, capsys):
    from qcow2.cli import main
    p = _make(tmp_path)
    opened = _count_opens(monkeypatch, p)
    assert main(["check", "--untrusted", "--output=json", str(p)]) == 0
    assert len(opened) == 1, opened
    out = json.loads(capsys.readouterr().out)
    assert out["check-errors"] == 0 and out["format"] == "qcow2"
    # the trusted path gives the same answer
    opened.clear()
    assert main(["check", "--output=json", str(p)]) == 0
    assert json.loads(capsys.readouterr().out) == out


def test_library_check_untrusted_opens_once_and_scans(tmp_path, monkeypatch):
    import qcow2
    from qcow2 import UnsafeImageError
    p = _make(tmp_path)
    opened = _count_opens(monkeypatch, p)
    res = qcow2.check(p, untrusted=True)
    assert len(opened) == 1 and not res.get("corruptions") and res["check-errors"] == 0
    # the scan runs on that one open: an L2 entry pointing at the L1 table is refused
    with open(p, "rb") as f:
        f.seek(0x28)
        l1 = struct.unpack(">Q", f.read(8))[0]
        f.seek(l1)
        l2 = struct.unpack(">Q", f.read(8))[0] & 0x00FFFFFFFFFFFE00
    with open(p, "r+b") as f:
        f.seek(l2 + 8)
        f.write(struct.pack(">Q", (1 << 63) | (l1 & ~0xFFFF)))
    opened.clear()
    with pytest.raises(UnsafeImageError) as ei:
        qcow2.check(p, untrusted=True)
    assert ei.value.offset == l2 + 8 and len(opened) == 1
    with pytest.raises(UnsafeImageError):
        qcow2.check(p, untrusted=True, repair="leaks")


def test_check_untrusted_limits_and_raw(tmp_path):
    import qcow2
    from qcow2 import UnsafeImageError
    from qcow2.checker import CheckNotSupportedError
    p = _make(tmp_path)
    with pytest.raises(UnsafeImageError, match="metadata"):
        qcow2.check(p, untrusted=True, limits=qcow2.Limits(max_metadata=4096))
    r = tmp_path / "r.raw"
    r.write_bytes(bytes(4096))
    with pytest.raises(CheckNotSupportedError):
        qcow2.check(r, untrusted=True)
