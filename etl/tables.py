"""Every Delta table of the project (:data:`TABLES`), where it lives, and the few write
patterns every step uses.

Tables live either under a folder (``lakehouse.root``, addressed as ``delta.`/path```) or in a
metastore (``catalog.schema.table``, e.g. Unity Catalog), chosen by config. Steps never build
paths themselves. Every Delta operation is plain SQL (``DESCRIBE HISTORY``, ``MERGE INTO``,
``CREATE TABLE IF NOT EXISTS``, ``DELETE FROM``) or a DataFrame write, so the same code runs on
a classic session and over Spark Connect, where Delta's Python API needs server plugins.

Versions: a derived table's step records the bronze version it read (:meth:`Lakehouse.
record_built`); :func:`etl.lineage.stale_table` refuses a table that no longer covers bronze
(:class:`StaleTableError`; commits that change no data do not count). See :mod:`etl.lineage`.
"""

from __future__ import annotations

import json
import uuid
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

from pyspark.sql import Column, DataFrame, SparkSession
from pyspark.sql import functions as F
from pyspark.sql import types as T

from etl.compat import Staging
from etl.config import ConfigError, LakehouseConf
from etl.fs import Store, is_url, locate
from etl.redact import redact_text
from etl.spark import local_frame, session_conf
from etl.sqltext import ddl, sql_string

BRONZE = "bronze_pairs"
QUARANTINE = "quarantine"
EVAL_IMAGES = "bronze_eval_images"
SILVER = "silver_scores"
EVAL_EMBEDDINGS = "silver_eval_embeddings"
DEDUP = "silver_dedup"
DEDUP_SIGNALS = "silver_dedup_signals"
CENTROIDS = "dedup_centroids"
TARGETS = "silver_targets"
SELECTION = "gold_selection"
GOLD = "gold_pairs"
RUN_STATS = "run_stats"
EVALUATION = "gold_evaluation"
FILTER_QUALITY = "gold_filter_quality"
LEDGER = "takedown_ledger"
MATCHES = "takedown_matches"
EVENTS = "takedown_events"
INGEST_FILES = "ingest_files"
LEASES = "run_leases"


@dataclass(frozen=True)
class Table:
    """One Delta table: its name, medallion layer, the step that writes it, what it holds, and
    the table whose version a build records (``source``; None: not recorded)."""

    name: str
    layer: str  # bronze | silver | gold | ops
    step: str  # the ``dfn-curate`` step that writes it
    description: str
    source: str | None = None
    per_model: bool = False  # one recorded source version per scoring model
    feed: bool = False  # records its row changes (Delta change data feed: etl.changefeed)

    @property
    def stats_step(self) -> str:
        """The run-stats step under which a build records its source version."""
        return f"{self.step}:{self.name}" if self.per_model else self.step

    def version_metric(self, model_id: str | None = None) -> str:
        """The run-stats metric holding the source version a build of this table covers."""
        if self.source is None:
            raise ValueError(f"{self.name} records no source version")
        if not self.per_model:
            return f"source_version[{self.source}]"
        if model_id is None:
            raise ValueError(f"{self.name} records one source version per model: name the model")
        return f"source_version[{model_id}]"


