"""qcow2.lightweight: named tuples and thread primitives as the standard library's."""

from __future__ import annotations

import copy
import pickle
import threading
from collections import namedtuple

import pytest

from qcow2.image import Extent
from qcow2.lightweight import Lock, RLock, local, record


class Point(record("Point", "x y z", defaults=(9,))):
    __slots__ = ()

    def norm1(self) -> int:
        return abs(self.x) + abs(self.y) + abs(self.z)


Ref = namedtuple("Point", "x y z", defaults=(9,))


def test_record_behaves_as_namedtuple():
    p, r = Point(1, 2), Ref(1, 2)
    assert p == r == (1, 2, 9) and hash(p) == hash(r)
    assert repr(p) == repr(r) == "Point(x=1, y=2, z=9)"
    assert Point(1, y=2, z=3) == Ref(1, y=2, z=3)
    assert p._fields == r._fields and p._field_defaults == r._field_defaults
    assert p._asdict() == r._asdict()
    assert p._replace(z=4) == r._replace(z=4) == (1, 2, 4)
    assert type(p._replace(z=4)) is Point and p._replace(z=4).norm1() == 7
    assert Point._make([4, 5, 6]) == Ref._make([4, 5, 6])
    assert (p.x, p.y, p.z, p[1], p[-1], p[:2]) == (r.x, r.y, r.z, r[1], r[-1], r[:2])
    assert pickle.loads(pickle.dumps(p)) == p and type(copy.deepcopy(p)) is Point
    match p:
        case Point(a, b):
            assert (a, b) == (1, 2)
    with pytest.raises(AttributeError):
        p.x = 3
    with pytest.raises(AttributeError):
        p.w = 3                                     # __slots__: no instance dict


@pytest.mark.parametrize("call", [lambda T: T(1), lambda T: T(1, 2, 3, 4),
                                  lambda T: T(1, 2, w=3), lambda T: T._make([1]),
                                  lambda T: T(1, 2)._replace(w=3)])
def test_record_refuses_as_namedtuple(call):
    # the same exception as collections.namedtuple raises for the same mistake
    with pytest.raises(Exception) as want:
        call(Ref)
    with pytest.raises(want.type):
        call(Point)


@pytest.mark.parametrize("names", ["a a", "_a", "a-b", "1a"])
def test_record_checks_names(names):
    with pytest.raises(ValueError):
        record("T", names)


def test_extent_is_a_record():
    e = Extent(0, 65536, 0, True, False, True, None)
    assert e.as_dict() == {"start": 0, "length": 65536, "depth": 0, "present": True,
                           "zero": False, "data": True}
    assert e._replace(offset=4096).as_dict()["offset"] == 4096


def test_thread_primitives_are_threadings():
    assert type(Lock()) is type(threading.Lock())
    assert type(RLock()) is type(threading.RLock())
    assert local is threading.local
