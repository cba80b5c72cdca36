"""One tiny-pool pipeline run, made by executing the stage notebooks, shared by the notebook,
report and cluster tests (executed at most once per test session)."""

from __future__ import annotations

import os
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from etl.config import PROJECT_ROOT

NOTEBOOKS = PROJECT_ROOT / "notebooks"
STAGES = ["01_ingest.py", "02_score.py", "03_dedup_select.py", "04_export.py", "05_report.py"]
CELL = "# COMMAND ----------"


@dataclass
class TinyRun:
    root: Path  # lakehouse root
    overrides: list[str]
    weights: Path
    namespaces: dict[str, dict]  # notebook file -> its globals after the run


_RUN: dict[str, TinyRun | BaseException] = {}


def tiny_overrides(root: Path, weights: Path) -> list[str]:
    """A 60-pair pool, random-but-seeded dfn-tiny weights, model-free (thumbnail) dedup."""
    return ["sample.n_pairs=60", "sample.eval_size=12", "sample.shard_size=30",
            f"lakehouse.root={root}", "select.keep_fraction=0.5", "dedup.n_clusters=2",
            "dedup.near_signals=[thumbnail]", "export.shard_size=16",
            "score.models=[{name: conf/models/dfn-tiny.json, pretrained: "
            f"{weights}, model_id: dfn-tiny}}]"]


def tiny_weights(folder: Path) -> Path:
    """Seeded random dfn-tiny weights (never the bundled, trained file)."""
    from safetensors.torch import save_file

    from tests.helpers.models import tiny_state

    path = folder / "dfn-tiny-random.safetensors"
    if not path.exists():
        save_file(tiny_state(0), str(path))
    return path


@contextmanager
def notebook_env(**values: str):
    """Set ``DFN_<NAME>`` widget fallbacks for the duration of the block."""
    saved = {k: os.environ.get(f"DFN_{k.upper()}") for k in values}
    os.environ.update({f"DFN_{k.upper()}": v for k, v in values.items()})
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(f"DFN_{k.upper()}", None)
            else:
                os.environ[f"DFN_{k.upper()}"] = v


def run_notebook(path: Path) -> dict:
    """Execute a Databricks source notebook cell by cell in one namespace; a failing cell
    raises with the cell number in its traceback (``<file>[cell N]``)."""
    source = path.read_text(encoding="utf-8")
    assert source.startswith("# Databricks notebook source"), path
    ns: dict = {"__name__": "__notebook__", "__file__": str(path)}
    for i, cell in enumerate(source.split(CELL)):
        exec(compile(cell, f"{path.name}[cell {i}]", "exec"), ns)
    return ns


def notebook_run(tmp_path_factory) -> TinyRun:
    """Run the stage notebooks 01..05 once on a fresh tiny lakehouse; memoised (a failure
    too, so dependent tests fail fast instead of re-running it)."""
    if isinstance(_RUN.get("run"), BaseException):
        raise RuntimeError("the shared tiny notebook run failed earlier") from _RUN["run"]
    if "run" not in _RUN:
        try:
            _RUN["run"] = _notebook_run(tmp_path_factory)
        except BaseException as exc:
            _RUN["run"] = exc
            raise
    return _RUN["run"]


def _notebook_run(tmp_path_factory) -> TinyRun:
    folder = tmp_path_factory.mktemp("tiny-notebooks")
    root = folder / "lakehouse"
    weights = tiny_weights(folder)
    overrides = tiny_overrides(root, weights)
    namespaces = {}
    with notebook_env(conf="conf/local.yaml", overrides="\n".join(overrides), run_id="notebooks"):
        for name in STAGES:
            namespaces[name] = run_notebook(NOTEBOOKS / name)
    return TinyRun(root, overrides, weights, namespaces)
