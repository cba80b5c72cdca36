"""``dfn-curate evaluate``: how good is a filter, and how good is the dataset it selects?

1. Filter quality on labelled data (``label_kind`` in bronze, e.g. the sample pool): ROC-AUC
   of the score for clean vs noisy pairs, overall and per noise kind, and precision / recall
   of the score's drop decision at the selection's threshold, by the definition
   ``dfn-curate select`` and the report use (:func:`etl.metrics.precision_recall`): a pair
   scoring below the threshold, or unscorable, is dropped; precision = noisy pairs dropped /
   pairs dropped (every bronze pair is judged), recall = noisy pairs dropped / noisy pairs.
   Stored in ``gold_filter_quality``.
2. Induced-dataset quality, DataComp's protocol in miniature: a small CLIP is trained from
   the same initialisation, for the same steps and batch size, on each selection, then
   evaluated on ``bronze_eval_images`` (zero-shot shape / colour classification when the eval
   set has those labels, and image-text retrieval). One row per selection in
   ``gold_evaluation``.

Selections: ``none`` (every pool pair with image bytes), ``basic`` (the rule: dedup + DataComp's
basic filters), ``dfn`` (``gold_selection`` kept: what ``select`` last wrote), ``oracle``
(``label_kind = 'clean'``, the sample's ground truth), ``table:<name>`` (a lakehouse or
catalog table of uids, its ``kept`` rows when it has that column), ``uids:<file>`` (one uid
per line, or a parquet file with a ``uid`` column), and any selection rule (:mod:`etl.rules`:
a DataComp preset such as ``clip_and_image`` or ``targeted_fraction(0.3)``, or a composition),
applied after dedup to the pool exactly as ``select`` would with ``select.rule`` set.

The selected pairs' bytes are gathered on the driver (a protocol in miniature: pools of
thousands to tens of thousands of pairs); evaluate a sample of a larger pool.
"""

from __future__ import annotations

import math
import re
from dataclasses import replace
from datetime import datetime, timezone
from typing import Any

from pyspark.sql import DataFrame
from pyspark.sql import functions as F
from pyspark.sql import types as T

from etl import cuts
from etl.config import Config, ConfigError, resolve_path
from etl.metrics import precision_recall
from etl.sample import NOISY_KINDS
from etl.select import select_pairs, selection_pool, selection_rule
from etl.silver import score_value, selection_model_id
from etl.spark import local_frame
from etl.tables import (
    BRONZE,
    DEDUP,
    EVAL_IMAGES,
    EVALUATION,
    FILTER_QUALITY,
    SELECTION,
    SILVER,
    Lakehouse,
)

ZS_TEMPLATES = ("a photo of a {color} {shape}", "a picture showing a {color} {shape}",
                "a {color} {shape} on a background")

FILTER_SCHEMA = T.StructType([
    T.StructField("run_id", T.StringType()), T.StructField("model_id", T.StringType()),
    T.StructField("group", T.StringType()), T.StructField("n", T.LongType()),
    T.StructField("n_unscored", T.LongType()), T.StructField("mean_score", T.DoubleType()),
    T.StructField("auc_vs_clean", T.DoubleType()), T.StructField("threshold", T.DoubleType()),
    T.StructField("dropped", T.LongType()), T.StructField("precision", T.DoubleType()),
    T.StructField("recall", T.DoubleType()), T.StructField("evaluated_at", T.TimestampType()),
])
METRICS = ("zeroshot_shape", "zeroshot_color", "i2t_r1", "i2t_r5", "t2i_r1", "t2i_r5")
EVAL_SCHEMA = T.StructType([
    T.StructField("run_id", T.StringType()), T.StructField("selection", T.StringType()),
    T.StructField("n_pairs", T.LongType()), T.StructField("steps", T.LongType()),
    T.StructField("batch_size", T.LongType()), T.StructField("seed", T.LongType()),
    T.StructField("final_loss", T.DoubleType()), T.StructField("train_time_s", T.DoubleType()),
    *[T.StructField(m, T.DoubleType()) for m in METRICS],
    T.StructField("eval_images", T.LongType()), T.StructField("evaluated_at", T.TimestampType()),
])


# ---- 1. filter quality ------------------------------------------------------------------


