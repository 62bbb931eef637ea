/*
 * l2.c - classify L2 table entries and turn a slice of a table into runs.
 *
 * The classification follows QEMU's qcow2_get_cluster_type() and
 * qcow2_get_subcluster_type() (block/qcow2.h) bit for bit; the error checks
 * are the ones QEMU makes when it maps a guest offset (qcow2_get_host_offset)
 * plus, in strict mode, the reserved bits of the spec.
 */

#include <stddef.h>
#include <stdint.h>

#include "qcow2_native.h"

/* The format constants (QCOW2N_L2E_*, QCOW2N_OFLAG_*, ...) are in
 * qcow2_native.h, shared with qcow2/constants.py. */

#define L2_FLAGS (QCOW2N_L2_EXTENDED | QCOW2N_L2_DATA_FILE | QCOW2N_L2_STRICT)

/* Cluster types, as QEMU's QCow2ClusterType. */
enum { CT_UNALLOCATED, CT_ZERO_PLAIN, CT_ZERO_ALLOC, CT_NORMAL, CT_COMPRESSED };

static inline uint64_t load_be64(const uint8_t *p)
{
    return ((uint64_t)p[0] << 56) | ((uint64_t)p[1] << 48) |
           ((uint64_t)p[2] << 40) | ((uint64_t)p[3] << 32) |
           ((uint64_t)p[4] << 24) | ((uint64_t)p[5] << 16) |
           ((uint64_t)p[6] << 8) | (uint64_t)p[7];
}

static inline int cluster_type(uint64_t entry, int extended, int data_file)
{
    if (entry & QCOW2N_OFLAG_COMPRESSED) {
        return CT_COMPRESSED;
    }
    /* The zero flag only exists without subclusters (bit 0 is reserved in
     * extended entries, whose bitmap says what reads as zeros). */
    if ((entry & QCOW2N_OFLAG_ZERO) && !extended) {
        return (entry & QCOW2N_L2E_OFFSET_MASK) ? CT_ZERO_ALLOC : CT_ZERO_PLAIN;
    }
    if (!(entry & QCOW2N_L2E_OFFSET_MASK)) {
        /* Offset 0 is a valid host offset in an external data file; there
         * every cluster has refcount 1, so COPIED tells the two apart. */
        if (data_file && (entry & QCOW2N_OFLAG_COPIED)) {
            return CT_NORMAL;
        }
        return CT_UNALLOCATED;
    }
    return CT_NORMAL;
}

struct emitter {
    const qcow2n_runs *out;
    size_t cap;
    size_t n;
    uint64_t unit_size;
};

/* Append units [start, start + len) of @kind at @host, merging if possible.
 * Returns 0 or QCOW2N_ENOSPC. */
static inline int emit(struct emitter *em, int kind, uint32_t start,
                       uint32_t len, uint64_t host, uint32_t csize)
{
    const qcow2n_runs *o = em->out;

    if (em->n > 0 && kind != QCOW2N_KIND_COMPRESSED) {
        size_t last = em->n - 1;
        if (o->kinds[last] == kind) {
            if (kind == QCOW2N_KIND_UNALLOC || kind == QCOW2N_KIND_ZERO) {
                o->lens[last] += len;
                return 0;
            }
            if (o->hosts[last] + (uint64_t)o->lens[last] * em->unit_size
                == host) {
                o->lens[last] += len;
                return 0;
            }
        }
    }
    if (em->n >= em->cap) {
        return QCOW2N_ENOSPC;
    }
    o->kinds[em->n] = (uint8_t)kind;
    o->starts[em->n] = start;
    o->lens[em->n] = len;
    o->hosts[em->n] = host;
    o->csizes[em->n] = csize;
    em->n++;
    return 0;
}

/*
 * check_entry - 0, or the QCOW2N_EL2* error QEMU reports for an entry of
 * cluster type @type (in this order: reserved bits, only with @strict;
 * subcluster bitmap; host offset alignment).  @reserved: the reserved bits of
 * a standard descriptor.
 */
static inline int check_entry(int type, uint64_t entry, uint64_t bitmap,
                              int extended, int strict, uint64_t reserved,
                              uint64_t cluster_size)
{
    if (strict && (type == CT_COMPRESSED ? (extended && bitmap != 0)
                                         : (entry & reserved) != 0)) {
        return QCOW2N_EL2RESERVED;
    }
    if (extended && ((type == CT_NORMAL &&
                      ((bitmap >> QCOW2N_L2_BITMAP_ZERO_SHIFT) & bitmap)) ||
                     (type == CT_UNALLOCATED &&
                      (bitmap & QCOW2N_L2_BITMAP_ALLOC_MASK)))) {
        /* QCOW2_SUBCLUSTER_INVALID: a subcluster both allocated and zero,
         * or an allocated subcluster without a host cluster. */
        return QCOW2N_EL2BITMAP;
    }
    if ((type == CT_NORMAL || type == CT_ZERO_ALLOC) &&
        (entry & QCOW2N_L2E_OFFSET_MASK & (cluster_size - 1))) {
        /* QEMU: "Cluster allocation offset ... unaligned" */
        return QCOW2N_EL2UNALIGNED;
    }
    return 0;
}

/*
 * emit_subclusters - the subclusters of one extended entry, one unit each,
 * as QEMU's qcow2_get_subcluster_type(): with a host cluster (@normal) they
 * are ZERO_ALLOC, DATA or UNALLOC_ALLOC at @host + sc * unit; without one,
 * ZERO or UNALLOC.
 */
