"""Opening images: the one place that turns a file name or a store into an Image.

:func:`open_image` probes the format, takes the store's locks, rebuilds the refcounts
of a dirty image opened for writing, applies the untrusted policy, chooses the class
(:class:`~qcow2.image.RawImage`, :class:`~qcow2.reader.Qcow2Image`,
:class:`~qcow2.writer.WritableQcow2Image`) and opens what a qcow2 image refers to --
its backing chain (with loop and depth checks) and its external data file.

A store can be handed in instead of a path (a :class:`qcow2.backends.Backend`, as
go-qcow2reader takes a ReaderAt): the image then reads and writes through it, takes
the store's locks (none for a store without any) and leaves it open on close (the
caller owns it).  Names stored in such an image (backing file, data file) are resolved
against the store's ``name`` as against a path: a name without a folder, like a
``MemoryBackend``'s default ``<memory>``, resolves relative to the current directory.
A dirty image (lazy refcounts, then a crash) is rebuilt before writing only when
opened by path; on a store handed in, writing it is refused (run ``check -r all``).

A name in qemu-img's ``rbd:POOL/IMAGE[@SNAP][:KEY=VALUE...]`` syntax opens the RBD
image it names (``qcow2.rbdname``, ``qcow2.backends.rbd``) as a file name opens the
file: the image is probed (a qcow2 stored in RBD opens like a qcow2 file), owned and
closed with the image; a writer takes its exclusive lock.
"""

from __future__ import annotations

import os

from . import constants as C
from .backends import Backend, FileBackend
from .errors import (FormatError, ImageOpenError, InvalidOptionError, Qcow2Error, ReadOnlyError,
                     UnsafeImageError, UnsupportedFeatureError)
from .image import Image, RawImage
from .imageopts import is_option_name, parse_json_name, resolve_name
from .paths import check_file_name, combine_path
from .probe import probe_format
from .rbdname import is_rbd_name, open_rbd
from .reader import Qcow2Image

_MODES = ("r", "rb", "r+", "rb+", "r+b")
_FORMATS = (None, "qcow2", "raw")


def open_image(target, mode: str = "r", *, format: str | None = None, untrusted: bool = False,
               snapshot: str | int | None = None, force_share: bool = False,
               backing: bool = True, max_backing_depth: int | None = None,
               limits=None, key=None, keys=None) -> Image:
    """Open an image file, or an image in a store (see ``qcow2.open``)."""
    if max_backing_depth is None:
        max_backing_depth = (limits.max_backing_depth if limits is not None
                             else C.MAX_BACKING_DEPTH)
    return _open(target, mode, format=format, untrusted=untrusted, snapshot=snapshot,
                 force_share=force_share, backing=backing, max_depth=max_backing_depth,
                 limits=limits, chain=(), depth=0, key=key, keys=keys)


def _open(target, mode: str, *, format, untrusted, snapshot, force_share, backing, max_depth,
          limits, chain: tuple, depth: int, key=None, keys=None) -> Image:
    if mode not in _MODES:
        raise InvalidOptionError(f"invalid mode {mode!r} (use 'r' or 'r+')")
    writable = "+" in mode
    if untrusted and writable:
        raise UnsafeImageError("an untrusted image is opened read-only (it is never "
                               "written or repaired in place)")
    debug = shown = None
    quorum = False
    if is_option_name(target):                 # json:{...}, file:PATH: naming a file
        # (blkdebug and quorum load only for names that use them)
        from .backends.blkdebug import BlkdebugTarget
        from .backends.quorum import QuorumTarget
        shown = _json_shown(target)
        target, named = resolve_name(target)
        format = format or named
        if isinstance(target, BlkdebugTarget):  # through a blkdebug node with rules
            debug, target = target.rules, target.path
        quorum = isinstance(target, QuorumTarget)
    if format not in _FORMATS:
        raise UnsupportedFeatureError(f"Unknown or unsupported image format {format!r} "
                                      f"(supported: qcow2, raw)", feature=f"format {format}")
    if isinstance(target, str) and target.startswith("blkdebug:"):
        shown = target
        debug, target = _blkdebug_rules(target)
    if quorum:
        shown = shown or "quorum"
        be, filename, owned = _quorum_store(target, writable, shown), "", True
    else:
        be, filename, owned = _store(target, writable, format)
    if debug is not None:                      # error injection over the file
        from .backends.blkdebug import BlkdebugBackend
        be = BlkdebugBackend(be, debug, shown)
    # names stored in the image resolve against its file ("": no one file to say)
    base = filename if shown is not None else None
    filename = shown or filename
    try:
        try:
            be.lock(write=writable, force_share=force_share and not writable)
        except OSError as exc:
            raise _open_error(filename, exc) from None
        ident = be.identity()
        if ident in chain:
            raise UnsafeImageError(f"backing chain loop: {filename!r} is already in the chain")
        chain = chain + (ident,)
        fmt = format or probe_format(be)
        if untrusted:
            from . import untrusted as U
            limits = U.resolve(limits)
            U.check_format(be, fmt, explicit=format is not None)
        if fmt == "qcow2":
            cls = Qcow2Image
            if writable:
                from .writer import WritableQcow2Image as cls
            companions = _Companions(backing, force_share, max_depth, chain, depth, key, keys)
            companions.base_path = base
            try:
                img = cls(be, filename, untrusted=untrusted, snapshot=snapshot,
                          companions=companions, owns_backend=owned, limits=limits)
            except (FormatError, UnsupportedFeatureError) as exc:
                _name_the_image(exc, filename, snapshot)
                raise
            if base is not None and img.backing_filename:
                img.full_backing_filename = companions.resolve(img.backing_filename)
            return img
        if snapshot is not None:
            raise UnsupportedFeatureError("raw images have no snapshots", feature="snapshot")
        img = RawImage(be, filename, writable=writable, owns_backend=owned)
        if untrusted and img.size > limits.max_virtual_size:
            raise UnsafeImageError(f"virtual size {img.size} of raw image '{filename}' "
                                   f"exceeds the limit of {limits.max_virtual_size} bytes")
        return img
    except BaseException:
        if owned:
            be.close()
        raise


