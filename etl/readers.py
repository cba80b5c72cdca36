"""Readers for raw image-text inputs. Each returns a *raw frame*:

``uid, url, text, image, width, height, sha256, source_file, source_pos, error, raw`` plus the
input's extra columns. ``error`` is set (and the row later quarantined) when a record is
unusable; a structural problem (a missing required column, files of one source that disagree
on a column's type or on the header: :mod:`etl.inputcheck`) raises :class:`InputError` before
anything is written. Bytes that are not UTF-8 are quarantined by every reader, never replaced;
tar shards are read under size caps (:mod:`etl.tarshards`).
"""

from __future__ import annotations

import json
import re
from contextlib import closing
from functools import partial

import pandas as pd
import pyarrow as pa
from pyspark.errors import AnalysisException
from pyspark.sql import Column, DataFrame, SparkSession, Window
from pyspark.sql import functions as F
from pyspark.sql import types as T
from pyspark.sql.pandas.types import to_arrow_schema

from etl.compat import Staging, json_lines_schema
from etl.config import SourceConf
from etl.fs import Store
from etl.inputcheck import SchemaConflict, check_csv_headers, check_parquet_files
from etl.redact import redact_text
from etl.tarshards import (
    IMAGE_EXTS,
    SHARD_GLOB,
    SIZES,
    TAR_SCHEMA,
    TarCaps,
    read_shards,
    shard_records,
    utf8_reason,
)

LISTED_GLOB = SHARD_GLOB[:-1] + ",parquet}"  # shards and img2dataset's parquet sidecars
SAMPLE_SHARDS = 16  # shards the driver may open to find the .json keys ...
SAMPLE_BYTES = 256 * 1024 * 1024  # ... reading at most this many bytes of their members
# A source this small (and of few shards) is read on the driver, in less time than a Python
# worker takes to start (~2 s); the sample's 2,000 pairs (~16 MB) and up go to the executors.
DRIVER_READ_BYTES = 8 * 1024 * 1024
SIZED_FORMATS = ("img2dataset", "webdataset")  # readers that take image sizes from the headers
LATIN1 = "ISO-8859-1"  # one character per byte: CSV bytes reach the UTF-8 check unchanged
BASE = ["uid", "url", "text", "image", "width", "height", "sha256", "source_file", "source_pos",
        "error", "raw"]

# the keys img2dataset writes into each sample's .json (always parsed, whatever the sample shows)
IMG2DATASET_JSON = T.StructType([T.StructField(n, t) for n, t in (
    ("key", T.StringType()), ("uid", T.StringType()), ("url", T.StringType()),
    ("caption", T.StringType()), ("status", T.StringType()), ("error_message", T.StringType()),
    ("width", T.LongType()), ("height", T.LongType()), ("original_width", T.LongType()),
    ("original_height", T.LongType()), ("sha256", T.StringType()), ("exif", T.StringType()))])


class InputError(ValueError):
    """The input cannot be ingested at all (e.g. a required column is missing)."""


def read_source(spark: SparkSession, src: SourceConf, path: str | None = None,
                stage: Staging | None = None, files: list[str] | None = None,
                reference: str | None = None) -> DataFrame:
    """Dispatch on ``src.format`` and return the raw frame; ``path`` may be any URL. ``stage``:
    a folder for the JSON sample Spark Connect infers extra columns from. ``files``: read only
    these files of the source (as :func:`source_files` lists them; None: every file).
    ``reference``: a file of the source ingested before (not read again), that ``files`` must
    agree with too (parquet column types, the delimited header line)."""
    path = path or src.path
    fmt = src.format
    try:
        if fmt == "datacomp":
            return read_datacomp(spark, path, src, files, reference)
        if fmt in ("csv", "tsv"):
            return read_delimited(spark, path, src, "\t" if fmt == "tsv" else ",", files,
                                  reference)
        if fmt in ("img2dataset", "webdataset"):
            caps = TarCaps(src.max_member_bytes, src.max_shard_bytes)
            return read_webdataset(spark, path, src.json_sample_rows, caps, stage, files,
                                   reference)
        if fmt == "folder":
            return read_image_folder(spark, path, src.json_sample_rows, stage, files)
    except AnalysisException as exc:
        raise _input_error(fmt, path, exc) from None
    except SchemaConflict as exc:
        raise InputError(str(exc)) from exc
    raise InputError(f"unknown source format {fmt!r}")


