"""Incremental dedup: ``silver_dedup`` brought up to date with what bronze gained, new rows
compared with the rows of their own clusters only.

State kept between runs:

* ``dedup_centroids`` (signal, cluster, center, fit_rows, fitted_at): the k-means centres of
  each near signal, fitted once (:func:`etl.vectors.fit_centers`, on a sample) and then frozen;
  ``dfn-curate dedup --refit`` refits them and recomputes every row. A takedown deletes the
  table (:func:`forget_centroids`): the next run refits.
* ``silver_dedup_signals`` (uid, signal, cluster, embedding; partitioned by signal and
  cluster): each row's vector per signal, computed once (the thumbnail from the image bytes,
  the model's copied from ``silver_scores``), and its frozen cluster.
* ``silver_dedup``'s properties: the settings its flags (``dfn.dedup.settings``, with a
  fingerprint of the evaluation set and the ranking model's weights digest) and vectors
  (``dfn.dedup.vectors``: the model and its weights digest, the decode cap, the clustering
  settings and a digest of each signal's frozen centres) were computed under; a change
  recomputes every row (with the same frozen centres; new vectors refit them only when their
  dimension changed, a change of ``n_clusters``/``kmeans_iters`` refits them as ``--refit``).
  The properties are set last, so a run killed midway (a refit included) is redone.

A run: new rows = pool uids not in ``silver_dedup`` (anti-join), plus flagged rows whose
``dup_of`` is gone (a takedown). Exact: the three passes are sequential (a keeper change in
one pass moves rows in the next), so they are recomputed over the narrow key columns of the
whole pool (a shuffle of uid, url, text, sha256, score; no vectors). Near, per signal in order:
the touched clusters are those of new rows and of rows whose exclusion by an earlier pass
changed; SemDeDup (:func:`etl.dedup.compare_clusters`) runs on those clusters' stored vectors
only, and rows of other clusters keep their flags. Decontamination: new rows only. Rows whose
flags changed and new rows are MERGEd into ``silver_dedup``; nothing new, no commit.

The keeper rule (highest score, then smallest uid) does not depend on arrival order, and a
cluster's flags depend only on its rows, so batches in any order end as one run over the same
pool with the same centres. Clusters over ``dedup.max_group_rows`` are split by cuts of their
current rows (:func:`etl.dedup.bounded_groups`), so there that holds up to where the cuts fall.
"""

from __future__ import annotations

import hashlib
import json
from datetime import datetime, timezone

import numpy as np
from pyspark.sql import DataFrame
from pyspark.sql import functions as F

from etl.config import Config
from etl.dedup import (
    FLAG_SCHEMA,
    LEAK_SCHEMA,
    best_match,
    check_signals,
    cluster_count,
    compare_clusters,
    dedup_counts,
    eval_hash_matches,
    eval_vector_matches,
    eval_vectors,
    exact_duplicates,
    pool_vectors,
)
from etl.score import weights_property
from etl.silver import scored_pool, selection_model_id
from etl.spark import local_frame
from etl.tables import (
    BRONZE,
    CENTROIDS,
    DEDUP,
    DEDUP_SIGNALS,
    EVAL_EMBEDDINGS,
    EVAL_IMAGES,
    SILVER,
    Lakehouse,
)
from etl.vectors import cluster_column, fit_centers
from etl.work import work

SETTINGS, VECTORS = "dfn.dedup.settings", "dfn.dedup.vectors"
CENTROIDS_SCHEMA = ("signal string, cluster int, center array<float>, fit_rows bigint, "
                    "fitted_at timestamp")
DEDUP_COLS = ["uid", "dup_of", "dup_reason", "dup_similarity", "eval_match", "eval_similarity"]
REFIT_GROWTH = 4  # suggest --refit once the pool has this many times the fitted vectors


# ---- settings and centroids ----------------------------------------------------------------


def model_weights(lake: Lakehouse, cfg: Config) -> tuple[str, str | None]:
    """The selection model and the weights digest ``silver_scores`` records for it (changed
    by a rescore with ``score.replace``; None while unknown)."""
    mid = selection_model_id(lake, cfg)
    props = lake.properties(SILVER) if lake.exists(SILVER) else {}
    return mid, props.get(weights_property(mid))


def centroid_digest(lake: Lakehouse, signal: str) -> str | None:
    """A digest of the frozen centres of ``signal`` (None: none stored)."""
    centers = load_centroids(lake, signal)
    return None if centers is None else hashlib.sha256(centers.tobytes()).hexdigest()[:16]


