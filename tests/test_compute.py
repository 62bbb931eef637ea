"""The compute-host image flow (qcow2.compute): options, names, the base cache (local
and over real HTTP on 127.0.0.1), instance disks per images_type and option combination
(checked with qemu-img), and the cache manager's pinned nova behaviours."""

from __future__ import annotations

import hashlib
import itertools
import json
import os
import shutil
import subprocess
import sys
import threading
import time

import pytest

from helpers import ImageServer

QEMU_IMG = shutil.which("qemu-img")
needs_qemu = pytest.mark.skipif(not QEMU_IMG, reason="qemu-img (the test oracle) is not installed")
needs_mkfs = pytest.mark.skipif(not (shutil.which("mkfs.ext4") and shutil.which("resize2fs")),
                                reason="e2fsprogs is not installed")
MiB = 1 << 20
UUID1 = "11111111-2222-3333-4444-555555555555"
UUID2 = "11111111-2222-3333-4444-666666666666"


@pytest.fixture
def compute():
    from qcow2 import compute
    return compute


def qemu(*args, check=True):
    return subprocess.run([QEMU_IMG, *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                          text=True, check=check, timeout=120)


def qinfo(path):
    return json.loads(qemu("info", "-U", "--output=json", path).stdout)


def leftovers(d):
    """Files in the cache directory (temporary ones included)."""
    return sorted(os.listdir(d)) if os.path.isdir(d) else []


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    """A 64 MiB raw disk holding an unpartitioned ext4 with some files, and its qcow2."""
    if not shutil.which("mkfs.ext4"):
        pytest.skip("e2fsprogs is not installed")
    d = tmp_path_factory.mktemp("images")
    raw = d / "img.raw"
    with open(raw, "wb") as f:
        f.truncate(64 * MiB)
    content = d / "content"
    content.mkdir()
    (content / "hello").write_bytes(os.urandom(3 * MiB))
    (content / "etc" / "conf.d").mkdir(parents=True)
    (content / "etc" / "conf.d" / "motd").write_text("a small tree\n" * 100)
    subprocess.run(["mkfs.ext4", "-q", "-F", "-L", "root", "-d", str(content), str(raw)],
                   check=True)
    qc = d / "img.qcow2"
    if QEMU_IMG:
        qemu("convert", "-O", "qcow2", str(raw), str(qc))
    return {"raw": str(raw), "qcow2": str(qc), "dir": d}


def nova_disk_info(inst_dir, formats: dict) -> None:
    """disk.info as nova writes it beside the disks it made: {absolute path: format}."""
    with open(os.path.join(inst_dir, "disk.info"), "w") as f:
        json.dump({os.path.join(os.path.abspath(inst_dir), n): v for n, v in formats.items()}, f)


def make_opts(compute, tmp_path, **kw):
    return compute.Options(instances_path=str(tmp_path / "instances"), **kw)


# -- options ---------------------------------------------------------------------------

def test_options_defaults_and_ini(compute, tmp_path):
    o = compute.Options()
    assert (o.force_raw_images, o.use_cow_images, o.preallocate_images, o.images_type) == \
        (True, True, "none", "default")
    assert o.subdirectory_name == "_base" and o.manager_interval == 2400
    assert o.remove_unused_original_minimum_age_seconds == 86400
    assert o.remove_unused_resized_minimum_age_seconds == 3600
    assert o.ephemeral_format == "ext4" and o.backend == "qcow2"
    assert o.replace(use_cow_images=False).backend == "flat"
    assert o.replace(images_type="raw").backend == "flat"
    conf = tmp_path / "nova.conf"
    conf.write_text("[DEFAULT]\ninstances_path = /srv/inst\nforce_raw_images = False\n"
                    "preallocate_images = space\ndefault_ephemeral_format = ext3\n"
                    "[libvirt]\nimages_type = lvm\nimages_volume_group = vg0\n"
                    "[image_cache]\nsubdirectory_name = cache\n"
                    "remove_unused_original_minimum_age_seconds = 10\n")
    o = compute.Options.from_file(conf)
    assert o.instances_path == "/srv/inst" and o.force_raw_images is False
    assert o.preallocate_images == "space" and o.ephemeral_format == "ext3"
    assert o.backend == "lvm" and o.images_volume_group == "vg0"
    assert o.base_dir == "/srv/inst/cache" and o.lock_dir == "/srv/inst/locks"
    assert o.remove_unused_original_minimum_age_seconds == 10
    assert compute.Options.from_file(conf, instances_path="/x").instances_path == "/x"


@pytest.mark.parametrize("text, needle", [
    ("[libvirt]\nimages_type = rbd2\n", "[libvirt] images_type"),
    ("[DEFAULT]\npreallocate_images = full\n", "[DEFAULT] preallocate_images"),
    ("[DEFAULT]\nforce_raw_images = maybe\n", "[DEFAULT] force_raw_images"),
    ("[image_cache]\nmanager_interval = soon\n", "[image_cache] manager_interval"),
    ("[libvirt]\nimages_type = lvm\n", "[libvirt] images_volume_group"),
])
def test_options_invalid(compute, tmp_path, text, needle):
    from qcow2.errors import InvalidOptionError
    conf = tmp_path / "nova.conf"
    conf.write_text(text)
    with pytest.raises(InvalidOptionError) as ei:
        compute.Options.from_file(conf)
    assert needle in str(ei.value)


# -- names and locks ---------------------------------------------------------------------

def test_nova_cache_name(compute):
    assert compute.base_name("fd0cb2f1-8375-44c9-b1f4-3e1f4c4a8ef0") == \
        "0d5e6b61602d758984b3bf038267614d6016eb2a"
    assert compute.swap_name(512 * MiB) == "swap_512"
    assert compute.ephemeral_name(1 << 30, "ext4").startswith("ephemeral_1_")


def test_lock_is_nova_named(compute, tmp_path, images):
    o = make_opts(compute, tmp_path)
    compute.fetch_base(o, "img-a", images["raw"])
    assert os.listdir(o.lock_dir) == [f"nova-{compute.base_name('img-a')}"]


# -- the base cache, local sources -----------------------------------------------------------

@needs_qemu
@pytest.mark.parametrize("fmt", ["raw", "qcow2"])
@pytest.mark.parametrize("force_raw", [True, False])
def test_fetch_local(compute, tmp_path, images, fmt, force_raw):
    o = make_opts(compute, tmp_path, force_raw_images=force_raw)
    path, bfmt = compute.fetch_base(o, "img", images[fmt], disk_format=fmt)
    assert path == os.path.join(o.base_dir, compute.base_name("img"))
    assert bfmt == ("raw" if force_raw else fmt) == qinfo(path)["format"]
    qemu("compare", "-f", "raw", "-F", bfmt, images["raw"], path)
    assert os.stat(path).st_blocks * 512 < 16 * MiB          # sparse
    assert leftovers(o.base_dir) == [os.path.basename(path)]


@needs_qemu
def test_untrusted_refusals_leave_nothing(compute, tmp_path, images):
    from qcow2.errors import UnsafeImageError
    o = make_opts(compute, tmp_path)
    overlay = str(tmp_path / "overlay.qcow2")
    qemu("create", "-f", "qcow2", "-b", images["raw"], "-F", "raw", overlay)
    with pytest.raises(UnsafeImageError):
        compute.fetch_base(o, "a", overlay, disk_format="qcow2")
    datafile = str(tmp_path / "df.qcow2")
    qemu("create", "-f", "qcow2", "-o", f"data_file={tmp_path / 'df.data'}", datafile, "1M")
    with pytest.raises(UnsafeImageError):
        compute.fetch_base(o, "b", datafile, disk_format="qcow2")
    with pytest.raises(compute.ImageFormatMismatchError):
        compute.fetch_base(o, "c", images["qcow2"], disk_format="raw")
    with pytest.raises(compute.ImageFormatMismatchError):
        compute.fetch_base(o, "d", images["raw"], disk_format="qcow2")
    with pytest.raises(compute.ChecksumError):
        compute.fetch_base(o, "e", images["raw"], checksum="sha256:" + "0" * 64)
    assert leftovers(o.base_dir) == []


def test_free_space_checked_first(compute, tmp_path, images, monkeypatch):
    from qcow2.compute import fetch
    o = make_opts(compute, tmp_path)
    monkeypatch.setattr(fetch, "free_space", lambda p: 4096)
    with pytest.raises(compute.InsufficientSpaceError):
        compute.fetch_base(o, "a", images["qcow2"] if QEMU_IMG else images["raw"])
    assert leftovers(o.base_dir) == []


def test_stale_temporaries_removed(compute, tmp_path, images):
    o = make_opts(compute, tmp_path)
    name = compute.base_name("img")
    os.makedirs(o.base_dir)
    stale = os.path.join(o.base_dir, f".{name}.abc123.part")
    open(stale, "wb").close()
    other = os.path.join(o.base_dir, ".someone-else.part")
    open(other, "wb").close()
    compute.fetch_base(o, "img", images["raw"])
    assert not os.path.exists(stale) and os.path.exists(other)


# -- the base cache over HTTP ------------------------------------------------------------------

@pytest.fixture
def server(images):
    files = {"img.raw": open(images["raw"], "rb").read()}
    if QEMU_IMG:
        files["img.qcow2"] = open(images["qcow2"], "rb").read()
    s = ImageServer(files)
    try:
        yield s
    finally:
        s.close()


def sha(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


@needs_qemu
@pytest.mark.parametrize("fmt", ["raw", "qcow2"])
@pytest.mark.parametrize("force_raw", [True, False])
def test_http_fetch(compute, tmp_path, images, server, fmt, force_raw):
    o = make_opts(compute, tmp_path, force_raw_images=force_raw)
    seen = []
    path, bfmt = compute.fetch_base(o, "img", f"{server.base}/plain/img.{fmt}", disk_format=fmt,
                                    checksum=sha(server.files[f"img.{fmt}"]),
                                    progress=seen.append)
    assert bfmt == ("raw" if force_raw else fmt) == qinfo(path)["format"]
    qemu("compare", "-f", "raw", "-F", bfmt, images["raw"], path)
    assert seen and seen[-1] == 100.0
    assert leftovers(o.base_dir) == [os.path.basename(path)]


@needs_qemu
def test_http_slow_server(compute, tmp_path, images, server):
    o = make_opts(compute, tmp_path)
    path, _ = compute.fetch_base(o, "img", f"{server.base}/slow/img.raw", disk_format="raw")
    qemu("compare", "-f", "raw", "-F", "raw", images["raw"], path)


@pytest.mark.parametrize("fmt", ["raw", "qcow2"])
@pytest.mark.parametrize("route", ["drop", "chunkdrop"])
def test_http_dropped_connection_leaves_nothing(compute, tmp_path, server, fmt, route):
    """A body cut short is refused and leaves nothing; without a Content-Length
    (``chunkdrop``) only the missing last chunk tells a cut body."""
    if f"img.{fmt}" not in server.files:
        pytest.skip("qemu-img is not installed")
    o = make_opts(compute, tmp_path)
    with pytest.raises(compute.DownloadError):
        compute.fetch_base(o, "img", f"{server.base}/{route}/img.{fmt}", disk_format=fmt,
                           timeout=10)
    assert leftovers(o.base_dir) == []
    assert _lock_is_free(o, compute.base_name("img"))


@pytest.mark.parametrize("fmt", ["raw", "qcow2"])
def test_http_wrong_checksum_leaves_nothing(compute, tmp_path, server, fmt):
    if f"img.{fmt}" not in server.files:
        pytest.skip("qemu-img is not installed")
    o = make_opts(compute, tmp_path)
    with pytest.raises(compute.ChecksumError):
        compute.fetch_base(o, "img", f"{server.base}/plain/img.{fmt}", disk_format=fmt,
                           checksum=sha(b"something else"))
    assert leftovers(o.base_dir) == []


def test_http_errors(compute, tmp_path, server):
    o = make_opts(compute, tmp_path)
    with pytest.raises(compute.DownloadError, match="404"):
        compute.fetch_base(o, "img", f"{server.base}/plain/missing")
    if "img.qcow2" in server.files:
        with pytest.raises(compute.ImageFormatMismatchError):
            compute.fetch_base(o, "img", f"{server.base}/plain/img.qcow2", disk_format="raw")
    assert leftovers(o.base_dir) == []


@needs_qemu
@pytest.mark.parametrize("fmt", ["raw", "qcow2"])
def test_http_chunked_fetch(compute, tmp_path, images, server, fmt):
    from qcow2.compute import fetch
    o = make_opts(compute, tmp_path)
    checks = []
    real = fetch.free_space
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(fetch, "STREAM_CHECK_EVERY", 1 * MiB)
        mp.setattr(fetch, "free_space", lambda p: checks.append(p) or real(p))
        path, bfmt = compute.fetch_base(o, "img", f"{server.base}/chunked/img.{fmt}",
                                        disk_format=fmt,
                                        checksum=sha(server.files[f"img.{fmt}"]))
    assert bfmt == "raw"
    qemu("compare", "-f", "raw", "-F", "raw", images["raw"], path)
    # checked while streaming, about once a MiB of body
    assert len(checks) >= len(server.files[f"img.{fmt}"]) // MiB
    assert leftovers(o.base_dir) == [os.path.basename(path)]


def _lock_is_free(o, name):
    from qcow2.compute.locks import try_image_lock
    with try_image_lock(o.lock_dir, name) as got:
        return got


@pytest.mark.parametrize("fmt", ["raw", "qcow2"])
def test_http_chunked_runs_out_of_space(compute, tmp_path, server, monkeypatch, fmt):
    """No Content-Length: free space is watched while streaming; falling under the
    reserve stops the download cleanly (clear error, nothing left, lock released)."""
    from qcow2.compute import fetch
    if f"img.{fmt}" not in server.files:
        pytest.skip("qemu-img is not installed")
    o = make_opts(compute, tmp_path)
    monkeypatch.setattr(fetch, "STREAM_CHECK_EVERY", 1 * MiB)
    monkeypatch.setattr(fetch, "STREAM_RESERVE", 1 * MiB)
    calls = []

    def shrinking(p):                                # someone else fills the disk
        calls.append(p)
        return 100 * MiB if len(calls) < 3 else 1536 * 1024
    monkeypatch.setattr(fetch, "free_space", shrinking)
    with pytest.raises(compute.InsufficientSpaceError,
                       match=r"to go on with the download of .* after 2097152 bytes"):
        compute.fetch_base(o, "img", f"{server.base}/chunked/img.{fmt}", disk_format=fmt)
    assert len(calls) == 3
    assert leftovers(o.base_dir) == []
    assert _lock_is_free(o, compute.base_name("img"))
    monkeypatch.undo()
    path, _ = compute.fetch_base(o, "img", f"{server.base}/chunked/img.{fmt}", disk_format=fmt)
    assert leftovers(o.base_dir) == [os.path.basename(path)]


def test_http_chunked_qcow2_needs_room_for_the_raw_base(compute, tmp_path, server, monkeypatch):
    """A qcow2 that becomes raw needs room for its raw data after the download: with a
    chunked body that is checked against what has arrived (capped by the virtual size
    from the header) instead of failing after the whole download."""
    from qcow2.compute import fetch
    if "img.qcow2" not in server.files:
        pytest.skip("qemu-img is not installed")
    monkeypatch.setattr(fetch, "STREAM_CHECK_EVERY", 1 * MiB)
    monkeypatch.setattr(fetch, "STREAM_RESERVE", 1 * MiB)
    monkeypatch.setattr(fetch, "free_space", lambda p: 4 * MiB)
    url = f"{server.base}/chunked/img.qcow2"
    o = make_opts(compute, tmp_path)
    with pytest.raises(compute.InsufficientSpaceError, match="for the raw base"):
        compute.fetch_base(o, "img", url, disk_format="qcow2")
    assert leftovers(o.base_dir) == []
    assert _lock_is_free(o, compute.base_name("img"))
    # kept as qcow2 (force_raw_images off) the same space is enough
    o = make_opts(compute, tmp_path, force_raw_images=False)
    path, bfmt = compute.fetch_base(o, "img", url, disk_format="qcow2")
    assert bfmt == "qcow2" and leftovers(o.base_dir) == [os.path.basename(path)]


def test_http_known_length_qcow2_to_raw_checked_first(compute, tmp_path, server, monkeypatch):
    """With a Content-Length, a qcow2 that becomes raw needs the body and its raw data
    (up to the virtual size): refused before the body is read."""
    from qcow2.compute import fetch
    if "img.qcow2" not in server.files:
        pytest.skip("qemu-img is not installed")
    n = len(server.files["img.qcow2"])
    monkeypatch.setattr(fetch, "free_space", lambda p: n + n // 2)
    o = make_opts(compute, tmp_path)
    with pytest.raises(compute.InsufficientSpaceError, match="after 0 bytes"):
        compute.fetch_base(o, "img", f"{server.base}/plain/img.qcow2", disk_format="qcow2")
    assert leftovers(o.base_dir) == []


@pytest.fixture
def small_fs(tmp_path):
    """A real 24 MiB file system (tmpfs), where mounting is allowed."""
    mnt = tmp_path / "small"
    mnt.mkdir()
    if os.geteuid() != 0 or not shutil.which("mount"):
        pytest.skip("mounting a small tmpfs needs root")
    res = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=24m", "tmpfs", str(mnt)],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    if res.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {res.stderr.strip()}")
    try:
        yield mnt
    finally:
        subprocess.run(["umount", "-l", str(mnt)], check=False)


def test_http_chunked_real_small_file_system(compute, small_fs, monkeypatch):
    """A chunked 48 MiB body towards a 24 MiB file system: stopped by the free-space
    watch (not by ENOSPC half-way), nothing left behind, the space free again."""
    from qcow2.compute import fetch
    monkeypatch.setattr(fetch, "STREAM_CHECK_EVERY", 4 * MiB)
    monkeypatch.setattr(fetch, "STREAM_RESERVE", 4 * MiB)
    body = os.urandom(48 * MiB)
    s = ImageServer({"big.raw": body})
    try:
        o = compute.Options(instances_path=str(small_fs / "instances"))
        with pytest.raises(compute.InsufficientSpaceError, match="bytes available"):
            compute.fetch_base(o, "big", f"{s.base}/chunked/big.raw", disk_format="raw")
    finally:
        s.close()
    assert leftovers(o.base_dir) == []
    st = os.statvfs(small_fs)
    assert (st.f_blocks - st.f_bfree) * st.f_frsize < 1 * MiB
    assert _lock_is_free(o, compute.base_name("big"))


@needs_qemu
def test_concurrent_spawns_download_once(compute, tmp_path, images, server):
    o = make_opts(compute, tmp_path)
    url = f"{server.base}/slow/img.qcow2"
    uuids = [f"11111111-2222-3333-4444-00000000000{i}" for i in range(4)]
    errors = []

    def go(u):
        try:
            compute.spawn(o, u, "img", url, 128 * MiB, disk_format="qcow2")
        except Exception as exc:  # noqa: BLE001
            errors.append(exc)

    threads = [threading.Thread(target=go, args=(u,)) for u in uuids]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not errors
    assert server.hits == {"/slow/img.qcow2": 1}
    for u in uuids:
        qemu("check", os.path.join(o.instances_path, u, "disk"))


def test_concurrent_processes_download_once(compute, tmp_path, images, server):
    """Two processes (fcntl locks across processes) fetch one raw image once."""
    inst = str(tmp_path / "instances")
    code = ("import sys; from qcow2 import compute; "
            f"o = compute.Options(instances_path={inst!r}); "
            f"compute.fetch_base(o, 'img', {server.base + '/slow/img.raw'!r})")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in sys.path if p))
    procs = [subprocess.Popen([sys.executable, "-c", code], env=env) for _ in range(3)]
    assert [p.wait(60) for p in procs] == [0, 0, 0]
    assert server.hits == {"/slow/img.raw": 1}


