"""Selection: DataComp keep-fraction semantics, basic filters, drop-reason order, the funnel."""

from __future__ import annotations

import math
import random

import numpy as np
import pytest

from etl.config import Config, ConfigError, LakehouseConf, SelectConf
from etl.cuts import fraction_threshold, kth_largest
from etl.funnel import Funnel
from etl.select import (
    apply_selection,
    preset_rule,
    run_select,
    select_pairs,
    selection_reasons,
    with_dedup,
)
from etl.tables import BRONZE, DEDUP, RUN_STATS, SELECTION, SILVER

POOL_SCHEMA = ("uid string, url string, text string, width int, height int, sha256 string, "
               "score double, label_kind string, label_of string")
DEDUP_SCHEMA = ("uid string, dup_of string, dup_reason string, dup_similarity double, "
                "eval_match string, eval_similarity double")
GOOD = "a red circle on a white background"


def scores_df(spark, scores):
    rows = [(f"u{i:04d}", s) for i, s in enumerate(scores)]
    return spark.sparkContext.parallelize(rows, 3).toDF("uid string, score double")


def datacomp_keep(scores, fraction):
    """DataComp baselines.py reference: threshold = sorted-desc[int(N * f)], keep >=."""
    vals = np.array([s for s in scores if s is not None], dtype=float)
    n = int(len(vals) * fraction)
    if n >= len(vals):
        return {i for i, s in enumerate(scores) if s is not None}
    thr = -np.sort(-vals)[n]
    return {i for i, s in enumerate(scores) if s is not None and s >= thr}


def kept_by_fraction(df, fraction, small=200_000):
    thr = fraction_threshold(df, "score", fraction, small)
    kept = [(int(r.uid[1:]), r.score) for r in df.collect() if r.score is not None]
    return {i for i, s in kept if thr.value is None or s >= thr.value}, thr


TIES = [5.0, 4.0, 4.0, 4.0, 3.0, 3.0, 2.0, 1.0, 1.0, 0.5]


def test_keep_fraction_matches_datacomp_on_ties(spark):
    df = scores_df(spark, TIES).cache()
    for fraction in (0.0, 0.1, 0.25, 0.4, 0.65, 0.99, 1.0):
        kept, thr = kept_by_fraction(df, fraction)
        assert kept == datacomp_keep(TIES, fraction), fraction
        assert thr.n_scored == len(TIES) and thr.position == int(len(TIES) * fraction)
        if fraction == 0.0:  # fraction 0 keeps the top score (DataComp)
            assert kept == {0} and thr.value == 5.0
        if fraction == 0.4:  # n = 4 -> sorted-desc[4] = 3.0, its tie kept too
            assert thr.value == 3.0 and kept == {0, 1, 2, 3, 4, 5}
        if fraction == 1.0:  # n == N keeps every scored row
            assert thr.value is None and kept == set(range(len(TIES)))
    df.unpersist()


@pytest.mark.slow
def test_keep_fraction_tiny_pools(spark):
    cases = [
        ([0.7], 0.0, {0}), ([0.7], 0.5, {0}), ([0.7], 1.0, {0}),
        ([0.7, 0.2], 0.5, {0, 1}), ([0.7, 0.2], 0.49, {0}), ([2.0, 2.0, 1.0], 0.0, {0, 1}),
        ([], 0.3, set()), ([None, None], 0.5, set()), ([None, 0.3, 0.9], 0.4, {2}),
    ]
    for scores, fraction, expected in cases:
        kept, thr = kept_by_fraction(scores_df(spark, scores), fraction)
        assert kept == expected == datacomp_keep(scores, fraction), (scores, fraction)
        assert thr.n_scored == sum(s is not None for s in scores)  # nulls are not in N


def test_keep_fraction_random_pool_with_bucketing(spark):
    rng = random.Random(3)
    scores = [round(rng.gauss(0, 1), 1) for _ in range(300)] + [None] * 7
    df = scores_df(spark, scores).cache()
    for fraction in (0.013, 0.3, 0.9):
        kept, _ = kept_by_fraction(df, fraction, small=20)
        assert kept == datacomp_keep(scores, fraction), fraction
    df.unpersist()


def test_kth_largest_exact_under_heavy_ties(spark):
    values = [0.0] * 90 + [float(i) for i in range(1, 11)] + [10.0] * 5
    df = scores_df(spark, values).cache()
    ref = sorted(values, reverse=True)
    for k in (0, 6, 14, 50):  # 50 lands in the tie at the minimum (peeled, not bucketed)
        assert kth_largest(df, "score", k, small=3, buckets=4) == ref[k], k
    with pytest.raises(ValueError):
        kth_largest(df, "score", len(values))
    df.unpersist()


