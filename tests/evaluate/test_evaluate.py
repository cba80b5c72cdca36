"""evaluate: filter-quality metrics on literal rows, retrieval / zero-shot on hand-made
embeddings, and the whole job on a tiny pool (both tables written, one row per selection)."""

from __future__ import annotations

import math
import random

import pytest

from etl.evaluate import (
    FILTER_QUALITY,
    capped,
    filter_quality,
    format_table,
    labelled_scores,
    roc_auc,
)
from etl.sample import NOISY_KINDS, SampleBuilder
from etl.tables import BRONZE, EVAL_IMAGES, EVALUATION, SELECTION, SILVER

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def test_roc_auc_matches_pair_counting_with_ties():
    rng = random.Random(0)
    pos = [rng.choice([0.1, 0.2, 0.5, 0.9]) for _ in range(40)]
    neg = [rng.choice([0.0, 0.2, 0.5]) for _ in range(30)]
    brute = sum((p > n) + 0.5 * (p == n) for p in pos for n in neg) / (len(pos) * len(neg))
    assert roc_auc(pos, neg) == pytest.approx(brute)
    assert roc_auc([1.0], [1.0]) == 0.5
    assert roc_auc([], [0.3]) is None


def test_capped_takes_a_seeded_uniform_sample_on_the_executors(spark, capsys):
    pairs = spark.createDataFrame([(f"{i:04d}", ["none"] + (["dfn"] if i % 2 else []))
                                   for i in range(60)], "uid string, selections array<string>")
    pairs = pairs.repartition(3)
    first = [r["uid"] for r in capped(pairs, 10, seed=0)]
    assert len(first) == 10 and first == sorted(first)
    assert "seeded sample of 10 (evaluate.max_pairs)" in capsys.readouterr().out
    assert [r["uid"] for r in capped(pairs.repartition(2), 10, seed=0)] == first
    assert [r["uid"] for r in capped(pairs, 10, seed=1)] != first
    capsys.readouterr()
    assert len(capped(pairs, 60, seed=0)) == 60 and "sample" not in capsys.readouterr().out


def test_filter_quality_on_literal_rows(spark):
    bronze = spark.createDataFrame([
        ("c1", "clean"), ("c2", "clean"), ("c3", "clean"), ("c4", "clean"),
        ("m1", "mismatched"), ("m2", "mismatched"), ("b1", "blank"), ("n1", "noise"),
        ("d1", "exact_dup"),  # not a noise label: a drop of it is a false positive
    ], "uid string, label_kind string").repartition(2)
    scores = spark.createDataFrame([
        ("c1", 0.9), ("c2", 0.8), ("c3", 0.7), ("c4", None),  # c4 unscorable
        ("m1", 0.1), ("m2", 0.75), ("b1", float("nan")), ("d1", 0.0),  # n1 never scored
    ], "uid string, score double").repartition(2)
    labelled = labelled_scores(scores, bronze)
    assert labelled.count() == 9
    rows = {r["group"]: r for r in filter_quality(labelled, threshold=0.72)}
    assert rows["mismatched"]["auc_vs_clean"] == pytest.approx(5 / 6)
    assert rows["mismatched"]["n"] == 2 and rows["mismatched"]["dropped"] == 1
    # drops at 0.72: clean c3 + unscored c4; noisy m1, b1 (NaN = unscored), n1 (unscored); d1
    assert rows["clean"]["dropped"] == 2 and rows["clean"]["n_unscored"] == 1
    assert rows["all_noisy"]["dropped"] == 3 and rows["all_noisy"]["n"] == 4
    assert rows["all_noisy"]["recall"] == pytest.approx(3 / 4)
    assert rows["all_noisy"]["precision"] == pytest.approx(3 / 6)
    assert rows["mismatched"]["recall"] == 0.5 and rows["mismatched"]["precision"] is None
    assert rows["all_noisy"]["auc_vs_clean"] == pytest.approx(5 / 6)  # only m1, m2 scored
    assert rows["blank"]["auc_vs_clean"] is None and rows["blank"]["recall"] == 1.0
    assert rows["unrelated"]["n"] == 0 and rows["unrelated"]["recall"] is None
    no_threshold = {r["group"]: r for r in filter_quality(labelled, None)}
    assert no_threshold["all_noisy"]["precision"] is None
    assert no_threshold["all_noisy"]["auc_vs_clean"] == pytest.approx(5 / 6)


