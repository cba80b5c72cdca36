"""Incremental benchmark: adding 1% and 10% to a pool, against a full run of the grown pool.

    python benchmarks/bench_incremental.py                      # 1M metadata rows, 8,000 images
    python benchmarks/bench_incremental.py --meta 100000 --images 2000
    python benchmarks/bench_incremental.py --meta 1000000 4000000 --images 0   # two pool sizes

``make bench-scale`` runs it after the scale benchmark (``make bench-incremental`` alone). Per
pool kind (the two kinds of :mod:`benchmarks.bench_scale`, same steps and settings):

1. a lakehouse curates the base pool (a full run, not compared);
2. new files holding 1% more rows land in the source folder; the same lakehouse runs the
   steps again (the incremental run); a fresh lakehouse runs the grown pool from scratch;
3. the same with 10% more on top.

Prints, per step, the wall seconds of the incremental run, of the full run, their ratio, and
the incremental run's work counters (:mod:`etl.work`: new rows, rows touched, pool), and writes
``--out`` (JSON). Work counters, not timings, are what the tests assert; this shows what they
buy. Generation of the input files is not timed.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.bench_scale import (  # noqa: E402
    BENCH_SPARK,
    IMAGE_STEPS,
    META_STEPS,
    Meter,
    run_steps,
    write_metadata_pool,
)
from benchmarks.provenance import write_json  # noqa: E402

INCREMENTS = (0.01, 0.10)


def meta_args(lake: Path, raw: Path, run_id: str) -> list[str]:
    """The metadata pool's settings (as bench_scale's), on ``lake``."""
    return ["--conf", "conf/local.yaml", "--set", f"lakehouse.root={lake}",
            "--set", f"ingest.sources=[{{format: datacomp, path: '{raw}', name: meta}}]",
            "--set", "ingest.eval_sources=[]", "--set", "select.preset=none",
            "--set", "select.score_column=clip_l14_similarity_score",
            "--set", "select.keep_fraction=0.3", "--set", "select.fraction_of=pool",
            "--set", "export.webdataset=false", "--set", "export.urls_parquet=false",
            "--run-id", run_id]


def image_args(lake: Path, raw: Path, run_id: str) -> list[str]:
    """The image pool's settings (as bench_scale's), on ``lake``."""
    return ["--conf", "conf/local.yaml", "--set", f"lakehouse.root={lake}",
            "--set", f"ingest.sources=[{{format: img2dataset, path: '{raw}/pool', name: sample}}]",
            "--set", f"ingest.eval_sources=[{{format: folder, path: '{raw}/eval', name: sample}}]",
            "--run-id", run_id]


def add_metadata(raw: Path, n: int, tag: str, seed: int, first: int) -> None:
    """``n`` new metadata rows as new files in ``raw`` (uids and urls unlike any before)."""
    part = raw.parent / f"part-{tag}"
    write_metadata_pool(part, n, seed=seed, first=first)
    for f in sorted(part.iterdir()):
        shutil.move(str(f), raw / f"{tag}-{f.name}")


def add_images(raw: Path, n: int, tag: str, seed: int) -> None:
    """``n`` new image pairs as new shards in ``raw/pool`` (another seed: other uids)."""
    from etl.sample import write_sample

    part = raw.parent / f"part-{tag}"
    write_sample(str(part), n_pairs=n, eval_size=12, seed=seed, shard_size=500)
    for f in sorted((part / "pool").iterdir()):
        shutil.move(str(f), raw / "pool" / f"{tag}-{f.name}")


def work_of(lake: Path, run_id: str) -> dict[str, dict[str, int]]:
    """The work counters each step of ``run_id`` recorded, by step."""
    from pyspark.sql import SparkSession
    from pyspark.sql import functions as F

    from etl.config import LakehouseConf
    from etl.tables import RUN_STATS, Lakehouse
    from etl.work import METRICS

    stats = Lakehouse(SparkSession.getActiveSession(), LakehouseConf(root=str(lake))).read(
        RUN_STATS).where((F.col("run_id") == run_id) & F.col("metric").isin(*METRICS))
    out: dict[str, dict[str, int]] = {}
    for r in stats.collect():  # a handful of rows per step
        out.setdefault(r["step"], {})[r["metric"].split(":")[1]] = int(r["value"])
    return out


def same_uids(a: Path, b: Path) -> bool:
    """Whether the exports of lakehouses ``a`` and ``b`` publish the same ``uids.npy`` bytes
    (for the image pool a fresh run fits its own dedup centroids, so they may differ)."""
    from etl.export import read_export

    files = [read_export(f"{lake}/export")["uids_npy"]["path"] for lake in (a, b)]
    return Path(files[0]).read_bytes() == Path(files[1]).read_bytes()


def case(meter: Meter, kind: str, base: int, tmp: Path, results: list[dict]) -> None:
    """Base run, then each increment: incremental on the same lakehouse vs a full run."""
    raw, lake = tmp / kind / "raw", tmp / kind / "lake"
    steps, argv = (META_STEPS, meta_args) if kind == "metadata" else (IMAGE_STEPS, image_args)
    if kind == "metadata":
        write_metadata_pool(raw, base, per_file=250_000)
    else:
        from etl.sample import write_sample

        write_sample(str(raw), n_pairs=base, eval_size=120, seed=0, shard_size=500)
    run_steps(meter, argv(lake, raw, f"{kind}-base"), steps, base, f"{kind} base", [])
    rows = base
    for i, share in enumerate(INCREMENTS, start=1):
        n = round(base * share)
        if kind == "metadata":
            add_metadata(raw, n, f"inc{i}", seed=i, first=rows)
        else:
            add_images(raw, n, f"inc{i}", seed=100 + i)
        rows += n
        inc, full = [], []
        run_steps(meter, argv(lake, raw, f"{kind}-inc{i}"), steps, rows, kind, inc, True)
        fresh = tmp / kind / f"full{i}"
        run_steps(meter, argv(fresh, raw, f"{kind}-full{i}"), steps, rows, kind, full, True)
        work = work_of(lake, f"{kind}-inc{i}")
        same = same_uids(lake, fresh)
        for a, b in zip(inc, full, strict=True):
            did = max((w for s, w in work.items() if s.split(":")[0] == a["step"]),
                      key=lambda w: w.get("pool", 0), default={})  # the pool's, not eval's
            results.append({"pool": kind, "base": base, "added": n, "step": a["step"],
                            "incremental_s": a["seconds"], "full_s": b["seconds"],
                            "ratio": round(a["seconds"] / b["seconds"], 3), "work": did,
                            "shuffle_mb": [a["shuffle_mb"], b["shuffle_mb"]]})
        total_inc, total_full = sum(a["seconds"] for a in inc), sum(b["seconds"] for b in full)
        results.append({"pool": kind, "base": base, "added": n, "step": "all",
                        "incremental_s": round(total_inc, 2), "full_s": round(total_full, 2),
                        "ratio": round(total_inc / total_full, 3), "work": {},
                        "same_uids": same})
        shutil.rmtree(fresh)


def table(results: list[dict]) -> str:
    lines = ["| pool | added | step | incremental s | full s | ratio | new / touched / pool |",
             "|---|---|---|---|---|---|---|"]
    for r in results:
        w = r["work"]
        did = f"{w['new']:,} / {w['touched']:,} / {w['pool']:,}" if len(w) == 3 else ""
        if "same_uids" in r:
            did = f"exported uids equal to the full run's: {r['same_uids']}"
        lines.append(f"| {r['pool']} {r['base']:,} | {r['added']:,} | {r['step']} | "
                     f"{r['incremental_s']} | {r['full_s']} | {r['ratio']} | {did} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--meta", type=int, nargs="+", default=[1_000_000],
                    help="metadata base pool sizes (0: none)")
    ap.add_argument("--images", type=int, nargs="+", default=[8_000],
                    help="image base pool sizes (0: none)")
    ap.add_argument("--out", default="benchmarks/results/incremental.json")
    ap.add_argument("--tmp", default=None, help="work folder (default: a new temp folder)")
    ap.add_argument("--driver-memory", default=None,
                    help="spark.driver.memory (local mode: all of Spark's heap), e.g. 12g for 16M")
    args = ap.parse_args(argv)
    tmp = Path(args.tmp or tempfile.mkdtemp(prefix="bench-incremental-"))
    from etl.config import load_config
    from etl.spark import get_spark

    cfg = load_config("conf/local.yaml")
    cfg.spark.conf.update(BENCH_SPARK)
    if args.driver_memory:
        cfg.spark.conf["spark.driver.memory"] = args.driver_memory
    results: list[dict] = []
    for kind, sizes, models in (("metadata", args.meta, False), ("images", args.images, True)):
        for base in (b for b in sizes if b):
            spark = get_spark(cfg.spark, preload_models=models)
            case(Meter(spark), kind, base, tmp / str(base), results)
            spark.stop()
    out = write_json(args.out, {"cores": os.cpu_count(), "results": results})
    print(f"\n{os.cpu_count()} cores\n{table(results)}\n\nwrote {out}")


if __name__ == "__main__":
    main()
