/*
 * codec.c - batched compression and decompression of qcow2 clusters.
 *
 * Semantics are QEMU's (block/qcow2-threads.c):
 *   zlib: raw deflate with a 4 KiB window (windowBits -12).  A cluster
 *         decodes iff exactly cluster_size bytes come out before any error;
 *         input left over after the output is full is ignored, since the
 *         L2 entry only gives the compressed length rounded up to sectors.
 *   zstd: ZSTD_decompressStream() until the cluster is full; several frames
 *         may follow each other; the last frame must end exactly at the
 *         cluster end.
 * libdeflate, when built in and not refused with QCOW2N_DCTX_STRICT, is tried
 * first for zlib clusters; anything but a clean success with exactly one
 * cluster of output is redone with zlib.  On valid streams both produce the
 * same bytes; libdeflate also accepts a few malformed streams zlib refuses
 * (see qcow2n_dctx_new() in qcow2_native.h), hence the strict mode.
 *
 * Compression of zlib clusters stays with zlib and QEMU's parameters (a 4 KiB
 * window).  libdeflate's compressor is 1.7x faster at the same level, but its
 * matches reach back 32 KiB: QEMU's one-call inflate takes them, a decoder
 * that honours the 4 KiB window and inflates in pieces (Python's
 * zlib.decompress(data, -12), for one) refuses 94% of such clusters.
 */

#include <stddef.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include <zlib.h>
#ifdef HAVE_ZSTD
#include <zstd.h>
#include <zstd_errors.h>
#endif
#ifdef HAVE_LIBDEFLATE
#include <libdeflate.h>
#endif

#include "qcow2_native.h"

/* What both context kinds start with (codec_new() fills it in). */
struct codec {
    int algo;
    size_t cluster_size;
    int zinit;                  /* zs initialised */
    z_stream zs;
};

struct qcow2n_dctx {
    struct codec c;             /* first member: see codec_new() */
#ifdef HAVE_LIBDEFLATE
    struct libdeflate_decompressor *ld;
#endif
#ifdef HAVE_ZSTD
    ZSTD_DCtx *zd;
#endif
};

/*
 * Another copy of libzstd's compressor, reached through its entry points
 * (qcow2n_cctx_new_zstd_api()): for instance the newer release that
 * python-zstandard bundles.  The types are libzstd's, with its opaque
 * ZSTD_CCtx as void and its enums as int (the same ABI).
 */
struct zstd_api {
    void *(*create_cctx)(void);
    size_t (*free_cctx)(void *cctx);
    size_t (*set_parameter)(void *cctx, int param, int value);
    size_t (*compress2)(void *cctx, void *dst, size_t dst_capacity,
                        const void *src, size_t src_size);
    unsigned (*is_error)(size_t code);
    int (*get_error_code)(size_t code);
};

/* libzstd's stable numbers (zstd.h, zstd_errors.h), for the copy above. */
#define ZSTD_API_C_COMPRESSION_LEVEL 100    /* ZSTD_c_compressionLevel */
#define ZSTD_API_E_DST_TOO_SMALL     70     /* ZSTD_error_dstSize_tooSmall */
#ifdef HAVE_ZSTD
typedef char zstd_api_level_check[
    ZSTD_c_compressionLevel == ZSTD_API_C_COMPRESSION_LEVEL ? 1 : -1];
typedef char zstd_api_error_check[
    ZSTD_error_dstSize_tooSmall == ZSTD_API_E_DST_TOO_SMALL ? 1 : -1];
#endif
/* The entry points arrive as data pointers (see qcow2_native.h). */
typedef char zstd_api_pointer_check[
    sizeof(void *) == sizeof(void (*)(void)) ? 1 : -1];

struct qcow2n_cctx {
    struct codec c;             /* first member: see codec_new() */
#ifdef HAVE_ZSTD
    ZSTD_CCtx *zc;
#endif
    void *ext;                  /* the other copy's context, or NULL */
    struct zstd_api api;        /* its entry points (when ext is set) */
};

static void *codec_alloc(size_t size, int algo, size_t cluster_size);

/*
 * codec_new - allocate a zeroed context of @size bytes whose first member is
 * a struct codec, for @algo (compiled in) and @cluster_size (a power of two
 * in QCOW2N_MIN_CLUSTER_SIZE..QCOW2N_MAX_CLUSTER_SIZE).  NULL on a bad
 * argument or when memory is short.
 */
