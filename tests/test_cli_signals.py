"""SIGTERM and SIGHUP end a command as Ctrl-C does: temporary outputs are removed, and
the process then dies of the signal (its exit status says which)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGHUP, signal.SIGINT])
def test_signal_mid_convert_leaves_nothing(tmp_path, sig):
    src = tmp_path / "src.raw"
    with open(src, "wb") as f:
        for _ in range(96):
            f.write(os.urandom(1 << 20))
    out = tmp_path / "out"
    out.mkdir()
    proc = subprocess.Popen([sys.executable, "-P", "-m", "qcow2", "convert", "-m", "1",
                             "-O", "qcow2", "-c", str(src), str(out / "x.qcow2")],
                            stderr=subprocess.PIPE, text=True,
                            # the default action, even where this run inherited the
                            # signal ignored (under nohup, SIGHUP is; the CLI keeps an
                            # ignored signal ignored, as it should)
                            preexec_fn=lambda: signal.signal(sig, signal.SIG_DFL))
    try:
        for _ in range(2000):                      # until the temporary output exists
            if any(out.iterdir()) or proc.poll() is not None:
                break
            time.sleep(0.005)
        if proc.poll() is not None:
            pytest.skip("the convert finished before the signal could be sent")
        time.sleep(0.2)
        proc.send_signal(sig)
        _, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    if proc.returncode == 0:
        pytest.skip("the convert finished before the signal arrived")
    assert list(out.iterdir()) == []
    if sig == signal.SIGINT:
        assert proc.returncode == 130 and err.strip().endswith("interrupted")
    else:
        assert proc.returncode == -sig and "Traceback" not in err
