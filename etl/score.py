"""Scoring step: bronze pairs -> silver scores (and eval images -> eval embeddings).

``score_pairs`` is the DataFrame -> DataFrame step. ``score_table`` is the edge: for every
configured model it streams the source Delta table in chunks of ``score.files_per_commit``
files (Structured Streaming, ``availableNow``, checkpointed per target and model) and appends
each scored chunk with Delta's idempotent writes (``txnAppId`` = the checkpoint's id,
``txnVersion`` = the batch id). A killed run keeps the chunks it committed; the next run
resumes from the checkpoint, and a chunk replayed after a crash is skipped by Delta itself, so
no commit reads silver and the cost of a commit does not grow with the table. Only a stream
that starts over (new or reset checkpoint) while silver already holds rows for the model
anti-joins its chunks against silver, so every pair is still scored exactly once.

Weights: every silver row records ``weights_sha256``, the digest of the weights that scored it
(:func:`udfs.models.weights_digest`: a checkpoint's sha256, ``revision:<rev>`` for a pinned hub
id, else the loaded state_dict's sha256, computed on a worker). Before a model scores,
:func:`check_weights` refuses to add rows under a ``model_id`` whose rows were scored with other
weights (a new ``model_id``, or ``score.replace=true`` to drop and rescore them). Rows written
before the column existed have it null: unknown weights, reported and not checked. The check
costs O(1) once a run has recorded the model's digest as a property of the target table, and
one scan of the (model_id, digest) columns otherwise.

Lineage: once a model's rows cover the source, the source version read at the start is recorded
(``source_version[<model_id>]`` under step ``score:<target>``) for ``select`` to check.
"""

from __future__ import annotations

import hashlib
import logging
import re
import uuid
from dataclasses import dataclass
from typing import Any

from pyspark.errors import StreamingQueryException
from pyspark.sql import DataFrame, SparkSession
from pyspark.sql import functions as F

from etl.config import Config, ConfigError, ScoreConf
from etl.fs import join
from etl.tables import BRONZE, EVAL_EMBEDDINGS, EVAL_IMAGES, SILVER, Lakehouse
from udfs.models import ModelSpec, declared_digest, resolve_conf, weights_digest
from udfs.score import ScoreOptions, make_score_udf

log = logging.getLogger(__name__)

SILVER_COLUMNS = ["uid", "model_id", "score", "score_error", "image_embedding",
                  "text_embedding", "scored_at", "run_id", "weights_sha256"]
DIGEST = "weights_sha256"
WEIGHTS_PROPERTY = "dfn.weights_sha256."  # + model_slug(model_id): see weights_property


def score_pairs(df: DataFrame, model: Any, conf: ScoreConf, run_id: str | None = None,
                digest: str | None = None) -> DataFrame:
    """Score ``df`` (uid, image, text) with one model; returns the silver columns.

    ``model`` is an ``etl.config.ModelConf`` or a resolved ``udfs.models.ModelSpec``;
    ``digest`` its weights digest (default: :func:`udfs.models.declared_digest`, null when only
    loading the model can tell; :func:`model_digest` computes that one).
    """
    spec = model if isinstance(model, ModelSpec) else resolve_conf(model)
    digest = digest or declared_digest(spec)
    udf = make_score_udf(spec, ScoreOptions.from_conf(conf))
    scored = df.select("uid", udf(F.col("image"), F.col("text")).alias("r"))
    return scored.select(
        "uid", F.lit(spec.model_id).alias("model_id"), "r.score", "r.score_error",
        "r.image_embedding", "r.text_embedding",
        F.current_timestamp().alias("scored_at"), F.lit(run_id).cast("string").alias("run_id"),
        F.lit(digest).cast("string").alias(DIGEST))


