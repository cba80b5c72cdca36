"""``dfn-curate report``: a self-contained HTML page (plus PNGs) showing what a run selected."""

from __future__ import annotations

from etl.fs import is_url
from etl.jobs.common import parser, run_job, start
from etl.report import write_report


def main(argv: list[str] | None = None) -> str:
    """Write ``<out>/index.html`` for the lakehouse's current gold_selection; returns its path."""
    p = parser("dfn-curate report", main.__doc__)
    p.add_argument("--out", default=None,
                   help="output folder or URL (default: <lakehouse.root>/report)")
    p.add_argument("--examples", type=int, default=8,
                   help="thumbnails per grid (near the threshold, per drop reason)")
    ctx = start(p, argv, models=False)
    out = ctx.lake.resolve(ctx.args.out or "report")
    page = write_report(ctx.lake, ctx.cfg, out, ctx.args.examples)
    print(f"report: {page if is_url(page) else 'file://' + page}")
    return page


if __name__ == "__main__":
    run_job(main)
