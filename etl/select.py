"""Selection: dedup flags + basic filters + a score threshold -> ``gold_selection``.

Every pool uid gets exactly one row with ``kept`` and the *first* ``drop_reason`` in this order:

1. ``eval-leak``        near/exact copy of an evaluation image (``silver_dedup.eval_match``);
2. ``duplicate``        exact duplicate (sha256, url+text, url) of a canonical row;
3. ``near-duplicate``   near duplicate by image embedding / thumbnail;
4. each basic filter by name, in config order (the preset's first, then ``select.filters``);
5. ``unscorable``       no score (only when a threshold is configured);
6. ``below-threshold``  score below the threshold.

Reasons that hold regardless of any model come first, model-dependent ones last.

Threshold semantics (DataComp ``baselines/apply_filter.py: get_threshold``): with
``keep_fraction`` f over N scored rows, sort scores descending, n = int(N * f), threshold =
the score at 0-based position n, keep rows with score >= threshold. So ties at the threshold
are all kept, f = 0 keeps the top score (and its ties), and n == N (f = 1) keeps every scored
row. N counts non-null scores of the rows left after steps 1-4 (``fraction_of: remaining``)
or of the whole pool (``fraction_of: pool``, DataComp's own setting). ``min_score`` keeps
score >= min_score. The threshold is found exactly without collecting the pool
(:func:`kth_largest`).

Freshness: ``run_select`` refuses (:class:`etl.tables.StaleTableError`, before any write) a
``silver_dedup`` or selection-model scores built from an older bronze version than the current
one (:func:`stale_inputs`), and records the bronze version ``gold_selection`` was built from.
"""

from __future__ import annotations

from dataclasses import dataclass

from pyspark.sql import Column, DataFrame
from pyspark.sql import functions as F

from etl.config import Config, ConfigError, SelectConf
from etl.filters import (
    DATACOMP_BASIC,
    add_derived,
    check_filters,
    configured_filters,
    failed_filter,
)
from etl.tables import BRONZE, DEDUP, SELECTION, SILVER, TARGETS, Lakehouse, StaleTableError

DEDUP_REASONS = ["eval-leak", "duplicate", "near-duplicate"]
FLAGS = {"in_target_cluster": "in_target_cluster", "in_vocabulary": "caption_in_vocab"}
TARGET_COLUMNS = ("in_target_cluster", "target_similarity")
DEDUP_COLUMNS = ["dup_of", "dup_reason", "dup_similarity", "eval_match", "eval_similarity"]
SMALL = 200_000  # below this many values the exact top-k is taken directly


@dataclass
class Threshold:
    """The score cut: keep ``score >= value``; ``value`` None keeps every scored row."""

    rule: str  # none | min_score | keep_fraction
    value: float | None = None
    n_scored: int | None = None  # N (keep_fraction)
    position: int | None = None  # n = int(N * fraction)

    @property
    def active(self) -> bool:
        return self.rule != "none"


def reason_order(filters: dict[str, str]) -> list[str]:
    """All drop reasons in the order they are assigned (no ``select.rule``)."""
    return [*DEDUP_REASONS, *filters, "unscorable", "below-threshold"]


def selection_reasons(conf: SelectConf) -> list[str]:
    """The drop reasons of the configured selection, in the order they are assigned."""
    if conf.rule:
        from etl.rules import rule_parts

        return [*DEDUP_REASONS, *rule_parts(conf.rule, rule_context(conf))]
    return reason_order(configured_filters(conf))


def rule_context(conf: SelectConf):
    """What ``select.rule``'s names mean: ``dfn`` = the selection model's score, each
    ``select.scores`` alias (a ``model:<id>`` alias reads column ``score_<alias>``), the
    configured filters (DataComp's basic filters and ``two_words`` always by name), and the
    flags ``in_target_cluster`` (silver_targets) / ``in_vocabulary`` (``targets.vocabulary``)."""
    from etl.rules import RuleContext

    scores = {"dfn": "score", **{a: _alias_column(a, src) for a, src in conf.scores.items()}}
    filters = {**DATACOMP_BASIC, "two_words": "caption_words > 1", **configured_filters(conf)}
    return RuleContext(scores=scores, filters=filters, flags=dict(FLAGS),
                       fraction_of=conf.fraction_of, seed=conf.seed)


