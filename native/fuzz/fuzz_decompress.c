/*
 * fuzz_decompress.c - qcow2n_decompress on untrusted compressed clusters.
 *
 * Header: algo/flags byte (bit 0: zstd, bit 1: strict zlib, bits 2-4: cluster
 * bits 9..16), layout byte (bits 0-1: clusters - 1, bit 2: destination slots
 * in reverse order, bit 3: one source range one byte too long).  The rest is
 * split into that many compressed clusters.
 *
 * Invariants: only the documented return codes; a source range past the
 * input is QCOW2N_ESRCRANGE with nothing written; nothing is written outside
 * the destination slots (the bytes around them are checked); a zlib cluster
 * that both zlib alone (strict) and the default (libdeflate first) decode
 * gives the same bytes.
 */
#include "fuzz_common.h"

#define GUARD 64

static int decode(int algo, unsigned flags, size_t cs, const uint8_t *src, size_t src_size,
                  const uint64_t *so, const uint32_t *sl, const uint64_t *dofs, size_t n,
                  uint8_t *dest, size_t dest_size, size_t *bad)
{
    qcow2n_dctx *ctx = qcow2n_dctx_new(algo, cs, flags);
    if (!ctx) {
        return 1;   /* algorithm not built in */
    }
    int rc = qcow2n_decompress(ctx, dest, dest_size, src, src_size, so, sl, dofs, n, bad);
    qcow2n_dctx_free(ctx);
    return rc;
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    unsigned mode = (unsigned)take(&data, &size, 1);
    unsigned layout = (unsigned)take(&data, &size, 1);
    int algo = (mode & 1) ? QCOW2N_ALGO_ZSTD : QCOW2N_ALGO_ZLIB;
    unsigned flags = (mode & 2) ? QCOW2N_DCTX_STRICT : 0;
    size_t cs = (size_t)1 << (9 + ((mode >> 2) & 7));
    size_t n = (layout & 3) + 1;
    int reverse = (layout >> 2) & 1;
    int too_long = (layout >> 3) & 1;

    uint8_t *src = exact_copy(data, size);
    uint64_t so[4], dofs[4];
    uint32_t sl[4];
    for (size_t i = 0; i < n; i++) {
        so[i] = size * i / n;
        sl[i] = (uint32_t)(size * (i + 1) / n - so[i]);
        dofs[i] = GUARD + (reverse ? n - 1 - i : i) * cs;
    }
    if (too_long) {
        sl[n - 1]++;
    }
    size_t dest_size = n * cs + 2 * GUARD;
    uint8_t *dest = malloc(dest_size);
    memset(dest, 0xA5, dest_size);
    size_t bad = (size_t)-1;
    int rc = decode(algo, flags, cs, src, size, so, sl, dofs, n, dest, dest_size, &bad);
    if (rc == 1) {
        goto out;
    }
    FUZZ_ASSERT(rc == QCOW2N_OK || rc == QCOW2N_EDATA || rc == QCOW2N_ESHORT ||
                rc == QCOW2N_ELONG || rc == QCOW2N_ESRCRANGE || rc == QCOW2N_ENOMEM);
    FUZZ_ASSERT(rc == QCOW2N_OK || bad < n);
    for (size_t i = 0; i < GUARD; i++) {
        FUZZ_ASSERT(dest[i] == 0xA5 && dest[dest_size - 1 - i] == 0xA5);
    }
    if (too_long) {
        FUZZ_ASSERT(rc == QCOW2N_ESRCRANGE && bad == n - 1);
        for (size_t i = 0; i < dest_size; i++) {
            FUZZ_ASSERT(dest[i] == 0xA5);
        }
        goto out;
    }
    if (rc == QCOW2N_OK && algo == QCOW2N_ALGO_ZLIB && !flags) {
        /* the default decoded it: where zlib alone does too, the same bytes */
        uint8_t *strict = malloc(dest_size);
        memset(strict, 0xA5, dest_size);
        if (decode(algo, QCOW2N_DCTX_STRICT, cs, src, size, so, sl, dofs, n, strict,
                   dest_size, &bad) == QCOW2N_OK) {
            FUZZ_ASSERT(memcmp(strict, dest, dest_size) == 0);
        }
        free(strict);
    }
out:
    free(dest);
    free(src);
    return 0;
}
