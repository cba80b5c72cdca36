"""train-dfn: a few real training steps on a Delta table, streamed from staged parquet files
(never through the driver), checkpoints that reload exactly, seeded repeatability, the
per-process streaming reader, and TorchDistributor in local mode with 2 processes."""

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


def staging(lake, run_id=""):
    return lake.under("_staging", "train-dfn", run_id)


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
    data = card["data"]
    assert data["rows"] == len(blobs)  # the null-image and null-text rows never arrive
    assert data["held_out"] == 0 and "val_pairs" not in card["metrics"]  # < 200 rows: no val
    assert data["train_pairs"] == len(blobs) and data["staged_files"] >= 4
    assert data["epochs_completed"] >= 1 and data["rows_seen"] == len(blobs)
    assert data["undecodable_seen"] == 1 and "undecodable" not in data
    assert lake.store.listdir(staging(lake)) == []  # the staged files are gone
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
    spec = TrainSpec(model=MODEL, steps=8, batch_size=16, device="cpu", progress=False)
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
        spec = TrainSpec(model=MODEL, steps=5, batch_size=8, seed=seed, device="cpu",
                         progress=False)
        return train(spec, blobs, texts).losses
    first = losses(0)
    assert losses(0) == first
    assert losses(1) != first


def test_train_spec_defaults_are_the_train_config_defaults():
    from etl.config import MIN_ROWS_FOR_VAL
    from udfs.train import TrainSpec, split_validation

    spec, conf = TrainSpec(model=MODEL), TrainConf()
    for name in ("steps", "batch_size", "lr", "weight_decay", "seed", "device", "val_fraction",
                 "shuffle_buffer"):
        assert getattr(spec, name) == getattr(conf, name), name
    assert split_validation(MIN_ROWS_FOR_VAL - 1, 0.5, 0)[1] == []  # too few: every row trains
    train_idx, val_idx = split_validation(MIN_ROWS_FOR_VAL, 0.5, 0)
    assert len(val_idx) == MIN_ROWS_FOR_VAL // 2 and not set(train_idx) & set(val_idx)


def test_training_decodes_as_scoring_does():
    from udfs.imaging import decode, decode_rgb

    png = tiny_png(3)
    assert decode(png, lambda img: img.size) == decode_rgb(png)[0].size
    assert decode(b"not an image", lambda img: 1 / 0) is None  # never preprocessed


def test_batch_order_covers_each_epoch_and_repeats():
    from udfs.train import batch_order

    batches = [b.tolist() for b in batch_order(10, 4, 5, seed=3)]
    assert [len(b) for b in batches] == [4] * 5  # partial last batch of an epoch dropped
    assert len(set(batches[0] + batches[1])) == 8  # no repeats within an epoch
    assert batches == [b.tolist() for b in batch_order(10, 4, 5, seed=3)]
    assert [len(b) for b in batch_order(3, 8, 2, seed=0)] == [3, 3]  # batch capped at n


@pytest.mark.slow
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
    # each rank streamed its own files: their first passes add up to every row, once
    assert card["data"]["rows_seen"] == card["data"]["rows"] == len(clean_pairs(pool)[0])
    assert card["data"]["undecodable_seen"] == 1


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
    assert not lake.store.exists(staging(lake, "r"))


def test_train_dfn_streams_repeatably_and_never_collects_training_rows(
        spark, lake, pool, tmp_path, monkeypatch):
    import etl.train
    from etl.train import train_dfn

    write_bronze(spark, lake, pool)
    collected: list[list[str]] = []
    frame = type(spark.range(1))
    for method in ("collect", "toLocalIterator", "toPandas", "toArrow"):
        original = getattr(frame, method)
        def spy(self, *a, _original=original, **kw):
            collected.append(list(self.columns))
            return _original(self, *a, **kw)
        monkeypatch.setattr(frame, method, spy)

    def run(run_id):
        out = tmp_path / f"{run_id}.safetensors"
        conf = TrainConf(model=MODEL, out=str(out), steps=6, batch_size=8, device="cpu")
        card = train_dfn(lake, conf, run_id, progress=False)
        assert not lake.store.exists(staging(lake, run_id))
        return out.read_bytes(), card

    first, card = run("a")
    again, _ = run("b")
    assert first == again  # same seed, same table: the same weights, byte for byte
    assert card["data"]["train_pairs"] == card["data"]["rows"]
    assert not hasattr(etl.train, "collect_pairs")
    assert collected and not [c for c in collected if "image" in c], collected


def test_staging_folder_is_removed_when_training_fails(spark, lake, pool, tmp_path,
                                                        monkeypatch):
    import udfs.train
    from etl.train import train_dfn

    write_bronze(spark, lake, pool)
    seen = []
    def fail(spec, files, val, rank=0, world_size=1, store=None):
        seen.extend(files)
        assert all(store.exists(f) for f in files)
        raise RuntimeError("boom")
    monkeypatch.setattr(udfs.train, "train_stream", fail)
    conf = TrainConf(model=MODEL, out=str(tmp_path / "x.safetensors"), steps=2, batch_size=4)
    with pytest.raises(RuntimeError, match="boom"):
        train_dfn(lake, conf, "failing")
    assert len(seen) >= 4 and all(f.startswith(staging(lake, "failing")) for f in seen)
    assert not lake.store.exists(staging(lake, "failing"))


