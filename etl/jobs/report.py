"""``dfn-curate report``: a self-contained HTML page (plus PNGs) showing what a run selected.

Spark-submit-able; the step itself is declared in :mod:`etl.steps`.
"""

from __future__ import annotations

from etl import steps
from etl.jobs.common import run_job


def main(argv: list[str] | None = None) -> str:
    """``dfn-curate report`` with ``argv`` (see :data:`etl.steps.STEPS`)."""
    return steps.main("report", argv)


if __name__ == "__main__":
    run_job(main)