# -- decoding a qcow2 download while it streams (qcow2.compute.stream) ---------------------------

def _streamed(monkeypatch):
    """Record the downloads converted while they streamed."""
    from qcow2.compute import fetch
    calls = []
    real = fetch.convert_streaming

    def spy(*a, **k):
        calls.append(a[1])
        return real(*a, **k)
    monkeypatch.setattr(fetch, "convert_streaming", spy)
    return calls


def _no_second_pass(monkeypatch):
    """A flat disk made by copying the base afterwards fails the test."""
    import qcow2
    from qcow2.compute import disks

    def boom(*a, **k):
        raise AssertionError("second pass over the data")
    monkeypatch.setattr(qcow2, "sparse_copy", boom)
    monkeypatch.setattr(disks, "_lvm_disk", boom)


@needs_qemu
@needs_mkfs
@pytest.mark.parametrize("route", ["plain", "slow"])
def test_http_spawn_flat_streams_in_one_pass(compute, tmp_path, images, server, monkeypatch,
                                             route):
    calls = _streamed(monkeypatch)
    _no_second_pass(monkeypatch)
    o = make_opts(compute, tmp_path, images_type="flat")
    url = f"{server.base}/{route}/img.qcow2"
    res = compute.spawn(o, UUID1, "img", url, 128 * MiB, disk_format="qcow2")
    assert calls == [url]
    assert res["base_format"] == "raw"
    qemu("compare", "-f", "raw", "-F", "raw", images["raw"], res["base"])
    disk = os.path.join(o.instances_path, UUID1, "disk")
    assert qinfo(disk)["virtual-size"] == 128 * MiB
    subprocess.run(["e2fsck", "-fn", disk], check=True, stdout=subprocess.DEVNULL,
                   stderr=subprocess.DEVNULL)
    got = subprocess.run(["debugfs", "-R", "cat /hello", disk], stdout=subprocess.PIPE,
                         stderr=subprocess.DEVNULL).stdout
    assert got == (images["dir"] / "content" / "hello").read_bytes()
    assert os.stat(disk).st_blocks * 512 < 64 * MiB                # holes kept
    assert leftovers(o.base_dir) == [os.path.basename(res["base"])]
    # the next spawn finds the base: the disk is a copy of it
    monkeypatch.undo()
    res2 = compute.spawn(o, UUID2, "img", url, 128 * MiB, disk_format="qcow2")
    assert res2["base"] == res["base"]
    assert server.hits == {f"/{route}/img.qcow2": 1}


