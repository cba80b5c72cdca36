"""Typed configuration: dataclasses loaded from ``conf/*.yaml`` with ``yaml.safe_load``.

Every key is checked up front. An unknown key or a value of the wrong type fails with a
:class:`ConfigError` that names the key, what was given, and what is allowed, before any
Spark work starts. ``--set a.b=value`` overrides use the same checks.
"""

from __future__ import annotations

import dataclasses
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

PROJECT_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_CONF = PROJECT_ROOT / "conf" / "local.yaml"


class ConfigError(ValueError):
    """A configuration problem, with a message that says how to fix it."""


@dataclass
class SparkConf:
    """How to get a SparkSession when none is running yet."""

    # Spark master for a session the project builds (local[N], spark://host:port, yarn, k8s://...);
    # spark-submit's --master and a running session win
    master: str = "local[2]"
    # Spark Connect instead of a JVM here: sc://host:port[/;token=...] (a running server), or
    # local[N] (pyspark starts one in this process); SPARK_REMOTE is used when unset. A running
    # session (Databricks classic or serverless) wins
    remote: str | None = None
    app_name: str = "dfn-curate"  # Spark application name
    # Spark settings applied over the project's local defaults (and over spark-submit's)
    conf: dict[str, str] = field(default_factory=dict)
    # Local jar paths for air-gapped clusters; when given, Delta is not resolved from Maven.
    jars: list[str] = field(default_factory=list)


@dataclass
class LeaseConf:
    """One run at a time per lakehouse: what a run does while another holds it
    (docs/architecture.md, overlapping runs)."""

    MODES = ("fail", "wait")
    mode: str = "fail"  # fail: stop at once, one line naming the holder; wait: poll (or --wait)
    wait_seconds: int = 3600  # wait: give up (as fail does) after this long
    expire_seconds: int = 600  # a holder that stops renewing (crashed) loses it after this long
    heartbeat_seconds: int = 60  # how often a running step renews it


@dataclass
class LakehouseConf:
    """Where the Delta tables live: a folder, or a metastore catalog/schema."""

    # folder or URL holding the Delta tables, scoring checkpoints, staging; relative sample/export
    # paths live under it
    root: str = "./lakehouse"
    # metastore catalog of the tables (with schema; e.g. Unity Catalog "main")
    catalog: str | None = None
    # set: tables live in the metastore as [catalog.]schema.table instead of under root
    schema: str | None = None
    lease: LeaseConf = field(default_factory=LeaseConf)


@dataclass
class SourceConf:
    """One raw input to ingest."""

    format: str = "sample"  # one of FORMATS (sample: the bundled pool, generated on first use)
    path: str = ""  # file, folder or URL of the input (not for format: sample)
    name: str | None = None  # recorded in bronze's source column (default: the format)
    url_column: str = "url"  # column names in csv/tsv/datacomp inputs
    text_column: str = "caption"  # column names in csv/tsv/datacomp inputs
    uid_column: str = "uid"  # column names in csv/tsv/datacomp inputs
    json_sample_rows: int = 1000  # WebDataset .json members read to find extra columns
    # tar shards (.tar/.tar.gz/.tgz): a bigger member is quarantined unread
    max_member_bytes: int = 64 * 1024 * 1024
    # tar shards: a bigger shard (file size, or once decompressed) is quarantined as a whole /
    # from the key where it passes this size on
    max_shard_bytes: int = 16 * 1024 * 1024 * 1024

    FORMATS = ("datacomp", "img2dataset", "webdataset", "csv", "tsv", "folder", "sample")


@dataclass
class SampleConf:
    """The bundled, seeded sample pool (the embedded default)."""

    n_pairs: int = 2000  # pairs in the generated pool (>= 10)
    eval_size: int = 120  # held-out evaluation images written beside the pool
    seed: int = 0  # seed of the generator (same seed, same pool)
    shard_size: int = 500  # pairs per WebDataset tar shard
    out_dir: str = "raw/sample"  # relative to lakehouse.root unless absolute or a URL


