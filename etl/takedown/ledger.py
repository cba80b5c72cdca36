"""The takedown ledger: an append-only Delta table of removal requests, one row per selector.

A request file (CSV with a header, or Parquet) has the columns ``request_id``, ``category``,
``kind``, ``value`` and optionally ``received_at`` (ISO 8601; default: now). Every line is
checked before anything is written: a bad line is named by its line number and field, and one
bad line appends nothing. Selector values are normalised by the versioned rules of
:mod:`etl.urlnorm` (``rules_version`` is stored with each row). Requests of a hashed category
(``takedown.hashed_categories``) store only ``HMAC-SHA256(key, kind NUL value)`` of the
normalised value, keyed by the secret in ``$<takedown.key_env>``; ``key_id`` (a digest of the
key) lets a run holding another key stop instead of matching nothing. Adding the same file
twice adds nothing (rows are keyed on request id, kind and value).
"""

from __future__ import annotations

import csv
import hashlib
import hmac
import io
import os
import re
from dataclasses import dataclass
from datetime import datetime, timezone

from pyspark.sql import DataFrame
from pyspark.sql import functions as F
from pyspark.sql import types as T

from etl.config import TAKEDOWN_CATEGORIES, ConfigError, TakedownConf
from etl.fs import basename
from etl.redact import redact_url
from etl.spark import local_frame
from etl.tables import EVENTS, LEDGER, Lakehouse
from etl.urlnorm import KINDS, RULES_VERSION, SelectorError, normalize_selector

COLUMNS = ("request_id", "category", "kind", "value")
OPTIONAL = ("received_at",)
REQUEST_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:/-]{0,127}")
MIN_KEY_CHARS = 16
SHOWN_ERRORS = 20
STATES = ("received", "applied", "purged", "verified", "failed")

LEDGER_SCHEMA = T.StructType([
    T.StructField("request_id", T.StringType()),
    T.StructField("category", T.StringType()),
    T.StructField("kind", T.StringType()),
    T.StructField("value", T.StringType()),
    T.StructField("hashed", T.BooleanType()),
    T.StructField("key_id", T.StringType()),
    T.StructField("rules_version", T.IntegerType()),
    T.StructField("received_at", T.TimestampType()),
    T.StructField("line", T.LongType()),
    T.StructField("request_file", T.StringType()),
    T.StructField("added_run", T.StringType()),
    T.StructField("added_at", T.TimestampType()),
])
EVENTS_SCHEMA = T.StructType([
    T.StructField("run_id", T.StringType()),
    T.StructField("at", T.TimestampType()),
    T.StructField("state", T.StringType()),
    T.StructField("request_id", T.StringType()),
    T.StructField("table_name", T.StringType()),
    T.StructField("rows", T.LongType()),
    T.StructField("ledger_version", T.LongType()),
    T.StructField("table_version", T.LongType()),
    T.StructField("path", T.StringType()),
    T.StructField("detail", T.StringType()),
])


class RequestFileError(ConfigError):
    """A request file with bad lines; nothing was appended."""


def now() -> datetime:
    """UTC now, naive (as Spark's TimestampType holds it)."""
    return datetime.now(timezone.utc).replace(tzinfo=None)


# ---- the secret key --------------------------------------------------------------------------


def secret_key(conf: TakedownConf, why: str) -> bytes:
    """The ledger's hash key from ``$<key_env>``; a ConfigError saying how to set it."""
    value = os.environ.get(conf.key_env, "")
    if len(value) < MIN_KEY_CHARS:
        state = "is not set" if not value else f"is shorter than {MIN_KEY_CHARS} characters"
        raise ConfigError(f"takedown: {why} needs the ledger's secret key, but ${conf.key_env} "
                          f"{state}; set it (the same value for every run, kept in a secret "
                          "store), or change takedown.key_env")
    return value.encode("utf-8")


def key_id(key: bytes) -> str:
    """A public fingerprint of ``key`` (which key hashed a row), not the key."""
    return hmac.new(key, b"dfn-curate:takedown-key-id", hashlib.sha256).hexdigest()[:16]


