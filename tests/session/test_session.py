"""The session factory's parts: its decisions (how the process was launched, the session
options, where the jars come from), the driver JVM's class-data-sharing archive (built by `make
venv`, mapped by get_spark's sessions, ignored without a word when it does not fit the JVM),
the Delta jars that build listed (no Ivy resolution per session) and local_frame (driver-side
rows handed to Spark as Arrow)."""

from __future__ import annotations

import os
import subprocess
import sys
from datetime import datetime
from pathlib import Path
from urllib.parse import quote

import pytest
from pyspark.sql import types as T

from etl import jvmarchive
from etl.config import SparkConf
from etl.jobs.build_archive import archive_options
from etl.spark import (
    DELTA_CONF,
    LOCAL_DEFAULTS,
    S3A_DEFAULTS,
    JarPlan,
    Launch,
    jar_plan,
    java_given,
    launch,
    local_frame,
    session_options,
)
from tests.helpers.frames import assert_same_rows

PROJECT_ROOT = Path(__file__).resolve().parents[2]

SESSION = """
from etl.config import SparkConf
from etl.spark import get_spark
s = get_spark(SparkConf(conf={"spark.driver.extraJavaOptions": %r}), preload_models=False)
print("count", s.range(3).count())
print("options", s.sparkContext.getConf().get("spark.driver.defaultJavaOptions", ""))
beans = s.sparkContext._jvm.java.lang.management.ManagementFactory.getGarbageCollectorMXBeans()
print("collectors", [b.getName() for b in beans])
s.range(3).write.format("delta").save("delta-table")
print("delta rows", s.read.format("delta").load("delta-table").count())
"""
IVY = "resolving dependencies"  # what spark-submit prints while Ivy resolves --packages


