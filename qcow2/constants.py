"""Constants of the qcow2 format (QEMU docs/interop/qcow2.rst) and engine limits.

Section names in comments refer to the spec.
"""

MAGIC = b"QFI\xfb"                    # "Header": magic

# -- header layout (Header) --------------------------------------------------
# Byte offsets of the header fields (all big-endian).  Write a field through these
# names, never through a bare literal.
HDR_MAGIC = 0x00                      # u32
HDR_VERSION = 0x04                    # u32
HDR_BACKING_FILE_OFFSET = 0x08        # u64
HDR_BACKING_FILE_SIZE = 0x10          # u32
HDR_CLUSTER_BITS = 0x14               # u32
HDR_SIZE = 0x18                       # u64: virtual size
HDR_CRYPT_METHOD = 0x20               # u32
HDR_L1_SIZE = 0x24                    # u32, followed by HDR_L1_TABLE_OFFSET
HDR_L1_TABLE_OFFSET = 0x28            # u64
HDR_REFCOUNT_TABLE_OFFSET = 0x30      # u64, followed by HDR_REFCOUNT_TABLE_CLUSTERS
HDR_REFCOUNT_TABLE_CLUSTERS = 0x38    # u32
HDR_NB_SNAPSHOTS = 0x3C               # u32, followed by HDR_SNAPSHOTS_OFFSET
HDR_SNAPSHOTS_OFFSET = 0x40           # u64
HDR_INCOMPATIBLE_FEATURES = 0x48      # u64 (version 3 from here on)
HDR_COMPATIBLE_FEATURES = 0x50        # u64
HDR_AUTOCLEAR_FEATURES = 0x58         # u64
HDR_REFCOUNT_ORDER = 0x60             # u32
HDR_HEADER_LENGTH = 0x64              # u32
HDR_COMPRESSION_TYPE = 0x68           # u8, present when header_length > 104

V2_HEADER_LENGTH = 72
V3_MIN_HEADER_LENGTH = 104
HEADER_COMPRESSION_TYPE_OFFSET = HDR_COMPRESSION_TYPE
HEADER_INCOMPATIBLE_OFFSET = HDR_INCOMPATIBLE_FEATURES
HEADER_STRUCT_SIZE = 112               # QEMU's QCowHeader incl. padding: unknown fields start here

MIN_CLUSTER_BITS = 9
MAX_CLUSTER_BITS = 21

# -- feature bits (Header: incompatible/compatible/autoclear features) --------
INCOMPAT_DIRTY = 1 << 0
INCOMPAT_CORRUPT = 1 << 1
INCOMPAT_DATA_FILE = 1 << 2
INCOMPAT_COMPRESSION = 1 << 3
INCOMPAT_EXTL2 = 1 << 4
INCOMPAT_MASK = 0x1F

COMPAT_LAZY_REFCOUNTS = 1 << 0

AUTOCLEAR_BITMAPS = 1 << 0
AUTOCLEAR_DATA_FILE_RAW = 1 << 1
AUTOCLEAR_MASK = 0x3

INCOMPAT_NAMES = {0: "dirty bit", 1: "corrupt bit", 2: "external data file",
                  3: "compression type", 4: "extended L2 entries"}

# -- compression (Header: compression_type) ---------------------------------
COMPRESSION_ZLIB = 0
COMPRESSION_ZSTD = 1
COMPRESSION_NAMES = {COMPRESSION_ZLIB: "zlib", COMPRESSION_ZSTD: "zstd"}

# -- encryption (Header: crypt_method) ---------------------------------------
CRYPT_NONE = 0
CRYPT_AES = 1
CRYPT_LUKS = 2

# -- header extensions (Header extensions) -----------------------------------
EXT_END = 0x00000000
EXT_BACKING_FORMAT = 0xE2792ACA
EXT_FEATURE_TABLE = 0x6803F857
EXT_CRYPTO_HEADER = 0x0537BE77
EXT_BITMAPS = 0x23852875
EXT_DATA_FILE = 0x44415441

