"""train-dfn: a few real training steps on a Delta table, checkpoints that reload exactly,
seeded repeatability, and TorchDistributor in local mode with 2 processes."""

from __future__ import annotations

import hashlib
import json

import pytest

from etl.config import PROJECT_ROOT, TrainConf
from etl.sample import SampleBuilder
from etl.tables import BRONZE

MODEL = str(PROJECT_ROOT / "conf" / "models" / "dfn-tiny.json")


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def pool():
    """A small seeded pool: clean pairs plus noise, as (uid, image, text, label_kind) rows."""
    built = SampleBuilder(n_pairs=70, eval_size=4, seed=11).build()
    rows = [(f"{i:032x}", p.image, p.text, p.meta["label_kind"]) for i, p in enumerate(built.pool)]
    # edge cases: bytes that do not decode, no bytes, no caption (all labelled clean)
    rows += [("e" * 32, b"not an image", "a red circle", "clean"),
             ("f" * 32, None, "a blue star", "clean"),
             ("d" * 32, rows[0][1], None, "clean")]
    return rows


def write_bronze(spark, lake, rows):
    df = spark.createDataFrame(rows, "uid string, image binary, text string, label_kind string")
    lake.overwrite(df.repartition(2), BRONZE)


def clean_pairs(rows):
    ok = [r for r in rows if r[3] == "clean" and r[1] is not None and r[2] is not None]
    ok.sort(key=lambda r: r[0])
    return [r[1] for r in ok], [r[2] for r in ok]


def test_train_dfn_job_lowers_loss_and_writes_a_card(spark, lake, pool, tmp_path):
    from etl.jobs.train_dfn import main

    write_bronze(spark, lake, pool)
    out = tmp_path / "models" / "tiny.safetensors"
    card = main(["--no-progress", "--set", f"lakehouse.root={lake.conf.root}",
                 "--set", f"train.out={out}", "--set", "train.steps=40",
                 "--set", "train.batch_size=16", "--set", "train.lr=0.001"])
    blobs, _ = clean_pairs(pool)
    assert out.is_file() and 1_000_000 < out.stat().st_size < 10_000_000  # float16, a few MB
    on_disk = json.loads((tmp_path / "models" / "tiny.card.json").read_text())
    assert on_disk == card
    assert card["data"]["table"] == lake.name(BRONZE)
    assert card["data"]["delta_version"] == lake.version(BRONZE)
    assert card["data"]["where"] == "label_kind = 'clean'"
    assert card["data"]["rows"] == len(blobs)  # the null-image and null-text rows never arrive
    assert card["data"]["undecodable"] == 1
    assert card["data"]["train_pairs"] + card["metrics"].get("val_pairs", 0) == len(blobs) - 1
    assert card["training"]["steps"] == 40 and card["training"]["batch_size"] == 16
    assert card["architecture"]["embed_dim"] == json.loads(open(MODEL).read())["embed_dim"]
    assert card["metrics"]["final_loss"] < 0.85 * card["metrics"]["first_loss"]


def test_checkpoint_reloads_with_identical_scores(pool, tmp_path):
    import torch

    from udfs import models
    from udfs.train import (
        TrainSpec,
        card_path,
        checkpoint_bytes,
        create,
        embed,
        prepare,
        train,
        write_checkpoint,
    )

    blobs, texts = clean_pairs(pool)
    spec = TrainSpec(model=MODEL, steps=8, batch_size=16, progress=False)
    result = train(spec, blobs, texts)
    out = tmp_path / "m.safetensors"
    write_checkpoint(checkpoint_bytes(result.model), result.card, out)
    assert json.loads(card_path(out).read_text())["training"]["steps"] == 8

    images, tokens, _ = prepare(blobs[:20], texts[:20], result.preprocess, result.tokenizer)
    mismatched = tokens.roll(1, dims=0)
    before = [(i * t).sum(1) for i, t in (embed(result.model, images, tokens),
                                          embed(result.model, images, mismatched))]
    own, _, _ = create(MODEL, str(out))
    scorer = models.load(models.resolve(MODEL, str(out), "tiny"))  # the scoring step's loader
    random_init, _, _ = create(MODEL)
    for model in (own, scorer.model):
        after = [(i * t).sum(1) for i, t in (embed(model, images, tokens),
                                             embed(model, images, mismatched))]
        for b, a in zip(before, after, strict=True):
            torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
    untrained = (lambda i, t: (i * t).sum(1))(*embed(random_init, images, tokens))
    assert not torch.allclose(untrained, before[0], atol=1e-3)
    # Same weights, same bytes: safetensors' metadata map is ordered at random per call, so
    # two metadata keys gave two different files (and digests) for one model.
    assert len({checkpoint_bytes(result.model) for _ in range(16)}) == 1


def test_training_is_seeded(pool):
    from udfs.train import TrainSpec, train

    blobs, texts = clean_pairs(pool)
    def losses(seed):
        spec = TrainSpec(model=MODEL, steps=5, batch_size=8, seed=seed, progress=False)
        return train(spec, blobs, texts).losses
    first = losses(0)
    assert losses(0) == first
    assert losses(1) != first


def test_batch_order_covers_each_epoch_and_repeats():
    from udfs.train import batch_order

    batches = [b.tolist() for b in batch_order(10, 4, 5, seed=3)]
    assert [len(b) for b in batches] == [4] * 5  # partial last batch of an epoch dropped
    assert len(set(batches[0] + batches[1])) == 8  # no repeats within an epoch
    assert batches == [b.tolist() for b in batch_order(10, 4, 5, seed=3)]
    assert [len(b) for b in batch_order(3, 8, 2, seed=0)] == [3, 3]  # batch capped at n


def test_torch_distributor_two_processes_local_mode(spark, lake, pool, tmp_path):
    from etl.train import train_dfn
    from udfs.train import create

    write_bronze(spark, lake, pool)
    out = tmp_path / "dist.safetensors"
    conf = TrainConf(model=MODEL, out=str(out), steps=40, batch_size=16, num_processes=2,
                     device="cpu")
    card = train_dfn(lake, conf, "run-dist", progress=False)
    assert card["training"]["world_size"] == 2 and card["data"]["table"] == lake.name(BRONZE)
    assert card["metrics"]["final_loss"] < card["metrics"]["first_loss"] - 0.1
    create(MODEL, str(out))  # loads strictly
    digests = card["training"]["rank_weights_sha256"]
    assert len(digests) == 2 and len(set(digests)) == 1, digests
    assert hashlib.sha256(out.read_bytes()).hexdigest() == digests[0]


def test_missing_table_and_empty_selection_fail_clearly(spark, lake, pool, tmp_path):
    from etl.train import train_dfn

    conf = TrainConf(model=MODEL, out=str(tmp_path / "x.safetensors"), steps=2, batch_size=4)
    with pytest.raises(FileNotFoundError, match="bronze_pairs"):
        train_dfn(lake, conf, "r")
    write_bronze(spark, lake, pool)
    conf.where = "label_kind = 'no-such-kind'"
    with pytest.raises(ValueError, match="need at least 2"):
        train_dfn(lake, conf, "r")
    assert not (tmp_path / "x.safetensors").exists()
