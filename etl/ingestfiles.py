"""Which input files ingest has read, so a run reads only the files it has not seen.

Each source's files are listed (one Spark listing, no byte read: :func:`etl.readers.source_files`)
and compared with :data:`etl.tables.INGEST_FILES`, one row per file ingest read (kind ``pool`` or
``eval``, source name, path, size, modification time, the rows it gave, run id, time). The
comparison is a join on the executors; only the files to read reach the driver (file paths,
never rows). A file recorded before is skipped; a new one is read; one whose size or
modification time changed stops the run naming it (:class:`ChangedFileError`), or with
``ingest.changed_files: reingest`` is read again (rows whose uid is already in bronze stay as
they are: the row-level insert-only MERGE decides, as for every row).

The record is written after bronze and the quarantine, as the run's last ingest commit: a run
that stops between them leaves the files unrecorded, and the next run reads them again, finding
their rows already present.

An image folder is planned by stem (``a/b.jpg``, ``a/b.txt`` and ``a/b.json`` are one row): a
stem with any new or changed file is read whole, its files recorded before included (counted
``files_again``), so an image and its caption are always read together. A stem with a missing
half (an image without ``.txt``, or a caption without an image) is read and its row
quarantined, but its files are not recorded: every run reads it again (the quarantine keeps one
row for it), until the other half arrives and the stem gives its bronze row.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timezone
from urllib.parse import unquote

from pyspark.sql import Column, DataFrame, Window
from pyspark.sql import functions as F
from pyspark.sql import types as T

from etl.readers import InputError, source_files
from etl.redact import redact_text
from etl.spark import local_frame
from etl.tables import INGEST_FILES, Lakehouse
from etl.tarshards import IMAGE_EXTS

CHANGED_FILES = ("error", "reingest")
KEYS = ["kind", "source", "path"]
EXAMPLES = 5  # changed files named in the error
# as handed over from the driver: times as microseconds since the epoch (no time zone crosses)
LOCAL = T.StructType([T.StructField(n, t) for n, t in (
    ("kind", T.StringType()), ("source", T.StringType()), ("path", T.StringType()),
    ("size", T.LongType()), ("modified_us", T.LongType()), ("rows", T.LongType()),
    ("run_id", T.StringType()))])


class ChangedFileError(InputError):
    """A file ingested before changed (size or modification time) and may not be re-read."""


@dataclass
class FilePlan:
    """What one source's run reads: ``files`` ``(path, size, modified)`` (microseconds since
    the epoch), new ones then changed ones (``changed`` of them), out of ``listed`` files."""

    kind: str  # pool | eval
    source: str
    listed: int
    files: list[tuple[str, int, int]]
    changed: int
    again: int = 0  # of ``files``: recorded before, read again with a new file of their stem
    partial: frozenset[str] = frozenset()  # of ``files``: a stem's half, read but not recorded
    trusted: bool = True  # False: the record was ignored (its rows for these files replaced)
    # one file read before and unchanged since, that the new files' schema or header is checked
    # against (:func:`etl.readers.read_source`); None: none (first run, or an image folder)
    reference: str | None = None

    @property
    def paths(self) -> list[str]:
        return [f[0] for f in self.files]

    def counts(self) -> dict[str, int]:
        """The file counters: listed = new + changed + again + skipped."""
        read = len(self.files)
        return {"files_listed": self.listed, "files_new": read - self.changed - self.again,
                "files_changed": self.changed, "files_again": self.again,
                "files_skipped": self.listed - read}


def plan_files(lake: Lakehouse, fmt: str, path: str, source: str, kind: str,
               changed_files: str = "error", table: str | None = None) -> FilePlan:
    """List source ``source`` (format ``fmt`` at ``path``) and choose the files to read: those
    not in the record, and (``changed_files: reingest``) those whose size or modification time
    changed; one listing and one Spark job, whose result is the files to read (and one file read
before, unchanged, to check the new ones against: ``reference``). When ``table``
    (where the rows go) does not exist, the record is not trusted: every file is read."""
    listed = source_files(lake.spark, fmt, path)
    recorded = lake.exists(INGEST_FILES)
    trusted = table is None or lake.exists(table)
    if trusted and recorded:
        seen = (lake.read(INGEST_FILES).where((F.col("kind") == kind)
                                              & (F.col("source") == source))
                .select("path", F.col("size").alias("was_size"),
                        F.col("modified").alias("was_modified")))
        listed = listed.join(seen, "path", "left")
    else:
        listed = (listed.withColumn("was_size", F.lit(None).cast("long"))
                  .withColumn("was_modified", F.lit(None).cast("timestamp")))
    same = ((F.col("was_size") == F.col("length"))
            & (F.col("was_modified") == F.col("modified")))
    state = F.when(F.col("was_size").isNull(), "new").when(~same, "changed")
    whole = F.lit(True)
    if fmt == "folder":  # by stem: a touched stem is read whole; a stem's half is not recorded
        listed, state, whole = _by_stem(listed, state)
    todo = F.struct("path", "length", F.unix_micros("modified").alias("modified"),
                    state.alias("state"), "was_size",
                    F.unix_micros("was_modified").alias("was_modified"), whole.alias("whole"))
    ref = _reference(fmt)
    row = listed.agg(F.count("*"), F.collect_list(F.when(state.isNotNull(), todo)),
                     F.min(F.when(state.isNull() & ref, F.col("path")))).first()
    order = {"new": 0, "stem": 1, "changed": 2}  # changed last: record_files relies on it
    todo_rows = sorted(row[1], key=lambda r: (order[r.state], r.path))
    changed = [r for r in todo_rows if r.state == "changed"]
    if changed and changed_files != "reingest":
        raise ChangedFileError(redact_text(changed_message(source, kind, changed)))
    files = [(r.path, int(r.length), r.modified) for r in todo_rows]
    again = sum(r.state == "stem" for r in todo_rows)
    partial = frozenset(r.path for r in todo_rows if not r.whole)
    return FilePlan(kind, source, int(row[0]), files, len(changed), again, partial,
                    trusted or not recorded, row[2] if files else None)


def _by_stem(listed: DataFrame, state: Column) -> tuple[DataFrame, Column, Column]:
    """An image folder's listing with each file's stem: the state of a recorded, unchanged file
    of a stem that has a new or changed file becomes ``stem`` (read again with it); ``whole``:
    the stem has an image and a ``.txt`` caption (its files may be recorded)."""
    ext = F.lower(F.regexp_extract("path", r"\.([^./]+)$", 1))
    stem = Window.partitionBy(F.regexp_replace("path", r"\.[^./]+$", ""))

    def has(cond: Column) -> Column:
        return F.max(cond.cast("int")).over(stem) == 1

    listed = (listed.withColumn("_touched", has(state.isNotNull()))
              .withColumn("_whole", has(ext.isin(*IMAGE_EXTS)) & has(ext == "txt")))
    return listed, F.coalesce(state, F.when(F.col("_touched"), "stem")), F.col("_whole")


def _reference(fmt: str) -> Column:
    """Which recorded files may stand for the ones read before (:attr:`FilePlan.reference`):
    a format's parquet files (DataComp metadata, img2dataset sidecars), any delimited file;
    none of an image folder (its files have no schema)."""
    if fmt in ("csv", "tsv"):
        return F.lit(True)
    if fmt == "folder":
        return F.lit(False)
    return F.col("path").endswith(".parquet") & ~F.col("path").endswith("_stats.parquet")


def changed_message(source: str, kind: str, changed: list) -> str:
    """One paragraph naming the changed files and how to read them again."""
    shown = "; ".join(f"{r.path} (size {r.was_size} -> {r.length}, modified "
                      f"{_utc(r.was_modified)} -> {_utc(r.modified)})" for r in changed[:EXAMPLES])
    more = f" and {len(changed) - EXAMPLES} more" if len(changed) > EXAMPLES else ""
    return (f"ingest source {source} ({kind}): {len(changed)} file(s) changed since ingest read "
            f"them: {shown}{more}. Ingest never re-reads a file silently: put new rows in new "
            "files, or re-run with --set ingest.changed_files=reingest to read the changed "
            "files again (rows whose uid is already in bronze stay as they are)")


def _utc(micros: int) -> str:
    return datetime.fromtimestamp(micros / 1e6, timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC")


def rows_by_file(df: DataFrame, plan: FilePlan) -> tuple[dict[str, int], int]:
    """Rows of ``df`` (a frame read from ``plan``'s files, with ``source_file``) per planned
    file, and the rows whose file is none of them. Counted on the executors; one row per file
    reaches the driver. A path Spark gives URL-encoded (parquet's ``_metadata.file_path``) is
    matched decoded."""
    planned = set(plan.paths)
    rows = dict.fromkeys(plan.paths, 0)
    stray = 0
    for source_file, n in df.groupBy("source_file").count().collect():
        key = source_file if source_file in planned else unquote(source_file or "")
        if key in planned:
            rows[key] += n
        else:
            stray += n
    return rows, stray


def record_files(lake: Lakehouse, plan: FilePlan, rows: dict[str, int], run_id: str) -> int:
    """Record ``plan``'s files as read: an insert-only MERGE on (kind, source, path), after
    deleting the rows of the changed files it read again (of every file, when the record was
    not trusted); returns the files recorded."""
    records = [(plan.kind, plan.source, path, size, modified, rows.get(path, 0), run_id)
               for path, size, modified in plan.files]  # new, again with their stem, changed
    kept = [r for r in records if r[2] not in plan.partial]  # a stem's half: read again later
    df = (local_frame(lake.spark, kept, LOCAL)
          .select("kind", "source", "path", "size",
                  F.timestamp_micros("modified_us").alias("modified"), "rows", "run_id",
                  F.current_timestamp().alias("ingested_at")))
    again = records if not plan.trusted else records[len(records) - plan.changed:]
    if again:
        changed = local_frame(lake.spark, [r[:3] for r in again],
                              "kind string, source string, path string")
        lake.delete_keys(changed, INGEST_FILES, KEYS, "ingest: changed files read again")
    return lake.insert_new(df, INGEST_FILES, KEYS)
