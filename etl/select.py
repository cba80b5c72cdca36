"""Selection: dedup flags + one selection rule -> ``gold_selection``.

Every pool uid gets exactly one row with ``kept`` and the *first* ``drop_reason``:

1. ``eval-leak``        near/exact copy of an evaluation image (``silver_dedup.eval_match``);
2. ``duplicate``        exact duplicate (sha256, url+text, url) of a canonical row;
3. ``near-duplicate``   near duplicate by image embedding / thumbnail;
4. the first part of the selection rule the row fails (:mod:`etl.rules`).

There is one selection engine, the rule. ``select.rule`` is a rule text; without it the preset,
``select.filters`` and ``min_score`` / ``keep_fraction`` compile to a rule (:func:`preset_rule`)
whose parts are each basic filter by name (the preset's first, then ``select.filters``), then
``unscorable`` (no score) and ``below-threshold`` (the score cut), when a cut is configured.
Cut semantics (DataComp's keep-fraction, ``fraction_of``) are :mod:`etl.cuts`.

A selection reads only what its rule names: the selection model's silver scores only when a part
reads ``score`` (:func:`needs_scores`), ``silver_targets`` only for the target signals
(:func:`needs_targets`). Freshness of those inputs is checked by the step runner
(:mod:`etl.lineage`) before ``select`` runs.

``select.mode``: ``recompute`` (default) resolves every cut over the whole pool, exactly as a
from-scratch run; ``frozen`` keeps the cuts the last selection recorded (``dfn.select.cuts``,
:func:`frozen_rule`), as DataComp's ``--threshold``: each fraction / random cut becomes a fixed
threshold applied by value, so new rows enter by value and a kept row leaves only by dedup or
takedown. Either way ``gold_selection`` is written by :func:`etl.tablesync.sync`: one MERGE of
the rows that are new or whose columns changed (an append when all are new), and no commit when
none did; only the rows whose inputs changed or that a moved cut passed are compared, when
:mod:`etl.selectinc` can tell them.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import replace

import pandas as pd
from pyspark import StorageLevel
from pyspark.sql import Column, DataFrame
from pyspark.sql import functions as F

from etl.changefeed import enable_feed, key_side
from etl.config import Config, SelectConf
from etl.cuts import SMALL, Threshold
from etl.filters import DATACOMP_BASIC, add_derived, configured_filters
from etl.funnel import Funnel
from etl.provenance import CUTS_PROPERTY, record_selection
from etl.rules import (
    RAND,
    Node,
    PartResult,
    Rule,
    RuleContext,
    apply_rule,
    compile_rule,
    rand_column,
)
from etl.selectinc import (
    INPUT_TABLES,
    INPUTS_PROPERTY,
    changed_rows,
    fingerprint,
    input_versions,
    inputs_record,
    known_absent,
    with_rand,
)
from etl.silver import alias_scores, scored_pool, selection_model_id
from etl.tables import BRONZE, DEDUP, SELECTION, Lakehouse
from etl.tablesync import same_shape, sync
from etl.work import work

DEDUP_REASONS = ["eval-leak", "duplicate", "near-duplicate"]
FLAGS = {"in_target_cluster": "in_target_cluster", "in_vocabulary": "caption_in_vocab",
         "in_imagenet21k": "caption_in21k"}
TARGET_COLUMNS = ("in_target_cluster", "target_similarity")
DEDUP_COLUMNS = ["dup_of", "dup_reason", "dup_similarity", "eval_match", "eval_similarity"]
UNSCORABLE = "unscorable"
BELOW = "below-threshold"


# ---- the rule a configuration selects with ---------------------------------------------------


def rule_context(conf: SelectConf) -> RuleContext:
    """What ``select.rule``'s names mean: ``dfn`` = the selection model's score, each
    ``select.scores`` alias (a ``model:<id>`` alias reads column ``score_<alias>``), the
    configured filters (DataComp's basic filters and ``two_words`` always by name), and the
    flags ``in_target_cluster`` (silver_targets), ``in_vocabulary`` (``targets.vocabulary``) and
    ``in_imagenet21k`` (DataComp's text-based predicate: :mod:`udfs.wordnet`)."""
    scores = {"dfn": "score", **{a: _alias_column(a, src) for a, src in conf.scores.items()}}
    filters = {**DATACOMP_BASIC, "two_words": "caption_words > 1", **configured_filters(conf)}
    return RuleContext(scores=scores, filters=filters, flags=dict(FLAGS),
                       fraction_of=conf.fraction_of, seed=conf.seed)


def _alias_column(alias: str, source: str) -> str:
    return f"score_{alias}" if source.startswith("model:") else source


def preset_rule(conf: SelectConf) -> Rule:
    """``select.preset`` + ``select.filters`` + ``min_score`` / ``keep_fraction`` as a rule:
    each filter by name, then ``unscorable`` and ``below-threshold`` when a cut is set."""
    parts = [Node("filter", name, pred) for name, pred in configured_filters(conf).items()]
    if conf.min_score is not None:
        cut = Node("threshold", "min_score", "score", conf.min_score, reason=BELOW)
    elif conf.keep_fraction is not None:
        cut = Node("fraction", "keep_fraction", "score", conf.keep_fraction, reason=BELOW)
    else:
        cut = None
    if cut is not None:
        parts += [Node("scored", "scored(score)", "score", reason=UNSCORABLE), cut]
    return Rule(tuple(parts), conf.fraction_of, conf.seed)


def selection_rule(conf: SelectConf) -> Rule:
    """The configured selection as one compiled rule."""
    return compile_rule(conf.rule, rule_context(conf)) if conf.rule else preset_rule(conf)


def selection_reasons(conf: SelectConf) -> list[str]:
    """The drop reasons of the configured selection, in the order they are assigned."""
    return [*DEDUP_REASONS, *selection_rule(conf).reasons]


def selection_parts(conf: SelectConf) -> list[tuple[str, str]]:
    """``(drop reason, kind)`` of every reason the selection assigns, in order (dedup
    reasons have kind ``dedup``)."""
    return [*((r, "dedup") for r in DEDUP_REASONS), *selection_rule(conf).kinds()]


def needs_scores(conf: SelectConf) -> bool:
    """True when the selection reads the selection model's silver score: its rule reads
    ``score`` and ``select.score_column`` is the model score, not a bronze column."""
    return conf.score_column == "score" and "score" in selection_rule(conf).columns()


def needs_targets(conf: SelectConf) -> bool:
    """True when the selection reads ``silver_targets`` (image_based, a targeted score)."""
    return bool(selection_rule(conf).columns() & set(TARGET_COLUMNS))


# ---- DataFrame -> DataFrame ------------------------------------------------------------------


def with_dedup(pool: DataFrame, dedup: DataFrame | None) -> DataFrame:
    """Pool rows with the dedup columns (null without ``dedup``) and ``pre_reason``: the
    first of eval-leak, duplicate, near-duplicate."""
    df = pool
    if dedup is not None:
        df = df.drop(*[c for c in DEDUP_COLUMNS if c in df.columns]).join(
            dedup.select("uid", *[c for c in DEDUP_COLUMNS if c in dedup.columns]), "uid", "left")
    for name in DEDUP_COLUMNS:
        if name not in df.columns:
            df = df.withColumn(name, F.lit(None).cast("double" if "similarity" in name else "string"))
    reason = (F.when(F.col("eval_match").isNotNull(), "eval-leak")
              .when(F.col("dup_reason").startswith("exact"), "duplicate")
              .when(F.col("dup_reason").startswith("near"), "near-duplicate"))
    return df.withColumn("pre_reason", reason)


def rule_pre(pool: DataFrame, dedup: DataFrame | None, rule: Rule) -> DataFrame:
    """Pool rows with the derived columns ``rule`` reads and the dedup ``pre_reason``."""
    used = {f"_{i}": c for i, c in enumerate(sorted(rule.columns()))}
    return with_dedup(add_derived(pool, used), dedup)


def apply_selection(pre: DataFrame, rule: Rule,
                    small: int = SMALL) -> tuple[DataFrame, list[PartResult]]:
    """``rule`` over :func:`rule_pre` rows: ``(selection, one PartResult per part)``. The
    ``threshold`` column is the cut of the first part on the selection model's score."""
    out, parts = apply_rule(pre, rule, small=small)
    cut = next((p.threshold for p in parts if p.column == "score"), None)
    return out.withColumn("threshold", F.lit(cut).cast("double")), parts


def select_pairs(pool: DataFrame, dedup: DataFrame | None, conf: SelectConf,
                 small: int = SMALL) -> DataFrame:
    """The whole selection as one DataFrame -> DataFrame step (``pool`` needs ``score`` and
    the columns the selection's rule reads)."""
    rule = selection_rule(conf)
    return apply_selection(rule_pre(pool, dedup, rule), rule, small)[0]


def cuts_of(parts: list[PartResult]) -> dict[str, Threshold]:
    """Each score / random cut of a selection by its part text (nested ones included)."""
    flat = [q for p in parts for q in (p, *p.inner)]
    return {p.text: Threshold(p.kind, p.threshold, p.n_scored, p.position) for p in flat
            if p.kind in ("fraction", "threshold", "random")}


def cut_stats(cuts: dict[str, Threshold]) -> dict[str, int]:
    """The run-stats metrics of the cuts: N and n of each fraction."""
    stats: dict[str, int] = {}
    for name, thr in cuts.items():
        if thr.n_scored is not None:
            stats.update({f"threshold_N[{name}]": thr.n_scored,
                          f"threshold_n[{name}]": thr.position})
    return stats


def frozen_rule(rule: Rule, recorded: dict[str, dict],
                basis: dict[str, dict] | None = None) -> tuple[Rule, list[str]]:
    """``rule`` with each fraction / random cut that ``recorded`` (the ``dfn.select.cuts``
    property: part text -> kind, value, N, n and its basis) holds replaced by a fixed threshold
    on the same column, keeping the part's text and drop reason; also the texts of the cuts not
    recorded (they are resolved afresh). A cut counts as recorded only when it was resolved
    over rows (N > 0; a random cut also kept some, n > 0) and, given ``basis`` (text -> what
    the cut reads: :func:`cut_basis`), every basis entry matches the recorded one: a cut of
    another score, model, ``fraction_of`` or seed is resolved again. A fraction recorded
    without a value keeps every scored row; a random cut reads its hash column
    (:data:`etl.rules.RAND`)."""
    missing: list[str] = []

    def usable(text: str) -> bool:
        got = recorded.get(text)
        if got is None or not got.get("N") or (got.get("kind") == "random" and not got.get("n")):
            return False
        want = (basis or {}).get(text, {})
        return all(got.get(k) == v for k, v in want.items())

    def freeze(node: Node) -> Node:
        if node.children:
            return replace(node, children=tuple(freeze(c) for c in node.children))
        if node.kind not in ("fraction", "random"):
            return node
        if not usable(node.text):
            missing.append(node.text)
            return node
        value = recorded[node.text].get("value")
        if node.kind == "fraction":
            return (Node("scored", node.text, node.column, reason=node.reason) if value is None
                    else Node("threshold", node.text, node.column, value, reason=node.reason))
        return Node("threshold", node.text, RAND,  # value None: random kept all (n > 0)
                    float("-inf") if value is None else float(value), reason=node.reason)

    return replace(rule, parts=tuple(freeze(p) for p in rule.parts)), missing


def cut_basis(lake: Lakehouse, cfg: Config, rule: Rule) -> dict[str, dict]:
    """What each fraction / random cut of ``rule`` is resolved over, by part text: the column,
    its source (``model:<id>`` for a model score, else the bronze / derived column),
    ``fraction_of`` and (random) the seed. Recorded with the cut; a frozen selection re-resolves
    a cut whose basis changed."""
    conf = cfg.select
    sources = {_alias_column(a, src): src for a, src in conf.scores.items()}
    if needs_scores(conf):
        sources["score"] = f"model:{selection_model_id(lake, cfg)}"
    out: dict[str, dict] = {}

    def visit(node: Node) -> None:
        for child in node.children:
            visit(child)
        if node.kind == "fraction":
            out[node.text] = {"column": node.column, "fraction_of": rule.fraction_of,
                              "source": sources.get(node.column, node.column)}
        elif node.kind == "random":
            out[node.text] = {"column": RAND, "fraction_of": rule.fraction_of,
                              "seed": rule.seed}

    for part in rule.parts:
        visit(part)
    return out


def cut_texts(node: Node) -> set[str]:
    """The texts of the fraction / random cuts in ``node`` (nested ones included)."""
    if node.kind in ("fraction", "random"):
        return {node.text}
    return {t for child in node.children for t in cut_texts(child)}


def recorded_cuts(properties: dict[str, str]) -> dict[str, dict] | None:
    """The cuts the last selection recorded (``properties``: ``gold_selection``'s; None: no
    selection, or one written before cuts were recorded)."""
    text = properties.get(CUTS_PROPERTY)
    return json.loads(text) if text else None


def cut_lines(cuts: dict[str, Threshold]) -> list[str]:
    """One printed line per cut."""
    return [f"threshold: {name} -> keep >= {thr.value}"
            + (f" (N={thr.n_scored}, n={thr.position})" if thr.n_scored is not None else "")
            for name, thr in cuts.items()]


# ---- edges: lakehouse reads and writes ---------------------------------------------------


def selection_pool(lake: Lakehouse, cfg: Config, bronze: DataFrame | None = None) -> DataFrame:
    """Bronze pairs (``bronze``: these of its rows) with what the selection's rule reads: the
    selection model's ``score`` (only when a part reads it), ``model:<id>`` aliases' scores,
    ``silver_targets`` columns, ``caption_in_vocab``, ``caption_in21k``."""
    conf = cfg.select
    cols = selection_rule(conf).columns()
    pool = scored_pool(lake, cfg, with_scores=needs_scores(conf), bronze=bronze)
    for alias, src in conf.scores.items():
        if src.startswith("model:") and _alias_column(alias, src) in cols:
            pool = pool.join(alias_scores(lake, src[len("model:"):], _alias_column(alias, src)),
                             "uid", "left")
    if cols & set(TARGET_COLUMNS):
        from etl.targets import target_columns

        pool = pool.join(target_columns(lake, cfg), "uid", "left")
    if "caption_in_vocab" in cols:
        from etl.targets import in_vocabulary, vocabulary_terms

        terms = vocabulary_terms(cfg.targets.vocabulary, lake)
        pool = pool.withColumn("caption_in_vocab", in_vocabulary(F.col("text"), terms))
    if "caption_in21k" in cols:
        pool = pool.withColumn("caption_in21k", in_imagenet21k(F.col("text")))
    return pool


def in_imagenet21k(text: Column) -> Column:
    """DataComp's text-based predicate per caption, on the executors (WordNet loaded once per
    Python worker); null for a null caption."""
    from pyspark.sql.functions import pandas_udf

    def contains(texts: pd.Series) -> pd.Series:
        from udfs.wordnet import contains_entity_series

        return contains_entity_series(texts)

    return pandas_udf(contains, "boolean")(text)


def run_select(lake: Lakehouse, cfg: Config, run_id: str) -> dict[str, int]:
    """Edge: bronze + silver scores + silver_dedup (+ silver_targets) -> ``gold_selection``
    (merged: only changed rows are written; only the rows that can have changed are compared,
    when :func:`etl.selectinc.changed_rows` can tell them); prints the funnel and the cuts,
    records them, the input versions it read and the configuration it ran under.
    ``select.mode: frozen`` keeps the recorded cuts."""
    versions = input_versions(lake)
    dedup = lake.read(DEDUP) if lake.exists(DEDUP) else None
    if dedup is None:
        print("select: no silver_dedup table; run `dfn-curate dedup` to drop duplicates")
    rule = selection_rule(cfg.select)
    pre = rule_pre(selection_pool(lake, cfg), dedup, rule)
    recorded, applied, basis = None, rule, cut_basis(lake, cfg, rule)
    existed = lake.exists(SELECTION)
    props = lake.properties(SELECTION) if existed else {}
    if cfg.select.mode == "frozen":
        recorded = recorded_cuts(props)
        if recorded is not None:  # only the cuts this rule makes (the rule may have changed)
            texts = {t for part in rule.parts for t in cut_texts(part)}
            recorded = {k: v for k, v in recorded.items() if k in texts}
        if recorded is None:
            print("select: mode frozen: no recorded cuts (no earlier selection); resolving "
                  "them over the pool, as recompute, and recording them")
        else:
            applied, missing = frozen_rule(rule, recorded, basis)
            recorded = {k: v for k, v in recorded.items() if k not in missing}
            pre = pre.withColumn(RAND, rand_column(rule.seed))
            for text in missing:
                print(f"select: mode frozen: no usable recorded cut for {text!r} "
                      "(none, resolved over no rows, or over another score, model, "
                      "fraction_of or seed); resolving it")
    out, parts = apply_selection(pre, applied)
    cuts = cuts_of(parts)
    if recorded:  # frozen: the recorded cuts stand; only cuts it lacked were resolved now
        cuts = {k: v for k, v in cuts.items() if k not in recorded}
        cuts.update({k: Threshold(v["kind"], v["value"], v.get("N"), v.get("n"))
                     for k, v in recorded.items()})
    cuts = {k: replace(v, basis=basis.get(k)) for k, v in cuts.items()}
    fp = fingerprint(cfg, rule, basis)
    changes = write_selection(lake, out, rule, cuts, props, fp, versions,
                              appended_selection(lake, cfg, dedup, rule, applied, cuts))
    funnel = Funnel.of(lake.read(SELECTION), selection_reasons(cfg.select))
    funnel.print()
    changes.setdefault("rows_compared", funnel.pool)
    for name, line in zip(cuts, cut_lines(cuts), strict=True):
        print(line + (" (frozen)" if recorded and name in recorded else ""))
    print("select: gold_selection " + ", ".join(f"{k} {v}" for k, v in changes.items()))
    record_selection(lake, " and ".join(p.text for p in rule.parts), cuts,
                     next((p.threshold for p in parts if p.column == "score"), None),
                     {INPUTS_PROPERTY: inputs_record(lake, fp, versions, props)}, props)
    touched = sum(changes[k] for k in ("rows_new", "rows_updated", "rows_removed",
                                       "rows_rewritten"))
    new = changes["rows_new"] if existed else changes["rows_rewritten"]
    metrics = {**funnel.metrics(), **changes, **work(new, touched, funnel.pool)}
    lake.record_stats(run_id, "select", {**metrics, **cut_stats(cuts)},
                      built=(SELECTION, versions[BRONZE]))
    return metrics


def appended_selection(lake: Lakehouse, cfg: Config, dedup: DataFrame | None, rule: Rule,
                       applied: Rule, cuts: dict[str, Threshold]
                       ) -> Callable[[DataFrame], DataFrame | None]:
    """The selection of some bronze rows (those a feed says were appended) as the pool's
    selection decides them: ``applied`` with every cut fixed at the value ``cuts`` resolved
    over the pool (cuts are applied by value); None when a cut has no value to fix (resolved
    over no rows)."""
    fixed, missing = frozen_rule(applied, {t: c.record() for t, c in cuts.items()})

    def make(bronze: DataFrame) -> DataFrame | None:
        if missing:
            return None
        pre = with_rand(rule_pre(selection_pool(lake, cfg, bronze=bronze), dedup, rule), rule)
        return apply_selection(pre, fixed)[0]

    return make


def write_selection(lake: Lakehouse, out: DataFrame, rule: Rule, cuts: dict[str, Threshold],
                    props: dict[str, str], fp: str, versions: dict[str, int | None],
                    appended_out: Callable[[DataFrame], DataFrame | None] | None = None
                    ) -> dict[str, int]:
    """Merge the new selection ``out`` (read from input ``versions``) into ``gold_selection``:
    only the rows that can have changed are compared when that can be told
    (``rows_compared``; rows new to bronze made from its feed by ``appended_out``), else
    every row."""
    # the per-row threshold moves whenever a fraction cut's pool grows: left out of the
    # comparison, so only rows whose decision (or data) changed are rewritten
    compare = [c for c in out.columns if c not in ("uid", "threshold")]
    watch = ("kept", "drop_reason")
    narrowed = (changed_rows(lake, out, rule, cuts, props, fp, versions, appended_out)
                if props and same_shape(lake, out, SELECTION) else None)
    if not isinstance(narrowed, tuple):
        if narrowed is not None:
            print(f"select: comparing every row ({narrowed})")
            for table in INPUT_TABLES:  # a table made before it recorded changes does now
                if lake.exists(table):
                    enable_feed(lake, table)
        return sync(lake, out, SELECTION, watch=watch, compare=compare)  # compared: the pool
    rows, feeds = narrowed
    rows = rows.persist(StorageLevel.MEMORY_AND_DISK)
    try:
        compared = rows.count()
        print(f"select: comparing {compared} rows (inputs changed since the last selection, "
              "or a cut moved past them)")
        changes = sync(lake, rows, SELECTION, watch=watch, compare=compare,
                       within=key_side(rows.select("uid"), compared),
                       absent=known_absent(lake, props, feeds))
        return {**changes, "rows_compared": compared}
    finally:
        rows.unpersist()
        for feed in feeds:
            feed.release()