def _input_error(fmt: str, path: str, exc: AnalysisException) -> InputError:
    first = str(exc).strip().splitlines()[0][:300]
    return InputError(redact_text(f"{fmt} source {path}: {first}"))


# the files each format reads (Hadoop globs on the name; hidden _/. files are never listed)
PATTERNS = {"datacomp": "*.parquet", "csv": "*", "tsv": "*", "folder": "*"}


def source_files(spark: SparkSession, fmt: str, path: str) -> DataFrame:
    """Every file of a ``fmt`` source at ``path`` that its reader reads (``path``, ``length``,
    ``modified``), listed by Spark without reading a byte (:func:`list_files`)."""
    try:
        files = list_files(spark, path, PATTERNS.get(fmt, LISTED_GLOB))
    except AnalysisException as exc:
        raise _input_error(fmt, path, exc) from None
    if fmt in ("img2dataset", "webdataset"):
        return files.where(~F.col("path").endswith("_stats.parquet"))
    if fmt == "folder":
        ext = F.lower(F.regexp_extract("path", r"\.([^./]+)$", 1))
        return files.where(ext.isin(*IMAGE_EXTS, "txt", "json"))
    return files


def glob_safe(paths: list[str]) -> list[str]:
    """File paths with Hadoop's glob characters escaped, so each reads as exactly that file."""
    return [re.sub(r"([\\*?\[\]{}])", r"\\\1", p) for p in paths]


def _require(columns: list[str], needed: list[str], what: str) -> None:
    missing = [c for c in needed if c not in columns]
    if missing:
        raise InputError(f"{what}: missing required column(s) {', '.join(missing)}; "
                         f"columns present: {', '.join(columns)}")


def _position(df: DataFrame, parquet: bool = False) -> DataFrame:
    """Add source_file and a 0-based source_pos (row within its file): Parquet's own row
    index (no shuffle), else a row number per file (a shuffle of the rows)."""
    df = df.withColumn("source_file", F.regexp_replace("_metadata.file_path", "^file:", ""))
    if parquet:
        return df.withColumn("source_pos", F.col("_metadata.row_index").cast("long"))
    df = df.withColumn("_mid", F.monotonically_increasing_id())
    w = Window.partitionBy("source_file").orderBy("_mid")
    return df.withColumn("source_pos", (F.row_number().over(w) - 1).cast("long")).drop("_mid")


def _finish(df: DataFrame, **cols: Column) -> DataFrame:
    """Fill the base columns (those not given default to null) and keep extras after them."""
    for name in BASE:
        if name in cols:
            df = df.withColumn(name, cols[name])
        elif name not in df.columns:
            df = df.withColumn(name, F.lit(None))
    typed = {"image": "binary", "width": "int", "height": "int", "source_pos": "long"}
    base = [F.col(c).cast(typed.get(c, "string")).alias(c) for c in BASE]
    return df.select(*base, *[c for c in df.columns if c not in BASE])


def utf8_error(value: Column, field: str, where: str) -> Column:
    """The UTF-8 quarantine reason when ``value`` (a string holding raw bytes) is not UTF-8."""
    return F.when(value.isNotNull() & ~F.is_valid_utf8(value), F.lit(utf8_reason(field, where)))


