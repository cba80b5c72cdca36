"""Dedup: exact passes, SemDeDup near duplicates, decontamination, thumbnails, the edge step."""

from __future__ import annotations

import hashlib
import random

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from etl.config import Config, ConfigError, DedupConf, LakehouseConf, SelectConf
from etl.dedup import (
    EVAL_EMBEDDINGS,
    bounded_groups,
    dedup_pairs,
    exact_duplicates,
    near_duplicates,
    semdedup_cluster,
    thumbnails,
)
from etl.dedupinc import run_dedup
from etl.sample import Attrs, draw, encode
from etl.tables import BRONZE, DEDUP, EVAL_IMAGES, RUN_STATS, SILVER
from tests.helpers.frames import assert_same_rows
from tests.helpers.images import SMALL_CAP, busy_jpeg, header_bomb
from tests.helpers.score import PAIR_SCHEMA
from udfs.imaging import DEFAULT_MAX_PIXELS

PAIRS = "uid string, url string, text string, sha256 string, score double"
VECS = "uid string, score double, embedding array<float>"


def unit(*xs):
    v = np.asarray(xs, dtype=np.float64)
    return [float(x) for x in v / np.linalg.norm(v)]


def df(spark, rows, schema, parts=2):
    return spark.sparkContext.parallelize(rows, parts).toDF(schema)


def test_exact_passes_canonical_and_null_keys(spark):
    rows = [
        ("s1", "u/s1", "t", "H", 0.5), ("s2", "u/s2", "t", "H", 0.9), ("s3", "u/s3", "t", "H", None),
        ("p1", "u/P", "same", "hp1", 0.3), ("p2", "u/P", "same", "hp2", 0.3),  # tie -> p1
        ("q1", "u/Q", "x", "hq1", 0.2), ("q2", "u/Q", "y", "hq2", 0.8),
        ("n1", "u/n1", "t", None, 0.5), ("n2", "u/n2", "t", None, 0.5),  # no bytes, no dup
        ("m1", None, "t", None, 0.5), ("m2", None, "t", None, 0.5),  # null url never matches
        ("x1", "u/X", "a", "HX", 0.9), ("x2", "u/Y", "b", "HX", 0.1), ("x3", "u/Y", "c", "h3", 0.5),
        ("z1", "u/Z", "t", None, None), ("z2", "u/Z", "t2", None, 0.1),  # scored row wins
    ]
    got = exact_duplicates(df(spark, rows, PAIRS, 3))
    assert_same_rows(got, [
        ("s1", "s2", "exact_sha256"), ("s3", "s2", "exact_sha256"),
        ("p2", "p1", "exact_url_text"), ("q1", "q2", "exact_url"),
        ("x2", "x1", "exact_sha256"),  # x3 keeps url u/Y: x2 already left in the sha256 pass
        ("z1", "z2", "exact_url"),
    ], ["uid", "dup_of", "dup_reason"])


def test_semdedup_cluster_ranks_and_chains():
    pdf = pd.DataFrame({
        "uid": ["c1", "c2", "c3", "b", "d", "d2", "t2", "t1"],
        "score": [0.9, 0.8, 0.7, 0.6, np.nan, 0.1, 0.6, 0.6],
        "embedding": [unit(0, 1, 0, 0), unit(0, 1, 0.3, 0), unit(0, 1, 0.6, 0), unit(0, 0, 1, 0),
                      unit(0, 0, 0, 1), unit(0, 0, 0, 1), unit(1, 0, 0, 1), unit(1, 0, 0, 1)],
    })
    got = semdedup_cluster(pdf, threshold=0.95)
    flagged = {r.uid: (r.dup_of, round(r.dup_similarity, 3)) for r in got.itertuples()}
    # c2 ~ c1 (0.958); c3 ~ c2 (0.969) though c3 ~ c1 is only 0.857: SemDeDup compares with
    # every better-ranked row, dropped or not. An unscored copy loses; a tie keeps the smaller uid.
    assert flagged == {"c2": ("c1", 0.958), "c3": ("c2", 0.969), "d": ("d2", 1.0),
                       "t2": ("t1", 1.0)}
    for block in (1, 2, 3):  # blocking must not change the answer
        assert semdedup_cluster(pdf, 0.95, block=block).equals(got)


