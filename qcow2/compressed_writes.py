"""Compressed clusters written into a writable qcow2 image: whole clusters, compressed
here or by the caller (converters compress in parallel threads), packed back to back
in the file as QEMU packs them (its qcow2_alloc_bytes).

:class:`CompressedWrites` is a mixin of :class:`qcow2.writer.WritableQcow2Image`: it
uses that class's lock, tables, refcounts and data writes, and the same crash-safe
flush covers what it writes.
"""

from __future__ import annotations

import struct

from .cluster import compressed_entry
from .errors import InvalidOptionError, UnsupportedFeatureError


class CompressedWrites:
    """``write_compressed``, ``write_compressed_prepared``, ``write_compressed_many``."""

    def _refuse_compressed_with_data_file(self) -> None:
        if self._crypto is not None:
            raise UnsupportedFeatureError("Compression and encryption not supported at the "
                                          "same time", feature="compression with encryption")
        if self.data_be is not self.be:
            raise UnsupportedFeatureError("compressed clusters cannot be written to images "
                                          "with an external data file",
                                          feature="compression with data file")

    def write_compressed(self, data, offset: int) -> None:
        """Write one whole cluster compressed (zlib or zstd as the image says); a
        cluster that does not compress is written normally, as QEMU does.  The last
        cluster of a disk whose size is not cluster-aligned may be short."""
        mv = memoryview(data).cast("B")
        cs = self.cluster_size
        if offset % cs or (len(mv) != cs and offset + len(mv) != self.size) or len(mv) > cs:
            raise InvalidOptionError("compressed writes take whole, aligned clusters")
        self._refuse_compressed_with_data_file()
        if self._compressor is None:
            self._compressor = self.kernels.Compressor(self.header.compression_type, cs)
        if len(mv) < cs:
            full = bytearray(cs)
            full[:len(mv)] = mv
            mv = memoryview(full)
        comp = self._compressor.compress(mv)
        self.write_compressed_prepared(offset, comp, mv)

    def write_compressed_prepared(self, offset: int, comp: bytes | None, raw) -> None:
        """Store a cluster already compressed by the caller (``comp``, or None to store
        ``raw`` uncompressed): lets converters compress in parallel threads."""
        if comp is not None and self._crypto is not None:
            self._refuse_compressed_with_data_file()
        with self._lock:
            self._mark_modified()
            if comp is None:
                self._write(memoryview(raw)[:min(len(raw), self.size - offset)], offset)
                return
            l1i = offset >> self._l2_span_bits
            table, toff = self._l2_for_write(l1i)
            i = (offset >> self.cluster_bits) & (self._l2_entries - 1)
            old, oldb = self._entry(table, i)
            host = self._alloc_bytes(len(comp))
            self._write_data(comp, host)
            self._set_entry(table, toff, i, compressed_entry(host, len(comp), self.cluster_bits), 0)
            self._free_entry(old, oldb)

    def write_compressed_many(self, offset: int, comps, raw) -> int:
        """Store consecutive clusters from ``offset`` already compressed by the caller:
        ``comps[i]`` is cluster i's compressed bytes, or None to store it uncompressed
        from ``raw`` (the clusters' data, the last one may be short at the disk's
        end).  Clusters packed back to back in the file go out in one write.
        Returns the bytes written."""
        cs = self.cluster_size
        raw = memoryview(raw).cast("B")
        if offset % cs or offset + len(raw) > self.size or len(raw) > len(comps) * cs:
            raise InvalidOptionError("compressed writes take whole, aligned clusters")
        self._refuse_compressed_with_data_file()
        mask = self._l2_entries - 1
        written = 0
        with self._lock:
            self._mark_modified()
            run: list = []              # compressed data contiguous in the file
            run_host = run_end = 0
            table = toff = None
            cur_l1 = -1
            try:
                k = no_pack_until = 0
                while k < len(comps):
                    comp = comps[k]
                    a = offset + k * cs
                    if comp is not None and k >= no_pack_until:
                        packed, upto = self._pack_run(comps, k, a)
                        no_pack_until = upto     # (a run looked at and refused: one by one)
                        if packed:
                            if run:
                                data, run = run, []
                                self._write_data(data, run_host)
                            written += packed
                            k = upto
                            continue
                    if comp is None:
                        if run:
                            data, run = run, []
                            self._write_data(data, run_host)
                        self._write(raw[k * cs:(k + 1) * cs], a)
                        written += min(cs, len(raw) - k * cs)
                        k += 1
                        continue
                    l1i = a >> self._l2_span_bits
                    if l1i != cur_l1:
                        table, toff = self._l2_for_write(l1i)
                        cur_l1 = l1i
                    i = (a >> self.cluster_bits) & mask
                    old, oldb = self._entry(table, i)
                    host = self._alloc_bytes(len(comp))
                    if run and host != run_end:
                        data, run = run, []
                        self._write_data(data, run_host)
                    if not run:
                        run_host = host
                    run.append(comp)
                    run_end = host + len(comp)
                    written += len(comp)
                    self._set_entry(table, toff, i,
                                    compressed_entry(host, len(comp), self.cluster_bits), 0)
                    self._free_entry(old, oldb)
                    k += 1
            finally:
                # the entries set above point at this data: it goes out before any
                # flush can write them
                if run:
                    self._write_data(run, run_host)
        return written

    def _pack_run(self, comps, k: int, a: int) -> tuple[int, int]:
        """The common case of :meth:`write_compressed_many` in one step: compressed
        clusters ``comps[k:]`` (up to the first None or the L2 table's end) whose
        entries are unallocated, packed where :meth:`_alloc_bytes` would pack them one
        by one -- after the partly used cluster it left, into free clusters that follow
        it -- with the same refcounts, L2 entries and claims, but one refcount update
        per host cluster, one table update and one write.  Returns (bytes written, the
        index after the last cluster packed), or (0, the index after the clusters
        looked at) where the case is not that simple: the caller then takes those
        cluster by cluster."""
        refs = self.refs
        cs, cbits = self.cluster_size, self.cluster_bits
        start = self._free_byte_offset
        if self.header.extended_l2 or not start or not start & (cs - 1):
            return 0, k
        mask = self._l2_entries - 1
        i0 = (a >> cbits) & mask
        end_k = min(len(comps), k + (mask + 1 - i0))
        # the run: up to the first None, or the first cluster that would end exactly
        # on a cluster boundary (the next one then starts anywhere: _alloc_bytes)
        pos = start
        m = 0
        sizes = []
        while k + m < end_k:
            comp = comps[k + m]
            if comp is None:
                break
            pos += len(comp)
            sizes.append(len(comp))
            m += 1
            if not pos & (cs - 1):
                break
        if m < 2:
            return 0, k
        # the table first, as the one-by-one path allocates it (it may take a cluster)
        table, toff = self._l2_for_write(a >> self._l2_span_bits)
        if any(struct.unpack_from(f">{m}Q", table, i0 * 8)):
            return 0, k + m                 # (entries to replace: one by one)
        first, last = start >> cbits, (pos - 1) >> cbits
        if refs.get(first) + m > refs.max_ref or (
                last > first and not refs.run_ready(first + 1, last - first)):
            return 0, k + m
        # claims and refcounts as _alloc_bytes makes them, per host cluster
        if last > first:
            self._claim((first + 1) << cbits, pos - ((first + 1) << cbits), "guest data")
        counts: dict = {}
        host = start
        entries = []
        get = counts.get
        for size in sizes:
            c0, c1 = host >> cbits, (host + size - 1) >> cbits
            counts[c0] = get(c0, 0) + 1
            for c in range(c0 + 1, c1 + 1):     # (a cluster's data reaching the next)
                counts[c] = get(c, 0) + 1
            entries.append(compressed_entry(host, size, cbits))
            host += size
        for c, n in counts.items():
            refs.add(c, n)
        self._write_data(comps[k:k + m], start)
        struct.pack_into(f">{m}Q", table, i0 * 8, *entries)
        self._l2c.mark_dirty(toff)
        self._free_byte_offset = pos
        return pos - start, k + m

    def _alloc_bytes(self, size: int) -> int:
        """QEMU's qcow2_alloc_bytes: pack compressed clusters back to back; every host
        cluster a compressed cluster touches holds one reference for it."""
        refs = self.refs
        cs = self.cluster_size
        off = self._free_byte_offset
        if off and (off & (cs - 1) == 0 or refs.get(off >> self.cluster_bits) >= refs.max_ref):
            off = 0
        if not off or cs - (off & (cs - 1)) < size:
            nxt = (off >> self.cluster_bits) + 1 if off else -1
            c = refs.take_free(1, prefer=nxt)
            if not (off and c == nxt):
                off = c << self.cluster_bits
        if off & (cs - 1) == 0 or (off + size - 1) >> self.cluster_bits != off >> self.cluster_bits:
            first_new = off if off & (cs - 1) == 0 else (off | (cs - 1)) + 1
            self._claim(first_new, off + size - first_new, "guest data")
        refs.increment(off, size)
        self._free_byte_offset = off + size
        return off


__all__ = ["CompressedWrites"]
