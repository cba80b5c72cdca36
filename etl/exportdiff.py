"""Exports as a diff of the published one: write only what changed, publish nothing when
nothing did.

When an export is already published under ``export.out_dir`` with the same file kinds and
shard size, :func:`publish_export` compares ``gold_pairs`` now with the ``gold_pairs`` version
that export was made from (its manifest's ``gold_version``, read by Delta time travel; a
takedown's republish records the version after its delete) instead of writing every shard
again. When that version is still the current one, nothing is read at all. Otherwise one
join of uids and row digests on the executors (only counts reach the driver) finds:

- *added*: kept uids the exported version did not hold;
- *removed*: uids it held that are no longer kept;
- *updated*: uids in both whose exported columns (score, url, caption, size) changed.

With none of them the step says ``export unchanged`` and writes nothing: no run folder, no
shards. Otherwise a new run is published (:func:`etl.export.publish`) whose manifest's
``diff`` section states the previous run, the counts and the rewritten / new shards, with
``added_uids.npy`` and ``removed_uids.npy`` (DataComp ``u8,u8`` files) in its run folder:

- the shards that held a removed or updated uid are rewritten without it
  (:func:`etl.republish.drop_from_shards`, the takedown's path); every other shard stays where
  it is, byte-identical, and the manifest points at it (``runs``, ``train_data`` joined by
  ``::`` across folders);
- added and updated samples go into new shards numbered after the previous ones (samples
  without an image are counted as skipped, as a full export counts them);
- the full ``uids.npy`` and ``urls.parquet`` are written again, as in every export.

Anything else (no published export, other file kinds or shard size, a missing shard index, a
``gold_pairs`` version no longer readable: its log gone, or its data files vacuumed or
purged, which the diff's own read finds) gets a full export (:func:`etl.export.export_files`)
and the step prints why.
"""

from __future__ import annotations

from datetime import datetime, timezone

from pyspark import StorageLevel
from pyspark.sql import DataFrame
from pyspark.sql import functions as F

from etl.changefeed import Changes, appended_rows, changed_keys, key_side
from etl.config import Config
from etl.export import (
    FORMAT,
    SHARD_COLUMNS,
    check_out_dir,
    export_files,
    gold_compared,
    gold_pairs,
    kept_rows,
    output_dir,
    prefilter_conf,
    publish,
    read_export,
    start_run,
    train_command,
    webdataset_manifest,
    write_gold,
    write_shards,
)
from etl.fs import join
from etl.lease import check_current, holds
from etl.redact import redact, redact_text
from etl.republish import drop_from_shards
from etl.spark import session_conf
from etl.tables import BRONZE, GOLD, SELECTION, Lakehouse
from etl.tablesync import row_digest, same_shape, sync
from etl.takedown.match import without_removed
from etl.uidfile import merge_uids_npy, write_empty_npy, write_uids_npy
from etl.work import work

GOLD_FROM = "dfn.gold.selection_version"  # the gold_selection version gold_pairs holds
GOLD_AT = "dfn.gold.table_version"  # the gold_pairs version whose rows hold that selection
GOLD_BRONZE = "dfn.gold.bronze_version"  # the bronze version read then (where its feed starts)
META = ("score", "url", "text", "width", "height")  # the exported columns a sample may change
KIND = "_dfn_kind"


def update_gold(lake: Lakehouse) -> dict[str, int]:
    """Make ``gold_pairs`` hold the kept pairs of ``gold_selection`` now. When it records the
    selection version it was made from and the selection's change feed can tell which uids
    changed since, only their rows are read from bronze and compared (uids the selection
    gained since are appended without a lookup, when no commit reached ``gold_pairs`` after
    its record); else every kept row (:func:`etl.export.write_gold`). Records the selection
    version it read and the ``gold_pairs`` version that holds it (a metadata commit, only
    when they moved)."""
    bronze = lake.version(BRONZE)
    version = lake.version(SELECTION)
    props = lake.properties(GOLD) if lake.exists(GOLD) else {}
    since = props.get(GOLD_FROM)
    feed = (changed_keys(lake, SELECTION, int(since), version) if since is not None
            else "gold_pairs records no selection version")
    try:
        counts = (_update_within(lake, feed, props, bronze) if isinstance(feed, Changes)
                  else None)
    finally:
        if isinstance(feed, Changes):
            feed.release()
    if counts is None:
        counts = write_gold(lake)
    held = props.get(GOLD_AT)
    if since != str(version) or held is None or lake.data_changed_since(GOLD, int(held)):
        held = str(lake.version(GOLD))
    if since != str(version) or props.get(GOLD_AT) != held:
        lake.set_properties(GOLD, {GOLD_FROM: str(version), GOLD_AT: held,
                                   GOLD_BRONZE: str(bronze)})
    return counts


