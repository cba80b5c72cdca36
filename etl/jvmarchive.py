"""A class-data-sharing (CDS) archive that makes a local driver JVM start ~4 s sooner.

A Spark + Delta driver loads some 20,000 classes before its first job. A dynamic CDS archive
(JDK 13+) holds them already parsed and verified, mapped from one file. ``make venv`` builds
it once (``python -m etl.jvmarchive``): a small ingest + Delta workload runs in a fresh driver
JVM started with ``-XX:ArchiveClassesAtExit``. :func:`driver_options` then gives every
session that :func:`etl.spark.get_spark` builds ``-XX:SharedArchiveFile`` as the driver's
``spark.driver.defaultJavaOptions`` (``spark.conf`` may set that key itself, which wins).
The JVM checks the archive against its own build and class path and, when either changed,
starts as before without it (silently), so a stale archive costs only the saving.
``DFN_JVM_ARCHIVE`` names another archive file, or ``off``.
"""

from __future__ import annotations

import os
import sys
import tempfile
from pathlib import Path

KEY = "spark.driver.defaultJavaOptions"
ENV = "DFN_JVM_ARCHIVE"
QUIET = "-Xlog:cds*=off"  # a mismatched archive is ignored without a warning on stdout


def archive_path() -> Path | None:
    """Where the archive lives for this interpreter's pyspark (None when turned off)."""
    given = os.environ.get(ENV, "")
    if given == "off":
        return None
    if given:
        return Path(given)
    import pyspark

    return Path(sys.prefix) / "share" / "dfn-curate" / f"spark-{pyspark.__version__}.jsa"


def driver_options() -> dict[str, str]:
    """``{spark.driver.defaultJavaOptions: ...}`` mapping the archive, or {} when there is none."""
    path = archive_path()
    if path is None or not path.is_file():
        return {}
    return {KEY: f"{_option('-XX:SharedArchiveFile=', path)} {QUIET}"}


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
                                           f"{QUIET}"}), preload_models=False)
        proc = spark.sparkContext._gateway.proc
        try:
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
