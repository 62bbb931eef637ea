/*
 * convert_floor: the least work a qcow2 -> raw conversion of a compressed image can
 * do on this machine, as a yardstick for benchmarks/test_bench_floor.py.
 *
 *     convert_floor IN.qcow2 OUT.raw [sync]
 *
 * NOT part of the engine and not for strangers' images: it trusts its input (a
 * benchmark corpus image it just checked with qemu-img), checks only what keeps it
 * from misreading one, and refuses (exit 2) anything but a plain qcow2 v2/v3 image
 * with 64 KiB..2 MiB clusters and no backing file, encryption, external data file
 * or subclusters.  It does what our convert does, with nothing else around it: two
 * threads take jobs of 64 guest clusters; a job reads its compressed clusters with
 * one pread when they lie close together, decodes each with the system's libzstd
 * (zstd) or libdeflate (zlib, raw deflate), scans the result for zero 4 KiB blocks
 * and pwrites the rest; the output is created, sized with ftruncate and, with
 * "sync", flushed as it is written (write-back started per job, an fdatasync every
 * 64 MiB by the worker that crosses the mark) and fsynced at the end.  No temporary name, no progress, no checks of the
 * metadata against the refcounts: what is left is decode, copy and write, which is
 * what the benchmark wants to know the price of.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <libdeflate.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>
#include <zstd.h>

#define JOB_CLUSTERS 64
#define ZERO_BLOCK 4096
#define SPAN_SLACK (1 << 20)        /* one read for a job's frames if this close */

static int in_fd, out_fd, sync_mode;
static atomic_uint_fast64_t written;        /* (flushing: an fdatasync each 64 MiB) */
static uint64_t *l1;
static uint32_t l1_size, cluster_bits, zstd;
static uint64_t disk_size, n_clusters;
static atomic_uint_fast64_t next_job;
static atomic_int failed;

static uint64_t be64(const unsigned char *p)
{
    uint64_t v = 0;
    for (int i = 0; i < 8; i++)
        v = v << 8 | p[i];
    return v;
}

static uint32_t be32(const unsigned char *p)
{
    return (uint32_t)p[0] << 24 | (uint32_t)p[1] << 16 | (uint32_t)p[2] << 8 | p[3];
}

static int read_all(int fd, void *buf, size_t n, uint64_t off)
{
    unsigned char *p = buf;
    while (n) {
        ssize_t k = pread(fd, p, n, (off_t)off);
        if (k < 0 && errno == EINTR)
            continue;
        if (k <= 0)
            return -1;
        p += k, n -= (size_t)k, off += (uint64_t)k;
    }
    return 0;
}

static int write_all(int fd, const void *buf, size_t n, uint64_t off)
{
    const unsigned char *p = buf;
    while (n) {
        ssize_t k = pwrite(fd, p, n, (off_t)off);
        if (k < 0 && errno == EINTR)
            continue;
        if (k <= 0)
            return -1;
        p += k, n -= (size_t)k, off += (uint64_t)k;
    }
    return 0;
}

static int is_zero(const unsigned char *p, size_t n)
{
    static const unsigned char zeros[ZERO_BLOCK];
    return memcmp(p, zeros, n) == 0;
}

/* Write @n bytes of @buf at @off, leaving out whole zero blocks (holes). */
static int write_sparse(const unsigned char *buf, size_t n, uint64_t off)
{
    size_t run = 0, i;
    int have = 0;
    for (i = 0; i < n; i += ZERO_BLOCK) {
        size_t b = n - i < ZERO_BLOCK ? n - i : ZERO_BLOCK;
        if (is_zero(buf + i, b)) {
            if (have && write_all(out_fd, buf + run, i - run, off + run) < 0)
                return -1;
            have = 0;
        } else if (!have) {
            run = i, have = 1;
        }
    }
    if (have && write_all(out_fd, buf + run, n - run, off + run) < 0)
        return -1;
    return 0;
}

struct worker {
    ZSTD_DCtx *zd;
    struct libdeflate_decompressor *ld;
    unsigned char *out, *src, *l2;
    uint64_t l2_at;                 /* host offset of the table in l2, 0: none */
};

