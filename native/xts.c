/*
 * xts.c - the arithmetic around AES of the sector ciphers (XTS masks, CBC
 * chaining); see xts.h.  The AES itself is pyca cryptography's (OpenSSL).
 */

#include <stddef.h>
#include <stdint.h>
#include <string.h>

#include "qcow2_native.h"
#include "xts.h"

#define MAX_SECTOR 4096

#if defined(__BYTE_ORDER__) && __BYTE_ORDER__ == __ORDER_LITTLE_ENDIAN__
static inline uint64_t get_le64(const uint8_t *p)
{
    uint64_t v;
    memcpy(&v, p, 8);
    return v;
}

static inline void put_le64(uint8_t *p, uint64_t v)
{
    memcpy(p, &v, 8);
}
#else
static inline uint64_t get_le64(const uint8_t *p)
{
    return (uint64_t)p[0] | (uint64_t)p[1] << 8 | (uint64_t)p[2] << 16
        | (uint64_t)p[3] << 24 | (uint64_t)p[4] << 32 | (uint64_t)p[5] << 40
        | (uint64_t)p[6] << 48 | (uint64_t)p[7] << 56;
}

static inline void put_le64(uint8_t *p, uint64_t v)
{
    int i;

    for (i = 0; i < 8; i++) {
        p[i] = (uint8_t)(v >> (8 * i));
    }
}
#endif

/* dest = a ^ b over n bytes (n a multiple of 8); dest may be a or b. */
static void xor_words(uint8_t *dest, const uint8_t *a, const uint8_t *b, size_t n)
{
    size_t i;

    for (i = 0; i < n; i += 8) {
        uint64_t x, y;
        memcpy(&x, a + i, 8);
        memcpy(&y, b + i, 8);
        x ^= y;
        memcpy(dest + i, &x, 8);
    }
}

/* The number of sectors, or 0 with *bad set when the sizes do not fit. */
static size_t sectors(size_t size, size_t sector_size, int *bad)
{
    if (sector_size == 0 || sector_size % 16 || sector_size > MAX_SECTOR
            || size % sector_size) {
        *bad = 1;
        return 0;
    }
    return size / sector_size;
}

/* LANES sectors at a time: their tweak chains are independent, so the CPU runs
 * them side by side instead of waiting on one chain's latency. */
#define LANES 8

#if defined(__SSE2__)
#include <emmintrin.h>

/* SSE2 (any x86-64): a tweak in one register; times alpha is both 64-bit halves
 * doubled, plus the bit that left the low half into the high one and 0x87 for
 * the bit that left the top, both picked from the dwords' signs. */
static void xts_sectors(uint8_t *dest, const uint8_t *src, const uint8_t *tweaks,
                        size_t sector_size, size_t lanes)
{
    __m128i t[LANES];
    const __m128i fold = _mm_set_epi32(0, 1, 0, 0x87);
    size_t j, k;

    for (k = 0; k < lanes; k++) {
        t[k] = _mm_loadu_si128((const __m128i *)(tweaks + 16 * k));
    }
    for (j = 0; j < sector_size; j += 16) {
        for (k = 0; k < lanes; k++) {
            const uint8_t *in = src + k * sector_size + j;
            __m128i carry = _mm_and_si128(
                _mm_shuffle_epi32(_mm_srai_epi32(t[k], 31), 0x13), fold);

            _mm_storeu_si128((__m128i *)(dest + k * sector_size + j),
                             _mm_xor_si128(_mm_loadu_si128((const __m128i *)in), t[k]));
            t[k] = _mm_xor_si128(_mm_add_epi64(t[k], t[k]), carry);
        }
    }
}
#else
static void xts_sectors(uint8_t *dest, const uint8_t *src, const uint8_t *tweaks,
                        size_t sector_size, size_t lanes)
{
    uint64_t lo[LANES], hi[LANES];
    size_t j, k;

    for (k = 0; k < lanes; k++) {
        lo[k] = get_le64(tweaks + 16 * k);
        hi[k] = get_le64(tweaks + 16 * k + 8);
    }
    /* the mask of each block, then the next one: times alpha (a shift left, the
     * bit shifted out of the top folding back in as 0x87) */
    for (j = 0; j < sector_size; j += 16) {
        for (k = 0; k < lanes; k++) {
            const uint8_t *in = src + k * sector_size + j;
            uint8_t *out = dest + k * sector_size + j;
            uint64_t carry = hi[k] >> 63;

            put_le64(out, get_le64(in) ^ lo[k]);
            put_le64(out + 8, get_le64(in + 8) ^ hi[k]);
            hi[k] = hi[k] << 1 | lo[k] >> 63;
            lo[k] = lo[k] << 1 ^ (0x87 & (0 - carry));
        }
    }
}
#endif