def read_datacomp(spark: SparkSession, path: str, src: SourceConf,
                  files: list[str] | None = None, reference: str | None = None) -> DataFrame:
    """DataComp metadata parquet: uid, url, text (+ original_width/height, sha256, scores);
    ``files``: only these (checked against ``reference`` too)."""
    listed = list_files(spark, path, "*.parquet") if files is None else _with(files, reference)
    check_parquet_files(spark, listed, Store.from_spark(spark), f"DataComp metadata at {path}")
    df = spark.read.parquet(*([path] if files is None else glob_safe(files)))
    _require(df.columns, [src.uid_column, "url", "text"], f"DataComp metadata at {path}")
    for col in ("url", "text"):
        if not isinstance(df.schema[col].dataType, T.StringType):
            raise InputError(f"DataComp metadata at {path}: column {col!r} must be a string, "
                             f"found {df.schema[col].dataType.simpleString()}")
    df = _position(df, parquet=True)
    width = F.col("original_width") if "original_width" in df.columns else F.lit(None)
    height = F.col("original_height") if "original_height" in df.columns else F.lit(None)
    given = F.col("sha256") if "sha256" in df.columns else F.lit(None)
    out = df.withColumnRenamed(src.uid_column, "_uid") if src.uid_column != "uid" else df
    error = F.coalesce(utf8_error(F.col("text"), "text", "column text"),
                       utf8_error(F.col("url"), "url", "column url"))
    # raw only where the row is quarantined for bad bytes: url and text are columns anyway
    return _finish(out, uid=F.col("_uid" if src.uid_column != "uid" else "uid"), url=F.col("url"),
                   text=F.col("text"), width=width, height=height, sha256=given, error=error,
                   raw=F.when(error.isNotNull(), F.to_json(F.struct("url", "text")))).drop("_uid")


def read_delimited(spark: SparkSession, path: str, src: SourceConf, sep: str,
                   files: list[str] | None = None, reference: str | None = None) -> DataFrame:
    """CSV/TSV with a header row holding url + caption columns (``files``: only these, whose
    header must be ``reference``'s too).

    Quoted fields may span lines (Spark ``multiLine``; each file is then parsed by one task).
    Files are parsed as Latin-1, one character per byte, and every field is turned back into
    its bytes and checked as UTF-8, so bad bytes are quarantined rather than replaced. All
    files of one source must share one header line (checked up front).
    """
    what = f"{'TSV' if sep == chr(9) else 'CSV'} {path}"
    given = path if files is None else glob_safe(files)
    header = spark.read.option("header", True).option("sep", sep).csv(given).columns
    _require(header, [src.url_column, src.text_column], what)
    check_csv_headers(spark, list_files(spark, path, "*") if files is None
                      else _with(files, reference),
                      Store.from_spark(spark), sep, what)
    schema = T.StructType([T.StructField(c, T.StringType()) for c in header]
                          + [T.StructField("_corrupt", T.StringType())])
    df = (spark.read.schema(schema).option("header", True).option("sep", sep)
          .option("multiLine", True).option("encoding", LATIN1)
          .option("mode", "PERMISSIVE").option("columnNameOfCorruptRecord", "_corrupt")
          .option("escape", '"').csv(given))
    df = _position(df)
    df = df.select("source_file", "source_pos", *[  # Latin-1 text -> the raw bytes, unchecked
        F.encode(F.col(c), LATIN1).cast("string").alias(c) for c in [*header, "_corrupt"]])
    field = {src.text_column: "text", src.url_column: "url"}
    order = [src.text_column, src.url_column, *[c for c in header if c not in field]]
    err = F.coalesce(
        F.when(F.col("_corrupt").isNotNull(),
               F.concat(F.lit("malformed row (expected "), F.lit(len(header)), F.lit(" fields)"))),
        *[utf8_error(F.col(c), field.get(c, c), f"column {c}") for c in order])
    renamed = [c for c in header if c not in (src.url_column, src.text_column)]
    uid = F.col(src.uid_column) if src.uid_column in header else F.lit(None)
    out = _finish(df, uid=uid, url=F.col(src.url_column), text=F.col(src.text_column), error=err,
                  raw=F.coalesce(F.col("_corrupt"), F.concat_ws(sep, *[F.col(c) for c in header])))
    drop = {src.url_column, src.text_column, src.uid_column, "_corrupt"} - set(BASE)
    return out.drop(*drop).select(*BASE, *[c for c in renamed if c not in drop | set(BASE)])