def test_kth_largest_sorts_nan_above_numbers_as_spark_does(spark):
    values = [2.0, float("nan"), 7.0, None, float("nan"), -1.0] + [float(i) for i in range(20)]
    df = scores_df(spark, values)
    ref = sorted((v for v in values if v is not None and v == v), reverse=True)
    assert math.isnan(kth_largest(df, "score", 0, small=2, buckets=3))
    assert math.isnan(kth_largest(df, "score", 1, small=2, buckets=3))
    for k in (2, 5, 13, 22, 23):
        assert kth_largest(df, "score", k, small=2, buckets=3) == ref[k - 2], k
    with pytest.raises(ValueError, match="not the 99 expected"):
        kth_largest(df, "score", 0, count=99)


def pool_rows():
    """(uid, url, text, width, height, sha256, score, label_kind, label_of) per case."""
    return [
        ("k1", "u/k1", GOOD, 400, 300, "h1", 0.9, "clean", None),
        ("k2", "u/k2", "a blue square on a gray background", 640, 480, "h2", 0.8, "clean", None),
        ("k3", "u/k3", "three green stars on beige", 300, 300, "h3", 0.7, "clean", None),
        ("lo", "u/lo", "a yellow ring on a black background", 500, 400, "h4", 0.1, "mismatched", None),
        ("tie", "u/tie", "a purple cross on a white background", 500, 400, "h5", 0.7, "clean", None),
        ("leak", "u/leak", GOOD, 400, 300, "h6", 0.95, "eval_leak", "eval00001"),
        ("dup", "u/dup", GOOD, 400, 300, "h1", 0.5, "exact_dup", "u/k1"),
        ("near", "u/near", GOOD, 400, 300, "h7", 0.6, "near_dup", "u/k2"),
        ("fr", "u/fr", "un cercle rouge sur un fond blanc et gris", 400, 300, "h8", 0.9,
         "non_english", None),
        ("words", "u/words", "red circle", 400, 300, "h9", 0.9, "clean", None),
        ("chars", "u/chars", "a b c", 400, 300, "h10", 0.9, "clean", None),
        ("small", "u/small", GOOD, 120, 80, "h11", 0.9, "too_small", None),
        ("both", "u/both", GOOD, 150, 600, "h12", 0.9, "too_small", None),
        ("aspect", "u/aspect", GOOD, 900, 250, "h13", 0.9, "bad_aspect", None),
        ("nosize", "u/nosize", GOOD, None, None, "h14", 0.9, "clean", None),
        ("noscore", "u/noscore", GOOD, 400, 300, "h15", None, "noise", None),
    ]


def dedup_rows():
    return [
        ("leak", "k1", "exact_sha256", None, "eval00001", 1.0),  # leak wins over duplicate
        ("dup", "k1", "exact_sha256", None, None, None),
        ("near", "k2", "near_model", 0.97, None, None),
    ]


@pytest.fixture
def pool(spark):
    return spark.sparkContext.parallelize(pool_rows(), 3).toDF(POOL_SCHEMA)


@pytest.fixture
def dedup(spark):
    return spark.sparkContext.parallelize(dedup_rows(), 2).toDF(DEDUP_SCHEMA)


EXPECTED_PRE = {
    "leak": "eval-leak", "dup": "duplicate", "near": "near-duplicate", "fr": "english",
    "words": "caption_words", "chars": "caption_chars", "small": "min_side", "both": "min_side",
    "aspect": "aspect", "nosize": "min_side",
}


def test_fraction_of_pool_counts_every_scored_row(pool, dedup):
    conf = SelectConf(preset="none", keep_fraction=0.2, fraction_of="pool")
    sel = select_pairs(pool, dedup, conf).collect()
    # all 15 scored rows (dedup-flagged ones too): n = 3 -> [.95, .9, .9, .9, ...] -> 0.9
    assert {r.threshold for r in sel} == {0.9}
    assert {r.uid for r in sel if r.kept} == {"k1", "fr", "words", "chars", "small", "both",
                                               "aspect", "nosize"}


def test_min_score_and_no_threshold(pool, dedup):
    sel = select_pairs(pool, dedup, SelectConf(preset="none", keep_fraction=None, min_score=0.7))
    kept = {r.uid for r in sel.where("kept").collect()}
    assert kept == {"k1", "k2", "k3", "tie", "fr", "words", "chars", "small", "both", "aspect",
                    "nosize"}
    open_sel = select_pairs(pool, None, SelectConf(preset="none", keep_fraction=None))
    assert open_sel.where("kept").count() == len(pool_rows())  # unscorable only with a cut


def test_custom_filters_and_original_size(spark, pool):
    pool = pool.withColumn("original_width", pool.width * 10).withColumn(
        "original_height", pool.height * 10)
    conf = SelectConf(preset="datacomp_basic", keep_fraction=None,
                      filters={"no_ring": "text NOT LIKE '%ring%'"})
    got = {r.uid: r.drop_reason for r in select_pairs(pool, None, conf).collect()}
    assert got["small"] is None and got["both"] == "aspect"  # 1200x800 passes, 1500x6000 not
    assert got["lo"] == "no_ring"