def model_digest(spark: SparkSession, spec: ModelSpec) -> str:
    """The weights digest of ``spec``: declared (file hash, revision) on the driver, else the
    loaded state_dict's, computed by a one-row job on a worker (no torch on the driver)."""
    known = declared_digest(spec)
    if known:
        return known

    def digest(batches):
        import pandas as pd

        for _ in batches:
            yield pd.DataFrame({"d": [weights_digest(spec)]})

    return spark.range(1, numPartitions=1).mapInPandas(digest, "d string").first()["d"]


@dataclass(frozen=True)
class WeightsCheck:
    """What :func:`check_weights` found: rows it dropped (``score.replace``) and whether the
    model's digest is to be recorded on the table once this run's rows are in."""

    dropped: int = 0
    record: bool = False


def model_slug(model_id: str) -> str:
    """``model_id`` as a name safe in paths and property keys: its safe characters (up to 60)
    and a hash of the whole id, so distinct ids never share a slug."""
    safe = re.sub(r"[^A-Za-z0-9._-]+", "_", model_id)[:60]
    return f"{safe}-{hashlib.sha1(model_id.encode()).hexdigest()[:8]}"


def weights_property(model_id: str) -> str:
    """The ``target`` table property holding the digest every row of ``model_id`` was scored
    with (set by the runs that wrote them)."""
    return WEIGHTS_PROPERTY + model_slug(model_id)


def check_weights(lake: Lakehouse, target: str, spec: ModelSpec, digest: str,
                  conf: ScoreConf) -> WeightsCheck:
    """Refuse to add rows for ``spec.model_id`` to ``target`` when its rows there were scored
    with other weights; with ``score.replace`` drop those rows instead.

    O(1) when the table records ``digest`` for the model (:func:`weights_property`, read from
    the Delta log): the runs that wrote its rows recorded it, after a scan like the one below
    found no other weights. Otherwise the model's (model_id, digest) column pair is scanned;
    a recorded digest that is about to stop holding is unset before any row is written, so it
    never claims rows it does not describe, even if this run is killed. Rows without a digest
    (written before ``weights_sha256`` existed) are reported as unknown and kept, unless
    ``score.replace`` drops them too; while they remain no digest is recorded.
    """
    if not lake.exists(target):
        return WeightsCheck(record=True)
    mid = spec.model_id
    key = weights_property(mid)
    recorded = lake.properties(target).get(key)
    if recorded == digest:
        return WeightsCheck()
    rows = lake.read(target).filter(F.col("model_id") == mid)
    has_col = DIGEST in rows.columns
    found = {r[0]: r[1] for r in (rows.groupBy(DIGEST).count() if has_col
                                  else rows.groupBy(F.lit(None).cast("string")).count()).collect()}
    other = {d: n for d, n in found.items() if d is not None and d != digest}
    unknown = found.get(None, 0)
    if other and not conf.replace:
        shown = ", ".join(f"{d[:16]} ({n} rows)" for d, n in sorted(other.items())[:3])
        raise ConfigError(
            f"score: {target} already has rows for model_id {mid!r} scored with other weights "
            f"({DIGEST} {shown}); the configured weights are {digest[:16]}. Mixing them would "
            f"make scores incomparable. Give these weights a new model_id (score.models[].model_id)"
            f", or rescore with --set score.replace=true (drops this model_id's rows scored with "
            f"other weights, then scores them again)")
    if recorded is not None:
        lake.set_properties(target, {key: None})  # before any write under other weights
    if not other and not (unknown and conf.replace):
        if unknown:
            print(f"score: {unknown} {target} rows of model_id {mid!r} have no {DIGEST} "
                  f"(scored before it was recorded): their weights are unknown and not checked; "
                  f"--set score.replace=true rescores them")
        return WeightsCheck(record=not unknown)
    cond = F.col("model_id") == mid
    if has_col:
        cond = cond & ~F.col(DIGEST).eqNullSafe(F.lit(digest))
    dropped = sum(other.values()) + unknown
    lake.delta(target).delete(cond)
    checkpoint = checkpoint_dir(lake, target, mid)
    lake.store.rm(checkpoint)
    print(f"score: score.replace: dropped {dropped} {target} rows of model_id {mid!r} scored with "
          f"other or unknown weights; rescoring them")
    return WeightsCheck(dropped, record=True)


