"""A selection compares only the rows that can have changed (etl.selectinc): rows whose inputs
changed, and rows a moved cut passed; anything it cannot vouch for compares every row. Either
way the table ends as a from-scratch selection."""

from __future__ import annotations

import pytest

from etl.config import Config, LakehouseConf, SelectConf
from etl.select import run_select
from etl.tables import BRONZE, SELECTION, SILVER, Lakehouse

BRONZE_SCHEMA = "uid string, url string, text string, width int, height int"
SILVER_SCHEMA = "uid string, model_id string, score double"


def add_rows(spark, lake: Lakehouse, scores: dict) -> None:
    rows = [(u, f"https://x/{u}", f"caption {u}", 400, 300) for u in scores]
    lake.append(spark.sparkContext.parallelize(rows, 3).toDF(BRONZE_SCHEMA), BRONZE)
    lake.append(spark.sparkContext.parallelize(
        [(u, "m1", s) for u, s in scores.items()], 2).toDF(SILVER_SCHEMA), SILVER)


def cfg_of(lake: Lakehouse, **select) -> Config:
    conf = {"model_id": "m1", "preset": "none", "keep_fraction": 0.5, **select}
    return Config(lakehouse=LakehouseConf(root=lake.root), select=SelectConf(**conf))


def decisions(lake: Lakehouse) -> dict:
    return {r.uid: (r.kept, r.drop_reason) for r in lake.read(SELECTION).collect()}


def fresh_of(spark, tmp_path, scores: dict, **select) -> dict:
    fresh = Lakehouse(spark, LakehouseConf(root=str(tmp_path / "fresh")))
    add_rows(spark, fresh, scores)
    run_select(fresh, cfg_of(fresh, **select), "f1")
    return decisions(fresh)


@pytest.mark.slow
def test_random_cut_and_a_changed_configuration(spark, lake, tmp_path, capsys):
    first = {f"u{i:02d}": i / 20 for i in range(20)}
    second = {f"v{i:02d}": i / 20 + 0.01 for i in range(4)}
    rule = "random(0.5) and dfn_fraction(0.5)"
    add_rows(spark, lake, first)
    run_select(lake, cfg_of(lake, rule=rule), "r1")
    assert "comparing" not in capsys.readouterr().out  # a first selection writes the table
    add_rows(spark, lake, second)
    counts = run_select(lake, cfg_of(lake, rule=rule), "r2")
    out = capsys.readouterr().out
    assert f"comparing {counts['rows_compared']} rows" in out
    assert 4 <= counts["rows_compared"] < 24  # the new rows and the cuts' bands, not the pool
    assert decisions(lake) == fresh_of(spark, tmp_path, {**first, **second}, rule=rule)
    # another cut: the recorded state is not this configuration's, so every row is compared
    counts = run_select(lake, cfg_of(lake, rule="random(0.5) and dfn_fraction(0.25)"), "r3")
    assert "comparing every row (the last selection was made under another configuration" \
        in capsys.readouterr().out
    assert counts["rows_compared"] == 24


@pytest.mark.slow
def test_a_rescored_row_is_compared_and_a_deleted_bronze_row_compares_all(spark, lake, capsys):
    add_rows(spark, lake, {"a": 0.9, "b": 0.8, "c": 0.7, "d": 0.6})
    run_select(lake, cfg_of(lake, keep_fraction=None, min_score=0.75), "r1")
    lake.spark.sql(f"UPDATE {lake.name(SILVER)} SET score = 0.1 WHERE uid = 'a'")
    counts = run_select(lake, cfg_of(lake, keep_fraction=None, min_score=0.75), "r2")
    assert counts["rows_compared"] == 1 and counts["rows_changed"] == 1
    assert decisions(lake)["a"] == (False, "below-threshold")
    lake.delete(BRONZE, "uid = 'd'")  # as a takedown does (it also deletes d's selection row)
    lake.delete(SELECTION, "uid = 'd'")
    capsys.readouterr()
    counts = run_select(lake, cfg_of(lake, keep_fraction=None, min_score=0.75), "r3")
    assert "comparing every row (1 bronze rows were deleted since" in capsys.readouterr().out
    assert counts["rows_compared"] == 3 and set(decisions(lake)) == {"a", "b", "c"}


