"""``dfn-curate takedown apply``: resolve the ledger to uids and remove them everywhere.

1. Every selector is matched against bronze, the eval images and the quarantine
   (:func:`etl.takedown.match.named_rows`); the uids found are expanded to every bronze row with
   the same image bytes (sha256) and, with ``takedown.expand_near``, to the near duplicates
   dedup paired with them. New (uid, request) pairs go to ``takedown_matches``.
2. :func:`propagate` deletes every removed uid from each table of
   :data:`etl.tables.ROW_TABLES` (quarantine rows also by their own selector match, as they may
   have no uid): one ``MERGE ... WHEN MATCHED THEN DELETE`` per table that holds any, tagged
   with the ledger version, after recording which data files held them (the purge proves those
   gone). Tables that covered bronze before stay marked as covering it (removal adds nothing).
   ``dedup_centroids`` (no uid; a centre can resemble a removed image) is deleted whole, files
   included, when ``silver_dedup_signals`` held a removed row: the next dedup run refits it.
3. The published export is republished without them (:mod:`etl.republish`: only the shards
   that held a removed sample are rewritten) and the report page is rewritten.

Applying again finds nothing new and changes no table, export or report. Any pipeline step that ran while a
takedown was applied re-runs :func:`propagate` when it ends (:func:`reconcile`), so a run in
flight cannot bring a removed row back with its later commit.
"""

from __future__ import annotations

import json

from pyspark.sql import DataFrame
from pyspark.sql import functions as F
from pyspark.sql import types as T

from etl.config import Config
from etl.dedupinc import forget_centroids
from etl.redact import redact_text
from etl.spark import local_frame
from etl.tables import (
    BRONZE,
    DEDUP,
    DEDUP_SIGNALS,
    EVAL_IMAGES,
    EVENTS,
    GOLD,
    LEDGER,
    MATCHES,
    QUARANTINE,
    ROW_TABLES,
    TABLES,
    Lakehouse,
)
from etl.takedown.ledger import event, ledger_frame, now, record_events
from etl.takedown.match import named_rows, removed_uids

MATCHES_SCHEMA = T.StructType([
    T.StructField("uid", T.StringType()),
    T.StructField("request_id", T.StringType()),
    T.StructField("via", T.StringType()),
    T.StructField("sha256", T.StringType()),  # the removed image: its later copies are blocked
    T.StructField("ledger_version", T.LongType()),
    T.StructField("run_id", T.StringType()),
    T.StructField("matched_at", T.TimestampType()),
])
ROW_ID = ["source_file", "source_pos"]  # a quarantine row's identity (its uid may be null)
UID_RE = r"^[0-9a-f]{32}$"


def resolve(lake: Lakehouse, cfg: Config, ledger_version: int | None = None) -> DataFrame | None:
    """``(uid, request_id, via, sha256)`` of every row the ledger names, expanded to every row
    with the same image bytes as one it named now or before (and to near duplicates with
    ``takedown.expand_near``); None without a ledger or any table to match."""
    found = []
    for table in (BRONZE, EVAL_IMAGES, QUARANTINE):
        if lake.exists(table):
            named = named_rows(lake, cfg.takedown, lake.read(table), ["uid"], ledger_version)
            if named is None:
                return None
            # a quarantined row may carry a malformed uid: it is removed by its row id only
            found.append(named.where(F.col("uid").rlike(UID_RE)))
    if not found:
        return None
    direct = _union(found)
    images = _images(lake)
    out = [direct]
    if images is not None:
        hashes = direct.join(images, "uid").select("request_id", "sha256")
        if lake.exists(MATCHES):  # images removed before: their copies go too
            hashes = hashes.unionByName(lake.read(MATCHES).where(F.col("sha256").isNotNull())
                                        .select("request_id", "sha256"))
        out.append(hashes.join(images, "sha256").select("uid", "request_id",
                                                        F.lit("same_image").alias("via")))
    if cfg.takedown.expand_near and lake.exists(DEDUP):
        near = (lake.read(DEDUP).where(F.col("dup_reason").startswith("near_"))
                .select("uid", "dup_of"))
        ids = direct.select("uid", "request_id")
        out.append(near.join(ids.withColumnRenamed("uid", "dup_of"), "dup_of")
                   .select("uid", "request_id", F.lit("near_duplicate").alias("via")))
        out.append(near.join(ids, "uid").select(F.col("dup_of").alias("uid"), "request_id",
                                                F.lit("near_duplicate").alias("via")))
    # one row per (uid, request): the most direct way it was reached
    ranked = _union(out).groupBy("uid", "request_id").agg(
        F.min(F.struct(F.col("via").isin("same_image", "near_duplicate"), "via"))
        .alias("_v"))
    matched = ranked.select("uid", "request_id", F.col("_v.via").alias("via"))
    if images is None:
        return matched.withColumn("sha256", F.lit(None).cast("string"))
    # the image hash blocks later copies; a hashed category keeps none in clear
    hashed = (ledger_frame(lake, ledger_version).where("hashed").select("request_id")
              .distinct().withColumn("_hashed", F.lit(True)))
    return (matched.join(images.dropDuplicates(["uid"]), "uid", "left")
            .join(hashed, "request_id", "left")
            .withColumn("sha256", F.when(F.col("_hashed").isNull(), F.col("sha256")))
            .drop("_hashed"))


