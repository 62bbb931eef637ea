"""The plain command lines without argparse: what every ``qcow2`` process pays first.

Importing argparse (with ``re``, ``enum`` and ``gettext`` under it) and building a
parser cost a command ~10 ms of CPU, a third of what ``qcow2 info`` takes.  Most
command lines are plain: known options spelled in full, their values, the operands.
``quick_parse`` records what a subcommand's ``add_parser`` declares (the same calls
argparse gets), permutes the arguments as qemu-img's getopt does (``getopt``), and
parses them with argparse's rules for those cases, giving the namespace argparse
would give.  Anything else (an abbreviated or clustered option, ``--``, ``-h``, a
value argparse would refuse, a custom action, subparsers) returns None, and
argparse parses the command line as before: its output and its errors stay its own.
"""

from __future__ import annotations

import sys

from .usage import UsageError

# types.SimpleNamespace is this very type (types.py takes it from here too), without
# importing types on every CLI start
SimpleNamespace = type(sys.implementation)

_FLAG_ACTIONS = {"store_true": False, "store_false": True}
_VALUE_ACTIONS = ("store", "append")


class _Unsupported(Exception):
    """The declaration uses something this parser leaves to argparse."""


class _Arg:
    __slots__ = ("flags", "dest", "action", "nargs", "default", "type", "choices",
                 "required", "group")

    def __init__(self, flags, kwargs, group):
        self.flags = flags
        self.group = group
        action = kwargs.get("action", "store")
        self.action = action if isinstance(action, str) else None   # custom: argparse's
        if isinstance(action, str) and action not in _VALUE_ACTIONS \
                and action not in _FLAG_ACTIONS:
            raise _Unsupported(action)
        self.nargs = kwargs.get("nargs", 0 if action in _FLAG_ACTIONS else None)
        self.type = kwargs.get("type")
        self.choices = kwargs.get("choices")
        self.required = kwargs.get("required", False)
        if action in _FLAG_ACTIONS:
            self.default = kwargs.get("default", _FLAG_ACTIONS[action])
        else:
            self.default = kwargs.get("default")
        if flags[0][:1] == "-":
            longs = [f for f in flags if f.startswith("--")]
            self.dest = kwargs.get("dest") or (longs[0] if longs else flags[0]).lstrip("-") \
                .replace("-", "_")
        else:
            self.dest = flags[0]
            if self.nargs not in (None, "?", "*") or self.action != "store":
                raise _Unsupported(f"positional {flags[0]}")


class _Group:
    def __init__(self, spec):
        self.spec = spec
        self.id = object()

    def add_argument(self, *flags, **kwargs):
        self.spec.add_argument(*flags, _group=self.id, **kwargs)


class Spec:
    """What one subcommand's ``add_parser`` declared (argparse's calls, recorded);
    ``option_arity`` and ``error`` as ``getopt.permute`` needs them."""

    def __init__(self, kwargs):
        if set(kwargs) - {"help", "description"}:
            raise _Unsupported("parser options")
        self.options: dict[str, _Arg] = {}
        self.positionals: list[_Arg] = []
        self.actions: list[_Arg] = []
        self.defaults: dict = {}
        self.option_arity: dict[str, bool] = {"-h": False, "--help": False}

    def add_argument(self, *flags, _group=None, **kwargs):
        arg = _Arg(flags, kwargs, _group)
        self.actions.append(arg)
        if flags[0][:1] == "-":
            for f in flags:
                self.options[f] = arg
                self.option_arity[f] = arg.nargs != 0
        else:
            self.positionals.append(arg)

    def add_mutually_exclusive_group(self, **kwargs):
        if kwargs:
            raise _Unsupported("required group")
        return _Group(self)

    def set_defaults(self, **kwargs):
        self.defaults.update(kwargs)
        for arg in self.actions:            # (argparse: they become the actions' too)
            if arg.dest in kwargs:
                arg.default = kwargs[arg.dest]

    def error(self, message):
        raise UsageError(message)

    def __getattr__(self, name):        # anything else: argparse's business
        raise _Unsupported(name)


class _Recorder:
    def __init__(self):
        self.spec: Spec | None = None

    def add_parser(self, name, **kwargs):
        self.spec = Spec(kwargs)
        return self.spec


