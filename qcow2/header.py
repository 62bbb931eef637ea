"""The qcow2 header and its extensions: parse and validate.

Every check QEMU's ``qcow2_do_open`` makes before it trusts a field is made here,
before the field is used, with the same meaning; messages name the offset of the
offending field.  Nothing here allocates memory proportional to an untrusted field:
the header lives in the first cluster (at most 2 MiB), and table sizes are checked
against QEMU's caps and against the file size before anything reads them.
"""

from __future__ import annotations

import struct

from . import constants as C
from .errors import CorruptImageError, NotQcow2Error, UnsupportedFeatureError

_V2 = struct.Struct(">4sIQIIQIIQQIIQ")      # 72 bytes
_V3 = struct.Struct(">QQQII")               # 72..104
_EXT = struct.Struct(">II")
_FEATURE = struct.Struct(">BB46s")


def _corrupt(msg: str, offset: int | None, size: int | None = None, what: str = "header"):
    return CorruptImageError(msg if offset is None else f"{msg} (at offset {offset:#x})",
                             offset=offset, size=size, what=what)


class Extension:
    """An unknown header extension, kept to be written back as it was."""
    __slots__ = ("magic", "offset", "data")

    def __init__(self, magic: int, offset: int, data: bytes):
        self.magic = magic
        self.offset = offset        # offset of the extension's data in the file
        self.data = data


