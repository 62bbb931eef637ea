/*
 * fuzz_common.h - shared bits of the libFuzzer harnesses (native/fuzz/README.md).
 *
 * Each harness reads a small header from the front of the input (the
 * parameters of the call) and hands the rest to one kernel as the untrusted
 * bytes.  Buffers are allocated at their exact sizes so AddressSanitizer sees
 * any access past them; a broken invariant aborts (a crash for libFuzzer).
 */
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "qcow2_native.h"
#include "qcow2_check.h"

#define FUZZ_ASSERT(cond)                                                     \
    do {                                                                      \
        if (!(cond)) {                                                        \
            fprintf(stderr, "%s:%d: invariant broken: %s\n", __FILE__,        \
                    __LINE__, #cond);                                         \
            abort();                                                          \
        }                                                                     \
    } while (0)

/* Take n bytes of header from the input (zeros once it runs out). */
static inline uint64_t take(const uint8_t **data, size_t *size, unsigned n)
{
    uint64_t v = 0;
    for (unsigned i = 0; i < n; i++) {
        v <<= 8;
        if (*size) {
            v |= **data;
            (*data)++;
            (*size)--;
        }
    }
    return v;
}

/* A copy of the input in a buffer of exactly its size (libFuzzer's own may
 * be followed by readable bytes of the same allocation). */
static inline uint8_t *exact_copy(const uint8_t *data, size_t size)
{
    uint8_t *p = malloc(size ? size : 1);
    if (p && size) {
        memcpy(p, data, size);
    }
    return p;
}
