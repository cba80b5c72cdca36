"""DataComp baselines end to end through ``select``: rules over bronze, two models' silver
scores, silver_targets and a vocabulary, with a known answer per preset; the errors that must
come before any write."""

from __future__ import annotations

import pytest

from etl.config import Config, ConfigError, LakehouseConf, SelectConf
from etl.select import run_select, select_pairs, selection_parts, selection_pool
from etl.tables import BRONZE, DEDUP, SELECTION, SILVER, TARGETS

# uid, text, dfn score, clip score, in_target_cluster, target_similarity, dedup reason
ROWS = [
    ("a", "a red circle on a white background", 0.9, 0.10, True, 0.9, None),
    ("b", "a photo of a blue square", 0.8, 0.35, False, 0.2, None),
    ("c", "buy cheap shoes online free shipping", 0.1, 0.40, True, 0.5, None),
    ("d", "two green triangles on grey", 0.7, 0.30, True, 0.8, None),
    ("e", "click here to download", 0.2, 0.05, False, -0.1, None),
    ("f", "a picture showing a large yellow star", 0.6, None, True, 0.7, None),
    ("g", "a red circle on a white background", 0.9, 0.36, True, 0.9, "exact_sha256"),
    ("h", "lorem ipsum dolor sit amet", 0.3, 0.29, None, None, None),
]


def write_targets(spark, lake, model_id="dfn"):
    lake.overwrite(spark.createDataFrame(
        [(u, i, s, model_id) for u, _, _, _, i, s, _ in ROWS if i is not None],
        "uid string, in_target_cluster boolean, target_similarity double, model_id string"),
        TARGETS)


@pytest.fixture(scope="module")
def module_lake(spark, tmp_path_factory):
    """The pool's tables, written once for the module (tests that change one restore it)."""
    from etl.tables import Lakehouse

    root = tmp_path_factory.mktemp("baselines")
    lake = Lakehouse(spark, LakehouseConf(root=str(root / "lakehouse")))
    bronze = spark.createDataFrame(
        [(u, t, 512, 512, "en") for u, t, *_ in ROWS],
        "uid string, text string, width int, height int, lang string").repartition(3)
    lake.overwrite(bronze, BRONZE)
    silver = [(u, "dfn", d) for u, _, d, *_ in ROWS] + \
        [(u, "clip", c) for u, _, _, c, *_ in ROWS if c is not None]
    lake.overwrite(spark.createDataFrame(silver, "uid string, model_id string, score double"),
                   SILVER)
    write_targets(spark, lake)
    lake.overwrite(spark.createDataFrame(
        [(u, None if r is None else "a", r, None, None, None) for u, *_, r in ROWS],
        "uid string, dup_of string, dup_reason string, dup_similarity double, "
        "eval_match string, eval_similarity double"), DEDUP)
    (root / "shapes.txt").write_text("circle\nsquare\ntriangle\nstar\n")
    return lake, str(root / "shapes.txt")


@pytest.fixture
def baseline_lake(module_lake):
    lake, vocab = module_lake
    cfg = Config(lakehouse=LakehouseConf(root=str(lake.root)),
                 select=SelectConf(model_id="dfn", preset=None, keep_fraction=None,
                                   fraction_of="pool",
                                   filters={"english": "lang = 'en'"},
                                   scores={"clip": "model:clip", "clip_b32": "model:clip",
                                           "targeted": "target_similarity"}))
    cfg.targets.vocabulary = vocab
    return lake, cfg


def reasons(lake, cfg, rule):
    """uid -> drop_reason of ``rule`` as select computes it (without writing gold_selection)."""
    cfg.select.rule = rule
    sel = select_pairs(selection_pool(lake, cfg), lake.read(DEDUP), cfg.select)
    return {r.uid: r.drop_reason for r in sel.collect()}


