"""The sample pipeline on local paths vs on a local S3 server (moto on 127.0.0.1).

    python benchmarks/bench_s3.py --pairs 500

Runs ``dfn-curate run`` twice from fresh lakehouses with the same seeded sample pool: once
with everything on local disk, once with raw inputs, lakehouse, checkpoints and export on
``s3a://`` (the pool uploaded first). Prints per-step wall times (the ``[step] done in`` lines)
and the whole command's time, which includes JVM start and, on S3, resolving hadoop-aws from
the Ivy cache, and writes the table to ``--out`` with its provenance. Nothing leaves 127.0.0.1.
"""

from __future__ import annotations

import argparse
import re
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.provenance import write_markdown  # noqa: E402
from etl.sample import write_sample  # noqa: E402
from tests.helpers.s3 import cli, start_server, write_conf  # noqa: E402

STEPS = ("ingest", "score", "dedup", "select", "export")


def step_times(out: str) -> dict[str, float]:
    return {m[1]: float(m[2]) for m in re.finditer(r"\[(\w+)\] done in ([\d.]+)s", out)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--pairs", type=int, default=500)
    ap.add_argument("--out", default="benchmarks/results/s3.md", help="markdown result file")
    args = ap.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="bench-s3-"))
    raw = tmp / "raw"
    write_sample(str(raw), n_pairs=args.pairs, eval_size=120, seed=0, shard_size=500)
    common = ["--set", f"sample.n_pairs={args.pairs}"]
    sources = ["ingest.sources=[{format: img2dataset, path: '{root}/pool', name: sample}]",
               "ingest.eval_sources=[{format: folder, path: '{root}/eval', name: sample}]"]
    server = start_server()
    try:
        for b in ("raw", "lake"):
            server.client().create_bucket(Bucket=b)
        server.upload_dir(raw, "raw", "sample")
        conf = write_conf(tmp / "s3.yaml", server)
        runs = {"local": (["--conf", "conf/local.yaml", "--set", f"lakehouse.root={tmp}/lake"],
                          str(raw)),
                "s3a (moto)": (["--conf", str(conf), "--set", "lakehouse.root=s3a://lake/lh"],
                               "s3a://raw/sample")}
        rows = {}
        for name, (base, root) in runs.items():
            extra = [a for s in sources for a in ("--set", s.replace("{root}", root))]
            out, seconds = cli(["run", *base, *common, *extra], tmp / f"{name[:5]}.log",
                               timeout=3600)
            rows[name] = (step_times(out), seconds)
    finally:
        server.server.stop()
    print(table(rows))
    write_markdown(args.out, table(rows), f"The {args.pairs}-pair sample: local disk vs s3a://")


def table(rows: dict[str, tuple[dict[str, float], float]]) -> str:
    """Markdown: per step, wall seconds on each side and their ratio."""
    (a, (ta, wa)), (b, (tb, wb)) = rows.items()
    lines = [f"| step | {a} | {b} | ratio |", "|---|---|---|---|"]
    for step in STEPS:
        x, y = ta.get(step, 0.0), tb.get(step, 0.0)
        lines.append(f"| {step} | {x:.1f} | {y:.1f} | {y / x if x else 0:.1f}× |")
    lines.append(f"| whole `dfn-curate run` | {wa:.1f} | {wb:.1f} | {wb / wa if wa else 0:.1f}× |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
