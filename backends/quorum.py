"""QEMU's ``quorum`` block driver: one store made of several copies that vote.

A read reads every child; the version most children agree on wins if at least
``threshold`` of them returned it (else EIO: the copies disagree too much).  A write,
flush or truncate goes to every child and fails if any child fails.  The children
are other stores (files), opened and owned by the quorum.
"""

from __future__ import annotations

import errno
import os

from .base import Backend


class QuorumTarget:
    """The files of a quorum node of a ``json:`` name and its ``vote-threshold`` (the
    opener opens them and puts a :class:`QuorumBackend` over them)."""

    __slots__ = ("paths", "threshold")

    def __init__(self, paths: list[str], threshold: int):
        self.paths = list(paths)
        self.threshold = threshold


class QuorumBackend(Backend):
    def __init__(self, children: list[Backend], threshold: int, name: str = "quorum"):
        if not children or not 1 <= threshold <= len(children):
            raise ValueError("vote-threshold must lie between 1 and the number of children")
        self.children = list(children)
        self.threshold = threshold
        self.name = name
        self.writable = all(c.writable for c in children)

    def identity(self):
        return ("quorum",) + tuple(c.identity() for c in self.children)

    def lock(self, *, write: bool, force_share: bool = False) -> None:
        for c in self.children:
            c.lock(write=write, force_share=force_share)

    def size(self) -> int:
        return self.children[0].size()

    def readinto(self, buf, offset: int) -> int:
        mv = memoryview(buf).cast("B")
        votes: dict[bytes, int] = {}
        got_by: dict[bytes, int] = {}
        for c in self.children:
            tmp = bytearray(len(mv))
            try:
                got = c.readinto(tmp, offset)
            except OSError:
                continue
            key = bytes(tmp[:got])
            votes[key] = votes.get(key, 0) + 1
            got_by[key] = got
        if not votes:
            raise OSError(errno.EIO, os.strerror(errno.EIO), self.name)
        best = max(votes, key=votes.__getitem__)
        if votes[best] < self.threshold:
            raise OSError(errno.EIO, os.strerror(errno.EIO), self.name)
        n = got_by[best]
        mv[:n] = best
        return n

    def pwrite(self, data, offset: int) -> int:
        n = 0
        for c in self.children:
            n = c.pwrite(data, offset)
        return n

    def truncate(self, size: int) -> None:
        for c in self.children:
            c.truncate(size)

    def flush(self) -> None:
        for c in self.children:
            c.flush()

    def close(self) -> None:
        for c in self.children:
            c.close()


__all__ = ["QuorumBackend", "QuorumTarget"]
