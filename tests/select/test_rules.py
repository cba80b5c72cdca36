"""Selection rules (etl/rules.py): parser, canonical texts, DataComp-exact cuts, drop reasons."""

from __future__ import annotations

import pytest
from pyspark.sql import functions as F

from etl.config import ConfigError
from etl.filters import DATACOMP_BASIC
from etl.rules import PRESETS, RuleContext, apply_rule, rule_columns, rule_parts
from tests.helpers.frames import assert_same_rows

SCHEMA = ("uid string, pre_reason string, score double, clip double, b32 double, "
          "caption_lang string, tb boolean, ib boolean")
SCORES = {"dfn": "score", "clip": "clip", "clip_b32": "b32"}
FLAGS = {"text_based": "tb", "image_based": "ib"}
# The language tests use the two DataComp baselines as plain flags (the real presets expand
# them into english + the signal; tests/select/test_baselines.py covers those)
MACROS = {**PRESETS, "text_based": "text_based", "image_based": "image_based"}


def ctx(**kw) -> RuleContext:
    base = dict(scores=dict(SCORES), flags=dict(FLAGS), macros=dict(MACROS),
                filters={"english": "caption_lang = 'en'"})
    return RuleContext(**{**base, **kw})


def pool(spark, rows):
    """rows: (uid, pre_reason, score, clip, b32, caption_lang, tb, ib), over 3 partitions."""
    return spark.createDataFrame(rows, SCHEMA).repartition(3)


def reasons(out):
    return {(r["uid"], r["drop_reason"]) for r in out.select("uid", "drop_reason").collect()}


def datacomp_kept(values: dict[str, float | None], fraction: float) -> set[str]:
    """DataComp get_threshold in plain Python: sort desc, n = int(N f), keep >= vals[n]."""
    scored = sorted((v for v in values.values() if v is not None), reverse=True)
    n = int(len(scored) * fraction)
    thr = scored[n] if n < len(scored) else float("-inf")
    return {u for u, v in values.items() if v is not None and v >= thr}


# ---- 1. parser ---------------------------------------------------------------------------

PARSE = RuleContext(scores=dict(SCORES), filters={"a": "x", "b": "y", "c": "z", **DATACOMP_BASIC},
                    flags=dict(FLAGS), macros=dict(MACROS))


@pytest.mark.parametrize("rule, parts", [
    ("a or b and c", ["(a or (b and c))"]),
    ("a and b or c", ["((a and b) or c)"]),
    ("(a or b) and c", ["(a or b)", "c"]),
    ("a and (b and (c))", ["a", "b", "c"]),
    ("a or (b or c)", ["(a or b or c)"]),
    (" clip_fraction( 0.30 )and dfn_threshold(1.0)", ["clip_fraction(0.3)", "dfn_threshold(1)"]),
    ("threshold(score,2.8e-1) and fraction(clip, .5) and random(1e-1)",
     ["threshold(score, 0.28)", "fraction(clip, 0.5)", "random(0.1)"]),
    ("clip_and_image", ["clip_fraction(0.3)", "image_based"]),
    ("basic", list(DATACOMP_BASIC)),
    ("laion2b", ["clip_b32_threshold(0.28)", "english"]),
    ("text_based or clip_and_image", ["(text_based or (clip_fraction(0.3) and image_based))"]),
    ("no_filter", ["no_filter"]),
])
def test_parts_precedence_and_canonical_text(rule, parts):
    assert rule_parts(rule, PARSE) == parts


def test_rule_columns():
    assert rule_columns("clip_and_image and dfn_threshold(0.1) and a", PARSE) == {
        "clip", "ib", "score", "x"}  # "x": filter a's predicate
    assert rule_columns("text_based or fraction(other_col, 0.5)", PARSE) == {"tb", "other_col"}


