"""Export the kept pairs: ``gold_pairs`` (Delta) plus files that training code reads.

``export.out_dir`` (relative to the lakehouse root unless absolute or a URL; any of local,
``s3a://``, ``abfss://``, ``gs://``, ``dbfs:/``) holds one folder per export run and one
published pointer::

    <out>/manifest.json                 the published export (written last, one object PUT)
    <out>/runs/<run_id>/uids.npy        DataComp subset file: dtype ``u8,u8``, sorted, unique
    <out>/runs/<run_id>/shards/00000.tar ...  WebDataset shards (``<uid>.jpg|png|webp``,
                                        ``<uid>.txt``, ``<uid>.json``), written by Spark tasks
    <out>/runs/<run_id>/urls.parquet/   url, caption, uid for re-download with img2dataset
    <out>/runs/<run_id>/manifest.json   the run's own manifest, written after all its files

Publishing needs no rename (object stores have none): a run writes only below its own
``runs/<run_id>/`` prefix and becomes *the* export when ``<out>/manifest.json`` is replaced,
a single-object write that readers see whole or not at all. A crash at any point before that
leaves the previous manifest, and every file it names, untouched. Readers go through
:func:`read_export`; a run folder without its manifest is never read. After publishing, run
folders other than the new one and (``export.keep_previous``) the one it replaced are removed,
so a reader still streaming the previous export finishes; only folders marked as this
project's by a ``_dfn_export`` file (written first) are removed, nothing else under ``<out>``.
Exports into one ``out_dir`` must not run concurrently.

``<out>`` itself must be this project's (:func:`check_out_dir`, before any write): empty or
absent (it is then claimed with an ``<out>/_dfn_export`` marker), or an earlier export (the
marker, or a published ``manifest.json``). A folder holding other files, a Delta table, the
lakehouse root, or one inside a Delta table is refused, naming the folder and the fix.
"""

from __future__ import annotations

import io
import json
import tarfile
from datetime import datetime, timezone
from functools import partial

import numpy as np
import pandas as pd
from pyspark import StorageLevel
from pyspark.sql import DataFrame, Window
from pyspark.sql import functions as F

from etl.config import Config, ConfigError, ExportConf
from etl.fs import Store, ancestors, is_within, join
from etl.redact import redact, redact_text
from etl.spark import local_frame, session_conf
from etl.tables import BRONZE, GOLD, SELECTION, Lakehouse
from udfs.imaging import DEFAULT_MAX_PIXELS, decode_rgb

UID_DTYPE = np.dtype("u8,u8")
ROWS_PER_BUCKET = 200_000  # rows per window partition when numbering samples
# the kept-uid Bloom filter's cap: 8 MB at 8 bits each (Spark's own maximum), as each task on
# the kept side shuffles a filter of that size to the one task that merges them
PREFILTER_MAX_ITEMS = 8_000_000
PREFILTER_BITS_PER_ITEM = 8
SHARD_COLUMNS = ["shard", "uid", "url", "text", "image", "score", "width", "height"]
MANIFEST = "manifest.json"
MARKER = "_dfn_export"
FORMAT = "dfn-curate-export/2"
DELTA_LOG = "_delta_log"
FIX = ("set export.out_dir to a new or empty folder, or to an earlier export's folder (the "
       "default 'export' is under the lakehouse root)")


def gold_pairs(selection: DataFrame, bronze: DataFrame) -> DataFrame:
    """Bronze rows of the kept uids, with their ``score``."""
    return bronze.drop("score").join(kept_rows(selection).select("uid", "score"), "uid")


def kept_rows(selection: DataFrame) -> DataFrame:
    """The selection's kept rows."""
    # `kept <=> true`, not `kept`: a comparison is what Spark takes as a selective filter when
    # it decides on a runtime Bloom filter for a join (see prefilter_conf)
    return selection.where(F.col("kept").eqNullSafe(True))


