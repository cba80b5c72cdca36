"""Scoring: robust decoding, the pandas UDF against open_clip itself, silver writes, resume."""

from __future__ import annotations

import io
import os
import signal
import subprocess
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import pytest
import yaml
from PIL import Image

from etl.config import PROJECT_ROOT, Config, ModelConf, ScoreConf
from etl.score import EVAL_EMBEDDINGS, configure_arrow, pending, score_all, score_pairs, score_table
from etl.tables import BRONZE, EVAL_IMAGES, RUN_STATS, SILVER
from etl.work import work
from tests.helpers.images import encode, header_bomb, jpeg
from tests.helpers.models import TINY_JSON, tiny_state
from tests.helpers.score import PAIR_SCHEMA, pool_rows, write_pairs
from udfs import models
from udfs.imaging import decode_rgb
from udfs.score import PairScorer, ScoreOptions, pick_device, task_gpu

ARROW_KEYS = ("spark.sql.execution.arrow.maxRecordsPerBatch",
              "spark.sql.execution.arrow.maxBytesPerBatch")


# ---------------------------------------------------------------- literal images


def palette(transparent: bool) -> bytes:
    img = Image.new("P", (40, 30), 1)
    img.putpalette([0, 0, 0, 30, 60, 200] + [0] * 762)
    return encode(img, "PNG", **({"transparency": 1} if transparent else {}))


def animated_gif() -> bytes:
    frames = [Image.new("RGB", (32, 32), c) for c in ((255, 0, 0), (0, 0, 255))]
    return encode(frames[0], "GIF", save_all=True, append_images=frames[1:], loop=0)


def animated_png() -> bytes:
    frames = [Image.new("RGBA", (32, 32), c) for c in ((0, 200, 0, 255), (0, 0, 255, 255))]
    return encode(frames[0], "PNG", save_all=True, append_images=frames[1:])


# kind -> (bytes, expected RGB at (0, 0)); all of these must decode and score
CONVERTIBLE = {
    "rgb_jpeg": (jpeg((200, 30, 30)), (200, 30, 30)),
    "rgb_png": (encode(Image.new("RGB", (50, 70), (10, 200, 90)), "PNG"), (10, 200, 90)),
    "gray_jpeg": (encode(Image.new("L", (64, 64), 90), "JPEG"), (90, 90, 90)),
    "cmyk_jpeg": (encode(Image.new("CMYK", (64, 48), (0, 255, 255, 0)), "JPEG", quality=95),
                  (255, 0, 0)),
    "palette": (palette(False), (30, 60, 200)),
    "palette_transparent": (palette(True), (255, 255, 255)),
    "la_transparent": (encode(Image.new("LA", (30, 30), (40, 0)), "PNG"), (255, 255, 255)),
    "rgba_opaque": (encode(Image.new("RGBA", (30, 30), (0, 0, 250, 255)), "PNG"), (0, 0, 250)),
    "gray16": (encode(Image.new("I;16", (30, 30), 32896), "PNG"), (128, 128, 128)),
    "int32_tiff": (encode(Image.new("I", (30, 30), 65535), "TIFF"), (255, 255, 255)),
    "float_tiff": (encode(Image.new("F", (30, 30), 0.5), "TIFF"), (128, 128, 128)),
    "bilevel": (encode(Image.new("1", (30, 30), 1), "PNG"), (255, 255, 255)),
    "animated_gif": (animated_gif(), (255, 0, 0)),
    "animated_png": (animated_png(), (0, 200, 0)),
    "one_pixel": (encode(Image.new("RGB", (1, 1), (7, 8, 9)), "PNG"), (7, 8, 9)),
}
# kind -> (bytes, error prefix); none of these may fail a task
BROKEN = {
    "zero_byte": (b"", "empty"),
    "null_bytes": (None, "empty"),
    "garbage": (b"this is not an image at all" * 10, "undecodable"),
    "truncated_jpeg": (jpeg(size=(300, 200))[:700], "decode_error"),
    "header_bomb": (header_bomb(), "too_large"),
    "over_limit": (jpeg(size=(600, 500)), "too_large"),  # 300k px > the 250k limit below
}
MAX_PIXELS = 250_000