def grouped_vectors(rng, n_groups=4, per_group=5, noise=0.02):
    rows, dim = [], n_groups
    for g in range(n_groups):
        for i in range(per_group):
            v = np.zeros(dim)
            v[g] = 1.0
            v += rng.normal(0, noise, dim) if i else 0
            rows.append((f"g{g}r{i}", 1.0 - i / 10, unit(*v)))
    return rows


def test_near_duplicates_with_kmeans_clusters(spark):
    rows = grouped_vectors(np.random.default_rng(0))
    rows.append(("lone", 0.5, unit(1, 1, 1, 1)))  # 0.5 to every group: never a duplicate
    rows.append(("nullvec", 0.5, None))
    got = near_duplicates(df(spark, rows, VECS, 3), threshold=0.95, n_clusters=4, iters=5,
                          min_cluster_rows=1)
    flagged = {r.uid: r.dup_of for r in got.collect()}
    expected = {f"g{g}r{i}": f"g{g}r0" for g in range(4) for i in range(1, 5)}
    assert set(flagged) == set(expected)
    assert all(flagged[u].split("r")[0] == u.split("r")[0] for u in flagged)  # same group
    assert {r.dup_reason for r in got.collect()} == {"near_model"}


@pytest.mark.slow
def test_a_big_cluster_is_compared_in_bounded_parts(spark):
    from pyspark.sql import functions as F

    rng = np.random.default_rng(2)
    rows = []
    for g in range(30):  # 30 originals, each with a near copy that ranks below it
        v = rng.normal(size=8)
        rows.append((f"o{g:02d}", 0.9, unit(*v)))
        rows.append((f"c{g:02d}", 0.1, unit(*(v + rng.normal(0, 0.01, 8)))))
    rows += [(f"same{i:02d}", 0.5, unit(*[1.0] * 8)) for i in range(40)]  # one giant tie
    emb = df(spark, rows, VECS, 3)
    groups = bounded_groups(emb.withColumn("cluster", F.lit(0)), max_rows=16)
    sizes = {(r["part"], r["sub"]): r["count"]
             for r in groups.groupBy("part", "sub").count().collect()}
    assert max(sizes.values()) <= 16 and sum(sizes.values()) == 100 and len(sizes) >= 7
    got = near_duplicates(emb, 0.95, n_clusters=1, iters=2, min_cluster_rows=1,
                          max_group_rows=16)
    flagged = {r.uid: r.dup_of for r in got.collect()}
    copies = [u for u in flagged if u.startswith("c")]
    assert len(copies) >= 27 and all(flagged[u] == "o" + u[1:] for u in copies)
    assert not any(u.startswith("o") for u in flagged)
    same_pieces = groups.where(F.col("uid").startswith("same")).select("part", "sub").distinct()
    # every piece of the tie keeps exactly one copy; without the cap, one copy in all
    assert 40 - len([u for u in flagged if u.startswith("same")]) == same_pieces.count() > 1


def test_each_big_cluster_keeps_only_its_own_cuts(spark):
    """Two big clusters (12 and 3 parts of a shared 12-part grid): the table of cuts that is
    broadcast holds 11 + 2 values, ascending, and the small cluster's cuts are the shared grid's
    at positions ceil(k * 12 / 3) = 4 and 8, so its parts are those of the full grid."""
    from pyspark.sql import functions as F

    from etl.dedup import cut_table

    rows = [(0, 12, float(i)) for i in range(96)] + [(1, 3, float(i)) for i in range(24)]
    projected = spark.createDataFrame(rows, "cluster int, _parts int, _proj double")
    cuts = {r["cluster"]: r["_cuts"] for r in cut_table(projected.repartition(3), 12).collect()}
    assert [len(cuts[0]), len(cuts[1])] == [11, 2]
    assert cuts[0] == sorted(cuts[0]) and cuts[1] == sorted(cuts[1])
    full = projected.where("cluster = 1").agg(F.percentile_approx(
        "_proj", [i / 12 for i in range(1, 12)], 10_000)).first()[0]
    assert cuts[1] == [full[3], full[7]]


