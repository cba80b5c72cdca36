"""``dfn-curate targets``: image clusters, target clusters and target similarity per pool uid.

Spark-submit-able; the step itself is declared in :mod:`etl.steps`.
"""

from __future__ import annotations

from etl import steps
from etl.jobs.common import run_job


def main(argv: list[str] | None = None) -> dict[str, int]:
    """``dfn-curate targets`` with ``argv`` (see :data:`etl.steps.STEPS`)."""
    return steps.main("targets", argv)


if __name__ == "__main__":
    run_job(main)