def write_parquet_files(folder, rows, n_files):
    """``rows`` of ``(uid, image, text)`` split round-robin into ``n_files`` parquet files."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    files = []
    for i in range(n_files):
        part = rows[i::n_files]
        table = pa.table({"uid": [r[0] for r in part],
                          "image": pa.array([r[1] for r in part], pa.binary()),
                          "text": [r[2] for r in part]})
        files.append(str(folder / f"part-{i:05d}.parquet"))
        pq.write_table(table, files[-1])
    return files


def test_each_rank_streams_its_own_files_in_a_seeded_order(tmp_path):
    from udfs.trainstream import epoch_rows, rank_files

    rows = [(f"u{i:03d}", b"x", f"t{i}") for i in range(40)]
    files = write_parquet_files(tmp_path, rows, 4)
    assert rank_files(files[::-1], 1, 2) == [files[1], files[3]]
    def uids(rank, seed=0, epoch=0, world=2):
        return [r[0] for r in epoch_rows(files, rank, world, seed, epoch, buffer=7)]
    r0, r1 = uids(0), uids(1)
    assert not set(r0) & set(r1) and sorted(r0 + r1) == [r[0] for r in rows]
    assert len(r0) == len(set(r0)) == 20
    assert uids(0) == r0  # same seed, same order
    assert uids(0, seed=1) != r0 and sorted(uids(0, seed=1)) == sorted(r0)
    assert uids(0, epoch=1) != r0  # each epoch reshuffles
    assert sorted(uids(0, world=1)) == [r[0] for r in rows]


def tiny_png(value: int) -> bytes:
    import io

    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", (4, 4), (value, value, value)).save(buf, format="PNG")
    return buf.getvalue()


def test_stream_batches_loop_epochs_skip_undecodable_and_fail_clearly(tmp_path):
    import numpy as np
    import torch

    from udfs.train import TrainSpec
    from udfs.trainstream import StreamStats, stream_batches

    rows = [(f"u{i:03d}", tiny_png(i), f"{i}") for i in range(12)]
    rows += [("bad", b"not an image", "99"), ("none", None, "98")]
    files = write_parquet_files(tmp_path, rows, 4)
    prep = (lambda img: torch.tensor(np.asarray(img), dtype=torch.float32),
            lambda texts: torch.tensor([[int(t)] for t in texts]))
    spec = TrainSpec(model=MODEL, steps=7, batch_size=4, shuffle_buffer=5)
    def run(world=1, rank=0, **kw):
        stats = StreamStats()
        batches = list(stream_batches(files, prep, TrainSpec(**{**spec.__dict__, **kw}), rank,
                                      world, stats))
        return [b[1].flatten().tolist() for b in batches], stats
    ids, stats = run()
    assert len(ids) == 7 and all(len(b) == 4 for b in ids)
    assert sorted(sum(ids[:3], [])) == list(range(12))  # one epoch: every pair once
    assert sum(ids[3:6], []) != sum(ids[:3], [])  # the next epoch in another order
    assert (stats.rows_seen, stats.undecodable_seen, stats.epochs) == (14, 2, 2)
    assert run()[0] == ids and run(seed=5)[0] != ids
    two = [run(world=2, rank=r, batch_size=8)[0] for r in (0, 1)]
    assert all(len(b) == 7 and len(b[0]) == 4 for b in two)
    with pytest.raises(ValueError, match="fewer than its batch of 16"):
        run(batch_size=16)
    (tmp_path / "bad").mkdir()
    bad = write_parquet_files(tmp_path / "bad", rows[12:], 1)  # nothing decodable
    with pytest.raises(ValueError, match="0 decodable image-text pairs"):
        list(stream_batches(bad, prep, spec))


def test_validation_is_held_out_on_the_executors_and_capped(spark, lake, tmp_path, monkeypatch):
    import etl.train
    from etl.train import train_dfn

    rows = [(f"{i:032x}", tiny_png(i), f"shade {i}", "clean") for i in range(240)]
    write_bronze(spark, lake, rows)
    monkeypatch.setattr(etl.train, "MAX_VAL_PAIRS", 3)
    conf = TrainConf(model=MODEL, out=str(tmp_path / "v.safetensors"), steps=2, batch_size=8,
                     device="cpu")
    card = train_dfn(lake, conf, "val", progress=False)
    data = card["data"]
    held = spark.createDataFrame(rows, "uid string, image binary, text string, k string") \
        .where(etl.train.held_out(0, 0.05)).count()
    assert 0 < data["held_out"] == held < 30  # about 5% of 240, chosen by uid hash
    assert data["train_pairs"] + data["held_out"] == data["rows"] == 240
    assert data["val_collected"] == data["val_cap"] == card["metrics"]["val_pairs"] == 3
    assert not lake.store.exists(staging(lake, "val"))
