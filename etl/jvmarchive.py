"""What ``make venv`` prepares so that a local driver JVM starts sooner: a class-data-sharing
(CDS) archive (~4 s) and the list of the Delta jars Maven resolved (~0.5 s of Ivy).

A Spark + Delta driver loads some 20,000 classes before its first job. A dynamic CDS archive
(JDK 13+) holds them already parsed and verified, mapped from one file. ``make venv`` builds
it once (``python -m etl.jvmarchive``): a small ingest + Delta workload runs in a fresh driver
JVM started with ``-XX:ArchiveClassesAtExit``. :func:`driver_options` then gives every
session that :func:`etl.spark.get_spark` builds ``-XX:SharedArchiveFile`` as the driver's
``spark.driver.defaultJavaOptions`` (``spark.conf`` may set that key itself, which wins).
The JVM checks the archive against its own build and class path and, when either changed,
starts as before without it (silently), so a stale archive costs only the saving.
``DFN_JVM_ARCHIVE`` names another archive file, or ``off``. A local driver (which runs the
tasks too) also gets the parallel garbage collector, under which the archive is built.

The same build writes the local paths of the jars ``spark.jars.packages`` resolved for this
delta-spark version beside the archive; :func:`delta_jars` hands them to ``spark.jars`` while
every one is still there, so the session skips Ivy's resolution (and Maven Central).
"""

from __future__ import annotations

import os
import re
import sys
import tempfile
from pathlib import Path

KEY = "spark.driver.defaultJavaOptions"
ENV = "DFN_JVM_ARCHIVE"
QUIET = "-Xlog:cds*=off"  # a mismatched archive is ignored without a warning on stdout
# local mode on 2 cores, vs G1: 16-pair ingest ~1 s and 1M-row metadata run 3-10 s sooner
LOCAL_GC = "-XX:+UseParallelGC"
JAVA_ENV = ("JAVA_TOOL_OPTIONS", "JDK_JAVA_OPTIONS", "_JAVA_OPTIONS", "PYSPARK_SUBMIT_ARGS")


def archive_path() -> Path | None:
    """Where the archive lives for this interpreter's pyspark (None when turned off)."""
    given = os.environ.get(ENV, "")
    if given == "off":
        return None
    if given:
        return Path(given)
    import pyspark

    return Path(sys.prefix) / "share" / "dfn-curate" / f"spark-{pyspark.__version__}.jsa"


def driver_options(local: bool = True, chosen: str = "") -> dict[str, str]:
    """``{spark.driver.defaultJavaOptions: ...}``: the archive when there is one and, for a
    ``local`` master (one JVM runs the driver and every task: batch throughput is what counts),
    the parallel collector, unless ``chosen`` (the Java options given) or the JVM's
    environment picks a collector already (two would stop the JVM); {} when neither applies."""
    opts = []
    path = archive_path()
    if path is not None and path.is_file():
        opts += [_option("-XX:SharedArchiveFile=", path), QUIET]
    if local and not gc_chosen(chosen):
        opts.append(LOCAL_GC)
    return {KEY: " ".join(opts)} if opts else {}


def gc_chosen(chosen: str = "") -> bool:
    """True when ``chosen``, the JVM's environment (``JAVA_ENV``, ``PYSPARK_SUBMIT_ARGS``) or
    Spark's ``spark-defaults.conf`` selects a garbage collector."""
    texts = [chosen, *(os.environ.get(k, "") for k in JAVA_ENV)]
    conf_dir = os.environ.get("SPARK_CONF_DIR") or (
        os.path.join(os.environ["SPARK_HOME"], "conf") if "SPARK_HOME" in os.environ else None)
    if conf_dir and (Path(conf_dir) / "spark-defaults.conf").is_file():
        texts.append((Path(conf_dir) / "spark-defaults.conf").read_text(errors="replace"))
    return any(re.search(r"-XX:\+Use\w+GC\b", t) for t in texts)


def jars_list_path(archive: Path | None = None) -> Path | None:
    """Where the build lists the Delta jars for this delta-spark: beside ``archive`` (default
    :func:`archive_path`; None when that is turned off)."""
    from importlib.metadata import version

    path = archive or archive_path()
    return None if path is None else path.with_name(f"delta-spark-{version('delta-spark')}.jars")