@pytest.mark.slow
def test_new_rows_are_appended_unless_a_commit_followed_the_record(spark, lake, tmp_path,
                                                                   monkeypatch):
    import etl.select
    from etl.lease import hold

    def select(run_id):
        with hold(lake, run_id, "select"):  # only under the lease are bronze's new rows new
            return run_select(lake, conf, run_id)

    rows = {"a": 0.9, "b": 0.8, "c": 0.3}
    add_rows(spark, lake, rows)
    conf = cfg_of(lake, keep_fraction=None, min_score=0.5)
    select("r1")
    add_rows(spark, lake, {"d": 0.7, "e": 0.1})
    before = lake.version(SELECTION)
    counts = select("r2")
    assert counts["rows_compared"] == 2 and counts["rows_new"] == 2
    ops = lake.history(SELECTION, lake.version(SELECTION) - before).select("operation").collect()
    assert "MERGE" not in {r[0] for r in ops}  # new bronze rows: appended, the table not read
    spark.sql(f"OPTIMIZE {lake.name(SELECTION)}")  # moves the version, not the rows
    version = lake.version(SELECTION)
    select("idle")
    assert lake.version(SELECTION) == version  # the record stands: no commit

    def stop(*args, **kwargs):
        raise RuntimeError("stopped before the record")

    add_rows(spark, lake, {"f": 0.95, "g": 0.2})
    monkeypatch.setattr(etl.select, "record_selection", stop)
    with pytest.raises(RuntimeError, match="stopped"):
        select("r3")  # f and g are in the table, the record still says r2's
    monkeypatch.undo()
    counts = select("r4")
    uids = [r.uid for r in lake.read(SELECTION).collect()]
    assert sorted(uids) == sorted(set(uids))  # compared, not appended again
    assert counts["rows_new"] == 0
    rows.update({"d": 0.7, "e": 0.1, "f": 0.95, "g": 0.2})
    assert decisions(lake) == fresh_of(spark, tmp_path, rows, keep_fraction=None, min_score=0.5)


@pytest.mark.slow
def test_rows_new_to_bronze_are_made_from_its_feed_unless_other_rows_changed(spark, lake,
                                                                            tmp_path, capsys):
    scores = {f"u{i}": i / 10 for i in range(10)}
    add_rows(spark, lake, scores)
    conf = cfg_of(lake, keep_fraction=None, min_score=0.5)
    run_select(lake, conf, "r1")
    new = {"n1": 0.95, "n2": 0.05, "n3": 0.55}
    add_rows(spark, lake, new)
    # a new row rescored after its append: made from the feed with its current score
    lake.spark.sql(f"UPDATE {lake.name(SILVER)} SET score = 0.99 WHERE uid = 'n2'")
    capsys.readouterr()
    counts = run_select(lake, conf, "r2")
    assert "3 rows new to bronze made from its change feed" in capsys.readouterr().out
    scores.update({**new, "n2": 0.99})
    assert decisions(lake) == fresh_of(spark, tmp_path / "a", scores, keep_fraction=None,
                                       min_score=0.5)
    assert counts["rows_new"] == 3 and counts["rows_compared"] == 3
    # an old row rescored besides new rows: the pool is read once for them all
    add_rows(spark, lake, {"n4": 0.6})
    lake.spark.sql(f"UPDATE {lake.name(SILVER)} SET score = 0.99 WHERE uid = 'u1'")
    counts = run_select(lake, conf, "r3")
    assert "made from its change feed" not in capsys.readouterr().out
    scores.update({"n4": 0.6, "u1": 0.99})
    assert decisions(lake) == fresh_of(spark, tmp_path / "b", scores, keep_fraction=None,
                                       min_score=0.5)
    assert counts["rows_new"] == 1 and counts["rows_compared"] == 2
    uids = [r.uid for r in lake.read(SELECTION).collect()]
    assert sorted(uids) == sorted(set(uids))
