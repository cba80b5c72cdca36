"""``dfn-curate takedown purge``: physical removal, then a proof written into the ledger.

Per row table (:data:`etl.tables.ROW_TABLES`): ``REORG TABLE ... APPLY (PURGE)`` when it uses
deletion vectors (their rows are still in the data files until then), then ``VACUUM ... RETAIN
<takedown.retain_hours> HOURS``. Delta's retention check stays on: a retention under its
minimum (168 h) is refused unless the session switched the check off, which only tests do.
Export run folders the published manifest does not read are removed.

The proof, one ``proof`` event (JSON) plus a ``verified`` (or ``failed``) event per request:

a. an anti-join count of 0 removed uids in every row table;
b. a raw scan of every data file under each table's folder (Spark's parquet reader on the
   files, not the Delta log: deletion vectors and the log are ignored) finds no removed uid and
   no row a selector names;
c. none of the files that held matching rows (recorded before the delete) exists any more, nor
   any change-data file the delete commits wrote;
d. time travel to each table's pre-delete version fails;
e. no file of the export folder names a removed uid: the uid files, url parquets, shard
   indexes and shard member names of every run folder, and the report page.
"""

from __future__ import annotations

import json
import re
from urllib.parse import unquote

import numpy as np
import pandas as pd
from pyspark.sql import DataFrame
from pyspark.sql import functions as F

from etl.config import Config, ConfigError
from etl.export import output_dir, read_export, runs_of
from etl.fs import join
from etl.redact import redact_text
from etl.spark import local_frame
from etl.tables import EVENTS, LEDGER, ROW_TABLES, Lakehouse
from etl.takedown.ledger import event, record_events
from etl.takedown.match import named_rows, removed_uids
from etl.uidfile import UID_DTYPE, uid_strings

HEX32 = re.compile(rb"[0-9a-f]{32}")
# what reading a version whose files were vacuumed says
GONE = ("FileNotFound", "does not exist", "FAILED_READ_FILE", "DELTA_FILE_NOT_FOUND",
        "DELTA_VERSIONS_NOT_CONTIGUOUS", "VersionNotFound", "DELTA_FILE_OR_DIR_NOT_FOUND",
        "No such file")


def purge(lake: Lakehouse, cfg: Config, run_id: str) -> dict:
    """Purge and vacuum every row table, prune unread export runs, then prove and record."""
    gone = removed_uids(lake)
    if gone is None:
        print("takedown purge: nothing was removed yet (run `dfn-curate takedown apply`)")
        return {}
    hours = cfg.takedown.retain_hours
    for table in ROW_TABLES:
        if lake.exists(table):
            _purge_table(lake, table, hours)
    _prune_exports(lake, cfg)
    ledger_version = lake.version(LEDGER)
    record_events(lake, [event(run_id, "purged", rid, ledger_version=ledger_version)
                         for rid in _requests(lake)])
    return prove(lake, cfg, run_id)


def _purge_table(lake: Lakehouse, table: str, hours: int) -> None:
    name = lake.name(table)
    if _has_deletion_vectors(lake, table):
        lake.spark.sql(f"REORG TABLE {name} APPLY (PURGE)")
    try:
        lake.spark.sql(f"VACUUM {name} RETAIN {int(hours)} HOURS")
    except Exception as exc:  # noqa: BLE001 - Delta's retention check, said as a fix
        if "retentionDurationCheck" not in str(exc) and "DELTA_VACUUM_RETENTION" not in str(exc):
            raise
        raise ConfigError(f"takedown.retain_hours: {hours} h is below Delta's retention "
                          "minimum (168 h by default, delta.deletedFileRetentionDuration); "
                          "files deleted more recently stay until then. Purge again later, or "
                          "lower the table's delta.deletedFileRetentionDuration if no reader "
                          "can still be reading them") from exc


def _has_deletion_vectors(lake: Lakehouse, table: str) -> bool:
    """Whether ``table`` may hold deletion vectors: enabled now, or its protocol has the
    feature (vectors written while it was enabled stay until REORG)."""
    detail = lake.spark.sql(f"DESCRIBE DETAIL {lake.name(table)}").first().asDict()
    enabled = (detail.get("properties") or {}).get("delta.enableDeletionVectors", "false")
    return enabled.lower() == "true" or "deletionVectors" in (detail.get("tableFeatures") or [])


def _prune_exports(lake: Lakehouse, cfg: Config) -> None:
    """Remove every export run the published manifest does not read, and in the older runs it
    still reads shards from, every file but those shards (their uid files, url parquets,
    indexes and rewritten shards held removed samples)."""
    from etl.export import MARKER, prune_runs

    out, store = output_dir(lake, cfg.export), lake.store
    manifest = read_export(out, store)
    if manifest is None:
        return
    prune_runs(store, out, set(runs_of(manifest)))
    wanted = {e["path"] for e in (manifest.get("webdataset") or {}).get("shards", [])}
    for run in set(runs_of(manifest)) - {manifest["run_id"]}:
        base = join(out, "runs", run)
        for name in store.listdir(base):
            if name not in (MARKER, "shards"):
                store.rm(join(base, name))
        for name in store.listdir(join(base, "shards")):
            if join(base, "shards", name) not in wanted:
                store.rm(join(base, "shards", name))


