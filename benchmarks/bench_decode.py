"""The ``score.fast_decode`` dial: per-core decode+preprocess rate and fidelity, per factor.

Images: the two real photographs scikit-learn ships (``load_sample_images``), cropped at three
aspect ratios and rescaled so the *short* side is 256, 512, 1024 or 2048 px, saved as JPEG at
quality 75, 90 and 95 (18 JPEGs per size). For each factor (DCT-scale target = factor x the
model's input size) and for the exact path (full decode), in one run on one core:

* decode + open_clip preprocess, pairs/s on one core, at 224 px (ViT-B-32's transform) and at
  the bundled DFN's 64 px;
* mean |difference| of the 224 px model input tensors (after Normalize) against the exact path;
* the bundled DFN's scores of every image against 8 captions: max |delta score| and Spearman
  against the exact path.

It prints a table, the default the bars pick (the fastest factor with Spearman >= 0.999,
max |delta| <= 0.01 and input difference <= 0.01 over all sizes) and writes JSON.

    python benchmarks/bench_decode.py [--factors 1,1.5,2,3,4] [--out benchmarks/results/decode.json]
"""

from __future__ import annotations

import argparse
import io
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from benchmarks.provenance import write_json  # noqa: E402
from udfs import models  # noqa: E402
from udfs.score import PairScorer, ScoreOptions  # noqa: E402

SIZES = (256, 512, 1024, 2048)
ASPECTS = (1.0, 4 / 3, 3 / 2)
QUALITIES = (75, 90, 95)
CAPTIONS = ["a photo of a chinese temple", "a pink flower in a garden", "a red sports car",
            "a bowl of soup", "a dog on a beach", "a city skyline at night",
            "a close-up of petals", "an old stone building with a roof"]
BARS = {"spearman": 0.999, "max_delta": 0.01, "input_mad": 0.01}
DFN = (str(ROOT / "conf/models/dfn-tiny.json"), str(ROOT / "conf/models/dfn-tiny.safetensors"))


def photo_set() -> dict[int, list[bytes]]:
    """{short side: JPEG bytes}: crops of the two scikit-learn photos, several qualities."""
    from PIL import Image
    from sklearn.datasets import load_sample_images

    out: dict[int, list[bytes]] = {s: [] for s in SIZES}
    for arr in load_sample_images().images:
        photo = Image.fromarray(arr)
        w, h = photo.size
        for i, aspect in enumerate(ASPECTS):
            cw = min(w, round(h * aspect))
            left = (w - cw) * i // (len(ASPECTS) - 1)
            crop = photo.crop((left, 0, left + cw, h))
            for side in SIZES:
                size = (round(side * cw / h), side)
                img = crop.resize(size, Image.LANCZOS)
                for q in QUALITIES:
                    buf = io.BytesIO()
                    img.save(buf, format="JPEG", quality=q)
                    out[side].append(buf.getvalue())
    return out


def scorer(arch: str, pretrained: str | None, factor: float | None) -> PairScorer:
    """A one-thread CPU scorer with the given fast_decode factor."""
    spec = models.resolve(arch, pretrained, "bench")
    opts = ScoreOptions(batch_size=64, device="cpu", precision="fp32", decode_threads=1,
                        fast_decode=factor)
    return PairScorer(models.get_model(spec, "cpu"), opts)


def per_core_rate(sc: PairScorer, datas: list[bytes], seconds: float) -> float:
    """decode + preprocess, one image at a time on the calling thread, in images/s."""
    import torch

    buf = torch.zeros((1,) + sc.shape)
    n, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        for data in datas:
            sc.prep_image(buf, 0, data)
            n += 1
    return n / (time.perf_counter() - start)


def inputs(sc: PairScorer, datas: list[bytes]) -> np.ndarray:
    """The model input tensors for ``datas`` (N, 3, H, W)."""
    import torch

    buf = torch.zeros((len(datas),) + sc.shape)
    for i, data in enumerate(datas):
        err = sc.prep_image(buf, i, data)
        if err:
            raise RuntimeError(err)
    return buf.numpy().copy()


def scores(sc: PairScorer, datas: list[bytes]) -> np.ndarray:
    """The DFN score of every (image, caption) pair, flattened."""
    images = [d for d in datas for _ in CAPTIONS]
    return sc.score(images, CAPTIONS * len(datas))["score"].to_numpy()


def spearman(a: np.ndarray, b: np.ndarray) -> float:
    """Spearman rank correlation (no ties expected in float scores)."""
    ra, rb = np.argsort(np.argsort(a)), np.argsort(np.argsort(b))
    return float(np.corrcoef(ra, rb)[0, 1])


def rates(scorers: dict, photos: dict[int, list[bytes]], seconds: float) -> dict:
    """{(factor, side): (224 px rate, DFN rate)}: interleaved per size, after a warm-up pass, the
    better of two rounds (so no setting gains from running later on a warmer machine)."""
    out: dict = {}
    for sc_vit, sc_dfn in scorers.values():
        per_core_rate(sc_vit, photos[256], 0.2), per_core_rate(sc_dfn, photos[256], 0.2)
    for _ in range(2):
        for side, datas in photos.items():
            for factor, (sc_vit, sc_dfn) in scorers.items():
                now = (per_core_rate(sc_vit, datas, seconds), per_core_rate(sc_dfn, datas, seconds))
                best = out.get((factor, side), (0.0, 0.0))
                out[factor, side] = (max(best[0], now[0]), max(best[1], now[1]))
    return out