def _update_within(lake: Lakehouse, feed: Changes, props: dict[str, str], bronze: int
                   ) -> dict[str, int] | None:
    """:func:`update_gold` over the uids ``feed`` names (None: ``gold_pairs`` has other
    columns now, so it is rewritten). When every kept uid among them was appended to bronze
    since the recorded version (``GOLD_BRONZE``, up to ``bronze``), their rows are read from
    bronze's feed; else from bronze."""
    if feed.keys is None:  # no commit reached the selection since
        return dict.fromkeys(("rows_new", "rows_updated", "rows_removed", "rows_changed",
                              "rows_rewritten"), 0)
    keys = feed.uids()
    selection = appended_rows(lake, feed)  # an append-only window: the feed holds the rows
    if selection is None:
        selection = key_side(lake.read(SELECTION).join(keys, "uid", "left_semi"), feed.count)
    absent = None  # under the lease, and no row changed after its record: gained uids
    if feed.born_kept and props.get(GOLD_AT) is not None and holds(lake) \
            and not lake.data_changed_since(GOLD, int(props[GOLD_AT])):
        absent = feed.born_uids()
    appended = _bronze_appended(lake, props, bronze)
    try:
        return _sync_within(lake, feed, selection, keys, absent, appended)
    finally:
        if appended is not None:
            appended[1].release()


def _sync_within(lake: Lakehouse, feed: Changes, selection: DataFrame, keys: DataFrame,
                 absent: DataFrame | None, appended: tuple[DataFrame, Changes] | None
                 ) -> dict[str, int] | None:
    """Sync ``gold_pairs`` over ``keys``: bronze rows from ``appended`` (bronze's feed) when
    they hold every changed kept uid, else from bronze."""
    with session_conf(lake.spark, prefilter_conf(lake.spark, feed.count)):
        pairs = None
        if appended is not None:  # every kept uid new to bronze: its feed holds their rows
            rows, born = appended
            if kept_rows(selection.join(born.uids(), "uid", "left_anti")).isEmpty():
                pairs = gold_pairs(selection, rows)
        if pairs is None:
            pairs = gold_pairs(selection, lake.read(BRONZE))
        gold = without_removed(lake, pairs)
        if not same_shape(lake, gold, GOLD):
            return None
        gold = gold.persist(StorageLevel.MEMORY_AND_DISK)  # the changed uids' rows: read once
        try:
            return sync(lake, gold, GOLD, compare=gold_compared(gold), within=keys,
                        absent=absent)
        finally:
            gold.unpersist()


def _bronze_appended(lake: Lakehouse, props: dict[str, str], bronze: int
                     ) -> tuple[DataFrame, Changes] | None:
    """The rows bronze's feed appended since ``GOLD_BRONZE`` (to ``bronze``) and the feed's
    keys (release them), when every change since was such an append; else None."""
    since = props.get(GOLD_BRONZE)
    if since is None:
        return None
    found = changed_keys(lake, BRONZE, int(since), bronze)
    if not isinstance(found, Changes):
        return None
    rows = appended_rows(lake, found)
    if rows is None:
        found.release()
        return None
    return rows, found


