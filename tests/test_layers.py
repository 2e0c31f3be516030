"""The layering of the code, read from its imports (ast): each folder imports only what its
place allows (docs/architecture.md, "Layers"), and no two modules import each other."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
FIRST_PARTY = ("control", "api", "dataplane", "bench")

# Who may import what: a module's layer (the longest prefix listed) against the imported
# module's layer. Every import counts, at the top of a file or inside a function.
ALLOWED: dict[str, tuple[str, ...]] = {
    "dataplane": ("dataplane", "control.core"),
    "control.core": ("control.core", "dataplane"),
    "api": ("api", "dataplane", "control.core", "control.gkm.client"),
    "control.lkm": ("control.lkm", "control.core", "dataplane", "api.etsi", "api.client"),
    "control.routing": ("control.routing", "control.core", "dataplane"),
    "control.gkm": ("control.gkm", "control.routing", "control.core", "dataplane"),
    "control.node": ("control.node", "control.lkm", "control.gkm", "control.routing",
                     "control.core", "dataplane", "api"),
    "control.tools": FIRST_PARTY,
    "bench": ("bench", "control", "api", "dataplane"),
}


def layer_of(module: str, layers=ALLOWED) -> str | None:
    best = None
    for name in layers:
        if (module == name or module.startswith(name + ".")) and \
                (best is None or len(name) > len(best)):
            best = name
    return best


def allowed(importer: str, imported: str) -> bool:
    layer = layer_of(importer)
    assert layer is not None, f"{importer} lies in no layer: give it one in ALLOWED"
    return any(imported == p or imported.startswith(p + ".") for p in ALLOWED[layer])


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def first_party_imports(path: Path) -> list[tuple[str, int, bool]]:
    """(module imported, line, at the top level) for each first-party import; a name
    imported from a package that is itself a module counts as that module."""
    tree = ast.parse(path.read_text())
    top = {id(n) for n in tree.body}
    found = []
    for node in ast.walk(tree):
        names: list[str] = []
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            base = node.module
            for a in node.names:
                sub = ROOT / Path(*base.split("."), a.name)
                names.append(f"{base}.{a.name}" if sub.with_suffix(".py").exists()
                             or (sub / "__init__.py").exists() else base)
        for n in names:
            if n.split(".")[0] in FIRST_PARTY:
                found.append((n, node.lineno, id(node) in top))
    return found


def sources() -> list[Path]:
    return sorted(p for root in FIRST_PARTY for p in (ROOT / root).rglob("*.py"))


def test_layer_rules_see_a_forbidden_import():
    """The rules themselves: what they must refuse, they refuse."""
    assert not allowed("dataplane.worker", "control.node.supervisor")
    assert not allowed("api.server", "control.gkm.store")
    assert not allowed("control.core.config", "control.lkm.messages")
    assert not allowed("control.gkm.manager", "bench.otp")
    assert not allowed("control.node.supervisor", "control.tools.cli")
    assert allowed("api.server", "control.gkm.client")
    assert allowed("control.tools.cli", "bench.all")


@pytest.mark.parametrize("path", sources(), ids=lambda p: str(p.relative_to(ROOT)))
def test_a_module_imports_only_what_its_layer_allows(path: Path):
    me = module_name(path)
    bad = [f"line {line}: {name}" for name, line, _ in first_party_imports(path)
           if not allowed(me, name)]
    assert not bad, f"{me} ({layer_of(me)}) may not import: " + "; ".join(bad)


def test_only_tools_and_benches_import_bench():
    for path in sources():
        me = module_name(path)
        if layer_of(me) in ("control.tools", "bench"):
            continue
        bench = [n for n, _, _ in first_party_imports(path) if n.split(".")[0] == "bench"]
        assert not bench, f"{me} imports {bench}"


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One cycle of the module graph (each module's top-level first-party imports), or
    None. A name that is not a module counts as its package."""
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(m: str) -> list[str] | None:
        state[m] = 1
        stack.append(m)
        for n in sorted(graph.get(m, ())):
            n = n if n in graph else n.rsplit(".", 1)[0]
            if n not in graph or n == m:
                continue
            if state.get(n) == 1:
                return stack[stack.index(n):] + [n]
            if n not in state and (found := visit(n)):
                return found
        stack.pop()
        state[m] = 2
        return None

    for m in sorted(graph):
        if m not in state and (found := visit(m)):
            return found
    return None


def test_find_cycle_finds_one():
    assert find_cycle({"a": {"b"}, "b": {"c.x"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": set()}) is None


def test_no_import_cycle_between_modules():
    """Top-level imports form no cycle (a function-level import runs late; it is held to
    the layer rules above)."""
    graph = {module_name(p): {n for n, _, top in first_party_imports(p) if top}
             for p in sources()}
    cycle = find_cycle(graph)
    assert cycle is None, "import cycle: " + " -> ".join(cycle)
