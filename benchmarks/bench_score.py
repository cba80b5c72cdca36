"""Scoring throughput, in pairs/s, measured in one run on one machine, for each model (the
bundled DFN and ViT-B-32 by default) with the exact decode and with ``fast_decode``:

(a) the model alone on ready tensors (already on the device),
(d) decode + preprocess alone on real JPEG bytes (the CPU ceiling; no model),
(b) decode + preprocess + model on real JPEG bytes (PairScorer, as inside the UDF), with the
    model's share of the wall time,
(c) the same through the Spark pandas UDF (local mode, noop sink),

then the ratios b/a, c/a and c/b. "exact" is the full decode (2 decode threads, one batch
ahead); "fast" is the default engine (DCT-scaled JPEG decode, one decode thread per core, two
batches ahead). The table is printed and written to ``--out`` with its provenance. ViT-B-32 uses random weights: no download needed. Examples:

    python benchmarks/bench_score.py                       # both models on CPU, small n
    python benchmarks/bench_score.py --device cuda --n 40000 --batch-size 256 --archs ViT-B-32
"""

from __future__ import annotations

import argparse
import io
import os
import random
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.provenance import write_markdown  # noqa: E402
from udfs import models  # noqa: E402
from udfs.score import PairScorer, ScoreOptions, pick_device  # noqa: E402


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    cpus = os.cpu_count() or 2
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--archs", default="conf/models/dfn-tiny.json,ViT-B-32",
                   help="comma-separated open_clip names or architecture JSONs")
    p.add_argument("--fast-decode", type=float, default=ScoreOptions.fast_decode,
                   help="factor for the fast rows")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N")
    p.add_argument("--precision", default="auto", help="auto (bf16 on GPU) | fp32 | bf16 | fp16")
    p.add_argument("--n", type=int, default=None,
                   help="pairs per measurement (default: ~8 s of the model alone, 256..20000)")
    p.add_argument("--batch-size", type=int, default=None, help="model batch size")
    p.add_argument("--records-per-batch", type=int, default=None, help="Arrow batch rows")
    p.add_argument("--decode-threads", type=int, default=cpus, help="decode threads (fast rows)")
    p.add_argument("--spark-tasks", type=int, default=None, help="local[k] for (c)")
    p.add_argument("--min-side", type=int, default=256)
    p.add_argument("--max-side", type=int, default=512)
    p.add_argument("--distinct", type=int, default=256, help="distinct JPEGs (cycled)")
    p.add_argument("--torch-threads", type=int, default=None, help="torch threads for (a), (b)")
    p.add_argument("--skip-spark", action="store_true")
    p.add_argument("--out", default="benchmarks/results/score.md", help="markdown result file")
    args = p.parse_args(argv)
    gpu = pick_device(args.device).startswith("cuda")
    args.max_n = args.n or 20_000
    args.batch_size = args.batch_size or (256 if gpu else 32)
    args.records_per_batch = args.records_per_batch or max(args.batch_size, 256)
    args.spark_tasks = args.spark_tasks or min(4, cpus)
    return args


def photo_like_jpeg(rng: random.Random, min_side: int, max_side: int) -> bytes:
    """A JPEG with photo-like entropy: smooth colour fields plus fine grain, q=90."""
    import numpy as np
    from PIL import Image

    w, h = rng.randint(min_side, max_side), rng.randint(min_side, max_side)
    nrng = np.random.default_rng(rng.getrandbits(32))
    base = Image.fromarray(nrng.integers(0, 256, (6, 6, 3), dtype=np.uint8)).resize(
        (w, h), Image.BICUBIC)
    arr = np.asarray(base, dtype=np.int16) + nrng.normal(0, 12, (h, w, 3)).astype(np.int16)
    buf = io.BytesIO()
    Image.fromarray(arr.clip(0, 255).astype(np.uint8)).save(buf, format="JPEG", quality=90)
    return buf.getvalue()


def make_pairs(args: argparse.Namespace) -> tuple[list[bytes], list[str]]:
    rng = random.Random(0)
    distinct = [photo_like_jpeg(rng, args.min_side, args.max_side) for _ in range(args.distinct)]
    images = [distinct[i % len(distinct)] for i in range(args.max_n)]
    texts = [f"a photo of a {rng.choice(['red', 'blue', 'green'])} thing number {i}, "
             f"taken on a sunny day" for i in range(args.max_n)]
    return images, texts


def sync(device: str) -> None:
    import torch

    if device.startswith("cuda"):
        torch.cuda.synchronize(device)