def _with(files: list[str], reference: str | None) -> list[str]:
    """``files`` and the ``reference`` file they are checked against (when not among them)."""
    return files if reference is None or reference in files else [*files, reference]


def list_files(spark: SparkSession, path: str | list[str], pattern: str) -> DataFrame:
    """``path`` (one file, a folder searched recursively, or a glob; or a list of them) of files
    whose names match ``pattern``, listed by Spark's own Hadoop filesystem (any URL); columns
    ``path``, ``length``, ``modified`` (the file's modification time).

    Only the listing is read (``binaryFile`` without its ``content`` column reads no bytes).
    Local files come back as plain paths, remote ones as URLs.
    """
    files = (spark.read.format("binaryFile").option("recursiveFileLookup", "true")
             .option("pathGlobFilter", pattern).load(path))
    return files.select(F.regexp_replace("path", "^file:", "").alias("path"), "length",
                        F.col("modificationTime").alias("modified"))


def read_webdataset(spark: SparkSession, path: str, json_sample_rows: int = 1000,
                    caps: TarCaps | None = None, stage: Staging | None = None,
                    files: list[str] | None = None, reference: str | None = None) -> DataFrame:
    """WebDataset / img2dataset shards (``.tar``, ``.tar.gz``, ``.tgz``) plus failed rows from
    img2dataset sidecars (``files``: only these shards and sidecars; new sidecars are checked
    against the ``reference`` sidecar too).

    The folder is listed once. Each shard is streamed member by member, once, under the size
    ``caps`` (see :mod:`etl.tarshards`), with image sizes read from the headers as it goes: on
    the executors (fsspec; Spark's file planning groups shards into tasks by size), or, for a
    source of at most :data:`SAMPLE_SHARDS` shards and :data:`DRIVER_READ_BYTES` bytes, by the
    same code on the driver (no Python worker to start: a small source costs milliseconds to
    read, not seconds). The ``.json`` members are parsed with img2dataset's own fields plus the
    extra keys found in the first ``json_sample_rows`` of them, read on the driver from the
    first listed shards (a bounded read, not a schema pass over the pool).
    """
    defaults = SourceConf()
    caps = caps or TarCaps(defaults.max_member_bytes, defaults.max_shard_bytes)
    store = Store.from_spark(spark)
    listing = list_files(spark, path if files is None else glob_safe(files), LISTED_GLOB)
    is_parquet = F.col("path").endswith(".parquet")
    tars = listing.where(~is_parquet)
    sidecars = listing.where(is_parquet & ~F.col("path").endswith("_stats.parquet"))
    rows = (tars.limit(SAMPLE_SHARDS + 1).withColumn("sidecar", F.lit(False))
            .unionByName(sidecars.withColumn("sidecar", F.lit(True)))
            .collect())  # a few shards, and one row per sidecar file (not per pair): one job
    first = [(r.path, r.length) for r in rows if not r.sidecar]
    if not first and (files is None or not rows):
        raise InputError(f"no .tar/.tar.gz/.tgz shards found under {path}")
    reader = partial(read_shards, store=store, caps=caps)
    if len(first) <= SAMPLE_SHARDS and sum(n for _, n in first) <= DRIVER_READ_BYTES:
        local = pd.concat([pd.DataFrame(columns=TAR_SCHEMA.fieldNames()).astype(SIZES), *reader(
            iter([pd.DataFrame(first, columns=["path", "length"])]))], ignore_index=True)
        records = spark.createDataFrame(
            pa.Table.from_pandas(local, to_arrow_schema(TAR_SCHEMA), preserve_index=False))
        sample = local["json"].dropna().head(json_sample_rows).tolist()
    else:
        records = tars.mapInPandas(reader, TAR_SCHEMA)
        sample = shard_json_sample(first[:SAMPLE_SHARDS], store, caps, json_sample_rows)
    records = _expand_json(records, json_schema(spark, sample, stage=stage))
    records = records.select(*[  # the header's size over the JSON's (img2dataset's resize)
        F.coalesce(F.col(f"image_{c}"), F.col(c)).alias(c) if c in ("width", "height") else c
        for c in records.columns if c not in ("image_width", "image_height")])
    failed = _sidecar_failures(spark, path, [r.path for r in rows if r.sidecar], store,
                               reference)
    return records if failed is None else records.unionByName(failed, allowMissingColumns=True)


