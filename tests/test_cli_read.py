"""The ``qcow2`` command line against ``qemu-img``, run as subprocesses.

``python -m qcow2 info|map|convert`` on a sample of the corpus (one image per feature
group) must print what qemu-img prints: JSON equal as data *and* as text, human
``info`` equal line by line except ``disk size:`` (a rounded, human-formatted number
whose exact formatting is not part of the contract), ``convert -O raw`` byte-identical
and as sparse as qemu-img's.  Errors: exit status 1, exactly one line on stderr,
never a traceback.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

import corpus
import oracle

SAMPLE_FEATURES = ("raw", "v2", "zstd", "zlib", "extended_l2", "chainA", "chainB",
                   "snapshots", "data_file", "data_file_raw", "dirty", "bitmaps", "prealloc",
                   "encrypted", "unknown_ext", "empty", "resized", "zero_clusters")
SPARSE_SLACK = 256 * 1024


def _sample(select=lambda c: True):
    """One default case per feature group (plus every slow case when slow runs)."""
    chosen = []
    for feat in SAMPLE_FEATURES:
        for c in corpus.cases():
            if not c.slow and feat in c.features and select(c):
                if c not in chosen:
                    chosen.append(c)
                break
    return [pytest.param(c, id=c.id) for c in chosen]


SAMPLE = _sample()
SAMPLE_READABLE = _sample(lambda c: c.readable)
SAMPLE_QCOW2 = _sample(lambda c: c.fmt == "qcow2")
SAMPLE_BACKING = _sample(lambda c: "backing" in c.features)


def _env() -> dict:
    """The test's environment (QCOW2_IMPL...), with the folder this process imported
    ``qcow2`` from first on PYTHONPATH: the CLI runs the very package under test,
    whatever the subprocess's working directory."""
    import qcow2
    env = dict(os.environ)
    where = os.path.dirname(os.path.dirname(os.path.abspath(qcow2.__file__)))
    env["PYTHONPATH"] = os.pathsep.join(
        p for p in (where, env.get("PYTHONPATH", "")) if p)
    return env


def cli(*args, cwd=None) -> subprocess.CompletedProcess:
    """``python -m qcow2 args``, run in ``cwd`` (tests use a folder away from the
    images so nothing depends on the working directory)."""
    return subprocess.run([sys.executable, "-m", "qcow2", *map(str, args)], cwd=cwd,
                          env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                          timeout=600)


def ok(proc) -> str:
    assert proc.returncode == 0, "exit %d, stderr: %s" % (
        proc.returncode, proc.stderr.decode(errors="replace"))
    assert b"Traceback" not in proc.stderr
    return proc.stdout.decode()


def assert_clean_error(proc, *names):
    err = proc.stderr.decode(errors="replace")
    assert proc.returncode == 1, "exit %d (want 1); stderr: %r" % (proc.returncode, err)
    assert "Traceback" not in err, err
    lines = err.rstrip("\n").split("\n")
    assert len(lines) == 1 and lines[0].strip(), "want one line on stderr, got %r" % err
    for name in names:
        assert name in err, "the message should name %r: %r" % (name, err)


def _without_disk_size(text: str) -> list[str]:
    return [ln for ln in text.splitlines() if not ln.startswith("disk size:")]


# ------------------------------------------------------------------------ info

@pytest.mark.parametrize("case", SAMPLE)
def test_info_json(case, built, tmp_path):
    out = ok(cli("info", "--output=json", built.path, cwd=tmp_path))
    assert json.loads(out) == oracle.info_json(built.path)


@pytest.mark.parametrize("case", SAMPLE)
def test_info_json_text_identical(case, built, tmp_path):
    """Byte-identical stdout: key order, 4-space indent, qemu's empty-list layout
    ("[\\n    ]"), trailing newline."""
    out = ok(cli("info", "--output=json", built.path, cwd=tmp_path))
    assert out == oracle.info_text(built.path, "--output=json")


