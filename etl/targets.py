"""Target signals for DataComp's image- and text-based filters and targeted ranking.

``dfn-curate targets`` writes ``silver_targets`` (one row per pool uid with an image
embedding of the selection model):

* ``image_cluster``       the pool row's cluster among ``targets.n_clusters`` spherical k-means
  centres of the pool's image embeddings (fitted on K x ``fit_rows_per_cluster`` rows sampled
  on the executors);
* ``in_target_cluster``   true when some target image's nearest pool centre is that cluster
  (DataComp's image-based filter: keep the pool clusters the target set lands in);
* ``target_similarity``   mean of the row's ``top_k`` cosine similarities to target images,
  searched exactly within the ``nprobe`` clusters nearest the row (an IVF search: exact over
  every target once ``nprobe >= n_clusters``); a slot with no target counts as -1, cosine's
  minimum, so rows far from every target rank last. No pool x pool product anywhere.

The target set (``targets.source``): ``eval`` (the ingested evaluation images, as
``silver_eval_embeddings`` holds them for the model), ``table:<name>`` (a lakehouse or catalog
table with ``image_embedding``, and ``model_id`` when it holds several models) or
``folder:<url>`` (an image folder, embedded here with the configured scoring model). At most
``targets.max_targets`` target vectors; they and the centres reach each task as one broadcast:
a task holds ``(max_targets + n_clusters) x dim`` floats plus a block of rows x n_clusters.

Text-based filtering needs no model: :func:`vocabulary_terms` (ImageNet-1k class names as
open_clip ships them, or a file of terms) and :func:`in_vocabulary` (a word-boundary,
case-insensitive Spark SQL regex match) give ``caption_in_vocab`` at select time.
"""

from __future__ import annotations

import importlib.util
import re
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import pandas as pd
from pyspark.sql import Column, DataFrame
from pyspark.sql import functions as F
from pyspark.sql.functions import pandas_udf

from etl.compat import Shared, Staging
from etl.config import Config, ConfigError, TargetsConf, resolve_path
from etl.fs import is_url
from etl.redact import redact_text
from etl.silver import score_value, selection_model_id
from etl.tables import BRONZE, EVAL_EMBEDDINGS, SILVER, TARGETS, Lakehouse
from etl.vectors import fit_centers, nearest, unit_rows

IMAGENET = "imagenet1k"
SIGNAL_DDL = "image_cluster int, in_target_cluster boolean, target_similarity double"
SIMS_PER_BLOCK = 4_000_000  # rows x centres compared at once (16 MB of float32)


# ---- text-based: a vocabulary matched on word boundaries -----------------------------------


def imagenet_classnames() -> list[str]:
    """open_clip's ImageNet-1k class names, read from its metadata module without importing
    open_clip (and torch)."""
    spec = importlib.util.find_spec("open_clip")
    if spec is None or not spec.submodule_search_locations:
        raise ConfigError("targets.vocabulary: imagenet1k needs open_clip_torch installed")
    path = Path(list(spec.submodule_search_locations)[0]) / "zero_shot_metadata.py"
    module_spec = importlib.util.spec_from_file_location("_open_clip_zero_shot_metadata", path)
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    return list(module.IMAGENET_CLASSNAMES)


def vocabulary_terms(spec: str, lake: Lakehouse | None = None) -> list[str]:
    """Unique lower-cased terms of ``imagenet1k`` or of a file (one term per line, ``#``
    comments and blank lines ignored); ConfigError when none is usable."""
    if spec == IMAGENET:  # "military hat (bearskin or shako)" -> "military hat"
        raw = [re.sub(r"\s*\([^)]*\)", "", name) for name in imagenet_classnames()]
    else:
        data = (lake.store.read_bytes(spec) if is_url(spec) and lake is not None
                else resolve_path(spec).read_bytes() if resolve_path(spec).is_file() else None)
        if data is None:
            raise ConfigError(f"targets.vocabulary: {spec!r} is neither imagenet1k nor a file")
        raw = [line.split("#", 1)[0] for line in data.decode("utf-8", "replace").splitlines()]
    terms = sorted({" ".join(t.lower().split()) for t in raw if re.search(r"\w", t or "")},
                   key=lambda t: (-len(t), t))
    if not terms:
        raise ConfigError(f"targets.vocabulary: {spec!r} has no usable terms (one term per "
                          f"line, with at least one letter or digit)")
    return terms