def test_bad_filter_fails_fast_naming_it(pool):
    conf = SelectConf(preset="none", filters={"oops": "no_such_column > 1"})
    with pytest.raises(ConfigError, match="oops"):
        select_pairs(pool, None, conf)
    with pytest.raises(ConfigError, match="already"):
        select_pairs(pool, None, SelectConf(filters={"english": "true"}))


def test_min_score_keeps_ties_and_records_its_threshold(spark):
    df = spark.createDataFrame([("a", 1.0, None), ("b", 0.5, None), ("c", 0.5, None),
                                ("d", 0.4, None), ("e", None, None)],
                               "uid string, score double, pre_reason string")
    rule = preset_rule(SelectConf(preset="none", min_score=0.5, keep_fraction=None))
    out, parts = apply_selection(df, rule)
    got = {r.uid: (r.kept, r.drop_reason, r.threshold) for r in out.collect()}
    assert got == {"a": (True, None, 0.5), "b": (True, None, 0.5), "c": (True, None, 0.5),
                   "d": (False, "below-threshold", 0.5), "e": (False, "unscorable", 0.5)}
    assert [p.text for p in parts] == ["scored(score)", "min_score"]


def test_the_preset_compiles_to_a_rule_of_named_parts():
    conf = SelectConf(filters={"long": "caption_chars > 40"}, keep_fraction=0.7)
    rule = preset_rule(conf)
    assert rule.reasons == ["english", "caption_words", "caption_chars", "min_side", "aspect",
                            "long", "unscorable", "below-threshold"]
    assert [p.kind for p in rule.parts][-2:] == ["scored", "fraction"]
    assert preset_rule(SelectConf(preset="none", keep_fraction=None)).parts == ()
    assert selection_reasons(SelectConf(preset="none"))[:3] == [
        "eval-leak", "duplicate", "near-duplicate"]


def test_run_select_drop_reasons_funnel_and_stats(spark, lake, pool, dedup):
    lake.overwrite(pool.drop("score"), BRONZE)
    silver = pool.selectExpr("uid", "'m1' as model_id", "score",
                             "case when score is null then 'decode error' end as score_error")
    lake.overwrite(silver, SILVER)
    lake.overwrite(dedup, DEDUP)
    cfg = Config(lakehouse=LakehouseConf(root=str(lake.root)),
                 select=SelectConf(model_id="m1", keep_fraction=0.5, fraction_of="remaining"))
    counts = run_select(lake, cfg, "run-1")
    rows = lake.read(SELECTION).collect()
    # remaining scored: k1 .9, k2 .8, k3 .7, tie .7, lo .1 -> N=5, n=2, threshold 0.7
    expected = {**EXPECTED_PRE, "k1": None, "k2": None, "k3": None, "tie": None,
                "lo": "below-threshold", "noscore": "unscorable"}
    assert {r.uid: r.drop_reason for r in rows} == expected  # each pool uid exactly once
    assert len(rows) == len(pool_rows())
    assert {r.uid for r in rows if r.kept} == {"k1", "k2", "k3", "tie"}
    assert {r.threshold for r in rows} == {0.7}
    assert counts["pool"] == len(pool_rows()) and counts["kept"] == 4
    assert counts["dropped:below-threshold"] == 1 and counts["dropped:eval-leak"] == 1
    assert counts["dropped:min_side"] == 3
    assert sum(v for k, v in counts.items() if k.startswith("dropped:")) + counts["kept"] \
        == counts["pool"]
    stats = lake.read(RUN_STATS).where("run_id = 'run-1' and step = 'select'").collect()
    assert {r.metric: r.value for r in stats}["kept"] == 4


def test_select_and_report_share_one_funnel_that_adds_up(spark, capsys):
    """A reason outside the configured order (a hand-edited or older selection) is counted by
    the funnel select records, as the report counts it: the steps add up to the pool."""
    sel = spark.createDataFrame([("a", False, "eval-leak"), ("b", False, "custom-rule"),
                                 ("c", True, None), ("d", False, "below-threshold")],
                                "uid string, kept boolean, drop_reason string")
    funnel = Funnel.of(sel, selection_reasons(SelectConf(preset="none")))
    assert funnel.rows() == [("pool", 0, 4), ("eval-leak", 1, 3), ("below-threshold", 1, 2),
                             ("custom-rule", 1, 1), ("kept", 0, 1)]
    assert funnel.metrics() == {
        "pool": 4, "dropped:eval-leak": 1, "dropped:below-threshold": 1,
        "dropped:custom-rule": 1, "kept": 1}
    assert Funnel.from_metrics(funnel.metrics()) == funnel
    funnel.print()
    assert "custom-rule" in capsys.readouterr().out


def test_pre_threshold_without_dedup_has_null_flags(pool):
    pre = with_dedup(pool, None)
    assert pre.where("dup_reason is not null or eval_match is not null").count() == 0
    assert pre.where("pre_reason is not null").count() == 0
