"""Stream training pairs from staged parquet files, one slice per training process.

``dfn-curate train-dfn`` has Spark write the training rows as parquet files (``uid, image,
text``, each file's content fixed by the data); every process (the single local one, or each
TorchDistributor rank) then reads only its own files, ``files[rank::world]``, straight from
storage: nothing passes through the driver and no process holds more than a shuffle buffer of
encoded rows. Each epoch visits the rank's files in a seeded order and passes their rows
through a seeded shuffle buffer, so the same seed and the same files give the same batches.
"""

from __future__ import annotations

import random
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Any

from etl.config import SHUFFLE_BUFFER

READ_BATCH = 256  # rows per parquet record batch: bounds what one read holds in memory

Row = tuple[str, bytes | None, str]


@dataclass
class StreamStats:
    """What one process learned about its slice in its first pass over it."""

    rows_seen: int = 0
    undecodable_seen: int = 0
    epochs: int = 0


def rank_files(files: list[str], rank: int, world: int) -> list[str]:
    """This rank's share of the (sorted) file list: every ``world``-th file from ``rank``."""
    return sorted(files)[rank::world]


def read_rows(files: Iterable[str], store: Any = None) -> Iterator[Row]:
    """``(uid, image, text)`` rows of parquet files in order, a record batch at a time.

    ``store`` (an :class:`etl.fs.Store`, which carries the credentials) opens URLs; without one
    plain ``fsspec.open`` does."""
    import pyarrow.parquet as pq

    for path in files:
        with _open(path, store) as fh:
            for batch in pq.ParquetFile(fh).iter_batches(READ_BATCH, columns=["uid", "image",
                                                                               "text"]):
                cols = batch.to_pydict()
                yield from zip(cols["uid"], cols["image"], cols["text"], strict=True)


def _open(path: str, store: Any):
    if store is not None:
        return store.open(path, "rb")
    import fsspec

    return fsspec.open(path, "rb").open()


def shuffled(rows: Iterable[Row], size: int, rng: random.Random) -> Iterator[Row]:
    """Rows in a seeded, buffered random order: each row leaves a buffer of ``size`` rows at a
    random slot, replaced by the next one; the remainder leaves shuffled."""
    buffer: list[Row] = []
    for row in rows:
        if len(buffer) < size:
            buffer.append(row)
            continue
        i = rng.randrange(size)
        buffer[i], row = row, buffer[i]
        yield row
    rng.shuffle(buffer)
    yield from buffer


def epoch_rows(files: list[str], rank: int, world: int, seed: int, epoch: int,
               buffer: int = SHUFFLE_BUFFER, store: Any = None) -> Iterator[Row]:
    """One epoch of rank ``rank``'s rows: its files in a seeded order, then a shuffle buffer."""
    rng = random.Random(seed + 1000 * rank + epoch)
    mine = rank_files(files, rank, world)
    rng.shuffle(mine)
    return shuffled(read_rows(mine, store), buffer, rng)


def stream_batches(files: list[str], prep: tuple, spec: Any, rank: int = 0, world: int = 1,
                   stats: StreamStats | None = None, store: Any = None) -> Iterator[tuple]:
    """Exactly ``spec.steps`` batches of ``spec.batch_size // world`` ``(images, tokens)``.

    ``prep = (preprocess, tokenizer)``. Epochs repeat as needed; an epoch's partial last batch
    is dropped (so no batch holds a row twice). Undecodable images are skipped and counted in
    ``stats`` during the first pass. Every rank yields the same number of equal-sized batches,
    as DistributedDataParallel and ClipLoss's all-gather need."""
    stats = stats if stats is not None else StreamStats()
    local = spec.batch_size // world
    done, epoch = 0, 0
    while done < spec.steps:
        made = 0
        rows = epoch_rows(files, rank, world, spec.seed, epoch, spec.shuffle_buffer, store)
        for batch in _batches(_decoded(rows, prep[0], stats, epoch == 0), local):
            yield _collate(batch, prep[1])
            done, made = done + 1, made + 1
            if done == spec.steps:
                return
        if not made:
            raise ValueError(_too_few(files, rank, world, local, stats))
        epoch += 1
        stats.epochs = epoch


def _decoded(rows: Iterable[Row], preprocess, stats: StreamStats, first: bool) -> Iterator:
    from udfs.imaging import decode

    for _, blob, text in rows:
        image = decode(blob, preprocess) if blob is not None else None
        if first:
            stats.rows_seen += 1
            stats.undecodable_seen += image is None
        if image is not None:
            yield image, text


def _batches(pairs: Iterable, size: int) -> Iterator[list]:
    batch: list = []
    for pair in pairs:
        batch.append(pair)
        if len(batch) == size:
            yield batch
            batch = []


def _collate(batch: list, tokenizer) -> tuple:
    import torch

    return torch.stack([image for image, _ in batch]), tokenizer([text for _, text in batch])


def _too_few(files: list[str], rank: int, world: int, local: int, stats: StreamStats) -> str:
    decodable = stats.rows_seen - stats.undecodable_seen
    return (f"process {rank} of {world} has {decodable} decodable image-text pairs in its "
            f"{len(rank_files(files, rank, world))} staged file(s), fewer than its batch of "
            f"{local}; need at least one full batch per process (lower train.batch_size or "
            f"train.num_processes, or train on more pairs)")
