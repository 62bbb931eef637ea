"""blkdebug error injection (backends/blkdebug.py, ``blkdebug:CONFIG:FILE`` names) and
the qemu-img wording of errors on corrupt images, as QEMU's iotests 054, 074 and 261
expect them (checked here without that suite)."""

from __future__ import annotations

import errno
import os
import shutil
import struct
import subprocess
import sys

import pytest

import qcow2
from qcow2.backends import MemoryBackend
from qcow2.backends.blkdebug import (BlkdebugBackend, BlkdebugConfigError, parse_config,
                                     rules_from_options, split_name)

SCRIPT = shutil.which("qcow2", path=os.path.dirname(sys.executable))


@pytest.fixture()
def prog(tmp_path):
    """Our CLI invoked under the name qemu-img."""
    if SCRIPT is None:
        pytest.skip("the qcow2 console script is not installed")
    link = tmp_path / "bin" / "qemu-img"
    link.parent.mkdir()
    link.symlink_to(SCRIPT)
    return str(link)


def run(prog, *args):
    return subprocess.run([prog, *map(str, args)], capture_output=True, text=True)


# -- the rules -------------------------------------------------------------------------

def test_config_file_parses_sections():
    rules = parse_config('# comment\n[inject-error]\nevent = "read_aio"\nerrno = "28"\n'
                         'once ="on"\nsector = "8"\n\n[set-state]\nevent = "l1_update"\n'
                         'state = "1"\nnew_state = "2"\n')
    assert [r.action for r in rules] == ["inject-error", "set-state"]
    inj, st = rules
    assert (inj.event, inj.errno, inj.once, inj.offset) == ("read_aio", 28, True, 4096)
    assert (st.event, st.state, st.new_state) == ("l1_update", 1, 2)


@pytest.mark.parametrize("text", ['[inject-error]\nevent = "no_such_event"\n',
                                  '[inject-error]\nerrno = "5"\n',
                                  '[bogus]\nevent = "read_aio"\n',
                                  '[inject-error]\nevent = "read_aio"\nonce = "maybe"\n'])
def test_bad_configs_are_refused(text):
    with pytest.raises(BlkdebugConfigError):
        parse_config(text)


def test_split_name():
    assert split_name("blkdebug:/a/b.conf:/c/d.qcow2") == ("/a/b.conf", "/c/d.qcow2")
    assert split_name("blkdebug::img") == ("", "img")
    with pytest.raises(BlkdebugConfigError):
        split_name("blkdebug:nocolon")


def _store(rules):
    inner = MemoryBackend(writable=True)
    inner.pwrite(bytes(8192), 0)
    return BlkdebugBackend(inner, rules, "blkdebug::mem")


def test_errors_start_at_the_event_and_once_drops_the_rule():
    be = _store(rules_from_options([{"event": "l1_update", "errno": 28, "once": True}], []))
    be.pread(512, 0)                              # no event yet: I/O passes
    be.debug_event("l2_load")                     # another event: nothing
    be.pwrite(b"x", 0)
    be.debug_event("l1_update")
    with pytest.raises(OSError) as info:
        be.pwrite(b"x", 0)
    assert info.value.errno == errno.ENOSPC and info.value.filename == "blkdebug::mem"
    be.pwrite(b"x", 0)                            # once: gone after the first failure
    be.debug_event("l1_update")
    be.flush()


def test_rules_stay_active_and_match_their_sector():
    be = _store(rules_from_options([{"event": "read_aio", "sector": 2}], []))
    be.debug_event("read_aio")
    be.pread(512, 0)                              # sector 2 is bytes 1024..1535
    be.flush()                                    # a flush covers no sector
    for _ in range(2):
        with pytest.raises(OSError) as info:
            be.pread(1024, 512)
        assert info.value.errno == errno.EIO


def test_states_select_rules():
    rules = rules_from_options(
        [{"event": "cluster_alloc", "state": 2, "errno": 5}],
        [{"event": "l2_load", "state": 1, "new_state": 2}])
    be = _store(rules)
    be.debug_event("cluster_alloc")               # state 1: the rule does not apply
    be.pread(1, 0)
    be.debug_event("l2_load")
    assert be.state == 2
    be.debug_event("cluster_alloc")
    with pytest.raises(OSError):
        be.pread(1, 0)


