"""Dedup and evaluation-set decontamination -> ``silver_dedup`` (one row per bronze uid).

Exact (in this order, each pass over the rows not yet marked): identical image bytes
(``exact_sha256``; the given sha256 when a row has no bytes), identical (url, text)
(``exact_url_text``), identical url (``exact_url``). Null keys never match.

Near (``near_<signal>``), SemDeDup style: k-means over the image vectors (at most
``n_clusters``, about >= 1000 rows per cluster, so a small pool is compared exactly as one
cluster), then inside each cluster rows are ranked and a row is dropped when its cosine similarity to any better-ranked
row of its cluster is >= ``near_threshold``; ``dup_of`` is that most similar better row. No
all-pairs over the pool and nothing pool-sized on the driver: k-means is fitted on a sample,
and a cluster of more than ``dedup.max_group_rows`` is compared in parts of at most about that
many rows, so one task's memory is bounded by the cap, not by the pool (``bounded_groups``).

Decontamination: a pool row whose image has the sha256 of an evaluation image, or whose
vector has cosine >= ``eval_threshold`` with one, gets ``eval_match`` (the eval ``key``) and
``eval_similarity`` (1.0 for identical bytes). The evaluation set is small; its vectors are
shipped to the tasks, which scan the pool batch by batch.

Ranking everywhere (the canonical row of a group): highest score, then smallest uid; rows
without a score rank last.

:func:`etl.dedupinc.run_dedup` runs incrementally: frozen centres, stored per-row
vectors, and only the clusters new rows touch compared again.

Signals (``dedup.near_signals``): ``model`` = ``image_embedding`` of the selection model in
``silver_scores`` / ``silver_eval_embeddings``; ``thumbnail`` = a model-free perceptual vector
(16x16 RGB box thumbnail, blurred, per-channel mean removed, L2-normalised) computed from the
image bytes; flat images have none.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import partial

import numpy as np
import pandas as pd
from pyspark.sql import Column, DataFrame, Window
from pyspark.sql import functions as F
from pyspark.sql import types as T
from pyspark.sql.functions import pandas_udf

from etl.compat import Staging
from etl.config import Config, ConfigError, DedupConf
from etl.silver import model_scores, selection_model_id
from etl.spark import local_frame
from etl.tables import BRONZE, EVAL_EMBEDDINGS, EVAL_IMAGES, Lakehouse
from etl.vectors import cluster_column, fit_centers, unit_rows
from udfs.imaging import DEFAULT_MAX_PIXELS, decode_rgb

EXACT_PASSES = [("exact_sha256", ["sha256"]), ("exact_url_text", ["url", "text"]),
                ("exact_url", ["url"])]
SIGNALS = ("model", "thumbnail")
THUMB_SIDE = 16
FLAT_RMS = 1.0  # a thumbnail within 1/255 RMS of its mean colour is flat: no vector
MIN_CLUSTER_ROWS = 1_000  # fewer clusters than n_clusters on small pools (exact below 2000)
MAX_GROUP_ROWS = 20_000  # rows compared in one task: memory ~ rows * (3 * dim + 1024) * 4 bytes
FLAG_SCHEMA = "uid string, dup_of string, dup_reason string, dup_similarity double"
LEAK_SCHEMA = "uid string, eval_match string, eval_similarity double"


def rank_order() -> list[Column]:
    """Canonical-first ordering: highest score, then smallest uid (null scores last)."""
    return [F.col("score").desc_nulls_last(), F.col("uid").asc()]


# ---- exact ---------------------------------------------------------------------------------


def exact_duplicates(pairs: DataFrame) -> DataFrame:
    """(uid, url, text, sha256, score) -> (uid, dup_of, dup_reason, dup_similarity) for every
    non-canonical row of an exact-duplicate group."""
    left = pairs.select("uid", "url", "text", "sha256", "score")
    found = None
    for reason, keys in EXACT_PASSES:
        marked = group_duplicates(left, keys, reason)
        found = marked if found is None else found.unionByName(marked)
        left = left.join(marked.select("uid"), "uid", "left_anti")
    return found


def group_duplicates(df: DataFrame, keys: list[str], reason: str) -> DataFrame:
    """Rows sharing all (non-null) ``keys``: all but the canonical one, pointing at it."""
    w = Window.partitionBy(*keys).orderBy(*rank_order())
    has_keys = F.lit(True)
    for k in keys:
        has_keys = has_keys & F.col(k).isNotNull()
    ranked = df.where(has_keys).select(
        "uid", F.row_number().over(w).alias("_rank"), F.first("uid").over(w).alias("dup_of"))
    return ranked.where("_rank > 1").select(
        "uid", "dup_of", F.lit(reason).alias("dup_reason"),
        F.lit(None).cast("double").alias("dup_similarity"))


# ---- near ----------------------------------------------------------------------------------


def near_duplicates(emb: DataFrame, threshold: float, n_clusters: int, iters: int,
                    reason: str = "near_model", seed: int = 0,
                    min_cluster_rows: int = MIN_CLUSTER_ROWS,
                    max_group_rows: int = MAX_GROUP_ROWS,
                    stage: Staging | None = None) -> DataFrame:
    """(uid, score, embedding) -> flagged rows (uid, dup_of, dup_reason, dup_similarity).

    Uses at most ``n_clusters`` clusters and on average at least ``min_cluster_rows`` rows per
    cluster (a small pool is one cluster: exact); clusters of more than ``max_group_rows`` are
    compared in parts (:func:`bounded_groups`). Computed here and checkpointed, so k-means runs
    once. ``stage``: where k-means centres too big for a closure go (:class:`etl.compat.Shared`).
    """
    emb = emb.where(F.col("embedding").isNotNull()).select("uid", "score", "embedding").persist()
    try:
        clustered = assign_clusters(emb, n_clusters, iters, seed, min_cluster_rows,
                                    stage).persist()
        out = compare_clusters(clustered, threshold, reason, max_group_rows, seed)
        out = out.localCheckpoint()
        clustered.unpersist()
        return out
    finally:
        emb.unpersist()


def compare_clusters(clustered: DataFrame, threshold: float, reason: str,
                     max_group_rows: int = MAX_GROUP_ROWS, seed: int = 0) -> DataFrame:
    """(uid, score, embedding, cluster) -> flagged rows (uid, dup_of, dup_reason,
    dup_similarity): SemDeDup within each cluster, big clusters in parts
    (:func:`bounded_groups`). The one comparison of near duplicates."""
    grouped = bounded_groups(clustered, max_group_rows, seed)

    def flag(pdf: pd.DataFrame) -> pd.DataFrame:  # typed: pyspark reads the eval type
        return semdedup_cluster(pdf, threshold)

    return (grouped.groupBy("cluster", "part", "sub")
            .applyInPandas(flag, "uid string, dup_of string, dup_similarity double")
            .select("uid", "dup_of", F.lit(reason).alias("dup_reason"), "dup_similarity"))


def bounded_groups(clustered: DataFrame, max_rows: int, seed: int = 0) -> DataFrame:
    """Add ``part`` and ``sub`` so that no (cluster, part, sub) group is much over ``max_rows``.

    A cluster of n > ``max_rows`` rows is cut into ceil(2n / max_rows) ranges of its rows'
    projection on a seeded random direction (cuts at approximate quantiles, computed on the
    executors), so near duplicates, whose projections are close, stay together except at a
    cut. A part still over ``max_rows`` (identical vectors project alike) is split by uid hash:
    each piece then keeps its own best copy. Clusters within the cap are untouched (exact).
    """
    spark = clustered.sparkSession
    out = clustered.withColumn("part", F.lit(0)).withColumn("sub", F.lit(0))
    big = {r["cluster"]: r["count"] for r in  # at most n_clusters rows
           clustered.groupBy("cluster").count().where(F.col("count") > max_rows).collect()}
    if not big:
        return out
    dim = len(clustered.where(F.col("embedding").isNotNull()).first()["embedding"])
    direction = np.random.default_rng(seed).standard_normal(dim)
    grid = max(-(-2 * n // max_rows) for n in big.values())
    parts = local_frame(spark, [(int(c), -(-2 * n // max_rows)) for c, n in big.items()],
                        "cluster int, _parts int")
    out = out.withColumn("_proj", _projection(direction)("embedding"))
    cuts = cut_table(out.join(F.broadcast(parts), "cluster"), grid)
    below = F.size(F.filter("_cuts", lambda c: c < F.col("_proj")))
    out = (out.join(F.broadcast(cuts), "cluster", "left")
           .withColumn("part", F.when(F.col("_cuts").isNull(), F.lit(0)).otherwise(below))
           .drop("_cuts", "_proj"))
    over = (out.groupBy("cluster", "part").count().where(F.col("count") > max_rows)
            .select("cluster", "part", F.ceil(F.col("count") * 2 / max_rows).alias("_subs")))
    return (out.join(F.broadcast(over), ["cluster", "part"], "left")
            .withColumn("sub", F.coalesce(F.pmod(F.xxhash64("uid"), F.col("_subs")), F.lit(0)))
            .drop("_subs"))


def cut_table(projected: DataFrame, grid: int) -> DataFrame:
    """``cluster, _cuts``: each big cluster's ``_parts - 1`` ascending cuts of ``_proj``.

    One approximate-quantile pass computes the shared grid of ``grid`` parts for every cluster;
    a cluster then keeps only its own cuts (the cut before part k sits at grid position
    ceil(k * grid / parts)), so the table that is broadcast holds sum(parts) values, not
    n_big x grid."""
    # percentile_approx's rank error is n / accuracy: 20 * grid keeps it near max_rows / 40,
    # so the cuts, not the hash split, bound the parts
    own = F.transform(F.sequence(F.lit(1), F.col("_parts") - 1), lambda k: F.element_at(
        "_cuts", F.ceil(k * grid / F.col("_parts")).cast("int")))
    return (projected.groupBy("cluster", "_parts")
            .agg(F.percentile_approx("_proj", [i / grid for i in range(1, grid)],
                                     max(10_000, 20 * grid)).alias("_cuts"))
            .select("cluster", own.alias("_cuts")))


def _projection(direction: np.ndarray):
    @pandas_udf("double")
    def project(vectors: pd.Series) -> pd.Series:
        return pd.Series(unit_rows(vectors) @ direction if len(vectors) else [], dtype="float64")

    return project


def assign_clusters(emb: DataFrame, n_clusters: int, iters: int, seed: int = 0,
                    min_cluster_rows: int = 1, stage: Staging | None = None) -> DataFrame:
    """Add ``cluster``: the nearest centre of spherical k-means (:mod:`etl.vectors`)."""
    n = emb.count()
    k = cluster_count(n, n_clusters, min_cluster_rows)
    if k == 1:
        return emb.withColumn("cluster", F.lit(0))
    centers = fit_centers(emb, k, iters, seed, count=n)
    return emb.withColumn("cluster", cluster_column(centers, stage)("embedding"))


def cluster_count(n: int, n_clusters: int, min_cluster_rows: int = MIN_CLUSTER_ROWS) -> int:
    """Clusters for ``n`` vectors: at most ``n_clusters``, about ``min_cluster_rows`` each."""
    return max(1, min(n_clusters, n // max(1, min_cluster_rows)))


def semdedup_cluster(pdf: pd.DataFrame, threshold: float, block: int = 1024) -> pd.DataFrame:
    """One cluster: rank rows, flag each row whose best cosine to a better row is >= threshold."""
    pdf = pdf.assign(_s=pdf["score"].astype("float64").fillna(-np.inf))
    pdf = pdf.sort_values(["_s", "uid"], ascending=[False, True], kind="stable")
    uids = pdf["uid"].to_numpy()
    emb = unit_rows(pdf["embedding"])
    idx, best, sim = [], [], []
    for a in range(1, len(pdf), block):
        b = min(len(pdf), a + block)
        sims = emb[a:b] @ emb[:b].T
        sims[np.arange(b)[None, :] >= np.arange(a, b)[:, None]] = -np.inf
        j = sims.argmax(axis=1)
        s = sims[np.arange(b - a), j]
        hit = s >= threshold
        idx.append(np.arange(a, b)[hit])
        best.append(j[hit])
        sim.append(s[hit])
    if not idx:
        return pd.DataFrame({"uid": pd.Series([], dtype=object),
                             "dup_of": pd.Series([], dtype=object),
                             "dup_similarity": pd.Series([], dtype="float64")})
    i, j = np.concatenate(idx), np.concatenate(best)
    return pd.DataFrame({"uid": uids[i], "dup_of": uids[j],
                         "dup_similarity": np.concatenate(sim).astype("float64")})


# ---- thumbnails ----------------------------------------------------------------------------


def thumbnail_vector(data: bytes | None,
                     max_pixels: int = DEFAULT_MAX_PIXELS) -> np.ndarray | None:
    """Perceptual vector of an image (None when missing, undecodable, over ``max_pixels``
    (from the header, never decoded) or flat)."""
    if data is None:
        return None
    from PIL import Image, ImageFilter

    img, _ = decode_rgb(data, max_pixels, min_side=THUMB_SIDE * 4)
    if img is None:
        return None
    try:
        small = img.resize((THUMB_SIDE, THUMB_SIDE), Image.BOX)
    except Exception:  # noqa: BLE001 - undecodable bytes simply have no thumbnail
        return None
    x = np.asarray(small.filter(ImageFilter.GaussianBlur(1)), dtype=np.float32)
    x = (x - x.mean(axis=(0, 1))).ravel()
    norm = float(np.linalg.norm(x))
    return x / norm if norm > FLAT_RMS * np.sqrt(x.size) else None


def thumbnails(max_pixels: int) -> Callable[[Column], Column]:
    """The thumbnail-vector pandas UDF with decode cap ``max_pixels`` (images over it: null)."""

    @pandas_udf(T.ArrayType(T.FloatType()))
    def thumbnail_vectors(images: pd.Series) -> pd.Series:
        return images.map(partial(thumbnail_vector, max_pixels=max_pixels))

    return thumbnail_vectors


# ---- decontamination -----------------------------------------------------------------------


def eval_vector_matches(emb: DataFrame, keys: list[str], vectors: np.ndarray,
                        threshold: float) -> DataFrame:
    """(uid, embedding) -> (uid, eval_match, eval_similarity) where the best cosine to an eval
    vector is >= threshold. ``vectors`` (n_eval x d) travel with the tasks."""
    if not keys:
        return local_frame(emb.sparkSession, [], LEAK_SCHEMA)
    fn = partial(match_batches, keys=np.asarray(keys, dtype=object),
                 vectors=unit_rows(pd.Series(list(vectors))), threshold=threshold)
    return (emb.where(F.col("embedding").isNotNull()).select("uid", "embedding")
            .mapInPandas(fn, LEAK_SCHEMA))


def match_batches(batches, keys: np.ndarray, vectors: np.ndarray, threshold: float,
                  chunk: int = 8192):
    """mapInPandas body: best eval match per pool row, kept when >= threshold."""
    for pdf in batches:
        if pdf.empty:
            continue
        emb = unit_rows(pdf["embedding"])
        best = np.full(len(pdf), -np.inf, dtype=np.float32)
        arg = np.zeros(len(pdf), dtype=np.int64)
        for a in range(0, len(vectors), chunk):
            sims = emb @ vectors[a:a + chunk].T
            j = sims.argmax(axis=1)
            s = sims[np.arange(len(pdf)), j]
            better = s > best
            best[better], arg[better] = s[better], j[better] + a
        hit = best >= threshold
        yield pd.DataFrame({"uid": pdf["uid"].to_numpy()[hit], "eval_match": keys[arg[hit]],
                            "eval_similarity": best[hit].astype("float64")})


def eval_hash_matches(pairs: DataFrame, eval_hashes: DataFrame) -> DataFrame:
    """Pool rows whose sha256 equals an eval image's: (uid, eval_match, eval_similarity=1)."""
    evals = eval_hashes.where(F.col("sha256").isNotNull()).groupBy("sha256").agg(
        F.min("key").alias("eval_match"))
    return (pairs.where(F.col("sha256").isNotNull()).select("uid", "sha256")
            .join(F.broadcast(evals), "sha256")
            .select("uid", "eval_match", F.lit(1.0).alias("eval_similarity")))


