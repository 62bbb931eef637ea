/*
 * launcher.c - the installed `qcow2` command.
 *
 * `qcow2 info` of a local qcow2 file is answered here, in about a millisecond
 * (a Python process needs 10 ms just to start), when the command line and the
 * image are of the plain kind this file knows: it prints the very bytes the
 * Python command prints, human or JSON.  Everything else -- other commands and
 * options, raw images, encryption, bitmaps, external data files, names with a
 * protocol, anything unusual or wrong in the image, a lock held by another
 * process -- is handed to the Python command by exec, with the same arguments.
 * The Python command is the reference (its twin, in the sense of the kernels)
 * and the only one that reports an error about an image: where this file is
 * not sure, it steps aside, so it can only ever be faster, never different.
 *
 * The rules are those of qcow2/header.py (QEMU's qcow2_do_open), qcow2/
 * snapshot.py, qcow2/reader.py's info() and qcow2/cli/output.py; every check
 * they make before an image is opened is made here too (a failing one hands
 * off).  Nothing is read or allocated before the field that sizes it has been
 * checked: the header cluster is at most 2 MiB, the snapshot table at most
 * 64 MiB and within the file.
 *
 * QCOW2_IMPL=python hands every command to Python (the twin alone);
 * QCOW2_LAUNCHER_TRACE=1 says on stderr why a command was handed off.
 * The interpreter: the one next to this program when it lives in a virtual
 * environment's bin folder, else the one that built it (QCOW2_PYTHON), else
 * python3 from PATH.
 */

#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <inttypes.h>
#include <limits.h>
#include <math.h>
#include <signal.h>
#include <stdarg.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

#ifndef QCOW2_PYTHON
#define QCOW2_PYTHON "/usr/bin/python3"
#endif

/* qcow2/constants.py (tests/test_launcher.py compares them) */
#define MAGIC                   0x514649fbu     /* "QFI\xfb" */
#define V2_HEADER_LENGTH        72
#define V3_MIN_HEADER_LENGTH    104
#define HDR_COMPRESSION_TYPE    0x68
#define MIN_CLUSTER_BITS        9
#define MAX_CLUSTER_BITS        21
#define INCOMPAT_DIRTY          (1u << 0)
#define INCOMPAT_CORRUPT        (1u << 1)
#define INCOMPAT_DATA_FILE      (1u << 2)
#define INCOMPAT_COMPRESSION    (1u << 3)
#define INCOMPAT_EXTL2          (1u << 4)
#define INCOMPAT_MASK           0x1Fu
#define COMPAT_LAZY_REFCOUNTS   (1u << 0)
#define AUTOCLEAR_DATA_FILE_RAW (1u << 1)
#define EXT_END                 0x00000000u
#define EXT_BACKING_FORMAT      0xE2792ACAu
#define EXT_FEATURE_TABLE       0x6803F857u
#define EXT_CRYPTO_HEADER       0x0537BE77u
#define EXT_BITMAPS             0x23852875u
#define EXT_DATA_FILE           0x44415441u
#define EXT_BACKING_FORMAT_MAX  16
#define SUBCLUSTERS_PER_CLUSTER 32
#define MAX_SNAPSHOTS           65536
#define MAX_REFTABLE_SIZE       (8u * 1024 * 1024)
#define MAX_L1_SIZE             (32u * 1024 * 1024)
#define MAX_L1_ENTRIES          0x7FFFFFFFu
#define MAX_TABLE_END           0x7FFFFFFFFFFFFFFFull
#define SNAPSHOT_HEADER_SIZE    40
#define MAX_SNAPSHOTS_SIZE      (1024u * MAX_SNAPSHOTS)
#define MAX_SNAPSHOT_EXTRA_DATA 1024
#define SNAPSHOT_ICOUNT_UNKNOWN UINT64_MAX
#define MAX_BACKING_FILE_NAME   1023
#define COMPRESSION_ZLIB        0
#define COMPRESSION_ZSTD        1

/* the Python command, run as `python -P -c CODE ARGV0 ARGS...` */
static const char PY_CODE[] =
    "import sys; sys.argv[:2] = sys.argv[1:2]; from qcow2.cli import run; run()";

/* ------------------------------------------------------------------------ */
/* Handing off to Python                                                     */

/* Why the command goes to Python (QCOW2_LAUNCHER_TRACE=1 prints it). */
static const char *reason = "not info";

static int no(const char *why)
{
    reason = why;
    return -1;
}

/* Is @path an executable file? */
static int runnable(const char *path)
{
    return access(path, X_OK) == 0;
}

/*
 * The interpreter: beside this program when it is in a virtual environment's
 * bin folder (a venv moved or made from a cached wheel still finds its own),
 * else QCOW2_PYTHON when it exists, else NULL (python3 from PATH).
 */
