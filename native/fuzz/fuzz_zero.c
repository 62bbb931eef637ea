/*
 * fuzz_zero.c - qcow2n_zero_blocks and qcow2n_is_zero on any bytes.
 *
 * Header: block size (2 bytes, 0 included), capacity slack (1 byte), a
 * "mostly zero" switch (1 byte: the data is ANDed with a sparse mask so that
 * zero blocks are common).  Both answers are compared with a byte-by-byte
 * reference.
 */
#include "fuzz_common.h"

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    size_t bs = (size_t)take(&data, &size, 2);
    size_t slack = (size_t)take(&data, &size, 1);
    unsigned sparse = (unsigned)take(&data, &size, 1);
    uint8_t *src = exact_copy(data, size);
    if (sparse & 1) {
        for (size_t i = 0; i < size; i++) {
            if ((i * 2654435761u >> 7) % 61 != 0) {
                src[i] = 0;
            }
        }
    }
    int ref_all = 1;
    for (size_t i = 0; i < size; i++) {
        ref_all &= src[i] == 0;
    }
    FUZZ_ASSERT(qcow2n_is_zero(src, size) == ref_all);

    size_t need = bs ? (size + bs - 1) / bs : 0;
    size_t cap = (slack & 0x80) ? (need > (slack & 0x7f) ? need - (slack & 0x7f) : 0)
                                : need + (slack & 0x7f);
    uint8_t *dest = malloc(cap ? cap : 1);
    int rc = qcow2n_zero_blocks(dest, cap, src, size, bs);
    if (!bs) {
        FUZZ_ASSERT(rc == QCOW2N_EINVAL);
    } else if (cap < need) {
        FUZZ_ASSERT(rc == QCOW2N_ENOSPC);
    } else {
        FUZZ_ASSERT(rc == QCOW2N_OK);
        for (size_t b = 0; b < need; b++) {
            int z = 1;
            for (size_t i = b * bs; i < size && i < (b + 1) * bs; i++) {
                z &= src[i] == 0;
            }
            FUZZ_ASSERT(dest[b] == z);
        }
    }
    free(dest);
    free(src);
    return 0;
}
