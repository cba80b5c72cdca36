"""Train or fine-tune a small open_clip filtering network (DFN) with open_clip's CLIP loss.

Everything torch-side lives here; ``etl.train`` only stages the rows. Two data paths share
one training loop: :func:`train_stream` (``dfn-curate train-dfn``) streams each process's own
slice of staged parquet files through a seeded shuffle buffer (:mod:`udfs.trainstream`), and
:func:`train`/:func:`fit` (the induced comparison of ``dfn-curate evaluate``) take raw image
bytes and captions in memory, decoded and preprocessed once. Images are preprocessed with
the model's own eval transform (the one scoring uses) and batches come in a seeded order, so a
run with the same inputs and seed is repeatable. Checkpoints are safetensors (float16, to stay
small) plus a JSON model card; the trained model is rounded to float16 before it is returned,
so scores from the returned model equal scores from the reloaded checkpoint.

``distributed_main`` is the entry ``pyspark.ml.torch.distributor.TorchDistributor`` runs in
each process: it joins a gloo (CPU) or NCCL (GPU) process group, streams its files, wraps the
model in DistributedDataParallel and returns the checkpoint bytes to the driver.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import random
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from etl.config import MIN_ROWS_FOR_VAL, TrainConf

CARD_SUFFIX = ".card.json"
MAX_LOGIT_SCALE = math.log(100.0)
SHIFT = 0.1  # largest random translation, as a fraction of the image side


@dataclass
class TrainSpec:
    """One training run: plain values only, so it pickles into TorchDistributor processes.
    Defaults are ``train:``'s (:class:`etl.config.TrainConf`)."""

    model: str
    init_checkpoint: str | None = None
    out: str | None = None
    steps: int = TrainConf.steps
    batch_size: int = TrainConf.batch_size
    lr: float = TrainConf.lr
    weight_decay: float = TrainConf.weight_decay
    warmup: int | None = None  # default: 10% of steps, at most 100
    seed: int = TrainConf.seed
    device: str = TrainConf.device
    val_fraction: float = TrainConf.val_fraction
    augment: bool = True  # random horizontal flips and translations (never colour changes)
    shuffle_buffer: int = TrainConf.shuffle_buffer  # rows per process in the shuffle buffer
    progress: bool = True
    card: dict[str, Any] = field(default_factory=dict)  # provenance copied into the card


@dataclass
class TrainResult:
    model: Any
    preprocess: Any
    tokenizer: Any
    losses: list[float]
    card: dict[str, Any]


def resolve_device(device: str) -> str:
    """``auto`` -> ``cuda`` when a GPU is visible, else ``cpu``."""
    import torch

    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return device


def register_config(config_path: str) -> str:
    """Register an open_clip model-config JSON; returns its model name (the file stem)."""
    import open_clip

    path = Path(config_path)
    if not path.is_file():
        raise FileNotFoundError(f"open_clip model config {config_path} not found")
    open_clip.add_model_config(path)
    return path.stem


def create(config_path: str, checkpoint: str | None = None, device: str = "cpu"):
    """Build ``(model, preprocess, tokenizer)``, optionally loading a checkpoint (strictly, with
    :func:`udfs.models.load_weights`, the loader scoring uses)."""
    import open_clip

    from udfs.models import load_weights

    name = register_config(config_path)
    model, _, preprocess = open_clip.create_model_and_transforms(name, device=device)
    if checkpoint:
        load_weights(model, checkpoint)
    return model, preprocess, open_clip.get_tokenizer(name)


def card_path(checkpoint: str | Path) -> Path:
    """``x.safetensors`` -> ``x.card.json``."""
    p = Path(checkpoint)
    stem = p.name[: -len(".safetensors")] if p.name.endswith(".safetensors") else p.name
    return p.with_name(stem + CARD_SUFFIX)


def checkpoint_bytes(model) -> bytes:
    """The model's weights as float16 safetensors bytes, identical for identical weights in any
    process: safetensors writes its metadata map in a per-process random order, so it holds
    one key (each tensor's header already names its dtype)."""
    import torch
    from safetensors.torch import save

    state = {k: v.detach().to("cpu", torch.float16 if v.is_floating_point() else v.dtype)
             .contiguous() for k, v in model.state_dict().items()}
    return save(state, metadata={"format": "pt"})


