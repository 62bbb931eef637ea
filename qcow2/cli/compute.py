"""qcow2 compute spawn|destroy|clean|usage: the compute-host image flow (nova's).

    qcow2 compute spawn --config FILE --instance UUID --image IMAGE_ID --source PATH_OR_URL
                        --root-size SIZE [--disk-format qcow2|raw] [--checksum sha256:HEX]
                        [--ephemeral-size SIZE] [--swap-size SIZE]
    qcow2 compute destroy --config FILE --instance UUID
    qcow2 compute clean --config FILE [--dry-run] [--now EPOCH_SECONDS] [--output=json]
    qcow2 compute usage --config FILE [--output=json]
    qcow2 compute audit --config FILE [--quarantine] [--output=json]
"""

from __future__ import annotations

import json

from ..units import parse_size
from .common import ProgressPrinter


def add_parser(sub):
    p = sub.add_parser("compute", help="the compute-host image flow (base cache, instance "
                                       "disks, cache manager)")
    cs = p.add_subparsers(dest="compute_command", metavar="ACTION")
    cs.required = True

    def common(sp):
        sp.add_argument("--config", required=True, help="nova.conf-style options file")

    s = cs.add_parser("spawn", help="fetch the image and build an instance's disks")
    common(s)
    s.add_argument("--instance", required=True, metavar="UUID",
                   help="the instance's UUID (names its folder and disks)")
    s.add_argument("--image", required=True, help="image id (names the cache file)")
    s.add_argument("--source", required=True, help="local path, http(s) URL, or (images_type=rbd) "
                                          "rbd://FSID/POOL/IMAGE/SNAP")
    s.add_argument("--root-size", required=True, type=_size, metavar="SIZE",
                   help="root disk size: bytes, or with a k, M, G, T suffix (1024-based: "
                        "20G); at least the image's virtual size")
    s.add_argument("--disk-format", choices=("qcow2", "raw"), default=None)
    s.add_argument("--checksum", default=None, help="sha256:HEX")
    s.add_argument("--ephemeral-size", type=_size, default=None, metavar="SIZE",
                   help="an ephemeral disk (disk.local) of SIZE, formatted as "
                        "default_ephemeral_format says")
    s.add_argument("--swap-size", type=_size, default=None, metavar="SIZE",
                   help="a swap disk (disk.swap) of SIZE")
    s.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    s.set_defaults(func=run_spawn)

    d = cs.add_parser("destroy", help="remove an instance's disks")
    common(d)
    d.add_argument("--instance", required=True, metavar="UUID", help="the instance's UUID")
    d.set_defaults(func=run_destroy)

    c = cs.add_parser("clean", help="one pass of the image cache manager")
    common(c)
    c.add_argument("--dry-run", action="store_true", help="only say what would be removed")
    c.add_argument("--now", type=float, default=None, help="the time, in epoch seconds")
    c.add_argument("--output", choices=("human", "json"), default="human")
    c.set_defaults(func=run_clean)

    a = cs.add_parser("audit", help="check every cached base and instance disk against "
                                    "its recorded format")
    common(a)
    a.add_argument("--quarantine", action="store_true",
                   help="move bad bases no instance uses into <instances_path>/_quarantine")
    a.add_argument("--output", choices=("human", "json"), default="human")
    a.set_defaults(func=run_audit)

    u = cs.add_parser("usage", help="disk usage of the image cache")
    common(u)
    u.add_argument("--output", choices=("human", "json"), default="human")
    u.set_defaults(func=run_usage)


def _size(text: str) -> int:
    return parse_size(text)


def _opts(args):
    """The options of ``--config``; nova's default instances_path is used when the file
    sets none, and a note on stderr says so (the flow writes there)."""
    import sys

    from ..compute import Options, read_options
    values = read_options(args.config)
    opts = Options(**values)
    if "instances_path" not in values:
        print(f"qcow2 compute: note: {args.config} sets no [DEFAULT] instances_path; "
              f"using nova's default {opts.instances_path}", file=sys.stderr)
    return opts


