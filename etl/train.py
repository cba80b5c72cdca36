"""Train a filtering network (DFN) on a high-quality Delta table of image-text pairs.

The Spark side of ``dfn-curate train-dfn``: read the table (``train.table`` filtered by
``train.where``), gather image bytes and captions in a stable (uid) order, and train either in
this process (CPU or one GPU) or across the cluster with ``TorchDistributor``. The checkpoint
is written as safetensors next to a JSON model card that records the table and the Delta
version it was trained on. Meant for high-quality sets of thousands to tens of thousands of
pairs; everything torch-side is in :mod:`udfs.train`.
"""

from __future__ import annotations

import re
from dataclasses import asdict
from pathlib import Path
from typing import Any

from pyspark.sql import DataFrame, SparkSession
from pyspark.sql import functions as F

from etl.config import TrainConf, resolve_path
from etl.tables import Lakehouse


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


def collect_pairs(pairs: DataFrame) -> tuple[list[bytes], list[str]]:
    """Image bytes and captions on the driver, ordered by uid so runs repeat exactly."""
    rows = pairs.orderBy("uid").select("image", "text").collect()
    return [bytes(r["image"]) for r in rows], [r["text"] for r in rows]


def train_spec(conf: TrainConf, provenance: dict[str, Any], progress: bool = True):
    """The :class:`udfs.train.TrainSpec` for ``conf`` (paths resolved from the project root)."""
    from udfs.train import TrainSpec

    init = str(resolve_path(conf.init_checkpoint)) if conf.init_checkpoint else None
    return TrainSpec(model=str(resolve_path(conf.model)), init_checkpoint=init,
                     out=str(resolve_path(conf.out)), steps=conf.steps,
                     batch_size=conf.batch_size, lr=conf.lr, weight_decay=conf.weight_decay,
                     seed=conf.seed, device=conf.device, progress=progress,
                     card={"data": provenance})


def train_local(spec, blobs: list[bytes], texts: list[str]) -> tuple[dict, bytes]:
    """Single process (CPU or one GPU): ``(card, checkpoint bytes)``."""
    from udfs.train import checkpoint_bytes, train

    result = train(spec, blobs, texts)
    return result.card, checkpoint_bytes(result.model)


def train_distributed(spark: SparkSession, spec, blobs: list[bytes], texts: list[str],
                      num_processes: int) -> tuple[dict, bytes]:
    """``TorchDistributor`` over ``num_processes`` processes (local mode on a local master)."""
    from pyspark.ml.torch.distributor import TorchDistributor

    from udfs.train import distributed_main, resolve_device

    use_gpu = spec.device.startswith("cuda") or (
        spec.device == "auto" and resolve_device("auto") == "cuda")
    local = spark.sparkContext.master.startswith("local")
    out = TorchDistributor(num_processes=num_processes, local_mode=local,
                           use_gpu=use_gpu).run(distributed_main, asdict(spec), blobs, texts)
    if not out:
        raise RuntimeError("TorchDistributor returned no result")
    return out["card"], out["weights"]


def train_dfn(lake: Lakehouse, conf: TrainConf, run_id: str, progress: bool = True) -> dict:
    """Read the training table, train, write ``conf.out`` + its model card; returns the card."""
    from udfs.train import write_checkpoint

    df, name, version = source_table(lake, conf.table)
    blobs, texts = collect_pairs(training_pairs(df, conf.where))
    if len(blobs) < 2:
        raise ValueError(f"train: {name} where {conf.where!r} has {len(blobs)} pairs with image "
                         f"bytes and text; need at least 2")
    provenance = {"table": name, "delta_version": version, "where": conf.where}
    spec = train_spec(conf, provenance, progress)
    if conf.num_processes > 0:
        card, weights = train_distributed(lake.spark, spec, blobs, texts, conf.num_processes)
    else:
        card, weights = train_local(spec, blobs, texts)
    card = portable_card(card, conf, run_id)
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
