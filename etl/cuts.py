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

    def record(self) -> dict:
        """The cut as ``dfn.select.cuts`` records it (kind, value, N, n and its basis)."""
        return {"kind": self.rule, "value": self.value, "N": self.n_scored, "n": self.position,
                **(self.basis or {})}


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
    values = _values(df, col)
    summary = _summary(values)
    n_scored = summary[0]
    n = int(n_scored * fraction)
    if n >= n_scored:
        return Threshold("keep_fraction", None, n_scored, n)
    return Threshold("keep_fraction", _kth(values, n, summary, small, 64), n_scored, n)


def kth_largest(df: DataFrame, col: str, k: int, small: int = SMALL,
                count: int | None = None, buckets: int = 64) -> float:
    """Exact value at 0-based position ``k`` of ``col`` sorted descending (nulls excluded; NaN
    sorts above every number, as in Spark).

    Never collects the column: one pass takes the count and the range, then each pass counts
    the values per equal-width bucket of the range (``width_bucket``: compiled, unlike a
    search over quantile bounds) and narrows to the bucket holding position ``k``, until at
    most ``small`` values remain, whose top ``k + 1`` are then taken exactly. ``count``, when
    given, is checked against the pass's own.
    """
    values = _values(df, col)
    summary = _summary(values)
    if count is not None and count != summary[0]:
        raise ValueError(f"{col}: {summary[0]} values, not the {count} expected")
    return _kth(values, k, summary, small, buckets)


def _values(df: DataFrame, col: str) -> DataFrame:
    return df.select(F.col(col).cast("double").alias("v")).where(F.col("v").isNotNull())


def _summary(values: DataFrame) -> tuple[int, float | None, float | None, int]:
    """One pass: (values, min and max of the numbers, NaNs)."""
    v = F.col("v")
    number = F.when(~F.isnan(v), v)
    row = values.agg(F.count("*"), F.min(number), F.max(number),
                     F.count(F.when(F.isnan(v), 1))).first()
    return row[0], row[1], row[2], row[3]


def _kth(values: DataFrame, k: int, summary: tuple[int, float | None, float | None, int],
         small: int, buckets: int) -> float:
    n, lo, hi, nans = summary
    if not 0 <= k < n:
        raise ValueError(f"position {k} is outside 0..{n - 1}")
    if k < nans:
        return float("nan")
    v = F.col("v")
    values, k, n = values.where(~F.isnan(v)), k - nans, n - nans
    while n > small and lo < hi:
        lo, hi, before, n = _bucket_of(values, k, lo, hi, buckets)
        values, k = values.where(v.between(lo, hi)), k - before
    if lo == hi:  # every value left is the same
        return hi
    return values.orderBy(F.desc("v")).limit(k + 1).agg(F.min("v")).first()[0]


def _bucket_of(values: DataFrame, k: int, lo: float, hi: float,
               buckets: int) -> tuple[float, float, int, int]:
    """(min, max, rows before, rows) of the equal-width bucket of [lo, hi] holding descending
    position k. The bucket is monotone in the value, so buckets never interleave and a
    bucket's rows are exactly those between its min and max."""
    bucket = F.width_bucket(F.col("v"), F.lit(lo), F.lit(hi), F.lit(buckets))
    stats = (values.groupBy(bucket.alias("b"))
             .agg(F.count("*").alias("n"), F.min("v").alias("lo"), F.max("v").alias("hi"))
             .orderBy(F.desc("b")).collect())  # at most buckets + 1 rows
    before = 0
    for row in stats:
        if k < before + row["n"]:
            return row["lo"], row["hi"], before, row["n"]
        before += row["n"]
    raise AssertionError("bucket counts do not cover the position")