def _alias_column(alias: str, source: str) -> str:
    return f"score_{alias}" if source.startswith("model:") else source


def pre_threshold(pool: DataFrame, dedup: DataFrame | None, filters: dict[str, str]) -> DataFrame:
    """Pool rows (uid, text, sizes, score, ...) + derived columns, dedup flags, ``pre_reason``.

    ``pre_reason`` is the first of eval-leak, duplicate, near-duplicate, failed filter.
    """
    df = add_derived(pool, filters)
    check_filters(df, filters)
    if dedup is not None:
        df = df.drop(*[c for c in DEDUP_COLUMNS if c in df.columns]).join(
            dedup.select("uid", *[c for c in DEDUP_COLUMNS if c in dedup.columns]), "uid", "left")
    for name in DEDUP_COLUMNS:
        if name not in df.columns:
            df = df.withColumn(name, F.lit(None).cast("double" if "similarity" in name else "string"))
    reason = (F.when(F.col("eval_match").isNotNull(), "eval-leak")
              .when(F.col("dup_reason").startswith("exact"), "duplicate")
              .when(F.col("dup_reason").startswith("near"), "near-duplicate")
              .otherwise(failed_filter(filters)))
    return df.withColumn("pre_reason", reason)


def threshold_for(pre: DataFrame, conf: SelectConf, small: int = SMALL) -> Threshold:
    """Resolve ``min_score`` / ``keep_fraction`` over ``pre`` (see the module docstring)."""
    if conf.min_score is not None:
        return Threshold("min_score", conf.min_score)
    if conf.keep_fraction is None:
        return Threshold("none")
    base = pre if conf.fraction_of == "pool" else pre.where(F.col("pre_reason").isNull())
    return fraction_threshold(base, "score", conf.keep_fraction, small)


def fraction_threshold(df: DataFrame, col: str, fraction: float, small: int = SMALL) -> Threshold:
    """DataComp's keep-fraction threshold over the non-null values of ``col``."""
    scores = df.select(F.col(col).alias("v")).where(F.col("v").isNotNull())
    n_scored = scores.count()
    n = int(n_scored * fraction)
    if n >= n_scored:  # fraction 1, or nothing scored: keep every scored row
        return Threshold("keep_fraction", None, n_scored, n)
    return Threshold("keep_fraction", kth_largest(scores, "v", n, small, n_scored), n_scored, n)


def kth_largest(df: DataFrame, col: str, k: int, small: int = SMALL,
                count: int | None = None, buckets: int = 64) -> float:
    """Exact value at 0-based position ``k`` of ``col`` sorted descending (nulls excluded).

    Never collects the column: values are bucketed by approximate quantiles, only per-bucket
    counts come to the driver, and the search narrows to the bucket holding position ``k``
    until at most ``small`` values remain, whose top ``k + 1`` are then taken exactly.
    """
    values = df.select(F.col(col).cast("double").alias("v")).where(F.col("v").isNotNull())
    n = values.count() if count is None else count
    if not 0 <= k < n:
        raise ValueError(f"position {k} is outside 0..{n - 1}")
    while n > small:
        lo, hi, before, size = _bucket_of(values, k, buckets)
        if lo == hi:
            return hi
        if size == n:  # quantiles did not split (heavy ties at the low end): peel the minimum
            above = values.where(F.col("v") > lo)
            n_above = above.count()
            if k >= n_above:
                return lo
            values, n = above, n_above
            continue
        values, k, n = values.where(F.col("v").between(lo, hi)), k - before, size
    return values.orderBy(F.desc("v")).limit(k + 1).agg(F.min("v")).first()[0]