def _json_shown(name: str) -> str | None:
    """The name an image opened by a ``json:`` name goes by: None (its file's path)
    when the options say no more than a file name would, else the json: name on one
    line (QEMU: a filename it cannot reconstruct), as with blkdebug rules or a quorum."""
    if not name.startswith("json:"):
        return None
    try:
        flat = parse_json_name(name)
    except Qcow2Error:
        return None                            # (resolve_name reports it)
    for key, value in flat.items():
        last = key.rsplit(".", 1)[-1]
        if last in ("set-state", "inject-error") or (
                last == "driver" and value == "quorum"):
            return " ".join(name.split())
    return None


def _quorum_store(target, writable: bool, name: str | None) -> Backend:
    """The quorum store of ``target`` (a ``backends.quorum.QuorumTarget``)."""
    from .backends.quorum import QuorumBackend
    children: list[Backend] = []
    try:
        for path in target.paths:
            children.append(_open_file(path, writable))
        return QuorumBackend(children, target.threshold, name or "quorum")
    except BaseException:
        for c in children:
            c.close()
        raise


def _blkdebug_rules(name: str):
    """(rules, path) of a ``blkdebug:CONFIG:FILE`` name."""
    from .backends.blkdebug import BlkdebugConfigError, read_config, split_name
    try:
        config, path = split_name(name)
        rules = read_config(config) if config else []
    except OSError as exc:
        raise Qcow2Error(f"Could not open '{name}': Could not read blkdebug config file: "
                         f"{exc.strerror or exc}") from None
    except BlkdebugConfigError as exc:
        raise Qcow2Error(f"Could not open '{name}': {exc}") from None
    return rules, path


#: how ``Header.validate_snapshot_l1``'s errors begin
_SNAPSHOT_L1 = "Snapshot L1 table of snapshot "


def _name_the_image(exc: Exception, filename: str, snapshot=None) -> None:
    """An image refused at open names it first, as qemu-img's "Could not open 'NAME':
    REASON" (in place: the exception keeps its type and attributes); where the image
    opened but the ``snapshot`` asked for did not load, "Failed to load snapshot:
    REASON" (qemu-img's words for convert -l)."""
    msg = str(exc)
    if snapshot is not None and msg.startswith(_SNAPSHOT_L1):
        exc.args = (f"Failed to load snapshot: {msg}",) + tuple(exc.args[1:])
        return
    if exc.args and not msg.startswith("Could not open "):
        exc.args = (f"Could not open '{filename}': {msg}",) + tuple(exc.args[1:])


