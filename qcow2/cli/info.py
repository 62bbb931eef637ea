"""qcow2 info [-f FMT] [--output=human|json] [--backing-chain] [-U] FILE"""

from __future__ import annotations

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
    import qcow2
    from ..rbdname import is_rbd_name
    from .output import format_human, qemu_json, rbd_info

    infos = []
    with qcow2.open(args.filename, format=args.format, untrusted=args.untrusted,
                    force_share=args.force_share, backing=args.backing_chain) as img:
        for layer in (img.backing_chain() if args.backing_chain else [img]):
            info = layer.info()
            if is_rbd_name(layer.filename):         # shown as qemu-img shows it
                info = rbd_info(info, layer)
            infos.append(info)
    if args.output == "json":
        print(qemu_json(infos if args.backing_chain else infos[0]))
    else:
        print("\n".join(format_human(i) for i in infos), end="")
    return 0
