/*
 * launcher.c - the installed `qcow2` command: its command line, and the
 * hand-off to Python (image.c reads the image, print.c prints it).
 *
 * `qcow2 info` of a local qcow2 or raw file is answered here, in half a
 * millisecond (a Python process needs 10 ms just to start), when the command
 * line and the image are of the plain kind this file knows: it prints the very
 * bytes the Python command prints, human or JSON.  So is `qcow2 convert` of a
 * plain local qcow2 into a new raw file (convert.c).  Everything else -- other
 * commands and options, other formats, encryption, bitmaps, external data
 * files, names with a protocol, anything unusual or wrong in the image, a lock
 * held by another process -- is handed to the Python command by exec, with
 * the same arguments.  The Python command is the reference (its twin, in the
 * sense of the kernels) and the only one that reports an error about an
 * image: where this file is not sure, it steps aside (step_aside()), so it can
 * only ever be faster, never different.
 *
 * The rules are those of qcow2/probe.py, qcow2/header.py (QEMU's
 * qcow2_do_open), qcow2/snapshot.py, qcow2/reader.py's and qcow2/image.py's
 * info() and qcow2/cli/output.py; every check they make before an image is
 * opened is made here too (a failing one hands off).  Nothing is read or
 * allocated before the field that sizes it has been checked: the header
 * cluster is at most 2 MiB, the snapshot table at most 64 MiB and within the
 * file.
 *
 * QCOW2_IMPL=python hands every command to Python (the twin alone);
 * QCOW2_LAUNCHER_TRACE=1 says on stderr why a command was handed off.
 * The interpreter: the one next to this program when it lives in a virtual
 * environment's bin folder, else the one that built it (QCOW2_PYTHON), else
 * python3 from PATH.
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

#ifndef QCOW2_PYTHON
#define QCOW2_PYTHON "/usr/bin/python3"
#endif

/* the Python command, run as `python -P -c CODE ARGV0 ARGS...` */
static const char PY_CODE[] =
    "import sys; sys.argv[:2] = sys.argv[1:2]; from qcow2.cli import run; run()";

/* ------------------------------------------------------------------------ */
/* Handing off to Python                                                     */

/* Why the command goes to Python (QCOW2_LAUNCHER_TRACE=1 prints it). */
static const char *reason = "not info or convert";

int step_aside(const char *why)
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
    int format;                 /* FORMAT_* */
    int json;
    int share;                  /* -U: no locks */
};

/*
 * `info` with only -f qcow2|raw, --output human|json and -U/--force-share, in any
 * order, and one file name (no protocol prefix: no ':'); anything else (help,
 * --image-opts, --backing-chain, --object, abbreviations) goes to Python.
 */
static int parse_args(int argc, char **argv, struct opts *o)
{
    const char *fmt = NULL, *out = NULL;
    int i;

    if (argc < 2 || strcmp(argv[1], "info") != 0) {
        return step_aside("not info");
    }
    memset(o, 0, sizeof(*o));
    for (i = 2; i < argc; i++) {
        const char *a = argv[i];

        if (!strcmp(a, "-U") || !strcmp(a, "--force-share")) {
            o->share = 1;
        } else if (!strcmp(a, "-f") || !strcmp(a, "--output")) {
            if (i + 1 >= argc) {
                return step_aside("an option without its value");
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
            return step_aside("an option only Python takes");
        } else if (o->file) {
            return step_aside("more than one file");
        } else {
            o->file = a;
        }
    }
    if (!o->file) {
        return step_aside("no file");
    }
    o->format = !fmt ? FORMAT_PROBE : !strcmp(fmt, "qcow2") ? FORMAT_QCOW2
        : !strcmp(fmt, "raw") ? FORMAT_RAW : -1;
    if (o->format < 0) {
        return step_aside("a format other than qcow2 or raw");
    }
    if (out && strcmp(out, "human") != 0 && strcmp(out, "json") != 0) {
        return step_aside("an unknown output format");
    }
    o->json = out && !strcmp(out, "json");
    return 0;
}

/* A name printed as is: printable ASCII only (others are escaped or decoded by
 * rules Python keeps). */
int plain_text(const uint8_t *s, size_t n)
{
    size_t i;

    for (i = 0; i < n; i++) {
        if (s[i] < 0x20 || s[i] > 0x7e) {
            return 0;
        }
    }
    return 1;
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
        return step_aside("a file name that is not a plain path");
    }
    fd = open(opts.file, O_RDONLY | O_CLOEXEC);
    if (fd < 0) {
        return step_aside("the file cannot be opened");
    }
    if (fstat(fd, &st) < 0 || !S_ISREG(st.st_mode)) {
        close(fd);
        return step_aside("not a regular file");
    }
    if (read_image(fd, &im, (uint64_t)st.st_size, opts.share, opts.format) < 0) {
        goto hand_off;
    }
    if (fstat(fd, &st) < 0) {
        step_aside("the file cannot be examined");
        goto hand_off;
    }
    im.actual_size = (uint64_t)st.st_blocks * 512;
    if (opts.json) {
        print_json(&o, &im, opts.file);
    } else {
        print_human(&o, &im, opts.file);
    }
    if (o.failed) {
        step_aside("out of memory");
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
    free_image(&im);
    free(o.buf);
    return -1;
}

int main(int argc, char **argv)
{
    const char *impl = getenv("QCOW2_IMPL");
    int status;

    if (impl && !strcmp(impl, "python")) {
        reason = "QCOW2_IMPL=python";
    } else if (argc > 1 && !strcmp(argv[1], "convert")) {
        if (native_convert(argc, argv, &status) == 0) {
            return status;
        }
    } else if (argc > 0 && info(argc, argv, &status) == 0) {
        return status;
    }
    hand_off(argc > 0 ? argc : 1, argc > 0 ? argv : (char *[]){ "qcow2", NULL });
    return 127;
}
