"""``dfn-curate evaluate``: filter quality on labelled pairs + induced-dataset comparison."""

from __future__ import annotations

from etl.evaluate import run_filter_quality, run_induced
from etl.jobs.common import parser, run_job, start
from etl.tables import BRONZE, SILVER


def main(argv: list[str] | None = None) -> dict:
    """Write ``gold_filter_quality`` (when labels and scores exist) and ``gold_evaluation``."""
    p = parser("dfn-curate evaluate", "Measure a filter (ROC-AUC, precision/recall on labelled "
               "pairs) and the selections it builds (train a small CLIP on each, same budget).")
    p.add_argument("--only", choices=["filter", "induced"], default=None,
                   help="run one of the two evaluations")
    p.add_argument("--no-progress", action="store_true", help="hide the progress bars")
    ctx = start(p, argv)
    out: dict = {}
    if ctx.args.only in (None, "filter"):
        if not ctx.lake.exists(SILVER) or "label_kind" not in ctx.lake.read(BRONZE).columns:
            print("filter quality: skipped (needs silver_scores and a label_kind column)")
        else:
            out["filter"] = run_filter_quality(ctx.lake, ctx.cfg, ctx.run_id)
    if ctx.args.only in (None, "induced"):
        out["induced"] = run_induced(ctx.lake, ctx.cfg, ctx.run_id, not ctx.args.no_progress)
    return out


if __name__ == "__main__":
    run_job(main)
