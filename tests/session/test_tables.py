"""Lakehouse writes count their rows from Delta's own commit: the MERGE's metrics, or the
creating append's log entry, found by its tag even when another writer created the table."""

from __future__ import annotations

import json
import uuid

from etl.tables import Lakehouse


def _rows(spark, ids, n_parts=2):
    return spark.createDataFrame([(i, f"r{i}") for i in ids], "k long, v string").repartition(n_parts)


def test_insert_new_counts_what_each_commit_inserted(spark, lake):
    assert lake.insert_new(_rows(spark, range(5)), "t", ["k"]) == 5  # creates the table
    assert lake.insert_new(_rows(spark, range(3, 9)), "t", ["k"]) == 4  # 3, 4 are there
    assert lake.insert_new(_rows(spark, range(9)), "t", ["k"]) == 0  # nothing new: no commit
    assert lake.read("t").count() == 9
    assert lake.version("t") == 1


def test_the_creating_append_is_found_by_its_tag_behind_another_writers_commits(spark, lake):
    _rows(spark, range(7)).write.format("delta").save(lake.path("t"))  # someone else: v0
    assert lake.append_counted(_rows(spark, range(10, 12)), "t") == 2  # ours is v1, not v0's 7
    log = lake.path("t") + "/_delta_log/00000000000000000001.json"
    tags = [json.loads(line).get("commitInfo", {}).get("userMetadata")
            for line in open(log).read().splitlines()]
    assert any(t and t.startswith("dfn-curate:") for t in tags)


def test_without_the_log_entry_the_tag_is_looked_up_in_the_history(spark, lake, monkeypatch):
    _rows(spark, range(4)).write.format("delta").save(lake.path("t"))
    monkeypatch.setattr(Lakehouse, "_logged_commit", lambda self, table, tag, most=20: None)
    assert lake.append_counted(_rows(spark, range(10, 13)), "t") == 3


def test_a_catalog_that_drops_the_tag_gets_the_new_tables_last_commit(spark, lake, monkeypatch):
    real = Lakehouse._save
    monkeypatch.setattr(Lakehouse, "_logged_commit", lambda self, table, tag, most=20: None)
    monkeypatch.setattr(Lakehouse, "_save",
                        lambda self, writer, table: real(self, writer.option("userMetadata", "x"), table))
    assert lake.append_counted(_rows(spark, range(6)), "t") == 6


def test_ensure_creates_an_empty_table_once_in_a_folder_and_in_a_schema(spark, lake, tmp_path):
    from pyspark.sql import types as T

    from etl.config import LakehouseConf

    strict = T.StructType([T.StructField("k", T.LongType(), False),  # NOT NULL in the frame
                           T.StructField("v", T.StringType(), True)])
    _rows(spark, [1]).write.format("delta").save(str(tmp_path / "appended"))
    appended = spark.read.format("delta").load(str(tmp_path / "appended")).schema
    schema_name = f"dfn_ensure_{uuid.uuid4().hex[:8]}"
    spark.sql(f"CREATE SCHEMA {schema_name} LOCATION '{tmp_path / 'schema'}'")
    try:
        named = Lakehouse(spark, LakehouseConf(root=str(tmp_path / "unused"), schema=schema_name))
        for lh in (lake, named):
            lh.ensure("e", strict)
            assert lh.exists("e") and lh.read("e").count() == 0
            assert lh.read("e").schema == appended  # nullable, as an append would make it
            lh.ensure("e", strict)  # already there: no second commit
            assert lh.version("e") == 0
            rows = spark.createDataFrame([(1, None), (2, "b")], "k long, v string")
            assert lh.insert_new(rows, "e", ["k"]) == 2
    finally:
        spark.sql(f"DROP SCHEMA IF EXISTS {schema_name} CASCADE")


def test_a_recorded_build_is_stale_once_its_source_gains_rows(spark, lake, capsys):
    from etl.lineage import StaleTableError, stale_table
    from etl.tables import BRONZE, DEDUP, SILVER

    lake.overwrite(_rows(spark, range(3)), BRONZE)
    assert stale_table(lake, DEDUP, "select") is None  # nothing recorded: said, not refused
    assert "silver_dedup has no recorded bronze_pairs version" in capsys.readouterr().out
    lake.record_built("r1", DEDUP, lake.version(BRONZE))
    lake.record_built("r1", SILVER, lake.version(BRONZE), model_id="m")
    assert stale_table(lake, DEDUP, "select") is None
    assert stale_table(lake, SILVER, "select", model_id="m") is None
    lake.append(_rows(spark, range(3, 5)), BRONZE)
    stale = stale_table(lake, SILVER, "dedup", model_id="m")
    assert isinstance(stale, StaleTableError)
    assert (stale.table, stale.step, stale.built, stale.current) == (SILVER, "score", 0, 1)
    assert "dedup: silver_scores is stale" in str(stale) and "`dfn-curate score`" in str(stale)
    assert stale_table(lake, DEDUP, "select").step == "dedup"


def test_schema_mode_creates_its_schema_and_counts_with_three_level_names(spark, tmp_path):
    from etl.config import LakehouseConf

    name = f"dfn_uc_{uuid.uuid4().hex[:8]}"
    lh = Lakehouse(spark, LakehouseConf(root=str(tmp_path / "files"), catalog="spark_catalog",
                                        schema=name))
    try:
        assert lh.name("t") == f"spark_catalog.{name}.t"
        assert lh.insert_new(_rows(spark, range(4)), "t", ["k"]) == 4  # the schema, then t
        assert lh.insert_new(_rows(spark, range(2, 7)), "t", ["k"]) == 3
        lh.delete("t", "k >= 5")
        assert sorted(r.k for r in lh.read("t").collect()) == [0, 1, 2, 3, 4]
        assert [r.operation for r in lh.history("t").collect()][:2] == ["DELETE", "MERGE"]
    finally:
        spark.sql(f"DROP SCHEMA IF EXISTS spark_catalog.{name} CASCADE")


def test_a_catalog_refusal_is_told_apart_from_other_errors():
    from etl.tables import _denied, _missing

    assert _denied(Exception("[INSUFFICIENT_PERMISSIONS] User does not have USE CATALOG on "
                             "Catalog 'main'. SQLSTATE: 42501"))
    assert _denied(Exception("PERMISSION_DENIED: User does not have CREATE SCHEMA on Catalog"))
    assert not _denied(Exception("[SCHEMA_ALREADY_EXISTS] Cannot create schema"))
    assert _missing(Exception("[DELTA_MISSING_DELTA_TABLE] `/x` is not a Delta table."))
    assert not _missing(Exception("[INSUFFICIENT_PERMISSIONS] no SELECT on table"))


def test_a_folder_without_a_delta_log_is_no_table_and_a_rerun_creates_it(spark, lake):
    _rows(spark, range(3)).write.parquet(lake.path("t"))  # a first write killed before its log
    assert not lake.exists("t")
    assert lake.insert_new(_rows(spark, range(2)), "t", ["k"]) == 2
    assert lake.exists("t") and lake.read("t").count() == 2
