"""The package layout: imports of etl/ and udfs/ form no cycle, and the modules of steps that
run no model never import torch or open_clip when they are imported."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("etl", "udfs")
HEAVY = ("torch", "open_clip", "torchvision")
# modules whose import must stay light: the CLI and every step that runs no model
LIGHT = ("etl.cli", "etl.steps", "etl.config", "etl.spark", "etl.tables", "etl.ingest",
         "etl.dedup", "etl.select", "etl.rules", "etl.export", "etl.report", "etl.sample",
         "etl.lineage", "etl.funnel", "etl.evaluate", "etl.targets")


def modules() -> dict[str, Path]:
    out = {}
    for pkg in PACKAGES:
        for path in (ROOT / pkg).rglob("*.py"):
            name = ".".join(path.relative_to(ROOT).with_suffix("").parts)
            out[name.removesuffix(".__init__")] = path
    return out


def imports(path: Path, known: set[str], top_level_only: bool = False) -> set[str]:
    """Modules ``path`` imports: project modules by name, others by their top package."""
    tree = ast.parse(path.read_text())
    nodes = tree.body if top_level_only else list(ast.walk(tree))
    found: set[str] = set()
    for node in nodes:
        if isinstance(node, ast.Import):
            found.update(a.name if a.name in known else a.name.split(".")[0] for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            found.add(node.module if node.module in known else node.module.split(".")[0])
            found.update(f"{node.module}.{a.name}" for a in node.names
                         if f"{node.module}.{a.name}" in known)
    return found


def graph(top_level_only: bool = False) -> dict[str, set[str]]:
    mods = modules()
    known = set(mods)
    return {name: imports(path, known, top_level_only) - {name} for name, path in mods.items()}


def cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in edges.get(v, ()):
            if w not in edges:
                continue
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                found.append(sorted(comp))

    for v in sorted(edges):
        if v not in index:
            visit(v)
    return found


def test_cycle_finder_finds_a_planted_cycle():
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert cycles({"a": {"b"}, "b": set()}) == []


def test_etl_and_udfs_have_no_import_cycle():
    """Every import counts, function-level ones too: a deferred import still ties two
    modules together."""
    assert cycles(graph()) == []


@pytest.mark.parametrize("name", LIGHT)
def test_modules_that_run_no_model_do_not_import_torch(name):
    edges = graph(top_level_only=True)
    seen, todo = set(), [name]
    while todo:
        mod = todo.pop()
        if mod in seen:
            continue
        seen.add(mod)
        heavy = edges.get(mod, set()) & set(HEAVY)
        assert not heavy, f"{name} imports {sorted(heavy)} at import time through {mod}"
        todo.extend(m for m in edges.get(mod, ()) if m in edges)
