"""Record every write and flush an operation issues, then build the crash states a
power cut may leave.

:class:`RecordingBackend` wraps any :class:`qcow2.backends.Backend` and logs, in the
order they happen, each write (with its bytes), truncate, hole punch, allocation and
flush into a :class:`Log`; :func:`recording_files` does the same for every
``FileBackend`` the operation opens by path (the class's write-side methods are
wrapped for the duration), so that operations run through their ordinary entry
points.

A flush is logged when it *starts*: a write logged before it is covered by it, a
write that returns while the sync runs is logged after it and is not.

:func:`crash_states` then cuts the log: at every flush (the prefix up to it, all of
it durable), and at the end of each stretch between flushes with bounded random
subsets of the stretch's writes, split into 4 KiB pages and applied in random order
(what the page cache may have written back when the power went).
"""

from __future__ import annotations

import random
import threading
from dataclasses import dataclass

from qcow2.backends import Backend, FileBackend

PAGE = 4096


@dataclass
class Event:
    file: str
    kind: str          # "w" write, "t" truncate, "p" punch hole, "a" allocate, "f" flush,
    offset: int = 0    # "m" a marker the test adds (e.g. "the library flush returned")
    data: bytes = b""
    length: int = 0


class Log:
    def __init__(self):
        self.events: list[Event] = []
        self._lock = threading.Lock()

    def add(self, ev: Event) -> None:
        with self._lock:
            self.events.append(ev)

    def files(self) -> set[str]:
        return {e.file for e in self.events if e.kind != "m"}


def _apply(buf: bytearray, ev: Event) -> None:
    if ev.kind == "w":
        end = ev.offset + len(ev.data)
        if end > len(buf):
            buf.extend(bytes(end - len(buf)))
        buf[ev.offset:end] = ev.data
    elif ev.kind == "t":
        if ev.length < len(buf):
            del buf[ev.length:]
        else:
            buf.extend(bytes(ev.length - len(buf)))
    elif ev.kind == "p":
        end = min(len(buf), ev.offset + ev.length)
        if end > ev.offset:
            buf[ev.offset:end] = bytes(end - ev.offset)
    elif ev.kind == "a":
        if ev.offset + ev.length > len(buf):
            buf.extend(bytes(ev.offset + ev.length - len(buf)))


class _Recorder:
    """The write-side methods of a Backend, logged around the real call."""

    @staticmethod
    def pwrite(log, name, call, data, offset):
        n = call(data, offset)
        log.add(Event(name, "w", offset, bytes(memoryview(data).cast("B"))))
        return n

    @staticmethod
    def truncate(log, name, call, size):
        call(size)
        log.add(Event(name, "t", length=size))

    @staticmethod
    def punch_hole(log, name, call, offset, length):
        call(offset, length)
        log.add(Event(name, "p", offset, length=length))

    @staticmethod
    def allocate(log, name, call, offset, length):
        call(offset, length)
        log.add(Event(name, "a", offset, length=length))

    @staticmethod
    def flush(log, name, call):
        log.add(Event(name, "f"))
        call()


class RecordingBackend(Backend):
    """Any store, every write and flush logged (reads and capabilities pass through)."""

    def __init__(self, inner: Backend, log: Log, name: str | None = None):
        self.inner = inner
        self.log = log
        self.name = inner.name
        self.key = name or inner.name
        self.writable = inner.writable

    can_seek_data = property(lambda self: self.inner.can_seek_data)
    can_punch_holes = property(lambda self: self.inner.can_punch_holes)
    can_resize = property(lambda self: self.inner.can_resize)

    def identity(self):
        return self.inner.identity()

    def lock(self, *, write, force_share=False):
        return self.inner.lock(write=write, force_share=force_share)

    def size(self):
        return self.inner.size()

    def readinto(self, buf, offset):
        return self.inner.readinto(buf, offset)

    def data_regions(self, start=0, end=None):
        return self.inner.data_regions(start, end)

    def allocated_size(self):
        return self.inner.allocated_size()

    def pwrite(self, data, offset):
        return _Recorder.pwrite(self.log, self.key, self.inner.pwrite, data, offset)

    def truncate(self, size):
        return _Recorder.truncate(self.log, self.key, self.inner.truncate, size)

    def punch_hole(self, offset, length):
        return _Recorder.punch_hole(self.log, self.key, self.inner.punch_hole, offset, length)

    def allocate(self, offset, length):
        return _Recorder.allocate(self.log, self.key, self.inner.allocate, offset, length)

    def write_zeros(self, offset, length):
        # through our pwrite (the base class's loop), so the zeros are logged
        return Backend.write_zeros(self, offset, length)

    def flush(self):
        return _Recorder.flush(self.log, self.key, self.inner.flush)

    def close(self):
        return self.inner.close()


