"""qcow2 info [-f FMT] [--output=human|json] [--backing-chain] [-U] FILE"""

from __future__ import annotations

import os

from .common import add_file, add_format, add_output, add_share, add_untrusted


def add_parser(sub):
    p = sub.add_parser("info", help="describe an image (like qemu-img info)")
    add_format(p)
    add_output(p)
    add_share(p)
    add_untrusted(p)
    p.add_argument("--backing-chain", action="store_true", help="describe the whole chain")
    add_file(p, run)


def run(args) -> int:
    from .output import format_human, qemu_json

    if args.backing_chain and not args.untrusted:
        infos = _chain_infos(args)
    else:
        infos = [_layer_infos(args.filename, args.format, args, backing=args.backing_chain)]
        if args.backing_chain:
            infos = infos[0]
        else:
            infos = infos[0][:1]
    if args.output == "json":
        print(qemu_json(infos if args.backing_chain else infos[0]))
    else:
        print("\n".join(format_human(i) for i in infos), end="")
    return 0


def _layer_infos(filename, fmt, args, *, backing: bool) -> list:
    """The info of the image (and with ``backing``, of its whole chain)."""
    import qcow2
    from ..rbdname import is_rbd_name
    from .output import rbd_info

    infos = []
    with qcow2.open(filename, format=fmt, untrusted=args.untrusted,
                    force_share=args.force_share, backing=backing) as img:
        for layer in (img.backing_chain() if backing else [img]):
            info = layer.info()
            if is_rbd_name(layer.filename):         # shown as qemu-img shows it
                info = rbd_info(info, layer)
            infos.append(info)
    return infos


def _chain_infos(args) -> list:
    """--backing-chain as qemu-img walks it: one image at a time, each named by the
    path its parent resolves to, a name met twice refused as a loop."""
    from ..errors import UnsafeImageError

    infos = []
    seen: set = set()
    name, fmt = args.filename, args.format
    while name is not None:
        key = os.path.realpath(name) if not name.startswith("rbd:") else name
        if name in seen or key in seen:
            raise UnsafeImageError(f"Backing file '{name}' creates an infinite loop.")
        seen.update((name, key))
        info = _layer_infos(name, fmt, args, backing=False)[0]
        infos.append(info)
        name = info.get("full-backing-filename")
        fmt = info.get("backing-filename-format")
    return infos
