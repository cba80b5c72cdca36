"""Job: ingest raw sources into bronze (``dfn-curate ingest``).

Spark-submit-able; the step itself is declared in :mod:`etl.steps`.
"""

from __future__ import annotations

from etl import steps
from etl.jobs.common import run_job


def main(argv: list[str] | None = None) -> dict[str, int]:
    """``dfn-curate ingest`` with ``argv`` (see :data:`etl.steps.STEPS`)."""
    return steps.main("ingest", argv)


if __name__ == "__main__":
    run_job(main)
