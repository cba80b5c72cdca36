"""select.mode: frozen keeps the recorded cuts; recompute equals a from-scratch run; either
way gold_selection is merged with only the rows that changed, and an idle re-run commits
nothing."""

from __future__ import annotations

import pytest

from etl.config import Config, ConfigError, LakehouseConf, SelectConf, validate
from etl.provenance import CUTS_PROPERTY
from etl.rules import RAND
from etl.select import frozen_rule, rule_context, run_select
from etl.tables import BRONZE, SELECTION, SILVER, Lakehouse

BRONZE_SCHEMA = "uid string, url string, text string, width int, height int"
SILVER_SCHEMA = "uid string, model_id string, score double"
FIRST = {"a": 0.9, "b": 0.8, "c": 0.7, "d": 0.6, "none": None}
# a new batch scored higher: a recomputed cut moves up, a frozen one stays at 0.7
SECOND = {"e": 0.95, "f": 0.93, "g": 0.91, "h": 0.2}


def add_rows(spark, lake: Lakehouse, scores: dict) -> None:
    rows = [(u, f"https://x/{u}", f"caption {u}", 400, 300) for u in scores]
    lake.append(spark.sparkContext.parallelize(rows, 3).toDF(BRONZE_SCHEMA), BRONZE)
    lake.append(spark.sparkContext.parallelize(
        [(u, "m1", s) for u, s in scores.items()], 2).toDF(SILVER_SCHEMA), SILVER)


def cfg_of(lake: Lakehouse, mode: str) -> Config:
    return Config(lakehouse=LakehouseConf(root=lake.root),
                  select=SelectConf(model_id="m1", preset="none", keep_fraction=0.5, mode=mode))


def selection(lake: Lakehouse) -> dict:
    return {r.uid: (r.kept, r.drop_reason, r.threshold, r.score)
            for r in lake.read(SELECTION).collect()}


def last_merge(lake: Lakehouse):
    return lake.history(SELECTION).where("operation = 'MERGE'").orderBy("version",
                                                                      ascending=False).first()


@pytest.mark.slow
def test_frozen_keeps_the_recorded_threshold_and_merges_only_new_rows(spark, lake, capsys):
    add_rows(spark, lake, FIRST)
    run_select(lake, cfg_of(lake, "frozen"), "r1")
    assert "no recorded cuts" in capsys.readouterr().out  # the first run resolves them
    first = selection(lake)
    cuts = lake.properties(SELECTION)[CUTS_PROPERTY]
    # N=4 scored, n=int(4*0.5)=2 -> threshold 0.7 (ties kept)
    assert {u for u, v in first.items() if v[0]} == {"a", "b", "c"}
    assert first["none"][1] == "unscorable" and first["d"][1] == "below-threshold"

    add_rows(spark, lake, SECOND)
    counts = run_select(lake, cfg_of(lake, "frozen"), "r2")
    assert "(frozen)" in capsys.readouterr().out
    now = selection(lake)
    assert {u for u, v in now.items() if v[0]} == {"a", "b", "c", "e", "f", "g"}
    assert {v[2] for v in now.values()} == {0.7}  # the recorded cut, applied by value
    assert {u: now[u] for u in first} == first  # nothing left, nothing rewritten
    # only new rows: one append of them, then one metadata commit recording the input
    # versions read; the cuts stay as recorded
    data, props = lake.history(SELECTION, 2).orderBy("version").collect()
    assert data["operation"] == "WRITE" and data["operationParameters"]["mode"] == "Append"
    assert data["operationMetrics"]["numOutputRows"] == "4"
    assert props["operation"] == "SET TBLPROPERTIES"
    assert lake.properties(SELECTION)[CUTS_PROPERTY] == cuts
    assert counts["rows_compared"] == 4  # the new rows only: no cut moved
    assert counts["rows_new"] == 4 and counts["rows_changed"] == counts["rows_updated"] == 0
    assert counts["pool"] == 9 and counts["kept"] == 6
    assert (counts["work:new"], counts["work:touched"], counts["work:pool"]) == (4, 4, 9)

    version = lake.version(SELECTION)
    again = run_select(lake, cfg_of(lake, "frozen"), "r3")
    assert lake.version(SELECTION) == version  # no commit at all, not even properties
    assert again["rows_new"] == again["rows_updated"] == again["rows_removed"] == 0


@pytest.mark.slow
def test_recompute_equals_a_from_scratch_run_and_counts_changed_decisions(spark, lake,
                                                                          tmp_path, capsys):
    add_rows(spark, lake, FIRST)
    run_select(lake, cfg_of(lake, "recompute"), "r1")
    add_rows(spark, lake, SECOND)
    counts = run_select(lake, cfg_of(lake, "recompute"), "r2")
    # the cut moved past an old row (c): the pool is read once for it and the new rows
    assert "made from its change feed" not in capsys.readouterr().out
    fresh = Lakehouse(spark, LakehouseConf(root=str(tmp_path / "fresh")))
    add_rows(spark, fresh, {**FIRST, **SECOND})
    run_select(fresh, cfg_of(fresh, "recompute"), "f1")
    def rows(lh):  # the per-row threshold is not compared: rows keep the one they got
        return {r.uid: {k: v for k, v in r.asDict().items() if k != "threshold"}
                for r in lh.read(SELECTION).collect()}

    assert rows(lake) == rows(fresh)
    # N=8, n=4 -> threshold 0.8 (was 0.7): c leaves, e f g enter, a b stay
    assert {u for u, v in selection(lake).items() if v[0]} == {"a", "b", "e", "f", "g"}
    assert counts["rows_new"] == 4 and counts["rows_changed"] == 1
    assert counts["rows_updated"] == 1  # only c's decision changed: a b d none not rewritten
    assert counts["rows_compared"] == 5  # the 4 new rows, and c: the cut moved past it
    assert last_merge(lake)["operationMetrics"]["numTargetRowsUpdated"] == "1"
    assert (counts["work:new"], counts["work:touched"], counts["work:pool"]) == (4, 5, 9)
    assert selection(lake)["c"][2] == 0.8 and selection(lake)["a"][2] == 0.7
    assert sorted(lake.read(SELECTION).columns) == sorted(fresh.read(SELECTION).columns)