@pytest.mark.parametrize("rule, expected", [
    ("no_filter", {}),
    # clip over the pool's 7 clip scores (h's 0.29 counts; g's too, with fraction_of: pool):
    # N=7, n=int(2.1)=2, sorted desc .40 .36 .35 .30 .29 .10 .05 -> keep >= .35
    ("clip_fraction(0.3)", {"a": "clip_fraction(0.3)", "d": "clip_fraction(0.3)",
                            "e": "clip_fraction(0.3)", "f": "clip_fraction(0.3)",
                            "h": "clip_fraction(0.3)"}),
    ("clip_and_image", {"a": "clip_fraction(0.3)", "b": "in_target_cluster",
                        "d": "clip_fraction(0.3)", "e": "clip_fraction(0.3)",
                        "f": "clip_fraction(0.3)", "h": "clip_fraction(0.3)"}),
    ("image_based", {"b": "in_target_cluster", "e": "in_target_cluster",
                     "h": "in_target_cluster"}),
    # whole words only: "triangles" does not mention the term "triangle"
    ("text_vocabulary", {"c": "in_vocabulary", "d": "in_vocabulary", "e": "in_vocabulary",
                         "h": "in_vocabulary"}),
    # DataComp's: a word whose first WordNet synset is an ImageNet-21k class ("circle",
    # "blue", "shoes", "triangles" -> triangle, "picture"); none in e or h
    ("text_based", {"e": "in_imagenet21k", "h": "in_imagenet21k"}),
    ("laion2b", {"a": "clip_b32_threshold(0.28)", "e": "clip_b32_threshold(0.28)",
                 "f": "clip_b32_threshold(0.28)"}),
    # dfn over all 8 (pool): n=int(3.2)=3 -> sorted .9 .9 .8 .7 -> keep >= .7
    ("dfn_fraction(0.4)", {"c": "dfn_fraction(0.4)", "e": "dfn_fraction(0.4)",
                           "f": "dfn_fraction(0.4)", "h": "dfn_fraction(0.4)"}),
    # targeted over 7 non-null: n=int(2.1)=2 -> .9 .9 .8 -> keep >= .8
    ("targeted_fraction(0.3)", {"b": "targeted_fraction(0.3)", "c": "targeted_fraction(0.3)",
                                "e": "targeted_fraction(0.3)", "f": "targeted_fraction(0.3)",
                                "h": "targeted_fraction(0.3)"}),
    ("in_vocabulary or in_target_cluster", {"e": "(in_vocabulary or in_target_cluster)",
                                            "h": "(in_vocabulary or in_target_cluster)"}),
])
def test_each_preset_drops_what_datacomp_would(baseline_lake, rule, expected):
    lake, cfg = baseline_lake
    got = reasons(lake, cfg, rule)
    assert got == {**{u: None for u, *_ in ROWS}, **expected, "g": "duplicate"}


def test_run_select_writes_a_rule_with_its_funnel_and_cuts(baseline_lake, capsys):
    lake, cfg = baseline_lake
    cfg.select.rule = "clip_and_image"
    counts = run_select(lake, cfg, "r")
    funnel = {k: v for k, v in counts.items()  # + MERGE and work counts
              if not k.startswith(("rows_", "work:"))}
    assert (counts["work:new"], counts["work:touched"], counts["work:pool"]) == (8, 8, 8)
    assert funnel == {"pool": 8, "dropped:duplicate": 1, "dropped:clip_fraction(0.3)": 5,
                      "dropped:in_target_cluster": 1, "kept": 1}
    out = capsys.readouterr().out
    assert "threshold: clip_fraction(0.3) -> keep >= 0.35 (N=7, n=2)" in out
    assert {r.uid for r in lake.read(SELECTION).where("kept").collect()} == {"c"}


def test_random_keeps_an_exact_seeded_share(baseline_lake):
    lake, cfg = baseline_lake
    cfg.select.fraction_of = "remaining"
    first = reasons(lake, cfg, "random(0.5)")
    kept = {u for u, r in first.items() if r is None}
    assert len(kept) == 3  # int(7 * 0.5) of the 7 rows that are not duplicates
    assert reasons(lake, cfg, "random(0.5)") == first
    cfg.select.seed = 1
    assert {u for u, r in reasons(lake, cfg, "random(0.5)").items() if r is None} != kept


