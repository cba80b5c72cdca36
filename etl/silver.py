"""Reading scores from ``silver_scores``: which model's, and as which column.

The *selection model* is the one whose scores and embeddings select, dedup, targets and
evaluate use: ``select.model_id``, else the first configured scoring model, else the only model
in ``silver_scores``. A NaN score (an unscorable pair) reads as null everywhere
(:func:`score_value`).
"""

from __future__ import annotations

from pyspark.sql import Column, DataFrame
from pyspark.sql import functions as F

from etl.config import Config, ConfigError
from etl.tables import BRONZE, SILVER, Lakehouse


def score_value(col: str | Column) -> Column:
    """A score as a double with NaN as null: the one place NaN scores become nulls."""
    value = F.col(col) if isinstance(col, str) else col
    return F.nanvl(value.cast("double"), F.lit(None).cast("double"))


def selection_model_id(lake: Lakehouse, cfg: Config) -> str:
    """``select.model_id``, else the first configured scoring model, else the only model
    in ``silver_scores``."""
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


def _of_model(lake: Lakehouse, model_id: str, missing: str) -> DataFrame:
    silver = lake.read(SILVER).where(F.col("model_id") == model_id)
    if not silver.limit(1).count():
        ids = [r[0] for r in lake.read(SILVER).select("model_id").distinct().limit(20).collect()]
        raise ConfigError(missing.format(model_id=model_id, ids=ids))
    return silver


def model_scores(lake: Lakehouse, cfg: Config, embeddings: bool = False,
                 model_id: str | None = None) -> DataFrame:
    """uid, score (NaN as null), score_error[, image_embedding] of the selection model
    (or of ``model_id``)."""
    mid = model_id or selection_model_id(lake, cfg)
    silver = _of_model(lake, mid, "select.model_id: no scores for model {model_id!r} in "
                       "silver_scores (scored models: {ids}); run `dfn-curate score` or set "
                       "select.model_id")
    error = F.col("score_error") if "score_error" in silver.columns else F.lit(None)
    cols = [F.col("uid"), score_value("score").alias("score"),
            error.cast("string").alias("score_error")]
    return silver.select(*cols, *([F.col("image_embedding")] if embeddings else []))


def alias_scores(lake: Lakehouse, model_id: str, column: str) -> DataFrame:
    """``uid, <column>``: the silver scores of ``model_id`` (NaN as null)."""
    silver = _of_model(lake, model_id, "select.scores: no scores for model:{model_id} in "
                       "silver_scores; add it to score.models and run `dfn-curate score`")
    return silver.select("uid", score_value("score").alias(column))


def scored_pool(lake: Lakehouse, cfg: Config, with_scores: bool = True,
                bronze: DataFrame | None = None) -> DataFrame:
    """Bronze pairs (no image bytes) with the configured score column as ``score``
    (``bronze``: these rows of it instead, e.g. those a change feed says were appended).

    ``select.score_column: score`` reads the selection model's silver scores, joined only when
    ``with_scores`` (a selection that reads no score does not need ``silver_scores``; its
    ``score`` is null); any other value names a bronze column.
    """
    bronze = (lake.read(BRONZE) if bronze is None else bronze).drop("image")
    col = cfg.select.score_column
    if col == "score":
        bronze = bronze.drop("score", "score_error")
        if not with_scores:
            return bronze.withColumns({"score": F.lit(None).cast("double"),
                                       "score_error": F.lit(None).cast("string")})
        return bronze.join(model_scores(lake, cfg), "uid", "left")
    if col not in bronze.columns:
        raise ConfigError(f"select.score_column: {col!r} is neither 'score' (the model score in "
                          f"silver) nor a bronze column ({', '.join(bronze.columns)})")
    return bronze.withColumn("score", score_value(F.col(col).try_cast("double")))