static const char *interpreter(char *buf, size_t size)
{
    char self[PATH_MAX];
    ssize_t n = readlink("/proc/self/exe", self, sizeof(self) - 1);
    const char *base = strrchr(QCOW2_PYTHON, '/');

    base = base ? base + 1 : QCOW2_PYTHON;
    if (n > 0) {
        char *slash;

        self[n] = '\0';
        slash = strrchr(self, '/');
        if (slash) {
            char *up;

            *slash = '\0';                              /* .../venv/bin */
            up = strrchr(self, '/');
            if (up && (size_t)snprintf(buf, size, "%.*s/pyvenv.cfg", (int)(up - self),
                                       self) < size && access(buf, F_OK) == 0 &&
                (size_t)snprintf(buf, size, "%s/%s", self, base) < size && runnable(buf)) {
                return buf;
            }
        }
    }
    if (runnable(QCOW2_PYTHON)) {
        return QCOW2_PYTHON;
    }
    return NULL;
}

/* Run the Python command with this process's arguments; never returns. */
static void hand_off(int argc, char **argv)
{
    char buf[PATH_MAX + 32];
    const char *python = interpreter(buf, sizeof(buf));
    char **args = calloc((size_t)argc + 5, sizeof(*args));
    int i;

    if (getenv("QCOW2_LAUNCHER_TRACE")) {
        fprintf(stderr, "qcow2 launcher: python (%s)\n", reason);
    }
    if (!args) {
        fprintf(stderr, "%s: out of memory\n", argv[0]);
        exit(1);
    }
    args[0] = (char *)(python ? python : "python3");
    args[1] = "-P";
    args[2] = "-c";
    args[3] = (char *)PY_CODE;
    args[4] = argv[0];
    for (i = 1; i < argc; i++) {
        args[4 + i] = argv[i];
    }
    if (python) {
        execv(python, args);
    } else {
        execvp("python3", args);
    }
    fprintf(stderr, "%s: cannot run the Python interpreter %s: %s\n", argv[0],
            python ? python : "python3", strerror(errno));
    exit(127);
}

/* ------------------------------------------------------------------------ */
/* The command line                                                          */

struct opts {
    const char *file;
    int json;
    int share;                  /* -U: no locks */
};

/*
 * `info` with only -f qcow2, --output human|json and -U/--force-share, in any
 * order, and one file name (no protocol prefix: no ':'); anything else (help,
 * --image-opts, --backing-chain, --object, abbreviations) goes to Python.
 */
static int parse_args(int argc, char **argv, struct opts *o)
{
    const char *fmt = NULL, *out = NULL;
    int i;

    if (argc < 2 || strcmp(argv[1], "info") != 0) {
        return no("not info");
    }
    memset(o, 0, sizeof(*o));
    for (i = 2; i < argc; i++) {
        const char *a = argv[i];

        if (!strcmp(a, "-U") || !strcmp(a, "--force-share")) {
            o->share = 1;
        } else if (!strcmp(a, "-f") || !strcmp(a, "--output")) {
            if (i + 1 >= argc) {
                return no("an option without its value");
            }
            if (a[1] == 'f') {
                fmt = argv[++i];
            } else {
                out = argv[++i];
            }
        } else if (!strncmp(a, "-f", 2)) {
            fmt = a + 2;
        } else if (!strncmp(a, "--output=", 9)) {
            out = a + 9;
        } else if (a[0] == '-') {
            return no("an option only Python takes");
        } else if (o->file) {
            return no("more than one file");
        } else {
            o->file = a;
        }
    }
    if (!o->file) {
        return no("no file");
    }
    if (fmt && strcmp(fmt, "qcow2") != 0) {
        return no("a format other than qcow2");
    }
    if (out && strcmp(out, "human") != 0 && strcmp(out, "json") != 0) {
        return no("an unknown output format");
    }
    o->json = out && !strcmp(out, "json");
    return 0;
}

/* A name printed as is: printable ASCII only (others are escaped or decoded by
 * rules Python keeps). */
static int plain_text(const uint8_t *s, size_t n)
{
    size_t i;

    for (i = 0; i < n; i++) {
        if (s[i] < 0x20 || s[i] > 0x7e) {
            return 0;
        }
    }
    return 1;
}

/* ------------------------------------------------------------------------ */
/* Reading the image                                                         */

static uint16_t be16(const uint8_t *p)
{
    return (uint16_t)(p[0] << 8 | p[1]);
}

static uint32_t be32(const uint8_t *p)
{
    return (uint32_t)p[0] << 24 | (uint32_t)p[1] << 16 | (uint32_t)p[2] << 8 | p[3];
}

static uint64_t be64(const uint8_t *p)
{
    return (uint64_t)be32(p) << 32 | be32(p + 4);
}

/* Read up to @n bytes at @off; the count read (short at the end of the file),
 * or -1. */