@pytest.mark.parametrize("rule, words", [
    ("(a or b", ["expected ')'", "the end"]),
    ("a or b)", ["found ')'", "position 6"]),
    ("a and", ["expected a NAME or '('"]),
    ("a & b", ["unexpected character '&'"]),
    ("zzz and a", ["unknown name 'zzz'", "filters: a, b, c", "flags: text_based",
                   "clip_fraction(f)", "macros: no_filter"]),
    ("nope(0.1)", ["unknown function 'nope'"]),
    ("clip_fraction(1.5)", ["clip_fraction", "1.5", "outside 0..1"]),
    ("fraction(clip, -0.1)", ["outside 0..1"]),
    ("fraction(0.3, clip)", ["fraction takes (score, f)"]),
    ("random", ["'random' needs arguments"]),
    ("m1", ["macro cycle: m1 -> m2 -> m1"]),
])
def test_parse_errors_name_the_problem(rule, words):
    c = RuleContext(scores=dict(SCORES), filters={"a": "x", "b": "y", "c": "z"},
                    flags=dict(FLAGS), macros={**MACROS, "m1": "m2 and a", "m2": "b or m1"})
    with pytest.raises(ConfigError) as err:
        rule_parts(rule, c)
    for word in [*words, rule.strip()]:
        assert word in str(err.value)


def test_self_naming_macro_needs_the_flag():
    with pytest.raises(ConfigError, match="macro cycle: text_based -> text_based"):
        rule_parts("text_based", RuleContext(macros={"text_based": "text_based"}))


# ---- 2. fraction == DataComp -------------------------------------------------------------

VALUES = {"u0": 0.9, "u1": 0.8, "u2": 0.8, "u3": 0.8, "u4": 0.5, "u5": None, "u6": 0.5,
          "u7": 0.3, "u8": None, "u9": 0.1, "u10": 0.8, "u11": 0.2, "u12": 0.5}


@pytest.mark.parametrize("fraction", [0.0, 0.1, 0.25, 0.3, 0.5, 0.9, 1.0])
def test_fraction_matches_datacomp_with_ties_and_nulls(spark, fraction):
    rows = [(u, None, v, None, None, None, None, None) for u, v in VALUES.items()]
    out, [res] = apply_rule(pool(spark, rows), f"dfn_fraction({fraction})", ctx(), small=4)
    kept = {r["uid"] for r in out.where("kept").collect()}
    assert kept == datacomp_kept(VALUES, fraction)
    text = rule_parts(f"dfn_fraction({fraction})", ctx())[0]
    assert reasons(out) == {(u, None if u in kept else text) for u in VALUES}
    assert (res.kind, res.n_scored, res.position) == ("fraction", 11, int(11 * fraction))


def test_fraction_base_remaining_vs_pool(spark):
    rest = {f"r{i}": i / 10 for i in range(1, 10)}  # 0.1 .. 0.9
    dups = {f"d{i}": 1.0 + i / 10 for i in range(4)}  # 1.0 .. 1.3, all with a pre_reason
    rows = [(u, None, v, None, None, None, None, None) for u, v in rest.items()]
    rows += [(u, "duplicate", v, None, None, None, None, None) for u, v in dups.items()]
    for how, expected_kept, n in [("remaining", datacomp_kept(rest, 0.5), 9),
                                  ("pool", datacomp_kept({**rest, **dups}, 0.5) - set(dups), 13)]:
        out, [res] = apply_rule(pool(spark, rows), "fraction(dfn, 0.5)", ctx(fraction_of=how))
        expected = {(u, None if u in expected_kept else "fraction(dfn, 0.5)") for u in rest}
        assert reasons(out) == expected | {(u, "duplicate") for u in dups}, how
        assert res.n_scored == n
    assert datacomp_kept(rest, 0.5) != datacomp_kept({**rest, **dups}, 0.5) - set(dups)


# ---- 3. clip_and_image -------------------------------------------------------------------

CLIP_IMAGE = [  # uid, pre_reason, clip, image flag
    ("u0", None, 0.95, True), ("u1", None, 0.90, False), ("u2", None, 0.85, None),
    ("u3", "duplicate", 0.99, True), ("u4", None, 0.50, True), ("u5", None, 0.40, False),
    ("u6", None, None, True), ("u7", None, 0.80, True), ("u8", None, 0.10, False),
    ("u9", None, 0.70, True),
]


