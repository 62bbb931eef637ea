"""Small helpers shared by the tests: qemu-img oracles and our CLI; byte-level pokes
for tests that build an image with qemu-img and then change single fields (big-endian
integers, the L1 / L2 / refcount tables of a 64 KiB-cluster image)."""

from __future__ import annotations

import http.server
import json
import struct
import subprocess
import sys
import threading
import time


def run(*args, check=True, cwd=None) -> subprocess.CompletedProcess:
    """Run a command (usually qemu-img/qemu-io); with ``check`` it must succeed."""
    r = subprocess.run([str(a) for a in args], capture_output=True, text=True, cwd=cwd)
    if check:
        assert r.returncode == 0, r.stdout + r.stderr
    return r


def cli(*args, cwd=None) -> subprocess.CompletedProcess:
    """Our command line, as a user runs it."""
    return subprocess.run([sys.executable, "-m", "qcow2", *[str(a) for a in args]],
                          capture_output=True, text=True, cwd=cwd)


def info(path) -> dict:
    return json.loads(run("qemu-img", "info", "-U", "--output=json", path).stdout)


def clean(path) -> None:
    """qemu-img check finds neither corruption nor leak."""
    r = run("qemu-img", "check", "--output=json", path, check=False)
    assert r.returncode == 0, r.stdout + r.stderr


# -- byte-level pokes -------------------------------------------------------------

CS = 65536
COPIED = 1 << 63


def qemu_img(*args):
    subprocess.run(["qemu-img", *map(str, args)], check=True, capture_output=True)


def qemu_io(path, *cmds, fmt="qcow2"):
    argv = ["qemu-io", "-f", fmt]
    for c in cmds:
        argv += ["-c", c]
    subprocess.run(argv + [str(path)], check=True, capture_output=True)


#: QEMU's lock bytes (block/file-posix.c): 100 + a permission is held by whoever has
#: that permission ("consistent read" 0, "write" 1, ...), 200 + it by whoever refuses
#: to share it
READ_LOCK_BYTE, WRITE_LOCK_BYTE = 100, 101


def lock_held(path, byte: int) -> bool:
    """Whether another process holds QEMU's lock ``byte`` of the file: an OFD lock
    *test*, which takes nothing (a probe that took locks, such as a qemu-img run, could
    make a starting writer fail to get its own)."""
    import fcntl
    import os
    f_ofd_getlk, f_wrlck, f_unlck = 36, 1, 2
    fd = os.open(path, os.O_RDONLY)
    try:
        res = fcntl.fcntl(fd, f_ofd_getlk, struct.pack("hhqqi4x", f_wrlck, 0, byte, 1, 0))
        return struct.unpack("hhqqi4x", res)[0] != f_unlck
    finally:
        os.close(fd)


class QemuIoWriter:
    """``with QemuIoWriter(path):`` -- qemu-io holding ``path`` open for writing (its
    locks taken) until the block ends.  Waits for the locks without taking any."""

    def __init__(self, path, timeout: float = 30.0):
        self.path, self.timeout = str(path), timeout

    def __enter__(self):
        import tempfile
        self.log = tempfile.TemporaryFile()
        self.proc = subprocess.Popen(["qemu-io", "-c", "sleep 600000", self.path],
                                     stdin=subprocess.DEVNULL, stdout=self.log,
                                     stderr=subprocess.STDOUT)
        deadline = time.monotonic() + self.timeout
        while not lock_held(self.path, WRITE_LOCK_BYTE):
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.__exit__()
                self.log.seek(0)
                raise RuntimeError(f"qemu-io did not take its locks on {self.path}: "
                                   f"{self.log.read().decode(errors='replace')!r}")
            time.sleep(0.02)
        return self

    def __exit__(self, *exc) -> None:
        self.proc.kill()
        self.proc.wait()
        self.log.close()


def u64(path, off):
    with open(path, "rb") as f:
        f.seek(off)
        return struct.unpack(">Q", f.read(8))[0]


def u32(path, off):
    with open(path, "rb") as f:
        f.seek(off)
        return struct.unpack(">I", f.read(4))[0]


def poke(path, off, data):
    with open(path, "r+b") as f:
        f.seek(off)
        f.write(data)


def poke64(path, off, v):
    poke(path, off, struct.pack(">Q", v))


def l1_off(p):
    return u64(p, 0x28)