static ssize_t read_at(int fd, uint8_t *buf, size_t n, uint64_t off)
{
    size_t got = 0;

    if (off > (uint64_t)INT64_MAX - n) {
        return (ssize_t)0;
    }
    while (got < n) {
        ssize_t r = pread(fd, buf + got, n - got, (off_t)(off + got));

        if (r < 0) {
            if (errno == EINTR) {
                continue;
            }
            return -1;
        }
        if (r == 0) {
            break;
        }
        got += (size_t)r;
    }
    return (ssize_t)got;
}

/*
 * QEMU's shared OFD byte locks for a reader (backends/qemu_locks.py): hold
 * "consistent read" (byte 100), refuse to share "write" and "resize" (bytes
 * 201, 203).  0 when taken (or when the file system has no OFD locks), -1 on
 * a conflict or any other failure.
 */
static int lock_bytes(int fd, int cmd, short type, off_t start, short *held)
{
    struct flock fl;

    memset(&fl, 0, sizeof(fl));
    fl.l_type = type;
    fl.l_whence = SEEK_SET;
    fl.l_start = start;
    fl.l_len = 1;
    if (fcntl(fd, cmd, &fl) < 0) {
        return -1;
    }
    if (held) {
        *held = fl.l_type;
    }
    return 0;
}

static int reader_locks(int fd)
{
    static const int perm = 0x1, unshared = 0x2 | 0x8;
    short held;
    int i;

    for (i = 0; i < 4; i++) {
        if (((perm >> i) & 1) || ((unshared >> i) & 1)) {
            off_t byte = (perm >> i) & 1 ? 200 + i : 100 + i;

            if (lock_bytes(fd, F_OFD_GETLK, F_WRLCK, byte, &held) < 0) {
                goto failed;
            }
            if (held != F_UNLCK) {
                return no("the image is locked by another process");
            }
        }
    }
    for (i = 0; i < 4; i++) {
        if (((perm >> i) & 1) && lock_bytes(fd, F_OFD_SETLK, F_RDLCK, 100 + i, NULL) < 0) {
            goto failed;
        }
        if (((unshared >> i) & 1) && lock_bytes(fd, F_OFD_SETLK, F_RDLCK, 200 + i, NULL) < 0) {
            goto failed;
        }
    }
    return 0;
failed:
    if (errno == EINVAL || errno == ENOTSUP || errno == ENOLCK) {
        return 0;               /* no OFD locks here: QEMU goes on unlocked too */
    }
    return no("the image could not be locked");
}

/* ------------------------------------------------------------------------ */
/* The header                                                                */

struct snap {
    const uint8_t *id, *name;
    size_t id_len, name_len;
    uint32_t date_sec, date_nsec;
    uint64_t vm_clock_nsec, vm_state_size, icount;
    int has_icount;
};

struct image {
    uint64_t file_size, actual_size;
    uint32_t version, cluster_bits, crypt_method, l1_size, refcount_table_clusters;
    uint32_t nb_snapshots, refcount_order, header_length, backing_file_size;
    uint64_t backing_file_offset, size, l1_table_offset, refcount_table_offset;
    uint64_t snapshots_offset, incompat, compat, autoclear;
    int compression;
    uint8_t *first;             /* the header's cluster, as far as it is needed */
    const uint8_t *backing, *backing_format;
    size_t backing_len, backing_format_len;
    uint8_t *table;             /* the snapshot table */
    struct snap *snaps;
};

/* QEMU's qcow2_validate_table (header.py validate_table). */
static int valid_table(const struct image *im, uint64_t offset, uint64_t entries,
                       uint64_t entry_len, uint64_t max_bytes)
{
    if (entries > max_bytes / entry_len) {
        return 0;
    }
    if (MAX_TABLE_END - entries * entry_len < offset ||
        (offset & (((uint64_t)1 << im->cluster_bits) - 1))) {
        return 0;
    }
    return 1;
}

/* The fixed fields and their checks (header.py Header._parse_fields). */
static int parse_fields(struct image *im, const uint8_t *h, size_t n)
{
    uint64_t cs;

    if (n < 8 || be32(h) != MAGIC) {
        return no("not a qcow2 image");
    }
    im->version = be32(h + 4);
    if (im->version != 2 && im->version != 3) {
        return no("a qcow2 version other than 2 or 3");
    }
    if (n < V2_HEADER_LENGTH) {
        return no("the header is cut short");
    }
    im->backing_file_offset = be64(h + 8);
    im->backing_file_size = be32(h + 16);
    im->cluster_bits = be32(h + 20);
    im->size = be64(h + 24) / 512 * 512;
    im->crypt_method = be32(h + 32);
    im->l1_size = be32(h + 36);
    im->l1_table_offset = be64(h + 40);
    im->refcount_table_offset = be64(h + 48);
    im->refcount_table_clusters = be32(h + 56);
    im->nb_snapshots = be32(h + 60);
    im->snapshots_offset = be64(h + 64);
    im->refcount_order = 4;
    im->header_length = V2_HEADER_LENGTH;
    if (im->cluster_bits < MIN_CLUSTER_BITS || im->cluster_bits > MAX_CLUSTER_BITS) {
        return no("an invalid cluster size");
    }
    cs = (uint64_t)1 << im->cluster_bits;
    if (im->version == 3) {
        if (n < V3_MIN_HEADER_LENGTH) {
            return no("the version 3 header is cut short");
        }
        im->incompat = be64(h + 72);
        im->compat = be64(h + 80);
        im->autoclear = be64(h + 88);
        im->refcount_order = be32(h + 96);
        im->header_length = be32(h + 100);
        if (im->header_length < V3_MIN_HEADER_LENGTH) {
            return no("header_length too short");
        }
    }
    if (im->header_length > cs || im->backing_file_offset > cs) {
        return no("header_length or the backing file offset past the first cluster");
    }
    return 0;
}

