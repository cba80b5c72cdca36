"""The Connect-vs-classic comparison: what one pipeline run left behind, as plain data, and a
child-process entry point that runs the end-to-end notebook over Spark Connect (a process with
no JVM: any JVM access there raises) and prints that summary as JSON.

    SPARK_REMOTE=sc://... DFN_CONF=... DFN_OVERRIDES=... python -m tests.helpers.connect
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys

from etl.config import PROJECT_ROOT
from etl.export import read_export
from etl.spark import child_env
from etl.tables import RUN_STATS, TABLE_NAMES, Lakehouse

PIPELINE_STEPS = ("ingest", "score", "dedup", "targets", "select", "export", "quality")


def summary(lake: Lakehouse, out_dir: str) -> dict:
    """Every table's row count, the pipeline's run_stats as (step, metric, value), and the
    sha256 of the published uids.npy (``out_dir``: the export folder)."""
    counts = {t: lake.read(t).count() for t in TABLE_NAMES if lake.exists(t)}
    stats = sorted([r["step"], r["metric"], r["value"]] for r in lake.read(RUN_STATS).collect()
                   if r["step"].split(":")[0] in PIPELINE_STEPS)
    manifest = read_export(out_dir, lake.store)
    npy = lake.store.read_bytes(manifest["uids_npy"]["path"]) if manifest else b""
    return {"counts": counts, "run_stats": stats, "uids_npy": hashlib.sha256(npy).hexdigest(),
            "kept": manifest and manifest["kept"]}


def run_cli(*args: str, timeout: float = 900, **env: str) -> subprocess.CompletedProcess:
    """``dfn-curate <args>`` in a fresh process (its own session: classic, or Connect)."""
    return subprocess.run([sys.executable, "-m", "etl.cli", *args], cwd=PROJECT_ROOT,
                          capture_output=True, text=True, timeout=timeout, env=child_env(**env))


def _main() -> None:
    from etl.notebook import context, job_argv
    from tests.helpers.pipeline import NOTEBOOKS, run_notebook

    run_notebook(NOTEBOOKS / "00_end_to_end.py")
    ctx = context(job_argv(os.environ["DFN_CONF"], os.environ.get("DFN_OVERRIDES", "")))
    from etl.compat import is_connect

    found = summary(ctx.lake, ctx.lake.resolve(ctx.cfg.export.out_dir))
    print("SUMMARY " + json.dumps({**found, "connect": is_connect(ctx.spark)}))


if __name__ == "__main__":
    _main()
