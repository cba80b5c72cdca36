"""DataComp subset files: sorted unique uids as a ``.npy`` of dtype ``u8,u8`` (hi, lo)."""

from __future__ import annotations

import io
import re
from functools import partial

import numpy as np
import pandas as pd
from pyspark import StorageLevel
from pyspark.sql import DataFrame
from pyspark.sql import functions as F

from etl.fs import Store, join

UID_DTYPE = np.dtype("u8,u8")
FEW_UIDS = 100_000  # uid files of at most this many rows are written by the driver (1.6 MB)
_HEX = re.compile("[0-9a-f]{32}")



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
                   rows_per_part: int = 1_000_000, rows: int | None = None) -> int:
    """Write the sorted unique uids of ``df`` as a DataComp subset ``.npy``; returns the count.

    Tasks each write the raw records of one uid range next to ``path``; the driver writes the
    header and streams the parts in range order into ``path`` (16 bytes a uid; no uid is held
    in driver memory), then removes the parts. ``rows``: ``df``'s row count when known; at
    most :data:`FEW_UIDS`, the uids are collected and written by the driver (one job; more
    rows than that found there after all: the tasks write them).
    """
    store, path = store or Store(), str(path)
    few = (df.select("uid").limit(FEW_UIDS + 1).collect()
           if rows is not None and rows <= FEW_UIDS else [])
    if 0 < len(few) <= FEW_UIDS:
        uids = sorted({r[0] for r in few})
        bad = next((u for u in uids if not _HEX.fullmatch(u or "")), None)
        if bad is not None:
            raise ValueError(f"uids.npy needs 32 lowercase hex digit uids, got {bad!r}")
        with store.open(path, "wb") as fh:
            fh.write(_header(len(uids)) + uid_pairs(uids).tobytes())
        return len(uids)
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
    store.concat([join(parts_dir, f"{r['part']:05d}.bin") for r in stats], path,
                 _header(total))
    store.rm(parts_dir)
    return total


def merge_uids_npy(base: str, added: str, removed: str, path: str, store: Store | None = None,
                   chunk: int = 1 << 20) -> int:
    """Write at ``path`` the subset file ``base`` with the uids of ``added`` inserted and those
    of ``removed`` taken out (all three sorted DataComp ``.npy`` files), streaming them in
    ``chunk`` records at a time: no Spark job, and the driver holds a few chunks, never the
    pool. Returns the count. Raises ``ValueError`` when the files are not what a diff of
    ``base`` gives (an added uid already there, a removed one missing, unsorted input), so the
    caller writes the file from the table instead."""
    store = store or Store()
    with store.open(base, "rb") as b, store.open(added, "rb") as a, \
            store.open(removed, "rb") as r:
        streams = [_Records(fh, chunk) for fh in (b, a, r)]
        total = streams[0].size + streams[1].size - streams[2].size
        with store.open(str(path), "wb") as out:
            out.write(_header(total))
            written = _merge(*streams, out)
    if written != total:
        raise ValueError(f"merging uid files gave {written} uids, not {total}")
    return written


def _merge(base: _Records, added: _Records, removed: _Records, out) -> int:
    written, last = 0, None
    streams = (base, added, removed)
    while True:
        for s in streams:
            s.fill()
        if not any(len(s.buf) for s in streams):
            return written
        more = [s.buf[-1:] for s in streams if s.left]  # streams with unread records
        bound = np.sort(np.concatenate(more))[:1] if more else None  # arrays: S16 compares
        base_part, added_part, removed_part = (s.take(bound) for s in streams)
        kept = np.concatenate([base_part, added_part])
        kept.sort(kind="stable")
        if len(kept) > 1 and not (kept[1:] > kept[:-1]).all():
            raise ValueError("an added uid is already in the base file (or a file is unsorted)")
        if len(kept) and last is not None and not (kept[:1] > last).all():
            raise ValueError("the uid files are not sorted")
        at = np.searchsorted(base_part, removed_part)
        if len(removed_part) and ((at >= len(base_part)).any()
                                  or (base_part[np.minimum(at, len(base_part) - 1)]
                                      != removed_part).any()):
            raise ValueError("a removed uid is not in the base file")
        kept = kept[~np.isin(kept, removed_part)]
        if len(kept):
            out.write(_records(kept).tobytes())
            last = kept[-1:]
            written += len(kept)


class _Records:
    """One sorted ``u8,u8`` ``.npy`` file read ``chunk`` records at a time, as 16-byte
    big-endian keys (so bytes order as uids do)."""

    def __init__(self, fh, chunk: int):
        version = np.lib.format.read_magic(fh)
        read = (np.lib.format.read_array_header_1_0 if version == (1, 0)
                else np.lib.format.read_array_header_2_0)
        shape, fortran, dtype = read(fh)
        if dtype != UID_DTYPE or fortran or len(shape) != 1:
            raise ValueError(f"not a DataComp uid file: {dtype} {shape}")
        self.fh, self.chunk, self.size, self.left = fh, chunk, shape[0], shape[0]
        self.buf = np.zeros(0, dtype="S16")

    def fill(self) -> None:
        if len(self.buf) or not self.left:
            return
        n = min(self.chunk, self.left)
        data = self.fh.read(n * UID_DTYPE.itemsize)
        if len(data) != n * UID_DTYPE.itemsize:
            raise ValueError("a uid file is shorter than its header says")
        self.left -= n
        self.buf = _keys(np.frombuffer(data, dtype=UID_DTYPE))
        if len(self.buf) > 1 and not (self.buf[1:] > self.buf[:-1]).all():
            raise ValueError("a uid file is not sorted")

    def take(self, bound) -> np.ndarray:
        """The buffered keys up to ``bound`` (all of them when None), removed from the buffer."""
        end = (len(self.buf) if bound is None
               else int(np.searchsorted(self.buf, bound, "right")[0]))
        part, self.buf = self.buf[:end], self.buf[end:]
        return part


def _keys(records: np.ndarray) -> np.ndarray:
    be = np.empty((len(records), 2), dtype=">u8")
    be[:, 0], be[:, 1] = records["f0"], records["f1"]
    return be.view("S16").ravel()


def _records(keys: np.ndarray) -> np.ndarray:
    be = np.ascontiguousarray(keys).view(">u8").reshape(-1, 2)
    out = np.empty(len(be), dtype=UID_DTYPE)
    out["f0"], out["f1"] = be[:, 0], be[:, 1]
    return out


def _header(count: int) -> bytes:
    header = io.BytesIO()
    np.lib.format.write_array_header_1_0(header, {
        "descr": np.lib.format.dtype_to_descr(UID_DTYPE), "fortran_order": False,
        "shape": (count,)})
    return header.getvalue()


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
