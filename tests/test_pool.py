"""qcow2.pool: the one worker pool of convert, compare and sparse copy."""

from __future__ import annotations

import random
import threading
import time

import pytest

from qcow2 import pool


@pytest.mark.parametrize("workers", [1, 2, 4])
@pytest.mark.parametrize("ordered", [True, False])
def test_order_bound_and_errors(workers, ordered):
    """Applies in job order (unless told otherwise), finishes everything, never parks
    more than 2 x workers results, and hands a worker's exception to the caller
    without hanging."""
    rng = random.Random(workers)
    delays = [rng.random() * 0.004 for _ in range(200)]
    applied, finished, live = [], [], []
    lock = threading.Lock()
    peak = [0]

    def compute(job):
        time.sleep(delays[job])
        with lock:
            live.append(job)
            peak[0] = max(peak[0], len(live))
        return job

    def apply(r):
        applied.append(r)

    def finish(r):
        with lock:
            live.remove(r)
            finished.append(r)

    assert pool.run(range(200), compute, workers, apply=apply, finish=finish,
                    ordered=ordered) is False
    assert sorted(applied) == list(range(200)) and sorted(finished) == list(range(200))
    if ordered:
        assert applied == list(range(200))
    assert peak[0] <= 3 * workers + 1

    def bad(job):
        if job == 57:
            raise OSError(5, "boom")
        return compute(job)
    with pytest.raises(OSError, match="boom") as info:
        pool.run(range(200), bad, workers, apply=apply, finish=finish, ordered=ordered)
    assert str(info.value) == "[Errno 5] boom"               # the message is unchanged
    assert info.value.__notes__ == ["qcow2-pool: raised by job 57"]


@pytest.mark.parametrize("workers", [1, 3])
def test_unordered_without_apply(workers):
    seen = []
    lock = threading.Lock()

    def work(job):
        with lock:
            seen.append(job)
    assert pool.run(iter(range(1000)), work, workers) is False
    assert sorted(seen) == list(range(1000))


@pytest.mark.parametrize("workers", [1, 2, 4])
def test_apply_stops_early(workers):
    """A true apply stops the pool: nothing after the stopping result is applied and
    few jobs beyond it are even taken (the iterator is pulled lazily)."""
    taken = []

    def jobs():
        for i in range(10000):
            taken.append(i)
            yield i

    applied = []

    def apply(r):
        applied.append(r)
        return r == 30
    assert pool.run(jobs(), lambda j: j, workers, apply=apply, ordered=True) is True
    assert applied == list(range(31))
    assert len(taken) <= 31 + 3 * workers + 1


@pytest.mark.parametrize("where", ["apply", "finish", "jobs"])
def test_error_in_every_step_names_its_job(where):
    def jobs():
        for i in range(100):
            if where == "jobs" and i == 40:
                raise ValueError("bad plan")
            yield i

    def step(r):
        if r == 40:
            raise ValueError(f"bad {where}")

    kwargs = {"apply": step} if where == "apply" else {"finish": step}
    with pytest.raises(ValueError, match="bad") as info:
        pool.run(jobs(), lambda j: j, 3, ordered=True, name="t", **kwargs)
    want = "t: raised by the job iterator" if where == "jobs" else "t: raised by job 40"
    assert info.value.__notes__ == [want]


def test_interrupt_stops_every_thread():
    """A KeyboardInterrupt in one thread stops the others after their current job and
    reaches the caller; no thread is left running."""
    started = []
    lock = threading.Lock()

    def work(job):
        with lock:
            started.append(job)
        if job == 5:
            raise KeyboardInterrupt
        time.sleep(0.001)
    before = threading.active_count()
    with pytest.raises(KeyboardInterrupt):
        pool.run(range(100000), work, 4, name="qcow2-test")
    assert len(started) < 100
    assert threading.active_count() == before
    assert not [t for t in threading.enumerate() if t.name.startswith("qcow2-test")]


@pytest.mark.parametrize("workers", [1, 3])
def test_context_entered_by_every_thread(workers):
    inside = threading.local()
    entered = []

    class ctx:
        def __enter__(self):
            inside.on = True
            entered.append(threading.current_thread().name)

        def __exit__(self, *exc):
            inside.on = False

    def work(job):
        assert inside.on
        time.sleep(0.001)
    pool.run(range(50), work, workers, context=ctx)
    assert len(entered) == workers


def test_single_job_runs_here():
    names = []
    pool.run([1], lambda j: names.append(threading.current_thread().name), 4)
    assert names == [threading.current_thread().name]