static void *codec_new(size_t size, int algo, size_t cluster_size)
{
#ifndef HAVE_ZSTD
    if (algo == QCOW2N_ALGO_ZSTD) {
        return NULL;
    }
#endif
    return codec_alloc(size, algo, cluster_size);
}

/* codec_new() for any algorithm, built in or not. */
static void *codec_alloc(size_t size, int algo, size_t cluster_size)
{
    struct codec *c;

    if (cluster_size < QCOW2N_MIN_CLUSTER_SIZE ||
        cluster_size > QCOW2N_MAX_CLUSTER_SIZE ||
        (cluster_size & (cluster_size - 1)) != 0) {
        return NULL;
    }
    if (algo != QCOW2N_ALGO_ZLIB && algo != QCOW2N_ALGO_ZSTD) {
        return NULL;
    }
    c = calloc(1, size);
    if (c) {
        c->algo = algo;
        c->cluster_size = cluster_size;
    }
    return c;
}

/* Release what codec_new() allocated, ending the zlib stream with @end. */
static void codec_free(struct codec *c, int (*end)(z_streamp))
{
    if (c->zinit) {
        end(&c->zs);
    }
    free(c);
}

/* Point @zs at one cluster's input and output. */
static void zstream_point(z_stream *zs, uint8_t *dest, size_t dest_size,
                          const uint8_t *src, size_t src_size)
{
    zs->next_in = (Bytef *)(uintptr_t)src;
    zs->avail_in = (uInt)src_size;
    zs->next_out = dest;
    zs->avail_out = (uInt)dest_size;
}

/* qcow2n_version - see qcow2_native.h. */
int qcow2n_version(void)
{
    return QCOW2N_VERSION;
}

/* qcow2n_features - see qcow2_native.h. */
unsigned qcow2n_features(void)
{
    unsigned f = 0;
#ifdef HAVE_ZSTD
    f |= QCOW2N_FEATURE_ZSTD;
#endif
#ifdef HAVE_LIBDEFLATE
    f |= QCOW2N_FEATURE_LIBDEFLATE;
#endif
    return f;
}

/* qcow2n_zstd_version - see qcow2_native.h. */
unsigned qcow2n_zstd_version(void)
{
#ifdef HAVE_ZSTD
    return ZSTD_versionNumber();
#else
    return 0;
#endif
}

/* ------------------------------------------------------------------------ */
/* Decompression                                                             */

/*
 * qcow2n_dctx_new - a decompression context: zlib's inflate state with a
 * 4 KiB window (and libdeflate's decompressor unless strict), or a zstd one.
 */
qcow2n_dctx *qcow2n_dctx_new(int algo, size_t cluster_size, unsigned flags)
{
    qcow2n_dctx *ctx;
    int ok = 0;

    if (flags & ~QCOW2N_DCTX_STRICT) {
        return NULL;
    }
    ctx = codec_new(sizeof(*ctx), algo, cluster_size);
    if (!ctx) {
        return NULL;
    }
    if (algo == QCOW2N_ALGO_ZLIB) {
        ok = ctx->c.zinit = inflateInit2(&ctx->c.zs, -12) == Z_OK;
#ifdef HAVE_LIBDEFLATE
        if (ok && !(flags & QCOW2N_DCTX_STRICT)) {
            ctx->ld = libdeflate_alloc_decompressor();
            ok = ctx->ld != NULL;
        }
#endif
    }
#ifdef HAVE_ZSTD
    if (algo == QCOW2N_ALGO_ZSTD) {
        ctx->zd = ZSTD_createDCtx();
        ok = ctx->zd != NULL;
    }
#endif
    if (!ok) {
        qcow2n_dctx_free(ctx);
        ctx = NULL;
    }
    return ctx;
}

/* qcow2n_dctx_free - release a decompression context (NULL is fine). */
void qcow2n_dctx_free(qcow2n_dctx *ctx)
{
    if (!ctx) {
        return;
    }
#ifdef HAVE_LIBDEFLATE
    if (ctx->ld) {
        libdeflate_free_decompressor(ctx->ld);
    }
#endif
#ifdef HAVE_ZSTD
    ZSTD_freeDCtx(ctx->zd);
#endif
    codec_free(&ctx->c, inflateEnd);
}

