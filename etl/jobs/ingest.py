"""Job: ingest raw sources into bronze (``dfn-curate ingest``; spark-submit-able)."""

from __future__ import annotations

from etl.jobs.common import parser, run_job, start


def main(argv: list[str] | None = None) -> dict[str, int]:
    """Ingest ``ingest.sources`` into bronze_pairs and ``ingest.eval_sources`` into the eval table."""
    from etl.ingest import ingest

    ctx = start(parser("dfn-curate ingest", main.__doc__), argv, models=False)
    return ingest(ctx.spark, ctx.cfg, ctx.lake, ctx.run_id)


if __name__ == "__main__":
    run_job(main)
