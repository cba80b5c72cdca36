"""``dfn-curate train-dfn``: train or fine-tune a filtering network on a high-quality table."""

from __future__ import annotations

from etl.jobs.common import parser, run_job, start
from etl.train import summary, train_dfn


def main(argv: list[str] | None = None) -> dict:
    """Train per the ``train`` config section; writes the checkpoint and its model card."""
    p = parser("dfn-curate train-dfn", "Train a DFN (open_clip, CLIP loss) on a Delta table of "
               "high-quality image-text pairs; writes safetensors + a JSON model card.")
    p.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    ctx = start(p, argv)
    card = train_dfn(ctx.lake, ctx.cfg.train, ctx.run_id, progress=not ctx.args.no_progress)
    print(summary(card))
    ctx.lake.record_stats(ctx.run_id, "train-dfn", {
        "train_pairs": card["data"]["train_pairs"],
        "undecodable_seen": card["data"]["undecodable_seen"],
        "steps": card["training"]["steps"]})
    return card


if __name__ == "__main__":
    run_job(main)
