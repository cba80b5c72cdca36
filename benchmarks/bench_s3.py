"""The sample pipeline on local paths vs on a local S3 server (moto on 127.0.0.1).

    python benchmarks/bench_s3.py --pairs 500

Runs ``dfn-curate run`` twice from fresh lakehouses with the same seeded sample pool: once
with everything on local disk, once with raw inputs, lakehouse, checkpoints and export on
``s3a://`` (the pool uploaded first). Prints per-step wall times (the ``[step] done in`` lines)
and the whole command's time, which includes JVM start and, on S3, resolving hadoop-aws from
the Ivy cache. Nothing leaves 127.0.0.1.
"""

from __future__ import annotations

import argparse
import re
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from etl.sample import write_sample  # noqa: E402
from tests.s3util import cli, start_server, write_conf  # noqa: E402

STEPS = ("ingest", "score", "dedup", "select", "export")


def step_times(out: str) -> dict[str, float]:
    return {m[1]: float(m[2]) for m in re.finditer(r"\[(\w+)\] done in ([\d.]+)s", out)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--pairs", type=int, default=500)
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
    print(f"\n{args.pairs} pairs | " + " | ".join(STEPS) + " | whole command (s)")
    for name, (times, total) in rows.items():
        print(f"{name} | " + " | ".join(f"{times.get(s, 0):.1f}" for s in STEPS)
              + f" | {total:.1f}")


if __name__ == "__main__":
    main()
