"""DataComp's baselines side by side with the DFN filter, on the bundled sample
(docs/stages/select.md): every preset's selection, the cost of the signals it needs, and the induced-dataset
comparison (same training budget and seed for every selection) in one table.

Steps (each timed, on the lakehouse of ``--conf``; ``make demo`` first, or this runs it):

1. a CLIP stand-in: the sample has no OpenAI CLIP scores (DataComp's metadata has
   ``clip_l14_similarity_score``), so the same tiny architecture is trained on the *whole,
   unfiltered* pool (as CLIP was trained on unfiltered web pairs) -> ``clip-pool``;
2. ``clip-pool`` scores the pool (silver_scores, next to the bundled DFN's scores);
3. ``dfn-curate targets``: the pool's image clusters vs the held-out eval images (the target);
4. each preset's selection, timed alone (one Spark pass over the signals it reads);
5. ``dfn-curate evaluate --only induced`` over every preset.

    python benchmarks/bench_baselines.py                 # after `make demo`
    python benchmarks/bench_baselines.py --steps 100     # a quicker, noisier comparison
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.provenance import write_markdown  # noqa: E402
from etl.config import PROJECT_ROOT, load_config  # noqa: E402

CLIP_OUT = "lakehouse/models/clip-pool.safetensors"
PRESETS = ["none", "no_filter", "random(0.3)", "basic", "laion2b", "clip_fraction(0.3)",
           "text_vocabulary", "image_based", "clip_and_image", "dfn_fraction(0.3)",
           "targeted_fraction(0.3)", "basic and dfn_fraction(0.7)", "oracle"]
NEEDS = {"none": "-", "no_filter": "dedup", "random(0.3)": "dedup",
         "basic": "dedup, fastText", "laion2b": "dedup, fastText, CLIP scores",
         "clip_fraction(0.3)": "dedup, CLIP scores", "text_vocabulary": "dedup, fastText, vocabulary",
         "image_based": "dedup, fastText, targets (k-means)",
         "clip_and_image": "dedup, fastText, CLIP scores, targets",
         "dfn_fraction(0.3)": "dedup, DFN scores", "targeted_fraction(0.3)": "dedup, targets",
         "basic and dfn_fraction(0.7)": "dedup, fastText, DFN scores",
         "oracle": "ground-truth labels"}
METRICS = ("zeroshot_shape", "zeroshot_color", "i2t_r1", "i2t_r5", "t2i_r1", "t2i_r5")


def overrides() -> list[str]:
    """The --set options every step shares: both models, and the CLIP aliases -> clip-pool."""
    models = [{"name": "conf/models/dfn-tiny.json", "pretrained": "conf/models/dfn-tiny.safetensors",
               "model_id": "dfn-tiny"},
              {"name": "conf/models/dfn-tiny.json", "pretrained": CLIP_OUT, "model_id": "clip-pool"}]
    scores = {"clip": "model:clip-pool", "clip_b32": "model:clip-pool",
              "targeted": "target_similarity"}
    return ["--set", f"score.models={json.dumps(models)}",
            "--set", f"select.scores={json.dumps(scores)}"]


def timed(label: str, fn, *args):
    t0 = time.perf_counter()
    out = fn(*args)
    secs = time.perf_counter() - t0
    print(f"[{label}] {secs:.1f} s", flush=True)
    return out, secs


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--conf", default="conf/local.yaml")
    p.add_argument("--steps", type=int, default=None, help="evaluate.steps (default: config)")
    p.add_argument("--presets", default=None, help="JSON list of presets (default: all)")
    p.add_argument("--out", default="benchmarks/results/baselines.md")
    args = p.parse_args(argv)
    presets = json.loads(args.presets) if args.presets else PRESETS
    base = ["--conf", args.conf, *overrides()]
    costs = prepare(base)
    select_s = time_selections(base, presets)
    ev = ["--set", f"evaluate.selections={json.dumps(presets)}"]
    if args.steps:
        ev += ["--set", f"evaluate.steps={args.steps}"]
    from etl.jobs import evaluate

    out, secs = timed("evaluate", evaluate.main, [*base, *ev, "--only", "induced",
                                                  "--no-progress"])
    table = render(out["induced"], select_s, costs, secs)
    print(table)
    write_markdown(args.out, table, "DataComp's baselines on the sample pool")


def prepare(base: list[str]) -> dict[str, float]:
    """Pipeline if missing, the CLIP stand-in, its scores, the target signals; seconds each."""
    from etl.jobs import run, score, targets, train_dfn

    cfg = load_config(base[1])
    costs: dict[str, float] = {}
    if not (Path(cfg.lakehouse.root) / "bronze_pairs").exists():
        costs["pipeline (make demo)"] = timed("run", run.main, ["--conf", base[1]])[1]
    if not (PROJECT_ROOT / CLIP_OUT).exists():
        costs["train clip-pool"] = timed("train clip-pool", train_dfn.main, [
            *base, "--set", "train.where=", "--set", f"train.out={CLIP_OUT}"])[1]
    costs["dfn-curate score (scores only pending rows: fixed cost when none)"] = \
        timed("score", score.main, base)[1]
    costs["targets"] = timed("targets", targets.main, base)[1]
    return costs


def time_selections(base: list[str], presets: list[str]) -> dict[str, tuple[int, float]]:
    """(kept pairs, seconds) of each preset's selection, computed alone."""
    from etl.evaluate import selection_uids
    from etl.jobs.common import parser, start

    ctx = start(parser("bench", ""), base, models=False)
    out = {}
    for name in presets:
        t0 = time.perf_counter()
        n = selection_uids(ctx.lake, name, ctx.cfg).count()
        out[name] = (n, time.perf_counter() - t0)
        print(f"[select {name}] {n} pairs in {out[name][1]:.1f} s", flush=True)
    return out


def render(rows: list[dict], select_s: dict, costs: dict, eval_s: float) -> str:
    """Markdown: one row per preset (best value per metric in bold), then the signal costs."""
    best = {m: max((r[m] for r in rows if r.get(m) is not None), default=None) for m in METRICS}
    head = ["preset", "reads", "pairs", "select s", "final loss", "shape", "colour", "i→t R@1",
            "i→t R@5", "t→i R@1", "t→i R@5", "mean"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        vals = [r.get(m) for m in METRICS]
        cells = [f"**{v:.3f}**" if v is not None and v == best[m] else
                 ("-" if v is None else f"{v:.3f}") for m, v in zip(METRICS, vals, strict=True)]
        mean = sum(v for v in vals if v is not None) / max(1, sum(v is not None for v in vals))
        name = r["selection"]
        lines.append("| " + " | ".join([f"`{name}`", NEEDS.get(name, ""), str(r["n_pairs"]),
                                          f"{select_s.get(name, (0, 0))[1]:.1f}",
                                          f"{r['final_loss']:.3f}", *cells, f"{mean:.3f}"]) + " |")
    lines += ["", "| signal | seconds |", "|---|---|"]
    lines += [f"| {k} | {v:.1f} |" for k, v in costs.items()]
    lines.append(f"| evaluate ({len(rows)} trainings) | {eval_s:.1f} |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