def keyed(key: bytes, kind: str, value: str) -> str:
    """``HMAC-SHA256(key, kind NUL value)`` in hex: what a hashed selector stores."""
    return hmac.new(key, f"{kind}\0{value}".encode(), hashlib.sha256).hexdigest()


# ---- reading and checking a request file -----------------------------------------------------


@dataclass
class Line:
    number: int  # 1-based line of the file (CSV: the header is line 1); Parquet: row number
    fields: dict[str, str | None]


def read_lines(path: str, store) -> list[Line]:
    """The request file's lines (``.parquet`` by pyarrow, anything else as CSV)."""
    data = store.read_bytes(path)
    if path.rstrip("/").lower().endswith(".parquet"):
        import pyarrow.parquet as pq

        table = pq.read_table(io.BytesIO(data))
        _check_columns(table.column_names, path)
        return [Line(i + 1, {k: _text(v) for k, v in row.items()})
                for i, row in enumerate(table.to_pylist())]
    text = data.decode("utf-8-sig")
    reader = csv.DictReader(io.StringIO(text, newline=""))
    _check_columns(reader.fieldnames or [], path)
    lines = []
    for row in reader:
        if None in row:
            raise RequestFileError(f"{redact_url(path)} line {reader.line_num}: more fields than "
                                   f"the header's {len(reader.fieldnames)}; nothing was added")
        lines.append(Line(reader.line_num, {k: _text(v) for k, v in row.items()}))
    return lines


def _text(v) -> str | None:
    if v is None:
        return None
    return v.isoformat() if isinstance(v, datetime) else str(v)


def _check_columns(names: list[str], path: str) -> None:
    missing = [c for c in COLUMNS if c not in names]
    extra = [c for c in names if c not in COLUMNS + OPTIONAL]
    if missing or extra:
        raise RequestFileError(
            f"{redact_url(path)}: columns must be {', '.join(COLUMNS)} (+ optional "
            f"{', '.join(OPTIONAL)}); missing {missing or 'none'}, unknown {extra or 'none'}; "
            "nothing was added")


def check_line(line: Line, hashed_categories: list[str]) -> tuple[dict | None, list[str]]:
    """(the ledger fields of ``line``, []) or (None, its problems as 'line N, field: why')."""
    f, problems, out = line.fields, [], {}

    def bad(field: str, why: str) -> None:
        problems.append(f"line {line.number}, {field}: {why}")

    rid = (f.get("request_id") or "").strip()
    if not REQUEST_ID.fullmatch(rid):
        bad("request_id", f"{rid[:40]!r} must be 1-128 letters, digits or ._:/- (starting with "
            "a letter or digit)")
    category = (f.get("category") or "").strip().lower()
    if category not in TAKEDOWN_CATEGORIES:
        bad("category", f"{category[:40]!r} is not one of {', '.join(TAKEDOWN_CATEGORIES)}")
    kind = (f.get("kind") or "").strip().lower()
    value = None
    if kind not in KINDS:
        bad("kind", f"{kind[:40]!r} is not one of {', '.join(KINDS)}")
    else:
        try:
            value = normalize_selector(kind, f.get("value") or "")
        except SelectorError as exc:  # a hashed category's value stays out of the message
            bad("value", f"not a valid {kind} (the value of a {category} request is not shown)"
                if category in hashed_categories else str(exc))
    received = _received(f.get("received_at"))
    if received is None:
        bad("received_at", f"{(f.get('received_at') or '')[:40]!r} is not an ISO 8601 date or "
            "time (e.g. 2026-11-30 or 2026-11-30T14:05:00Z)")
    if problems:
        return None, problems
    out.update(request_id=rid, category=category, kind=kind, value=value,
               hashed=category in hashed_categories, received_at=received, line=line.number)
    return out, []


def _received(text: str | None) -> datetime | None:
    if text is None or not text.strip():
        return now()
    try:
        when = datetime.fromisoformat(text.strip().replace("Z", "+00:00"))
    except ValueError:
        return None
    if when.tzinfo is not None:
        when = when.astimezone(timezone.utc).replace(tzinfo=None)
    return when