def l2_off(p, i=0):
    return u64(p, l1_off(p) + 8 * i) & 0x00FFFFFFFFFFFE00


def reftable_off(p):
    return u64(p, 0x30)


def round_up(n, a=CS):
    return (n + a - 1) // a * a


def native_kernels():
    """The native kernels; a skip where they were not built (a failure when
    QCOW2_REQUIRE_NATIVE=1 says they must be)."""
    import os

    import pytest

    from qcow2 import kernels
    from qcow2.errors import NativeUnavailableError
    try:
        return kernels.get("native")
    except NativeUnavailableError as exc:
        if os.environ.get("QCOW2_REQUIRE_NATIVE", "") not in ("", "0"):
            pytest.fail(f"QCOW2_REQUIRE_NATIVE=1 but the native core is unavailable: {exc}")
        pytest.skip(f"native core not built: {exc}")


def random_writes(img, model: bytearray, rng, count: int, ops, max_len: int) -> None:
    """``count`` random operations from ``ops`` ("write", "zero", "discard",
    "compressed") on a writable image, mirrored into ``model`` (its expected content)."""
    size = len(model)
    cs = img.cluster_size
    for _ in range(count):
        op = rng.choice(ops)
        off = rng.randrange(size)
        n = min(rng.randrange(1, max_len), size - off)
        if op == "write":
            blob = rng.randbytes(n)
            img.pwrite(blob, off)
            model[off:off + n] = blob
        elif op == "zero":
            img.write_zeroes(off, n)
            model[off:off + n] = bytes(n)
        elif op == "discard" and img.header.version >= 3:
            img.discard(off, n)                  # v3: whole clusters read zeros after
            a, b = -(-off // cs) * cs, (off + n) // cs * cs
            if off + n == size:
                b = size
            if a < b:
                model[a:b] = bytes(b - a)
        elif op == "compressed":
            c = rng.randrange(size // cs) * cs
            blob = bytes([rng.randrange(256)]) * (cs // 2) + rng.randbytes(cs // 2)
            img.write_compressed(blob, c)
            model[c:c + cs] = blob


class ImageServer:
    """A real HTTP server on 127.0.0.1 serving ``files`` ({name: bytes}) under a few
    routes: ``/plain/NAME``, ``/slow/NAME``, ``/drop/NAME`` (closed half-way),
    ``/chunked/NAME`` (no Content-Length), ``/chunkdrop/NAME``; ``hits`` counts requests
    per path."""

    def __init__(self, files):
        self.files = files
        self.hits: dict[str, int] = {}
        server = self

        class H(http.server.BaseHTTPRequestHandler):
            def log_message(self, *a):
                pass

            def do_GET(self):
                route, _, name = self.path.strip("/").partition("/")
                server.hits[self.path] = server.hits.get(self.path, 0) + 1
                data = server.files.get(name)
                if data is None:
                    self.send_error(404)
                    return
                if route in ("chunked", "chunkdrop"):    # no Content-Length
                    self.protocol_version = "HTTP/1.1"
                    self.send_response(200)
                    self.send_header("Transfer-Encoding", "chunked")
                    self.send_header("Connection", "close")
                    self.end_headers()
                    # chunkdrop: the connection closes half-way, without the last chunk
                    end = len(data) // 2 if route == "chunkdrop" else len(data)
                    try:
                        for i in range(0, end, 256 * 1024):
                            piece = data[i:min(end, i + 256 * 1024)]
                            self.wfile.write(b"%x\r\n%s\r\n" % (len(piece), piece))
                        if route == "chunked":
                            self.wfile.write(b"0\r\n\r\n")
                        self.wfile.flush()
                        self.connection.shutdown(2)
                    except (BrokenPipeError, ConnectionResetError, OSError):
                        pass
                    return
                self.send_response(200)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                try:
                    if route == "drop":              # connection dropped half-way
                        self.wfile.write(data[:len(data) // 2])
                        self.wfile.flush()
                        self.connection.shutdown(2)
                        return
                    step = 1 << 20
                    for i in range(0, len(data), step):
                        self.wfile.write(data[i:i + step])
                        if route == "slow":
                            time.sleep(0.02)
                except (BrokenPipeError, ConnectionResetError):
                    pass

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), H)
        self.httpd.daemon_threads = True
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()
        self.base = f"http://127.0.0.1:{self.httpd.server_address[1]}"

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()
        self.thread.join(10)
