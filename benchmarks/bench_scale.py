"""Scale benchmark: what each stage costs as the pool grows (``make bench-scale``).

    python benchmarks/bench_scale.py                                  # the default sizes
    python benchmarks/bench_scale.py --meta 100000,1000000 --images 2000,8000
    python benchmarks/bench_scale.py --cluster --images ''          # driver apart from executors

Two kinds of pool, each from a fresh lakehouse per size, all steps in this one process and one
SparkSession (as a notebook or ``dfn-curate run`` runs them):

* DataComp-format metadata parquet (generated: 32-hex uids, url, text, original size, sha256,
  ``clip_l14_similarity_score`` rounded to 3 decimals so there are ties) through
  ingest -> select (keep_fraction 0.3 on ``clip_l14_similarity_score``, no model) -> export
  (``uids.npy`` only).
* Image pools from the sample generator (``etl.sample``) through the full pipeline with the
  bundled DFN: ingest -> score -> dedup -> select -> export.

First (``--small N``, default 3), the fixed cost a user pays per command: ``dfn-curate ingest``
of a 16-pair shard (19 rows, 3 broken), each run a new process (Python, JVM, Spark, Delta) on
a fresh lakehouse, 5 s apart so the previous JVM has exited.

Per stage: wall seconds, rows/s, shuffle bytes read + written (summed from Spark's monitoring
REST API over the stage's jobs), and driver peak RSS (JVM + Python, sampled every 0.1 s; in local
mode the JVM also runs the executors; ``--cluster`` runs them on a standalone cluster on this
machine, one worker with every core, so the figure is the driver's alone). For scoring, the wall time of the first and last silver
commit of the run. Prints a markdown table, writes ``--out`` (JSON) and a log-log plot (PNG).
Generation of the input pools is not timed.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from contextlib import ExitStack
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import numpy as np  # noqa: E402

from benchmarks.provenance import write_json  # noqa: E402

META_STEPS = ("ingest", "select", "export")
IMAGE_STEPS = ("ingest", "score", "dedup", "select", "export")
BENCH_SPARK = {"spark.ui.enabled": "true", "spark.ui.retainedStages": "100000",
               "spark.ui.retainedJobs": "100000", "spark.sql.ui.retainedExecutions": "100000"}


def write_metadata_pool(out: Path, n: int, seed: int = 0, per_file: int = 500_000,
                        first: int = 0) -> None:
    """``n`` DataComp-style metadata rows as parquet files of ``per_file`` rows (streamed);
    urls and texts number rows from ``first``."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    out.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    for part, start in enumerate(range(first, first + n, per_file)):
        m = min(per_file, first + n - start)
        hexes = rng.bytes(16 * m).hex()
        uids = [hexes[i:i + 32] for i in range(0, 32 * m, 32)]
        idx = range(start, start + m)
        table = pa.table({
            "uid": uids,
            "url": [f"https://img.example.com/{i}.jpg" for i in idx],
            "text": [f"a photo of item {i % 9973} in a {('red', 'blue', 'green')[i % 3]} box"
                     for i in idx],
            "original_width": rng.integers(64, 2048, m), "original_height": rng.integers(64, 2048, m),
            "sha256": [u * 2 for u in uids],
            "clip_b32_similarity_score": np.round(rng.normal(0.25, 0.05, m), 3),
            "clip_l14_similarity_score": np.round(rng.normal(0.22, 0.06, m), 3),
        })
        pq.write_table(table, out / f"{part:05d}.parquet")


