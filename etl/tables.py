"""Delta table locations and the few write patterns every step uses.

Tables live either under a folder (``lakehouse.root``, addressed as ``delta.`/path```) or in a
metastore (``catalog.schema.table``), chosen by config. Steps never build paths themselves.
"""

from __future__ import annotations

import uuid
from datetime import datetime, timezone
from pathlib import Path

from delta.tables import DeltaTable
from pyspark.sql import DataFrame, SparkSession
from pyspark.sql import functions as F
from pyspark.sql import types as T

from etl.config import LakehouseConf
from etl.fs import Store, is_url

BRONZE = "bronze_pairs"
QUARANTINE = "quarantine"
EVAL_IMAGES = "bronze_eval_images"
SILVER = "silver_scores"
EVAL_EMBEDDINGS = "silver_eval_embeddings"
DEDUP = "silver_dedup"
SELECTION = "gold_selection"
GOLD = "gold_pairs"
RUN_STATS = "run_stats"
EVALUATION = "gold_evaluation"

RUN_STATS_SCHEMA = T.StructType([
    T.StructField("run_id", T.StringType(), False),
    T.StructField("step", T.StringType(), False),
    T.StructField("metric", T.StringType(), False),
    T.StructField("value", T.LongType(), True),
    T.StructField("recorded_at", T.TimestampType(), False),
])


class Lakehouse:
    """Names, reads and writes of the project's Delta tables."""

    def __init__(self, spark: SparkSession, conf: LakehouseConf, store: Store | None = None):
        self.spark = spark
        self.conf = conf
        self._store = store

    @property
    def store(self) -> Store:
        """Python file access for this lakehouse's URLs, with the session's credentials."""
        if self._store is None:
            self._store = Store.from_spark(self.spark)
        return self._store

    @property
    def root(self) -> str:
        """The root as given when it is a URL (``s3a://``, ``abfss://``, ``dbfs:``), else absolute."""
        root = self.conf.root
        return root.rstrip("/") if is_url(root) else str(Path(root).expanduser().resolve())

    def under(self, *parts: str) -> str:
        """A location below the root (URL-safe join)."""
        return "/".join([self.root, *parts])

    def resolve(self, path: str) -> str:
        """A configured location: a URL or absolute path as is, a relative one under the root."""
        if is_url(path) or Path(path).expanduser().is_absolute():
            return path if is_url(path) else str(Path(path).expanduser())
        return self.under(path)

    def path(self, table: str) -> str:
        """Filesystem location of ``table`` (folder mode only)."""
        return self.under(table)

    def name(self, table: str) -> str:
        """SQL name of ``table``: ``catalog.schema.table`` or ``delta.`/path```."""
        if self.conf.schema:
            prefix = f"{self.conf.catalog}." if self.conf.catalog else ""
            return f"{prefix}{self.conf.schema}.{table}"
        return f"delta.`{self.path(table)}`"

    def exists(self, table: str) -> bool:
        if self.conf.schema:
            return self.spark.catalog.tableExists(self.name(table))
        return DeltaTable.isDeltaTable(self.spark, self.path(table))

    def read(self, table: str) -> DataFrame:
        """The table as a DataFrame; a clear error if it was never written."""
        if not self.exists(table):
            raise FileNotFoundError(
                f"Delta table {self.name(table)} does not exist yet; run the step that writes it "
                f"(e.g. `dfn-curate run`) first")
        return self.spark.table(self.name(table))

    def delta(self, table: str) -> DeltaTable:
        if self.conf.schema:
            return DeltaTable.forName(self.spark, self.name(table))
        return DeltaTable.forPath(self.spark, self.path(table))

    def version(self, table: str) -> int | None:
        """Latest Delta version of ``table`` (None if absent)."""
        if not self.exists(table):
            return None
        return self.delta(table).history(1).select("version").first()[0]

    def overwrite(self, df: DataFrame, table: str, partition_by: list[str] | None = None) -> None:
        """Atomically replace ``table`` with ``df`` (schema replaced too)."""
        writer = df.write.format("delta").mode("overwrite").option("overwriteSchema", "true")
        if partition_by:
            writer = writer.partitionBy(*partition_by)
        self._save(writer, table)

    def append(self, df: DataFrame, table: str) -> None:
        self._save(df.write.format("delta").mode("append").option("mergeSchema", "true"), table)

    def _save(self, writer, table: str) -> None:
        if self.conf.schema:
            writer.saveAsTable(self.name(table))
        else:
            writer.save(self.path(table))

    def insert_new(self, df: DataFrame, table: str, keys: list[str]) -> int:
        """Insert-only MERGE of ``df`` on ``keys``; returns the number of rows inserted.

        Rows whose keys already exist are left untouched, so re-running a step never duplicates
        rows. The first write creates the table with a plain append (nothing to match against:
        no MERGE, which on a small input costs more than the data).
        """
        if not self.exists(table):
            self.append(df, table)
            return _rows_added(self.delta(table), None, "numOutputRows")
        before = self.version(table)
        cond = " AND ".join(f"t.`{k}` <=> s.`{k}`" for k in keys)
        (self.delta(table).alias("t").merge(df.alias("s"), cond)
            .whenNotMatchedInsertAll().execute())
        # a MERGE that changes nothing commits no new version
        return _rows_added(self.delta(table), before, "numTargetRowsInserted", "MERGE")

    def append_once(self, df: DataFrame, table: str, app_id: str, version: int) -> int:
        """Append ``df`` unless ``(app_id, version)`` was committed to ``table`` before; rows added.

        Delta's idempotent writes (``txnAppId``/``txnVersion``) skip a replayed write, so a
        streaming chunk re-run after a crash is not added twice, and no commit reads the table
        (its cost does not grow with the table, unlike a MERGE).
        """
        before = self.version(table)
        writer = (df.write.format("delta").mode("append").option("mergeSchema", "true")
                  .option("txnAppId", app_id).option("txnVersion", version))
        self._save(writer, table)
        return _rows_added(self.delta(table), before, "numOutputRows")

    def record_stats(self, run_id: str, step: str, counts: dict[str, int]) -> None:
        """Append one row per metric to the run-stats table."""
        now = datetime.now(timezone.utc).replace(tzinfo=None)
        rows = [(run_id, step, k, int(v), now) for k, v in counts.items()]
        self.append(self.spark.createDataFrame(rows, RUN_STATS_SCHEMA), RUN_STATS)


def _rows_added(table: DeltaTable, before: int | None, metric: str,
                operation: str | None = None) -> int:
    """``metric`` of the table's last commit; 0 when nothing was committed after ``before`` (or
    the last commit is not ``operation``)."""
    last = table.history(1).select("version", "operation", "operationMetrics").first()
    if last is None or last[0] == before or (operation and last[1] != operation):
        return 0
    return int(last[2].get(metric, "0"))


def new_run_id() -> str:
    """A sortable, unique id for one job run."""
    return datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%S") + "-" + uuid.uuid4().hex[:8]


def with_ingest_time(df: DataFrame) -> DataFrame:
    return df.withColumn("ingest_time", F.current_timestamp())
