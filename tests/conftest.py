"""Session fixtures: the qemu-built corpus, oracle caches, slow-test selection.

Options
  --corpus-dir DIR   build / reuse the corpus there (env QCOW2_CORPUS_DIR); default: a
                     session temp dir.  Reuse is safe: every case carries a stamp of
                     its recipe and is rebuilt when the recipe changes.
  --run-slow         run the tests marked ``slow`` (env QCOW2_RUN_SLOW=1; also implied
                     by a ``-m`` expression that names ``slow``).

The engine implementation is chosen by the environment (QCOW2_IMPL=auto|native|python)
when ``qcow2`` is imported; CI runs the whole suite once per implementation rather
than switching inside one process.

Tests that need qemu-img are skipped, with the reason, when it is not installed.

Ceph: the session fixture ``ceph`` (tests/cephcluster.py) is the cluster given by
QCOW2_CEPH_CONF (scripts/test.sh starts one for the whole run), else one started with
scripts/ceph.sh in a temp dir and stopped at the session's end.  Where Ceph cannot
start (QCOW2_CEPH_UNAVAILABLE says why, or the script does), tests using it skip with
the reason in the skip line.
The engine is imported inside fixtures (``engine``), never at collection time, so
the suite collects even while ``qcow2`` is incomplete.
"""

from __future__ import annotations

import os
import shutil
import sys
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent
if str(HERE) not in sys.path:          # --import-mode=importlib: make helpers importable
    sys.path.insert(0, str(HERE))

import cephcluster  # noqa: E402
import corpus  # noqa: E402
import oracle  # noqa: E402

QEMU_MODULES = {"test_read_matrix.py", "test_cli_read.py", "test_backing.py"}
QEMU_FIXTURES = {"corpus_images", "built", "qemu"}
_QEMU_MISSING = not (shutil.which("qemu-img") and shutil.which("qemu-io"))


def pytest_addoption(parser):
    group = parser.getgroup("qcow2")
    group.addoption("--corpus-dir", default=None,
                    help="build/reuse the qemu image corpus in this folder "
                         "(env QCOW2_CORPUS_DIR)")
    group.addoption("--run-slow", action="store_true", default=False,
                    help="also run tests marked slow (env QCOW2_RUN_SLOW=1)")


def pytest_configure(config):
    config.addinivalue_line(
        "markers", "slow: large or long cases (run in CI, skip locally with -m 'not slow')")


def _run_slow(config) -> bool:
    if config.getoption("--run-slow") or os.environ.get("QCOW2_RUN_SLOW", "") not in ("", "0"):
        return True
    markexpr = config.getoption("markexpr", "") or ""
    return "slow" in markexpr and "not slow" not in markexpr


@pytest.hookimpl(trylast=True)          # after -k / -m deselection
def pytest_collection_modifyitems(config, items):
    run_slow = _run_slow(config)
    skip_slow = pytest.mark.skip(reason="slow: pass --run-slow, -m slow or QCOW2_RUN_SLOW=1")
    skip_qemu = pytest.mark.skip(reason="qemu-img/qemu-io not installed (apt-get install "
                                        "qemu-utils); they are the oracles")
    needed: set[str] = set()
    for item in items:
        needs_qemu = (item.path.name in QEMU_MODULES
                      or QEMU_FIXTURES & set(getattr(item, "fixturenames", ())))
        if needs_qemu and _QEMU_MISSING:
            item.add_marker(skip_qemu)
            continue
        if "slow" in item.keywords and not run_slow:
            item.add_marker(skip_slow)
            continue
        callspec = getattr(item, "callspec", None)
        if callspec is not None:
            for value in callspec.params.values():
                if isinstance(value, corpus.Case):
                    needed.add(value.id)
    config._qcow2_needed_cases = needed


# --------------------------------------------------------------------------- fixtures

@pytest.fixture(scope="session")
def qemu():
    """Skip when qemu-img is missing; returns its path."""
    if _QEMU_MISSING:
        pytest.skip("qemu-img/qemu-io not installed")
    return shutil.which("qemu-img")


@pytest.fixture(scope="session", autouse=True)
def _oracle_cache(tmp_path_factory):
    """qemu-img convert outputs, removed at the end (they add up to GBs with slow)."""
    d = tmp_path_factory.mktemp("oracle")
    oracle.set_cache_dir(d)
    yield d
    shutil.rmtree(d, ignore_errors=True)


@pytest.fixture(scope="session")
def corpus_root(request, tmp_path_factory) -> Path:
    chosen = request.config.getoption("--corpus-dir") or os.environ.get("QCOW2_CORPUS_DIR")
    if chosen:
        root = Path(chosen).resolve()
        root.mkdir(parents=True, exist_ok=True)
        return root
    return tmp_path_factory.mktemp("corpus")


@pytest.fixture(scope="session")
def corpus_images(request, corpus_root, qemu) -> dict[str, corpus.Built]:
    """Build (in parallel) every corpus case a selected test uses; id -> Built."""
    needed = getattr(request.config, "_qcow2_needed_cases", set())
    by_id = corpus.by_id()
    return corpus.build_many([by_id[i] for i in sorted(needed) if i in by_id], corpus_root)


@pytest.fixture
def built(request, corpus_images, corpus_root) -> corpus.Built:
    """The built image of the test's ``case`` parameter."""
    case: corpus.Case = request.getfixturevalue("case")
    b = corpus_images.get(case.id)
    if b is None:                      # not pre-built (e.g. selected dynamically)
        b = corpus.build(case, corpus_root)
    return b


@pytest.fixture(scope="session")
def engine():
    """The engine under test (``import qcow2``); an import failure is an error."""
    import qcow2
    return qcow2


@pytest.fixture(scope="session")
def errors():
    from qcow2 import errors as e
    return e


@pytest.fixture(params=["native", "python"])
def impl(request):
    """Each kernel implementation in turn (the test runs once with each)."""
    if request.param == "native":
        from helpers import native_kernels
        return native_kernels()
    from qcow2 import kernels
    return kernels.get("python")


@pytest.fixture(scope="session")
def ceph(tmp_path_factory):
    """A running single-node Ceph cluster (cephcluster.Cluster); skips, with the reason,
    where Ceph cannot start.  A cluster given by QCOW2_CEPH_CONF is used as it is (and
    must answer); otherwise one is started here and stopped at the end."""
    reason = os.environ.get("QCOW2_CEPH_UNAVAILABLE")
    if reason:
        pytest.skip(f"Ceph cluster unavailable: {reason}")
    conf = os.environ.get("QCOW2_CEPH_CONF")
    if conf:
        yield cephcluster.from_conf(conf, os.environ.get("QCOW2_CEPH_KEYRING"))
        return
    missing = cephcluster.missing_tools()
    if missing:
        pytest.skip(f"Ceph cluster unavailable: {', '.join(missing)} not installed "
                    "(apt-get install ceph-mon ceph-mgr ceph-osd ceph-common)")
    directory = tmp_path_factory.mktemp("ceph")
    try:
        cluster = cephcluster.start(directory)
    except cephcluster.CephUnavailable as e:
        pytest.skip(f"Ceph cluster unavailable: {e}")
    try:
        yield cluster
    finally:
        cluster.stop()