def prefilter_conf(spark, kept: int) -> dict[str, str]:
    """SQL confs under which :func:`gold_pairs`' join gets Spark's runtime Bloom filter of the
    ``kept`` uids: bronze rows whose uid cannot be kept are dropped at the scan, before the
    shuffle, so much less is shuffled when few rows are kept; the join itself stays exact.

    Spark's defaults build one only for a scan over 10 GB against a kept side under 10 MB, and
    size it for 1M items. Here it is sized for ``kept`` uids at ~2% false positives, up to
    :data:`PREFILTER_MAX_ITEMS` (beyond that it passes more rows, never fewer). Confs already
    set in the session are left as they are."""
    items = max(1, min(kept, PREFILTER_MAX_ITEMS))
    bits = str(items * PREFILTER_BITS_PER_ITEM)
    conf = {"applicationSideScanSizeThreshold": "0", "creationSideThreshold": "1p",
            "expectedNumItems": str(items), "maxNumItems": str(items),
            "numBits": bits, "maxNumBits": bits}
    keys = {f"spark.sql.optimizer.runtime.bloomFilter.{k}": v for k, v in conf.items()}
    return {k: v for k, v in keys.items() if spark.conf.get(k, None) is None}


def write_gold(lake: Lakehouse) -> None:
    """Overwrite ``gold_pairs`` with :func:`gold_pairs` under :func:`prefilter_conf`."""
    selection = lake.read(SELECTION)
    with session_conf(lake.spark, prefilter_conf(lake.spark, kept_rows(selection).count())):
        lake.overwrite(gold_pairs(selection, lake.read(BRONZE)), GOLD)


def output_dir(lake: Lakehouse, conf: ExportConf) -> str:
    """Where exports are published (a URL or an absolute path)."""
    return lake.resolve(conf.out_dir)


# ---- uids.npy ------------------------------------------------------------------------------