static int decode(struct worker *w, unsigned char *dst, const unsigned char *src, size_t n)
{
    size_t cs = (size_t)1 << cluster_bits;
    if (zstd) {
        size_t fl = ZSTD_findFrameCompressedSize(src, n);
        if (ZSTD_isError(fl))
            return -1;
        size_t k = ZSTD_decompressDCtx(w->zd, dst, cs, src, fl);
        return ZSTD_isError(k) || k != cs ? -1 : 0;
    }
    size_t got;
    return libdeflate_deflate_decompress_ex(w->ld, src, n, dst, cs, NULL, &got)
           == LIBDEFLATE_SUCCESS && got == cs ? 0 : -1;
}

/* Does L2 entry @e map data (compressed, or a plain cluster not marked zero)? */
static int has_data(uint64_t e)
{
    return (e & (1ULL << 62)) || ((e & 0x00fffffffffffe00ULL) && !(e & 1));
}

static int run_job(struct worker *w, uint64_t job)
{
    size_t cs = (size_t)1 << cluster_bits, per_l2 = cs / 8;
    uint64_t first = job * JOB_CLUSTERS, last = first + JOB_CLUSTERS;
    uint32_t xbits = 62 - (cluster_bits - 8);
    uint64_t entries[JOB_CLUSTERS], lo = UINT64_MAX, hi = 0;
    if (last > n_clusters)
        last = n_clusters;
    for (uint64_t c = first; c < last; c++) {
        uint64_t l1e = l1[c / per_l2] & 0x00fffffffffffe00ULL, e = 0;
        if (l1e) {
            if (w->l2_at != l1e) {
                if (read_all(in_fd, w->l2, cs, l1e) < 0)
                    return -1;
                w->l2_at = l1e;
            }
            e = be64(w->l2 + 8 * (c % per_l2));
        }
        entries[c - first] = e;
        if (e & (1ULL << 62)) {
            uint64_t host = e & ((1ULL << xbits) - 1);
            uint64_t end = (host & ~511ULL) + (((e >> xbits) & ((1ULL << (62 - xbits)) - 1)) + 1) * 512;
            if (host < lo)
                lo = host;
            if (end > hi)
                hi = end;
        }
    }
    /* the job's frames in one read when they lie close together */
    int spanned = hi > lo && hi - lo <= (uint64_t)JOB_CLUSTERS * cs + SPAN_SLACK;
    if (spanned && read_all(in_fd, w->src, hi - lo, lo) < 0)
        return -1;
    for (uint64_t c = first; c < last; c++) {
        uint64_t e = entries[c - first];
        unsigned char *dst = w->out + (c - first) * cs;
        if (e & (1ULL << 62)) {
            uint64_t host = e & ((1ULL << xbits) - 1);
            size_t n = (size_t)((host & ~511ULL) + (((e >> xbits) & ((1ULL << (62 - xbits)) - 1)) + 1) * 512 - host);
            const unsigned char *src = w->src + (host - lo);
            if (!spanned) {
                if (read_all(in_fd, w->src, n, host) < 0)
                    return -1;
                src = w->src;
            }
            if (decode(w, dst, src, n) < 0)
                return -1;
        } else if ((e & 0x00fffffffffffe00ULL) && !(e & 1)) {
            if (read_all(in_fd, dst, cs, e & 0x00fffffffffffe00ULL) < 0)
                return -1;
        }
    }
    /* runs of data clusters, each scanned for zero blocks and written; the holes
     * (unallocated and zero clusters) are neither filled nor scanned */
    for (uint64_t c = first; c < last;) {
        uint64_t e = entries[c - first], r = c;
        if (!has_data(e)) {
            c++;
            continue;
        }
        while (r < last && has_data(entries[r - first]))
            r++;
        uint64_t off = c * cs, n = (r - c) * cs;
        if (off + n > disk_size)
            n = disk_size - off;
        if (write_sparse(w->out + (c - first) * cs, (size_t)n, off) < 0)
            return -1;
        if (sync_mode) {
            /* start write-back now; the worker crossing each 64 MiB syncs */
            uint64_t before = atomic_fetch_add(&written, n);
            posix_fadvise(out_fd, (off_t)off, (off_t)n, POSIX_FADV_DONTNEED);
            if ((before + n) >> 26 != before >> 26 && fdatasync(out_fd) < 0)
                return -1;
        }
        c = r;
    }
    return 0;
}

