"""qemu-img's argument order: getopt's permutation, options anywhere on the command line.

qemu-img parses each subcommand with ``getopt_long``, which moves the options (with
their values) before the operands, so ``create IMG -f qcow2 1G`` or ``convert SRC -O raw
DST`` mean the same as with the options first; ``--`` ends the options.  ``permute``
reorders a subcommand's arguments that way, from the options its parser recorded
(``option_arity``), before argparse (which stops taking options after the operands)
parses them.
"""

from __future__ import annotations

TYPE_CHECKING = False
if TYPE_CHECKING:
    import argparse


def _long_takes(token: str, arity: dict[str, bool]) -> bool:
    """Whether the long option ``token`` (no ``=``) takes the next argument: exact, or
    the one option it abbreviates (getopt_long's and argparse's prefix matching)."""
    if token in arity:
        return arity[token]
    matches = [opt for opt in arity if opt.startswith("--") and opt.startswith(token)]
    return len(matches) == 1 and arity[matches[0]]


def _short_takes(token: str, arity: dict[str, bool]) -> bool:
    """Whether the short-option cluster ``token`` (``-qp``, ``-fqcow2``, ``-qf``) takes
    the next argument: its last letter takes a value that is not attached."""
    for i, letter in enumerate(token[1:], 1):
        takes = arity.get("-" + letter)
        if takes is None:
            return False                     # unknown: argparse reports it
        if takes:
            return i == len(token) - 1       # value attached unless last
    return False


def _join(opt: str, value: str) -> list[str]:
    """An option and its separate value; one token when the value starts with ``-``
    (getopt takes it as the value, argparse would take it for an option)."""
    if value[:1] != "-":
        return [opt, value]
    return [f"{opt}={value}" if opt.startswith("--") else opt + value]


def permute(parser: argparse.ArgumentParser, args: list[str]) -> list[str]:
    """``args`` with the options (and their values) first, then ``--`` when an operand
    could be read as an option, then the operands in their order."""
    arity = parser.option_arity
    opts: list[str] = []
    operands: list[str] = []
    i = 0
    while i < len(args):
        token = args[i]
        i += 1
        if token == "--":
            operands.extend(args[i:])
            break
        if token[:1] != "-" or token == "-":
            operands.append(token)
            continue
        if token.startswith("--"):
            takes = "=" not in token and _long_takes(token, arity)
        else:
            takes = _short_takes(token, arity)
        if takes and i < len(args):
            opts.extend(_join(token, args[i]))
            i += 1
        elif takes:
            # (as qemu-img words it; argparse would take an operand as its value)
            name = token.split("=", 1)[0] if token.startswith("--") else token[:2]
            parser.error(f"missing argument for option '{name}'")
        else:
            opts.append(token)
    if any(op[:1] == "-" and op != "-" for op in operands):
        return opts + ["--"] + operands
    return opts + operands


def reorder(parser: argparse.ArgumentParser, argv: list[str]) -> list[str]:
    """The command line ``argv`` (subcommand first) of the top-level ``parser`` with
    the subcommand's arguments permuted as qemu-img's getopt does.  ``resize`` takes
    its last argument as the size before parsing when it is a negative size, as qemu-img
    does (it always does), so ``-1G`` is a size, never an option."""
    command = argv[0]
    sub = parser.commands
    rest = argv[1:]
    if command != "resize" or len(rest) < 2 or rest[-1][:1] != "-" \
            or not rest[-1][1:2].replace(".", "0").isdigit():
        return [command] + permute(sub[command], rest)
    size = rest[-1]
    args = permute(sub[command], rest[:-1])
    if size[:1] == "-" and "--" not in args:
        args.append("--")
    return [command] + args + [size]
