"""The import graph of the runtime and the training code (issue 16): no cycle, lazy imports
inside functions included (a lazy import that only dodges a cycle is still one), and nothing
below the orchestrator imports it or a CLI. Read from the source with `ast`, so a module that
fails to import still counts."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
PACKAGES = ("clinragen_fhir", "model", "training")
# the entry points: what may import the pipeline (and the CLIs, each other's commands)
TOP = ("clinragen_fhir.cli", "clinragen_fhir.worker", "clinragen_fhir.config_checks",
       "training.cli", "clinragen_fhir.knowledge.cli")
UPPER = {"clinragen_fhir.pipeline", "clinragen_fhir.cli", "training.cli",
         "clinragen_fhir.knowledge.cli"}


def modules() -> dict[str, Path]:
    out = {}
    for package in PACKAGES:
        for path in (ROOT / package).rglob("*.py"):
            name = ".".join(path.relative_to(ROOT).with_suffix("").parts)
            out[name.removesuffix(".__init__")] = path
    return out


def _type_checking(node: ast.AST) -> bool:
    return isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test)


def imports(path: Path, known: dict[str, Path]) -> set[str]:
    """The project modules a module imports anywhere in it, but under `if TYPE_CHECKING:`."""
    tree = ast.parse(path.read_text())
    skip = {id(n) for top in ast.walk(tree) if _type_checking(top) for n in ast.walk(top)}
    found: set[str] = set()
    for node in ast.walk(tree):
        if id(node) in skip:
            continue
        names: list[str] = []
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            names = [f"{node.module}.{a.name}" for a in node.names] + [node.module]
        for name in names:
            while name and name not in known:
                name = name.rpartition(".")[0]
            if name:
                found.add(name)
    return found


def graph() -> dict[str, set[str]]:
    known = modules()
    edges = {}
    for name, path in known.items():
        # a package and its own modules (`__init__` re-exports) are one unit here
        edges[name] = {m for m in imports(path, known) - {name}
                       if not m.startswith(name + ".") and not name.startswith(m + ".")}
    return edges


def cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """Every strongly connected component of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    out: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in sorted(edges.get(v, ())):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                out.append(sorted(component))

    for v in sorted(edges):
        if v not in index:
            visit(v)
    return out


def test_the_cycle_finder_finds_a_cycle() -> None:
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert cycles({"a": {"b"}, "b": set()}) == []


def test_no_import_cycle_lazy_imports_included() -> None:
    assert cycles(graph()) == []


def test_nothing_below_the_entry_points_imports_the_pipeline_or_a_cli() -> None:
    edges = graph()
    assert len(edges) > 50  # the walk found the packages
    upward = sorted((m, t) for m, targets in edges.items() for t in targets & UPPER
                    if not m.startswith(TOP) and m not in UPPER)
    assert upward == []