def bench_model(scorer: PairScorer, args: argparse.Namespace) -> float:
    """(a) encode_image + encode_text + cosine on tensors already on the device."""
    import torch

    lm, bs = scorer.loaded, args.batch_size
    x = torch.randn((bs,) + scorer.shape, device=lm.device)
    tok = lm.tokenizer([f"a photo of thing {i}" for i in range(bs)]).to(lm.device)
    steps = max(2, (args.n or 256) // bs)

    def step() -> None:
        with torch.inference_mode(), scorer._autocast():
            img = torch.nn.functional.normalize(lm.model.encode_image(x).float(), dim=-1)
            txt = torch.nn.functional.normalize(lm.model.encode_text(tok).float(), dim=-1)
            (img * txt).sum(-1).cpu()

    for _ in range(2):
        step()
    sync(lm.device)
    t = time.perf_counter()
    for _ in range(steps):
        step()
    sync(lm.device)
    return steps * bs / (time.perf_counter() - t)


def pretrained_for(arch: str) -> str | None:
    """The bundled checkpoint next to a bundled architecture JSON, else random weights."""
    weights = Path(arch).with_suffix(".safetensors")
    return str(weights) if arch.endswith(".json") and weights.exists() else None


def bench_decode(scorer: PairScorer, images: list[bytes]) -> float:
    """(d) decode + preprocess only, with the scorer's thread pool."""
    t = time.perf_counter()
    prep = scorer.submit(images, [""] * len(images))
    [f.result() for f in prep.image_errors]
    return len(images) / (time.perf_counter() - t)


def bench_pipeline(scorer: PairScorer, images: list[bytes], texts: list[str],
                   rpb: int) -> tuple[float, float]:
    """(b) the UDF's engine: background decode of the next batches while the model runs one.
    Returns pairs/s and the model's share of the wall time."""
    batches = [(images[i:i + rpb], texts[i:i + rpb]) for i in range(0, len(images), rpb)]
    list(scorer.score_iter(batches[:2]))  # warm-up
    scorer.stats.update(wait_s=0.0, model_s=0.0, rows=0)
    t = time.perf_counter()
    rows = sum(len(out) for out in scorer.score_iter(batches))
    wall = time.perf_counter() - t
    return rows / wall, scorer.stats["model_s"] / wall


def bench_spark(args: argparse.Namespace, arch: str, opts: ScoreOptions, images: list[bytes],
                texts: list[str]) -> float:
    """(c) through Spark: a cached DataFrame of the same bytes, the pandas UDF, a noop sink."""
    from etl.config import ModelConf, ScoreConf, SparkConf
    from etl.score import configure_arrow, score_pairs
    from etl.spark import get_spark

    spark = get_spark(SparkConf(master=f"local[{args.spark_tasks}]", app_name="bench-score",
                                conf={"spark.driver.memory": "8g"}))
    spark.sparkContext.setLogLevel("ERROR")
    conf = ScoreConf(models=[], batch_size=args.batch_size, device=args.device,
                     precision=args.precision, embeddings=True,
                     decode_threads=max(1, opts.decode_threads // args.spark_tasks),
                     prefetch=opts.prefetch, fast_decode=opts.fast_decode,
                     max_records_per_batch=args.records_per_batch)
    configure_arrow(spark, conf)
    rows = [(f"{i:08d}", images[i], texts[i]) for i in range(len(images))]
    df = spark.createDataFrame(rows, "uid string, image binary, text string")
    df = df.repartition(args.spark_tasks * 4).cache()
    df.count()
    model = ModelConf(name=arch, pretrained=pretrained_for(arch), model_id="bench")
    warm = df.limit(args.spark_tasks * args.records_per_batch).repartition(args.spark_tasks)
    score_pairs(warm, model, conf).write.format("noop").mode("overwrite").save()
    t = time.perf_counter()
    score_pairs(df, model, conf).write.format("noop").mode("overwrite").save()
    return len(rows) / (time.perf_counter() - t)


def main(argv: list[str] | None = None) -> None:
    """Run all measurements for every model, exact and fast, and print one table."""
    import torch

    args = parse_args(argv)
    if args.torch_threads:
        torch.set_num_threads(args.torch_threads)
    device = pick_device(args.device)
    images, texts = make_pairs(args)
    kb = sum(len(b) for b in images[:args.distinct]) / min(args.distinct, len(images)) / 1024
    name = torch.cuda.get_device_name(device) if device.startswith("cuda") else "cpu"
    setup = (f"device={device} ({name}) precision={args.precision} "
             f"torch_threads={torch.get_num_threads()} cpus={os.cpu_count()} "
             f"batch={args.batch_size} arrow_batch={args.records_per_batch} "
             f"spark=local[{args.spark_tasks}] jpeg={args.min_side}-{args.max_side}px "
             f"mean {kb:.0f} KiB")
    print(setup)
    modes = {
        "exact": ScoreOptions(args.batch_size, device, args.precision, True, 2,
                              fast_decode=None, prefetch=1),
        f"fast {args.fast_decode:g}x": ScoreOptions(args.batch_size, device, args.precision, True,
                                                  args.decode_threads,
                                                  fast_decode=args.fast_decode, prefetch=2),
    }
    lines = ["| model | decode | pairs | (a) model | (d) decode only | (b) decode+model "
             "| model share of (b) | (c) Spark UDF | b/a | c/b |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    print("\n".join(lines))
    for arch in args.archs.split(","):
        spec = models.resolve(arch, pretrained_for(arch), "bench")
        a = None
        for mode, opts in modes.items():
            scorer = PairScorer(models.get_model(spec, device), opts)
            a = a or bench_model(scorer, args)
            n = args.n or int(min(args.max_n, max(256, 8 * a)))
            d = bench_decode(scorer, images[:n])
            b, share = bench_pipeline(scorer, images[:n], texts[:n], args.records_per_batch)
            c = None if args.skip_spark else bench_spark(args, arch, opts, images[:n], texts[:n])
            cs = "-" if c is None else f"{c:.1f}"
            cb = "-" if c is None else f"{c / b:.2f}"
            lines.append(f"| {Path(arch).stem} | {mode} | {n} | {a:.1f} | {d:.1f} | {b:.1f} "
                         f"| {share:.0%} | {cs} | {b / a:.2f} | {cb} |")
            print(lines[-1], flush=True)
    write_markdown(args.out, "\n".join([setup, "", *lines]), "Scoring throughput (pairs/s)")


if __name__ == "__main__":
    main()
