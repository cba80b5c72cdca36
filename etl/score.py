"""Scoring step: bronze pairs -> silver scores (and eval images -> eval embeddings).

``score_pairs`` is the DataFrame -> DataFrame step. ``score_table`` is the edge: for every
configured model it streams the source Delta table in chunks of ``score.files_per_commit``
files (Structured Streaming, ``availableNow``, checkpointed per target and model) and appends
each scored chunk with Delta's idempotent writes (``txnAppId`` = the checkpoint's id,
``txnVersion`` = the batch id). A killed run keeps the chunks it committed; the next run
resumes from the checkpoint, and a chunk replayed after a crash is skipped by Delta itself, so
no commit reads silver and the cost of a commit does not grow with the table. Only a stream
that starts over (new or reset checkpoint) while silver already holds rows for the model
anti-joins its chunks against silver, so every pair is still scored exactly once. The rows
a stream added are read back from the Delta history (its appends are tagged), since the
``foreachBatch`` function may run elsewhere (on the server under Spark Connect).

Weights: every silver row records ``weights_sha256``, the digest of the weights that scored it
(:func:`udfs.models.weights_digest`: a checkpoint's sha256, ``revision:<rev>`` for a pinned hub
id, else the loaded state_dict's sha256, computed on a worker). Before a model scores,
:func:`check_weights` refuses to add rows under a ``model_id`` whose rows were scored with other
weights (a new ``model_id``, or ``score.replace=true`` to drop and rescore them). Rows written
before the column existed have it null: unknown weights, reported and not checked. The check
costs O(1) once a run has recorded the model's digest as a property of the target table, and
one scan of the (model_id, digest) columns otherwise.

Lineage: once a model's rows cover the source, the source version read at the start is recorded
(:meth:`etl.tables.Lakehouse.record_built`), so the steps that read the scores can refuse them
once bronze has moved on (:mod:`etl.lineage`).
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import re
import uuid
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from pyspark.errors import StreamingQueryException
from pyspark.sql import DataFrame, SparkSession
from pyspark.sql import functions as F

from etl.config import Config, ConfigError, ScoreConf
from etl.fs import join
from etl.progress import Progress
from etl.redact import redact_text
from etl.sqltext import sql_string
from etl.tables import BRONZE, EVAL_EMBEDDINGS, EVAL_IMAGES, SILVER, Lakehouse
from etl.takedown.match import without_removed
from etl.work import work
from udfs.models import ModelSpec, declared_digest, resolve_conf, weights_digest
from udfs.score import ScoreOptions, make_score_udf

log = logging.getLogger(__name__)

DIGEST = "weights_sha256"
PROGRESS_SECONDS = 5  # how often a running stream's committed rows are read for the progress
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


def model_slug(model_id: str) -> str:
    """``model_id`` as a name safe in paths and property keys: its safe characters (up to 60)
    and a hash of the whole id, so distinct ids never share a slug."""
    safe = re.sub(r"[^A-Za-z0-9._-]+", "_", model_id)[:60]
    return f"{safe}-{hashlib.sha1(model_id.encode()).hexdigest()[:8]}"


def weights_property(model_id: str) -> str:
    """The ``target`` table property holding the digest every row of ``model_id`` was scored
    with (set by the runs that wrote them)."""
    return WEIGHTS_PROPERTY + model_slug(model_id)


@dataclass(frozen=True)
class WeightsCheck:
    """What to do about a model's rows in the target before it scores (:func:`decide_weights`),
    and so what :func:`check_weights` did."""

    refuse: str | None = None  # the error to stop with: rows scored with other weights
    unset: bool = False  # unset the recorded digest (it is about to stop holding) before writing
    unknown_kept: int = 0  # rows with no digest, kept unchecked (reported)
    dropped: int = 0  # rows scored with other or unknown weights to delete (``score.replace``)
    record: bool = False  # record the digest on the table once this run's rows are in


def decide_weights(target: str, model_id: str, digest: str, replace: bool, exists: bool = True,
                   recorded: str | None = None,
                   found: Mapping[str | None, int] | None = None) -> WeightsCheck:
    """Decide whether rows for ``model_id`` scored with ``digest`` may go into ``target``.

    ``recorded`` is the digest the table records for the model (:func:`weights_property`),
    ``found`` the model's row count per digest in ``target`` (key None: rows written before
    digests were recorded); it is not looked at when ``recorded`` is ``digest``. Rows scored
    with other weights refuse the run unless ``replace``, which drops them (and rows without a
    digest) instead. While rows without a digest remain, no digest is recorded.
    """
    if not exists:
        return WeightsCheck(record=True)
    if recorded == digest:
        return WeightsCheck()
    found = found or {}
    other = {d: n for d, n in found.items() if d is not None and d != digest}
    unknown = found.get(None, 0)
    if other and not replace:
        return WeightsCheck(refuse=_mixed_weights(target, model_id, digest, other))
    unset = recorded is not None
    if not other and not (unknown and replace):
        return WeightsCheck(unset=unset, unknown_kept=unknown, record=not unknown)
    return WeightsCheck(unset=unset, dropped=sum(other.values()) + unknown, record=True)


def _mixed_weights(target: str, model_id: str, digest: str, other: Mapping[str, int]) -> str:
    shown = ", ".join(f"{d[:16]} ({n} rows)" for d, n in sorted(other.items())[:3])
    return (f"score: {target} already has rows for model_id {model_id!r} scored with other "
            f"weights ({DIGEST} {shown}); the configured weights are {digest[:16]}. Mixing them "
            f"would make scores incomparable. Give these weights a new model_id "
            f"(score.models[].model_id), or rescore with --set score.replace=true (drops this "
            f"model_id's rows scored with other weights, then scores them again)")


def check_weights(lake: Lakehouse, target: str, spec: ModelSpec, digest: str,
                  conf: ScoreConf) -> WeightsCheck:
    """Refuse to add rows for ``spec.model_id`` to ``target`` when its rows there were scored
    with other weights; with ``score.replace`` drop those rows instead (:func:`decide_weights`).

    O(1) when the table records ``digest`` for the model (:func:`weights_property`, read from
    the Delta log): the runs that wrote its rows recorded it, after a scan like the one here
    found no other weights. Otherwise the model's (model_id, digest) column pair is scanned;
    a recorded digest that is about to stop holding is unset before any row is written, so it
    never claims rows it does not describe, even if this run is killed.
    """
    mid = spec.model_id
    exists = lake.exists(target)
    recorded = lake.properties(target).get(weights_property(mid)) if exists else None
    found = digest_counts(lake, target, mid) if exists and recorded != digest else {}
    check = decide_weights(target, mid, digest, conf.replace, exists, recorded, found)
    _apply_weights_check(lake, target, mid, digest, check)
    return check


def digest_counts(lake: Lakehouse, target: str, model_id: str) -> dict[str | None, int]:
    """``model_id``'s rows in ``target`` per weights digest (None: no digest recorded)."""
    rows = lake.read(target).filter(F.col("model_id") == model_id)
    by = F.col(DIGEST) if DIGEST in rows.columns else F.lit(None).cast("string")
    return {r[0]: r[1] for r in rows.groupBy(by).count().collect()}