# -- L1/L2 entries (Cluster mapping) -----------------------------------------
L1E_OFFSET_MASK = 0x00FFFFFFFFFFFE00
L1E_RESERVED_MASK = 0x7F000000000001FF
L2E_OFFSET_MASK = 0x00FFFFFFFFFFFE00
OFLAG_COPIED = 1 << 63
OFLAG_COMPRESSED = 1 << 62
OFLAG_ZERO = 1 << 0
L1E_SIZE = 8
SUBCLUSTERS_PER_CLUSTER = 32          # extended L2 entries

# -- refcounts (Host cluster management) --------------------------------------
REFT_OFFSET_MASK = 0xFFFFFFFFFFFFFE00

# -- limits QEMU enforces at open (block/qcow2.h) -----------------------------
MAX_CRYPT_CLUSTERS = 32
MAX_SNAPSHOTS = 65536
MAX_REFTABLE_SIZE = 8 * 1024 * 1024           # bytes
MAX_L1_SIZE = 32 * 1024 * 1024                # bytes
MAX_SNAPSHOT_EXTRA_DATA = 1024
SNAPSHOT_HEADER_SIZE = 40
MAX_SNAPSHOTS_SIZE = 1024 * MAX_SNAPSHOTS     # bytes: whole table
MAX_BACKING_FILE_NAME = 1023
MAX_BITMAPS = 65535
MAX_BITMAP_DIRECTORY_SIZE = 64 * MAX_BITMAPS  # 1024 bytes per entry max
BITMAP_EXT_SIZE = 24

# -- bitmaps (Bitmaps extension, Bitmap directory, Bitmap table) -------------------
# (added with qcow2.bitmap)

# -- refcount block codec, consistency check ----------------------------------------
# (added with qcow2.refcount / the consistency checker)

# -- images we create: layout, options --------------------------------------------
# (added with qcow2.layout / qcow2.options)

# -- kernels contract (mirrored by native/qcow2_native.h; a test compares them) -----
# (added with qcow2.kernels)
MIN_CLUSTER_SIZE = 1 << MIN_CLUSTER_BITS        # 512 bytes
MAX_CLUSTER_SIZE = 1 << MAX_CLUSTER_BITS        # 2 MiB
L2E_SIZE = 8                                    # "Cluster mapping": a standard L2 entry
L2E_EXTENDED_SIZE = 16                          # "Extended L2 Entries": entry + bitmap
L2E_STD_RESERVED_MASK = 0x3F000000000001FE      # standard descriptor: bits 1-8 and 56-61
L2_BITMAP_ALLOC_MASK = 0x00000000FFFFFFFF       # "Extended L2 Entries": bits 0-31 allocated,
L2_BITMAP_ZERO_SHIFT = 32                       # bits 32-63 read as zeros
# "Compressed Clusters Descriptor": bits 0..x-1 host offset, x..61 additional sectors,
# x = 62 - (cluster_bits - 8); the length runs to the end of its last 512-byte sector.
L2E_COMPRESSED_FIELD_BITS = 62
COMPRESSED_SECTOR_SIZE = 512

# -- engine limits -------------------------------------------------------------
MAX_BACKING_DEPTH = 16                # backing chain depth (QEMU's loop guard is similar)
DEFAULT_L2_CACHE_BYTES = 32 * 1024 * 1024

# Kinds of guest ranges produced by the L2 decoder (qcow2.kernels mirrors these).
KIND_UNALLOC = 0          # no host cluster: backing data, or zeros
KIND_UNALLOC_ALLOC = 1    # extended L2: cluster allocated, subcluster not: backing data
KIND_ZERO = 2             # reads as zeros, no host cluster
KIND_ZERO_ALLOC = 3       # reads as zeros, host cluster allocated
KIND_DATA = 4             # data at the host offset
KIND_COMPRESSED = 5       # compressed cluster


def compressed_extent(entry: int, cluster_bits: int) -> tuple[int, int, int, int]:
    """Decode a compressed cluster descriptor (spec: "Compressed Clusters Descriptor"):
    (data offset, data length as QEMU reads it, first 512-byte sector start, bytes of
    the sectors it touches -- what its references cover)."""
    shift = 62 - (cluster_bits - 8)
    coff = entry & ((1 << shift) - 1)
    nsec = ((entry >> shift) & ((1 << (cluster_bits - 8)) - 1)) + 1
    return coff, nsec * 512 - (coff & 511), coff & ~511, nsec * 512