def write_checkpoint(data: bytes, card: dict[str, Any], out: str | Path) -> Path:
    """Write checkpoint bytes to ``out`` and the card next to it; returns the card path."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_bytes(data)
    path = card_path(out)
    path.write_text(json.dumps(card, indent=2, sort_keys=True) + "\n")
    return path


def seed_everything(seed: int) -> None:
    import numpy as np
    import torch

    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def prepare(blobs: list[bytes], texts: list[str], preprocess, tokenizer):
    """Decode and tokenize once; returns ``(images, tokens, kept_indices)``."""
    import torch

    from udfs.imaging import decode

    pairs = [(i, decode(b, preprocess)) for i, b in enumerate(blobs) if b is not None]
    kept = [i for i, t in pairs if t is not None]
    if not kept:
        return torch.empty(0), torch.empty(0, dtype=torch.long), kept
    images = torch.stack([t for _, t in pairs if t is not None])
    return images, tokenizer([texts[i] for i in kept]), kept


def split_validation(n: int, fraction: float, seed: int) -> tuple[list[int], list[int]]:
    """Seeded train/validation split of ``range(n)`` (no validation below ``MIN_ROWS_FOR_VAL``)."""
    order = list(range(n))
    random.Random(seed).shuffle(order)
    n_val = int(n * fraction) if n >= MIN_ROWS_FOR_VAL else 0
    return sorted(order[n_val:]), sorted(order[:n_val])


def batch_order(n: int, batch_size: int, steps: int, seed: int):
    """Yield ``steps`` index batches: seeded epoch permutations, last partial batch dropped."""
    import numpy as np

    rng = np.random.default_rng(seed)
    batch_size = min(batch_size, n)
    done = 0
    while done < steps:
        perm = rng.permutation(n)
        for start in range(0, n - batch_size + 1, batch_size):
            if done == steps:
                return
            yield perm[start:start + batch_size]
            done += 1


def augment(images):
    """Randomly flip (horizontally) and shift (up to ``SHIFT``, edges replicated) each image
    of a preprocessed batch. Colours stay as they are: captions name them."""
    import torch

    n, _, h, w = images.shape
    flip = torch.rand(n) < 0.5
    x = torch.where(flip[:, None, None, None], images.flip(3), images)
    p = max(1, round(min(h, w) * SHIFT))
    padded = torch.nn.functional.pad(x, (p, p, p, p), mode="replicate")
    dx, dy = torch.randint(0, 2 * p + 1, (2, n))
    return torch.stack([padded[i, :, dy[i]:dy[i] + h, dx[i]:dx[i] + w] for i in range(n)])


def warmup_steps(spec: TrainSpec) -> int:
    """``spec.warmup``, or 10% of the steps (at most 100)."""
    return spec.warmup if spec.warmup is not None else max(1, min(100, spec.steps // 10))


def lr_lambda(warmup: int, steps: int):
    """Linear warmup then cosine decay to zero, as a LambdaLR multiplier."""
    def fn(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = (step - warmup) / max(1, steps - warmup)
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))
    return fn


def optimizer(model, lr: float, weight_decay: float):
    """AdamW with open_clip's convention: no decay on gains, biases, embeddings and scale."""
    import torch

    def no_decay(name: str, p) -> bool:
        return p.ndim < 2 or "bn" in name or "ln" in name or "bias" in name or \
            "logit_scale" in name or "embedding" in name
    params = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    groups = [{"params": [p for n, p in params if no_decay(n, p)], "weight_decay": 0.0},
              {"params": [p for n, p in params if not no_decay(n, p)],
               "weight_decay": weight_decay}]
    return torch.optim.AdamW(groups, lr=lr, betas=(0.9, 0.98), eps=1e-6)


def train(spec: TrainSpec, blobs: list[bytes], texts: list[str], rank: int = 0,
          world_size: int = 1) -> TrainResult:
    """Train on ``(blobs, texts)`` for ``spec.steps`` steps; returns the float16-rounded model."""
    seed_everything(spec.seed)
    model, preprocess, tokenizer = create(spec.model, spec.init_checkpoint,
                                          resolve_device(spec.device))
    images, tokens, kept = prepare(blobs, texts, preprocess, tokenizer)
    return fit(spec, (model, preprocess, tokenizer), images, tokens, len(blobs), rank, world_size)


def fit(spec: TrainSpec, built: tuple, images, tokens, n_rows: int, rank: int = 0,
        world_size: int = 1) -> TrainResult:
    """Train ``built = (model, preprocess, tokenizer)`` on preprocessed tensors."""
    model, preprocess, tokenizer = built
    if len(images) < 2:
        raise ValueError(f"need at least 2 decodable image-text pairs to train, got {len(images)}")
    if world_size > 1 and spec.batch_size % world_size:
        raise ValueError(f"batch_size {spec.batch_size} must divide by {world_size} processes")
    train_idx, val_idx = split_validation(len(images), spec.val_fraction, spec.seed)
    batches = memory_batches(images[train_idx], tokens[train_idx], spec, rank, world_size)
    losses, metrics = _run(spec, model, batches, (images[val_idx], tokens[val_idx]), rank,
                           world_size)
    data = {"rows": n_rows, "decoded": len(images), "train_pairs": len(train_idx),
            "undecodable": n_rows - len(images)}
    card = model_card(spec, model, data, world_size, metrics)
    return TrainResult(model, preprocess, tokenizer, losses, card)


