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
_CRYPTO_EXT = struct.Struct(">QQ")          # offset, length of the encryption header
_BITMAPS_EXT = struct.Struct(">IIQQ")       # nb_bitmaps, reserved, directory size, offset


def _corrupt(msg: str, offset: int | None, size: int | None = None, what: str = "header"):
    return CorruptImageError(msg if offset is None else f"{msg} (at offset {offset:#x})",
                             offset=offset, size=size, what=what)


def _flag(field: str, bit: int) -> property:
    """A feature bit of the header as a bool property."""
    return property(lambda self: bool(getattr(self, field) & bit))


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
    dirty = _flag("incompatible_features", C.INCOMPAT_DIRTY)
    corrupt = _flag("incompatible_features", C.INCOMPAT_CORRUPT)
    lazy_refcounts = _flag("compatible_features", C.COMPAT_LAZY_REFCOUNTS)
    data_file_raw = _flag("autoclear_features", C.AUTOCLEAR_DATA_FILE_RAW)
    bitmaps_consistent = _flag("autoclear_features", C.AUTOCLEAR_BITMAPS)

    # the two flags the writer reads for every cluster: plain properties, faster than _flag
    @property
    def extended_l2(self) -> bool:
        return bool(self.incompatible_features & C.INCOMPAT_EXTL2)

    @property
    def has_data_file(self) -> bool:
        return bool(self.incompatible_features & C.INCOMPAT_DATA_FILE)

    @property
    def cluster_size(self) -> int:
        return 1 << self.cluster_bits

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

        ``read(n, offset) -> bytes`` reads the image file (short at EOF).  The checks run
        in QEMU's order (qcow2_do_open), each before the field it guards is used.
        """
        h = cls._parse_fields(read(C.V3_MIN_HEADER_LENGTH, 0), file_size)
        # The first cluster holds the header, its extensions (up to the backing file
        # name, if any, else to the cluster's end) and the backing file name: read
        # what of it they can reach, once (at most the 2 MiB maximum cluster size).
        cluster_size = h.cluster_size
        ext_end = h.backing_file_offset if h.backing_file_offset else cluster_size
        reach = max(h.header_length, ext_end + _EXT.size,
                    h.backing_file_offset + h.backing_file_size)
        need = min(cluster_size, reach)
        first = read(need, 0)
        if len(first) < h.header_length:
            raise _corrupt(f"header truncated: header_length {h.header_length} but the file "
                           f"has {len(first)} bytes", 0, h.header_length)
        first = first + bytes(need - len(first))  # QEMU reads zeros past EOF
        if h.header_length > C.HDR_COMPRESSION_TYPE:
            h.compression_type = first[C.HDR_COMPRESSION_TYPE]
        h._validate_compression()
        h._refuse_unknown_features(first, ext_end)
        h._validate_geometry()
        h._read_extensions(first, ext_end, only_feature_table=False)
        h._validate_extensions(file_size)
        if h.backing_file_offset:
            n = h.backing_file_size
            if n > min(C.MAX_BACKING_FILE_NAME, cluster_size - h.backing_file_offset):
                raise _corrupt(f"Backing file name too long ({n} bytes)",
                               C.HDR_BACKING_FILE_SIZE, 4)
            h.backing_file = _c_string(first[h.backing_file_offset:h.backing_file_offset + n])
        return h

    @classmethod
    def _parse_fields(cls, head: bytes, file_size: int) -> "Header":
        """The fixed fields (version 2, then version 3), checked as far as they go
        without the rest of the first cluster."""
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
            raise UnsupportedFeatureError(f"Unsupported qcow2 version {version} "
                                          f"(at offset {C.HDR_VERSION:#x})",
                                          feature=f"version {version}")
        if not C.MIN_CLUSTER_BITS <= cluster_bits <= C.MAX_CLUSTER_BITS:
            raise _corrupt(f"Unsupported cluster size: 2^{cluster_bits}", C.HDR_CLUSTER_BITS, 4)
        h = cls(version=version, backing_file_offset=backing_file_offset,
                backing_file_size=backing_file_size, cluster_bits=cluster_bits,
                size=(size // 512) * 512, header_size_field=size, crypt_method=crypt_method,
                l1_size=l1_size, l1_table_offset=l1_table_offset,
                refcount_table_offset=refcount_table_offset,
                refcount_table_clusters=refcount_table_clusters,
                nb_snapshots=nb_snapshots, snapshots_offset=snapshots_offset)
        if version == 3:
            if len(head) < C.V3_MIN_HEADER_LENGTH:
                raise _corrupt("qcow2 header too short: the file ends inside the version 3 "
                               "header", C.V2_HEADER_LENGTH,
                               C.V3_MIN_HEADER_LENGTH - C.V2_HEADER_LENGTH)
            (h.incompatible_features, h.compatible_features, h.autoclear_features,
             h.refcount_order, h.header_length) = _V3.unpack_from(head, C.V2_HEADER_LENGTH)
            if h.header_length < C.V3_MIN_HEADER_LENGTH:
                raise _corrupt(f"qcow2 header too short: header_length {h.header_length}",
                               C.HDR_HEADER_LENGTH, 4)
        if h.header_length > h.cluster_size:
            raise _corrupt(f"qcow2 header exceeds cluster size: header_length {h.header_length}",
                           C.HDR_HEADER_LENGTH, 4)
        if h.backing_file_offset > h.cluster_size:
            raise _corrupt(f"Invalid backing file offset {h.backing_file_offset:#x}",
                           C.HDR_BACKING_FILE_OFFSET, 8)
        return h

    def _validate_compression(self) -> None:
        if self.compression_type not in C.COMPRESSION_NAMES:
            raise UnsupportedFeatureError(
                f"qcow2: unknown compression type: {self.compression_type} "
                f"(at offset {C.HDR_COMPRESSION_TYPE:#x})", feature="compression type")
        if self.compression_type == C.COMPRESSION_ZLIB:
            if self.incompatible_features & C.INCOMPAT_COMPRESSION:
                raise _corrupt("qcow2: Compression type incompatible feature bit must not be set",
                               C.HDR_INCOMPATIBLE_FEATURES, 8)
        elif not self.incompatible_features & C.INCOMPAT_COMPRESSION:
            raise _corrupt("qcow2: Compression type incompatible feature bit must be set",
                           C.HDR_INCOMPATIBLE_FEATURES, 8)

    def _refuse_unknown_features(self, first: bytes, ext_end: int) -> None:
        """Unknown incompatible features refuse the image, named from its feature table."""
        unknown = self.incompatible_features & ~C.INCOMPAT_MASK
        if not unknown:
            return
        # Only to name the features: errors in the extension area are not the news
        # here (QEMU ignores them in this pass too).
        try:
            self._read_extensions(first, ext_end, only_feature_table=True)
        except CorruptImageError:
            pass
        names = []
        for ftype, bit, name in self.feature_table:
            if ftype == 0 and unknown & (1 << bit):
                names.append(name)
                unknown &= ~(1 << bit)
        if unknown:
            names.append(f"Unknown incompatible feature: {unknown:x}")
        raise UnsupportedFeatureError("Unsupported qcow2 feature(s): " + ", ".join(names),
                                      feature="incompatible features")

    def _validate_geometry(self) -> None:
        """Subclusters, refcount width, encryption method and the tables' places and
        sizes (QEMU's caps), before any table is read."""
        cluster_size = self.cluster_size
        subcluster_size = cluster_size // self.subclusters_per_cluster
        if subcluster_size < 1 << C.MIN_CLUSTER_BITS:     # QEMU's rule, as for clusters
            raise _corrupt(f"Unsupported subcluster size: {subcluster_size}",
                           C.HDR_INCOMPATIBLE_FEATURES, 8)
        if self.refcount_order > 6:
            raise _corrupt(f"Reference count entry width too large; may not exceed 64 bits "
                           f"(refcount_order {self.refcount_order})", C.HDR_REFCOUNT_ORDER, 4)
        if self.crypt_method not in (C.CRYPT_NONE, C.CRYPT_AES, C.CRYPT_LUKS):
            raise UnsupportedFeatureError(f"Unsupported encryption method {self.crypt_method}",
                                          feature="encryption")
        if self.refcount_table_clusters == 0:
            raise _corrupt("Image does not contain a reference count table",
                           C.HDR_REFCOUNT_TABLE_CLUSTERS, 4)
        self.validate_table(self.refcount_table_offset, self.refcount_table_clusters,
                            cluster_size, C.MAX_REFTABLE_SIZE, "Reference count table",
                            C.HDR_REFCOUNT_TABLE_OFFSET)
        if self.nb_snapshots > C.MAX_SNAPSHOTS:
            raise _corrupt(f"Snapshot table too large: {self.nb_snapshots} snapshots",
                           C.HDR_NB_SNAPSHOTS, 4)
        self.validate_table(self.snapshots_offset, self.nb_snapshots, C.SNAPSHOT_HEADER_SIZE,
                            C.SNAPSHOT_HEADER_SIZE * C.MAX_SNAPSHOTS, "Snapshot table",
                            C.HDR_SNAPSHOTS_OFFSET)
        self.validate_table(self.l1_table_offset, self.l1_size, C.L1E_SIZE, C.MAX_L1_SIZE,
                            "Active L1 table", C.HDR_L1_TABLE_OFFSET)
        needed = self.l1_entries_needed()
        if needed > C.MAX_L1_ENTRIES:
            raise _corrupt(f"Image is too big: virtual size {self.header_size_field}",
                           C.HDR_SIZE, 8)
        if self.l1_size < needed:
            raise _corrupt(f"L1 table is too small: {self.l1_size} entries, the virtual size "
                           f"{self.size} needs {needed}", C.HDR_L1_SIZE, 4)

    def _validate_extensions(self, file_size: int) -> None:
        """What the extensions (or their absence) must agree with."""
        if self.bitmaps_ext is not None:
            _nb, dsize, doff = self.bitmaps_ext
            if doff + dsize > file_size:
                raise _corrupt(f"bitmaps_ext: bitmap directory at {doff:#x} ({dsize} bytes) "
                               f"extends past the end of the file (size {file_size:#x})",
                               self.bitmaps_ext_offset + C.BITMAPS_EXT_DIRECTORY_OFFSET, 8,
                               "header extension")
        if self.has_data_file:
            if self.data_file is None:
                raise _corrupt("'data-file' is required for this image, but it names none "
                               "(no external data file name extension)",
                               C.HDR_INCOMPATIBLE_FEATURES, 8)
        elif self.data_file_raw:
            raise _corrupt("data-file-raw requires a data file", C.HDR_AUTOCLEAR_FEATURES, 8)
        if self.crypt_method == C.CRYPT_LUKS and self.crypto_header is None:
            raise _corrupt("Missing CRYPTO header for crypt method 2", C.HDR_CRYPT_METHOD, 4)

    def validate_table(self, offset: int, entries: int, entry_len: int, max_bytes: int,
                       name: str, field_offset: int) -> None:
        """QEMU's qcow2_validate_table: size cap, alignment, no overflow.  Errors name
        ``field_offset`` (where the table's place is recorded)."""
        if entries > max_bytes // entry_len:
            raise _corrupt(f"{name} too large: {entries} entries", field_offset, 8)
        if (C.MAX_TABLE_END - entries * entry_len < offset
                or offset & (self.cluster_size - 1)):
            raise _corrupt(f"{name} offset invalid: {offset:#x}", field_offset, 8)

    def validate_snapshot_l1(self, sn) -> None:
        """The checks QEMU makes on a snapshot's L1 table before it is read (``sn`` a
        ``qcow2.snapshot.Snapshot``); errors name the snapshot's table entry."""
        self.validate_table(sn.l1_table_offset, sn.l1_size, C.L1E_SIZE, C.MAX_L1_SIZE,
                            f"Snapshot L1 table of snapshot {sn.id}", sn.entry_offset)

    # -- extensions ----------------------------------------------------------
    def _read_extensions(self, first: bytes, end: int, *, only_feature_table: bool) -> None:
        """Walk the extensions between the header and ``end``; with
        ``only_feature_table`` just read the feature name table."""
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
                    self.feature_table = _feature_table(data)
            elif magic in _KNOWN_EXTENSIONS:
                _KNOWN_EXTENSIONS[magic](self, data, ext_hdr)
            else:
                self.unknown_extensions.append(Extension(magic, offset, bytes(data)))
            offset += (length + 7) & ~7

    def _ext_backing_format(self, data: bytes, ext_hdr: int) -> None:
        if len(data) >= C.EXT_BACKING_FORMAT_MAX:
            raise _ext_corrupt(f"ext_backing_format: len={len(data)} too large "
                               f"(>={C.EXT_BACKING_FORMAT_MAX})", ext_hdr, _EXT.size)
        self.backing_format = _c_string(data)

    def _ext_feature_table(self, data: bytes, ext_hdr: int) -> None:
        pass            # read only to name unknown features (_refuse_unknown_features)

    def _ext_crypto_header(self, data: bytes, ext_hdr: int) -> None:
        if self.crypt_method != C.CRYPT_LUKS:
            raise _ext_corrupt("CRYPTO header extension only expected with LUKS encryption "
                               "method", ext_hdr, _EXT.size)
        if len(data) != C.EXT_CRYPTO_HEADER_SIZE:
            raise _ext_corrupt(f"CRYPTO header extension size {len(data)}, but expected size "
                               f"{C.EXT_CRYPTO_HEADER_SIZE}", ext_hdr, _EXT.size)
        coff, clen = _CRYPTO_EXT.unpack_from(data)
        if coff % self.cluster_size:
            raise _ext_corrupt(f"Encryption header offset '{coff}' is not a multiple of "
                               f"cluster size '{self.cluster_size}'", ext_hdr + _EXT.size, 8)
        self.crypto_header = (coff, clen)

    def _ext_bitmaps(self, data: bytes, ext_hdr: int) -> None:
        if len(data) != C.BITMAP_EXT_SIZE:
            raise _ext_corrupt("bitmaps_ext: Invalid extension length", ext_hdr, _EXT.size)
        if not self.bitmaps_consistent:
            return
        at = ext_hdr + _EXT.size
        nb, reserved, dsize, doff = _BITMAPS_EXT.unpack_from(data)
        if reserved:
            raise _ext_corrupt("bitmaps_ext: Reserved field is not zero",
                               at + C.BITMAPS_EXT_RESERVED, 4)
        if nb > C.MAX_BITMAPS:
            raise _ext_corrupt(f"bitmaps_ext: Image has {nb} bitmaps, exceeding the supported "
                               f"maximum of {C.MAX_BITMAPS}", at + C.BITMAPS_EXT_NB_BITMAPS, 4)
        if nb == 0:
            raise _ext_corrupt("found bitmaps extension with zero bitmaps",
                               at + C.BITMAPS_EXT_NB_BITMAPS, 4)
        if doff & (self.cluster_size - 1):
            raise _ext_corrupt("bitmaps_ext: invalid bitmap directory offset",
                               at + C.BITMAPS_EXT_DIRECTORY_OFFSET, 8)
        if dsize > C.MAX_BITMAP_DIRECTORY_SIZE:
            raise _ext_corrupt(f"bitmaps_ext: bitmap directory size ({dsize}) exceeds the "
                               f"maximum supported size ({C.MAX_BITMAP_DIRECTORY_SIZE})",
                               at + C.BITMAPS_EXT_DIRECTORY_SIZE, 8)
        if dsize == 0:
            raise _ext_corrupt("bitmaps_ext: Requested bitmap directory size is zero",
                               at + C.BITMAPS_EXT_DIRECTORY_SIZE, 8)
        self.bitmaps_ext = (nb, dsize, doff)
        self.bitmaps_ext_offset = at

    def _ext_data_file(self, data: bytes, ext_hdr: int) -> None:
        self.data_file = _c_string(data)


# the extensions the header knows: magic -> reader(header, data, offset of the extension)
_KNOWN_EXTENSIONS = {
    C.EXT_BACKING_FORMAT: Header._ext_backing_format,
    C.EXT_FEATURE_TABLE: Header._ext_feature_table,
    C.EXT_CRYPTO_HEADER: Header._ext_crypto_header,
    C.EXT_BITMAPS: Header._ext_bitmaps,
    C.EXT_DATA_FILE: Header._ext_data_file,
}


def _ext_corrupt(msg: str, offset: int, size: int) -> CorruptImageError:
    return _corrupt(msg, offset, size, "header extension")


def _feature_table(data: bytes) -> list[tuple[int, int, str]]:
    """The feature name table: (type, bit, name) per 48-byte entry (a short last entry
    read as zero-padded, as QEMU reads it)."""
    data = bytes(data) + bytes(-len(data) % _FEATURE.size)
    return [(t, b, _c_string(n)) for t, b, n in
            (_FEATURE.unpack_from(data, i)
             for i in range(0, len(data) - _FEATURE.size + 1, _FEATURE.size))]


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
        h.header_length = max(h.header_length, C.HEADER_STRUCT_SIZE)
    exts = b""
    if h.backing_format:
        exts += _ext(C.EXT_BACKING_FORMAT, h.backing_format.encode("utf-8", "surrogateescape"))
    if h.data_file is not None:
        exts += _ext(C.EXT_DATA_FILE, h.data_file.encode("utf-8", "surrogateescape"))
    if h.crypto_header is not None:
        exts += _ext(C.EXT_CRYPTO_HEADER, _CRYPTO_EXT.pack(*h.crypto_header))
    if h.version >= 3 and h.cluster_size > 4096:
        # QEMU leaves the feature name table out of images with clusters of 4 KiB or
        # less: it would leave no room for a backing file name in a 512-byte cluster.
        exts += _ext(C.EXT_FEATURE_TABLE, b"".join(
            _FEATURE.pack(t, b, n.encode()) for t, b, n in FEATURE_TABLE))
    if h.bitmaps_ext is not None and h.version >= 3:
        nb, dsize, doff = h.bitmaps_ext
        exts += _ext(C.EXT_BITMAPS, _BITMAPS_EXT.pack(nb, 0, dsize, doff))
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