# every table, in pipeline order
TABLES: tuple[Table, ...] = (
    Table(BRONZE, "bronze", "ingest", "the pool: one row per image-text pair, with image bytes",
          feed=True),
    Table(QUARANTINE, "bronze", "ingest", "input rows refused by ingest, with the reason"),
    Table(EVAL_IMAGES, "bronze", "ingest", "evaluation images, kept out of the selection"),
    Table(INGEST_FILES, "ops", "ingest", "the input files ingest read: size, modified, rows"),
    Table(SILVER, "silver", "score", "filter-model scores and image embeddings per uid and model",
          source=BRONZE, per_model=True, feed=True),
    Table(EVAL_EMBEDDINGS, "silver", "score", "image embeddings of the evaluation images per "
          "model", source=EVAL_IMAGES, per_model=True),
    Table(DEDUP, "silver", "dedup", "duplicate, near-duplicate and eval-leak flags per uid",
          source=BRONZE, feed=True),
    Table(DEDUP_SIGNALS, "silver", "dedup", "each row's dedup vector and frozen cluster per signal"),
    Table(CENTROIDS, "silver", "dedup", "the frozen k-means centres of each dedup signal"),
    Table(TARGETS, "silver", "targets", "image clusters and target-set similarity per uid",
          source=BRONZE, feed=True),
    Table(SELECTION, "gold", "select", "every pool uid once: kept, first drop reason, score",
          source=BRONZE, feed=True),
    Table(GOLD, "gold", "export", "the kept pairs with their bronze columns, as exported",
          feed=True),
    Table(FILTER_QUALITY, "gold", "evaluate", "ROC-AUC, precision and recall of the filter on "
          "labelled pairs"),
    Table(EVALUATION, "gold", "evaluate", "a small CLIP trained on each induced selection"),
    Table(RUN_STATS, "ops", "every step", "metrics and source versions recorded by each run"),
    Table(LEDGER, "ops", "takedown", "removal requests, one row per selector (append-only)"),
    Table(MATCHES, "ops", "takedown", "the uids each request removed (blocks their return)"),
    Table(EVENTS, "ops", "takedown", "request states, rows removed per table, purge proofs"),
    Table(LEASES, "ops", "every step", "the run holding the lakehouse (etl/lease.py)"),
)
# the tables holding pool or eval rows: what a takedown removes from
ROW_TABLES: tuple[str, ...] = (BRONZE, QUARANTINE, EVAL_IMAGES, SILVER, EVAL_EMBEDDINGS, DEDUP,
                               DEDUP_SIGNALS, TARGETS, SELECTION, GOLD)
TABLE_NAMES: tuple[str, ...] = tuple(t.name for t in TABLES)
FEED = "delta.enableChangeDataFeed"
# a key set up to this many keys is broadcast to the tasks that join with it (~40 MB of uids),
# so the table side is scanned, never shuffled, for an increment's keys; a larger one is
# joined by a shuffle like any other (no unbounded broadcast)
BROADCAST_KEYS = 500_000
FEED_TABLES = frozenset(t.name for t in TABLES if t.feed)


def table_info(name: str) -> Table:
    """The registry entry of table ``name``."""
    for table in TABLES:
        if table.name == name:
            return table
    raise KeyError(f"{name} is not a table of this project ({', '.join(TABLE_NAMES)})")

# Delta operations that rewrite files without changing the rows a reader sees
NO_DATA_CHANGE = frozenset({"OPTIMIZE", "VACUUM START", "VACUUM END", "SET TBLPROPERTIES",
                            "UNSET TBLPROPERTIES", "ADD CONSTRAINT", "DROP CONSTRAINT",
                            "UPGRADE PROTOCOL", "CHANGE COLUMN", "ADD COLUMNS", "FSCK",
                            "REORG"})  # REORG ... APPLY (PURGE): rows deleted before, rewritten

RUN_STATS_SCHEMA = T.StructType([T.StructField(n, t, n == "value") for n, t in (
    ("run_id", T.StringType()), ("step", T.StringType()), ("metric", T.StringType()),
    ("value", T.LongType()), ("recorded_at", T.TimestampType()))])