@pytest.mark.parametrize("how, first", [
    ("pool", {"u0": None, "u1": "image_based", "u2": "clip_fraction(0.3)"}),  # N=9, thr 0.90
    ("remaining", {"u0": None, "u1": "image_based", "u2": "image_based"}),  # N=8, thr 0.85
])
def test_clip_and_image_first_failing_part(spark, how, first):
    rows = [(u, pre, None, c, None, None, None, ib) for u, pre, c, ib in CLIP_IMAGE]
    out, results = apply_rule(pool(spark, rows), "clip_and_image", ctx(fraction_of=how))
    rest = {u: "clip_fraction(0.3)" for u in ("u4", "u5", "u6", "u7", "u8", "u9")}
    assert reasons(out) == set({**first, **rest, "u3": "duplicate"}.items())
    assert [(r.text, r.kind) for r in results] == [("clip_fraction(0.3)", "fraction"),
                                                   ("image_based", "flag")]
    assert results[0].threshold == (0.90 if how == "pool" else 0.85)
    assert out.columns == ["uid", "score", "clip", "b32", "caption_lang", "tb", "ib",
                           "drop_reason", "kept"]


# ---- 4. laion2b --------------------------------------------------------------------------

def test_laion2b_threshold_and_english(spark):
    rows = [("a", None, 0.30, "en"), ("b", None, 0.28, "en"), ("c", None, 0.2799, "en"),
            ("d", None, None, "en"), ("e", None, 0.50, "de"), ("f", None, 0.50, None),
            ("g", None, 0.10, "de"), ("h", "eval-leak", 0.90, "en")]
    df = pool(spark, [(u, p, None, None, b, lang, None, None) for u, p, b, lang in rows])
    out, results = apply_rule(df, "laion2b", ctx())
    thr = "clip_b32_threshold(0.28)"
    assert reasons(out) == {("a", None), ("b", None), ("c", thr), ("d", thr), ("e", "english"),
                            ("f", "english"), ("g", thr), ("h", "eval-leak")}
    assert [r.kind for r in results] == ["threshold", "filter"]
    assert_same_rows(out.where("kept"), [("a",), ("b",)], ["uid"])


# ---- 5. random ---------------------------------------------------------------------------

def random_pool(spark):
    rows = [(f"u{i}", "duplicate" if i % 20 == 0 else None, None, None, None, None, None, None)
            for i in range(200)]
    return pool(spark, rows)


def test_random_keeps_exact_count_and_is_seeded(spark):
    df = random_pool(spark)

    def kept(seed: int, f: float = 0.5) -> set[str]:
        out, [res] = apply_rule(df, f"random({f})", ctx(seed=seed), small=50)
        assert (res.kind, res.n_scored, res.position) == ("random", 190, int(190 * f))
        got = {r["uid"] for r in out.where("kept").collect()}
        assert len(got) == int(190 * f) and not any(int(u[1:]) % 20 == 0 for u in got)
        return got

    first = kept(0)
    assert kept(0) == first
    assert kept(1) != first
    assert kept(0, 0.0) == set()
    assert len(kept(0, 1.0)) == 190


def test_random_after_a_filter_counts_only_remaining(spark):
    df = random_pool(spark).withColumn("tb", F.col("uid").rlike("[02468]$"))
    out, results = apply_rule(df, "text_based and random(0.3)", ctx())
    assert results[1].n_scored == 90  # 100 even uids, minus the 10 duplicates
    assert out.where("kept").count() == 27
    assert out.where("drop_reason = 'text_based'").count() == 100


# ---- 6. or -------------------------------------------------------------------------------

FLAG_ROWS = [("u0", True, True), ("u1", True, False), ("u2", False, True), ("u3", False, False),
             ("u4", None, True), ("u5", None, None), ("u6", False, None)]


def test_or_part_keeps_either_flag(spark):
    df = pool(spark, [(u, None, None, None, None, None, t, i) for u, t, i in FLAG_ROWS])
    out, [res] = apply_rule(df, "(text_based or image_based)", ctx())
    text = "(text_based or image_based)"
    assert res.kind == "or" and res.text == text
    assert reasons(out) == {("u0", None), ("u1", None), ("u2", None), ("u3", text),
                            ("u4", None), ("u5", text), ("u6", text)}


