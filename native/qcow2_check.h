/*
 * qcow2_check.h - the check's fast path (native/check.c), declarations only.
 *
 * native/build_native.py appends this file to qcow2_native.h for cffi's
 * cdef(), so the same rules hold: no #include, no include guard, no macro
 * with a non-literal value.  Pure functions, no Python API: cffi releases the
 * GIL around each call.
 *
 * Both functions take L2 tables as they are on disk (big-endian standard
 * entries, no subcluster bitmaps, no external data file: the caller keeps
 * its general path for the other layouts) and a per-table flag array: a
 * table whose flag is set on entry is skipped; a table with anything to
 * report is flagged on return, and left for the caller's general path.
 */

/* Flags of qcow2c_l2_count() and qcow2c_copied(), one byte per table. */
#define QCOW2C_SLOW 1

/*
 * qcow2c_l2_count: count the references of the clean tables into the
 * in-memory refcount table ``imrt`` (``width`` bytes per entry, 1, 2, 4 or
 * 8; ``imrt_len`` entries).  A table is clean when no standard entry has
 * reserved bits set or an allocated host offset that is unaligned, at or past
 * ``file_size`` or past the IMRT, and no compressed entry has the COPIED flag
 * or data ending a cluster or more past ``file_size`` (or past the IMRT).
 * With ``rmax`` below the width's maximum, a table whose references would
 * take a count past ``rmax`` is left unchanged and flagged.  Adds to
 * stats[0] allocated clusters (compressed included), stats[1] fragmented
 * clusters (every compressed one too), stats[2] references of standard
 * entries, stats[3] compressed clusters, stats[4] references of compressed
 * entries.  Each allocated standard entry of a counted table is recorded in
 * ``rec`` as its host cluster index with bit 63 its COPIED flag, from
 * rec[stats[5]] on; stats[5] is the count recorded, UINT64_MAX once more
 * than ``rec_cap`` were met (``rec`` may be NULL with ``rec_cap`` 0).
 * Returns the number of tables flagged, or -1 on a bad argument.
 */
int64_t qcow2c_l2_count(const uint8_t *tables, size_t ntables, size_t entries,
                        unsigned cluster_bits, uint64_t file_size,
                        void *imrt, unsigned width, uint64_t imrt_len,
                        uint64_t rmax, uint8_t *flags, uint64_t *stats,
                        uint64_t *rec, uint64_t rec_cap);

/*
 * qcow2c_copied: flag the tables with an allocated entry whose COPIED flag
 * disagrees with refcount == 1, the refcounts taken from ``refcounts``
 * (``width`` bytes per entry, ``len`` entries); an entry past ``len`` flags
 * its table too.  Returns the number of tables flagged, or -1.
 */
int64_t qcow2c_copied(const uint8_t *tables, size_t ntables, size_t entries,
                      unsigned cluster_bits, const void *refcounts,
                      unsigned width, uint64_t len, uint8_t *flags);

/*
 * qcow2c_compare: compare the stored refcounts of clusters [first, first + n)
 * -- ``block`` holds them big-endian, ``bits`` (8, 16, 32 or 64) wide, or is
 * NULL for a missing block (all zero) -- with the IMRT entries at ``first``.
 * ``*highest`` is set to the last cluster of the range with a nonzero stored
 * or computed refcount (left alone if there is none).  Returns the number of
 * clusters that differ, or -1 on a bad argument.
 */
int64_t qcow2c_compare(const uint8_t *block, unsigned bits, const void *imrt,
                       unsigned width, uint64_t first, size_t n, uint64_t *highest);

/*
 * qcow2c_copied_list: how many of the ``n`` entries recorded by
 * qcow2c_l2_count have a COPIED flag that disagrees with refcount == 1 (or a
 * cluster at or past ``len``); -1 on a bad argument.
 */
int64_t qcow2c_copied_list(const uint64_t *rec, size_t n, const void *refcounts,
                           unsigned width, uint64_t len);