@pytest.mark.parametrize("kind", sorted(CONVERTIBLE))
def test_decode_converts_to_rgb(kind):
    data, expected = CONVERTIBLE[kind]
    img, err = decode_rgb(data, MAX_PIXELS)
    assert err is None
    assert img.mode == "RGB"
    assert np.abs(np.array(img.getpixel((0, 0))) - expected).max() <= 3


@pytest.mark.parametrize("kind", sorted(BROKEN))
def test_decode_bad_images_give_errors(kind):
    data, prefix = BROKEN[kind]
    img, err = decode_rgb(data, MAX_PIXELS)
    assert img is None
    assert err.startswith(prefix), err


def test_a_low_limit_does_not_leak_into_later_decodes():
    big = jpeg(size=(800, 600))  # 480k px: over the 250k limit, far under the default
    assert decode_rgb(big, MAX_PIXELS)[1].startswith("too_large")
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a DecompressionBombWarning would fail the decode
        img, err = decode_rgb(big)
    assert err is None and img.size == (800, 600)


# ---------------------------------------------------------------- the UDF vs open_clip


@pytest.fixture(scope="module")
def weights(tmp_path_factory):
    """Two random dfn-tiny checkpoints (fp32 and fp16 safetensors), never the bundled file."""
    from safetensors.torch import save_file

    root = tmp_path_factory.mktemp("score-weights")
    a, b = root / "tiny-a.safetensors", root / "tiny-b.safetensors"
    save_file(tiny_state(0), str(a))
    save_file({k: v.half() for k, v in tiny_state(1).items()}, str(b))
    return a, b


@pytest.fixture(autouse=True)
def restore_arrow_conf(spark):
    saved = {k: spark.conf.get(k) for k in ARROW_KEYS}
    yield
    for k, v in saved.items():
        spark.conf.set(k, v)


LONG_CAPTION = " ".join(["a very long caption about a red square"] * 200)
PLAIN = ["rgb_jpeg", "rgb_png", "gray_jpeg", "cmyk_jpeg", "palette", "animated_gif", "one_pixel"]


def literal_rows() -> list[tuple]:
    rows = [(f"ok-{k}", data, f"a picture, {k}") for k, (data, _) in CONVERTIBLE.items()]
    rows += [(f"bad-{k}", data, "a red square") for k, (data, _) in BROKEN.items()]
    rows += [("long-caption", jpeg(), LONG_CAPTION), ("no-text", jpeg(), None)]
    return rows


def reference_scores(weights_file: Path, rows: list[tuple]) -> dict[str, tuple]:
    """open_clip's own computation, outside Spark: its loader, transform and tokenizer."""
    import open_clip
    import torch

    models.register_config(TINY_JSON)
    model, _, preprocess = open_clip.create_model_and_transforms(
        "dfn-tiny", pretrained=str(weights_file))
    tokenizer = open_clip.get_tokenizer("dfn-tiny")
    model.eval()
    out = {}
    with torch.inference_mode():
        for uid, data, text in rows:
            img = model.encode_image(preprocess(Image.open(io.BytesIO(data))).unsqueeze(0),
                                     normalize=True)[0]
            txt = model.encode_text(tokenizer([text]), normalize=True)[0]
            out[uid] = (float(img @ txt), img.numpy(), txt.numpy())
    return out


