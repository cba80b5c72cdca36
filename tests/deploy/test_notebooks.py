"""The Databricks notebooks run locally, end to end, on a tiny pool (every cell executed)."""

from __future__ import annotations

import json

import pytest

from etl.config import PROJECT_ROOT, LakehouseConf
from etl.notebook import job_argv, split_overrides, widget
from etl.tables import BRONZE, DEDUP, GOLD, QUARANTINE, SELECTION, SILVER, Lakehouse
from tests.helpers.frames import assert_same_rows
from tests.helpers.pipeline import CELL, NOTEBOOKS, STAGES, notebook_env, notebook_run, run_notebook


@pytest.fixture(scope="module")
def run(spark, tmp_path_factory):
    return notebook_run(tmp_path_factory)


@pytest.fixture(scope="module")
def tiny_lake(spark, run):
    return Lakehouse(spark, LakehouseConf(root=str(run.root)))


class FakeWidgets:
    """Stands in for Databricks' ``dbutils.widgets`` (text widgets only)."""

    def __init__(self, values: dict[str, str]):
        self.values, self.created = values, {}

    def text(self, name: str, default: str) -> None:
        self.created[name] = default

    def get(self, name: str) -> str:
        return self.values.get(name, self.created[name])


class FakeDbutils:
    def __init__(self, values: dict[str, str]):
        self.widgets = FakeWidgets(values)


def test_every_notebook_is_databricks_source_reading_widgets():
    found = sorted(p.name for p in NOTEBOOKS.glob("*.py"))
    assert found == sorted(["00_end_to_end.py", *STAGES, "06_takedowns.py"])
    for name in found:
        text = (NOTEBOOKS / name).read_text()
        assert text.startswith("# Databricks notebook source\n# MAGIC %md"), name
        assert text.count(CELL) >= 2, name
        assert 'widget("conf", "conf/local.yaml")' in text, name


def test_widget_prefers_dbutils_then_environment_then_default(monkeypatch):
    monkeypatch.delenv("DFN_STEPS", raising=False)
    fake = FakeDbutils({"conf": "conf/databricks.yaml"})
    ns = {"widget": widget, "dbutils": fake}
    exec("a = widget('conf', 'conf/local.yaml'); b = widget('steps', 'ingest')", ns)
    assert (ns["a"], ns["b"]) == ("conf/databricks.yaml", "ingest")
    assert fake.widgets.created == {"conf": "conf/local.yaml", "steps": "ingest"}
    assert widget("steps", "ingest,score") == "ingest,score"
    monkeypatch.setenv("DFN_STEPS", "dedup")
    assert widget("steps", "ingest,score") == "dedup"


def test_overrides_and_argv():
    assert split_overrides("a.b=1; c=[x, y]\n\n d=2 ") == ["a.b=1", "c=[x, y]", "d=2"]
    argv = job_argv("conf/local.yaml", "a=1;b=2", "r1", "--out", "x")
    assert argv == ["--conf", str(PROJECT_ROOT / "conf" / "local.yaml"), "--set", "a=1",
                    "--set", "b=2", "--run-id", "r1", "--out", "x"]
    assert job_argv("", "") == []


@pytest.mark.slow
def test_stage_notebooks_build_every_table_and_output(run, tiny_lake):
    assert run.namespaces["01_ingest.py"]["counts"]["bronze_pairs.new"] == 60
    bronze = tiny_lake.read(BRONZE)
    assert bronze.count() == 60 and tiny_lake.read(QUARANTINE).count() > 0
    silver = tiny_lake.read(SILVER)
    assert silver.count() == 60 and silver.where("score IS NULL").count() <= 6
    assert tiny_lake.read(DEDUP).count() == 60
    selection = tiny_lake.read(SELECTION)
    assert_same_rows(selection.select("uid"), bronze.select("uid"))
    kept = selection.where("kept").count()
    assert 0 < kept < 60
    assert selection.where("NOT kept AND drop_reason IS NULL").count() == 0
    assert tiny_lake.read(GOLD).count() == kept
    manifest = json.loads((run.root / "export" / "manifest.json").read_text())
    assert manifest["kept"] == kept
    page = run.namespaces["05_report.py"]["page"]
    assert page == str(run.root / "report" / "index.html")
    assert (run.root / "report" / "index.html").stat().st_size > 10_000


@pytest.mark.slow
def test_end_to_end_notebook_reruns_idempotently(run, tiny_lake, tmp_path):
    before = tiny_lake.read(SELECTION).select("uid", "kept", "drop_reason").collect()
    silver_version = tiny_lake.version(SILVER)
    with notebook_env(conf="conf/local.yaml", overrides=";".join(run.overrides),
                      run_id="rerun", out=str(tmp_path / "report")):
        ns = run_notebook(NOTEBOOKS / "00_end_to_end.py")
    assert ns["steps"] == "ingest,score,dedup,targets,select,export"
    assert set(ns["results"]) == {"ingest", "score", "dedup", "targets", "select", "export"}
    assert ns["results"]["targets"] == {}  # no rule reads target signals: skipped
    assert ns["results"]["ingest"]["bronze_pairs.new"] == 0
    assert tiny_lake.version(SILVER) == silver_version  # nothing re-scored
    assert tiny_lake.read(BRONZE).count() == 60
    assert_same_rows(tiny_lake.read(SELECTION), before, ["uid", "kept", "drop_reason"])
    assert (tmp_path / "report" / "index.html").exists()
