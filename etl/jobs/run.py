"""Job: the whole pipeline, ingest -> score -> dedup -> select -> export (``dfn-curate run``)."""

from __future__ import annotations

import time

from etl.jobs.common import JobContext, parser, run_job, start

STEPS = ("ingest", "score", "dedup", "select", "export")


def main(argv: list[str] | None = None) -> dict[str, dict]:
    """Run the pipeline steps in order and print the funnel (and label metrics when labelled)."""
    p = parser("dfn-curate run", main.__doc__)
    p.add_argument("--steps", default=",".join(STEPS),
                   help=f"comma-separated subset of {','.join(STEPS)} (default: all)")
    ctx = start(p, argv)
    steps = [s.strip() for s in ctx.args.steps.split(",") if s.strip()]
    unknown = sorted(set(steps) - set(STEPS))
    if unknown:
        p.exit(2, f"dfn-curate run: unknown step(s) {', '.join(unknown)}; choose from {', '.join(STEPS)}\n")
    results = {}
    for step in STEPS:
        if step in steps:
            t0 = time.perf_counter()
            results[step] = run_step(ctx, step)
            print(f"[{step}] done in {time.perf_counter() - t0:.1f}s")
    report_labels(ctx)
    return results


def run_step(ctx: JobContext, step: str) -> dict:
    """Run one named step against the lakehouse."""
    if step == "ingest":
        from etl.ingest import ingest

        return ingest(ctx.spark, ctx.cfg, ctx.lake, ctx.run_id)
    if step == "score":
        from etl.score import score_all

        return score_all(ctx.lake, ctx.cfg, ctx.run_id)
    if step == "dedup":
        from etl.dedup import run_dedup

        return run_dedup(ctx.lake, ctx.cfg, ctx.run_id)
    if step == "select":
        from etl.select import run_select

        return run_select(ctx.lake, ctx.cfg, ctx.run_id)
    from etl.export import run_export

    return run_export(ctx.lake, ctx.cfg, ctx.run_id)


def report_labels(ctx: JobContext) -> None:
    """Precision/recall of each drop reason against the sample's labels, when present."""
    from etl.metrics import label_metrics_for_lake

    label_metrics_for_lake(ctx.lake, ctx.cfg, ctx.run_id)


if __name__ == "__main__":
    run_job(main)
