"""Change-only rewrites of a derived table: MERGE the rows that differ, no commit when none do.

A step that derives a whole table from its inputs (``gold_selection``, ``gold_pairs``) hands
:func:`sync` the table's full new content (or the rows of the keys that may have changed). The
key and a digest of the compared columns of each new row are joined with the table's (on the
executors); only rows that are new, gone, or differ in a compared column reach one ``MERGE
INTO`` (delete, update, insert; an append when all are new), so the table
ends exactly as an overwrite would leave it, and a re-run that changes nothing makes no
commit at all. A first write, or a new content whose columns differ from the table's,
overwrites it instead.
"""

from __future__ import annotations

from pyspark import StorageLevel
from pyspark.sql import Column, DataFrame
from pyspark.sql import functions as F

from etl.tables import BROADCAST_KEYS, Lakehouse

OP, WATCHED, OLD, NEW = "_dfn_op", "_dfn_watched", "_dfn_old", "_dfn_new"
BROADCAST_ROWS = 100_000  # changed rows of a MERGE broadcast to the table's tasks (~20 MB)


def _shape(df: DataFrame) -> list[tuple[str, str]]:
    return [(f.name, f.dataType.simpleString()) for f in df.schema.fields]


def key_side(keys: DataFrame, count: int) -> DataFrame:
    """``keys`` (``count`` rows) as the side of a join: broadcast when at most
    :data:`etl.tables.BROADCAST_KEYS`, so the other side is scanned, not shuffled."""
    return F.broadcast(keys) if count <= BROADCAST_KEYS else keys


def _merge_side(changes: DataFrame, rows: int) -> DataFrame:
    """A MERGE's source: broadcast when it is at most :data:`BROADCAST_ROWS` rows without
    binary columns (image bytes), so the MERGE finds its rows in the table without a shuffle
    of the table."""
    binary = any(f.dataType.typeName() == "binary" for f in changes.schema.fields)
    return F.broadcast(changes) if rows <= BROADCAST_ROWS and not binary else changes


def same_shape(lake: Lakehouse, df: DataFrame, table: str) -> bool:
    """Whether ``table`` exists with ``df``'s columns and types (in order)."""
    return lake.exists(table) and _shape(lake.read(table)) == _shape(df)


def row_digest(cols: list[str]) -> Column:
    """A 96-bit digest of the values of ``cols`` (xxhash64 and murmur3 over the values and
    their null flags: a null in one column never reads as the value of another), so rows are
    compared by shuffling keys and digests, not their columns."""
    if not cols:
        return F.lit(0)
    parts = [F.col(c) for c in cols] + [F.col(c).isNull() for c in cols]
    return F.struct(F.xxhash64(*parts).alias("x"), F.hash(*parts).alias("m"))


def sync(lake: Lakehouse, df: DataFrame, table: str, key: str = "uid",
         compare: list[str] | None = None, watch: tuple[str, ...] = (),
         within: DataFrame | None = None, absent: DataFrame | None = None) -> dict[str, int]:
    """Make ``table`` hold exactly ``df`` (one row per ``key``) with the fewest row writes;
    ``within`` (one column, ``key``): only these keys may have changed, and ``df`` holds the
    rows of those still present: the table's rows of other keys are neither read nor touched.
    ``absent`` (one column, ``key``): keys the table is known to lack; when they are all of
    ``within``, ``df`` is appended without reading the table at all.

    Rows whose ``compare`` columns (default: all) equal the table's are left alone (compared
    by :func:`row_digest`). Returns ``rows_new`` (inserted), ``rows_updated``, ``rows_removed``
    (keys no longer in ``df``), ``rows_changed`` (updated rows whose ``watch`` columns
    changed) and ``rows_rewritten`` (every row, when the table was written whole: absent or
    re-shaped). ``df`` is computed twice: once for the digests, once for the changed rows."""
    counts = dict.fromkeys(("rows_new", "rows_updated", "rows_removed", "rows_changed",
                            "rows_rewritten"), 0)
    if not same_shape(lake, df, table):
        if within is not None:
            raise ValueError(f"a sync within some keys needs {table} with the columns of its rows")
        lake.overwrite(df, table)
        counts["rows_rewritten"] = lake.read(table).count()
        return counts
    if within is not None and absent is not None and within.join(absent, key,
                                                                 "left_anti").isEmpty():
        counts["rows_new"] = df.count()
        if counts["rows_new"]:
            lake.append(df, table)
        return counts
    cols = [c for c in df.columns if c != key]
    compare = cols if compare is None else list(compare)

    def digests(frame: DataFrame, side: str) -> DataFrame:
        return frame.select(key, F.lit(True).alias(side), row_digest(compare).alias(f"{side}_c"),
                            row_digest(list(watch)).alias(f"{side}_w"))

    def same(what: str) -> Column:
        return F.col(f"{NEW}_{what}").eqNullSafe(F.col(f"{OLD}_{what}"))

    op = (F.when(F.col(NEW).isNull(), "delete").when(F.col(OLD).isNull(), "insert")
          .when(~same("c"), "update"))
    old = lake.read(table)
    if within is not None:
        old = old.join(within, key, "left_semi")
    keys = (digests(df, NEW).join(digests(old, OLD), key, "full_outer")
            .withColumn(OP, op).where(F.col(OP).isNotNull())
            .withColumn(WATCHED, (F.col(OP) == "update") & ~same("w"))
            .select(key, OP, WATCHED).persist(StorageLevel.MEMORY_AND_DISK))
    try:
        names = {"insert": "rows_new", "update": "rows_updated", "delete": "rows_removed"}
        for row in keys.groupBy(OP, WATCHED).count().collect():
            counts[names[row[0]]] += row[2]
            counts["rows_changed"] += row[2] if row[1] else 0
        if not any(counts.values()):
            return counts
        if counts["rows_updated"] == counts["rows_removed"] == 0:
            # only keys the table lacks: appended (a MERGE would join them with the table to
            # find what the comparison found); the run's lease keeps other writers out
            lake.append(df.join(keys.select(key), key, "left_semi"), table)
            return counts
        rows = df.join(keys.where(F.col(OP) != "delete").select(key, OP), key)
        changes = rows.unionByName(keys.where(F.col(OP) == "delete").select(key, OP),
                                   allowMissingColumns=True).select(key, *cols, OP)
        q = [f"`{c}`" for c in [key, *cols]]
        clause = (f"WHEN MATCHED AND s.{OP} = 'delete' THEN DELETE "
                  f"WHEN MATCHED THEN UPDATE SET {', '.join(f't.{c} = s.{c}' for c in q[1:])} "
                  f"WHEN NOT MATCHED AND s.{OP} = 'insert' THEN INSERT ({', '.join(q)}) "
                  f"VALUES ({', '.join(f's.{c}' for c in q)})")
        lake.merge(_merge_side(changes, sum(counts.values())), table, [key], clause)
    finally:
        keys.unpersist()
    return counts
