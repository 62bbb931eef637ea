"""The Python twin of the native kernels (numpy, zlib, zstandard).

Every kernel here has the same signature, results, exception types and messages
as its counterpart in ``qcow2.kernels.native``: both validate their arguments and
build their exceptions with ``qcow2.kernels.contract``.  Every format constant
comes from ``qcow2.constants``.

numpy and zstandard are imported on first use only.
"""

from __future__ import annotations

import array
import zlib

from ..constants import (
    KIND_COMPRESSED, KIND_DATA, KIND_UNALLOC, KIND_UNALLOC_ALLOC,
    KIND_ZERO, KIND_ZERO_ALLOC, L2_BITMAP_ALLOC_MASK, L2_BITMAP_ZERO_SHIFT,
    L2E_SIZE, SUBCLUSTERS_PER_CLUSTER,
)
from ..cluster import L2Batch
from ..lightweight import local
from .contract import (
    ALGO_ZLIB, ALGO_ZSTD, EDATA, EDSTRANGE, EL2BITMAP, EL2RESERVED, EL2UNALIGNED, ELONG,
    ENOMEM, ESHORT, ESRCRANGE, OK, RUN_TYPECODES, SECTOR, CompressorBase, DecompressorBase,
    byte_view, check_block_size, check_ivs, check_lane, check_l2_args, check_sectors, empty_runs,
    l2_error, numpy,
)

IMPLEMENTATION = "python"
FEATURES = frozenset()


# --------------------------------------------------------------------------
# L2 tables

def _classify(e, bm, extended: bool, data_file: bool) -> tuple:
    """Masks over a slice of L2 entries by cluster type, from the engine's one
    statement of the rule (:class:`qcow2.cluster.L2Batch`): ``(e, bm, off, comp,
    normal, unalloc, zero_alloc, zero_plain, batch)``: the descriptors and bitmaps
    (uint64; bm is None without subclusters), the host cluster offsets of standard
    descriptors, then the masks compressed; data at a host cluster; no host cluster
    and no zero flag; zero flag with a host cluster; zero flag without one."""
    b = L2Batch(e, bm, extended=extended, data_file=data_file)
    return (e, bm, b.offset, b.compressed, b.normal, b.unallocated, b.zero_alloc,
            b.zero_plain, b)


def _bitmap_halves(np, bm):
    """(allocated bits, zero bits) of extended L2 bitmaps."""
    return bm & np.uint64(L2_BITMAP_ALLOC_MASK), bm >> np.uint64(L2_BITMAP_ZERO_SHIFT)


def _check_entries(np, t: tuple, mv, first: int, *, cluster_bits: int,
                   extended: bool, strict: bool, table_offset: int) -> None:
    """Raise l2_error() for the first bad entry, in the native order of checks:
    reserved bits (strict only), bitmap, alignment."""
    b = t[-1]
    count = b.entry.shape[0]
    bad_res = b.reserved(strict=True) if strict else np.zeros(count, bool)
    if extended:
        bad_bm = b.bitmap_conflict() | b.bitmap_unallocated()
    else:
        bad_bm = np.zeros(count, bool)
    bad_al = b.unaligned(1 << cluster_bits)
    bad = bad_res | bad_bm | bad_al
    if bad.any():
        i = int(np.argmax(bad))
        code = EL2RESERVED if bad_res[i] else EL2BITMAP if bad_bm[i] else EL2UNALIGNED
        raise l2_error(code, first + i, mv, cluster_bits=cluster_bits,
                       extended=extended, table_offset=table_offset)


def _compressed_fields(np, t: tuple, cluster_bits: int):
    """(host offset, length QEMU reads) of compressed descriptors (spec
    "Compressed Clusters Descriptor"; the length is 0 for other entries)."""
    b = t[-1]
    coff, length, _start, _nbytes = b.compressed_extents(cluster_bits)
    return coff, np.where(b.compressed, length, np.uint64(0))


