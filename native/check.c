/*
 * check.c - the check's fast path over clean L2 tables (qcow2_check.h).
 *
 * The general check (qcow2/checker/walk.py, copied.py) classifies every entry
 * with numpy and reports each problem in QEMU's order.  Nearly every table of
 * a real image has nothing to report; these loops count such tables in one
 * pass over their bytes and hand any table with something to say back to the
 * general path untouched.
 */

#include <stddef.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "qcow2_native.h"
#include "qcow2_check.h"

static inline uint64_t be64(const uint8_t *p)
{
    uint64_t v;
    memcpy(&v, p, 8);
#if defined(__BYTE_ORDER__) && __BYTE_ORDER__ == __ORDER_BIG_ENDIAN__
    return v;
#else
    return __builtin_bswap64(v);
#endif
}

static inline uint64_t get(const void *a, unsigned width, uint64_t i)
{
    switch (width) {
    case 1: return ((const uint8_t *)a)[i];
    case 2: return ((const uint16_t *)a)[i];
    case 4: return ((const uint32_t *)a)[i];
    default: return ((const uint64_t *)a)[i];
    }
}

static inline void add(void *a, unsigned width, uint64_t i, int d)
{
    switch (width) {
    case 1: ((uint8_t *)a)[i] += (uint8_t)d; break;
    case 2: ((uint16_t *)a)[i] += (uint16_t)d; break;
    case 4: ((uint32_t *)a)[i] += (uint32_t)d; break;
    default: ((uint64_t *)a)[i] += (uint64_t)(int64_t)d; break;
    }
}

static int bad_args(size_t entries, unsigned cluster_bits, unsigned width)
{
    if (cluster_bits < QCOW2N_MIN_CLUSTER_BITS || cluster_bits > QCOW2N_MAX_CLUSTER_BITS) {
        return 1;
    }
    if (entries != ((size_t)1 << cluster_bits) / QCOW2N_L2E_SIZE) {
        return 1;
    }
    return !(width == 1 || width == 2 || width == 4 || width == 8);
}

/* The clusters an entry references: [*first, *last]; 0 for none. */
static inline int refs_of(uint64_t e, unsigned cluster_bits, uint64_t *first, uint64_t *last)
{
    if (e & QCOW2N_OFLAG_COMPRESSED) {
        unsigned shift = 62 - (cluster_bits - 8);
        uint64_t coff = e & (((uint64_t)1 << shift) - 1);
        uint64_t sectors = ((e >> shift) & (((uint64_t)1 << (cluster_bits - 8)) - 1)) + 1;
        uint64_t end = (coff & ~(uint64_t)511) + sectors * 512;
        *first = coff >> cluster_bits;
        *last = (end - 1) >> cluster_bits;
        return 1;
    }
    uint64_t off = e & QCOW2N_L2E_OFFSET_MASK;
    *first = *last = off >> cluster_bits;
    return off != 0;
}

/* Whether every entry of one table is clean (see qcow2_check.h). */
static int table_clean(const uint8_t *t, const uint32_t *live, size_t n,
                       unsigned cluster_bits, uint64_t file_size, uint64_t imrt_len)
{
    const uint64_t cs = (uint64_t)1 << cluster_bits;
    for (size_t j = 0; j < n; j++) {
        uint64_t e = be64(t + (size_t)live[j] * 8);
        uint64_t first, last;
        if (e & QCOW2N_OFLAG_COMPRESSED) {
            refs_of(e, cluster_bits, &first, &last);
            /* the COPIED flag; a range ending a cluster or more past the file */
            uint64_t shift = 62 - (cluster_bits - 8);
            uint64_t coff = e & (((uint64_t)1 << shift) - 1);
            uint64_t end = (coff & ~(uint64_t)511) +
                (((e >> shift) & (((uint64_t)1 << (cluster_bits - 8)) - 1)) + 1) * 512;
            if ((e & QCOW2N_OFLAG_COPIED) || end >= file_size + cs || last >= imrt_len) {
                return 0;
            }
            continue;
        }
        uint64_t off = e & QCOW2N_L2E_OFFSET_MASK;
        if (e & QCOW2N_L2E_STD_RESERVED_MASK) {
            return 0;
        }
        if (off && ((off & (cs - 1)) || off >= file_size || (off >> cluster_bits) >= imrt_len)) {
            return 0;
        }
    }
    return 1;
}

/* Undo the references of the first n live entries of table t (an overflow
 * part-way). */
static void undo(const uint8_t *t, const uint32_t *live, size_t n, unsigned cluster_bits,
                 void *imrt, unsigned width)
{
    for (size_t j = 0; j < n; j++) {
        uint64_t first, last;
        if (refs_of(be64(t + (size_t)live[j] * 8), cluster_bits, &first, &last)) {
            for (uint64_t c = first; c <= last; c++) {
                add(imrt, width, c, -1);
            }
        }
    }
}

/* Count one clean table; 0, or -1 (nothing changed) when a count would pass rmax.
 * The allocated standard entries are recorded in rec (see qcow2_check.h). */
