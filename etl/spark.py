"""The one place a SparkSession is obtained."""

from __future__ import annotations

import os
import sys
from collections.abc import Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from pyspark.sql import DataFrame, SparkSession
from pyspark.sql import types as T

from etl.config import SparkConf
from etl.fs import SCHEMES, ConnectorError, Store, local_path, scheme
from etl.jvmarchive import KEY, delta_jars, driver_options

DELTA_CONF = {
    "spark.sql.extensions": "io.delta.sql.DeltaSparkSessionExtension",
    "spark.sql.catalog.spark_catalog": "org.apache.spark.sql.delta.catalog.DeltaCatalog",
}

# Sensible for a laptop; every key can be overridden from spark.conf in YAML. Under spark-submit
# only the keys it did not set are applied, so `--conf` on the command line wins.
LOCAL_DEFAULTS = {
    "spark.ui.enabled": "false",
    "spark.ui.showConsoleProgress": "false",
    "spark.sql.shuffle.partitions": "8",
    "spark.default.parallelism": "4",
    "spark.databricks.delta.snapshotPartitions": "2",
    "spark.sql.execution.arrow.pyspark.enabled": "true",
    "spark.sql.execution.arrow.maxRecordsPerBatch": "256",
    "spark.sql.execution.arrow.maxBytesPerBatch": str(64 * 1024 * 1024),
    "spark.driver.memory": "4g",
    "spark.sql.session.timeZone": "UTC",
    "spark.databricks.delta.schema.autoMerge.enabled": "true",
}

# s3a out of the box retries for minutes against a wrong endpoint; these fail within seconds
# and name the endpoint, while still riding out a throttled or briefly unavailable store.
S3A_DEFAULTS = {
    "spark.hadoop.fs.s3a.attempts.maximum": "3",
    "spark.hadoop.fs.s3a.retry.limit": "3",
    "spark.hadoop.fs.s3a.retry.interval": "500ms",
    "spark.hadoop.fs.s3a.connection.establish.timeout": "15s",  # hadoop-aws 3.4 floor
    "spark.hadoop.fs.s3a.connection.timeout": "60s",
}


def get_spark(conf: SparkConf | None = None, urls: Iterable[str] = (),
              preload_models: bool = True) -> SparkSession:
    """Return the active SparkSession untouched, or build a local one with Delta configured.

    On Databricks or under spark-submit a session already exists and is used as is. Otherwise
    a session is built from ``conf``: Delta jars come from Maven (``configure_spark_with_delta_pip``)
    unless ``conf.jars`` lists local jar files (air-gapped clusters), or ``make venv`` listed
    the ones Maven gave it before (:func:`etl.jvmarchive.delta_jars`). When any of ``urls`` is
    ``s3a://``, ``hadoop-aws`` matching pyspark's bundled Hadoop is resolved the same way, and
    fail-fast s3a retry settings are added (each overridable). A driver JVM started here maps
    the class archive ``make venv`` built (:mod:`etl.jvmarchive`). ``preload_models`` forks local
    Python workers from ``udfs.daemon`` (torch + open_clip imported once); commands that run
    no model leave it off and skip that import (~7 s).
    """
    active = SparkSession.getActiveSession()
    if active is not None:
        return active
    conf = conf or SparkConf()
    # Python workers must run the same interpreter (the venv) as the driver.
    os.environ.setdefault("PYSPARK_PYTHON", sys.executable)
    os.environ.setdefault("PYSPARK_DRIVER_PYTHON", sys.executable)
    builder = SparkSession.builder.appName(conf.app_name)
    submitted = _launched_by_spark_submit()
    if not submitted:
        builder = builder.master(conf.master)
        if conf.master.startswith("local") and preload_models:
            # workers fork from a daemon that has torch + open_clip imported already
            builder = builder.config("spark.python.daemon.module", "udfs.daemon")
    s3a = any(scheme(u) == "s3a" for u in urls)
    wanted = {**LOCAL_DEFAULTS, **(S3A_DEFAULTS if s3a else {})}
    if not submitted:  # under spark-submit the driver JVM has started already
        java = " ".join(conf.conf.get(k, "") for k in ("spark.driver.extraJavaOptions", KEY))
        wanted.update(driver_options(conf.master.startswith("local"), java))
    defaults = _unset(wanted) if submitted else wanted
    for key, value in {**defaults, **DELTA_CONF, **conf.conf}.items():
        builder = builder.config(key, value)
    own = [j for j in conf.conf.get("spark.jars", "").split(",") if j]  # kept alongside
    if conf.jars:
        builder = builder.config("spark.jars", ",".join([*conf.jars, *own]))
    elif not _delta_on_classpath():
        listed = [] if s3a or submitted else delta_jars()
        if listed:  # what Ivy resolved at `make venv`: no resolution at each start
            builder = builder.config("spark.jars", ",".join([*listed, *own]))
        else:
            from delta import configure_spark_with_delta_pip

            extra = [f"org.apache.hadoop:hadoop-aws:{hadoop_version()}"] if s3a else []
            builder = configure_spark_with_delta_pip(builder, extra_packages=extra)
    spark = builder.getOrCreate()
    spark.sparkContext.setLogLevel(os.environ.get("DFN_SPARK_LOG_LEVEL", "ERROR"))
    return spark