def train_stream(spec: TrainSpec, files: list[str], val: tuple[list[bytes], list[str]],
                 rank: int = 0, world_size: int = 1, store: Any = None) -> TrainResult:
    """Train for ``spec.steps`` steps on this process's slice of the staged parquet ``files``
    (streamed, never loaded whole); ``val = (blobs, texts)`` is the held-out set, in memory.
    The card's ``data`` gets what this process saw in its first pass over its slice."""
    from udfs.trainstream import StreamStats, stream_batches

    if world_size > 1 and spec.batch_size % world_size:
        raise ValueError(f"batch_size {spec.batch_size} must divide by {world_size} processes")
    seed_everything(spec.seed)
    model, preprocess, tokenizer = create(spec.model, spec.init_checkpoint,
                                          resolve_device(spec.device))
    val_images, val_tokens, _ = prepare(*val, preprocess, tokenizer)
    stats = StreamStats()
    batches = stream_batches(files, (preprocess, tokenizer), spec, rank, world_size, stats,
                             store)
    losses, metrics = _run(spec, model, batches, (val_images, val_tokens), rank, world_size)
    data = {"rows_seen": stats.rows_seen, "undecodable_seen": stats.undecodable_seen,
            "epochs_completed": stats.epochs}
    card = model_card(spec, model, data, world_size, metrics)
    return TrainResult(model, preprocess, tokenizer, losses, card)


def memory_batches(images, tokens, spec: TrainSpec, rank: int = 0, world_size: int = 1):
    """``(images, tokens)`` batches of in-memory tensors in :func:`batch_order`; each process
    takes every ``world_size``-th row of a global batch."""
    for idx in batch_order(len(images), spec.batch_size, spec.steps, spec.seed):
        local = idx[rank::world_size]
        yield images[local], tokens[local]


def _run(spec: TrainSpec, model, batches, val: tuple, rank: int,
         world_size: int) -> tuple[list[float], dict[str, Any]]:
    """Train on ``batches``, round to float16, validate on ``val``: ``(losses, metrics)``."""
    from open_clip.loss import ClipLoss

    device = resolve_device(spec.device)
    net = _wrap(model, device, world_size)
    loss_fn = ClipLoss(gather_with_grad=world_size > 1, rank=rank, world_size=world_size)
    started = time.time()
    losses = _loop(spec, net, model, loss_fn, batches, device, rank)
    _round_fp16(model)
    metrics = {"train_time_s": round(time.time() - started, 1),
               **final_loss(losses), **validate(model, *val, device)}
    model.eval()
    return losses, metrics


def _wrap(model, device: str, world_size: int):
    if world_size == 1:
        return model
    from torch.nn.parallel import DistributedDataParallel

    ids = [int(device.split(":")[1])] if device.startswith("cuda:") else None
    return DistributedDataParallel(model, device_ids=ids)


def _loop(spec: TrainSpec, net, model, loss_fn, batches, device: str, rank: int) -> list[float]:
    import torch
    from tqdm.auto import tqdm

    opt = optimizer(model, spec.lr, spec.weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(warmup_steps(spec), spec.steps))
    bar = tqdm(total=spec.steps, desc="train-dfn", disable=not spec.progress or rank != 0)
    losses: list[float] = []
    net.train()
    for images, tokens in batches:
        batch = augment(images) if spec.augment else images
        img_f, txt_f, scale = net(batch.to(device), tokens.to(device))[:3]
        loss = loss_fn(img_f, txt_f, scale)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        with torch.no_grad():
            model.logit_scale.clamp_(0, MAX_LOGIT_SCALE)
        losses.append(float(loss.detach()))
        bar.update(1)
        bar.set_postfix(loss=f"{losses[-1]:.3f}")
    bar.close()
    return losses


def _round_fp16(model) -> None:
    """Round weights to float16 precision in place, so the model equals its checkpoint."""
    import torch

    with torch.no_grad():
        for t in model.state_dict().values():
            if t.is_floating_point():
                t.copy_(t.half().to(t.dtype))