def shard_json_sample(shards: list[tuple[str, int]], store: Store, caps: TarCaps, rows: int,
                      max_bytes: int = SAMPLE_BYTES) -> list[str]:
    """The first ``rows`` ``.json`` members of ``shards`` (``(path, length)``, read in order on
    the calling process), stopping once ``max_bytes`` of members have been read."""
    sample: list[str] = []
    read = 0
    for path, length in shards:
        with closing(shard_records(path, int(length), store, caps)) as records:
            for rec in records:
                if rec["json"] is not None:
                    sample.append(rec["json"])
                read += sum(len(rec[k] or "") for k in ("image", "text", "json"))
                if len(sample) >= rows or read >= max_bytes:
                    return sample
    return sample


def frame_json_sample(df: DataFrame, rows: int) -> list[str]:
    """The first ``rows`` non-null values of ``df``'s ``json`` column (a bounded collect)."""
    return [r[0] for r in df.where(F.col("json").isNotNull()).select("json").limit(rows).collect()]


def json_schema(spark: SparkSession | None, sample: list[str],
                base: T.StructType = IMG2DATASET_JSON,
                stage: Staging | None = None) -> T.StructType:
    """The ``base`` fields (img2dataset's, typed), then any other keys of the ``sample`` JSON
    values in name order, typed as Spark's JSON inference types them. A sample of ``base`` keys
    and flat scalar values (img2dataset's output, with or without extra labels) is typed here
    with no Spark job; nested values or text Python does not parse as an object are left to
    Spark's inference over the sample (which needs ``spark``; over Spark Connect, ``stage`` too:
    :func:`etl.compat.json_lines_schema`)."""
    fields = list(base.fields)
    known = set(base.fieldNames()) | {"_corrupt_record"}
    extra = _scalar_fields(sample, known)
    if extra is None:
        seen = json_lines_schema(spark, sample, stage)
        extra = [f for f in seen.fields if f.name not in known]
    return T.StructType(fields + extra)


_SCALAR_TYPES = {bool: T.BooleanType(), int: T.LongType(), float: T.DoubleType(),
                 str: T.StringType()}
_LONG = range(-(2**63), 2**63)


def _scalar_fields(sample: list[str], known: set[str]) -> list[T.StructField] | None:
    """The keys outside ``known`` typed the way Spark's JSON inference types flat scalars
    (null only: string; long and double: double; any other mix: string), or None when a value
    is not an object of scalars (nested, a long overflow, Spark's lenient syntax)."""
    seen: dict[str, set[type]] = {}
    for text in sample:
        try:
            value = json.loads(text)
        except ValueError:
            return None
        if not isinstance(value, dict):
            return None
        for key, v in value.items():
            if key in known:
                continue
            if v is not None and (type(v) not in _SCALAR_TYPES
                                  or (type(v) is int and v not in _LONG)):
                return None
            seen.setdefault(key, set()).add(type(v))
    return [T.StructField(k, _scalar_type(seen[k] - {type(None)}), True) for k in sorted(seen)]


def _scalar_type(kinds: set[type]) -> T.DataType:
    if len(kinds) == 1:
        return _SCALAR_TYPES[kinds.pop()]
    return T.DoubleType() if kinds == {int, float} else T.StringType()


