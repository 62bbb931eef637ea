/*
 * convert.c - `qcow2 convert` of a plain local qcow2 image into a new raw file,
 * answered in the launcher: the job a compute host runs on every image it caches.
 *
 * Taken here only in its plain form: options -q, -U, -f qcow2, -O raw and -t
 * none|writeback|unsafe, one source and one destination (plain paths; the
 * destination must not exist yet); a qcow2 v2/v3 image, zlib or zstd, without a
 * backing file, encryption, external data file, subclusters or a dirty or corrupt
 * flag (read_image() has checked the header as for `info`).  Before anything is
 * written every L1 and L2 entry is checked: an entry with reserved bits, an
 * unaligned offset or data past the end of the file steps aside, as does a table
 * past the end of the file or a refcount block Python's open would refuse.  So does any
 * failure later (a frame that does not decode to exactly one cluster, an I/O
 * error): the anonymous output is dropped and Python converts from scratch, and
 * reports, as it would have anyway.  As in info, the Python command is the
 * reference: this file can only be faster, never different.
 *
 * What Python does (qcow2/ops/convert_raw.py, qcow2/atomic.py) is done the same
 * way: the output is an anonymous file (O_TMPFILE) in the destination's folder,
 * sized to the virtual size; jobs of 4 MiB (less where an L2 table maps less) are
 * taken by one thread per core (at most 4); a job reads its compressed clusters
 * with one read when they lie close together, decodes them (libzstd's one-shot
 * decoder for QEMU's single-segment frames; libdeflate for zlib's raw deflate),
 * and writes its data but for the all-zero 4 KiB blocks (holes: -S 4k).  Unallocated and zero clusters
 * are never touched.  With a flushing -t mode each job's range is handed to
 * write-back at once, a helper thread fdatasyncs every 64 MiB, and at the end the
 * file is fsynced, linked under a hidden temporary name, renamed over the
 * destination and the folder synced.
 *
 * Without zstd.h or libdeflate.h the launcher is built without this file's work
 * (QCOW2_NO_CONVERT): every convert goes to Python.
 */

#include "launcher.h"

#include <errno.h>
#include <fcntl.h>
#include <limits.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#ifdef QCOW2_NO_CONVERT

int native_convert(int argc, char **argv, int *status)
{
    (void)argc, (void)argv, (void)status;
    return step_aside("built without the native convert");
}

#else

#include <libdeflate.h>
#include <pthread.h>
#include <stdatomic.h>
#include <sys/random.h>
#include <zstd.h>

#define JOB_BYTES       (4u << 20)          /* convert_plan.CHUNK */
#define ZERO_BLOCK      4096
#define SYNC_STEP       (64ull << 20)       /* atomic.py's SYNC_STEP */
#define MAX_WORKERS     4                   /* outputopts.py's default_workers() */
#define OFLAG_COPIED    (1ull << 63)
#define OFLAG_COMPRESSED (1ull << 62)
#define OFLAG_ZERO      1ull
#define L1E_OFFSET_MASK 0x00fffffffffffe00ull
#define L1E_RESERVED    0x7f000000000001ffull
#define L2E_OFFSET_MASK 0x00fffffffffffe00ull
#define L2E_RESERVED    0x3f000000000001feull   /* standard entries: bits 1-8, 56-61 */

struct conv {
    int in_fd, out_fd, sync;
    uint64_t file_size, size, n_clusters, cs;
    uint32_t cbits, per_l2, xbits, job;  /* job: clusters a job (within one table) */
    int zstd;
    uint64_t *l1;
    uint32_t l1_size;
    atomic_uint_fast64_t next_job;
    atomic_int failed;
    /* the background fdatasync (flushing modes) */
    pthread_mutex_t mu;
    pthread_cond_t cv;
    uint64_t since;
    int sync_wanted, stop, sync_err;
};

static uint64_t get_be64(const uint8_t *p)
{
    uint64_t v = 0;
    int i;

    for (i = 0; i < 8; i++) {
        v = v << 8 | p[i];
    }
    return v;
}

/* Read @n bytes at @off; past the end of the file zeros (as Python reads). */
static int read_zeros_past_end(int fd, uint8_t *buf, size_t n, uint64_t off)
{
    while (n) {
        ssize_t k = pread(fd, buf, n, (off_t)off);

        if (k < 0 && errno == EINTR) {
            continue;
        }
        if (k < 0) {
            return -1;
        }
        if (k == 0) {
            memset(buf, 0, n);
            return 0;
        }
        buf += k, n -= (size_t)k, off += (uint64_t)k;
    }
    return 0;
}