# -- through the CLI -------------------------------------------------------------------

def _images(tmp_path, size_b):
    a, b = tmp_path / "a.qcow2", tmp_path / "b.qcow2"
    qcow2.create(str(a), 1 << 20)
    qcow2.create(str(b), size_b)
    with qcow2.open(str(a), "r+") as img:
        img.pwrite(b"\x66" * 512, 512)
    conf = tmp_path / "blkdebug.conf"
    conf.write_text('[inject-error]\nevent = "read_aio"\nerrno = "5"\nonce ="off"\n')
    return f"blkdebug:{conf}:{a}", str(b)


def test_compare_reports_the_injected_read_error(prog, tmp_path):
    name, other = _images(tmp_path, 1 << 20)
    r = run(prog, "compare", name, other)
    assert r.returncode == 4 and r.stdout == ""
    assert r.stderr == f"qemu-img: Error while reading offset 0 of {name}: Input/output error\n"


def test_compare_warns_of_the_size_before_failing_in_the_tail(prog, tmp_path):
    name, other = _images(tmp_path, 0)
    r = run(prog, "compare", name, other)
    assert r.returncode == 4
    assert r.stdout == "Warning: Image size mismatch!\n"
    assert r.stderr == f"qemu-img: Error while reading offset 0 of {name}: Input/output error\n"


def test_without_an_event_nothing_fails(prog, tmp_path):
    name, _other = _images(tmp_path, 1 << 20)
    conf = tmp_path / "blkdebug.conf"
    conf.write_text('[inject-error]\nevent = "l1_update"\n')
    r = run(prog, "info", name)
    assert r.returncode == 0 and r.stdout.startswith(f"image: {name}\n")


def test_missing_config_is_an_open_error(prog, tmp_path):
    qcow2.create(str(tmp_path / "a.qcow2"), 1 << 20)
    r = run(prog, "info", f"blkdebug:{tmp_path}/none.conf:{tmp_path}/a.qcow2")
    assert r.returncode == 1 and r.stderr.startswith("qemu-img: Could not open 'blkdebug:")
    assert r.stderr.count("\n") == 1


# -- corrupt images in qemu-img's words ------------------------------------------------

def _poke(path, offset, fmt, *values):
    with open(path, "r+b") as f:
        f.seek(offset)
        f.write(struct.pack(fmt, *values))


def test_image_too_big_is_worded_as_qemu_img(prog, tmp_path):
    img = tmp_path / "t.qcow2"
    qcow2.create(str(img), 4 << 30)
    _poke(img, 0x18, ">Q", 1 << 60)                     # 1 EiB
    r = run(prog, "info", img)
    assert r.returncode == 1
    assert r.stderr == f"qemu-img: Could not open '{img}': Image is too big\n"
    with pytest.raises(qcow2.CorruptImageError) as info:   # the library keeps the details
        qcow2.open(str(img))
    assert "(at offset 0x18)" in str(info.value) and info.value.offset == 0x18


def test_l1_too_small_is_worded_as_qemu_img(prog, tmp_path):
    img = tmp_path / "t.qcow2"
    qcow2.create(str(img), 64 << 20)
    _poke(img, 0x24, ">I", 0)
    r = run(prog, "info", img)
    assert r.stderr == f"qemu-img: Could not open '{img}': L1 table is too small\n"


def _with_snapshot(prog, img):
    qcow2.create(str(img), 64 << 20)
    assert run(prog, "snapshot", "-c", "sn1", img).returncode == 0
    with open(img, "rb") as f:
        f.seek(0x40)
        return struct.unpack(">Q", f.read(8))[0]       # the snapshot table's offset


def test_too_much_extra_data_gives_the_repair_hint(prog, tmp_path):
    img = tmp_path / "t.qcow2"
    table = _with_snapshot(prog, img)
    _poke(img, table + 36, ">I", 65536)                 # extra_data_size
    r = run(prog, "info", img)
    assert r.returncode == 1
    assert r.stderr == (f"qemu-img: Could not open '{img}': Too much extra metadata in "
                        f"snapshot table entry 0\nYou can force-remove this extra metadata "
                        f"with qemu-img check -r all\n")


