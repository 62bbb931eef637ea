/*
 * xts.h - the sector-cipher kernels of encrypted images (native/xts.c).
 *
 * Declarations only, fed to cffi's cdef() after qcow2_native.h (same rules:
 * no #include, no include guard).  Nothing here is AES: the block cipher runs
 * in pyca cryptography (AES-ECB over whole buffers); these kernels do the
 * arithmetic around it, per sector of sector_size bytes (a multiple of 16,
 * at most 4096; 512 for qcow2), over whole buffers at a time, so Python
 * makes one call per megabyte rather than per sector.  All 16-byte values
 * are little-endian 128-bit numbers, as XTS (IEEE 1619) defines them.
 * Each returns 0 or QCOW2N_EINVAL when a size does not match.
 */

/*
 * qcow2n_xts_xor - XTS masking: block j of sector s of @src, XORed with
 * T_s * alpha^j (in GF(2^128), x^128 = x^7 + x^2 + x + 1) where T_s is the
 * s-th 16-byte value of @tweaks (the encrypted sector IV), into @dest.
 * @dest may be @src.  Run before and after AES-ECB, this is XTS.
 */
int qcow2n_xts_xor(uint8_t *dest, size_t dest_size,
                   const uint8_t *src, size_t src_size,
                   const uint8_t *tweaks, size_t tweaks_size,
                   size_t sector_size);

/*
 * qcow2n_cbc_unchain - CBC decryption after ECB: block j of sector s of
 * @dest = block j of @plain (the AES decryption of @cipher) XOR block j-1 of
 * @cipher, or for j = 0 the sector's IV (16 bytes each in @ivs).  @dest may
 * be @cipher (the ciphertext is then replaced by the plaintext).
 */
int qcow2n_cbc_unchain(uint8_t *dest, size_t dest_size,
                       const uint8_t *plain, size_t plain_size,
                       const uint8_t *cipher, size_t cipher_size,
                       const uint8_t *ivs, size_t ivs_size,
                       size_t sector_size);

/*
 * qcow2n_cbc_lane - one step of CBC encryption across all sectors at once.
 * @lane holds one 16-byte block per sector.  Step @j (0..blocks per sector):
 * when j > 0, the lane (block j-1 of every sector, just AES-encrypted) is
 * stored into @data; when j < blocks per sector, the lane is loaded with
 * block j of every sector XOR its chaining value (block j-1, now ciphertext,
 * or the IV for j = 0).  Steps 0..n with an AES-ECB pass over the lane
 * between them encrypt @data in place.
 */
int qcow2n_cbc_lane(uint8_t *data, size_t data_size,
                    uint8_t *lane, size_t lane_size,
                    const uint8_t *ivs, size_t ivs_size,
                    size_t sector_size, size_t j);

/*
 * qcow2n_sector_ivs - the plain IVs of dest_size / 16 sectors from @first:
 * (first + i) & @mask (0xffffffff for "plain", all ones for "plain64") as a
 * little-endian 128-bit number each.
 */
int qcow2n_sector_ivs(uint8_t *dest, size_t dest_size, uint64_t first, uint64_t mask);