def _images(lake: Lakehouse) -> DataFrame | None:
    """``(uid, sha256)`` of the pool and eval rows with an image hash (None: no such table)."""
    frames = [lake.read(t).select("uid", "sha256").where(F.col("sha256").isNotNull())
              for t in (BRONZE, EVAL_IMAGES) if lake.exists(t)]
    return _union(frames) if frames else None


def _union(frames: list[DataFrame]) -> DataFrame:
    out = frames[0]
    for f in frames[1:]:
        out = out.unionByName(f)
    return out


def apply(lake: Lakehouse, cfg: Config, run_id: str) -> dict[str, int]:
    """Match the ledger, record new matches, remove them everywhere; returns counts."""
    ledger_version = lake.version(LEDGER)
    matched = resolve(lake, cfg, ledger_version)
    if ledger_version is None or matched is None:
        print("takedown apply: nothing to apply: no ledger yet (`dfn-curate takedown add "
              "--file requests.csv`) or no table to apply it to")
        return {}
    stamped = matched.select("*", F.lit(ledger_version).cast("long").alias("ledger_version"),
                             F.lit(run_id).alias("run_id"),
                             F.lit(now()).cast("timestamp").alias("matched_at"))
    counts = {"new_matches": lake.insert_new(stamped, MATCHES, ["uid", "request_id"])}
    counts.update(propagate(lake, cfg, run_id, ledger_version))
    pending = _unapplied(lake, ledger_version)
    if pending:  # uids per newly applied request (a second apply reads no matches here)
        ids = local_frame(lake.spark, [(r,) for r in pending], "request_id string")
        known = {r[0]: r[1] for r in lake.read(MATCHES).join(ids, "request_id")
                 .groupBy("request_id").agg(F.countDistinct("uid")).collect()}
        record_events(lake, [event(run_id, "applied", rid, rows=known.get(rid, 0),
                                   ledger_version=ledger_version) for rid in pending])
    counts["requests_applied"] = len(pending)
    return counts


def _unapplied(lake: Lakehouse, ledger_version: int) -> list[str]:
    """Request ids of the ledger with no 'applied' event yet (a bounded list: requests)."""
    ids = ledger_frame(lake, ledger_version).select("request_id").distinct()
    if lake.exists(EVENTS):
        done = lake.read(EVENTS).where(F.col("state") == "applied").select("request_id")
        ids = ids.join(done, "request_id", "left_anti")
    return sorted(r[0] for r in ids.collect())


def table_hits(lake: Lakehouse, cfg: Config, table: str, gone: DataFrame) -> tuple[DataFrame,
                                                                                    list[str]]:
    """(the rows of ``table`` a takedown removes, with their data file; the key to delete on)."""
    df = lake.read(table).select("*", F.col("_metadata.file_path").alias("_file"))
    if table != QUARANTINE:
        return df.join(gone, "uid", "left_semi").select("uid", "_file"), ["uid"]
    by_uid = df.join(gone, "uid", "left_semi").select(*ROW_ID, "_file")
    named = named_rows(lake, cfg.takedown, df, ROW_ID)
    by_selector = (df.join(named.select(*ROW_ID).distinct(), ROW_ID, "left_semi")
                   .select(*ROW_ID, "_file"))
    return by_uid.unionByName(by_selector).distinct(), ROW_ID


