"""A metadata pool delivered in three batches, in every order, against the pool curated at once.

    python benchmarks/bench_batches.py                    # 1M rows: batches of 50%, 30%, 20%
    python benchmarks/bench_batches.py --rows 30000       # a quick check

The pool is DataComp-style metadata (:func:`benchmarks.bench_scale.write_metadata_pool`, scores
rounded to 3 decimals, so the cut falls among ties) written as three batches of files; batch C
also re-delivers ``--redelivered`` rows of batch A unchanged, as a retried download would. One
lakehouse curates all three batches in one run. Then, for each of the six orders, a fresh
lakehouse receives the batches one at a time: the batch's files land in the source folder and
ingest → select → export runs (the bench's metadata settings: keep 30% of the pool on
``clip_l14_similarity_score``, ``select.mode: recompute``).

Each order must end as the one-run lakehouse does: the same bronze row count, the same
``gold_selection`` (uid, kept, drop_reason) rows, compared on the executors both ways with
``exceptAll``, the same resolved threshold, and the same published ``uids.npy`` bytes. Prints a
line per order (with the three runs' step seconds, and wall seconds that add copying the files
and the shuffle meter), writes ``--out`` (JSON), and exits 1 if any order differs. Timings
are not the point: they vary from run to run.
"""

from __future__ import annotations

import argparse
import itertools
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.bench_incremental import meta_args, same_uids  # noqa: E402
from benchmarks.bench_scale import (  # noqa: E402
    BENCH_SPARK,
    META_STEPS,
    Meter,
    run_steps,
    write_metadata_pool,
)
from benchmarks.provenance import write_json  # noqa: E402

SHARES = {"A": 0.5, "B": 0.3, "C": 0.2}


def write_batches(root: Path, rows: int, redelivered: int, per_file: int) -> dict[str, Path]:
    """Batches A, B, C as folders of parquet files (uids and urls unlike each other's); C also
    holds the first ``redelivered`` rows of A's first file, unchanged."""
    import pyarrow.parquet as pq

    batches, first = {}, 0
    for seed, (name, share) in enumerate(SHARES.items(), start=1):
        n = round(rows * share)
        batches[name] = root / name
        write_metadata_pool(batches[name], n, seed=seed, per_file=per_file, first=first)
        first += n
    again = pq.read_table(sorted(batches["A"].iterdir())[0]).slice(0, redelivered)
    pq.write_table(again, batches["C"] / "redelivered.parquet")
    return batches


def deliver(batch: Path, raw: Path) -> None:
    """Copy a batch's files into the source folder under names no other batch uses."""
    raw.mkdir(parents=True, exist_ok=True)
    for f in sorted(batch.iterdir()):
        shutil.copy(f, raw / f"{batch.name}-{f.name}")


def curate(meter: Meter, lake: Path, raw: Path, run_id: str, rows: int) -> float:
    """Ingest → select → export on ``lake`` as ``dfn-curate run`` runs them; wall seconds."""
    steps: list[dict] = []
    run_steps(meter, meta_args(lake, raw, run_id), META_STEPS, rows, "metadata", steps)
    return sum(s["seconds"] for s in steps)


def outcome(spark, lake: Path) -> dict:
    """What a lakehouse ended with: its selection (a DataFrame), bronze's row count and the
    resolved threshold (and the lakehouse, whose published uids.npy is compared)."""
    from etl.config import LakehouseConf
    from etl.provenance import applied_threshold
    from etl.tables import BRONZE, SELECTION, Lakehouse

    lh = Lakehouse(spark, LakehouseConf(root=str(lake)))
    return {"selection": lh.read(SELECTION).select("uid", "kept", "drop_reason"),
            "bronze": lh.read(BRONZE).count(), "threshold": applied_threshold(lh), "lake": lake}


def differences(a: dict, b: dict) -> list[str]:
    """What differs between two outcomes (empty: none)."""
    out = [k for k in ("bronze", "threshold") if a[k] != b[k]]
    if not same_uids(a["lake"], b["lake"]):
        out.append("uids")
    extra = a["selection"].exceptAll(b["selection"]).count()
    missing = b["selection"].exceptAll(a["selection"]).count()
    if extra or missing:
        out.append(f"gold_selection ({extra} rows only in the batched run, {missing} only "
                   "in the one run)")
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rows", type=int, default=1_000_000, help="pool rows (before redelivery)")
    ap.add_argument("--redelivered", type=int, default=1_000,
                    help="rows of batch A that batch C delivers again, unchanged")
    ap.add_argument("--out", default="benchmarks/results/batches.json")
    ap.add_argument("--tmp", default=None, help="work folder (default: a new temp folder)")
    args = ap.parse_args(argv)
    tmp = Path(args.tmp or tempfile.mkdtemp(prefix="bench-batches-"))
    from etl.config import load_config
    from etl.spark import get_spark

    cfg = load_config("conf/local.yaml")
    cfg.spark.conf.update(BENCH_SPARK)
    spark = get_spark(cfg.spark, preload_models=False)
    meter = Meter(spark)
    batches = write_batches(tmp / "batches", args.rows, args.redelivered,
                            per_file=max(1, args.rows // 20))
    for batch in batches.values():
        deliver(batch, tmp / "once" / "raw")
    seconds = curate(meter, tmp / "once" / "lake", tmp / "once" / "raw", "once", args.rows)
    once = outcome(spark, tmp / "once" / "lake")
    print(f"one run: {once['bronze']:,} bronze rows, threshold {once['threshold']}, "
          f"{seconds:.1f} s", flush=True)
    results = []
    for order in itertools.permutations(SHARES):
        work = tmp / "".join(order)
        begun, steps = time.perf_counter(), 0.0
        for i, name in enumerate(order, start=1):
            deliver(batches[name], work / "raw")
            steps += curate(meter, work / "lake", work / "raw", f"batch{i}-{name}", args.rows)
        found = differences(outcome(spark, work / "lake"), once)
        results.append({"order": "".join(order), "same": not found, "differences": found,
                        "seconds": round(time.perf_counter() - begun, 1),
                        "step_seconds": round(steps, 1)})
        print(f"order {''.join(order)}: {'same as one run' if not found else found} "
              f"(3 runs: steps {steps:.1f} s, {results[-1]['seconds']} s wall)", flush=True)
        shutil.rmtree(work)
    write_json(args.out, {"cores": os.cpu_count(), "rows": args.rows,
                          "redelivered": args.redelivered, "bronze_rows": once["bronze"],
                          "threshold": once["threshold"], "one_run_s": round(seconds, 1),
                          "orders": results})
    spark.stop()
    print(f"wrote {args.out}")
    return 0 if all(r["same"] for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