static int write_all(int fd, const uint8_t *buf, size_t n, uint64_t off)
{
    while (n) {
        ssize_t k = pwrite(fd, buf, n, (off_t)off);

        if (k < 0 && errno == EINTR) {
            continue;
        }
        if (k <= 0) {
            return -1;
        }
        buf += k, n -= (size_t)k, off += (uint64_t)k;
    }
    return 0;
}

static int all_zero(const uint8_t *p, size_t n)
{
    static const uint8_t zeros[ZERO_BLOCK];

    return memcmp(p, zeros, n) == 0;
}

/* A data entry: compressed, or a plain cluster not marked zero. */
static int has_data(uint64_t e)
{
    return (e & OFLAG_COMPRESSED) || ((e & L2E_OFFSET_MASK) && !(e & OFLAG_ZERO));
}

/* (host offset, bytes) of compressed entry @e, as QEMU reads it. */
static void compressed_span(const struct conv *c, uint64_t e, uint64_t *host, uint64_t *n)
{
    uint64_t sectors = ((e >> c->xbits) & ((1ull << (62 - c->xbits)) - 1)) + 1;

    *host = e & ((1ull << c->xbits) - 1);
    *n = (*host & ~511ull) + sectors * 512 - *host;
}

/* Is L2 entry @e of the kinds this file reads exactly as Python does? */
static int plain_entry(const struct conv *c, uint64_t e)
{
    if (e & OFLAG_COMPRESSED) {
        uint64_t host, n;

        compressed_span(c, e, &host, &n);
        return host < c->file_size;
    }
    if (e & L2E_RESERVED) {
        return 0;
    }
    if (e & L2E_OFFSET_MASK) {
        uint64_t off = e & L2E_OFFSET_MASK;

        return !(off & (c->cs - 1)) && off <= c->file_size - c->cs;
    }
    return 1;
}

/*
 * The refcount blocks Python may read: its convert asks, once it meets a plain data
 * cluster, whether the image is metadata-preallocated (reader.py's
 * _metadata_preallocated, QEMU's qcow2_detect_metadata_preallocation), counting the
 * referenced clusters below the end of the file through the refcount table; a table
 * past the end of the file, or a block there or unaligned, is an error it reports.
 * Where any of those could be met, whatever the count, Python answers.
 */
static int check_refcounts(struct conv *c, const struct image *im)
{
    uint64_t n = (uint64_t)im->refcount_table_clusters * c->cs / 8, i, blocks;
    uint64_t off = im->refcount_table_offset;
    uint64_t per = c->cs * 8 >> im->refcount_order;     /* entries per block */
    uint64_t end_cluster = (c->file_size + c->cs - 1) / c->cs;
    uint8_t buf[4096];

    if (off > c->file_size || n * 8 > c->file_size - off) {
        return step_aside("the refcount table extends past the end of the file");
    }
    blocks = (end_cluster + per - 1) / per;
    if (blocks > n) {
        blocks = n;
    }
    for (i = 0; i < blocks; i++) {
        uint64_t e, b;

        if (i % (sizeof(buf) / 8) == 0) {
            size_t k = (size_t)((blocks - i) * 8 < sizeof(buf) ? (blocks - i) * 8 : sizeof(buf));

            if (read_zeros_past_end(c->in_fd, buf, k, off + i * 8) < 0) {
                return step_aside("the refcount table cannot be read");
            }
        }
        e = get_be64(buf + 8 * (i % (sizeof(buf) / 8)));
        b = e & 0xfffffffffffffe00ull;
        if (b && ((b & (c->cs - 1)) || c->file_size < c->cs || b > c->file_size - c->cs)) {
            return step_aside("a refcount block unaligned or past the end of the file");
        }
    }
    return 0;
}

/* Check every L1 entry and every L2 table before anything is written. */
static int check_tables(struct conv *c, uint8_t *l2)
{
    uint32_t i, j;

    for (i = 0; i < c->l1_size; i++) {
        uint64_t l2_off = c->l1[i] & L1E_OFFSET_MASK;

        if (c->l1[i] & L1E_RESERVED) {
            return step_aside("an L1 entry with reserved bits");
        }
        if (!l2_off) {
            continue;
        }
        if ((l2_off & (c->cs - 1)) || c->file_size < c->cs || l2_off > c->file_size - c->cs) {
            return step_aside("an L2 table not aligned or past the end of the file");
        }
        if (read_zeros_past_end(c->in_fd, l2, c->cs, l2_off) < 0) {
            return step_aside("an L2 table cannot be read");
        }
        for (j = 0; j < c->per_l2; j++) {
            if (!plain_entry(c, get_be64(l2 + 8 * (size_t)j))) {
                return step_aside("an L2 entry this convert does not take");
            }
        }
    }
    return 0;
}

