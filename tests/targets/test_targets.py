"""Target signals: DataComp's image-based clusters, targeted top-k similarity, text vocabulary,
and the bad-input errors, all before any write."""

from __future__ import annotations

import numpy as np
import pytest
from pyspark.sql import functions as F

from etl.config import Config, ConfigError, TargetsConf
from etl.tables import EVAL_EMBEDDINGS, SILVER, TARGETS
from etl.targets import (
    in_vocabulary,
    row_signals,
    run_targets,
    target_signals,
    vocabulary_terms,
)

DIM = 8


def blob_pool(rng: np.random.Generator, per_blob: int = 30) -> tuple[list, np.ndarray]:
    """Three tight, well separated blobs of unit vectors: uids a*, b*, c*."""
    axes = np.eye(DIM, dtype=np.float32)[:3]
    rows, vecs = [], []
    for name, axis in zip("abc", axes, strict=True):
        for i in range(per_blob):
            v = axis + 0.05 * rng.standard_normal(DIM).astype(np.float32)
            rows.append((f"{name}{i:03d}", [float(x) for x in v]))
            vecs.append(v / np.linalg.norm(v))
    return rows, np.stack(vecs)


def test_row_signals_equal_brute_force_when_every_cluster_is_probed():
    rng = np.random.default_rng(0)
    unit = lambda m: m / np.linalg.norm(m, axis=1, keepdims=True)  # noqa: E731
    rows, centers, targets = (unit(rng.standard_normal((n, DIM)).astype(np.float32))
                              for n in (50, 5, 23))
    owner = np.argmax(targets @ centers.T, axis=1)
    order = np.argsort(owner, kind="stable")
    bounds = np.searchsorted(owner[order], np.arange(len(centers) + 1))
    clusters, sims = row_signals(rows, centers, targets[order], bounds, k=4, nprobe=5)
    expected = np.sort(rows @ targets.T, axis=1)[:, -4:].mean(axis=1)
    np.testing.assert_allclose(sims, expected, rtol=1e-5)
    assert (clusters == np.argmax(rows @ centers.T, axis=1)).all()
    # one probe: only the own cluster's targets count, a missing slot counts -1
    _, one = row_signals(rows, centers, targets[order], bounds, k=4, nprobe=1)
    assert (one <= sims + 1e-6).all() and (one < sims - 1e-3).any()
    assert one.min() >= -1.0


def test_image_based_keeps_exactly_the_clusters_the_targets_land_in(spark):
    rows, vecs = blob_pool(np.random.default_rng(1))
    pool = spark.createDataFrame(rows + [("z-null", None)], "uid string, embedding array<float>")
    pool = pool.repartition(3)
    targets = vecs[30:33] * 0.9 + 0.01  # three images near blob b only
    conf = TargetsConf(n_clusters=3, top_k=2, nprobe=1, kmeans_iters=10)
    out = {r["uid"]: r for r in target_signals(pool, targets, conf).collect()}
    assert len(out) == 91 and out["z-null"]["image_cluster"] is None
    kept = {u for u, r in out.items() if r["in_target_cluster"]}
    assert kept == {f"b{i:03d}" for i in range(30)}
    assert len({out[f"a{i:03d}"]["image_cluster"] for i in range(30)}) == 1  # blobs = clusters
    near = min(out[f"b{i:03d}"]["target_similarity"] for i in range(30))
    far = max(out[f"{c}{i:03d}"]["target_similarity"] for c in "ac" for i in range(30))
    assert near > 0.9 and far == -1.0  # other clusters hold no target: -1, ranked last


def test_targets_bad_input_is_refused(spark):
    rows, vecs = blob_pool(np.random.default_rng(2), per_blob=2)
    pool = spark.createDataFrame(rows, "uid string, embedding array<float>")
    with pytest.raises(ConfigError, match="n_clusters: 7 clusters for 6 embedded pool rows"):
        target_signals(pool, vecs[:2], TargetsConf(n_clusters=7))
    with pytest.raises(ConfigError, match="4 dimensions, the pool's embeddings 8"):
        target_signals(pool, vecs[:2, :4], TargetsConf(n_clusters=2))


def write_silver(lake, table, rows, model_id):
    df = lake.spark.createDataFrame(
        [(u, model_id, 0.5, v) for u, v in rows],
        "uid string, model_id string, score double, image_embedding array<float>")
    lake.overwrite(df, table)


