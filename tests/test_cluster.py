"""The full pipeline through ``spark-submit`` on a real Spark standalone cluster (a master and
two 1-core workers on 127.0.0.1, from the installed pyspark) equals the local-mode result."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
import urllib.request
import zipfile
from importlib.metadata import version
from pathlib import Path

import pyspark
import pytest

from etl.config import PROJECT_ROOT, LakehouseConf
from etl.tables import BRONZE, GOLD, SELECTION, Lakehouse
from tests.conftest import assert_same_rows
from tests.tiny_pipeline import notebook_run, tiny_overrides, tiny_weights

pytestmark = pytest.mark.slow

SPARK_HOME = Path(pyspark.__file__).parent
ENTRY = "etl/jobs/run.py"  # what users and databricks.yml submit
# like the test session: few partitions for a 60-row pool (the job applies spark.conf on top
# of spark-submit's --conf)
SMALL_SPARK = ('spark.conf={spark.sql.shuffle.partitions: "2", spark.default.parallelism: "2", '
               'spark.databricks.delta.snapshotPartitions: "1"}')
DELTA = f"io.delta:delta-spark_2.13:{version('delta-spark')}"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def spark_env() -> dict[str, str]:
    """Environment for Spark daemons and spark-submit: this venv's Python, loopback only,
    and nothing inherited from the test session's own Py4J gateway."""
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("PYSPARK_GATEWAY", "PYSPARK_SUBMIT_ARGS", "SPARK_"))}
    env.update(SPARK_HOME=str(SPARK_HOME), SPARK_LOCAL_IP="127.0.0.1",
               PYSPARK_PYTHON=sys.executable, PYSPARK_DRIVER_PYTHON=sys.executable)
    return env


def daemon(cls: str, args: list[str], log: Path) -> subprocess.Popen:
    """One Spark daemon in the foreground (what sbin/start-*.sh run), logging to ``log``."""
    with log.open("wb") as out:
        return subprocess.Popen([str(SPARK_HOME / "bin" / "spark-class"), cls, *args],
                                stdout=out, stderr=subprocess.STDOUT, env=spark_env())


def master_state(ui_port: int) -> dict:
    with urllib.request.urlopen(f"http://127.0.0.1:{ui_port}/json/", timeout=5) as resp:
        return json.load(resp)


def wait_for_workers(ui_port: int, n: int, procs: list, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        dead = [p.args[1] for p in procs if p.poll() is not None]
        assert not dead, f"Spark daemon(s) exited: {dead}"
        try:
            if master_state(ui_port).get("aliveworkers", 0) >= n:
                return
        except OSError:
            pass
        time.sleep(1)
    raise TimeoutError(f"{n} workers did not register with the master in {timeout}s")


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    """(master url, master UI port, worker dirs); the daemons are stopped at teardown."""
    tmp = tmp_path_factory.mktemp("standalone")
    port, ui = free_port(), free_port()
    procs = [daemon("org.apache.spark.deploy.master.Master",
                    ["--host", "127.0.0.1", "--port", str(port), "--webui-port", str(ui)],
                    tmp / "master.log")]
    url = f"spark://127.0.0.1:{port}"
    work = [tmp / f"worker{i}" for i in (1, 2)]
    try:
        for w in work:
            procs.append(daemon("org.apache.spark.deploy.worker.Worker", [
                "--host", "127.0.0.1", "--port", str(free_port()), "--webui-port",
                str(free_port()), "--cores", "1", "--memory", "1g", "--work-dir", str(w), url],
                tmp / f"{w.name}.log"))
        wait_for_workers(ui, 2, procs)
        yield url, ui, work
    finally:
        for p in reversed(procs):
            p.terminate()
        for p in reversed(procs):
            try:
                p.wait(timeout=30)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()


def package_zip(path: Path) -> Path:
    """etl/ and udfs/ as a zip for ``--py-files`` (what ``make dist`` builds)."""
    with zipfile.ZipFile(path, "w") as zf:
        for pkg in ("etl", "udfs"):
            for f in sorted((PROJECT_ROOT / pkg).rglob("*.py")):
                zf.write(f, f.relative_to(PROJECT_ROOT))
    return path


def delta_args() -> list[str]:
    """Local Delta jars when the Ivy cache has them (air-gapped style), else --packages."""
    jars = sorted(j for j in (Path.home() / ".ivy2.5.2" / "jars").glob("*.jar")
                  if j.name.startswith(("io.delta_", "org.antlr_")))  # not the S3 test's AWS SDK
    if any("delta-spark" in j.name for j in jars):
        return ["--jars", ",".join(map(str, jars))]
    return ["--packages", DELTA]


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
