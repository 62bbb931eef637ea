"""Untrusted mode accepts every qemu-img-made image it can read alone: each corpus
image without a backing or data file (every format version, cluster size, compression,
extended L2, refcount width, snapshots, bitmaps -- also in use after a kill --, dirty,
preallocated, unknown extensions) opens with the full metadata scan and reads exactly
what ``qemu-img convert`` reads, in the active layer and in every snapshot."""

from __future__ import annotations

import hashlib

import pytest

import corpus
import oracle

alone = corpus.params(lambda c: c.fmt == "qcow2" and c.readable and not c.big
                      and not ({"backing", "data_file"} & c.features))


def _sha(img) -> str:
    h = hashlib.sha256()
    for off in range(0, img.size, 4 << 20):
        h.update(img.pread(min(4 << 20, img.size - off), off))
    return h.hexdigest()


@pytest.mark.parametrize("case", alone)
def test_untrusted_reads_qemu_made_images(case, built, engine):
    with engine.open(built.path, untrusted=True) as img:
        assert _sha(img) == oracle.raw_sha256(built.path, "qcow2")
    for sn in case.snapshots:
        with engine.open(built.path, untrusted=True, snapshot=sn) as img:
            assert _sha(img) == oracle.raw_sha256(built.path, "qcow2", snapshot=sn), sn
