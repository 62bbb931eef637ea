/*
 * fuzz_check.c - the check's kernels (native/check.c) on untrusted L2 tables
 * and refcount blocks.
 *
 * Header: cluster bits (9 + byte % 8), IMRT width (1, 2, 4, 8) and refcount
 * bits, file size in clusters (2 bytes), IMRT length (2 bytes), a
 * preset-IMRT byte.  The rest is cut into whole L2 tables (then a refcount
 * block from what is left over).
 *
 * Invariants: the flagged count is the number of flags set; a counted table
 * adds exactly its references (stats[2] + stats[4]) to the IMRT and nothing
 * passes rmax; a flagged table leaves the IMRT as it was (the IMRT after the
 * call equals the one from counting the unflagged tables alone); the record
 * holds stats[5] entries, each an allocated cluster inside the IMRT;
 * qcow2c_copied and qcow2c_copied_list agree on the tables the record covers;
 * qcow2c_compare counts what a byte-by-byte comparison counts.
 */
#include "fuzz_common.h"

static uint64_t get(const void *a, unsigned w, size_t i)
{
    switch (w) {
    case 1: return ((const uint8_t *)a)[i];
    case 2: return ((const uint16_t *)a)[i];
    case 4: return ((const uint32_t *)a)[i];
    default: return ((const uint64_t *)a)[i];
    }
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    unsigned cbits = 9 + (unsigned)(take(&data, &size, 1) % 8);
    unsigned wsel = (unsigned)take(&data, &size, 1);
    unsigned width = 1u << (wsel & 3);
    uint64_t rmax = width == 8 ? UINT64_MAX : (((uint64_t)1 << (8 * width)) - 1);
    if ((wsel & 4) && width == 1) {
        rmax = 1;   /* refcount_bits=1 */
    }
    uint64_t file_size = (take(&data, &size, 2) + 1) << cbits;
    size_t imrt_len = (size_t)take(&data, &size, 2) + 1;
    unsigned preset = (unsigned)take(&data, &size, 1);
    size_t cs = (size_t)1 << cbits, entries = cs / 8;
    size_t ntables = size / cs;
    if (ntables > 8) {
        ntables = 8;
    }
    uint8_t *tables = exact_copy(data, ntables * cs);
    uint8_t *imrt = malloc(imrt_len * width), *before = malloc(imrt_len * width);
    for (size_t i = 0; i < imrt_len * width; i++) {
        imrt[i] = (preset & 1) ? (uint8_t)(i * preset) : 0;
    }
    if (rmax == 1) {
        for (size_t i = 0; i < imrt_len; i++) {
            imrt[i] &= 1;
        }
    }
    memcpy(before, imrt, imrt_len * width);
    uint8_t flags[8] = {0};
    uint64_t stats[6] = {0};
    size_t cap = (preset & 2) ? 4 : 1 << 14;
    uint64_t *rec = malloc(cap * 8);
    int64_t got = qcow2c_l2_count(tables, ntables, entries, cbits, file_size, imrt, width,
                                  imrt_len, rmax, flags, stats, rec, cap);
    FUZZ_ASSERT(got >= 0);
    int64_t set = 0;
    for (size_t k = 0; k < ntables; k++) {
        set += flags[k] != 0;
    }
    FUZZ_ASSERT(set == got);
    uint64_t added = 0;
    for (size_t i = 0; i < imrt_len; i++) {
        uint64_t a = get(before, width, i), b = get(imrt, width, i);
        FUZZ_ASSERT(b >= a);
        FUZZ_ASSERT(width == 8 || b <= rmax || b == a);
        added += b - a;
    }
    FUZZ_ASSERT(added == stats[2] + stats[4]);
    FUZZ_ASSERT(stats[0] == stats[2] + stats[3]);

    /* the same tables with the flagged ones skipped up front: the same IMRT */
    uint8_t *again = malloc(imrt_len * width);
    memcpy(again, before, imrt_len * width);
    uint8_t flags2[8];
    memcpy(flags2, flags, sizeof(flags));
    uint64_t stats2[6] = {0};
    FUZZ_ASSERT(qcow2c_l2_count(tables, ntables, entries, cbits, file_size, again, width,
                                imrt_len, rmax, flags2, stats2, NULL, 0) == 0);
    FUZZ_ASSERT(memcmp(again, imrt, imrt_len * width) == 0);
    FUZZ_ASSERT(memcmp(stats, stats2, 5 * sizeof(uint64_t)) == 0);

    if (stats[5] != UINT64_MAX) {
        FUZZ_ASSERT(stats[5] == stats[2] && stats[5] <= cap);
        for (uint64_t i = 0; i < stats[5]; i++) {
            FUZZ_ASSERT((rec[i] & ~(1ULL << 63)) < imrt_len);
        }
        /* COPIED: the list and the tables agree on the counted tables */
        uint8_t cflags[8];
        memcpy(cflags, flags, sizeof(cflags));
        int64_t wrong_tables = qcow2c_copied(tables, ntables, entries, cbits, imrt, width,
                                             imrt_len, cflags);
        int64_t wrong = qcow2c_copied_list(rec, stats[5], imrt, width, imrt_len);
        FUZZ_ASSERT(wrong_tables >= 0 && wrong >= 0);
        FUZZ_ASSERT((wrong_tables == 0) == (wrong == 0));
    }

    /* compare: a refcount block from the rest of the input */
    size_t rest = size - ntables * cs;
    unsigned bits = 8 * width;
    size_t n = rest / width;
    if (n > imrt_len) {
        n = imrt_len;
    }
    uint8_t *block = exact_copy(data + ntables * cs, n * width);
    uint64_t highest = UINT64_MAX, ref_high = UINT64_MAX;
    int64_t differ = qcow2c_compare((preset & 4) ? NULL : block, bits, imrt, width, 0, n,
                                    &highest);
    int64_t ref = 0;
    for (size_t i = 0; i < n; i++) {
        uint64_t s = 0;
        if (!(preset & 4)) {
            for (unsigned b = 0; b < width; b++) {
                s = (s << 8) | block[i * width + b];
            }
        }
        uint64_t c = get(imrt, width, i);
        ref += s != c;
        if (s | c) {
            ref_high = i;
        }
    }
    FUZZ_ASSERT(differ == ref && highest == ref_high);
    free(block);
    free(again);
    free(rec);
    free(before);
    free(imrt);
    free(tables);
    return 0;
}
