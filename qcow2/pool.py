"""One small worker pool for the operations that copy or compare data in parallel
(convert, compare, sparse copy).

:func:`run` runs ``work(job)`` for a stream of jobs on a few threads, the caller's
included.  Each thread takes the next job itself (no futures, no feeding loop), so the
jobs are generated only as threads become free: memory does not grow with their
number.  The kernels release the GIL, so reads, decodes, scans and compressions run on
every core.

Results can be handed on in two ways:

* ``apply(result)`` runs one result at a time (under the pool's lock): in job order
  with ``ordered=True``, else as results come.  A thread whose result is not next yet
  *parks* it and goes on with another job; whoever applies the next result applies the
  parked ones that follow it too -- so no core idles waiting for its turn (convert
  ``-c``: 11.2 s -> 7.9 s against a thread that waits).  At most 2 x workers results
  are parked; a thread that would park more waits for the next one to come.
* ``finish(result)`` runs after ``apply``, outside the lock, in parallel again (the
  data copies of convert, which need no order).

The first exception -- from the job iterator, ``work``, ``apply`` or ``finish``, or a
KeyboardInterrupt in the caller's thread -- stops every thread after its current step;
once all have stopped it is raised in the caller, with a note naming the job that
raised it (``exc.__notes__``; the message itself is unchanged).
"""

from __future__ import annotations

import threading

_END = object()


def _first_two(jobs):
    """(an iterator equal to ``jobs``, whether it has at least two items)."""
    it = iter(jobs)
    head = []
    for job in it:
        head.append(job)
        if len(head) == 2:
            break

    def chained():
        yield from head
        yield from it
    return chained(), len(head) == 2


def _note(exc: BaseException, name: str, job) -> None:
    """Name the job (briefly) on an error, once, for the traceback."""
    if not isinstance(exc, Exception) or not hasattr(exc, "add_note"):
        return                             # an interrupt: no job to blame
    tag = f"{name}: raised by "
    if any(str(n).startswith(tag) for n in getattr(exc, "__notes__", ())):
        return
    import reprlib
    exc.add_note(tag + ("the job iterator" if job is _END else f"job {reprlib.repr(job)}"))


class _Nothing:
    """A context that does nothing (the default per-thread context)."""

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        return None


class _Run:
    """The shared state of one :func:`run` over several threads."""

    def __init__(self, jobs, work, apply, finish, ordered: bool, workers: int, name: str):
        self.it = iter(jobs)
        self.work = work
        self.apply = apply
        self.finish = finish
        self.ordered = ordered
        self.name = name
        self.take = threading.Lock()         # taking the next job
        self.turn = threading.Condition()    # applying results
        self.seq = 0                         # jobs taken
        self.next = 0                        # the next job to apply (ordered)
        self.parked: dict = {}               # seq -> (job, result), waiting for their turn
        self.limit = 2 * workers
        self.failed: list = []
        self.stopped = False

    def fail(self, exc: BaseException) -> None:
        self.failed.append(exc)
        with self.turn:
            self.turn.notify_all()

    def loop(self) -> None:
        cur = _END
        try:
            while not self.failed and not self.stopped:
                with self.take:
                    cur = _END
                    job = next(self.it, _END)
                    if job is _END:
                        return
                    mine = self.seq
                    self.seq += 1
                cur = job
                result = self.work(job)
                if self.apply is None and self.finish is None:
                    continue
                ready = []
                with self.turn:
                    if self.failed or self.stopped:
                        return
                    cur = self._settle(mine, job, result, ready)
                if self.finish is not None:
                    for done in ready:
                        cur = done[0]
                        self.finish(done[1])
        except BaseException as exc:  # noqa: BLE001 - handed to the calling thread
            _note(exc, self.name, cur)
            self.fail(exc)

    def _settle(self, mine: int, job, result, ready: list):
        """Apply what is due (holding ``turn``), collecting (job, result) in ``ready``
        for finish; returns the job applied last (the one to blame on an error)."""
        cur = job
        if not self.ordered:
            if self.apply is not None and self.apply(result):
                self.stopped = True
            ready.append((job, result))
            return cur
        self.parked[mine] = (job, result)
        try:
            while self.next in self.parked and not self.stopped:
                cur, r = self.parked.pop(self.next)
                if self.apply is not None and self.apply(r):
                    self.stopped = True
                ready.append((cur, r))
                self.next += 1
        except BaseException as exc:
            _note(exc, self.name, cur)       # (a parked job: not this thread's own)
            raise
        finally:
            self.turn.notify_all()
        while len(self.parked) >= self.limit and not self.failed and not self.stopped:
            self.turn.wait()                 # too far ahead: let the next one come
        return cur


def _serial(jobs, work, apply, finish, name: str) -> bool:
    it = iter(jobs)
    job = _END
    try:
        while True:
            job = _END
            job = next(it, _END)
            if job is _END:
                break
            r = work(job)
            if apply is not None and apply(r):
                return True
            if finish is not None:
                finish(r)
    except BaseException as exc:
        _note(exc, name, job)
        raise
    return False


def run(jobs, work, workers: int, *, apply=None, finish=None, ordered: bool = False,
        context=None, name: str = "qcow2-pool") -> bool:
    """Run ``work(job)`` for every job of the iterable ``jobs`` on ``workers`` threads
    (this one included; one thread, or fewer than two jobs: all here).

    ``apply(result)``: one at a time, in job order when ``ordered``, else as results
    come; a true return value stops the pool (no job starts after it; results not
    applied yet are dropped).  ``finish(result)``: after apply, in parallel.
    ``context``: a factory of a context manager each thread enters around its work
    (e.g. :class:`qcow2.image.serial_reads`).  Returns whether ``apply`` stopped it.
    Raises the first exception any step raised (see the module's docstring).
    """
    enter = context or _Nothing
    jobs, several = _first_two(jobs)
    if workers <= 1 or not several:
        with enter():
            return _serial(jobs, work, apply, finish, name)
    state = _Run(jobs, work, apply, finish, ordered, workers, name)

    def loop():
        with enter():
            state.loop()

    threads = [threading.Thread(target=loop, name=f"{name}_{i}", daemon=True)
               for i in range(workers - 1)]
    for t in threads:
        t.start()
    try:
        loop()
    except BaseException as exc:  # noqa: BLE001 - (past the loop's own handler) stop them
        state.fail(exc)
        raise
    finally:
        for t in threads:
            while t.is_alive():
                try:
                    t.join()
                except BaseException as exc:  # noqa: BLE001 - an interrupt: stop them
                    state.fail(exc)
    if state.failed:
        raise state.failed[0]
    if state.parked and not state.stopped:        # (cannot happen: every job was applied)
        raise RuntimeError(f"{name}: results left unapplied")
    return state.stopped


__all__ = ["run"]