def _bucket_of(values: DataFrame, k: int, buckets: int) -> tuple[float, float, int, int]:
    """(min, max, rows before, rows) of the quantile bucket holding descending position k."""
    qs = values.approxQuantile("v", [i / buckets for i in range(1, buckets)], 0.25 / buckets)
    bounds = F.array(*[F.lit(float(x)) for x in sorted(set(qs), reverse=True)])
    bucket = F.size(F.filter(bounds, lambda b: b > F.col("v")))
    stats = (values.groupBy(bucket.alias("b"))
             .agg(F.count("*").alias("n"), F.min("v").alias("lo"), F.max("v").alias("hi"))
             .orderBy("b").collect())
    before = 0
    for row in stats:
        if k < before + row["n"]:
            return row["lo"], row["hi"], before, row["n"]
        before += row["n"]
    raise AssertionError("bucket counts do not cover the position")


def apply_threshold(pre: DataFrame, thr: Threshold) -> DataFrame:
    """Final ``kept`` / ``drop_reason`` / ``threshold`` columns from ``pre`` and ``thr``."""
    score = F.col("score")
    reason: Column = F.col("pre_reason")
    if thr.active:
        reason = F.coalesce(reason, F.when(score.isNull(), F.lit("unscorable")))
    if thr.value is not None:
        reason = F.coalesce(reason, F.when(score < F.lit(thr.value), F.lit("below-threshold")))
    return (pre.withColumn("drop_reason", reason)
            .withColumn("kept", F.col("drop_reason").isNull())
            .withColumn("threshold", F.lit(thr.value).cast("double"))
            .drop("pre_reason"))


def select_pairs(pool: DataFrame, dedup: DataFrame | None, conf: SelectConf,
                 small: int = SMALL) -> DataFrame:
    """The whole selection as one DataFrame -> DataFrame step (``pool`` needs ``score``, and
    the columns ``select.rule`` reads when one is set)."""
    if conf.rule:
        return apply_selection_rule(rule_pre(pool, dedup, conf), conf, small)[0]
    pre = pre_threshold(pool, dedup, configured_filters(conf))
    return apply_threshold(pre, threshold_for(pre, conf, small))


def rule_pre(pool: DataFrame, dedup: DataFrame | None, conf: SelectConf) -> DataFrame:
    """Pool rows with the derived columns ``select.rule`` reads and the dedup ``pre_reason``."""
    from etl.rules import rule_columns

    used = rule_columns(conf.rule, rule_context(conf))
    return pre_threshold(add_derived(pool, {f"_{i}": c for i, c in enumerate(sorted(used))}),
                         dedup, {})


def apply_selection_rule(pre: DataFrame, conf: SelectConf,
                         small: int = SMALL) -> tuple[DataFrame, list]:
    """``select.rule`` over :func:`rule_pre` rows: ``(selection, one PartResult per part)``.
    The ``threshold`` column is the cut of the first part on the selection model's score."""
    from etl.rules import apply_rule

    out, parts = apply_rule(pre, conf.rule, rule_context(conf), small)
    cut = next((p.threshold for p in parts if p.column == "score"), None)
    return out.withColumn("threshold", F.lit(cut).cast("double")), parts


# ---- edges: lakehouse reads and writes ---------------------------------------------------


def model_id_for(lake: Lakehouse, cfg: Config) -> str:
    """The model whose scores/embeddings select and dedup use: ``select.model_id``, else the
    first configured scoring model, else the only model in ``silver_scores``."""
    if cfg.select.model_id:
        return cfg.select.model_id
    try:
        from udfs.models import resolve_conf

        return resolve_conf(cfg.score.models[0]).model_id
    except (ValueError, OSError, IndexError):
        pass
    ids = [r[0] for r in lake.read(SILVER).select("model_id").distinct().limit(2).collect()]
    if len(ids) != 1:
        raise ConfigError(f"select.model_id: set it to one of the scored models {ids}")
    return ids[0]


def model_scores(lake: Lakehouse, cfg: Config, embeddings: bool = False) -> DataFrame:
    """uid, score (NaN as null), score_error[, image_embedding] of the selection model."""
    mid = model_id_for(lake, cfg)
    silver = lake.read(SILVER).where(F.col("model_id") == mid)
    if not silver.limit(1).count():
        ids = [r[0] for r in lake.read(SILVER).select("model_id").distinct().limit(20).collect()]
        raise ConfigError(f"select.model_id: no scores for model {mid!r} in silver_scores "
                          f"(scored models: {ids}); run `dfn-curate score` or set select.model_id")
    error = F.col("score_error") if "score_error" in silver.columns else F.lit(None)
    cols = [F.col("uid"), F.nanvl("score", F.lit(None).cast("double")).alias("score"),
            error.cast("string").alias("score_error")]
    return silver.select(*cols, *([F.col("image_embedding")] if embeddings else []))