def measure(photos: dict[int, list[bytes]], factors: list[float | None],
            seconds: float) -> list[dict]:
    """One row per (factor, size) plus an 'all' row per factor with the fidelity over all sizes.
    Input differences are in [0, 1] pixel units (``input_mad``, before Normalize) and in the
    normalised tensor the model sees (``input_mad_norm``, ~3.7x larger)."""
    scorers = {f: (scorer("ViT-B-32", None, f), scorer(*DFN, f)) for f in factors}
    speed = rates(scorers, photos, seconds)
    std = np.array(scorers[None][0].loaded.preprocess.transforms[-1].std)[:, None, None]
    ref_in = {s: inputs(scorers[None][0], d) for s, d in photos.items()}
    ref_sc = {s: scores(scorers[None][1], d) for s, d in photos.items()}
    rows = []
    for factor, (vit, dfn) in scorers.items():
        got_sc = {}
        for side, datas in photos.items():
            got_sc[side] = scores(dfn, datas)
            diff = np.abs(inputs(vit, datas) - ref_in[side])
            rows.append({
                "factor": factor, "side": side,
                "vit_rate": speed[factor, side][0], "dfn_rate": speed[factor, side][1],
                "input_mad": float((diff * std).mean()), "input_mad_norm": float(diff.mean()),
                "max_delta": float(np.abs(got_sc[side] - ref_sc[side]).max()),
                "spearman": spearman(got_sc[side], ref_sc[side]),
            })
        every = np.concatenate([got_sc[s] for s in photos])
        ref = np.concatenate([ref_sc[s] for s in photos])
        mine = [r for r in rows if r["factor"] == factor]
        rows.append({"factor": factor, "side": "all",
                     "input_mad": max(r["input_mad"] for r in mine),
                     "input_mad_norm": max(r["input_mad_norm"] for r in mine),
                     "max_delta": float(np.abs(every - ref).max()),
                     "spearman": spearman(every, ref)})
    return rows


def pick_default(rows: list[dict]) -> float | None:
    """The fastest factor (= the smallest: a smaller target skips more) meeting every bar."""
    ok = [r["factor"] for r in rows if r["side"] == "all" and r["factor"] is not None
          and r["spearman"] >= BARS["spearman"] and r["max_delta"] <= BARS["max_delta"]
          and r["input_mad"] <= BARS["input_mad"]]
    return min(ok) if ok else None


def print_table(rows: list[dict]) -> None:
    """Markdown table with speed-ups over the exact path at the same size."""
    exact = {r["side"]: r for r in rows if r["factor"] is None and r["side"] != "all"}
    print("| fast_decode | short side | 224 px: img/s/core | x exact | mean abs input diff "
          "(pixels / normalised) | DFN 64 px: img/s/core | x exact | DFN max abs score diff "
          "| Spearman |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        name = "off (exact)" if r["factor"] is None else f"{r['factor']:g}x"
        if r["side"] == "all":
            print(f"| {name} | all | | | {r['input_mad']:.4f} / {r['input_mad_norm']:.4f} (max) "
                  f"| | | {r['max_delta']:.4f} "
                  f"| {r['spearman']:.5f} |")
            continue
        e = exact[r["side"]]
        print(f"| {name} | {r['side']} | {r['vit_rate']:.0f} | {r['vit_rate'] / e['vit_rate']:.2f} "
              f"| {r['input_mad']:.4f} / {r['input_mad_norm']:.4f} | {r['dfn_rate']:.0f} | {r['dfn_rate'] / e['dfn_rate']:.2f} "
              f"| {r['max_delta']:.4f} | {r['spearman']:.5f} |")


def main(argv: list[str] | None = None) -> dict:
    """Measure, print the table and the default the bars pick, write JSON."""
    import torch

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--factors", default="1,1.5,2,3,4")
    p.add_argument("--seconds", type=float, default=1.5, help="per rate measurement")
    p.add_argument("--out", default=str(ROOT / "benchmarks/results/decode.json"))
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    factors = [None] + [float(f) for f in args.factors.split(",") if f]
    photos = photo_set()
    rows = measure(photos, factors, args.seconds)
    print_table(rows)
    default = pick_default(rows)
    exact_1k = next(r for r in rows if r["factor"] is None and r["side"] == 1024)
    result = {"rows": rows, "bars": BARS, "default": default, "images_per_size": len(photos[256])}
    if default is not None:
        fast_1k = next(r for r in rows if r["factor"] == default and r["side"] == 1024)
        result["speedup_1024_224"] = fast_1k["vit_rate"] / exact_1k["vit_rate"]
        print(f"default by the bars: fast_decode={default:g} -> 1024 px into 224 px: "
              f"{result['speedup_1024_224']:.2f}x the exact path per core")
    else:
        print("no factor meets the bars: keep fast_decode off")
    write_json(args.out, result)
    return result


if __name__ == "__main__":
    main()
