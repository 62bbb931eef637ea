"""cffi builder of ``qcow2.backends._rbd``: librados/librbd's C API (API mode).

setup.py names it in ``cffi_modules`` beside ``build_native.py``; it can also be run
directly (``python native/build_rbd.py``) to build in place.

The extension binds the few functions of ``rados/librados.h`` and ``rbd/librbd.h``
that ``qcow2.backends.rbd`` calls (Debian's ``librbd-dev``; Ceph 16 and later).
Every call releases the GIL (cffi does), so threads run librbd I/O in parallel.

It is optional: without the headers or libraries the source stops at an ``#error``,
the compile step fails and setup.py's ``build_ext`` skips the extension with a
warning; ``rbd:`` names then fail with a clear error and the RBD tests skip.
``QCOW2_REQUIRE_RBD=1`` (CI, where setup.sh installs librbd-dev) makes a missing
library an immediate error.  ``QCOW2_NATIVE_WITHOUT=rbd`` pretends it is missing.
"""

from __future__ import annotations

import os
import shlex
import shutil
import subprocess
import sys
import sysconfig
import tempfile

from cffi import FFI

HERE = os.path.dirname(os.path.abspath(__file__))
REQUIRE_RBD = os.environ.get("QCOW2_REQUIRE_RBD", "") not in ("", "0")
WITHOUT = {w.strip() for w in os.environ.get("QCOW2_NATIVE_WITHOUT", "").split(",")}

#: bumped whenever CDEF changes; checked at import (qcow2.backends.rbd)
VERSION = 2

PROBE = r"""
#include <rados/librados.h>
#include <rbd/librbd.h>
int main(void) {
    rados_t c; rbd_image_t i = 0; uint64_t n;
    (void)rbd_write_zeroes; (void)rbd_diff_iterate2; (void)rbd_get_parent;
    (void)rbd_clone3; (void)rbd_list_children3; (void)rbd_list2; (void)rbd_metadata_get;
    (void)RBD_WRITE_ZEROES_FLAG_THICK_PROVISION;
    if (rados_create(&c, 0) < 0) return 1;
    rados_shutdown(c);
    return i ? rbd_get_size(i, &n) : 0;
}
"""

# The subset of librados.h / librbd.h we call (declarations as the headers have them;
# `...` lets cffi take sizes and values from the real headers).
CDEF = """
typedef void *rados_t;
typedef void *rados_ioctx_t;
typedef void *rbd_image_t;

#define LIBRBD_VER_MAJOR ...
#define LIBRBD_VER_MINOR ...
#define RBD_FEATURE_LAYERING ...
#define RBD_FEATURE_STRIPINGV2 ...
#define RBD_FEATURE_EXCLUSIVE_LOCK ...
#define RBD_FEATURE_OBJECT_MAP ...
#define RBD_FEATURE_FAST_DIFF ...
#define RBD_FLAG_OBJECT_MAP_INVALID ...
#define RBD_FLAG_FAST_DIFF_INVALID ...

typedef enum { RBD_LOCK_MODE_EXCLUSIVE, RBD_LOCK_MODE_SHARED, ... } rbd_lock_mode_t;
enum { RBD_WRITE_ZEROES_FLAG_THICK_PROVISION, ... };

typedef struct { uint64_t size; uint64_t obj_size; uint64_t num_objs; int order; ...; }
    rbd_image_info_t;
typedef struct { char *pool_name; char *pool_namespace; char *image_id; char *image_name;
                 bool trash; ...; } rbd_linked_image_spec_t;
typedef struct { uint64_t id; char *name; ...; } rbd_snap_spec_t;
typedef struct { uint64_t id; uint64_t size; const char *name; ...; } rbd_snap_info_t;
typedef struct { char *id; char *name; ...; } rbd_image_spec_t;
typedef void *rbd_image_options_t;
struct timespec { long tv_sec; long tv_nsec; ...; };
struct timeval { long tv_sec; long tv_usec; ...; };

int rados_create(rados_t *cluster, const char * const id);
int rados_conf_read_file(rados_t cluster, const char *path);
int rados_conf_set(rados_t cluster, const char *option, const char *value);
int rados_conf_get(rados_t cluster, const char *option, char *buf, size_t len);
int rados_connect(rados_t cluster);
void rados_shutdown(rados_t cluster);
int rados_cluster_fsid(rados_t cluster, char *buf, size_t len);
int rados_ioctx_create(rados_t cluster, const char *pool_name, rados_ioctx_t *ioctx);
void rados_ioctx_destroy(rados_ioctx_t io);
int rados_lock_exclusive(rados_ioctx_t io, const char *oid, const char *name,
                         const char *cookie, const char *desc, struct timeval *duration,
                         uint8_t flags);
int rados_unlock(rados_ioctx_t io, const char *o, const char *name, const char *cookie);
int rados_remove(rados_ioctx_t io, const char *oid);
void rados_ioctx_set_namespace(rados_ioctx_t io, const char *nspace);
int64_t rados_ioctx_get_id(rados_ioctx_t io);

void rbd_version(int *major, int *minor, int *extra);
int rbd_create(rados_ioctx_t io, const char *name, uint64_t size, int *order);
int rbd_remove(rados_ioctx_t io, const char *name);
int rbd_open(rados_ioctx_t io, const char *name, rbd_image_t *image, const char *snap_name);
int rbd_open_read_only(rados_ioctx_t io, const char *name, rbd_image_t *image,
                       const char *snap_name);
int rbd_close(rbd_image_t image);
int rbd_stat(rbd_image_t image, rbd_image_info_t *info, size_t infosize);
int rbd_get_size(rbd_image_t image, uint64_t *size);
int rbd_get_features(rbd_image_t image, uint64_t *features);
int rbd_get_flags(rbd_image_t image, uint64_t *flags);
int rbd_get_id(rbd_image_t image, char *id, size_t id_len);
int rbd_get_parent(rbd_image_t image, rbd_linked_image_spec_t *parent_image,
                   rbd_snap_spec_t *parent_snap);
void rbd_linked_image_spec_cleanup(rbd_linked_image_spec_t *image);
void rbd_snap_spec_cleanup(rbd_snap_spec_t *snap);
int rbd_snap_list(rbd_image_t image, rbd_snap_info_t *snaps, int *max_snaps);
void rbd_snap_list_end(rbd_snap_info_t *snaps);
int rbd_resize(rbd_image_t image, uint64_t size);
ssize_t rbd_read2(rbd_image_t image, uint64_t ofs, size_t len, char *buf, int op_flags);
ssize_t rbd_write2(rbd_image_t image, uint64_t ofs, size_t len, const char *buf,
                   int op_flags);
int rbd_discard(rbd_image_t image, uint64_t ofs, uint64_t len);
ssize_t rbd_write_zeroes(rbd_image_t image, uint64_t ofs, size_t len, int zero_flags,
                         int op_flags);
int rbd_flush(rbd_image_t image);
int rbd_diff_iterate2(rbd_image_t image, const char *fromsnapname, uint64_t ofs,
                      uint64_t len, uint8_t include_parent, uint8_t whole_object,
                      int (*cb)(uint64_t, size_t, int, void *), void *arg);
int rbd_list2(rados_ioctx_t io, rbd_image_spec_t *images, size_t *max_images);
void rbd_image_spec_list_cleanup(rbd_image_spec_t *images, size_t num_images);
int rbd_rename(rados_ioctx_t src_io_ctx, const char *srcname, const char *destname);
void rbd_image_options_create(rbd_image_options_t *opts);
void rbd_image_options_destroy(rbd_image_options_t opts);
int rbd_clone3(rados_ioctx_t p_ioctx, const char *p_name, const char *p_snapname,
               rados_ioctx_t c_ioctx, const char *c_name, rbd_image_options_t c_opts);
int rbd_snap_create(rbd_image_t image, const char *snapname);
int rbd_snap_remove(rbd_image_t image, const char *snapname);
int rbd_snap_protect(rbd_image_t image, const char *snap_name);
int rbd_snap_unprotect(rbd_image_t image, const char *snap_name);
int rbd_snap_is_protected(rbd_image_t image, const char *snap_name, int *is_protected);
int rbd_list_children3(rbd_image_t image, rbd_linked_image_spec_t *images,
                       size_t *max_images);
void rbd_linked_image_spec_list_cleanup(rbd_linked_image_spec_t *images,
                                        size_t num_images);
int rbd_metadata_get(rbd_image_t image, const char *key, char *value, size_t *val_len);
int rbd_metadata_set(rbd_image_t image, const char *key, const char *value);
int rbd_get_create_timestamp(rbd_image_t image, struct timespec *timestamp);
int rbd_get_modify_timestamp(rbd_image_t image, struct timespec *timestamp);
int rbd_lock_acquire(rbd_image_t image, rbd_lock_mode_t lock_mode);
int rbd_lock_release(rbd_image_t image);

int qcow2rbd_version(void);
extern "Python" int qcow2rbd_diff_cb(uint64_t, size_t, int, void *);
"""


