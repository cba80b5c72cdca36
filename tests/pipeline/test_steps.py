"""The one step registry: what the CLI lists, what ``run`` runs, what each job file calls
(pure: no Spark session is started)."""

from __future__ import annotations

import importlib

import pytest

from etl import cli, steps
from etl.steps import PIPELINE, STEPS
from etl.tables import TABLES


def test_the_cli_lists_the_registry(capsys):
    assert cli.COMMANDS == {s.name: s.module for s in STEPS}
    assert cli.main(["--help"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("usage: dfn-curate {" + ",".join(s.name for s in STEPS) + "}")
    for step in STEPS:
        assert f"  {step.name}" in out and step.help in out
    assert cli.main(["bogus"]) == 2
    assert "unknown command 'bogus'" in capsys.readouterr().err


def test_run_runs_the_pipeline_steps_in_order():
    assert PIPELINE == ("ingest", "score", "dedup", "targets", "select", "export")
    assert {s.name for s in STEPS if s.models} == {"score", "run", "train-dfn", "evaluate"}
    assert [s.name for s in STEPS if not s.spark] == ["sample"]
    assert all(len(s.help) <= 90 and "\n" not in s.help for s in STEPS)


@pytest.mark.parametrize("step", STEPS, ids=lambda s: s.name)
def test_each_job_file_is_a_thin_main_over_its_step(step, monkeypatch):
    calls = []
    monkeypatch.setattr(steps, "main", lambda name, argv=None: calls.append((name, argv)) or 7)
    job = importlib.import_module(f"etl.jobs.{step.module}")
    assert job.main(["--conf", "x.yaml"]) == 7
    assert calls == [(step.name, ["--conf", "x.yaml"])]


def test_run_refuses_unknown_steps_before_reading_the_config(capsys):
    from etl.jobs import run

    with pytest.raises(SystemExit) as exc:
        run.main(["--conf", "does/not/exist.yaml", "--steps", "select,bogus"])
    assert exc.value.code == 2
    assert ("dfn-curate run: unknown step(s) bogus; choose from ingest, score, dedup, targets, "
            "select, export") in capsys.readouterr().err


def test_step_names_are_unique_and_lookups_name_the_choices():
    assert len({s.name for s in STEPS}) == len(STEPS)
    assert steps.get("select").module == "select_pairs"
    with pytest.raises(KeyError, match="choose from sample, ingest"):
        steps.get("bogus")
    assert steps.parse_steps(" select, ,export ") == ["select", "export"]


def test_every_table_is_written_by_a_step_in_pipeline_order():
    order = [s.name for s in STEPS]
    writers = [t.step for t in TABLES if t.step != "every step"]
    assert set(writers) <= set(order)
    assert writers == sorted(writers, key=order.index)