@dataclass
class IngestConf:
    sources: list[SourceConf] = field(default_factory=lambda: [SourceConf()])
    eval_sources: list[SourceConf] = field(default_factory=list)
    # a longer caption is quarantined (not truncated), so the tokenizer never sees megabytes
    max_caption_chars: int = 10_000
    # in-input duplicate keys up to this many are broadcast to split them from the full rows
    # (no shuffle of the rows); more (a pathological input) falls back to a shuffle join
    broadcast_duplicates: int = 100_000
    # a file ingested before whose size or modification time changed: error (stop, naming it)
    # | reingest (read it again; rows whose uid is already in bronze stay as they are)
    changed_files: str = "error"


@dataclass
class ModelConf:
    """A filter model: open_clip architecture + pretrained tag, an ``hf-hub:`` id, or local files."""

    # open_clip model name, hf-hub:org/repo[@rev], local-dir:<folder>, or an architecture JSON
    name: str = "conf/models/dfn-tiny.json"
    # open_clip pretrained tag or a checkpoint file (.safetensors; .pt/.bin weights_only)
    pretrained: str | None = "conf/models/dfn-tiny.safetensors"
    # id of this model's rows in silver (default derived from name + pretrained)
    model_id: str | None = None
    revision: str | None = None  # pin an hf-hub: id to a hub revision (or write name@revision)


@dataclass
class ScoreConf:
    models: list[ModelConf] = field(default_factory=lambda: [ModelConf()])
    batch_size: int = 64  # pairs per model forward pass
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    precision: str = "auto"  # auto (bf16 autocast on GPU, fp32 on CPU) | fp32 | bf16 | fp16
    # keep image/text embeddings in silver (dedup's model signal and targets need them)
    embeddings: bool = True
    decode_threads: int = 0  # 0: one per core the Spark task may use (spark.task.cpus)
    prefetch: int = 2  # Arrow batches decoded ahead of the one the model is running
    # JPEGs decode at the smallest DCT scale (1/2, 1/4, 1/8) keeping the short side >= this
    # factor x the model's input size; off (null/false) = full decode. docs/stages/score.md.
    fast_decode: float | None = 1.5
    # Arrow batch rows handed to the UDF (spark.sql.execution.arrow.maxRecordsPerBatch)
    max_records_per_batch: int = 256
    # Arrow batch bytes cap (spark.sql.execution.arrow.maxBytesPerBatch)
    max_bytes_per_batch: int = 64 * 1024 * 1024
    # larger images (from the header) are refused unread: scoring, dedup thumbnails, export, report
    max_image_pixels: int = 64_000_000
    files_per_commit: int = 16  # source files scored per silver commit (resume granularity)
    # true: a model_id whose silver rows were scored with other weights (or unknown ones) has
    # those rows dropped and rescored; false: such a run stops before scoring, saying so
    replace: bool = False


@dataclass
class DedupConf:
    exact: bool = True  # drop exact duplicates (same bytes, then url+text, then url)
    near: bool = True  # drop near duplicates (cosine within k-means clusters)
    near_threshold: float = 0.95  # cosine at or above which two images are near duplicates
    n_clusters: int = 16  # at most this many k-means clusters (about >= 1,000 rows each)
    kmeans_iters: int = 10  # k-means iterations
    max_group_rows: int = 20_000  # rows compared in one task (bigger clusters are split)
    decontaminate: bool = True  # drop pool rows matching an evaluation image
    eval_threshold: float = 0.95  # cosine at or above which a pool image is an evaluation leak
    # near-dup / eval-leak signals: "model" (silver image embeddings), "thumbnail" (pixels)
    near_signals: list[str] = field(default_factory=lambda: ["model"])


FRACTION_OF = ("remaining", "pool")  # what a keep-fraction's N counts (etl/cuts.py)


