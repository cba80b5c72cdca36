"""Job: the whole pipeline, ingest -> score -> dedup -> targets -> select -> export
(``dfn-curate run``; targets only when ``select.rule`` reads them)."""

from __future__ import annotations

import time

from etl.jobs.common import JobContext, parser, run_job, start

STEPS = ("ingest", "score", "dedup", "targets", "select", "export")


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
    results: dict[str, dict] = {}
    for step in STEPS:
        if step in steps:
            bring_up_to_date(ctx, step, results)
            timed_step(ctx, step, results)
    report_labels(ctx)
    return results


def timed_step(ctx: JobContext, step: str, results: dict[str, dict]) -> None:
    t0 = time.perf_counter()
    results[step] = run_step(ctx, step)
    print(f"[{step}] done in {time.perf_counter() - t0:.1f}s")


def stale_for(ctx: JobContext, step: str) -> list:
    """The inputs of ``step`` that no longer cover bronze (``StaleTableError`` each)."""
    if step in ("dedup", "targets"):
        from etl.select import stale_scores

        found = stale_scores(ctx.lake, ctx.cfg, step)
        return [found] if found else []
    if step == "select":
        from etl.select import stale_inputs

        return stale_inputs(ctx.lake, ctx.cfg)
    if step == "export":
        from etl.export import stale_inputs as stale_selection

        return stale_selection(ctx.lake)
    return []


def bring_up_to_date(ctx: JobContext, step: str, results: dict[str, dict]) -> None:
    """Re-run, in order, the upstream steps whose tables no longer cover bronze (and theirs)."""
    for _ in range(len(STEPS) + 1):  # each pass rebuilds one stale input
        stale = stale_for(ctx, step)
        if not stale:
            return
        missing = stale[0].step
        print(f"[{step}] {stale[0].table} was built from {stale[0].source} version "
              f"{stale[0].built}, now {stale[0].current}: running {missing} first")
        bring_up_to_date(ctx, missing, results)
        timed_step(ctx, missing, results)
    raise RuntimeError(f"run: inputs of {step} still stale after re-running them")


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
    if step == "targets":
        from etl.select import needs_targets
        from etl.targets import run_targets

        if not needs_targets(ctx.cfg.select):
            print("[targets] skipped: select.rule reads no target signal")
            return {}
        return run_targets(ctx.lake, ctx.cfg, ctx.run_id)
    if step == "select":
        from etl.select import run_select

        return run_select(ctx.lake, ctx.cfg, ctx.run_id)
    from etl.export import run_export

    return run_export(ctx.lake, ctx.cfg, ctx.run_id)


def report_labels(ctx: JobContext) -> None:
    """Precision/recall of each drop reason against the sample's labels, when present."""
    from etl.metrics import run_quality
    from etl.select import selection_reasons

    run_quality(ctx.lake, ctx.run_id, selection_reasons(ctx.cfg.select))


if __name__ == "__main__":
    run_job(main)
