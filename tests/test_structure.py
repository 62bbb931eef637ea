"""The tree's own rules, checked on the source (README "Design"):

- layers point one way: ``backends`` <- engine (``qcow2/*.py``, ``qcow2/kernels``,
  ``qcow2/checker``) <- operations (``qcow2/ops``) <- the CLI, the compute flow and
  the NBD server (``qcow2/nbd``);
  the package root ``qcow2/__init__.py`` is the public facade over the operations;
- no import cycle among the modules, counting imports inside functions;
- no module imports another module's private (``_name``) names, and the operations,
  the CLI and the compute flow use no private attribute of the engine's objects;
- no module over ~800 lines, no function over 120.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
MAX_MODULE_LINES = 800
MAX_FUNCTION_LINES = 120
# attributes of other objects that are private by name only (stdlib and numpy protocol)
PUBLIC_UNDERSCORE = {"_replace", "_asdict", "_fields", "_make", "_exit", "_getframe"}
# compiled extension modules: private by the python-zstandard/cryptography convention
EXTENSIONS = {"qcow2._native", "qcow2.backends._rbd"}


def _modules() -> dict[str, Path]:
    mods = {}
    for base, pkg in ((ROOT / "qcow2", "qcow2"), (ROOT / "backends", "qcow2.backends")):
        for path in sorted(base.rglob("*.py")):
            rel = path.relative_to(base).with_suffix("")
            parts = [p for p in rel.parts if p != "__init__"]
            mods[".".join([pkg, *parts])] = path
    return mods


MODULES = _modules()
if not MODULES:                                  # pragma: no cover
    pytest.skip("source tree not found", allow_module_level=True)


def _is_package(name: str) -> bool:
    return MODULES[name].name == "__init__.py"


def _resolve(current: str, level: int, module: str | None) -> str:
    pkg = current if _is_package(current) else current.rpartition(".")[0]
    for _ in range(level - 1):
        pkg = pkg.rpartition(".")[0]
    if level == 0:
        return module or ""
    return f"{pkg}.{module}" if module else pkg


def _imports(name: str):
    """(target module, imported names, line) of every import in module ``name``,
    function-local ones included; targets outside the project are dropped."""
    tree = ast.parse(MODULES[name].read_text())
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for a in node.names:
                if a.name.split(".")[0] == "qcow2":
                    yield a.name, [], node.lineno
        elif isinstance(node, ast.ImportFrom):
            target = _resolve(name, node.level, node.module)
            if target.split(".")[0] != "qcow2":
                continue
            plain = []
            for a in node.names:
                sub = f"{target}.{a.name}"
                if sub in EXTENSIONS:
                    continue
                if sub in MODULES:
                    yield sub, [], node.lineno       # a submodule, imported by name
                else:
                    plain.append(a.name)
            if plain:
                yield target, plain, node.lineno


def _graph() -> dict[str, set[str]]:
    graph = {name: set() for name in MODULES}
    for name in MODULES:
        for target, _names, _line in _imports(name):
            if target in MODULES and target != name:
                graph[name].add(target)
    return graph


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    out = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def _layer(name: str) -> float:
    if name == "qcow2.__main__":
        return 4
    if name == "qcow2":
        return 2.5                        # the public facade: over the operations
    if name.startswith("qcow2.backends"):
        return 0
    if name.startswith("qcow2.ops"):
        return 2
    if name.startswith(("qcow2.cli", "qcow2.compute", "qcow2.nbd")):
        return 3
    return 1                              # the engine


def test_no_import_cycles():
    cycles = _cycles(_graph())
    assert not cycles, "\n".join(" <-> ".join(c) for c in cycles)


def test_layers_point_one_way():
    bad = []
    for name, targets in _graph().items():
        for t in targets:
            if name.startswith("qcow2.compute") and t.startswith("qcow2.cli"):
                bad.append(f"{name} -> {t}")
            elif _layer(t) > _layer(name):
                bad.append(f"{name} -> {t}")
    assert not bad, "\n".join(bad)


def test_no_private_imports():
    bad = []
    for name in MODULES:
        for target, names, line in _imports(name):
            if target in EXTENSIONS:
                continue
            own_package = target == name.rpartition(".")[0] or target == name
            if target.rpartition(".")[2].startswith("_") and not target.endswith("__main__"):
                bad.append(f"{name}:{line} imports private module {target}")
            for n in names:
                if n.startswith("_") and not n.startswith("__") and not own_package:
                    bad.append(f"{name}:{line} imports {target}.{n}")
    assert not bad, "\n".join(bad)


def test_operations_use_public_engine_names():
    bad = []
    for name, path in MODULES.items():
        if _layer(name) < 2:
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if (isinstance(node, ast.Attribute) and node.attr.startswith("_")
                    and not node.attr.startswith("__") and node.attr not in PUBLIC_UNDERSCORE
                    and not (isinstance(node.value, ast.Name)
                             and node.value.id in ("self", "cls"))):
                bad.append(f"{name}:{node.lineno} .{node.attr}")
    assert not bad, "\n".join(bad)


def test_sizes():
    bad = []
    for name, path in MODULES.items():
        text = path.read_text()
        n = text.count("\n")
        if n > MAX_MODULE_LINES:
            bad.append(f"{name}: {n} lines")
        for node in ast.walk(ast.parse(text)):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                length = node.end_lineno - node.lineno + 1
                if length > MAX_FUNCTION_LINES:
                    bad.append(f"{name}.{node.name} (line {node.lineno}): {length} lines")
    assert not bad, "\n".join(bad)
