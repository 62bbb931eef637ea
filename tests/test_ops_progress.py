"""The pace of a copy (-r): RateLimit with a fake clock, so no test waits or times."""

from __future__ import annotations

import pytest

import qcow2
from qcow2.errors import InvalidOptionError
from qcow2.ops.progress import Progress, RateLimit, check_rate, rate_limit


class FakeClock:
    def __init__(self):
        self.now = 100.0
        self.slept = []

    def __call__(self):
        return self.now

    def sleep(self, s):
        self.slept.append(s)
        self.now += s


def test_rate_limit_books_each_piece():
    clock = FakeClock()
    lim = RateLimit(1000, clock=clock, sleep=clock.sleep)
    lim.consume(500)                    # the first piece goes at once
    assert clock.slept == []
    lim.consume(500)                    # after the first one's 0.5 s
    assert clock.slept == [pytest.approx(0.5)]
    clock.now += 2.0                    # a pause: its time is not saved up
    lim.consume(1000)
    assert len(clock.slept) == 1
    lim.consume(10)                     # waits for the 1000 bytes' second
    assert clock.slept[-1] == pytest.approx(1.0)
    lim.consume(10)
    assert clock.slept[-1] == pytest.approx(0.01)
    # the bytes before the last piece had their 2.01 s, plus the 2 s pause less the
    # half second of the second piece that ran during it
    assert clock.now - 100.0 == pytest.approx((lim.done - 10) / lim.rate + 2.0 - 0.5)


def test_rate_limit_is_shared_by_threads():
    import threading
    clock = FakeClock()
    lock = threading.Lock()

    def sleep(s):
        with lock:
            clock.slept.append(s)
    lim = RateLimit(1 << 20, clock=clock, sleep=sleep)
    threads = [threading.Thread(target=lambda: [lim.consume(1 << 16) for _ in range(32)])
               for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    # the clock stood still: 128 pieces of 1/16 s, each booked after the ones before
    assert lim.done == 128 << 16
    assert sorted(clock.slept) == pytest.approx([k / 16 for k in range(1, 128)])


def test_progress_paces_with_and_without_a_callback():
    for cb in (None, [].append):
        clock = FakeClock()
        prog = Progress(4000, cb, RateLimit(1000, clock=clock, sleep=clock.sleep))
        for d in range(0, 4000, 1000):
            prog.add_split(d, 1000, unit=512)
        last = 1000 if cb is None else 4000 - 3584    # (split at multiples of 512)
        assert sum(clock.slept) == pytest.approx((4000 - last) / 1000)


def test_rate_values():
    assert rate_limit(None) is None and rate_limit(0) is None
    assert rate_limit(5).rate == 5
    check_rate(None)
    check_rate(0)
    for bad in (-1, 1.5, "1M", True):
        with pytest.raises(InvalidOptionError):
            check_rate(bad)


def test_library_calls_check_rate_and_cache(tmp_path):
    img = tmp_path / "a.qcow2"
    qcow2.create(str(img), 1 << 20)
    with pytest.raises(InvalidOptionError, match="rate limit"):
        qcow2.convert(str(img), str(tmp_path / "b.raw"), rate_limit=-1)
    assert not (tmp_path / "b.raw").exists()
    from qcow2.ops.amend import amend
    from qcow2.ops.commit import commit
    with pytest.raises(InvalidOptionError, match="Invalid cache option: fast"):
        commit(str(img), cache="fast")
    with pytest.raises(InvalidOptionError, match="Invalid cache option: fast"):
        amend(str(img), {"lazy_refcounts": "on"}, cache="fast")