def test_frozen_rule_turns_recorded_cuts_into_thresholds():
    ctx = rule_context(SelectConf())
    from etl.rules import compile_rule

    rule = compile_rule("random(0.5) and (dfn_fraction(0.3) or english) and "
                        "dfn_fraction(0.1)", ctx)
    recorded = {"random(0.5)": {"kind": "random", "value": 12.0, "N": 10, "n": 5},
                "dfn_fraction(0.3)": {"kind": "fraction", "value": None, "N": 10, "n": 10}}
    frozen, missing = frozen_rule(rule, recorded)
    assert missing == ["dfn_fraction(0.1)"]
    first, nested, last = frozen.parts
    assert (first.kind, first.column, first.value, first.text) == (
        "threshold", RAND, 12.0, "random(0.5)")
    assert nested.children[0].kind == "scored"  # a fraction that kept every scored row
    assert last == rule.parts[2]  # not recorded: resolved afresh
    assert [p.drop_reason for p in frozen.parts] == [p.drop_reason for p in rule.parts]


def test_frozen_rule_resolves_degenerate_or_rebased_cuts_again():
    from etl.rules import compile_rule

    rule = compile_rule("random(0.5) and dfn_fraction(0.3) and dfn_fraction(0.1)",
                        rule_context(SelectConf()))
    basis = {"dfn_fraction(0.1)": {"column": "score", "source": "model:m2"}}
    recorded = {"random(0.5)": {"kind": "random", "value": None, "N": 3, "n": 0},  # kept none
                "dfn_fraction(0.3)": {"kind": "fraction", "value": None, "N": 0, "n": 0},
                "dfn_fraction(0.1)": {"kind": "fraction", "value": 0.5, "N": 9, "n": 0,
                                      "column": "score", "source": "model:m1"}}
    frozen, missing = frozen_rule(rule, recorded, basis)
    assert missing == ["random(0.5)", "dfn_fraction(0.3)", "dfn_fraction(0.1)"]
    assert frozen == rule
    recorded["dfn_fraction(0.1)"]["source"] = "model:m2"  # same basis: frozen
    assert frozen_rule(rule, recorded, basis)[0].parts[2].kind == "threshold"


def test_unknown_mode_is_a_config_error():
    with pytest.raises(ConfigError, match="select.mode: one of recompute, frozen"):
        validate(Config(select=SelectConf(mode="freeze")))


@pytest.mark.slow
def test_sync_writes_exactly_the_changed_rows_and_digests_tell_nulls_apart(spark, lake):
    """etl.tablesync.sync over 3 partitions: a value moved to another column's null slot, a
    changed watched column, a deleted and an inserted key are each found; equal rows are not
    rewritten (the table ends as an overwrite would leave it)."""
    from etl.tablesync import sync

    schema = "uid string, a string, b string, kept boolean"
    old = [("1", "x", None, True), ("2", "y", "z", True), ("3", "p", "q", False),
           ("4", None, None, None)]
    lake.overwrite(spark.createDataFrame(old, schema).repartition(3), SELECTION)
    new = [("1", None, "x", True),  # same values, other columns: a digest of values alone ties
           ("2", "y", "z", False),  # watched column changed
           ("4", None, None, None),  # unchanged, nulls throughout
           ("5", "n", None, True)]  # new; "3" is gone
    counts = sync(lake, spark.createDataFrame(new, schema).repartition(3), SELECTION,
                  watch=("kept",))
    assert counts == {"rows_new": 1, "rows_updated": 2, "rows_removed": 1, "rows_changed": 1,
                      "rows_rewritten": 0}
    assert sorted(tuple(r) for r in lake.read(SELECTION).collect()) == sorted(
        new, key=lambda r: r[0])
    assert sync(lake, spark.createDataFrame(new, schema), SELECTION, watch=("kept",)) == \
        dict.fromkeys(counts, 0)
    # within a key set: its keys absent from the rows are removed, other keys are untouched;
    # rows that are all new are appended
    within = spark.createDataFrame([("1",), ("2",), ("6",)], "uid string")
    part = [("2", "y", "z", True), ("6", "m", None, False)]  # "1" is gone, "6" is new
    counts = sync(lake, spark.createDataFrame(part, schema), SELECTION, within=within)
    assert (counts["rows_new"], counts["rows_updated"], counts["rows_removed"]) == (1, 1, 1)
    assert sorted(tuple(r) for r in lake.read(SELECTION).collect()) == [
        ("2", "y", "z", True), ("4", None, None, None), ("5", "n", None, True),
        ("6", "m", None, False)]
    version = lake.version(SELECTION)
    more = [("7", "k", "l", True)]
    counts = sync(lake, spark.createDataFrame(more, schema), SELECTION,
                  within=spark.createDataFrame([("7",)], "uid string"))
    assert counts["rows_new"] == 1 and lake.version(SELECTION) == version + 1
    assert lake.history(SELECTION, 1).first()["operation"] == "WRITE"  # an append, no MERGE
    assert len(lake.read(SELECTION).collect()) == 5