class Meter:
    """Shuffle bytes (Spark REST API) and peak driver RSS around one stage."""

    def __init__(self, spark):
        sc = spark.sparkContext
        self.api = f"{sc.uiWebUrl}/api/v1/applications/{sc.applicationId}"
        self.pids = [os.getpid(), int(sc._jvm.java.lang.ProcessHandle.current().pid())]

    def shuffle_bytes(self) -> int:
        with urllib.request.urlopen(f"{self.api}/stages?status=complete", timeout=30) as r:
            stages = json.load(r)
        return sum(s.get("shuffleReadBytes", 0) + s.get("shuffleWriteBytes", 0) for s in stages)

    def rss(self) -> int:
        total = 0
        for pid in self.pids:
            with open(f"/proc/{pid}/status") as fh:
                total += next(int(x.split()[1]) for x in fh if x.startswith("VmRSS:")) * 1024
        return total

    def measure(self, fn):
        """Run ``fn()``; returns (its result, seconds, shuffle bytes, peak RSS bytes)."""
        peak, done = [self.rss()], threading.Event()

        def sample() -> None:
            while not done.wait(0.1):
                peak[0] = max(peak[0], self.rss())

        before = self.shuffle_bytes()
        thread = threading.Thread(target=sample, daemon=True)
        thread.start()
        t0 = time.perf_counter()
        try:
            result = fn()
        finally:
            seconds = time.perf_counter() - t0
            done.set()
            thread.join()
        time.sleep(0.5)  # the REST API lags the last stage's completion slightly
        return result, seconds, self.shuffle_bytes() - before, peak[0]