@dataclass
class SelectConf:
    preset: str | None = "datacomp_basic"  # datacomp_basic | none
    filters: dict[str, str] = field(default_factory=dict)  # name -> Spark SQL predicate (keep if true)
    # the score the cut reads: score (the selection model's) or a bronze column
    score_column: str = "score"
    # the selection model (default: the first of score.models, else the only model in
    # silver_scores)
    model_id: str | None = None
    min_score: float | None = None  # keep score >= this (instead of keep_fraction)
    keep_fraction: float | None = 0.3  # keep this fraction by DataComp's cut (etl/cuts.py)
    fraction_of: str = "remaining"  # remaining | pool
    # A selection rule (etl/rules.py) in place of preset/filters/min_score/keep_fraction, e.g.
    # "basic and dfn_fraction(0.7)", "clip_and_image", "text_based or image_based"
    rule: str | None = None
    # score aliases a rule names (<alias>_fraction(f)): a bronze column, target_similarity,
    # or model:<model_id> (that model's silver score); "dfn" is always the selection model
    scores: dict[str, str] = field(default_factory=lambda: {
        "clip": "clip_l14_similarity_score", "clip_b32": "clip_b32_similarity_score",
        "targeted": "target_similarity"})
    seed: int = 0  # random(f)
    # recompute: cut over the whole pool | frozen: keep the last selection's recorded cuts
    mode: str = "recompute"


@dataclass
class TargetsConf:
    """Target set and signals for DataComp's image/text-based filters and targeted ranking."""

    source: str = "eval"  # eval (silver_eval_embeddings) | table:<name> | folder:<url>
    model_id: str | None = None  # embeddings of this model; default: select's model
    n_clusters: int = 16  # K of the pool's image k-means (DataComp: 100k for 12.8M pairs)
    fit_rows_per_cluster: int = 256  # k-means is fitted on K x this rows, sampled on executors
    kmeans_iters: int = 20  # k-means iterations
    top_k: int = 10  # target_similarity = mean of the top-k cosines to target images
    nprobe: int = 4  # clusters searched per pool row (exact when >= n_clusters)
    max_targets: int = 100_000  # target embeddings held by each task (k x dim floats)
    # the in_vocabulary flag (text_vocabulary preset): imagenet1k (open_clip's class names) | a
    # file, one term a line
    vocabulary: str = "imagenet1k"
    seed: int = 0  # seed of sampling and k-means


@dataclass
class ExportConf:
    out_dir: str = "export"  # relative to lakehouse.root unless absolute or a URL
    shard_size: int = 256  # pairs per exported WebDataset shard
    keep_previous: bool = True  # keep the run folder the new export replaced (open readers)
    webdataset: bool = True  # write that kind of file
    uids_npy: bool = True  # write that kind of file
    urls_parquet: bool = True  # write that kind of file


TAKEDOWN_CATEGORIES = ("legal", "gdpr_erasure", "opt_out", "abuse_hashlist", "internal")


@dataclass
class TakedownConf:
    """Removal requests (``dfn-curate takedown``): the ledger, matching and physical purge."""

    # requests of these categories store only a keyed hash (HMAC-SHA256) of each selector
    hashed_categories: list[str] = field(
        default_factory=lambda: ["gdpr_erasure", "abuse_hashlist"])
    # environment variable holding the ledger's secret hash key (>= 16 characters); the same
    # key must be set for every run that reads a hashed request (add, apply, ingest, purge)
    key_env: str = "DFN_TAKEDOWN_KEY"
    # also remove the near duplicates dedup flagged against a removed row (and its keeper)
    expand_near: bool = False
    # VACUUM retention of purge, in hours; Delta refuses < 168 unless its retention check is
    # switched off (spark.databricks.delta.retentionDurationCheck.enabled, tests only)
    retain_hours: int = 168
    # rewrite <lakehouse.root>/report (if present) after apply, so it shows no removed row
    rewrite_report: bool = True


# Training values that udfs.train (torch-side, which etl never imports) shares with etl.train.
SHUFFLE_BUFFER = 4096  # rows (still encoded) each training process holds for its seeded shuffle
MIN_ROWS_FOR_VAL = 200  # fewer training pairs than this hold out no validation: every row trains


