"""Republish the current export without removed samples, rewriting only what held them.

A takedown (:mod:`etl.takedown.apply`) calls :func:`republish` after deleting rows from
``gold_pairs``. When the published export holds any removed uid (found through its shard index
or url parquet, never by reading shards), a new run is published (:func:`etl.export.publish`):

- ``uids.npy`` and ``urls.parquet`` are written again from ``gold_pairs`` (now without them);
- only the WebDataset shards that held a removed sample are rewritten, into the new run's
  folder, their other members copied byte for byte; every other shard is left where it is and
  the new manifest points at it (``webdataset.shards[].path``), so it stays byte-identical;
- the manifest records the ledger version it honours, the samples removed, the rewritten shards
  and the export it replaces. The run folders it still reads are kept when older runs are
  pruned (``runs``).
"""

from __future__ import annotations

import tarfile
import uuid
from datetime import datetime, timezone
from functools import partial

import pandas as pd
from pyspark.sql import DataFrame
from pyspark.sql import functions as F

from etl.config import Config
from etl.export import (
    MANIFEST,
    SHARD_COLUMNS,
    output_dir,
    publish,
    read_export,
    start_run,
    webdataset_manifest,
    write_shards,
)
from etl.fs import Store, join
from etl.redact import redact
from etl.spark import local_frame
from etl.tables import GOLD, Lakehouse
from etl.takedown.match import removed_uids
from etl.uidfile import write_uids_npy


def export_uids(lake: Lakehouse, manifest: dict) -> DataFrame | None:
    """The uids of an export, from its shard index or url parquet (None: neither exists)."""
    wds = manifest.get("webdataset") or {}
    for path in (wds.get("index"), (manifest.get("urls_parquet") or {}).get("path")):
        if path and lake.store.exists(path):
            return lake.spark.read.parquet(path).select("uid")
    return None


def republish(lake: Lakehouse, cfg: Config, run_id: str, ledger_version: int,
              gold_removed: int = 0) -> dict | None:
    """A new published export without the removed uids; None when the published one holds
    none of them (or nothing is published). An export with neither shard index nor url
    parquet (only uids.npy) is taken to hold them when ``gold_removed`` rows just left
    ``gold_pairs``."""
    out, store = output_dir(lake, cfg.export), lake.store
    prev, gone = read_export(out, store), removed_uids(lake)
    if prev is None or gone is None or not lake.exists(GOLD):
        return None
    held = export_uids(lake, prev)
    lost = (held if held is not None else lake.read(GOLD).select("uid").limit(0)).join(
        gone, "uid", "left_semi").persist()
    try:
        n_lost = lost.count() if held is not None else gold_removed
        if not n_lost:
            return None
        if store.exists(join(out, "runs", run_id, MANIFEST)):  # this run exported already
            run_id = f"{run_id}-takedown-{uuid.uuid4().hex[:6]}"
        run_dir = start_run(store, out, run_id)
        kept = lake.read(GOLD).join(gone, "uid", "left_anti")
        manifest = {**{k: v for k, v in prev.items() if k != "diff"},  # not this run's
                    "run_id": run_id, "run_dir": run_dir,
                    "created_at": datetime.now(timezone.utc).isoformat(), "kept": kept.count(),
                    "gold_version": lake.version(GOLD)}
        if "uids_npy" in prev:
            path = join(run_dir, "uids.npy")
            manifest["uids_npy"] = {"path": path, "count": write_uids_npy(kept, path, store)}
        if "urls_parquet" in prev:
            path = join(run_dir, "urls.parquet")
            kept.select("url", F.col("text").alias("caption"), "uid").write.mode(
                "overwrite").parquet(path)
            manifest["urls_parquet"] = {"path": path, "count": manifest["kept"]}
        rewritten, runs = [], [run_id]
        if prev.get("webdataset"):
            manifest["webdataset"], rewritten, runs = _shards(
                lake, prev["webdataset"], kept, lost, run_dir, cfg)
    finally:
        lost.unpersist()
    manifest["runs"] = sorted(set(runs) | {run_id})
    if "lineage" in prev:
        manifest["lineage"] = {**prev["lineage"], "previous_export": prev["run_id"],
                               "tables": {**prev["lineage"]["tables"],
                                          GOLD: manifest["gold_version"]}}
    manifest["takedown"] = {"ledger_version": ledger_version, "removed": n_lost,
                            "previous_run": prev["run_id"], "rewritten_shards": rewritten}
    manifest = redact(manifest)
    publish(store, out, manifest, cfg.export.keep_previous)
    return manifest