def test_missing_or_foreign_targets_and_bad_rules_fail_before_writing(baseline_lake, spark):
    lake, cfg = baseline_lake
    before = lake.version(SELECTION) if lake.exists(SELECTION) else None
    cfg.select.rule = "clip_fraction(0.3) and nonsense"
    with pytest.raises(ConfigError, match="nonsense"):
        run_select(lake, cfg, "r")
    cfg.select.rule = "in_target_cluster"
    write_targets(spark, lake, "other")
    try:
        with pytest.raises(ConfigError, match="built from \\['other'\\] embeddings"):
            run_select(lake, cfg, "r")
    finally:
        write_targets(spark, lake)
    cfg.select.scores = {"clip": "model:no-such-model"}
    cfg.select.rule = "clip_fraction(0.3)"
    with pytest.raises(ConfigError, match="no scores for model:no-such-model"):
        run_select(lake, cfg, "r")
    assert (lake.version(SELECTION) if lake.exists(SELECTION) else None) == before


def test_evaluate_compares_any_rule_as_select_applies_it(baseline_lake):
    from etl.evaluate import selection_uids

    lake, cfg = baseline_lake
    kept = {u for u, r in reasons(lake, cfg, "clip_and_image").items() if r is None}
    cfg.select.rule = None
    got = {r.uid for r in selection_uids(lake, "clip_and_image", cfg).collect()}
    assert got == kept == {"c"}
    with pytest.raises(ConfigError, match="'dfn_fractoin\\(0.3\\)' is none of none, basic"):
        selection_uids(lake, "dfn_fractoin(0.3)", cfg)


def test_rule_score_cuts_are_judged_against_the_noisy_labels():
    from etl.metrics import REASON_LABELS, reason_labels
    from etl.sample import NOISY_KINDS

    conf = SelectConf(rule="english and two_words and dfn_fraction(0.7) and "
                           "threshold(score, 0.2) and random(0.3) and "
                           "(in_vocabulary or clip_fraction(0.5))")
    got = reason_labels(selection_parts(conf))
    assert got == {"eval-leak": REASON_LABELS["eval-leak"],
                   "duplicate": REASON_LABELS["duplicate"],
                   "near-duplicate": REASON_LABELS["near-duplicate"],
                   "english": ["non_english"],
                   "dfn_fraction(0.7)": list(NOISY_KINDS),
                   "threshold(score, 0.2)": list(NOISY_KINDS)}
    preset = reason_labels(selection_parts(SelectConf()))
    assert preset["below-threshold"] == list(NOISY_KINDS) and "unscorable" not in preset


def test_a_rule_reads_only_what_it_names(spark, lake, tmp_path):
    """text_based on a metadata pool that was never scored: no silver_scores is needed."""
    from etl.select import needs_scores, needs_targets

    pool = [(u, t) for u, t, *_ in ROWS]
    lake.overwrite(spark.createDataFrame(pool, "uid string, text string"), BRONZE)
    cfg = Config(lakehouse=LakehouseConf(root=str(lake.root)),
                 select=SelectConf(rule="in_vocabulary", model_id="dfn"))
    (tmp_path / "vocab.txt").write_text("circle\nsquare\n")
    cfg.targets.vocabulary = str(tmp_path / "vocab.txt")
    assert not needs_scores(cfg.select) and not needs_targets(cfg.select)
    assert needs_scores(SelectConf()) and needs_targets(SelectConf(rule="image_based"))
    assert not needs_scores(SelectConf(score_column="clip_l14_similarity_score"))
    counts = run_select(lake, cfg, "r")
    assert counts["pool"] == len(ROWS) and not lake.exists(SILVER)
    kept = {r.uid for r in lake.read(SELECTION).where("kept").collect()}
    assert kept == {"a", "b", "g"} and {r.score for r in lake.read(SELECTION).collect()} == {None}