def test_check_prefixes_the_lines_qemu_img_reports(prog, tmp_path):
    img = tmp_path / "t.qcow2"
    table = _with_snapshot(prog, img)
    _poke(img, table + 36, ">I", 65536)
    r = run(prog, "check", img)
    assert r.returncode == 1
    lines = r.stderr.splitlines()
    assert lines[0] == ("qemu-img: ERROR failed to read the snapshot table: Too much extra "
                        "metadata in snapshot table entry 0")
    assert lines[1] == "You can force-remove this extra metadata with qemu-img check -r all"


def test_snapshot_names_show_as_c_strings(prog, tmp_path):
    img = tmp_path / "t.qcow2"
    qcow2.create(str(img), 64 << 20)
    assert run(prog, "snapshot", "-c", "a" * 300, img).returncode == 0
    r = run(prog, "snapshot", "-l", img)
    row = r.stdout.splitlines()[2]
    assert ("a" * 255) in row and ("a" * 256) not in row


# -- events announced by the engine ----------------------------------------------------

def test_snapshot_delete_with_cluster_free_failing_leaks_only(prog, tmp_path):
    img = tmp_path / "t.qcow2"
    qcow2.create(str(img), 64 << 20)
    with qcow2.open(str(img), "r+") as im:
        im.pwrite(b"\x01" * 65536, 0)
    assert run(prog, "snapshot", "-c", "foo", img).returncode == 0
    conf = tmp_path / "blkdebug.conf"
    conf.write_text('[inject-error]\nevent = "cluster_free"\nerrno = "5"\n')
    r = run(prog, "snapshot", "-d", "foo", f"blkdebug:{conf}:{img}")
    assert r.returncode == 1
    assert r.stderr == ("qcow2_free_clusters failed: Input/output error\n"
                        "qemu-img: Could not delete snapshot 'foo': Failed to free the "
                        "cluster and L1 table: Input/output error\n")
    assert run(prog, "snapshot", "-l", img).stdout == ""      # the snapshot is gone
    r = run(prog, "check", img)
    assert r.returncode == 3                                  # leaks, nothing worse
    assert "4 leaked clusters were found on the image." in r.stdout
    assert run(prog, "check", "-r", "all", img).returncode == 0
    with qcow2.open(str(img)) as im:
        assert im.pread(65536, 0) == b"\x01" * 65536


def test_snapshot_delete_without_injection_is_unchanged(prog, tmp_path):
    img = tmp_path / "t.qcow2"
    qcow2.create(str(img), 64 << 20)
    assert run(prog, "snapshot", "-c", "foo", img).returncode == 0
    conf = tmp_path / "blkdebug.conf"
    conf.write_text('[inject-error]\nevent = "l2_load"\n')
    r = run(prog, "snapshot", "-d", "foo", f"blkdebug:{conf}:{img}")
    assert r.returncode == 0 and r.stderr == ""
    assert run(prog, "check", img).returncode == 0


def _overlay(tmp_path):
    base, top = tmp_path / "base.qcow2", tmp_path / "top.qcow2"
    qcow2.create(str(base), 64 << 20)
    qcow2.create(str(top), 64 << 20, backing_file=str(base), backing_format="qcow2")
    with qcow2.open(str(top), "r+") as im:
        im.pwrite(b"\x07" * 65536, 0)
    return base, top


def test_commit_rebuilds_the_emptied_top(prog, tmp_path):
    base, top = _overlay(tmp_path)
    r = run(prog, "commit", top)
    assert r.returncode == 0 and r.stdout == "Image committed.\n"
    assert os.path.getsize(top) == 4 * 65536          # header, reftable, refblock, L1
    assert run(prog, "check", top).returncode == 0
    with qcow2.open(str(top)) as im:
        assert im.pread(65536, 0) == b"\x07" * 65536  # now from the base
    with qcow2.open(str(base)) as im:
        assert im.pread(65536, 0) == b"\x07" * 65536