/* Sizes and places of the tables, before any is read (header.py
 * _validate_geometry), and the features this file shows. */
static int check_geometry(struct image *im)
{
    uint64_t cs = (uint64_t)1 << im->cluster_bits;
    int extl2 = (im->incompat & INCOMPAT_EXTL2) != 0;
    unsigned l2_bits = im->cluster_bits - (extl2 ? 4 : 3), shift;
    uint64_t needed;

    if (im->incompat & ~(uint64_t)INCOMPAT_MASK) {
        return no("unknown incompatible features");
    }
    if (im->incompat & INCOMPAT_DATA_FILE) {
        return no("an external data file");
    }
    if (im->compression == COMPRESSION_ZLIB ? (im->incompat & INCOMPAT_COMPRESSION) != 0
        : im->compression != COMPRESSION_ZSTD || !(im->incompat & INCOMPAT_COMPRESSION)) {
        return no("an invalid compression type");
    }
    if (im->autoclear & AUTOCLEAR_DATA_FILE_RAW) {
        return no("raw external data");         /* (unknown autoclear bits: ignored) */
    }
    if (extl2 && cs / SUBCLUSTERS_PER_CLUSTER < ((uint64_t)1 << MIN_CLUSTER_BITS)) {
        return no("subclusters too small");
    }
    if (im->refcount_order > 6) {
        return no("refcount_order too large");
    }
    if (im->crypt_method != 0) {
        return no("encryption");
    }
    if (im->refcount_table_clusters == 0 ||
        !valid_table(im, im->refcount_table_offset, im->refcount_table_clusters, cs,
                     MAX_REFTABLE_SIZE)) {
        return no("an invalid refcount table");
    }
    if (im->nb_snapshots > MAX_SNAPSHOTS ||
        !valid_table(im, im->snapshots_offset, im->nb_snapshots, SNAPSHOT_HEADER_SIZE,
                     (uint64_t)SNAPSHOT_HEADER_SIZE * MAX_SNAPSHOTS)) {
        return no("an invalid snapshot table");
    }
    if (!valid_table(im, im->l1_table_offset, im->l1_size, 8, MAX_L1_SIZE)) {
        return no("an invalid L1 table");
    }
    shift = im->cluster_bits + l2_bits;
    needed = (im->size >> shift) + ((im->size & (((uint64_t)1 << shift) - 1)) != 0);
    if (needed > MAX_L1_ENTRIES || im->l1_size < needed) {
        return no("an L1 table too small for the virtual size");
    }
    return 0;
}

/* The header extensions (header.py _read_extensions) up to @end. */
static int read_extensions(struct image *im, size_t have, uint64_t end)
{
    uint64_t off = im->header_length;

    while (off < end) {
        uint32_t magic, len;
        const uint8_t *data;

        if (off + 8 > have) {
            break;              /* zeros past the buffer: an end marker */
        }
        magic = be32(im->first + off);
        len = be32(im->first + off + 4);
        off += 8;
        if (off > end || len > end - off) {
            return no("a header extension too large");
        }
        data = im->first + off;
        if (magic == EXT_END) {
            return 0;
        }
        switch (magic) {
        case EXT_BACKING_FORMAT:
            if (len >= EXT_BACKING_FORMAT_MAX) {
                return no("a backing format name too long");
            }
            im->backing_format = data;
            im->backing_format_len = strnlen((const char *)data, len);
            break;
        case EXT_CRYPTO_HEADER:
            return no("an encryption header extension");
        case EXT_BITMAPS:
            return no("bitmaps");
        case EXT_DATA_FILE:
            return no("an external data file name");
        default:                /* the feature table, and unknown ones: skipped */
            break;
        }
        off += ((uint64_t)len + 7) & ~(uint64_t)7;
    }
    return 0;
}

