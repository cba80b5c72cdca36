"""``dfn-curate takedown add|apply|purge|status``: removal requests (:mod:`etl.takedown`).

Spark-submit-able; the step itself is declared in :mod:`etl.steps`.
"""

from __future__ import annotations

from etl import steps
from etl.jobs.common import run_job


def main(argv: list[str] | None = None) -> dict:
    """``dfn-curate takedown`` with ``argv`` (see :data:`etl.steps.STEPS`)."""
    return steps.main("takedown", argv)


if __name__ == "__main__":
    run_job(main)
