/*
 * qcow2_native.h - the contract of the qcow2 native core.
 *
 * Declarations only: native/build_native.py feeds this file verbatim to
 * cffi's cdef(), so it holds no #include, no include guard and no macro with
 * a non-literal value.  C files include <stddef.h> and <stdint.h> first.
 *
 * Every kernel is pure and never touches the Python API, so cffi releases
 * the GIL around each call and several threads may run kernels at once.
 * The context objects (qcow2n_dctx, qcow2n_cctx) are not thread-safe: one
 * per thread.
 *
 * Conventions: arguments are (dest, dest_size, src, src_size, ...); a
 * function returns 0 or a negative QCOW2N_E* code.
 */

/* Bumped whenever a declaration below changes; qcow2/kernels/native.py checks
 * it against NATIVE_VERSION in qcow2/kernels/contract.py. */
#define QCOW2N_VERSION 3

/* Bits of qcow2n_features(): optional libraries compiled in. */
#define QCOW2N_FEATURE_ZSTD       1
#define QCOW2N_FEATURE_LIBDEFLATE 2

/* Return codes. */
#define QCOW2N_OK            0
#define QCOW2N_EINVAL       -1   /* bad argument (size, algorithm, flags) */
#define QCOW2N_ENOMEM       -2   /* allocation failed */
#define QCOW2N_ENOSPC       -3   /* output area too small */
#define QCOW2N_EUNSUPPORTED -4   /* algorithm not compiled in */
#define QCOW2N_ESRCRANGE    -5   /* a source range lies outside src */
#define QCOW2N_EDSTRANGE    -6   /* a destination slot lies outside dest */
#define QCOW2N_EL2RESERVED  -10  /* L2 entry: reserved bits set (strict) */
#define QCOW2N_EL2BITMAP    -11  /* L2 entry: invalid subcluster bitmap */
#define QCOW2N_EL2UNALIGNED -12  /* L2 entry: host cluster offset unaligned */
#define QCOW2N_EDATA        -20  /* compressed data is invalid */
#define QCOW2N_ESHORT       -21  /* compressed data ends before a full cluster */
#define QCOW2N_ELONG        -22  /* zstd frame goes on past the cluster end */

/* Compression algorithms: the values of the qcow2 header's compression_type. */
#define QCOW2N_ALGO_ZLIB 0
#define QCOW2N_ALGO_ZSTD 1

/* Flags of qcow2n_dctx_new(). */
#define QCOW2N_DCTX_STRICT 1  /* zlib only: skip the libdeflate fast path */

/* Run kinds produced by qcow2n_l2_runs(). */
#define QCOW2N_KIND_UNALLOC       0  /* no host cluster: backing file or zeros */
#define QCOW2N_KIND_UNALLOC_ALLOC 1  /* extended L2 only: host cluster allocated,
                                        subcluster not: read from backing */
#define QCOW2N_KIND_ZERO          2  /* reads as zeros, no host cluster */
#define QCOW2N_KIND_ZERO_ALLOC    3  /* reads as zeros, host cluster allocated */
#define QCOW2N_KIND_DATA          4  /* data at the host offset */
#define QCOW2N_KIND_COMPRESSED    5  /* one compressed cluster */

/*
 * Format constants the kernels use (the qcow2 spec, docs/interop/qcow2.rst).
 * The same values are named in qcow2/constants.py; a test
 * (tests/test_kernels_contract.py) checks that this file, the compiled module
 * and the Python side agree.
 */
#define QCOW2N_MIN_CLUSTER_BITS  9
#define QCOW2N_MAX_CLUSTER_BITS  21
#define QCOW2N_MIN_CLUSTER_SIZE  512
#define QCOW2N_MAX_CLUSTER_SIZE  2097152
#define QCOW2N_SUBCLUSTERS       32  /* "Extended L2 Entries" */
#define QCOW2N_L2E_SIZE          8   /* bytes of a standard L2 entry */
#define QCOW2N_L2E_EXTENDED_SIZE 16  /* entry + subcluster bitmap */
/* "Standard Cluster Descriptor": host offset in bits 9..55 */
#define QCOW2N_L2E_OFFSET_MASK       0x00fffffffffffe00ULL
/* reserved bits 1..8 and 56..61 (bit 0 too with extended L2 entries) */
#define QCOW2N_L2E_STD_RESERVED_MASK 0x3f000000000001feULL
#define QCOW2N_OFLAG_COPIED          0x8000000000000000ULL  /* bit 63 */
#define QCOW2N_OFLAG_COMPRESSED      0x4000000000000000ULL  /* bit 62 */
#define QCOW2N_OFLAG_ZERO            0x0000000000000001ULL  /* bit 0 */
/* "Extended L2 Entries": bitmap bits 0..31 allocated, 32..63 zero */
#define QCOW2N_L2_BITMAP_ALLOC_MASK  0x00000000ffffffffULL
#define QCOW2N_L2_BITMAP_ZERO_SHIFT  32
/* "Compressed Clusters Descriptor": bits 0..x-1 host offset, x..61 additional
 * sectors, x = 62 - (cluster_bits - 8) */