@pytest.mark.parametrize("event", ["l1_update", "empty_image_prepare", "reftable_update",
                                   "refblock_alloc"])
def test_commit_failing_to_empty_leaves_a_dirty_image(prog, tmp_path, event):
    base, top = _overlay(tmp_path)
    conf = tmp_path / "blkdebug.conf"
    conf.write_text(f'[inject-error]\nevent = "{event}"\n')
    name = f"blkdebug:{conf}:{top}"
    r = run(prog, "commit", name)
    assert r.returncode == 1
    assert r.stderr == f"qemu-img: Failed to empty {name}: Input/output error\n"
    with open(top, "rb") as f:
        f.seek(C_HDR_INCOMPATIBLE)
        assert struct.unpack(">Q", f.read(8))[0] & 1          # dirty: rebuilt on open
    assert run(prog, "check", "-r", "all", top).returncode == 0
    assert run(prog, "check", top).returncode == 0
    with qcow2.open(str(top)) as im:                          # the data: in the base
        assert im.pread(65536, 0) == b"\x07" * 65536


C_HDR_INCOMPATIBLE = 0x48


def test_commit_into_a_failing_backing_file(prog, tmp_path):
    base, top = tmp_path / "base.qcow2", tmp_path / "top.qcow2"
    qcow2.create(str(base), 1 << 20)
    backing = (f"json:{{'driver': 'qcow2', 'file': {{'driver': 'blkdebug', 'inject-error': "
               f"[{{'event': 'write_aio', 'errno': 28, 'once': true}}], 'image': "
               f"{{'driver': 'file', 'filename': '{base}'}}}}}}")
    r = run(prog, "create", "-f", "qcow2", "-b", backing, "-F", "qcow2", top)
    assert r.returncode == 0, r.stderr
    assert "backing_file=json:{'driver': 'qcow2',, 'file'" in r.stdout   # commas doubled
    with qcow2.open(str(top), "r+") as im:
        im.pwrite(b"\x09" * 65536, 0)
    r = run(prog, "commit", top)
    assert r.returncode == 1
    assert r.stderr == "qemu-img: Block job failed: No space left on device\n"
    with qcow2.open(str(top)) as im:                    # the top keeps its data
        assert im.pread(65536, 0) == b"\x09" * 65536


def test_json_backing_names_without_error_injection_stay_refused(tmp_path):
    for name in (f"json:{{'driver': 'qcow2', 'file': {{'driver': 'file', "
                 f"'filename': '{tmp_path}/b'}}}}",
                 f"json:{{'driver': 'qcow2', 'file': {{'driver': 'blkdebug', 'image': "
                 f"{{'driver': 'file', 'filename': '{tmp_path}/b'}}}}}}"):
        with pytest.raises(qcow2.UnsafeImageError):
            qcow2.create(tmp_path / "x.qcow2", "1M", backing_file=name, backing_format="raw",
                         unsafe=True)


# -- quorum and names qemu-img cannot say as a file name ---------------------------------

def test_quorum_votes():
    from qcow2.backends.quorum import QuorumBackend
    kids = [MemoryBackend(writable=True) for _ in range(3)]
    for k in kids:
        k.pwrite(b"same", 0)
    kids[2].pwrite(b"diff", 0)
    q = QuorumBackend(kids, 2)
    assert q.pread(4, 0) == b"same"
    q2 = QuorumBackend(kids, 3)
    with pytest.raises(OSError) as info:
        q2.pread(4, 0)
    assert info.value.errno == errno.EIO
    q.pwrite(b"new!", 0)
    assert all(k.pread(4, 0) == b"new!" for k in kids)