def run_steps(meter: Meter, args: list[str], steps: tuple[str, ...], rows: int, pool: str,
              results: list[dict], lease_row: bool = False) -> None:
    """Run each step as ``dfn-curate run`` would, in this process, under one lakehouse lease
    (taken before the first step, released after the last, as ``run`` does); record each
    step's costs, and with ``lease_row`` the lease's own seconds as a step ``lease``."""
    from etl.jobs.common import parser, start
    from etl.lease import hold
    from etl.steps import pipeline_step
    from etl.tables import BRONZE

    ctx = start(parser("bench-scale", "scale benchmark"), args)
    with ExitStack() as stack:
        begun = time.perf_counter()
        stack.enter_context(hold(ctx.lake, ctx.run_id, "run"))
        lease_s = time.perf_counter() - begun
        for step in steps:
            if step == "score":  # about 4 silver commits at any size: a chunk is whole files
                files = len(ctx.lake.read(BRONZE).inputFiles())
                ctx.cfg.score.files_per_commit = max(1, files // 4)
            _, seconds, shuffle, rss = meter.measure(lambda s=step: pipeline_step(ctx, s))
            results.append({"pool": pool, "rows": rows, "step": step,
                            "seconds": round(seconds, 2), "rows_per_s": round(rows / seconds),
                            "shuffle_mb": round(shuffle / 2**20, 1),
                            "driver_rss_mb": round(rss / 2**20)})
            print(json.dumps(results[-1]), flush=True)
        begun = time.perf_counter()
    lease_s += time.perf_counter() - begun
    if lease_row:
        results.append({"pool": pool, "rows": rows, "step": "lease", "seconds": round(lease_s, 2),
                        "rows_per_s": 0, "shuffle_mb": 0.0, "driver_rss_mb": 0})


def silver_commit_times(lake_root: str) -> dict[str, float] | None:
    """Wall seconds and seconds per 1,000 rows of the second and the last scoring commit.

    A commit's time is the gap since the commit before it (so the first commit, which also
    pays the start, has none); chunks are whole bronze files, which differ in size, hence the
    per-row figure. None with fewer than three commits.
    """
    from pyspark.sql import SparkSession
    from pyspark.sql import functions as F

    from etl.config import LakehouseConf
    from etl.tables import NO_DATA_CHANGE, SILVER, Lakehouse

    lake = Lakehouse(SparkSession.getActiveSession(), LakehouseConf(root=lake_root))
    history = (lake.delta(SILVER).history().where(~F.col("operation").isin(*NO_DATA_CHANGE))
               .select("version", "timestamp", "operationMetrics").orderBy("version"))
    commits = [(r["timestamp"].timestamp(), int(r["operationMetrics"].get("numOutputRows", 0)))
               for r in history.collect()]  # one row per commit
    if len(commits) < 3:
        return None
    gaps = [(b[0] - a[0], b[1]) for a, b in zip(commits, commits[1:], strict=False)]
    (s1, n1), (s2, n2) = gaps[0], gaps[-1]
    return {"first_commit_s": round(s1, 2), "last_commit_s": round(s2, 2),
            "first_s_per_1k": round(1000 * s1 / max(n1, 1), 3),
            "last_s_per_1k": round(1000 * s2 / max(n2, 1), 3), "commits": len(commits)}


def metadata_pools(meter: Meter, sizes: list[int], tmp: Path, results: list[dict]) -> None:
    for n in sizes:
        pool = tmp / f"meta-{n}"
        write_metadata_pool(pool / "raw", n)
        args = ["--conf", "conf/local.yaml", "--set", f"lakehouse.root={pool}/lake",
                "--set", f"ingest.sources=[{{format: datacomp, path: '{pool}/raw', name: meta}}]",
                "--set", "ingest.eval_sources=[]", "--set", "select.preset=none",
                "--set", "select.score_column=clip_l14_similarity_score",
                "--set", "select.keep_fraction=0.3", "--set", "select.fraction_of=pool",
                "--set", "export.webdataset=false", "--set", "export.urls_parquet=false",
                "--run-id", f"meta{n}"]
        run_steps(meter, args, META_STEPS, n, "metadata", results)


def small_ingest(runs: int, tmp: Path, results: list[dict]) -> None:
    """``dfn-curate ingest`` of a 16-pair shard, ``runs`` times, each a new process."""
    from etl.sample import write_sample

    raw = tmp / "small" / "raw"
    write_sample(str(raw), n_pairs=16, eval_size=0, seed=0, shard_size=16)
    env = {k: v for k, v in os.environ.items() if k != "PYSPARK_GATEWAY_PORT"}
    for i in range(runs):
        time.sleep(5)
        cmd = [sys.executable, "-m", "etl.jobs.ingest", "--conf", "conf/local.yaml",
               "--set", f"lakehouse.root={tmp}/small/lake{i}",
               "--set", f"ingest.sources=[{{format: img2dataset, path: '{raw}/pool'}}]",
               "--set", "ingest.eval_sources=[]"]
        # timed to the command's exit, as a shell prompt returns: the driver JVM it leaves
        # still shuts down for ~0.7 s (holding the output pipe), inside the 5 s pause
        with open(tmp / "small" / f"run{i}.log", "wb") as log:
            start = time.perf_counter()
            code = subprocess.call(cmd, stdout=log, stderr=subprocess.STDOUT, env=env,
                                   cwd=Path(__file__).resolve().parent.parent)
            seconds = time.perf_counter() - start
        if code:
            raise RuntimeError(f"{' '.join(cmd)} failed ({code}); see {log.name}")
        results.append({"pool": "small", "rows": 16, "step": "ingest (new process)",
                        "run": i + 1, "wall_s": round(seconds, 2)})
        print(json.dumps(results[-1]), flush=True)


def image_pools(meter: Meter, sizes: list[int], tmp: Path, results: list[dict]) -> None:
    from etl.sample import write_sample

    for n in sizes:
        pool = tmp / f"images-{n}"
        write_sample(str(pool / "raw"), n_pairs=n, eval_size=120, seed=0, shard_size=500)
        args = ["--conf", "conf/local.yaml", "--set", f"lakehouse.root={pool}/lake",
                "--set", f"sample.n_pairs={n}",
                "--set", f"ingest.sources=[{{format: img2dataset, path: '{pool}/raw/pool', "
                         "name: sample}]",
                "--set", f"ingest.eval_sources=[{{format: folder, path: '{pool}/raw/eval', "
                         "name: sample}]",
                "--run-id", f"img{n}"]
        run_steps(meter, args, IMAGE_STEPS, n, "images", results)
        commits = silver_commit_times(f"{pool}/lake")
        if commits:
            results.append({"pool": "images", "rows": n, "step": "score-commits", **commits})
            print(json.dumps(results[-1]), flush=True)


def table(results: list[dict]) -> str:
    lines = ["| pool | rows | step | seconds | rows/s | shuffle MB | driver RSS MB |",
             "|---|---|---|---|---|---|---|"]
    for r in results:
        if "seconds" in r:
            lines.append(f"| {r['pool']} | {r['rows']:,} | {r['step']} | {r['seconds']} | "
                         f"{r['rows_per_s']:,} | {r['shuffle_mb']} | {r['driver_rss_mb']} |")
    small = [r["wall_s"] for r in results if r["pool"] == "small"]
    if small:
        lines.append(f"\n`dfn-curate ingest` of a 16-pair shard, each run a new process: "
                     f"{' / '.join(f'{x} s' for x in small)}")
    commits = [r for r in results if r["step"] == "score-commits"]
    for r in commits:
        lines.append(f"\nscoring, {r['rows']:,} pairs, {r['commits']} silver commits: second "
                     f"{r['first_commit_s']} s ({r['first_s_per_1k']} s per 1k rows), last "
                     f"{r['last_commit_s']} s ({r['last_s_per_1k']} s per 1k rows)")
    return "\n".join(lines)


def growth(results: list[dict]) -> str:
    """Per pool kind and step: time and RSS ratio between the two largest sizes."""
    out = []
    for pool in ("metadata", "images"):
        rows = [r for r in results if r["pool"] == pool and "seconds" in r]
        sizes = sorted({r["rows"] for r in rows})
        if len(sizes) < 2:
            continue
        a, b = sizes[-2], sizes[-1]
        for step in dict.fromkeys(r["step"] for r in rows):
            ra = next(r for r in rows if r["rows"] == a and r["step"] == step)
            rb = next(r for r in rows if r["rows"] == b and r["step"] == step)
            out.append(f"{pool} {step}: {a:,} -> {b:,} rows ({b / a:.1f}x): time "
                       f"{rb['seconds'] / ra['seconds']:.2f}x, driver RSS "
                       f"{rb['driver_rss_mb'] / ra['driver_rss_mb']:.2f}x")
    return "\n".join(out)


def plot(results: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    for ax, pool in zip(axes, ("metadata", "images"), strict=True):
        rows = [r for r in results if r["pool"] == pool and "seconds" in r]
        for step in dict.fromkeys(r["step"] for r in rows):
            pts = sorted((r["rows"], r["seconds"]) for r in rows if r["step"] == step)
            ax.loglog(*zip(*pts, strict=True), marker="o", label=step)
        ax.set_title(f"{pool} pool")
        ax.set_xlabel("rows")
        ax.set_ylabel("wall seconds")
        ax.grid(True, which="both", alpha=0.3)
        if rows:
            ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--meta", default="100000,1000000,4000000", help="metadata pool sizes")
    ap.add_argument("--images", default="2000,8000,32000", help="image pool sizes")
    ap.add_argument("--small", type=int, default=3,
                    help="runs of the 16-pair ingest, each a new process (0: none)")
    ap.add_argument("--out", default=None, help="result JSON (default: benchmarks/results/"
                    "scale.json, or scale-cluster.json with --cluster)")
    ap.add_argument("--tmp", default=None, help="work folder (default: a new temp folder)")
    ap.add_argument("--cluster", action="store_true",
                    help="executors on a local standalone cluster (driver RSS = the driver's)")
    args = ap.parse_args(argv)
    sizes = {k: [int(x) for x in getattr(args, k).split(",") if x] for k in ("meta", "images")}
    tmp = Path(args.tmp or tempfile.mkdtemp(prefix="bench-scale-"))
    from etl.config import load_config
    from etl.spark import get_spark

    cfg = load_config("conf/local.yaml")
    cfg.spark.conf.update(BENCH_SPARK)
    results: list[dict] = []
    small_ingest(args.small, tmp, results)
    with ExitStack() as stack:
        if args.cluster:
            from etl.devcluster import standalone

            cores = os.cpu_count() or 1
            cluster = stack.enter_context(standalone(tmp / "cluster", 1, cores, "16g"))
            cfg.spark.master = cluster.url
            cfg.spark.conf.update({"spark.executor.memory": "12g", "spark.cores.max": str(cores)})
        # one session per kind, as the CLI has: no model -> Python workers without torch
        for pools, sizes_, models in ((metadata_pools, sizes["meta"], False),
                                      (image_pools, sizes["images"], True)):
            if sizes_:
                spark = get_spark(cfg.spark, preload_models=models)
                pools(Meter(spark), sizes_, tmp, results)
                spark.stop()
    default_out = "scale-cluster.json" if args.cluster else "scale.json"
    result = {"cores": os.cpu_count(), "master": cfg.spark.master, "results": results}
    out = write_json(args.out or f"benchmarks/results/{default_out}", result)
    plot(results, out.with_suffix(".png"))
    print(f"\n{os.cpu_count()} cores\n{table(results)}\n\n{growth(results)}\n\n"
          f"wrote {out} and {out.with_suffix('.png')}")


if __name__ == "__main__":
    main()