def _compiler() -> list[str]:
    cc = os.environ.get("CC") or sysconfig.get_config_var("CC") or "cc"
    return shlex.split(cc)


def probe() -> bool:
    """True when librbd's and librados' headers and shared libraries are usable."""
    tmp = tempfile.mkdtemp(prefix="qcow2-rbd-probe-")
    try:
        src = os.path.join(tmp, "probe.c")
        with open(src, "w") as f:
            f.write(PROBE)
        cmd = _compiler() + [src, "-o", os.path.join(tmp, "probe"), "-lrbd", "-lrados"]
        cmd += shlex.split(os.environ.get("CFLAGS", "")) + \
            shlex.split(os.environ.get("LDFLAGS", ""))
        try:
            res = subprocess.run(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                 timeout=120)
        except (OSError, subprocess.SubprocessError):
            return False
        return res.returncode == 0
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


FOUND = "rbd" not in WITHOUT and probe()

if REQUIRE_RBD and not FOUND:
    raise RuntimeError("QCOW2_REQUIRE_RBD=1 but librbd/librados (headers + shared objects, "
                       "Debian's librbd-dev) were not found")


def make_builder() -> FFI:
    ffi = FFI()
    ffi.cdef(CDEF)
    if FOUND:
        source = ("#include <stdbool.h>\n#include <rados/librados.h>\n"
                  "#include <rbd/librbd.h>\n"
                  f"static int qcow2rbd_version(void) {{ return {VERSION}; }}\n")
    else:   # fail at compile time (caught by setup.py's build_ext), not at import
        source = '#error "librbd-dev not found: qcow2.backends._rbd not built"\n'
    ffi.set_source("qcow2.backends._rbd", source, libraries=["rbd", "rados"],
                   extra_compile_args=["-O2", "-Wall"])
    return ffi


ffibuilder = make_builder()


if __name__ == "__main__":
    # Stand-alone build (a check of the binding): the module lands in build/rbd/.
    sys.stderr.write("qcow2 rbd: librbd=%s\n" % ("yes" if FOUND else "no"))
    out = os.path.join(os.path.dirname(HERE), "build", "rbd")
    os.makedirs(out, exist_ok=True)
    print(make_builder().compile(tmpdir=out, verbose=True))