struct worker {
    ZSTD_DCtx *zd;
    struct libdeflate_decompressor *ld;
    uint8_t *out, *src, *l2;
    uint64_t *entries;
    uint64_t l2_at;                 /* host offset of the table in l2 (0: none) */
};

#define SPAN_SLACK  (1u << 20)      /* a job's frames read at once if this close */

static int decode(const struct conv *c, struct worker *w, uint8_t *dst, const uint8_t *src,
                  size_t n)
{
    if (c->zstd) {
        /* QEMU's frames: one single-segment frame of exactly one cluster */
        size_t fl, k;

        if (n < 6 || src[0] != 0x28 || src[1] != 0xb5 || src[2] != 0x2f || src[3] != 0xfd ||
            !(src[4] & 0x20)) {
            return -1;
        }
        fl = ZSTD_findFrameCompressedSize(src, n);
        if (ZSTD_isError(fl)) {
            return -1;
        }
        k = ZSTD_decompressDCtx(w->zd, dst, c->cs, src, fl);
        return k == c->cs ? 0 : -1;
    } else {
        size_t got = 0;

        return libdeflate_deflate_decompress_ex(w->ld, src, n, dst, c->cs, NULL, &got)
               == LIBDEFLATE_SUCCESS && got == c->cs ? 0 : -1;
    }
}

static void wrote(struct conv *c, uint64_t n)
{
    pthread_mutex_lock(&c->mu);
    c->since += n;
    if (c->since >= SYNC_STEP && !c->sync_wanted) {
        c->since = 0;
        c->sync_wanted = 1;
        pthread_cond_signal(&c->cv);
    }
    pthread_mutex_unlock(&c->mu);
}

static void *syncer(void *arg)
{
    struct conv *c = arg;

    pthread_mutex_lock(&c->mu);
    for (;;) {
        while (!c->sync_wanted && !c->stop) {
            pthread_cond_wait(&c->cv, &c->mu);
        }
        if (c->stop) {
            break;
        }
        pthread_mutex_unlock(&c->mu);
        int err = fdatasync(c->out_fd) < 0;
        pthread_mutex_lock(&c->mu);
        c->sync_err |= err;
        c->sync_wanted = 0;
    }
    pthread_mutex_unlock(&c->mu);
    return NULL;
}

/* Write the data runs of the job's clusters [first, last), but zero blocks. */
static int write_job(struct conv *c, struct worker *w, uint64_t first, uint64_t last)
{
    const uint64_t *entries = w->entries;
    uint64_t i = first;

    while (i < last) {
        uint64_t r = i, off, n, pos, run = 0;
        int have = 0;

        if (!has_data(entries[i - first])) {
            i++;
            continue;
        }
        while (r < last && has_data(entries[r - first])) {
            r++;
        }
        off = i * c->cs;
        n = (r - i) * c->cs;
        if (off + n > c->size) {
            n = c->size - off;
        }
        const uint8_t *buf = w->out + (i - first) * c->cs;
        for (pos = 0; pos < n; pos += ZERO_BLOCK) {
            uint64_t b = n - pos < ZERO_BLOCK ? n - pos : ZERO_BLOCK;

            if (all_zero(buf + pos, (size_t)b)) {
                if (have && write_all(c->out_fd, buf + run, (size_t)(pos - run), off + run) < 0) {
                    return -1;
                }
                have = 0;
            } else if (!have) {
                run = pos, have = 1;
            }
        }
        if (have && write_all(c->out_fd, buf + run, (size_t)(n - run), off + run) < 0) {
            return -1;
        }
        if (c->sync) {
            posix_fadvise(c->out_fd, (off_t)off, (off_t)n, POSIX_FADV_DONTNEED);
            wrote(c, n);
        }
        i = r;
    }
    return 0;
}

