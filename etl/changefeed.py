"""Which keys of a Delta table changed since a version: its change data feed.

The tables a later step reads incrementally (:data:`etl.tables.FEED_TABLES`: bronze, silver
scores, dedup, targets, selection, gold pairs) record their row changes from their first version
(``delta.enableChangeDataFeed``). A step that recorded the versions it read asks
:func:`changed_keys` for the keys whose rows were inserted, updated or deleted since: reading the
feed costs what changed (the files those commits added and their ``_change_data``), not the
table. When the feed cannot answer (a table made before it recorded changes, a version whose
log or change files are gone, a schema change in between) the answer is ``None`` with the
reason, and the step does its whole-table work instead: never a wrong answer, only a slower one.
"""

from __future__ import annotations

from dataclasses import dataclass

from pyspark import StorageLevel
from pyspark.sql import DataFrame
from pyspark.sql import functions as F

from etl.tables import FEED, Lakehouse
from etl.tablesync import key_side

CHANGE = "_change_type"
DELETE = "delete"
INSERT = "insert"


@dataclass
class Changes:
    """The keys of one table that changed after version ``since`` up to ``version``: ``keys``
    (``key``; ``deleted``: whether its last change deleted it; ``born``: whether its first
    change inserted it, so the table lacked it at ``since``), persisted; ``count`` of them,
    how many are ``deleted``, how many ``born`` and still present (``born_kept``) and how many
    of those changed only by their insert (``appended``)."""

    table: str
    since: int
    version: int
    keys: DataFrame | None
    count: int
    deleted: int
    born_kept: int = 0
    appended: int = 0

    def only_born(self) -> bool:
        """Whether every changed key is a row the table lacked at ``since`` and still holds
        (an append-only increment): their rows elsewhere need no lookup."""
        return self.count == self.born_kept

    def uids(self, key: str = "uid") -> DataFrame:
        """The changed keys (one column), broadcast when few (:func:`key_side`)."""
        return key_side(self.keys.select(key), self.count)

    def born_uids(self, key: str = "uid") -> DataFrame:
        """The keys born since ``since`` and still present (one column), broadcast when few."""
        return key_side(self.keys.where(F.col("born") & ~F.col("deleted")).select(key),
                        self.born_kept)

    def only_appended(self) -> bool:
        """Whether every change was an insert of a new key (an append-only window): the
        feed's inserted rows are then the table's rows of those keys."""
        return self.count == self.appended > 0

    def release(self) -> None:
        """Drop the persisted keys."""
        if self.keys is not None:
            self.keys.unpersist()


def feed_rows(lake: Lakehouse, table: str, since: int, until: int) -> DataFrame:
    """The change data feed of ``table`` for versions ``since + 1 .. until`` (lazy)."""
    reader = (lake.spark.read.format("delta").option("readChangeFeed", "true")
              .option("startingVersion", since + 1).option("endingVersion", until))
    return reader.table(lake.name(table)) if lake.conf.schema else reader.load(lake.path(table))


def changed_keys(lake: Lakehouse, table: str, since: int | None, until: int | None = None,
                 key: str = "uid") -> Changes | str:
    """The keys of ``table`` changed after version ``since`` (to ``until``, default the current
    version), or why the feed cannot tell (a string). No commit since: no read at all."""
    if since is None:
        return f"{table}: no version recorded by the last run"
    current = lake.version(table) if until is None else until
    if current is None:
        return f"{table} does not exist"
    if current < since:
        return f"{table} is at version {current}, before the recorded {since}"
    if current == since:
        return Changes(table, since, current, None, 0, 0, 0)
    keys = None
    try:
        rows = feed_rows(lake, table, since, current)
        # within one commit a delete or pre-image comes before an insert (an overwrite or
        # update of an existing row is not a birth)
        last = F.max_by(F.col(CHANGE) == DELETE, F.struct("_commit_version",
                                                          F.col(CHANGE) != DELETE))
        first = F.min_by(F.col(CHANGE) == INSERT, F.struct("_commit_version",
                                                           F.col(CHANGE) == INSERT))
        keys = (rows.groupBy(key).agg(last.alias("deleted"), first.alias("born"),
                                      (F.count("*") == 1).alias("once"))
                .persist(StorageLevel.MEMORY_AND_DISK))
        counts = keys.groupBy("deleted", "born", "once").count().collect()  # at most 8 rows
    except Exception as exc:  # noqa: BLE001 - feed off, files gone, schema changed: say which
        if keys is not None:
            keys.unpersist()
        return f"{table}: its change feed since version {since} is unreadable ({_line(exc)})"
    total = sum(int(r[3]) for r in counts)
    deleted = sum(int(r[3]) for r in counts if r[0])
    born_kept = sum(int(r[3]) for r in counts if r[1] and not r[0])
    appended = sum(int(r[3]) for r in counts if r[1] and not r[0] and r[2])
    return Changes(table, since, current, keys, total, deleted, born_kept, appended)


def appended_rows(lake: Lakehouse, changes: Changes) -> DataFrame | None:
    """The rows ``changes`` appended, read from the feed (what those commits wrote, not the
    table), when every change was an insert of a new key; else None."""
    if not changes.only_appended():
        return None
    rows = feed_rows(lake, changes.table, changes.since, changes.version)
    return rows.where(F.col(CHANGE) == INSERT).drop(CHANGE, "_commit_version",
                                                   "_commit_timestamp")


def feed_enabled(lake: Lakehouse, table: str) -> bool:
    """Whether ``table`` records its changes now."""
    return lake.properties(table).get(FEED, "false").lower() == "true"


def enable_feed(lake: Lakehouse, table: str) -> bool:
    """Make an existing ``table`` (made before it recorded changes) record them from now on;
    True when it had to (one metadata-only commit). Refused (no ALTER privilege), it says so
    in one line: the steps then keep comparing whole tables."""
    if feed_enabled(lake, table):
        return False
    try:
        lake.set_properties(table, {FEED: "true"})
    except Exception as exc:  # noqa: BLE001 - a missing privilege costs speed, not data
        print(f"cannot switch on the change data feed of {table} ({_line(exc)}); steps "
              "reading it compare the whole table")
        return False
    return True


def _line(exc: Exception) -> str:
    text = str(exc).strip().splitlines()
    return (text[0] if text else type(exc).__name__)[:160]
