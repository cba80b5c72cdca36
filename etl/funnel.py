"""The selection funnel: the pool, each drop reason with the rows it dropped, what is kept.

One type for every reader: select computes it from ``gold_selection``, prints it and records
it in ``run_stats`` (:meth:`Funnel.metrics`); the report and the notebooks read it back
(:meth:`Funnel.of` or :meth:`Funnel.from_metrics`).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from pyspark.sql import DataFrame

DROPPED = "dropped:"  # run-stats metric prefix of a drop reason's count


@dataclass(frozen=True)
class FunnelStep:
    """One drop reason: the rows it dropped and the rows left after it."""

    name: str
    dropped: int
    left: int


@dataclass(frozen=True)
class Funnel:
    """``pool`` rows, the drop reasons that dropped rows (in assignment order), ``kept`` rows."""

    pool: int
    steps: tuple[FunnelStep, ...]
    kept: int

    @classmethod
    def of(cls, selection: DataFrame, order: Sequence[str]) -> Funnel:
        """The funnel of a selection (``drop_reason`` per row, null when kept).

        Reasons come in ``order``, then any other reason found (sorted), so the steps always
        add up to the pool; reasons that dropped nothing are left out.
        """
        got = {r["drop_reason"]: r["count"]
               for r in selection.groupBy("drop_reason").count().collect()}
        return cls.from_counts(got, order)

    @classmethod
    def from_counts(cls, counts: Mapping[str | None, int], order: Sequence[str]) -> Funnel:
        """The funnel of rows counted per drop reason (``None``: kept)."""
        pool = sum(counts.values())
        names = list(order) + sorted(r for r in counts if r is not None and r not in order)
        steps, left = [], pool
        for reason in names:
            if counts.get(reason):
                left -= counts[reason]
                steps.append(FunnelStep(reason, counts[reason], left))
        return cls(pool, tuple(steps), counts.get(None, 0))

    @classmethod
    def from_metrics(cls, metrics: Mapping[str, int]) -> Funnel:
        """The inverse of :meth:`metrics` (other metrics, such as threshold counts, ignored)."""
        steps, left = [], int(metrics["pool"])
        for key, dropped in metrics.items():
            if key.startswith(DROPPED):
                left -= int(dropped)
                steps.append(FunnelStep(key[len(DROPPED):], int(dropped), left))
        return cls(int(metrics["pool"]), tuple(steps), int(metrics["kept"]))

    def metrics(self) -> dict[str, int]:
        """The funnel as run-stats metrics: ``pool``, ``dropped:<reason>``, ``kept``."""
        return {"pool": self.pool, **{f"{DROPPED}{s.name}": s.dropped for s in self.steps},
                "kept": self.kept}

    def lines(self) -> list[str]:
        """The printed funnel, line by line: pool, each reason with what is left, kept."""
        return [f"{'pool':<28}{self.pool:>10}",
                *[f"  - {s.name:<24}{s.dropped:>10}   -> {s.left}" for s in self.steps],
                f"{'kept':<28}{self.kept:>10}"]

    def rows(self) -> list[tuple[str, int, int]]:
        """(step, dropped, left) per line of the funnel, ``pool`` first and ``kept`` last."""
        return [("pool", 0, self.pool), *[(s.name, s.dropped, s.left) for s in self.steps],
                ("kept", 0, self.kept)]

    def print(self) -> None:
        """Print :meth:`lines`."""
        for line in self.lines():
            print(line)
