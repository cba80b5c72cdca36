"""The steps of dfn-curate, declared once: the CLI lists them, ``dfn-curate run`` runs the
pipeline ones in order, each ``etl/jobs/<module>.py`` is a thin ``main`` over :func:`main`
(what spark-submit, the CLI and the notebooks call).

Before a step that reads derived tables runs, :func:`execute` refuses stale inputs
(:func:`etl.lineage.require_fresh`); ``run`` rebuilds them instead (:func:`bring_up_to_date`).
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from etl.jobs.common import JobContext, parser, start
from etl.redact import redact_text

Action = Callable[[JobContext], Any]


@dataclass(frozen=True)
class Step:
    """One ``dfn-curate`` command.

    ``action`` does the step's work on a started context and is what ``run`` calls too;
    ``after`` adds what only the standalone command shows. ``models``: the step runs a model,
    so torch/open_clip are preloaded in the Python workers (kept out of the others).
    ``spark=False``: no Spark session (``ctx.spark`` and ``ctx.lake`` are None)."""

    name: str
    module: str  # etl.jobs.<module>: main(argv=None)
    help: str
    action: Action
    models: bool = False
    pipeline: bool = False  # one of ``dfn-curate run``'s steps
    spark: bool = True
    options: Callable[[argparse.ArgumentParser], None] | None = None
    check: Callable[[argparse.Namespace], str | None] | None = None  # an argv error, or None
    after: Callable[[JobContext, Any], None] | None = None


# ---- actions --------------------------------------------------------------------------------


def _sample(ctx: JobContext) -> dict[str, int]:
    from etl.fs import Store, locate
    from etl.sample import write_sample

    cfg, s = ctx.cfg, ctx.cfg.sample
    out = ctx.args.out or locate(cfg.lakehouse.root, s.out_dir)
    counts = write_sample(out, s.n_pairs, s.eval_size, s.seed, s.shard_size,
                          Store.from_conf(cfg.spark.conf))
    print(redact_text(f"sample written to {out}: {counts}"))
    return counts


def _ingest(ctx: JobContext) -> dict[str, int]:
    from etl.ingest import ingest

    return ingest(ctx.spark, ctx.cfg, ctx.lake, ctx.run_id)


def _score(ctx: JobContext) -> dict[str, dict[str, int]]:
    from etl.score import score_all

    return score_all(ctx.lake, ctx.cfg, ctx.run_id)


def _print_scored(ctx: JobContext, result: dict[str, dict[str, int]]) -> None:
    for table, counts in result.items():
        print(f"{table}: " + ", ".join(f"{k}={v}" for k, v in counts.items()))


def _dedup(ctx: JobContext) -> dict[str, int]:
    from etl.dedupinc import run_dedup

    return run_dedup(ctx.lake, ctx.cfg, ctx.run_id, refit=getattr(ctx.args, "refit", False))


def _targets(ctx: JobContext) -> dict[str, int]:
    from etl.targets import run_targets

    return run_targets(ctx.lake, ctx.cfg, ctx.run_id)


def _select(ctx: JobContext) -> dict[str, int]:
    from etl.select import run_select

    return run_select(ctx.lake, ctx.cfg, ctx.run_id)


def _export(ctx: JobContext) -> dict:
    from etl.exportdiff import run_export

    return run_export(ctx.lake, ctx.cfg, ctx.run_id)


def _run(ctx: JobContext) -> dict[str, dict]:
    return run_pipeline(ctx, parse_steps(ctx.args.steps))


def _train(ctx: JobContext) -> dict:
    from etl.train import summary, train_dfn

    card = train_dfn(ctx.lake, ctx.cfg.train, ctx.run_id, progress=not ctx.args.no_progress)
    print(summary(card))
    ctx.lake.record_stats(ctx.run_id, "train-dfn", {
        "train_pairs": card["data"]["train_pairs"],
        "undecodable_seen": card["data"]["undecodable_seen"],
        "steps": card["training"]["steps"]})
    return card


def _evaluate(ctx: JobContext) -> dict:
    from etl.evaluate import run_filter_quality, run_induced
    from etl.tables import BRONZE, SILVER

    out: dict = {}
    if ctx.args.only in (None, "filter"):
        if not ctx.lake.exists(SILVER) or "label_kind" not in ctx.lake.read(BRONZE).columns:
            print("filter quality: skipped (needs silver_scores and a label_kind column)")
        else:
            out["filter"] = run_filter_quality(ctx.lake, ctx.cfg, ctx.run_id)
    if ctx.args.only in (None, "induced"):
        out["induced"] = run_induced(ctx.lake, ctx.cfg, ctx.run_id, not ctx.args.no_progress)
    return out


def _report(ctx: JobContext) -> str:
    from etl.fs import is_url
    from etl.report import write_report

    out = ctx.lake.resolve(ctx.args.out or "report")
    page = write_report(ctx.lake, ctx.cfg, out, ctx.args.examples)
    print(redact_text(f"report: {page if is_url(page) else 'file://' + page}"))
    return page


def _takedown(ctx: JobContext) -> Any:
    from etl.spark import session_conf

    # its pandas UDFs read urls and keys, not images: larger Arrow batches than scoring's
    with session_conf(ctx.spark, {"spark.sql.execution.arrow.maxRecordsPerBatch": "8192"}):
        return _takedown_action(ctx)


def _takedown_action(ctx: JobContext) -> Any:
    action = ctx.args.action
    if action == "add":
        from etl.takedown.ledger import add_requests

        counts = add_requests(ctx.lake, ctx.cfg.takedown, ctx.args.file, ctx.run_id)
    elif action == "apply":
        from etl.takedown.apply import apply

        counts = apply(ctx.lake, ctx.cfg, ctx.run_id)
    elif action == "purge":
        from etl.takedown.proof import purge

        proof = purge(ctx.lake, ctx.cfg, ctx.run_id)
        if proof:
            print("takedown purge: proof verified (a-e): every check passed")
            ctx.lake.record_stats(ctx.run_id, "takedown:purge", {"verified": 1})
        return proof
    else:
        from etl.takedown.ledger import status

        table = status(ctx.lake)
        if table is None:
            print("takedown: no ledger yet")
        else:
            table.show(1000, truncate=False)
        return {}
    for name, value in counts.items():
        print(f"takedown {action}: {name:<24}{value:>10}")
    if counts:
        ctx.lake.record_stats(ctx.run_id, f"takedown:{action}", counts)
    return counts


def report_labels(ctx: JobContext, result: Any = None) -> None:
    """Precision/recall of each drop reason against the sample's labels, when present."""
    from etl.metrics import run_quality
    from etl.select import selection_parts

    run_quality(ctx.lake, ctx.run_id, selection_parts(ctx.cfg.select))