def _refcounts_wiped(data: bytes) -> bytes:
    """The image with its first refcount block zeroed: the plain reader still reads it,
    the untrusted scan refuses it (clusters in use with refcount 0)."""
    buf = bytearray(data)
    rt = int.from_bytes(buf[0x30:0x38], "big")
    rb = int.from_bytes(buf[rt:rt + 8], "big") & ~0x1FF
    cs = 1 << int.from_bytes(buf[0x14:0x18], "big")
    assert rb and buf[rb:rb + cs] != bytes(cs)
    buf[rb:rb + cs] = bytes(cs)
    return bytes(buf)


@needs_qemu
@pytest.mark.parametrize("images_type", ["flat", "qcow2"])
def test_http_streamed_image_refused_by_the_untrusted_scan_leaves_nothing(
        compute, tmp_path, images, monkeypatch, images_type):
    from qcow2.errors import Qcow2Error
    from helpers import ImageServer
    bad = _refcounts_wiped(open(images["qcow2"], "rb").read())
    s = ImageServer({"bad.qcow2": bad})
    try:
        calls = _streamed(monkeypatch)
        o = make_opts(compute, tmp_path, images_type=images_type)
        with pytest.raises(Qcow2Error):
            compute.spawn(o, UUID1, "img", f"{s.base}/plain/bad.qcow2", 128 * MiB,
                          disk_format="qcow2")
        assert calls                                  # (it was converted as it came)
        assert leftovers(o.base_dir) == []
        assert not os.path.exists(os.path.join(o.instances_path, UUID1))
        assert _lock_is_free(o, compute.base_name("img"))
    finally:
        s.close()


