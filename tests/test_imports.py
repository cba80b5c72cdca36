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


# ---- Spark Connect: the JVM only behind etl.compat -------------------------------------------

JVM_ONLY = ("sparkContext", "_jvm", "_jsc", "_jdf", "rdd", "_gateway")


def jvm_uses(source: str) -> list[str]:
    """``name:line`` of each JVM-only attribute (or its name as a string, for getattr)."""
    found = []
    for node in ast.walk(ast.parse(source)):
        name = (node.attr if isinstance(node, ast.Attribute)
                else node.value if isinstance(node, ast.Constant) else None)
        if isinstance(name, str) and name in JVM_ONLY:
            found.append(f"{name}:{node.lineno}")
    return found


def test_jvm_finder_finds_a_planted_use():
    planted = "def f(spark):\n    x = spark.sparkContext\n    return getattr(df, '_jdf'), df.rdd\n"
    assert sorted(jvm_uses(planted)) == ["_jdf:3", "rdd:3", "sparkContext:2"]
    assert jvm_uses("def f(spark):\n    return spark.conf.get('spark.master')\n") == []


def test_no_jvm_access_outside_the_compatibility_module():
    """Spark Connect (Databricks serverless, Unity Catalog shared clusters) has no JVM in the
    client: every use lives in etl/compat.py or in a file its allowlist names, with a reason."""
    from etl.compat import JVM_ALLOWED

    offenders = {}
    for path in [*modules().values(), *(ROOT / "notebooks").glob("*.py")]:
        rel = path.relative_to(ROOT).as_posix()
        uses = jvm_uses(path.read_text())
        if uses and rel not in JVM_ALLOWED:
            offenders[rel] = uses
    assert offenders == {}, f"JVM-only access outside etl/compat.py: {offenders}"
    for rel, why in JVM_ALLOWED.items():
        assert (ROOT / rel).exists() and len(why) > 20, rel


def test_no_udf_is_made_at_import():
    """pyspark binds a UDF to the classic or the Connect kind of session when it is made: one
    made at import, before a notebook's Connect session exists, fails on that session."""
    made = []
    for name, path in modules().items():
        for node in ast.parse(path.read_text()).body:
            decorators = getattr(node, "decorator_list", [])
            calls = [d.func if isinstance(d, ast.Call) else d for d in decorators]
            if isinstance(node, ast.Assign) and isinstance(node.value, ast.Call):
                calls.append(node.value.func)
            for f in calls:
                attr = f.attr if isinstance(f, ast.Attribute) else getattr(f, "id", "")
                if attr in ("udf", "pandas_udf"):
                    made.append(f"{name}:{node.lineno}")
    assert made == []
