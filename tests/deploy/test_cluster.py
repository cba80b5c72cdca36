"""The full pipeline through ``spark-submit`` on a real Spark standalone cluster (a master and
two 1-core workers on 127.0.0.1, from the installed pyspark) equals the local-mode result."""

from __future__ import annotations

import json
import subprocess
import zipfile
from pathlib import Path

import pytest

from etl.config import PROJECT_ROOT, LakehouseConf
from etl.devcluster import SPARK_HOME, master_state, spark_env, standalone
from etl.jvmarchive import delta_jars
from etl.spark import delta_coordinate
from etl.tables import BRONZE, GOLD, SELECTION, Lakehouse
from tests.helpers.frames import assert_same_rows
from tests.helpers.pipeline import notebook_run, tiny_overrides, tiny_weights

pytestmark = pytest.mark.slow

ENTRY = "etl/jobs/run.py"  # what users and databricks.yml submit
# like the test session: few partitions for a 60-row pool (the job applies spark.conf on top
# of spark-submit's --conf)
SMALL_SPARK = ('spark.conf={spark.sql.shuffle.partitions: "2", spark.default.parallelism: "2", '
               'spark.databricks.delta.snapshotPartitions: "1"}')
DELTA = delta_coordinate()


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    """(master url, master UI port, worker dirs); the daemons are stopped at teardown."""
    with standalone(tmp_path_factory.mktemp("standalone"), workers=2) as c:
        yield c.url, c.ui_port, c.work_dirs


def package_zip(path: Path) -> Path:
    """etl/ and udfs/ as a zip for ``--py-files`` (what ``make dist`` builds)."""
    with zipfile.ZipFile(path, "w") as zf:
        for pkg in ("etl", "udfs"):
            for f in sorted((PROJECT_ROOT / pkg).rglob("*.py")):
                zf.write(f, f.relative_to(PROJECT_ROOT))
    return path


def delta_args() -> list[str]:
    """The local Delta jars ``make venv`` resolved (air-gapped style), else --packages."""
    jars = delta_jars()
    return ["--jars", ",".join(jars)] if jars else ["--packages", DELTA]


def test_spark_submit_on_standalone_cluster_matches_local_mode(cluster, spark, tmp_path_factory):
    url, ui, work = cluster
    tmp = tmp_path_factory.mktemp("cluster-run")
    root = tmp / "lakehouse"
    overrides = [*tiny_overrides(root, tiny_weights(tmp)), SMALL_SPARK]
    cmd = [str(SPARK_HOME / "bin" / "spark-submit"), "--master", url, "--name", "dfn-cluster-test",
           *delta_args(), "--py-files", str(package_zip(tmp / "dfn_curate.zip")),
           "--driver-memory", "1g", "--executor-memory", "1g", "--total-executor-cores", "2",
           "--conf", "spark.ui.enabled=false",
           ENTRY, "--conf", "conf/local.yaml", "--run-id", "cluster",
           *[arg for o in overrides for arg in ("--set", o)]]
    log = tmp / "spark-submit.log"
    with log.open("w") as fh:
        proc = subprocess.Popen(cmd, cwd=PROJECT_ROOT, env=spark_env(), stdout=fh,
                                stderr=subprocess.STDOUT)
    try:  # meanwhile, the same config in local mode in this session (shared with other tests)
        local = notebook_run(tmp_path_factory)
        proc.wait(timeout=1500)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    out = log.read_text(errors="replace")
    assert proc.returncode == 0, out[-6000:]
    assert "[export] done" in out
    assert tiny_weights(tmp).read_bytes() == local.weights.read_bytes()  # same seeded model

    apps = master_state(ui)["completedapps"]
    assert len(apps) == 1 and apps[0]["state"] == "FINISHED", apps
    for w in work:  # each worker ran an executor for the app
        assert any(w.glob("app-*/*/stderr")), f"no executor ran on {w.name}"

    cluster_lake = Lakehouse(spark, LakehouseConf(root=str(root)))
    local_lake = Lakehouse(spark, LakehouseConf(root=str(local.root)))
    assert cluster_lake.read(BRONZE).count() == 60
    cols = ["uid", "kept", "drop_reason"]
    assert_same_rows(cluster_lake.read(SELECTION), local_lake.read(SELECTION), cols)
    assert_same_rows(cluster_lake.read(GOLD), local_lake.read(GOLD), ["uid"])
    assert (root / "export" / "manifest.json").exists()


PROBE = """
import json
from etl.config import SparkConf
from etl.spark import get_spark
spark = get_spark(SparkConf(conf={"spark.default.parallelism": "5"}))
keys = ["spark.sql.shuffle.partitions", "spark.sql.execution.arrow.maxRecordsPerBatch",
        "spark.default.parallelism", "spark.sql.session.timeZone", "spark.sql.extensions"]
print("CONF " + json.dumps({k: spark.sparkContext.getConf().get(k) for k in keys}))
"""


def test_spark_submit_conf_wins_over_the_laptop_defaults(tmp_path):
    """Under spark-submit, --conf values stay; only unset laptop defaults and the YAML's
    spark.conf are applied."""
    script = tmp_path / "probe.py"
    script.write_text(PROBE)
    cmd = [str(SPARK_HOME / "bin" / "spark-submit"), "--master", "local[1]", *delta_args(),
           "--conf", "spark.sql.shuffle.partitions=3",
           "--conf", "spark.sql.execution.arrow.maxRecordsPerBatch=99", str(script)]
    proc = subprocess.run(cmd, cwd=PROJECT_ROOT, env=spark_env(), capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    line = next(x for x in proc.stdout.splitlines() if x.startswith("CONF "))
    assert json.loads(line[5:]) == {
        "spark.sql.shuffle.partitions": "3", "spark.sql.execution.arrow.maxRecordsPerBatch": "99",
        "spark.default.parallelism": "5", "spark.sql.session.timeZone": "UTC",
        "spark.sql.extensions": "io.delta.sql.DeltaSparkSessionExtension"}