def publish_export(lake: Lakehouse, cfg: Config, run_id: str, out: str, prev: dict | None,
                   extra: dict) -> dict:
    """Publish ``gold_pairs`` under ``out`` as a diff of ``prev`` (the published manifest)
    when it can be, else in full; returns the published manifest (``prev`` itself when
    nothing changed: ``gold_pairs`` is at the version it exported, or no row differs)."""
    why = _not_diffable(lake, cfg, prev, extra.get("gold_version"))
    if why:
        return _full(lake, cfg, run_id, out, prev, extra, why)
    check_out_dir(out, lake.store, lake.root)
    if extra.get("gold_version") == prev["gold_version"]:  # no commit since: no join either
        return _unchanged(out, prev)
    now = lake.read(GOLD)
    then = lake.spark.sql(f"SELECT * FROM {lake.name(GOLD)} VERSION AS OF "
                          f"{int(prev['gold_version'])}")
    feed = changed_keys(lake, GOLD, int(prev["gold_version"]), extra.get("gold_version"))
    counts = dict.fromkeys(("added", "removed", "updated"), 0)
    born = isinstance(feed, Changes) and feed.keys is not None and feed.only_born()
    if born:  # every changed uid was inserted since: added, and no row is read
        changes = feed.keys.select("uid", F.lit("added").alias(KIND))
    else:
        if isinstance(feed, Changes) and feed.keys is not None:  # compare only its uids
            keys = feed.uids()
            now, then = now.join(keys, "uid", "left_semi"), then.join(keys, "uid", "left_semi")
        changes = _changes(now, then).persist(StorageLevel.MEMORY_AND_DISK)
    try:
        try:  # the real read of the exported gold_pairs version
            if born:
                counts["added"] = feed.born_kept
            else:
                counts.update({r[0]: r[1] for r in changes.groupBy(KIND).count().collect()})
        except Exception as exc:  # noqa: BLE001 - only missing files are handled
            if not _files_missing(exc):
                raise
            return _full(lake, cfg, run_id, out, prev, extra,
                         f"the files of gold_pairs version {prev['gold_version']} are gone "
                         f"(VACUUM or a takedown purge): {_first_line(exc)}")
        if not any(counts.values()):
            return _unchanged(out, prev)
        parts = {k: changes.where(F.col(KIND) == k).select("uid") for k in counts}
        return _publish_diff(lake, cfg, run_id, out, prev, extra, parts, counts)
    finally:
        changes.unpersist()
        if isinstance(feed, Changes):
            feed.release()


def _changes(now: DataFrame, then: DataFrame) -> DataFrame:
    """``(uid, kind)`` of every uid added to, removed from or updated in (an exported column
    differs) ``now`` relative to ``then``: one join of uids and row digests (only keys and
    hashes are shuffled, never captions or image bytes)."""
    cols = [c for c in META if c in now.columns and c in then.columns]
    new = now.select("uid", F.lit(True).alias("_now"), row_digest(cols).alias("_h_now"))
    old = then.select("uid", F.lit(True).alias("_then"), row_digest(cols).alias("_h_then"))
    kind = (F.when(F.col("_then").isNull(), "added").when(F.col("_now").isNull(), "removed")
            .when(~F.col("_h_now").eqNullSafe(F.col("_h_then")), "updated"))
    return (new.join(old, "uid", "full_outer").withColumn(KIND, kind)
            .where(F.col(KIND).isNotNull()).select("uid", KIND))


def _unchanged(out: str, prev: dict) -> dict:
    print(redact_text(f"export: unchanged; run {prev['run_id']} stays published ({out})"))
    return prev


def _not_diffable(lake: Lakehouse, cfg: Config, prev: dict | None,
                  current: int | None) -> str | None:
    """Why ``prev`` cannot be the base of a diff export (None: it can); ``current``: the
    version of ``gold_pairs`` now (the exported one, when equal, is readable: not queried)."""
    conf = cfg.export
    if prev is None:
        return "nothing published"
    kinds = {"uids_npy": conf.uids_npy, "urls_parquet": conf.urls_parquet,
             "webdataset": conf.webdataset}
    if any(bool(prev.get(k)) != v for k, v in kinds.items()):
        return "the file kinds changed"
    wds = prev.get("webdataset") or {}
    if wds and (wds.get("shard_size") != conf.shard_size
                or (wds.get("shards") and not (wds.get("index")
                                               and lake.store.exists(wds["index"])))):
        return "the shard size changed or the shard index is missing"
    if prev.get("gold_version") is None or prev.get("format") != FORMAT:
        return "the published export records no gold_pairs version"
    if prev["gold_version"] == current:
        return None
    try:  # the version's log only (its data files are read by the diff itself)
        lake.spark.sql(f"SELECT uid FROM {lake.name(GOLD)} VERSION AS OF "
                       f"{int(prev['gold_version'])} LIMIT 0").collect()
    except Exception as exc:  # noqa: BLE001 - its log is gone: diff against nothing
        return f"gold_pairs version {prev['gold_version']} is no longer readable: " \
               f"{_first_line(exc)}"
    return None