def _store(target, writable: bool, format: str | None) -> tuple[Backend, str, bool]:
    """(backend, file name, whether we opened it) for a path or a store handed in."""
    if isinstance(target, Backend):
        if writable and not target.writable:
            raise ReadOnlyError(f"Could not open '{target.name}' for writing: the store is "
                                f"read-only")
        if writable and format != "raw":
            from .checker import needs_rebuild, rebuild_if_dirty   # writers only: ~1 ms
            if needs_rebuild(target):
                rebuild_if_dirty(target)
        return target, target.name, False
    filename = os.fspath(target)
    be = _open_file(filename, writable)
    if writable and format != "raw":
        from .checker import needs_rebuild, rebuild_if_dirty       # writers only: ~1 ms
    if writable and format != "raw" and needs_rebuild(be):
        # Refcounts may lag behind (lazy refcounts, then a crash): rebuild them before
        # anything is allocated, as QEMU does when it opens such an image read-write.
        if is_rbd_name(filename):
            try:
                be.lock(write=True)
                rebuild_if_dirty(be)
            except BaseException:
                be.close()
                raise
            return be, filename, True
        be.close()
        rebuild_if_dirty(filename)
        be = _open_file(filename, writable)
    return be, filename, True


def _open_file(filename: str, writable: bool) -> Backend:
    if is_rbd_name(filename):
        return open_rbd(filename, writable=writable)
    try:
        return FileBackend(filename, writable=writable)
    except OSError as exc:
        raise _open_error(filename, exc) from None


def _open_error(filename: str, exc: OSError) -> ImageOpenError:
    return ImageOpenError(f"Could not open '{filename}': {exc.strerror or exc}",
                          errno=exc.errno, filename=filename)


class _Companions:
    """Opens the files a qcow2 image names, under the policy of the open that found
    it: untrusted images open none, the chain has a depth cap and no loops, locks are
    shared as the image's own are."""

    def __init__(self, open_backing: bool, force_share: bool, max_depth: int, chain: tuple,
                 depth: int, key=None, keys=None):
        self.key = key                  # the passphrase of this image (encrypted)
        self.keys = keys or {}          # ... of the images of its chain, by name
        self.open_backing = open_backing
        self.force_share = force_share
        self.max_depth = max_depth
        self.chain = chain
        self.depth = depth
        self.base_path: str | None = None    # (see resolve)

    def resolve(self, name: str) -> str | None:
        """Where a name stored in the image points, when the image goes by a name other
        than its file's path (``base_path``: that path, "" for none: None)."""
        if not self.base_path:       # only names that stand for themselves
            stands = os.path.isabs(name) or is_rbd_name(name) or name.startswith("json:")
            return name if stands else None
        return combine_path(self.base_path, name)

    def key_for(self, img: Qcow2Image):
        """The passphrase given for ``img`` (None: none)."""
        return self.key

    def backing_file(self, img: Qcow2Image) -> Image:
        name = img.header.backing_file
        check_file_name(name, "backing file")
        if img.untrusted:
            raise UnsafeImageError(f"image '{img.filename}' has a backing file {name!r}; "
                                   f"untrusted mode opens no other file")
        if self.depth + 1 > self.max_depth:
            raise UnsafeImageError(f"backing chain of '{img.filename}' is deeper than "
                                   f"{self.max_depth} images")
        fmt = img.header.backing_format
        if fmt is not None and fmt not in _FORMATS:
            raise UnsupportedFeatureError(f"backing file format {fmt!r} of "
                                          f"'{img.filename}' is not supported",
                                          feature=f"format {fmt}")
        full = self.resolve(name) if self.base_path is not None else img.full_backing_filename
        if full is None:
            raise UnsafeImageError(f"the backing file {name!r} of '{img.filename}' cannot be "
                                   f"found: the image is not one file")
        key = self.keys.get(name, self.keys.get(full))
        return _open(full, "r", format=fmt, untrusted=False, snapshot=None,
                     force_share=self.force_share, backing=True, max_depth=self.max_depth,
                     limits=None, chain=self.chain, depth=self.depth + 1, key=key,
                     keys=self.keys)

    def data_file(self, img: Qcow2Image) -> tuple[Backend, str]:
        """(backend, path) of the external data file, opened and locked like the image."""
        name = img.header.data_file
        check_file_name(name, "external data file")
        if img.untrusted:
            raise UnsafeImageError(f"image '{img.filename}' uses an external data file "
                                   f"{name!r}; untrusted mode opens no other file")
        path = (self.resolve(name) if self.base_path is not None
                else combine_path(img.filename, name))
        if path is None:
            raise UnsafeImageError(f"the external data file {name!r} of '{img.filename}' "
                                   f"cannot be found: the image is not one file")
        writable = img.writable                    # (the writer's, before its __init__ ran)
        be = _open_file(path, writable)
        try:
            be.lock(write=writable, force_share=self.force_share)
        except OSError as exc:
            be.close()
            raise _open_error(path, exc) from None
        return be, path


__all__ = ["open_image"]
