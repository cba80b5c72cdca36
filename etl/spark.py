"""The one place a SparkSession is obtained."""

from __future__ import annotations

import os
import socket
import sys
from collections.abc import Collection, Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from pyspark.sql import DataFrame, SparkSession
from pyspark.sql import types as T

from etl import compat
from etl.config import ConfigError, SparkConf
from etl.fs import SCHEMES, ConnectorError, Store, local_path, scheme
from etl.jvmarchive import KEY, delta_jars, driver_options, record_jars
from etl.redact import redact_text, redact_url

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
    # file listings (VACUUM's among them) run 10,000 tasks by default: a laptop needs few
    "spark.sql.sources.parallelPartitionDiscovery.parallelism": "8",
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


@dataclass(frozen=True)
class Launch:
    """How this Python process came to run, as far as the session factory cares."""

    submitted: bool = False  # spark-submit (or a pyspark shell) started the driver JVM already
    delta_given: bool = False  # spark-submit was handed Delta (--packages / --jars)


def launch(env: Mapping[str, str]) -> Launch:
    """Read :class:`Launch` from the process environment ``env`` (the one place that knows how
    spark-submit announces itself to the Python it starts)."""
    args = env.get("PYSPARK_SUBMIT_ARGS", "")
    return Launch(submitted="PYSPARK_GATEWAY_PORT" in env or "SPARK_SUBMIT_OPTS" in env,
                  delta_given="delta-spark" in args or "delta-core" in args)


def java_given(conf: SparkConf) -> str:
    """The driver Java options ``spark.conf`` sets itself (they decide the collector)."""
    return " ".join(conf.conf.get(k, "") for k in ("spark.driver.extraJavaOptions", KEY))


def session_options(conf: SparkConf, how: Launch, s3a: bool = False, preload_models: bool = True,
                    driver: Mapping[str, str] | None = None,
                    given: Collection[str] = ()) -> dict[str, str]:
    """Every Spark conf a new session is built with, ``spark.jars`` aside (:func:`jar_plan`).

    The laptop defaults (and, for ``s3a`` URLs, fail-fast s3a retries) minus the keys
    spark-submit was ``given`` already, so its ``--conf`` wins; ``driver`` (the driver JVM's
    options, :func:`etl.jvmarchive.driver_options`) only when no JVM has started yet; Delta's
    extension and catalog; then ``conf.conf``, which overrides everything. A local master
    started here with ``preload_models`` forks its Python workers from ``udfs.daemon``
    (torch + open_clip imported once).
    """
    opts: dict[str, str] = {}
    if not how.submitted and conf.master.startswith("local") and preload_models:
        opts["spark.python.daemon.module"] = "udfs.daemon"
    wanted = {**LOCAL_DEFAULTS, **(S3A_DEFAULTS if s3a else {}),
              **({} if how.submitted else dict(driver or {}))}
    opts.update({k: v for k, v in wanted.items() if k not in given})
    return {**opts, **DELTA_CONF, **conf.conf}


@dataclass(frozen=True)
class JarPlan:
    """Where a new session's jars come from: ``jars`` for ``spark.jars`` (None: leave it), or
    Maven through ``configure_spark_with_delta_pip`` (``maven``; ``hadoop_aws`` adds the
    ``hadoop-aws`` matching pyspark's Hadoop)."""

    jars: tuple[str, ...] | None = None
    maven: bool = False
    hadoop_aws: bool = False
    # a local driver (which runs every task) takes hadoop-aws and its SDK on its class path:
    # jars named in spark.jars are copied into every session's scratch folder (the SDK: ~0.6 GB)
    classpath: str | None = None


# hadoop-aws and what it brings; none is in Spark's own jars, so none can shadow one of them
S3A_ARTIFACTS = ("hadoop-aws-", "awssdk_bundle-", "analyticsaccelerator-s3-", "wildfly-openssl-")