/* Header.parse: the header, its extensions and the backing file name. */
static int read_header(int fd, struct image *im)
{
    uint8_t head[V3_MIN_HEADER_LENGTH];
    ssize_t n = read_at(fd, head, sizeof(head), 0);
    uint64_t cs, ext_end, reach, need;

    if (n < 0) {
        return no("the image cannot be read");
    }
    if (parse_fields(im, head, (size_t)n) < 0) {
        return -1;
    }
    cs = (uint64_t)1 << im->cluster_bits;
    ext_end = im->backing_file_offset ? im->backing_file_offset : cs;
    reach = im->header_length;
    if (ext_end + 8 > reach) {
        reach = ext_end + 8;
    }
    if (im->backing_file_offset + im->backing_file_size > reach) {
        reach = im->backing_file_offset + im->backing_file_size;
    }
    need = reach < cs ? reach : cs;                     /* at most 2 MiB */
    im->first = calloc(1, (size_t)need);
    if (!im->first) {
        return no("out of memory");
    }
    n = read_at(fd, im->first, (size_t)need, 0);
    if (n < 0 || (uint64_t)n < im->header_length) {
        return no("the header is cut short");
    }
    im->compression = im->header_length > HDR_COMPRESSION_TYPE
        ? im->first[HDR_COMPRESSION_TYPE] : COMPRESSION_ZLIB;
    if (check_geometry(im) < 0 || read_extensions(im, (size_t)need, ext_end) < 0) {
        return -1;
    }
    if (im->backing_format && !plain_text(im->backing_format, im->backing_format_len)) {
        return no("a backing format name that is not plain text");
    }
    if (im->backing_file_offset) {
        uint64_t max = cs - im->backing_file_offset;

        if (max > MAX_BACKING_FILE_NAME) {
            max = MAX_BACKING_FILE_NAME;
        }
        if (im->backing_file_size > max) {
            return no("a backing file name too long");
        }
        im->backing = im->first + im->backing_file_offset;
        im->backing_len = strnlen((const char *)im->backing, im->backing_file_size);
        if (im->backing_len == 0 || !plain_text(im->backing, im->backing_len) ||
            memchr(im->backing, ':', im->backing_len)) {
            return no("a backing file name that is not a plain path");
        }
    }
    return 0;
}

/* Make the snapshot table buffer hold its first @end bytes (read ahead up to
 * 1 MiB at a time); -1 past @limit. */
static int table_bytes(int fd, struct image *im, uint64_t *have, uint64_t limit,
                       uint64_t end)
{
    uint64_t want, step;
    uint8_t *grown;
    ssize_t got;

    if (end <= *have) {
        return 0;
    }
    if (end > limit) {
        return no("a snapshot table past the end of the file");
    }
    step = *have > (64 << 10) ? *have : (64 << 10);
    want = *have + (step < (1 << 20) ? step : (1 << 20));
    want = want < end ? end : want > limit ? limit : want;
    grown = realloc(im->table, (size_t)want);
    if (!grown) {
        return no("out of memory");
    }
    im->table = grown;
    got = read_at(fd, im->table + *have, (size_t)(want - *have), im->snapshots_offset + *have);
    if (got < 0 || (uint64_t)got != want - *have) {
        return no("the snapshot table cannot be read");
    }
    *have = want;
    return 0;
}

/* read_snapshot_table (snapshot.py), for a table wholly inside the file. */
static int read_snapshots(int fd, struct image *im)
{
    uint64_t limit, pos = 0, have = 0;
    uint32_t i;

    if (im->nb_snapshots == 0) {
        return 0;
    }
    limit = im->file_size > im->snapshots_offset ? im->file_size - im->snapshots_offset : 0;
    if (limit > MAX_SNAPSHOTS_SIZE) {
        limit = MAX_SNAPSHOTS_SIZE;
    }
    /* entries are at least 40 bytes: the table needs that much of the file */
    if ((uint64_t)im->nb_snapshots * SNAPSHOT_HEADER_SIZE > limit) {
        return no("a snapshot table past the end of the file");
    }
    im->snaps = calloc(im->nb_snapshots, sizeof(*im->snaps));
    if (!im->snaps) {
        return no("out of memory");
    }
    for (i = 0; i < im->nb_snapshots; i++) {
        struct snap *s = &im->snaps[i];
        const uint8_t *e;
        uint32_t extra;
        uint64_t names;

        pos = (pos + 7) & ~(uint64_t)7;
        if (table_bytes(fd, im, &have, limit, pos + SNAPSHOT_HEADER_SIZE) < 0) {
            return -1;
        }
        e = im->table + pos;
        extra = be32(e + 36);
        if (extra > MAX_SNAPSHOT_EXTRA_DATA) {
            return no("too much extra data in a snapshot");
        }
        s->id_len = be16(e + 12);
        s->name_len = be16(e + 14);
        s->date_sec = be32(e + 16);
        s->date_nsec = be32(e + 20);
        s->vm_clock_nsec = be64(e + 24);
        s->vm_state_size = be32(e + 32);
        names = pos + SNAPSHOT_HEADER_SIZE + extra;
        if (table_bytes(fd, im, &have, limit, names + s->id_len + s->name_len) < 0) {
            return -1;
        }
        e = im->table + pos + SNAPSHOT_HEADER_SIZE;     /* (the buffer may have moved) */
        if (extra >= 8) {
            s->vm_state_size = be64(e);
        }
        if (extra >= 24) {
            s->icount = be64(e + 16);
            s->has_icount = s->icount != SNAPSHOT_ICOUNT_UNKNOWN;
        }
        /* names as offsets until the buffer is whole: it may still move */
        s->id = (const uint8_t *)(uintptr_t)names;
        s->name = (const uint8_t *)(uintptr_t)(names + s->id_len);
        pos = names + s->id_len + s->name_len;
    }
    for (i = 0; i < im->nb_snapshots; i++) {
        struct snap *s = &im->snaps[i];

        s->id = im->table + (uintptr_t)s->id;
        s->name = im->table + (uintptr_t)s->name;
        if (!plain_text(s->id, s->id_len) || !plain_text(s->name, s->name_len)) {
            return no("a snapshot name that is not plain text");
        }
    }
    return 0;
}