#define QCOW2N_L2E_COMPRESSED_FIELD_BITS 62
#define QCOW2N_COMPRESSED_SECTOR_SIZE    512

/* Flags of qcow2n_l2_runs(). */
#define QCOW2N_L2_EXTENDED  1  /* 16-byte entries with a subcluster bitmap */
#define QCOW2N_L2_DATA_FILE 2  /* image has an external data file */
#define QCOW2N_L2_STRICT    4  /* reject reserved bits */

/*
 * Output of qcow2n_l2_runs(): five parallel arrays of (at least) dest_size
 * elements each, allocated by the caller.
 */
typedef struct qcow2n_runs {
    uint8_t  *kinds;   /* QCOW2N_KIND_* */
    uint32_t *starts;  /* first unit of the run, relative to `first` */
    uint32_t *lens;    /* units in the run */
    uint64_t *hosts;   /* host byte offset of the first unit (0 if none) */
    uint32_t *csizes;  /* compressed length in bytes (COMPRESSED only) */
} qcow2n_runs;

/* Opaque, reusable codec contexts (one per thread). */
typedef struct qcow2n_dctx qcow2n_dctx;
typedef struct qcow2n_cctx qcow2n_cctx;

/*
 * qcow2n_version - QCOW2N_VERSION as compiled into the library.
 */
int qcow2n_version(void);

/*
 * qcow2n_features - QCOW2N_FEATURE_* bits of the optional codecs built in.
 */
unsigned qcow2n_features(void);

/*
 * qcow2n_zstd_version - ZSTD_versionNumber() of the linked libzstd, 0 if none.
 * (Decoders of different zstd releases may disagree on corrupt frames.)
 */
unsigned qcow2n_zstd_version(void);

/*
 * qcow2n_l2_runs - decode a slice of an L2 table into runs.
 *
 * @dest, @dest_size: run arrays and their capacity (number of runs)
 * @src, @src_size:   the raw, big-endian L2 table
 * @first, @count:    the slice of entries to decode
 * @cluster_bits:     9..21
 * @flags:            QCOW2N_L2_* bits
 * @n_runs:           out: number of runs written
 * @bad_index:        out: on an L2 error, the table index of the bad entry
 *
 * A unit is a subcluster with QCOW2N_L2_EXTENDED, a cluster otherwise.  Runs
 * of DATA, ZERO_ALLOC and UNALLOC_ALLOC merge while host offsets are
 * contiguous; UNALLOC and ZERO runs merge while adjacent; every COMPRESSED
 * cluster is a run of its own.
 *
 * Returns 0, QCOW2N_EL2* with *bad_index set, QCOW2N_ENOSPC when @dest_size
 * runs are not enough (retry with count * 32 for extended tables), or
 * QCOW2N_EINVAL.
 */
int qcow2n_l2_runs(const qcow2n_runs *dest, size_t dest_size,
                   const uint8_t *src, size_t src_size,
                   size_t first, size_t count, unsigned cluster_bits,
                   unsigned flags, size_t *n_runs, size_t *bad_index);

/*
 * qcow2n_dctx_new - create a decompression context.
 *
 * @algo: QCOW2N_ALGO_*; @cluster_size: 512..2 MiB, a power of two.
 * @flags: QCOW2N_DCTX_STRICT to decode zlib clusters with zlib alone.
 *         Otherwise libdeflate (when built in) is tried first: it is about
 *         twice as fast and decodes every valid stream identically, but it
 *         also accepts a few malformed ones that zlib (and so QEMU) refuses
 *         (symbols 286/287 and distances 30/31 of the fixed code, codewords
 *         outside an incomplete code, more than 286/30 code lengths or a
 *         code length repeat running past them).
 * Returns NULL on allocation failure, on a bad argument or when @algo was
 * not compiled in (check qcow2n_features() first).
 */
qcow2n_dctx *qcow2n_dctx_new(int algo, size_t cluster_size, unsigned flags);

