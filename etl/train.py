"""Train a filtering network (DFN) on a high-quality Delta table of image-text pairs.

The Spark side of ``dfn-curate train-dfn``: read the table (``train.table`` filtered by
``train.where``), hold out a seeded validation slice (by a hash of the uid, on the executors;
at most ``MAX_VAL_PAIRS`` of it come to the driver), and have Spark write the training rows as
parquet files to a staging folder under the lakehouse (``_staging/train-dfn/<run id>``, removed
afterwards). Training then runs in this process (CPU or one GPU) or across the cluster with
``TorchDistributor``; each process streams its own share of the files (see
:mod:`udfs.trainstream`), so the training set never passes through the driver and is never
held whole by any process. The checkpoint is written as safetensors next to a JSON model card
that records the table and the Delta version it was trained on; everything torch-side is in
:mod:`udfs.train`.
"""

from __future__ import annotations

import math
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from pyspark.sql import DataFrame, SparkSession
from pyspark.sql import functions as F

from etl.compat import master
from etl.config import MIN_ROWS_FOR_VAL, TrainConf, resolve_path
from etl.redact import redact
from etl.tables import Lakehouse

MAX_VAL_PAIRS = 2000  # held-out pairs brought to the driver (lowest uids of the held-out slice)
ROWS_PER_FILE = 2000  # staged parquet rows per file (at least 4 files per process)


def source_table(lake: Lakehouse, table: str) -> tuple[DataFrame, str, int | None]:
    """``(DataFrame, SQL name, Delta version)`` of a lakehouse table name or a catalog table."""
    if re.fullmatch(r"[A-Za-z0-9_]+", table) and lake.exists(table):
        return lake.read(table), lake.name(table), lake.version(table)
    spark = lake.spark
    if not spark.catalog.tableExists(table) and not table.startswith("delta.`"):
        raise FileNotFoundError(f"train.table: {table!r} is neither a table in the lakehouse "
                                f"({lake.root}) nor in the catalog; run `dfn-curate ingest` first")
    return spark.table(table), table, _catalog_version(spark, table)


def _catalog_version(spark: SparkSession, table: str) -> int | None:
    try:
        return spark.sql(f"DESCRIBE HISTORY {table} LIMIT 1").first()["version"]
    except Exception:  # noqa: BLE001 - not a Delta table: no version to record
        return None


def training_pairs(df: DataFrame, where: str | None) -> DataFrame:
    """``uid, image, text`` of the rows matching ``where`` that have both bytes and a caption."""
    missing = {"uid", "image", "text"} - set(df.columns)
    if missing:
        raise ValueError(f"training table lacks column(s) {sorted(missing)}; it needs uid, "
                         f"image (bytes) and text")
    if where:
        df = df.where(F.expr(where))
    return (df.where(F.col("image").isNotNull() & F.col("text").isNotNull())
            .select("uid", "image", "text"))


@dataclass
class Staged:
    """Training rows staged as parquet files, and the held-out pairs brought to the driver."""

    files: list[str]
    rows: int  # rows matched (with image bytes and a caption)
    train_rows: int  # rows staged for training
    held_out: int  # rows held out for validation (at most MAX_VAL_PAIRS of them are used)
    val_blobs: list[bytes] = field(default_factory=list)
    val_texts: list[str] = field(default_factory=list)

    def provenance(self) -> dict[str, Any]:
        """The card's ``data`` counts."""
        return {"rows": self.rows, "train_pairs": self.train_rows, "held_out": self.held_out,
                "val_collected": len(self.val_blobs), "val_cap": MAX_VAL_PAIRS,
                "staged_files": len(self.files)}


def held_out(seed: int, fraction: float):
    """True for the seeded ``fraction`` of uids held out for validation (a hash of the uid)."""
    return F.pmod(F.xxhash64(F.lit(seed), F.col("uid")), F.lit(10_000)) < round(fraction * 10_000)


def stage_pairs(lake: Lakehouse, pairs: DataFrame, folder: str, seed: int, fraction: float,
                world: int) -> Staged:
    """Split ``pairs`` on the executors, write the training rows to ``folder`` as parquet and
    collect (at most ``MAX_VAL_PAIRS``) held-out pairs. No validation below
    ``MIN_ROWS_FOR_VAL`` rows."""
    flagged = pairs.withColumn("_val", held_out(seed, fraction))
    counts = {r["_val"]: r["count"] for r in flagged.groupBy("_val").count().collect()}
    rows = sum(counts.values())
    n_val = counts.get(True, 0) if rows >= MIN_ROWS_FOR_VAL else 0
    if rows < 2:
        return Staged([], rows, rows, 0)
    train = flagged.where(~F.col("_val")) if n_val else flagged
    write_files(train.drop("_val"), folder, n_files(rows - n_val, world))
    blobs, texts = collect_held_out(flagged) if n_val else ([], [])
    return Staged(staged_files(lake, folder), rows, rows - n_val, n_val, blobs, texts)


def n_files(rows: int, world: int) -> int:
    """At least 4 files per process and about ``ROWS_PER_FILE`` rows each, a multiple of the
    number of processes."""
    n = max(4 * world, math.ceil(rows / ROWS_PER_FILE))
    return math.ceil(n / world) * world


