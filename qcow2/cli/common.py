"""Argument helpers shared by the subcommands, and qemu-img's progress line."""

from __future__ import annotations

import os
import sys

from ..errors import CorruptImageError


def program_name() -> str:
    """The name this program was invoked as, for the prefix of its error lines: run as
    ``qemu-img`` (a link or a copy under that name) it reads as qemu-img does;
    ``python -m qcow2`` and the console script say ``qcow2``."""
    name = os.path.basename(sys.argv[0]) if sys.argv and sys.argv[0] else ""
    if not name or name.startswith("__main__") or name == "-c":
        return "qcow2"
    return name


def error_line(msg: str) -> None:
    """One line on stderr, prefixed with the program's name (qemu-img's format)."""
    sys.stderr.write(f"{program_name()}: {' '.join(str(msg).split())}\n")
    sys.stderr.flush()


#: What qemu-img says where the engine's message on a corrupt structure says more: the
#: place (" (at offset 0x...)"), the values read, which snapshot.  The CLI prints
#: qemu-img's words; the exception keeps the details (its message, .offset, .size).
#: (Patterns as text, compiled on first use: ``re`` costs every process ~6 ms to import.)
_BRIEF = (
    (r" \((?:[^()]*, )?(?:entry \d+ )?at offset 0x[0-9a-f]+\)$", ""),
    (r"\b(Image is too big|L1 table is too small|Snapshot table too large): .*$", r"\1"),
    (r"\bSnapshot L1 table of snapshot \S+ (offset invalid|too large)\b.*$",
     r"Snapshot L1 table \1"),
    (r"\b((?:table|Table) (?:offset invalid|too large)): (?:0x[0-9a-f]+|\d+ entries)$",
     r"\1"),
)


def qemu_wording(message: str) -> str:
    """An engine message on a corrupt image as qemu-img words it (see ``_BRIEF``)."""
    import re
    for pattern, repl in _BRIEF:
        message = re.sub(pattern, repl, message)
    return message


def report_error(exc: BaseException) -> None:
    """An error as qemu-img reports it: what it reported on the way (``exc.preface``,
    verbatim), its line (prefixed with the program's name), or
    the prefixed lines of a message qemu-img spreads over several (``exc.lines``), then
    its hint lines, unprefixed (``exc.hint``, QEMU's error hints), then the prefixed
    lines qemu-img reports after it (``exc.after``).  Every
    line has its whitespace collapsed: a name read from an image cannot start a line."""
    preface = getattr(exc, "preface", None)
    if preface:                 # what qemu-img reported (unprefixed) before failing
        sys.stderr.write(preface)
    lines = getattr(exc, "lines", None) or [str(exc)]
    if isinstance(exc, CorruptImageError):
        lines = [qemu_wording(line) for line in lines]
    for line in lines:
        error_line(line)
    hint = getattr(exc, "hint", None)
    if hint:
        # as QEMU prints a hint: verbatim, a final newline only where the hint has one
        hint = str(hint)
        sys.stderr.write("\n".join(" ".join(line.split()) for line in hint.split("\n")))
        sys.stderr.flush()
    for line in getattr(exc, "after", None) or ():
        error_line(line)


def add_output(p) -> None:
    p.add_argument("--output", choices=("human", "json"), default="human",
                   help="output format")


def add_format(p, flag: str = "-f", dest: str = "format") -> None:
    # (no choices: qemu-img takes the last of repeated options, "-f foo -f qcow2"; the
    # format is checked when used)
    p.add_argument(flag, dest=dest, default=None, metavar="FMT",
                   help="image format: qcow2 or raw (probed when omitted)")


# QEMU's format drivers that read images but cannot create them.
READ_ONLY_DRIVERS = ("bochs", "cloop", "dmg", "vvfat")


def creatable_format(fmt: str) -> str:
    """``fmt`` if images of that format can be created here; else qemu-img's refusal."""
    from ..errors import UnsupportedFeatureError
    if fmt in ("qcow2", "raw"):
        return fmt
    if fmt in READ_ONLY_DRIVERS:
        raise UnsupportedFeatureError(f"Format driver '{fmt}' does not support image "
                                      f"creation", feature=f"create -f {fmt}")
    raise UnsupportedFeatureError(f"Unknown file format '{fmt}'", feature=f"format {fmt}")


def gather_options(texts) -> dict:
    """The ``-o`` arguments (each checked as qemu-img checks it, then joined, later
    keys winning) as one dict."""
    from ..errors import InvalidOptionError
    from ..options import valid_option_list
    from ..units import parse_option_list
    for text in texts:
        if not valid_option_list(text):
            raise InvalidOptionError(f"Invalid option list: {text}")
    return parse_option_list(",".join(texts)) if texts else {}


