"""Scoring (image, text) pairs with a filter model: the iterator pandas UDF and its engine.

Score = cosine similarity of the L2-normalised image and text embeddings (not multiplied by the
logit scale), so thresholds are on the familiar 0.28-style scale. Decoding + preprocessing run
in a thread pool (one thread per core the task may use) ``prefetch`` Arrow batches ahead of the
model, so the accelerator does not wait on JPEG decode; tokenisation runs there too. JPEGs decode
at a reduced DCT scale when ``fast_decode`` is set (see ``udfs.imaging.decode_rgb``). Bad images
give a null score and an error string.
"""

from __future__ import annotations

import contextlib
import math
import os
import threading
import time
from collections import deque
from collections.abc import Iterable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd

from udfs.imaging import decode_rgb
from udfs.models import LoadedModel, ModelSpec, get_model

RESULT_DDL = ("score double, score_error string, image_embedding array<float>, "
              "text_embedding array<float>")

_SCORERS: dict[tuple, PairScorer] = {}
_LOCK = threading.Lock()


@dataclass(frozen=True)
class ScoreOptions:
    """The picklable subset of ``ScoreConf`` a worker needs."""

    batch_size: int = 64
    device: str = "auto"
    precision: str = "auto"
    embeddings: bool = True
    decode_threads: int = 0  # 0: the cores the Spark task may use (all cores outside Spark)
    max_image_pixels: int = 64_000_000
    fast_decode: float | None = 1.5  # JPEG DCT-scale target = factor x model input; None: exact
    prefetch: int = 2  # Arrow batches decoded ahead of the one the model runs

    @classmethod
    def from_conf(cls, conf: Any) -> ScoreOptions:
        """Build from an ``etl.config.ScoreConf``."""
        return cls(conf.batch_size, conf.device, conf.precision, conf.embeddings,
                   conf.decode_threads, conf.max_image_pixels, conf.fast_decode,
                   conf.prefetch)


def task_cpus() -> int | None:
    """The cores the running Spark task may use (``spark.task.cpus``); None outside a task."""
    from pyspark import TaskContext

    ctx = TaskContext.get()
    return max(1, ctx.cpus()) if ctx is not None else None


def task_gpu() -> str | None:
    """The first GPU address Spark assigned to the running task, if GPU scheduling is on."""
    from pyspark import TaskContext

    ctx = TaskContext.get()
    res = ctx.resources().get("gpu") if ctx is not None else None
    return res.addresses[0] if res is not None and res.addresses else None


def pick_device(requested: str = "auto") -> str:
    """``cpu``/``cuda:N`` as asked; for auto/cuda the task's GPU, else cuda:0, else CPU."""
    import torch

    if requested == "cpu" or requested.startswith("cuda:"):
        return requested
    if not torch.cuda.is_available():
        if requested == "cuda":
            raise RuntimeError("score.device=cuda but torch sees no CUDA device on this worker")
        return "cpu"
    gpu = task_gpu()
    if gpu is not None and gpu.isdigit() and int(gpu) < torch.cuda.device_count():
        return f"cuda:{gpu}"
    return "cuda:0"


@dataclass
class Prepared:
    """One Arrow batch in flight: decode futures writing into ``pixels``, and its tokens."""

    n: int
    pixels: Any  # torch tensor [n, 3, H, W] filled by the decode threads
    image_errors: list[Future]
    tokens: Future
    text_ok: np.ndarray


