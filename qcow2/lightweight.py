"""Standard-library building blocks without their import cost at CLI start.

Every ``qemu-img``-style command is a fresh process, so what its imports pull in is
paid on every run: ``threading`` costs 3.8 ms (it imports ``functools``,
``collections``, ``types``...), ``collections`` alone 1.7 ms, against 10 ms for the
interpreter itself.  The modules a plain ``info``/``create``/``resize`` imports take
what they need from here instead:

- ``Lock``, ``RLock``, ``local``: the very objects ``threading`` re-exports from the
  built-in ``_thread`` module (``threading.Lock is _thread.allocate_lock``, and so
  on), so nothing differs but the import.  Modules that start threads, wait on
  conditions or use other ``threading`` APIs import ``threading`` itself.
- :func:`record`: a named-tuple class, as ``collections.namedtuple`` makes it
  (positional and keyword construction, defaults, ``_fields``, ``_make``,
  ``_replace``, ``_asdict``, a readable repr, pickling, ``match``).
"""

from __future__ import annotations

from _operator import itemgetter as _itemgetter   # what operator.itemgetter is
from _thread import RLock, allocate_lock as Lock
from _thread import _local as local              # what threading.local is

__all__ = ["Lock", "RLock", "local", "record"]


def record(typename: str, field_names: str, *, defaults: tuple = (),
           module: str | None = None) -> type:
    """A tuple subclass with named fields (``field_names``: separated by spaces),
    the last ``len(defaults)`` of them optional.  Subclass it to add methods; give
    the subclass ``__slots__ = ()`` as for a namedtuple."""
    fields = tuple(field_names.replace(",", " ").split())
    for name in (typename, *fields):
        if not name.isidentifier() or name.startswith("_"):
            raise ValueError(f"bad field or type name: {name!r}")
    if len(set(fields)) != len(fields):
        raise ValueError(f"duplicate field names in {field_names!r}")
    if len(defaults) > len(fields):
        raise TypeError("more defaults than fields")
    n = len(fields)
    args = ", ".join(fields)
    # __new__ with the exact signature (as namedtuple builds it): fast, and its
    # errors name the missing or unexpected argument
    ns: dict = {"_tuple_new": tuple.__new__}
    exec(f"def __new__(_cls, {args}):\n    return _tuple_new(_cls, ({args},))", ns)
    new = ns["__new__"]
    new.__defaults__ = tuple(defaults) or None
    new.__qualname__ = f"{typename}.__new__"

    def _make(cls, iterable):
        t = tuple.__new__(cls, iterable)
        if len(t) != n:
            raise TypeError(f"Expected {n} arguments, got {len(t)}")
        return t

    def _replace(self, **changes):
        t = self._make([changes.pop(f, v) for f, v in zip(fields, self, strict=True)])
        if changes:
            raise ValueError(f"Got unexpected field names: {list(changes)!r}")
        return t

    def _asdict(self) -> dict:
        return dict(zip(fields, self, strict=True))

    def __repr__(self) -> str:
        return (f"{type(self).__name__}("
                + ", ".join(f"{f}={v!r}" for f, v in zip(fields, self, strict=True)) + ")")

    def __getnewargs__(self) -> tuple:
        return tuple(self)

    body = {
        "__doc__": f"{typename}({args})", "__slots__": (), "_fields": fields,
        "_field_defaults": dict(zip(fields[n - len(defaults):], defaults, strict=True)),
        "__match_args__": fields, "__new__": new, "_make": classmethod(_make),
        "_replace": _replace, "_asdict": _asdict, "__repr__": __repr__,
        "__getnewargs__": __getnewargs__,
    }
    for i, f in enumerate(fields):
        body[f] = property(_itemgetter(i), doc=f"Alias for field number {i}")
    cls = type(typename, (tuple,), body)
    if module is not None:
        cls.__module__ = module
    return cls
