"""What a step did, in rows: new rows, rows it touched, and the pool it worked on.

An incremental run is cheap when a step touches rows in proportion to what is new, not to the
pool. Every step that writes a table records the three counts in ``run_stats`` beside its
other metrics (:func:`work`); ``dfn-curate run`` prints them after each step
(:func:`describe`) and the report shows them per step (:func:`work_rows`), beside every
metric of each step's latest run (:func:`latest_run_stats`).

- ``new``: rows this run added to the step's output (ingest: bronze rows inserted; score: rows
  scored; dedup: pool rows not deduplicated before; select: rows selected for the first time;
  export: samples added to the export).
- ``touched``: rows the step read or rewrote to do that (ingest: rows in the files it read;
  dedup: rows passed to the near-duplicate comparison; select: rows whose decision was
  written; export: samples added plus removed).
- ``pool``: rows of the step's output after the run (score: the bronze rows it covers, once
  however many models score them).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from pyspark.sql import functions as F

from etl.tables import RUN_STATS

if TYPE_CHECKING:
    from etl.tables import Lakehouse

NEW, TOUCHED, POOL = "work:new", "work:touched", "work:pool"
METRICS = (NEW, TOUCHED, POOL)


def work(new: int, touched: int, pool: int) -> dict[str, int]:
    """The three work metrics, for a step's ``run_stats`` counts."""
    return {NEW: int(new), TOUCHED: int(touched), POOL: int(pool)}


def describe(counts: Any) -> str | None:
    """``"120 new, 480 touched, pool 10,000"`` from a step's counts (a nested dict of counts,
    such as score's per model, is summed), or None when it recorded no work."""
    found = [c for c in _dicts(counts) if all(m in c for m in METRICS)]
    if not found:
        return None
    new, touched, pool = (sum(int(c[m]) for c in found) for m in METRICS)
    return f"{new:,} new, {touched:,} touched, pool {pool:,}"


def _dicts(counts: Any) -> list[Mapping]:
    if not isinstance(counts, Mapping):
        return []
    nested = [v for v in counts.values() if isinstance(v, Mapping)]
    return [counts] + [d for v in nested for d in _dicts(v)]


def work_rows(stats: list[tuple[str, str, str, int]]) -> list[list]:
    """[step, run_id, new, touched, pool] for each (step, run_id, metric, value) group that
    recorded every work metric, in the order given."""
    grouped: dict[tuple[str, str], dict[str, int]] = {}
    for step, run_id, metric, value in stats:
        if metric in METRICS:
            grouped.setdefault((step, run_id), {})[metric] = int(value)
    return [[step, run_id, *(got[m] for m in METRICS)]
            for (step, run_id), got in grouped.items() if len(got) == len(METRICS)]


def latest_run_stats(lake: Lakehouse) -> list[tuple[str, str, str, int]]:
    """(step, run_id, metric, value) of the latest run of each step, in the order recorded."""
    if not lake.exists(RUN_STATS):
        return []
    stats = lake.read(RUN_STATS)
    last = stats.groupBy("step").agg(F.max_by("run_id", "recorded_at").alias("run_id"))
    rows = stats.join(last, ["step", "run_id"]).orderBy("recorded_at", "step", "metric").collect()
    return [(r["step"], r["run_id"], r["metric"], r["value"]) for r in rows]


def stats_lines(stats: list[tuple[str, str, str, int]]) -> list[tuple[str, str, str]]:
    """(step, run_id, "metric=value, ...") per step of :func:`latest_run_stats`."""
    grouped: dict[tuple[str, str], list[str]] = {}
    for step, run_id, metric, value in stats:
        grouped.setdefault((step, run_id), []).append(f"{metric}={value}")
    return [(step, run, ", ".join(m)) for (step, run), m in grouped.items()]
