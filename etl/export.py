"""Export the kept pairs: ``gold_pairs`` (Delta) plus files that training code reads.

Under ``export.out_dir`` (relative to the lakehouse root unless absolute):

* ``uids.npy``      DataComp subset file: dtype ``u8,u8`` (uid hi / lo 64 bits), sorted, unique;
* ``shards/00000.tar ...`` WebDataset shards (``<uid>.jpg|png|webp``, ``<uid>.txt``,
  ``<uid>.json`` with uid, url, score, width, height), ``export.shard_size`` samples each
  (the last one fewer), written in parallel by Spark tasks;
* ``urls.parquet/`` url, caption, uid for re-download with img2dataset
  (``--input_format parquet --url_col url --caption_col caption --save_additional_columns '["uid"]'``);
* ``manifest.json`` counts per shard, totals and the open_clip ``--train-data`` pattern.

Everything is written to ``.<name>.tmp-<run_id>`` next to the output and renamed into place
when complete (``manifest.json`` last), the previous export being moved aside first and
removed after. A failed run leaves the previous export untouched. Tasks write files directly,
so ``out_dir`` must be a filesystem path every executor sees (local disk in local mode, a
shared mount such as ``/dbfs`` or ``/Volumes`` on a cluster).
"""

from __future__ import annotations

import io
import json
import os
import shutil
import tarfile
import uuid
from datetime import datetime, timezone
from functools import partial
from pathlib import Path

import numpy as np
import pandas as pd
from pyspark.sql import DataFrame, Window
from pyspark.sql import functions as F

from etl.config import Config, ExportConf
from etl.tables import BRONZE, GOLD, SELECTION, Lakehouse

UID_DTYPE = np.dtype("u8,u8")
ROWS_PER_BUCKET = 200_000  # rows per window partition when numbering samples
SHARD_COLUMNS = ["shard", "uid", "url", "text", "image", "score", "width", "height"]


def gold_pairs(selection: DataFrame, bronze: DataFrame) -> DataFrame:
    """Bronze rows of the kept uids, with their ``score``."""
    kept = selection.where(F.col("kept")).select("uid", "score")
    return bronze.drop("score").join(kept, "uid")


def output_dir(lake: Lakehouse, conf: ExportConf) -> Path:
    out = Path(conf.out_dir).expanduser()
    return out if out.is_absolute() else lake.local_root() / out


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