def _segments_standard(np, t: tuple, coff, csize):
    """One segment per entry: (kind, length, host, csize, first of its cluster)."""
    _e, _bm, off, comp, normal, _unalloc, zero_alloc, zero_plain, _b = t
    count = off.shape[0]
    kind = np.full(count, KIND_UNALLOC, np.uint8)
    kind[comp] = KIND_COMPRESSED
    kind[zero_plain] = KIND_ZERO
    kind[zero_alloc] = KIND_ZERO_ALLOC
    kind[normal] = KIND_DATA
    host = np.where(normal | zero_alloc, off, np.where(comp, coff, np.uint64(0)))
    return kind, np.ones(count, np.uint32), host, csize, np.ones(count, bool)


def _segments_extended(np, t: tuple, coff, csize, unit: int):
    """Extended entries: one segment per entry when the whole cluster is one
    kind, else one per subcluster (same tuple as _segments_standard)."""
    U = np.uint64
    _e, bm, off, comp, normal, unalloc, _zero_alloc, _zero_plain, _b = t
    count = off.shape[0]
    lo, hi = _bitmap_halves(np, bm)
    full = U(L2_BITMAP_ALLOC_MASK)
    kind = np.full(count, KIND_UNALLOC, np.uint8)
    kind[comp] = KIND_COMPRESSED
    # normal: all zero / all allocated / none -> one kind for the cluster
    kind[normal & (hi == full)] = KIND_ZERO_ALLOC
    kind[normal & (hi == 0) & (lo == full)] = KIND_DATA
    kind[normal & (hi == 0) & (lo == 0)] = KIND_UNALLOC_ALLOC
    mixed = normal & ~((hi == full) | ((hi == 0) & ((lo == full) | (lo == 0))))
    kind[unalloc & (hi == full)] = KIND_ZERO
    mixed |= unalloc & (hi != 0) & (hi != full)
    # Segments: one per uniform entry, SUBCLUSTERS per mixed one.
    reps = np.where(mixed, SUBCLUSTERS_PER_CLUSTER, 1)
    ent = np.repeat(np.arange(count), reps)
    sc = (np.arange(ent.shape[0]) - np.repeat(np.cumsum(reps) - reps, reps)).astype(U)
    e_mixed = mixed[ent]
    abit = ((bm[ent] >> sc) & U(1)) != 0
    zbit = ((bm[ent] >> (sc + U(L2_BITMAP_ZERO_SHIFT))) & U(1)) != 0
    e_normal = normal[ent]
    mixed_kind = np.where(
        e_normal,
        np.where(zbit, KIND_ZERO_ALLOC, np.where(abit, KIND_DATA, KIND_UNALLOC_ALLOC)),
        np.where(zbit, KIND_ZERO, KIND_UNALLOC)).astype(np.uint8)
    seg_kind = np.where(e_mixed, mixed_kind, kind[ent])
    seg_len = np.where(e_mixed, 1, SUBCLUSTERS_PER_CLUSTER).astype(np.uint32)
    seg_host = np.where(e_normal, off[ent] + sc * U(unit),
                        np.where(comp[ent], coff[ent], U(0)))
    return seg_kind, seg_len, seg_host, csize[ent], sc == 0


def _merge_runs(np, segments, unit: int, total: int):
    """Merge neighbouring segments into runs, as the native emitter does:
    hosted kinds while contiguous, UNALLOC and ZERO while adjacent, and every
    compressed cluster on its own."""
    U = np.uint64
    seg_kind, seg_len, seg_host, seg_csize, seg_first = segments
    nseg = seg_kind.shape[0]
    k1 = seg_kind[1:]
    hosted = (k1 == KIND_DATA) | (k1 == KIND_ZERO_ALLOC) | (k1 == KIND_UNALLOC_ALLOC)
    contiguous = seg_host[1:] == seg_host[:-1] + seg_len[:-1].astype(U) * U(unit)
    brk = np.empty(nseg, bool)
    brk[0] = True
    brk[1:] = ((k1 != seg_kind[:-1]) | ((k1 == KIND_COMPRESSED) & seg_first[1:])
               | (hosted & ~contiguous))
    seg_start = np.cumsum(seg_len, dtype=np.int64) - seg_len
    first_seg = np.flatnonzero(brk)
    starts = seg_start[first_seg]
    lens = np.diff(np.append(starts, total))
    cols = (seg_kind[first_seg], starts, lens, seg_host[first_seg], seg_csize[first_seg])
    return tuple(map(_run_array, RUN_TYPECODES, cols))


