"""``dfn-curate`` console script: one subcommand per step of :data:`etl.steps.STEPS`."""

from __future__ import annotations

import importlib
import sys

from etl.steps import STEPS

# subcommand -> module under etl.jobs exposing main(argv=None)
COMMANDS = {step.name: step.module for step in STEPS}


def usage() -> str:
    """The top-level usage text: every command with its one-line help."""
    width = max(len(name) for name in COMMANDS)
    lines = [f"  {s.name:<{width}}  {s.help}" for s in STEPS]
    return ("usage: dfn-curate {" + ",".join(COMMANDS) + "} [--conf FILE] [--set KEY=VALUE ...]"
            "\n\ncommands:\n" + "\n".join(lines))


def main(argv: list[str] | None = None) -> int:
    """Dispatch ``dfn-curate <command> [options]`` to ``etl.jobs.<module>.main``."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help") or argv[0] not in COMMANDS:
        if argv and argv[0] not in ("-h", "--help"):
            print(f"dfn-curate: unknown command {argv[0]!r}", file=sys.stderr)
        print(usage())
        return 0 if argv and argv[0] in ("-h", "--help") else 2
    module = importlib.import_module(f"etl.jobs.{COMMANDS[argv[0]]}")
    from etl.jobs.common import run_job

    run_job(module.main, argv[1:])
    return 0


if __name__ == "__main__":
    sys.exit(main())