def _shards(lake: Lakehouse, wds: dict, kept: DataFrame, lost: DataFrame, run_dir: str,
            cfg: Config) -> tuple[dict, list[str], list[str]]:
    """(the new webdataset section, the shards rewritten, the run folders it reads)."""
    shard_dir, index = join(run_dir, "shards"), join(run_dir, "shard_index.parquet")
    if not wds.get("index") or not lake.store.exists(wds["index"]):  # an export made before
        stats = write_shards(kept.select(*SHARD_COLUMNS[1:]), shard_dir, wds["shard_size"],
                             lake.store, cfg.score.max_image_pixels, index)
        for r in stats:
            r["path"] = join(shard_dir, r["name"])
        return (webdataset_manifest(stats, shard_dir, wds["shard_size"], index if stats else None),
                [r["name"] for r in stats], [])
    entries, rewritten, remaining = drop_from_shards(lake, wds, lost, shard_dir)
    remaining.write.mode("overwrite").parquet(index)
    shards = [entries[k] for k in sorted(entries)]
    runs = {e["path"].rsplit("/", 3)[-3] for e in shards}
    section = webdataset_manifest(shards, shard_dir, wds["shard_size"], index)
    section["skipped"] = wds.get("skipped", 0)
    return section, rewritten, sorted(runs)


def drop_from_shards(lake: Lakehouse, wds: dict, lost: DataFrame,
                     shard_dir: str) -> tuple[dict[int, dict], list[str], DataFrame]:
    """Rewrite into ``shard_dir`` only the shards of ``wds`` (a manifest's webdataset section,
    with its shard index) that hold a ``lost`` uid, without them; a shard left empty is
    removed. Returns (shard number -> manifest entry of every shard still read, rewritten
    names, the shard index without the lost uids: not yet written)."""
    old_index = lake.spark.read.parquet(wds["index"])
    hit = old_index.join(lost, "uid")
    entries = {int(e["name"][:-4]): dict(e) for e in wds["shards"]}
    affected = sorted(int(r[0]) for r in hit.select("shard").distinct().collect())  # shards
    paths = [(s, entries[s]["path"], join(shard_dir, entries[s]["name"])) for s in affected]
    stats = _rewrite(lake, hit, paths)
    rewritten = sorted(entries[shard]["name"] for shard, _, _ in stats)
    emptied = []
    for shard, count, size in stats:
        entry = entries[shard]
        entry.update(count=count, bytes=size, path=join(shard_dir, entry["name"]))
        if not count:  # every sample removed: the shard leaves the export
            lake.store.rm(entry["path"])
            del entries[shard]
            emptied.append(shard)
    remaining = old_index.join(lost, "uid", "left_anti")
    if emptied:  # an emptied shard may still list samples it skipped (over the pixel cap)
        remaining = remaining.where(~F.col("shard").isin(emptied))
    return entries, rewritten, remaining


def _rewrite(lake: Lakehouse, hit: DataFrame, paths: list[tuple]) -> list[tuple[int, int, int]]:
    """Rewrite each affected shard (``paths``: shard, source, destination) without its lost
    uids (``hit``: uid, shard; grouped on the executors, never collected); returns (shard,
    samples kept, bytes) per shard."""
    if not paths:
        return []
    where = local_frame(lake.spark, paths, "shard long, src string, dst string")
    jobs = (hit.groupBy("shard").agg(F.collect_list("uid").alias("gone"))
            .join(where, "shard").repartition(min(len(paths), 64), "shard"))
    done = jobs.mapInPandas(partial(rewrite_shards, store=lake.store),
                            "shard long, count long, bytes long").collect()
    return sorted((r["shard"], r["count"], r["bytes"]) for r in done)


def rewrite_shards(batches, store: Store):
    """mapInPandas body: copy each shard's members except those of the dropped uids."""
    for pdf in batches:
        rows = [rewrite_shard(store, r.src, r.dst, set(r.gone))
                for r in pdf.itertuples(index=False)]
        yield pd.DataFrame([(int(s), c, b) for (s, (c, b)) in zip(pdf["shard"], rows,
                                                                strict=True)],
                           columns=["shard", "count", "bytes"])


def rewrite_shard(store: Store, src: str, dst: str, gone: set[str]) -> tuple[int, int]:
    """Stream ``src`` into ``dst`` without the members of ``gone`` uids (a member's uid is its
    name up to the first dot); returns (samples kept, bytes written)."""
    kept: set[str] = set()
    with store.open(src, "rb") as fin, store.open(dst, "wb") as fout:
        with tarfile.open(fileobj=fin, mode="r|") as tin, \
                tarfile.open(fileobj=fout, mode="w|") as tout:
            for member in tin:
                uid = member.name.split(".", 1)[0]
                if uid in gone:
                    continue
                kept.add(uid)
                tout.addfile(member, tin.extractfile(member) if member.isfile() else None)
        size = fout.tell()
    return len(kept), size