def _run_array(typecode: str, col):
    """A numpy column as the array.array both implementations return."""
    a = array.array(typecode)
    a.frombytes(col.astype(f"={typecode}").tobytes())
    return a


def l2_runs(table, first, count, *, cluster_bits, extended, data_file=False,
            strict=False, table_offset=0):
    """Decode entries [first, first + count) of an L2 table into runs.

    Returns ``(kinds, starts, lens, hosts, csizes)``, ``array.array`` objects of
    typecodes B, I, I, Q, I (uint8, uint32, uint32, uint64, uint32: see
    RUN_TYPECODES), one element per run.  (Not numpy arrays: the native reader
    never imports numpy, which costs a CLI process ~0.1 s.)  The unit is a
    subcluster for extended L2 entries, else a cluster; ``starts`` count units
    from ``first``.  Raises CorruptImageError (what="L2 entry") for the first
    bad entry.
    """
    mv, esize, first, count, cluster_bits = check_l2_args(
        table, first, count, cluster_bits, extended)
    extended = bool(extended)
    if count == 0:
        return empty_runs()
    np = numpy()
    words = np.frombuffer(mv, dtype=">u8", count=count * (esize // L2E_SIZE),
                          offset=first * esize).astype(np.uint64)
    e, bm = (words[0::2], words[1::2]) if extended else (words, None)
    t = _classify(e, bm, extended, data_file)
    _check_entries(np, t, mv, first, cluster_bits=cluster_bits, extended=extended,
                   strict=strict, table_offset=table_offset)
    coff, csize = _compressed_fields(np, t, cluster_bits)
    if extended:
        unit = (1 << cluster_bits) // SUBCLUSTERS_PER_CLUSTER
        segments = _segments_extended(np, t, coff, csize, unit)
        return _merge_runs(np, segments, unit, count * SUBCLUSTERS_PER_CLUSTER)
    segments = _segments_standard(np, t, coff, csize)
    return _merge_runs(np, segments, 1 << cluster_bits, count)


# --------------------------------------------------------------------------
# Decompression

_zstd_cffi = None


def _zstd_lowlevel():
    """(ffi, lib) of python-zstandard's cffi backend, or None.

    With it the twin runs the very loop of the native kernel (and QEMU), so
    results match on any input; without it a frame-by-frame emulation on the
    public API is used (same on valid data, best effort on garbage).
    """
    global _zstd_cffi
    if _zstd_cffi is None:
        try:
            from zstandard._cffi import ffi, lib  # type: ignore[import-not-found]
            _zstd_cffi = (ffi, lib)
        except ImportError:
            _zstd_cffi = False
    return _zstd_cffi or None


def check_ranges(n, smv, dmv, so, sl, do, cluster_size):
    """(code, index) of the first out-of-range cluster, or (OK, 0): the range
    check qcow2n_decompress() makes before it decodes anything."""
    src_size, dest_size = len(smv), len(dmv)
    so = so.tolist()
    sl = sl.tolist()
    do = do.tolist() if do is not None else None
    for i in range(n):
        if so[i] > src_size or sl[i] > src_size - so[i]:
            return ESRCRANGE, i
        d = do[i] if do is not None else i * cluster_size
        if d > dest_size or cluster_size > dest_size - d:
            return EDSTRANGE, i
    return OK, 0


class Decompressor(DecompressorBase):
    __doc__ = DecompressorBase.__doc__

    def __init__(self, algo, cluster_size, *, strict=False):
        super().__init__(algo, cluster_size, strict=strict)
        self._dctx = None
        self._use_cffi = False
        if self.algo == ALGO_ZSTD:
            low = _zstd_lowlevel()
            if low is not None:
                ffi, lib = low
                dctx = lib.ZSTD_createDCtx()
                if dctx == ffi.NULL:
                    raise MemoryError("cannot allocate a zstd context")
                self._dctx = ffi.gc(dctx, lib.ZSTD_freeDCtx)
                self._in = ffi.new("ZSTD_inBuffer *")
                self._out = ffi.new("ZSTD_outBuffer *")
                self._use_cffi = True
            else:
                import zstandard
                self._zd = zstandard.ZstdDecompressor()
                self._zstd_error = zstandard.ZstdError

    def _decompress_batch(self, dmv, smv, so, sl, do, n):
        code, index = check_ranges(n, smv, dmv, so, sl, do, self.cluster_size)
        if code != OK:
            return code, index
        with self._guard:
            if self.algo == ALGO_ZLIB:
                return self._zlib(dmv, smv, so, sl, do, n)
            if self._use_cffi:
                return self._zstd_cffi(dmv, smv, so, sl, do, n)
            return self._zstd_public(dmv, smv, so, sl, do, n)

    def _slots(self, so, sl, do, n):
        """Offsets and lengths as lists, destination offsets as a sequence."""
        cs = self.cluster_size
        return so.tolist(), sl.tolist(), do.tolist() if do is not None else range(0, n * cs, cs)

    def _zlib(self, dmv, smv, so, sl, do, n):
        cs = self.cluster_size
        so, sl, do = self._slots(so, sl, do, n)
        for i in range(n):
            # A 32 KiB window where QEMU asks for 4 KiB: QEMU inflates a
            # whole cluster in one call, so back-references may reach any
            # byte already produced; zlib.decompressobj() works in chunks and
            # would refuse those beyond its window.  Same results otherwise.
            d = zlib.decompressobj(-15)
            try:
                out = d.decompress(smv[so[i]:so[i] + sl[i]], cs)
            except zlib.error:
                return EDATA, i
            if len(out) != cs:
                return ESHORT, i
            dmv[do[i]:do[i] + cs] = out
        return OK, 0

    def _zstd_cffi(self, dmv, smv, so, sl, do, n):
        ffi, lib = _zstd_lowlevel()
        so, sl, do = self._slots(so, sl, do, n)
        # Released on the way out (see native.l2_runs: live buffer exports in
        # a garbage cycle crash CPython's collector).
        with ffi.from_buffer(smv) as sp, ffi.from_buffer(dmv, require_writable=True) as dp:
            return self._zstd_loop(ffi, lib, sp, dp, so, sl, do, n)

    def _zstd_loop(self, ffi, lib, sp, dp, so, sl, do, n):
        cs = self.cluster_size
        inb, outb, dctx = self._in, self._out, self._dctx
        for i in range(n):
            lib.ZSTD_DCtx_reset(dctx, lib.ZSTD_reset_session_only)
            inb.src, inb.size, inb.pos = sp + so[i], sl[i], 0
            outb.dst, outb.size, outb.pos = dp + do[i], cs, 0
            zret = 0
            while outb.pos < cs:
                last_in, last_out = inb.pos, outb.pos
                zret = lib.ZSTD_decompressStream(dctx, outb, inb)
                if lib.ZSTD_isError(zret):
                    if lib.ZSTD_getErrorCode(zret) == lib.ZSTD_error_memory_allocation:
                        return ENOMEM, i
                    return EDATA, i
                if inb.pos <= last_in and outb.pos <= last_out:
                    return ESHORT, i
            if zret != 0:
                return ELONG, i
        return OK, 0

    def _zstd_public(self, dmv, smv, so, sl, do, n):
        """The zstd loop on python-zstandard's public API.

        Frame by frame, input fed 256 bytes at a time, so that a hostile frame
        never expands to more than a bounded amount past the cluster.  Equal
        to the native kernel on valid data; on corrupt data the kind of error
        may differ.
        """
        cs = self.cluster_size
        so, sl, do = self._slots(so, sl, do, n)
        for i in range(n):
            code = self._zstd_frames(smv[so[i]:so[i] + sl[i]], dmv[do[i]:do[i] + cs])
            if code != OK:
                return code, i
        return OK, 0

    def _zstd_frames(self, data, out):
        """Decode zstd frames from ``data`` until ``out`` (one cluster) is full."""
        cs = len(out)
        produced = pos = 0
        while produced < cs:
            if pos >= len(data):
                return ESHORT                 # no frame left to start
            dobj = self._zd.decompressobj(write_size=cs)
            while True:
                piece = data[pos:pos + 256]
                if not piece:
                    # Input used up inside a frame.
                    return ESHORT if produced < cs else ELONG
                try:
                    chunk = dobj.decompress(piece)
                except self._zstd_error:
                    return EDATA if produced < cs else ELONG
                if produced + len(chunk) > cs:
                    return ELONG
                out[produced:produced + len(chunk)] = chunk
                produced += len(chunk)
                if dobj.eof:
                    pos += len(piece) - len(dobj.unused_data)
                    break
                pos += len(piece)
        return OK


# --------------------------------------------------------------------------
# Compression

class Compressor(CompressorBase):
    __doc__ = CompressorBase.__doc__

    def __init__(self, algo, cluster_size, level=None, *, strict=False):
        super().__init__(algo, cluster_size, level, strict=strict)
        if self.algo == ALGO_ZSTD:
            import zstandard
            self._zc = zstandard.ZstdCompressor(level=self.level)

    def _compress(self, mv):
        if self.algo == ALGO_ZLIB:
            c = zlib.compressobj(self.level, zlib.DEFLATED, -12, 9,
                                 zlib.Z_DEFAULT_STRATEGY)
            out = c.compress(mv) + c.flush()
            # QEMU gives deflate(Z_FINISH) cluster_size - 1 bytes of room;
            # zlib reports Z_STREAM_END only with a byte to spare (an exactly
            # full buffer returns Z_OK), so a stream of cluster_size - 1
            # bytes is refused there too.
            limit = self.cluster_size - 2
        else:
            out = self._zc.compress(mv)
            limit = self.cluster_size - 1
        return out if len(out) <= limit else None

    def _compress_one(self, mv):
        with self._guard:
            return self._compress(mv)

    def _compress_clusters(self, mv, n):
        cs = self.cluster_size
        with self._guard:
            return [self._compress(mv[i * cs:(i + 1) * cs]) for i in range(n)]


# --------------------------------------------------------------------------
# Zero detection

def zero_blocks(buf, block_size):
    """Flags, one per block of ``buf``: True where block i is all zeros.

    The last block may be partial.  The result is a read-only memoryview of
    format "?" (``.tolist()`` gives bools, ``.tobytes()`` 0/1 bytes for
    ``bytes.find``), the same type from both implementations.
    """
    mv = byte_view(buf, what="buf")
    bs = check_block_size(block_size)
    np = numpy()
    a = np.frombuffer(mv, np.uint8)
    size = a.shape[0]
    nfull = size // bs
    out = np.empty(nfull + (size % bs != 0), bool)
    if nfull:
        full = a[:nfull * bs]
        if bs % 8 == 0:
            full = full.view(np.uint64)
        out[:nfull] = ~full.reshape(nfull, -1).any(axis=1)
    if size % bs:
        out[nfull] = not a[nfull * bs:].any()
    return memoryview(out.tobytes()).cast("?")


def is_zero(buf) -> bool:
    """True when every byte of ``buf`` is zero (an empty buffer is)."""
    mv = byte_view(buf, what="buf")
    if not len(mv):
        return True
    np = numpy()
    a = np.frombuffer(mv, np.uint8)
    if a.shape[0] % 8 == 0:
        a = a.view(np.uint64)
    return not a.any()


# --------------------------------------------------------------------------
# Sector ciphers: the arithmetic around AES (XTS masks, CBC chaining)

def _xts_masks(np, tweaks, n: int, blocks: int):
    """Two (n, blocks) uint64 planes, the low and high halves of T_s * alpha^j for
    block j of sector s, T_s the s-th little-endian 128-bit tweak.  Columns go by 32:
    column k of a group is the group's first one shifted left by k bits, the k bits
    shifted out of the top folding back in as x^128 = x^7 + x^2 + x + 1 (no further
    overflow for k <= 32); column 32 starts the next group."""
    t = np.frombuffer(tweaks, dtype="<u8").reshape(n, 2)
    mlo, mhi = np.empty((n, blocks), np.uint64), np.empty((n, blocks), np.uint64)
    lo, hi = t[:, :1].astype(np.uint64), t[:, 1:].astype(np.uint64)
    k = np.arange(33, dtype=np.uint64)[None, :]
    right = np.uint64(63) - k                   # x >> (64 - k) as x >> (63 - k) >> 1
    one = np.uint64(1)
    for g in range(0, blocks, 32):
        m = min(32, blocks - g)
        carry = (hi >> right) >> one
        slo = lo << k
        slo ^= carry
        for bit in (1, 2, 7):
            slo ^= carry << np.uint64(bit)
        shi = hi << k
        shi |= (lo >> right) >> one
        mlo[:, g:g + m], mhi[:, g:g + m] = slo[:, :m], shi[:, :m]
        lo, hi = slo[:, 32:], shi[:, 32:]
    return mlo, mhi


_last_masks = local()


def xts_xor(dest, src, tweaks, sector_size=SECTOR):
    """XTS masking: block j of sector s of ``src`` XOR T_s * alpha^j into ``dest``
    (may be ``src``); T_s the s-th 16 bytes of ``tweaks`` (see native/xts.h).  The
    masks of the last ``bytes`` tweaks are kept (per thread) for the second call of
    the usual mask / cipher / mask sequence."""
    dmv = byte_view(dest, writable=True, what="dest")
    smv, tmv = byte_view(src, what="src"), byte_view(tweaks, what="tweaks")
    ss, n = check_sectors(sector_size, (smv, "src"), (dmv, "dest"),
                          per_sector=((tmv, "tweaks"),))
    if not n:
        return
    np = numpy()
    last = getattr(_last_masks, "entry", None)
    if last is not None and last[0] is tweaks and last[1] == ss:
        mlo, mhi = last[2]
    else:
        mlo, mhi = _xts_masks(np, tmv, n, ss // 16)
        # bytes cannot change: the same object has the same masks
        _last_masks.entry = (tweaks, ss, (mlo, mhi)) if type(tweaks) is bytes else None
    shape = (n, ss // 16, 2)
    d = np.frombuffer(dmv, dtype=np.uint64).reshape(shape)
    s = np.frombuffer(smv, dtype=np.uint64).reshape(shape)
    np.bitwise_xor(s[:, :, 0], mlo, out=d[:, :, 0])
    np.bitwise_xor(s[:, :, 1], mhi, out=d[:, :, 1])


def cbc_unchain(dest, plain, cipher, ivs, sector_size=SECTOR):
    """CBC decryption after ECB: ``dest`` = ``plain`` XOR the previous ciphertext block
    (the sector's IV for its first block); ``dest`` may be ``cipher``."""
    dmv = byte_view(dest, writable=True, what="dest")
    pmv, cmv = byte_view(plain, what="plain"), byte_view(cipher, what="cipher")
    imv = byte_view(ivs, what="ivs")
    ss, n = check_sectors(sector_size, (dmv, "dest"), (pmv, "plain"), (cmv, "cipher"),
                          per_sector=((imv, "ivs"),))
    if not n:
        return
    np = numpy()
    shape = (n, ss // 16, 2)
    out = np.frombuffer(pmv, dtype=np.uint64).reshape(shape).copy()
    out[:, 1:] ^= np.frombuffer(cmv, dtype=np.uint64).reshape(shape)[:, :-1]
    out[:, 0] ^= np.frombuffer(imv, dtype=np.uint64).reshape(n, 2)
    np.frombuffer(dmv, dtype=np.uint64).reshape(shape)[...] = out


def cbc_lane(data, lane, ivs, sector_size, j):
    """Step ``j`` of CBC encryption across sectors: store the lane as block j-1 of
    every sector (j > 0), then load it with block j XOR its chaining value (j < blocks
    per sector); see native/xts.h."""
    dmv, lmv, imv, ss, n, j, blocks = check_lane(data, lane, ivs, sector_size, j)
    if not n:
        return
    np = numpy()
    d = np.frombuffer(dmv, dtype=np.uint64).reshape(n, blocks, 2)
    v = np.frombuffer(lmv, dtype=np.uint64).reshape(n, 2)
    if j > 0:
        d[:, j - 1] = v
    if j < blocks:
        prev = d[:, j - 1] if j > 0 else np.frombuffer(imv, dtype=np.uint64).reshape(n, 2)
        np.bitwise_xor(d[:, j], prev, out=v)


def sector_ivs(dest, first, mask):
    """The plain IVs of len(dest) / 16 sectors from ``first``: (first + i) & mask as
    little-endian 128-bit numbers (see native/xts.h)."""
    dmv, first, mask = check_ivs(dest, first, mask)
    n = len(dmv) // 16
    if not n:
        return
    np = numpy()
    iv = np.frombuffer(dmv, dtype="<u8").reshape(n, 2)
    np.bitwise_and(np.arange(first, first + n, dtype=np.uint64), np.uint64(mask),
                   out=iv[:, 0])
    iv[:, 1] = 0