static int run_job(struct conv *c, struct worker *w, uint64_t job)
{
    uint64_t first = job * c->job, last = first + c->job, i;
    uint64_t *entries = w->entries, lo = UINT64_MAX, hi = 0;
    uint64_t l2_off = c->l1[first / c->per_l2] & L1E_OFFSET_MASK;
    int any = 0, spanned;

    if (!l2_off) {
        return 0;
    }
    if (last > c->n_clusters) {
        last = c->n_clusters;
    }
    if (w->l2_at != l2_off) {
        if (read_zeros_past_end(c->in_fd, w->l2, c->cs, l2_off) < 0) {
            return -1;
        }
        w->l2_at = l2_off;
    }
    for (i = first; i < last; i++) {
        uint64_t e = get_be64(w->l2 + 8 * (i % c->per_l2));

        /* the tables were checked before; one changed since would step aside */
        if (!plain_entry(c, e)) {
            return -1;
        }
        entries[i - first] = e;
        any |= has_data(e);
        if (e & OFLAG_COMPRESSED) {
            uint64_t host, n;

            compressed_span(c, e, &host, &n);
            lo = host < lo ? host : lo;
            hi = host + n > hi ? host + n : hi;
        }
    }
    if (!any) {
        return 0;
    }
    spanned = hi > lo && hi - lo <= (uint64_t)c->job * c->cs + SPAN_SLACK;
    if (spanned && read_zeros_past_end(c->in_fd, w->src, (size_t)(hi - lo), lo) < 0) {
        return -1;
    }
    for (i = first; i < last; i++) {
        uint64_t e = entries[i - first];
        uint8_t *dst = w->out + (i - first) * c->cs;

        if (e & OFLAG_COMPRESSED) {
            uint64_t host, n;
            const uint8_t *src;

            compressed_span(c, e, &host, &n);
            if (spanned) {
                src = w->src + (host - lo);
            } else {
                if (read_zeros_past_end(c->in_fd, w->src, (size_t)n, host) < 0) {
                    return -1;
                }
                src = w->src;
            }
            if (decode(c, w, dst, src, (size_t)n) < 0) {
                return -1;
            }
        } else if (has_data(e)) {
            if (read_zeros_past_end(c->in_fd, dst, c->cs, e & L2E_OFFSET_MASK) < 0) {
                return -1;
            }
        }
    }
    return write_job(c, w, first, last);
}

static void *work(void *arg)
{
    struct conv *c = arg;
    struct worker w;
    uint64_t jobs = (c->n_clusters + c->job - 1) / c->job;
    /* a compressed cluster is at most a cluster and a sector long */
    size_t src_size = (size_t)(c->job * c->cs + SPAN_SLACK + 2 * c->cs);

    memset(&w, 0, sizeof(w));
    w.zd = ZSTD_createDCtx();
    w.ld = libdeflate_alloc_decompressor();
    /* page-aligned: the kernel copies to and from a misaligned buffer far slower */
    w.entries = malloc(c->job * sizeof(*w.entries));
    if (!w.zd || !w.ld || !w.entries ||
        posix_memalign((void **)&w.out, 4096, c->job * c->cs) ||
        posix_memalign((void **)&w.src, 4096, src_size) ||
        posix_memalign((void **)&w.l2, 4096, c->cs)) {
        c->failed = 1;
    }
    while (!c->failed) {
        uint64_t j = atomic_fetch_add(&c->next_job, 1);

        if (j >= jobs) {
            break;
        }
        if (run_job(c, &w, j) < 0) {
            c->failed = 1;
        }
    }
    ZSTD_freeDCtx(w.zd);
    if (w.ld) {
        libdeflate_free_decompressor(w.ld);
    }
    free(w.entries);
    free(w.out);
    free(w.src);
    free(w.l2);
    return NULL;
}

/* Run the workers (and the syncer): 0, or -1 when anything failed. */
static int copy(struct conv *c)
{
    pthread_t t[MAX_WORKERS], s;
    long cpus = sysconf(_SC_NPROCESSORS_ONLN);
    int n = cpus < 1 ? 1 : cpus > MAX_WORKERS ? MAX_WORKERS : (int)cpus, i, started = 0;
    int syncing = 0;

    pthread_mutex_init(&c->mu, NULL);
    pthread_cond_init(&c->cv, NULL);
    if (c->sync) {
        syncing = pthread_create(&s, NULL, syncer, c) == 0;
        if (!syncing) {
            return -1;
        }
    }
    for (i = 0; i < n; i++) {
        if (pthread_create(&t[i], NULL, work, c) != 0) {
            c->failed = 1;
            break;
        }
        started++;
    }
    for (i = 0; i < started; i++) {
        pthread_join(t[i], NULL);
    }
    if (syncing) {
        pthread_mutex_lock(&c->mu);
        c->stop = 1;
        pthread_cond_signal(&c->cv);
        pthread_mutex_unlock(&c->mu);
        pthread_join(s, NULL);
    }
    return c->failed || c->sync_err || started == 0 ? -1 : 0;
}