def test_decontamination_by_hash_and_vector(spark):
    pairs = df(spark, [("a", "u/a", "t", "h1", 0.5), ("b", "u/b", "t", "HE2", 0.5),
                       ("c", "u/c", "t", "h3", 0.5), ("d", "u/d", "t", "h4", 0.5)], PAIRS)
    vecs = df(spark, [("a", None, unit(1, 0.1, 0, 0)), ("b", None, unit(0, 1, 0.2, 0)),
                      ("c", None, unit(1, 1, 0, 0)), ("d", None, None)], VECS)
    evals = {"model": (["eval00001", "eval00003"], np.array([unit(1, 0, 0, 0), unit(0, 1, 0, 0)]))}
    hashes = df(spark, [("eval00002", "HE2"), ("eval00009", None)], "key string, sha256 string")
    conf = DedupConf(exact=False, near=False, eval_threshold=0.95)
    got = dedup_pairs(pairs, conf, {"model": vecs.select("uid", "embedding")}, evals, hashes)
    rows = {r.uid: (r.eval_match, round(r.eval_similarity or 0, 3)) for r in got.collect()}
    # a: 0.995 to eval00001; b: bytes of eval00002 beat 0.981 to eval00003; c: 0.707 only
    assert rows == {"a": ("eval00001", 0.995), "b": ("eval00002", 1.0), "c": (None, 0),
                    "d": (None, 0)}


def image_rows():
    rng = random.Random(1)
    img = draw(Attrs("star", "red", "white", 1, "large"), 320, 240, rng)
    w, h = img.size
    other = draw(Attrs("circle", "blue", "gray", 1, "large"), 300, 260, rng)
    variants = [
        ("orig", encode(img, "png"), 0.9), ("jpeg", encode(img, "jpg", 70), 0.5),
        ("resized", encode(img.resize((256, 192)), "jpg", 80), 0.4),
        ("cropped", encode(img.crop((12, 9, w - 12, h - 9)), "jpg", 85), 0.3),
        ("other", encode(other, "png"), 0.2),
        ("flat", encode(Image.new("RGB", (300, 200), (90, 140, 200)), "jpg"), 0.1),
        ("broken", b"not an image", 0.1), ("nobytes", None, 0.1),
    ]
    return [(u, f"u/{u}", "a red star", hashlib.sha256(b).hexdigest() if b else None, s, b)
            for u, b, s in variants], encode(img, "jpg", 85)


@pytest.mark.slow
def test_thumbnail_signal_finds_reencoded_resized_cropped(spark):
    rows, leaked = image_rows()
    pairs = df(spark, rows, PAIRS + ", image binary", 3)
    vecs = pairs.select("uid", thumbnails(DEFAULT_MAX_PIXELS)("image").alias("embedding"))
    assert {r.uid for r in vecs.where("embedding is null").collect()} == {"flat", "broken",
                                                                          "nobytes"}
    from etl.dedup import thumbnail_vector

    evals = {"thumbnail": (["eval00007"], np.array([thumbnail_vector(leaked)]))}
    conf = DedupConf(exact=True, near=True, near_signals=["thumbnail"], n_clusters=2,
                     kmeans_iters=3, near_threshold=0.95, eval_threshold=0.95)
    got = {r.uid: r for r in dedup_pairs(pairs.drop("image"), conf, {"thumbnail": vecs},
                                         evals).collect()}
    assert len(got) == len(rows)
    near = {u: r for u, r in got.items() if r.dup_reason}
    assert set(near) == {"jpeg", "resized", "cropped"}  # the best-scored original stays
    assert {r.dup_reason for r in near.values()} == {"near_thumbnail"}
    assert near["jpeg"].dup_of == "orig"  # dup_of: the most similar better-ranked row
    assert near["cropped"].dup_of in {"orig", "jpeg", "resized"}
    leaks = {u for u, r in got.items() if r.eval_match == "eval00007"}
    assert {"orig", "jpeg", "resized", "cropped"} <= leaks and "other" not in leaks


