/*
 * fuzz_l2.c - qcow2n_l2_runs on an untrusted L2 table.
 *
 * Header: cluster bits (9 + byte % 13), flags byte (QCOW2N_L2_* bits, unknown
 * bits included now and then), first entry (2 bytes), entry count (2 bytes),
 * run capacity (2 bytes).  The rest is the table.
 *
 * Invariants: only the documented return codes; on success the runs tile the
 * slice exactly (starts from 0, each run where the last ended, lengths adding
 * up to count units), kinds are QCOW2N_KIND_*, a compressed run is one whole
 * cluster, hosts are zero where the kind has no host cluster; on an L2 error
 * the bad index lies in the slice; never more runs than the capacity.
 */
#include "fuzz_common.h"

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    unsigned cbits = 9 + (unsigned)(take(&data, &size, 1) % 13);
    unsigned flags = (unsigned)take(&data, &size, 1);
    size_t first = (size_t)take(&data, &size, 2);
    size_t count = (size_t)take(&data, &size, 2);
    size_t cap = (size_t)take(&data, &size, 2) % 2048;
    if (!(flags & 0x80)) {
        flags &= 7;     /* mostly valid flags */
    }
    const int extended = flags & QCOW2N_L2_EXTENDED;
    const size_t esize = extended ? 16 : 8;
    const uint32_t upc = extended ? 32 : 1;
    if (!(flags & 0x40)) {   /* mostly a slice that fits */
        size_t entries = size / esize;
        first = entries ? first % entries : 0;
        count = entries - first ? count % (entries - first + 1) : 0;
    }

    uint8_t *src = exact_copy(data, size);
    qcow2n_runs runs = {
        malloc(cap ? cap : 1), malloc((cap ? cap : 1) * 4), malloc((cap ? cap : 1) * 4),
        malloc((cap ? cap : 1) * 8), malloc((cap ? cap : 1) * 4),
    };
    size_t n_runs = (size_t)-1, bad = (size_t)-1;
    int rc = qcow2n_l2_runs(&runs, cap, src, size, first, count, cbits, flags, &n_runs, &bad);
    FUZZ_ASSERT(rc == QCOW2N_OK || rc == QCOW2N_EINVAL || rc == QCOW2N_ENOSPC ||
                rc == QCOW2N_EL2RESERVED || rc == QCOW2N_EL2BITMAP ||
                rc == QCOW2N_EL2UNALIGNED);
    FUZZ_ASSERT(n_runs <= cap);
    if (rc == QCOW2N_EL2RESERVED || rc == QCOW2N_EL2BITMAP || rc == QCOW2N_EL2UNALIGNED) {
        FUZZ_ASSERT(bad >= first && bad < first + count);
    }
    if (rc == QCOW2N_OK) {
        uint64_t next = 0;
        for (size_t i = 0; i < n_runs; i++) {
            uint8_t k = runs.kinds[i];
            FUZZ_ASSERT(k <= QCOW2N_KIND_COMPRESSED);
            FUZZ_ASSERT(runs.starts[i] == next && runs.lens[i] > 0);
            next += runs.lens[i];
            if (k == QCOW2N_KIND_COMPRESSED) {
                FUZZ_ASSERT(runs.lens[i] == upc && runs.starts[i] % upc == 0);
                FUZZ_ASSERT(runs.csizes[i] >= 1);
            } else if (k == QCOW2N_KIND_UNALLOC || k == QCOW2N_KIND_ZERO) {
                FUZZ_ASSERT(runs.hosts[i] == 0);
            }
        }
        FUZZ_ASSERT(next == (uint64_t)count * upc);
    }
    free(runs.kinds);
    free(runs.starts);
    free(runs.lens);
    free(runs.hosts);
    free(runs.csizes);
    free(src);
    return 0;
}