@needs_qemu
def test_http_not_streamed_when_the_header_names_other_files(compute, tmp_path, images,
                                                            monkeypatch):
    """A backing file in the header: the untrusted open decides first, as before."""
    from qcow2.errors import UnsafeImageError
    from helpers import ImageServer
    overlay = str(tmp_path / "overlay.qcow2")
    qemu("create", "-f", "qcow2", "-b", images["raw"], "-F", "raw", overlay)
    s = ImageServer({"o.qcow2": open(overlay, "rb").read()})
    try:
        calls = _streamed(monkeypatch)
        o = make_opts(compute, tmp_path)
        with pytest.raises(UnsafeImageError):
            compute.fetch_base(o, "o", f"{s.base}/plain/o.qcow2", disk_format="qcow2")
        assert calls == [] and leftovers(o.base_dir) == []
    finally:
        s.close()


@needs_qemu
@pytest.mark.parametrize("bad", [False, True])
def test_http_streamed_output_bounded_until_the_scan_accepts(compute, tmp_path, images,
                                                             monkeypatch, bad):
    """With no speculative budget at all the conversion waits for the untrusted scan's
    verdict before writing data: an accepted image still converts, a refused one
    leaves nothing."""
    from qcow2.compute import stream
    from qcow2.errors import Qcow2Error
    from helpers import ImageServer
    data = open(images["qcow2"], "rb").read()
    s = ImageServer({"i.qcow2": _refcounts_wiped(data) if bad else data})
    monkeypatch.setattr(stream, "SPECULATIVE_FACTOR", 0)
    monkeypatch.setattr(stream, "SPECULATIVE_BASE", 0)
    try:
        calls = _streamed(monkeypatch)
        o = make_opts(compute, tmp_path)
        url = f"{s.base}/plain/i.qcow2"
        if bad:
            with pytest.raises(Qcow2Error):
                compute.fetch_base(o, "i", url, disk_format="qcow2")
            assert leftovers(o.base_dir) == []
        else:
            path, fmt = compute.fetch_base(o, "i", url, disk_format="qcow2")
            assert fmt == "raw"
            qemu("compare", "-f", "raw", "-F", "raw", images["raw"], path)
        assert calls == [url]
    finally:
        s.close()


@needs_qemu
def test_http_streamed_conversion_checks_room_for_the_raw_data(compute, tmp_path, server,
                                                               monkeypatch):
    """The raw size of a qcow2 converted as it downloads is unknown up front: free space
    is looked at again every ROOM_EVERY bytes of data; running short stops with
    InsufficientSpaceError and leaves nothing."""
    from qcow2.compute import fetch, stream
    monkeypatch.setattr(stream, "ROOM_EVERY", 1 * MiB)
    real = fetch.free_space

    def short_for_the_raw_data(path):
        if sys._getframe(1).f_code.co_name == "_room_for_raw":
            return 1 * MiB
        return real(path)
    monkeypatch.setattr(fetch, "free_space", short_for_the_raw_data)
    calls = _streamed(monkeypatch)
    o = make_opts(compute, tmp_path)
    url = f"{server.base}/plain/img.qcow2"
    with pytest.raises(compute.InsufficientSpaceError, match="for the raw base"):
        compute.fetch_base(o, "img", url, disk_format="qcow2")
    assert calls == [url] and leftovers(o.base_dir) == []
    assert _lock_is_free(o, compute.base_name("img"))


def test_growing_file_reads_wait_and_failures_wake_them(tmp_path):
    from qcow2.compute.stream import Arrival, GrowingFile
    path = tmp_path / "part"
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        arrival = Arrival(8192)
        gf = GrowingFile(fd, str(path), arrival)
        assert gf.size() == 8192 and not hasattr(gf, "fd")
        got = []
        t = threading.Thread(target=lambda: got.append(gf.pread(4096, 4096)))
        t.start()
        os.pwrite(fd, b"a" * 4096, 0)
        arrival.advance(4096)
        t.join(0.2)
        assert t.is_alive()                           # its range has not arrived
        os.pwrite(fd, b"b" * 4096, 4096)
        arrival.advance(8192)
        t.join(10)
        assert got == [b"b" * 4096]
        assert gf.pread(100, 8150) == b"b" * 42         # short past the end
        failed = Arrival(1 << 20)
        gf2 = GrowingFile(fd, str(path), failed)
        errs = []

        def read():
            try:
                gf2.pread(4096, 65536)
            except Exception as exc:  # noqa: BLE001
                errs.append(exc)
        t2 = threading.Thread(target=read)
        t2.start()
        failed.finish(OSError("connection reset"))
        t2.join(10)
        from qcow2.compute import DownloadError
        assert not t2.is_alive() and isinstance(errs[0], DownloadError)
    finally:
        os.close(fd)