def write_files(train: DataFrame, folder: str, n: int) -> None:
    """``uid, image, text`` as parquet; which rows land in which file, and their order inside
    it, follow from the uids alone, so the same table stages the same files."""
    (train.repartition(n, F.xxhash64("uid")).sortWithinPartitions("uid")
        .write.mode("overwrite").parquet(folder))


def staged_files(lake: Lakehouse, folder: str) -> list[str]:
    """The parquet files Spark wrote under ``folder`` (sorted; listed through the lakehouse's
    store, so any URL works)."""
    names = lake.store.listdir(folder)
    return [f"{folder}/{n}" for n in names if n.endswith(".parquet") and n[0] not in "._"]


def collect_held_out(flagged: DataFrame) -> tuple[list[bytes], list[str]]:
    """The first ``MAX_VAL_PAIRS`` held-out pairs by uid (bounded: the only rows collected)."""
    rows = (flagged.where(F.col("_val")).orderBy("uid").limit(MAX_VAL_PAIRS)
            .select("image", "text").collect())
    return [bytes(r["image"]) for r in rows], [r["text"] for r in rows]


def train_spec(conf: TrainConf, provenance: dict[str, Any], progress: bool = True):
    """The :class:`udfs.train.TrainSpec` for ``conf`` (paths resolved from the project root)."""
    from udfs.train import TrainSpec

    init = str(resolve_path(conf.init_checkpoint)) if conf.init_checkpoint else None
    return TrainSpec(model=str(resolve_path(conf.model)), init_checkpoint=init,
                     out=str(resolve_path(conf.out)), steps=conf.steps,
                     batch_size=conf.batch_size, lr=conf.lr, weight_decay=conf.weight_decay,
                     seed=conf.seed, device=conf.device, progress=progress,
                     val_fraction=conf.val_fraction, shuffle_buffer=conf.shuffle_buffer,
                     card={"data": provenance})


def train_local(spec, staged: Staged, store) -> tuple[dict, bytes]:
    """Single process (CPU or one GPU) streaming every staged file: ``(card, checkpoint)``."""
    from udfs.train import checkpoint_bytes, train_stream

    result = train_stream(spec, staged.files, (staged.val_blobs, staged.val_texts), store=store)
    return result.card, checkpoint_bytes(result.model)


def train_distributed(spark: SparkSession, spec, staged: Staged, store,
                      num_processes: int) -> tuple[dict, bytes]:
    """``TorchDistributor`` over ``num_processes`` processes (local mode on a local master);
    each process is handed the file list and reads its own share."""
    from pyspark.ml.torch.distributor import TorchDistributor

    from udfs.train import distributed_main, resolve_device

    use_gpu = spec.device.startswith("cuda") or (
        spec.device == "auto" and resolve_device("auto") == "cuda")
    local = master(spark).startswith("local")
    val = (staged.val_blobs, staged.val_texts)
    out = TorchDistributor(num_processes=num_processes, local_mode=local, use_gpu=use_gpu).run(
        distributed_main, asdict(spec), staged.files, val, store)
    if not out:
        raise RuntimeError("TorchDistributor returned no result")
    return out["card"], out["weights"]


def train_dfn(lake: Lakehouse, conf: TrainConf, run_id: str, progress: bool = True) -> dict:
    """Stage the training table, train, write ``conf.out`` + its model card; returns the card.
    The staging folder is removed afterwards, whether training succeeded or not."""
    from udfs.train import write_checkpoint

    df, name, version = source_table(lake, conf.table)
    spec = train_spec(conf, {"table": name, "delta_version": version, "where": conf.where},
                      progress)
    folder = lake.under("_staging", "train-dfn", run_id)
    try:
        staged = stage_pairs(lake, training_pairs(df, conf.where), folder, spec.seed,
                             spec.val_fraction, max(1, conf.num_processes))
        if staged.rows < 2:
            raise ValueError(f"train: {name} where {conf.where!r} has {staged.rows} pairs with "
                             f"image bytes and text; need at least 2")
        spec.card["data"].update(staged.provenance())
        if conf.num_processes > 0:
            card, weights = train_distributed(lake.spark, spec, staged, lake.store,
                                              conf.num_processes)
        else:
            card, weights = train_local(spec, staged, lake.store)
    finally:
        lake.store.rm(folder)
    card = redact(portable_card(card, conf, run_id))
    write_checkpoint(weights, card, spec.out)
    return card


def portable_card(card: dict, conf: TrainConf, run_id: str) -> dict:
    """Record config paths as given (not this machine's absolute paths) and the run id."""
    card = {**card, "architecture_file": conf.model, "run_id": run_id, "checkpoint": conf.out}
    card["training"] = {**card["training"], "model": conf.model,
                        "init_checkpoint": conf.init_checkpoint}
    return card


def summary(card: dict) -> str:
    """One line for the console."""
    m, d = card["metrics"], card["data"]
    parts = [f"trained {card['model_name']} on {d['train_pairs']} pairs of {d['table']}",
             f"(Delta version {d['delta_version']})" if d.get("delta_version") is not None else "",
             f"{card['training']['steps']} steps x {card['training']['batch_size']}",
             f"loss {m['first_loss']} -> {m['final_loss']}",
             f"val shuffled-caption AUC {m.get('val_shuffled_caption_auc')}",
             f"in {m['train_time_s']} s -> {Path(card['checkpoint'])}"]
    return " ".join(p for p in parts if p)
