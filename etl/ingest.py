"""Ingest raw inputs into the bronze Delta table.

Every row read ends in exactly one place: bronze (new or already present), the quarantine
table (an error, or a duplicate uid within the same input), or nowhere because a takedown names
it (``blocked``: a ledger selector matches it, or its uid was removed; :mod:`etl.takedown`). The
counts add up: ``read = new + already_present + in_input_duplicates + quarantined + blocked``.

Only files not read before are read (:mod:`etl.ingestfiles`): ``rows_read``, the rows counted per
file read, must equal ``read``; a source with nothing new is not read and commits nothing.
"""

from __future__ import annotations

from dataclasses import dataclass

import pandas as pd
from pyspark import StorageLevel
from pyspark.sql import DataFrame, SparkSession, Window
from pyspark.sql import functions as F
from pyspark.sql import types as T

from etl.config import Config, IngestConf, SourceConf, TakedownConf
from etl.fs import join
from etl.ingestfiles import FilePlan, plan_files, record_files, rows_by_file
from etl.lease import holds
from etl.readers import SIZED_FORMATS, read_source
from etl.redact import redact_text
from etl.sample import write_sample
from etl.spark import session_conf
from etl.tables import BROADCAST_KEYS, BRONZE, EVAL_IMAGES, QUARANTINE, Lakehouse
from etl.takedown.match import blocked_rows
from etl.tarshards import header_size
from etl.work import NEW, TOUCHED, work

UID_RE = r"^[0-9a-f]{32}$"
ASCII_SPACE = " \t\n\x0b\f\r"  # what a Java regex's \s matches: captions are trimmed of it
UNCOMPRESSED_CACHE = "spark.sql.inMemoryColumnarStorage.compressed"
METADATA_FORMATS = ("datacomp", "csv", "tsv")  # url + caption rows, no image bytes
MAX_CAPTION_CHARS = IngestConf().max_caption_chars
BROADCAST_DUPLICATES = IngestConf().broadcast_duplicates
ROW_ID = ["source_file", "source_pos"]  # an input row's identity
NOTHING_READ = ("read", "quarantined", "in_input_duplicates", "blocked", "new",
                "already_present", "rows_read")


def resolve_sources(cfg: Config, lake: Lakehouse, sources: list[SourceConf],
                    eval_set: bool = False) -> list[tuple[SourceConf, str]]:
    """(source, path) pairs; a ``sample`` source is generated on first use."""
    out = []
    for src in sources:
        if src.format == "sample":
            path = join(ensure_sample(cfg, lake), "eval" if eval_set else "pool")
            fmt = "folder" if eval_set else "img2dataset"
            out.append((SourceConf(format=fmt, path=path, name="sample"), path))
        else:
            out.append((src, src.path))
    return out


def ensure_sample(cfg: Config, lake: Lakehouse) -> str:
    """Write the sample pool at ``sample.out_dir`` (any URL; relative: under the lakehouse root)
    unless it is already there."""
    root = lake.resolve(cfg.sample.out_dir)
    if not lake.store.exists(join(root, "_SUCCESS")):
        s = cfg.sample
        counts = write_sample(root, s.n_pairs, s.eval_size, s.seed, s.shard_size, lake.store)
        print(redact_text(f"sample pool written to {root}: {counts}"))
    return root


def normalize(raw: DataFrame, source: str, run_id: str, images: bool = True,
              max_caption_chars: int = MAX_CAPTION_CHARS) -> DataFrame:
    """Raw frame -> bronze columns plus ``_reason`` (null for good rows). ``images=False``
    (metadata-only sources, and readers that sized the images already: ``SIZED_FORMATS``)
    skips reading image headers here, so no Python worker is started for them.
    A caption longer than ``max_caption_chars`` is quarantined."""
    text = F.btrim(F.col("text"), F.lit(ASCII_SPACE))  # btrim, not a regex: cheaper per row
    given_uid = F.lower(F.trim(F.col("uid")))
    reason = (F.when(F.col("error").isNotNull(), F.col("error"))
              .when(text.isNull() | (text == ""), F.lit("text: empty or missing caption"))
              .when(F.length(text) > max_caption_chars,
                    F.concat(F.lit("text: caption is "), F.length(text).cast("string"),
                             F.lit(f" characters, over ingest.max_caption_chars "
                                   f"{max_caption_chars}; raise it to keep such captions")))
              .when(F.col("url").isNull() | (F.trim("url") == ""), F.lit("url: empty or missing"))
              .when(given_uid.isNotNull() & ~given_uid.rlike(UID_RE),
                    F.concat(F.lit("uid: "), F.col("uid"), F.lit(" is not 32 hex characters"))))
    uid = F.coalesce(given_uid, F.md5(F.concat_ws("\u0000", F.col("url"), text)))
    given_md5 = F.lower(F.col("md5")) if "md5" in raw.columns else F.lit(None).cast("string")
    df = (raw.withColumn("_reason", reason).withColumn("uid", uid).withColumn("text", text)
          .withColumn("sha256", F.coalesce(F.sha2("image", 256), F.lower("sha256")))
          .withColumn("md5", F.coalesce(F.md5("image"), given_md5)))
    if images:
        df = (df.withColumn("_size", F.pandas_udf(image_size, SIZE)(F.col("image")))
              .withColumn("width", F.coalesce(F.col("_size.width"), F.col("width")))
              .withColumn("height", F.coalesce(F.col("_size.height"), F.col("height")))
              .drop("_size"))
    return (df.withColumn("source", F.lit(source)).withColumn("ingest_time", F.current_timestamp())
            .withColumn("run_id", F.lit(run_id)))


