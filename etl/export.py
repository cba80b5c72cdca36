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
so a reader still streaming the previous export finishes; only finished folders marked as this
project's (a ``_dfn_export`` file, written first, and the run's own manifest, written last) are
removed: never a run still being written, nor anything else under ``<out>``.
Exports into one ``out_dir`` must not run concurrently.

``<out>`` itself must be this project's (:func:`check_out_dir`, before any write): empty or
absent (it is then claimed with an ``<out>/_dfn_export`` marker), or an earlier export (the
marker, or a published ``manifest.json``). A folder holding other files, a Delta table, the
lakehouse root, or one inside a Delta table is refused, naming the folder and the fix.
"""

from __future__ import annotations

import io
import json
import shlex
import tarfile
from datetime import datetime, timezone
from functools import partial

import numpy as np
import pandas as pd
from pyspark.sql import DataFrame, Window
from pyspark.sql import functions as F

from etl.config import ConfigError, ExportConf
from etl.fs import Store, ancestors, is_within, join
from etl.redact import redact, redact_text
from etl.spark import local_frame, session_conf
from etl.tables import BRONZE, GOLD, SELECTION, Lakehouse
from etl.takedown.match import without_removed
from etl.uidfile import write_uids_npy
from udfs.imaging import DEFAULT_MAX_PIXELS, decode_rgb

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


def write_gold(lake: Lakehouse) -> dict[str, int]:
    """Make ``gold_pairs`` :func:`gold_pairs` (under :func:`prefilter_conf`), merging only the
    rows that changed (image bytes not compared: a uid's bytes do not change); no commit when
    none did (:func:`etl.tablesync.sync`). Returns its counts."""
    from etl.tablesync import sync

    selection = lake.read(SELECTION)
    with session_conf(lake.spark, prefilter_conf(lake.spark, kept_rows(selection).count())):
        gold = without_removed(lake, gold_pairs(selection, lake.read(BRONZE)))
        return sync(lake, gold, GOLD, compare=gold_compared(gold))


def gold_compared(gold: DataFrame) -> list[str]:
    """The columns by which a ``gold_pairs`` row counts as changed (not its image bytes: a
    uid's bytes do not change)."""
    return [c for c in gold.columns if c not in ("uid", "image")]


def output_dir(lake: Lakehouse, conf: ExportConf) -> str:
    """Where exports are published (a URL or an absolute path)."""
    return lake.resolve(conf.out_dir)


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
                 max_pixels: int = DEFAULT_MAX_PIXELS, index: str | None = None,
                 first: int = 0) -> list[dict]:
    """Write ``df`` (uid, url, text, image, score, width, height) as WebDataset shards
    numbered from ``first``, and (``index``) a parquet of (uid, shard) there: which shard
    holds each sample.

    Images over ``max_pixels`` (or undecodable ones that need re-encoding) are skipped and
    counted per shard (``skipped``).

    Samples are numbered on uids alone; image bytes then move once, to their shard's task.
    """
    store, out = store or Store(), str(out)
    with_image = df.where(F.col("image").isNotNull())
    ids = number_rows(with_image.select("uid")).select(
        "uid", (F.floor(F.col("idx") / F.lit(shard_size)) + first).alias("shard")).persist()
    try:
        last = ids.agg(F.max("shard")).first()[0]
        if last is None:
            return []
        n_shards = last + 1 - first
        width = max(5, len(str(last)))
        if index is not None:
            ids.write.mode("overwrite").parquet(index)
        parts = (with_image.join(ids, "uid").select(*SHARD_COLUMNS)
                 .repartition(n_shards, "shard").sortWithinPartitions("shard", "uid"))
        stats = parts.mapInPandas(partial(shard_writer, out=out, width=width, store=store,
                                          max_pixels=max_pixels),
                                  "shard long, count long, skipped long, bytes long").collect()
    finally:
        ids.unpersist()
    stats = sorted((r.asDict() for r in stats), key=lambda r: r["shard"])
    if [r["shard"] for r in stats] != list(range(first, last + 1)):
        raise AssertionError(f"expected shards {first}..{last}, tasks wrote "
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
    run_dir = start_run(store, out, run_id)
    manifest = redact(_write_all(gold, run_dir, conf, run_id, extra or {}, store, max_pixels))
    publish(store, out, manifest, conf.keep_previous)
    return manifest


def start_run(store: Store, out: str, run_id: str) -> str:
    """Claim ``out`` (if new) and create run ``run_id``'s folder (marked as this project's)."""
    run_dir = join(out, "runs", run_id)
    if store.exists(join(run_dir, MANIFEST)):
        raise ValueError(redact_text(f"export run {run_dir} already exists; use a new run id"))
    if not store.exists(join(out, MARKER)):
        store.write_text(join(out, MARKER), FORMAT)  # claims the folder as an export's
    store.write_text(join(run_dir, MARKER), run_id)
    return run_dir


def publish(store: Store, out: str, manifest: dict, keep_previous: bool) -> None:
    """Write the run's manifest, then ``out/manifest.json`` (the publish: one object, written
    last); then remove the run folders neither it nor (``keep_previous``) the one it replaced
    reads."""
    previous = read_export(out, store)
    write_manifest(store, manifest["run_dir"], manifest)
    write_manifest(store, out, manifest)
    keep = set(runs_of(manifest)) | (set(runs_of(previous)) if previous and keep_previous
                                      else set())
    prune_runs(store, out, keep)


def runs_of(manifest: dict) -> list[str]:
    """The run folders a manifest reads: its own and those of shards it kept in place."""
    return manifest.get("runs") or [manifest["run_id"]]


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
        shards, index = join(run_dir, "shards"), join(run_dir, "shard_index.parquet")
        stats = write_shards(gold, shards, conf.shard_size, store, max_pixels, index)
        for r in stats:
            r["path"] = join(shards, r["name"])
        manifest["webdataset"] = webdataset_manifest(stats, shards, conf.shard_size,
                                                     index if stats else None)
    return manifest


def webdataset_manifest(stats: list[dict], shard_dir: str, shard_size: int,
                        index: str | None = None) -> dict:
    """Counts, each shard's location, and the open_clip ``--train-data`` /
    ``--train-num-samples`` values. Shards may lie in several run folders (a republished
    export keeps its untouched shards where they are): ``--train-data`` then lists one brace
    pattern per folder, joined by ``::`` as open_clip reads it."""
    total = sum(r["count"] for r in stats)
    folders: dict[str, list[str]] = {}
    for r in stats:
        folders.setdefault(r["path"].rsplit("/", 1)[0], []).append(r["name"][:-4])
    patterns = {d: (f"{{{n[0]}..{n[-1]}}}.tar" if len(n) > 1 else f"{n[0]}.tar")
                for d, n in folders.items()}
    contiguous = all(_contiguous(n) for n in folders.values())
    train = "::".join(tool_url(join(d, p)) for d, p in patterns.items()) if contiguous else \
        "::".join(tool_url(r["path"]) for r in stats)
    pattern = patterns.get(shard_dir) if len(patterns) == 1 else None
    return {"dir": shard_dir, "shard_size": shard_size, "samples": total,
            "skipped": sum(r.get("skipped", 0) for r in stats),
            "shards": [{"name": r["name"], "count": r["count"], "bytes": r["bytes"],
                        "path": r["path"]} for r in stats],
            "index": index, "pattern": pattern, "train_data": train or None,
            "train_num_samples": total}


def _contiguous(names: list[str]) -> bool:
    """Whether shard names (numbers) run without a gap, so a brace range names exactly them."""
    nums = [int(n) for n in names]
    return nums == list(range(nums[0], nums[0] + len(nums))) and \
        len({len(n) for n in names}) == 1


def train_command(wds: dict) -> str:
    """The open_clip training command for an export's shards (its trainer as the
    open_clip_torch wheel ships it); add ``--model`` and the training settings."""
    return (f"python -m open_clip_train.main --dataset-type webdataset --train-data "
            f"{shlex.quote(wds['train_data'])} --train-num-samples {wds['train_num_samples']}")


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
    """Remove this project's finished run folders under ``out/runs`` except those in
    ``keep``. Folders without the ``_dfn_export`` marker are left alone, and so are folders
    without their run manifest: a run still being written (a takedown republish may publish
    while an export runs) or one that crashed before it finished."""
    runs_dir = join(out, "runs")
    ours = [r for r in store.listdir(runs_dir) if store.exists(join(runs_dir, r, MARKER))
            and store.exists(join(runs_dir, r, MANIFEST))]
    removed = [r for r in ours if r not in keep]
    for r in removed:
        store.rm(join(runs_dir, r))
    return removed
