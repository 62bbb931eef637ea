"""Whole-image changes of a writable qcow2 image: size, L1 table, backing file, format
version, lazy refcounts, refcount width, emptying the active layer.

:class:`Reshape` is mixed into :class:`qcow2.writer.WritableQcow2Image` and works
with its tables, refcounts and ordered flush.  Every change writes new structures
first, makes them durable, and only then switches the header fields that point at
them, so a crash leaves the old image or the new one (with leaked clusters at worst).
"""

from __future__ import annotations

import struct

from . import constants as C
from .errors import InvalidOptionError, Qcow2Error, UnsupportedFeatureError
from .header import pack_header
from .paths import check_file_name, combine_path
from .layout import refblock

#: resize's preallocation modes for the new area (qemu-img resize --preallocation)
PREALLOCATION_MODES = ("off", "metadata", "falloc", "full")


class Reshape:
    """Resize, grow the L1 table, empty the active layer, set the backing file, change
    the version, lazy refcounts or refcount width (the ``WritableQcow2Image`` part
    behind ``qemu-img resize``, ``commit``, ``rebase`` and ``amend``)."""

    # -- size ----------------------------------------------------------------------
    def resize(self, new_size: int, *, shrink: bool = False, preallocation: str = "off") -> None:
        """Grow or shrink the active layer (internal snapshots keep their own tables and
        sizes).  Crash order: a bigger L1 table is written and made durable before the
        header points at it; the new size is written last when growing and first when
        shrinking, so a crash never exposes a size the tables do not cover.
        ``preallocation`` (growing): "metadata" maps the new clusters, "falloc" also
        reserves their space, "full" also writes zeros."""
        if preallocation not in PREALLOCATION_MODES:
            raise ValueError(f"invalid preallocation mode {preallocation!r}")
        if new_size % 512:
            raise Qcow2Error("The new size must be a multiple of 512")
        if new_size == self.size:
            return
        if new_size > self.size and preallocation in ("falloc", "full") \
                and preallocation not in self.data_be.preallocation_modes:
            raise InvalidOptionError(f"Failed to resize underlying file: Unsupported "
                                     f"preallocation mode '{preallocation}'")
        if self.snapshots_list and self.header.version < 3:
            raise UnsupportedFeatureError("Can't resize a v2 image which has snapshots",
                                          feature="resize v2 with snapshots")
        with self._lock:
            self._mark_modified()
            if new_size < self.size:
                self._check_resize(new_size, shrink=shrink, preallocation=preallocation)
                freed = self._collect_freed()
                try:
                    self._shrink(new_size)
                    self.flush()
                finally:
                    self.refs.on_zero = freed.previous
                self._release_space(freed.clusters)
            else:
                self._grow(new_size, preallocation)
            self.flush()

    def _collect_freed(self):
        """Note the clusters whose refcount drops to 0 from now on (chained to the
        existing hook)."""
        from types import SimpleNamespace

        previous = self.refs.on_zero
        freed = SimpleNamespace(previous=previous, clusters=[])

        def hook(cluster: int) -> None:
            freed.clusters.append(cluster)
            if previous is not None:
                previous(cluster)

        self.refs.on_zero = hook
        return freed

    def _release_space(self, clusters: list) -> None:
        """After a shrink (durable, the freed clusters unreferenced): drop the refcount
        blocks left all zero from the table, give the freed clusters' space back to the
        file system, and cut the file after its last used cluster (as QEMU's shrink)."""
        self._drop_unused_refcount_blocks()
        self.flush()
        if self.data_be is not self.be:
            return
        cs = self.cluster_size
        for a, n in _runs(sorted(set(clusters))):
            if self.refs.get(a) == 0:
                try:
                    self.be.punch_hole(a * cs, n * cs)
                except OSError:
                    pass                      # space not returned: still a valid image
        counts = self._all_refcounts()
        used = counts.nonzero()[0]
        end = (int(used[-1]) + 1) * cs if len(used) else cs
        if end < self.be.size():
            self.be.truncate(end)
            self._sync()
            self.file_size = end
            self.refs.end_cluster = min(self.refs.end_cluster, end // cs)

    def _drop_unused_refcount_blocks(self) -> None:
        """Unhook refcount blocks that count nothing but (maybe) themselves: the table
        entry goes first (durably), then the block's own cluster is freed."""
        from .refcount import decode_block

        refs = self.refs
        cs = self.cluster_size
        per = refs.block_entries
        dropped = []
        for bi in range(len(refs.table)):
            off = refs.block_offset(bi)
            if not off:
                continue
            vals = decode_block(bytes(refs.cache.get(off)), self.header.refcount_bits)
            own = off // cs - bi * per
            if 0 <= own < per:
                vals[own] = 0
            if vals.any():
                continue
            refs.table[bi] = 0
            refs.table_dirty.add(bi)
            dropped.append((off, 0 <= own < per))
        if not dropped:
            return
        refs.write_table_entries()
        self._sync()
        for off, counts_itself in dropped:
            refs.cache.drop(off)
            if not counts_itself:
                refs.free(off, cs)
                refs.block_freed(off, cs)

    def _set_size(self, new_size: int) -> None:
        h = self.header
        h.header_size_field = new_size
        self._write_header_field(C.HDR_SIZE, ">Q", new_size)
        self._sync()
        self.size = h.size = new_size

    def _shrink(self, new_size: int) -> None:
        old = self.size
        cs = self.cluster_size
        self._set_size(new_size)
        a = _round_up(new_size, cs)
        end = min(len(self._l1) << self._l2_span_bits, _round_up(old, cs))
        if a < end:
            self._discard_clusters(a, end, full=True)
        # L2 tables wholly past the end are no longer needed
        for i in range(self.header.l1_entries_needed(new_size), len(self._l1)):
            off = self._l1[i] & C.L1E_OFFSET_MASK
            if off:
                if self._l1[i] & C.OFLAG_COPIED:
                    self.refs.free(off, cs)
                    self.refs.block_freed(off, cs)
                    self._l2c.drop(off)
                self._l1[i] = 0
                self._l1_dirty.add(i)

    def _grow(self, new_size: int, preallocation: str) -> None:
        old = self.size
        cs = self.cluster_size
        need = self.header.l1_entries_needed(new_size)
        if need > len(self._l1):
            self.grow_l1(need)
        self._set_size(new_size)
        # a longer backing file would show through the new area: it must read zeros
        bk = self.backing
        if bk is not None and bk.size > old:
            self.write_zeroes(old, new_size - old)
        elif old % cs:
            # bytes past the old end in its last cluster (left by a shrink) stay hidden
            self.write_zeroes(old, min(new_size, _round_up(old, cs)) - old)
        if preallocation != "off":
            self._preallocate(old, new_size, preallocation)

    def grow_l1(self, entries: int) -> None:
        """Move the active L1 table to a bigger place (QEMU's qcow2_grow_l1_table)."""
        h = self.header
        cs = self.cluster_size
        if entries > C.MAX_L1_SIZE // C.L1E_SIZE:
            raise Qcow2Error("The image size is too large for file format 'qcow2' (L1 table "
                             "would exceed 32 MiB)")
        with self._lock:
            self.flush()                                   # everything the old table points at
            new_clusters = _round_up(entries * C.L1E_SIZE, cs) // cs
            new_off = self.refs.alloc(new_clusters)
            self._claim(new_off, new_clusters * cs, "the active L1 table")
            table = list(self._l1) + [0] * (entries - len(self._l1))
            self._write_meta(_pack_l1(table, new_clusters * cs), new_off, "the active L1 table")
            self.flush()                                   # refcounts of the new table, the table
            old_off, old_n = self._l1_offset, self._l1_entries
            self._write_header_field(C.HDR_L1_SIZE, ">IQ", entries, new_off)
            self._sync()
            h.l1_size, h.l1_table_offset = entries, new_off
            self._l1 = table
            self._l1_offset, self._l1_entries = new_off, entries
            self._l1_dirty.clear()
            if old_n:
                n = _round_up(old_n * C.L1E_SIZE, cs)
                self.refs.free(old_off, n)
                self.refs.block_freed(old_off, n)

    def _preallocate(self, a: int, b: int, mode: str) -> None:
        """Allocate data clusters for [a, b) (metadata: mapping only; falloc: and the
        space; full: and written zeros).  In an encrypted image a hole or plain zeros
        would decrypt to noise (qemu-img 7.2 leaves it so): the new clusters are marked
        zero where the format allows (version 3, metadata), else encrypted zeros are
        written into them."""
        h = self.header
        cs = self.cluster_size
        mask = self._l2_entries - 1
        bm = C.L2_BITMAP_ALLOC_MASK if h.extended_l2 else 0
        crypt = self._crypto is not None and not h.has_data_file
        flag = C.OFLAG_COPIED
        if crypt and mode == "metadata" and h.version >= 3 and not h.extended_l2:
            flag |= C.OFLAG_ZERO                   # allocated, reads zeros
            crypt = False
        for pos, tend, table, toff in self._tables(_round_up(a, cs), b):
            i = (pos >> self.cluster_bits) & mask
            n = _round_up(tend - pos, cs) // cs
            # only entries not yet allocated
            todo = [k for k in range(n) if not self._entry(table, i + k)[0] & C.L2E_OFFSET_MASK]
            if not todo:
                continue
            host = self._alloc_data(len(todo), pos)
            for j, k in enumerate(todo):
                hk = pos + k * cs if h.has_data_file else host + j * cs
                self._set_entry(table, toff, i + k, hk | flag, bm)
            if not h.has_data_file:
                self._allocate_space(host, len(todo) * cs,
                                     "falloc" if crypt and mode == "full" else mode)
                if crypt:
                    self._encrypted_zeros(host, pos, todo)

    def _encrypted_zeros(self, host: int, pos: int, todo) -> None:
        """Encrypted zeros into the clusters just allocated at ``host`` for the entries
        ``todo`` (cluster indexes from guest offset ``pos``), a guest-contiguous run
        (up to 4 MiB) per write."""
        cs = self.cluster_size
        step = max(1, (4 << 20) // cs)
        j = 0
        while j < len(todo):
            e = j + 1
            while e < len(todo) and e - j < step and todo[e] == todo[e - 1] + 1:
                e += 1
            self._io(self._crypto.write, self.data_be, bytes((e - j) * cs), host + j * cs,
                     pos + todo[j] * cs)
            j = e

    def _allocate_space(self, host: int, length: int, mode: str) -> None:
        be = self.data_be
        if mode == "full":
            self._io(be.write_zeros, host, length)
        else:
            # reused clusters may hold old bytes: make them read zeros
            if host < be.size():
                try:
                    be.punch_hole(host, length)
                except OSError:
                    self._io(be.write_zeros, host, min(length, be.size() - host))
            if mode == "falloc":
                self._io(be.allocate, host, length)
            elif be.size() < host + length:
                self._io(be.truncate, host + length)
        self.file_size = max(self.file_size, host + length)

    # -- the active layer ------------------------------------------------------------
    # -- persistent bitmaps -------------------------------------------------------
    def load_bitmaps(self) -> list:
        """The image's persistent bitmaps (:class:`Bitmap`), tables read."""
        return read_bitmaps(self)

    def store_bitmaps(self, bitmaps: list) -> None:
        """Make ``bitmaps`` the image's persistent bitmaps, as QEMU stores them: every
        table written anew, then the directory, then the header (its extension and
        the autoclear bit that says they are valid); the old tables, their data clusters
        and the old directory are freed last.  Each kept bitmap's data is copied to new
        clusters (QEMU stores a bitmap whole, data then table: the same layout)."""
        h = self.header
        cs = self.cluster_size
        old_tables = self._bitmap_table_places()
        old_data = [e & C.BME_TABLE_OFFSET_MASK for b in self.load_bitmaps() for e in b.table
                    if e & C.BME_TABLE_OFFSET_MASK]
        old_dir = h.bitmaps_ext
        with self._lock:
            self.flush()
            entries = []
            for bm in bitmaps:
                # each bitmap's data goes to fresh clusters, then its table (QEMU's order)
                bm.table = self._store_bitmap_data(bm)
                n = len(bm.table)
                toff = 0
                if n:
                    clusters = _round_up(n * 8, cs) // cs
                    toff = self.refs.alloc(clusters)
                    self._claim(toff, clusters * cs, "a bitmap table")
                    # (unpadded, as QEMU writes it: the rest of the cluster reads as zeros)
                    self._write_meta(struct.pack(f">{n}Q", *bm.table), toff, "a bitmap table")
                entries.append(_pack_bitmap_entry(toff, n, bm))
            directory = b"".join(entries)
            if bitmaps:
                dclusters = _round_up(len(directory), cs) // cs
                doff = self.refs.alloc(dclusters)
                self._claim(doff, dclusters * cs, "the bitmap directory")
                self._write_meta(directory, doff, "the bitmap directory")
                h.bitmaps_ext = (len(bitmaps), len(directory), doff)
                h.autoclear_features |= C.AUTOCLEAR_BITMAPS
            else:
                h.bitmaps_ext = None
                h.autoclear_features &= ~C.AUTOCLEAR_BITMAPS
            self._rewrite_header()                 # flushes what it points at first
            for off, n in old_tables:
                self.refs.free(off, _round_up(n * 8, cs))
                self.refs.block_freed(off, _round_up(n * 8, cs))
            if old_dir is not None:
                self.refs.free(old_dir[2], _round_up(old_dir[1], cs))
                self.refs.block_freed(old_dir[2], _round_up(old_dir[1], cs))
            for off in old_data:
                self.refs.free(off, cs)
                self.refs.block_freed(off, cs)
            self.flush()

    def _store_bitmap_data(self, bm: "Bitmap") -> list:
        """Write ``bm``'s data (read from ``bm.source``, by default this image) into
        fresh clusters of this image, one per cluster that has a set bit; returns the
        new table."""
        cs = self.cluster_size
        src = bm.source if bm.source is not None else self
        src_cs = src.cluster_size
        bits = -(-self.size // (1 << bm.granularity_bits))
        total = -(-bits // 8)                      # bytes of bitmap data
        table = []
        for start in range(0, total, cs):
            if bm.data is not None:
                data = bm.data[start:start + cs]
            else:
                data = _bitmap_bytes(src, bm.table, src_cs, start, min(cs, total - start))
            if not any(data):
                table.append(0)
                continue
            off = self.refs.alloc(1)
            self._claim(off, cs, "bitmap data")
            self._write_meta(data, off, "bitmap data")
            table.append(off)
        return table

    def _bitmap_table_places(self) -> list:
        from .bitmap import read_directory

        h = self.header
        if h.bitmaps_ext is None:
            return []
        nb, dsize, doff = h.bitmaps_ext
        return [(e.table_offset, e.table_size)
                for e in read_directory(self._read_meta(dsize, doff), doff, nb)
                if e.table_size]

    def discard_all(self) -> None:
        """Drop every cluster of the active layer (QEMU's make_empty): it then reads
        its backing file, or zeros."""
        with self._lock:
            self._mark_modified()
            end = min(len(self._l1) << self._l2_span_bits, _round_up(self.size, self.cluster_size))
            self._discard_clusters(0, end, full=True)

    def can_empty_completely(self) -> bool:
        """Whether :meth:`empty_and_close` can rebuild the image from scratch: version
        3 (a dirty bit covers the steps), nothing but the active layer in the file (no
        snapshots, bitmaps, encryption or external data file), and the new refcount
        block covering the header, refcount table and block and the L1 table."""
        h = self.header
        cs = self.cluster_size
        l1_clusters = _round_up(len(self._l1) * C.L1E_SIZE, cs) // cs
        return (h.version >= 3 and not self.snapshots_list and h.bitmaps_ext is None
                and h.crypt_method == C.CRYPT_NONE and not h.has_data_file
                and 3 + l1_clusters <= cs * 8 // h.refcount_bits)

    def empty_and_close(self) -> None:
        """Empty the active layer by rebuilding the file (QEMU's way of emptying an
        overlay after a commit; needs :meth:`can_empty_completely`): cluster 0 keeps
        the header, cluster 1 becomes the refcount table, 2 its one block, 3... an
        empty L1 table, and the file is cut after it.  The steps run under the dirty
        bit, each announced to an error-injecting store as QEMU names them (l1_update,
        empty_image_prepare, reftable_update, refblock_alloc): a failure or crash
        leaves a dirty image whose refcounts the next writable open rebuilds, and its
        data still in the backing file, where the commit flushed it.  The in-memory
        tables are stale afterwards, so the image is closed."""
        event = self.debug_event or (lambda _name: None)
        h = self.header
        cs = self.cluster_size
        l1_len = len(self._l1) * C.L1E_SIZE
        l1_clusters = _round_up(l1_len, cs) // cs
        with self._lock:
            self._mark_modified()
            self.flush()
            if not h.incompatible_features & C.INCOMPAT_DIRTY:
                h.incompatible_features |= C.INCOMPAT_DIRTY
                self._write_header_field(C.HDR_INCOMPATIBLE_FEATURES, ">Q",
                                         h.incompatible_features)
                self._sync()
            self._marked_dirty = True               # close clears it, if all went well
            event("l1_update")
            self._io(self.be.write_zeros, self._l1_offset, l1_clusters * cs)
            event("empty_image_prepare")
            self._io(self.be.write_zeros, cs, (2 + l1_clusters) * cs)
            event("reftable_update")
            self._write_header_field(C.HDR_L1_TABLE_OFFSET, ">QQI", 3 * cs, cs, 1)
            self._sync()
            event("refblock_alloc")
            self._io(self.be.pwrite, struct.pack(">Q", 2 * cs), cs)
            self._sync()
            used = 3 + l1_clusters
            block = refblock(cs, h.refcount_order, used)     # (no numpy: start-up)
            self._io(self.be.pwrite, block, 2 * cs)
            self._io(self.be.truncate, used * cs)
            self._sync()
            h.l1_table_offset, h.refcount_table_offset, h.refcount_table_clusters = (
                3 * cs, cs, 1)
            self._l1_offset = 3 * cs
            self._l1[:] = [0] * len(self._l1)
            self._l1_dirty.clear()
        self.close()

    # -- the header --------------------------------------------------------------------
    def _header_extent(self) -> int:
        """Bytes in use at the start of the first cluster (header, extensions, name)."""
        return len(self.be.pread(self.cluster_size, 0).rstrip(b"\0"))

    def _rewrite_header(self, at_least: int = 0) -> None:
        """Write the whole header area again from ``self.header`` (everything it points
        at made durable first); what the old one used beyond the new is zeroed."""
        self.flush()
        packed = pack_header(self.header)
        pad = max(0, max(at_least, self._header_extent()) - len(packed))
        self._io(self.be.pwrite, packed + bytes(pad), 0)
        self._sync()

    def set_backing(self, name: str | None, fmt: str | None) -> None:
        """Rewrite the header with a new backing file name and format (None: no backing
        file).  Everything the header points at is made durable first."""
        h = self.header
        if name:
            check_file_name(name, "backing file")
        with self._lock:
            old_len = (h.backing_file_offset + h.backing_file_size) if h.backing_file_offset \
                else 0
            h.backing_file = name or None
            h.backing_format = (fmt or None) if name else None
            try:
                pack_header(h)
            except ValueError as exc:
                raise Qcow2Error(f"Could not change the backing file to '{name}': "
                                 f"{exc}") from None
            self._rewrite_header(old_len)
            self.backing_filename = h.backing_file
            self.full_backing_filename = (combine_path(self.filename, h.backing_file)
                                          if h.backing_file else None)

    def set_lazy_refcounts(self, on: bool) -> None:
        """Turn the lazy_refcounts compatible feature on or off (version 3 only; a
        version 2 header has no field for it)."""
        h = self.header
        with self._lock:
            self.flush()
            if on:
                h.compatible_features |= C.COMPAT_LAZY_REFCOUNTS
            else:
                h.compatible_features &= ~C.COMPAT_LAZY_REFCOUNTS
            if h.version >= 3:
                self._write_header_field(C.HDR_COMPATIBLE_FEATURES, ">Q", h.compatible_features)
                self._sync()

    def set_version(self, version: int, progress=None) -> None:
        """Change the format version: 2 -> 3 rewrites the header; 3 -> 2 also turns
        zero clusters into what version 2 can say, and refuses what it cannot hold.
        ``progress(done, total)``: the work done so far, in qemu-img's units (upgrade:
        two steps, the snapshot table and the header; downgrade: one per L1 entry of
        the active layer and of every snapshot)."""
        h = self.header
        report = progress or _no_progress
        with self._lock:
            if version == 3 and h.version == 2:
                report(0, 2)
                # version 3 requires the 64-bit VM state size and the disk size in every
                # snapshot's extra data: the table is rewritten first (QEMU's order)
                if any(sn.extra_data_size < C.SNAPSHOT_EXTRA_V3_MIN
                       for sn in self.snapshots_list):
                    self._write_snapshot_table(list(self.snapshots_list))
                report(1, 2)
                h.version = 3
                h.header_length = 0            # pack_header picks the v3 length
                self._rewrite_header()
                report(2, 2)
            elif version == 2 and h.version == 3:
                self._downgrade(report)

    def _downgrade(self, report) -> None:
        h = self.header
        if h.refcount_bits != 16:
            raise Qcow2Error("compat=0.10 requires refcount_bits=16")
        if h.extended_l2 or h.has_data_file or h.compression_type != C.COMPRESSION_ZLIB:
            raise Qcow2Error("Cannot downgrade an image with extended L2 entries, an external "
                             "data file or a compression type other than zlib")
        if h.bitmaps_ext is not None:
            raise Qcow2Error("Cannot downgrade an image with bitmaps")
        self.check_snapshot_l1_tables()          # before anything changes
        total = len(self._l1) + sum(sn.l1_size for sn in self.snapshots_list)
        self._expand_zero_clusters(lambda done: report(done, total))
        self.expand_snapshot_zero_clusters(lambda done: report(len(self._l1) + done, total))
        if h.lazy_refcounts:
            h.compatible_features &= ~C.COMPAT_LAZY_REFCOUNTS
        h.version = 2
        h.incompatible_features = h.compatible_features = h.autoclear_features = 0
        self._rewrite_header()

    def _expand_zero_clusters(self, step) -> None:
        """Version 2 has no zero flag: clusters marked zero become unallocated (no backing
        file) or written zeros (a backing file would show through).  ``step(n)``: after
        each of the active L1 table's entries, ``n`` of them done."""
        cs = self.cluster_size
        for i, e in enumerate(list(self._l1)):
            if not e & C.L1E_OFFSET_MASK:
                step(i + 1)
                continue
            table, toff = self._l2_for_write(i)
            for k in range(self._l2_entries):
                d = struct.unpack_from(">Q", table, k * 8)[0]
                if d & C.OFLAG_COMPRESSED or not d & C.OFLAG_ZERO:
                    continue
                guest = (i << self._l2_span_bits) + k * cs
                self._set_entry(table, toff, k, 0)
                self._free_entry(d)
                if self.header.backing_file is not None and guest < self.size:
                    self.pwrite(bytes(min(cs, self.size - guest)), guest)
            step(i + 1)
        self.flush()

    # -- refcount width ----------------------------------------------------------------
    def change_refcount_width(self, bits: int, progress=None) -> None:
        """Write a complete new refcount structure of ``bits``-wide entries after the end
        of the used space, make it durable, switch the header to it, then drop the old
        table and blocks (QEMU's qcow2_change_refcount_order).

        ``progress(done, total)`` counts passes over the old refcount table's entries
        as qemu-img does: sizing passes until the new structure's size stops changing
        (the first reads every refcount; the others are arithmetic here), then one that
        writes the new blocks.  The total is an estimate (at least three passes, two
        more than the current one while sizing), so the reported fraction goes back
        when the sizing needs a third pass, as qemu-img's does."""
        import numpy as np

        h = self.header
        cs = self.cluster_size
        with self._lock:
            self.flush()
            walks = _Walks(len(self.refs.table), progress)
            counts = self._all_refcounts(walks.entry)
            if counts.size and int(counts.max()) > (1 << bits) - 1:
                first = int(np.argmax(counts > (1 << bits) - 1))     # qemu-img names it
                raise Qcow2Error(f"Cannot decrease refcount entry width to {bits} bits: "
                                 f"Cluster at offset {first * cs:#x} has a refcount of "
                                 f"{int(counts[first])}")
            refs = self.refs
            end = refs.end_cluster
            old_blocks = [refs.block_offset(bi) for bi in range(len(refs.table))]
            nb, tc, passes = _refcount_structure(end, cs * 8 // bits, cs)
            walks.sized(passes)
            total = end + nb + tc
            counts = np.concatenate([counts, np.ones(nb + tc, dtype=np.uint64),
                                     np.zeros(nb * (cs * 8 // bits) - total, dtype=np.uint64)])
            # the old table and blocks are dropped after the switch: not counted anew
            first = h.refcount_table_offset // cs
            counts[first:first + h.refcount_table_clusters] -= 1
            for off in old_blocks:
                if off:
                    counts[off // cs] -= 1
            self._switch_refcounts(counts, bits, end, nb, tc, walks)

    def _all_refcounts(self, entry=None):
        """The refcount of every cluster below the end of the used space (numpy);
        ``entry(i)``: before the refcount table's entry ``i`` is read."""
        import numpy as np

        from .refcount import decode_block

        refs = self.refs
        end = refs.end_cluster
        per = refs.block_entries
        counts = np.zeros(end, dtype=np.uint64)
        for bi in range((end + per - 1) // per):
            if entry is not None:
                entry(bi)
            off = refs.block_offset(bi)
            if off:
                vals = decode_block(bytes(refs.cache.get(off)), self.header.refcount_bits)
                lo = bi * per
                hi = min(end, lo + per)
                counts[lo:hi] = vals[:hi - lo]
        return counts

    def _switch_refcounts(self, counts, bits: int, end: int, nb: int, tc: int,
                          walks: "_Walks") -> None:
        """Write the new blocks and table at cluster ``end``, then the header fields."""
        from .refcount import encode_block

        h = self.header
        cs = self.cluster_size
        base = end * cs
        blocks = encode_block(counts, bits)
        for a, b in walks.writing(nb):          # (the blocks in slices, one per report)
            if b > a:
                self._write_meta(blocks[a * cs:b * cs], base + a * cs)
        table = struct.pack(f">{nb}Q", *[base + i * cs for i in range(nb)])
        self._write_meta(table + bytes(tc * cs - len(table)), base + nb * cs)
        self._sync()
        # the switch: offset, clusters and order live in the first sector; one pwrite of
        # [refcount table offset, header length) changes all three at once, so every
        # state on disk points at a complete structure of the width the header names
        h.refcount_table_offset = base + nb * cs
        h.refcount_table_clusters = tc
        h.refcount_order = bits.bit_length() - 1
        lo = C.HDR_REFCOUNT_TABLE_OFFSET
        head = bytearray(self.be.pread(C.HDR_HEADER_LENGTH - lo, lo))
        struct.pack_into(">QI", head, 0, h.refcount_table_offset, tc)
        struct.pack_into(">I", head, C.HDR_REFCOUNT_ORDER - lo, h.refcount_order)
        self._write_header_field(lo, f">{len(head)}s", bytes(head))
        self._sync()
        # the refcount machinery over the new structure
        self.file_size = max(self.file_size, base + (nb + tc) * cs)
        self._open_refcounts()
        self._rebuild_overlap_map()


class Bitmap:
    """A persistent dirty bitmap as :meth:`Reshape.store_bitmaps` writes it: ``name``
    (bytes), ``flags`` (``BME_FLAG_*``), ``granularity_bits``, ``table`` (the bitmap
    table's entries: data cluster offsets, 0 for all-zero, 1 for all-one clusters) and
    the directory entry's ``extra`` data."""

    __slots__ = ("name", "flags", "granularity_bits", "table", "extra", "source", "data")

    def __init__(self, name: bytes, flags: int, granularity_bits: int, table: list,
                 extra: bytes = b"", source=None):
        self.source = source          # the image the table's clusters are in (None: new)
        self.data: bytes | None = None    # the serialized bits, when set in memory
        self.name = name
        self.flags = flags
        self.granularity_bits = granularity_bits
        self.table = table
        self.extra = extra


def read_bitmaps(img) -> list:
    """The persistent bitmaps of a qcow2 image (reader or writer), tables read; each
    :class:`Bitmap` reads its data from ``img``."""
    from .bitmap import read_directory

    h = img.header
    if h.bitmaps_ext is None or not h.bitmaps_consistent and not img.writable:
        return []
    nb, dsize, doff = h.bitmaps_ext
    out = []
    for e in read_directory(img._read_meta(dsize, doff), doff, nb):
        raw = img._read_meta(e.table_size * 8, e.table_offset) if e.table_size else b""
        table = list(struct.unpack(f">{e.table_size}Q", raw))
        extra = img._read_meta(e.extra_data_size, e.offset + C.BME_ENTRY_SIZE
                               + e.name_size) if e.extra_data_size else b""
        bm = Bitmap(e.name, e.flags, e.granularity_bits, table, extra)
        bm.source = img
        out.append(bm)
    return out


def bitmap_data(bm: Bitmap, disk_size: int) -> bytes:
    """All of ``bm``'s serialized bits (bit ``i`` of byte ``j``: granule ``8j + i``)."""
    if bm.data is not None:
        return bm.data
    granules = -(-disk_size // (1 << bm.granularity_bits))
    total = -(-granules // 8)
    return _bitmap_bytes(bm.source, bm.table, bm.source.cluster_size, 0, total)


def _bitmap_bytes(src, table: list, src_cs: int, start: int, n: int) -> bytes:
    """Bytes [start, start+n) of a bitmap's serialized data, ``table`` being its table
    in ``src`` (clusters of ``src_cs`` bytes; entry 0: zeros, 1: all ones)."""
    out = bytearray()
    pos = start
    while pos < start + n:
        j, within = divmod(pos, src_cs)
        k = min(src_cs - within, start + n - pos)
        e = table[j] if j < len(table) else 0
        off = e & C.BME_TABLE_OFFSET_MASK
        if off:
            out += src._read_meta(k, off + within)
        elif e & C.BME_TABLE_ALL_ONES:
            out += b"\xff" * k
        else:
            out += bytes(k)
        pos += k
    return bytes(out)


def _pack_bitmap_entry(table_offset: int, table_size: int, bm: Bitmap) -> bytes:
    """A bitmap directory entry (spec: "Bitmap directory"), padded to 8 bytes."""
    raw = struct.pack(">QIIBBHI", table_offset, table_size, bm.flags,
                      C.BME_TYPE_DIRTY_TRACKING, bm.granularity_bits, len(bm.name),
                      len(bm.extra)) + bm.name + bm.extra
    return raw + bytes(-len(raw) % 8)


def _runs(sorted_ints):
    """(start, count) of each run of consecutive integers."""
    start = prev = None
    for c in sorted_ints:
        if start is not None and c == prev + 1:
            prev = c
            continue
        if start is not None:
            yield start, prev - start + 1
        start = prev = c
    if start is not None:
        yield start, prev - start + 1


def _round_up(n: int, unit: int) -> int:
    return (n + unit - 1) // unit * unit


def _pack_l1(table: list[int], length: int) -> bytes:
    """An L1 table as stored, zero-padded to ``length`` bytes."""
    return struct.pack(f">{len(table)}Q", *table) + bytes(length - len(table) * C.L1E_SIZE)


def _refcount_structure(end: int, per_block: int, cs: int) -> tuple[int, int, int]:
    """(blocks, table clusters, passes) of a refcount structure placed at cluster
    ``end`` that covers everything below it and itself; ``passes``: how many sizing
    rounds it took, the last one finding nothing more to add."""
    nb = tc = 0
    passes = 0
    while True:
        passes += 1
        total = end + nb + tc
        nb2 = (total + per_block - 1) // per_block
        tc2 = (nb2 * 8 + cs - 1) // cs
        if (nb2, tc2) == (nb, tc):
            return nb, tc, passes
        nb, tc = nb2, tc2


def _no_progress(done: int, total: int) -> None:
    pass


class _Walks:
    """The progress of a refcount width change in qemu-img's units: passes over the
    ``entries`` of the old refcount table, one report per entry and one at the end of
    each pass; while sizing, pass ``k`` expects ``max(k + 2, 3)`` passes in all, the
    writing pass is the last."""

    def __init__(self, entries: int, progress):
        self.n = max(1, entries)
        self.report = progress or _no_progress
        self.read = 0                          # entries the first pass reported
        self.passes = 1

    def _pass(self, k: int, total: int, start: int = 0) -> None:
        for j in range(start, self.n):
            self.report(k * self.n + j, total * self.n)

    def entry(self, i: int) -> None:
        """The first pass (reading the refcounts) reached entry ``i``."""
        if i < self.n:
            self.report(i, 3 * self.n)
            self.read = i + 1

    def sized(self, passes: int) -> None:
        """The sizing took ``passes`` rounds: the first pass's rest, then the others."""
        self._pass(0, 3, self.read)            # (entries past the used blocks)
        self.report(self.n, 3 * self.n)
        for k in range(1, passes):
            total = max(k + 2, 3)
            self._pass(k, total)
            self.report((k + 1) * self.n, total * self.n)
        self.passes = passes

    def writing(self, blocks: int):
        """(first, end) block ranges of the writing pass, one per report."""
        k = self.passes
        total = k + 1
        done = 0
        for j in range(self.n):
            self.report(k * self.n + j, total * self.n)
            upto = blocks * (j + 1) // self.n
            yield done, upto
            done = upto
        self.report(total * self.n, total * self.n)