static void *work(void *arg)
{
    (void)arg;
    size_t cs = (size_t)1 << cluster_bits;
    struct worker w = {0};
    w.zd = ZSTD_createDCtx();
    w.ld = libdeflate_alloc_decompressor();
    /* page-aligned: the kernel copies to and from a misaligned buffer far slower */
    if (!w.zd || !w.ld || posix_memalign((void **)&w.out, 4096, JOB_CLUSTERS * cs) ||
        posix_memalign((void **)&w.src, 4096, JOB_CLUSTERS * cs + SPAN_SLACK + 2 * cs) ||
        posix_memalign((void **)&w.l2, 4096, cs)) {
        failed = 1;
        return NULL;
    }
    uint64_t jobs = (n_clusters + JOB_CLUSTERS - 1) / JOB_CLUSTERS;
    for (;;) {
        uint64_t j = atomic_fetch_add(&next_job, 1);
        if (j >= jobs || failed)
            break;
        if (run_job(&w, j) < 0) {
            failed = 1;
            break;
        }
    }
    ZSTD_freeDCtx(w.zd);
    libdeflate_free_decompressor(w.ld);
    free(w.out), free(w.src), free(w.l2);
    return NULL;
}

int main(int argc, char **argv)
{
    unsigned char h[112] = {0};
    if (argc < 3) {
        fprintf(stderr, "usage: %s IN.qcow2 OUT.raw [sync]\n", argv[0]);
        return 2;
    }
    in_fd = open(argv[1], O_RDONLY | O_CLOEXEC);
    if (in_fd < 0 || read_all(in_fd, h, 104, 0) < 0 || be32(h) != 0x514649fb) {
        fprintf(stderr, "%s: not a qcow2 image\n", argv[1]);
        return 2;
    }
    uint32_t version = be32(h + 4);
    cluster_bits = be32(h + 20);
    disk_size = be64(h + 24);
    l1_size = be32(h + 36);
    uint64_t l1_off = be64(h + 40), incompat = version >= 3 ? be64(h + 72) : 0;
    if (version >= 3 && be32(h + 100) >= 105)
        read_all(in_fd, h + 104, 8, 104);
    zstd = (incompat & 8) && h[104] == 1;
    if ((version != 2 && version != 3) || be64(h + 8) || be32(h + 32) ||
        cluster_bits < 16 || cluster_bits > 21 || (incompat & ~8ULL) ||
        ((incompat & 8) && h[104] > 1)) {
        fprintf(stderr, "%s: not an image this yardstick reads\n", argv[1]);
        return 2;
    }
    size_t cs = (size_t)1 << cluster_bits;
    n_clusters = (disk_size + cs - 1) / cs;
    if ((uint64_t)l1_size * (cs / 8) < n_clusters || l1_size > (1u << 25)) {
        fprintf(stderr, "%s: bad L1 table\n", argv[1]);
        return 2;
    }
    l1 = malloc((size_t)l1_size * 8 + 1);
    if (!l1 || read_all(in_fd, l1, (size_t)l1_size * 8, l1_off) < 0)
        return 1;
    for (uint32_t i = 0; i < l1_size; i++)
        l1[i] = be64((unsigned char *)&l1[i]);
    out_fd = open(argv[2], O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0644);
    if (out_fd < 0 || ftruncate(out_fd, (off_t)disk_size) < 0) {
        perror(argv[2]);
        return 1;
    }
    sync_mode = argc > 3 && strcmp(argv[3], "sync") == 0;
    pthread_t t[2];
    for (int i = 0; i < 2; i++)
        pthread_create(&t[i], NULL, work, NULL);
    for (int i = 0; i < 2; i++)
        pthread_join(t[i], NULL);
    if (failed || (argc > 3 && strcmp(argv[3], "sync") == 0 && fsync(out_fd) < 0) ||
        close(out_fd) < 0) {
        fprintf(stderr, "%s: conversion failed\n", argv[2]);
        return 1;
    }
    return 0;
}