def _expand_json(records: DataFrame, schema: T.StructType) -> DataFrame:
    """Turn each record's JSON into typed columns."""
    fields = schema.fieldNames()
    parsed = records.withColumn("_j", F.from_json("json", schema))

    def jfield(name: str) -> Column:
        return F.col(f"_j.{name}") if name in fields else F.lit(None)

    taken = {"uid", "url", "caption", "width", "height", "sha256", "key"}
    extras = [F.col(f"_j.`{f}`").alias(f) for f in fields if f not in taken and f not in BASE]
    out = parsed.select("*", *extras)
    return _finish(out, uid=jfield("uid"), url=jfield("url"),
                   text=F.coalesce(F.col("text"), jfield("caption")), width=jfield("width"),
                   height=jfield("height"), sha256=jfield("sha256")).drop("_j", "json")


def _sidecar_failures(spark: SparkSession, path: str, files: list[str],
                      store: Store, reference: str | None = None) -> DataFrame | None:
    """img2dataset parquet sidecars (``files``, checked against ``reference`` too): rows that
    never reached a shard (failed downloads)."""
    if not files:
        return None
    check_parquet_files(spark, _with(files, reference), store, f"img2dataset sidecars at {path}",
                        ["status", "error_message", "url", "caption", "key"])
    df = spark.read.parquet(*glob_safe(files))
    if "status" not in df.columns:
        return None
    df = _position(df, parquet=True).where(F.col("status") != "success")
    msg = F.coalesce(F.col("error_message"), F.lit("")) if "error_message" in df.columns else F.lit("")
    cols = {"url": F.col("url") if "url" in df.columns else F.lit(None),
            "text": F.col("caption") if "caption" in df.columns else F.lit(None),
            "error": F.concat(F.lit("img2dataset status="), F.col("status"), F.lit(": "), msg),
            "raw": msg, "key": F.col("key").cast("string") if "key" in df.columns else F.lit(None)}
    df = df.select("source_file", "source_pos", "status", *[c.alias(k) for k, c in cols.items()])
    return _finish(df)


def read_image_folder(spark: SparkSession, path: str, json_sample_rows: int = 1000,
                      stage: Staging | None = None, only: list[str] | None = None) -> DataFrame:
    """A folder of images with caption files ``stem.txt`` (and optional ``stem.json`` extras,
    whose keys are taken from the first ``json_sample_rows`` of them); ``only``: these files."""
    given = path if only is None else glob_safe(only)
    files = (spark.read.format("binaryFile").option("recursiveFileLookup", "true").load(given)
             .select(F.regexp_replace("path", "^file:", "").alias("path"), "content")
             .withColumn("ext", F.lower(F.regexp_extract("path", r"\.([^./]+)$", 1)))
             .withColumn("stem", F.regexp_replace("path", r"\.[^./]+$", "")))
    images = files.where(F.col("ext").isin(*IMAGE_EXTS)).select(
        "stem", F.col("path").alias("image_path"), F.col("content").alias("image"))
    texts = files.where(F.col("ext") == "txt").select(
        "stem", F.col("path").alias("text_path"), F.col("content").alias("text_bytes"))
    metas = files.where(F.col("ext") == "json").select(
        "stem", F.col("content").cast("string").alias("json"))
    df = images.join(texts, "stem", "full").join(metas, "stem", "left")
    caption = F.col("text_bytes").cast("string")  # the raw bytes: checked, not replaced
    err = (F.when(F.col("image").isNull(), F.lit("caption file without an image"))
           .when(F.col("text_bytes").isNull(), F.lit("no caption file (expected stem.txt)"))
           .otherwise(utf8_error(caption, "text", "caption file")))
    df = df.select(
        F.regexp_extract("stem", r"([^/]+)$", 1).alias("key"),
        F.coalesce("image_path", "text_path").alias("source_file"), F.lit(0).cast("long").alias("source_pos"),
        F.trim(caption).alias("text"), "image", "json",
        err.alias("error"), F.coalesce("image_path", "text_path").alias("raw"))
    sample = frame_json_sample(df, json_sample_rows)
    out = _expand_json(df, json_schema(spark, sample, T.StructType(), stage))
    return out.withColumn("url", F.coalesce("url", "source_file"))
