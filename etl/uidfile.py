"""DataComp subset files: sorted unique uids as a ``.npy`` of dtype ``u8,u8`` (hi, lo)."""

from __future__ import annotations

import io
from functools import partial

import numpy as np
import pandas as pd
from pyspark import StorageLevel
from pyspark.sql import DataFrame
from pyspark.sql import functions as F

from etl.fs import Store, join

UID_DTYPE = np.dtype("u8,u8")



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


def write_empty_npy(path: str, store: Store | None = None) -> int:
    """An empty DataComp subset ``.npy`` at ``path`` (no Spark job); returns 0."""
    buf = io.BytesIO()
    np.save(buf, np.zeros(0, dtype=UID_DTYPE))
    with (store or Store()).open(str(path), "wb") as fh:
        fh.write(buf.getvalue())
    return 0


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
