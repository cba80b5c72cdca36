"""Spark Connect, proven offline: a real Connect server (pyspark's SparkConnectServer with Delta)
in its own process, and the pipeline driven from client processes that have no JVM at all, so
any JVM access raises there. The tiny pipeline over Connect (folder mode, through the CLI) and
the end-to-end notebook over Connect (Unity-Catalog-style three-level names) must match the
classic run exactly: every table's row count, run_stats and the exported uids.npy."""

from __future__ import annotations

import json
import time

import pytest

from etl import connectserver
from etl.config import LakehouseConf, SparkConf
from etl.devcluster import free_port
from etl.spark import connect_refusals, runtime_defaults
from etl.tables import Lakehouse
from tests.helpers.connect import child_env, run_cli, summary
from tests.helpers.pipeline import tiny_overrides, tiny_weights


def _sets(overrides: list[str]) -> list[str]:
    return [a for o in overrides for a in ("--set", o)]


def test_connect_refuses_what_a_client_cannot_set():
    conf = SparkConf(jars=["/x/delta.jar"], conf={"spark.driver.memory": "8g",
                                                  "spark.sql.shuffle.partitions": "4",
                                                  "spark.hadoop.fs.s3a.endpoint": "http://h"})
    refused = connect_refusals(conf)
    assert len(refused) == 2
    assert refused[0].startswith("spark.jars lists local jars")
    assert "spark.conf.spark.driver.memory is fixed when the Spark Connect server starts" in refused[1]
    assert connect_refusals(SparkConf(conf={"spark.sql.shuffle.partitions": "4"})) == []
    assert "spark.driver.memory" not in runtime_defaults()
    assert runtime_defaults()["spark.sql.session.timeZone"] == "UTC"


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    with connectserver.start(tmp_path_factory.mktemp("connect-server")) as srv:
        yield srv


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    folder = tmp_path_factory.mktemp("connect-runs")
    return folder, tiny_weights(folder)


def _run(folder, weights, name: str, *extra: str, **env: str) -> tuple[list[str], object]:
    overrides = tiny_overrides(folder / name, weights)
    done = run_cli("run", "--conf", "conf/local.yaml", *_sets(overrides), *extra, **env)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return overrides, done


@pytest.fixture(scope="module")
def classic(spark, tiny):
    folder, weights = tiny
    _run(folder, weights, "classic")
    lake = Lakehouse(spark, LakehouseConf(root=str(folder / "classic")))
    return summary(lake, lake.under("export"))


@pytest.mark.slow
def test_pipeline_over_connect_matches_classic(spark, server, tiny, classic):
    folder, weights = tiny
    _, done = _run(folder, weights, "connect", "--set", f"spark.remote={server.url}")
    assert "[export] done" in done.stdout
    lake = Lakehouse(spark, LakehouseConf(root=str(folder / "connect")))
    got = summary(lake, lake.under("export"))
    assert got["counts"]["bronze_pairs"] == 60 and got["kept"] > 0
    assert got == classic


@pytest.mark.slow
def test_notebook_over_connect_with_three_level_names_matches_classic(server, tiny, classic):
    import subprocess
    import sys

    from etl.config import PROJECT_ROOT

    folder, weights = tiny
    overrides = [*tiny_overrides(folder / "notebook", weights), "lakehouse.catalog=spark_catalog",
                 "lakehouse.schema=dfn_connect_nb"]
    env = child_env(SPARK_REMOTE=server.url, DFN_CONF="conf/local.yaml",
                    DFN_OVERRIDES="\n".join(overrides), DFN_OUT=str(folder / "nb-report"))
    done = subprocess.run([sys.executable, "-m", "tests.helpers.connect"], cwd=PROJECT_ROOT,
                          capture_output=True, text=True, timeout=900, env=env)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    line = next(x for x in done.stdout.splitlines() if x.startswith("SUMMARY "))
    got = json.loads(line[len("SUMMARY "):])
    assert got.pop("connect") is True
    want = json.loads(json.dumps(classic))
    extra = [r for r in got["run_stats"] if r not in want["run_stats"]]
    missing = [r for r in want["run_stats"] if r not in got["run_stats"]]
    assert (extra, missing) == ([], [])
    assert got == want
    # the tables are catalog tables of the server, not folders under the root
    assert not (folder / "notebook" / "bronze_pairs").exists()
    assert (folder / "notebook" / "export" / "manifest.json").exists()
    assert (folder / "nb-report" / "index.html").exists()


@pytest.mark.slow
def test_unreachable_remote_stops_at_once_naming_the_url(tmp_path):
    port = free_port()
    begin = time.monotonic()
    done = run_cli("ingest", "--set", f"lakehouse.root={tmp_path / 'lake'}", "--set",
                   f"spark.remote=sc://127.0.0.1:{port}/;token=FAKETOKEN9", timeout=120)
    assert done.returncode != 0
    assert time.monotonic() - begin < 60  # a hang guard: the client alone retries for minutes
    assert f"sc://127.0.0.1:{port}" in done.stderr and "cannot reach" in done.stderr
    assert "FAKETOKEN9" not in done.stdout + done.stderr
    assert not (tmp_path / "lake").exists()


@pytest.mark.slow
def test_jvm_only_settings_and_unity_catalog_rules_are_refused_before_any_write(server, tmp_path):
    root = tmp_path / "lake"
    remote = ["--set", f"spark.remote={server.url}", "--set", f"lakehouse.root={root}"]
    done = run_cli("ingest", *remote, "--set", "spark.conf={spark.driver.memory: 8g}")
    assert done.returncode != 0
    assert "spark.conf.spark.driver.memory is fixed when the Spark Connect server starts" in done.stderr
    done = run_cli("ingest", *remote, "--set",
                   'spark.conf={spark.databricks.unityCatalog.enabled: "true"}')
    assert done.returncode != 0
    assert "this session is Unity Catalog only" in done.stderr and "lakehouse.schema" in done.stderr
    assert not root.exists()