def run_spawn(args) -> int:
    import os
    import sys

    # the untrusted scan imports numpy, whose BLAS would start a spinning thread per
    # core (measured: ~2 % of a spawn's CPU) for work it never does here
    os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
    from .. import compute
    bar = None if args.quiet else ProgressPrinter(sys.stderr)
    res = compute.spawn(_opts(args), args.instance, args.image, args.source, args.root_size,
                        disk_format=args.disk_format, checksum=args.checksum,
                        ephemeral_size=args.ephemeral_size, swap_size=args.swap_size,
                        progress=bar)
    if bar is not None and bar.last >= 0:
        bar.done()
    print(f"base: {res['base']} ({res['base_format']})")
    for name, d in res["disks"].items():
        print(f"{name}: {d['path']} ({d['format']})")
        if d.get("fs_grown"):
            print(f"{name}: file system grown to the disk ({d['fs_grown']['written']} bytes "
                  f"written into the overlay)")
    return 0


def run_destroy(args) -> int:
    from .. import compute
    for what in compute.destroy(_opts(args), args.instance):
        print(f"removed {what}")
    return 0


def run_clean(args) -> int:
    from .. import compute
    rep = compute.clean(_opts(args), dry_run=args.dry_run, now=args.now)
    if args.output == "json":
        print(json.dumps(rep, indent=4))
        return 0
    stale = f"{'would remove' if args.dry_run else 'removed'} stale temporary file"
    for key, label in (("in_use", "in use"), ("would_remove", "would remove"),
                       ("removed", "removed"), ("too_young", "too young to remove"),
                       ("busy", "being written, left alone"), ("kept", "kept"),
                       ("ignored", "not a cache file, left alone"),
                       ("missing", "in use by an instance but missing from the cache"),
                       ("unreadable_disks", "instance disk with an unreadable qcow2 header "
                                            "(every base kept)"),
                       ("unrecorded_disks", "instance disk not recorded in its disk.info "
                                            "(every base kept)"),
                       ("stale_temporaries", stale)):
        for p in rep[key]:
            print(f"{label}: {p}")
    pool = rep.get("pool")
    if pool is not None:
        pstale = f"{'would remove' if args.dry_run else 'removed'} stale temporary image"
        for key, label in (("in_use", "pool base in use"), ("would_remove", "would remove"),
                           ("removed", "removed"), ("too_young", "too young to remove"),
                           ("busy", "being written, left alone"), ("kept", "kept"),
                           ("ignored", "not a finished base, left alone"),
                           ("stale_temporaries", pstale)):
            for name in pool[key]:
                print(f"{label}: {name}")
    _print_usage(rep["usage"])
    return 0


def run_audit(args) -> int:
    """Exit status 0: nothing found; 2: something bad was found (as check's corruptions)."""
    from ..compute import audit
    rep = audit(_opts(args), quarantine=args.quarantine)
    if args.output == "json":
        print(json.dumps(rep, indent=4))
    else:
        for what, key in (("base", "bases"), ("disk", "disks")):
            for e in rep[key]:
                if e["status"] == "bad":
                    print(f"bad {what}: {e['path']}: {e['reason']}")
        for q in rep["quarantined"]:
            print(f"quarantined: {q['path']} -> {q['to']}")
        for p in rep["left_in_use"]:
            print(f"left in place (in use): {p}")
        print(f"audited {len(rep['bases'])} bases and {len(rep['disks'])} instance disks: "
              f"{rep['problems']} problem{'s' if rep['problems'] != 1 else ''}")
    return 2 if rep["problems"] else 0


def run_usage(args) -> int:
    from .. import compute
    u = compute.usage(_opts(args))
    if args.output == "json":
        print(json.dumps(u, indent=4))
    else:
        _print_usage(u)
    return 0


def _print_usage(u) -> None:
    print(f"cache {u['directory']}: {u['count']} files, {u['allocated']} bytes allocated "
          f"({u['size']} bytes apparent)")
    p = u.get("pool")
    if p is not None:
        clones = sum(b["clones"] for b in p["bases"])
        print(f"pool {p['pool']}: {p['count']} bases, {p['allocated']} bytes allocated "
              f"({p['size']} bytes virtual), {clones} clones")