/* ------------------------------------------------------------------------ */
/* The command line and the output                                           */

struct copts {
    const char *src, *dst;
    int share, sync;
};

/*
 * convert with only -q, -U, -f qcow2, -O raw and -t none|writeback|unsafe (as
 * separate words or glued: -Oraw), then one source and one destination.
 */
static int parse_convert(int argc, char **argv, struct copts *o)
{
    const char *cache = "writeback";
    int i;

    memset(o, 0, sizeof(*o));
    for (i = 2; i < argc; i++) {
        const char *a = argv[i], *v;

        if (!strcmp(a, "-q")) {
            continue;
        }
        if (!strcmp(a, "-U") || !strcmp(a, "--force-share")) {
            o->share = 1;
            continue;
        }
        if (a[0] == '-' && (a[1] == 'f' || a[1] == 'O' || a[1] == 't')) {
            if (a[2]) {
                v = a + 2;
            } else if (i + 1 < argc) {
                v = argv[++i];
            } else {
                return step_aside("an option without its value");
            }
            if ((a[1] == 'f' && strcmp(v, "qcow2")) || (a[1] == 'O' && strcmp(v, "raw"))) {
                return step_aside("a format other than qcow2 to raw");
            }
            if (a[1] == 't') {
                cache = v;
            }
            continue;
        }
        if (a[0] == '-') {
            return step_aside("an option only Python takes");
        }
        if (!o->src) {
            o->src = a;
        } else if (!o->dst) {
            o->dst = a;
        } else {
            return step_aside("more than one source");
        }
    }
    if (!o->dst) {
        return step_aside("no destination");
    }
    if (!strcmp(cache, "unsafe")) {
        o->sync = 0;
    } else if (!strcmp(cache, "writeback") || !strcmp(cache, "none")) {
        o->sync = 1;
    } else {
        return step_aside("a cache mode only Python takes");
    }
    return 0;
}

static int plain_path(const char *p)
{
    return *p && !strchr(p, ':') && plain_text((const uint8_t *)p, strlen(p));
}

/* The folder of @path (a new string), "." for a bare name. */
static char *folder_of(const char *path)
{
    const char *slash = strrchr(path, '/');

    if (!slash) {
        return strdup(".");
    }
    if (slash == path) {
        return strdup("/");
    }
    return strndup(path, (size_t)(slash - path));
}

/* Link the anonymous file @fd under a fresh hidden name beside @dst (as
 * paths.temp_name) and rename it over @dst; fsync the folder when @sync.
 * 0, or -1 with nothing left behind. */
static int publish(int fd, const char *dst, const char *dir, int sync)
{
    char proc[64], tmp[PATH_MAX];
    const char *base = strrchr(dst, '/');
    sigset_t all, old;
    int tries, rc = -1;

    base = base ? base + 1 : dst;
    snprintf(proc, sizeof(proc), "/proc/self/fd/%d", fd);
    sigfillset(&all);
    sigprocmask(SIG_BLOCK, &all, &old);     /* no name left behind by a signal */
    for (tries = 0; tries < 100; tries++) {
        uint8_t r[6];

        if (getrandom(r, sizeof(r), 0) != (ssize_t)sizeof(r)) {
            break;
        }
        if ((size_t)snprintf(tmp, sizeof(tmp), "%s/.%s.%02x%02x%02x%02x%02x%02x.part", dir,
                             base, r[0], r[1], r[2], r[3], r[4], r[5]) >= sizeof(tmp)) {
            break;
        }
        if (linkat(AT_FDCWD, proc, AT_FDCWD, tmp, AT_SYMLINK_FOLLOW) == 0) {
            if (rename(tmp, dst) != 0) {
                unlink(tmp);
                break;
            }
            rc = 0;
            break;
        }
        if (errno != EEXIST) {
            break;
        }
    }
    if (rc == 0 && sync) {
        int dfd = open(dir, O_RDONLY | O_DIRECTORY | O_CLOEXEC);

        if (dfd < 0 || fsync(dfd) < 0) {
            unlink(dst);                    /* as atomic.sync_new_name() */
            rc = -1;
        }
        if (dfd >= 0) {
            close(dfd);
        }
    }
    sigprocmask(SIG_SETMASK, &old, NULL);
    return rc;
}