# ---- step-specific arguments ----------------------------------------------------------------


def _out_option(p: argparse.ArgumentParser, what: str) -> None:
    p.add_argument("--out", default=None, help=f"output folder or URL (default: {what})")


def _sample_options(p: argparse.ArgumentParser) -> None:
    _out_option(p, "<lakehouse.root>/<sample.out_dir>")


def _run_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--steps", default=",".join(PIPELINE),
                   help=f"comma-separated subset of {','.join(PIPELINE)} (default: all)")


def _check_run(args: argparse.Namespace) -> str | None:
    unknown = sorted(set(parse_steps(args.steps)) - set(PIPELINE))
    if unknown:
        return (f"dfn-curate run: unknown step(s) {', '.join(unknown)}; choose from "
                f"{', '.join(PIPELINE)}\n")
    return None


def _progress_option(p: argparse.ArgumentParser) -> None:
    p.add_argument("--no-progress", action="store_true", help="hide the progress bar")


def _evaluate_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--only", choices=["filter", "induced"], default=None,
                   help="run one of the two evaluations")
    p.add_argument("--no-progress", action="store_true", help="hide the progress bars")


def _takedown_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("action", choices=["add", "apply", "purge", "status"],
                   help="add: append a request file to the ledger; apply: remove what the "
                   "ledger names from every table and the export; purge: REORG/VACUUM and "
                   "write the proof; status: each request's state")
    p.add_argument("--file", default=None, help="add: the request file (.csv or .parquet, any "
                   "URL) with request_id, category, kind, value[, received_at]")


def _check_takedown(args: argparse.Namespace) -> str | None:
    if args.action == "add" and not args.file:
        return "dfn-curate takedown add: --file is required (a .csv or .parquet request file)\n"
    return None


def _dedup_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--refit", action="store_true", help="refit the frozen k-means centroids "
                   "and recompute every row's vectors, clusters and flags")


def _report_options(p: argparse.ArgumentParser) -> None:
    _out_option(p, "<lakehouse.root>/report")
    p.add_argument("--examples", type=int, default=8,
                   help="thumbnails per grid (near the threshold, per drop reason)")


# ---- the registry ---------------------------------------------------------------------------

STEPS: tuple[Step, ...] = (
    Step("sample", "sample", "Write the seeded sample pool (img2dataset shards, eval images); "
         "no Spark.", _sample, spark=False, options=_sample_options),
    Step("ingest", "ingest", "Read ingest.sources into bronze_pairs, ingest.eval_sources into "
         "the eval table.", _ingest, pipeline=True),
    Step("score", "score", "Score every (image, text) pair with the DFN filter model(s).",
         _score, models=True, pipeline=True, after=_print_scored),
    Step("dedup", "dedup", "Flag duplicate, near-duplicate and eval-leaking pairs.", _dedup,
         pipeline=True, options=_dedup_options),
    Step("targets", "targets", "Cluster the pool's image embeddings and compare them with a "
         "target image set.", _targets,
         pipeline=True),
    Step("select", "select_pairs", "Apply dedup flags and the selection (filters and score cuts).",
         _select, pipeline=True, after=report_labels),
    Step("export", "export", "Write the kept pairs for training and re-download.", _export,
         pipeline=True),
    Step("run", "run", "Run the pipeline steps in order, re-running stale ones; print "
         "the funnel.", _run, models=True, options=_run_options, check=_check_run),
    Step("train-dfn", "train_dfn", "Train a DFN (open_clip, CLIP loss) on high-quality pairs; "
         "writes weights + a model card.", _train,
         models=True, options=_progress_option),
    Step("evaluate", "evaluate", "Measure a filter on labelled pairs and train a small CLIP on "
         "each selection.",
         _evaluate, models=True, options=_evaluate_options),
    Step("report", "report", "Write an HTML page showing what the current gold_selection "
         "kept and dropped.", _report, options=_report_options),
    Step("takedown", "takedown", "Removal requests: add to the ledger, apply everywhere, purge "
         "with a proof, status.", _takedown, options=_takedown_options,
         check=_check_takedown),
)
PIPELINE: tuple[str, ...] = tuple(s.name for s in STEPS if s.pipeline)


