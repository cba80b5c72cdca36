"""Lineage, declared once: which derived tables each step reads, which step rebuilds each and
which recorded version counts (pure: the declarations and conditions, no Spark)."""

from __future__ import annotations

import pytest

from etl import lineage, tables
from etl.config import Config, DedupConf, SelectConf, TargetsConf
from etl.lineage import INPUTS, upstream
from etl.steps import PIPELINE
from etl.tables import BRONZE, DEDUP, SELECTION, SILVER, TABLE_NAMES, TABLES, TARGETS, table_info


def test_every_input_is_built_by_an_earlier_pipeline_step():
    for step, inputs in INPUTS.items():
        assert step in PIPELINE
        for inp in inputs:
            assert PIPELINE.index(inp.step) < PIPELINE.index(step), (step, inp.table)
            assert table_info(inp.table).source == BRONZE  # what staleness is measured against
        assert [PIPELINE.index(i.step) for i in inputs] == sorted(
            PIPELINE.index(i.step) for i in inputs)


def test_upstream_steps_in_run_order():
    assert upstream("ingest") == [] and upstream("score") == []
    assert upstream("dedup") == ["score"] and upstream("targets") == ["score"]
    assert upstream("select") == ["score", "dedup", "targets"]
    assert upstream("export") == ["score", "dedup", "targets", "select"]
    assert [i.table for i in INPUTS["select"]] == [SILVER, DEDUP, TARGETS]
    assert [i.step for i in INPUTS["select"]] == ["score", "dedup", "targets"]
    assert [i.table for i in INPUTS["export"]] == [SELECTION]


def test_what_select_and_dedup_read_depends_on_the_config():
    plain = Config(select=SelectConf(keep_fraction=0.5))
    assert lineage.select_reads_scores(None, plain)
    assert not lineage.select_reads_targets(None, plain)
    column = Config(select=SelectConf(keep_fraction=0.5, score_column="clip_score"))
    assert not lineage.select_reads_scores(None, column)  # a bronze column, not silver
    text = Config(select=SelectConf(rule="text_based"))
    assert not lineage.select_reads_scores(None, text)
    assert lineage.select_reads_targets(None, Config(select=SelectConf(rule="image_based")))
    thumbs = DedupConf(near_signals=["thumbnail"])
    assert lineage.dedup_reads_scores(None, Config(dedup=thumbs))  # to keep the best copy
    assert not lineage.dedup_reads_scores(
        None, Config(dedup=thumbs, select=SelectConf(score_column="clip_score")))
    assert lineage.dedup_reads_scores(None, Config(dedup=DedupConf(near_signals=["model"]),
                                                   select=SelectConf(score_column="clip_score")))


def test_targets_reads_the_embeddings_of_its_own_model():
    cfg = Config(targets=TargetsConf(model_id="other"))
    assert lineage.target_model(None, cfg) == "other"


def test_the_registry_names_every_table_once_with_what_a_build_records():
    constants = {v for k, v in vars(tables).items()
                 if k.isupper() and isinstance(v, str) and k != "UID_RE" and "_" in v}
    assert constants <= set(TABLE_NAMES)
    assert len(set(TABLE_NAMES)) == len(TABLES)
    assert TABLE_NAMES[0] == BRONZE and TARGETS in TABLE_NAMES
    assert {t.layer for t in TABLES} == {"bronze", "silver", "gold", "ops"}
    silver, dedup = table_info(SILVER), table_info(DEDUP)
    assert (silver.stats_step, silver.version_metric("tiny")) == (
        "score:silver_scores", "source_version[tiny]")
    assert (dedup.stats_step, dedup.version_metric()) == ("dedup", "source_version[bronze_pairs]")
    with pytest.raises(ValueError, match="one source version per model"):
        silver.version_metric()
    with pytest.raises(KeyError, match="not a table"):
        table_info("nope")
