"""Takedown cost on the 1M-row metadata pool, as a ratio to one full select + export of it.

    make bench-takedown                                  # 1M rows, 1,000 selectors
    python benchmarks/bench_takedown.py --rows 100000 --selectors 200

The DataComp-style metadata pool of ``bench_connect`` (``bench_scale.write_metadata_pool``,
cached under ``out/bench-takedown/``) is ingested into a fresh lakehouse with bench_connect's
metadata settings. Timed, each a ``dfn-curate`` command in a new process (bench_connect's
``timed``, so each pays its own JVM start): the baseline ``select`` and ``export``, then
``takedown add`` of a CSV request file, ``takedown apply`` and ``takedown purge``.

The selectors name distinct rows read from the pool's parquet files (a bounded head of each
file, never the whole pool), mixed over the kinds the pool supports, 5 per request, the
requests spread over every category (two of five hashed: ``$DFN_TAKEDOWN_KEY`` is set for the
run). The purge runs with ``takedown.retain_hours=0`` and Delta's retention check switched off
for that command only (production keeps the check on). Writes ``--out`` (JSON) and prints a
table.
"""

from __future__ import annotations

import argparse
import csv
import os
import re
import shutil
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from benchmarks.bench_connect import timed  # noqa: E402
from benchmarks.bench_scale import write_metadata_pool  # noqa: E402
from benchmarks.provenance import memory_gb, write_json  # noqa: E402

WORK = ROOT / "out" / "bench-takedown"  # git-ignored: the cached pool, the lakehouse, logs
CATEGORIES = ("legal", "gdpr_erasure", "opt_out", "abuse_hashlist", "internal")
# Share of each kind among the selectors. Every pool URL is https://img.example.com/<i>.jpg, so
# a host or domain selector would name the whole pool; ingest keeps md5 null for rows without
# image bytes. Those kinds' shares go to uid (see NOTES).
MIX = {"uid": 0.6, "url": 0.2, "prefix": 0.1, "sha256": 0.1}
NOTES = [
    "host/domain selectors left out: every pool URL has the one host img.example.com, so any "
    "host or domain selector naming a pool row would remove the whole pool; their share "
    "(15%) went to uid",
    "md5 selectors left out: metadata rows carry no image bytes and no md5 column, so bronze's "
    "md5 is null; its share (5%) went to uid",
    "prefix selectors are whole pool URLs (a prefix matches at '/' boundaries and pool paths "
    "are flat), one row each",
    "purge ran with takedown.retain_hours=0 and "
    "spark.databricks.delta.retentionDurationCheck.enabled=false for the benchmark only; "
    "production keeps the check on (168 h minimum)",
    "each phase is one dfn-curate command in a new process (JVM start included), as "
    "bench_connect times the metadata path",
]


def pool(rows: int) -> Path:
    """The cached metadata pool of ``rows`` rows (written once, seeded)."""
    path = WORK / f"pool-{rows}"
    if not (path / "_DONE").exists():
        shutil.rmtree(path, ignore_errors=True)
        write_metadata_pool(path, rows)
        (path / "_DONE").touch()
    return path