@pytest.fixture(scope="module")
def scored(spark, weights):
    """Literal edge-case rows over 3 partitions, several Arrow batches each, scored once."""
    conf = ScoreConf(batch_size=3, device="cpu", max_records_per_batch=4,
                     max_image_pixels=MAX_PIXELS, decode_threads=2)
    configure_arrow(spark, conf)
    rows = literal_rows()
    df = spark.createDataFrame(spark.sparkContext.parallelize(rows, 3), PAIR_SCHEMA)
    model = ModelConf(name=TINY_JSON, pretrained=str(weights[0]), model_id="tiny-a")
    out = score_pairs(df, model, conf, run_id="t1").collect()
    return rows, {r["uid"]: r for r in out}


def test_udf_scores_equal_open_clip(scored, weights):
    rows, got = scored
    plain = [r for r in rows if r[0].removeprefix("ok-") in PLAIN or r[0] == "long-caption"]
    ref = reference_scores(weights[0], plain)
    for uid, (score, img, txt) in ref.items():
        row = got[uid]
        assert row["score_error"] is None, uid
        assert row["score"] == pytest.approx(score, abs=1e-5), uid
        np.testing.assert_allclose(row["image_embedding"], img, atol=1e-5)
        np.testing.assert_allclose(row["text_embedding"], txt, atol=1e-5)


def test_udf_every_row_comes_back_with_model_and_run(scored):
    rows, got = scored
    assert sorted(got) == sorted(r[0] for r in rows)
    assert {(r["model_id"], r["run_id"]) for r in got.values()} == {("tiny-a", "t1")}
    assert all(r["scored_at"] is not None for r in got.values())


def test_udf_converts_odd_modes_and_scores_them(scored):
    _, got = scored
    for kind in CONVERTIBLE:
        row = got[f"ok-{kind}"]
        assert row["score_error"] is None and -1.0 <= row["score"] <= 1.0, kind
        img, txt = np.array(row["image_embedding"]), np.array(row["text_embedding"])
        assert np.linalg.norm(img) == pytest.approx(1.0, abs=1e-4)
        assert row["score"] == pytest.approx(float(img @ txt), abs=1e-5)  # raw cosine


def test_udf_bad_rows_get_null_score_and_reason(scored):
    _, got = scored
    for kind, (_, prefix) in BROKEN.items():
        row = got[f"bad-{kind}"]
        assert row["score"] is None and row["image_embedding"] is None, kind
        assert row["score_error"].startswith(prefix), (kind, row["score_error"])
        assert len(row["text_embedding"]) == 64  # the caption still has its embedding
    no_text = got["no-text"]
    assert no_text["score"] is None and no_text["text_embedding"] is None
    assert no_text["score_error"].startswith("missing_text")
    assert len(no_text["image_embedding"]) == 64


def test_device_choice_on_the_driver():
    import torch

    assert task_gpu() is None
    assert pick_device("cpu") == "cpu"
    assert pick_device("cuda:3") == "cuda:3"
    if not torch.cuda.is_available():
        assert pick_device("auto") == "cpu"
        with pytest.raises(RuntimeError, match="no CUDA"):
            pick_device("cuda")


def test_embeddings_can_be_switched_off(weights):
    spec = models.resolve(TINY_JSON, str(weights[0]), "tiny-a")
    scorer = PairScorer(models.get_model(spec, "cpu"), ScoreOptions(embeddings=False))
    out = scorer.score([jpeg(), b""], ["a red square", "x"])
    assert out["image_embedding"].isna().all() and out["text_embedding"].isna().all()
    assert np.isfinite(out["score"][0]) and np.isnan(out["score"][1])


@pytest.mark.gpu
def test_gpu_scores_match_cpu(weights):
    import torch

    if not torch.cuda.is_available():
        pytest.skip("no CUDA device")
    spec = models.resolve(TINY_JSON, str(weights[0]), "tiny-a")
    images = [jpeg((i * 40 % 255, 90, 200 - i * 30), (64 + i * 8, 64)) for i in range(6)]
    texts = [f"a picture number {i}" for i in range(6)]
    cpu = PairScorer(models.get_model(spec, "cpu"), ScoreOptions(device="cpu")).score(images, texts)
    opts = ScoreOptions(device="auto", precision="auto")
    gpu_scorer = PairScorer(models.get_model(spec, pick_device("auto")), opts)
    assert gpu_scorer.device.type == "cuda" and gpu_scorer.amp_dtype == torch.bfloat16
    gpu = gpu_scorer.score(images, texts)
    np.testing.assert_allclose(gpu["score"], cpu["score"], atol=2e-2)