def labelled_scores(scores: DataFrame, bronze: DataFrame) -> DataFrame:
    """``uid, label_kind, score`` of every bronze pair (score null if unscored, label_kind null
    if unlabelled): the pairs whose drops are judged."""
    if "label_kind" not in bronze.columns:
        raise ValueError("filter quality needs a label_kind column in bronze_pairs (the sample "
                         "pool has one); use the induced-dataset comparison on unlabelled pools")
    score = score_value("score")
    return bronze.select("uid", "label_kind").join(
        scores.select("uid", score.alias("score")), "uid", "left")


def roc_auc(positive: list[float], negative: list[float]) -> float | None:
    """ROC-AUC of positives over negatives (ties count half); None when a side is empty."""
    from udfs.train import roc_auc as auc

    return None if not positive or not negative else auc(positive, negative)


def filter_quality(labelled: DataFrame, threshold: float | None) -> list[dict[str, Any]]:
    """One row per group (clean, all_noisy, each noise kind): n, AUC vs clean, drops at the
    threshold, recall of the group, and (``all_noisy``) the precision of the drop decision.

    Precision is a property of the decision, judged against every pair of ``labelled``
    (:func:`etl.metrics.precision_recall`), so only ``all_noisy`` (the kinds the score should
    catch) has one. The clean and noisy ``(label_kind, score)`` rows are collected (labelled
    sets are small, thousands of rows); the pool-wide drop count is counted on the executors.
    """
    kinds = ["clean", *NOISY_KINDS]
    by: dict[str, list[float | None]] = {}
    for row in labelled.where(F.col("label_kind").isin(kinds)).select(
            "label_kind", "score").collect():
        by.setdefault(row["label_kind"], []).append(row["score"])
    groups = {"clean": by.get("clean", [])}
    groups["all_noisy"] = [s for k in NOISY_KINDS for s in by.get(k, [])]
    groups.update({k: by.get(k, []) for k in NOISY_KINDS})
    clean = [s for s in groups["clean"] if s is not None]
    predicted = None if threshold is None else labelled.where(
        cuts.dropped(F.col("score"), threshold)).count()
    return [_group_row(name, values, clean, predicted, threshold)
            for name, values in groups.items()]


def _dropped(values: list[float | None], threshold: float | None) -> int | None:
    if threshold is None:
        return None
    return sum(1 for s in values if cuts.is_dropped(s, threshold))


def _group_row(name: str, values: list[float | None], clean: list[float],
               predicted: int | None, threshold: float | None) -> dict[str, Any]:
    scored = [s for s in values if s is not None]
    dropped = _dropped(values, threshold)
    row = {"group": name, "n": len(values), "n_unscored": len(values) - len(scored),
           "mean_score": sum(scored) / len(scored) if scored else None,
           "auc_vs_clean": None if name == "clean" else roc_auc(clean, scored),
           "threshold": threshold, "dropped": dropped, "precision": None, "recall": None}
    if dropped is not None and predicted is not None and name != "clean":
        precision, row["recall"] = precision_recall(dropped, predicted, len(values))
        row["precision"] = precision if name == "all_noisy" else None
    return row


def chosen_threshold(lake: Lakehouse, cfg: Config) -> float | None:
    """``select.min_score``, else the threshold ``gold_selection`` applied, else None."""
    if cfg.select.min_score is not None:
        return cfg.select.min_score
    from etl.provenance import applied_threshold

    return applied_threshold(lake)


def run_filter_quality(lake: Lakehouse, cfg: Config, run_id: str) -> list[dict[str, Any]]:
    """Edge: silver_scores x bronze labels -> ``gold_filter_quality`` rows (printed). The model
    judged is the one select uses (:func:`etl.silver.selection_model_id`)."""
    model_id = selection_model_id(lake, cfg)
    scores = lake.read(SILVER).where(F.col("model_id") == model_id)
    rows = filter_quality(labelled_scores(scores, lake.read(BRONZE)), chosen_threshold(lake, cfg))
    now = _now()
    rows = [{"run_id": run_id, "model_id": model_id, **r, "evaluated_at": now} for r in rows]
    lake.append(local_frame(lake.spark, rows, FILTER_SCHEMA), FILTER_QUALITY)
    print(f"filter quality of {model_id} (threshold {rows[0]['threshold']}):")
    print(format_table(rows, ["group", "n", "n_unscored", "mean_score", "auc_vs_clean",
                              "dropped", "precision", "recall"]))
    return rows


# ---- 2. induced-dataset quality -----------------------------------------------------------


