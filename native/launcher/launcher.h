/*
 * launcher.h - what the parts of the installed `qcow2` command share
 * (launcher.c: the command line and the hand-off to Python; image.c: reading
 * and checking the image; print.c: what `info` prints).
 */

#ifndef QCOW2_LAUNCHER_H
#define QCOW2_LAUNCHER_H

#define _GNU_SOURCE
#include <stddef.h>
#include <stdint.h>

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

/* Step aside: the command goes to Python, for the reason @why (a static
 * string, printed with QCOW2_LAUNCHER_TRACE=1).  Returns -1. */
int step_aside(const char *why);

/* Whether @n bytes at @s are printable ASCII (printed and escaped here as
 * Python does; anything else is left to Python). */
int plain_text(const uint8_t *s, size_t n);

struct snap {
    const uint8_t *id, *name;
    size_t id_len, name_len;
    uint32_t date_sec, date_nsec;
    uint64_t vm_clock_nsec, vm_state_size, icount;
    int has_icount;
};

/* the format asked for (-f), or none: probed as Python probes (qcow2/probe.py) */
enum { FORMAT_PROBE, FORMAT_QCOW2, FORMAT_RAW };

struct image {
    int raw;                    /* a raw image (only the sizes below are set) */
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

/* Read and check the image open at @fd (of @file_size bytes) in @format (a
 * FORMAT_*): 0, or -1 when Python is to answer (step_aside() says why).
 * @share: take no locks (-U). */
int read_image(int fd, struct image *im, uint64_t file_size, int share, int format);

/* Release what read_image() allocated. */
void free_image(struct image *im);

/* `qcow2 convert` of a plain qcow2 into a new raw file (convert.c): 0 when done
 * (exit status in *@status), -1 when Python is to take the command (nothing is
 * left behind then). */
int native_convert(int argc, char **argv, int *status);

struct out {
    char *buf;
    size_t len, cap;
    int failed;
};

/* The text `qcow2 info` prints for @im opened as @file: human or JSON. */
void print_human(struct out *o, const struct image *im, const char *file);
void print_json(struct out *o, const struct image *im, const char *file);

#endif