def vector_settings(lake: Lakehouse, cfg: Config, signals: list[str],
                    near: list[str] | None = None) -> str:
    """What the stored vectors and clusters depend on: the model (and its weights) of
    ``model``, the decode cap of ``thumbnail``, and for the ``near`` signals the clustering
    settings and the frozen centres the clusters were assigned with."""
    got: dict = {}
    if "model" in signals:
        got["model"], got["model_weights"] = model_weights(lake, cfg)
    if "thumbnail" in signals:
        got["thumbnail"] = cfg.score.max_image_pixels
    if near:
        got["clustering"] = [cfg.dedup.n_clusters, cfg.dedup.kmeans_iters]
        got["centroids"] = {s: centroid_digest(lake, s) for s in near}
    return json.dumps(got, sort_keys=True)


def clustering_changed(recorded: str | None, cfg: Config) -> bool:
    """Whether ``dedup.n_clusters``/``kmeans_iters`` differ from those the recorded vector
    settings were clustered under (nothing recorded: no)."""
    was = json.loads(recorded).get("clustering") if recorded else None
    return was is not None and was != [cfg.dedup.n_clusters, cfg.dedup.kmeans_iters]


def flag_settings(lake: Lakehouse, cfg: Config, signals: list[str], has_eval: bool) -> str:
    """What the flags depend on besides the rows: the dedup settings, the ranking score, and a
    fingerprint of the evaluation set (its rows, and its model embeddings when used)."""
    c = cfg.dedup
    got: dict = {k: getattr(c, k) for k in ("exact", "near", "near_threshold", "near_signals",
                                            "max_group_rows", "decontaminate", "eval_threshold")}
    got["score_column"] = cfg.select.score_column
    if cfg.select.score_column == "score":
        got["score_model"], got["score_weights"] = model_weights(lake, cfg)
    if has_eval:
        ev = lake.read(EVAL_IMAGES)
        key = F.col("key") if "key" in ev.columns else F.col("uid")
        got["eval"] = list(ev.agg(F.count("*"), F.bit_xor(F.xxhash64(key, "sha256"))).first())
        if "model" in signals and lake.exists(EVAL_EMBEDDINGS):
            emb = lake.read(EVAL_EMBEDDINGS).where(
                F.col("model_id") == selection_model_id(lake, cfg))
            got["eval_model"] = list(emb.agg(F.count("*"), F.bit_xor(
                F.xxhash64("uid", "image_embedding"))).first())
    return json.dumps(got, sort_keys=True, default=str)


def load_centroids(lake: Lakehouse, signal: str) -> np.ndarray | None:
    """The frozen centres of ``signal`` (``k x dim``), None when never fitted."""
    if not lake.exists(CENTROIDS):
        return None
    rows = (lake.read(CENTROIDS).where(F.col("signal") == signal).orderBy("cluster")
            .select("center").collect())  # k rows
    return np.stack([np.asarray(r[0], np.float32) for r in rows]) if rows else None


def save_centroids(lake: Lakehouse, fitted: dict[str, tuple[np.ndarray, int]]) -> None:
    """Replace the centres of the signals in ``fitted`` (signal -> (centres, rows fitted on));
    other signals' centres are kept. One small overwrite."""
    now = datetime.now(timezone.utc).replace(tzinfo=None)
    rows = []
    if lake.exists(CENTROIDS):
        rows = [tuple(r) for r in lake.read(CENTROIDS).where(~F.col("signal").isin(list(fitted)))
                .select("signal", "cluster", "center", "fit_rows", "fitted_at").collect()]
    for signal, (centers, n) in fitted.items():
        rows += [(signal, i, [float(x) for x in c], int(n), now) for i, c in enumerate(centers)]
    lake.overwrite(local_frame(lake.spark, rows, CENTROIDS_SCHEMA), CENTROIDS)


def forget_centroids(lake: Lakehouse) -> bool:
    """Delete ``dedup_centroids`` with its files and history (a takedown: a centre, the mean
    of a cluster's vectors, can be close to a removed image's, and the table has no uid to
    delete by); the next dedup run refits the centres and recomputes every row. Returns
    whether there was a table."""
    if not lake.exists(CENTROIDS):
        return False
    location = lake.spark.sql(f"DESCRIBE DETAIL {lake.name(CENTROIDS)}").first()["location"]
    if lake.conf.schema:
        lake.spark.sql(f"DROP TABLE IF EXISTS {lake.name(CENTROIDS)}")
    lake.store.rm(location)
    return True