def best_match(matches: list[DataFrame]) -> DataFrame | None:
    """One row per uid: the highest similarity, then the smallest eval key."""
    if not matches:
        return None
    allm = matches[0]
    for m in matches[1:]:
        allm = allm.unionByName(m)
    w = Window.partitionBy("uid").orderBy(F.desc("eval_similarity"), F.asc("eval_match"))
    return allm.withColumn("_r", F.row_number().over(w)).where("_r = 1").drop("_r")


# ---- the step ------------------------------------------------------------------------------


def dedup_pairs(pairs: DataFrame, conf: DedupConf, vectors: dict[str, DataFrame] | None = None,
                evals: dict[str, tuple[list[str], np.ndarray]] | None = None,
                eval_hashes: DataFrame | None = None,
                stage: Staging | None = None) -> DataFrame:
    """The dedup step: one ``silver_dedup`` row per uid of ``pairs``.

    ``pairs``: uid, url, text, sha256, score. ``vectors``: signal -> (uid, embedding) over the
    pool. ``evals``: signal -> (eval keys, eval vectors). ``eval_hashes``: (key, sha256).
    ``stage``: where k-means centres too big for a closure go.
    """
    vectors, evals = vectors or {}, evals or {}
    flags = local_frame(pairs.sparkSession, [], FLAG_SCHEMA)
    if conf.exact:
        flags = exact_duplicates(pairs)
    if conf.near:
        left = pairs.select("uid", "score").join(flags.select("uid"), "uid", "left_anti")
        for signal in conf.near_signals:
            if signal not in vectors:
                continue
            near = near_duplicates(vectors[signal].join(left, "uid"), conf.near_threshold,
                                   conf.n_clusters, conf.kmeans_iters, f"near_{signal}",
                                   max_group_rows=conf.max_group_rows, stage=stage)
            flags = flags.unionByName(near)
            left = left.join(near.select("uid"), "uid", "left_anti")
    matches = []
    if conf.decontaminate:
        if eval_hashes is not None:
            matches.append(eval_hash_matches(pairs, eval_hashes))
        for signal, (keys, vecs) in evals.items():
            if signal in vectors:
                matches.append(eval_vector_matches(vectors[signal], keys, vecs,
                                                   conf.eval_threshold))
    out = pairs.select("uid").join(flags, "uid", "left")
    leaks = best_match(matches)
    if leaks is None:
        leaks = local_frame(pairs.sparkSession, [], LEAK_SCHEMA)
    return out.join(leaks, "uid", "left")