def _session(tmp_path: Path, extra: str, env: dict[str, str]) -> str:
    """Start a fresh local session in a new Python (and so a new driver JVM); its output."""
    env = {**os.environ, "PYTHONPATH": str(PROJECT_ROOT), **env}
    for var in ("PYSPARK_GATEWAY_PORT", "PYSPARK_SUBMIT_ARGS", *jvmarchive.JAVA_ENV):
        env.pop(var, None)  # the session as a plain shell would start it
    done = subprocess.run([sys.executable, "-c", SESSION % extra], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    return done.stdout + done.stderr


def test_launch_reads_spark_submit_from_the_environment():
    assert launch({}) == Launch(submitted=False, delta_given=False)
    assert launch({"PYSPARK_GATEWAY_PORT": "4040"}).submitted
    assert launch({"SPARK_SUBMIT_OPTS": "-Dx=1"}).submitted
    given = launch({"PYSPARK_SUBMIT_ARGS": "--packages io.delta:delta-spark_4.1_2.13:4.3.1 pyspark-shell"})
    assert given == Launch(submitted=False, delta_given=True)  # plain python handed --packages
    assert launch({"PYSPARK_SUBMIT_ARGS": "--jars /x/delta-core_2.12.jar"}).delta_given
    assert not launch({"PYSPARK_SUBMIT_ARGS": "--master local[2] pyspark-shell"}).delta_given


def test_a_session_started_here_gets_defaults_driver_options_and_the_model_daemon():
    conf = SparkConf(conf={"spark.sql.shuffle.partitions": "2"})
    driver = {jvmarchive.KEY: jvmarchive.LOCAL_GC}
    opts = session_options(conf, Launch(), driver=driver)
    assert opts["spark.python.daemon.module"] == "udfs.daemon"
    assert opts[jvmarchive.KEY] == jvmarchive.LOCAL_GC
    assert opts["spark.sql.shuffle.partitions"] == "2"  # spark.conf wins over the defaults
    assert {k: opts[k] for k in DELTA_CONF} == DELTA_CONF
    assert not set(S3A_DEFAULTS) & set(opts)
    assert S3A_DEFAULTS.items() <= session_options(conf, Launch(), s3a=True).items()
    assert "spark.python.daemon.module" not in session_options(conf, Launch(),
                                                              preload_models=False)
    remote = SparkConf(master="spark://host:7077")
    assert "spark.python.daemon.module" not in session_options(remote, Launch())


def test_under_spark_submit_its_own_conf_wins_and_the_jvm_is_left_alone():
    given = {"spark.driver.memory", "spark.sql.shuffle.partitions"}
    opts = session_options(SparkConf(), Launch(submitted=True),
                           driver={jvmarchive.KEY: jvmarchive.LOCAL_GC}, given=given)
    assert not given & set(opts) and jvmarchive.KEY not in opts  # the JVM runs already
    assert "spark.python.daemon.module" not in opts
    assert opts["spark.ui.enabled"] == LOCAL_DEFAULTS["spark.ui.enabled"]
    mine = SparkConf(conf={"spark.driver.memory": "9g"})  # spark.conf still wins over all
    assert session_options(mine, Launch(submitted=True), given=given)["spark.driver.memory"] == "9g"


def test_java_options_given_in_spark_conf_are_read_for_the_collector_choice():
    conf = SparkConf(conf={"spark.driver.extraJavaOptions": "-XX:+UseG1GC",
                           jvmarchive.KEY: "-Xss4m"})
    assert java_given(conf) == "-XX:+UseG1GC -Xss4m"
    assert java_given(SparkConf()).strip() == ""


def test_jar_plan_takes_the_first_source_that_applies():
    listed = ["/ivy/delta-spark.jar", "/ivy/delta-storage.jar"]
    own = SparkConf(conf={"spark.jars": "/mine/a.jar,/mine/b.jar"})
    local = SparkConf(jars=["/air/delta-spark.jar"], conf=own.conf)
    assert jar_plan(local, Launch(), listed=listed) == JarPlan(
        jars=("/air/delta-spark.jar", "/mine/a.jar", "/mine/b.jar"))  # conf.jars, own kept
    assert jar_plan(own, Launch(delta_given=True), listed=listed) == JarPlan()  # spark-submit's
    assert jar_plan(own, Launch(), listed=listed) == JarPlan(jars=(*listed, "/mine/a.jar",
                                                                   "/mine/b.jar"))
    assert jar_plan(own, Launch(), s3a=True) == JarPlan(maven=True, hadoop_aws=True)
    aws = ["/ivy/org.apache.hadoop_hadoop-aws-3.4.2.jar", "/ivy/software.amazon.awssdk_bundle-2.2.jar",
           "/ivy/x_analyticsaccelerator-s3-1.2.1.jar", "/ivy/org.wildfly.openssl_wildfly-openssl-2.1.jar"]
    with_aws = [*listed, *aws]
    assert jar_plan(SparkConf(), Launch(), s3a=True, listed=with_aws) == JarPlan(  # local driver
        jars=tuple(listed), classpath=os.pathsep.join(aws))
    mine = SparkConf(conf={"spark.driver.extraClassPath": "/x/y.jar"})
    assert jar_plan(mine, Launch(), s3a=True, listed=with_aws).classpath == os.pathsep.join(
        [*aws, "/x/y.jar"])
    cluster = SparkConf(master="spark://h:7077")  # executors elsewhere need every jar
    assert jar_plan(cluster, Launch(), s3a=True, listed=with_aws) == JarPlan(jars=tuple(with_aws))
    assert jar_plan(own, Launch(submitted=True), listed=listed) == JarPlan(maven=True)
    assert jar_plan(SparkConf(), Launch()) == JarPlan(maven=True)  # nothing listed: Maven


def test_the_archive_build_dumps_classes_under_the_sessions_collector(tmp_path, monkeypatch):
    for var in jvmarchive.JAVA_ENV:
        monkeypatch.delenv(var, raising=False)
    monkeypatch.delenv("SPARK_CONF_DIR", raising=False)
    monkeypatch.delenv("SPARK_HOME", raising=False)
    opts = archive_options(tmp_path / "a b" / "part.jsa")
    assert f'"-XX:ArchiveClassesAtExit={tmp_path / "a b" / "part.jsa"}"' in opts
    assert jvmarchive.QUIET in opts and jvmarchive.LOCAL_GC in opts
    monkeypatch.setenv("JAVA_TOOL_OPTIONS", "-XX:+UseSerialGC")
    assert jvmarchive.LOCAL_GC not in archive_options(tmp_path / "part.jsa")


def test_driver_options_name_the_archive_only_when_it_exists(tmp_path, monkeypatch):
    archive = tmp_path / "a b" / "spark.jsa"
    monkeypatch.setenv(jvmarchive.ENV, str(archive))
    assert jvmarchive.driver_options(local=False) == {}
    archive.parent.mkdir()
    archive.write_bytes(b"x")
    opts = jvmarchive.driver_options(local=False)[jvmarchive.KEY]
    assert f'"-XX:SharedArchiveFile={archive}"' in opts  # quoted: the path has a space
    assert jvmarchive.QUIET in opts and jvmarchive.LOCAL_GC not in opts
    monkeypatch.setenv(jvmarchive.ENV, "off")
    assert jvmarchive.archive_path() is None and jvmarchive.driver_options(local=False) == {}


def test_a_local_driver_gets_the_parallel_collector_unless_one_is_chosen(tmp_path, monkeypatch):
    monkeypatch.setenv(jvmarchive.ENV, "off")
    monkeypatch.delenv("SPARK_CONF_DIR", raising=False)
    monkeypatch.delenv("SPARK_HOME", raising=False)
    for var in jvmarchive.JAVA_ENV:
        monkeypatch.delenv(var, raising=False)
    assert jvmarchive.driver_options() == {jvmarchive.KEY: jvmarchive.LOCAL_GC}
    assert jvmarchive.driver_options(chosen="-Xss4m -XX:+UseG1GC") == {}  # two would clash
    assert jvmarchive.driver_options(chosen="-XX:+UseZGC -Xmx2g") == {}
    assert jvmarchive.driver_options(chosen="-XX:+PrintGCDetails") != {}  # not a collector
    monkeypatch.setenv("JAVA_TOOL_OPTIONS", "-XX:+UseSerialGC")
    assert jvmarchive.driver_options() == {}
    monkeypatch.delenv("JAVA_TOOL_OPTIONS")
    conf_dir = tmp_path / "conf"
    conf_dir.mkdir()
    (conf_dir / "spark-defaults.conf").write_text(
        "spark.driver.extraJavaOptions -XX:+UseG1GC -Xss4m\n")
    monkeypatch.setenv("SPARK_CONF_DIR", str(conf_dir))
    assert jvmarchive.driver_options() == {}


@pytest.mark.slow
def test_a_session_maps_spark_classes_from_the_archive_make_venv_built(tmp_path):
    archive = jvmarchive.archive_path()
    if archive is None or not archive.is_file():
        pytest.fail(f"no JVM class archive at {archive}: `make venv` builds it "
                    "(python -m etl.jobs.build_archive)")
    log = tmp_path / "classes.log"
    out = _session(tmp_path, f"-Xlog:class+load=info:file={log}", {})
    assert "count 3" in out and f"SharedArchiveFile={archive}" in out
    assert "PS Scavenge" in out  # the parallel collector the archive was built under
    loaded = [line for line in log.read_text().splitlines()
              if " org.apache.spark.SparkContext " in line]
    assert loaded and "shared objects file (top)" in loaded[0], loaded


@pytest.mark.slow
def test_an_archive_that_does_not_fit_is_ignored_silently(tmp_path):
    junk = tmp_path / "junk.jsa"
    junk.write_bytes(os.urandom(4096))
    out = _session(tmp_path, "-Dx=1", {jvmarchive.ENV: str(junk)})
    assert "count 3" in out and f"SharedArchiveFile={junk}" in out
    assert "[cds" not in out and "shared archive" not in out.lower()


def test_delta_jars_are_listed_only_while_every_one_is_there(tmp_path, monkeypatch):
    monkeypatch.setenv(jvmarchive.ENV, str(tmp_path / "spark.jsa"))
    listed = jvmarchive.jars_list_path()
    assert listed.parent == tmp_path and listed.name.startswith("delta-spark-")
    assert jvmarchive.delta_jars() == []
    jars = [tmp_path / "a.jar", tmp_path / "b c.jar"]
    for jar in jars:
        jar.write_bytes(b"PK")
    listed.write_text("\n".join(map(str, jars)))
    assert jvmarchive.delta_jars() == [str(j) for j in jars]
    jars[1].unlink()  # e.g. the Ivy cache was cleared: resolve again rather than fail
    assert jvmarchive.delta_jars() == []


def test_a_resolved_session_lists_its_jars_for_the_next_one(tmp_path, monkeypatch):
    monkeypatch.setenv(jvmarchive.ENV, str(tmp_path / "spark.jsa"))
    delta, storage, aws, sdk = (tmp_path / "ivy jars" / n for n in (
        "io.delta_delta-spark_2.13-4.0.0.jar", "io.delta_delta-storage-4.0.0.jar",
        "org.apache.hadoop_hadoop-aws-3.4.1.jar", "software.amazon.awssdk_bundle-2.29.52.jar"))
    delta.parent.mkdir()
    for jar in (delta, storage, aws, sdk):
        jar.write_bytes(b"PK")
    given = ",".join(f"file://{quote(str(j))}" for j in (delta, storage, aws, sdk))
    assert not jvmarchive.record_jars(f"file://{quote(str(delta))}", s3a=True)  # no hadoop-aws
    assert jvmarchive.delta_jars(s3a=True) == []
    assert jvmarchive.record_jars(given, s3a=True)
    assert jvmarchive.delta_jars(s3a=True) == [str(j) for j in (delta, storage, aws, sdk)]
    assert jvmarchive.delta_jars() == []  # the plain list is another file
    assert not jvmarchive.record_jars(given + ",file:///gone/x.jar")  # every jar must be there
    assert jvmarchive.record_jars(given) and len(jvmarchive.delta_jars()) == 4
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".")) == []


