"""What an export pins about how it was made, so a subset can be rebuilt or audited later.

The manifest's ``lineage`` section: the package version; the Delta version of each table the
export read (bronze, silver scores, dedup, targets, selection) and of the gold table it wrote;
each scoring model's id with the digest of the weights that scored it (the silver table's
``dfn.weights_sha256.*`` properties, :mod:`etl.score`); the selection's rule text and each cut
resolved to its value (recorded on ``gold_selection`` by select, :func:`record_selection`); the
dedup settings; and the export it replaces.
"""

from __future__ import annotations

import json
from importlib import metadata

from etl.config import Config, to_dict
from etl.cuts import Threshold
from etl.tables import BRONZE, DEDUP, GOLD, SELECTION, SILVER, TARGETS, Lakehouse

RULE_PROPERTY = "dfn.select.rule"
CUTS_PROPERTY = "dfn.select.cuts"
# the cut of the selection model's score, as the row column ``threshold`` holds it when written;
# rows an incremental select left alone keep the value of the run that wrote them
THRESHOLD_PROPERTY = "dfn.select.threshold"
READ = (BRONZE, SILVER, DEDUP, TARGETS, SELECTION)


def record_selection(lake: Lakehouse, rule_text: str, cuts: dict[str, Threshold],
                     threshold: float | None = None, extra: dict[str, str] | None = None,
                     current: dict[str, str] | None = None) -> None:
    """Store the rule, its resolved cuts, the score ``threshold`` now applied and ``extra``
    properties on ``gold_selection`` (a metadata-only commit, none when they are already
    stored; ``current``: its properties, when the caller read them)."""
    resolved = {name: t.record() for name, t in cuts.items()}
    values = {RULE_PROPERTY: rule_text, CUTS_PROPERTY: json.dumps(resolved, sort_keys=True),
              THRESHOLD_PROPERTY: json.dumps(threshold), **(extra or {})}
    current = lake.properties(SELECTION) if current is None else current
    if any(current.get(k) != v for k, v in values.items()):
        lake.set_properties(SELECTION, values)


def read_versions(lake: Lakehouse) -> dict[str, int | None]:
    """The current version of each table an export reads (taken before it reads them)."""
    return {t: lake.version(t) for t in READ}


def export_lineage(lake: Lakehouse, cfg: Config, read: dict[str, int | None],
                   previous: dict | None) -> dict:
    """The manifest's ``lineage`` section (``read``: :func:`read_versions` at the start)."""
    from etl.score import weights_property
    from udfs.models import resolve_conf

    silver = lake.properties(SILVER) if lake.exists(SILVER) else {}
    selection = lake.properties(SELECTION) if lake.exists(SELECTION) else {}
    cuts = selection.get(CUTS_PROPERTY)
    return {
        "package": package_version(),
        "tables": {**{t: v for t, v in read.items()}, GOLD: lake.version(GOLD)},
        "models": [{"model_id": mid, "weights_sha256": silver.get(weights_property(mid))}
                   for mid in (resolve_conf(m).model_id for m in cfg.score.models)],
        "selection": {"rule": selection.get(RULE_PROPERTY),
                      "cuts": json.loads(cuts) if cuts else None},
        "dedup": to_dict(cfg.dedup),
        "previous_export": previous["run_id"] if previous else None,
    }


def package_version() -> str | None:
    try:
        return metadata.version("dfn-curate")
    except metadata.PackageNotFoundError:
        return None


def applied_threshold(lake: Lakehouse) -> float | None:
    """The score threshold the last select applied (None: no cut, or no selection); the
    recorded property, else (a selection written before it was recorded) the rows' column."""
    from pyspark.sql import functions as F

    if not lake.exists(SELECTION):
        return None
    text = lake.properties(SELECTION).get(THRESHOLD_PROPERTY)
    if text is not None:
        value = json.loads(text)
        return None if value is None else float(value)
    sel = lake.read(SELECTION)
    if "threshold" not in sel.columns:
        return None
    row = sel.where(F.col("threshold").isNotNull()).select("threshold").first()
    return None if row is None else float(row[0])
