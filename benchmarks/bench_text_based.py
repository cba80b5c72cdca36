"""Cost of DataComp's text-based predicate (``in_imagenet21k``, udfs/wordnet.py) per 1M captions.

    python benchmarks/bench_text_based.py                 # 1M captions
    python benchmarks/bench_text_based.py --rows 200000

Generated captions (seeded, not timed): 6-14 words each, drawn Zipf-like from 20,000 WordNet
lemmas and their "-s" forms, plus a long tail where one word in five is a random token never
seen before (a web pool's ids, numbers, misspellings), so each worker's per-word cache helps
only as much as it would on real captions. Timed: one Spark pass over a parquet file that
computes the predicate for every caption and counts the matches, twice (the first pays each
Python worker's WordNet load). Writes ``--out`` (JSON).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from benchmarks.provenance import write_json  # noqa: E402


def write_captions(path: Path, n: int, seed: int = 0) -> None:
    import numpy as np
    import pyarrow as pa
    import pyarrow.parquet as pq

    from udfs.wordnet import reader

    rng = np.random.default_rng(seed)
    lemmas = sorted(w for w in reader()._lemma_pos_offset_map if w.isalpha())
    vocab = np.array([w for w in rng.choice(lemmas, 10_000, replace=False) for w in (w, w + "s")])
    weights = 1.0 / np.arange(1, len(vocab) + 1)
    weights /= weights.sum()
    lengths = rng.integers(6, 15, n)
    words = vocab[rng.choice(len(vocab), int(lengths.sum()), p=weights)]
    tail = rng.random(len(words)) < 0.2
    words[tail] = [f"x{v:x}" for v in rng.integers(0, 2**40, int(tail.sum()))]
    bounds = np.concatenate([[0], np.cumsum(lengths)])
    texts = [" ".join(words[bounds[i]:bounds[i + 1]]) for i in range(n)]
    pq.write_table(pa.table({"uid": [f"{i:032x}" for i in range(n)], "text": texts}), path)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rows", type=int, default=1_000_000)
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "text_based.json"))
    args = p.parse_args(argv)
    from pyspark.sql import functions as F

    from etl.config import SparkConf
    from etl.select import in_imagenet21k
    from etl.spark import get_spark

    tmp = Path(tempfile.mkdtemp(prefix="bench-text-"))
    write_captions(tmp / "captions.parquet", args.rows)
    spark = get_spark(SparkConf(), preload_models=False)
    captions = spark.read.parquet(str(tmp / "captions.parquet"))
    runs = []
    for run in (1, 2):
        start = time.perf_counter()
        hits = captions.select(in_imagenet21k(F.col("text")).cast("int").alias("m")).agg(
            F.sum("m")).first()[0]
        seconds = time.perf_counter() - start
        runs.append({"run": run, "seconds": round(seconds, 2), "matches": int(hits),
                     "per_1m_captions_s": round(seconds * 1_000_000 / args.rows, 1)})
        print(json.dumps(runs[-1]), flush=True)
    path = write_json(args.out, {"rows": args.rows, "master": spark.conf.get("spark.master"),
                                 "runs": runs}, argv)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