static inline int emit_subclusters(struct emitter *em, int normal,
                                   uint32_t start, uint64_t host,
                                   uint64_t bitmap)
{
    unsigned sc;
    int ret = 0;

    for (sc = 0; sc < QCOW2N_SUBCLUSTERS && ret == 0; sc++) {
        int zero = (bitmap >> (QCOW2N_L2_BITMAP_ZERO_SHIFT + sc)) & 1;
        int kind;

        if (!normal) {
            ret = emit(em, zero ? QCOW2N_KIND_ZERO : QCOW2N_KIND_UNALLOC,
                       start + sc, 1, 0, 0);
            continue;
        }
        if (zero) {
            kind = QCOW2N_KIND_ZERO_ALLOC;
        } else if ((bitmap >> sc) & 1) {
            kind = QCOW2N_KIND_DATA;
        } else {
            kind = QCOW2N_KIND_UNALLOC_ALLOC;
        }
        ret = emit(em, kind, start + sc, 1, host + sc * em->unit_size, 0);
    }
    return ret;
}

/*
 * qcow2n_l2_runs - decode entries [first, first + count) of an L2 table into
 * runs (the contract is in qcow2_native.h).  Every entry is checked as QEMU
 * checks it when it maps a guest offset; the first bad one stops the walk.
 */
int qcow2n_l2_runs(const qcow2n_runs *dest, size_t dest_size,
                   const uint8_t *src, size_t src_size,
                   size_t first, size_t count, unsigned cluster_bits,
                   unsigned flags, size_t *n_runs, size_t *bad_index)
{
    const int extended = (flags & QCOW2N_L2_EXTENDED) != 0;
    const int data_file = (flags & QCOW2N_L2_DATA_FILE) != 0;
    const int strict = (flags & QCOW2N_L2_STRICT) != 0;
    const size_t esize = extended ? QCOW2N_L2E_EXTENDED_SIZE : QCOW2N_L2E_SIZE;
    const uint64_t cluster_size = 1ULL << cluster_bits;
    /* units per cluster: a unit is a subcluster with extended entries */
    const uint64_t upc = extended ? QCOW2N_SUBCLUSTERS : 1;
    /* Compressed descriptor: offset in bits 0..x-1, additional 512-byte
     * sectors in bits x..61, x = 62 - (cluster_bits - 8). */
    const unsigned csize_shift =
        QCOW2N_L2E_COMPRESSED_FIELD_BITS - (cluster_bits - 8);
    const uint64_t coffset_mask = (1ULL << csize_shift) - 1;
    const uint64_t csize_mask = (1ULL << (cluster_bits - 8)) - 1;
    /* Bit 0 is the zero flag without subclusters, reserved with them. */
    const uint64_t reserved = QCOW2N_L2E_STD_RESERVED_MASK |
                              (extended ? QCOW2N_OFLAG_ZERO : 0);
    struct emitter em = { dest, dest_size, 0, cluster_size / upc };
    size_t i;
    int ret;

    *n_runs = 0;
    if (cluster_bits < QCOW2N_MIN_CLUSTER_BITS ||
        cluster_bits > QCOW2N_MAX_CLUSTER_BITS || (flags & ~L2_FLAGS) ||
        first > src_size / esize || count > src_size / esize - first ||
        count > UINT32_MAX / QCOW2N_SUBCLUSTERS) {
        return QCOW2N_EINVAL;
    }

    for (i = 0; i < count; i++) {
        const uint8_t *p = src + (first + i) * esize;
        const uint64_t entry = load_be64(p);
        const uint64_t bitmap =
            extended ? load_be64(p + QCOW2N_L2E_SIZE) : 0;
        const uint32_t start = (uint32_t)(i * upc);
        const int type = cluster_type(entry, extended, data_file);
        const uint64_t host = entry & QCOW2N_L2E_OFFSET_MASK;

        ret = check_entry(type, entry, bitmap, extended, strict, reserved,
                          cluster_size);
        if (ret < 0) {
            *bad_index = first + i;
            return ret;
        }

        switch (type) {
        case CT_COMPRESSED: {
            uint64_t coffset = entry & coffset_mask;
            uint64_t sectors = ((entry >> csize_shift) & csize_mask) + 1;
            /* As QEMU: the length runs to the end of the last sector. */
            uint32_t csize =
                (uint32_t)(sectors * QCOW2N_COMPRESSED_SECTOR_SIZE -
                           (coffset % QCOW2N_COMPRESSED_SECTOR_SIZE));
            ret = emit(&em, QCOW2N_KIND_COMPRESSED, start, (uint32_t)upc,
                       coffset, csize);
            break;
        }
        case CT_ZERO_PLAIN:
            ret = emit(&em, QCOW2N_KIND_ZERO, start, 1, 0, 0);
            break;
        case CT_ZERO_ALLOC:
            ret = emit(&em, QCOW2N_KIND_ZERO_ALLOC, start, 1, host, 0);
            break;
        case CT_UNALLOCATED:
            if (!extended || !(bitmap >> QCOW2N_L2_BITMAP_ZERO_SHIFT)) {
                ret = emit(&em, QCOW2N_KIND_UNALLOC, start, (uint32_t)upc,
                           0, 0);
            } else {
                ret = emit_subclusters(&em, 0, start, 0, bitmap);
            }
            break;
        default: /* CT_NORMAL */
            if (!extended) {
                ret = emit(&em, QCOW2N_KIND_DATA, start, 1, host, 0);
            } else if (bitmap == QCOW2N_L2_BITMAP_ALLOC_MASK) {
                ret = emit(&em, QCOW2N_KIND_DATA, start, QCOW2N_SUBCLUSTERS,
                           host, 0);
            } else {
                ret = emit_subclusters(&em, 1, start, host, bitmap);
            }
            break;
        }
        if (ret < 0) {
            *n_runs = em.n;
            return ret;
        }
    }
    *n_runs = em.n;
    return 0;
}