/* ------------------------------------------------------------------------ */
/* Output (qcow2/cli/output.py)                                              */

struct out {
    char *buf;
    size_t len, cap;
    int failed;
};

static void put(struct out *o, const char *fmt, ...)
{
    va_list ap;
    int n;

    for (;;) {
        va_start(ap, fmt);
        n = vsnprintf(o->buf ? o->buf + o->len : NULL, o->buf ? o->cap - o->len : 0, fmt, ap);
        va_end(ap);
        if (n < 0) {
            o->failed = 1;
            return;
        }
        if (o->buf && (size_t)n < o->cap - o->len) {
            o->len += (size_t)n;
            return;
        }
        {
            size_t cap = o->cap ? o->cap * 2 : 4096;
            char *grown;

            while (cap < o->len + (size_t)n + 1) {
                cap *= 2;
            }
            grown = realloc(o->buf, cap);
            if (!grown) {
                o->failed = 1;
                return;
            }
            o->buf = grown;
            o->cap = cap;
        }
    }
}

/* QEMU's size_to_str: three significant digits, binary suffixes. */
static void size_str(char *buf, size_t size, uint64_t val)
{
    static const char *const suffixes[] = { "", "Ki", "Mi", "Gi", "Ti", "Pi", "Ei" };
    int e, i;
    double div;

    (void)frexp((double)val / (1000.0 / 1024.0), &e);
    i = e > 0 ? (e - 1) / 10 : 0;
    if (i > 6) {
        i = 6;
    }
    div = ldexp(1.0, i * 10);
    snprintf(buf, size, "%0.3g %sB", (double)val / div, suffixes[i]);
}

/* A JSON string of printable ASCII (plain_text): only " and \ need escapes. */
static void json_str(struct out *o, const uint8_t *s, size_t n)
{
    size_t i;

    put(o, "\"");
    for (i = 0; i < n; i++) {
        if (s[i] == '"' || s[i] == '\\') {
            put(o, "\\%c", s[i]);
        } else {
            put(o, "%c", s[i]);
        }
    }
    put(o, "\"");
}

/* posixpath.join(posixpath.dirname(base), name), for a relative @name. */
static void full_backing(struct out *o, const char *base, const uint8_t *name, size_t n,
                         int json)
{
    const char *slash = strrchr(base, '/');
    size_t head = slash ? (size_t)(slash - base) + 1 : 0;
    size_t trimmed = head;
    struct out tmp = { 0 };

    while (trimmed > 0 && base[trimmed - 1] == '/') {
        trimmed--;
    }
    if (trimmed == 0) {
        trimmed = head;          /* all slashes ("/x"): kept whole */
    }
    if (name[0] == '/') {
        trimmed = 0;             /* absolute: stands for itself */
    }
    put(&tmp, "%.*s", (int)trimmed, base);
    if (trimmed > 0 && base[trimmed - 1] != '/') {
        put(&tmp, "/");
    }
    put(&tmp, "%.*s", (int)n, (const char *)name);
    if (tmp.failed) {
        o->failed = 1;
    } else if (json) {
        json_str(o, (const uint8_t *)tmp.buf, tmp.len);
    } else {
        put(o, "%s", tmp.buf);
    }
    free(tmp.buf);
}

static int same_full_backing(const char *base, const uint8_t *name, size_t n)
{
    struct out tmp = { 0 };
    int same;

    full_backing(&tmp, base, name, n, 0);
    same = !tmp.failed && tmp.len == n && memcmp(tmp.buf, name, n) == 0;
    free(tmp.buf);
    return same;
}