def _full(lake: Lakehouse, cfg: Config, run_id: str, out: str, prev: dict | None,
          extra: dict, why: str) -> dict:
    """A full export, saying why it is not a diff (when something was published)."""
    if prev is not None:
        print(redact_text(f"export: full export ({why})"))
    return export_files(lake.read(GOLD), out, cfg.export, run_id, extra, lake.store,
                        lake.root, cfg.score.max_image_pixels)


def _files_missing(exc: Exception) -> bool:
    """Whether ``exc`` says data files of a table version are gone (vacuumed / purged)."""
    text = str(exc)
    return any(s in text for s in ("FileNotFound", "FILE_NOT_FOUND", "does not exist",
                                   "No such file"))


def _first_line(exc: Exception) -> str:
    return (str(exc).strip().splitlines() or [type(exc).__name__])[0][:160]


def _publish_diff(lake: Lakehouse, cfg: Config, run_id: str, out: str, prev: dict,
                  extra: dict, parts: dict[str, DataFrame], counts: dict[str, int]) -> dict:
    """Write the changed files of a diff export into run ``run_id`` and publish it."""
    store, conf = lake.store, cfg.export
    now = lake.read(GOLD)
    run_dir = start_run(store, out, run_id)
    manifest = {"format": FORMAT, "run_id": run_id,
                "created_at": datetime.now(timezone.utc).isoformat(), "run_dir": run_dir,
                "kept": now.count(), **extra}
    diff = {"previous_run": prev["run_id"], **counts}
    for kind in ("added", "removed"):
        path = join(run_dir, f"{kind}_uids.npy")
        count = (write_uids_npy(parts[kind], path, store, rows=counts[kind]) if counts[kind]
                 else write_empty_npy(path, store))  # none: no Spark job
        diff[f"{kind}_uids"] = {"path": path, "count": count}
    if conf.uids_npy:
        path = join(run_dir, "uids.npy")
        manifest["uids_npy"] = {"path": path, "count": _uids_file(
            now, prev, diff, path, store, manifest["kept"])}
    if conf.urls_parquet:
        path = join(run_dir, "urls.parquet")
        now.select("url", F.col("text").alias("caption"), "uid").write.mode(
            "overwrite").parquet(path)
        manifest["urls_parquet"] = {"path": path, "count": manifest["kept"]}
    runs = {run_id}
    if conf.webdataset:
        manifest["webdataset"], rewritten, new, runs = _diff_shards(
            lake, cfg, prev["webdataset"], now, parts, run_dir)
        diff.update(rewritten_shards=rewritten, new_shards=new)
    manifest["runs"] = sorted(set(runs) | {run_id})
    manifest["diff"] = diff
    manifest = redact(manifest)
    publish(store, out, manifest, conf.keep_previous)
    return manifest


def _uids_file(now: DataFrame, prev: dict, diff: dict, path: str, store, kept: int) -> int:
    """The full ``uids.npy`` of a diff export: the previous one with the added uids merged in
    and the removed ones taken out (:func:`etl.uidfile.merge_uids_npy`, no Spark job); written
    from ``gold_pairs`` instead when that merge cannot vouch for its result."""
    base = (prev.get("uids_npy") or {}).get("path")
    if base and store.exists(base):
        try:
            count = merge_uids_npy(base, diff["added_uids"]["path"],
                                   diff["removed_uids"]["path"], path, store)
            if count == kept:
                return count
            why = f"{count} uids, not the {kept} kept pairs"
        except (ValueError, OSError) as exc:
            why = _first_line(exc)
        print(redact_text(f"export: uids.npy written from gold_pairs ({why})"))
    return write_uids_npy(now, path, store)


