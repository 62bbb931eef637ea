"""Error injection: QEMU's ``blkdebug`` layer over another store.

A blkdebug store passes every call to the store below it, and fails some of them on
purpose, as its rules say.  The engine names the steps of its metadata updates as
QEMU does (``l1_update``, ``cluster_free``, ``read_aio`` ...) by calling
:meth:`BlkdebugBackend.debug_event` on its store (the engine looks the method up once
and skips it on stores without one, so an image without this layer pays nothing).

Rules, as in QEMU's blkdebug configuration files and ``json:`` options:

- ``inject-error``: when ``event`` happens (in state ``state``, 0 or absent: any), the
  rule becomes active, replacing the rules an earlier event activated; from then on
  every I/O request (read, write, truncate, flush, discard) covering byte
  ``sector * 512`` (no ``sector``: any request) fails with ``errno`` (default EIO).
  ``once`` drops the rule after its first failure; ``immediately`` changes nothing
  here (QEMU uses it to fail before the request is queued).
- ``set-state``: when ``event`` happens in state ``state``, the state becomes
  ``new_state`` (the state starts at 1).

Names: ``blkdebug:CONFIG:FILE`` (CONFIG a file of ``[inject-error]`` / ``[set-state]``
sections of ``key = "value"`` lines, or empty) and the options of a
``{"driver": "blkdebug", "inject-error": [...], "set-state": [...], "image": ...}``
node (see :func:`rules_from_options`).
"""

from __future__ import annotations

import errno as E
import os

from .base import Backend

#: the events QEMU's qcow2 driver announces (BLKDBG_*), in its spelling
EVENTS = frozenset("""
l1_update l1_grow_alloc_table l1_grow_write_table l1_grow_activate_table l1_shrink_write_table
l1_shrink_free_l2_clusters l2_load l2_update l2_update_compressed l2_alloc_cow_read
l2_alloc_write read_aio read_backing_aio read_compressed write_aio write_compressed
vmstate_load vmstate_save cow_read cow_write reftable_load reftable_grow reftable_update
refblock_load refblock_update refblock_update_part refblock_alloc refblock_alloc_hookup
refblock_alloc_write refblock_alloc_write_blocks refblock_alloc_write_table
refblock_alloc_switch_table cluster_alloc cluster_alloc_bytes cluster_free flush_to_os
flush_to_disk pwritev_rmw_head pwritev_rmw_after_head pwritev_rmw_tail
pwritev_rmw_after_tail pwritev pwritev_zero pwritev_done empty_image_prepare
l1_shrink_write_table cor_write cluster_alloc_space none
""".split())

_BOOL = {"on": True, "true": True, "yes": True, "off": False, "false": False, "no": False}


class BlkdebugConfigError(ValueError):
    """A blkdebug configuration that cannot be used (unknown event, bad value)."""


class Rule:
    """One ``inject-error`` or ``set-state`` rule."""

    __slots__ = ("action", "event", "state", "errno", "offset", "once", "immediately",
                 "new_state")

    def __init__(self, action: str, event: str, *, state: int = 0, errno: int = E.EIO,
                 offset: int | None = None, once: bool = False, immediately: bool = False,
                 new_state: int = 0):
        if event not in EVENTS:
            raise BlkdebugConfigError(f"Invalid event name \"{event}\"")
        self.action = action
        self.event = event
        self.state = state
        self.errno = errno
        self.offset = offset
        self.once = once
        self.immediately = immediately
        self.new_state = new_state

    def covers(self, offset: int, length: int) -> bool:
        return self.offset is None or (length > 0 and offset <= self.offset < offset + length)


def _int(value, what: str) -> int:
    if isinstance(value, bool):
        raise BlkdebugConfigError(f"Parameter '{what}' expects a number")
    try:
        return int(value, 0) if isinstance(value, str) else int(value)
    except (TypeError, ValueError):
        raise BlkdebugConfigError(f"Parameter '{what}' expects a number") from None


def _bool(value, what: str) -> bool:
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and value.lower() in _BOOL:
        return _BOOL[value.lower()]
    raise BlkdebugConfigError(f"Parameter '{what}' expects 'on' or 'off'")


def make_rule(section: str, opts: dict) -> Rule:
    """A rule from one section's (or one JSON object's) options."""
    known = {"inject-error": {"event", "state", "errno", "sector", "once", "immediately",
                              "iotype"},
             "set-state": {"event", "state", "new_state"}}
    if section not in known:
        raise BlkdebugConfigError(f"Unknown blkdebug section [{section}]")
    extra = set(opts) - known[section]
    if extra:
        raise BlkdebugConfigError(f"Invalid parameter '{sorted(extra)[0]}'")
    if "event" not in opts:
        raise BlkdebugConfigError("Parameter 'event' is missing")
    kw: dict = {"state": _int(opts.get("state", 0), "state")}
    if section == "inject-error":
        kw["errno"] = _int(opts.get("errno", E.EIO), "errno")
        if "sector" in opts and _int(opts["sector"], "sector") >= 0:
            kw["offset"] = _int(opts["sector"], "sector") * 512
        kw["once"] = _bool(opts.get("once", False), "once")
        kw["immediately"] = _bool(opts.get("immediately", False), "immediately")
    else:
        kw["new_state"] = _int(opts.get("new_state", 0), "new_state")
    return Rule(section, str(opts["event"]), **kw)


