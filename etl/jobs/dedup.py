"""``dfn-curate dedup``: exact and near duplicates, evaluation-set decontamination."""

from __future__ import annotations

from etl.dedup import run_dedup
from etl.jobs.common import parser, run_job, start


def main(argv: list[str] | None = None) -> None:
    """Rewrite silver_dedup from bronze_pairs, silver_scores and the evaluation images."""
    p = parser("dfn-curate dedup", "Flag duplicate, near-duplicate and eval-leaking pairs.")
    ctx = start(p, argv, models=False)
    run_dedup(ctx.lake, ctx.cfg, ctx.run_id)


if __name__ == "__main__":
    run_job(main)