int qcow2n_xts_xor(uint8_t *dest, size_t dest_size,
                   const uint8_t *src, size_t src_size,
                   const uint8_t *tweaks, size_t tweaks_size,
                   size_t sector_size)
{
    int bad = 0;
    size_t n = sectors(src_size, sector_size, &bad), s;

    if (bad || dest_size != src_size || tweaks_size != n * 16) {
        return QCOW2N_EINVAL;
    }
    for (s = 0; s + LANES <= n; s += LANES) {
        xts_sectors(dest + s * sector_size, src + s * sector_size, tweaks + 16 * s,
                    sector_size, LANES);
    }
    if (s < n) {
        xts_sectors(dest + s * sector_size, src + s * sector_size, tweaks + 16 * s,
                    sector_size, n - s);
    }
    return 0;
}

int qcow2n_cbc_unchain(uint8_t *dest, size_t dest_size,
                       const uint8_t *plain, size_t plain_size,
                       const uint8_t *cipher, size_t cipher_size,
                       const uint8_t *ivs, size_t ivs_size,
                       size_t sector_size)
{
    int bad = 0;
    size_t n = sectors(dest_size, sector_size, &bad), s, j;

    if (bad || plain_size != dest_size || cipher_size != dest_size || ivs_size != n * 16) {
        return QCOW2N_EINVAL;
    }
    for (s = 0; s < n; s++) {
        size_t off = s * sector_size;
        uint8_t prev[16], next[16];

        memcpy(prev, ivs + 16 * s, 16);
        for (j = 0; j < sector_size; j += 16) {
            memcpy(next, cipher + off + j, 16);      /* before dest overwrites it */
            xor_words(dest + off + j, plain + off + j, prev, 16);
            memcpy(prev, next, 16);
        }
    }
    return 0;
}

int qcow2n_cbc_lane(uint8_t *data, size_t data_size,
                    uint8_t *lane, size_t lane_size,
                    const uint8_t *ivs, size_t ivs_size,
                    size_t sector_size, size_t j)
{
    int bad = 0;
    size_t n = sectors(data_size, sector_size, &bad), s, blocks = sector_size / 16;

    if (bad || lane_size != n * 16 || ivs_size != n * 16 || j > blocks) {
        return QCOW2N_EINVAL;
    }
    for (s = 0; s < n; s++) {
        uint8_t *sec = data + s * sector_size;

        if (j > 0) {
            memcpy(sec + 16 * (j - 1), lane + 16 * s, 16);
        }
        if (j < blocks) {
            xor_words(lane + 16 * s, sec + 16 * j,
                      j > 0 ? sec + 16 * (j - 1) : ivs + 16 * s, 16);
        }
    }
    return 0;
}

int qcow2n_sector_ivs(uint8_t *dest, size_t dest_size, uint64_t first, uint64_t mask)
{
    size_t i;

    if (dest_size % 16) {
        return QCOW2N_EINVAL;
    }
    for (i = 0; i < dest_size / 16; i++) {
        put_le64(dest + 16 * i, (first + i) & mask);
        put_le64(dest + 16 * i + 8, 0);
    }
    return 0;
}