class recording_files:
    """``with recording_files(log, key):`` every FileBackend opened for writing logs
    its writes under ``key(path)`` (None: not logged)."""

    METHODS = ("pwrite", "truncate", "punch_hole", "allocate", "flush")

    def __init__(self, log: Log, key):
        self.log = log
        self.key = key
        self.saved = {}

    def __enter__(self):
        log, key = self.log, self.key
        for m in self.METHODS:
            orig = FileBackend.__dict__[m]
            self.saved[m] = orig
            rec = getattr(_Recorder, m)

            def wrapper(be, *args, _orig=orig, _rec=rec):
                name = key(be.path) if be.path is not None and be.writable else None
                call = _orig.__get__(be)
                if name is None:
                    return call(*args)
                return _rec(log, name, call, *args)
            setattr(FileBackend, m, wrapper)
        return self

    def __exit__(self, *exc):
        for m, orig in self.saved.items():
            setattr(FileBackend, m, orig)


def replay(initial: dict[str, bytes], events: list[Event]) -> dict[str, bytearray]:
    """Every file after all of ``events``."""
    out = {f: bytearray(b) for f, b in initial.items()}
    for ev in events:
        if ev.kind not in ("f", "m"):
            _apply(out.setdefault(ev.file, bytearray()), ev)
    return out


def _pages(ev: Event) -> list[Event]:
    if ev.kind != "w":
        return [ev]
    out = []
    pos = ev.offset
    end = ev.offset + len(ev.data)
    while pos < end:
        stop = min(end, (pos // PAGE + 1) * PAGE)
        out.append(Event(ev.file, "w", pos, ev.data[pos - ev.offset:stop - ev.offset]))
        pos = stop
    return out


@dataclass
class CrashState:
    cut: int                      # events [0, cut) were issued
    files: dict[str, bytearray]
    label: str


def crash_states(initial: dict[str, bytes], log: Log, seed, *, max_cuts: int,
                 subsets: int) -> list[CrashState]:
    """The crash states of ``log`` (see the module's docstring): at most ``max_cuts``
    flush cuts (evenly spread when there are more; the first and last always), and
    ``subsets`` random power-cut states at the end of as many stretches."""
    ev = log.events
    rng = random.Random(seed)
    flushes = [i for i, e in enumerate(ev) if e.kind == "f"]
    cuts = sorted(set([0, len(ev)] + [i + 1 for i in flushes]))
    if len(cuts) > max_cuts:
        step = (len(cuts) - 1) / (max_cuts - 1)
        cuts = sorted({cuts[round(k * step)] for k in range(max_cuts)})
    states = []
    for c in cuts:
        states.append(CrashState(c, _state(initial, ev, c, rng, keep_all=True),
                                 f"after event {c}/{len(ev)}, all issued writes durable"))
        if subsets and c:
            for k in range(subsets):
                states.append(CrashState(c, _state(initial, ev, c, rng, keep_all=False),
                                         f"after event {c}/{len(ev)}, random power cut {k}"))
    return states


def _state(initial, ev, cut, rng, *, keep_all) -> dict[str, bytearray]:
    """Each file: everything up to its last flush before ``cut``, then (unless
    ``keep_all``) a random subset of the later pages in random order."""
    last_flush = {}
    for i in range(cut):
        if ev[i].kind == "f":
            last_flush[ev[i].file] = i
    files = {f: bytearray(b) for f, b in initial.items()}
    pending: dict[str, list[Event]] = {}
    for i in range(cut):
        e = ev[i]
        if e.kind in ("f", "m"):
            continue
        buf = files.setdefault(e.file, bytearray())
        if keep_all or i < last_flush.get(e.file, -1):
            _apply(buf, e)
        else:
            pending.setdefault(e.file, []).extend(_pages(e))
    for f, evs in pending.items():
        chosen = [e for e in evs if rng.random() < 0.5]
        rng.shuffle(chosen)
        for e in chosen:
            _apply(files[f], e)
    return files


def marker_before(log: Log, cut: int) -> Event | None:
    """The last marker event before ``cut``."""
    for e in reversed(log.events[:cut]):
        if e.kind == "m":
            return e
    return None