SIZE = T.StructType([T.StructField("width", T.IntegerType()),
                     T.StructField("height", T.IntegerType())])


def image_size(images: pd.Series) -> pd.DataFrame:
    """Width/height from the image header (no full decode); null when unreadable. Wrapped as a
    pandas UDF where it is used (a UDF made at import is bound to one session kind)."""
    return pd.DataFrame([header_size(data) for data in images], columns=["width", "height"],
                        dtype="Int32")


@dataclass
class Split:
    """A normalized frame split three ways; ``keys`` (the duplicates' keys, when there are
    any) is cached until :meth:`release`."""

    unique: DataFrame
    dups: DataFrame
    errors: DataFrame
    n_dups: int
    keys: DataFrame | None

    def release(self) -> None:
        if self.keys is not None:
            self.keys.unpersist()


def split(df: DataFrame, broadcast_max: int = BROADCAST_DUPLICATES,
          any_dups: bool = True) -> Split:
    """Good unique rows, in-input duplicates (with their count) and errors of a normalized
    frame; the first row of a uid (by file, position) is its unique row.

    ``any_dups=False`` (the caller counted as many distinct uids as good rows) skips ranking.
    Otherwise only ``(uid, source_file, source_pos)`` is shuffled to rank each uid's rows
    (never the rows themselves, or their image bytes): the duplicates' keys are then split from
    the rows with a broadcast join up to ``broadcast_max`` keys, and a shuffle join only above
    that (a pathological input, e.g. one uid throughout).
    """
    errors = df.where(F.col("_reason").isNotNull())
    good = df.where(F.col("_reason").isNull())
    rows = good.drop("_reason", "error", "raw")
    if not any_dups:
        return Split(rows, good.where(F.lit(False)), errors, 0, None)
    w = Window.partitionBy("uid").orderBy("source_file", "source_pos")
    dup_keys = (good.select("uid", "source_file", "source_pos")
                .withColumn("_rank", F.row_number().over(w))
                .withColumn("_first",
                            F.first(F.concat_ws("#", "source_file", "source_pos")).over(w))
                .where("_rank > 1").select("source_file", "source_pos", "_first")
                .persist(StorageLevel.MEMORY_AND_DISK))
    n_dups = dup_keys.count()
    keys = F.broadcast(dup_keys) if n_dups <= broadcast_max else dup_keys
    on = ["source_file", "source_pos"]
    unique = rows.join(keys, on, "left_anti")
    dups = (good.join(keys, on, "inner")
            .withColumn("_reason", F.concat(F.lit("duplicate uid within input; first at "),
                                            F.col("_first"))).drop("_first"))
    return Split(unique, dups, errors, n_dups, dup_keys)


def to_quarantine(df: DataFrame, kind: str) -> DataFrame:
    """Quarantine rows: where the row came from, and why."""
    return df.select(
        "source", "source_file", "source_pos", F.lit(kind).alias("kind"),
        F.col("_reason").alias("reason"), "uid", F.make_valid_utf8("url").alias("url"),
        F.make_valid_utf8(F.substring("text", 1, 1000)).alias("text"),
        F.make_valid_utf8(F.substring("raw", 1, 1000)).alias("raw"), "ingest_time", "run_id")