def test_evaluate_and_select_define_precision_alike(spark):
    """The score's drop decision judged by evaluate and by select's drop-reason metrics, on the
    same labelled pool with nothing dropped before the threshold: the same precision/recall."""
    from etl.config import SelectConf
    from etl.metrics import drop_reason_quality
    from etl.select import apply_selection, preset_rule

    rows = [("c1", "clean", 0.9), ("c2", "clean", 0.4), ("m1", "mismatched", 0.2),
            ("u1", "unrelated", 0.8), ("n1", "noise", 0.1), ("d1", "exact_dup", 0.3),
            ("s1", "too_small", 0.95)]
    pool = spark.createDataFrame(rows, "uid string, label_kind string, score double")
    pre = pool.selectExpr("*", "concat('https://x/', uid) as url", "cast(null as string) as label_of",
                          "cast(null as string) as pre_reason")
    rule = preset_rule(SelectConf(preset="none", min_score=0.5, keep_fraction=None))
    sel = apply_selection(pre, rule)[0]
    by_reason = {r["reason"]: r for r in drop_reason_quality(sel).collect()}
    judged = {r["group"]: r for r in filter_quality(
        labelled_scores(pool.select("uid", "score"), pool.select("uid", "label_kind")), 0.5)}
    # dropped: c2, m1, n1, d1 -> 2 of 4 drops are noise; 2 of 3 noisy pairs dropped
    assert by_reason["below-threshold"]["precision"] == pytest.approx(2 / 4)
    assert judged["all_noisy"]["precision"] == by_reason["below-threshold"]["precision"]
    assert judged["all_noisy"]["recall"] == by_reason["below-threshold"]["recall"] == \
        pytest.approx(2 / 3)


def test_evaluate_judges_the_model_select_uses(spark, lake):
    """No select.model_id, two models in silver: select takes the first configured scoring
    model, and evaluate must judge that same model (it used to refuse to choose)."""
    from etl.config import Config, LakehouseConf, ModelConf, ScoreConf
    from etl.evaluate import run_filter_quality
    from etl.silver import model_scores, selection_model_id

    bronze = spark.createDataFrame([("a", "clean"), ("b", "mismatched")],
                                   "uid string, label_kind string")
    lake.overwrite(bronze, BRONZE)
    silver = spark.createDataFrame(
        [("a", "ViT-B-32/openai", 0.9), ("b", "ViT-B-32/openai", 0.1),
         ("a", "other/model", 0.1), ("b", "other/model", 0.9)],
        "uid string, model_id string, score double")
    lake.overwrite(silver, SILVER)
    cfg = Config(lakehouse=LakehouseConf(root=str(lake.root)),
                 score=ScoreConf(models=[ModelConf(name="ViT-B-32", pretrained="openai")]))
    cfg.select.min_score = 0.5
    assert selection_model_id(lake, cfg) == "ViT-B-32/openai"
    assert {r.uid: r.score for r in model_scores(lake, cfg).collect()} == {"a": 0.9, "b": 0.1}
    rows = {r["group"]: r for r in run_filter_quality(lake, cfg, "run-q")}
    assert rows["all_noisy"]["model_id"] == "ViT-B-32/openai"
    assert rows["all_noisy"]["auc_vs_clean"] == 1.0  # the model select uses ranks clean first
    assert rows["all_noisy"]["precision"] == 1.0 and rows["all_noisy"]["recall"] == 1.0


def test_retrieval_counts_repeated_captions_and_zero_shot():
    import torch

    from udfs.zeroshot import retrieval_recall, zero_shot_accuracy

    img = torch.nn.functional.normalize(torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.7, 0.7]]), dim=1)
    txt = torch.nn.functional.normalize(torch.tensor([[0.0, 1.0], [1.0, 0.1], [1.0, 0.0]]), dim=1)
    texts = ["a red circle", "a blue star", "a red circle"]
    got = retrieval_recall(img, txt, texts, ks=(1, 2))
    # top-1 image -> text: 0 -> 2 (same caption as its own text 0: a hit), 1 -> 0, 2 -> 1
    assert got["i2t_r1"] == pytest.approx(1 / 3)
    # top-1 text -> image: 0 -> 1, 1 -> 0, 2 -> 0 (image 0's caption equals text 2: a hit)
    assert got["t2i_r1"] == pytest.approx(1 / 3)
    assert got["i2t_r2"] == pytest.approx(1.0)
    classes = torch.eye(2)
    assert zero_shot_accuracy(img[:2], ["x", "y"], ["x", "y"], classes) == 1.0
    assert zero_shot_accuracy(img[:2], ["y", None], ["x", "y"], classes) == 0.0
    assert math.isnan(zero_shot_accuracy(img[:2], [None, "z"], ["x", "y"], classes))


def test_format_table_aligns_and_marks_missing():
    text = format_table([{"a": "none", "b": 0.12345}, {"a": "dfn", "b": None}], ["a", "b"])
    assert text.splitlines() == ["   a      b", "none  0.123", " dfn      -"]