@pytest.mark.parametrize("case", SAMPLE_QCOW2)
def test_info_nova_argument_order(case, built, tmp_path):
    """OpenStack nova calls ``qemu-img info PATH --force-share --output=json -f qcow2``."""
    out = ok(cli("info", built.path, "--force-share", "--output=json", "-f", "qcow2",
                 cwd=tmp_path))
    expected = oracle.qemu_img("info", built.path, "--force-share", "--output=json",
                               "-f", "qcow2", cwd=oracle._cwd_for(built.path))
    assert json.loads(out) == json.loads(expected.stdout)
    out_u = ok(cli("info", "-U", "-f", "qcow2", "--output=json", built.path, cwd=tmp_path))
    assert json.loads(out_u) == json.loads(expected.stdout)


@pytest.mark.parametrize("case", SAMPLE_BACKING)
def test_info_backing_chain_json(case, built, tmp_path):
    out = ok(cli("info", "--output=json", "--backing-chain", built.path, cwd=tmp_path))
    got = json.loads(out)
    expected = oracle.info_json(built.path, "--backing-chain")
    assert isinstance(got, list) and len(got) == len(expected) >= 2
    assert got == expected
    assert out == oracle.info_text(built.path, "--output=json", "--backing-chain")


@pytest.mark.parametrize("case", SAMPLE)
def test_info_human(case, built, tmp_path):
    out = ok(cli("info", built.path, cwd=tmp_path))
    expected = oracle.info_text(built.path)
    assert _without_disk_size(out) == _without_disk_size(expected)
    assert sum(ln.startswith("disk size: ") for ln in out.splitlines()) == 1


@pytest.mark.parametrize("case", SAMPLE_BACKING)
def test_info_human_backing_chain(case, built, tmp_path):
    out = ok(cli("info", "--backing-chain", "--output=human", built.path, cwd=tmp_path))
    expected = oracle.info_text(built.path, "--backing-chain")
    assert _without_disk_size(out) == _without_disk_size(expected)


@pytest.mark.parametrize("case", SAMPLE)
def test_info_explicit_format(case, built, tmp_path):
    out = ok(cli("info", "-f", case.fmt, "--output=json", built.path, cwd=tmp_path))
    assert json.loads(out) == oracle.info_json(built.path, fmt=case.fmt)


# ------------------------------------------------------------------------- map

@pytest.mark.parametrize("case", SAMPLE_READABLE)
def test_map_json(case, built, tmp_path):
    out = ok(cli("map", "--output=json", built.path, cwd=tmp_path))
    assert json.loads(out) == oracle.map_json(built.path)
    assert out == oracle.map_text(built.path, "--output=json")


@pytest.mark.parametrize("case", SAMPLE_READABLE)
def test_map_human(case, built, tmp_path):
    """Human map: same table.  qemu-img 7.2 refuses it (exit 1, "File contains
    external, encrypted or compressed clusters.") once it meets a compressed cluster,
    after printing the rows before it: same rows, then a clean error."""
    expected = oracle.map_proc(built.path, fmt=case.fmt)
    proc = cli("map", "-f", case.fmt, built.path, cwd=tmp_path)
    assert proc.stdout.decode() == expected.stdout.decode()
    if expected.returncode == 0:
        ok(proc)
    else:
        assert_clean_error(proc)
        assert proc.stderr.decode().split(": ", 1)[-1] == \
            expected.stderr.decode().split(": ", 1)[-1]


# --------------------------------------------------------------------- convert

@pytest.mark.parametrize("case", SAMPLE_READABLE)
@pytest.mark.parametrize("with_format", [False, True], ids=["probe", "f"])
def test_convert_raw(case, built, tmp_path, with_format):
    dst = tmp_path / "out.raw"
    args = ["convert"] + (["-f", case.fmt] if with_format else []) + \
        ["-O", "raw", built.path, dst]
    ok(cli(*args, cwd=tmp_path))
    expected = oracle.raw_path(built.path, case.fmt)
    assert dst.stat().st_size == expected.stat().st_size
    with open(dst, "rb") as a, open(expected, "rb") as b:
        off = 0
        while True:
            x, y = a.read(4 << 20), b.read(4 << 20)
            if x != y:
                d = oracle.first_difference(x, y)
                pytest.fail("convert output differs from qemu-img's at offset %d" % (off + d))
            if not x:
                break
            off += len(x)
    got_alloc = dst.stat().st_blocks * 512
    exp_alloc = expected.stat().st_blocks * 512
    assert got_alloc <= exp_alloc + SPARSE_SLACK, (
        "convert output not sparse: %d bytes allocated, qemu-img's %d" % (got_alloc, exp_alloc))


