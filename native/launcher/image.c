/*
 * image.c - the image as the `qcow2` command's `info` reads it: QEMU's reader
 * locks, the header and its extensions, the snapshot table, with every check
 * qcow2/header.py and qcow2/snapshot.py make before an image is opened (a
 * failing one steps aside: Python reports it).
 */

#include "launcher.h"

#include <errno.h>
#include <fcntl.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

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
                return step_aside("the image is locked by another process");
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
    return step_aside("the image could not be locked");
}

/* ------------------------------------------------------------------------ */
/* The header                                                                */

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
        return step_aside("not a qcow2 image");
    }
    im->version = be32(h + 4);
    if (im->version != 2 && im->version != 3) {
        return step_aside("a qcow2 version other than 2 or 3");
    }
    if (n < V2_HEADER_LENGTH) {
        return step_aside("the header is cut short");
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
        return step_aside("an invalid cluster size");
    }
    cs = (uint64_t)1 << im->cluster_bits;
    if (im->version == 3) {
        if (n < V3_MIN_HEADER_LENGTH) {
            return step_aside("the version 3 header is cut short");
        }
        im->incompat = be64(h + 72);
        im->compat = be64(h + 80);
        im->autoclear = be64(h + 88);
        im->refcount_order = be32(h + 96);
        im->header_length = be32(h + 100);
        if (im->header_length < V3_MIN_HEADER_LENGTH) {
            return step_aside("header_length too short");
        }
    }
    if (im->header_length > cs || im->backing_file_offset > cs) {
        return step_aside("header_length or the backing file offset past the first cluster");
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
        return step_aside("unknown incompatible features");
    }
    if (im->incompat & INCOMPAT_DATA_FILE) {
        return step_aside("an external data file");
    }
    if (im->compression == COMPRESSION_ZLIB ? (im->incompat & INCOMPAT_COMPRESSION) != 0
        : im->compression != COMPRESSION_ZSTD || !(im->incompat & INCOMPAT_COMPRESSION)) {
        return step_aside("an invalid compression type");
    }
    if (im->autoclear & AUTOCLEAR_DATA_FILE_RAW) {
        return step_aside("raw external data");         /* (unknown autoclear bits: ignored) */
    }
    if (extl2 && cs / SUBCLUSTERS_PER_CLUSTER < ((uint64_t)1 << MIN_CLUSTER_BITS)) {
        return step_aside("subclusters too small");
    }
    if (im->refcount_order > 6) {
        return step_aside("refcount_order too large");
    }
    if (im->crypt_method != 0) {
        return step_aside("encryption");
    }
    if (im->refcount_table_clusters == 0 ||
        !valid_table(im, im->refcount_table_offset, im->refcount_table_clusters, cs,
                     MAX_REFTABLE_SIZE)) {
        return step_aside("an invalid refcount table");
    }
    if (im->nb_snapshots > MAX_SNAPSHOTS ||
        !valid_table(im, im->snapshots_offset, im->nb_snapshots, SNAPSHOT_HEADER_SIZE,
                     (uint64_t)SNAPSHOT_HEADER_SIZE * MAX_SNAPSHOTS)) {
        return step_aside("an invalid snapshot table");
    }
    if (!valid_table(im, im->l1_table_offset, im->l1_size, 8, MAX_L1_SIZE)) {
        return step_aside("an invalid L1 table");
    }
    shift = im->cluster_bits + l2_bits;
    needed = (im->size >> shift) + ((im->size & (((uint64_t)1 << shift) - 1)) != 0);
    if (needed > MAX_L1_ENTRIES || im->l1_size < needed) {
        return step_aside("an L1 table too small for the virtual size");
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
            return step_aside("a header extension too large");
        }
        data = im->first + off;
        if (magic == EXT_END) {
            return 0;
        }
        switch (magic) {
        case EXT_BACKING_FORMAT:
            if (len >= EXT_BACKING_FORMAT_MAX) {
                return step_aside("a backing format name too long");
            }
            im->backing_format = data;
            im->backing_format_len = strnlen((const char *)data, len);
            break;
        case EXT_CRYPTO_HEADER:
            return step_aside("an encryption header extension");
        case EXT_BITMAPS:
            return step_aside("bitmaps");
        case EXT_DATA_FILE:
            return step_aside("an external data file name");
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
        return step_aside("the image cannot be read");
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
        return step_aside("out of memory");
    }
    n = read_at(fd, im->first, (size_t)need, 0);
    if (n < 0 || (uint64_t)n < im->header_length) {
        return step_aside("the header is cut short");
    }
    im->compression = im->header_length > HDR_COMPRESSION_TYPE
        ? im->first[HDR_COMPRESSION_TYPE] : COMPRESSION_ZLIB;
    if (check_geometry(im) < 0 || read_extensions(im, (size_t)need, ext_end) < 0) {
        return -1;
    }
    if (im->backing_format && !plain_text(im->backing_format, im->backing_format_len)) {
        return step_aside("a backing format name that is not plain text");
    }
    if (im->backing_file_offset) {
        uint64_t max = cs - im->backing_file_offset;

        if (max > MAX_BACKING_FILE_NAME) {
            max = MAX_BACKING_FILE_NAME;
        }
        if (im->backing_file_size > max) {
            return step_aside("a backing file name too long");
        }
        im->backing = im->first + im->backing_file_offset;
        im->backing_len = strnlen((const char *)im->backing, im->backing_file_size);
        if (im->backing_len == 0 || !plain_text(im->backing, im->backing_len) ||
            memchr(im->backing, ':', im->backing_len)) {
            return step_aside("a backing file name that is not a plain path");
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
        return step_aside("a snapshot table past the end of the file");
    }
    step = *have > (64 << 10) ? *have : (64 << 10);
    want = *have + (step < (1 << 20) ? step : (1 << 20));
    want = want < end ? end : want > limit ? limit : want;
    grown = realloc(im->table, (size_t)want);
    if (!grown) {
        return step_aside("out of memory");
    }
    im->table = grown;
    got = read_at(fd, im->table + *have, (size_t)(want - *have), im->snapshots_offset + *have);
    if (got < 0 || (uint64_t)got != want - *have) {
        return step_aside("the snapshot table cannot be read");
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
        return step_aside("a snapshot table past the end of the file");
    }
    im->snaps = calloc(im->nb_snapshots, sizeof(*im->snaps));
    if (!im->snaps) {
        return step_aside("out of memory");
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
            return step_aside("too much extra data in a snapshot");
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
            return step_aside("a snapshot name that is not plain text");
        }
    }
    return 0;
}

