/*
 * print.c - what `qcow2 info` prints, byte for byte as qcow2/cli/output.py
 * prints qcow2/reader.py's info(): the human text and QEMU's pretty JSON.
 */

#include "launcher.h"

#include <inttypes.h>
#include <math.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

/* ------------------------------------------------------------------------ */
/* Output (qcow2/cli/output.py)                                              */

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

/* print_human - see launcher.h. */
void print_human(struct out *o, const struct image *im, const char *file)
{
    char size[32], disk[32];
    int v3 = im->version == 3;

    size_str(size, sizeof(size), im->size);
    size_str(disk, sizeof(disk), im->actual_size);
    put(o, "image: %s\nfile format: %s\nvirtual size: %s (%" PRIu64 " bytes)\n"
        "disk size: %s\n", file, im->raw ? "raw" : "qcow2", size, im->size, disk);
    if (im->raw) {
        return;
    }
    put(o, "cluster_size: %" PRIu64 "\n", (uint64_t)1 << im->cluster_bits);
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

/* print_json - see launcher.h. */
void print_json(struct out *o, const struct image *im, const char *file)
{
    int v3 = im->version == 3;
    uint32_t i;

    if (im->raw) {                              /* RawImage.info() */
        put(o, "{\n    \"virtual-size\": %" PRIu64 ",\n    \"filename\": ", im->size);
        json_str(o, (const uint8_t *)file, strlen(file));
        put(o, ",\n    \"format\": \"raw\",\n    \"actual-size\": %" PRIu64 ",\n"
            "    \"dirty-flag\": false\n}\n", im->actual_size);
        return;
    }
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