def add_share(p) -> None:
    p.add_argument("-U", "--force-share", dest="force_share", action="store_true",
                   help="open the image with shared permissions")
    p.add_argument("--image-opts", dest="image_opts", action="store_true",
                   help="the image names are block options (driver=qcow2,file.filename=PATH)")


# the arguments naming input images, per the subcommands' parsers
_IMAGE_ARGS = ("filename", "filenames", "image_a", "image_b")


def apply_image_opts(args) -> None:
    """With --image-opts, the image arguments are block options: each becomes the
    equivalent ``json:{...}`` name, which the engine opens (convert: the sources, not
    the output).  -f cannot be given as well, as in qemu-img."""
    if not getattr(args, "image_opts", False):
        return
    from ..errors import InvalidOptionError
    if getattr(args, "format", None) is not None:
        raise InvalidOptionError("--image-opts and --format are mutually exclusive")
    for attr in _IMAGE_ARGS:
        value = getattr(args, attr, None)
        if isinstance(value, str):
            setattr(args, attr, image_opts_name(value))
        elif isinstance(value, list):
            setattr(args, attr, [image_opts_name(v) for v in value])
    files = getattr(args, "files", None)
    if files:
        args.files = [image_opts_name(v) for v in files[:-1]] + files[-1:]


def image_opts_name(text: str) -> str:
    """An image argument given as block options (--image-opts) as the engine opens
    it: the equivalent ``json:{...}`` name (also for operands :func:`apply_image_opts`
    does not know, as bitmap's)."""
    from ..imageopts import options_name
    return options_name(text)[0]


def add_image_opts(p) -> None:
    p.add_argument("--image-opts", dest="image_opts", action="store_true",
                   help="the image name is block options (driver=qcow2,file.filename=PATH)")


def add_cache(p, flag: str = "-t", dest: str = "cache", what: str = "the image written") -> None:
    """qemu-img's -t (or -T) cache mode: none, writeback, unsafe, writethrough,
    directsync.  "unsafe" syncs nothing; the others make the writes durable at the end
    (the reads are the same in every mode)."""
    p.add_argument(flag, dest=dest, default="writeback", metavar="CACHE",
                   help=f"cache mode of {what} (unsafe: no sync)")


def add_rate(p) -> None:
    p.add_argument("-r", dest="rate_limit", default=None, metavar="RATE",
                   help="at most RATE bytes of data per second (k, M, G... suffixes)")


def parse_rate(text: str | None) -> int | None:
    """-r as qemu-img reads it: a size (suffixes allowed), 0 to 2^63 - 1."""
    from ..units import cvtnum
    return None if text is None else cvtnum("rate limit", text)


def add_untrusted(p) -> None:
    p.add_argument("--untrusted", action="store_true",
                   help="treat the image as hostile: open nothing but the named file, "
                        "check its format and scan all its metadata before reading")


def add_progress(p, help: str = "show progress") -> None:
    p.add_argument("-p", dest="progress", action="store_true", help=help)


def add_quiet(p, help: str = "quiet") -> None:
    p.add_argument("-q", dest="quiet", action="store_true", help=help)


def add_file(p, run) -> None:
    """The image argument, last, and the function that runs the subcommand."""
    p.add_argument("filename")
    p.set_defaults(func=run)


def snapshot_arg(text: str | None) -> str | None:
    """qemu-img's ``-l`` (convert, measure): a snapshot id or name, or the options
    ``snapshot.id=ID,snapshot.name=NAME`` (when it starts with ``snapshot.``)."""
    if text is None or not text.startswith("snapshot."):
        return text
    from ..units import parse_option_list
    opts = parse_option_list(text)
    return opts.get("snapshot.id") or opts.get("snapshot.name")


class ProgressPrinter:
    """qemu-img's progress line: "    (NN.NN/100%)" rewritten in place, printed when it
    moved by more than one percent (either way: amend's estimate can go back) since
    last printed, and whenever it is 0 or 100 (qemu's rule: a command that reports 100
    twice prints it twice)."""

    def __init__(self, stream=None):
        self.stream = stream or sys.stdout
        self.last = 0.0

    def __call__(self, pct: float) -> None:
        if not (abs(pct - self.last) > 1.0 or pct >= 100.0 or pct == 0.0):
            return
        self.last = pct
        self.stream.write("    (%.2f/100%%)\r" % pct)
        self.stream.flush()

    def done(self) -> None:
        self.stream.write("\n")
        self.stream.flush()


def progress_for(args, stream=None) -> ProgressPrinter | None:
    """The progress line of ``-p`` (None without ``-p`` or with ``-q``)."""
    return ProgressPrinter(stream) if args.progress and not args.quiet else None


def end_progress(progress: ProgressPrinter | None) -> None:
    """End the progress line once the work succeeded (qemu-img's final newline)."""
    if progress is not None:
        progress.done()