def scored_pool(lake: Lakehouse, cfg: Config) -> DataFrame:
    """Bronze pairs (no image bytes) with the configured score column as ``score``."""
    bronze = lake.read(BRONZE).drop("image")
    col = cfg.select.score_column
    if col == "score":
        return bronze.drop("score", "score_error").join(model_scores(lake, cfg), "uid", "left")
    if col not in bronze.columns:
        raise ConfigError(f"select.score_column: {col!r} is neither 'score' (the model score in "
                          f"silver) nor a bronze column ({', '.join(bronze.columns)})")
    value = F.col(col).try_cast("double")
    return bronze.withColumn("score", F.nanvl(value, F.lit(None).cast("double")))


def rule_pool(lake: Lakehouse, cfg: Config) -> DataFrame:
    """:func:`scored_pool` plus what ``select.rule`` reads from elsewhere: ``model:<id>``
    aliases' scores, ``silver_targets`` columns, ``caption_in_vocab``."""
    pool, conf = scored_pool(lake, cfg), cfg.select
    if not conf.rule:
        return pool
    from etl.rules import rule_columns

    cols = rule_columns(conf.rule, rule_context(conf))
    for alias, src in conf.scores.items():
        if src.startswith("model:") and _alias_column(alias, src) in cols:
            pool = pool.join(alias_scores(lake, src[len("model:"):], _alias_column(alias, src)),
                             "uid", "left")
    if cols & set(TARGET_COLUMNS):
        from etl.targets import target_columns

        pool = pool.join(target_columns(lake, cfg), "uid", "left")
    if "caption_in_vocab" in cols:
        from etl.targets import in_vocabulary, vocabulary_terms

        terms = vocabulary_terms(cfg.targets.vocabulary, lake)
        pool = pool.withColumn("caption_in_vocab", in_vocabulary(F.col("text"), terms))
    return pool


def alias_scores(lake: Lakehouse, model_id: str, column: str) -> DataFrame:
    """``uid, <column>``: the silver scores of ``model_id`` (NaN as null)."""
    silver = lake.read(SILVER).where(F.col("model_id") == model_id)
    if not silver.limit(1).count():
        raise ConfigError(f"select.scores: no scores for model:{model_id} in silver_scores; add "
                          f"it to score.models and run `dfn-curate score`")
    return silver.select("uid", F.nanvl("score", F.lit(None).cast("double")).alias(column))


def needs_targets(conf: SelectConf) -> bool:
    """True when ``select.rule`` reads ``silver_targets`` (image_based, a targeted score)."""
    if not conf.rule:
        return False
    from etl.rules import rule_columns

    return bool(rule_columns(conf.rule, rule_context(conf)) & set(TARGET_COLUMNS))


def funnel(selection: DataFrame, order: list[str]) -> list[tuple[str, int, int]]:
    """(step, rows dropped by it, rows left after it): ``pool``, each drop reason that dropped
    rows (reason order, then any other reason found, sorted), ``kept``.

    The one funnel: select prints and records it (:func:`funnel_counts`), the report draws it.
    Every drop reason in ``selection`` is counted, so the steps always add up to the pool.
    """
    got = {r["drop_reason"]: r["count"] for r in selection.groupBy("drop_reason").count().collect()}
    total = sum(got.values())
    order = list(order) + sorted(r for r in got if r is not None and r not in order)
    rows, left = [("pool", 0, total)], total
    for reason in order:
        if got.get(reason):
            left -= got[reason]
            rows.append((reason, got[reason], left))
    rows.append(("kept", 0, got.get(None, 0)))
    return rows


def funnel_counts(rows: list[tuple[str, int, int]]) -> dict[str, int]:
    """The funnel as run-stats metrics: ``pool``, ``dropped:<reason>``, ``kept``."""
    counts = {"pool": rows[0][2]}
    counts.update({f"dropped:{name}": dropped for name, dropped, _ in rows[1:-1]})
    counts["kept"] = rows[-1][2]
    return counts


