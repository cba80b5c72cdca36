"""DataComp's text-based baseline, exactly: the ``text_based`` preset through ``select`` agrees,
row for row, with a pandas copy of DataComp's predicate (``baselines/apply_filter.py``), on
captions that exercise plurals, capitals, attached punctuation, irregular plurals, other
languages and words of several senses; and the WordNet it reads is WordNet 3.0."""

from __future__ import annotations

import pandas as pd
import pytest

from etl.config import Config, LakehouseConf, SelectConf
from etl.select import select_pairs, selection_pool
from etl.tables import BRONZE, DEDUP
from udfs.wordnet import IN21K_SHA256, imagenet21k_ids, imagenet21k_path, reader

CAPTIONS = [
    ("p01", "Two dogs playing in the snow"),  # plural -> dog.n.01
    ("p02", "A Dog Sleeping On The Sofa"),  # capitals
    ("p03", "what a sunny, windy day."),  # punctuation attached to every noun
    ("p04", "Geese over a frozen lake"),  # irregular plural (noun.exc)
    ("p05", "mice and children"),  # irregular plurals
    ("p06", "Le chien joue dans la neige avec son maître"),  # French: fastText says not en
    ("p07", "Ein Hund spielt im Schnee"),  # German
    ("p08", "bank"),  # several senses: the first is bank.n.01
    ("p09", "running fast"),  # first synset run.n.05 (a noun sense of a verb form)
    ("p10", "athletic"),  # first synset is an adjective: only its offset is compared
    ("p11", "click here to download the free trial now"),
    ("p12", "lorem ipsum dolor sit amet"),
    ("p13", "the of and"),
    ("p14", "a black cat\tsleeping\non a warm mat"),  # other whitespace splits words too
    ("p15", ""),
    ("p16", "buy cheap shoes online"),
]


def datacomp_contains_text_entity(text: str, wordnet, entity_ids) -> bool:
    """A copy of DataComp's ``does_contain_text_entity``."""
    word_list = text.split()
    for word in word_list:
        synsets = wordnet.synsets(word)
        if len(synsets) == 0:
            continue
        if synsets[0].offset() in entity_ids:
            return True
    return False


def datacomp_text_based(texts: pd.Series) -> pd.Series:
    """DataComp's text-based baseline in pandas: fastText says English, and an entity."""
    from udfs.language import languages

    wordnet, ids = reader(), [int(x[1:]) for x in _id_lines()]
    english = languages(texts) == "en"
    return english & texts.apply(lambda t: datacomp_contains_text_entity(t, wordnet, ids))


def _id_lines() -> list[str]:
    return imagenet21k_path().read_text().split()  # read as DataComp reads its copy


def test_the_wordnet_is_wordnet_3_0_and_the_ids_are_datacomps():
    wn = reader()
    nouns = {o for by_pos in wn._lemma_pos_offset_map.values() for o in by_pos.get("n", ())}
    assert len(nouns) == 82115 and wn.get_version() == "3.0"
    assert wn.synsets("dogs")[0].offset() == 2084071  # n02084071, dog.n.01
    assert wn.synsets("geese")[0].name() == "goose.n.01"
    assert wn.synsets("dog,") == []
    ids = imagenet21k_ids()
    assert len(ids) == 21843 and 2084071 in ids and len(IN21K_SHA256) == 64


@pytest.fixture
def caption_lake(lake, spark):
    bronze = spark.createDataFrame([(u, t, 512, 512) for u, t in CAPTIONS],
                                   "uid string, text string, width int, height int")
    lake.overwrite(bronze.repartition(3), BRONZE)
    lake.overwrite(spark.createDataFrame(
        [(u, None, None, None, None, None) for u, _ in CAPTIONS],
        "uid string, dup_of string, dup_reason string, dup_similarity double, "
        "eval_match string, eval_similarity double"), DEDUP)
    return lake


def test_text_based_preset_is_datacomps_predicate_row_for_row(caption_lake):
    cfg = Config(lakehouse=LakehouseConf(root=caption_lake.root),
                 select=SelectConf(preset=None, keep_fraction=None, rule="text_based"))
    sel = select_pairs(selection_pool(caption_lake, cfg), caption_lake.read(DEDUP), cfg.select)
    got = {r.uid: r.drop_reason for r in sel.collect()}
    frame = pd.DataFrame(CAPTIONS, columns=["uid", "text"])
    want = dict(zip(frame.uid, datacomp_text_based(frame.text), strict=True))
    assert {u: r is None for u, r in got.items()} == want
    assert {r for r in got.values()} == {None, "english", "in_imagenet21k"}
    # the captions do exercise both sides of each case
    assert want["p01"] and want["p02"] and want["p04"] and want["p05"] and want["p14"]
    assert not want["p06"] and not want["p07"]
    assert not want["p11"] and not want["p15"]
    assert got["p03"] == "in_imagenet21k"  # English, but every noun carries punctuation