def delta_jars() -> list[str]:
    """The Delta jars (local paths) the build listed, or [] unless every one is still there."""
    path = jars_list_path()
    if path is None or not path.is_file():
        return []
    jars = path.read_text().split("\n")
    return jars if all(j and Path(j).is_file() for j in jars) else []


def _save_jars(spark, path: Path) -> None:
    """List the local jars Ivy resolved for ``spark`` (``spark.jars``) in ``path``."""
    from urllib.parse import unquote, urlparse

    from etl.fs import Store

    given = spark.sparkContext.getConf().get("spark.jars", "")
    jars = [unquote(urlparse(j).path) if j.startswith("file:") else j
            for j in given.split(",") if j]
    if jars and all(Path(j).is_file() for j in jars) and any("delta-spark" in j for j in jars):
        Store().write_bytes(str(path), "\n".join(jars).encode())  # temp file + rename


def _option(flag: str, path: Path) -> str:
    text = f"{flag}{path}"
    return f'"{text}"' if " " in text else text  # Spark splits these options like a shell


def build(path: Path | None = None) -> Path:
    """Run the workload in a new driver JVM that writes its loaded classes to ``path`` at exit.

    Must run in a process with no SparkSession yet (``python -m etl.jvmarchive``). The file is
    written beside ``path`` and moved into place once the JVM has exited, so a session
    starting meanwhile never maps a half-written archive.
    """
    from pyspark.sql import SparkSession

    from etl.config import SparkConf
    from etl.spark import get_spark

    path = path or archive_path()
    if path is None:
        raise ValueError(f"{ENV}=off: no archive to build")
    if SparkSession.getActiveSession() is not None:
        raise RuntimeError("a SparkSession is already running; build the archive in a new "
                           "process: python -m etl.jvmarchive")
    path.parent.mkdir(parents=True, exist_ok=True)
    part = path.with_name(f".{path.name}.{os.getpid()}")
    with tempfile.TemporaryDirectory(prefix="dfn-jvmarchive-") as tmp:
        spark = get_spark(SparkConf(conf={KEY: f"{_option('-XX:ArchiveClassesAtExit=', part)} "
                                           f"{QUIET} {'' if gc_chosen() else LOCAL_GC}"}),
                          preload_models=False)
        proc = spark.sparkContext._gateway.proc
        try:
            _save_jars(spark, jars_list_path(path))
            _workload(spark, Path(tmp))
        finally:
            spark.stop()
            proc.stdin.close()  # the gateway JVM exits on EOF and dumps the archive on exit
            proc.wait(timeout=600)
    if not part.is_file():
        raise RuntimeError(f"the JVM wrote no archive to {part} (exit status {proc.returncode})")
    os.replace(part, path)
    return path


def _workload(spark, tmp: Path) -> None:
    """What most jobs do: ingest shards (twice: new, then already present), then Delta
    MERGE, a window, a join, a Python UDF and the history, on a few hundred rows."""
    import yaml
    from pyspark.sql import Window
    from pyspark.sql import functions as F

    from etl.jobs.ingest import main as ingest
    from etl.sample import write_sample

    write_sample(str(tmp / "raw"), n_pairs=16, eval_size=4, shard_size=16)
    conf = tmp / "conf.yaml"
    conf.write_text(yaml.safe_dump({
        "lakehouse": {"root": str(tmp / "lake")},
        "ingest": {"sources": [{"format": "img2dataset", "path": str(tmp / "raw" / "pool")}],
                   "eval_sources": []}}))
    for _ in range(2):
        ingest(["--conf", str(conf)])
    rows = spark.range(400).select(F.col("id"), (F.col("id") % 7).alias("k"),
                                   F.rand(0).alias("score"))
    table = str(tmp / "t")
    rows.write.format("delta").save(table)
    rows.createOrReplaceTempView("upd")
    spark.sql(f"MERGE INTO delta.`{table}` t USING upd u ON t.id = u.id "
              "WHEN MATCHED THEN UPDATE SET * WHEN NOT MATCHED THEN INSERT *")
    ranked = spark.read.format("delta").load(table).withColumn(
        "r", F.row_number().over(Window.partitionBy("k").orderBy(F.desc("score"))))
    joined = ranked.join(rows.groupBy("k").agg(F.count("*").alias("n")), "k")
    joined.mapInPandas(lambda frames: frames, joined.schema).write.parquet(str(tmp / "p"))
    spark.sql(f"DESCRIBE HISTORY delta.`{table}`").collect()


if __name__ == "__main__":
    print(f"JVM class archive written to {build()}")