def propagate(lake: Lakehouse, cfg: Config, run_id: str, ledger_version: int) -> dict[str, int]:
    """Delete every removed uid from every row table (one tagged commit per table holding
    any, its events recorded right after it), keep fresh tables marked fresh, republish the
    export (whenever it still holds a removed uid) and the report."""
    gone = removed_uids(lake)
    if gone is None:
        return {"rows_removed": 0}
    fresh = _fresh_tables(lake)
    counts, removed, after = {}, 0, {}
    for table in ROW_TABLES:
        if not lake.exists(table):
            continue
        hits, keys = table_hits(lake, cfg, table, gone)
        hits = hits.persist()
        try:
            n = hits.count()
            if not n:
                continue
            files = [r[0] for r in hits.select("_file").distinct().collect()]
            if table == DEDUP_SIGNALS and forget_centroids(lake):  # before: a crash redoes it
                print("takedown: dedup_centroids deleted (its centres may resemble a removed "
                      "image); the next dedup run refits them")
            before = lake.version(table)
            deleted = lake.delete_keys(hits, table, keys,
                                       f"dfn-curate takedown ledger_version={ledger_version}")
            after[table] = lake.version(table)
        finally:
            hits.unpersist()
        # recorded at once: a crash later leaves the proof what it needs about this table
        record_events(lake, [event(run_id, "removed", table=table, rows=deleted,
                                   ledger_version=ledger_version, table_version=before)]
                      + [event(run_id, "held", table=table, ledger_version=ledger_version,
                               table_version=before, path=f) for f in files])
        counts[f"removed.{table}"] = deleted
        removed += deleted
        print(f"takedown: {table:<24} {deleted:>8} rows removed")
        if deleted < n:  # a writer deleted some meanwhile; more than n cannot happen by key
            print(f"takedown: {table}: {n - deleted} of its {n} matching rows were already "
                  "gone when the delete ran")
    counts["rows_removed"] = removed
    _mark_fresh(lake, run_id, fresh, after)
    counts.update(_republish(lake, cfg, run_id, ledger_version,
                             counts.get(f"removed.{GOLD}", 0), rewrite_report=bool(removed)))
    return counts


def _fresh_tables(lake: Lakehouse) -> list[tuple[str, str | None, str]]:
    """(table, model, source table) of the derived tables that cover their source now."""
    out = []
    for info in TABLES:
        if info.source is None or not lake.exists(info.name):
            continue
        models = [None]
        if info.per_model:
            models = [r[0] for r in lake.read(info.name).select("model_id").distinct().collect()]
        for model in models:
            built = lake.built_from(info.stats_step, info.version_metric(model))
            if built is not None and not lake.data_changed_since(info.source, built):
                out.append((info.name, model, info.source))
    return out


def _mark_fresh(lake: Lakehouse, run_id: str, fresh: list[tuple[str, str | None, str]],
                after: dict[str, int]) -> None:
    """Removal adds no row: a table that covered its source before still covers it at the
    version the takedown's delete made (``after``; a later commit by another writer is not
    covered)."""
    for table, model, source in fresh:
        if source in after:
            lake.record_built(run_id, table, after[source], model)


def _republish(lake: Lakehouse, cfg: Config, run_id: str, ledger_version: int,
               gold_removed: int, rewrite_report: bool) -> dict[str, int]:
    from etl.republish import republish

    manifest = republish(lake, cfg, run_id, ledger_version, gold_removed)
    counts = {}
    if manifest is not None:
        td = manifest.get("takedown", {})
        counts = {"export_removed": td.get("removed", 0),
                  "shards_rewritten": len(td.get("rewritten_shards", []))}
        record_events(lake, [event(run_id, "exported", ledger_version=ledger_version,
                                   detail=json.dumps({"run_id": manifest["run_id"], **td}))])
        print(redact_text(f"takedown: export republished as run {manifest['run_id']} "
                          f"({counts['export_removed']} samples removed, "
                          f"{counts['shards_rewritten']} shards rewritten)"))
    if cfg.takedown.rewrite_report and (rewrite_report or manifest is not None):
        _rewrite_report(lake, cfg)
    return counts


def _rewrite_report(lake: Lakehouse, cfg: Config) -> None:
    from etl.fs import join
    from etl.report import write_report
    from etl.tables import SELECTION

    out = lake.resolve("report")
    if lake.store.exists(join(out, "index.html")) and lake.exists(SELECTION):
        write_report(lake, cfg, out)
        print(redact_text(f"takedown: report rewritten at {out}"))


def versions(lake: Lakehouse) -> tuple[int | None, ...]:
    """(ledger, matches, events) versions: what :func:`reconcile` compares before and after a
    step (an apply that deletes while the step runs moves the events). Without a ledger, one
    lookup: (None, None, None)."""
    if not lake.exists(LEDGER):
        return None, None, None
    return lake.version(LEDGER), lake.version(MATCHES), lake.version(EVENTS)


def reconcile(lake: Lakehouse, cfg: Config, run_id: str,
              before: tuple[int | None, ...]) -> None:
    """After a step: when requests were added or applied while it ran, apply the ledger again,
    so that the step's own commits cannot keep a row the ledger names (nothing happens when
    neither table moved)."""
    after = versions(lake)
    if after == before or after[0] is None:
        return
    print(f"takedown: the ledger changed while this step ran (ledger, matches, events versions "
          f"{before} -> {after}); applying it again")
    apply(lake, cfg, run_id)