def vocabulary_regex(terms: list[str]) -> str:
    """A Java regex matching any term as whole words, case-insensitively (a space in a term
    matches any run of whitespace). The terms are folded into a prefix tree, so a caption is
    scanned once rather than once per term."""
    trie: dict = {}
    for term in terms:
        node = trie
        for ch in " ".join(term.split()):
            node = node.setdefault(ch, {})
        node[""] = {}
    return rf"(?iuU)(?<!\w){_trie_regex(trie)}(?!\w)"


def _trie_regex(node: dict) -> str:
    alts = [(r"\s+" if ch == " " else re.escape(ch)) + _trie_regex(child)
            for ch, child in sorted(node.items()) if ch]
    if not alts:
        return ""
    if "" in node:
        return "(?:" + "|".join(alts) + ")?"
    return alts[0] if len(alts) == 1 else "(?:" + "|".join(alts) + ")"


def in_vocabulary(text: Column, terms: list[str]) -> Column:
    """True when the caption mentions a term; null for a null caption."""
    return text.rlike(vocabulary_regex(terms))


# ---- image-based and targeted: clusters and top-k similarity ---------------------------------


def signals_udf(centers: np.ndarray, targets: np.ndarray, conf: TargetsConf,
                stage: Staging | None = None):
    """embedding -> struct(image_cluster, in_target_cluster, target_similarity) per pool row.
    Centres and targets reach the workers in the UDF, or staged under ``stage`` when large
    (:class:`etl.compat.Shared`: the targets can be 100k x dim floats)."""
    units = unit_rows(pd.Series(list(targets)))
    owner = nearest(units, centers)
    order = np.argsort(owner, kind="stable")
    bounds = np.searchsorted(owner[order], np.arange(len(centers) + 1))
    hit = np.zeros(len(centers), bool)
    hit[owner] = True
    shared = Shared((centers, units[order], bounds, hit), stage)
    k, nprobe = min(conf.top_k, len(targets)), min(conf.nprobe, len(centers))

    @pandas_udf(SIGNAL_DDL)
    def signals(vectors: pd.Series) -> pd.DataFrame:
        out = pd.DataFrame({"image_cluster": pd.Series(pd.NA, index=vectors.index, dtype="Int32"),
                            "in_target_cluster": pd.Series(pd.NA, index=vectors.index,
                                                           dtype="boolean"),
                            "target_similarity": np.full(len(vectors), np.nan)})
        present = vectors.notna().to_numpy()
        if present.any():
            cl, sim = row_signals(unit_rows(vectors[present]), *shared.value[:3], k, nprobe)
            out.loc[present, "image_cluster"] = cl
            out.loc[present, "in_target_cluster"] = shared.value[3][cl]
            out.loc[present, "target_similarity"] = sim
        return out

    return signals


