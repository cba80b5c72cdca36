"""Which rows the ledger names: equality joins of each row's candidate keys with the selectors.

A row's keys are ``kind:value`` strings: ``uid:<uid>``, ``sha256:<hex>``, ``md5:<hex>`` and,
from its URL, the keys of :func:`etl.urlnorm.candidates` (``url:``, ``prefix:``, ``host:``,
``domain:``), computed on the executors (a pandas UDF, only when the ledger holds a URL-kind
selector). With hashed selectors in the ledger each key is also hashed with the ledger's key
(``kind:<hmac>``). A selector matches a row iff its ``kind:value`` is among the row's keys, so
every match is a join: no selector value ever appears in a query's text or a table's history.
"""

from __future__ import annotations

import pandas as pd
from pyspark.sql import DataFrame
from pyspark.sql import functions as F
from pyspark.sql import types as T

from etl.config import TakedownConf
from etl.tables import MATCHES, Lakehouse
from etl.takedown.ledger import keyed, selectors
from etl.urlnorm import candidates

URL_KINDS = frozenset({"url", "prefix", "host", "domain"})
KEYS = T.ArrayType(T.StringType())


def url_keys(urls: pd.Series) -> pd.Series:
    """pandas UDF body: each URL's ``kind:value`` candidate keys."""
    return pd.Series([[f"{k}:{v}" for k, v in candidates(u)] if isinstance(u, str) else []
                      for u in urls])


def hashed_keys(keys: pd.Series, key: bytes) -> pd.Series:
    """pandas UDF body: ``kind:value`` -> ``kind:HMAC(key, kind NUL value)``."""
    out = []
    for k in keys:
        kind, _, value = k.partition(":")
        out.append(f"{kind}:{keyed(key, kind, value)}")
    return pd.Series(out)


def row_keys(df: DataFrame, ids: list[str], kinds: dict[bool, set[str]],
             key: bytes | None) -> DataFrame:
    """``(ids..., key)``: the candidate keys of each row of ``df`` (columns it lacks among
    uid, url, sha256, md5, image are skipped) for the selector kinds the ledger holds:
    ``kinds[False]`` in clear, ``kinds[True]`` hashed with ``key`` (only those are hashed)."""
    wanted = kinds.get(False, set()) | kinds.get(True, set())
    parts = [F.concat(F.lit(f"{c}:"), F.lower(F.col(c))) for c in ("uid", "sha256")
             if c in df.columns and c in wanted]
    if "md5" in wanted and {"md5", "image"} & set(df.columns):
        # rows ingested before bronze had md5 have the bytes: hashed here (read only for md5)
        given = F.lower(F.col("md5")) if "md5" in df.columns else F.lit(None).cast("string")
        computed = F.md5("image") if "image" in df.columns else F.lit(None).cast("string")
        parts.append(F.concat(F.lit("md5:"), F.coalesce(given, computed)))
    arrays = [F.array(*parts)] if parts else []
    if "url" in df.columns and wanted & URL_KINDS:
        arrays.append(F.pandas_udf(url_keys, KEYS)(F.col("url")))
    if not arrays:
        return df.sparkSession.createDataFrame([], ", ".join(
            [f"`{c}` {df.schema[c].dataType.simpleString()}" for c in ids] + ["key string"]))
    every = arrays[0] if len(arrays) == 1 else F.concat(*arrays)
    keys = df.select(*ids, F.explode(every).alias("key")).where(F.col("key").isNotNull())
    kind = F.substring_index("key", ":", 1)
    plain = keys.where(kind.isin(*kinds.get(False, set())))
    if key is None or not kinds.get(True):
        return plain

    def hash_keys(values: pd.Series) -> pd.Series:  # the key rides in the closure, not the plan
        return hashed_keys(values, key)

    hashed = keys.where(kind.isin(*kinds[True])).select(
        *ids, F.pandas_udf(hash_keys, T.StringType())(F.col("key")).alias("key"))
    return plain.unionByName(hashed)


def selector_keys(sel: DataFrame) -> DataFrame:
    """``(request_id, via, key)`` of the ledger's selectors."""
    return sel.select("request_id", F.col("kind").alias("via"),
                      F.concat("kind", F.lit(":"), "value").alias("key"))


def ledger_kinds(sel: DataFrame) -> dict[bool, set[str]]:
    """The selector kinds the ledger holds, in clear (False) and hashed (True); at most
    fourteen rows come back."""
    out: dict[bool, set[str]] = {False: set(), True: set()}
    for kind, hashed in sel.select("kind", "hashed").distinct().collect():
        out[bool(hashed)].add(kind)
    return out


def named_rows(lake: Lakehouse, conf: TakedownConf, df: DataFrame, ids: list[str],
               version: int | None = None) -> DataFrame | None:
    """``(ids..., request_id, via)`` for each row of ``df`` a ledger selector (of ledger
    ``version``; None: the latest) names, one row per (row, request); None without a ledger."""
    sel, key = selectors(lake, conf, version)
    if sel is None:
        return None
    keys = row_keys(df, ids, ledger_kinds(sel), key)
    return keys.join(selector_keys(sel), "key").select(*ids, "request_id", "via").distinct()


def removed_uids(lake: Lakehouse) -> DataFrame | None:
    """The uids takedowns removed (``takedown_matches``); None when there are none."""
    if not lake.exists(MATCHES):
        return None
    return lake.read(MATCHES).select("uid").distinct()


def without_removed(lake: Lakehouse, df: DataFrame) -> DataFrame:
    """``df`` without the rows whose uid a takedown removed (scoring, export, the report)."""
    gone = removed_uids(lake)
    return df if gone is None else df.join(gone, "uid", "left_anti")


def blocked_rows(lake: Lakehouse, conf: TakedownConf, df: DataFrame,
                 ids: list[str]) -> DataFrame | None:
    """``ids`` of the rows of ``df`` ingest must not write: named by a selector, carrying a
    removed uid, or the image bytes (sha256) of a removed row; None without takedowns."""
    named = named_rows(lake, conf, df, ids)
    gone = removed_uids(lake)
    parts = [] if named is None else [named.select(*ids)]
    if gone is not None:
        parts.append(df.join(gone, "uid", "left_semi").select(*ids))
        if "sha256" in df.columns:  # a copy of a removed image under a new url and uid
            images = lake.read(MATCHES).where(F.col("sha256").isNotNull()).select("sha256")
            parts.append(df.join(images.distinct(), "sha256", "left_semi").select(*ids))
    if not parts:
        return None
    out = parts[0]
    for p in parts[1:]:
        out = out.unionByName(p)
    return out.distinct()
