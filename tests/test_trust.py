"""Issue #11 "Trust": scores tied to their weights, derived tables tied to the bronze version
they cover, and the pixel cap on every decode (dedup thumbnails, export, report)."""

from __future__ import annotations

import io
import json
import re
import shutil
from pathlib import Path

import pytest
import yaml
from PIL import Image
from pyspark.sql import functions as F

from etl.config import (
    Config,
    ConfigError,
    DedupConf,
    LakehouseConf,
    ModelConf,
    ScoreConf,
    SelectConf,
    load_config,
)
from etl.tables import BRONZE, DEDUP, SELECTION, SILVER
from tests.test_models import TINY_JSON, tiny_state
from tests.test_score import PAIR_SCHEMA, encode, header_bomb, jpeg, pool_rows, write_pairs
from udfs import models

# ---------------------------------------------------------------- 3. the pixel cap everywhere

SMALL_CAP = 1_000  # a 96x64 image (6,144 px) is over it


def busy_jpeg() -> bytes:
    """96x64 with a gradient (a flat image has no thumbnail vector at all)."""
    img = Image.new("RGB", (96, 64))
    img.putdata([(x * 2, y * 3, (x + y) % 256) for y in range(64) for x in range(96)])
    return encode(img, "JPEG", quality=90)


def test_dedup_thumbnail_honours_an_explicit_cap(spark):
    from etl.dedup import thumbnail_vector

    assert thumbnail_vector(busy_jpeg(), max_pixels=10_000) is not None
    assert thumbnail_vector(busy_jpeg(), max_pixels=SMALL_CAP) is None
    assert thumbnail_vector(header_bomb()) is None  # the default cap, from the header
    from etl.dedup import thumbnails

    df = spark.createDataFrame([("ok", busy_jpeg(), "t"), ("bomb", header_bomb(), "t")], PAIR_SCHEMA)
    got = {r.uid: r.v for r in df.select("uid", thumbnails(10_000)("image").alias("v")).collect()}
    assert got["ok"] is not None and got["bomb"] is None


def test_export_skips_images_over_the_cap(spark, tmp_path):
    from etl.export import as_supported, write_shards

    gif = encode(Image.new("RGB", (96, 64), (1, 2, 3)), "GIF")
    assert as_supported(gif, max_pixels=10_000)[0] == "jpg"  # re-encoded
    assert as_supported(gif, max_pixels=SMALL_CAP) is None  # over the cap: never decoded
    assert as_supported(jpeg(), max_pixels=SMALL_CAP) is None  # passed-through formats too
    assert as_supported(header_bomb()) is None
    rows = [(f"{i:032x}", f"u{i}", f"t{i}", img, 96, 64, 0.5)
            for i, img in enumerate([jpeg(), header_bomb(), gif])]
    df = spark.createDataFrame(rows, "uid string, url string, text string, image binary, "
                                     "width int, height int, score double")
    stats = write_shards(df, str(tmp_path / "shards"), shard_size=8, max_pixels=10_000)
    assert [(s["count"], s["skipped"]) for s in stats] == [(2, 1)]


def test_report_thumbnail_names_an_image_over_the_cap():
    from etl.report import THUMB, thumbnail

    small = Image.open(io.BytesIO(thumbnail(jpeg(), max_pixels=10_000)))
    big = Image.open(io.BytesIO(thumbnail(jpeg(), max_pixels=SMALL_CAP)))
    assert small.size == (96, 64) and big.size == (THUMB, THUMB)  # grey placeholder
    assert Image.open(io.BytesIO(thumbnail(header_bomb()))).size == (THUMB, THUMB)


# ---------------------------------------------------------------- 1. weights under a model_id


def test_hub_ids_pin_a_revision_and_say_so_in_their_digest():
    spec = models.resolve("hf-hub:org/repo@abc123")
    assert (spec.arch, spec.revision, spec.model_id) == ("hf-hub:org/repo", "abc123",
                                                         "hf-hub:org/repo@abc123")
    assert models.declared_digest(spec) == "revision:abc123"
    conf = ModelConf(name="hf-hub:org/repo", pretrained=None, model_id="dfn", revision="v2")
    assert models.resolve_conf(conf).revision == "v2"
    assert models.declared_digest(models.resolve("hf-hub:org/repo")) is None  # load to know
    assert models.declared_digest(models.resolve("ViT-B-32", "openai")) is None
    with pytest.raises(ValueError, match="keep one"):
        models.resolve("hf-hub:org/repo@a", revision="b")
    with pytest.raises(ValueError, match="hf-hub: ids only"):
        models.resolve("ViT-B-32", "openai", revision="b")
    calls = []

    def download(**kw):
        calls.append(kw)
        return "/snapshots/abc123"

    assert models.open_clip_name(spec, download) == "local-dir:/snapshots/abc123"
    assert calls[0]["repo_id"] == "org/repo" and calls[0]["revision"] == "abc123"
    cfg = load_config(None, ["score.models=[{name: 'hf-hub:org/repo', revision: abc}]"])
    assert cfg.score.models[0].revision == "abc" and cfg.score.replace is False