static void snapshot_rows(struct out *o, const struct image *im)
{
    uint32_t i;

    put(o, "Snapshot list:\n%-10s%-17s%8s%20s%13s%11s\n", "ID", "TAG", "VM SIZE", "DATE",
        "VM CLOCK", "ICOUNT");
    tzset();
    for (i = 0; i < im->nb_snapshots; i++) {
        const struct snap *s = &im->snaps[i];
        char size[32], date[64], clock[64], icount[32];
        time_t t = (time_t)s->date_sec;
        struct tm tm;
        uint64_t secs = s->vm_clock_nsec / 1000000000u;

        size_str(size, sizeof(size), s->vm_state_size);
        if (!localtime_r(&t, &tm) ||
            !strftime(date, sizeof(date), "%Y-%m-%d %H:%M:%S", &tm)) {
            o->failed = 1;
            return;
        }
        snprintf(clock, sizeof(clock), "%02" PRIu64 ":%02" PRIu64 ":%02" PRIu64 ".%03" PRIu64,
                 secs / 3600, (secs / 60) % 60, secs % 60,
                 (s->vm_clock_nsec / 1000000u) % 1000);
        icount[0] = '\0';
        if (s->has_icount) {
            snprintf(icount, sizeof(icount), "%" PRIu64, s->icount);
        }
        put(o, "%-9.*s %-16.*s %8s%20s%13s%11s\n",
            (int)(s->id_len < 127 ? s->id_len : 127), (const char *)s->id,
            (int)(s->name_len < 255 ? s->name_len : 255), (const char *)s->name,
            size, date, clock, icount);
    }
}

static void human(struct out *o, const struct image *im, const char *file)
{
    char size[32], disk[32];
    int v3 = im->version == 3;

    size_str(size, sizeof(size), im->size);
    size_str(disk, sizeof(disk), im->actual_size);
    put(o, "image: %s\nfile format: qcow2\nvirtual size: %s (%" PRIu64 " bytes)\n"
        "disk size: %s\ncluster_size: %" PRIu64 "\n", file, size, im->size, disk,
        (uint64_t)1 << im->cluster_bits);
    if (im->incompat & INCOMPAT_DIRTY) {
        put(o, "cleanly shut down: no\n");
    }
    if (im->backing) {
        put(o, "backing file: %.*s", (int)im->backing_len, (const char *)im->backing);
        if (!same_full_backing(file, im->backing, im->backing_len)) {
            put(o, " (actual path: ");
            full_backing(o, file, im->backing, im->backing_len, 0);
            put(o, ")");
        }
        put(o, "\n");
    }
    if (im->backing_format) {
        put(o, "backing file format: %.*s\n", (int)im->backing_format_len,
            (const char *)im->backing_format);
    }
    if (im->nb_snapshots) {
        snapshot_rows(o, im);
    }
    put(o, "Format specific information:\n    compat: %s\n    compression type: %s\n",
        v3 ? "1.1" : "0.10", im->compression == COMPRESSION_ZSTD ? "zstd" : "zlib");
    if (v3) {
        put(o, "    lazy refcounts: %s\n", im->compat & COMPAT_LAZY_REFCOUNTS ? "true" : "false");
    }
    put(o, "    refcount bits: %u\n", 1u << im->refcount_order);
    if (v3) {
        put(o, "    corrupt: %s\n    extended l2: %s\n",
            im->incompat & INCOMPAT_CORRUPT ? "true" : "false",
            im->incompat & INCOMPAT_EXTL2 ? "true" : "false");
    }
}