def build_tiny_lake(spark, lake, tmp_path):
    """bronze + eval + silver_scores + gold_selection for a tiny pool, per the contracts."""
    built = SampleBuilder(n_pairs=60, eval_size=12, seed=5).build()
    pool = [(f"{i:032x}", p.image, p.text, p.meta["label_kind"], p.meta["label_shape"],
             p.meta["label_color"], 256, 256) for i, p in enumerate(built.pool)]
    pool.append(("f" * 32, b"\x89PNG broken", "a red star", "clean", "star", "red", 256, 256))
    schema = ("uid string, image binary, text string, label_kind string, label_shape string, "
              "label_color string, width int, height int")
    lake.overwrite(spark.createDataFrame(pool, schema).repartition(2), BRONZE)
    ev = [(f"e{i:031x}", p.image, p.text, p.meta["label_shape"], p.meta["label_color"])
          for i, p in enumerate(built.eval)]
    lake.overwrite(spark.createDataFrame(ev, "uid string, image binary, text string, "
                                         "label_shape string, label_color string"), EVAL_IMAGES)
    # scores: clean 0.8+, noisy at most 0.36, other kinds 0.5+ (not alignment labels)
    score = {"clean": 0.8, "mismatched": 0.1, "unrelated": 0.2, "blank": 0.3, "noise": 0.05}
    scores = [(u, "m1", score.get(k, 0.5) + (0.001 * i), None, None, None, None, "r")
              for i, (u, _, _, k, *_) in enumerate(pool)]
    lake.overwrite(spark.createDataFrame(scores, "uid string, model_id string, score double, "
                   "score_error string, image_embedding array<float>, text_embedding "
                   "array<float>, scored_at timestamp, run_id string"), SILVER)
    sel = [(u, k == "clean", None if k == "clean" else
            ("english" if k == "non_english" else "below-threshold"), 0.0, 0.6)
           for u, _, _, k, *_ in pool]
    lake.overwrite(spark.createDataFrame(sel, "uid string, kept boolean, drop_reason string, "
                                         "score double, threshold double"), SELECTION)
    return pool


@pytest.mark.slow
def test_evaluate_job_on_a_tiny_pool(spark, lake, tmp_path):
    from etl.jobs.evaluate import main

    pool = build_tiny_lake(spark, lake, tmp_path)
    uids_file = tmp_path / "mine.txt"
    mine = [r[0] for r in pool[:10]]
    uids_file.write_text("\n".join(mine) + "\n\n")
    out = main(["--no-progress", "--set", f"lakehouse.root={lake.conf.root}",
                "--set", "select.model_id=m1", "--set", "evaluate.steps=3",
                "--set", "evaluate.batch_size=8",
                "--set", f"evaluate.selections=[none, basic, dfn, oracle, 'uids:{uids_file}']"])

    table = {r["selection"]: r for r in lake.read(EVALUATION).collect()}
    assert set(table) == {"none", "basic", "dfn", "oracle", f"uids:{uids_file}"}
    kinds = {r[0]: r[3] for r in pool}
    decodable = {r[0] for r in pool[:-1]}  # the broken PNG is dropped at decode
    assert table["none"]["n_pairs"] == len(decodable)
    assert table["dfn"]["n_pairs"] == sum(kinds[u] == "clean" for u in decodable)
    assert table["oracle"]["n_pairs"] == table["dfn"]["n_pairs"]
    # "basic" is the rule (dedup + DataComp's basic filter): what select's preset keeps
    from etl.config import Config, SelectConf
    from etl.select import select_pairs
    from etl.silver import scored_pool

    cfg = Config()
    cfg.lakehouse.root, cfg.select.model_id = lake.conf.root, "m1"
    preset = select_pairs(scored_pool(lake, cfg), None, SelectConf(keep_fraction=None))
    basic = {r.uid for r in preset.where("kept").collect()} & decodable
    assert table["basic"]["n_pairs"] == len(basic) and 0 < len(basic) < len(decodable)
    assert table[f"uids:{uids_file}"]["n_pairs"] == len(set(mine) & decodable)
    metrics = ("zeroshot_shape", "zeroshot_color", "i2t_r1", "i2t_r5", "t2i_r1", "t2i_r5")
    for row in table.values():
        assert row["steps"] == 3 and row["batch_size"] == 8 and row["eval_images"] == 12
        assert row["i2t_r1"] <= row["i2t_r5"] and row["t2i_r1"] <= row["t2i_r5"]
    # dfn and oracle select the same pairs here: same data, budget and seed -> same model
    assert [table["dfn"][m] for m in metrics] == [table["oracle"][m] for m in metrics]

    quality = {r["group"]: r for r in lake.read(FILTER_QUALITY).collect()}
    assert quality["all_noisy"]["threshold"] == 0.6
    assert quality["mismatched"]["auc_vs_clean"] == 1.0
    assert quality["all_noisy"]["model_id"] == "m1"
    # every non-clean pair scores below 0.6 (other kinds 0.5+): those not noisy are false drops
    noisy = sum(k in NOISY_KINDS for k in kinds.values())
    assert quality["all_noisy"]["precision"] == pytest.approx(
        noisy / sum(k != "clean" for k in kinds.values()))
    assert quality["all_noisy"]["recall"] == 1.0
    assert {r["group"] for r in out["filter"]} == set(quality)
