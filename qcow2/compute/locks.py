"""Names and per-image locks, as nova spells them.

The base file of an image is ``<instances_path>/<subdirectory_name>/<sha1 of the image
id>``; its lock is ``<instances_path>/locks/nova-<base file name>`` held with
``fcntl.lockf`` (what oslo.concurrency's external locks take), so this flow and nova's
own image cache exclude each other.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import os
import threading

_THREAD_LOCKS: dict = {}
_GUARD = threading.Lock()


def _thread_lock(path: str) -> threading.Lock:
    # fcntl locks belong to the process: threads of one process also need a lock
    with _GUARD:
        return _THREAD_LOCKS.setdefault(path, threading.Lock())


def base_name(image_id: str) -> str:
    """nova's cache name of an image: the sha1 hex digest of its id."""
    return hashlib.sha1(image_id.encode("utf-8")).hexdigest()


def hash_str(text: str) -> str:
    """nova.utils.get_hash_str (md5 hex digest)."""
    return hashlib.md5(text.encode("utf-8")).hexdigest()


def ephemeral_name(size: int, fs: str) -> str:
    """nova's ``ephemeral_<GiB>_<hash of the file system>`` (a size that is not a whole
    number of GiB is spelled in bytes with a ``b`` suffix)."""
    gib, rem = divmod(size, 1 << 30)
    return f"ephemeral_{gib if not rem else f'{size}b'}_{hash_str(fs)[:7]}"


def swap_name(size: int) -> str:
    """nova's ``swap_<MiB>``."""
    mib, rem = divmod(size, 1 << 20)
    return f"swap_{mib if not rem else f'{size}b'}"


@contextlib.contextmanager
def image_lock(lock_dir: str, name: str):
    """Hold nova's external lock ``nova-<name>`` in ``lock_dir``."""
    os.makedirs(lock_dir, exist_ok=True)
    path = os.path.join(lock_dir, f"nova-{name}")
    with _thread_lock(path):
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        try:
            fcntl.lockf(fd, fcntl.LOCK_EX)
            yield
        finally:
            try:
                fcntl.lockf(fd, fcntl.LOCK_UN)
            finally:
                os.close(fd)


def try_image_lock(lock_dir: str, name: str):
    """Like :func:`image_lock` but non-blocking: a context manager yielding False when
    someone else holds the lock."""
    @contextlib.contextmanager
    def cm():
        os.makedirs(lock_dir, exist_ok=True)
        path = os.path.join(lock_dir, f"nova-{name}")
        tl = _thread_lock(path)
        if not tl.acquire(blocking=False):
            yield False
            return
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        except BaseException:
            tl.release()
            raise
        try:
            try:
                fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:
                yield False
                return
            try:
                yield True
            finally:
                fcntl.lockf(fd, fcntl.LOCK_UN)
        finally:
            os.close(fd)
            tl.release()
    return cm()