class PairScorer:
    """Decode, preprocess, tokenise and embed pairs with one loaded model on one device."""

    def __init__(self, loaded: LoadedModel, opts: ScoreOptions):
        import torch
        from PIL import Image

        self.loaded, self.opts = loaded, opts
        self.device = torch.device(loaded.device)
        self.threads = opts.decode_threads or task_cpus() or os.cpu_count() or 1
        self.pool = ThreadPoolExecutor(self.threads, thread_name_prefix="decode")
        self.shape = tuple(loaded.preprocess(Image.new("RGB", (8, 8))).shape)
        self.min_side = math.ceil(opts.fast_decode * min(self.shape[-2:])) if opts.fast_decode else 0
        self.resize = first_resize(loaded.preprocess)
        self.buffers: list[Any] = [None] * (max(1, opts.prefetch) + 1)
        self.turn = 0
        self.stats = {"wait_s": 0.0, "model_s": 0.0, "rows": 0}
        precision = opts.precision
        if precision == "auto":
            precision = "bf16" if self.device.type == "cuda" else "fp32"
        self.amp_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision)
        if self.device.type == "cuda":
            torch.backends.cuda.matmul.allow_tf32 = True

    def _buffer(self, n: int) -> Any:
        import torch

        self.turn = (self.turn + 1) % len(self.buffers)
        buf = self.buffers[self.turn]
        if buf is None or buf.shape[0] < n:
            buf = torch.zeros((max(n, self.opts.batch_size),) + self.shape,
                              pin_memory=self.device.type == "cuda")
            self.buffers[self.turn] = buf
        return buf[:n]

    def submit(self, images: Sequence, texts: Sequence) -> Prepared:
        """Start decoding and tokenising one batch in the background."""
        n = len(images)
        pixels = self._buffer(n)
        futures = [self.pool.submit(self.prep_image, pixels, i, data)
                   for i, data in enumerate(images)]
        text_list = [t if isinstance(t, str) else None for t in texts]
        tokens = self.pool.submit(self.loaded.tokenizer, [t or "" for t in text_list])
        return Prepared(n, pixels, futures, tokens, np.array([t is not None for t in text_list]))

    def prep_image(self, pixels: Any, i: int, data: bytes | None) -> str | None:
        """Decode ``data`` and write its model input into ``pixels[i]``; returns an error or None."""
        img, err = decode_rgb(data, self.opts.max_image_pixels, min_side=self.min_side)
        if img is None:
            pixels[i].zero_()
            return err
        try:
            if "full_size" in img.info and self.resize is not None:
                img = resize_as_full(img, img.info["full_size"], self.resize)
            pixels[i].copy_(self.loaded.preprocess(img))
        except Exception as exc:  # noqa: BLE001 - a per-row failure, never the task's
            pixels[i].zero_()
            return f"preprocess_error: {type(exc).__name__}: {exc}"[:500]
        return None

    def run(self, prep: Prepared) -> pd.DataFrame:
        """Wait for ``prep``'s decoding, run the model, and build the result rows."""
        start = time.perf_counter()
        errors = [f.result() for f in prep.image_errors]
        tokens = prep.tokens.result()
        ready = time.perf_counter()
        image_ok = np.array([e is None for e in errors], dtype=bool)
        img, txt = self._embed(prep.pixels, tokens, image_ok, prep.text_ok)
        self.stats["wait_s"] += ready - start
        self.stats["model_s"] += time.perf_counter() - ready
        self.stats["rows"] += prep.n
        score = (img * txt).sum(axis=1, dtype=np.float64)
        ok = image_ok & prep.text_ok & np.isfinite(score)
        return pd.DataFrame({
            "score": pd.Series(np.where(ok, score, np.nan), dtype="float64"),
            "score_error": [_error(e, t, s) for e, t, s in zip(errors, prep.text_ok, score, strict=True)],
            "image_embedding": self._rows(img, image_ok),
            "text_embedding": self._rows(txt, prep.text_ok),
        })

    def _embed(self, pixels: Any, tokens: Any, image_ok: np.ndarray,
               text_ok: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        import torch

        model, bs, dim = self.loaded.model, self.opts.batch_size, self.loaded.embed_dim
        img_out, txt_out = [], []
        with torch.inference_mode(), self._autocast():
            for s in range(0, len(image_ok), bs):
                img_out.append(self._encode(model.encode_image, pixels[s:s + bs],
                                            image_ok[s:s + bs].any(), dim))
                txt_out.append(self._encode(model.encode_text, tokens[s:s + bs],
                                            text_ok[s:s + bs].any(), dim))
            if not img_out:
                return np.zeros((0, dim), np.float32), np.zeros((0, dim), np.float32)
            return (torch.cat(img_out).cpu().numpy(), torch.cat(txt_out).cpu().numpy())

    def _encode(self, encoder: Any, x: Any, any_ok: bool, dim: int) -> Any:
        import torch

        if not any_ok:  # e.g. metadata-only rows: nothing to embed in this batch
            return torch.zeros((x.shape[0], dim), device=self.device)
        out = encoder(x.to(self.device, non_blocking=True)).float()
        return torch.nn.functional.normalize(out, dim=-1)

    def _autocast(self) -> Any:
        import torch

        if self.amp_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.device.type, dtype=self.amp_dtype)

    def _rows(self, emb: np.ndarray, ok: np.ndarray) -> list:
        if not self.opts.embeddings:
            return [None] * len(ok)
        return [row if good else None for row, good in zip(emb, ok, strict=True)]

    def score(self, images: Sequence, texts: Sequence) -> pd.DataFrame:
        """Score one batch synchronously (tests, notebooks)."""
        return self.run(self.submit(list(images), list(texts)))

    def score_iter(self, batches: Iterable[tuple[Sequence, Sequence]]) -> Iterator[pd.DataFrame]:
        """Score a stream of (images, texts) batches; batches k+1..k+prefetch decode while the
        model runs batch k (each in-flight batch holds its own pixel buffer)."""
        in_flight: deque[Prepared] = deque()
        for images, texts in batches:
            in_flight.append(self.submit(list(images), list(texts)))
            if len(in_flight) > self.opts.prefetch:
                yield self.run(in_flight.popleft())
        while in_flight:
            yield self.run(in_flight.popleft())