def fit_signal(vecs: DataFrame, conf_clusters: int, iters: int) -> tuple[np.ndarray, int] | None:
    """Centres for one signal's vectors (one centre when the pool is small); None: no vector."""
    first = vecs.where(F.col("embedding").isNotNull()).select("embedding").first()
    if first is None:
        return None
    n = vecs.where(F.col("embedding").isNotNull()).count()
    k = cluster_count(n, conf_clusters)
    if k == 1:  # one cluster: every vector's nearest centre is this one
        return np.zeros((1, len(first[0])), np.float32), n
    return fit_centers(vecs, k, iters, count=n), n


def refit_hint(lake: Lakehouse, signal: str, pool: int) -> None:
    """Say when the pool outgrew the rows its frozen centres were fitted on."""
    row = lake.read(CENTROIDS).where(F.col("signal") == signal).agg(
        F.max("fit_rows"), F.count("*")).first()
    if row[0] and pool >= REFIT_GROWTH * row[0]:
        print(f"dedup: the {row[1]} frozen {signal} centres were fitted on {row[0]} vectors; the "
              f"pool has {pool} rows now: `dfn-curate dedup --refit` re-clusters it (and "
              f"recomputes every row)")


# ---- the run ---------------------------------------------------------------------------------


def run_dedup(lake: Lakehouse, cfg: Config, run_id: str,
                    refit: bool = False) -> dict[str, int]:
    """Edge: bronze (+ scores, eval images) -> ``silver_dedup``, touching what new rows can
    change; prints and records counts (with rows_new, rows_compared, clusters_touched,
    pool). Nothing new: no commit anywhere."""
    conf = cfg.dedup
    check_signals(conf)
    version = lake.version(BRONZE)  # recorded once silver_dedup is written (lineage)
    near = list(conf.near_signals) if conf.near else []
    need = list(conf.near_signals) if (conf.near or conf.decontaminate) else []
    has_eval = conf.decontaminate and lake.exists(EVAL_IMAGES)
    if conf.decontaminate and not has_eval:
        print("dedup: no bronze_eval_images table; decontamination skipped")
    built = lake.exists(DEDUP)
    props = lake.properties(DEDUP) if built else {}
    vec_fp, flag_fp = (vector_settings(lake, cfg, need, near),
                       flag_settings(lake, cfg, need, has_eval))
    if not refit and clustering_changed(props.get(VECTORS), cfg):
        print("dedup: dedup.n_clusters or dedup.kmeans_iters changed since the centres were "
              "fitted: refitting them (as `dfn-curate dedup --refit`)")
        refit = True
    redo = (refit or props.get(VECTORS) != vec_fp or (bool(need) and not lake.exists(DEDUP_SIGNALS))
            or any(load_centroids(lake, s) is None for s in near))
    full = redo or props.get(SETTINGS) != flag_fp
    if refit:
        print("dedup --refit: refitting the frozen centroids; every row's vectors, clusters and "
              "flags will be recomputed")
    elif built and full:
        print("dedup: settings, vectors or the evaluation set changed since silver_dedup was "
              "built: recomputing every row")
    pairs = scored_pool(lake, cfg).select("uid", "url", "text", "sha256", "score")
    old = None if full else lake.read(DEDUP).select(*DEDUP_COLS)
    new = pairs.select("uid")
    if old is not None:
        new = new.join(old.select("uid"), "uid", "left_anti")
    new = new.persist()
    state = {"new": new, "orphans": None, "full": full, "old": old, "refit": refit,
             "pool": lake.read(BRONZE).count()}
    counts = None
    try:
        n_new = new.count()
        if old is not None:
            keepers = old.select(F.col("uid").alias("dup_of"))
            state["orphans"] = (old.where(F.col("dup_of").isNotNull())
                                .join(keepers, "dup_of", "left_anti").select("uid").persist())
            if not n_new and not state["orphans"].count():
                print("dedup: nothing new since silver_dedup was built; no table changed")
                counts = {"rows_compared": 0, "clusters_touched": 0}
        if counts is None:
            counts = _update(lake, cfg, pairs, need, near, has_eval, redo, state)
    finally:
        new.unpersist()
        if state["orphans"] is not None:
            state["orphans"].unpersist()
    if full:  # the centres as fitted now; set last: a run killed before this is redone
        lake.set_properties(DEDUP, {SETTINGS: flag_fp,
                                    VECTORS: vector_settings(lake, cfg, need, near)})
    counts = {**dedup_counts(lake.read(DEDUP)), "rows_new": n_new, **counts,
              "pool": state["pool"]}
    counts.update(work(n_new, counts["rows_compared"], counts["rows"]))
    for name, value in counts.items():
        print(f"dedup: {name:<28}{value:>10}")
    lake.record_stats(run_id, "dedup", counts, built=(DEDUP, version))
    return counts