def test_convert_overwrites_existing_target(built_sample_qcow2, tmp_path):
    """Like qemu-img, an existing target is replaced (truncated), not merged."""
    dst = tmp_path / "out.raw"
    dst.write_bytes(b"\xff" * (16 << 20))
    ok(cli("convert", "-O", "raw", built_sample_qcow2.path, dst, cwd=tmp_path))
    expected = oracle.raw_path(built_sample_qcow2.path, "qcow2")
    assert dst.stat().st_size == expected.stat().st_size
    assert dst.read_bytes() == expected.read_bytes()


@pytest.fixture
def built_sample_qcow2(corpus_root, qemu):
    return corpus.build(corpus.by_id()["v3-c64k-none-rb16-solo"], corpus_root)


# ---------------------------------------------------------------------- errors

def test_error_nonexistent(tmp_path, qemu):
    missing = tmp_path / "no-such-image.qcow2"
    for args in (["info", missing], ["info", "--output=json", missing],
                 ["map", "--output=json", missing],
                 ["convert", "-O", "raw", missing, tmp_path / "out.raw"]):
        assert oracle.qemu_img(*args, check=False).returncode == 1
        assert_clean_error(cli(*args, cwd=tmp_path), "no-such-image.qcow2")


def test_error_garbage_as_qcow2(tmp_path, qemu):
    garbage = tmp_path / "garbage.bin"
    garbage.write_bytes(bytes(range(256)) * 400)
    for args in (["info", "-f", "qcow2", garbage], ["map", "-f", "qcow2", garbage],
                 ["convert", "-f", "qcow2", "-O", "raw", garbage, tmp_path / "out.raw"]):
        assert oracle.qemu_img(*args, check=False).returncode == 1
        assert_clean_error(cli(*args, cwd=tmp_path))


@pytest.mark.parametrize("keep", [0, 3, 60, 100])
def test_error_truncated_header(built_sample_qcow2, tmp_path, keep):
    """A qcow2 file cut inside its header: qemu-img fails, so must we."""
    bad = tmp_path / "truncated.qcow2"
    with open(built_sample_qcow2.path, "rb") as f:
        bad.write_bytes(f.read(keep))
    for args in (["info", "-f", "qcow2", bad], ["map", "-f", "qcow2", bad],
                 ["convert", "-f", "qcow2", "-O", "raw", bad, tmp_path / "out.raw"]):
        assert oracle.qemu_img(*args, check=False).returncode == 1
        assert_clean_error(cli(*args, cwd=tmp_path))


@pytest.mark.parametrize("keep_clusters", [1, 3, 5])
def test_truncated_tables_no_traceback(built_sample_qcow2, tmp_path, keep_clusters):
    """A qcow2 file cut after its header, inside or before its tables.

    qemu-img 7.2 reads the missing part as zeros and succeeds; the engine may
    instead refuse the image as corrupt.  Either way: no traceback, and on success
    the same output as qemu-img, on failure exit 1 with one line."""
    bad = tmp_path / "cut.qcow2"
    with open(built_sample_qcow2.path, "rb") as f:
        bad.write_bytes(f.read(keep_clusters * 65536))
    for args, outfile in ((["map", "--output=json", bad], None),
                          (["convert", "-O", "raw", bad, tmp_path / "out.raw"],
                           tmp_path / "out.raw")):
        proc = cli(*args, cwd=tmp_path)
        if proc.returncode == 0:
            assert b"Traceback" not in proc.stderr
            if outfile is None:
                assert json.loads(proc.stdout) == oracle.map_json(bad)
            else:
                assert outfile.read_bytes() == oracle.raw_bytes(bad)
        else:
            assert_clean_error(proc)


@pytest.mark.parametrize("case", corpus.params(lambda c: not c.readable))
def test_error_convert_encrypted(case, built, tmp_path):
    dst = tmp_path / "out.raw"
    assert oracle.qemu_img("convert", "-O", "raw", built.path, dst,
                           check=False).returncode == 1
    assert_clean_error(cli("convert", "-O", "raw", built.path, dst, cwd=tmp_path))


def test_error_unknown_format_option(tmp_path, built_sample_qcow2):
    assert_clean_error(cli("info", "-f", "vmdk-nope", built_sample_qcow2.path, cwd=tmp_path))