def row_signals(rows: np.ndarray, centers: np.ndarray, targets: np.ndarray, bounds: np.ndarray,
                k: int, nprobe: int) -> tuple[np.ndarray, np.ndarray]:
    """(nearest cluster, mean top-k cosine to the targets of the ``nprobe`` nearest clusters)
    of unit ``rows``; ``targets`` are sorted by cluster, cluster c owning rows
    ``bounds[c]:bounds[c + 1]``."""
    block = max(1, SIMS_PER_BLOCK // max(1, len(centers)))
    clusters = np.empty(len(rows), np.int32)
    sims = np.empty(len(rows))
    for s in range(0, len(rows), block):
        part = rows[s:s + block]
        to_centers = part @ centers.T
        clusters[s:s + block] = np.argmax(to_centers, axis=1)
        probes = np.argpartition(-to_centers, nprobe - 1, axis=1)[:, :nprobe]
        sims[s:s + block] = _top_k_mean(part, probes, targets, bounds, k)
    return clusters, sims


def _top_k_mean(part: np.ndarray, probes: np.ndarray, targets: np.ndarray, bounds: np.ndarray,
                k: int) -> np.ndarray:
    best = np.full((len(part), k), -1.0, np.float32)
    for c in np.unique(probes):
        lo, hi = bounds[c], bounds[c + 1]
        if lo == hi:
            continue
        rows = np.flatnonzero((probes == c).any(axis=1))
        both = np.concatenate([best[rows], part[rows] @ targets[lo:hi].T], axis=1)
        best[rows] = -np.partition(-both, k - 1, axis=1)[:, :k]
    return best.mean(axis=1).astype(np.float64)


def target_signals(pool: DataFrame, targets: np.ndarray, conf: TargetsConf,
                   stage: Staging | None = None, count: int | None = None) -> DataFrame:
    """``(uid, embedding)`` -> ``uid, image_cluster, in_target_cluster, target_similarity``.

    K > the pool's embedded rows, or targets of another dimension, raise ConfigError first."""
    rows = pool.where(F.col("embedding").isNotNull())
    n = rows.count() if count is None else count
    if conf.n_clusters > n:
        raise ConfigError(f"targets.n_clusters: {conf.n_clusters} clusters for {n} embedded pool "
                          f"rows; set it to at most {n} (DataComp used 100k for 12.8M pairs)")
    dim = len(rows.select("embedding").first()[0])
    if targets.shape[1] != dim:
        raise ConfigError(f"targets: target vectors have {targets.shape[1]} dimensions, the "
                          f"pool's embeddings {dim}: embed both with the same model")
    centers = fit_centers(rows, conf.n_clusters, conf.kmeans_iters, conf.seed,
                          conf.n_clusters * conf.fit_rows_per_cluster, count=n)
    udf = signals_udf(centers, targets, conf, stage)
    return pool.select("uid", udf("embedding").alias("s")).select("uid", "s.*")


# ---- edges: the target set, the pool, the table ----------------------------------------------


def target_model_id(lake: Lakehouse, cfg: Config) -> str:
    """``targets.model_id``, else the selection model (:func:`etl.silver.selection_model_id`)."""
    return cfg.targets.model_id or selection_model_id(lake, cfg)


def target_frame(lake: Lakehouse, cfg: Config, model_id: str) -> tuple[DataFrame, str]:
    """``(image_embedding rows of the target set, description)``; errors name the fix."""
    source = cfg.targets.source
    kind, _, rest = source.partition(":")
    if source == "eval":
        if not lake.exists(EVAL_EMBEDDINGS):
            raise ConfigError(f"targets.source eval: no {EVAL_EMBEDDINGS} table; ingest an eval "
                              f"set (ingest.eval_sources) and run `dfn-curate score`")
        return _of_model(lake.read(EVAL_EMBEDDINGS), model_id, EVAL_EMBEDDINGS), "eval"
    if kind == "table":
        from etl.train import source_table

        df, name, _ = source_table(lake, rest)
        if "image_embedding" not in df.columns:
            raise ConfigError(f"targets.source {source}: {name} has no image_embedding column")
        if "model_id" in df.columns:
            df = _of_model(df, model_id, name)
        return df, source
    return _embed_folder(lake, cfg, rest, model_id), source


def _of_model(df: DataFrame, model_id: str, name: str) -> DataFrame:
    mine = df.where(F.col("model_id") == model_id)
    if mine.limit(1).count():
        return mine
    others = [r[0] for r in df.select("model_id").distinct().limit(10).collect()]
    raise ConfigError(f"targets: {name} holds embeddings of {others or 'no model'}, not of the "
                      f"pool's model {model_id!r}; embed the target set with {model_id!r} "
                      f"(`dfn-curate score`) or set targets.model_id")


def _embed_folder(lake: Lakehouse, cfg: Config, url: str, model_id: str) -> DataFrame:
    from etl.readers import read_image_folder
    from etl.score import configure_arrow, score_pairs
    from udfs.models import resolve_conf

    models = [m for m in cfg.score.models if resolve_conf(m).model_id == model_id]
    if not models:
        raise ConfigError(f"targets.source folder: the pool's model {model_id!r} is not in "
                          f"score.models, so the folder cannot be embedded with it")
    configure_arrow(lake.spark, cfg.score)
    images = read_image_folder(lake.spark, url, stage=lake.staging("json")).where(F.col("image").isNotNull()).select(
        F.col("source_file").alias("uid"), "image", F.coalesce("text", F.lit("")).alias("text"))
    return score_pairs(images, models[0], cfg.score)


def collect_targets(frame: DataFrame, cap: int, what: str) -> np.ndarray:
    """The target vectors on the driver (bounded by ``targets.max_targets``)."""
    rows = frame.where(F.col("image_embedding").isNotNull()).select("image_embedding")
    n = rows.count()
    if n == 0:
        raise ConfigError(f"targets: the target set ({what}) has no image embeddings; point "
                          f"targets.source at a non-empty set")
    if n > cap:
        raise ConfigError(f"targets: the target set ({what}) has {n} images, over "
                          f"targets.max_targets = {cap}; raise it or sample the set")
    return np.stack([np.asarray(r[0], np.float32) for r in rows.collect()])


def target_columns(lake: Lakehouse, cfg: Config) -> DataFrame:
    """``uid, in_target_cluster, target_similarity`` for select; refuses a missing table or
    one built from another model's embeddings."""
    if not lake.exists(TARGETS):
        raise ConfigError("select.rule reads image_based / target_similarity, but there is no "
                          "silver_targets table: run `dfn-curate targets` first")
    model_id = target_model_id(lake, cfg)
    built = [r[0] for r in lake.read(TARGETS).select("model_id").distinct().limit(3).collect()]
    if built and built != [model_id]:
        raise ConfigError(f"silver_targets was built from {built} embeddings, the selection "
                          f"model is {model_id!r}: run `dfn-curate targets` again")
    return lake.read(TARGETS).select(
        "uid", "in_target_cluster",
        score_value("target_similarity").alias("target_similarity"))


def run_targets(lake: Lakehouse, cfg: Config, run_id: str) -> dict[str, int]:
    """Edge: silver embeddings + the target set -> ``silver_targets``; every check first."""
    model_id = target_model_id(lake, cfg)
    frame, what = target_frame(lake, cfg, model_id)
    targets = collect_targets(frame, cfg.targets.max_targets, what)
    version = lake.version(BRONZE)
    pool = (lake.read(SILVER).where(F.col("model_id") == model_id)
            .select("uid", F.col("image_embedding").alias("embedding")))
    signals = target_signals(pool, targets, cfg.targets, lake.staging("shared"))
    now = datetime.now(timezone.utc).replace(tzinfo=None)
    lake.overwrite(signals.select("*", F.lit(model_id).alias("model_id"),
                                  F.lit(what).alias("target_set"), F.lit(run_id).alias("run_id"),
                                  F.lit(now).alias("computed_at")), TARGETS)
    row = lake.read(TARGETS).agg(
        F.count("*").alias("rows"), F.count("image_cluster").alias("clustered"),
        F.sum(F.col("in_target_cluster").cast("int")).alias("in_target_cluster"),
        F.countDistinct(F.when(F.col("in_target_cluster"), F.col("image_cluster")))
        .alias("target_clusters")).first()
    counts = {"targets": len(targets), **{k: int(row[k] or 0) for k in row.asDict()}}
    print(redact_text(f"targets: {counts['targets']} target images ({what}, model {model_id}) "
                      f"land in {counts['target_clusters']} of {cfg.targets.n_clusters} pool "
                      f"clusters holding {counts['in_target_cluster']} of {counts['rows']} pool "
                      "rows"))
    lake.record_stats(run_id, "targets", counts, built=(TARGETS, version))
    return counts
