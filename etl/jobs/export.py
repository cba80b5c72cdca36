"""``dfn-curate export``: gold_pairs, DataComp uids.npy, WebDataset shards, url parquet."""

from __future__ import annotations

from etl.export import run_export
from etl.jobs.common import parser, run_job, start


def main(argv: list[str] | None = None) -> None:
    """Rewrite gold_pairs and replace the export folder atomically."""
    p = parser("dfn-curate export", "Write the kept pairs for training and re-download.")
    ctx = start(p, argv, models=False)
    run_export(ctx.lake, ctx.cfg, ctx.run_id)


if __name__ == "__main__":
    run_job(main)