def print_funnel(rows: list[tuple[str, int, int]]) -> None:
    """Print the funnel: pool, each drop reason with what is left after it, kept."""
    print(f"{'pool':<28}{rows[0][2]:>10}")
    for name, dropped, left in rows[1:-1]:
        print(f"  - {name:<24}{dropped:>10}   -> {left}")
    print(f"{'kept':<28}{rows[-1][2]:>10}")


def stale_scores(lake: Lakehouse, cfg: Config, needed_by: str) -> StaleTableError | None:
    """The selection model's scores, when select uses them and they no longer cover bronze."""
    if cfg.select.score_column != "score" or not lake.exists(SILVER):
        return None
    return lake.stale(SILVER, f"score:{SILVER}", needed_by, command="score",
                      metric=f"source_version[{model_id_for(lake, cfg)}]")


def stale_inputs(lake: Lakehouse, cfg: Config, needed_by: str = "select") -> list[StaleTableError]:
    """Inputs of select that no longer cover bronze: the selection model's scores (when
    ``score_column`` is ``score``), then ``silver_dedup`` (when it exists), in step order."""
    out = [stale_scores(lake, cfg, needed_by)]
    if lake.exists(DEDUP):
        out.append(lake.stale(DEDUP, "dedup", needed_by))
    if needs_targets(cfg.select) and lake.exists(TARGETS):
        out.append(lake.stale(TARGETS, "targets", needed_by))
    return [e for e in out if e is not None]


def run_select(lake: Lakehouse, cfg: Config, run_id: str) -> dict[str, int]:
    """Edge: bronze + silver scores + silver_dedup (+ silver_targets) -> ``gold_selection``;
    prints the funnel. Refuses stale inputs first (:func:`stale_inputs`); records the bronze
    version it read."""
    stale = stale_inputs(lake, cfg)
    if stale:
        raise stale[0]
    version = lake.version(BRONZE)
    dedup = lake.read(DEDUP) if lake.exists(DEDUP) else None
    if dedup is None:
        print("select: no silver_dedup table; run `dfn-curate dedup` to drop duplicates")
    cuts = _write_selection(lake, rule_pool(lake, cfg), dedup, cfg.select)
    rows = funnel(lake.read(SELECTION), selection_reasons(cfg.select))
    print_funnel(rows)
    stats = funnel_counts(rows)
    for name, thr in cuts.items():
        where = f" (N={thr.n_scored}, n={thr.position})" if thr.n_scored is not None else ""
        print(f"threshold: {name} -> keep >= {thr.value}{where}")
        if thr.n_scored is not None:
            stats.update({f"threshold_N[{name}]": thr.n_scored,
                          f"threshold_n[{name}]": thr.position})
    lake.record_stats(run_id, "select", stats)
    lake.record_source(run_id, "select", BRONZE, version)
    return funnel_counts(rows)


def _write_selection(lake: Lakehouse, pool: DataFrame, dedup: DataFrame | None,
                     conf: SelectConf) -> dict[str, Threshold]:
    """Write ``gold_selection``; returns each score cut by name (part text, or the rule)."""
    if not conf.rule:
        pre = pre_threshold(pool, dedup, configured_filters(conf))
        # the cut needs only (score, pre_reason): cache those, not the pool's wide rows, which
        # are read once, by the write
        narrow = pre.select("score", "pre_reason").persist()
        try:
            thr = threshold_for(narrow, conf)
        finally:
            narrow.unpersist()
        lake.overwrite(apply_threshold(pre, thr), SELECTION)
        return {thr.rule: thr} if thr.active else {}
    pre = rule_pre(pool, dedup, conf).persist()
    try:
        out, parts = apply_selection_rule(pre, conf)
        lake.overwrite(out, SELECTION)
    finally:
        pre.unpersist()
    flat = [q for p in parts for q in (p, *p.inner)]
    return {p.text: Threshold(p.kind, p.threshold, p.n_scored, p.position) for p in flat
            if p.kind in ("fraction", "threshold", "random")}