class Header:
    """The header fields, plus what the extensions and the backing file name say.

    A plain class rather than a dataclass: importing ``dataclasses`` costs ~10 ms of
    start-up, a tenth of what ``qcow2 info`` may take in all.
    """

    def __init__(self, version: int, backing_file_offset: int, backing_file_size: int,
                 cluster_bits: int, size: int, header_size_field: int, crypt_method: int,
                 l1_size: int, l1_table_offset: int, refcount_table_offset: int,
                 refcount_table_clusters: int, nb_snapshots: int, snapshots_offset: int, *,
                 incompatible_features: int = 0, compatible_features: int = 0,
                 autoclear_features: int = 0, refcount_order: int = 4,
                 header_length: int = C.V2_HEADER_LENGTH,
                 compression_type: int = C.COMPRESSION_ZLIB,
                 backing_file: str | None = None, backing_format: str | None = None,
                 data_file: str | None = None,
                 feature_table: list[tuple[int, int, str]] | None = None,
                 bitmaps_ext: tuple[int, int, int] | None = None,
                 crypto_header: tuple[int, int] | None = None,
                 unknown_extensions: list[Extension] | None = None):
        self.version = version
        self.backing_file_offset = backing_file_offset
        self.backing_file_size = backing_file_size
        self.cluster_bits = cluster_bits
        self.size = size                          # virtual size as QEMU uses it (x 512)
        self.header_size_field = header_size_field  # the raw "size" field
        self.crypt_method = crypt_method
        self.l1_size = l1_size
        self.l1_table_offset = l1_table_offset
        self.refcount_table_offset = refcount_table_offset
        self.refcount_table_clusters = refcount_table_clusters
        self.nb_snapshots = nb_snapshots
        self.snapshots_offset = snapshots_offset
        self.incompatible_features = incompatible_features
        self.compatible_features = compatible_features
        self.autoclear_features = autoclear_features
        self.refcount_order = refcount_order
        self.header_length = header_length
        self.compression_type = compression_type
        self.backing_file = backing_file
        self.backing_format = backing_format
        self.data_file = data_file
        self.feature_table = feature_table if feature_table is not None else []
        self.bitmaps_ext = bitmaps_ext          # (nb_bitmaps, dir_size, dir_offset)
        self.bitmaps_ext_offset: int | None = None   # file offset of its nb_bitmaps field
        self.crypto_header = crypto_header      # (offset, length)
        self.unknown_extensions = unknown_extensions if unknown_extensions is not None else []

    def __repr__(self) -> str:
        return f"Header(version={self.version}, cluster_bits={self.cluster_bits}, size={self.size})"

    # -- derived ---------------------------------------------------------
    @property
    def cluster_size(self) -> int:
        return 1 << self.cluster_bits

    @property
    def extended_l2(self) -> bool:
        return bool(self.incompatible_features & C.INCOMPAT_EXTL2)

    @property
    def l2_entry_size(self) -> int:
        return 16 if self.extended_l2 else 8

    @property
    def l2_bits(self) -> int:
        return self.cluster_bits - (4 if self.extended_l2 else 3)

    @property
    def subclusters_per_cluster(self) -> int:
        return C.SUBCLUSTERS_PER_CLUSTER if self.extended_l2 else 1

    @property
    def refcount_bits(self) -> int:
        return 1 << self.refcount_order

    @property
    def dirty(self) -> bool:
        return bool(self.incompatible_features & C.INCOMPAT_DIRTY)

    @property
    def corrupt(self) -> bool:
        return bool(self.incompatible_features & C.INCOMPAT_CORRUPT)

    @property
    def has_data_file(self) -> bool:
        return bool(self.incompatible_features & C.INCOMPAT_DATA_FILE)

    @property
    def data_file_raw(self) -> bool:
        return bool(self.autoclear_features & C.AUTOCLEAR_DATA_FILE_RAW)

    @property
    def lazy_refcounts(self) -> bool:
        return bool(self.compatible_features & C.COMPAT_LAZY_REFCOUNTS)

    @property
    def bitmaps_consistent(self) -> bool:
        return bool(self.autoclear_features & C.AUTOCLEAR_BITMAPS)

    def l1_entries_needed(self, size: int | None = None) -> int:
        """Number of L1 entries needed to map ``size`` bytes (QEMU's size_to_l1)."""
        if size is None:
            size = self.size
        shift = self.cluster_bits + self.l2_bits
        return (size + (1 << shift) - 1) >> shift

    # -- parsing ---------------------------------------------------------
    @classmethod
    def parse(cls, read, file_size: int) -> "Header":
        """Parse and validate the header.

        ``read(n, offset) -> bytes`` reads the image file (short at EOF).
        """
        head = read(C.V3_MIN_HEADER_LENGTH, 0)
        if len(head) < 4 or head[:4] != C.MAGIC:
            raise NotQcow2Error("Image is not in qcow2 format (bad magic)")
        if len(head) < C.V2_HEADER_LENGTH:
            raise _corrupt(f"header truncated: file is {file_size} bytes, "
                           f"the version 2 header needs {C.V2_HEADER_LENGTH}", 0,
                           C.V2_HEADER_LENGTH)
        (_magic, version, backing_file_offset, backing_file_size, cluster_bits, size,
         crypt_method, l1_size, l1_table_offset, refcount_table_offset,
         refcount_table_clusters, nb_snapshots, snapshots_offset) = _V2.unpack_from(head, 0)

        if version not in (2, 3):
            raise UnsupportedFeatureError(f"Unsupported qcow2 version {version} (at offset 0x4)",
                                          feature=f"version {version}")
        if not C.MIN_CLUSTER_BITS <= cluster_bits <= C.MAX_CLUSTER_BITS:
            raise _corrupt(f"Unsupported cluster size: 2^{cluster_bits}", 0x14, 4)
        cluster_size = 1 << cluster_bits

        h = cls(version=version, backing_file_offset=backing_file_offset,
                backing_file_size=backing_file_size, cluster_bits=cluster_bits,
                size=(size // 512) * 512, header_size_field=size, crypt_method=crypt_method,
                l1_size=l1_size, l1_table_offset=l1_table_offset,
                refcount_table_offset=refcount_table_offset,
                refcount_table_clusters=refcount_table_clusters,
                nb_snapshots=nb_snapshots, snapshots_offset=snapshots_offset)

        if version == 3:
            if len(head) < C.V3_MIN_HEADER_LENGTH:
                raise _corrupt("qcow2 header too short: the file ends inside the version 3 header",
                               C.V2_HEADER_LENGTH, C.V3_MIN_HEADER_LENGTH - C.V2_HEADER_LENGTH)
            (h.incompatible_features, h.compatible_features, h.autoclear_features,
             h.refcount_order, h.header_length) = _V3.unpack_from(head, C.V2_HEADER_LENGTH)
            if h.header_length < C.V3_MIN_HEADER_LENGTH:
                raise _corrupt(f"qcow2 header too short: header_length {h.header_length}", 0x64, 4)
        if h.header_length > cluster_size:
            raise _corrupt(f"qcow2 header exceeds cluster size: header_length {h.header_length}",
                           0x64, 4)
        if h.backing_file_offset > cluster_size:
            raise _corrupt(f"Invalid backing file offset {h.backing_file_offset:#x}", 0x8, 8)

        # The first cluster holds the header, its extensions and the backing file
        # name: read it once (bounded by the 2 MiB maximum cluster size).
        first = read(cluster_size, 0)
        if len(first) < h.header_length:
            raise _corrupt(f"header truncated: header_length {h.header_length} but the file "
                           f"has {len(first)} bytes", 0, h.header_length)
        first = first + bytes(cluster_size - len(first))  # QEMU reads zeros past EOF

        if h.header_length > C.HEADER_COMPRESSION_TYPE_OFFSET:
            h.compression_type = first[C.HEADER_COMPRESSION_TYPE_OFFSET]
        cls._validate_compression(h)

        ext_end = h.backing_file_offset if h.backing_file_offset else cluster_size
        unknown = h.incompatible_features & ~C.INCOMPAT_MASK
        if unknown:
            # Only to name the features: errors in the extension area are not the
            # news here (QEMU ignores them in this pass too).
            try:
                h._read_extensions(first, ext_end, only_feature_table=True)
            except CorruptImageError:
                pass
            names = []
            for ftype, bit, name in h.feature_table:
                if ftype == 0 and unknown & (1 << bit):
                    names.append(name)
                    unknown &= ~(1 << bit)
            if unknown:
                names.append(f"Unknown incompatible feature: {unknown:x}")
            raise UnsupportedFeatureError("Unsupported qcow2 feature(s): " + ", ".join(names),
                                          feature="incompatible features")

        if cluster_size // h.subclusters_per_cluster < 512:
            raise _corrupt(f"Unsupported subcluster size: {cluster_size // h.subclusters_per_cluster}",
                           0x48, 8)
        if h.refcount_order > 6:
            raise _corrupt(f"Reference count entry width too large; may not exceed 64 bits "
                           f"(refcount_order {h.refcount_order})", 0x60, 4)
        if h.crypt_method not in (C.CRYPT_NONE, C.CRYPT_AES, C.CRYPT_LUKS):
            raise UnsupportedFeatureError(f"Unsupported encryption method {h.crypt_method}",
                                          feature="encryption")
        if h.refcount_table_clusters == 0:
            raise _corrupt("Image does not contain a reference count table", 0x38, 4)
        h._validate_table(h.refcount_table_offset, h.refcount_table_clusters, cluster_size,
                          C.MAX_REFTABLE_SIZE, "Reference count table", 0x30)
        if h.nb_snapshots > C.MAX_SNAPSHOTS:
            raise _corrupt(f"Snapshot table too large: {h.nb_snapshots} snapshots", 0x3C, 4)
        h._validate_table(h.snapshots_offset, h.nb_snapshots, C.SNAPSHOT_HEADER_SIZE,
                          C.SNAPSHOT_HEADER_SIZE * C.MAX_SNAPSHOTS, "Snapshot table", 0x40)
        h._validate_table(h.l1_table_offset, h.l1_size, C.L1E_SIZE, C.MAX_L1_SIZE,
                          "Active L1 table", 0x28)
        needed = h.l1_entries_needed()
        if needed > 0x7FFFFFFF:
            raise _corrupt(f"Image is too big: virtual size {h.header_size_field}", 0x18, 8)
        if h.l1_size < needed:
            raise _corrupt(f"L1 table is too small: {h.l1_size} entries, the virtual size "
                           f"{h.size} needs {needed}", 0x24, 4)

        h._read_extensions(first, ext_end, only_feature_table=False)

        if h.bitmaps_ext is not None and h.bitmaps_ext[2] + h.bitmaps_ext[1] > file_size:
            _nb, dsize, doff = h.bitmaps_ext
            raise _corrupt(f"bitmaps_ext: bitmap directory at {doff:#x} ({dsize} bytes) "
                           f"extends past the end of the file (size {file_size:#x})",
                           h.bitmaps_ext_offset + 16, 8, "header extension")

        if h.has_data_file:
            if h.data_file is None:
                raise _corrupt("'data-file' is required for this image, but it names none "
                               "(no external data file name extension)", C.HEADER_INCOMPATIBLE_OFFSET, 8)
        elif h.data_file_raw:
            raise _corrupt("data-file-raw requires a data file", 0x58, 8)

        if h.crypt_method == C.CRYPT_LUKS and h.crypto_header is None:
            raise _corrupt("Missing CRYPTO header for crypt method 2", 0x20, 4)

        if h.backing_file_offset:
            n = h.backing_file_size
            if n > min(C.MAX_BACKING_FILE_NAME, cluster_size - h.backing_file_offset):
                raise _corrupt(f"Backing file name too long ({n} bytes)", 0x10, 4)
            raw = first[h.backing_file_offset:h.backing_file_offset + n]
            h.backing_file = _c_string(raw)
        return h

    @staticmethod
    def _validate_compression(h: "Header") -> None:
        if h.compression_type not in C.COMPRESSION_NAMES:
            raise UnsupportedFeatureError(
                f"qcow2: unknown compression type: {h.compression_type} (at offset 0x68)",
                feature="compression type")
        if h.compression_type == C.COMPRESSION_ZLIB:
            if h.incompatible_features & C.INCOMPAT_COMPRESSION:
                raise _corrupt("qcow2: Compression type incompatible feature bit must not be set",
                               C.HEADER_INCOMPATIBLE_OFFSET, 8)
        elif not h.incompatible_features & C.INCOMPAT_COMPRESSION:
            raise _corrupt("qcow2: Compression type incompatible feature bit must be set",
                           C.HEADER_INCOMPATIBLE_OFFSET, 8)

    def _validate_table(self, offset: int, entries: int, entry_len: int, max_bytes: int,
                        name: str, field_offset: int) -> None:
        """QEMU's qcow2_validate_table: size cap, alignment, no overflow."""
        if entries > max_bytes // entry_len:
            raise _corrupt(f"{name} too large: {entries} entries", field_offset, 8)
        if (0x7FFFFFFFFFFFFFFF - entries * entry_len < offset
                or offset & (self.cluster_size - 1)):
            raise _corrupt(f"{name} offset invalid: {offset:#x}", field_offset, 8)

    def _read_extensions(self, first: bytes, end: int, *, only_feature_table: bool) -> None:
        offset = self.header_length
        if not only_feature_table:
            self.unknown_extensions = []
        while offset < end:
            if offset + _EXT.size > len(first):
                break  # QEMU reads zeros past the buffer: an end marker
            magic, length = _EXT.unpack_from(first, offset)
            ext_hdr = offset
            offset += _EXT.size
            if offset > end or length > end - offset:
                raise _corrupt(f"Header extension too large: extension {magic:#010x} "
                               f"has length {length}", ext_hdr, _EXT.size, "header extension")
            data = first[offset:offset + length]
            if magic == C.EXT_END:
                return
            if only_feature_table:
                if magic == C.EXT_FEATURE_TABLE:
                    self.feature_table = [
                        (t, b, _c_string(n)) for t, b, n in
                        (_FEATURE.unpack_from(data, i)
                         for i in range(0, len(data) - _FEATURE.size + 1, _FEATURE.size))]
            elif magic == C.EXT_BACKING_FORMAT:
                if length >= 16:
                    raise _corrupt(f"ext_backing_format: len={length} too large (>=16)",
                                   ext_hdr, _EXT.size, "header extension")
                self.backing_format = _c_string(data)
            elif magic == C.EXT_FEATURE_TABLE:
                pass
            elif magic == C.EXT_CRYPTO_HEADER:
                if self.crypt_method != C.CRYPT_LUKS:
                    raise _corrupt("CRYPTO header extension only expected with LUKS encryption "
                                   "method", ext_hdr, _EXT.size, "header extension")
                if length != 16:
                    raise _corrupt(f"CRYPTO header extension size {length}, but expected size 16",
                                   ext_hdr, _EXT.size, "header extension")
                coff, clen = struct.unpack_from(">QQ", data)
                if coff % self.cluster_size:
                    raise _corrupt(f"Encryption header offset '{coff}' is not a multiple of "
                                   f"cluster size '{self.cluster_size}'", offset, 8,
                                   "header extension")
                self.crypto_header = (coff, clen)
            elif magic == C.EXT_BITMAPS:
                if length != C.BITMAP_EXT_SIZE:
                    raise _corrupt("bitmaps_ext: Invalid extension length", ext_hdr, _EXT.size,
                                   "header extension")
                if self.bitmaps_consistent:
                    nb, reserved, dsize, doff = struct.unpack_from(">IIQQ", data)
                    if reserved:
                        raise _corrupt("bitmaps_ext: Reserved field is not zero", offset + 4, 4,
                                       "header extension")
                    if nb > C.MAX_BITMAPS:
                        raise _corrupt(f"bitmaps_ext: Image has {nb} bitmaps, exceeding the "
                                       f"supported maximum of {C.MAX_BITMAPS}", offset, 4,
                                       "header extension")
                    if nb == 0:
                        raise _corrupt("found bitmaps extension with zero bitmaps", offset, 4,
                                       "header extension")
                    if doff & (self.cluster_size - 1):
                        raise _corrupt("bitmaps_ext: invalid bitmap directory offset",
                                       offset + 16, 8, "header extension")
                    if dsize > C.MAX_BITMAP_DIRECTORY_SIZE:
                        raise _corrupt(f"bitmaps_ext: bitmap directory size ({dsize}) exceeds "
                                       f"the maximum supported size "
                                       f"({C.MAX_BITMAP_DIRECTORY_SIZE})", offset + 8, 8,
                                       "header extension")
                    if dsize == 0:
                        raise _corrupt("bitmaps_ext: Requested bitmap directory size is zero",
                                       offset + 8, 8, "header extension")
                    self.bitmaps_ext = (nb, dsize, doff)
                    self.bitmaps_ext_offset = offset
            elif magic == C.EXT_DATA_FILE:
                self.data_file = _c_string(data)
            else:
                self.unknown_extensions.append(Extension(magic, offset, bytes(data)))
            offset += (length + 7) & ~7


def _c_string(raw: bytes) -> str:
    """Decode a name stored in the image: up to the first NUL, undecodable bytes kept."""
    nul = raw.find(b"\0")
    if nul >= 0:
        raw = raw[:nul]
    return raw.decode("utf-8", "surrogateescape")


# ---------------------------------------------------------------------------
# serialisation
# ---------------------------------------------------------------------------

# The feature name table QEMU writes into every version 3 image.
FEATURE_TABLE = (
    (0, 0, "dirty bit"), (0, 1, "corrupt bit"), (0, 2, "external data file"),
    (0, 3, "compression type"), (0, 4, "extended L2 entries"),
    (1, 0, "lazy refcounts"),
    (2, 0, "bitmaps"), (2, 1, "raw external data"),
)
V3_HEADER_LENGTH = 112   # 104 bytes of fields, compression_type, padding to 8


def _ext(magic: int, data: bytes) -> bytes:
    return _EXT.pack(magic, len(data)) + data + bytes((-len(data)) % 8)


def pack_header(h: Header) -> bytes:
    """Serialise ``h`` (header, extensions, backing file name) as QEMU lays it out.

    Sets ``h.header_length`` and ``h.backing_file_offset``/``backing_file_size``.
    The result must fit in the first cluster; ValueError otherwise.
    """
    if h.version == 2:
        h.header_length = C.V2_HEADER_LENGTH
    else:
        h.header_length = max(h.header_length, V3_HEADER_LENGTH)
    exts = b""
    if h.backing_format:
        exts += _ext(C.EXT_BACKING_FORMAT, h.backing_format.encode("utf-8", "surrogateescape"))
    if h.data_file is not None:
        exts += _ext(C.EXT_DATA_FILE, h.data_file.encode("utf-8", "surrogateescape"))
    if h.crypto_header is not None:
        exts += _ext(C.EXT_CRYPTO_HEADER, struct.pack(">QQ", *h.crypto_header))
    if h.version >= 3 and h.cluster_size > 4096:
        # QEMU leaves the feature name table out of images with clusters of 4 KiB or
        # less: it would leave no room for a backing file name in a 512-byte cluster.
        exts += _ext(C.EXT_FEATURE_TABLE, b"".join(
            _FEATURE.pack(t, b, n.encode()) for t, b, n in FEATURE_TABLE))
    if h.bitmaps_ext is not None and h.version >= 3:
        nb, dsize, doff = h.bitmaps_ext
        exts += _ext(C.EXT_BITMAPS, struct.pack(">IIQQ", nb, 0, dsize, doff))
    for e in h.unknown_extensions:
        exts += _ext(e.magic, e.data)
    exts += _EXT.pack(C.EXT_END, 0)

    backing = (h.backing_file or "").encode("utf-8", "surrogateescape")
    if len(backing) > C.MAX_BACKING_FILE_NAME:
        raise ValueError(f"backing file name too long ({len(backing)} bytes, at most "
                         f"{C.MAX_BACKING_FILE_NAME})")
    body_len = h.header_length + len(exts)
    if backing:
        h.backing_file_offset = body_len
        h.backing_file_size = len(backing)
    else:
        h.backing_file_offset = 0
        h.backing_file_size = 0
    out = bytearray(body_len + len(backing))
    _V2.pack_into(out, 0, C.MAGIC, h.version, h.backing_file_offset, h.backing_file_size,
                  h.cluster_bits, h.header_size_field, h.crypt_method, h.l1_size,
                  h.l1_table_offset, h.refcount_table_offset, h.refcount_table_clusters,
                  h.nb_snapshots, h.snapshots_offset)
    if h.version >= 3:
        _V3.pack_into(out, C.V2_HEADER_LENGTH, h.incompatible_features, h.compatible_features,
                      h.autoclear_features, h.refcount_order, h.header_length)
        if h.header_length > C.HEADER_COMPRESSION_TYPE_OFFSET:
            out[C.HEADER_COMPRESSION_TYPE_OFFSET] = h.compression_type
    out[h.header_length:body_len] = exts
    out[body_len:] = backing
    if len(out) > h.cluster_size:
        raise ValueError(f"header and extensions ({len(out)} bytes) do not fit in one "
                         f"cluster ({h.cluster_size} bytes)")
    return bytes(out)