/* One zlib cluster, exactly as qcow2_zlib_decompress(). */
static int inflate_cluster(qcow2n_dctx *ctx, uint8_t *dest, size_t dest_size,
                           const uint8_t *src, size_t src_size)
{
    z_stream *zs = &ctx->c.zs;
    int ret;

#ifdef HAVE_LIBDEFLATE
    if (ctx->ld) {
        size_t in_used = 0, out_got = 0;
        enum libdeflate_result r;

        r = libdeflate_deflate_decompress_ex(ctx->ld, src, src_size, dest,
                                             dest_size, &in_used, &out_got);
        if (r == LIBDEFLATE_SUCCESS && out_got == dest_size) {
            return 0;
        }
        /* Short stream, stream longer than a cluster (accepted by QEMU:
         * the output is simply full), or bad data: let zlib decide. */
    }
#endif
    if (inflateReset(zs) != Z_OK) {
        return QCOW2N_ENOMEM;
    }
    zstream_point(zs, dest, dest_size, src, src_size);
    ret = inflate(zs, Z_FINISH);
    /* Z_BUF_ERROR with a full output is fine: input may be left over. */
    if ((ret == Z_STREAM_END || ret == Z_BUF_ERROR) && zs->avail_out == 0) {
        return 0;
    }
    if (ret == Z_STREAM_END || ret == Z_BUF_ERROR || ret == Z_OK) {
        return QCOW2N_ESHORT;
    }
    if (ret == Z_MEM_ERROR) {
        return QCOW2N_ENOMEM;
    }
    return QCOW2N_EDATA;
}

#ifdef HAVE_ZSTD
/* One zstd cluster, exactly as qcow2_zstd_decompress(). */
static int zstd_cluster(qcow2n_dctx *ctx, uint8_t *dest, size_t dest_size,
                        const uint8_t *src, size_t src_size)
{
    ZSTD_outBuffer out = { dest, dest_size, 0 };
    ZSTD_inBuffer in = { src, src_size, 0 };
    size_t zret = 0;

    /*
     * Fast path for what QEMU writes: one single-segment frame (its window
     * is its content size, so the streaming decoder's window limit cannot
     * refuse it) holding exactly one cluster.  One-shot decoding of that
     * frame alone is ~25% faster; any other outcome is redone below.
     */
    if (src_size >= 6 && src[0] == 0x28 && src[1] == 0xb5 && src[2] == 0x2f &&
        src[3] == 0xfd && (src[4] & 0x20)) {
        size_t fsize = ZSTD_findFrameCompressedSize(src, src_size);
        if (!ZSTD_isError(fsize) &&
            ZSTD_decompressDCtx(ctx->zd, dest, dest_size, src, fsize)
            == dest_size) {
            return 0;
        }
    }

    ZSTD_DCtx_reset(ctx->zd, ZSTD_reset_session_only);
    while (out.pos < out.size) {
        size_t last_in = in.pos, last_out = out.pos;

        zret = ZSTD_decompressStream(ctx->zd, &out, &in);
        if (ZSTD_isError(zret)) {
            if (ZSTD_getErrorCode(zret) == ZSTD_error_memory_allocation) {
                return QCOW2N_ENOMEM;
            }
            return QCOW2N_EDATA;
        }
        /* No progress at all: the input is used up (QEMU's guard against
         * spinning while zstd waits for more input). */
        if (in.pos <= last_in && out.pos <= last_out) {
            return QCOW2N_ESHORT;
        }
    }
    /* The output is full; a nonzero hint means the frame goes on. */
    if (zret != 0) {
        return QCOW2N_ELONG;
    }
    return 0;
}
#endif

/*
 * qcow2n_decompress - check every range, then decode cluster by cluster
 * (zstd_cluster() or inflate_cluster()); see qcow2_native.h.
 */
