"""``dfn-curate`` console script: one subcommand per job module."""

from __future__ import annotations

import importlib
import sys

# subcommand -> module under etl.jobs exposing main(argv=None)
COMMANDS = {
    "sample": "sample",
    "ingest": "ingest",
    "score": "score",
    "dedup": "dedup",
    "targets": "targets",
    "select": "select_pairs",
    "export": "export",
    "run": "run",
    "train-dfn": "train_dfn",
    "evaluate": "evaluate",
    "report": "report",
}


def main(argv: list[str] | None = None) -> int:
    """Dispatch ``dfn-curate <command> [options]`` to ``etl.jobs.<command>.main``."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help") or argv[0] not in COMMANDS:
        if argv and argv[0] not in ("-h", "--help"):
            print(f"dfn-curate: unknown command {argv[0]!r}", file=sys.stderr)
        print("usage: dfn-curate {" + ",".join(COMMANDS) + "} [--conf FILE] [--set KEY=VALUE ...]")
        return 0 if argv and argv[0] in ("-h", "--help") else 2
    module = importlib.import_module(f"etl.jobs.{COMMANDS[argv[0]]}")
    from etl.jobs.common import run_job

    run_job(module.main, argv[1:])
    return 0


if __name__ == "__main__":
    sys.exit(main())