def selection_uids(lake: Lakehouse, name: str, cfg: Config | None = None) -> DataFrame:
    """The uids a named selection keeps (see the module docstring for the names); any other
    name is a selection rule (:mod:`etl.rules`) applied to the pool as ``select`` would."""
    if name == "none":
        return lake.read(BRONZE).select("uid")
    if name == "oracle":
        bronze = lake.read(BRONZE)
        if "label_kind" not in bronze.columns:
            raise ConfigError("evaluate.selections: 'oracle' needs label_kind in bronze_pairs")
        return bronze.where(F.col("label_kind") == "clean").select("uid")
    if name == "dfn":
        return lake.read(SELECTION).where(F.col("kept")).select("uid")
    if name.startswith("table:"):
        return _table_uids(lake, name[len("table:"):])
    if name.startswith("uids:"):
        return _file_uids(lake, name[len("uids:"):])
    return rule_uids(lake, cfg or Config(), name)


def rule_uids(lake: Lakehouse, cfg: Config, rule: str) -> DataFrame:
    """The uids ``rule`` keeps after the dedup reasons, with ``select``'s pool and scores."""
    run = replace(cfg, select=replace(cfg.select, rule=rule))
    try:
        selection_rule(run.select)
    except ConfigError as exc:
        raise ConfigError(f"evaluate.selections: {rule!r} is none of none, basic, dfn, oracle, "
                          f"table:<name>, uids:<file>, and not a selection rule: {exc}") from exc
    dedup = lake.read(DEDUP) if lake.exists(DEDUP) else None
    return select_pairs(selection_pool(lake, run), dedup, run.select).where("kept").select("uid")


def _table_uids(lake: Lakehouse, table: str) -> DataFrame:
    plain = re.fullmatch(r"[A-Za-z0-9_]+", table) and lake.exists(table)
    df = lake.read(table) if plain else lake.spark.table(table)
    if "uid" not in df.columns:
        raise ConfigError(f"evaluate.selections: table {table!r} has no uid column")
    return (df.where(F.col("kept")) if "kept" in df.columns else df).select("uid")


def _file_uids(lake: Lakehouse, path: str) -> DataFrame:
    full = str(resolve_path(path))
    if full.endswith(".parquet"):
        return lake.spark.read.parquet(full).select("uid")
    lines = lake.spark.read.text(full).select(F.trim("value").alias("uid"))
    return lines.where(F.col("uid") != "")


def selection_pairs(lake: Lakehouse, names: list[str], cfg: Config | None = None) -> DataFrame:
    """``uid, image, text, selections`` (array of the selection names keeping each pair)."""
    tagged = None
    for name in names:
        uids = selection_uids(lake, name, cfg).distinct().withColumn("selection", F.lit(name))
        tagged = uids if tagged is None else tagged.unionByName(uids)
    keep = tagged.groupBy("uid").agg(F.collect_set("selection").alias("selections"))
    bronze = lake.read(BRONZE).where(F.col("image").isNotNull() & F.col("text").isNotNull())
    return bronze.select("uid", "image", "text").join(keep, "uid")


def capped(pairs: DataFrame, cap: int, seed: int) -> list:
    """At most ``cap`` rows of ``pairs``, ordered by uid: when there are more, the ``cap`` with
    the lowest seeded hash of uid (a uniform sample taken on the executors, so every selection
    keeps its share and the driver holds ``cap`` rows, never the pool)."""
    n = pairs.count()
    if n > cap:
        print(f"evaluate: {n} pairs in the compared selections; training on a seeded sample of "
              f"{cap} (evaluate.max_pairs)")
        pairs = pairs.orderBy(F.xxhash64(F.lit(seed), "uid"), "uid").limit(cap)
    return pairs.orderBy("uid").collect()


def zero_shot_tasks(labels: dict[str, list[str | None]]) -> dict[str, tuple[list, dict]]:
    """Shape and colour tasks when the eval set has ``label_shape`` and ``label_color``: each
    class's prompts are the templates over every value of the other attribute."""
    shapes = sorted({s for s in labels.get("label_shape", []) if s})
    colors = sorted({c for c in labels.get("label_color", []) if c})
    if not shapes or not colors:
        return {}
    def prompts(classes, others, key):
        return {c: [t.format(**{key: c, ("color" if key == "shape" else "shape"): o})
                    for t in ZS_TEMPLATES for o in others] for c in classes}
    return {"shape": (labels["label_shape"], prompts(shapes, colors, "shape")),
            "color": (labels["label_color"], prompts(colors, shapes, "color"))}