int qcow2n_decompress(qcow2n_dctx *ctx, uint8_t *dest, size_t dest_size,
                      const uint8_t *src, size_t src_size,
                      const uint64_t *src_offsets, const uint32_t *src_lengths,
                      const uint64_t *dest_offsets, size_t n,
                      size_t *bad_index)
{
    const size_t cs = ctx ? ctx->c.cluster_size : 0;
    size_t i;

    if (!ctx) {
        return QCOW2N_EINVAL;
    }
    /* Check every range first, so a bad argument writes nothing. */
    for (i = 0; i < n; i++) {
        uint64_t so = src_offsets[i], dofs;

        if (so > src_size || src_lengths[i] > src_size - so) {
            *bad_index = i;
            return QCOW2N_ESRCRANGE;
        }
        dofs = dest_offsets ? dest_offsets[i] : (uint64_t)i * cs;
        if (dofs > dest_size || cs > dest_size - dofs) {
            *bad_index = i;
            return QCOW2N_EDSTRANGE;
        }
    }
    for (i = 0; i < n; i++) {
        uint8_t *d = dest + (dest_offsets ? dest_offsets[i] : (uint64_t)i * cs);
        const uint8_t *s = src + src_offsets[i];
        int ret;

#ifdef HAVE_ZSTD
        if (ctx->c.algo == QCOW2N_ALGO_ZSTD) {
            ret = zstd_cluster(ctx, d, cs, s, src_lengths[i]);
        } else
#endif
        {
            ret = inflate_cluster(ctx, d, cs, s, src_lengths[i]);
        }
        if (ret < 0) {
            *bad_index = i;
            return ret;
        }
    }
    return 0;
}

/* ------------------------------------------------------------------------ */
/* Compression                                                               */

/* qcow2n_cctx_free - release a compression context (NULL is fine). */
void qcow2n_cctx_free(qcow2n_cctx *ctx)
{
    if (ctx) {
#ifdef HAVE_ZSTD
        ZSTD_freeCCtx(ctx->zc);
#endif
        if (ctx->ext) {
            ctx->api.free_cctx(ctx->ext);
        }
        codec_free(&ctx->c, deflateEnd);
    }
}

/*
 * qcow2n_cctx_new - a compression context with QEMU's parameters: raw
 * deflate with a 4 KiB window and memLevel 9, or zstd at @level.
 */
qcow2n_cctx *qcow2n_cctx_new(int algo, size_t cluster_size, int level)
{
    qcow2n_cctx *ctx;
    int ok = 0;

    if (algo == QCOW2N_ALGO_ZLIB && (level < -1 || level > 9)) {
        return NULL;
    }
    ctx = codec_new(sizeof(*ctx), algo, cluster_size);
    if (!ctx) {
        return NULL;
    }
    if (algo == QCOW2N_ALGO_ZLIB) {
        /* QEMU: "best compression, small window, no zlib header" */
        ok = ctx->c.zinit = deflateInit2(&ctx->c.zs, level, Z_DEFLATED, -12,
                                         9, Z_DEFAULT_STRATEGY) == Z_OK;
    }
#ifdef HAVE_ZSTD
    if (algo == QCOW2N_ALGO_ZSTD) {
        ctx->zc = ZSTD_createCCtx();
        ok = ctx->zc != NULL &&
             (level == 0 ||
              !ZSTD_isError(ZSTD_CCtx_setParameter(ctx->zc,
                                                   ZSTD_c_compressionLevel,
                                                   level)));
    }
#endif
    if (!ok) {
        qcow2n_cctx_free(ctx);
        ctx = NULL;
    }
    return ctx;
}

/*
 * qcow2n_cctx_new_zstd_api - a zstd compression context on another copy of
 * libzstd, given by its entry points; see qcow2_native.h.
 */
qcow2n_cctx *qcow2n_cctx_new_zstd_api(size_t cluster_size, int level,
                                      void *const *fns, size_t n_fns)
{
    void *slots[QCOW2N_ZSTD_API_FNS];
    qcow2n_cctx *ctx;
    size_t i;

    if (!fns || n_fns != QCOW2N_ZSTD_API_FNS) {
        return NULL;
    }
    for (i = 0; i < n_fns; i++) {
        if (!fns[i]) {
            return NULL;
        }
        slots[i] = fns[i];
    }
    ctx = codec_alloc(sizeof(*ctx), QCOW2N_ALGO_ZSTD, cluster_size);
    if (!ctx) {
        return NULL;
    }
    /* data pointer -> function pointer, as dlsym() hands them out */
    memcpy(&ctx->api.create_cctx, &slots[0], sizeof(void *));
    memcpy(&ctx->api.free_cctx, &slots[1], sizeof(void *));
    memcpy(&ctx->api.set_parameter, &slots[2], sizeof(void *));
    memcpy(&ctx->api.compress2, &slots[3], sizeof(void *));
    memcpy(&ctx->api.is_error, &slots[4], sizeof(void *));
    memcpy(&ctx->api.get_error_code, &slots[5], sizeof(void *));
    ctx->ext = ctx->api.create_cctx();
    if (!ctx->ext ||
        (level != 0 &&
         ctx->api.is_error(ctx->api.set_parameter(
             ctx->ext, ZSTD_API_C_COMPRESSION_LEVEL, level)))) {
        qcow2n_cctx_free(ctx);
        return NULL;
    }
    return ctx;
}