static void json(struct out *o, const struct image *im, const char *file)
{
    int v3 = im->version == 3;
    uint32_t i;

    put(o, "{\n");
    if (im->backing_format) {
        put(o, "    \"backing-filename-format\": ");
        json_str(o, im->backing_format, im->backing_format_len);
        put(o, ",\n");
    }
    if (im->nb_snapshots) {
        put(o, "    \"snapshots\": [\n");
        for (i = 0; i < im->nb_snapshots; i++) {
            const struct snap *s = &im->snaps[i];

            put(o, "        {\n");
            if (s->has_icount) {
                put(o, "            \"icount\": %" PRIu64 ",\n", s->icount);
            }
            put(o, "            \"vm-clock-nsec\": %" PRIu64 ",\n            \"name\": ",
                s->vm_clock_nsec % 1000000000u);
            json_str(o, s->name, s->name_len);
            put(o, ",\n            \"date-sec\": %" PRIu32 ",\n            \"date-nsec\": %"
                PRIu32 ",\n            \"vm-clock-sec\": %" PRIu64 ",\n            \"id\": ",
                s->date_sec, s->date_nsec, s->vm_clock_nsec / 1000000000u);
            json_str(o, s->id, s->id_len);
            put(o, ",\n            \"vm-state-size\": %" PRIu64 "\n        }%s\n",
                s->vm_state_size, i + 1 < im->nb_snapshots ? "," : "");
        }
        put(o, "    ],\n");
    }
    put(o, "    \"virtual-size\": %" PRIu64 ",\n    \"filename\": ", im->size);
    json_str(o, (const uint8_t *)file, strlen(file));
    put(o, ",\n    \"cluster-size\": %" PRIu64 ",\n    \"format\": \"qcow2\",\n"
        "    \"actual-size\": %" PRIu64 ",\n    \"format-specific\": {\n"
        "        \"type\": \"qcow2\",\n        \"data\": {\n"
        "            \"compat\": \"%s\",\n            \"compression-type\": \"%s\",\n",
        (uint64_t)1 << im->cluster_bits, im->actual_size, v3 ? "1.1" : "0.10",
        im->compression == COMPRESSION_ZSTD ? "zstd" : "zlib");
    if (v3) {
        put(o, "            \"lazy-refcounts\": %s,\n",
            im->compat & COMPAT_LAZY_REFCOUNTS ? "true" : "false");
    }
    put(o, "            \"refcount-bits\": %u%s\n", 1u << im->refcount_order, v3 ? "," : "");
    if (v3) {
        put(o, "            \"corrupt\": %s,\n            \"extended-l2\": %s\n",
            im->incompat & INCOMPAT_CORRUPT ? "true" : "false",
            im->incompat & INCOMPAT_EXTL2 ? "true" : "false");
    }
    put(o, "        }\n    },\n");
    if (im->backing) {
        put(o, "    \"full-backing-filename\": ");
        full_backing(o, file, im->backing, im->backing_len, 1);
        put(o, ",\n    \"backing-filename\": ");
        json_str(o, im->backing, im->backing_len);
        put(o, ",\n");
    }
    put(o, "    \"dirty-flag\": %s\n}\n", im->incompat & INCOMPAT_DIRTY ? "true" : "false");
}

/* Write it all to stdout: 0, or an errno. */
static int write_out(const struct out *o)
{
    size_t done = 0;

    while (done < o->len) {
        ssize_t n = write(STDOUT_FILENO, o->buf + done, o->len - done);

        if (n < 0) {
            if (errno == EINTR) {
                continue;
            }
            return errno;
        }
        done += (size_t)n;
    }
    return 0;
}

/*
 * `qcow2 info`, answered here: 0 when printed (exit status in *@status), -1
 * when Python is to take the command.
 */
static int info(int argc, char **argv, int *status)
{
    struct opts opts;
    struct image im;
    struct out o = { 0 };
    struct stat st;
    int fd, err;

    memset(&im, 0, sizeof(im));
    if (parse_args(argc, argv, &opts) < 0) {
        return -1;
    }
    if (strchr(opts.file, ':') || !plain_text((const uint8_t *)opts.file, strlen(opts.file))) {
        return no("a file name that is not a plain path");
    }
    fd = open(opts.file, O_RDONLY | O_CLOEXEC);
    if (fd < 0) {
        return no("the file cannot be opened");
    }
    if (fstat(fd, &st) < 0 || !S_ISREG(st.st_mode)) {
        close(fd);
        return no("not a regular file");
    }
    if ((!opts.share && reader_locks(fd) < 0) || read_header(fd, &im) < 0) {
        goto hand_off;
    }
    im.file_size = (uint64_t)st.st_size;
    if (read_snapshots(fd, &im) < 0) {
        goto hand_off;
    }
    if (fstat(fd, &st) < 0) {
        no("the file cannot be examined");
        goto hand_off;
    }
    im.actual_size = (uint64_t)st.st_blocks * 512;
    if (opts.json) {
        json(&o, &im, opts.file);
    } else {
        human(&o, &im, opts.file);
    }
    if (o.failed) {
        no("out of memory");
        goto hand_off;
    }
    signal(SIGPIPE, SIG_IGN);                   /* as Python: EPIPE, not a signal */
    err = write_out(&o);
    close(fd);                                  /* (the locks go with it) */
    if (err == 0) {
        *status = 0;
    } else {
        if (err != EPIPE) {
            const char *prog = strrchr(argv[0], '/');

            fprintf(stderr, "%s: %s\n", prog ? prog + 1 : argv[0], strerror(err));
        }
        *status = 1;
    }
    if (getenv("QCOW2_LAUNCHER_TRACE")) {
        fprintf(stderr, "qcow2 launcher: native\n");
    }
    return 0;
hand_off:
    close(fd);
    free(im.first);
    free(im.table);
    free(im.snaps);
    free(o.buf);
    return -1;
}

int main(int argc, char **argv)
{
    const char *impl = getenv("QCOW2_IMPL");
    int status;

    if (impl && !strcmp(impl, "python")) {
        reason = "QCOW2_IMPL=python";
    } else if (argc > 0 && info(argc, argv, &status) == 0) {
        return status;
    }
    hand_off(argc > 0 ? argc : 1, argc > 0 ? argv : (char *[]){ "qcow2", NULL });
    return 127;
}