def jar_plan(conf: SparkConf, how: Launch, s3a: bool = False,
             listed: Sequence[str] = ()) -> JarPlan:
    """Choose among the four jar sources, in order: ``conf.jars`` (local jars, air-gapped
    clusters); Delta handed to spark-submit already (nothing to add); the jars an earlier
    resolution ``listed`` (:func:`etl.jvmarchive.delta_jars`, Delta's, with hadoop-aws's for
    s3a: no Ivy resolution per start; hadoop-aws's on a local driver's class path, so no copy
    of them per session; not under spark-submit); else Maven. Jars that ``spark.conf`` lists under ``spark.jars`` are kept alongside local
    ones."""
    own = tuple(j for j in conf.conf.get("spark.jars", "").split(",") if j)
    if conf.jars:
        return JarPlan(jars=(*conf.jars, *own))
    if how.delta_given:
        return JarPlan()
    if listed and not how.submitted:
        local = conf.master.startswith("local") and not conf.remote
        aws = [j for j in listed if local and any(a in Path(j).name for a in S3A_ARTIFACTS)]
        rest = tuple(j for j in listed if j not in aws)
        if not aws:
            return JarPlan(jars=(*rest, *own))
        given = conf.conf.get("spark.driver.extraClassPath", "")
        return JarPlan(jars=(*rest, *own), classpath=os.pathsep.join([*aws, given] if given else aws))
    return JarPlan(maven=True, hadoop_aws=s3a)


def get_spark(conf: SparkConf | None = None, urls: Iterable[str] = (),
              preload_models: bool = True) -> SparkSession:
    """Return the active SparkSession untouched, or build one with Delta configured.

    On Databricks (classic or serverless) or under spark-submit a session already exists and is
    used as is. ``spark.remote`` (else ``SPARK_REMOTE``) ``sc://...`` attaches to a Spark
    Connect server (:func:`connect_session`). Otherwise a session is built from ``conf`` with
    :func:`session_options` and the jars of :func:`jar_plan` (``remote: local[N]``: the same,
    served over Spark Connect in this process); ``urls`` tell whether any is ``s3a://``. A
    driver JVM started here maps the class archive ``make venv`` built
    (:mod:`etl.jvmarchive`). ``preload_models`` off (commands that run no model) keeps torch
    and open_clip out of the Python workers.
    """
    active = SparkSession.getActiveSession()
    if active is not None:
        return active
    conf = conf or SparkConf()
    remote = conf.remote or os.environ.get("SPARK_REMOTE")
    if remote and remote.startswith("sc://"):
        return connect_session(conf, remote)
    # Python workers must run the same interpreter (the venv) as the driver.
    os.environ.setdefault("PYSPARK_PYTHON", sys.executable)
    os.environ.setdefault("PYSPARK_DRIVER_PYTHON", sys.executable)
    how = launch(os.environ)
    s3a = any(scheme(u) == "s3a" for u in urls)
    driver = {} if how.submitted else driver_options(conf.master.startswith("local"),
                                                     java_given(conf))
    given = compat.submitted_conf_keys() if how.submitted else frozenset()
    builder = SparkSession.builder.appName(conf.app_name)
    if remote:  # local[N] over Connect: pyspark starts the server here, with these options
        builder = builder.remote(remote)
    elif not how.submitted:  # under spark-submit the master is spark-submit's
        builder = builder.master(conf.master)
    for key, value in session_options(conf, how, s3a, preload_models, driver, given).items():
        builder = builder.config(key, value)
    plan = jar_plan(conf, how, s3a, delta_jars(s3a))
    spark = _with_jars(builder, plan).getOrCreate()
    if plan.maven and not (remote or how.submitted or conf.conf.get("spark.jars")):
        record_jars(spark.conf.get("spark.jars", ""), s3a)  # the next session skips Ivy
    compat.set_log_level(spark, os.environ.get("DFN_SPARK_LOG_LEVEL", "ERROR"))
    return spark


# Spark settings a Connect client can only ask the server about, never change: they are fixed
# when the server (the cluster) starts.
SERVER_ONLY = ("spark.jars", "spark.driver.", "spark.executor.", "spark.master", "spark.submit.",
               "spark.python.", "spark.ui.", "spark.sql.extensions", "spark.sql.warehouse.dir",
               "spark.sql.catalog.spark_catalog", "spark.serializer", "spark.default.parallelism",
               "spark.task.", "spark.memory.", "spark.local.dir", "spark.files",
               "spark.archives", "spark.pyspark.")


def connect_refusals(conf: SparkConf) -> list[str]:
    """What ``conf`` asks of a session that a Spark Connect client cannot do, each with what to
    do instead (empty: nothing)."""
    out = []
    if conf.jars:
        out.append("spark.jars lists local jars, which a Spark Connect client cannot add to the "
                   "server: install them on the server (cluster libraries, or --jars/--packages "
                   "of the Connect server) and remove spark.jars")
    for key in sorted(conf.conf):
        if key.startswith(SERVER_ONLY):
            out.append(f"spark.conf.{key} is fixed when the Spark Connect server starts and "
                       "cannot be set from a client: set it on the server (the cluster's Spark "
                       "config, or --conf of the Connect server) and remove it here")
    return out