def final_loss(losses: list[float]) -> dict[str, float]:
    """First and final loss (the mean of the last 5% of steps, smoother than one step)."""
    tail = losses[-max(1, len(losses) // 20):]
    return {"first_loss": round(losses[0], 4), "final_loss": round(sum(tail) / len(tail), 4)}


def validate(model, images, tokens, device: str) -> dict[str, float]:
    """Held-out metrics: contrastive loss, and ROC-AUC of true pairs vs shuffled captions."""
    import torch

    if len(images) < 2:
        return {}
    img, txt = embed(model, images, tokens, device)
    scores = (img * txt).sum(1)
    shuffled = (img * txt.roll(1, dims=0)).sum(1)
    logits = model.logit_scale.exp().item() * img @ txt.T
    labels = torch.arange(len(img))
    loss = (torch.nn.functional.cross_entropy(logits, labels)
            + torch.nn.functional.cross_entropy(logits.T, labels)) / 2
    return {"val_pairs": len(img), "val_loss": round(float(loss), 4),
            "val_shuffled_caption_auc": round(roc_auc(scores.tolist(), shuffled.tolist()), 4)}


def roc_auc(positive: list[float], negative: list[float]) -> float:
    """Probability a positive outscores a negative (ties count half): the ROC-AUC."""
    import numpy as np

    pos, neg = np.asarray(positive, float), np.asarray(negative, float)
    if not len(pos) or not len(neg):
        return float("nan")
    both = np.concatenate([pos, neg])
    _, inverse, counts = np.unique(both, return_inverse=True, return_counts=True)
    ranks = (np.cumsum(counts) - (counts - 1) / 2)[inverse]  # average rank of tied values
    return float((ranks[: len(pos)].sum() - len(pos) * (len(pos) + 1) / 2) / (len(pos) * len(neg)))


def embed(model, images, tokens, device: str = "cpu", batch_size: int = 256):
    """L2-normalised image and text embeddings (CPU float tensors) of aligned batches."""
    import torch

    model.eval()
    img_out, txt_out = [], []
    with torch.inference_mode():
        for s in range(0, len(images), batch_size):
            img_out.append(model.encode_image(images[s:s + batch_size].to(device), normalize=True))
            txt_out.append(model.encode_text(tokens[s:s + batch_size].to(device), normalize=True))
    return torch.cat(img_out).float().cpu(), torch.cat(txt_out).float().cpu()


def model_card(spec: TrainSpec, model, data: dict[str, Any], world_size: int,
               metrics: dict[str, Any]) -> dict[str, Any]:
    """The JSON model card: architecture, data provenance, run settings, final metrics."""
    import open_clip
    import torch

    extra = dict(spec.card)
    settings = {k: v for k, v in asdict(spec).items() if k not in ("card", "progress", "out")}
    settings["warmup"] = warmup_steps(spec)
    return {"model_name": Path(spec.model).stem, "architecture_file": spec.model,
            "architecture": json.loads(Path(spec.model).read_text()), "dtype": "float16",
            "parameters": sum(p.numel() for p in model.parameters()),
            "data": {**data, **extra.pop("data", {})},
            "training": {**settings, "world_size": world_size, "loss": "open_clip.loss.ClipLoss",
                         "optimizer": "AdamW", "schedule": "linear warmup + cosine"},
            "metrics": metrics, **extra,
            "versions": {"torch": torch.__version__, "open_clip": open_clip.__version__},
            "created_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}


def distributed_main(spec: dict[str, Any], files: list[str], val: tuple[list, list],
                     store: Any = None) -> dict:
    """TorchDistributor entry: stream this rank's share of ``files`` in a process group;
    returns the card (first-pass counts summed over ranks) and the weights."""
    import torch
    import torch.distributed as dist

    rank, world = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    run = TrainSpec(**spec)
    if run.device.startswith("cuda") or (run.device == "auto" and torch.cuda.is_available()):
        run.device = f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}"
    if world > 1:
        dist.init_process_group("nccl" if run.device.startswith("cuda") else "gloo")
    try:
        result = train_stream(run, files, val, rank, world, store)
        weights = checkpoint_bytes(result.model)
        mine = (hashlib.sha256(weights).hexdigest(), result.card["data"])
        ranks = [mine] * world
        if world > 1:
            dist.all_gather_object(ranks, mine)
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
    # DDP keeps every rank's weights identical, and TorchDistributor keeps whichever rank's
    # output is written last, so every rank returns the same result; the card records every
    # rank's checkpoint digest so that can be checked.
    result.card["training"]["rank_weights_sha256"] = [d for d, _ in ranks]
    result.card["data"].update(merge_stream_counts([c for _, c in ranks]))
    return {"card": result.card, "weights": weights}


def merge_stream_counts(per_rank: list[dict[str, Any]]) -> dict[str, int]:
    """Every rank's first-pass counts as one: rows and undecodable rows summed (the ranks read
    disjoint files), epochs completed by all of them."""
    return {"rows_seen": sum(c["rows_seen"] for c in per_rank),
            "undecodable_seen": sum(c["undecodable_seen"] for c in per_rank),
            "epochs_completed": min(c["epochs_completed"] for c in per_rank)}