def _update(lake: Lakehouse, cfg: Config, pairs: DataFrame, need: list[str], near: list[str],
            has_eval: bool, redo: bool, state: dict) -> dict[str, int]:
    """Store new rows' vectors, recompute exact and the touched clusters, write silver_dedup."""
    conf, new, old, full = cfg.dedup, state["new"], state["old"], state["full"]
    signals = store_vectors(lake, cfg, new, need, near, redo, state["refit"], state["pool"])
    flags = exact_duplicates(pairs) if conf.exact else local_frame(lake.spark, [], FLAG_SCHEMA)
    flags = flags.localCheckpoint()
    found, touched_rows = [flags], []
    excluded_new = flags.select("uid")
    excluded_old = None if full else old.where(F.col("dup_reason").startswith("exact_"))
    counts = {"rows_compared": 0, "clusters_touched": 0}
    members: dict[str, DataFrame] = {}
    for s in near:
        rows = signals.where(F.col("signal") == s)
        if not full:
            changed = new.unionByName(state["orphans"]).unionByName(
                _sym_diff(excluded_new, excluded_old.select("uid")))
            clusters = (rows.join(changed, "uid", "left_semi").where(F.col("cluster").isNotNull())
                        .select("cluster").distinct().localCheckpoint())
            rows = rows.join(F.broadcast(clusters), "cluster")
        members[s] = rows.select("uid", "cluster", "embedding")
        comp = (rows.where(F.col("embedding").isNotNull()).join(excluded_new, "uid", "left_anti")
                .join(pairs.select("uid", "score"), "uid")
                .select("uid", "score", "embedding", "cluster").persist())
        try:
            stats = comp.agg(F.count("*"), F.countDistinct("cluster")).first()
            counts["rows_compared"] += stats[0]
            counts["clusters_touched"] += stats[1] if full else clusters.count()
            got = compare_clusters(comp, conf.near_threshold, f"near_{s}",
                                   conf.max_group_rows).localCheckpoint()
        finally:
            comp.unpersist()
        if not full:
            was = old.where(F.col("dup_reason") == f"near_{s}")
            got = got.unionByName(was.select("uid", "dup_of", "dup_reason", "dup_similarity")
                                  .join(rows.select("uid"), "uid", "left_anti")).localCheckpoint()
            excluded_old = excluded_old.unionByName(was)
            touched_rows.append(rows.select("uid"))
        found.append(got)
        excluded_new = excluded_new.unionByName(got.select("uid"))
    flagged = found[0]
    for f in found[1:]:
        flagged = flagged.unionByName(f)
    leaks = eval_leaks(lake, cfg, pairs, new, signals, members, need, has_eval)
    if full:
        out = pairs.select("uid").join(flagged, "uid", "left").join(leaks, "uid", "left")
        lake.overwrite(out.select(*DEDUP_COLS), DEDUP)
        return counts
    counts["rows_changed"] = merge_changes(lake, new, old, flagged, leaks, [
        state["orphans"], flags.select("uid"),
        old.where(F.col("dup_reason").startswith("exact_")).select("uid"), *touched_rows])
    return counts


def _sym_diff(a: DataFrame, b: DataFrame) -> DataFrame:
    """uids in exactly one of ``a`` and ``b``."""
    both = a.select("uid", F.lit(1).alias("_a")).join(
        b.select("uid", F.lit(1).alias("_b")), "uid", "full")
    return both.where(F.col("_a").isNull() | F.col("_b").isNull()).select("uid")