def ingest_frame(lake: Lakehouse, raw: DataFrame, source: str, run_id: str,
                 table: str = BRONZE, images: bool = True,
                 max_caption_chars: int = MAX_CAPTION_CHARS,
                 broadcast_duplicates: int = BROADCAST_DUPLICATES,
                 takedown: TakedownConf | None = None,
                 files: FilePlan | None = None) -> dict[str, int]:
    """Normalize ``raw`` and merge it into ``table`` (insert-only on uid), leaving out the rows
    a takedown names (``takedown``: the ledger's settings); returns the counts. ``files``: the
    files ``raw`` was read from, recorded as read once the rows are in (counts ``rows_read``,
    which must equal ``read``, before any write)."""
    df = normalize(raw, source, run_id, images, max_caption_chars)
    df = df.persist(StorageLevel.MEMORY_AND_DISK)
    parts = stopped = None
    try:
        good_uid = F.when(F.col("_reason").isNull(), F.col("uid"))  # never null: see normalize
        # the pass that fills the cache fills it uncompressed: trying the columnar encodings
        # on high-cardinality text costs more than it saves
        with session_conf(df.sparkSession, {UNCOMPRESSED_CACHE: "false"}):
            read, quarantined, distinct = df.agg(  # one pass
                F.count("*"), F.count("_reason"), F.count_distinct(good_uid)).first()
        if files is not None:
            per_file, stray = rows_by_file(df, files)
            check_files_read(read, per_file, stray)
        kept, blocked, rest = df, 0, read
        stopped = blocked_rows(lake, takedown or TakedownConf(), df, ROW_ID)
        if stopped is not None:
            stopped = stopped.persist()
            blocked = stopped.count()
        if blocked:  # counted apart: read = rest + blocked is checked, not assumed
            kept = df.join(stopped, ROW_ID, "left_anti")
            rest, quarantined, distinct = kept.agg(
                F.count("*"), F.count("_reason"), F.count_distinct(good_uid)).first()
        parts = split(kept, broadcast_duplicates, any_dups=rest - quarantined > distinct)
        unique, dups, errors = parts.unique, parts.dups, parts.errors
        counts = {"read": read, "quarantined": quarantined, "in_input_duplicates": parts.n_dups,
                  "blocked": blocked}
        if lake.exists(table) and "md5" not in lake.read(table).columns:  # made before md5
            lake.spark.sql(f"ALTER TABLE {lake.name(table)} ADD COLUMNS (md5 STRING)")
        counts["already_present"], counts["new"] = insert_absent(
            lake, unique, table, rest - quarantined - parts.n_dups)
        bad = to_quarantine(errors, "error").unionByName(to_quarantine(dups, "duplicate"))
        keys = ["source_file", "source_pos"]
        if quarantined + parts.n_dups:
            filed = (lake.count_present(bad, QUARANTINE, keys)
                     + lake.insert_new(bad, QUARANTINE, keys))
        else:  # nothing to file: the table only has to exist (no jobs over an empty frame)
            lake.ensure(QUARANTINE, bad.schema)
            filed = 0
    finally:
        if parts is not None:
            parts.release()
        if stopped is not None:
            stopped.unpersist()
        df.unpersist()
    assert_identity(counts)
    assert_quarantined(counts, filed)
    if files is not None:  # the last commit: a run stopped before it reads these files again
        record_files(lake, files, per_file, run_id)
        counts["rows_read"] = sum(per_file.values())
    return counts


def insert_absent(lake: Lakehouse, rows: DataFrame, table: str, total: int) -> tuple[int, int]:
    """Insert the ``rows`` (``total`` unique uids) whose uid ``table`` lacks: (rows already
    there, rows inserted), each counted on its own (a semi-join before the insert; the
    insert's commit). None new: no commit.

    Under this process's lakehouse lease no other run writes meanwhile, so the rows the
    semi-join did not find are appended: one pass over the table's uids. Without the lease
    an insert-only ``MERGE`` (a second pass) keeps a concurrent writer's rows from doubling.
    """
    if not lake.exists(table) or not holds(lake):
        return lake.count_present(rows, table, ["uid"]), lake.insert_new(rows, table, ["uid"])
    if total == 0:
        return 0, 0
    before = lake.version(table)
    found = lake.present_keys(rows, table, ["uid"]).persist(StorageLevel.MEMORY_AND_DISK)
    try:
        present, keys = found.agg(F.sum("_n"), F.count("*")).first()
        if present == total:
            return int(present), 0
        new = rows
        if keys:
            side = F.broadcast(found) if keys <= BROADCAST_KEYS else found
            new = rows.join(side.select(F.col("_k0").alias("uid")), "uid", "left_anti")
        holds(lake)  # LeaseLost, rather than an append after another run took over
        inserted = lake.append_counted(new, table)
        if lake.version(table) != before + 1:  # another commit landed since the key check
            _check_unique(lake, table, new)
        return int(present or 0), inserted
    finally:
        found.unpersist()


def _check_unique(lake: Lakehouse, table: str, new: DataFrame) -> None:
    """Fail loudly when a uid just appended to ``table`` is there twice (a writer outside the
    lease inserted it meanwhile)."""
    twice = (lake.read(table).join(new.select("uid"), "uid", "left_semi").groupBy("uid")
             .count().where(F.col("count") > 1).limit(1).collect())
    if twice:
        raise RuntimeError(f"{table} holds uid {twice[0]['uid']} twice: another writer "
                           "inserted rows while this ingest held the lease; delete the "
                           "duplicates (DESCRIBE HISTORY shows both commits) before re-running")


