"""Spark Connect vs classic on this machine, in one run (docs/performance.md).

    python benchmarks/bench_connect.py                       # 1M metadata rows, demo, 16-row ingest
    python benchmarks/bench_connect.py --meta 100000 --runs 1

Every workload is a ``dfn-curate`` command in a new process on a fresh lakehouse, run twice
back to back: classic (the command starts its own driver JVM) and over Spark Connect against
one local server (``etl.connectserver``, started once, before the timings, with the same
laptop defaults and master). Workloads:

* ``meta``: a DataComp-format metadata pool (``bench_scale.write_metadata_pool``) through
  ingest -> select (keep_fraction 0.3 on ``clip_l14_similarity_score``) -> export (uids.npy),
  as ``dfn-curate run --steps ingest,select,export``.
* ``demo``: ``dfn-curate run --conf conf/local.yaml`` (the bundled 2000-pair sample, the bundled
  DFN), as ``make demo`` runs it.
* ``ingest16``: ``dfn-curate ingest`` of a 16-pair shard, the fixed cost of one command: the
  classic command starts a JVM, the Connect one attaches to the running server.

Wall seconds to the command's exit; Connect/classic ratio per workload. Writes ``--out`` (JSON).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from benchmarks.bench_scale import write_metadata_pool  # noqa: E402
from benchmarks.provenance import write_json  # noqa: E402


def timed(args: list[str], log: Path, remote: str | None) -> float:
    """Seconds ``dfn-curate <args>`` takes in a new process (``remote``: over Connect)."""
    from etl.spark import child_env

    env = child_env()
    cmd = [sys.executable, "-m", "etl.cli", *args]
    if remote:
        cmd += ["--set", f"spark.remote={remote}"]
    with open(log, "wb") as out:
        start = time.perf_counter()
        code = subprocess.call(cmd, stdout=out, stderr=subprocess.STDOUT, env=env, cwd=ROOT)
        seconds = time.perf_counter() - start
    if code:
        raise RuntimeError(f"{' '.join(cmd)} failed ({code}); see {log}")
    return seconds


def workloads(tmp: Path, meta_rows: int) -> dict[str, callable]:
    """name -> (lakehouse root -> argv) of each workload; inputs generated here, untimed."""
    from etl.sample import write_sample

    out: dict[str, callable] = {}
    if meta_rows:
        raw = tmp / "meta-raw"
        write_metadata_pool(raw, meta_rows)
        out["meta"] = lambda lake: [
            "run", "--steps", "ingest,select,export", "--conf", "conf/local.yaml",
            "--set", f"lakehouse.root={lake}",
            "--set", f"ingest.sources=[{{format: datacomp, path: '{raw}', name: meta}}]",
            "--set", "ingest.eval_sources=[]", "--set", "select.preset=none",
            "--set", "select.score_column=clip_l14_similarity_score",
            "--set", "select.keep_fraction=0.3", "--set", "select.fraction_of=pool",
            "--set", "export.webdataset=false", "--set", "export.urls_parquet=false"]
    out["demo"] = lambda lake: ["run", "--conf", "conf/local.yaml",
                                "--set", f"lakehouse.root={lake}"]
    small = tmp / "small"
    write_sample(str(small), n_pairs=16, eval_size=0, seed=0, shard_size=16)
    out["ingest16"] = lambda lake: [
        "ingest", "--conf", "conf/local.yaml", "--set", f"lakehouse.root={lake}",
        "--set", f"ingest.sources=[{{format: img2dataset, path: '{small}/pool'}}]",
        "--set", "ingest.eval_sources=[]"]
    return out


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--meta", type=int, default=1_000_000, help="metadata rows (0: skip)")
    p.add_argument("--runs", type=int, default=2, help="runs of ingest16 per mode")
    p.add_argument("--skip", default="", help="comma-separated workloads to leave out")
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "connect.json"))
    args = p.parse_args(argv)
    from etl import connectserver

    tmp = Path(tempfile.mkdtemp(prefix="bench-connect-"))
    jobs = {k: v for k, v in workloads(tmp, args.meta).items() if k not in args.skip.split(",")}
    results = []
    with connectserver.start(tmp / "server") as server:
        print(f"Connect server up in {server.started_s:.1f} s at {server.url}", flush=True)
        for name, argv_of in jobs.items():
            for run in range(args.runs if name == "ingest16" else 1):
                row = {"workload": name, "run": run + 1}
                for mode, remote in (("classic", None), ("connect", server.url)):
                    lake = tmp / f"{name}-{mode}-{run}"
                    time.sleep(3)  # the previous command's JVM has exited
                    row[f"{mode}_s"] = round(timed(argv_of(lake), tmp / f"{lake.name}.log",
                                                   remote), 2)
                row["ratio"] = round(row["connect_s"] / row["classic_s"], 3)
                results.append(row)
                print(json.dumps(row), flush=True)
        started = round(server.started_s, 2)
    print("\n| workload | classic s | Connect s | Connect / classic |\n|---|---:|---:|---:|")
    for r in results:
        print(f"| {r['workload']} (run {r['run']}) | {r['classic_s']} | {r['connect_s']} | "
              f"{r['ratio']} |")
    path = write_json(args.out, {"server_start_s": started, "meta_rows": args.meta,
                                 "results": results}, argv)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