def get(name: str) -> Step:
    """The step called ``name``."""
    for step in STEPS:
        if step.name == name:
            return step
    raise KeyError(f"unknown step {name!r}; choose from {', '.join(s.name for s in STEPS)}")


def parse_steps(text: str) -> list[str]:
    """``--steps`` text -> step names."""
    return [s.strip() for s in text.split(",") if s.strip()]


# ---- running --------------------------------------------------------------------------------


def main(name: str, argv: list[str] | None = None) -> Any:
    """Run step ``name`` as its own command: parse ``argv``, start Spark, :func:`execute`."""
    step = get(name)
    p = parser(f"dfn-curate {step.name}", step.help)
    if step.options is not None:
        step.options(p)
    ctx = start(p, argv, models=step.models, spark=step.spark, check=step.check)
    return execute(ctx, step)


def execute(ctx: JobContext, step: Step) -> Any:
    """Hold the lakehouse lease (:func:`etl.lease.hold`: another run holding it stops or waits),
    refuse stale inputs (:func:`etl.lineage.require_fresh`), then run ``step`` and what only
    its own command shows."""
    if not step.spark:
        return _finish(ctx, step, step.action(ctx))
    from etl.lease import check_held, hold
    from etl.lineage import require_fresh
    from etl.takedown.apply import reconcile, versions

    with hold(ctx.lake, ctx.run_id, step.name) as lease:
        require_fresh(ctx.lake, ctx.cfg, step.name)
        before = versions(ctx.lake)
        check_held(lease)  # a lost lease stops at each step boundary (etl.lease.LeaseLost)
        try:
            result = step.action(ctx)
        finally:  # what the step committed before failing is reconciled too
            if step.name != "takedown":
                reconcile(ctx.lake, ctx.cfg, ctx.run_id, before)
        check_held(lease)
        return _finish(ctx, step, result)


def _finish(ctx: JobContext, step: Step, result: Any) -> Any:
    if step.after is not None:
        step.after(ctx, result)
    return result


def run_pipeline(ctx: JobContext, names: list[str]) -> dict[str, dict]:
    """``dfn-curate run``: the pipeline steps in ``names``, in pipeline order, each after
    re-running the upstream steps whose tables went stale; then label quality."""
    results: dict[str, dict] = {}
    for name in PIPELINE:
        if name in names:
            bring_up_to_date(ctx, name, results)
            timed_step(ctx, name, results)
    report_labels(ctx)
    return results


def timed_step(ctx: JobContext, name: str, results: dict[str, dict]) -> None:
    """Run pipeline step ``name`` (inputs already fresh) and print how long it took."""
    from etl.work import describe

    t0 = time.perf_counter()
    results[name] = pipeline_step(ctx, name)
    did = describe(results[name])
    print(f"[{name}] done in {time.perf_counter() - t0:.1f}s{f': {did}' if did else ''}")


def pipeline_step(ctx: JobContext, name: str) -> Any:
    """Pipeline step ``name`` as ``run`` runs it (under the run's lease, re-entered): targets
    only when the selection reads it; stops (:class:`etl.lease.LeaseLost`) before or after
    it when the run's lease was lost."""
    from etl.lease import check_held, hold

    if name == "targets":
        from etl.select import needs_targets

        if not needs_targets(ctx.cfg.select):
            print("[targets] skipped: select.rule reads no target signal")
            return {}
    with hold(ctx.lake, ctx.run_id, name) as lease:
        check_held(lease)
        result = get(name).action(ctx)
        check_held(lease)
        return result


def bring_up_to_date(ctx: JobContext, name: str, results: dict[str, dict]) -> None:
    """Re-run, in order, the upstream steps whose tables no longer cover bronze (and theirs)."""
    from etl.lineage import stale_inputs

    for _ in range(len(PIPELINE) + 1):  # each pass rebuilds one stale input
        stale = stale_inputs(ctx.lake, ctx.cfg, name)
        if not stale:
            return
        first = stale[0]
        print(f"[{name}] {first.table} was built from {first.source} version "
              f"{first.built}, now {first.current}: running {first.step} first")
        bring_up_to_date(ctx, first.step, results)
        timed_step(ctx, first.step, results)
    raise RuntimeError(f"run: inputs of {name} still stale after re-running them")