def test_state_digest_follows_the_weights_and_runs_on_a_worker(spark, tmp_path):
    """A ``local-dir:`` model has no declared digest: the worker hashes its state_dict."""
    from safetensors.torch import save_file

    from etl.score import model_digest

    folder = tmp_path / "tiny-dir"
    folder.mkdir()
    cfg = json.loads(open(TINY_JSON).read())
    (folder / "open_clip_config.json").write_text(json.dumps({"model_cfg": cfg}))
    save_file(tiny_state(0), str(folder / "open_clip_model.safetensors"))
    spec = models.resolve(str(folder))
    assert spec.arch.startswith("local-dir:") and models.declared_digest(spec) is None
    first = model_digest(spark, spec)
    assert first == models.state_digest(models.load(spec).model) and len(first) == 64
    save_file(tiny_state(1), str(folder / "open_clip_model.safetensors"))
    assert model_digest(spark, spec) != first


def silver_digests(lake) -> dict[str | None, int]:
    return {r[0]: r[1] for r in lake.read(SILVER).groupBy("weights_sha256").count().collect()}


def test_other_weights_under_one_model_id_are_refused_or_replaced(lake, tmp_path, capsys):
    from safetensors.torch import save_file

    from etl.score import score_table

    ckpt = tmp_path / "tiny.safetensors"  # overwritten in place, like train-dfn's default out
    save_file(tiny_state(0), str(ckpt))
    write_pairs(lake, BRONZE, pool_rows(3), files=1)
    cfg = Config(lakehouse=lake.conf, score=ScoreConf(
        models=[ModelConf(TINY_JSON, str(ckpt), "tiny")], batch_size=4, device="cpu"))
    first = models.file_digest(ckpt)
    assert score_table(lake, BRONZE, SILVER, cfg, "r1")["scored[tiny]"] == 3
    assert silver_digests(lake) == {first: 3}

    save_file(tiny_state(1), str(ckpt))
    with pytest.raises(ConfigError, match="other weights.*new model_id.*score.replace=true"):
        score_table(lake, BRONZE, SILVER, cfg, "r2")
    assert silver_digests(lake) == {first: 3}  # refused before any write

    cfg.score.replace = True
    counts = score_table(lake, BRONZE, SILVER, cfg, "r3")
    assert counts["replaced[tiny]"] == 3 and counts["scored[tiny]"] == 3
    assert silver_digests(lake) == {models.file_digest(ckpt): 3}
    assert lake.read(SILVER).count() == 3
    assert recorded_digest(lake) == models.file_digest(ckpt)


def recorded_digest(lake, model_id: str = "tiny") -> str | None:
    from etl.score import weights_property

    return lake.properties(SILVER).get(weights_property(model_id))


def test_a_recorded_digest_is_checked_from_the_delta_log_alone(lake, tmp_path):
    from safetensors.torch import save_file

    from etl.score import check_weights, score_table, weights_property

    ckpt = tmp_path / "tiny.safetensors"
    save_file(tiny_state(0), str(ckpt))
    write_pairs(lake, BRONZE, pool_rows(3), files=1)
    cfg = Config(lakehouse=lake.conf, score=ScoreConf(
        models=[ModelConf(TINY_JSON, str(ckpt), "tiny")], batch_size=4, device="cpu"))
    score_table(lake, BRONZE, SILVER, cfg, "r1")
    first = models.file_digest(ckpt)
    assert recorded_digest(lake) == first
    spec = models.resolve_conf(cfg.score.models[0])
    data = list(Path(lake.path(SILVER)).glob("*.parquet"))
    assert data
    hidden = tmp_path / "hidden"
    hidden.mkdir()
    for f in data:  # a scan would now fail: the check must not read the rows
        f.rename(hidden / f.name)
    assert check_weights(lake, SILVER, spec, first, cfg.score).dropped == 0
    for f in hidden.iterdir():
        f.rename(Path(lake.path(SILVER)) / f.name)

    # other weights with score.replace: the recorded digest goes before any row is written,
    # so a run killed after the delete cannot leave it claiming rows scored with other weights
    cfg.score.replace = True
    check = check_weights(lake, SILVER, spec, "0" * 64, cfg.score)
    assert check.dropped == 3 and check.record
    assert weights_property("tiny") not in lake.properties(SILVER)
    keys = {weights_property(m) for m in ("hf-hub:org/m@v1", "hf-hub:org/m@v2", "hf-hub_org_m_v1")}
    assert len(keys) == 3 and all(re.fullmatch(r"dfn\.weights_sha256\.[\w.-]+", k) for k in keys)