def test_info_through_quorum_and_set_state(prog, tmp_path):
    base, top = _overlay(tmp_path)
    copy = tmp_path / "copy.qcow2"
    shutil.copy(top, copy)
    quorum = (f"json:{{'driver': 'qcow2', 'file': {{'driver': 'quorum', 'vote-threshold': 1, "
              f"'children': [{{'driver': 'file', 'filename': '{top}'}}, "
              f"{{'driver': 'file', 'filename': '{copy}'}}]}}}}")
    r = run(prog, "info", quorum)
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    assert lines[0] == f"image: {quorum}"
    assert f"backing file: {base}" in lines                   # absolute: found
    relative = tmp_path / "rel.qcow2"
    assert run(prog, "create", "-f", "qcow2", "-b", "base.qcow2", "-F", "qcow2", relative,
               "64M").returncode == 0
    r = run(prog, "info", quorum.replace(str(top), str(relative)).replace(str(copy),
                                                                          str(relative)))
    assert r.returncode == 0, r.stderr
    assert "backing file: base.qcow2 (cannot determine actual path)" in r.stdout.splitlines()
    state = (f"json:{{'driver': 'qcow2', 'file': {{'driver': 'blkdebug', 'image': "
             f"{{'driver': 'file', 'filename': '{top}'}}, 'set-state': "
             f"[{{'event': 'read_aio', 'new_state': 42}}]}}}}")
    r = run(prog, "info", state)
    assert r.returncode == 0, r.stderr
    assert r.stdout.splitlines()[0] == f"image: {state}"
    assert f"backing file: {base}" in r.stdout


def test_snapshot_create_failure_in_qemu_img_words(prog, tmp_path):
    img = tmp_path / "t.qcow2"
    assert run(prog, "create", "-f", "qcow2", "-o", "refcount_bits=1", img,
               "64M").returncode == 0
    with qcow2.open(str(img), "r+") as im:
        im.pwrite(b"\x01" * 512, 0)
    r = run(prog, "snapshot", "-c", "foo", img)
    assert r.returncode == 1
    assert r.stderr == "qemu-img: Could not create snapshot 'foo': -22 (Invalid argument)\n"
    assert run(prog, "check", img).returncode == 0          # and nothing leaked (better)


@pytest.mark.parametrize("field, fmt, value, reason, why", [
    (0, ">Q", 0x400200, "Snapshot L1 table offset invalid", "Invalid argument"),
    (8, ">I", 0x10000000, "Snapshot L1 table too large", "File too large"),
])
def test_snapshot_with_a_bad_l1_table_in_qemu_img_words(prog, tmp_path, field, fmt, value,
                                                        reason, why):
    img = tmp_path / "t.qcow2"
    table = _with_snapshot(prog, img)
    _poke(img, table + field, fmt, value)
    r = run(prog, "snapshot", "-a", "sn1", img)
    assert r.returncode == 1
    assert r.stderr == (f"qemu-img: {reason}\nqemu-img: Could not apply snapshot 'sn1': "
                        f"Failed to load snapshot: {why}\n")
    r = run(prog, "snapshot", "-d", "sn1", img)
    assert r.stderr == f"qemu-img: Could not delete snapshot 'sn1': {reason}\n"
    with pytest.raises(qcow2.CorruptImageError) as info:       # the library: the details
        with qcow2.open(str(img), "r+") as im:
            im.lookup_snapshot("sn1")
    assert "of snapshot 1" in str(info.value)


def test_snapshot_of_a_reference_far_past_the_end_grows_nothing(prog, tmp_path):
    """An L2 entry pointing 2^54 bytes out: snapshot -c fails (EFBIG) before the refcount
    table is grown past the format's limit, so the image stays as it was and openable."""
    img = tmp_path / "t.qcow2"
    qcow2.create(str(img), 64 << 20)
    with qcow2.open(str(img), "r+") as im:
        im.pwrite(b"\x01" * 512, 0)
    with open(img, "rb") as f:
        f.seek(0x28)
        f.seek(struct.unpack(">Q", f.read(8))[0])     # the L1 table
        l2 = struct.unpack(">Q", f.read(8))[0] & 0x00FFFFFFFFFFFE00
    size = os.path.getsize(img)
    _poke(img, l2, ">Q", 0xBFFFFFFFFFFF0000)
    r = run(prog, "snapshot", "-c", "test", img)
    assert r.stderr == "qemu-img: Could not create snapshot 'test': -27 (File too large)\n"
    assert os.path.getsize(img) == size
    with qcow2.open(str(img)) as im:                 # still opens (read-only)
        assert im.snapshots() == []