/*
 * qcow2n_dctx_free - release a context (NULL is fine).
 */
void qcow2n_dctx_free(qcow2n_dctx *ctx);

/*
 * qcow2n_decompress - decompress @n clusters in one call.
 *
 * @dest, @dest_size:  output buffer; cluster i goes to dest_offsets[i], or to
 *                     i * cluster_size when @dest_offsets is NULL
 * @src, @src_size:    buffer holding the compressed clusters
 * @src_offsets, @src_lengths: where cluster i's compressed bytes lie in src
 * @n:                 number of clusters
 * @bad_index:         out: index of the failing cluster on error
 *
 * All ranges are checked before anything is decompressed (QCOW2N_ESRCRANGE,
 * QCOW2N_EDSTRANGE).  A cluster succeeds iff exactly cluster_size bytes of
 * output are produced the way QEMU's qcow2_{zlib,zstd}_decompress accept
 * them; never more than cluster_size bytes are written per cluster.  On a
 * data error (QCOW2N_EDATA, QCOW2N_ESHORT, QCOW2N_ELONG) the clusters before
 * *bad_index are complete and the failing slot holds garbage.
 */
int qcow2n_decompress(qcow2n_dctx *ctx, uint8_t *dest, size_t dest_size,
                      const uint8_t *src, size_t src_size,
                      const uint64_t *src_offsets, const uint32_t *src_lengths,
                      const uint64_t *dest_offsets, size_t n,
                      size_t *bad_index);

/*
 * qcow2n_cctx_new - create a compression context.
 *
 * @level: zlib 0..9 or -1 for the default; zstd level or 0 for the default.
 * Returns NULL on failure (bad argument, memory, algorithm not built in).
 */
qcow2n_cctx *qcow2n_cctx_new(int algo, size_t cluster_size, int level);

/*
 * qcow2n_cctx_new_zstd_api - a zstd compression context on another copy of
 * libzstd (for instance a newer release bundled with a Python package, whose
 * compressor is faster), given by its entry points.
 *
 * @fns:   QCOW2N_ZSTD_API_FNS addresses, in this order: ZSTD_createCCtx,
 *         ZSTD_freeCCtx, ZSTD_CCtx_setParameter, ZSTD_compress2, ZSTD_isError,
 *         ZSTD_getErrorCode, all of one libzstd release 1.4.0 or newer
 * @level: zstd level, or 0 for the library's default
 *
 * qcow2n_compress() then makes the same call as with qcow2n_cctx_new(), on
 * that copy.  Works whether or not zstd is built in here.  Returns NULL on a
 * bad argument or when memory is short.
 */
#define QCOW2N_ZSTD_API_FNS 6
qcow2n_cctx *qcow2n_cctx_new_zstd_api(size_t cluster_size, int level,
                                      void *const *fns, size_t n_fns);

/*
 * qcow2n_cctx_free - release a context (NULL is fine).
 */
void qcow2n_cctx_free(qcow2n_cctx *ctx);

/*
 * qcow2n_compress - compress @n consecutive clusters of @src.
 *
 * @dest, @dest_size: n slots of cluster_size bytes; cluster i's compressed
 *                    bytes start at i * cluster_size
 * @src, @src_size:   n * cluster_size bytes of input
 * @sizes:            out: compressed length of cluster i, or -1 when it does
 *                    not fit in cluster_size - 1 bytes (QEMU then writes the
 *                    cluster uncompressed; deflate needs one byte to spare
 *                    there, so zlib streams of cluster_size - 1 bytes fail)
 *
 * Output is exactly what QEMU's qcow2_zlib_compress / qcow2_zstd_compress
 * produce with the same library.  Returns 0 or a negative code.
 */
int qcow2n_compress(qcow2n_cctx *ctx, uint8_t *dest, size_t dest_size,
                    const uint8_t *src, size_t src_size, size_t n,
                    int64_t *sizes);

/*
 * qcow2n_zero_blocks - find all-zero blocks.
 *
 * @dest, @dest_size: one byte per block (1 = all zeros); at least
 *                    ceil(src_size / block_size) bytes
 * @src, @src_size:   data; the last block may be partial
 * Returns 0, QCOW2N_EINVAL (block_size 0) or QCOW2N_ENOSPC.
 */
int qcow2n_zero_blocks(uint8_t *dest, size_t dest_size,
                       const uint8_t *src, size_t src_size,
                       size_t block_size);

/*
 * qcow2n_is_zero - 1 when all @src_size bytes of @src are zero, else 0.
 */
int qcow2n_is_zero(const uint8_t *src, size_t src_size);