def _apply_weights_check(lake: Lakehouse, target: str, model_id: str, digest: str,
                         check: WeightsCheck) -> None:
    """The side effects of ``check``, in a safe order: stop, unset the stale digest, report
    kept rows of unknown weights, or drop rows and the stream checkpoint that covered them."""
    if check.refuse:
        raise ConfigError(check.refuse)
    if check.unset:
        lake.set_properties(target, {weights_property(model_id): None})
    if check.unknown_kept:
        print(f"score: {check.unknown_kept} {target} rows of model_id {model_id!r} have no "
              f"{DIGEST} (scored before it was recorded): their weights are unknown and not "
              f"checked; --set score.replace=true rescores them")
    if check.dropped:
        cond = f"model_id = {sql_string(model_id)}"
        if DIGEST in lake.read(target).columns:
            cond += f" AND NOT ({DIGEST} <=> {sql_string(digest)})"
        lake.delete(target, cond)
        lake.store.rm(checkpoint_dir(lake, target, model_id))
        print(f"score: score.replace: dropped {check.dropped} {target} rows of model_id "
              f"{model_id!r} scored with other or unknown weights; rescoring them")


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
        job = ScoreJob(lake, source_table, target_table, spec, cfg.score, run_id, digests[mid])
        counts.update(_score_model(job, counts["source_rows"]))
        if checks[mid].dropped:
            counts[f"replaced[{mid}]"] = checks[mid].dropped
        if checks[mid].record and lake.exists(target_table):
            lake.set_properties(target_table, {weights_property(mid): digests[mid]})
        lake.record_built(run_id, target_table, version, model_id=mid)
    scored = sum(v for k, v in counts.items() if k.startswith("scored["))
    counts.update(work(scored, scored, counts["source_rows"]))
    lake.record_stats(run_id, f"score:{target_table}", counts)
    return counts


@dataclass(frozen=True)
class ScoreJob:
    """One model scoring ``source`` into ``target`` in one run: what each stream needs."""

    lake: Lakehouse
    source: str
    target: str
    spec: ModelSpec
    conf: ScoreConf
    run_id: str
    digest: str | None = None
    pending: int = 0  # source rows without a row for the model: what the progress counts to

    @property
    def model_id(self) -> str:
        return self.spec.model_id


