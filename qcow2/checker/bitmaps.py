"""Persistent bitmaps in the check (QEMU's qcow2_check_bitmaps_refcounts): the bitmap
directory, every bitmap table and the bitmap data clusters are counted; a directory or
table QEMU would not load makes the check fail."""

from __future__ import annotations

import errno

import numpy as np

from ..bitmap import data_clusters, load_directory, table_problem
from ..errors import CorruptImageError
from .result import Abort, CheckResult
from .state import U64, State


def check_bitmaps(st: State, res: CheckResult) -> None:
    ext = st.h.bitmaps_ext
    if ext is None:
        return
    nb, dsize, doff = ext
    st.inc(res, doff, dsize)
    try:
        entries = load_directory(st.f.read(dsize, doff), doff, nb, st.cs, st.h.size)
    except CorruptImageError:
        res.corruptions += 1
        raise Abort(errno.EINVAL) from None
    cs = st.cs
    for e in entries:
        st.inc(res, e.table_offset, e.table_size * 8)
        raw = st.f.read(e.table_size * 8, e.table_offset)
        table = np.frombuffer(raw, dtype=">u8").astype(U64)
        if table_problem(table, cs) is not None:
            res.corruptions += 1
            raise Abort(errno.EINVAL)
        for o in data_clusters(table)[1].tolist():
            st.inc(res, int(o), cs)