/* read_image - see launcher.h. */
int read_image(int fd, struct image *im, uint64_t file_size, int share, int format)
{
    im->file_size = file_size;
    if (!share && reader_locks(fd) < 0) {
        return -1;
    }
    if (format == FORMAT_PROBE) {               /* probe.py's format_of() */
        uint8_t head[8];
        ssize_t n = read_at(fd, head, sizeof(head), 0);

        if (n < 0) {
            return step_aside("the image cannot be read");
        }
        format = n == (ssize_t)sizeof(head) && be32(head) == MAGIC && be32(head + 4) >= 2
            ? FORMAT_QCOW2 : FORMAT_RAW;
    }
    if (format == FORMAT_RAW) {                 /* image.py's RawImage: sectors */
        if (file_size > UINT64_MAX - 511) {
            return step_aside("a raw file too large");
        }
        im->raw = 1;
        im->size = (file_size + 511) & ~(uint64_t)511;
        return 0;
    }
    if (read_header(fd, im) < 0 || read_snapshots(fd, im) < 0) {
        return -1;
    }
    return 0;
}

/* free_image - see launcher.h. */
void free_image(struct image *im)
{
    free(im->first);
    free(im->table);
    free(im->snaps);
    im->first = im->table = NULL;
    im->snaps = NULL;
}
