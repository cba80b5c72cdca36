"""``dfn-curate export``: gold_pairs, DataComp uids.npy, WebDataset shards, url parquet.

Spark-submit-able; the step itself is declared in :mod:`etl.steps`.
"""

from __future__ import annotations

from etl import steps
from etl.jobs.common import run_job


def main(argv: list[str] | None = None) -> dict:
    """``dfn-curate export`` with ``argv`` (see :data:`etl.steps.STEPS`)."""
    return steps.main("export", argv)


if __name__ == "__main__":
    run_job(main)
