"""The rows a selection can change: those whose inputs changed, and those its cuts moved past.

A selection's decision for a row is a function of the row's inputs (bronze, silver scores, dedup
flags, target columns) and of the values its cuts resolved to: once resolved, a fraction or
random cut is applied by value (``score >= t``; :func:`etl.select.frozen_rule` relies on the
same fact). So when ``gold_selection`` holds the decisions of the last selection, made under a
recorded configuration (:func:`fingerprint`) from recorded input versions and cuts, the new
decisions can differ from the table's only for

- rows whose inputs changed since those versions (the inputs' change data feeds:
  :func:`etl.changefeed.changed_keys`), and
- rows whose value of a cut's column lies between the cut's old and new value (the *band*:
  where ``value >= old`` and ``value >= new`` disagree).

:func:`changed_rows` narrows the new selection to those rows, so ``select`` compares and merges
only them (:func:`etl.tablesync.sync` with ``partial``) instead of joining the whole pool with the
table: a 1% increment costs the cut's narrow scan plus the increment. Whenever that cannot be
shown (no recorded state, another configuration or rule, a deleted bronze row, a feed that
cannot answer) the answer is the reason, and ``select`` compares the whole pool as before.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from dataclasses import asdict

from pyspark.sql import Column, DataFrame
from pyspark.sql import functions as F

from etl.changefeed import Changes, appended_rows, changed_keys, key_side
from etl.config import Config
from etl.cuts import Threshold
from etl.lease import holds
from etl.rules import RAND, Node, Rule, rand_column
from etl.tables import BRONZE, DEDUP, SELECTION, SILVER, TARGETS, Lakehouse

INPUTS_PROPERTY = "dfn.select.inputs"  # {"fingerprint": ..., "versions": {table: version}}
INPUT_TABLES = (BRONZE, SILVER, DEDUP, TARGETS)
CHANGED = "_dfn_changed"


def input_versions(lake: Lakehouse) -> dict[str, int | None]:
    """The current version of each table a selection may read (None: absent), taken before
    the selection reads them."""
    return {t: lake.version(t) if lake.exists(t) else None for t in INPUT_TABLES}


def fingerprint(cfg: Config, rule: Rule, basis: dict[str, dict]) -> str:
    """A digest of everything besides the input rows that decides a selection: the select and
    targets configuration, the compiled rule (predicates included), what each cut reads, and
    the package version (another version may decide otherwise)."""
    from etl.provenance import package_version

    text = json.dumps({"select": asdict(cfg.select), "targets": asdict(cfg.targets),
                       "rule": repr(rule), "basis": basis, "package": package_version()},
                      sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()


def inputs_record(lake: Lakehouse, fp: str, versions: dict[str, int | None],
                  properties: dict[str, str]) -> str:
    """The :data:`INPUTS_PROPERTY` value a selection records, with the ``gold_selection``
    version whose rows it covers (``table_version``). A stored record of the same inputs
    stands (no commit) while no commit changed the table's rows after it."""
    record = {"fingerprint": fp, "versions": versions}
    stored = json.loads(properties.get(INPUTS_PROPERTY) or "{}")
    covered = stored.get("table_version")
    if (covered is not None and {k: stored.get(k) for k in record} == record
            and not lake.data_changed_since(SELECTION, covered)):
        return properties[INPUTS_PROPERTY]
    return json.dumps({**record, "table_version": lake.version(SELECTION)}, sort_keys=True)


def known_absent(lake: Lakehouse, properties: dict[str, str],
                 found: list[Changes]) -> DataFrame | None:
    """Keys ``gold_selection`` surely lacks: bronze rows inserted since the recorded versions
    (and still there). Only under this process's lakehouse lease (no other writer moved
    bronze between the recorded versions and the selection's read) and when no commit changed
    ``gold_selection``'s rows after its record (a selection stopped between its write and its
    record leaves rows the record does not cover); None when there are none or that cannot
    be shown."""
    covered = json.loads(properties.get(INPUTS_PROPERTY) or "{}").get("table_version")
    bronze = next((c for c in found if c.table == BRONZE and c.keys is not None), None)
    if covered is None or bronze is None or not bronze.born_kept or not holds(lake):
        return None
    if lake.data_changed_since(SELECTION, covered):
        return None
    return bronze.born_uids()


