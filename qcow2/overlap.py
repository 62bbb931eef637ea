"""Metadata overlap protection (QEMU's qcow2_check_metadata_overlap).

A writable image keeps a map of every host cluster that holds metadata of the active
layer -- the header, the active L1 table, L2 tables, the refcount table and blocks,
the snapshot table and the snapshots' L1 tables -- and what it holds.  Before a
write lands, the writer asks :meth:`MetadataMap.conflict`; before a fresh cluster is
handed out, :meth:`MetadataMap.claim`.  A refcount of 0 on a cluster that holds a
table would otherwise let the engine overwrite it; the writer marks the image corrupt
instead.
"""

from __future__ import annotations

from . import constants as C

#: what the clusters of the first kind hold; writes of header fields may land there
HEADER = "the header"
HEADER_FIELD = "header field"
GUEST_DATA = "guest data"


class MetadataMap:
    """Host cluster index -> what metadata it holds."""

    def __init__(self, cluster_bits: int):
        self.cbits = cluster_bits
        self._kinds: dict[int, str] = {}

    def add(self, offset: int, length: int, kind: str) -> None:
        cb = self.cbits
        for c in range(offset >> cb, (offset + length - 1 >> cb) + 1):
            self._kinds[c] = kind

    def forget(self, cluster: int) -> None:
        """The cluster was freed (its refcount reached 0)."""
        self._kinds.pop(cluster, None)

    def claim(self, offset: int, length: int, kind: str) -> str | None:
        """Record freshly allocated clusters as holding ``kind`` (guest data is not
        recorded); returns why that is wrong when one holds metadata already."""
        cb = self.cbits
        kinds = self._kinds
        for c in range(offset >> cb, (offset + length - 1 >> cb) + 1):
            there = kinds.get(c)
            if there is not None:
                return (f"cluster {c << cb:#x} allocated for {kind} is in use by {there} "
                        f"(its refcount is 0); metadata overlap")
            if kind != GUEST_DATA:
                kinds[c] = kind
        return None

    def conflict(self, offset: int, n: int, kind: str) -> str | None:
        """Why writing ``n`` bytes of ``kind`` at ``offset`` would destroy other
        metadata, or None when it would not."""
        cb = self.cbits
        kinds = self._kinds
        for c in range(offset >> cb, (offset + n - 1 >> cb) + 1):
            there = kinds.get(c)
            if there is not None and there != kind and not (
                    kind == HEADER_FIELD and there == HEADER):
                return (f"writing {kind} at {offset:#x} ({n} bytes) would overwrite {there} "
                        f"at {c << cb:#x}; metadata overlap")
        return None

    def rebuild(self, header, l1_offset: int, l1: list[int], refcount_table: list[int],
                snapshots) -> None:
        """Every cluster holding metadata of the active layer, and what it holds."""
        h = header
        cb = self.cbits
        self._kinds = {0: HEADER}
        if l1:
            self.add(l1_offset, len(l1) * C.L1E_SIZE, "the active L1 table")
        for e in l1:
            if e & C.L1E_OFFSET_MASK:
                self._kinds[(e & C.L1E_OFFSET_MASK) >> cb] = "L2 table"
        self.add(h.refcount_table_offset, h.refcount_table_clusters << cb, "the refcount table")
        for e in refcount_table:
            if e & C.REFT_OFFSET_MASK:
                self._kinds[(e & C.REFT_OFFSET_MASK) >> cb] = "refcount block"
        if h.nb_snapshots:
            size = sum(sn.entry_size for sn in snapshots)
            self.add(h.snapshots_offset, max(size, 1), "the snapshot table")
            for sn in snapshots:
                if sn.l1_size:
                    self.add(sn.l1_table_offset, sn.l1_size * C.L1E_SIZE, "a snapshot L1 table")
