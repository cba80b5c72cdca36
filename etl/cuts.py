"""DataComp's cut semantics: the one definition of a score cut and of the drop decision.

Keep-fraction (DataComp ``baselines/apply_filter.py: get_threshold``): with fraction f over N
rows with a score, sort the scores descending, n = int(N * f), threshold = the score at 0-based
position n, keep rows with score >= threshold. Ties at the threshold are all kept, f = 0 keeps
the top score (and its ties), and n == N (f = 1, or nothing scored) keeps every scored row
(threshold None). A row without a score never passes a cut.

N counts the rows that reach the cut (``fraction_of: remaining``) or the whole pool
(``fraction_of: pool``, DataComp's setting for intersections such as clip_and_image).

The threshold is found exactly without collecting the column (:func:`kth_largest`).
"""

from __future__ import annotations

from dataclasses import dataclass

from pyspark.sql import Column, DataFrame
from pyspark.sql import functions as F

SMALL = 200_000  # below this many values the exact top-k is taken directly


@dataclass
class Threshold:
    """A resolved score cut: keep ``score >= value``; ``value`` None keeps every scored row."""

    rule: str  # none | min_score | keep_fraction | the kind of a rule part
    value: float | None = None
    n_scored: int | None = None  # N (fractions)
    position: int | None = None  # n = int(N * fraction)
    basis: dict | None = None  # what it was resolved over (etl.select.cut_basis), recorded

    @property
    def active(self) -> bool:
        return self.rule != "none"


def dropped(score: Column, threshold: float | None) -> Column:
    """True where a cut at ``threshold`` drops the row: no score, or a score below it."""
    if threshold is None:
        return score.isNull()
    return score.isNull() | (score < F.lit(threshold))


def is_dropped(score: float | None, threshold: float | None) -> bool:
    """:func:`dropped` for one Python value."""
    return score is None or (threshold is not None and score < threshold)


def fraction_threshold(df: DataFrame, col: str, fraction: float, small: int = SMALL) -> Threshold:
    """DataComp's keep-fraction threshold over the non-null values of ``col``."""
    scores = df.select(F.col(col).alias("v")).where(F.col("v").isNotNull())
    n_scored = scores.count()
    n = int(n_scored * fraction)
    if n >= n_scored:
        return Threshold("keep_fraction", None, n_scored, n)
    return Threshold("keep_fraction", kth_largest(scores, "v", n, small, n_scored), n_scored, n)


def kth_largest(df: DataFrame, col: str, k: int, small: int = SMALL,
                count: int | None = None, buckets: int = 64) -> float:
    """Exact value at 0-based position ``k`` of ``col`` sorted descending (nulls excluded).

    Never collects the column: values are bucketed by approximate quantiles, only per-bucket
    counts come to the driver, and the search narrows to the bucket holding position ``k``
    until at most ``small`` values remain, whose top ``k + 1`` are then taken exactly.
    """
    values = df.select(F.col(col).cast("double").alias("v")).where(F.col("v").isNotNull())
    n = values.count() if count is None else count
    if not 0 <= k < n:
        raise ValueError(f"position {k} is outside 0..{n - 1}")
    while n > small:
        lo, hi, before, size = _bucket_of(values, k, buckets)
        if lo == hi:
            return hi
        if size == n:  # quantiles did not split (heavy ties at the low end): peel the minimum
            above = values.where(F.col("v") > lo)
            n_above = above.count()
            if k >= n_above:
                return lo
            values, n = above, n_above
            continue
        values, k, n = values.where(F.col("v").between(lo, hi)), k - before, size
    return values.orderBy(F.desc("v")).limit(k + 1).agg(F.min("v")).first()[0]


def _bucket_of(values: DataFrame, k: int, buckets: int) -> tuple[float, float, int, int]:
    """(min, max, rows before, rows) of the quantile bucket holding descending position k."""
    qs = values.approxQuantile("v", [i / buckets for i in range(1, buckets)], 0.25 / buckets)
    bounds = F.array(*[F.lit(float(x)) for x in sorted(set(qs), reverse=True)])
    bucket = F.size(F.filter(bounds, lambda b: b > F.col("v")))
    stats = (values.groupBy(bucket.alias("b"))
             .agg(F.count("*").alias("n"), F.min("v").alias("lo"), F.max("v").alias("hi"))
             .orderBy("b").collect())
    before = 0
    for row in stats:
        if k < before + row["n"]:
            return row["lo"], row["hi"], before, row["n"]
        before += row["n"]
    raise AssertionError("bucket counts do not cover the position")
