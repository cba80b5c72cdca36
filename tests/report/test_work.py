"""Work counters: new rows, rows touched and pool per step, as printed and as the report shows."""

from __future__ import annotations

from etl.work import NEW, POOL, TOUCHED, describe, work, work_rows


def test_describe_sums_nested_counts_and_needs_every_metric():
    assert describe({"inserted": 3, **work(3, 40, 1_200)}) == "3 new, 40 touched, pool 1,200"
    per_model = {"m1": {"scored": 2, **work(2, 2, 10)}, "m2": work(5, 5, 10)}
    assert describe(per_model) == "7 new, 7 touched, pool 20"
    assert describe({NEW: 1, TOUCHED: 2}) is None  # no pool: not a work record
    assert describe({"inserted": 3}) is None and describe("report.html") is None
    assert describe(None) is None and describe({}) is None


def test_work_rows_keep_groups_with_all_three_metrics_in_order():
    stats = [("ingest:bronze_pairs:pool", "r2", NEW, 5), ("ingest:bronze_pairs:pool", "r2", "x", 9),
             ("dedup", "r2", NEW, 1), ("dedup", "r2", TOUCHED, 30),
             ("ingest:bronze_pairs:pool", "r2", TOUCHED, 50),
             ("ingest:bronze_pairs:pool", "r2", POOL, 500), ("dedup", "r2", POOL, 500),
             ("select", "r1", NEW, 4), ("select", "r1", TOUCHED, 4)]  # select: no pool
    assert work_rows(stats) == [["ingest:bronze_pairs:pool", "r2", 5, 50, 500],
                                ["dedup", "r2", 1, 30, 500]]
    assert work_rows([]) == []