static int count_table(const uint8_t *t, const uint32_t *live, size_t n,
                       unsigned cluster_bits, void *imrt, unsigned width, int check_max,
                       uint64_t rmax, uint64_t *stats, uint64_t *rec, uint64_t rec_cap)
{
    const uint64_t cs = (uint64_t)1 << cluster_bits;
    uint64_t alloc = 0, frag = 0, prev = 0, comp = 0, comp_refs = 0;
    uint64_t nrec = stats[5];
    for (size_t j = 0; j < n; j++) {
        uint64_t e = be64(t + (size_t)live[j] * 8);
        uint64_t first, last;
        if (!refs_of(e, cluster_bits, &first, &last)) {
            continue;
        }
        for (uint64_t c = first; check_max && c <= last; c++) {
            if (get(imrt, width, c) >= rmax) {
                undo(t, live, j, cluster_bits, imrt, width);
                return -1;
            }
        }
        for (uint64_t c = first; c <= last; c++) {
            add(imrt, width, c, 1);
        }
        if (e & QCOW2N_OFLAG_COMPRESSED) {
            comp++;
            comp_refs += last - first + 1;
            continue;
        }
        uint64_t off = e & QCOW2N_L2E_OFFSET_MASK;
        if (alloc && off != prev + cs) {
            frag++;
        }
        prev = off;
        alloc++;
        if (nrec < rec_cap) {
            rec[nrec++] = first | (e & QCOW2N_OFLAG_COPIED);
        } else {
            nrec = UINT64_MAX;
        }
    }
    stats[0] += alloc + comp;
    stats[1] += frag + comp;
    stats[2] += alloc;
    stats[3] += comp;
    stats[4] += comp_refs;
    stats[5] = nrec;
    return 0;
}

int64_t qcow2c_l2_count(const uint8_t *tables, size_t ntables, size_t entries,
                        unsigned cluster_bits, uint64_t file_size,
                        void *imrt, unsigned width, uint64_t imrt_len,
                        uint64_t rmax, uint8_t *flags, uint64_t *stats,
                        uint64_t *rec, uint64_t rec_cap)
{
    if (bad_args(entries, cluster_bits, width) || !flags || !stats || (rec_cap && !rec)) {
        return -1;
    }
    const int check_max = width < 8 || rmax != UINT64_MAX;
    uint32_t *live = malloc(entries * sizeof(uint32_t));
    if (!live) {
        return -1;
    }
    int64_t flagged = 0;
    for (size_t k = 0; k < ntables; k++) {
        const uint8_t *t = tables + k * entries * 8;
        if (flags[k]) {
            continue;
        }
        /* one pass for the nonzero entries (most are zero in a sparse image) */
        size_t n = 0;
        for (size_t i = 0; i < entries; i++) {
            uint64_t w;
            memcpy(&w, t + i * 8, 8);
            live[n] = (uint32_t)i;
            n += w != 0;
        }
        if (!table_clean(t, live, n, cluster_bits, file_size, imrt_len) ||
            count_table(t, live, n, cluster_bits, imrt, width, check_max, rmax, stats,
                        rec, rec_cap)) {
            flags[k] = QCOW2C_SLOW;
            flagged++;
        }
    }
    free(live);
    return flagged;
}

int64_t qcow2c_copied(const uint8_t *tables, size_t ntables, size_t entries,
                      unsigned cluster_bits, const void *refcounts,
                      unsigned width, uint64_t len, uint8_t *flags)
{
    if (bad_args(entries, cluster_bits, width) || !flags) {
        return -1;
    }
    int64_t flagged = 0;
    for (size_t k = 0; k < ntables; k++) {
        const uint8_t *t = tables + k * entries * 8;
        if (flags[k]) {
            continue;
        }
        for (size_t i = 0; i < entries; i++) {
            uint64_t e = be64(t + i * 8);
            uint64_t off = e & QCOW2N_L2E_OFFSET_MASK;
            if ((e & QCOW2N_OFLAG_COMPRESSED) || !off) {
                continue;
            }
            uint64_t c = off >> cluster_bits;
            if (c >= len || (get(refcounts, width, c) == 1) != ((e & QCOW2N_OFLAG_COPIED) != 0)) {
                flags[k] = QCOW2C_SLOW;
                flagged++;
                break;
            }
        }
    }
    return flagged;
}

static inline uint64_t stored(const uint8_t *b, unsigned bytes, size_t i)
{
    const uint8_t *p = b + i * bytes;
    switch (bytes) {
    case 1: return p[0];
    case 2: return ((uint64_t)p[0] << 8) | p[1];
    case 4: return ((uint64_t)p[0] << 24) | ((uint64_t)p[1] << 16) |
                   ((uint64_t)p[2] << 8) | p[3];
    default: return be64(p);
    }
}

int64_t qcow2c_compare(const uint8_t *block, unsigned bits, const void *imrt,
                       unsigned width, uint64_t first, size_t n, uint64_t *highest)
{
    if (!(bits == 8 || bits == 16 || bits == 32 || bits == 64) || !highest ||
        !(width == 1 || width == 2 || width == 4 || width == 8)) {
        return -1;
    }
    int64_t differ = 0;
    for (size_t i = 0; i < n; i++) {
        uint64_t s = block ? stored(block, bits / 8, i) : 0;
        uint64_t c = get(imrt, width, first + i);
        differ += s != c;
        if (s | c) {
            *highest = first + i;
        }
    }
    return differ;
}

int64_t qcow2c_copied_list(const uint64_t *rec, size_t n, const void *refcounts,
                           unsigned width, uint64_t len)
{
    if (!(width == 1 || width == 2 || width == 4 || width == 8)) {
        return -1;
    }
    int64_t wrong = 0;
    for (size_t i = 0; i < n; i++) {
        uint64_t c = rec[i] & ~QCOW2N_OFLAG_COPIED;
        wrong += c >= len || (get(refcounts, width, c) == 1) != ((rec[i] >> 63) != 0);
    }
    return wrong;
}