def _requests(lake: Lakehouse) -> list[str]:
    """The requests an apply has covered (a purge and its proof speak for those only)."""
    if not lake.exists(EVENTS):
        return []
    applied = lake.read(EVENTS).where(F.col("state") == "applied").select("request_id")
    return sorted(r[0] for r in applied.distinct().collect())


# ---- the proof -----------------------------------------------------------------------------


def prove(lake: Lakehouse, cfg: Config, run_id: str) -> dict:
    """Check (a)-(e) of the module docstring; record them; raise when any fails."""
    gone = removed_uids(lake).persist()
    try:
        proof = {"a_rows": anti_join_counts(lake, gone),
                 "b_raw_scan": raw_scan(lake, cfg, gone),
                 "c_files_left": files_left(lake),
                 "d_time_travel": time_travel(lake),
                 "e_export": export_hits(lake, cfg, gone)}
    finally:
        gone.unpersist()
    failed = ([f"a:{t}" for t, n in proof["a_rows"].items() if n]
              + [f"b:{t}" for t, n in proof["b_raw_scan"].items() if n]
              + [f"c:{p}" for p in proof["c_files_left"]]
              + [f"d:{t}" for t, ok in proof["d_time_travel"].items() if not ok]
              + [f"e:{p}" for p in proof["e_export"]])
    proof["verified"] = not failed
    proof["failures"] = failed
    ledger_version = lake.version(LEDGER)
    state = "verified" if not failed else "failed"
    record_events(lake, [event(run_id, "proof", ledger_version=ledger_version,
                               detail=json.dumps(proof))]
                  + [event(run_id, state, rid, ledger_version=ledger_version)
                     for rid in _requests(lake)])
    if failed:
        raise RuntimeError(redact_text(f"takedown purge: proof failed: {failed[:10]}"))
    return proof


def anti_join_counts(lake: Lakehouse, gone: DataFrame) -> dict[str, int]:
    """(a) rows of each row table whose uid was removed (all 0 when proven)."""
    return {t: lake.read(t).join(gone, "uid", "left_semi").count()
            for t in ROW_TABLES if lake.exists(t)}


def table_location(lake: Lakehouse, table: str) -> str:
    """The table's folder (from the Delta log's detail, so metastore tables work too)."""
    return lake.spark.sql(f"DESCRIBE DETAIL {lake.name(table)}").select("location").first()[0]


def raw_scan(lake: Lakehouse, cfg: Config, gone: DataFrame) -> dict[str, int]:
    """(b) rows of the raw parquet files under each table folder that a takedown names."""
    out = {}
    for table in ROW_TABLES:
        if not lake.exists(table):
            continue
        location = table_location(lake, table)
        folders = [location] + ([join(location, "_change_data")]  # skipped by a plain listing
                                if lake.store.exists(join(location, "_change_data")) else [])
        try:
            raw = (lake.spark.read.option("recursiveFileLookup", "true")
                   .option("pathGlobFilter", "*.parquet").option("mergeSchema", "true")
                   .parquet(*folders))
        except Exception as exc:  # noqa: BLE001 - a table with no data file at all
            if "UNABLE_TO_INFER_SCHEMA" not in str(exc):
                raise
            out[table] = 0
            continue
        cols = [c for c in ("uid", "url", "sha256", "md5", "source_file", "source_pos")
                if c in raw.columns]
        raw = raw.select(*cols)
        hits = raw.join(gone, "uid", "left_semi").count() if "uid" in cols else 0
        ids = [c for c in ("source_file", "source_pos") if c in cols] or ["uid"]
        named = named_rows(lake, cfg.takedown, raw, ids)
        out[table] = hits + (named.select(*ids).distinct().count() if named is not None else 0)
    return out


def files_left(lake: Lakehouse) -> list[str]:
    """(c) recorded held files, and change-data files of the delete commits, still present."""
    if not lake.exists(EVENTS):
        return []
    ev = lake.read(EVENTS)
    held = [unquote(r[0]) for r in  # _metadata.file_path is a URI: %20 for a space
            ev.where(F.col("state") == "held").select("path").distinct().collect()]
    left = [p for p in held if lake.store.exists(p)]
    for table in ROW_TABLES:
        if lake.exists(table):
            left += [p for p in _change_files(lake, table) if lake.store.exists(p)]
    return left


