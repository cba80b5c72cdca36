"""``dfn-curate run``: the whole pipeline, ingest -> score -> dedup -> targets -> select ->
export (targets only when ``select.rule`` reads them).

Spark-submit-able; the step itself is declared in :mod:`etl.steps`.
"""

from __future__ import annotations

from etl import steps
from etl.jobs.common import run_job


def main(argv: list[str] | None = None) -> dict[str, dict]:
    """``dfn-curate run`` with ``argv`` (see :data:`etl.steps.STEPS`)."""
    return steps.main("run", argv)


if __name__ == "__main__":
    run_job(main)
