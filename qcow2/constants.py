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
# the data of the extensions with a fixed layout
EXT_BACKING_FORMAT_MAX = 16           # a backing format name is shorter (QEMU's buffer)
EXT_CRYPTO_HEADER_SIZE = 16           # u64 offset, u64 length of the encryption header
BITMAPS_EXT_NB_BITMAPS = 0            # u32
BITMAPS_EXT_RESERVED = 4              # u32, zero
BITMAPS_EXT_DIRECTORY_SIZE = 8        # u64
BITMAPS_EXT_DIRECTORY_OFFSET = 16     # u64

# -- L1/L2 entries (Cluster mapping) -----------------------------------------
L1E_OFFSET_MASK = 0x00FFFFFFFFFFFE00
L1E_RESERVED_MASK = 0x7F000000000001FF
L2E_OFFSET_MASK = 0x00FFFFFFFFFFFE00
OFLAG_COPIED = 1 << 63
OFLAG_COMPRESSED = 1 << 62
OFLAG_ZERO = 1 << 0
L1E_SIZE = 8
L2E_SIZE = 8                                    # a standard L2 entry
L2E_EXTENDED_SIZE = 16                          # "Extended L2 Entries": entry + bitmap
L2E_STD_RESERVED_MASK = 0x3F000000000001FE      # standard descriptor: bits 1-8 and 56-61
SUBCLUSTERS_PER_CLUSTER = 32                    # "Extended L2 Entries"
L2_BITMAP_ALLOC_MASK = 0x00000000FFFFFFFF       # bits 0-31: subcluster allocated
L2_BITMAP_ZERO_SHIFT = 32                       # bits 32-63: subcluster reads as zeros
L2_BITMAP_ZERO_MASK = L2_BITMAP_ALLOC_MASK << L2_BITMAP_ZERO_SHIFT
# "Compressed Clusters Descriptor": bits 0..x-1 host offset, x..61 additional sectors,
# x = 62 - (cluster_bits - 8); the length runs to the end of its last 512-byte sector.
L2E_COMPRESSED_FIELD_BITS = 62
COMPRESSED_SECTOR_SIZE = 512
MIN_CLUSTER_SIZE = 1 << MIN_CLUSTER_BITS        # 512 bytes
MAX_CLUSTER_SIZE = 1 << MAX_CLUSTER_BITS        # 2 MiB

# -- refcounts (Host cluster management) --------------------------------------
REFT_OFFSET_MASK = 0xFFFFFFFFFFFFFE00

# -- limits QEMU enforces at open (block/qcow2.h) -----------------------------
MAX_CRYPT_CLUSTERS = 32
MAX_SNAPSHOTS = 65536
MAX_REFTABLE_SIZE = 8 * 1024 * 1024           # bytes
MAX_L1_SIZE = 32 * 1024 * 1024                # bytes
MAX_L1_ENTRIES = 0x7FFFFFFF                   # L1 entries a virtual size may need (INT_MAX)
MAX_TABLE_END = 0x7FFFFFFFFFFFFFFF            # no table may end past INT64_MAX
MAX_SNAPSHOT_EXTRA_DATA = 1024
SNAPSHOT_HEADER_SIZE = 40
MAX_SNAPSHOTS_SIZE = 1024 * MAX_SNAPSHOTS     # bytes: whole table
MAX_BACKING_FILE_NAME = 1023
MAX_BITMAPS = 65535
MAX_BITMAP_DIRECTORY_SIZE = 64 * MAX_BITMAPS  # 1024 bytes per entry max
BITMAP_EXT_SIZE = 24

# -- bitmaps (Bitmaps extension, Bitmap directory, Bitmap table) -------------------
BME_ENTRY_SIZE = 24                   # "Bitmap directory": an entry without name and extra data
BME_TABLE_ENTRY_SIZE = 8              # "Bitmap table": one u64 per cluster of bitmap data
BME_MAX_TABLE_SIZE = 0x8000000        # entries of one bitmap table (QEMU's limit)
BME_MAX_PHYS_SIZE = 0x20000000        # bytes of one bitmap's data (QEMU's limit)
BME_MIN_GRANULARITY_BITS = 9
BME_MAX_GRANULARITY_BITS = 31
BME_MAX_NAME_SIZE = 1023
BME_FLAG_IN_USE = 1 << 0
BME_FLAG_AUTO = 1 << 1
BME_RESERVED_FLAGS = 0xFFFFFFFC
BME_TYPE_DIRTY_TRACKING = 1
BME_TABLE_RESERVED_MASK = 0xFF000000000001FE  # "Bitmap table": bits 1-8 and 56-63
BME_TABLE_OFFSET_MASK = 0x00FFFFFFFFFFFE00    # bits 9-55: the data cluster
BME_TABLE_ALL_ONES = 1 << 0                   # no data cluster: reads as all ones

# -- refcount block codec, consistency check ----------------------------------------
REFT_RESERVED_MASK = 0x1FF            # "Host cluster management": refcount table entry
# snapshot table entries (Snapshots): the extra data a version 3 entry must have
SNAPSHOT_EXTRA_V3_MIN = 16            # vm_state_size_large + disk_size
SNAPSHOT_ICOUNT_UNKNOWN = 0xFFFFFFFFFFFFFFFF
# QEMU's integer limits that the check's rules name (INT_MAX, INT64_MAX)
INT_MAX = 0x7FFFFFFF
INT64_MAX = 0x7FFFFFFFFFFFFFFF

# -- images we create: layout, options --------------------------------------------
REFTE_SIZE = 8                        # bytes of a refcount table entry (Host cluster management)
DEFAULT_CLUSTER_SIZE = 65536          # qemu-img create's default
DEFAULT_REFCOUNT_BITS = 16
MIN_EXTL2_CLUSTER_SIZE = 512 * SUBCLUSTERS_PER_CLUSTER   # 16 KiB: subclusters of 512 bytes
MAX_IMAGE_SIZE = (1 << 63) - 1        # qemu-img's largest virtual size (INT64_MAX)

# -- kernels contract (mirrored by native/qcow2_native.h; a test compares them) -----
# The entry constants above and these kinds of guest ranges the L2 decoder produces.
KIND_UNALLOC = 0          # no host cluster: backing data, or zeros
KIND_UNALLOC_ALLOC = 1    # extended L2: cluster allocated, subcluster not: backing data
KIND_ZERO = 2             # reads as zeros, no host cluster
KIND_ZERO_ALLOC = 3       # reads as zeros, host cluster allocated
KIND_DATA = 4             # data at the host offset
KIND_COMPRESSED = 5       # compressed cluster

# -- engine limits -------------------------------------------------------------
MAX_BACKING_DEPTH = 16                # backing chain depth (QEMU's loop guard is similar)
DEFAULT_L2_CACHE_BYTES = 32 * 1024 * 1024
REFCOUNT_CACHE_BYTES = 4 * 1024 * 1024        # refcount blocks cached by a writer
