"""Up-front checks that the files of one source agree with each other, before any row is read.

Spark takes a parquet source's schema from one file (and a CSV source's header from one file),
so a file that disagrees would otherwise fail mid-job with a raw stack trace (parquet) or be
misread silently (CSV columns in another order). These checks read only each file's footer or
first line: on the driver for a source of a few files (no Spark job), else on the executors,
and then the driver receives only the disagreeing (column, type) groups, a handful of rows
whatever the number of files or rows. A disagreement stops the job with one
line naming a file, the column and both types, before anything is written.
"""

from __future__ import annotations

import csv
import io
from collections.abc import Callable, Iterator

import pandas as pd
from pyspark.sql import DataFrame, SparkSession
from pyspark.sql import functions as F

from etl.fs import Store
from etl.spark import local_frame

FOOTER_SCHEMA = "path string, column string, type string"
FIRST_LINE_BYTES = 1024 * 1024  # a header line longer than this is reported as such
LOCAL_CHECK_FILES = 16  # up to this many files are checked on the driver, more on the executors


class SchemaConflict(ValueError):
    """Files of one source disagree on a column's type (or on the header)."""


def _footer_types(batches: Iterator[pd.DataFrame], store: Store) -> Iterator[pd.DataFrame]:
    """(path, leaf column, physical/logical type) of every parquet file's footer."""
    import pyarrow.parquet as pq

    for batch in batches:
        rows = []
        for path in batch["path"]:
            try:
                with store.open(path, "rb") as fh:
                    schema = pq.read_metadata(fh).schema
            except Exception as exc:  # noqa: BLE001 - reported as the file's problem
                rows.append((path, "(footer)", f"unreadable: {str(exc)[:200]}"))
                continue
            for i in range(len(schema)):
                col = schema.column(i)
                logical = str(col.logical_type)
                kind = col.physical_type.lower() + (f" ({logical})" if logical != "None" else "")
                rows.append((path, col.path, kind))
        yield pd.DataFrame(rows, columns=["path", "column", "type"])


def _header_types(batches: Iterator[pd.DataFrame], store: Store,
                  sep: str) -> Iterator[pd.DataFrame]:
    """(path, "header", the parsed first line) of every delimited file."""
    for batch in batches:
        rows = []
        for path in batch["path"]:
            try:
                with store.open(path, "rb", compression="infer") as fh:
                    line = fh.readline(FIRST_LINE_BYTES).decode("utf-8", "replace")
                header = next(csv.reader(io.StringIO(line), delimiter=sep), [])
                rows.append((path, "header", ", ".join(h.strip() for h in header)))
            except Exception as exc:  # noqa: BLE001 - reported as the file's problem
                rows.append((path, "header", f"unreadable: {str(exc)[:200]}"))
        yield pd.DataFrame(rows, columns=["path", "column", "type"])


def _conflict_rows(groups: pd.DataFrame, limit: int) -> list:
    """Rows (column, type, files, example) of the (column, type) ``groups`` whose column has
    more than one type, the most common type of each column first (the pandas twin of the
    ranking :func:`_conflicts` does in Spark)."""
    split = groups.groupby("column")["type"].transform("size") > 1
    rows = groups[split].sort_values(["column", "files", "type"], ascending=[True, False, True])
    return list(rows.head(limit).itertuples(index=False))


def _conflicts(types: DataFrame | pd.DataFrame, columns: list[str] | None = None,
               limit: int = 20) -> list:
    """Rows (column, type, files, example) for columns typed differently across files (only
    ``columns`` when given; an all-null column, typed ``Null``, agrees with any type).

    ``types`` is a Spark frame (files checked on the executors: only the conflicting groups,
    at most ``limit``, reach the driver) or a pandas one (a few files checked on the driver).
    """
    if isinstance(types, pd.DataFrame):
        types = types[~types["type"].str.endswith("(Null)")]
        if columns is not None:
            types = types[types["column"].isin(columns)]
        groups = (types.groupby(["column", "type"], as_index=False)
                  .agg(files=("path", "size"), example=("path", "min")))
        return _conflict_rows(groups, limit)
    types = types.where(~F.col("type").endswith("(Null)"))
    if columns is not None:
        types = types.where(F.col("column").isin(*columns))
    groups = types.groupBy("column", "type").agg(F.count("*").alias("files"),
                                                 F.min("path").alias("example"))
    split = groups.groupBy("column").count().where("count > 1").select("column")
    return (groups.join(split, "column").orderBy("column", F.desc("files"), "type")
            .limit(limit).collect())  # a few (column, type) groups, never one row per file


def _raise_first(what: str, rows: list, fix: str) -> None:
    if not rows:
        return
    column = rows[0].column
    same = [r for r in rows if r.column == column]
    usual, odd = same[0], same[-1]
    more = f" (and {odd.files - 1} more file(s) like it)" if odd.files > 1 else ""
    raise SchemaConflict(
        f"{what}: {odd.example} has {column} as {odd.type}{more}, but {usual.files} other "
        f"file(s) (e.g. {usual.example}) have {usual.type}; {fix}")


def _types(spark: SparkSession, files: DataFrame | list[str],
           read: Callable[[Iterator[pd.DataFrame]], Iterator[pd.DataFrame]],
           local_max: int | None) -> DataFrame | pd.DataFrame:
    """``read`` over the ``files`` (a frame with column ``path``, or paths already listed): on
    the driver when there are at most ``local_max`` (default :data:`LOCAL_CHECK_FILES`) of them
    (no Spark job: a small source's check costs milliseconds, not seconds), else on the
    executors."""
    local_max = LOCAL_CHECK_FILES if local_max is None else local_max
    few = files[:local_max + 1] if isinstance(files, list) else [
        r.path for r in files.select("path").limit(local_max + 1).collect()]
    if len(few) <= local_max:
        return pd.concat([pd.DataFrame(columns=["path", "column", "type"]),
                          *read(iter([pd.DataFrame({"path": few})]))], ignore_index=True)
    if isinstance(files, list):
        files = local_frame(spark, [(p,) for p in files], "path string")
    return files.select("path").mapInPandas(read, FOOTER_SCHEMA)


def check_parquet_files(spark: SparkSession, files: DataFrame | list[str], store: Store, what: str,
                        columns: list[str] | None = None,
                        local_max: int | None = None) -> None:
    """Stop (:class:`SchemaConflict`) when the parquet ``files`` (column ``path``) disagree on
    the type of a column (of ``columns``, when given: the ones the reader uses); reads footers
    only."""
    types = _types(spark, files, lambda b: _footer_types(b, store), local_max)
    _raise_first(what, _conflicts(types, columns), "rewrite that file with the other files' type, or "
                 "move it out of the source path")


def check_csv_headers(spark: SparkSession, files: DataFrame, store: Store, sep: str,
                      what: str, local_max: int | None = None) -> None:
    """Stop (:class:`SchemaConflict`) when delimited ``files`` have different header lines."""
    types = _types(spark, files, lambda b: _header_types(b, store, sep), local_max)
    _raise_first(what, _conflicts(types), "give every file of a source the same header (same "
                 "columns, same order), or split them into separate sources")
