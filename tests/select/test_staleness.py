"""Derived tables tied to the bronze version they cover: the step runner refuses select and
export inputs that miss new bronze rows, and ``run`` builds the missing steps first."""

from __future__ import annotations

import argparse

import pytest
import yaml
from pyspark.sql import functions as F

from etl.config import (
    Config,
    ConfigError,
    DedupConf,
    LakehouseConf,
    ModelConf,
    ScoreConf,
    SelectConf,
)
from etl.jobs.common import JobContext
from etl.steps import execute, get
from etl.tables import BRONZE, DEDUP, SELECTION, SILVER
from tests.helpers.images import jpeg
from tests.helpers.models import TINY_JSON, tiny_state


def bronze_rows(start: int, n: int) -> list[tuple]:
    return [(f"b{i:03d}", f"https://x.example/{i}", f"caption {i}", f"sha{i}",
             jpeg(((i * 53) % 256, 80, 120), (40 + i % 3 * 8, 40))) for i in range(start, start + n)]


BRONZE_SCHEMA = "uid string, url string, text string, sha256 string, image binary"


def trust_config(lake, weights) -> Config:
    return Config(
        lakehouse=LakehouseConf(root=lake.conf.root),
        score=ScoreConf(models=[ModelConf(TINY_JSON, str(weights), "tiny")], batch_size=4,
                        device="cpu"),
        dedup=DedupConf(near_signals=["thumbnail"], n_clusters=1, decontaminate=False),
        select=SelectConf(preset="none", keep_fraction=0.5))


def run_step(lake, cfg: Config, name: str, run_id: str):
    """Step ``name`` as its command runs it, on this test's session."""
    return execute(JobContext(cfg, lake.spark, lake, run_id, argparse.Namespace()), get(name))


@pytest.mark.slow
def test_select_and_export_refuse_tables_that_miss_new_bronze_rows(lake, tmp_path):
    from safetensors.torch import save_file

    from etl.dedupinc import run_dedup
    from etl.jobs.run import main as run_main
    from etl.score import score_all
    from etl.select import run_select

    weights = tmp_path / "tiny.safetensors"
    save_file(tiny_state(0), str(weights))
    cfg = trust_config(lake, weights)
    spark = lake.spark
    lake.overwrite(spark.createDataFrame(bronze_rows(0, 4), BRONZE_SCHEMA), BRONZE)
    score_all(lake, cfg, "r1")
    run_dedup(lake, cfg, "r1")
    run_select(lake, cfg, "r1")
    built = lake.version(BRONZE)

    lake.append(spark.createDataFrame(bronze_rows(4, 3), BRONZE_SCHEMA), BRONZE)  # ingest more
    now = lake.version(BRONZE)
    with pytest.raises(ConfigError) as err:
        run_step(lake, cfg, "select", "r2")
    msg = str(err.value)
    assert type(err.value).__name__ == "StaleTableError"
    assert SILVER in msg and f"version {built}" in msg and f"version {now}" in msg
    assert "dfn-curate score" in msg
    with pytest.raises(ConfigError, match="gold_selection.*dfn-curate select"):
        run_step(lake, cfg, "export", "r2")
    with pytest.raises(ConfigError, match=f"dedup: {SILVER} is stale.*dfn-curate score"):
        run_step(lake, cfg, "dedup", "r2")
    score_all(lake, cfg, "r2")
    with pytest.raises(ConfigError, match=f"{DEDUP}.*dfn-curate dedup"):
        run_step(lake, cfg, "select", "r2")
    assert lake.read(SELECTION).count() == 4  # nothing was rewritten

    lake.spark.sql(f"OPTIMIZE {lake.name(BRONZE)}")  # rewrites files, not rows: not stale
    assert not lake.data_changed_since(BRONZE, now)

    lake.append(spark.createDataFrame(bronze_rows(7, 2), BRONZE_SCHEMA), BRONZE)
    conf_file = tmp_path / "trust.yaml"
    conf_file.write_text(yaml.safe_dump({
        "lakehouse": {"root": lake.conf.root},
        "score": {"models": [{"name": TINY_JSON, "pretrained": str(weights),
                              "model_id": "tiny"}], "device": "cpu", "batch_size": 4},
        "dedup": {"near_signals": ["thumbnail"], "n_clusters": 1, "decontaminate": False},
        "select": {"preset": "none", "keep_fraction": 0.5}}))
    results = run_main(["--conf", str(conf_file), "--steps", "select", "--run-id", "r3"])
    assert set(results) == {"score", "dedup", "select"}  # the missing steps ran first
    assert lake.read(SELECTION).count() == 9
    assert lake.read(DEDUP).count() == 9
    assert lake.read(SILVER).where(F.col("model_id") == "tiny").count() == 9
    run_step(lake, cfg, "select", "r4")  # up to date now