def first_resize(preprocess: Any) -> Any:
    """The transform's leading torchvision ``Resize`` to a shorter side (open_clip's default),
    or None when it starts otherwise (then a reduced decode goes through it as it is)."""
    from torchvision import transforms

    steps = getattr(preprocess, "transforms", [])
    first = steps[0] if steps else None
    if isinstance(first, transforms.Resize) and (isinstance(first.size, int) or len(first.size) == 1):
        return first
    return None


def resize_as_full(img: Any, full_size: tuple[int, int], resize: Any) -> Any:
    """Resize a DCT-reduced image to the size ``resize`` gives the *full* image, with the same
    interpolation, so the rest of the transform sees the same geometry (the reduced image's
    rounded-up sides would otherwise shift the centre crop by a pixel on some aspect ratios)."""
    from torchvision.transforms import functional

    target = resize.size if isinstance(resize.size, int) else resize.size[0]
    w, h = full_size
    short, long = min(w, h), max(w, h)
    new_long = int(target * long / short)
    if resize.max_size is not None and new_long > resize.max_size:
        target, new_long = int(resize.max_size * target / new_long), resize.max_size
    ow, oh = (target, new_long) if w <= h else (new_long, target)
    return functional.resize(img, [oh, ow], resize.interpolation)


def _error(image_error: str | None, text_ok: bool, score: float) -> str | None:
    if image_error is not None:
        return image_error
    if not text_ok:
        return "missing_text: no caption"
    if not np.isfinite(score):
        return "model_error: non-finite similarity"
    return None


def get_scorer(spec: ModelSpec, opts: ScoreOptions) -> PairScorer:
    """A cached scorer for this Python worker: the model loads on first use only."""
    device = pick_device(opts.device)
    key = (spec, opts, device)
    with _LOCK:
        if key not in _SCORERS:
            _SCORERS[key] = PairScorer(get_model(spec, device), opts)
        return _SCORERS[key]


def score_batches(spec: ModelSpec, opts: ScoreOptions,
                  batches: Iterator[tuple[pd.Series, pd.Series]]) -> Iterator[pd.DataFrame]:
    """The UDF body: loads the model lazily (only if a batch arrives) and scores the stream."""
    batches = iter(batches)
    first = next(batches, None)
    if first is None:
        return
    scorer = get_scorer(spec, opts)
    if scorer.device.type == "cpu":
        _fit_cpu_threads()
    yield from scorer.score_iter(_chain(first, batches))


def _fit_cpu_threads() -> None:
    """Inside a Spark task, let torch use the task's cores only (local mode sets no
    OMP_NUM_THREADS, and oversubscribed OpenMP threads slow CPU inference down badly)."""
    import torch

    cpus = task_cpus()
    if cpus is not None:
        torch.set_num_threads(cpus)


def _chain(first: Any, rest: Iterator) -> Iterator:
    yield first
    yield from rest


def make_score_udf(spec: ModelSpec, opts: ScoreOptions) -> Any:
    """An iterator pandas UDF ``(image binary, text string) -> struct<score, score_error,
    image_embedding, text_embedding>`` for one model. Only ``spec``/``opts`` are shipped."""
    from pyspark.sql.functions import pandas_udf

    @pandas_udf(RESULT_DDL)
    def score_pair(batches: Iterator[tuple[pd.Series, pd.Series]]) -> Iterator[pd.DataFrame]:
        yield from score_batches(spec, opts, batches)

    return score_pair