def test_and_binds_tighter_than_or_on_data(spark):
    rows = [("a", True, None, "de"), ("b", False, True, "en"), ("c", False, True, "de")]
    df = pool(spark, [(u, None, None, None, None, lang, t, i) for u, t, i, lang in rows])
    out, _ = apply_rule(df, "text_based or image_based and english", ctx())
    text = "(text_based or (image_based and english))"
    assert reasons(out) == {("a", None), ("b", None), ("c", text)}
    out, _ = apply_rule(df, "(text_based or image_based) and english", ctx())
    assert reasons(out) == {("a", "english"), ("b", None), ("c", "english")}


# ---- 7. no_filter ------------------------------------------------------------------------

def test_no_filter_keeps_all_without_pre_reason(spark):
    rows = [("u0", None), ("u1", "near-duplicate"), ("u2", None), ("u3", "english")]
    df = pool(spark, [(u, p, None, None, None, None, None, None) for u, p in rows])
    out, [res] = apply_rule(df, "no_filter", ctx())
    assert res.kind == "all"
    assert reasons(out) == {("u0", None), ("u1", "near-duplicate"), ("u2", None),
                            ("u3", "english")}


# ---- 8. config errors before any job ------------------------------------------------------

def exploding_pool(spark):
    """A pool whose ``score`` fails any Spark job that reads it."""
    df = pool(spark, [("u0", None, 0.5, 0.5, 0.5, "en", True, True)])
    return df.withColumn("score", F.when(F.col("uid").isNotNull(), F.raise_error("job ran"))
                         .cast("double"))


@pytest.mark.parametrize("rule, scores, words", [
    ("dfn_fraction(0.5) and clip_fraction(0.3)", {"dfn": "score", "clip": "clip_l14"},
     ["clip_fraction(0.3)", "'clip_l14'"]),
    ("dfn_fraction(0.5) and threshold(no_such, 0.2)", {"dfn": "score"},
     ["threshold(no_such, 0.2)", "'no_such'"]),
])
def test_missing_score_column_fails_before_any_job(spark, rule, scores, words):
    with pytest.raises(ConfigError) as err:
        apply_rule(exploding_pool(spark), rule, ctx(scores=scores))
    for word in words:
        assert word in str(err.value)


def test_bad_flag_expression_names_the_part(spark):
    c = ctx(flags={"image_based": "no_such_col"})
    with pytest.raises(ConfigError, match=r"rule part 'image_based'.*no_such_col"):
        apply_rule(exploding_pool(spark), "dfn_fraction(0.5) and image_based", c)


def test_bad_fraction_of(spark):
    with pytest.raises(ConfigError, match="fraction_of"):
        apply_rule(exploding_pool(spark), "no_filter", ctx(fraction_of="all"))


def test_caller_macros_extend_presets():
    c = RuleContext(scores=dict(SCORES), filters=dict(DATACOMP_BASIC), flags=dict(FLAGS),
                    macros={**MACROS, "mine": "basic and (clip_and_image or dfn_fraction(0.2))"})
    assert rule_parts("mine", c) == [
        *DATACOMP_BASIC, "((clip_fraction(0.3) and image_based) or dfn_fraction(0.2))"]


def test_cached_pre_stays_cached_and_nested_cuts_are_reported(spark):
    rows = [(u, pre, None, c, None, None, None, ib) for u, pre, c, ib in CLIP_IMAGE]
    pre = pool(spark, rows).persist()
    try:
        out, [res] = apply_rule(pre, "image_based or clip_fraction(0.3)", ctx(fraction_of="pool"))
        assert pre.is_cached
        assert res.kind == "or" and [(r.text, r.threshold) for r in res.inner] == [
            ("clip_fraction(0.3)", 0.90)]
        assert {u for u, r in reasons(out) if r is None} == {"u0", "u1", "u4", "u6", "u7", "u9"}
    finally:
        pre.unpersist()
