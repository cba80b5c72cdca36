"""``dfn-curate targets``: image clusters, target clusters and target similarity per pool uid."""

from __future__ import annotations

from etl.jobs.common import parser, run_job, start
from etl.targets import run_targets


def main(argv: list[str] | None = None) -> dict[str, int]:
    """Rewrite silver_targets from silver image embeddings and the configured target set."""
    p = parser("dfn-curate targets", "Cluster the pool's image embeddings and compare it with a "
               "target image set (DataComp's image-based filter, targeted ranking).")
    ctx = start(p, argv, models=False)
    return run_targets(ctx.lake, ctx.cfg, ctx.run_id)


if __name__ == "__main__":
    run_job(main)
