"""``dfn-curate select``: dedup flags, basic filters and the score threshold, or
``select.rule`` -> gold_selection.

Spark-submit-able; the step itself is declared in :mod:`etl.steps`.
"""

from __future__ import annotations

from etl import steps
from etl.jobs.common import run_job


def main(argv: list[str] | None = None) -> dict[str, int]:
    """``dfn-curate select`` with ``argv`` (see :data:`etl.steps.STEPS`)."""
    return steps.main("select", argv)


if __name__ == "__main__":
    run_job(main)