@dataclass
class TrainConf:
    table: str = "bronze_pairs"  # Delta table (or catalog table) of training pairs
    where: str | None = "label_kind = 'clean'"  # Spark SQL filter on it (null: every row)
    model: str = "conf/models/dfn-tiny.json"  # open_clip architecture JSON or model name
    init_checkpoint: str | None = None  # weights to start from (null: random init)
    # safetensors path written (its model card beside it)
    out: str = "conf/models/dfn-tiny.safetensors"
    steps: int = 300  # optimizer steps per process
    batch_size: int = 128  # pairs per step per process
    lr: float = 2e-3  # AdamW settings (linear warm-up + cosine schedule)
    weight_decay: float = 0.1  # AdamW settings (linear warm-up + cosine schedule)
    seed: int = 0  # seed of init, held-out split, shuffling
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    num_processes: int = 0  # > 0: distribute with TorchDistributor
    val_fraction: float = 0.05  # held out by uid hash (tables of >= 200 rows), at most 2,000 used
    shuffle_buffer: int = SHUFFLE_BUFFER  # rows each training process shuffles in (streamed, seeded)


@dataclass
class EvaluateConf:
    # none | basic | dfn | oracle | table:<name> | uids:<file> | any rule
    selections: list[str] = field(default_factory=lambda: ["none", "basic", "dfn"])
    steps: int = 300  # training budget of each compared CLIP (same for every selection)
    batch_size: int = 64  # training budget of each compared CLIP (same for every selection)
    seed: int = 0  # seed of init and sampling
    max_pairs: int = 20_000  # pairs brought to the driver for the induced comparison


@dataclass
class Config:
    spark: SparkConf = field(default_factory=SparkConf)
    lakehouse: LakehouseConf = field(default_factory=LakehouseConf)
    sample: SampleConf = field(default_factory=SampleConf)
    ingest: IngestConf = field(default_factory=IngestConf)
    score: ScoreConf = field(default_factory=ScoreConf)
    dedup: DedupConf = field(default_factory=DedupConf)
    select: SelectConf = field(default_factory=SelectConf)
    export: ExportConf = field(default_factory=ExportConf)
    train: TrainConf = field(default_factory=TrainConf)
    evaluate: EvaluateConf = field(default_factory=EvaluateConf)
    targets: TargetsConf = field(default_factory=TargetsConf)
    takedown: TakedownConf = field(default_factory=TakedownConf)


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> Config:
    """Load ``path`` (default ``conf/local.yaml``), apply ``key=value`` overrides, validate."""
    path = Path(path) if path else DEFAULT_CONF
    if not path.exists():
        raise ConfigError(f"config file {path} does not exist; pass --conf with a path under conf/")
    with path.open() as fh:
        raw = yaml.safe_load(fh) or {}
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: top level must be a mapping of sections, got {type(raw).__name__}")
    for item in overrides or []:
        _apply_override(raw, item)
    cfg = build(Config, raw, "")
    validate(cfg)
    return cfg


def _apply_override(raw: dict, item: str) -> None:
    if "=" not in item:
        raise ConfigError(f"--set {item!r}: expected key=value, e.g. --set score.batch_size=128")
    key, value = item.split("=", 1)
    parts = key.strip().split(".")
    node = raw
    for part in parts[:-1]:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise ConfigError(f"--set {key}: {part} is not a section")
    node[parts[-1]] = yaml.safe_load(value) if value != "" else None


def build(cls: type, data: Any, where: str) -> Any:
    """Build dataclass ``cls`` from ``data``, rejecting unknown keys and wrong types."""
    if data is None:
        return cls()
    if not isinstance(data, dict):
        raise ConfigError(f"{where or 'config'}: expected a mapping, got {data!r}")
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    unknown = sorted(set(data) - set(names))
    if unknown:
        raise ConfigError(
            f"unknown key {_join(where, unknown[0])!r}; allowed keys under "
            f"{where or 'the top level'}: {', '.join(names)}"
        )
    kwargs = {k: _coerce(hints[k], v, _join(where, k)) for k, v in data.items()}
    return cls(**kwargs)


def _join(where: str, key: str) -> str:
    return f"{where}.{key}" if where else key