def store_vectors(lake: Lakehouse, cfg: Config, new: DataFrame, need: list[str],
                  near: list[str], redo: bool, refit: bool, pool: int) -> DataFrame | None:
    """Compute the vectors of the ``new`` rows that have none stored (every pool row when
    ``redo``), assign them to the frozen clusters (when ``redo``, fitting centres first where
    none fit: ``refit``, none stored, or another dimension) and store them; returns
    ``silver_dedup_signals`` (None: no signal needed)."""
    if not need:
        return None
    conf, stored = cfg.dedup, None if redo else lake.read(DEDUP_SIGNALS)
    vecs, rows, fitted = [], None, {}
    for s in need:
        todo = new if stored is None else new.join(
            stored.where(F.col("signal") == s).select("uid"), "uid", "left_anti")
        v = pool_vectors(lake, cfg, s, None if redo else todo).persist()
        vecs.append(v)
        centers = None if s not in near or refit else load_centroids(lake, s)
        if s in near and redo:
            first = v.where(F.col("embedding").isNotNull()).select("embedding").first()
            if first is not None and (centers is None or centers.shape[1] != len(first[0])):
                centers, n = fit_signal(v, conf.n_clusters, conf.kmeans_iters)
                fitted[s] = (centers, n)
                print(f"dedup: fitted {len(centers)} {s} centres on {n} vectors (frozen)")
        elif s in near:
            refit_hint(lake, s, pool)
        cluster = (F.lit(None).cast("int") if centers is None
                   else F.when(F.col("embedding").isNotNull(), F.lit(0)) if len(centers) == 1
                   else cluster_column(centers, lake.staging("shared"))("embedding"))
        part = v.select("uid", F.lit(s).alias("signal"), cluster.alias("cluster"), "embedding")
        rows = part if rows is None else rows.unionByName(part)
    if fitted:
        save_centroids(lake, fitted)
    try:
        if redo:
            lake.overwrite(rows, DEDUP_SIGNALS, partition_by=["signal", "cluster"])
        elif sum(v.count() for v in vecs):
            lake.append(rows, DEDUP_SIGNALS)
    finally:
        for v in vecs:
            v.unpersist()
    return lake.read(DEDUP_SIGNALS)


def eval_leaks(lake: Lakehouse, cfg: Config, pairs: DataFrame, new: DataFrame,
               signals: DataFrame | None, members: dict[str, DataFrame], need: list[str],
               has_eval: bool) -> DataFrame:
    """(uid, eval_match, eval_similarity) of the ``new`` rows that match an evaluation image;
    a near signal's vectors are read from the touched clusters, which hold every new row."""
    matches = []
    if has_eval:
        ev = lake.read(EVAL_IMAGES)
        key = F.col("key") if "key" in ev.columns else F.col("uid")
        matches.append(eval_hash_matches(pairs.join(new, "uid", "left_semi"),
                                         ev.select(key.alias("key"), "sha256")))
        for s in need:
            keys, vectors = eval_vectors(lake, cfg, s)
            rows = members.get(s)
            rows = signals.where(F.col("signal") == s) if rows is None else rows
            matches.append(eval_vector_matches(rows.join(new, "uid", "left_semi"), keys, vectors,
                                               cfg.dedup.eval_threshold))
    leaks = best_match(matches)
    return local_frame(lake.spark, [], LEAK_SCHEMA) if leaks is None else leaks


def merge_changes(lake: Lakehouse, new: DataFrame, old: DataFrame, flagged: DataFrame,
                  leaks: DataFrame, candidates: list[DataFrame]) -> int:
    """MERGE into ``silver_dedup`` the new rows and the ``candidates`` whose flags differ from
    ``old``; returns how many rows that was (none: no commit)."""
    uids = new
    for c in candidates:
        uids = uids.unionByName(c)
    kept_eval = old.select("uid", "eval_match", "eval_similarity").unionByName(leaks)
    rows = (uids.distinct().join(flagged, "uid", "left").join(kept_eval, "uid", "left")
            .select(*DEDUP_COLS))
    before = old.select(*[F.col(c).alias(f"_o_{c}") for c in DEDUP_COLS])
    same = F.col("_o_uid").isNotNull()
    for c in DEDUP_COLS[1:]:
        same = same & F.col(c).eqNullSafe(F.col(f"_o_{c}"))
    changed = (rows.join(before, F.col("uid") == F.col("_o_uid"), "left").where(~same)
               .select(*DEDUP_COLS).localCheckpoint())
    n = changed.count()
    if n:
        lake.merge(changed, DEDUP, ["uid"], "WHEN MATCHED THEN UPDATE SET * "
                   "WHEN NOT MATCHED THEN INSERT *")
    return n