def parse_config(text: str) -> list[Rule]:
    """The rules of a blkdebug configuration file (``[section]`` headers, then
    ``key = "value"`` lines; ``#`` and ``;`` start comments)."""
    rules: list[Rule] = []
    section: str | None = None
    opts: dict = {}
    for lineno, raw in enumerate(text.splitlines(), 1):
        line = raw.strip()
        if not line or line[0] in "#;":
            continue
        if line.startswith("["):
            if not line.endswith("]"):
                raise BlkdebugConfigError(f"line {lineno}: bad section header")
            if section is not None:
                rules.append(make_rule(section, opts))
            section, opts = line[1:-1].strip(), {}
            continue
        key, eq, value = line.partition("=")
        if not eq or section is None:
            raise BlkdebugConfigError(f"line {lineno}: expected key = \"value\"")
        value = value.strip()
        if len(value) >= 2 and value[0] == value[-1] == '"':
            value = value[1:-1]
        opts[key.strip()] = value
    if section is not None:
        rules.append(make_rule(section, opts))
    return rules


def read_config(path: str) -> list[Rule]:
    with open(path, encoding="utf-8") as f:
        return parse_config(f.read())


def rules_from_options(inject: list, set_state: list) -> list[Rule]:
    """The rules of a blkdebug node's ``inject-error`` and ``set-state`` lists (each
    a list of objects with the keys of the configuration file's sections)."""
    rules = []
    for section, items in (("inject-error", inject), ("set-state", set_state)):
        if not isinstance(items, list) or not all(isinstance(i, dict) for i in items):
            raise BlkdebugConfigError(f"Parameter '{section}' expects a list of objects")
        rules.extend(make_rule(section, dict(i)) for i in items)
    return rules


def split_name(name: str) -> tuple[str, str]:
    """(config path, image path) of ``blkdebug:CONFIG:FILE`` (CONFIG may be empty)."""
    rest = name[len("blkdebug:"):]
    config, sep, path = rest.partition(":")
    if not sep:
        raise BlkdebugConfigError("Could not parse the blkdebug filename")
    return config, path


class BlkdebugTarget:
    """A file to open under blkdebug ``rules`` (what a ``json:`` name's blkdebug node
    resolves to; the opener puts a :class:`BlkdebugBackend` over the file)."""

    __slots__ = ("path", "rules")

    def __init__(self, path, rules: list[Rule]):
        self.path = path
        self.rules = rules


class BlkdebugBackend(Backend):
    """``inner`` with QEMU's blkdebug rules applied (see the module's docstring).
    ``name`` is what messages call the store (QEMU: the ``blkdebug:`` name)."""

    def __init__(self, inner: Backend, rules: list[Rule], name: str | None = None):
        self.inner = inner
        self.rules = list(rules)
        self.name = name or inner.name
        self.writable = inner.writable
        self.state = 1
        self.active: list[Rule] = []

    # -- the rules -----------------------------------------------------------
    def debug_event(self, event: str) -> None:
        """``event`` happened: activate its inject-error rules (in place of the ones
        active before), apply its set-state rules."""
        new_state = self.state
        fired: list[Rule] | None = None
        for rule in self.rules:
            if rule.event != event or (rule.state and rule.state != self.state):
                continue
            if rule.action == "inject-error":
                if fired is None:
                    fired = []
                fired.insert(0, rule)
            else:
                new_state = rule.new_state
        if fired is not None:
            self.active = fired
        self.state = new_state

    def _check(self, offset: int, length: int) -> None:
        for rule in self.active:
            if rule.covers(offset, length):
                break
        else:
            return
        if rule.once:
            self.active.remove(rule)
            self.rules.remove(rule)
        if rule.errno:
            raise OSError(rule.errno, os.strerror(rule.errno), self.name)

    # -- the store (its file descriptor is not offered: no I/O may bypass the rules)
    @property
    def can_seek_data(self) -> bool:
        return self.inner.can_seek_data

    @property
    def can_punch_holes(self) -> bool:
        return self.inner.can_punch_holes

    @property
    def can_resize(self) -> bool:
        return self.inner.can_resize

    @property
    def preallocation_modes(self) -> tuple[str, ...]:
        return self.inner.preallocation_modes

    def identity(self):
        return self.inner.identity()

    def lock(self, *, write: bool, force_share: bool = False) -> None:
        self.inner.lock(write=write, force_share=force_share)

    def size(self) -> int:
        return self.inner.size()

    def readinto(self, buf, offset: int) -> int:
        self._check(offset, memoryview(buf).nbytes)
        return self.inner.readinto(buf, offset)

    def data_regions(self, start: int = 0, end: int | None = None):
        return self.inner.data_regions(start, end)

    def allocated_size(self) -> int:
        return self.inner.allocated_size()

    def pwrite(self, data, offset: int) -> int:
        self._check(offset, memoryview(data).nbytes)
        return self.inner.pwrite(data, offset)

    def truncate(self, size: int) -> None:
        self._check(0, 0)
        self.inner.truncate(size)

    def punch_hole(self, offset: int, length: int) -> None:
        self._check(offset, length)
        self.inner.punch_hole(offset, length)

    def allocate(self, offset: int, length: int) -> None:
        self._check(offset, length)
        self.inner.allocate(offset, length)

    def write_zeros(self, offset: int, length: int) -> None:
        self._check(offset, length)
        self.inner.write_zeros(offset, length)

    def flush(self) -> None:
        self._check(0, 0)
        self.inner.flush()

    def close(self) -> None:
        self.inner.close()


__all__ = ["BlkdebugBackend", "BlkdebugTarget", "BlkdebugConfigError", "Rule", "EVENTS",
           "make_rule", "parse_config", "read_config", "rules_from_options", "split_name"]
