"""The package's shape, checked from the source (docs/ARCHITECTURE.md, "Layers"):
imports only go downward, no module imports one that imports it back, and imports
inside functions are kept for optional dependencies and the CLI's lazy commands."""

from __future__ import annotations

import ast
import os
from collections import defaultdict

SRC = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "src", "storekeeper")

#: lower number = lower layer; a module may import its own layer and lower ones
LAYERS = {
    "formats": 0,
    "errors": 1, "api": 1, "queries": 1,
    "fs": 2, "config": 2,
    "store": 3,
    "build": 4,
    "daemon": 5, "client": 5,
    "cli": 6, "__main__": 6,
}
#: same-layer packages that must not know each other
APART = {frozenset({"daemon", "client"})}
#: the client speaks the contract (api), formats and the fs layer: never the store itself
NEVER = {("client", "store"), ("client", "build")}
#: function-level imports allowed: optional dependencies, and modules that load lazily on
#: purpose (the CLI's subcommands; the daemon from the CLI's `daemon` command)
OPTIONAL = {"rich", "boto3", "botocore", "zstandard", "cryptography", "ctypes"}
LAZY_OK = ("storekeeper.cli", "storekeeper.__main__")


def _lazy_ok(mod: str) -> bool:
    return any(mod == p or mod.startswith(p + ".") for p in LAZY_OK)


def modules() -> dict[str, str]:
    out = {}
    for d, _dirs, files in os.walk(SRC):
        for f in files:
            if f.endswith(".py"):
                path = os.path.join(d, f)
                rel = os.path.relpath(path, os.path.dirname(SRC))[:-3].replace(os.sep, ".")
                out[rel.removesuffix(".__init__")] = path
    return out


def imports(mod: str, path: str, known: set[str]) -> list[tuple[str, bool, int]]:
    """(imported storekeeper module, at module level?, line) for every import in ``path``."""
    tree = ast.parse(open(path).read(), path)
    is_pkg = path.endswith("__init__.py")
    found = []

    def visit(node: ast.AST, top: bool) -> None:
        for child in ast.iter_child_nodes(node):
            inner = top and not isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef))
            if isinstance(child, ast.If) and isinstance(child.test, ast.Name) and child.test.id == "TYPE_CHECKING":
                continue  # annotations only
            if isinstance(child, ast.Import):
                for a in child.names:
                    found.append((a.name, top, child.lineno))
            elif isinstance(child, ast.ImportFrom):
                base = mod if is_pkg else mod.rpartition(".")[0]
                if child.level:
                    parts = base.split(".")
                    base = ".".join(parts[:len(parts) - child.level + 1])
                    target = f"{base}.{child.module}" if child.module else base
                else:
                    target = child.module or ""
                for a in child.names:
                    sub = f"{target}.{a.name}"
                    found.append((sub if sub in known else target, top, child.lineno))
            visit(child, inner)
    visit(tree, True)
    return found


def _layer(mod: str) -> str:
    return mod.split(".")[1] if "." in mod else ""


def graph():
    mods = modules()
    known = set(mods)
    edges: dict[str, set[str]] = defaultdict(set)  # every import, late ones too
    lazy = []
    for mod, path in mods.items():
        for target, top, line in imports(mod, path, known):
            root = target.split(".")[0]
            if root != "storekeeper":
                continue  # a late stdlib or optional import is no cycle and no layer break
            edges[mod].add(target)
            if not top and not _lazy_ok(mod):
                lazy.append(f"{mod}:{line} imports {target} inside a function")
    return mods, edges, lazy


def test_imports_only_go_down():
    mods, edges, _ = graph()
    bad = []
    for mod, targets in edges.items():
        a = _layer(mod)
        for t in targets:
            b = _layer(t)
            if not a or not b or a == b:
                continue
            if (frozenset({a, b}) in APART or (a, b) in NEVER
                    or LAYERS.get(b, 99) > LAYERS.get(a, -1)):
                bad.append(f"{mod} ({a}) imports {t} ({b})")
    assert not bad, "\n".join(sorted(bad))


def test_no_import_cycles():
    mods, edges, _ = graph()
    # Tarjan's strongly connected components over all imports (a late import is still a cycle)
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    cycles = []
    counter = [0]

    def strong(v: str) -> None:
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in edges.get(v, ()):
            if w not in mods:
                continue
            if w not in index:
                strong(w)
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
            # a package importing its own submodules (re-exports) is not a cycle
            if len(comp) > 1 and not all(c.startswith(min(comp, key=len) + ".") or c == min(comp, key=len)
                                         for c in comp):
                cycles.append(sorted(comp))

    for m in mods:
        if m not in index:
            strong(m)
    assert not cycles, cycles


def test_no_imports_hidden_in_functions():
    _, _, lazy = graph()
    assert not lazy, "\n".join(lazy)
