/*
 * zero.c - find all-zero blocks (to skip them when converting or writing).
 */

#include <stddef.h>
#include <stdint.h>
#include <string.h>

#include "qcow2_native.h"

/*
 * OR 256 bytes at a time into four 64-bit lanes (memcpy loads are alignment
 * safe and compile to plain vector loads), test once per 256 bytes, and
 * finish the tail bytewise.  Non-zero data usually fails on the first test.
 */
static int all_zero(const uint8_t *p, size_t n)
{
    size_t i = 0;

    if (n >= 16) {
        uint64_t head[2];
        memcpy(head, p, 16);
        if (head[0] | head[1]) {
            return 0;
        }
    }
    while (n - i >= 256) {
        uint64_t w[32], acc = 0;
        int k;

        memcpy(w, p + i, sizeof(w));
        for (k = 0; k < 32; k++) {
            acc |= w[k];
        }
        if (acc) {
            return 0;
        }
        i += 256;
    }
    while (n - i >= 8) {
        uint64_t w;
        memcpy(&w, p + i, 8);
        if (w) {
            return 0;
        }
        i += 8;
    }
    for (; i < n; i++) {
        if (p[i]) {
            return 0;
        }
    }
    return 1;
}

/* qcow2n_is_zero - 1 when all @src_size bytes of @src are zero, else 0. */
int qcow2n_is_zero(const uint8_t *src, size_t src_size)
{
    return all_zero(src, src_size);
}

/*
 * qcow2n_zero_blocks - one flag per @block_size bytes of @src (the last block
 * may be partial): 1 where the block is all zeros; see qcow2_native.h.
 */
int qcow2n_zero_blocks(uint8_t *dest, size_t dest_size,
                       const uint8_t *src, size_t src_size,
                       size_t block_size)
{
    size_t nblocks, b;

    if (block_size == 0) {
        return QCOW2N_EINVAL;
    }
    nblocks = src_size / block_size + (src_size % block_size != 0);
    if (nblocks > dest_size) {
        return QCOW2N_ENOSPC;
    }
    for (b = 0; b < nblocks; b++) {
        size_t off = b * block_size;
        size_t len = src_size - off < block_size ? src_size - off : block_size;
        dest[b] = (uint8_t)all_zero(src + off, len);
    }
    return 0;
}