def changed_rows(lake: Lakehouse, out: DataFrame, rule: Rule, cuts: dict[str, Threshold],
                 properties: dict[str, str], fp: str, current: dict[str, int | None],
                 appended_out: Callable[[DataFrame], DataFrame | None] | None = None
                 ) -> tuple[DataFrame, list[Changes]] | str:
    """``out`` (the new selection, every pool row) narrowed to the rows whose decision may
    differ from ``gold_selection``'s (``properties``: its table properties; ``current``: the
    input versions ``out`` read), with the feeds read (release them after use); or why it
    cannot be narrowed.

    ``appended_out`` makes the selection's rows of given bronze rows: when bronze's changes
    are all appends and they are all the rows to compare, those rows are made from the rows
    its feed appended, and the pool's wide rows are not read at all."""
    from etl.provenance import CUTS_PROPERTY

    recorded = json.loads(properties.get(INPUTS_PROPERTY) or "{}")
    if recorded.get("fingerprint") != fp:
        return "the last selection was made under another configuration or rule"
    old = json.loads(properties.get(CUTS_PROPERTY) or "{}")
    band = cut_band(rule, cuts, old)
    if isinstance(band, str):
        return band
    found = _changes(lake, recorded.get("versions", {}), current)
    if isinstance(found, str):
        return found
    out = with_rand(out, rule)
    bronze = next((c for c in found if c.table == BRONZE), None)
    appended = appended_rows(lake, bronze) if bronze and appended_out else None
    # planned only once the appended rows are known to be all there is to compare
    made = (appended_out(appended)
            if appended is not None and _only_appended(out, band, found, bronze) else None)
    if made is None:
        return _marked(out, band, found), found
    print(f"select: {bronze.appended} rows new to bronze made from its change feed (no other "
          "row's inputs changed, and no cut moved past another row)")
    return made.select(*[c for c in out.columns if c != RAND]), found


def _only_appended(out: DataFrame, band: Column | None, found: list[Changes],
                   bronze: Changes) -> bool:
    """Whether the rows bronze appended are all the rows to compare: no other input changed
    another key (a join of the feeds' keys) and no cut's band holds another row (a narrow
    pass over the pool, only when a cut moved). Else the pool is read once for them all."""
    born = bronze.born_uids()
    others = [c.keys.select("uid") for c in found if c.table != BRONZE and c.keys is not None]
    for keys in others:
        if not keys.join(born, "uid", "left_anti").isEmpty():
            return False
    return band is None or out.where(band).select("uid").join(born, "uid", "left_anti").isEmpty()


def _marked(out: DataFrame, band: Column | None, found: list[Changes]) -> DataFrame:
    """Rows of ``out`` whose key ``found`` holds or that lie in the cuts' ``band``."""
    keys = [c.keys.select("uid") for c in found if c.keys is not None]
    where = F.lit(False) if band is None else band
    if keys:
        changed = keys[0]
        for more in keys[1:]:
            changed = changed.unionByName(more)
        marked = key_side(changed.distinct().withColumn(CHANGED, F.lit(True)),
                          sum(c.count for c in found))
        out, where = out.join(marked, "uid", "left"), F.col(CHANGED).isNotNull() | where
    return out.where(where).drop(CHANGED, RAND)


def _changes(lake: Lakehouse, versions: dict[str, int | None],
             current: dict[str, int | None]) -> list[Changes] | str:
    """The changed keys of each input table from its recorded version to its ``current`` one,
    or why they cannot be told."""
    found: list[Changes] = []
    for table in INPUT_TABLES:
        since, now = versions.get(table), current.get(table)
        if now is None:
            if since is None:
                continue
            got: Changes | str = f"{table} is gone"
        else:
            got = changed_keys(lake, table, since, now)
        if isinstance(got, Changes) and table == BRONZE and got.deleted:
            got.release()
            got = f"{got.deleted} bronze rows were deleted since (a takedown)"
        if isinstance(got, str):
            _release(found)
            return got
        found.append(got)
    return found


def cut_band(rule: Rule, new: dict[str, Threshold], old: dict[str, dict]
             ) -> Column | str | None:
    """Rows on which some cut of ``rule`` decides differently with its ``old`` (recorded) and
    ``new`` value (None: no cut moved); or why they cannot be told (the cuts differ)."""
    nodes = {n.text: n for part in rule.parts for n in _cut_nodes(part)}
    if set(new) != set(old) or not set(nodes) <= set(new):
        return "the selection's cuts differ from the recorded ones"
    band: Column | None = None
    for text, thr in new.items():
        node = nodes.get(text)
        if node is None:  # a fixed threshold of the rule's own text: the fingerprint holds it
            continue
        was, n_was = old[text].get("value"), old[text].get("n")
        if was == thr.value and (was is not None or bool(n_was) == bool(thr.position)):
            continue  # decides every row as before
        moved = ~_passes(node, was, n_was).eqNullSafe(_passes(node, thr.value, thr.position))
        band = moved if band is None else band | moved
    return band


def _cut_nodes(node: Node) -> list[Node]:
    if node.kind in ("fraction", "random", "threshold"):
        return [node]
    return [n for child in node.children for n in _cut_nodes(child)]


def _passes(node: Node, value: float | None, n: int | None) -> Column:
    """Whether a row passes ``node`` cut at ``value`` (as :mod:`etl.rules` applies it)."""
    if node.kind == "random":
        if value is None:
            return F.lit(bool(n))
        return F.col(RAND) >= F.lit(float(value))
    column = F.col(node.column)
    return column.isNotNull() if value is None else column >= F.lit(float(value))


def with_rand(out: DataFrame, rule: Rule) -> DataFrame:
    """``out`` with the random cuts' hash column (when the rule has one)."""
    has = any(n.kind == "random" for p in rule.parts for n in _cut_nodes(p))
    return out.withColumn(RAND, rand_column(rule.seed)) if has else out


def _release(found: list[Changes]) -> None:
    for c in found:
        c.release()
