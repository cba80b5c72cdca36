"""Job: write the seeded sample pool (``dfn-curate sample``)."""

from __future__ import annotations

from etl.config import load_config
from etl.fs import Store, locate
from etl.jobs.common import parser, run_job


def main(argv: list[str] | None = None) -> dict[str, int]:
    """Write the sample pool (img2dataset shards + eval image folder); no Spark needed."""
    from etl.sample import write_sample

    p = parser("dfn-curate sample", main.__doc__)
    p.add_argument("--out", default=None,
                   help="output folder or URL (default: <lakehouse.root>/<sample.out_dir>)")
    args = p.parse_args(argv)
    cfg = load_config(args.conf, args.overrides)
    out = args.out or locate(cfg.lakehouse.root, cfg.sample.out_dir)
    s = cfg.sample
    counts = write_sample(out, s.n_pairs, s.eval_size, s.seed, s.shard_size,
                          Store.from_conf(cfg.spark.conf))
    print(f"sample written to {out}: {counts}")
    return counts


if __name__ == "__main__":
    run_job(main)