def uid_pairs(uids: list[str] | pd.Series) -> np.ndarray:
    """32-hex-digit uids -> ``u8,u8`` records (hi = first 16 digits, lo = last 16)."""
    raw = np.frombuffer(bytes.fromhex("".join(uids)), dtype=">u8").astype("<u8")
    out = np.empty(len(raw) // 2, dtype=UID_DTYPE)
    out["f0"], out["f1"] = raw[0::2], raw[1::2]
    return out


def uid_strings(arr: np.ndarray) -> list[str]:
    """Inverse of :func:`uid_pairs`."""
    return [f"{int(hi):016x}{int(lo):016x}" for hi, lo in arr.tolist()]


def write_uids_npy(df: DataFrame, path: str, store: Store | None = None,
                   rows_per_part: int = 1_000_000) -> int:
    """Write the sorted unique uids of ``df`` as a DataComp subset ``.npy``; returns the count.

    Tasks each write the raw records of one uid range next to ``path``; the driver writes the
    header and streams the parts in range order into ``path`` (16 bytes a uid; no uid is held
    in driver memory), then removes the parts.
    """
    store, path = store or Store(), str(path)
    # the narrow uid column, de-duplicated once and cached: every pass below reads it
    uids = df.select("uid").dropDuplicates(["uid"]).persist(StorageLevel.MEMORY_AND_DISK)
    try:
        bad = uids.where(~F.col("uid").rlike("^[0-9a-f]{32}$")).limit(1).collect()
        if bad:
            raise ValueError(f"uids.npy needs 32 lowercase hex digit uids, got {bad[0]['uid']!r}")
        n = uids.count()
        parts_dir = join(path.rsplit("/", 1)[0], f"_{path.rsplit('/', 1)[-1]}.parts")
        ranged = (uids.repartitionByRange(max(1, -(-n // rows_per_part)), "uid")
                  .sortWithinPartitions("uid"))
        stats = ranged.mapInPandas(partial(uid_part_writer, out=parts_dir, store=store),
                                   "part int, count long, first string, last string").collect()
    finally:
        uids.unpersist()
    stats = sorted((r for r in stats if r["count"]), key=lambda r: r["part"])
    for a, b in zip(stats, stats[1:], strict=False):
        if not a["last"] < b["first"]:
            raise AssertionError("uid ranges of the parts overlap; refusing to write uids.npy")
    total = sum(r["count"] for r in stats)
    header = io.BytesIO()
    np.lib.format.write_array_header_1_0(header, {
        "descr": np.lib.format.dtype_to_descr(UID_DTYPE), "fortran_order": False,
        "shape": (total,)})
    store.concat([join(parts_dir, f"{r['part']:05d}.bin") for r in stats], path,
                 header.getvalue())
    store.rm(parts_dir)
    return total


def uid_part_writer(batches, out: str, store: Store):
    """mapInPandas body: this task's sorted uids as raw ``u8,u8`` records in ``<part>.bin``.

    A retried task rewrites the same part whole; nothing is read before the driver has every
    task's count.
    """
    from pyspark import TaskContext

    part = TaskContext.get().partitionId()
    count, first, last = 0, None, None
    with store.open(join(out, f"{part:05d}.bin"), "wb") as fh:
        for pdf in batches:
            if pdf.empty:
                continue
            fh.write(uid_pairs(pdf["uid"].tolist()).tobytes())
            count += len(pdf)
            first = first or pdf["uid"].iloc[0]
            last = pdf["uid"].iloc[-1]
    yield pd.DataFrame({"part": [part], "count": [count], "first": [first], "last": [last]})


# ---- WebDataset shards ---------------------------------------------------------------------


def number_rows(df: DataFrame, per_bucket: int = ROWS_PER_BUCKET) -> DataFrame:
    """Add ``idx`` 0..n-1, ordered by (hash bucket, uid), without a single-partition window."""
    n = df.count()
    buckets = max(1, -(-n // per_bucket))
    df = df.withColumn("_b", F.pmod(F.xxhash64("uid"), F.lit(buckets)))
    counts = sorted((r["_b"], r["count"]) for r in df.groupBy("_b").count().collect())
    offsets, total = [], 0
    for b, c in counts:
        offsets.append((b, total))
        total += c
    off = local_frame(df.sparkSession, offsets or [(0, 0)], "_b long, _off long")
    w = Window.partitionBy("_b").orderBy("uid")
    return (df.join(F.broadcast(off), "_b")
            .withColumn("idx", F.col("_off") + F.row_number().over(w) - 1).drop("_b", "_off"))


def image_ext(data: bytes) -> str | None:
    """WebDataset extension from the magic bytes (None: needs re-encoding)."""
    if data[:3] == b"\xff\xd8\xff":
        return "jpg"
    if data[:8] == b"\x89PNG\r\n\x1a\n":
        return "png"
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "webp"
    return None


def as_supported(data: bytes, max_pixels: int = DEFAULT_MAX_PIXELS) -> tuple[str, bytes] | None:
    """(ext, bytes) open_clip can read: as is, or re-encoded to JPEG; None (skipped, counted)
    if undecodable or over ``max_pixels`` (read from the header: never decoded)."""
    ext = image_ext(data)
    if ext:
        return None if over_cap(data, max_pixels) else (ext, data)
    img, _ = decode_rgb(data, max_pixels)
    if img is None:
        return None
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=95)
    return "jpg", buf.getvalue()


def over_cap(data: bytes, max_pixels: int) -> bool:
    """True when the image header claims more than ``max_pixels`` pixels (header only)."""
    from PIL import Image

    try:
        with Image.open(io.BytesIO(data)) as img:
            w, h = img.size
    except Exception:  # noqa: BLE001 - only the cap is decided here: unreadable bytes pass
        return False
    return w * h > max_pixels


def _member(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size, info.mtime, info.mode = len(data), 0, 0o644
    tar.addfile(info, io.BytesIO(data))


class _ShardFile:
    """One shard streamed straight to its final name in the (unpublished) run folder."""

    def __init__(self, store: Store, out: str, shard: int, width: int,
                 max_pixels: int = DEFAULT_MAX_PIXELS):
        self.shard, self.count, self.skipped, self.max_pixels = shard, 0, 0, max_pixels
        self.name = f"{shard:0{width}d}.tar"
        self.fh = store.open(join(out, self.name), "wb")
        self.tar = tarfile.open(fileobj=self.fh, mode="w|")

    def add(self, row) -> None:
        got = as_supported(row.image, self.max_pixels)
        if got is None:
            self.skipped += 1
            return
        ext, data = got
        meta = {"uid": row.uid, "url": row.url, "score": _num(row.score),
                "width": _int(row.width), "height": _int(row.height)}
        _member(self.tar, f"{row.uid}.{ext}", data)
        _member(self.tar, f"{row.uid}.txt", (row.text or "").encode())
        _member(self.tar, f"{row.uid}.json", json.dumps(meta).encode())
        self.count += 1

    def close(self) -> dict:
        self.tar.close()
        size = self.fh.tell()
        self.fh.close()
        return {"shard": self.shard, "count": self.count, "skipped": self.skipped, "bytes": size}


def _num(v):
    """A JSON-ready scalar from a pandas cell (None for null/NaN; whole floats as int)."""
    if hasattr(v, "item"):
        v = v.item()
    if v is None or (isinstance(v, float) and np.isnan(v)):
        return None
    return v


def _int(v):
    v = _num(v)
    return None if v is None else int(v)


def shard_writer(batches, out: str, width: int, store: Store,
                 max_pixels: int = DEFAULT_MAX_PIXELS):
    """mapInPandas body: rows sorted by (shard, uid) -> one tar per shard."""
    current, done = None, []
    for pdf in batches:
        for row in pdf.itertuples(index=False):
            if current is None or current.shard != row.shard:
                if current is not None:
                    done.append(current.close())
                current = _ShardFile(store, out, int(row.shard), width, max_pixels)
            current.add(row)
    if current is not None:
        done.append(current.close())
        yield pd.DataFrame(done, columns=["shard", "count", "skipped", "bytes"])


def write_shards(df: DataFrame, out: str, shard_size: int, store: Store | None = None,
                 max_pixels: int = DEFAULT_MAX_PIXELS) -> list[dict]:
    """Write ``df`` (uid, url, text, image, score, width, height) as WebDataset shards.

    Images over ``max_pixels`` (or undecodable ones that need re-encoding) are skipped and
    counted per shard (``skipped``).

    Samples are numbered on uids alone; image bytes then move once, to their shard's task.
    """
    store, out = store or Store(), str(out)
    with_image = df.where(F.col("image").isNotNull())
    ids = number_rows(with_image.select("uid")).select(
        "uid", F.floor(F.col("idx") / F.lit(shard_size)).alias("shard")).persist()
    try:
        n_shards = ids.agg(F.max("shard")).first()[0]
        if n_shards is None:
            return []
        n_shards += 1
        width = max(5, len(str(n_shards - 1)))
        parts = (with_image.join(ids, "uid").select(*SHARD_COLUMNS)
                 .repartition(n_shards, "shard").sortWithinPartitions("shard", "uid"))
        stats = parts.mapInPandas(partial(shard_writer, out=out, width=width, store=store,
                                          max_pixels=max_pixels),
                                  "shard long, count long, skipped long, bytes long").collect()
    finally:
        ids.unpersist()
    stats = sorted((r.asDict() for r in stats), key=lambda r: r["shard"])
    if [r["shard"] for r in stats] != list(range(n_shards)):
        raise AssertionError(f"expected shards 0..{n_shards - 1}, tasks wrote "
                             f"{[r['shard'] for r in stats]}")
    for r in stats:
        r["name"] = f"{r['shard']:0{width}d}.tar"
    return stats


# ---- the output folder ----------------------------------------------------------------------


def check_out_dir(out: str, store: Store, lake_root: str | None = None) -> None:
    """Refuse, before any write, an export folder that is not this project's to fill.

    Allowed: an absent or empty folder, or an earlier export's (:func:`is_export_dir`) that
    holds no Delta table. Refused: the lakehouse root or a folder holding it, a folder inside a
    Delta table (VACUUM would delete the export), a non-empty folder that is not an export. Any
    URL :class:`~etl.fs.Store` serves works the same way.
    """
    out = str(out)
    if lake_root and is_within(lake_root, out):
        what = "is" if is_within(out, lake_root) else "holds"
        raise _refused(f"{out!r} {what} the lakehouse root {lake_root!r}; exporting there "
                       f"would mix export runs with the Delta tables. {FIX}")
    chain = ancestors(out)
    for folder in chain:
        if store.exists(join(folder, DELTA_LOG)):
            where = "is" if folder == chain[0] else f"is inside ({folder!r})"
            raise _refused(f"{out!r} {where} a Delta table folder ({DELTA_LOG}); VACUUM and "
                           f"overwrites there would delete the export or the table. {FIX}")
    names = store.listdir(out)
    if not names:
        return
    if not is_export_dir(out, store, names):
        shown = ", ".join(names[:5]) + (", ..." if len(names) > 5 else "")
        raise _refused(f"{out!r} is not empty ({shown}) and is not a dfn-curate export (no "
                       f"{MARKER} marker or {MANIFEST}); refusing to export into it. {FIX}")
    tables = [n for n in names if store.exists(join(out, n, DELTA_LOG))]
    if tables:
        raise _refused(f"{out!r} holds Delta table(s) {tables}; refusing to export into it. "
                       f"{FIX}")


def _refused(problem: str) -> ConfigError:
    """The error refusing ``export.out_dir``, credentials in its locations redacted."""
    return ConfigError(redact_text(f"export.out_dir: {problem}"))


def is_export_dir(out: str, store: Store, names: list[str] | None = None) -> bool:
    """True when ``out`` carries the export marker or a published export manifest."""
    names = store.listdir(out) if names is None else names
    if MARKER in names:
        return True
    if MANIFEST not in names:
        return False
    try:
        return read_export(out, store) is not None
    except (ValueError, UnicodeDecodeError):
        return False


# ---- the step ------------------------------------------------------------------------------


def export_files(gold: DataFrame, out: str, conf: ExportConf, run_id: str,
                 extra: dict | None = None, store: Store | None = None,
                 lake_root: str | None = None, max_pixels: int = DEFAULT_MAX_PIXELS) -> dict:
    """Write all export files of ``gold`` under ``out/runs/<run_id>/`` and publish them by
    writing ``out/manifest.json`` last; returns the manifest (as written: credentials in its
    locations redacted, :mod:`etl.redact`). ``out`` is checked first (:func:`check_out_dir`;
    ``lake_root``: the lakehouse root it must not be or hold)."""
    store, out = store or Store(), str(out)
    check_out_dir(out, store, lake_root)
    run_dir = join(out, "runs", run_id)
    if store.exists(join(run_dir, MANIFEST)):
        raise ValueError(redact_text(f"export run {run_dir} already exists; use a new run id"))
    if not store.exists(join(out, MARKER)):
        store.write_text(join(out, MARKER), FORMAT)  # claims the folder as an export's
    store.write_text(join(run_dir, MARKER), run_id)
    manifest = redact(_write_all(gold, run_dir, conf, run_id, extra or {}, store, max_pixels))
    previous = read_export(out, store)
    write_manifest(store, run_dir, manifest)
    write_manifest(store, out, manifest)  # the publish: one object, written last
    keep = {run_id} | ({previous["run_id"]} if previous and conf.keep_previous else set())
    prune_runs(store, out, keep)
    return manifest


def _write_all(gold: DataFrame, run_dir: str, conf: ExportConf, run_id: str, extra: dict,
               store: Store, max_pixels: int = DEFAULT_MAX_PIXELS) -> dict:
    manifest = {"format": FORMAT, "run_id": run_id,
                "created_at": datetime.now(timezone.utc).isoformat(), "run_dir": run_dir,
                "kept": gold.count(), **extra}
    if conf.uids_npy:
        path = join(run_dir, "uids.npy")
        manifest["uids_npy"] = {"path": path, "count": write_uids_npy(gold, path, store)}
    if conf.urls_parquet:
        path = join(run_dir, "urls.parquet")
        urls = gold.select("url", F.col("text").alias("caption"), "uid")
        urls.write.mode("overwrite").parquet(path)
        manifest["urls_parquet"] = {"path": path, "count": manifest["kept"]}
    if conf.webdataset:
        shards = join(run_dir, "shards")
        manifest["webdataset"] = webdataset_manifest(
            write_shards(gold, shards, conf.shard_size, store, max_pixels), shards,
            conf.shard_size)
    return manifest


def webdataset_manifest(stats: list[dict], shard_dir: str, shard_size: int) -> dict:
    """Counts and the open_clip ``--train-data`` / ``--train-num-samples`` values."""
    total = sum(r["count"] for r in stats)
    pattern = None
    if stats:
        first, last = stats[0]["name"][:-4], stats[-1]["name"][:-4]
        pattern = f"{{{first}..{last}}}.tar" if first != last else f"{first}.tar"
    return {"dir": shard_dir, "shard_size": shard_size, "samples": total,
            "skipped": sum(r["skipped"] for r in stats),
            "shards": [{"name": r["name"], "count": r["count"], "bytes": r["bytes"]}
                       for r in stats],
            "pattern": pattern,
            "train_data": tool_url(join(shard_dir, pattern)) if pattern else None,
            "train_num_samples": total}


def tool_url(url: str) -> str:
    """The URL training tools (webdataset/fsspec, the aws CLI) use: ``s3a://`` -> ``s3://``."""
    return "s3://" + url[len("s3a://"):] if url.startswith("s3a://") else url


def write_manifest(store: Store, folder: str, manifest: dict) -> None:
    store.write_text(join(folder, MANIFEST), json.dumps(manifest, indent=2))


def read_export(out: str, store: Store | None = None) -> dict | None:
    """The published export under ``out`` (its manifest), or None when nothing is published."""
    store = store or Store()
    path = join(out, MANIFEST)
    if not store.exists(path):
        return None
    manifest = json.loads(store.read_bytes(path))
    if manifest.get("format") != FORMAT:
        raise ValueError(redact_text(f"{path} is not a dfn-curate export manifest ({FORMAT})"))
    return manifest


def prune_runs(store: Store, out: str, keep: set[str]) -> list[str]:
    """Remove this project's run folders under ``out/runs`` except those in ``keep``; folders
    without the ``_dfn_export`` marker are left alone."""
    runs_dir = join(out, "runs")
    ours = [r for r in store.listdir(runs_dir) if store.exists(join(runs_dir, r, MARKER))]
    removed = [r for r in ours if r not in keep]
    for r in removed:
        store.rm(join(runs_dir, r))
    return removed


def run_export(lake: Lakehouse, cfg: Config, run_id: str) -> dict:
    """Edge: ``gold_selection`` + bronze -> ``gold_pairs`` and the export files; the export
    folder is checked before any write. The step runner (:mod:`etl.steps`) refuses a stale
    selection before calling this."""
    out = output_dir(lake, cfg.export)
    check_out_dir(out, lake.store, lake.root)
    write_gold(lake)
    manifest = export_files(lake.read(GOLD), out, cfg.export, run_id,
                            {"gold_table": lake.name(GOLD), "gold_version": lake.version(GOLD)},
                            lake.store, lake.root, cfg.score.max_image_pixels)
    wds = manifest.get("webdataset") or {}
    counts = {"gold_pairs": manifest["kept"],
              "uids_npy": manifest.get("uids_npy", {}).get("count", 0),
              "shards": len(wds.get("shards", [])), "shard_samples": wds.get("samples", 0),
              "shard_skipped": wds.get("skipped", 0)}
    print(redact_text(f"export: {out} (run {manifest['run_dir']})"))
    for name, value in counts.items():
        print(f"export: {name:<20}{value:>10}")
    if wds.get("train_data"):
        print(f"export: open_clip --train-data '{wds['train_data']}' "
              f"--train-num-samples {wds['train_num_samples']} --dataset-type webdataset")
    lake.record_stats(run_id, "export", counts)
    return manifest