class Lakehouse:
    """Names, reads and writes of the project's Delta tables."""

    def __init__(self, spark: SparkSession, conf: LakehouseConf, store: Store | None = None):
        self.spark = spark
        self.conf = conf
        self._store = store
        self._schema_ready = False
        self._present: set[str] = set()  # tables seen to exist (none is dropped but CENTROIDS)

    @property
    def store(self) -> Store:
        """Python file access for this lakehouse's URLs, with the session's credentials."""
        if self._store is None:
            self._store = Store.from_spark(self.spark)
        return self._store

    @property
    def root(self) -> str:
        """The root as given when it is a URL (``s3a://``, ``abfss://``, ``dbfs:``), else
        absolute."""
        root = self.conf.root
        return root.rstrip("/") if is_url(root) else str(Path(root).expanduser().resolve())

    def under(self, *parts: str) -> str:
        """A location below the root (URL-safe join)."""
        return "/".join([self.root, *parts])

    def staging(self, what: str) -> Staging:
        """A folder under ``_staging`` for data handed to the workers through storage."""
        return Staging(self.under("_staging", what), self.store)

    def resolve(self, path: str) -> str:
        """A configured location: a URL or absolute path as is, a relative one under the root."""
        return locate(self.root, path)

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
        """Whether ``table`` exists; a yes is remembered (tables are never dropped, but
        :data:`CENTROIDS`, which is asked each time), so steps ask the catalog once."""
        if table in self._present:
            return True
        found = self._ask(table)
        if found and table != CENTROIDS:
            self._present.add(table)
        return found

    def _ask(self, table: str) -> bool:
        if self.conf.schema:
            return self.spark.catalog.tableExists(self.name(table))
        try:  # a folder without a Delta log (a killed first write) is "not a Delta table"
            self.spark.sql(f"DESCRIBE DETAIL {self.name(table)}").first()  # run it, in either mode
        except Exception as exc:  # noqa: BLE001 - "not a Delta table" / "path does not exist"
            if _missing(exc):
                return False
            raise
        return True

    def read(self, table: str) -> DataFrame:
        """The table as a DataFrame; a clear error if it was never written."""
        if not self.exists(table):
            raise FileNotFoundError(redact_text(
                f"Delta table {self.name(table)} does not exist yet; run the step that writes it "
                f"(e.g. `dfn-curate run`) first"))
        return self.spark.table(self.name(table))

    def history(self, table: str, limit: int | None = None) -> DataFrame:
        """``DESCRIBE HISTORY`` of ``table``: its newest ``limit`` commits (None: all)."""
        cap = "" if limit is None else f" LIMIT {int(limit)}"
        return self.spark.sql(f"DESCRIBE HISTORY {self.name(table)}{cap}")

    def version(self, table: str) -> int | None:
        """Latest Delta version of ``table`` (None if absent): one history query."""
        try:
            row = self.history(table, 1).select("version").first()
        except Exception as exc:  # noqa: BLE001 - "not a Delta table" / "path does not exist"
            if _missing(exc):
                return None
            raise
        return None if row is None else row[0]

    def delete(self, table: str, condition: str) -> None:
        """``DELETE FROM`` ``table`` the rows matching SQL ``condition``."""
        self.spark.sql(f"DELETE FROM {self.name(table)} WHERE {condition}")

    def ensure_schema(self) -> None:
        """In schema mode, create ``[catalog.]schema`` unless it exists (once per Lakehouse);
        refused, one line says which privilege is missing."""
        if not self.conf.schema or self._schema_ready:
            return
        where = ".".join(f"`{p}`" for p in (self.conf.catalog, self.conf.schema) if p)
        # Unity Catalog refuses CREATE SCHEMA IF NOT EXISTS without CREATE on the catalog even
        # when the schema exists: ask first, so an admin-made schema needs no catalog grant
        if self.spark.catalog.databaseExists(where.replace("`", "")):
            self._schema_ready = True
            return
        try:
            self.spark.sql(f"CREATE SCHEMA IF NOT EXISTS {where}")
        except Exception as exc:  # noqa: BLE001 - the catalog's words, kept in one line
            if not _denied(exc):
                raise
            catalog = self.conf.catalog or "the current catalog"
            raise ConfigError(
                f"lakehouse.schema: cannot create schema {where}: the current user lacks USE "
                f"CATALOG and CREATE SCHEMA on {catalog}; ask an admin to grant them, or to "
                f"create {where} and grant USE SCHEMA, CREATE TABLE, MODIFY and SELECT on it "
                f"({str(exc).splitlines()[0][:160]})") from None
        self._schema_ready = True

    def ensure(self, table: str, schema: T.StructType) -> None:
        """Create ``table`` empty with ``schema`` unless it exists: one metadata-only commit,
        no Spark job (an empty append runs one, and a new session's first job is slow)."""
        if self.exists(table):
            return
        self.ensure_schema()
        # nullable, as a DataFrame write makes every column: a NOT NULL taken from the first
        # input's schema would make a later input's null a failed commit
        try:
            props = f" TBLPROPERTIES ('{FEED}' = 'true')" if table in FEED_TABLES else ""
            self.spark.sql(f"CREATE TABLE IF NOT EXISTS {self.name(table)} ({ddl(schema)}) "
                           f"USING delta{props}")
        except Exception:  # noqa: BLE001 - another writer may have created it meanwhile
            if not self.exists(table):
                raise

    def overwrite(self, df: DataFrame, table: str, partition_by: list[str] | None = None) -> None:
        """Atomically replace ``table`` with ``df`` (schema replaced too)."""
        writer = df.write.format("delta").mode("overwrite").option("overwriteSchema", "true")
        if partition_by:
            writer = writer.partitionBy(*partition_by)
        self._save(writer, table)

    def append(self, df: DataFrame, table: str, **options: str | int) -> None:
        """Append ``df`` (new columns merged into the schema), with extra Delta write
        ``options`` (``userMetadata``, ``txnAppId``/``txnVersion``, ...)."""
        writer = df.write.format("delta").mode("append").option("mergeSchema", "true")
        for key, value in options.items():
            writer = writer.option(key, value)
        self._save(writer, table)

    def _save(self, writer, table: str) -> None:
        self.ensure_schema()
        if table in FEED_TABLES:  # a new table records its changes from its first version
            writer = writer.option(FEED, "true")
        if self.conf.schema:
            writer.saveAsTable(self.name(table))
        else:
            writer.save(self.path(table))

    def properties(self, table: str) -> dict[str, str]:
        """The table's properties (``TBLPROPERTIES``), read from the Delta log only."""
        detail = self.spark.sql(f"DESCRIBE DETAIL {self.name(table)}")
        return dict(detail.select("properties").first()[0] or {})

    def set_properties(self, table: str, values: dict[str, str | None]) -> None:
        """Set (``None``: unset) table properties, one Delta commit each call."""
        name = self.name(table)
        kept = {k: v for k, v in values.items() if v is not None}
        gone = [k for k, v in values.items() if v is None]
        if kept:
            pairs = ", ".join(f"{sql_string(k)} = {sql_string(v)}" for k, v in kept.items())
            self.spark.sql(f"ALTER TABLE {name} SET TBLPROPERTIES ({pairs})")
        if gone:
            keys = ", ".join(sql_string(k) for k in gone)
            self.spark.sql(f"ALTER TABLE {name} UNSET TBLPROPERTIES IF EXISTS ({keys})")

    def count_present(self, df: DataFrame, table: str, keys: list[str]) -> int:
        """Rows of ``df`` whose ``keys`` already exist in ``table`` (0 when it does not exist).

        Counted on the executors on the condition :meth:`insert_new` merges on, before the
        insert: an independent count, not one derived from the insert's result.
        """
        if not self.exists(table):
            return 0
        return int(self.present_keys(df, table, keys).agg(F.sum("_n")).first()[0] or 0)

    def present_keys(self, df: DataFrame, table: str, keys: list[str]) -> DataFrame:
        """The distinct ``keys`` of ``df`` that ``table`` holds, as ``_k0..`` with ``_n``, their
        rows in ``df``. ``df``'s keys are joined with the table's: broadcast when at most
        :data:`BROADCAST_KEYS`, so the table's keys are scanned, not shuffled."""
        mine = df.groupBy(*keys).count().toDF(*[f"_k{i}" for i in range(len(keys))], "_n")
        side = F.broadcast(mine) if mine.count() <= BROADCAST_KEYS else mine
        cond = [F.col(f"_k{i}").eqNullSafe(F.col(k)) for i, k in enumerate(keys)]
        return self.read(table).select(*keys).join(side, cond).drop(*keys).dropDuplicates()

    def insert_new(self, df: DataFrame, table: str, keys: list[str]) -> int:
        """Insert-only ``MERGE INTO`` of ``df`` on ``keys``; returns the number of rows
        inserted, as the commit's metrics in the Delta history count them (the statement's own
        result row is not read: over Spark Connect it is not the commit's).

        Rows whose keys already exist are left untouched, so re-running a step never duplicates
        rows. The first write creates the table with a plain append (nothing to match against:
        no MERGE, which on a small input costs more than the data).
        """
        if not self.exists(table):
            return self.append_counted(df, table)
        return self._merge(df, table, keys, "WHEN NOT MATCHED THEN INSERT *",
                           "numTargetRowsInserted", _tag())

    def delete_keys(self, df: DataFrame, table: str, keys: list[str], note: str) -> int:
        """``MERGE INTO table USING df ON keys WHEN MATCHED THEN DELETE``: a key-set join, so
        no key value lands in the statement or the table's history; the commit's userMetadata
        is ``note`` plus a one-off tag. Returns the rows deleted, from that commit's metrics."""
        return self._merge(df.select(*keys).distinct(), table, keys,
                           "WHEN MATCHED THEN DELETE", "numTargetRowsDeleted",
                           f"{note} {_tag()}")

    def merge(self, df: DataFrame, table: str, keys: list[str], clause: str) -> None:
        """``MERGE INTO table t USING df s ON keys <clause>``, one tagged commit."""
        self._merge(df, table, keys, clause, "numTargetRowsUpdated", _tag())

    def _merge(self, df: DataFrame, table: str, keys: list[str], clause: str, metric: str,
               tag: str) -> int:
        """``MERGE INTO table USING df ON keys <clause>`` committed with userMetadata ``tag``;
        the commit's ``metric`` read from its log entry (a folder lakehouse) or the history (an
        untagged session: its MERGEs')."""
        cond = " AND ".join(f"t.`{k}` <=> s.`{k}`" for k in keys)
        view, since = f"dfn_merge_{uuid.uuid4().hex}", self.version(table)
        df.createOrReplaceTempView(view)
        try:
            with session_conf(self.spark, {USER_METADATA: tag}) as tagged:
                self.spark.sql(f"MERGE INTO {self.name(table)} t USING {view} s ON {cond} "
                               f"{clause}")
        finally:
            self.spark.catalog.dropTempView(view)
        if tagged and not self.conf.schema:  # the log entry itself: no history query
            first = 0 if since is None else since + 1
            info = self._logged_commit(table, tag, first)
            if info is not None:
                return int((info.get("operationMetrics") or {}).get(metric, "0"))
        mine = (F.col("userMetadata") == tag) if tagged else (F.col("operation") == "MERGE")
        return self._commit_rows(table, since, metric, mine) or 0

    def append_counted(self, df: DataFrame, table: str) -> int:
        """Append ``df`` to ``table`` (created when absent); the rows that commit added
        (``numOutputRows``).

        The commit is tagged with a one-off ``userMetadata`` and found by it, so another writer
        cannot be mistaken for this one. In a folder lakehouse its log entry is read directly
        (no history query, which is slow on a new session).
        """
        since = self.version(table) if self.exists(table) else None
        tag = _tag()
        self.append(df, table, userMetadata=tag)
        first = 0 if since is None else since + 1
        info = None if self.conf.schema else self._logged_commit(table, tag, first)
        if info is not None:
            return int((info.get("operationMetrics") or {}).get("numOutputRows", "0"))
        rows = self.tagged_rows(table, tag, since)  # a metastore table, or a log elsewhere
        if rows is None:  # the catalog dropped the tag: this new table's last commit
            last = self.history(table, 1).select("operationMetrics").first()
            return int(((last[0] if last else None) or {}).get("numOutputRows", "0"))
        return rows

    def tagged_rows(self, table: str, tag: str, since: int | None = None,
                    metric: str = "numOutputRows") -> int | None:
        """Rows added by the commits of ``table`` after version ``since`` (None: all) whose
        ``userMetadata`` is ``tag``: the sum of their ``metric``; None when there is no such
        commit. Only the history of those versions is read."""
        return self._commit_rows(table, since, metric, F.col("userMetadata") == tag)

    def _commit_rows(self, table: str, since: int | None, metric: str,
                     which: Column) -> int | None:
        """The sum of ``metric`` over the commits of ``table`` after version ``since`` (None:
        all) that ``which`` selects from the history; None when none does."""
        current = self.version(table)
        if current is None or (since is not None and current <= since):
            return None
        newer = current - (-1 if since is None else since)
        history = self.history(table, newer).where(which).select("operationMetrics").collect()
        if not history:
            return None
        return sum(int((r[0] or {}).get(metric, "0")) for r in history)

    def _logged_commit(self, table: str, tag: str, first: int = 0,
                       most: int = 20) -> dict | None:
        """The ``commitInfo`` tagged ``tag`` among ``most`` log entries of ``table`` from
        version ``first``; None when the log stops (or is kept elsewhere, as coordinated
        commits are) before it."""
        log = self.under(table, "_delta_log")
        for version in range(first, first + most):
            try:
                lines = self.store.read_bytes(f"{log}/{version:020d}.json").splitlines()
            except Exception:  # noqa: BLE001 - absent, or unreadable (a 403): use the history
                return None
            for line in lines:
                info = json.loads(line).get("commitInfo")
                if info is not None and info.get("userMetadata") == tag:
                    return info
        return None

    def record_stats(self, run_id: str, step: str, counts: dict[str, int],
                     built: tuple[str, int | None] | None = None) -> None:
        """Append one row per metric to the run-stats table; with ``built`` (a table, the
        source version it covers) the :meth:`record_built` row too, in the same commit."""
        now = datetime.now(timezone.utc).replace(tzinfo=None)
        rows = [(run_id, step, k, int(v), now) for k, v in counts.items()]
        if built is not None and built[1] is not None:
            info = table_info(built[0])
            rows.append((run_id, info.stats_step, info.version_metric(None), built[1], now))
        self.append(local_frame(self.spark, rows, RUN_STATS_SCHEMA), RUN_STATS)

    # ---- source versions (see etl.lineage) -------------------------------------------------

    def record_built(self, run_id: str, table: str, version: int | None,
                     model_id: str | None = None) -> None:
        """Record that ``table`` (of ``model_id``, for a per-model table) now covers its source
        (:attr:`Table.source`) at ``version``, read before the build read the source: a commit
        landing meanwhile makes the table look stale, never fresh."""
        if version is not None:
            info = table_info(table)
            self.record_stats(run_id, info.stats_step, {info.version_metric(model_id): version})

    def built_from(self, step: str, metric: str) -> int | None:
        """The source version ``step`` last recorded under ``metric`` (None: never recorded)."""
        if not self.exists(RUN_STATS):
            return None
        row = (self.read(RUN_STATS).where((F.col("step") == step) & (F.col("metric") == metric))
               .orderBy(F.col("recorded_at").desc(), F.col("value").desc()).limit(1).first())
        return None if row is None else int(row["value"])

    def data_changed_since(self, table: str, version: int) -> bool:
        """True when ``table`` has a commit after ``version`` that changes its rows."""
        current = self.version(table)
        if current is None or current <= version:
            return False
        history = self.history(table, current - version).select("version", "operation")
        return any(r[0] > version and r[1] not in NO_DATA_CHANGE for r in history.collect())


USER_METADATA = "spark.databricks.delta.commitInfo.userMetadata"


def _tag() -> str:
    """A one-off ``userMetadata`` that finds a commit of this process in the history."""
    return f"dfn-curate:{uuid.uuid4().hex}"


def _missing(exc: Exception) -> bool:
    """Whether ``exc`` says the table is not there (not a Delta table, no such path)."""
    text = str(exc)
    return any(m in text for m in ("DELTA_MISSING_DELTA_TABLE", "is not a Delta table",
                                   "PATH_NOT_FOUND", "Path does not exist",
                                   "DELTA_PATH_DOES_NOT_EXIST", "doesn't exist",
                                   "DELTA_TABLE_NOT_FOUND", "TABLE_OR_VIEW_NOT_FOUND"))


def _denied(exc: Exception) -> bool:
    """Whether ``exc`` is a catalog's permission refusal."""
    text = str(exc).upper()
    return any(m in text for m in ("PERMISSION_DENIED", "INSUFFICIENT_PERMISSIONS",
                                   "ACCESS DENIED", "NOT AUTHORIZED", "DOES NOT HAVE"))


def new_run_id() -> str:
    """A sortable, unique id for one job run."""
    return datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%S") + "-" + uuid.uuid4().hex[:8]