# -- instance disks ------------------------------------------------------------------------------

MATRIX = list(itertools.product(["default", "qcow2", "flat", "raw"], [True, False],
                                [True, False], ["none", "space"]))


@needs_qemu
@needs_mkfs
@pytest.mark.parametrize("images_type, force_raw, use_cow, prealloc", MATRIX)
def test_spawn_end_to_end(compute, tmp_path, images, images_type, force_raw, use_cow,
                          prealloc):
    o = make_opts(compute, tmp_path, images_type=images_type, force_raw_images=force_raw,
                  use_cow_images=use_cow, preallocate_images=prealloc)
    res = compute.spawn(o, UUID1, "img", images["qcow2"], 128 * MiB, disk_format="qcow2",
                        ephemeral_size=32 * MiB, swap_size=16 * MiB)
    d = os.path.join(o.instances_path, UUID1)
    base = res["base"]
    assert qinfo(base)["format"] == ("raw" if force_raw else "qcow2")
    with open(os.path.join(d, "disk.info")) as f:
        info = json.load(f)
    assert set(info) == {os.path.join(d, n) for n in ("disk", "disk.local", "disk.swap")}
    disk = os.path.join(d, "disk")
    qi = qinfo(disk)
    assert qi["virtual-size"] == 128 * MiB
    cow = o.backend == "qcow2"
    assert info[disk] == qi["format"] == ("qcow2" if cow else "raw")
    if cow:
        assert qi["backing-filename"] == base and os.path.isabs(qi["backing-filename"])
        assert qi["backing-filename-format"] == qinfo(base)["format"]
        qemu("check", disk)
        # guest content: the image, then zeros
        qemu("compare", "-f", "raw", "-F", "qcow2", images["raw"], disk)
    else:
        # the ext4 was grown to the root size, clean, and its file is intact
        out = subprocess.run(["dumpe2fs", "-h", disk], stdout=subprocess.PIPE,
                             stderr=subprocess.DEVNULL, text=True).stdout
        lines = out.splitlines()
        count = int(next(ln for ln in lines if ln.startswith("Block count")).split()[-1])
        bs = int(next(ln for ln in lines if ln.startswith("Block size")).split()[-1])
        assert count * bs == 128 * MiB
        subprocess.run(["e2fsck", "-fn", disk], check=True, stdout=subprocess.DEVNULL,
                       stderr=subprocess.DEVNULL)
        got = subprocess.run(["debugfs", "-R", "cat /hello", disk], stdout=subprocess.PIPE,
                             stderr=subprocess.DEVNULL).stdout
        assert got == (images["dir"] / "content" / "hello").read_bytes()
    used = os.stat(disk).st_blocks * 512
    if prealloc == "space":
        assert used >= 128 * MiB
    else:
        assert used < 64 * MiB
    for name in ("disk.local", "disk.swap"):
        p = os.path.join(d, name)
        assert info[p] == qinfo(p)["format"]
        if cow:
            qemu("check", p)
    blkid = subprocess.run(["blkid", "-p", "-o", "export", os.path.join(o.base_dir,
                           compute.ephemeral_name(32 * MiB, "ext4"))],
                           stdout=subprocess.PIPE, text=True).stdout
    assert "LABEL=ephemeral0" in blkid and "TYPE=ext4" in blkid
    blkid = subprocess.run(["blkid", "-p", "-o", "export", os.path.join(o.base_dir,
                           compute.swap_name(16 * MiB))], stdout=subprocess.PIPE, text=True).stdout
    assert "TYPE=swap" in blkid
    assert compute.destroy(o, UUID1) == [d] and not os.path.exists(d)


@needs_qemu
def test_root_size_smaller_than_image_refused(compute, tmp_path, images):
    o = make_opts(compute, tmp_path)
    with pytest.raises(compute.ComputeError, match="smaller than the image"):
        compute.spawn(o, UUID1, "img", images["qcow2"], 32 * MiB, disk_format="qcow2")
    assert not os.path.exists(os.path.join(o.instances_path, UUID1))


@needs_qemu
def test_spawn_failure_removes_instance(compute, tmp_path, images, monkeypatch):
    from qcow2.compute import disks
    o = make_opts(compute, tmp_path)

    def boom(*a, **k):
        raise compute.ToolError("mkswap failed")
    monkeypatch.setattr(disks, "swap_base", boom)
    with pytest.raises(compute.ToolError):
        compute.spawn(o, UUID1, "img", images["qcow2"], 128 * MiB, swap_size=MiB)
    assert not os.path.exists(os.path.join(o.instances_path, UUID1))


# -- growing the file system of qcow2 disks (resize_fs_using_block_device) ----------------------

def _fs_blocks(path_raw):
    out = subprocess.run(["dumpe2fs", "-h", path_raw], stdout=subprocess.PIPE,
                         stderr=subprocess.DEVNULL, text=True).stdout
    parts = (ln.partition(":") for ln in out.splitlines())
    field = {k: v.strip() for k, sep, v in parts if sep}
    return int(field["Block count"]) * int(field["Block size"])


def _guest_raw(disk, tmp_path):
    out = str(tmp_path / "guest.raw")
    if os.path.exists(out):
        os.unlink(out)
    qemu("convert", "-O", "raw", disk, out)
    return out


@needs_qemu
@needs_mkfs
@pytest.mark.parametrize("force_raw, prealloc", [(True, "none"), (False, "none"),
                                                 (True, "space")])
