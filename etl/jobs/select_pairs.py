"""``dfn-curate select``: basic filters and the score threshold -> gold_selection."""

from __future__ import annotations

from etl.jobs.common import parser, run_job, start
from etl.metrics import run_quality
from etl.select import run_select, selection_reasons


def main(argv: list[str] | None = None) -> None:
    """Rewrite gold_selection; print the funnel (and precision/recall when labelled)."""
    p = parser("dfn-curate select", "Apply dedup flags, basic filters and the score threshold.")
    ctx = start(p, argv, models=False)
    run_select(ctx.lake, ctx.cfg, ctx.run_id)
    run_quality(ctx.lake, ctx.run_id, selection_reasons(ctx.cfg.select))


if __name__ == "__main__":
    run_job(main)
