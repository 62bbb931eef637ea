"""convert's background syncs in the flushing modes (qcow2.atomic.BackgroundSync): the
output is synced while the data comes, a failed background sync fails the convert
(nothing left behind), ``-t unsafe`` never syncs."""

from __future__ import annotations

import errno
import os
import threading

import pytest

import qcow2
from qcow2 import atomic

MiB = 1 << 20


def test_background_sync_runs_and_reports(tmp_path, monkeypatch):
    calls = []
    gate = threading.Event()

    def fake(fd):
        calls.append(fd)
        gate.wait(5)
        raise OSError(errno.EIO, "Input/output error")

    monkeypatch.setattr(os, "fdatasync", fake)
    with open(tmp_path / "f", "wb") as f:
        s = atomic.BackgroundSync(f.fileno(), step=100)
        s.wrote(99)
        assert calls == []                       # not a step yet
        s.wrote(1)
        s.wrote(500)                             # one in flight: no second one
        gate.set()
        with pytest.raises(OSError) as exc:
            s.close()
        assert exc.value.errno == errno.EIO
        assert calls == [f.fileno()]
        s.close()                                # reported once
        s.wrote(100)
        s.close(check=False)                     # a second one, its error dropped
        assert len(calls) == 2


def _source(tmp_path):
    raw = tmp_path / "src.raw"
    with open(raw, "wb") as f:
        f.truncate(24 * MiB)
        for off in range(0, 24 * MiB, 3 * MiB):
            f.seek(off + 4096)
            f.write(os.urandom(2 * MiB))
    img = tmp_path / "src.qcow2"
    qcow2.convert(raw, img, out_format="qcow2", cache="unsafe")
    return raw, img


@pytest.mark.parametrize("fmt", ["raw", "qcow2"])
def test_flushing_convert_syncs_in_the_background(tmp_path, monkeypatch, fmt):
    raw, img = _source(tmp_path)
    synced = []
    real = os.fdatasync
    monkeypatch.setattr(atomic, "SYNC_STEP", 1 * MiB)
    monkeypatch.setattr(os, "fdatasync", lambda fd: (synced.append(fd), real(fd)))
    dst = tmp_path / f"out.{fmt}"
    qcow2.convert(img, dst, out_format=fmt, cache="writeback")
    assert synced
    if fmt == "raw":
        assert dst.read_bytes() == raw.read_bytes()
    synced.clear()
    dst.unlink()
    qcow2.convert(img, dst, out_format=fmt, cache="unsafe")
    assert synced == []


@pytest.mark.parametrize("fmt", ["raw", "qcow2"])
def test_failed_background_sync_fails_the_convert(tmp_path, monkeypatch, fmt):
    _raw, img = _source(tmp_path)
    before = sorted(os.listdir(tmp_path))

    def fail(fd):
        raise OSError(errno.EIO, "Input/output error")

    monkeypatch.setattr(atomic, "SYNC_STEP", 1 * MiB)
    monkeypatch.setattr(os, "fdatasync", fail)
    with pytest.raises(OSError) as exc:
        qcow2.convert(img, tmp_path / f"out.{fmt}", out_format=fmt, cache="writeback")
    assert exc.value.errno == errno.EIO
    assert sorted(os.listdir(tmp_path)) == before


def test_raw_to_raw_syncs_in_the_background(tmp_path, monkeypatch):
    """The sparse copy (raw -> raw) too; its failure leaves nothing behind."""
    raw, _img = _source(tmp_path)
    synced = []
    real = os.fdatasync
    monkeypatch.setattr(atomic, "SYNC_STEP", 1 * MiB)
    monkeypatch.setattr(os, "fdatasync", lambda fd: (synced.append(fd), real(fd)))
    dst = tmp_path / "out.raw"
    qcow2.convert(raw, dst, out_format="raw", cache="writeback")
    assert synced and dst.read_bytes() == raw.read_bytes()
    dst.unlink()
    before = sorted(os.listdir(tmp_path))

    def fail(fd):
        raise OSError(errno.EIO, "Input/output error")

    monkeypatch.setattr(os, "fdatasync", fail)
    with pytest.raises(OSError):
        qcow2.convert(raw, dst, out_format="raw", cache="writeback")
    assert sorted(os.listdir(tmp_path)) == before


def test_dropped_buffer_reads_zeros_and_is_reusable():
    """convert gives the pages of a window buffer that got little data back
    (atomic.drop_pages): the buffer then reads as zeros and takes data again."""
    buf = atomic.io_buffer(1 * MiB)
    buf[4096:8192] = b"\x07" * 4096
    atomic.drop_pages(buf)
    assert bytes(buf) == bytes(1 * MiB)
    buf[:3] = b"abc"
    assert bytes(buf[:4]) == b"abc\0"
    atomic.drop_pages(memoryview(bytearray(16)))     # not an io_buffer: nothing happens