def request_file(raw: Path, out: Path, n: int, seed: int = 0) -> dict[str, int]:
    """Write ``n`` selectors naming distinct pool rows to ``out`` (CSV); returns per-kind counts."""
    import numpy as np
    import pyarrow as pa
    import pyarrow.parquet as pq

    files = sorted(raw.glob("*.parquet"))
    per_file = -(-n // len(files)) * 4  # a bounded head of each file, 4x what is drawn
    heads = [next(pq.ParquetFile(f).iter_batches(per_file, columns=["uid", "url", "sha256"]))
             for f in files]
    rows = pa.Table.from_batches(heads).to_pylist()
    rng = np.random.default_rng(seed)
    picked = [rows[i] for i in rng.choice(len(rows), n, replace=False)]
    counts = {k: int(n * share) for k, share in MIX.items()}
    counts["uid"] += n - sum(counts.values())
    kinds = rng.permutation([k for k, c in counts.items() for _ in range(c)])
    with open(out, "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["request_id", "category", "kind", "value"])
        for i, (kind, row) in enumerate(zip(kinds, picked, strict=True)):
            value = row["url"] if kind in ("url", "prefix") else row[kind]
            w.writerow([f"bench-{i // 5:04d}", CATEGORIES[i // 5 % len(CATEGORIES)], kind, value])
    return counts


def counts_of(log: Path, action: str) -> dict[str, int]:
    """The ``takedown <action>: name value`` counts a command printed."""
    pat = re.compile(rf"^takedown {action}: (\S+)\s+(-?\d+)$")
    return {m[1]: int(m[2]) for line in log.read_text().splitlines() if (m := pat.match(line))}


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rows", type=int, default=1_000_000, help="metadata pool rows")
    p.add_argument("--selectors", type=int, default=1000, help="selectors in the request file")
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "takedown.json"))
    args = p.parse_args(argv)
    os.environ.setdefault("DFN_TAKEDOWN_KEY", "bench-takedown-key-0123456789")
    raw = pool(args.rows)
    run = WORK / "run"
    shutil.rmtree(run, ignore_errors=True)
    run.mkdir(parents=True)
    lake = run / "lake"
    common = [
        "--conf", "conf/local.yaml", "--set", f"lakehouse.root={lake}",
        "--set", f"ingest.sources=[{{format: datacomp, path: '{raw}', name: meta}}]",
        "--set", "ingest.eval_sources=[]", "--set", "select.preset=none",
        "--set", "select.score_column=clip_l14_similarity_score",
        "--set", "select.keep_fraction=0.3", "--set", "select.fraction_of=pool",
        "--set", "export.webdataset=false", "--set", "export.urls_parquet=false"]
    purge_set = [
        "--set", "takedown.retain_hours=0", "--set",
        "spark.conf={spark.sql.shuffle.partitions: '8', "
        "spark.databricks.delta.retentionDurationCheck.enabled: 'false'}"]
    requests = run / "requests.csv"
    kinds = request_file(raw, requests, args.selectors)
    phases = {
        "ingest": ["ingest", *common],
        "select": ["select", *common],
        "export": ["export", *common],
        "add": ["takedown", "add", "--file", str(requests), *common],
        "apply": ["takedown", "apply", *common],
        "purge": ["takedown", "purge", *common, *purge_set],
    }
    seconds: dict[str, float] = {}
    for name, cmd in phases.items():
        time.sleep(3)  # the previous command's JVM has exited
        seconds[name] = round(timed(cmd, run / f"{name}.log", None), 2)
        print(f"{name}: {seconds[name]} s", flush=True)
    applied = counts_of(run / "apply.log", "apply")
    base = seconds["select"] + seconds["export"]
    result = {
        "machine": {"cores": os.cpu_count(), "memory_gb": memory_gb()},
        "pool_rows": args.rows, "selectors": args.selectors, "selectors_per_kind": kinds,
        "requests": -(-args.selectors // 5), "categories": list(CATEGORIES),
        "hashed_categories": ["gdpr_erasure", "abuse_hashlist"],
        "added": counts_of(run / "add.log", "add"), "apply_counts": applied,
        "rows_removed": applied.get("rows_removed"),
        "rows_removed_bronze": applied.get("removed.bronze_pairs"),
        "purge_counts": counts_of(run / "purge.log", "purge"),
        "seconds": {k: v for k, v in seconds.items() if k in ("ingest", "add", "apply", "purge")},
        "baseline_seconds": {"select": seconds["select"], "export": seconds["export"],
                             "sum": round(base, 2)},
        "ratio_apply_purge": round((seconds["apply"] + seconds["purge"]) / base, 3),
        "ratio_add_apply_purge": round(
            (seconds["add"] + seconds["apply"] + seconds["purge"]) / base, 3),
        "notes": NOTES,
    }
    print("\n| phase | seconds |\n|---|---:|")
    for name, s in seconds.items():
        print(f"| {name} | {s} |")
    print(f"| select + export (baseline) | {base:.2f} |")
    print(f"\nrows removed: {result['rows_removed']} (bronze {result['rows_removed_bronze']}); "
          f"(apply+purge)/(select+export) = {result['ratio_apply_purge']}; "
          f"(add+apply+purge)/(select+export) = {result['ratio_add_apply_purge']}")
    path = write_json(args.out, result, argv)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
