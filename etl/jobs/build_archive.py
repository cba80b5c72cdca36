"""Job: build the driver JVM's class-data-sharing archive and list the Delta jars
(``python -m etl.jobs.build_archive``; ``make venv`` runs it once).

A small ingest + Delta workload runs in a fresh driver JVM started with
``-XX:ArchiveClassesAtExit``; the classes it loaded are written to the archive when the JVM
exits. The Delta jars Ivy resolved for the session are listed beside it. Where both live, and
how sessions use them, is :mod:`etl.jvmarchive`'s (the lookup side, which the session factory
imports: this build sits on top of the jobs instead).
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

from pyspark.sql import SparkSession

from etl import jvmarchive as jvm

COMMAND = "python -m etl.jobs.build_archive"


def archive_options(part: Path) -> str:
    """The driver Java options of the build: dump the loaded classes to ``part`` at exit,
    quietly, under the collector sessions will use (unless one is chosen already)."""
    return (f"{jvm.java_option('-XX:ArchiveClassesAtExit=', part)} {jvm.QUIET} "
            f"{'' if jvm.gc_chosen() else jvm.LOCAL_GC}")


def build(path: Path | None = None) -> Path:
    """Run the workload in a new driver JVM that writes its loaded classes to ``path`` at exit.

    Must run in a process with no SparkSession yet (:data:`COMMAND`). The file is written
    beside ``path`` and moved into place once the JVM has exited, so a session starting
    meanwhile never maps a half-written archive.
    """
    from etl.config import SparkConf
    from etl.spark import get_spark

    path = path or jvm.archive_path()
    if path is None:
        raise ValueError(f"{jvm.ENV}=off: no archive to build")
    if SparkSession.getActiveSession() is not None:
        raise RuntimeError(f"a SparkSession is already running; build the archive in a new "
                           f"process: {COMMAND}")
    path.parent.mkdir(parents=True, exist_ok=True)
    part = path.with_name(f".{path.name}.{os.getpid()}")
    with tempfile.TemporaryDirectory(prefix="dfn-jvmarchive-") as tmp:
        spark = get_spark(SparkConf(conf={jvm.KEY: archive_options(part)}), preload_models=False)
        proc = spark.sparkContext._gateway.proc
        try:
            jvm.record_jars(spark.sparkContext.getConf().get("spark.jars", ""),
                            path=jvm.jars_list_path(path))
            workload(spark, Path(tmp))
        finally:
            spark.stop()
            proc.stdin.close()  # the gateway JVM exits on EOF and dumps the archive on exit
            proc.wait(timeout=600)
    if not part.is_file():
        raise RuntimeError(f"the JVM wrote no archive to {part} (exit status {proc.returncode})")
    os.replace(part, path)
    return path


def workload(spark: SparkSession, tmp: Path) -> None:
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


def main() -> None:
    """Build the archive (and the jar list) where :func:`etl.jvmarchive.archive_path` says."""
    print(f"JVM class archive written to {build()}")


if __name__ == "__main__":
    main()