def pending(bronze: DataFrame, silver: DataFrame | None, model_id: str) -> DataFrame:
    """Rows of ``bronze`` with no silver row for ``model_id`` (the resume anti-join).

    Only uids are shuffled; the (small) set of pending uids is broadcast back, so image bytes
    never cross a shuffle. Call it per chunk, not on a whole large pool at once.
    """
    if silver is None:
        return bronze
    done = silver.filter(F.col("model_id") == model_id).select("uid")
    todo = bronze.select("uid").join(done, "uid", "left_anti")
    return bronze.join(F.broadcast(todo), "uid", "left_semi")


def configure_arrow(spark: SparkSession, conf: ScoreConf) -> None:
    """Arrow batch sizing for the pandas UDF (rows and bytes per batch sent to Python)."""
    spark.conf.set("spark.sql.execution.arrow.maxRecordsPerBatch", str(conf.max_records_per_batch))
    spark.conf.set("spark.sql.execution.arrow.maxBytesPerBatch", str(conf.max_bytes_per_batch))


def score_table(lake: Lakehouse, source_table: str, target_table: str, cfg: Config,
                run_id: str) -> dict[str, int]:
    """Score every configured model over ``source_table`` into ``target_table``; resumable.

    Records and returns per-model counts: ``pending[m]`` (unscored before), ``scored[m]``
    (rows inserted by this run) and ``errors[m]`` (of those, rows with a null score).
    """
    configure_arrow(lake.spark, cfg.score)
    specs = [resolve_conf(m) for m in cfg.score.models]
    digests = {s.model_id: model_digest(lake.spark, s) for s in specs}
    checks = {s.model_id: check_weights(lake, target_table, s, digests[s.model_id], cfg.score)
              for s in specs}  # every model is checked before any is scored
    version = lake.version(source_table)
    counts = {"source_rows": lake.read(source_table).count()}
    for spec in specs:
        mid = spec.model_id
        counts.update(_score_model(lake, source_table, target_table, spec, cfg.score, run_id,
                                   counts["source_rows"], digests[mid]))
        if checks[mid].dropped:
            counts[f"replaced[{mid}]"] = checks[mid].dropped
        if checks[mid].record and lake.exists(target_table):
            lake.set_properties(target_table, {weights_property(mid): digests[mid]})
        lake.record_source(run_id, f"score:{target_table}", source_table, version,
                           metric=f"source_version[{mid}]")
    lake.record_stats(run_id, f"score:{target_table}", counts)
    return counts


def _score_model(lake: Lakehouse, source: str, target: str, spec: ModelSpec, conf: ScoreConf,
                 run_id: str, source_rows: int, digest: str | None = None) -> dict[str, int]:
    mid = spec.model_id
    before = pending_count(lake, source, target, mid)
    inserted = 0
    if before:
        try:
            inserted = _stream(lake, source, target, spec, conf, run_id,
                               has_rows=before != source_rows, digest=digest)
        except StreamingQueryException as exc:
            if "DELTA_" not in str(exc):  # only source-side changes are recoverable here
                raise
            log.warning("score: %s was rewritten since the last run (%s); resetting the %s "
                        "checkpoint and scoring what is missing", source, str(exc)[:200], mid)
            inserted = _stream(lake, source, target, spec, conf, run_id, reset=True,
                               has_rows=True, digest=digest)
        if inserted < before and pending_count(lake, source, target, mid):
            # the checkpoint is ahead of the target table (rows deleted, table replaced)
            inserted += _stream(lake, source, target, spec, conf, run_id, reset=True,
                                has_rows=True, digest=digest)
    errors = 0
    if lake.exists(target):
        errors = lake.read(target).filter(
            (F.col("model_id") == mid) & (F.col("run_id") == run_id) & F.col("score").isNull()
        ).count()
    return {f"pending[{mid}]": before, f"scored[{mid}]": inserted, f"errors[{mid}]": errors}


