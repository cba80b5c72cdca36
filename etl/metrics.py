"""Precision and recall of each drop reason against ground-truth labels (the sample pool).

Each reason is matched to the ``label_kind`` values it should catch (:data:`REASON_LABELS`).

* Single-row reasons: a labelled row is one expected drop; a true positive is a labelled row
  dropped with that reason.
* Duplicate reasons (``duplicate``, ``near-duplicate``): a labelled copy and its original
  (the row whose url is the copy's ``label_of``) form a group of size s that should lose
  s - 1 rows, whichever of them is kept. True positives per group = min(rows dropped with
  the reason, s - 1).

precision = true_pos / predicted (rows dropped with the reason), recall = true_pos / expected;
``recall_any`` counts expected drops caught by any reason (an order-independent view).

:func:`precision_recall` is the project's one definition of label quality: ``dfn-curate select``
and ``run`` print it, the report shows it, and ``dfn-curate evaluate`` judges the score's drop
decision with it (``etl.evaluate.filter_quality``).
"""

from __future__ import annotations

from pyspark.sql import DataFrame
from pyspark.sql import functions as F

from etl.sample import NOISY_KINDS
from etl.spark import local_frame
from etl.tables import SELECTION, Lakehouse

REASON_LABELS = {
    "eval-leak": ["eval_leak"],
    "duplicate": ["exact_dup"],
    "near-duplicate": ["near_dup"],
    "english": ["non_english"],
    "min_side": ["too_small"],
    "aspect": ["bad_aspect"],
    "below-threshold": list(NOISY_KINDS),
}
GROUPED = ("duplicate", "near-duplicate")
SCORE_CUTS = ("fraction", "threshold")  # rule part kinds that cut on a score


def reason_labels(parts: list[tuple[str, str]]) -> dict[str, list[str]]:
    """The label kinds each of a selection's drop reasons should catch, in reason order, from
    its ``(drop reason, part kind)`` pairs (:func:`etl.select.selection_parts`): the fixed ones
    (:data:`REASON_LABELS`), and a score cut (``dfn_fraction(0.7)``) the noisy kinds, as
    ``below-threshold``."""
    out = {}
    for reason, kind in parts:
        if reason in REASON_LABELS:
            out[reason] = REASON_LABELS[reason]
        elif kind in SCORE_CUTS:
            out[reason] = list(NOISY_KINDS)
    return out
SCHEMA = ("reason string, label_kinds string, predicted long, expected long, true_pos long, "
          "precision double, recall double, recall_any double")


def drop_reason_quality(selection: DataFrame,
                        reason_labels: dict[str, list[str]] | None = None) -> DataFrame | None:
    """One row per reason: predicted, expected, true_pos, precision, recall, recall_any.

    ``selection`` needs uid, url, kept, drop_reason, label_kind, label_of. None when the
    pool has no labels.
    """
    if "label_kind" not in selection.columns:
        return None
    rows = []
    for reason, kinds in (reason_labels or REASON_LABELS).items():
        counts = _grouped(selection, reason, kinds) if reason in GROUPED else \
            _single(selection, reason, kinds)
        rows.append(_row(reason, kinds, *counts))
    return local_frame(selection.sparkSession, rows, SCHEMA)


def _single(sel: DataFrame, reason: str, kinds: list[str]) -> tuple[int, int, int, int]:
    labelled = F.col("label_kind").isin(kinds)
    hit = F.col("drop_reason") == reason
    r = sel.agg(F.count_if(hit).alias("p"), F.count_if(labelled).alias("e"),
                F.count_if(hit & labelled).alias("t"),
                F.count_if(labelled & ~F.col("kept")).alias("a")).first()
    return r["p"], r["e"], r["t"], r["a"]


def _grouped(sel: DataFrame, reason: str, kinds: list[str]) -> tuple[int, int, int, int]:
    copies = sel.where(F.col("label_kind").isin(kinds) & F.col("label_of").isNotNull()) \
        .select("uid", F.col("label_of").alias("g"))
    originals = sel.join(copies.select("g").distinct(), F.col("url") == F.col("g")) \
        .select("uid", "g")
    members = copies.unionByName(originals).dropDuplicates(["uid"])
    groups = members.join(sel.select("uid", "drop_reason", "kept"), "uid").groupBy("g").agg(
        (F.count("*") - 1).alias("need"),
        F.count_if(F.col("drop_reason") == reason).alias("hit"),
        F.count_if(~F.col("kept")).alias("gone"))
    r = groups.agg(F.sum("need").alias("e"), F.sum(F.least("hit", "need")).alias("t"),
                   F.sum(F.least("gone", "need")).alias("a")).first()
    predicted = sel.where(F.col("drop_reason") == reason).count()
    return predicted, int(r["e"] or 0), int(r["t"] or 0), int(r["a"] or 0)


def precision_recall(true_pos: int, predicted: int,
                     expected: int) -> tuple[float | None, float | None]:
    """(precision, recall) of a drop decision against labels, the one definition used everywhere.

    ``predicted``: rows the decision drops (labelled as anything, or not at all); ``expected``:
    rows labelled as what it should catch; ``true_pos``: rows both. precision = true_pos / predicted, recall =
    true_pos / expected, None when the denominator is 0.
    """
    return (true_pos / predicted if predicted else None,
            true_pos / expected if expected else None)


def _row(reason: str, kinds: list[str], predicted: int, expected: int, tp: int, anyr: int):
    precision, recall = precision_recall(tp, predicted, expected)
    return (reason, ",".join(kinds), predicted, expected, tp, precision, recall,
            anyr / expected if expected else None)


def print_quality(quality: DataFrame) -> None:
    """Print the precision/recall table."""
    print(f"{'drop reason':<18}{'labels':<34}{'dropped':>8}{'labelled':>9}{'correct':>8}"
          f"{'precision':>10}{'recall':>8}{'any':>6}")
    for r in quality.collect():
        print(f"{r['reason']:<18}{r['label_kinds']:<34}{r['predicted']:>8}{r['expected']:>9}"
              f"{r['true_pos']:>8}{_pct(r['precision']):>10}{_pct(r['recall']):>8}"
              f"{_pct(r['recall_any']):>6}")


def _pct(v: float | None) -> str:
    return "-" if v is None else f"{100 * v:.0f}%"


def run_quality(lake: Lakehouse, run_id: str,
                parts: list[tuple[str, str]] | None = None) -> DataFrame | None:
    """Edge: score ``gold_selection`` against its labels, print and record; None if unlabelled.
    ``parts``: the selection's ``(drop reason, part kind)`` pairs in order
    (:func:`etl.select.selection_parts`; default: :data:`REASON_LABELS`)."""
    quality = drop_reason_quality(lake.read(SELECTION),
                                  reason_labels(parts) if parts else None)
    if quality is None:
        print("quality: the pool has no label_kind column; precision/recall not computed")
        return None
    print_quality(quality)
    stats = {}
    for r in quality.collect():
        for key in ("predicted", "expected", "true_pos"):
            stats[f"{r['reason']}:{key}"] = r[key]
    lake.record_stats(run_id, "quality", stats)
    return quality