def local_frame(spark: SparkSession, rows: Sequence[Sequence[Any] | Mapping[str, Any]],
                schema: T.StructType | str) -> DataFrame:
    """A DataFrame of a few rows (tuples, or dicts by field name) held on the driver, handed
    to Spark as one Arrow table.

    ``createDataFrame`` of a list of tuples goes through a Python RDD, so its first action
    starts a Python worker (~1 s on a cold local session); the Arrow table needs none.
    """
    import pyarrow as pa
    from pyspark.sql.pandas.types import to_arrow_schema

    if isinstance(schema, str):
        schema = T._parse_datatype_string(schema)
    arrow = to_arrow_schema(schema)
    if rows and isinstance(rows[0], Mapping):  # by name, a missing key is null (as Spark does)
        columns = [[r.get(name) for r in rows] for name in schema.fieldNames()]
    else:
        columns = list(zip(*rows, strict=True)) or [()] * len(arrow)
    table = pa.Table.from_arrays([pa.array(list(c), f.type) for c, f in zip(columns, arrow, strict=True)],
                                 schema=arrow)
    return spark.createDataFrame(table, schema)


@contextmanager
def session_conf(spark: SparkSession, values: dict[str, str]) -> Iterator[None]:
    """Set SQL confs for the block, then put back what was there (unset when nothing was)."""
    before = {k: spark.conf.get(k, None) for k in values}
    for key, value in values.items():
        spark.conf.set(key, value)
    try:
        yield
    finally:
        for key, value in before.items():
            if value is None:
                spark.conf.unset(key)
            else:
                spark.conf.set(key, value)


def _launched_by_spark_submit() -> bool:
    return "PYSPARK_GATEWAY_PORT" in os.environ or "SPARK_SUBMIT_OPTS" in os.environ


def _unset(defaults: dict[str, str]) -> dict[str, str]:
    """The defaults spark-submit (``--conf``, spark-defaults.conf) did not already set."""
    from pyspark import SparkConf as JvmConf
    from pyspark import SparkContext

    SparkContext._ensure_initialized()  # the gateway to spark-submit's JVM, holding its conf
    given = JvmConf()
    return {k: v for k, v in defaults.items() if not given.contains(k)}


def _delta_on_classpath() -> bool:
    """True when spark-submit was already given Delta (--packages / --jars)."""
    args = os.environ.get("PYSPARK_SUBMIT_ARGS", "")
    return "delta-spark" in args or "delta-core" in args


def hadoop_version() -> str:
    """The Hadoop version bundled in pyspark (hadoop-aws must match it exactly)."""
    import pyspark

    jars = sorted((Path(pyspark.__file__).parent / "jars").glob("hadoop-client-api-*.jar"))
    if not jars:
        raise RuntimeError("cannot find pyspark's bundled hadoop-client-api jar; set spark.jars "
                           "to local hadoop-aws + AWS SDK bundle jars")
    return jars[-1].name[len("hadoop-client-api-"):-len(".jar")]


def check_connectors(spark: SparkSession, urls: dict[str, str], reach: bool = True) -> None:
    """Fail before any work when a configured URL cannot be served.

    ``urls`` maps config keys to locations. For each remote one: Spark must have a Hadoop
    filesystem for its scheme, Python an fsspec one, and (``reach``) the store must answer, so
    wrong credentials or an unreachable endpoint stop the job here, naming key and endpoint.
    """
    store = Store.from_spark(spark)
    for key, url in urls.items():
        if local_path(url) is not None:
            continue
        _check_hadoop(spark, key, url)
        store.check(url, key)
        if reach:
            probe(store, key, url)


def _check_hadoop(spark: SparkSession, key: str, url: str) -> None:
    sch = scheme(url)
    try:
        jvm = spark.sparkContext._jvm
        hconf = spark.sparkContext._jsc.hadoopConfiguration()
    except Exception:  # noqa: BLE001 - Spark Connect: the server side is checked on first use
        return
    try:
        jvm.org.apache.hadoop.fs.FileSystem.getFileSystemClass(sch, hconf)
    except Exception as exc:  # noqa: BLE001 - py4j wraps UnsupportedFileSystemException
        connector = SCHEMES.get(sch, (None, None, "a Hadoop FileSystem for it"))[2]
        raise ConnectorError(
            f"{key}: Spark has no filesystem for URL scheme {sch!r} ({url}); add {connector} "
            f"to the cluster (spark.jars.packages / --packages, or spark.jars for local jars)"
            f"; {str(exc).splitlines()[0][:200]}") from exc


def probe(store: Store, key: str, url: str) -> None:
    """One cheap request against the store; errors name the key, the URL and the endpoint."""
    try:
        store.exists(url)
    except Exception as exc:  # noqa: BLE001 - any failure here is a config problem
        opts = store.options.get(SCHEMES.get(scheme(url), ("",))[0], {})
        endpoint = opts.get("client_kwargs", {}).get("endpoint_url", "the default endpoint")
        raise ConnectorError(
            f"{key}: cannot access {url} at {endpoint}: {type(exc).__name__}: "
            f"{str(exc).splitlines()[0][:300] if str(exc) else ''} (check "
            "spark.hadoop.fs.s3a.endpoint / access.key / secret.key under spark.conf, or the "
            "AWS_* environment variables)") from exc
