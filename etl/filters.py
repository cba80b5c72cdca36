"""Basic filters: derived columns plus named Spark SQL predicates (keep a row when true).

Predicates see the pool's columns and the derived columns added by :func:`add_derived`:

* ``caption_lang``  ISO code from ``langid`` (its model ships in the PyPI package), computed
  only when a predicate mentions it;
* ``caption_words`` whitespace-separated words (Python ``str.split()``, as DataComp counts);
* ``caption_chars`` characters of the caption;
* ``img_width`` / ``img_height`` the original size where the input gives one
  (``original_width``/``original_height``, DataComp metadata), else the stored ``width``/``height``.

A predicate that is null (e.g. unknown size) does not keep the row.
"""

from __future__ import annotations

import re

import pandas as pd
from pyspark.sql import Column, DataFrame
from pyspark.sql import functions as F
from pyspark.sql import types as T
from pyspark.sql.functions import pandas_udf

from etl.config import ConfigError, SelectConf

# DataComp basic filtering (baselines/apply_filter.py, load_uids_with_basic_filter_helper)
DATACOMP_BASIC = {
    "english": "caption_lang = 'en'",
    "caption_words": "caption_words > 2",
    "caption_chars": "caption_chars > 5",
    "min_side": "least(img_width, img_height) >= 200",
    "aspect": "try_divide(greatest(img_width, img_height), least(img_width, img_height)) <= 3.0",
}
PRESETS = {"datacomp_basic": DATACOMP_BASIC, "none": {}}
RESERVED = ("eval-leak", "duplicate", "near-duplicate", "unscorable", "below-threshold")

_IDENTIFIER = None


def _identifier():
    """The langid identifier, loaded once per Python worker (about 2 s)."""
    global _IDENTIFIER
    if _IDENTIFIER is None:
        from langid.langid import LanguageIdentifier, model

        _IDENTIFIER = LanguageIdentifier.from_modelstring(model, norm_probs=False)
    return _IDENTIFIER


def detect_language(texts: pd.Series) -> pd.Series:
    """ISO 639-1 code per text (None for a null text)."""
    ident = _identifier()
    return texts.map(lambda t: None if t is None else ident.classify(t.replace("\n", " "))[0])


@pandas_udf(T.StringType())
def caption_lang_udf(texts: pd.Series) -> pd.Series:
    return detect_language(texts)


def configured_filters(conf: SelectConf) -> dict[str, str]:
    """The preset's filters then ``select.filters``, in order (name -> predicate)."""
    preset = PRESETS[conf.preset or "none"]
    clash = sorted(set(preset) & set(conf.filters))
    if clash:
        raise ConfigError(f"select.filters: {clash[0]!r} is already a {conf.preset} filter; "
                          f"rename it or set select.preset: none")
    filters = {**preset, **conf.filters}
    for name in filters:
        if name in RESERVED or not re.fullmatch(r"[A-Za-z0-9_.:-]+", name):
            raise ConfigError(f"select.filters: bad filter name {name!r} (letters, digits, _.:-; "
                              f"not one of {', '.join(RESERVED)})")
    return filters


def add_derived(df: DataFrame, filters: dict[str, str]) -> DataFrame:
    """Add the derived columns the predicates can use (language only when one refers to it)."""
    text = F.coalesce(F.col("text"), F.lit(""))
    out = df.withColumns({
        "caption_words": F.size(F.filter(F.split(text, r"\s+"), lambda w: w != "")),
        "caption_chars": F.char_length(text),
        "img_width": _first_present(df, "original_width", "width"),
        "img_height": _first_present(df, "original_height", "height"),
    })
    if any(re.search(r"\bcaption_lang\b", p) for p in filters.values()):
        out = out.withColumn("caption_lang", caption_lang_udf(F.col("text")))
    return out


def _first_present(df: DataFrame, *names: str) -> Column:
    cols = [F.col(n).cast("double") for n in names if n in df.columns]
    return F.coalesce(*cols) if cols else F.lit(None).cast("double")


def failed_filter(filters: dict[str, str]) -> Column:
    """Name of the first filter (in order) whose predicate is not true; null if all pass."""
    expr = F.lit(None).cast("string")
    for name, pred in reversed(list(filters.items())):
        expr = F.when(~F.coalesce(F.expr(pred).cast("boolean"), F.lit(False)), F.lit(name)) \
            .otherwise(expr)
    return expr


def check_filters(df: DataFrame, filters: dict[str, str]) -> None:
    """Fail fast, naming the filter, when a predicate does not parse or resolve on ``df``."""
    for name, pred in filters.items():
        try:
            df.select(F.expr(pred).cast("boolean")).schema  # noqa: B018 - forces analysis
        except Exception as exc:  # noqa: BLE001 - any analysis error is a config error here
            first = str(exc).strip().splitlines()[0][:300]
            raise ConfigError(f"select filter {name!r} ({pred!r}) is not a valid predicate over "
                              f"columns {', '.join(df.columns)}: {first}") from exc
