"""Held-out evaluation of a CLIP model: zero-shot classification and image-text retrieval.

Used by ``dfn-curate evaluate`` to compare CLIP models trained on different selections.
Zero-shot classes are text prompts; each class embedding is the normalised mean of its
prompts' embeddings (prompt ensembling). Retrieval counts a hit when a retrieved item carries
the very same caption as the query's pair, since templated captions repeat across images.
"""

from __future__ import annotations

from typing import Any


def class_embeddings(model, tokenizer, prompts: dict[str, list[str]], device: str = "cpu"):
    """``(class names, [C, D] tensor)``: the normalised mean prompt embedding per class."""
    import torch

    names = sorted(prompts)
    rows = []
    with torch.inference_mode():
        for name in names:
            emb = model.encode_text(tokenizer(prompts[name]).to(device), normalize=True)
            rows.append(torch.nn.functional.normalize(emb.float().mean(0), dim=0).cpu())
    return names, torch.stack(rows)


def zero_shot_accuracy(image_emb, labels: list[str | None], names: list[str], class_emb) -> float:
    """Top-1 accuracy over the images whose label is one of ``names`` (NaN if none are)."""
    import torch

    index = {n: i for i, n in enumerate(names)}
    rows = [i for i, label in enumerate(labels) if label in index]
    if not rows:
        return float("nan")
    pred = (image_emb[rows] @ class_emb.T).argmax(1)
    truth = torch.tensor([index[labels[i]] for i in rows])
    return float((pred == truth).float().mean())


def retrieval_recall(image_emb, text_emb, texts: list[str], ks: tuple[int, ...] = (1, 5)) -> dict:
    """Image->text and text->image recall@k over aligned pairs (same caption = a hit)."""
    import torch

    ids = {t: i for i, t in enumerate(dict.fromkeys(texts))}
    caption = torch.tensor([ids[t] for t in texts])
    sim = image_emb @ text_emb.T
    out = {}
    for k in ks:
        k_eff = min(k, len(texts))
        i2t = caption[sim.topk(k_eff, dim=1).indices] == caption[:, None]
        t2i = caption[sim.T.topk(k_eff, dim=1).indices] == caption[:, None]
        out[f"i2t_r{k}"] = float(i2t.any(1).float().mean())
        out[f"t2i_r{k}"] = float(t2i.any(1).float().mean())
    return out


def prepare_eval(blobs: list[bytes], texts: list[str], tasks: dict, preprocess, tokenizer):
    """Decode the eval set once: ``(images, tokens, texts, tasks, undecodable)``, aligned."""
    from udfs.train import prepare

    images, tokens, kept = prepare(blobs, texts, preprocess, tokenizer)
    if not kept:
        raise ValueError("no evaluation image could be decoded")
    aligned = {t: ([labels[i] for i in kept], prompts) for t, (labels, prompts) in tasks.items()}
    return images, tokens, [texts[i] for i in kept], aligned, len(blobs) - len(kept)


def evaluate_clip(model, tokenizer, prepared: tuple, device: str = "cpu") -> dict[str, Any]:
    """Zero-shot accuracy per task (``name -> (labels, class prompts)``) and retrieval recall
    on a :func:`prepare_eval` result."""
    from udfs.train import embed

    images, tokens, texts, tasks, undecodable = prepared
    img, txt = embed(model, images, tokens, device)
    out: dict[str, Any] = {"eval_images": len(texts), "eval_undecodable": undecodable}
    for task, (labels, prompts) in tasks.items():
        names, cls = class_embeddings(model, tokenizer, prompts, device)
        out[f"zeroshot_{task}"] = zero_shot_accuracy(img, labels, names, cls)
    out.update(retrieval_recall(img, txt, texts))
    return out


def induced_runs(spec, pool: tuple, names: list[str], evaluation: tuple) -> list[dict[str, Any]]:
    """Train a CLIP from the same seeded initialisation on each selection and evaluate it.

    ``pool = (blobs, texts, selections per pair)``; ``evaluation = (blobs, texts, tasks)``.
    Images are decoded once; each selection trains ``spec.steps`` steps of
    ``spec.batch_size``, so every selection gets the same compute.
    """
    from udfs.train import create, fit, prepare, resolve_device, seed_everything

    blobs, texts, member = pool
    device = resolve_device(spec.device)
    _, preprocess, tokenizer = create(spec.model, device=device)
    images, tokens, kept = prepare(blobs, texts, preprocess, tokenizer)
    held_out = prepare_eval(*evaluation, preprocess, tokenizer)
    results = []
    for name in names:
        idx = [j for j, i in enumerate(kept) if name in member[i]]
        res: dict[str, Any] = {"n_pairs": len(idx)}
        if len(idx) >= 2:
            seed_everything(spec.seed)
            trained = fit(spec, create(spec.model, device=device), images[idx], tokens[idx],
                          len(idx))
            res.update(trained.card["metrics"])
            res.update(evaluate_clip(trained.model, tokenizer, held_out, device))
        results.append(res)
    return results