def runtime_defaults() -> dict[str, str]:
    """The laptop defaults a client may set on a running server (SQL and Delta settings)."""
    return {k: v for k, v in LOCAL_DEFAULTS.items()
            if k.startswith(("spark.sql.", "spark.databricks.delta."))}


def connect_session(conf: SparkConf, remote: str) -> SparkSession:
    """A Spark Connect session on the server at ``remote`` (``sc://host:port[/;params]``).

    Refuses up front, before any write, what a client cannot do (:func:`connect_refusals`);
    fails within seconds, naming the URL, when no server listens. The project's SQL defaults
    are applied where the server allows them; each ``spark.conf`` key must take effect or the
    session is refused, naming the key."""
    refused = connect_refusals(conf)
    if refused:
        raise ConfigError("spark.remote is a Spark Connect URL, but: " + "; ".join(refused))
    check_remote_reachable(remote)
    builder = SparkSession.builder.remote(remote)
    for key, value in {**runtime_defaults(), **conf.conf}.items():
        builder = builder.config(key, value)
    try:
        spark = builder.getOrCreate()
    except Exception as exc:  # noqa: BLE001 - the client's words may repeat the URL's token
        raise ConfigError(redact_text(f"spark.remote: cannot open a Spark Connect session at "
                                      f"{remote}: {str(exc).splitlines()[0][:300]}")) from None
    ignored = [k for k, v in conf.conf.items() if spark.conf.get(k, None) != str(v)]
    if ignored:
        raise ConfigError(f"spark.conf: the Spark Connect server did not accept {', '.join(ignored)}"
                          "; set them on the server (the cluster's Spark config) instead")
    return spark


def _with_jars(builder: SparkSession.Builder, plan: JarPlan) -> SparkSession.Builder:
    if plan.classpath:
        builder = builder.config("spark.driver.extraClassPath", plan.classpath)
    if plan.jars is not None:
        return builder.config("spark.jars", ",".join(plan.jars))
    if not plan.maven:
        return builder
    from delta import configure_spark_with_delta_pip

    extra = [f"org.apache.hadoop:hadoop-aws:{hadoop_version()}"] if plan.hadoop_aws else []
    return configure_spark_with_delta_pip(builder, extra_packages=extra)


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
    try:  # pyspark >= 4.2 asks for the session time zone of timestamps; the project's is UTC
        arrow = to_arrow_schema(schema, timezone="UTC")
    except TypeError:
        arrow = to_arrow_schema(schema)
    if rows and isinstance(rows[0], Mapping):  # by name, a missing key is null (as Spark does)
        columns = [[r.get(name) for r in rows] for name in schema.fieldNames()]
    else:
        columns = list(zip(*rows, strict=True)) or [()] * len(arrow)
    table = pa.Table.from_arrays([pa.array(list(c), f.type) for c, f in zip(columns, arrow, strict=True)],
                                 schema=arrow)
    return spark.createDataFrame(table, schema)


@contextmanager
def session_conf(spark: SparkSession, values: dict[str, str]) -> Iterator[bool]:
    """Set SQL confs for the block (yields True), then put back what was there (unset when
    nothing was). A session that refuses one of them (Databricks serverless allows few) runs
    the block with none of them set: yields False."""
    before = {k: spark.conf.get(k, None) for k in values}
    done: list[str] = []
    try:
        for key, value in values.items():
            spark.conf.set(key, value)
            done.append(key)
    except Exception:  # noqa: BLE001 - CONFIG_NOT_AVAILABLE and the like
        _restore_conf(spark, before, done)
        done = []
    try:
        yield len(done) == len(values)
    finally:
        _restore_conf(spark, before, done)


def _restore_conf(spark: SparkSession, before: dict[str, str | None], keys: list[str]) -> None:
    for key in keys:
        try:
            if before[key] is None:
                spark.conf.unset(key)
            else:
                spark.conf.set(key, before[key])
        except Exception:  # noqa: BLE001 - restoring must not hide the block's own error
            pass


# What ties a process to this one's session: a child that inherits them attaches to this
# process's JVM gateway (spark-submit's) or Connect server instead of starting its own.
SESSION_ENV = ("PYSPARK_GATEWAY", "PYSPARK_SUBMIT_ARGS", "SPARK_CONNECT_MODE", "SPARK_REMOTE")