def pending_count(lake: Lakehouse, source: str, target: str, model_id: str) -> int:
    """How many source uids have no row for ``model_id`` in ``target`` (uids only are read)."""
    uids = lake.read(source).select("uid")
    if not lake.exists(target):
        return uids.count()
    done = lake.read(target).filter(F.col("model_id") == model_id).select("uid")
    return uids.join(done, "uid", "left_anti").count()


def checkpoint_dir(lake: Lakehouse, target: str, model_id: str) -> str:
    """Where the streaming checkpoint for (target, model) lives, under the lakehouse root."""
    return lake.under("_checkpoints", f"score-{target}", model_slug(model_id))


def _stream(lake: Lakehouse, source: str, target: str, spec: ModelSpec, conf: ScoreConf,
            run_id: str, reset: bool = False, has_rows: bool = True,
            digest: str | None = None) -> int:
    """Score ``source`` -> ``target`` in chunks, one idempotent Delta append per chunk; rows added.

    A stream that starts from a new checkpoint while ``target`` already has rows for the model
    (``has_rows``) anti-joins each chunk against ``target`` first; a resumed one needs no
    anti-join, since Delta skips a chunk whose batch id it has committed already.
    """
    checkpoint = checkpoint_dir(lake, target, spec.model_id)
    if reset:
        lake.store.rm(checkpoint)
    app_id, fresh = stream_app_id(lake, checkpoint)
    skip_done = has_rows and fresh
    inserted = [0]

    def write_chunk(batch: DataFrame, batch_id: int) -> None:
        todo = batch.select("uid", "image", "text")
        if skip_done and lake.exists(target):
            todo = pending(todo, lake.read(target), spec.model_id)
        inserted[0] += lake.append_once(score_pairs(todo, spec, conf, run_id, digest), target,
                                        app_id, batch_id)

    query = (_read_stream(lake, source, conf).writeStream.foreachBatch(write_chunk)
             .option("checkpointLocation", checkpoint).trigger(availableNow=True)
             .queryName(f"score-{target}-{spec.model_id}"[:100]).start())
    query.awaitTermination()
    return inserted[0]


def stream_app_id(lake: Lakehouse, checkpoint: str) -> tuple[str, bool]:
    """(the Delta ``txnAppId`` of the stream checkpointed at ``checkpoint``, whether it is new).

    Kept in a file beside the checkpoint and replaced whenever the checkpoint is, because batch
    ids restart at 0 with a new checkpoint and must not be mistaken for committed ones.
    """
    marker = checkpoint.rstrip("/") + ".appid"
    if lake.store.exists(marker) and lake.store.exists(join(checkpoint, "metadata")):
        return lake.store.read_bytes(marker).decode(), False
    app_id = f"dfn-score-{uuid.uuid4().hex}"
    lake.store.write_text(marker, app_id)
    return app_id, True


def _read_stream(lake: Lakehouse, source: str, conf: ScoreConf) -> DataFrame:
    reader = lake.spark.readStream.format("delta").option(
        "maxFilesPerTrigger", str(max(1, conf.files_per_commit)))
    return reader.table(lake.name(source)) if lake.conf.schema else reader.load(lake.path(source))


def score_all(lake: Lakehouse, cfg: Config, run_id: str) -> dict[str, dict[str, int]]:
    """The ``score`` step of a run: bronze pairs -> silver scores, eval images -> embeddings."""
    out = {SILVER: score_table(lake, BRONZE, SILVER, cfg, run_id)}
    if lake.exists(EVAL_IMAGES):
        out[EVAL_EMBEDDINGS] = score_table(lake, EVAL_IMAGES, EVAL_EMBEDDINGS, cfg, run_id)
    return out
