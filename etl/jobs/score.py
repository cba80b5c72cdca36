"""``dfn-curate score``: score bronze pairs (and eval images) with the configured filter models."""

from __future__ import annotations

from etl.jobs.common import parser, run_job, start
from etl.score import score_all


def main(argv: list[str] | None = None) -> None:
    """Fill silver_scores (and silver_eval_embeddings); re-runs score only what is missing."""
    p = parser("dfn-curate score", "Score every (image, text) pair with the DFN filter model(s).")
    ctx = start(p, argv)
    for table, counts in score_all(ctx.lake, ctx.cfg, ctx.run_id).items():
        print(f"{table}: " + ", ".join(f"{k}={v}" for k, v in counts.items()))


if __name__ == "__main__":
    run_job(main)
