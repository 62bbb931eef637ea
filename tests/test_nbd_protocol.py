"""The NBD server at the byte level: a minimal client written here from the
specification (NetworkBlockDevice doc/proto.md, numbers spelled out again rather than
imported from the server) sends good, odd and hostile messages.

A hostile request drops only its own connection, with a log line; the server and its
other clients go on; a client that vanishes mid-request leaves the image clean.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import struct

import pytest
from nbdserver import Server, run

pytestmark = pytest.mark.skipif(not (shutil.which("qemu-img") and shutil.which("nbdinfo")),
                                reason="needs qemu-utils and libnbd-bin")

MiB = 1 << 20
NBDMAGIC, IHAVEOPT, REPLY_MAGIC = 0x4E42444D41474943, 0x49484156454F5054, 0x3E889045565A9
REQ_MAGIC, SIMPLE_MAGIC, CHUNK_MAGIC = 0x25609513, 0x67446698, 0x668E33EF
OPT_EXPORT_NAME, OPT_ABORT, OPT_LIST, OPT_STARTTLS, OPT_INFO, OPT_GO = 1, 2, 3, 5, 6, 7
OPT_STRUCTURED, OPT_LIST_META, OPT_SET_META = 8, 9, 10
REP_ACK, REP_SERVER, REP_INFO, REP_META = 1, 2, 3, 4
ERR_UNSUP, ERR_POLICY, ERR_INVALID, ERR_UNKNOWN = (1 << 31) + 1, (1 << 31) + 2, \
    (1 << 31) + 3, (1 << 31) + 6
READ, WRITE, DISC, FLUSH, TRIM, BLOCK_STATUS = 0, 1, 2, 3, 4, 7
FUA, DF = 1, 4
T_NONE, T_DATA, T_HOLE, T_BS, T_ERROR = 0, 1, 2, 5, 32769
EPERM, EINVAL = 1, 22


class Client:
    def __init__(self, path):
        self.s = socket.socket(socket.AF_UNIX)
        self.s.settimeout(60)
        self.s.connect(path)

    def recv(self, n: int) -> bytes:
        out = bytearray()
        while len(out) < n:
            k = self.s.recv(n - len(out))
            if not k:
                raise EOFError(f"closed after {len(out)} of {n} bytes")
            out += k
        return bytes(out)

    def closed_by_server(self) -> bool:
        """True when the server has closed the connection (after any pending bytes)."""
        try:
            while True:
                if not self.s.recv(1 << 16):
                    return True
        except (ConnectionResetError, BrokenPipeError):
            return True

    def hello(self, flags: int = 3) -> int:
        magic, opt, hflags = struct.unpack(">QQH", self.recv(18))
        assert (magic, opt) == (NBDMAGIC, IHAVEOPT)
        assert hflags & 1                                  # fixed newstyle
        self.s.sendall(struct.pack(">I", flags))
        return hflags

    def option(self, opt: int, data: bytes = b"", magic: int = IHAVEOPT, length=None):
        self.s.sendall(struct.pack(">QII", magic, opt, len(data) if length is None else length)
                       + data)

    def reply(self, opt: int):
        magic, ropt, kind, n = struct.unpack(">QIII", self.recv(20))
        assert magic == REPLY_MAGIC and ropt == opt
        return kind, self.recv(n)

    def replies(self, opt: int):
        out = []
        while True:
            kind, data = self.reply(opt)
            out.append((kind, data))
            if kind == REP_ACK or kind & (1 << 31):
                return out

    def go(self, name: str = "disk", structured: bool = True, meta: bool = True):
        if structured:
            self.option(OPT_STRUCTURED)
            assert self.replies(OPT_STRUCTURED) == [(REP_ACK, b"")]
        if meta:
            q = b"base:allocation"
            self.option(OPT_SET_META, _name(name) + struct.pack(">I", 1) + _name(q))
            got = self.replies(OPT_SET_META)
            assert got[0][0] == REP_META and got[0][1][4:] == q and got[-1][0] == REP_ACK
        self.option(OPT_GO, _name(name) + struct.pack(">H", 0))
        got = self.replies(OPT_GO)
        assert got[-1][0] == REP_ACK, got
        info = [d for k, d in got if k == REP_INFO and d[:2] == b"\0\0"][0]
        size, flags = struct.unpack(">QH", info[2:])
        return size, flags

    def request(self, kind: int, offset: int, length: int, flags: int = 0, cookie: int = 7,
                payload: bytes = b"", magic: int = REQ_MAGIC):
        self.s.sendall(struct.pack(">IHHQQI", magic, flags, kind, cookie, offset, length)
                       + payload)

    def simple(self):
        magic, err, cookie = struct.unpack(">IIQ", self.recv(16))
        assert magic == SIMPLE_MAGIC
        return err, cookie

    def chunks(self):
        """Every chunk of one structured reply: [(type, payload)]."""
        out = []
        while True:
            magic, flags, kind, _cookie, n = struct.unpack(">IHHQI", self.recv(20))
            assert magic == CHUNK_MAGIC
            out.append((kind, self.recv(n)))
            if flags & 1:
                return out

    def close(self):
        self.s.close()


def _name(name) -> bytes:
    raw = name.encode() if isinstance(name, str) else name
    return struct.pack(">I", len(raw)) + raw


@pytest.fixture
def image(tmp_path):
    p = tmp_path / "p.qcow2"
    run("qemu-img", "create", "-f", "qcow2", p, "8M")
    run("qemu-io", "-c", "write -P 0x5a 1M 1M", p)
    return p


@pytest.fixture
def server(image, tmp_path):
    with Server(image, tmp_path, "-t", "-e", "0") as srv:
        yield srv


def _still_serves(srv):
    assert srv.alive(), srv.log()
    assert int(run("nbdinfo", "--size", srv.uri).stdout) == 8 * MiB


def test_handshake_reads_and_sparse_read_replies(server):
    c = Client(server.socket)
    assert c.hello() & 2                                   # NO_ZEROES offered
    size, flags = c.go()
    assert size == 8 * MiB and flags & 1 and flags & (1 << 8)   # HAS_FLAGS, multi-conn
    c.request(READ, 0, 2 * MiB)
    chunks = c.chunks()
    holes = [struct.unpack(">QI", d) for k, d in chunks if k == T_HOLE]
    data = [(struct.unpack(">Q", d[:8])[0], d[8:]) for k, d in chunks if k == T_DATA]
    assert holes == [(0, MiB)]                              # the unallocated MiB: no bytes
    assert data == [(MiB, b"\x5a" * MiB)]
    c.request(READ, 0, 2 * MiB, flags=DF)                   # don't fragment: one data chunk
    assert [(k, len(d)) for k, d in c.chunks()] == [(T_DATA, 8 + 2 * MiB)]
    c.request(BLOCK_STATUS, 0, 8 * MiB)
    (kind, body), = c.chunks()
    ext = struct.unpack(f">I{(len(body) - 4) // 4}I", body)
    assert kind == T_BS and ext[1:] == (MiB, 3, MiB, 0, 6 * MiB, 3)
    c.request(DISC, 0, 0)
    assert c.closed_by_server()
    _still_serves(server)


def test_options_list_info_and_refusals(server):
    c = Client(server.socket)
    c.hello()
    c.option(OPT_LIST)
    assert c.replies(OPT_LIST) == [(REP_SERVER, _name("disk")), (REP_ACK, b"")]
    c.option(OPT_LIST, b"x")
    assert c.replies(OPT_LIST)[-1][0] == ERR_INVALID
    c.option(OPT_STARTTLS)
    assert c.replies(OPT_STARTTLS)[-1][0] == ERR_POLICY
    c.option(77, b"abc")
    assert c.replies(77)[-1][0] == ERR_UNSUP
    c.option(OPT_INFO, _name("nope") + struct.pack(">H", 0))
    assert c.replies(OPT_INFO)[-1][0] == ERR_UNKNOWN
    c.option(OPT_INFO, _name("disk") + struct.pack(">H", 5))        # count overruns
    assert c.replies(OPT_INFO)[-1][0] == ERR_INVALID
    c.option(OPT_LIST_META, _name("disk") + struct.pack(">I", 0))   # before structured
    assert c.replies(OPT_LIST_META)[-1][0] == ERR_INVALID
    c.option(OPT_STRUCTURED)
    c.replies(OPT_STRUCTURED)
    c.option(OPT_LIST_META, _name("disk") + struct.pack(">I", 0))
    got = c.replies(OPT_LIST_META)
    assert [(k, d[4:]) for k, d in got] == [(REP_META, b"base:allocation"), (REP_ACK, b"")]
    c.option(OPT_INFO, _name("disk") + struct.pack(">HHH", 2, 1, 2))  # name, description
    got = c.replies(OPT_INFO)
    assert (REP_INFO, b"\0\x01disk") in got and got[-1] == (REP_ACK, b"")
    c.option(OPT_ABORT)
    assert c.replies(OPT_ABORT) == [(REP_ACK, b"")]
    assert c.closed_by_server()
    _still_serves(server)


def test_export_name_and_simple_replies(server):
    c = Client(server.socket)
    c.hello(flags=1)                                       # no NO_ZEROES: 124 zero bytes
    c.option(OPT_EXPORT_NAME, b"disk")
    size, flags = struct.unpack(">QH", c.recv(10))
    assert size == 8 * MiB and c.recv(124) == bytes(124)
    c.request(READ, MiB - 4, 8, cookie=99)
    assert c.simple() == (0, 99) and c.recv(8) == bytes(4) + b"\x5a" * 4
    c.request(BLOCK_STATUS, 0, 4096)                       # no context negotiated
    assert c.simple() == (EINVAL, 7)
    c.request(WRITE, 0, 3, payload=b"abc", flags=FUA)
    assert c.simple() == (0, 7)
    c.request(FLUSH, 0, 0)
    assert c.simple() == (0, 7)
    c.request(READ, 0, 3)
    assert c.simple() == (0, 7) and c.recv(3) == b"abc"
    c.close()


def test_unknown_export_name_drops(server):
    c = Client(server.socket)
    c.hello()
    c.option(OPT_EXPORT_NAME, b"nope")
    assert c.closed_by_server()
    _still_serves(server)


@pytest.mark.parametrize("attack", ["client-flags", "option-magic", "option-length",
                                    "request-magic", "oversized-write"])
def test_hostile_messages_drop_only_that_connection(server, attack):
    good = Client(server.socket)                            # a client already being served
    good.hello()
    good.go()
    c = Client(server.socket)
    if attack == "client-flags":
        c.hello(flags=0x80)
    else:
        c.hello()
        if attack == "option-magic":
            c.option(OPT_LIST, magic=0x1234)
        elif attack == "option-length":
            c.option(OPT_LIST, length=1 << 30)
        else:
            c.go()
            if attack == "request-magic":
                c.request(READ, 0, 4096, magic=0xDEADBEEF)
            else:
                c.request(WRITE, 0, 64 * MiB)               # over the 32 MiB request cap
    assert c.closed_by_server()
    good.request(READ, MiB, 4096, cookie=5)                # the other client goes on
    assert good.chunks() == [(T_DATA, struct.pack(">Q", MiB) + b"\x5a" * 4096)]
    _still_serves(server)
    assert "protocol error" in server.log()


def test_wrong_requests_get_errors_and_the_connection_goes_on(server):
    c = Client(server.socket)
    c.hello()
    c.go()
    cases = [(READ, 8 * MiB - 10, 20, 0, b""), (READ, 0, 33 * MiB, 0, b""),
             (WRITE, 8 * MiB, 4, 0, b"wxyz"), (TRIM, 7 * MiB, 2 * MiB, 0, b""),
             (BLOCK_STATUS, 0, 0, 0, b""), (READ, 0, 512, 0x40, b""), (42, 0, 0, 0, b"")]
    for kind, off, n, flags, payload in cases:
        c.request(kind, off, n, flags=flags, payload=payload)
        (t, body), = c.chunks()
        assert t == T_ERROR and struct.unpack(">I", body[:4])[0] == EINVAL, (kind, off, n)
    c.request(READ, MiB, 4)
    assert c.chunks() == [(T_DATA, struct.pack(">Q", MiB) + b"\x5a" * 4)]
    c.close()
    _still_serves(server)


def test_read_only_export_refuses_writes(image, tmp_path):
    with Server(image, tmp_path, "-r", "-t") as srv:
        c = Client(srv.socket)
        c.hello()
        _size, flags = c.go()
        assert flags & 2                                    # READ_ONLY
        c.request(WRITE, 0, 4, payload=b"abcd")
        (t, body), = c.chunks()
        assert t == T_ERROR and struct.unpack(">I", body[:4])[0] == EPERM
        c.request(READ, MiB, 4)
        assert c.chunks()[0][1][8:] == b"\x5a" * 4
        c.close()


def test_client_vanishing_mid_request_leaves_the_image_clean(image, tmp_path):
    with Server(image, tmp_path, "-t", "-e", "0") as srv:
        c = Client(srv.socket)
        c.hello()
        c.go()
        for i in range(8):                                  # writes never acknowledged
            c.request(WRITE, i * 512 * 1024 + 1000, 300_000, payload=bytes([i + 1]) * 300_000)
        c.request(WRITE, 6 * MiB, MiB, payload=b"\x77" * 100_000)   # payload cut short
        c.close()
        r = Client(srv.socket)                              # a reader that never reads
        r.hello()
        r.go()
        for i in range(16):
            r.request(READ, 0, 8 * MiB, cookie=i, flags=DF)
        r.close()
        _still_serves(srv)
    r = run("qemu-img", "check", image, check=False)
    assert r.returncode == 0, r.stdout + r.stderr
    run("qemu-io", "-c", "read -P 0 6M 1M", image)         # the cut write never happened


def test_library_serves_several_exports(image, tmp_path):
    import qcow2
    from qcow2.nbd import Export, NBDServer
    other = tmp_path / "o.raw"
    other.write_bytes(b"\x42" * MiB)
    sock = str(tmp_path / "lib.sock")
    with qcow2.open(image) as a, qcow2.open(other, "r+", format="raw") as b:
        exports = [Export(a, "a", description="qcow2"), Export(b, "b")]
        with NBDServer(exports, socket_path=sock, persistent=True, shared=0):
            out = json.loads(run("nbdinfo", "--list", "--json",
                                 f"nbd+unix:///?socket={sock}").stdout)
            assert sorted(e["export-name"] for e in out["exports"]) == ["a", "b"]
            run("qemu-io", "-f", "raw", "-c", "write -P 0x43 0 4k", f"nbd+unix:///b?socket={sock}")
            run("qemu-img", "compare", "-F", "raw", image, f"nbd+unix:///a?socket={sock}")
    assert other.read_bytes()[:4097] == b"\x43" * 4096 + b"\x42"


def test_tcp_listener(image, tmp_path):
    import qcow2
    from qcow2.nbd import NBDServer
    with qcow2.open(image) as img:
        with NBDServer(img, host="127.0.0.1", port=0, shared=0, persistent=True) as srv:
            host, port = srv.address
            uri = f"nbd://{host}:{port}/"
            assert int(run("nbdinfo", "--size", uri).stdout) == 8 * MiB
            run("qemu-img", "compare", "-F", "raw", image, uri)


def _peak_rss_mib(pid: int) -> float:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    raise AssertionError("no VmHWM")


def test_memory_of_a_connection_is_bounded(tmp_path):
    """24 reads of 32 MiB sent at once (768 MiB of replies): the server holds at most
    its 64 MiB budget of them at a time."""
    p = tmp_path / "big.qcow2"
    run("qemu-img", "create", "-f", "qcow2", p, "64M")
    with Server(p, tmp_path, "-r", "-t") as srv:
        c = Client(srv.socket)
        c.hello()
        c.go()
        c.request(READ, 0, 4 * MiB, flags=DF)                # warm: a worker's kept buffer
        c.chunks()
        base = _peak_rss_mib(srv.proc.pid)
        for i in range(24):
            c.request(READ, (i % 2) * 32 * MiB, 32 * MiB, cookie=i, flags=DF)
        for _ in range(24):
            (kind, body), = c.chunks()
            assert kind == T_DATA and len(body) == 8 + 32 * MiB
        peak = _peak_rss_mib(srv.proc.pid)
        c.close()
    # the 64 MiB budget (two 32 MiB reads in flight), not the four workers' 128 MiB
    assert peak - base < 64 + 16, f"server peak RSS grew from {base:.0f} to {peak:.0f} MiB"


@pytest.fixture
def layered(tmp_path):
    """A read-only export's every read path: data clusters (sent by sendfile from the
    file), compressed clusters (decoded into a buffer), zero clusters, unallocated ones
    over a backing file (the backing's own pieces), and a data cluster cut short by the
    end of the file (zeros past it)."""
    base, top = tmp_path / "base.qcow2", tmp_path / "top.qcow2"
    run("qemu-img", "create", "-f", "qcow2", base, "4M")
    run("qemu-io", "-c", "write -P 0x11 0 3M", "-c", "write -c -P 0x12 3M 64k", base)
    run("qemu-img", "create", "-f", "qcow2", "-b", base.name, "-F", "qcow2", top, "6M")
    run("qemu-io", "-c", "write -P 0x21 64k 200k", "-c", "write -c -P 0x22 1M 128k",
        "-c", "write -z 1536k 64k", "-c", "write -P 0x23 2M 64k",
        "-c", "write -P 0x24 5M 64k", top)
    want = bytearray(open(_raw(tmp_path, top), "rb").read())
    # the last data cluster (5M) lies at the end of the file: cut it short
    m = json.loads(run("qemu-img", "map", "--output=json", top).stdout)
    host = [e["offset"] for e in m if e["start"] == 5 * MiB and e["depth"] == 0][0]
    assert host + 65536 == top.stat().st_size
    os.truncate(top, host + 5000)
    want[5 * MiB + 5000:5 * MiB + 65536] = bytes(65536 - 5000)
    return top, bytes(want)


def _raw(tmp_path, path):
    out = tmp_path / "ref.raw"
    run("qemu-img", "convert", "-O", "raw", path, out)
    return out


def _read_all(c, size, step, flags=0, structured=True):
    got = bytearray(size)
    for off in range(0, size, step):
        n = min(step, size - off)
        c.request(READ, off, n, flags=flags, cookie=off)
        if not structured:
            err, cookie = c.simple()
            assert (err, cookie) == (0, off)
            got[off:off + n] = c.recv(n)
            continue
        seen = 0
        for kind, body in c.chunks():
            if kind == T_DATA:
                at = struct.unpack(">Q", body[:8])[0]
                got[at:at + len(body) - 8] = body[8:]
                seen += len(body) - 8
            else:
                assert kind == T_HOLE and not flags & DF, kind
                at, k = struct.unpack(">QI", body)
                got[at:at + k] = bytes(k)
                seen += k
        assert seen == n, (off, seen, n)
    return bytes(got)


@pytest.mark.parametrize("mode", ["structured", "df", "simple"])
def test_read_only_reads_every_piece_kind(layered, tmp_path, mode):
    path, want = layered
    assert os.path.getsize(path) % 65536 != 0
    with Server(path, tmp_path, "-r", "-t", "-e", "0") as srv:
        c = Client(srv.socket)
        if mode == "simple":
            c.hello(flags=1)
            c.option(OPT_EXPORT_NAME, b"disk")
            size, _flags = struct.unpack(">QH", c.recv(10))
            c.recv(124)
        else:
            c.hello()
            size, _flags = c.go()
        assert size == len(want)
        for step in (4096, 100_000, 256 << 10, 6 * MiB):
            got = _read_all(c, size, step, DF if mode == "df" else 0, mode != "simple")
            assert got == want, step
        c.close()
        assert srv.alive(), srv.log()


def test_adjacent_reads_sent_at_once_each_get_their_reply(layered, tmp_path):
    """A worker takes the adjacent READs already received as one batch (one read
    plan): every request still gets its own reply (in order: one worker here), with
    its cookie and exactly its bytes; one out of range in the batch gets its error and
    the others their data; a read that is not adjacent starts a new batch."""
    import qcow2
    from qcow2.nbd import NBDServer
    path, want = layered
    size = len(want)
    sock = str(tmp_path / "batch.sock")
    with qcow2.open(path) as img, NBDServer(img, socket_path=sock, shared=0, persistent=True,
                                            workers=1):
        for step in (4096, 100_000, 256 << 10):
            c = Client(sock)
            c.hello()
            c.go(name="")
            reqs = [(off, min(step, size - off)) for off in range(0, size, step)]
            reqs.insert(3, (size - 4096, 8192))                    # past the end: EINVAL
            reqs.insert(5, (0, 4096))                              # not adjacent
            c.s.sendall(b"".join(struct.pack(">IHHQQI", REQ_MAGIC, 0, READ, i, off, n)
                                 for i, (off, n) in enumerate(reqs)))
            for i, (off, n) in enumerate(reqs):
                got = bytearray(n)
                seen = 0
                while True:
                    magic, flags, kind, cookie, ln = struct.unpack(">IHHQI", c.recv(20))
                    assert magic == CHUNK_MAGIC and cookie == i, (i, cookie)
                    body = c.recv(ln)
                    if kind == T_DATA:
                        at = struct.unpack(">Q", body[:8])[0] - off
                        got[at:at + ln - 8] = body[8:]
                        seen += ln - 8
                    elif kind == T_HOLE:
                        at, k = struct.unpack(">QI", body)
                        seen += k
                    else:
                        assert i == 3 and kind == T_ERROR and body[:4] == struct.pack(">I", EINVAL)
                    if flags & 1:
                        break
                if i != 3:
                    assert seen == n and bytes(got) == want[off:off + n], (step, i)
            c.request(DISC, 0, 0)
            assert c.closed_by_server()