def check_file(lines: list[Line], conf: TakedownConf, path: str) -> list[dict]:
    """Every line's ledger fields; a :class:`RequestFileError` listing the bad lines (and
    requests whose lines disagree on the category) when there is any."""
    rows, problems, categories = [], [], {}
    for line in lines:
        row, why = check_line(line, conf.hashed_categories)
        problems += why
        if row is None:
            continue
        first = categories.setdefault(row["request_id"], (row["category"], line.number))
        if first[0] != row["category"]:
            problems.append(f"line {line.number}, category: request {row['request_id']} is "
                            f"{first[0]!r} on line {first[1]}; a request has one category")
        rows.append(row)
    if not lines:
        problems.append("the file has no request lines")
    if problems:
        shown = "\n  ".join(problems[:SHOWN_ERRORS])
        more = f"\n  ... and {len(problems) - SHOWN_ERRORS} more" if len(problems) > SHOWN_ERRORS \
            else ""
        raise RequestFileError(f"{redact_url(path)}: {len(problems)} problem(s); nothing was "
                               f"added:\n  {shown}{more}")
    return rows


# ---- the table ---------------------------------------------------------------------------


def add_requests(lake: Lakehouse, conf: TakedownConf, path: str, run_id: str) -> dict[str, int]:
    """Check the request file at ``path`` whole, then append its new selectors to the ledger
    (hashing those of hashed categories); returns counts."""
    rows = check_file(read_lines(path, lake.store), conf, path)
    key = None
    if any(r["hashed"] for r in rows):
        key = secret_key(conf, "a hashed category")
        _check_key(lake, conf, key)
    _check_against_ledger(lake, rows, path)
    added_at, where = now(), basename(redact_url(path))
    records = []
    for r in rows:
        value = keyed(key, r["kind"], r["value"]) if r["hashed"] else r["value"]
        records.append((r["request_id"], r["category"], r["kind"], value, r["hashed"],
                        key_id(key) if r["hashed"] else None, RULES_VERSION, r["received_at"],
                        r["line"], where, run_id, added_at))
    frame = local_frame(lake.spark, records, LEDGER_SCHEMA)
    before = lake.version(LEDGER)
    added = lake.insert_new(frame, LEDGER, ["request_id", "kind", "value"])
    return {"lines": len(rows), "selectors_added": added,
            "already_in_ledger": len({(r[0], r[2], r[3]) for r in records}) - added,
            "requests": len({r["request_id"] for r in rows}),
            "ledger_version": lake.version(LEDGER) if added else (before or 0)}


def _check_against_ledger(lake: Lakehouse, rows: list[dict], path: str) -> None:
    """A request id already in the ledger under another category is refused."""
    if not lake.exists(LEDGER):
        return
    ids = local_frame(lake.spark, sorted({(r["request_id"], r["category"]) for r in rows}),
                      "request_id string, category string")
    clash = (lake.read(LEDGER).select("request_id", F.col("category").alias("was"))
             .distinct().join(ids, "request_id").where(F.col("was") != F.col("category"))
             .limit(SHOWN_ERRORS).collect())
    if clash:
        shown = "; ".join(f"{r['request_id']} is {r['was']!r} in the ledger, {r['category']!r} "
                          "here" for r in clash)
        raise RequestFileError(f"{redact_url(path)}: {shown}; a request keeps its category "
                               "(use a new request id); nothing was added")


def ledger_frame(lake: Lakehouse, version: int | None = None) -> DataFrame:
    """The ledger, at ``version`` when given (an apply reads one version throughout)."""
    if version is None:
        return lake.read(LEDGER)
    return lake.spark.sql(f"SELECT * FROM {lake.name(LEDGER)} VERSION AS OF {int(version)}")


def selectors(lake: Lakehouse, conf: TakedownConf,
              version: int | None = None) -> tuple[DataFrame | None, bytes | None]:
    """The ledger's selectors ``(request_id, kind, value, hashed)`` (at ``version``) and, when
    any is hashed, the key (checked against the rows' ``key_id``); (None, None) without a
    ledger."""
    if not lake.exists(LEDGER):
        return None, None
    ledger = ledger_frame(lake, version)
    key = None
    if ledger.where("hashed").limit(1).count():
        key = secret_key(conf, "the ledger's hashed requests")
        _check_key(lake, conf, key)
    return ledger.select("request_id", "kind", "value", "hashed"), key


