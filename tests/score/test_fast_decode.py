"""Fast JPEG decode (``score.fast_decode``): DCT-scaled decode must match the exact path's
geometry, stay within tolerance, and treat odd and broken JPEGs the way the exact path does."""

from __future__ import annotations

import io
import os

import numpy as np
import pytest
from PIL import Image

from etl.config import ConfigError, load_config
from tests.helpers.models import TINY_JSON
from udfs import models
from udfs.imaging import decode_rgb
from udfs.score import PairScorer, ScoreOptions

DFN_WEIGHTS = TINY_JSON.replace(".json", ".safetensors")


def photo(size: tuple[int, int], seed: int = 0, mode: str = "RGB", **save) -> bytes:
    """A JPEG with photo-like content: smooth colour fields, edges and fine grain."""
    rng = np.random.default_rng(seed)
    w, h = size
    base = Image.fromarray(rng.integers(0, 256, (7, 9, 3), dtype=np.uint8)).resize(
        (w, h), Image.BICUBIC)
    arr = np.asarray(base, dtype=np.int16) + rng.normal(0, 10, (h, w, 3)).astype(np.int16)
    arr[h // 3: h // 2, w // 4: w // 2] = (250, 250, 20)  # a hard-edged block
    img = Image.fromarray(arr.clip(0, 255).astype(np.uint8)).convert(mode)
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=save.pop("quality", 90), **save)
    return buf.getvalue()


@pytest.fixture(scope="module")
def scorers():
    """The bundled DFN (64 px input), exact and with fast_decode=1.5 (a 96 px DCT target)."""
    spec = models.resolve(TINY_JSON, DFN_WEIGHTS, "dfn")
    loaded = models.get_model(spec, "cpu")
    exact = PairScorer(loaded, ScoreOptions(device="cpu", fast_decode=None, decode_threads=1))
    fast = PairScorer(loaded, ScoreOptions(device="cpu", fast_decode=1.5, decode_threads=1))
    return exact, fast


def model_input(scorer: PairScorer, data: bytes) -> tuple[np.ndarray, str | None]:
    import torch

    buf = torch.zeros((1,) + scorer.shape)
    err = scorer.prep_image(buf, 0, data)
    return buf[0].numpy().copy(), err


def pixel_mad(a: np.ndarray, b: np.ndarray) -> float:
    """Mean |a - b| in [0, 1] pixel units (undoing open_clip's Normalize std)."""
    std = np.array([0.26862954, 0.26130258, 0.27577711])[:, None, None]
    return float((np.abs(a - b) * std).mean())


def assert_fast_matches_exact(exact: PairScorer, fast: PairScorer, data: bytes) -> None:
    """The fast path decodes ``data`` and its model input is within 0.006 of the exact one."""
    ref, _ = model_input(exact, data)
    got, err = model_input(fast, data)
    assert err is None
    assert pixel_mad(got, ref) <= 0.006


def test_decode_rgb_reduces_jpegs_only_and_keeps_the_full_size():
    data = photo((1000, 700))
    img, err = decode_rgb(data, min_side=150)
    assert err is None and img.size == (250, 175)  # 1/4 scale: both sides still >= 150
    assert img.info["full_size"] == (1000, 700)
    full, _ = decode_rgb(data)
    assert full.size == (1000, 700) and "full_size" not in full.info
    buf = io.BytesIO()
    Image.open(io.BytesIO(data)).save(buf, format="PNG")
    png, _ = decode_rgb(buf.getvalue(), min_side=150)
    assert png.size == (1000, 700)  # not a JPEG: full decode


def test_scorer_target_is_the_factor_times_the_model_input(scorers):
    exact, fast = scorers
    assert exact.shape[-1] == 64
    assert (exact.min_side, fast.min_side) == (0, 96)


@pytest.mark.parametrize("size", [(1535, 1024), (1024, 1535), (1200, 800)])
def test_fast_input_matches_the_exact_geometry(scorers, size):
    """1535x1024 decodes to 768x512 at 1/2 (rounded up): resized as that, the 64-px crop would
    be cut from a 96-px instead of a 95-px wide image, a visible shift."""
    assert_fast_matches_exact(*scorers, photo(size, seed=size[0]))


def test_fast_scores_stay_within_tolerance(scorers):
    exact, fast = scorers
    images = [photo((w, h), seed=i) for i, (w, h) in
              enumerate([(512, 384), (800, 1200), (1600, 1066), (2048, 1400), (300, 300)])]
    texts = ["a yellow square", "a colourful photo", "a red car", "grain", "blue sky"]
    a, b = exact.score(images, texts), fast.score(images, texts)
    assert a["score_error"].isna().all() and b["score_error"].isna().all()
    assert np.abs(a["score"] - b["score"]).max() <= 0.01


@pytest.mark.parametrize("kind", ["progressive", "cmyk", "exif_rotated", "grayscale"])
def test_odd_jpegs_take_the_fast_path_with_the_same_result(scorers, kind):
    exact, fast = scorers
    size = (1200, 800)
    data = {
        "progressive": lambda: photo(size, progressive=True),
        "cmyk": lambda: photo(size, mode="CMYK"),
        "exif_rotated": lambda: photo(size, exif=_orientation(6)),
        "grayscale": lambda: photo(size, mode="L"),
    }[kind]()
    reduced, _ = decode_rgb(data, min_side=fast.min_side)
    assert reduced.size[0] < size[0], "the fast path was not taken"
    assert_fast_matches_exact(exact, fast, data)


def test_truncated_jpeg_gives_the_exact_paths_error(scorers):
    exact, fast = scorers
    data = photo((1200, 800))[:5000]
    _, err_exact = model_input(exact, data)
    _, err_fast = model_input(fast, data)
    assert err_exact is not None and err_exact == err_fast


def _orientation(value: int) -> bytes:
    exif = Image.Exif()
    exif[0x0112] = value
    return exif.tobytes()


def test_prefetched_batches_come_back_in_order_and_intact(scorers):
    """More batches than pixel buffers: a buffer reused too early would mix images."""
    exact, _ = scorers
    spec = exact.loaded.spec
    deep = PairScorer(models.get_model(spec, "cpu"),
                      ScoreOptions(device="cpu", fast_decode=None, prefetch=3, batch_size=2))
    images = [photo((80 + 8 * i, 64), seed=i) for i in range(14)]
    texts = [f"picture {i}" for i in range(14)]
    batches = [(images[i:i + 3], texts[i:i + 3]) for i in range(0, 14, 3)]
    got = np.concatenate([out["score"].to_numpy() for out in deep.score_iter(batches)])
    ref = exact.score(images, texts)["score"].to_numpy()
    np.testing.assert_allclose(got, ref, atol=1e-6)


def test_decode_threads_default_to_the_cores(scorers):
    exact, _ = scorers
    auto = PairScorer(exact.loaded, ScoreOptions(device="cpu", decode_threads=0))
    assert auto.threads == (os.cpu_count() or 1)


@pytest.mark.parametrize("value, expected", [("off", None), ("false", None), ("null", None),
                                             ("3", 3.0), ("1.5", 1.5)])
def test_fast_decode_setting(value, expected):
    cfg = load_config("conf/local.yaml", [f"score.fast_decode={value}"])
    assert cfg.score.fast_decode == expected


def test_fast_decode_below_one_is_refused():
    with pytest.raises(ConfigError, match="score.fast_decode"):
        load_config("conf/local.yaml", ["score.fast_decode=0.5"])