def test_run_targets_checks_the_target_set_before_writing(spark, lake):
    rows, _ = blob_pool(np.random.default_rng(3), per_blob=10)
    write_silver(lake, SILVER, rows, "m1")
    lake.overwrite(spark.createDataFrame([("p", "x")], "uid string, text string"), "bronze_pairs")
    cfg = Config()
    cfg.select.model_id = "m1"
    cfg.targets = TargetsConf(n_clusters=3, top_k=2)
    with pytest.raises(ConfigError, match="no silver_eval_embeddings table"):
        run_targets(lake, cfg, "r")
    write_silver(lake, EVAL_EMBEDDINGS, rows[:3], "other-model")
    with pytest.raises(ConfigError, match="embeddings of \\['other-model'\\], not of the pool's"):
        run_targets(lake, cfg, "r")
    write_silver(lake, EVAL_EMBEDDINGS, [(u, None) for u, _ in rows[:3]], "m1")
    with pytest.raises(ConfigError, match="has no image embeddings"):
        run_targets(lake, cfg, "r")
    cfg.targets.max_targets = 2
    write_silver(lake, EVAL_EMBEDDINGS, rows[10:13], "m1")
    with pytest.raises(ConfigError, match="3 images, over targets.max_targets = 2"):
        run_targets(lake, cfg, "r")
    assert not lake.exists(TARGETS)
    cfg.targets.max_targets = 100
    counts = run_targets(lake, cfg, "r")
    assert counts["targets"] == 3 and counts["rows"] == 30 and counts["target_clusters"] == 1
    assert counts["in_target_cluster"] == 10
    kept = lake.read(TARGETS).where("in_target_cluster").select("uid").collect()
    assert {r[0] for r in kept} == {u for u, _ in rows[10:20]}


def test_vocabulary_matches_whole_words_case_insensitively(spark, tmp_path):
    vocab = tmp_path / "v.txt"
    vocab.write_text("# shapes\nGreat White Shark\nant\n\nt-shirt  # clothing\n")
    terms = vocabulary_terms(str(vocab))
    assert terms == ["great white shark", "t-shirt", "ant"]
    caps = [("1", "An ANT on a leaf"), ("2", "elephants and pants"), ("3", "a great\twhite shark"),
            ("4", "my T-Shirt."), ("5", None), ("6", "antelope"), ("7", "ant's nest"),
            ("8", "ÄNT ant")]
    df = spark.createDataFrame(caps, "uid string, text string").repartition(2)
    got = {r["uid"]: r["m"] for r in df.select("uid", in_vocabulary(F.col("text"), terms)
                                               .alias("m")).collect()}
    assert got == {"1": True, "2": False, "3": True, "4": True, "5": None, "6": False,
                   "7": True, "8": True}
    net = vocabulary_terms("imagenet1k")
    assert len(net) > 900 and "goldfish" in net and "military hat" in net
    empty = tmp_path / "e.txt"
    empty.write_text("# nothing here\n\n  \n---\n")
    with pytest.raises(ConfigError, match="no usable terms"):
        vocabulary_terms(str(empty))


def test_an_image_folder_is_embedded_with_the_pools_model(spark, lake, tmp_path):
    from PIL import Image

    from etl.config import PROJECT_ROOT, ModelConf

    folder = tmp_path / "targets"
    folder.mkdir()
    for i, colour in enumerate([(200, 30, 30), (30, 30, 200), (30, 200, 30)]):
        Image.new("RGB", (80, 80), colour).save(folder / f"t{i}.png")
    (folder / "notes.txt").write_text("a caption file without its image is skipped")
    rng = np.random.default_rng(4)
    rows = [(f"p{i}", [float(x) for x in rng.standard_normal(64)]) for i in range(12)]
    write_silver(lake, SILVER, rows, "tiny")
    lake.overwrite(spark.createDataFrame([("p0", "x")], "uid string, text string"), "bronze_pairs")
    cfg = Config()
    models = PROJECT_ROOT / "conf" / "models"
    cfg.score.models = [ModelConf(name=str(models / "dfn-tiny.json"),
                                  pretrained=str(models / "dfn-tiny.safetensors"),
                                  model_id="tiny")]
    cfg.score.device = "cpu"
    cfg.select.model_id = "tiny"
    cfg.targets = TargetsConf(source=f"folder:{folder}", n_clusters=2, top_k=2)
    counts = run_targets(lake, cfg, "r")
    assert counts["targets"] == 3 and counts["rows"] == 12
    assert lake.read(TARGETS).where("target_similarity IS NULL").count() == 0
    cfg.select.model_id = "other"
    with pytest.raises(ConfigError, match="model 'other' is not in score.models"):
        run_targets(lake, cfg, "r")