def check_files_read(read: int, per_file: dict[str, int], stray: int) -> None:
    """Every row read came from a file the listing chose (counted per file), or fail before
    any write."""
    if stray or sum(per_file.values()) != read:
        raise RuntimeError(f"ingest read {read} rows, {stray} of them from files its listing did "
                           "not choose; the record of ingested files would be wrong, so nothing "
                           "was written")


def assert_identity(c: dict[str, int]) -> None:
    """read = new + already present + in-input duplicates + quarantined + blocked, or fail
    loudly.

    Each term is counted on its own (``new`` from the insert's Delta commit, ``already_present``
    by a semi-join against the table before it), so a row the insert lost or doubled, or a row
    the split dropped, breaks the sum.
    """
    total = (c["new"] + c["already_present"] + c["in_input_duplicates"] + c["quarantined"]
             + c.get("blocked", 0))
    if total != c["read"]:
        raise RuntimeError(f"ingest counts do not add up: {c} (sum {total} != read {c['read']}); "
                           "rows were lost or written twice: check the bronze table's last "
                           "commit (DESCRIBE HISTORY) before re-running")


def assert_quarantined(c: dict[str, int], filed: int) -> None:
    """Every error and in-input duplicate is in the quarantine table (new or already there)."""
    expected = c["quarantined"] + c["in_input_duplicates"]
    if filed != expected:
        raise RuntimeError(f"quarantine holds {filed} of this input's {expected} quarantined "
                           f"and duplicate rows (counts {c}); rows were lost or written twice")


def ingest(spark: SparkSession, cfg: Config, lake: Lakehouse, run_id: str) -> dict[str, int]:
    """Ingest all configured pool sources into bronze and eval sources into the eval table."""
    totals: dict[str, int] = {}
    for table, sources, is_eval in ((BRONZE, cfg.ingest.sources, False),
                                    (EVAL_IMAGES, cfg.ingest.eval_sources, True)):
        # list and read every source first so a structural error, or a changed file, stops the
        # job before any write
        frames = []
        for src, path in resolve_sources(cfg, lake, sources, is_eval):
            plan = plan_files(lake, src.format, path, src.name or src.format,
                              "eval" if is_eval else "pool", cfg.ingest.changed_files, table)
            raw = None  # nothing new: not read (an empty source is, to fail as it always did)
            if plan.files or not plan.listed:
                raw = read_source(spark, src, path, lake.staging("json"),
                                  plan.paths if plan.listed else None, plan.reference)
            frames.append((src, plan, raw))
        for src, plan, raw in frames:
            name = src.name or src.format
            counts = dict.fromkeys(NOTHING_READ, 0) if raw is None else ingest_frame(
                lake, raw, name, run_id, table,
                images=src.format not in METADATA_FORMATS + SIZED_FORMATS,
                max_caption_chars=cfg.ingest.max_caption_chars,
                broadcast_duplicates=cfg.ingest.broadcast_duplicates,
                takedown=cfg.takedown, files=plan if plan.listed else None)
            counts = {**counts, **plan.counts()}
            pool = lake.read(table).count() if lake.exists(table) else 0  # from the Delta log
            counts.update(work(counts["new"], counts["read"], pool))
            lake.record_stats(run_id, f"ingest:{table}:{name}", counts)
            print_counts(f"{table} <- {name} ({src.path})", counts)
            for k, v in counts.items():
                totals[f"{table}.{k}"] = totals.get(f"{table}.{k}", 0) + v
    got = {m: totals.get(f"{BRONZE}.{m}", 0) for m in (NEW, TOUCHED)}
    pool = lake.read(BRONZE).count() if lake.exists(BRONZE) else 0
    return {**totals, **work(got[NEW], got[TOUCHED], pool)}


def print_counts(title: str, c: dict[str, int]) -> None:
    files = ("" if "files_listed" not in c else
             f"\n  files: listed {c['files_listed']} = new {c['files_new']} + changed "
             f"{c['files_changed']}"
             + (f" + read again with their stem {c['files_again']}" if c.get("files_again")
                else "") + f" + skipped {c['files_skipped']} (read before)")
    print(f"ingest {title}{files}\n  read={c['read']} = new {c['new']} + already present "
          f"{c['already_present']} + in-input duplicates {c['in_input_duplicates']} "
          f"+ quarantined {c['quarantined']}" + (f" + blocked by takedowns {c['blocked']}"
                                                  if c.get("blocked") else ""))