def _change_files(lake: Lakehouse, table: str) -> list[str]:
    """The ``cdc`` files written by the table's takedown commits (read from their log entries)."""
    versions = [r[0] for r in lake.history(table).where(
        F.col("userMetadata").startswith("dfn-curate takedown")).select("version").collect()]
    location = table_location(lake, table)
    out = []
    for v in versions:
        try:
            lines = lake.store.read_bytes(join(location, "_delta_log", f"{v:020d}.json"))
        except Exception:  # noqa: BLE001 - the log entry expired: its cdc files went with it
            continue
        for line in lines.splitlines():
            cdc = json.loads(line).get("cdc")
            if cdc:
                out.append(join(location, cdc["path"]))
    return out


def time_travel(lake: Lakehouse) -> dict[str, bool]:
    """(d) per table with a takedown delete: True when reading its pre-delete version fails."""
    if not lake.exists(EVENTS):
        return {}
    rows = (lake.read(EVENTS).where(F.col("state") == "removed")
            .select("table_name", "table_version").distinct().collect())
    out = {}
    for table, version in rows:
        key = f"{table}@{version}"
        try:
            # a hash of a column reads every file (a count comes from the log's statistics)
            lake.spark.sql(f"SELECT max(xxhash64(uid)) FROM {lake.name(table)} VERSION AS OF "
                           f"{int(version)}").collect()
            out[key] = False
        except Exception as exc:  # noqa: BLE001 - gone files are what we want; other errors
            if not any(m in str(exc) for m in GONE):  # (throttling, permissions) are no proof
                raise
            out[key] = True
    return out


def export_hits(lake: Lakehouse, cfg: Config, gone: DataFrame) -> list[str]:
    """(e) files under the export folder (every run) and the report that name a removed uid."""
    out, store, spark = output_dir(lake, cfg.export), lake.store, lake.spark
    found = []
    runs_dir = join(out, "runs")
    for run in store.listdir(runs_dir):
        base = join(runs_dir, run)
        for name in ("urls.parquet", "shard_index.parquet"):
            path = join(base, name)
            if store.exists(path) and spark.read.parquet(path).join(
                    gone, "uid", "left_semi").limit(1).count():
                found.append(path)
        npy = join(base, "uids.npy")
        if store.exists(npy) and _npy_hits(lake, npy, gone):
            found.append(npy)
        shards = join(base, "shards")
        names = [n for n in store.listdir(shards) if n.endswith(".tar")]
        if names:
            found += _shard_hits(lake, [join(shards, n) for n in names], gone)
    page = join(lake.resolve("report"), "index.html")
    if store.exists(page):
        tokens = sorted({t.decode() for t in HEX32.findall(store.read_bytes(page))})
        if tokens and local_frame(spark, [(t,) for t in tokens], "uid string").join(
                gone, "uid", "left_semi").limit(1).count():
            found.append(page)
    return found


def _npy_hits(lake: Lakehouse, path: str, gone: DataFrame, chunk: int = 1 << 20) -> bool:
    """Whether a uids.npy holds a removed uid: record ranges of ``chunk`` read on the
    executors, their uids joined with the removed ones (nothing pool-sized on the driver)."""
    store = lake.store
    with store.open(path, "rb") as fh:
        version = np.lib.format.read_magic(fh)
        header = (np.lib.format.read_array_header_1_0 if version == (1, 0)
                  else np.lib.format.read_array_header_2_0)
        shape, _, _ = header(fh)
        start = fh.tell()
    ranges = [(start + i * UID_DTYPE.itemsize, min(chunk, shape[0] - i))
              for i in range(0, shape[0], chunk)]
    if not ranges:
        return False

    def read(batches):
        for pdf in batches:
            for offset, count in zip(pdf["offset"], pdf["count"], strict=True):
                with store.open(path, "rb") as fh:
                    fh.seek(int(offset))
                    arr = np.frombuffer(fh.read(int(count) * UID_DTYPE.itemsize), UID_DTYPE)
                yield pd.DataFrame({"uid": uid_strings(arr)})

    frame = local_frame(lake.spark, ranges, "offset long, count long")
    uids = frame.repartition(min(len(ranges), 64)).mapInPandas(read, "uid string")
    return bool(uids.join(gone, "uid", "left_semi").limit(1).count())


def _shard_hits(lake: Lakehouse, paths: list[str], gone: DataFrame) -> list[str]:
    """Shards (read on the executors, member names only) holding a removed uid's member."""
    store = lake.store

    def members(batches):
        import tarfile

        for pdf in batches:
            rows = []
            for path in pdf["path"]:
                with store.open(path, "rb") as fh, tarfile.open(fileobj=fh, mode="r|") as tar:
                    rows += [(path, m.name.split(".", 1)[0]) for m in tar]
            yield pd.DataFrame(rows, columns=["path", "uid"])

    frame = local_frame(lake.spark, [(p,) for p in paths], "path string")
    names = frame.repartition(min(len(paths), 64)).mapInPandas(members, "path string, uid string")
    return sorted(r[0] for r in names.join(gone, "uid", "left_semi").select("path").distinct()
                  .collect())
