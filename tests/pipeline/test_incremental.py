"""A pool delivered in batches, in another order than it was made, ends as the same pool
curated at once: the same dedup keepers, selection and exported uids; each batch's run reads,
scores and exports only what is new; a run with nothing new commits no data."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
from pyspark.sql import functions as F

from etl.config import LakehouseConf
from etl.export import read_export
from etl.sample import write_sample
from etl.steps import main
from etl.tables import (
    BRONZE,
    DEDUP,
    GOLD,
    INGEST_FILES,
    RUN_STATS,
    SELECTION,
    SILVER,
    Lakehouse,
)
from etl.uidfile import uid_strings
from etl.work import NEW, POOL, TOUCHED
from tests.helpers.pipeline import tiny_overrides, tiny_weights

DATA_TABLES = (BRONZE, SILVER, DEDUP, SELECTION, GOLD)


def run(root: Path, source: Path, evals: Path, weights: Path, run_id: str) -> None:
    sets = [*tiny_overrides(root, weights),
            f"ingest.sources=[{{format: img2dataset, path: '{source}', name: pool}}]",
            f"ingest.eval_sources=[{{format: folder, path: '{evals}', name: eval}}]"]
    main("run", ["--conf", "conf/local.yaml", *[a for s in sets for a in ("--set", s)],
                 "--run-id", run_id])


def deliver(source: Path, raw: Path, shard: str) -> None:
    """Copy one shard (tar + sidecar) into the source folder."""
    source.mkdir(parents=True, exist_ok=True)
    for ext in (".tar", ".parquet"):
        shutil.copy2(raw / "pool" / f"{shard}{ext}", source / f"{shard}{ext}")


def files_read(lake: Lakehouse, run_id: str) -> tuple[set[str], int]:
    """(file names, rows) the ingest of ``run_id`` recorded reading for the pool."""
    rows = lake.read(INGEST_FILES).where((F.col("run_id") == run_id) & (F.col("kind") == "pool"))
    got = rows.select("path", "rows").collect()
    return {Path(r["path"]).name for r in got}, sum(r["rows"] for r in got)


def outcome(lake: Lakehouse) -> dict[str, set]:
    """What a curated pool is: dedup flags, selection decisions, exported uids."""
    manifest = read_export(f"{lake.root}/export", lake.store)
    exported = uid_strings(np.load(manifest["uids_npy"]["path"]))
    return {
        "dedup": {tuple(r) for r in lake.read(DEDUP).select("uid", "dup_of", "dup_reason")
                  .collect()},
        "selection": {tuple(r) for r in lake.read(SELECTION).select("uid", "drop_reason")
                      .collect()},
        "exported": set(exported),
    }


def work_of(lake: Lakehouse, run_id: str, step: str) -> dict[str, int]:
    rows = (lake.read(RUN_STATS).where((F.col("run_id") == run_id) & F.col("step").startswith(step)
                                       & F.col("metric").isin(NEW, TOUCHED, POOL)).collect())
    return {r["metric"]: r["value"] for r in rows}


@pytest.mark.slow
def test_batches_in_another_order_end_as_the_pool_curated_at_once(spark, tmp_path):
    raw = tmp_path / "raw"
    write_sample(str(raw), n_pairs=60, eval_size=6, seed=3, shard_size=20)
    shards = sorted(p.stem for p in (raw / "pool").iterdir() if p.suffix == ".tar")
    assert len(shards) == 3
    weights = tiny_weights(tmp_path)

    once = tmp_path / "once"
    for shard in shards:
        deliver(once / "src", raw, shard)
    run(once / "lake", once / "src", raw / "eval", weights, "once")
    once_lake = Lakehouse(spark, LakehouseConf(root=str(once / "lake")))
    _, once_read = files_read(once_lake, "once")

    batched = tmp_path / "batched"
    lake = Lakehouse(spark, LakehouseConf(root=str(batched / "lake")))
    read = 0
    for i, shard in enumerate([shards[2], shards[0], shards[1]]):
        deliver(batched / "src", raw, shard)
        pool_before = lake.read(BRONZE).count() if lake.exists(BRONZE) else 0
        run(batched / "lake", batched / "src", raw / "eval", weights, f"b{i}")
        names, rows = files_read(lake, f"b{i}")
        assert names == {f"{shard}.tar", f"{shard}.parquet"}  # only the new shard was read
        ingest = work_of(lake, f"b{i}", "ingest:bronze_pairs")
        new = lake.read(BRONZE).count() - pool_before
        assert ingest == {NEW: new, TOUCHED: rows, POOL: pool_before + new}
        read += rows
        assert work_of(lake, f"b{i}", "score:")[NEW] == new  # scored only the new rows
        assert work_of(lake, f"b{i}", "dedup")[NEW] == new

    assert read == once_read  # the batches read, in all, what one run over the pool read
    want = outcome(once_lake)
    got = outcome(lake)
    assert got["dedup"] == want["dedup"]
    assert got["selection"] == want["selection"]
    assert got["exported"] == want["exported"] and len(want["exported"]) > 10

    before = {t: lake.version(t) for t in DATA_TABLES}
    shards_before = sorted(p.relative_to(batched) for p in (batched / "lake" / "export").rglob("*"))
    run(batched / "lake", batched / "src", raw / "eval", weights, "again")
    assert {t: lake.version(t) for t in DATA_TABLES} == before
    assert sorted(p.relative_to(batched) for p in (batched / "lake" / "export").rglob("*")) \
        == shards_before
    assert work_of(lake, "again", "ingest:bronze_pairs")[TOUCHED] == 0