def test_silver_without_the_digest_column_keeps_working(lake, tmp_path, capsys):
    from safetensors.torch import save_file

    from etl.score import score_pairs, score_table

    ckpt = tmp_path / "tiny.safetensors"
    save_file(tiny_state(0), str(ckpt))
    write_pairs(lake, BRONZE, pool_rows(3), files=1)
    cfg = Config(lakehouse=lake.conf, score=ScoreConf(
        models=[ModelConf(TINY_JSON, str(ckpt), "tiny")], batch_size=4, device="cpu"))
    old = score_pairs(lake.read(BRONZE).limit(2), cfg.score.models[0], cfg.score, "old")
    lake.overwrite(old.drop("weights_sha256"), SILVER)  # a table from before the column
    assert score_table(lake, BRONZE, SILVER, cfg, "r1")["scored[tiny]"] == 1
    assert "weights are unknown" in capsys.readouterr().out
    assert silver_digests(lake) == {None: 2, models.file_digest(ckpt): 1}
    assert recorded_digest(lake) is None  # unknown rows remain: every run scans and says so


# ---------------------------------------------------------------- 2. stale upstream tables


def bronze_rows(start: int, n: int) -> list[tuple]:
    return [(f"b{i:03d}", f"https://x.example/{i}", f"caption {i}", f"sha{i}",
             jpeg(((i * 53) % 256, 80, 120), (40 + i % 3 * 8, 40))) for i in range(start, start + n)]


BRONZE_SCHEMA = "uid string, url string, text string, sha256 string, image binary"


def trust_config(lake, weights) -> Config:
    return Config(
        lakehouse=LakehouseConf(root=lake.conf.root),
        score=ScoreConf(models=[ModelConf(TINY_JSON, str(weights), "tiny")], batch_size=4,
                        device="cpu"),
        dedup=DedupConf(near_signals=["thumbnail"], n_clusters=1, decontaminate=False),
        select=SelectConf(preset="none", keep_fraction=0.5))


def test_select_and_export_refuse_tables_that_miss_new_bronze_rows(lake, tmp_path):
    from safetensors.torch import save_file

    from etl.dedup import run_dedup
    from etl.export import run_export
    from etl.jobs.run import main as run_main
    from etl.score import score_all
    from etl.select import run_select

    weights = tmp_path / "tiny.safetensors"
    save_file(tiny_state(0), str(weights))
    cfg = trust_config(lake, weights)
    spark = lake.spark
    lake.overwrite(spark.createDataFrame(bronze_rows(0, 4), BRONZE_SCHEMA), BRONZE)
    score_all(lake, cfg, "r1")
    run_dedup(lake, cfg, "r1")
    run_select(lake, cfg, "r1")
    built = lake.version(BRONZE)

    lake.append(spark.createDataFrame(bronze_rows(4, 3), BRONZE_SCHEMA), BRONZE)  # ingest more
    now = lake.version(BRONZE)
    with pytest.raises(ConfigError) as err:
        run_select(lake, cfg, "r2")
    msg = str(err.value)
    assert type(err.value).__name__ == "StaleTableError"
    assert SILVER in msg and f"version {built}" in msg and f"version {now}" in msg
    assert "dfn-curate score" in msg
    with pytest.raises(ConfigError, match="gold_selection.*dfn-curate select"):
        run_export(lake, cfg, "r2")
    score_all(lake, cfg, "r2")
    with pytest.raises(ConfigError, match=f"{DEDUP}.*dfn-curate dedup"):
        run_select(lake, cfg, "r2")
    assert lake.read(SELECTION).count() == 4  # nothing was rewritten

    lake.delta(BRONZE).optimize().executeCompaction()  # rewrites files, not rows: not stale
    assert not lake.data_changed_since(BRONZE, now)

    lake.append(spark.createDataFrame(bronze_rows(7, 2), BRONZE_SCHEMA), BRONZE)
    conf_file = tmp_path / "trust.yaml"
    conf_file.write_text(yaml.safe_dump({
        "lakehouse": {"root": lake.conf.root},
        "score": {"models": [{"name": TINY_JSON, "pretrained": str(weights),
                              "model_id": "tiny"}], "device": "cpu", "batch_size": 4},
        "dedup": {"near_signals": ["thumbnail"], "n_clusters": 1, "decontaminate": False},
        "select": {"preset": "none", "keep_fraction": 0.5}}))
    results = run_main(["--conf", str(conf_file), "--steps", "select", "--run-id", "r3"])
    assert set(results) == {"score", "dedup", "select"}  # the missing steps ran first
    assert lake.read(SELECTION).count() == 9
    assert lake.read(DEDUP).count() == 9
    assert lake.read(SILVER).where(F.col("model_id") == "tiny").count() == 9
    run_select(lake, cfg, "r4")  # up to date now


def test_copying_a_checkpoint_keeps_its_digest(tmp_path):
    from safetensors.torch import save_file

    a, b = tmp_path / "a.safetensors", tmp_path / "b.safetensors"
    save_file(tiny_state(0), str(a))
    shutil.copy(a, b)
    assert models.declared_digest(models.resolve(TINY_JSON, str(a))) == \
        models.declared_digest(models.resolve(TINY_JSON, str(b)))
