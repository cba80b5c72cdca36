"""Argument parsing and context shared by every job."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from dataclasses import dataclass

from pyspark.sql import SparkSession

from etl.config import Config, ConfigError, config_urls, load_config
from etl.lease import EXIT_BUSY, LeaseHeld
from etl.redact import redact_text
from etl.tables import Lakehouse, new_run_id


@dataclass
class JobContext:
    """What a step runs with. ``spark`` and ``lake`` are None only for a step declared
    ``spark=False`` (:class:`etl.steps.Step`)."""

    cfg: Config
    spark: SparkSession
    lake: Lakehouse
    run_id: str
    args: argparse.Namespace


def parser(prog: str, description: str) -> argparse.ArgumentParser:
    """An ArgumentParser with the options every job takes (--conf, --set)."""
    p = argparse.ArgumentParser(prog=prog, description=description)
    p.add_argument("--conf", default=None, help="YAML config (default: conf/local.yaml)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config key, e.g. --set score.batch_size=128 (repeatable)")
    p.add_argument("--run-id", default=None, help="id recorded in run_stats (default: new)")
    p.add_argument("--wait", action="store_true", help="another run holds the lakehouse: wait "
                   "for it instead of stopping (lakehouse.lease.mode=wait)")
    return p


def start(p: argparse.ArgumentParser, argv: list[str] | None, models: bool = True,
          spark: bool = True,
          check: Callable[[argparse.Namespace], str | None] | None = None) -> JobContext:
    """Parse ``argv`` (``check`` returns an argument error, or None), load and validate config
    (failing fast), then get Spark unless ``spark`` is False.

    ``models=False`` (steps that run no model) keeps torch/open_clip out of the Python workers.
    """
    args = p.parse_args(argv)
    error = check(args) if check is not None else None
    if error:
        p.exit(2, error)
    try:
        wait = ["lakehouse.lease.mode=wait"] if args.wait else []
        cfg = load_config(args.conf, args.overrides + wait)
    except ConfigError as exc:
        p.exit(2, f"{p.prog}: config error: {redact_text(str(exc))}\n")
    run_id = args.run_id or new_run_id()
    if not spark:
        return JobContext(cfg, None, None, run_id, args)
    from etl.spark import check_catalog, check_connectors, get_spark

    urls = config_urls(cfg)
    session = get_spark(cfg.spark, urls.values(), preload_models=models)
    check_catalog(session, cfg.lakehouse.schema)
    check_connectors(session, urls)
    return JobContext(cfg, session, Lakehouse(session, cfg.lakehouse), run_id, args)


def run_job(main_fn, argv: list[str] | None = None) -> None:
    """``if __name__ == '__main__'`` helper: exit non-zero on failure with a readable message."""
    try:
        main_fn(argv if argv is not None else sys.argv[1:])
    except (ConfigError, FileNotFoundError, ValueError) as exc:
        print(f"error: {redact_text(str(exc))}", file=sys.stderr)
        sys.exit(1)
    except LeaseHeld as exc:  # another run holds the lakehouse: one line, retry later
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(EXIT_BUSY)