def eval_set(lake: Lakehouse) -> tuple[list[bytes], list[str], dict[str, list[str | None]]]:
    """Evaluation images, captions and label columns, ordered by uid."""
    df = lake.read(EVAL_IMAGES).where(F.col("image").isNotNull() & F.col("text").isNotNull())
    cols = [c for c in ("label_shape", "label_color") if c in df.columns]
    rows = df.orderBy("uid").select("image", "text", *cols).collect()
    if not rows:
        raise ValueError("bronze_eval_images has no images with captions; ingest an eval set")
    return ([bytes(r["image"]) for r in rows], [r["text"] for r in rows],
            {c: [r[c] for r in rows] for c in cols})


def induced_comparison(lake: Lakehouse, cfg: Config, run_id: str,
                       progress: bool = True) -> list[dict[str, Any]]:
    """Train one small CLIP per selection under the same budget; evaluate each on held-out data."""
    from udfs.zeroshot import induced_runs

    names = cfg.evaluate.selections
    if not names:
        raise ConfigError("evaluate.selections: list at least one selection, e.g. [none, dfn]")
    rows = capped(selection_pairs(lake, names, cfg), cfg.evaluate.max_pairs, cfg.evaluate.seed)
    pool = ([bytes(r["image"]) for r in rows], [r["text"] for r in rows],
            [set(r["selections"]) for r in rows])
    blobs, texts, labels = eval_set(lake)
    spec = induced_spec(cfg, progress)
    results = induced_runs(spec, pool, names, (blobs, texts, zero_shot_tasks(labels)))
    now = _now()
    return [_eval_row(run_id, name, spec, res, now) for name, res in zip(names, results, strict=True)]


def induced_spec(cfg: Config, progress: bool):
    """The from-scratch training run every selection gets (same steps, batch, seed, lr)."""
    from udfs.train import TrainSpec

    ev = cfg.evaluate
    return TrainSpec(model=str(resolve_path(cfg.train.model)), steps=ev.steps,
                     batch_size=ev.batch_size, lr=cfg.train.lr,
                     weight_decay=cfg.train.weight_decay, seed=ev.seed, device=cfg.train.device,
                     val_fraction=0.0, progress=progress)


def _eval_row(run_id: str, name: str, spec, res: dict[str, Any], now: datetime) -> dict:
    row = {"run_id": run_id, "selection": name, "n_pairs": res["n_pairs"], "steps": spec.steps,
           "batch_size": spec.batch_size, "seed": spec.seed,
           "final_loss": res.get("final_loss"), "train_time_s": res.get("train_time_s"),
           "eval_images": res.get("eval_images"), "evaluated_at": now}
    row.update({m: _finite(res.get(m)) for m in METRICS})
    return row


def _finite(value: Any) -> float | None:
    return None if value is None or (isinstance(value, float) and math.isnan(value)) else value


def run_induced(lake: Lakehouse, cfg: Config, run_id: str, progress: bool = True) -> list[dict]:
    """Edge: selections -> trained CLIPs -> ``gold_evaluation`` rows (printed as one table)."""
    rows = induced_comparison(lake, cfg, run_id, progress)
    lake.append(local_frame(lake.spark, rows, EVAL_SCHEMA), EVALUATION)
    print(f"induced-dataset quality ({rows[0]['steps']} steps x {rows[0]['batch_size']} per "
          f"selection, evaluated on {rows[0]['eval_images']} held-out images):")
    print(format_table(rows, ["selection", "n_pairs", "final_loss", *METRICS]))
    return rows


def format_table(rows: list[dict[str, Any]], cols: list[str]) -> str:
    """A fixed-width text table (floats to 3 decimals, missing as '-')."""
    def cell(v: Any) -> str:
        return "-" if v is None else f"{v:.3f}" if isinstance(v, float) else str(v)
    cells = [[cell(r.get(c)) for c in cols] for r in rows]
    widths = [max(len(c), *(len(r[i]) for r in cells)) for i, c in enumerate(cols)]
    lines = ["  ".join(c.rjust(w) for c, w in zip(cols, widths, strict=True))]
    lines += ["  ".join(v.rjust(w) for v, w in zip(r, widths, strict=True)) for r in cells]
    return "\n".join(lines)


def _now() -> datetime:
    return datetime.now(timezone.utc).replace(tzinfo=None)