def _coerce(tp: Any, value: Any, where: str) -> Any:
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if value is None or (value is False and bool not in args):
            return None  # `off` / `false` switches an optional setting off
        return _coerce(args[0], value, where)
    if dataclasses.is_dataclass(tp):
        return build(tp, value, where)
    if origin is list:
        if not isinstance(value, list):
            raise ConfigError(f"{where}: expected a list, got {value!r}")
        (item,) = typing.get_args(tp)
        return [_coerce(item, v, f"{where}[{i}]") for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a mapping, got {value!r}")
        return {str(k): str(v) if not isinstance(v, str) else v for k, v in value.items()}
    return _scalar(tp, value, where)


def _scalar(tp: Any, value: Any, where: str) -> Any:
    if tp is bool:
        if isinstance(value, bool):
            return value
    elif tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
    elif tp is str:
        if isinstance(value, (str, int, float)) and not isinstance(value, bool):
            return str(value)
    raise ConfigError(f"{where}: expected {tp.__name__}, got {value!r}")


def _check(ok: bool, msg: str) -> None:
    if not ok:
        raise ConfigError(msg)


def validate(cfg: Config) -> None:
    """Range and choice checks that types alone cannot express."""
    remote = cfg.spark.remote
    _check(remote is None or remote.startswith("sc://") or remote.startswith("local"),
           "spark.remote: sc://host:port (a Spark Connect server) or local[N], got "
           f"{(remote or '').split(';')[0]!r}")
    _check(cfg.lakehouse.catalog is None or bool(cfg.lakehouse.schema),
           "lakehouse.catalog: set lakehouse.schema too (tables are catalog.schema.table)")
    for key in ("catalog", "schema"):
        name = getattr(cfg.lakehouse, key)
        _check(name is None or re.fullmatch(r"[A-Za-z0-9_]+", name) is not None,
               f"lakehouse.{key}: {name!r} must be one name of letters, digits and _ (tables "
               "are catalog.schema.table; set catalog and schema apart)")
    ls = cfg.lakehouse.lease
    _check(ls.mode in LeaseConf.MODES, f"lakehouse.lease.mode: fail or wait, got {ls.mode!r}")
    _check(0 < ls.heartbeat_seconds < ls.expire_seconds and ls.wait_seconds >= 0,
           "lakehouse.lease: 0 < heartbeat_seconds < expire_seconds, wait_seconds >= 0")
    for i, src in enumerate(cfg.ingest.sources + cfg.ingest.eval_sources):
        _check(src.format in SourceConf.FORMATS,
               f"ingest source [{i}].format: {src.format!r} is not one of {', '.join(SourceConf.FORMATS)}")
        _check(src.format == "sample" or bool(src.path),
               f"ingest source [{i}] ({src.format}): path is required")
        _check(src.json_sample_rows > 0, f"ingest source [{i}].json_sample_rows: must be > 0")
        for key in ("max_member_bytes", "max_shard_bytes"):
            _check(getattr(src, key) > 0, f"ingest source [{i}].{key}: must be > 0 (bytes), "
                   f"got {getattr(src, key)}")
    _check(cfg.ingest.max_caption_chars > 0,
           f"ingest.max_caption_chars: must be > 0, got {cfg.ingest.max_caption_chars}")
    _check(cfg.ingest.broadcast_duplicates >= 0, "ingest.broadcast_duplicates: must be >= 0")
    _check(cfg.ingest.changed_files in ("error", "reingest"),
           f"ingest.changed_files: error or reingest, got {cfg.ingest.changed_files!r}")
    _check(cfg.sample.n_pairs >= 10, "sample.n_pairs: must be >= 10")
    _check(cfg.score.batch_size > 0, "score.batch_size: must be > 0")
    _check(cfg.score.files_per_commit > 0, "score.files_per_commit: must be > 0")
    _check(cfg.score.decode_threads >= 0, "score.decode_threads: >= 1, or 0 for the task's cores")
    _check(cfg.score.prefetch >= 1, "score.prefetch: must be >= 1 (batches decoded ahead)")
    fast = cfg.score.fast_decode
    _check(fast is None or fast >= 1.0, f"score.fast_decode: off, or a factor >= 1 over the "
           f"model's input size (e.g. 2), got {fast}")
    _check(bool(cfg.score.models), "score.models: list at least one model")
    _check(cfg.score.precision in ("auto", "fp32", "bf16", "fp16"),
           "score.precision: one of auto, fp32, bf16, fp16")
    dev = cfg.score.device
    _check(dev in ("auto", "cpu", "cuda") or dev.startswith("cuda:"),
           "score.device: one of auto, cpu, cuda, cuda:N")
    for key in ("near_threshold", "eval_threshold"):
        val = getattr(cfg.dedup, key)
        _check(-1.0 <= val <= 1.0, f"dedup.{key}: a cosine similarity in [-1, 1], got {val}")
    _check(cfg.dedup.max_group_rows >= 2, "dedup.max_group_rows: must be >= 2")
    sel = cfg.select
    _check(sel.preset in (None, "none", "datacomp_basic"),
           "select.preset: one of datacomp_basic, none (or null)")
    _check(sel.keep_fraction is None or 0.0 <= sel.keep_fraction <= 1.0,
           f"select.keep_fraction: a fraction in [0, 1], got {sel.keep_fraction}")
    _check(sel.min_score is None or sel.keep_fraction is None,
           "select: set min_score or keep_fraction, not both (null the other)")
    _check(sel.fraction_of in FRACTION_OF, "select.fraction_of: one of remaining, pool")
    _check(sel.mode in ("recompute", "frozen"),
           f"select.mode: one of recompute, frozen, got {sel.mode!r}")
    _check(cfg.export.shard_size > 0, "export.shard_size: must be > 0")
    tg = cfg.targets
    kind, _, rest = tg.source.partition(":")
    _check(tg.source == "eval" or (kind in ("table", "folder") and bool(rest)),
           f"targets.source: eval, table:<name> or folder:<url>, got {tg.source!r}")
    for key in ("n_clusters", "fit_rows_per_cluster", "kmeans_iters", "top_k", "nprobe",
                "max_targets"):
        _check(getattr(tg, key) >= 1, f"targets.{key}: must be >= 1, got {getattr(tg, key)}")
    _check(cfg.train.steps > 0 and cfg.train.batch_size > 1,
           "train: steps must be > 0 and batch_size > 1")
    _check(0.0 <= cfg.train.val_fraction < 1.0 and cfg.train.shuffle_buffer >= 1,
           "train: val_fraction in [0, 1) and shuffle_buffer >= 1")
    _check(cfg.evaluate.max_pairs > 0, "evaluate.max_pairs: must be > 0")
    td = cfg.takedown
    bad = sorted(set(td.hashed_categories) - set(TAKEDOWN_CATEGORIES))
    _check(not bad, f"takedown.hashed_categories: {bad} not among {', '.join(TAKEDOWN_CATEGORIES)}")
    _check(td.retain_hours >= 0, f"takedown.retain_hours: hours >= 0, got {td.retain_hours}")
    _check(bool(re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", td.key_env)),
           f"takedown.key_env: the name of an environment variable, got {td.key_env!r}")


def config_urls(cfg: Config) -> dict[str, str]:
    """Every configured location that is a URL, keyed by its config key (for up-front checks)."""
    from etl.fs import is_url

    urls = {"lakehouse.root": cfg.lakehouse.root, "export.out_dir": cfg.export.out_dir}
    for name, sources in (("sources", cfg.ingest.sources), ("eval_sources", cfg.ingest.eval_sources)):
        for i, src in enumerate(sources):
            urls[f"ingest.{name}[{i}].path"] = src.path
    return {k: v for k, v in urls.items() if v and is_url(v)}


def resolve_path(path: str) -> Path:
    """Resolve a config path: absolute stays, relative is taken from the project root."""
    p = Path(path)
    if p.is_absolute() or p.exists():
        return p.resolve()
    return (PROJECT_ROOT / p).resolve()


def to_dict(cfg: Any) -> dict:
    """Plain-dict view of a config (for reports and model cards)."""
    return dataclasses.asdict(cfg)