def _diff_shards(lake: Lakehouse, cfg: Config, wds: dict, now: DataFrame,
                 parts: dict[str, DataFrame], run_dir: str
                 ) -> tuple[dict, list[str], list[str], set[str]]:
    """(the webdataset section, rewritten shard names, new shard names, run folders read)."""
    shard_dir, index = join(run_dir, "shards"), join(run_dir, "shard_index.parquet")
    size = cfg.export.shard_size
    lost = parts["removed"].unionByName(parts["updated"])
    if wds.get("shards"):
        entries, rewritten, remaining = drop_from_shards(lake, wds, lost, shard_dir)
        first = 1 + max(int(e["name"][:-4]) for e in wds["shards"])
    else:
        entries, rewritten, remaining, first = {}, [], None, 0
    fresh = now.join(parts["added"].unionByName(parts["updated"]), "uid", "left_semi")
    added_index = join(run_dir, "_added_index.parquet")
    stats = write_shards(fresh.select(*SHARD_COLUMNS[1:]), shard_dir, size, lake.store,
                         cfg.score.max_image_pixels, added_index, first)
    for r in stats:
        r["path"] = join(shard_dir, r["name"])
        entries[r["shard"]] = {k: r[k] for k in ("name", "count", "bytes", "path")}
    if stats:
        new_rows = lake.spark.read.parquet(added_index)
        remaining = new_rows if remaining is None else remaining.unionByName(new_rows)
    shards = [entries[k] for k in sorted(entries)]
    if remaining is not None and shards:
        remaining.write.mode("overwrite").parquet(index)
    if stats:
        lake.store.rm(added_index)
    section = webdataset_manifest(shards, shard_dir, size, index if shards else None)
    section["skipped"] = wds.get("skipped", 0) + sum(r["skipped"] for r in stats)
    runs = {e["path"].rsplit("/", 3)[-3] for e in shards}
    return section, rewritten, [r["name"] for r in stats], runs


def run_export(lake: Lakehouse, cfg: Config, run_id: str) -> dict:
    """Edge: ``gold_selection`` + bronze -> ``gold_pairs`` and the export files; the export
    folder is checked before any write. The step runner (:mod:`etl.steps`) refuses a stale
    selection before calling this."""
    from etl.provenance import export_lineage, read_versions

    out = output_dir(lake, cfg.export)
    check_out_dir(out, lake.store, lake.root)
    read = read_versions(lake)
    update_gold(lake)
    prev = read_export(out, lake.store)
    lineage = export_lineage(lake, cfg, read, prev)
    check_current(lake)  # a run that lost its lease publishes nothing
    manifest = publish_export(lake, cfg, run_id, out, prev,
                              {"gold_table": lake.name(GOLD), "gold_version": lake.version(GOLD),
                               "lineage": lineage})
    wds = manifest.get("webdataset") or {}
    if manifest is prev:  # nothing changed: nothing written
        if wds.get("train_data"):
            print(f"export: train with: {train_command(wds)}")
        lake.record_stats(run_id, "export", work(0, 0, manifest["kept"]))
        return manifest
    counts = {"gold_pairs": manifest["kept"],
              "uids_npy": manifest.get("uids_npy", {}).get("count", 0),
              "shards": len(wds.get("shards", [])), "shard_samples": wds.get("samples", 0),
              "shard_skipped": wds.get("skipped", 0)}
    print(redact_text(f"export: {out} (run {manifest['run_dir']})"))
    diff = {k: v for k, v in (manifest.get("diff") or {}).items() if isinstance(v, int)}
    counts.update(diff)
    for name, value in counts.items():
        print(f"export: {name:<20}{value:>10}")
    if wds.get("train_data"):
        print(f"export: train with: {train_command(wds)}")
    added = diff.get("added", manifest["kept"])
    touched = added + diff.get("updated", 0) + diff.get("removed", 0)
    counts.update(work(added, touched, manifest["kept"]))
    lake.record_stats(run_id, "export", counts)
    return manifest