/* native_convert - see launcher.h. */
int native_convert(int argc, char **argv, int *status)
{
    struct copts o;
    struct image im;
    struct conv c;
    struct stat st;
    char *dir = NULL;
    uint8_t *l2 = NULL;
    mode_t mask;
    uint32_t i;
    int rc = -1;

    memset(&im, 0, sizeof(im));
    memset(&c, 0, sizeof(c));
    c.in_fd = c.out_fd = -1;
    if (parse_convert(argc, argv, &o) < 0) {
        return -1;
    }
    if (!plain_path(o.src) || !plain_path(o.dst)) {
        return step_aside("a file name that is not a plain path");
    }
    if (lstat(o.dst, &st) == 0 || errno != ENOENT) {
        return step_aside("the destination exists");
    }
    c.in_fd = open(o.src, O_RDONLY | O_CLOEXEC);
    if (c.in_fd < 0) {
        return step_aside("the source cannot be opened");
    }
    if (fstat(c.in_fd, &st) < 0 || !S_ISREG(st.st_mode)) {
        step_aside("the source is not a regular file");
        goto out;
    }
    if (read_image(c.in_fd, &im, (uint64_t)st.st_size, o.share, FORMAT_PROBE) < 0) {
        goto out;
    }
    if (im.raw || im.backing || im.backing_file_offset || im.crypt_method ||
        (im.incompat & (INCOMPAT_DIRTY | INCOMPAT_CORRUPT | INCOMPAT_DATA_FILE |
                        INCOMPAT_EXTL2)) ||
        im.size == 0 || im.l1_size == 0) {
        step_aside("an image this convert does not take");
        goto out;
    }
    c.file_size = im.file_size;
    c.size = im.size;
    c.cbits = im.cluster_bits;
    c.cs = 1ull << c.cbits;
    c.per_l2 = (uint32_t)(c.cs / 8);
    c.job = JOB_BYTES / c.cs < c.per_l2 ? (uint32_t)(JOB_BYTES / c.cs) : c.per_l2;
    c.xbits = 62 - (c.cbits - 8);
    c.n_clusters = (c.size + c.cs - 1) / c.cs;
    c.zstd = im.compression == COMPRESSION_ZSTD;
    c.sync = o.sync;
    c.l1_size = im.l1_size;
    /* (read_image() checked its alignment and its size, at most MAX_L1_SIZE; a table
     * past the end of the file is Python's to refuse) */
    if (im.l1_table_offset > c.file_size || (uint64_t)c.l1_size * 8 > c.file_size -
        im.l1_table_offset) {
        step_aside("the L1 table extends past the end of the file");
        goto out;
    }
    c.l1 = malloc((size_t)c.l1_size * 8);
    l2 = malloc(c.cs);
    if (!c.l1 || !l2 || read_zeros_past_end(c.in_fd, (uint8_t *)c.l1, (size_t)c.l1_size * 8,
                                            im.l1_table_offset) < 0) {
        step_aside("the L1 table cannot be read");
        goto out;
    }
    for (i = 0; i < c.l1_size; i++) {
        c.l1[i] = get_be64((const uint8_t *)&c.l1[i]);
    }
    if (check_refcounts(&c, &im) < 0 || check_tables(&c, l2) < 0) {
        goto out;
    }
    dir = folder_of(o.dst);
    mask = umask(0);
    umask(mask);
    c.out_fd = dir ? open(dir, O_TMPFILE | O_RDWR | O_CLOEXEC, 0666 & ~mask) : -1;
    if (c.out_fd < 0) {
        step_aside("no anonymous file in the destination's folder");
        goto out;
    }
    if (ftruncate(c.out_fd, (off_t)c.size) < 0 || copy(&c) < 0 ||
        (c.sync && fsync(c.out_fd) < 0) || publish(c.out_fd, o.dst, dir, c.sync) < 0) {
        step_aside("the native convert failed");
        goto out;
    }
    *status = 0;
    rc = 0;
    if (getenv("QCOW2_LAUNCHER_TRACE")) {
        fprintf(stderr, "qcow2 launcher: native\n");
    }
out:
    if (c.out_fd >= 0) {
        close(c.out_fd);                    /* (an anonymous file not linked: gone) */
    }
    close(c.in_fd);                         /* (the locks go with it) */
    free(c.l1);
    free(l2);
    free(dir);
    free_image(&im);
    return rc;
}

#endif