/* Compressors return the compressed size, -1 when it does not fit in
 * @dest_size bytes, or a QCOW2N_E* code (all below -1) on a library error. */
static int64_t deflate_cluster(qcow2n_cctx *ctx, uint8_t *dest,
                               size_t dest_size, const uint8_t *src,
                               size_t src_size)
{
    z_stream *zs = &ctx->c.zs;
    int ret;

    if (deflateReset(zs) != Z_OK) {
        return QCOW2N_ENOMEM;
    }
    zstream_point(zs, dest, dest_size, src, src_size);
    ret = deflate(zs, Z_FINISH);
    if (ret == Z_STREAM_END) {
        return (int64_t)(dest_size - zs->avail_out);
    }
    if (ret == Z_OK || ret == Z_BUF_ERROR) {
        return -1;  /* does not fit */
    }
    return QCOW2N_ENOMEM;
}

/* zstd_compress_cluster() on the other copy of libzstd (ctx->ext). */
static int64_t zstd_api_compress_cluster(qcow2n_cctx *ctx, uint8_t *dest,
                                         size_t dest_size, const uint8_t *src,
                                         size_t src_size)
{
    size_t zret = ctx->api.compress2(ctx->ext, dest, dest_size, src,
                                     src_size);

    if (ctx->api.is_error(zret)) {
        if (ctx->api.get_error_code(zret) == ZSTD_API_E_DST_TOO_SMALL) {
            return -1;  /* does not fit */
        }
        return QCOW2N_ENOMEM;
    }
    return (int64_t)zret;
}

#ifdef HAVE_ZSTD
static int64_t zstd_compress_cluster(qcow2n_cctx *ctx, uint8_t *dest,
                                     size_t dest_size, const uint8_t *src,
                                     size_t src_size)
{
    /*
     * The same frame as QEMU's ZSTD_compressStream2(ZSTD_e_end) loop: given
     * all the input in its first call, the streaming API pledges the input
     * size (so the frame holds the content size and the parameters are those
     * for a cluster-sized input) and emits a single frame.  ZSTD_compress2()
     * produces those very bytes, but works on the caller's buffers directly:
     * the streaming path copies the cluster into zstd's input buffer and the
     * frame out of its output buffer whenever dest_size is below
     * ZSTD_compressBound(), as it always is here.
     */
    size_t zret = ZSTD_compress2(ctx->zc, dest, dest_size, src, src_size);

    if (ZSTD_isError(zret)) {
        if (ZSTD_getErrorCode(zret) == ZSTD_error_dstSize_tooSmall) {
            return -1;  /* does not fit */
        }
        return QCOW2N_ENOMEM;
    }
    return (int64_t)zret;
}
#endif

/*
 * qcow2n_compress - compress cluster by cluster into cluster_size - 1 bytes
 * of room each (zstd_compress_cluster() or deflate_cluster()); see
 * qcow2_native.h.
 */
int qcow2n_compress(qcow2n_cctx *ctx, uint8_t *dest, size_t dest_size,
                    const uint8_t *src, size_t src_size, size_t n,
                    int64_t *sizes)
{
    size_t cs, i;

    if (!ctx) {
        return QCOW2N_EINVAL;
    }
    cs = ctx->c.cluster_size;
    if (n > src_size / cs) {
        return QCOW2N_EINVAL;
    }
    if (n > dest_size / cs) {
        return QCOW2N_ENOSPC;
    }
    for (i = 0; i < n; i++) {
        int64_t r;
        if (ctx->ext) {
            r = zstd_api_compress_cluster(ctx, dest + i * cs, cs - 1,
                                          src + i * cs, cs);
        } else
#ifdef HAVE_ZSTD
        if (ctx->c.algo == QCOW2N_ALGO_ZSTD) {
            r = zstd_compress_cluster(ctx, dest + i * cs, cs - 1,
                                      src + i * cs, cs);
        } else
#endif
        {
            r = deflate_cluster(ctx, dest + i * cs, cs - 1, src + i * cs, cs);
        }
        if (r < -1) {
            return (int)r;
        }
        sizes[i] = r;
    }
    return 0;
}