@pytest.mark.slow
def test_run_dedup_edge_writes_every_uid(spark, lake):
    vec_rows = grouped_vectors(np.random.default_rng(1), n_groups=3, per_group=3)
    vec_rows += [("leak", 0.5, unit(5, 4, 0)), ("vleak", 0.5, unit(-1, 0.05, 0))]
    bronze = [(u, f"u/{u}", "a caption here", f"h{u}", None) for u, _, _ in vec_rows]
    bronze[-2] = ("leak", "u/leak", "a caption here", "HEVAL", None)  # bytes of eval00001
    bronze.append(("dupx", "u/dupx", "a caption here", "hg0r0", None))  # bytes of g0r0
    lake.overwrite(df(spark, bronze, "uid string, url string, text string, sha256 string, "
                                     "image binary"), BRONZE)
    silver = [(u, "m1", s, e) for u, s, e in vec_rows] + [("dupx", "m1", 0.1, vec_rows[0][2])]
    lake.overwrite(df(spark, silver, "uid string, model_id string, score double, "
                                     "image_embedding array<float>"), SILVER)
    lake.overwrite(df(spark, [("e1", "eval00001", "HEVAL", None), ("e2", "eval00002", "hx", None)],
                      "uid string, key string, sha256 string, image binary"), EVAL_IMAGES)
    lake.overwrite(df(spark, [("e1", "m1", unit(-1, 0, 0)), ("e2", "m1", unit(1, -1, 0))],
                      "uid string, model_id string, image_embedding array<float>"),
                   EVAL_EMBEDDINGS)
    cfg = Config(lakehouse=LakehouseConf(root=str(lake.root)), select=SelectConf(model_id="m1"),
                 dedup=DedupConf(n_clusters=3, kmeans_iters=3, near_threshold=0.95))
    counts = run_dedup(lake, cfg, "run-d")
    out = {r.uid: r for r in lake.read(DEDUP).collect()}
    assert len(out) == len(bronze)
    assert (out["dupx"].dup_of, out["dupx"].dup_reason) == ("g0r0", "exact_sha256")
    assert (out["leak"].eval_match, out["leak"].eval_similarity) == ("eval00001", 1.0)
    assert out["vleak"].eval_match == "eval00001" and out["vleak"].eval_similarity > 0.99
    assert {u for u, r in out.items() if r.dup_reason == "near_model"} == {
        f"g{g}r{i}" for g in range(3) for i in (1, 2)}
    assert counts["exact_sha256"] == 1 and counts["near_model"] == 6
    assert counts["eval_leaks"] == 2 and counts["rows"] == len(bronze)
    stats = {r.metric: r.value for r in lake.read(RUN_STATS).where("step = 'dedup'").collect()}
    assert stats == {**counts, "source_version[bronze_pairs]": lake.version(BRONZE)}


def test_unknown_signal_is_a_config_error(lake):
    cfg = Config(dedup=DedupConf(near_signals=["phash"]))
    with pytest.raises(ConfigError, match="near_signals"):
        run_dedup(lake, cfg, "r")


# the pixel cap on every decode


def test_dedup_thumbnail_honours_an_explicit_cap(spark):
    from etl.dedup import thumbnail_vector

    assert thumbnail_vector(busy_jpeg(), max_pixels=10_000) is not None
    assert thumbnail_vector(busy_jpeg(), max_pixels=SMALL_CAP) is None
    assert thumbnail_vector(header_bomb()) is None  # the default cap, from the header
    from etl.dedup import thumbnails

    df = spark.createDataFrame([("ok", busy_jpeg(), "t"), ("bomb", header_bomb(), "t")], PAIR_SCHEMA)
    got = {r.uid: r.v for r in df.select("uid", thumbnails(10_000)("image").alias("v")).collect()}
    assert got["ok"] is not None and got["bomb"] is None