# ---------------------------------------------------------------- silver tables


def config(lake, weights, **score) -> Config:
    cfg = Config()
    cfg.lakehouse = lake.conf
    cfg.score = ScoreConf(
        models=[ModelConf(TINY_JSON, str(weights[0]), "tiny-a"),
                ModelConf(TINY_JSON, str(weights[1]), "tiny-b")],
        batch_size=4, device="cpu", files_per_commit=1, **score)
    return cfg


def test_pending_is_the_per_model_anti_join(spark):
    bronze = spark.createDataFrame([(f"u{i}", None, "t") for i in range(5)], PAIR_SCHEMA)
    silver = spark.createDataFrame([("u0", "a"), ("u1", "a"), ("u2", "b")], "uid string, model_id string")
    assert sorted(r.uid for r in pending(bronze, silver, "a").collect()) == ["u2", "u3", "u4"]
    assert pending(bronze, None, "a").count() == 5


def test_a_streams_rows_are_counted_from_its_tagged_commits(spark, lake):
    df = spark.createDataFrame([(f"u{i}", "m") for i in range(5)], "uid string, model_id string")
    assert lake.tagged_rows(SILVER, "t1") is None  # no table yet
    lake.append(df, SILVER, txnAppId="app", txnVersion=0, userMetadata="t1")
    lake.append(df, SILVER, txnAppId="app", txnVersion=0, userMetadata="t1")  # replay: skipped
    lake.append(df.limit(2), SILVER, txnAppId="app", txnVersion=1, userMetadata="t1")
    assert lake.tagged_rows(SILVER, "t1") == 7
    since = lake.version(SILVER)
    lake.append(df.limit(3), SILVER, userMetadata="other writer")
    lake.append(df.limit(4), SILVER, txnAppId="app2", txnVersion=0, userMetadata="t2")
    assert lake.tagged_rows(SILVER, "t2", since) == 4
    assert lake.tagged_rows(SILVER, "t1", since) is None  # only commits after ``since``
    assert lake.tagged_rows(SILVER, "t2", lake.version(SILVER)) is None


def test_only_a_new_checkpoint_over_existing_rows_anti_joins():
    from etl.score import skips_done, source_rewritten

    assert skips_done(fresh=True, had_rows=True)
    assert not skips_done(fresh=True, had_rows=False)  # nothing there to skip
    assert not skips_done(fresh=False, had_rows=True)  # Delta skips committed batch ids itself
    assert source_rewritten(RuntimeError("[DELTA_SOURCE_TABLE_IGNORE_CHANGES] ..."))
    assert not source_rewritten(RuntimeError("Python worker exited unexpectedly"))


