"""``dfn-curate evaluate``: filter quality on labelled pairs + induced-dataset comparison.

Spark-submit-able; the step itself is declared in :mod:`etl.steps`.
"""

from __future__ import annotations

from etl import steps
from etl.jobs.common import run_job


def main(argv: list[str] | None = None) -> dict:
    """``dfn-curate evaluate`` with ``argv`` (see :data:`etl.steps.STEPS`)."""
    return steps.main("evaluate", argv)


if __name__ == "__main__":
    run_job(main)
