"""The one place a SparkSession is obtained."""

from __future__ import annotations

import os
import sys

from pyspark.sql import SparkSession

from etl.config import SparkConf

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


def get_spark(conf: SparkConf | None = None) -> SparkSession:
    """Return the active SparkSession untouched, or build a local one with Delta configured.

    On Databricks or under spark-submit a session already exists and is used as is. Otherwise
    a session is built from ``conf``: Delta jars come from Maven (``configure_spark_with_delta_pip``)
    unless ``conf.jars`` lists local jar files (air-gapped clusters).
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
        if conf.master.startswith("local"):
            # workers fork from a daemon that has torch + open_clip imported already
            builder = builder.config("spark.python.daemon.module", "udfs.daemon")
    defaults = _unset(LOCAL_DEFAULTS) if submitted else LOCAL_DEFAULTS
    for key, value in {**defaults, **DELTA_CONF, **conf.conf}.items():
        builder = builder.config(key, value)
    if conf.jars:
        builder = builder.config("spark.jars", ",".join(conf.jars))
    elif not _delta_on_classpath():
        from delta import configure_spark_with_delta_pip

        builder = configure_spark_with_delta_pip(builder)
    spark = builder.getOrCreate()
    spark.sparkContext.setLogLevel(os.environ.get("DFN_SPARK_LOG_LEVEL", "ERROR"))
    return spark


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