def spec_of(command: str) -> Spec | None:
    """The recorded declaration of ``command`` (its module imported), or None."""
    rec = _Recorder()
    try:
        __import__(f"{__package__}.{command}", fromlist=["add_parser"]).add_parser(rec)
    except _Unsupported:
        return None
    return rec.spec


def _value(arg: _Arg, text):
    if arg.type is not None:
        text = arg.type(text)           # (it raises: argparse words the error)
    if arg.choices is not None and text not in arg.choices:
        raise _Unsupported("choice")
    return text


def _options(spec: Spec, tokens: list[str], values: dict) -> int:
    """Take the options at the head of ``tokens`` into ``values``; the index of the
    first operand."""
    seen_groups: dict = {}
    i = 0
    while i < len(tokens):
        token = tokens[i]
        if token[:1] != "-" or token == "-":
            return i
        i += 1
        attached = None
        if token.startswith("--"):
            name, eq, rest = token.partition("=")
            if eq:
                attached = rest
        else:
            name = token[:2]
            if len(token) > 2:
                if token[2] == "=":
                    raise _Unsupported("-X=")
                attached = token[2:]
        arg = spec.options.get(name)
        if arg is None or arg.action is None or name in ("-h", "--help"):
            raise _Unsupported(token)
        if arg.group is not None:
            if seen_groups.setdefault(arg.group, arg) is not arg:
                raise _Unsupported("exclusive")
        if arg.nargs == 0:
            if attached is not None:
                raise _Unsupported(token)
            values[arg.dest] = arg.action == "store_true"
            continue
        if arg.nargs is not None:
            raise _Unsupported(token)
        if attached is None:
            if i >= len(tokens) or tokens[i][:1] == "-":
                raise _Unsupported(token)
            attached = tokens[i]
            i += 1
        value = _value(arg, attached)
        if arg.action == "append":
            values[arg.dest] = list(values.get(arg.dest) or arg.default or []) + [value]
        else:
            values[arg.dest] = value
    return i


def _positionals(spec: Spec, operands: list[str], values: dict) -> None:
    """argparse's greedy match of the operands to the positionals (nargs None, "?",
    "*"), every operand taken."""
    pos = spec.positionals
    mins = [1 if a.nargs is None else 0 for a in pos]
    left = len(operands)
    k = 0
    for j, arg in enumerate(pos):
        room = left - sum(mins[j + 1:])
        if arg.nargs is None:
            take = 1
        elif arg.nargs == "?":
            take = min(1, room)
        else:
            take = room
        if take < mins[j] or take > room:
            raise _Unsupported("operands")
        got = operands[k:k + take]
        k += take
        left -= take
        if arg.nargs is None or (arg.nargs == "?" and got):
            values[arg.dest] = _value(arg, got[0])
        elif arg.nargs == "?":
            if isinstance(arg.default, str):
                raise _Unsupported("string default")
            values[arg.dest] = arg.default
        elif got:
            values[arg.dest] = [_value(arg, g) for g in got]
        else:
            values[arg.dest] = arg.default if arg.default is not None else []
    if left:
        raise _Unsupported("extra operands")


def quick_parse(command: str, argv: list[str]):
    """The namespace argparse would make of ``qcow2 COMMAND ARGS...`` (``argv``:
    COMMAND first), or None when argparse must decide.  The arguments are permuted
    as qemu-img's getopt does first (its usage errors raise here as they would
    there)."""
    spec = spec_of(command)
    if spec is None:
        return None
    from .getopt import reorder
    tokens = reorder(SimpleNamespace(commands={command: spec}), argv)[1:]
    if "--" in tokens:
        return None
    values: dict = {}
    try:
        first = _options(spec, tokens, values)
        _positionals(spec, tokens[first:], values)
        for arg in spec.actions:
            if arg.dest not in values:
                if arg.required:
                    return None
                if isinstance(arg.default, str) and arg.type is not None:
                    values[arg.dest] = _value(arg, arg.default)
                else:
                    values[arg.dest] = arg.default
    except _Unsupported:
        return None
    except Exception:  # noqa: BLE001 - a type that refuses a value: argparse's error
        return None
    ns = SimpleNamespace(version=False, command=command)
    for arg in spec.actions:
        setattr(ns, arg.dest, values[arg.dest])
    for key, value in spec.defaults.items():
        if not hasattr(ns, key):
            setattr(ns, key, value)
    return ns


__all__ = ["quick_parse", "spec_of", "Spec"]