def test_qcow2_disk_fs_grown(compute, tmp_path, images, monkeypatch, force_raw, prealloc):
    # e2fsprogs stamp the superblock with the time: the same time here and for the reference
    monkeypatch.setenv("E2FSPROGS_FAKE_TIME", "1700000000")
    monkeypatch.setenv("E2FSCK_TIME", "1700000000")
    o = make_opts(compute, tmp_path, images_type="qcow2", resize_fs_using_block_device=True,
                  force_raw_images=force_raw, preallocate_images=prealloc)
    res = compute.spawn(o, UUID1, "img", images["qcow2"], 256 * MiB, disk_format="qcow2")
    base = res["base"]
    disk = res["disks"]["disk"]["path"]
    grown = res["disks"]["disk"]["fs_grown"]
    assert 0 < grown["written"] < 8 * MiB               # only the clusters that changed
    qi = qinfo(disk)
    assert qi["format"] == "qcow2" and qi["virtual-size"] == 256 * MiB
    assert qi["backing-filename"] == base
    check = json.loads(qemu("check", "--output=json", disk).stdout)
    assert not check.get("leaks") and not check.get("corruptions") \
        and check.get("check-errors", 0) == 0
    # the base is shared: untouched
    qemu("compare", "-f", "raw", "-F", qinfo(base)["format"], images["raw"], base)
    raw = _guest_raw(disk, tmp_path)
    subprocess.run(["e2fsck", "-fn", raw], check=True, stdout=subprocess.DEVNULL,
                   stderr=subprocess.DEVNULL)
    assert _fs_blocks(raw) == 256 * MiB
    got = subprocess.run(["debugfs", "-R", "cat /hello", raw], stdout=subprocess.PIPE,
                         stderr=subprocess.DEVNULL).stdout
    assert got == (images["dir"] / "content" / "hello").read_bytes()
    got = subprocess.run(["debugfs", "-R", "cat /etc/conf.d/motd", raw], stdout=subprocess.PIPE,
                         stderr=subprocess.DEVNULL).stdout
    assert got == (images["dir"] / "content" / "etc" / "conf.d" / "motd").read_bytes()
    # byte for byte what e2fsck + resize2fs make of the image grown as a raw file
    ref = str(tmp_path / "ref.raw")
    shutil.copy(images["raw"], ref)
    os.truncate(ref, 256 * MiB)
    subprocess.run(["e2fsck", "-fp", ref], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    subprocess.run(["resize2fs", ref], check=True, stdout=subprocess.DEVNULL,
                   stderr=subprocess.DEVNULL)
    qemu("compare", "-f", "raw", "-F", "qcow2", ref, disk)
    if prealloc == "space":
        assert os.stat(disk).st_blocks * 512 >= 256 * MiB
    assert sorted(os.listdir(os.path.dirname(disk))) == ["disk", "disk.info"]


@needs_qemu
@needs_mkfs
def test_qcow2_disk_fs_not_grown_without_the_option(compute, tmp_path, images):
    o = make_opts(compute, tmp_path, images_type="qcow2")
    res = compute.spawn(o, UUID1, "img", images["qcow2"], 256 * MiB, disk_format="qcow2")
    disk = res["disks"]["disk"]["path"]
    assert "fs_grown" not in res["disks"]["disk"]
    qemu("check", disk)
    qemu("compare", "-f", "raw", "-F", "qcow2", images["raw"], disk)   # the image, then zeros
    assert _fs_blocks(_guest_raw(disk, tmp_path)) == 64 * MiB
    assert qinfo(disk)["actual-size"] < 1 * MiB                     # nothing written


@needs_qemu
@needs_mkfs
def test_qcow2_disk_fs_grow_skipped(compute, tmp_path, images):
    """Nothing to do: the root size is the image's, or no unpartitioned ext file system."""
    o = make_opts(compute, tmp_path, images_type="qcow2", resize_fs_using_block_device=True)
    res = compute.spawn(o, UUID1, "img", images["qcow2"], 64 * MiB, disk_format="qcow2")
    assert "fs_grown" not in res["disks"]["disk"]
    qemu("compare", "-f", "raw", "-F", "qcow2", images["raw"], res["disks"]["disk"]["path"])
    # a partitioned disk (ext4 in a partition at 1 MiB): the whole disk is not grown
    part = str(tmp_path / "part.raw")
    with open(part, "wb") as f:
        f.truncate(16 * MiB)
        f.seek(446)                          # one MBR entry: type 0x83 from sector 2048 on
        f.write(bytes([0, 0, 0, 0, 0x83, 0, 0, 0]) + (2048).to_bytes(4, "little")
                + (30720).to_bytes(4, "little"))
        f.seek(510)
        f.write(b"\x55\xaa")
    subprocess.run(["mkfs.ext4", "-q", "-F", "-E", "offset=1048576", part, "15M"], check=True)
    res = compute.spawn(o, UUID2, "part", part, 64 * MiB, disk_format="raw")
    assert "fs_grown" not in res["disks"]["disk"]
    qemu("compare", "-f", "raw", "-F", "qcow2", part, res["disks"]["disk"]["path"])


@needs_qemu
@needs_mkfs
@pytest.mark.parametrize("fs", ["ext4", "ext3"])
def test_qcow2_disk_fs_grow_space_estimate(compute, tmp_path, fs, monkeypatch):
    """The free space asked for is what growing can take -- not the root size: with
    group checksums (ext4's default) a few MiB; an ext3's new inode tables are zeroed in
    the working copy (but, being zeros, not written into the overlay)."""
    import qcow2
    from qcow2.compute import fetch, growfs
    raw = str(tmp_path / "img.raw")
    with open(raw, "wb") as f:
        f.truncate(64 * MiB)
    subprocess.run([f"mkfs.{fs}", "-q", "-F", "-b", "4096", raw], check=True)
    with qcow2.open(raw) as img:
        sb = growfs.read_ext_super(img)
        data = sum(e.length for e in img.extents() if e.data and not e.zero)
    assert sb.size == 64 * MiB and sb.block_size == 4096
    assert sb.group_csum == (fs == "ext4")
    need = growfs.space_needed(sb, 4 << 30, data, 65536)
    itables = 31 * sb.inodes_per_group * sb.inode_size      # 31 new groups of 128 MiB
    if fs == "ext4":
        assert need < data + 64 * MiB
    else:
        assert data + itables < need < data + itables + 64 * MiB
    o = make_opts(compute, tmp_path, images_type="qcow2", resize_fs_using_block_device=True)
    compute.fetch_base(o, "img", raw)
    seen = []
    monkeypatch.setattr(fetch, "free_space", lambda p: seen.append(p) or need)
    res = compute.spawn(o, UUID1, "img", raw, 4 << 30, disk_format="raw")
    assert res["disks"]["disk"]["fs_grown"]["written"] < 8 * MiB
    assert seen == [os.path.join(o.instances_path, UUID1)]
    monkeypatch.undo()
    out = _guest_raw(res["disks"]["disk"]["path"], tmp_path)
    subprocess.run(["e2fsck", "-fn", out], check=True, stdout=subprocess.DEVNULL,
                   stderr=subprocess.DEVNULL)
    assert _fs_blocks(out) == 4 << 30


@needs_qemu
@needs_mkfs
def test_qcow2_disk_fs_grow_failures_leave_nothing(compute, tmp_path, images, monkeypatch):
    from qcow2.compute import fetch, growfs
    o = make_opts(compute, tmp_path, images_type="qcow2", resize_fs_using_block_device=True)
    compute.fetch_base(o, "img", images["qcow2"])
    real_run = growfs._run_on_fd

    def failing_resize(args, fd, **kw):
        if args[0] == "resize2fs":
            raise compute.ToolError("resize2fs on the working copy failed (exit 1): boom")
        return real_run(args, fd, **kw)
    monkeypatch.setattr(growfs, "_run_on_fd", failing_resize)
    with pytest.raises(compute.ToolError, match="resize2fs"):
        compute.spawn(o, UUID1, "img", images["qcow2"], 256 * MiB)
    assert not os.path.exists(os.path.join(o.instances_path, UUID1))
    monkeypatch.setattr(growfs, "_run_on_fd", real_run)
    # not enough room for the working copy: refused before anything is written
    monkeypatch.setattr(fetch, "free_space", lambda p: 1 * MiB)
    with pytest.raises(compute.InsufficientSpaceError, match="growing the file system"):
        compute.spawn(o, UUID1, "img", images["qcow2"], 256 * MiB)
    assert not os.path.exists(os.path.join(o.instances_path, UUID1))
    assert leftovers(o.base_dir) == [compute.base_name("img")]


# -- the cache manager ---------------------------------------------------------------------------

def _age(path, now, seconds):
    os.utime(path, (now - seconds, now - seconds))


@needs_qemu
def test_manager_age_boundaries(compute, tmp_path, images):
    o = make_opts(compute, tmp_path, remove_unused_original_minimum_age_seconds=1000,
                  remove_unused_resized_minimum_age_seconds=100)
    os.makedirs(o.base_dir)
    now = 2_000_000_000
    orig_young = os.path.join(o.base_dir, compute.base_name("a"))
    orig_old = os.path.join(o.base_dir, compute.base_name("b"))
    res_young = os.path.join(o.base_dir, compute.base_name("c") + "_10737418240")
    res_old = os.path.join(o.base_dir, compute.base_name("d") + "_10737418240")
    for p, age in ((orig_young, 999), (orig_old, 1000), (res_young, 99), (res_old, 100)):
        open(p, "wb").close()
        _age(p, now, age)
    rep = compute.clean(o, dry_run=True, now=now)
    assert rep["would_remove"] == sorted([orig_old, res_old])
    assert sorted(rep["too_young"]) == sorted([orig_young, res_young])
    assert all(os.path.exists(p) for p in (orig_young, orig_old, res_young, res_old))
    rep = compute.clean(o, now=now)
    assert rep["removed"] == sorted([orig_old, res_old])
    assert os.path.exists(orig_young) and os.path.exists(res_young)
    assert not os.path.exists(orig_old) and not os.path.exists(res_old)
    # remove_unused_base_images = False keeps everything
    rep = compute.clean(o.replace(remove_unused_base_images=False), now=now + 10 ** 6)
    assert rep["removed"] == [] and os.path.exists(orig_young)


@needs_qemu
def test_manager_in_use_through_backing_files(compute, tmp_path, images):
    o = make_opts(compute, tmp_path)
    compute.spawn(o, UUID1, "img", images["qcow2"], 128 * MiB)
    # a disk written by nova itself (qemu-img), on another base
    other = os.path.join(o.base_dir, compute.base_name("nova-image"))
    shutil.copy(images["raw"], other)
    nd = os.path.join(o.instances_path, UUID2)
    os.makedirs(nd)
    qemu("create", "-f", "qcow2", "-o", f"backing_file={other},backing_fmt=raw,cluster_size=65536",
         os.path.join(nd, "disk"), str(128 * MiB))
    nova_disk_info(nd, {"disk": "qcow2"})
    unused = os.path.join(o.base_dir, compute.base_name("unused"))
    open(unused, "wb").close()
    far = time.time() + 10 ** 7
    for p in os.listdir(o.base_dir):
        _age(os.path.join(o.base_dir, p), time.time(), 10 ** 6)
    used = compute.bases_in_use(o)
    base = os.path.join(o.base_dir, compute.base_name("img"))
    assert set(used) == {base, other}
    aged = os.stat(base).st_mtime
    rep = compute.clean(o, now=far)
    assert rep["removed"] == [unused]
    assert os.path.exists(base) and os.path.exists(other)
    assert os.stat(base).st_mtime > aged                       # touched
    compute.destroy(o, UUID1)
    rep = compute.clean(o, now=far)
    assert rep["removed"] == [base] and os.path.exists(other)


def test_manager_keeps_every_base_while_a_disk_is_unreadable(compute, tmp_path, images):
    """An instance disk whose qcow2 header the engine refuses (here an incompatible
    feature bit from the future) may use any base: nothing is removed while it is there,
    and the report names it."""
    o = make_opts(compute, tmp_path)
    compute.spawn(o, UUID1, "img", images["qcow2"], 128 * MiB)
    unused = os.path.join(o.base_dir, compute.base_name("unused"))
    open(unused, "wb").close()
    for p in os.listdir(o.base_dir):
        _age(os.path.join(o.base_dir, p), time.time(), 10 ** 6)
    disk = os.path.join(o.instances_path, UUID1, "disk")
    with open(disk, "r+b") as f:                  # incompatible_features bit 60
        f.seek(72)
        f.write((1 << 60).to_bytes(8, "big"))
    far = time.time() + 10 ** 7
    rep = compute.clean(o, now=far)
    assert rep["unreadable_disks"] == [disk]
    assert rep["removed"] == [] and unused in rep["kept"]
    assert os.path.exists(unused)
    assert disk not in str(compute.bases_in_use(o))
    os.unlink(disk)
    rep = compute.clean(o, now=far)
    assert rep["unreadable_disks"] == [] and unused in rep["removed"]


def test_manager_swap_and_ephemeral_take_the_original_age(compute, tmp_path):
    """nova's swap pass (_remove_swap_file): swap and ephemeral bases go at
    remove_unused_original_minimum_age_seconds, not at the resized age; names that are
    not cache files are never removed."""
    o = make_opts(compute, tmp_path, remove_unused_original_minimum_age_seconds=1000,
                  remove_unused_resized_minimum_age_seconds=100)
    os.makedirs(o.base_dir)
    now = 2_000_000_000
    eph = compute.ephemeral_name
    files = {
        compute.swap_name(128 * MiB): 999,           # past the resized age, under the original
        compute.swap_name(256 * MiB): 1000,          # exactly at the limit: goes
        eph(1 << 30, "ext4"): 999,
        eph(2 << 30, "ext4"): 1000,
        compute.swap_name(3 * MiB + 1): 1000,        # our spelling of a size in bytes
        "swap_x": 10 ** 7, "notes.txt": 10 ** 7,     # not cache files: never removed
    }
    paths = {n: os.path.join(o.base_dir, n) for n in files}
    for n, age in files.items():
        open(paths[n], "wb").close()
        _age(paths[n], now, age)
    rep = compute.clean(o, dry_run=True, now=now)
    gone = sorted(paths[n] for n in (compute.swap_name(256 * MiB), eph(2 << 30, "ext4"),
                                     compute.swap_name(3 * MiB + 1)))
    assert rep["would_remove"] == gone
    assert sorted(rep["too_young"]) == sorted([paths[compute.swap_name(128 * MiB)],
                                               paths[eph(1 << 30, "ext4")]])
    assert rep["ignored"] == sorted([paths["swap_x"], paths["notes.txt"]])
    assert rep["kinds"][paths[compute.swap_name(128 * MiB)]] == "swap"
    assert rep["kinds"][paths[eph(1 << 30, "ext4")]] == "ephemeral"
    assert all(os.path.exists(p) for p in paths.values())
    rep = compute.clean(o, now=now)
    assert rep["removed"] == gone
    assert sorted(leftovers(o.base_dir)) == sorted(
        [compute.swap_name(128 * MiB), eph(1 << 30, "ext4"), "swap_x", "notes.txt"])
    # one second later the young ones go too
    rep = compute.clean(o, now=now + 1)
    assert sorted(leftovers(o.base_dir)) == ["notes.txt", "swap_x"]


@needs_qemu
@needs_mkfs
@pytest.mark.parametrize("images_type", ["qcow2", "flat"])
def test_manager_swap_and_ephemeral_in_use(compute, tmp_path, images, images_type):
    """In use through the backing file of disk.swap / disk.local (qcow2), or through an
    instance disk of the base's size (raw copies, like nova's block-device mappings);
    in use means kept and touched, however old."""
    o = make_opts(compute, tmp_path, images_type=images_type)
    compute.spawn(o, UUID1, "img", images["qcow2"], 128 * MiB, ephemeral_size=32 * MiB,
                  swap_size=16 * MiB)
    swap = os.path.join(o.base_dir, compute.swap_name(16 * MiB))
    eph = os.path.join(o.base_dir, compute.ephemeral_name(32 * MiB, "ext4"))
    unused_swap = os.path.join(o.base_dir, compute.swap_name(32 * MiB))
    shutil.copy(swap, unused_swap)
    now = time.time()
    for p in (swap, eph, unused_swap):
        _age(p, now, 10 ** 6)
    used = compute.bases_in_use(o)
    assert used[swap] == [os.path.join(o.instances_path, UUID1, "disk.swap")]
    assert used[eph] == [os.path.join(o.instances_path, UUID1, "disk.local")]
    assert unused_swap not in used
    rep = compute.clean(o, dry_run=True, now=now + 10 ** 6)
    assert unused_swap in rep["would_remove"] and swap not in rep["would_remove"]
    assert swap in rep["in_use"] and eph in rep["in_use"]
    assert now - os.stat(swap).st_mtime >= 10 ** 6 - 5              # a dry run touches nothing
    aged = {p: os.stat(p).st_mtime for p in (swap, eph)}
    rep = compute.clean(o, now=now + 10 ** 6)
    base = os.path.join(o.base_dir, compute.base_name("img"))
    # (a raw root disk does not point at its base: that one goes by its age)
    assert rep["removed"] == sorted([unused_swap] + ([base] if images_type == "flat" else []))
    assert all(os.stat(p).st_mtime > t for p, t in aged.items())     # touched
    # the instance gone, they are unused: removed once old enough (the original age)
    compute.destroy(o, UUID1)
    limit = o.remove_unused_original_minimum_age_seconds
    rep = compute.clean(o, now=os.stat(swap).st_mtime + limit - 1)
    assert swap in rep["too_young"] and eph in rep["too_young"]
    left = [p for p in (swap, eph, base) if os.path.exists(p)]
    rep = compute.clean(o, now=max(os.stat(p).st_mtime for p in left) + limit)
    assert sorted(rep["removed"]) == sorted(left)


@needs_qemu
def test_manager_reports_missing_bases_and_busy_swap(compute, tmp_path):
    from qcow2.compute.locks import image_lock
    o = make_opts(compute, tmp_path)
    os.makedirs(o.base_dir)
    d = os.path.join(o.instances_path, UUID1)
    os.makedirs(d)
    gone = os.path.join(o.base_dir, compute.swap_name(8 * MiB))
    qemu("create", "-f", "qcow2", "-u", "-o", f"backing_file={gone},backing_fmt=raw",
         os.path.join(d, "disk.swap"), str(8 * MiB))
    nova_disk_info(d, {"disk.swap": "qcow2"})
    rep = compute.clean(o, now=time.time())
    assert rep["missing"] == [gone] and rep["in_use"] == []
    swap = os.path.join(o.base_dir, compute.swap_name(4 * MiB))
    open(swap, "wb").close()
    with image_lock(o.lock_dir, os.path.basename(swap)):
        rep = compute.clean(o, now=time.time() + 10 ** 7)
    assert rep["busy"] == [swap] and os.path.exists(swap)


def test_manager_leaves_a_file_being_written(compute, tmp_path):
    from qcow2.compute.locks import image_lock
    o = make_opts(compute, tmp_path)
    os.makedirs(o.base_dir)
    p = os.path.join(o.base_dir, compute.base_name("x"))
    open(p, "wb").close()
    with image_lock(o.lock_dir, os.path.basename(p)):
        rep = compute.clean(o, now=time.time() + 10 ** 7)
    assert rep["busy"] == [p] and os.path.exists(p)
    usage = compute.usage(o)
    assert usage["count"] == 1 and usage["files"][0]["path"] == p


def test_manager_removes_stale_temporaries(compute, tmp_path):
    from qcow2.compute.locks import image_lock
    o = make_opts(compute, tmp_path)
    os.makedirs(o.base_dir)
    stale = os.path.join(o.base_dir, f".{compute.base_name('a')}.x1y2z3.part")
    busy = os.path.join(o.base_dir, f".{compute.base_name('b')}.x1y2z3.part")
    for p in (stale, busy):
        open(p, "wb").close()
    with image_lock(o.lock_dir, compute.base_name("b")):
        rep = compute.clean(o, dry_run=True)
        assert rep["stale_temporaries"] == [stale] and os.path.exists(stale)
        rep = compute.clean(o)
    assert rep["stale_temporaries"] == [stale]
    assert not os.path.exists(stale) and os.path.exists(busy)
    assert compute.usage(o)["count"] == 0


@needs_qemu
def test_reuse_touches_the_base(compute, tmp_path, images):
    o = make_opts(compute, tmp_path)
    path, _ = compute.fetch_base(o, "img", images["raw"])
    os.utime(path, (1000, 1000))
    assert compute.fetch_base(o, "img", "/nonexistent/not/read/again")[0] == path
    assert os.stat(path).st_mtime > 1000                      # touched


# -- the command line --------------------------------------------------------------------------

@needs_qemu
def test_cli(tmp_path, images):
    from qcow2.cli import main
    conf = tmp_path / "nova.conf"
    conf.write_text(f"[DEFAULT]\ninstances_path = {tmp_path / 'inst'}\n"
                    "[libvirt]\nimages_type = qcow2\n")
    assert main(["compute", "spawn", "--config", str(conf), "--instance", UUID1, "--image",
                 "img", "--source", images["qcow2"], "--root-size", "128M", "--disk-format",
                 "qcow2", "-q"]) == 0
    assert main(["compute", "usage", "--config", str(conf)]) == 0
    assert main(["compute", "clean", "--config", str(conf), "--dry-run", "--now", "4e9",
                 "--output=json"]) == 0
    assert main(["compute", "destroy", "--config", str(conf), "--instance", UUID1]) == 0
    assert main(["compute", "spawn", "--config", str(conf), "--instance", UUID1, "--image",
                 "img", "--source", images["qcow2"], "--root-size", "1M", "-q"]) == 1
    bad = tmp_path / "bad.conf"
    bad.write_text("[libvirt]\nimages_type = floppy\n")
    assert main(["compute", "usage", "--config", str(bad)]) == 1


@needs_qemu
@needs_mkfs
def test_cli_reports(tmp_path, images, capsys):
    from qcow2.cli import main
    from qcow2.compute import base_name
    conf = tmp_path / "nova.conf"
    conf.write_text(f"[DEFAULT]\ninstances_path = {tmp_path / 'inst'}\n"
                    "resize_fs_using_block_device = True\n[libvirt]\nimages_type = qcow2\n")
    assert main(["compute", "spawn", "--config", str(conf), "--instance", UUID1, "--image",
                 "img", "--source", images["qcow2"], "--root-size", "128M", "-q"]) == 0
    assert "disk: file system grown to the disk" in capsys.readouterr().out
    base_dir = tmp_path / "inst" / "_base"
    (base_dir / "README").write_text("not a base")
    (base_dir / "swap_64").write_bytes(b"")
    assert main(["compute", "clean", "--config", str(conf), "--now", "4e9"]) == 0
    out = capsys.readouterr().out
    assert f"not a cache file, left alone: {base_dir / 'README'}" in out
    assert f"removed: {base_dir / 'swap_64'}" in out
    assert f"in use: {base_dir / base_name('img')}" in out
