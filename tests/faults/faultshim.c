/* An LD_PRELOAD fault injector for the write side of file I/O (tests only).
 *
 * Every call of pwrite/pwritev/pwritev2/write/fsync/fdatasync/ftruncate/fallocate/
 * posix_fallocate/copy_file_range (and their 64-bit and vector variants) on a file
 * whose path (readlink of /proc/self/fd/N) starts with QCOW2_FAULT_PREFIX is
 * counted, 1-based, across the threads of the process.  Environment:
 *
 *   QCOW2_FAULT_PREFIX   count only calls on files under this path (required)
 *   QCOW2_FAULT_AT       fail the call with this number (0 or unset: never fail)
 *   QCOW2_FAULT_ERRNO    the error: EIO (default), ENOSPC or a number
 *   QCOW2_FAULT_STICKY   1: every counted call from QCOW2_FAULT_AT on fails
 *   QCOW2_FAULT_LOG      append one line per counted call: "N op path", and
 *                        "!fault N op path" for each call failed
 *
 * A failed call does nothing (no byte written, nothing synced) and returns -1 with
 * errno set, as the kernel does for an I/O error found before any work.
 */
#define _GNU_SOURCE
#include <dlfcn.h>
#include <errno.h>
#include <fcntl.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/syscall.h>
#include <sys/types.h>
#include <sys/uio.h>
#include <unistd.h>

static const char *prefix;
static size_t prefix_len;
static long fault_at;
static int fault_errno = EIO;
static int sticky;
static int log_fd = -1;
static long counter;
static int ready;

static void init(void)
{
    if (__atomic_load_n(&ready, __ATOMIC_ACQUIRE))
        return;
    prefix = getenv("QCOW2_FAULT_PREFIX");
    prefix_len = prefix ? strlen(prefix) : 0;
    const char *s = getenv("QCOW2_FAULT_AT");
    fault_at = s ? atol(s) : 0;
    s = getenv("QCOW2_FAULT_ERRNO");
    if (s && strcmp(s, "ENOSPC") == 0)
        fault_errno = ENOSPC;
    else if (s && strcmp(s, "EIO") != 0 && atoi(s) > 0)
        fault_errno = atoi(s);
    s = getenv("QCOW2_FAULT_STICKY");
    sticky = s && *s == '1';
    s = getenv("QCOW2_FAULT_LOG");
    if (s && *s)
        log_fd = (int)syscall(SYS_openat, AT_FDCWD, s,
                              O_WRONLY | O_APPEND | O_CREAT | O_CLOEXEC, 0644);
    __atomic_store_n(&ready, 1, __ATOMIC_RELEASE);
}

/* 1 when the call must fail (errno set), 0 when it goes through. */
static int hit(int fd, const char *op)
{
    char link[64], path[4096];
    init();
    if (!prefix_len || fd < 0)
        return 0;
    snprintf(link, sizeof link, "/proc/self/fd/%d", fd);
    ssize_t n = readlink(link, path, sizeof path - 1);
    if (n < 0)
        return 0;
    path[n] = 0;
    if ((size_t)n < prefix_len || memcmp(path, prefix, prefix_len) != 0)
        return 0;
    long k = __atomic_add_fetch(&counter, 1, __ATOMIC_SEQ_CST);
    int fail = fault_at > 0 && (k == fault_at || (sticky && k > fault_at));
    if (log_fd >= 0) {
        char line[4200];
        int len = snprintf(line, sizeof line, "%s%ld %s %s\n", fail ? "!fault " : "",
                           k, op, path);
        if (len > 0)
            syscall(SYS_write, log_fd, line, (size_t)len < sizeof line ? (size_t)len
                                                                       : sizeof line - 1);
    }
    if (fail)
        errno = fault_errno;
    return fail;
}

#define REAL(name) static __typeof__(name) *real_##name; \
    if (!real_##name) real_##name = (__typeof__(name) *)dlsym(RTLD_NEXT, #name)

ssize_t pwrite(int fd, const void *buf, size_t n, off_t off)
{
    REAL(pwrite);
    if (hit(fd, "pwrite")) return -1;
    return real_pwrite(fd, buf, n, off);
}

ssize_t pwrite64(int fd, const void *buf, size_t n, off64_t off)
{
    REAL(pwrite64);
    if (hit(fd, "pwrite64")) return -1;
    return real_pwrite64(fd, buf, n, off);
}

ssize_t pwritev(int fd, const struct iovec *iov, int cnt, off_t off)
{
    REAL(pwritev);
    if (hit(fd, "pwritev")) return -1;
    return real_pwritev(fd, iov, cnt, off);
}

ssize_t pwritev64(int fd, const struct iovec *iov, int cnt, off64_t off)
{
    REAL(pwritev64);
    if (hit(fd, "pwritev64")) return -1;
    return real_pwritev64(fd, iov, cnt, off);
}

ssize_t pwritev2(int fd, const struct iovec *iov, int cnt, off_t off, int flags)
{
    REAL(pwritev2);
    if (hit(fd, "pwritev2")) return -1;
    return real_pwritev2(fd, iov, cnt, off, flags);
}

ssize_t pwritev64v2(int fd, const struct iovec *iov, int cnt, off64_t off, int flags)
{
    REAL(pwritev64v2);
    if (hit(fd, "pwritev64v2")) return -1;
    return real_pwritev64v2(fd, iov, cnt, off, flags);
}

ssize_t write(int fd, const void *buf, size_t n)
{
    REAL(write);
    if (hit(fd, "write")) return -1;
    return real_write(fd, buf, n);
}

ssize_t writev(int fd, const struct iovec *iov, int cnt)
{
    REAL(writev);
    if (hit(fd, "writev")) return -1;
    return real_writev(fd, iov, cnt);
}

int fsync(int fd)
{
    REAL(fsync);
    if (hit(fd, "fsync")) return -1;
    return real_fsync(fd);
}

int fdatasync(int fd)
{
    REAL(fdatasync);
    if (hit(fd, "fdatasync")) return -1;
    return real_fdatasync(fd);
}

int ftruncate(int fd, off_t len)
{
    REAL(ftruncate);
    if (hit(fd, "ftruncate")) return -1;
    return real_ftruncate(fd, len);
}

int ftruncate64(int fd, off64_t len)
{
    REAL(ftruncate64);
    if (hit(fd, "ftruncate64")) return -1;
    return real_ftruncate64(fd, len);
}

int fallocate(int fd, int mode, off_t off, off_t len)
{
    REAL(fallocate);
    if (hit(fd, "fallocate")) return -1;
    return real_fallocate(fd, mode, off, len);
}

int fallocate64(int fd, int mode, off64_t off, off64_t len)
{
    REAL(fallocate64);
    if (hit(fd, "fallocate64")) return -1;
    return real_fallocate64(fd, mode, off, len);
}

/* posix_fallocate returns the error instead of setting errno */
int posix_fallocate(int fd, off_t off, off_t len)
{
    REAL(posix_fallocate);
    if (hit(fd, "posix_fallocate")) return errno;
    return real_posix_fallocate(fd, off, len);
}

int posix_fallocate64(int fd, off64_t off, off64_t len)
{
    REAL(posix_fallocate64);
    if (hit(fd, "posix_fallocate64")) return errno;
    return real_posix_fallocate64(fd, off, len);
}

ssize_t copy_file_range(int in, off64_t *in_off, int out, off64_t *out_off, size_t n,
                        unsigned int flags)
{
    REAL(copy_file_range);
    if (hit(out, "copy_file_range")) return -1;
    return real_copy_file_range(in, in_off, out, out_off, n, flags);
}