def check_signals(conf: DedupConf) -> None:
    bad = [s for s in conf.near_signals if s not in SIGNALS]
    if bad or not conf.near_signals:
        raise ConfigError(f"dedup.near_signals: {conf.near_signals!r}; use a non-empty list of "
                          f"{', '.join(SIGNALS)}")


def pool_vectors(lake: Lakehouse, cfg: Config, signal: str,
                 uids: DataFrame | None = None) -> DataFrame:
    """(uid, embedding) for one signal: of the pool, or of the rows of ``uids`` (a semi-join)."""
    if signal == "thumbnail":
        rows = lake.read(BRONZE)
        rows = rows if uids is None else rows.join(uids.select("uid"), "uid", "left_semi")
        return rows.select("uid", thumbnails(cfg.score.max_image_pixels)("image")
                           .alias("embedding"))
    emb = model_scores(lake, cfg, embeddings=True)
    emb = emb if uids is None else emb.join(uids.select("uid"), "uid", "left_semi")
    return emb.select("uid", F.col("image_embedding").alias("embedding"))


def eval_vectors(lake: Lakehouse, cfg: Config, signal: str) -> tuple[list[str], np.ndarray]:
    """(keys, vectors) of the evaluation images for one signal (small: collected)."""
    evals = lake.read(EVAL_IMAGES)
    key = F.col("key") if "key" in evals.columns else F.col("uid")
    if signal == "thumbnail":
        rows = evals.select(key.alias("key"),
                            thumbnails(cfg.score.max_image_pixels)("image").alias("v"))
    else:
        if not lake.exists(EVAL_EMBEDDINGS):
            print(f"dedup: no {EVAL_EMBEDDINGS} table; model-based decontamination skipped")
            return [], np.zeros((0, 1), np.float32)
        emb = lake.read(EVAL_EMBEDDINGS).where(F.col("model_id") == selection_model_id(lake, cfg))
        rows = evals.select("uid", key.alias("key")).join(
            emb.select("uid", F.col("image_embedding").alias("v")), "uid")
    got = rows.where(F.col("v").isNotNull()).select("key", "v").orderBy("key").collect()
    if not got:
        return [], np.zeros((0, 1), np.float32)
    return [r["key"] for r in got], np.stack([np.asarray(r["v"], np.float32) for r in got])


def dedup_counts(dedup: DataFrame) -> dict[str, int]:
    """Rows, flagged rows per ``dup_reason``, and eval leaks."""
    row = dedup.agg(F.count("*").alias("rows"),
                    F.count("eval_match").alias("eval_leaks")).first()
    counts = {"rows": row["rows"]}
    for r in dedup.where(F.col("dup_reason").isNotNull()).groupBy("dup_reason").count().collect():
        counts[r["dup_reason"]] = r["count"]
    counts["eval_leaks"] = row["eval_leaks"]
    return counts
