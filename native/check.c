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

#include "qcow2_native.h"
#include "qcow2_check.h"

static inline uint64_t be64(const uint8_t *p)
{
    return ((uint64_t)p[0] << 56) | ((uint64_t)p[1] << 48) |
           ((uint64_t)p[2] << 40) | ((uint64_t)p[3] << 32) |
           ((uint64_t)p[4] << 24) | ((uint64_t)p[5] << 16) |
           ((uint64_t)p[6] << 8) | (uint64_t)p[7];
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

/* Whether every entry of one table is clean (see qcow2_check.h). */
static int table_clean(const uint8_t *t, size_t entries, uint64_t cs_mask,
                       uint64_t file_size, unsigned cluster_bits, uint64_t imrt_len)
{
    uint64_t any = 0;
    for (size_t i = 0; i < entries; i++) {
        uint64_t e = be64(t + i * 8);
        uint64_t off = e & QCOW2N_L2E_OFFSET_MASK;
        any |= e & (QCOW2N_OFLAG_COMPRESSED | QCOW2N_L2E_STD_RESERVED_MASK);
        if (off && ((off & cs_mask) || off >= file_size || (off >> cluster_bits) >= imrt_len)) {
            return 0;
        }
    }
    return any == 0;
}

/* Undo the first n references of table t (an overflow part-way). */
static void undo(const uint8_t *t, size_t n, unsigned cluster_bits, void *imrt,
                 unsigned width)
{
    for (size_t i = 0; i < n; i++) {
        uint64_t off = be64(t + i * 8) & QCOW2N_L2E_OFFSET_MASK;
        if (off) {
            add(imrt, width, off >> cluster_bits, -1);
        }
    }
}

int64_t qcow2c_l2_count(const uint8_t *tables, size_t ntables, size_t entries,
                        unsigned cluster_bits, uint64_t file_size,
                        void *imrt, unsigned width, uint64_t imrt_len,
                        uint64_t rmax, uint8_t *flags, uint64_t *stats)
{
    if (bad_args(entries, cluster_bits, width) || !flags || !stats) {
        return -1;
    }
    const uint64_t cs = (uint64_t)1 << cluster_bits;
    const int check_max = width < 8 || rmax != UINT64_MAX;
    int64_t flagged = 0;
    for (size_t k = 0; k < ntables; k++) {
        const uint8_t *t = tables + k * entries * 8;
        if (flags[k]) {
            continue;
        }
        if (!table_clean(t, entries, cs - 1, file_size, cluster_bits, imrt_len)) {
            flags[k] = QCOW2C_SLOW;
            flagged++;
            continue;
        }
        uint64_t alloc = 0, frag = 0, prev = 0;
        size_t i;
        for (i = 0; i < entries; i++) {
            uint64_t off = be64(t + i * 8) & QCOW2N_L2E_OFFSET_MASK;
            if (!off) {
                continue;
            }
            uint64_t c = off >> cluster_bits;
            if (check_max && get(imrt, width, c) >= rmax) {
                break;
            }
            add(imrt, width, c, 1);
            if (alloc && off != prev + cs) {
                frag++;
            }
            prev = off;
            alloc++;
        }
        if (i < entries) {
            undo(t, i, cluster_bits, imrt, width);
            flags[k] = QCOW2C_SLOW;
            flagged++;
            continue;
        }
        stats[0] += alloc;
        stats[1] += frag;
        stats[2] += alloc;
    }
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