@pytest.mark.slow
def test_a_session_takes_delta_from_the_listed_jars_without_resolving(tmp_path):
    jars = jvmarchive.delta_jars()
    if not jars:
        pytest.fail(f"no Delta jar list at {jvmarchive.jars_list_path()}: `make venv` writes it "
                    "(python -m etl.jobs.build_archive)")
    out = _session(tmp_path, "-Dx=1", {})
    assert "delta rows 3" in out and IVY not in out
    moved = tmp_path / "elsewhere" / "spark.jsa"  # no archive, no list: Maven via Ivy as before
    moved.parent.mkdir()
    out = _session(moved.parent, "-Dx=1", {jvmarchive.ENV: str(moved)})
    assert "delta rows 3" in out and IVY in out


def test_local_frame_holds_the_rows_create_dataframe_would(spark):
    schema = T.StructType([
        T.StructField("s", T.StringType(), False), T.StructField("n", T.LongType()),
        T.StructField("x", T.DoubleType()), T.StructField("t", T.TimestampType())])
    rows = [("a", 1, 0.5, datetime(2026, 1, 2, 3, 4, 5)), ("é'\n", None, None, None),
            ("", -(2**63), float("inf"), datetime(1970, 1, 1))]
    got = local_frame(spark, rows, schema)
    assert got.schema == schema
    assert_same_rows(got, spark.createDataFrame(rows, schema))
    by_name = [{"s": "b", "t": None, "x": 2.0}, {"n": 3, "s": "c", "extra": "ignored"}]
    assert_same_rows(local_frame(spark, by_name, schema), spark.createDataFrame(by_name, schema))
    empty = local_frame(spark, [], "cluster int, _parts int")
    assert empty.columns == ["cluster", "_parts"] and empty.count() == 0
    with pytest.raises(ValueError):
        local_frame(spark, [("a", 1)], schema)  # a row narrower than the schema