def _check_key(lake: Lakehouse, conf: TakedownConf, key: bytes) -> None:
    """Refuse a key other than the one that hashed the ledger's rows (it would match nothing)."""
    if not lake.exists(LEDGER):
        return
    ids = [r[0] for r in lake.read(LEDGER).where("hashed").select("key_id").distinct()
           .limit(3).collect()]
    if ids and ids != [key_id(key)]:
        raise ConfigError(f"takedown: ${conf.key_env} is not the key that hashed the ledger's "
                          f"requests (key id {', '.join(ids)}; this key's {key_id(key)}); set "
                          "the original key")


def record_events(lake: Lakehouse, rows: list[tuple]) -> None:
    """Append rows of :data:`EVENTS_SCHEMA` (the ledger's state changes and proofs)."""
    if rows:
        lake.append(local_frame(lake.spark, rows, EVENTS_SCHEMA), EVENTS)


def event(run_id: str, state: str, request_id: str | None = None, table: str | None = None,
          rows: int | None = None, ledger_version: int | None = None,
          table_version: int | None = None, path: str | None = None,
          detail: str | None = None) -> tuple:
    """One :data:`EVENTS_SCHEMA` row."""
    return (run_id, now(), state, request_id, table, rows, ledger_version, table_version, path,
            detail)


def status(lake: Lakehouse) -> DataFrame | None:
    """One row per request: category, selectors, received time, state (its latest of received,
    applied, purged, verified, failed) and uids removed; None without a ledger."""
    if not lake.exists(LEDGER):
        return None
    requests = lake.read(LEDGER).groupBy("request_id", "category").agg(
        F.count("*").alias("selectors"), F.min("received_at").alias("received_at"))
    if not lake.exists(EVENTS):
        return (requests.withColumn("state", F.lit("received"))
                .withColumn("uids_removed", F.lit(0)).orderBy("received_at", "request_id"))
    rank = F.create_map(*[x for i, s in enumerate(STATES) for x in (F.lit(s), F.lit(i))])
    ev = lake.read(EVENTS).where(F.col("request_id").isNotNull() & F.col("state").isin(*STATES))
    # the latest event wins (a failed proof after a verified one shows failed); within one
    # run's events, the later state in STATES
    latest = ev.groupBy("request_id").agg(
        F.max(F.struct("at", rank[F.col("state")].alias("r"), "state")).alias("_last"),
        F.max(F.when(F.col("state") == "applied", F.col("rows"))).alias("uids_removed"))
    return (requests.join(latest, "request_id", "left")
            .withColumn("state", F.coalesce(F.col("_last.state"), F.lit("received")))
            .withColumn("uids_removed", F.coalesce("uids_removed", F.lit(0)))
            .drop("_last").orderBy("received_at", "request_id"))

def summary(lake: Lakehouse, most: int = 50) -> dict | None:
    """What the report and notebooks show: requests with their state (first ``most``), rows
    removed per table, and the last proof; None without a ledger."""
    table = status(lake)
    if table is None:
        return None
    requests = [[r["request_id"], r["category"], r["selectors"], r["state"], r["uids_removed"]]
                for r in table.limit(most).collect()]
    removed, proof = [], None
    if lake.exists(EVENTS):
        ev = lake.read(EVENTS)
        removed = [[r[0], r[1]] for r in ev.where(F.col("state") == "removed")
                   .groupBy("table_name").agg(F.sum("rows")).orderBy("table_name").collect()]
        last = ev.where(F.col("state") == "proof").orderBy(F.col("at").desc()).limit(1).collect()
        if last:
            import json

            detail = json.loads(last[0]["detail"])
            proof = [str(last[0]["at"]), "verified" if detail.get("verified") else "FAILED",
                     ", ".join(detail.get("failures", [])) or "none"]
    return {"requests": requests, "removed": removed, "proof": proof,
            "total": table.count()}