def child_env(drop: tuple[str, ...] = (), **extra: str) -> dict[str, str]:
    """This process's environment for a child that starts its own session: without
    :data:`SESSION_ENV` (and variables starting with ``drop``), plus ``extra``."""
    gone = SESSION_ENV + drop
    return {**{k: v for k, v in os.environ.items() if not k.startswith(gone)}, **extra}


def delta_coordinate() -> str:
    """The Maven coordinate of the Delta jar for the installed delta-spark and pyspark, as
    ``configure_spark_with_delta_pip`` names it: per Spark line from Delta 4.3 on
    (``io.delta:delta-spark_4.1_2.13:4.3.1``), ``delta-spark_2.13`` before."""
    from importlib.metadata import version

    import pyspark

    delta = version("delta-spark")
    major, minor = (int(x) for x in delta.split(".")[:2])
    line = ".".join(pyspark.__version__.split(".")[:2]) + "_" if (major, minor) >= (4, 3) else ""
    return f"io.delta:delta-spark_{line}2.13:{delta}"


def hadoop_version() -> str:
    """The Hadoop version bundled in pyspark (hadoop-aws must match it exactly)."""
    import pyspark

    jars = sorted((Path(pyspark.__file__).parent / "jars").glob("hadoop-client-api-*.jar"))
    if not jars:
        raise RuntimeError("cannot find pyspark's bundled hadoop-client-api jar; set spark.jars "
                           "to local hadoop-aws + AWS SDK bundle jars")
    return jars[-1].name[len("hadoop-client-api-"):-len(".jar")]


def unity_catalog_only(spark: SparkSession) -> bool:
    """Whether the session says tables must be catalog names: Unity Catalog enabled on a Spark
    Connect session (Databricks serverless, and standard/shared access mode clusters), where
    path-addressed tables are refused."""
    enabled = str(spark.conf.get("spark.databricks.unityCatalog.enabled", "false")).lower()
    return enabled == "true" and compat.is_connect(spark)


def check_catalog(spark: SparkSession, schema: str | None) -> None:
    """Refuse, before any write, a folder lakehouse (no ``lakehouse.schema``: tables addressed
    by path) on a session that is Unity Catalog only (:func:`unity_catalog_only`)."""
    if schema is None and unity_catalog_only(spark):
        raise ConfigError(
            "lakehouse.schema: this session is Unity Catalog only, where Delta tables addressed "
            "by path are refused; set lakehouse.catalog and lakehouse.schema (tables become "
            "catalog.schema.table) and keep lakehouse.root for files, on a Volume "
            "(/Volumes/<catalog>/<schema>/<volume>/...)")


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
    missing = compat.missing_filesystem(spark, url)
    if missing is not None:
        sch = scheme(url)
        connector = SCHEMES.get(sch, (None, None, "a Hadoop FileSystem for it"))[2]
        raise ConnectorError(redact_text(
            f"{key}: Spark has no filesystem for URL scheme {sch!r} ({url}); add {connector} "
            f"to the cluster (spark.jars.packages / --packages, or spark.jars for local jars)"
            f"; {missing}"))


def probe(store: Store, key: str, url: str) -> None:
    """One cheap request against the store; errors name the key, the URL and the endpoint."""
    try:
        store.exists(url)
    except Exception as exc:  # noqa: BLE001 - any failure here is a config problem
        opts = store.options.get(SCHEMES.get(scheme(url), ("",))[0], {})
        endpoint = opts.get("client_kwargs", {}).get("endpoint_url", "the default endpoint")
        raise ConnectorError(redact_text(
            f"{key}: cannot access {url} at {endpoint}: {type(exc).__name__}: "
            f"{str(exc).splitlines()[0][:300] if str(exc) else ''} (check "
            "spark.hadoop.fs.s3a.endpoint / access.key / secret.key under spark.conf, or the "
            "AWS_* environment variables)")) from None  # the cause may repeat a signed URL


def check_remote_reachable(url: str, timeout: float = 5.0) -> None:
    """Fail within ``timeout`` seconds, naming the URL, when nothing listens at an ``sc://``
    URL (the Connect client would otherwise retry for minutes)."""
    parts = urlsplit(url.split(";", 1)[0])
    host, port = parts.hostname or "localhost", parts.port or 15002
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return
    except OSError as exc:
        raise ConfigError(f"spark.remote: cannot reach the Spark Connect server at "
                          f"{redact_url(url)} ({host}:{port}): {exc}; start it, or fix "
                          "spark.remote / SPARK_REMOTE") from None