def _score_model(job: ScoreJob, source_rows: int) -> dict[str, int]:
    """Score the source rows the model has no row for yet; its ``pending``, ``scored`` and
    ``errors`` counts."""
    mid = job.model_id
    before = pending_count(job.lake, job.source, job.target, mid)
    job = dataclasses.replace(job, pending=before)
    inserted = _score_pending(job, before, had_rows=before != source_rows) if before else 0
    return {f"pending[{mid}]": before, f"scored[{mid}]": inserted,
            f"errors[{mid}]": _errors(job)}


def _score_pending(job: ScoreJob, before: int, had_rows: bool) -> int:
    """Stream the ``before`` pending rows into the target; rows inserted.

    First the stream resumes from its checkpoint. It restarts from a new checkpoint (every
    chunk anti-joined against the target) when the source was rewritten under it, and once
    more when rows are still missing afterwards: the checkpoint was ahead of the target (rows
    deleted, table replaced).
    """
    try:
        inserted = _stream(job, restart=False, had_rows=had_rows)
    except StreamingQueryException as exc:
        if not source_rewritten(exc):
            raise
        log.warning("score: %s was rewritten since the last run (%s); resetting the %s "
                    "checkpoint and scoring what is missing", job.source, redact_text(str(exc)[:200]),
                    job.model_id)
        inserted = _stream(job, restart=True)
    if inserted < before and pending_count(job.lake, job.source, job.target, job.model_id):
        inserted += _stream(job, restart=True)
    return inserted


def source_rewritten(exc: Exception) -> bool:
    """True for a stream failure a restart recovers from: a Delta error about the source
    (only source-side changes are recoverable here)."""
    return "DELTA_" in str(exc)


def _errors(job: ScoreJob) -> int:
    """This run's rows for the model with a null score."""
    if not job.lake.exists(job.target):
        return 0
    return job.lake.read(job.target).filter(
        (F.col("model_id") == job.model_id) & (F.col("run_id") == job.run_id)
        & F.col("score").isNull()).count()


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


def skips_done(fresh: bool, had_rows: bool) -> bool:
    """Whether a stream anti-joins each chunk against the target: only one starting from a new
    checkpoint (``fresh``) while the target may hold rows for the model (``had_rows``). A
    resumed stream needs none: Delta skips a chunk whose batch id it committed already."""
    return fresh and had_rows


def _stream(job: ScoreJob, restart: bool, had_rows: bool = True) -> int:
    """Score the source into the target in chunks, one idempotent Delta append per chunk
    (``txnAppId`` + batch id); the rows those appends added, read from the Delta history.

    ``restart`` drops the checkpoint first (the target may then hold rows this stream's
    chunks cover, so they are anti-joined). The chunk writer runs wherever Spark runs
    ``foreachBatch`` (on the server under Spark Connect), so it keeps no count itself: every
    append is tagged (``userMetadata``) and the tagged commits' rows are summed
    (:meth:`etl.tables.Lakehouse.tagged_rows`).
    """
    lake, target, mid = job.lake, job.target, job.model_id
    checkpoint = checkpoint_dir(lake, target, mid)
    if restart:
        lake.store.rm(checkpoint)
    app_id, fresh = stream_app_id(lake, checkpoint)
    skip_done = skips_done(fresh, had_rows)
    tag = f"dfn-score:{uuid.uuid4().hex}"
    spec, conf, run_id, digest = job.spec, job.conf, job.run_id, job.digest
    # every chunk an append to an existing table: a metastore table's creating write would
    # drop the chunk's userMetadata and txnAppId (its rows uncounted, its batch not idempotent)
    if not lake.exists(target):  # the schema costs a model spec and a plan: only when needed
        lake.ensure(target, score_pairs(lake.read(job.source).select("uid", "image", "text"),
                                        spec, conf, run_id, digest).schema)
    since = lake.version(target)
    lake_conf, store = lake.conf, lake.store  # not the session: over Connect this runs remotely

    def write_chunk(batch: DataFrame, batch_id: int) -> None:
        here = Lakehouse(batch.sparkSession, lake_conf, store)
        todo = without_removed(here, batch.select("uid", "image", "text"))  # ledger refusal
        if skip_done and here.exists(target):
            todo = pending(todo, here.read(target), mid)
        here.append(score_pairs(todo, spec, conf, run_id, digest), target, txnAppId=app_id,
                    txnVersion=batch_id, userMetadata=tag)

    query = (_read_stream(lake, job.source, conf).writeStream.foreachBatch(write_chunk)
             .option("checkpointLocation", checkpoint).trigger(availableNow=True)
             .queryName(f"score-{target}-{mid}"[:100]).start())
    progress = Progress(f"score {mid} -> {target}", job.pending)
    while not query.awaitTermination(PROGRESS_SECONDS):  # a line after each chunk's commit
        progress.update(lake.tagged_rows(target, tag, since) or 0)
    done = lake.tagged_rows(target, tag, since) or 0
    progress.update(done)
    return done


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