@pytest.mark.slow
def test_score_all_models_side_by_side_and_resume(lake, weights):
    rows = pool_rows(9) + [("u-bad", b"\x00\x01broken", "caption bad")]
    write_pairs(lake, BRONZE, rows, files=2)
    write_pairs(lake, EVAL_IMAGES, pool_rows(3, prefix="e"), files=1)
    cfg = config(lake, weights)
    cfg.score.files_per_commit = 16  # chunking itself is covered by the kill-and-resume test

    counts = score_all(lake, cfg, "r1")[SILVER]
    assert counts == {"source_rows": 10, "pending[tiny-a]": 10, "scored[tiny-a]": 10,
                      "errors[tiny-a]": 1, "pending[tiny-b]": 10, "scored[tiny-b]": 10,
                      "errors[tiny-b]": 1, **work(20, 20, 10)}  # rows scored, of 10 bronze
    silver = lake.read(SILVER)
    assert silver.count() == 20 and silver.select("uid", "model_id").distinct().count() == 20
    a = {r.uid: r.score for r in silver.filter("model_id = 'tiny-a'").collect()}
    b = {r.uid: r.score for r in silver.filter("model_id = 'tiny-b'").collect()}
    assert a.keys() == b.keys() == {r[0] for r in rows}
    assert a["u-bad"] is None and all(a[u] != b[u] for u in a if u != "u-bad")
    evals = lake.read(EVAL_EMBEDDINGS).collect()
    assert len(evals) == 6 and all(len(r.image_embedding) == 64 for r in evals)
    stats = {r.metric: r.value for r in lake.read(RUN_STATS).filter("run_id = 'r1'").collect()}
    assert stats["scored[tiny-b]"] == 10

    assert score_table(lake, BRONZE, SILVER, cfg, "r2")["scored[tiny-a]"] == 0
    lake.delete(SILVER, "model_id = 'tiny-b' AND uid IN ('u001', 'u004', 'u-bad')")
    again = score_table(lake, BRONZE, SILVER, cfg, "r3")  # checkpoint says done; silver does not
    assert (again["scored[tiny-a]"], again["scored[tiny-b]"]) == (0, 3)
    silver = lake.read(SILVER)
    assert silver.count() == 20 and silver.select("uid", "model_id").distinct().count() == 20
    assert silver.filter("run_id = 'r3'").count() == 3


@pytest.mark.slow
def test_killed_run_resumes_and_scores_each_pair_once(lake, weights, tmp_path):
    n, files = 16, 4
    write_pairs(lake, BRONZE, pool_rows(n), files=files)
    conf_file = tmp_path / "score.yaml"
    conf_file.write_text(yaml.safe_dump({
        "spark": {"master": "local[1]", "conf": {"spark.sql.shuffle.partitions": "1",
                                                 "spark.default.parallelism": "1",
                                                 "spark.driver.memory": "1g"}},
        "lakehouse": {"root": lake.conf.root},
        "score": {"models": [{"name": TINY_JSON, "pretrained": str(weights[0]),
                              "model_id": "tiny-a"}],
                  "device": "cpu", "batch_size": 4, "files_per_commit": 1},
    }))
    # a killed driver leaves its scratch dir behind: keep it under tmp_path
    env = {**os.environ, "PYTHONPATH": str(PROJECT_ROOT), "SPARK_LOCAL_DIRS": str(tmp_path)}
    env.pop("PYSPARK_GATEWAY_PORT", None)
    proc = subprocess.Popen([sys.executable, "-m", "etl.jobs.score", "--conf", str(conf_file)],
                            cwd=PROJECT_ROOT, env=env, start_new_session=True,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    # version 0 creates the empty table, each chunk appends one version
    first_chunk = Path(lake.path(SILVER)) / "_delta_log" / f"{1:020d}.json"
    try:
        deadline = time.time() + 600
        while not first_chunk.exists() and proc.poll() is None and time.time() < deadline:
            time.sleep(0.1)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    assert first_chunk.exists(), "the scoring job never committed a chunk"
    partial = lake.read(SILVER).count()
    assert 0 < partial < n  # killed midway, chunks committed so far are kept

    cfg = config(lake, weights)
    cfg.score.models = cfg.score.models[:1]
    cfg.score.files_per_commit = 16  # the rest in one chunk: resuming need not match chunking
    counts = score_table(lake, BRONZE, SILVER, cfg, "resumed")
    assert counts["pending[tiny-a]"] == n - partial
    assert counts["scored[tiny-a]"] == n - partial
    silver = lake.read(SILVER)
    assert silver.count() == n and silver.select("uid").distinct().count() == n
    assert {r.uid for r in silver.collect()} == {r[0] for r in pool_rows(n)}