def write_uids_npy(df: DataFrame, path: Path, rows_per_part: int = 1_000_000) -> int:
    """Write the sorted unique uids of ``df`` as a DataComp subset ``.npy``; returns the count.

    Tasks each write the raw records of one uid range; the driver writes the header and
    concatenates the parts in range order, so no uid passes through the driver.
    """
    uids = df.select("uid").dropDuplicates(["uid"])
    bad = uids.where(~F.col("uid").rlike("^[0-9a-f]{32}$")).limit(1).collect()
    if bad:
        raise ValueError(f"uids.npy needs 32 lowercase hex digit uids, got {bad[0]['uid']!r}")
    n = uids.count()
    parts_dir = path.parent / f"_{path.stem}_parts"
    parts_dir.mkdir(parents=True, exist_ok=True)
    ranged = uids.repartitionByRange(max(1, -(-n // rows_per_part)), "uid").sortWithinPartitions("uid")
    stats = ranged.mapInPandas(partial(uid_part_writer, out=str(parts_dir)),
                               "part int, count long, first string, last string").collect()
    stats = sorted((r for r in stats if r["count"]), key=lambda r: r["part"])
    for a, b in zip(stats, stats[1:], strict=False):
        if not a["last"] < b["first"]:
            raise AssertionError("uid ranges of the parts overlap; refusing to write uids.npy")
    with path.open("wb") as fh:
        np.lib.format.write_array_header_1_0(fh, {
            "descr": np.lib.format.dtype_to_descr(UID_DTYPE), "fortran_order": False,
            "shape": (sum(r["count"] for r in stats),)})
        for r in stats:
            with (parts_dir / f"{r['part']:05d}.bin").open("rb") as part:
                shutil.copyfileobj(part, fh)
    shutil.rmtree(parts_dir)
    return sum(r["count"] for r in stats)


def uid_part_writer(batches, out: str):
    """mapInPandas body: this task's sorted uids as raw ``u8,u8`` records in ``<part>.bin``."""
    from pyspark import TaskContext

    part = TaskContext.get().partitionId()
    final = Path(out) / f"{part:05d}.bin"
    tmp = final.with_name(f"{final.name}.{uuid.uuid4().hex}")
    count, first, last = 0, None, None
    with tmp.open("wb") as fh:
        for pdf in batches:
            if pdf.empty:
                continue
            fh.write(uid_pairs(pdf["uid"].tolist()).tobytes())
            count += len(pdf)
            first = first or pdf["uid"].iloc[0]
            last = pdf["uid"].iloc[-1]
    os.replace(tmp, final)
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
    off = df.sparkSession.createDataFrame(offsets or [(0, 0)], "_b long, _off long")
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


def as_supported(data: bytes) -> tuple[str, bytes] | None:
    """(ext, bytes) open_clip can read: as is, or re-encoded to JPEG; None if undecodable."""
    ext = image_ext(data)
    if ext:
        return ext, data
    from PIL import Image

    try:
        with Image.open(io.BytesIO(data)) as img:
            buf = io.BytesIO()
            img.convert("RGB").save(buf, format="JPEG", quality=95)
            return "jpg", buf.getvalue()
    except Exception:  # noqa: BLE001 - an undecodable image is skipped and counted
        return None


def _member(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size, info.mtime, info.mode = len(data), 0, 0o644
    tar.addfile(info, io.BytesIO(data))


class _ShardFile:
    """One shard being written to a temporary name, renamed on close."""

    def __init__(self, out: Path, shard: int, width: int):
        self.shard, self.count, self.skipped = shard, 0, 0
        self.final = out / f"{shard:0{width}d}.tar"
        self.tmp = out / f".{self.final.name}.{uuid.uuid4().hex}"
        self.tar = tarfile.open(self.tmp, "w")

    def add(self, row) -> None:
        got = as_supported(row.image)
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
        os.replace(self.tmp, self.final)
        return {"shard": self.shard, "count": self.count, "skipped": self.skipped,
                "bytes": self.final.stat().st_size}


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


def shard_writer(batches, out: str, width: int):
    """mapInPandas body: rows sorted by (shard, uid) -> one tar per shard."""
    current, done = None, []
    for pdf in batches:
        for row in pdf.itertuples(index=False):
            if current is None or current.shard != row.shard:
                if current is not None:
                    done.append(current.close())
                current = _ShardFile(Path(out), int(row.shard), width)
            current.add(row)
    if current is not None:
        done.append(current.close())
        yield pd.DataFrame(done, columns=["shard", "count", "skipped", "bytes"])


def write_shards(df: DataFrame, out: Path, shard_size: int) -> list[dict]:
    """Write ``df`` (uid, url, text, image, score, width, height) as WebDataset shards.

    Samples are numbered on uids alone; image bytes then move once, to their shard's task.
    """
    out.mkdir(parents=True, exist_ok=True)
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
        stats = parts.mapInPandas(partial(shard_writer, out=str(out), width=width),
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


# ---- the step ------------------------------------------------------------------------------


def export_files(gold: DataFrame, out: Path, conf: ExportConf, run_id: str,
                 extra: dict | None = None) -> dict:
    """Write all export files of ``gold`` to ``out`` atomically; returns the manifest."""
    out = out.resolve()
    out.parent.mkdir(parents=True, exist_ok=True)
    for stale in [*out.parent.glob(f".{out.name}.tmp-*"), *out.parent.glob(f".{out.name}.old-*")]:
        shutil.rmtree(stale, ignore_errors=True)
    staging = out.parent / f".{out.name}.tmp-{run_id}"
    staging.mkdir()
    try:
        manifest = _write_all(gold, staging, out, conf, run_id, extra or {})
        write_manifest(staging, manifest)
        publish(staging, out, run_id)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return manifest


def _write_all(gold: DataFrame, staging: Path, out: Path, conf: ExportConf, run_id: str,
               extra: dict) -> dict:
    manifest = {"run_id": run_id, "created_at": datetime.now(timezone.utc).isoformat(),
                "kept": gold.count(), **extra}
    if conf.uids_npy:
        manifest["uids_npy"] = {"path": "uids.npy",
                                "count": write_uids_npy(gold, staging / "uids.npy")}
    if conf.urls_parquet:
        gold.select("url", F.col("text").alias("caption"), "uid").write.parquet(
            str(staging / "urls.parquet"))
        manifest["urls_parquet"] = {"path": "urls.parquet", "count": manifest["kept"]}
    if conf.webdataset:
        manifest["webdataset"] = webdataset_manifest(
            write_shards(gold, staging / "shards", conf.shard_size), out / "shards",
            conf.shard_size)
    return manifest


def webdataset_manifest(stats: list[dict], shard_dir: Path, shard_size: int) -> dict:
    """Counts and the open_clip ``--train-data`` / ``--train-num-samples`` values."""
    total = sum(r["count"] for r in stats)
    pattern = None
    if stats:
        first, last = stats[0]["name"][:-4], stats[-1]["name"][:-4]
        pattern = f"{{{first}..{last}}}.tar" if first != last else f"{first}.tar"
    return {"dir": "shards", "shard_size": shard_size, "samples": total,
            "skipped": sum(r["skipped"] for r in stats),
            "shards": [{"name": r["name"], "count": r["count"], "bytes": r["bytes"]}
                       for r in stats],
            "pattern": pattern, "train_data": str(shard_dir / pattern) if pattern else None,
            "train_num_samples": total}


def write_manifest(folder: Path, manifest: dict) -> None:
    (folder / "manifest.json").write_text(json.dumps(manifest, indent=2))


def publish(staging: Path, out: Path, run_id: str) -> None:
    """Swap ``staging`` into ``out``: old export aside, new one in, old one removed."""
    old = out.parent / f".{out.name}.old-{run_id}"
    if out.exists():
        os.rename(out, old)
    os.rename(staging, out)
    shutil.rmtree(old, ignore_errors=True)


def run_export(lake: Lakehouse, cfg: Config, run_id: str) -> dict:
    """Edge: ``gold_selection`` + bronze -> ``gold_pairs`` and the export files."""
    lake.overwrite(gold_pairs(lake.read(SELECTION), lake.read(BRONZE)), GOLD)
    out = output_dir(lake, cfg.export)
    manifest = export_files(lake.read(GOLD), out, cfg.export, run_id,
                            {"gold_table": lake.name(GOLD), "gold_version": lake.version(GOLD)})
    wds = manifest.get("webdataset") or {}
    counts = {"gold_pairs": manifest["kept"], "uids_npy": manifest.get("uids_npy", {}).get("count", 0),
              "shards": len(wds.get("shards", [])), "shard_samples": wds.get("samples", 0),
              "shard_skipped": wds.get("skipped", 0)}
    print(f"export: {out}")
    for name, value in counts.items():
        print(f"export: {name:<20}{value:>10}")
    if wds.get("train_data"):
        print(f"export: open_clip --train-data '{wds['train_data']}' "
              f"--train-num-samples {wds['train_num_samples']} --dataset-type webdataset")
    lake.record_stats(run_id, "export", counts)
    return manifest
