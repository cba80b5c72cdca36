"""Selection rules: DataComp baselines as a small composable language over scored pool rows.

Grammar (keywords ``and`` / ``or`` are case-sensitive; whitespace is ignored)::

    rule := orx      orx := andx ('or' andx)*      andx := atom ('and' atom)*
    atom := '(' orx ')' | NAME | NAME '(' arg (',' arg)* ')'      arg := number | NAME

Atoms: ``fraction(<score>, f)`` (DataComp's keep-fraction, :mod:`etl.cuts`),
``threshold(<score>, t)`` (score >= t), ``<alias>_fraction(f)`` / ``<alias>_threshold(t)`` for
each score alias, ``random(f)`` (exactly int(N * f) rows, by ``xxhash64(seed, uid)``),
``no_filter``, a filter name (Spark SQL predicate), a flag name (boolean expression) and a macro
name (rule text, expanded recursively). A bare name is a macro, else a filter, else a flag; a
macro naming itself (``text_based`` -> ``text_based``) means the filter / flag of that name. A
score argument is an alias or a column of the input. A null predicate, flag or score fails.

The top-level ``and`` chain (after macro expansion) is a list of *parts* applied in order; a
row's ``drop_reason`` is its ``pre_reason``, else the canonical text of the first part it fails.
Fractions count N over the rows reaching their top-level part (``fraction_of: remaining``) or
over the whole input (``pool``). A part may carry its own drop reason: ``select``'s preset
compiles to a rule whose score parts drop as ``unscorable`` (kind ``scored``: the score is not
null) and ``below-threshold`` (:func:`etl.select.preset_rule`).

Canonical text: names as written, numbers in Python's shortest float form without a trailing
``.0`` (``0.30`` -> ``0.3``, ``1.0`` -> ``1``), arguments joined by ``", "``, an ``or`` as
``(a or b)``, an ``and`` nested in an ``or`` as ``(a and b)``.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass, field

from pyspark.sql import Column, DataFrame
from pyspark.sql import functions as F

from etl.config import FRACTION_OF, ConfigError
from etl.cuts import SMALL, fraction_threshold, kth_largest
from etl.filters import DATACOMP_BASIC

PRESETS: dict[str, str] = {
    "no_filter": "no_filter",
    "basic": " and ".join(DATACOMP_BASIC),
    "laion2b": "clip_b32_threshold(0.28) and english",
    # DataComp: fastText English and a caption word whose first WordNet synset is an
    # ImageNet-21k class (udfs/wordnet.py, exactly)
    "text_based": "english and in_imagenet21k",
    # the same with a term list instead (targets.vocabulary: whole words, case-insensitive)
    "text_vocabulary": "english and in_vocabulary",
    # DataComp: its caption filter (English, > 1 word, > 5 characters), then the clusters
    "image_based": "english and two_words and caption_chars and in_target_cluster",
    "clip_and_image": "clip_fraction(0.3) and image_based",
}
FUNCTIONS = {"fraction": ("score", "f"), "threshold": ("score", "t"), "random": ("f",)}
RAND = "__rule_random"
READS = ("fraction", "threshold", "scored", "filter", "flag")  # leaf kinds that read a column
GRAMMAR = ("NAME, NAME(arg, ...) or (rule), joined by 'and' / 'or'; an arg is a number or a NAME")
_TOKEN = re.compile(r"\s*(?:(?P<num>[-+]?(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)?)"
                    r"|(?P<name>[A-Za-z_][A-Za-z0-9_.:-]*)|(?P<punct>[(),])|(?P<bad>\S))")


@dataclass
class RuleContext:
    """What rule names mean: score aliases, filters, flags, macros; fraction base and seed."""

    scores: dict[str, str] = field(default_factory=dict)  # alias -> column
    filters: dict[str, str] = field(default_factory=dict)  # name -> Spark SQL predicate
    flags: dict[str, str] = field(default_factory=dict)  # name -> boolean expression / column
    macros: dict[str, str] = field(default_factory=lambda: dict(PRESETS))  # name -> rule text
    fraction_of: str = "remaining"  # remaining | pool
    seed: int = 0

    def __post_init__(self) -> None:
        if self.fraction_of not in FRACTION_OF:
            raise ConfigError(f"fraction_of: {self.fraction_of!r} is not one of "
                              f"{', '.join(FRACTION_OF)}")


@dataclass
class PartResult:
    """One top-level part as applied; fraction/random parts carry their cut."""

    text: str
    kind: str  # fraction | threshold | filter | flag | random | or | all
    threshold: float | None = None
    n_scored: int | None = None  # N
    position: int | None = None  # fraction: n = int(N * f); random: rows kept
    inner: list[PartResult] = field(default_factory=list)  # cuts nested in an ``or``
    column: str | None = None  # the score column of a fraction / threshold part
    reason: str | None = None  # the drop_reason of rows it drops (default: ``text``)


@dataclass(frozen=True)
class Node:
    """A resolved rule node: a leaf (``column`` = score column or predicate) or and/or."""

    kind: str  # fraction | threshold | scored | filter | flag | random | all | and | or
    text: str
    column: str | None = None
    value: float | None = None
    children: tuple[Node, ...] = ()
    reason: str | None = None  # drop_reason of a top-level part when not its text

    @property
    def drop_reason(self) -> str:
        return self.reason or self.text


@dataclass(frozen=True)
class Rule:
    """A compiled selection: top-level parts applied in order, the fraction base, the seed."""

    parts: tuple[Node, ...]
    fraction_of: str = "remaining"
    seed: int = 0

    @property
    def reasons(self) -> list[str]:
        """The drop reasons of the parts, in the order they are assigned."""
        return [part.drop_reason for part in self.parts]

    def kinds(self) -> list[tuple[str, str]]:
        """``(drop reason, kind)`` of each part."""
        return [(part.drop_reason, part.kind) for part in self.parts]

    def columns(self) -> set[str]:
        """Score columns, flag expressions and filter predicates the rule reads."""
        return {leaf.column for part in self.parts for leaf in _leaves(part)
                if leaf.kind in READS and leaf.column}


# ---- parsing -----------------------------------------------------------------------------


def _tokens(text: str) -> list[tuple[str, str, int]]:
    """(kind, token, position) triples; kind is num, name, and, or, punct or end."""
    out: list[tuple[str, str, int]] = []
    for m in _TOKEN.finditer(text):
        kind = m.lastgroup or "end"
        tok, pos = m.group(kind), m.start(kind)
        if kind == "bad":
            raise _parse_error(text, pos, f"unexpected character {tok!r}")
        out.append((tok if kind == "name" and tok in ("and", "or") else kind, tok, pos))
    return [*out, ("end", "", len(text))]


def _parse_error(text: str, pos: int, what: str, allowed: str = GRAMMAR) -> ConfigError:
    where = "the end" if pos >= len(text) else f"position {pos}"
    return ConfigError(f"rule {text!r} at {where}: {what}\n  {text}\n  {' ' * pos}^\n"
                       f"allowed: {allowed}")


class _Parser:
    """Recursive descent over :func:`_tokens` into raw tuples (atom / and / or)."""

    def __init__(self, text: str) -> None:
        self.text, self.toks, self.i = text, _tokens(text), 0

    def peek(self) -> tuple[str, str, int]:
        return self.toks[self.i]

    def expect(self, kind: str, want: str, value: str | None = None) -> tuple[str, str, int]:
        tok = self.toks[self.i]
        if tok[0] != kind or (value is not None and tok[1] != value):
            got = f"found {tok[1]!r}" if tok[0] != "end" else "rule ends"
            raise _parse_error(self.text, tok[2], f"expected {want}, {got}")
        self.i += 1
        return tok

    def rule(self) -> tuple:
        tree = self.chain("or", self.andx)
        self.expect("end", "'and', 'or' or the end of the rule")
        return tree

    def chain(self, op: str, item: Callable[[], tuple]) -> tuple:
        items = [item()]
        while self.peek()[0] == op:
            self.i += 1
            items.append(item())
        return items[0] if len(items) == 1 else (op, items)

    def andx(self) -> tuple:
        return self.chain("and", self.atom)

    def atom(self) -> tuple:
        if self.peek()[1] == "(" and self.peek()[0] == "punct":
            self.i += 1
            inner = self.chain("or", self.andx)
            self.expect("punct", "')'", ")")
            return inner
        _, name, pos = self.expect("name", "a NAME or '('")
        if self.peek()[1] != "(":
            return ("atom", name, None, pos)
        self.i += 1
        args = [self.arg()]
        while self.peek()[1] == ",":
            self.i += 1
            args.append(self.arg())
        self.expect("punct", "',' or ')'", ")")
        return ("atom", name, args, pos)

    def arg(self) -> tuple[str, str]:
        kind, tok, pos = self.peek()
        if kind not in ("num", "name"):
            self.expect("num", "a number or a NAME argument")
        self.i += 1
        return kind, tok


# ---- resolving names -----------------------------------------------------------------------


def _num(value: float) -> str:
    text = repr(float(value))
    return text[:-2] if text.endswith(".0") else text


def _available(ctx: RuleContext) -> str:
    aliases = [f"{a}_fraction(f), {a}_threshold(t)" for a in ctx.scores]
    return (f"filters: {', '.join(ctx.filters) or '-'}; flags: {', '.join(ctx.flags) or '-'}; "
            f"score aliases: {', '.join(aliases) or '-'}; macros: {', '.join(ctx.macros) or '-'}; "
            "functions: fraction(score, f), threshold(score, t), random(f); no_filter")


def parse_rule(text: str, ctx: RuleContext, _stack: tuple[str, ...] = ()) -> Node:
    """Parse ``text`` and resolve every name against ``ctx`` (macros expanded)."""
    return _flat(_resolve(_Parser(text).rule(), text, ctx, _stack))


def _resolve(raw: tuple, text: str, ctx: RuleContext, stack: tuple[str, ...]) -> Node:
    if raw[0] in ("and", "or"):
        return Node(raw[0], "", children=tuple(_resolve(r, text, ctx, stack) for r in raw[1]))
    _, name, args, pos = raw
    if args is None:
        return _bare(name, text, pos, ctx, stack)
    return _call(name, args, text, pos, ctx)


def _bare(name: str, text: str, pos: int, ctx: RuleContext, stack: tuple[str, ...]) -> Node:
    if name in ctx.macros and name not in stack:
        try:
            return parse_rule(ctx.macros[name], ctx, (*stack, name))
        except ConfigError as exc:
            raise ConfigError(f"in macro {name!r}: {exc}") from None
    if name in ctx.filters:
        return Node("filter", name, ctx.filters[name])
    if name in ctx.flags:
        return Node("flag", name, ctx.flags[name])
    if name == "no_filter":
        return Node("all", name)
    if name in stack:
        raise ConfigError(f"macro cycle: {' -> '.join((*stack, name))} (a macro may name itself "
                          f"only to mean the filter or flag {name!r}, and there is none)")
    if name in FUNCTIONS or name.endswith(("_fraction", "_threshold")):
        raise _parse_error(text, pos, f"{name!r} needs arguments in parentheses")
    raise _parse_error(text, pos, f"unknown name {name!r}", _available(ctx))


def _call(name: str, args: list, text: str, pos: int, ctx: RuleContext) -> Node:
    alias, _, kind = name.rpartition("_")
    if name in FUNCTIONS:
        sig, kind, column = FUNCTIONS[name], name, None
    elif alias in ctx.scores and kind in ("fraction", "threshold"):
        sig, column = ("f" if kind == "fraction" else "t",), ctx.scores[alias]
    else:
        raise _parse_error(text, pos, f"unknown function {name!r}", _available(ctx))
    want = ", ".join(sig)
    kinds = tuple("name" if s == "score" else "num" for s in sig)
    if tuple(k for k, _ in args) != kinds:
        raise _parse_error(text, pos, f"{name} takes ({want}): score a NAME, f / t a number")
    value = float(args[-1][1])
    if "f" in sig and not 0 <= value <= 1:
        raise _parse_error(text, pos, f"{name}: fraction {args[-1][1]} is outside 0..1")
    if sig[0] == "score":
        column = ctx.scores.get(args[0][1], args[0][1])
    shown = ", ".join(tok if k == "name" else _num(float(tok)) for k, tok in args)
    return Node(kind, f"{name}({shown})", column, value)


def _flat(node: Node) -> Node:
    """Merge nested and-in-and / or-in-or and set and/or canonical texts."""
    if node.kind not in ("and", "or"):
        return node
    kids: list[Node] = []
    for child in map(_flat, node.children):
        kids.extend(child.children if child.kind == node.kind else [child])
    if len(kids) == 1:
        return kids[0]
    return Node(node.kind, f"({f' {node.kind} '.join(k.text for k in kids)})", children=tuple(kids))


def compile_rule(rule_text: str, ctx: RuleContext) -> Rule:
    """Parse ``rule_text`` against ``ctx`` into its top-level parts."""
    root = parse_rule(rule_text, ctx)
    parts = root.children if root.kind == "and" else (root,)
    return Rule(tuple(parts), ctx.fraction_of, ctx.seed)


def _leaves(node: Node) -> list[Node]:
    return [leaf for child in node.children for leaf in _leaves(child)] or [node]


def rule_parts(rule_text: str, ctx: RuleContext) -> list[str]:
    """Canonical texts of the top-level parts, in the order they assign drop reasons."""
    return compile_rule(rule_text, ctx).reasons


def rule_columns(rule_text: str, ctx: RuleContext) -> set[str]:
    """Score columns, flag expressions and filter predicates the rule reads."""
    return compile_rule(rule_text, ctx).columns()


# ---- evaluation ----------------------------------------------------------------------------


def _check_columns(pre: DataFrame, parts: tuple[Node, ...]) -> None:
    """Fail before any Spark job when a part reads a missing column or a bad predicate."""
    for part in parts:
        for leaf in _leaves(part):
            if leaf.kind in ("fraction", "threshold", "scored") and leaf.column not in pre.columns:
                raise ConfigError(f"rule part {part.text!r}: score column {leaf.column!r} is not "
                                  f"in the input; point the score alias at one that is "
                                  f"(select.scores.<alias>: a bronze column, "
                                  f"target_similarity or model:<model_id>). Columns: "
                                  f"{', '.join(pre.columns)}")
            if leaf.kind in ("filter", "flag"):
                try:
                    pre.select(F.expr(leaf.column).cast("boolean")).schema  # noqa: B018
                except Exception as exc:  # noqa: BLE001 - any analysis error is a config error
                    first = str(exc).strip().splitlines()[0][:300]
                    raise ConfigError(f"rule part {part.text!r}: {leaf.kind} {leaf.text!r} "
                                      f"({leaf.column!r}) does not resolve: {first}") from exc


def rand_column(seed: int) -> Column:
    """The hash a ``random(f)`` cut ranks rows by: ``xxhash64(seed, uid)`` as a double (the one
    definition; frozen selections apply recorded random cuts to it by value)."""
    return F.xxhash64(F.lit(seed), F.col("uid")).cast("double")


def _cut_columns(node: Node) -> list[str]:
    """The columns the fraction / random cuts inside ``node`` count over (none: no job)."""
    leaves = _leaves(node)
    cols = {leaf.column for leaf in leaves if leaf.kind == "fraction"}
    return sorted(cols | ({RAND} if any(leaf.kind == "random" for leaf in leaves) else set()))


def _cut(node: Node, base: DataFrame, small: int, res: PartResult) -> Column:
    """Fraction: DataComp's keep-fraction; random: exactly int(N * f) rows by hash."""
    if node.kind == "fraction":
        thr = fraction_threshold(base, node.column, node.value, small)
        res.threshold, res.n_scored, res.position = thr.value, thr.n_scored, thr.position
        score = F.col(node.column)
        return score.isNotNull() if thr.value is None else score >= F.lit(thr.value)
    res.n_scored = base.count()
    res.position = n = int(res.n_scored * node.value)
    if n == 0 or n >= res.n_scored:
        return F.lit(n > 0)
    res.threshold = kth_largest(base, RAND, n - 1, small, res.n_scored)  # n rows above
    return F.col(RAND) >= F.lit(res.threshold)


def _leaf(node: Node, base: DataFrame, small: int, res: PartResult) -> Column:
    """Whether a row passes one leaf (null when its input is null)."""
    if node.kind in ("fraction", "random"):
        return _cut(node, base, small, res)
    if node.kind == "threshold":
        res.threshold = node.value
        return F.col(node.column) >= F.lit(node.value)
    if node.kind == "scored":
        return F.col(node.column).isNotNull()
    if node.kind in ("filter", "flag"):
        return F.expr(node.column).cast("boolean")
    return F.lit(True)


def _compile(node: Node, base: DataFrame, small: int) -> tuple[Column, PartResult]:
    """(passes, result) of ``node``; fraction / random cuts are computed over ``base``."""
    res = PartResult(node.text, node.kind, reason=node.reason,
                     column=node.column if node.kind in ("fraction", "threshold") else None)
    if node.kind not in ("and", "or"):
        return F.coalesce(_leaf(node, base, small, res), F.lit(False)), res
    compiled = [_compile(child, base, small) for child in node.children]
    res.inner = [r for _, kid in compiled
                 for r in ([kid] if kid.kind in ("fraction", "random") else kid.inner)]
    passed = compiled[0][0]
    for col, _ in compiled[1:]:
        passed = (passed & col) if node.kind == "and" else (passed | col)
    return passed, res


def _compile_part(base: DataFrame, part: Node, small: int) -> tuple[Column, PartResult]:
    """:func:`_compile` of a top-level part; the columns its cuts count over are cached
    (narrow: the rows' other columns are read once, by the final write) while they run."""
    cols = _cut_columns(part)
    if not cols:
        return _compile(part, base, small)
    narrow = base.select(*cols).persist()
    try:
        return _compile(part, narrow, small)
    finally:
        narrow.unpersist()


def apply_rule(pre: DataFrame, rule: Rule | str, ctx: RuleContext | None = None,
               small: int = SMALL) -> tuple[DataFrame, list[PartResult]]:
    """Apply ``rule`` (a :class:`Rule`, or rule text resolved against ``ctx``) to ``pre``
    (uid, pre_reason, the columns the rule reads).

    Returns pre's columns without ``pre_reason`` plus ``drop_reason`` and ``kept``, and one
    :class:`PartResult` per top-level part. Runs Spark jobs for each fraction / random part.
    """
    if isinstance(rule, str):
        rule = compile_rule(rule, ctx or RuleContext())
    _check_columns(pre, rule.parts)
    df = pre if "pre_reason" in pre.columns else pre.withColumn("pre_reason", F.lit(None))
    if any(leaf.kind == "random" for part in rule.parts for leaf in _leaves(part)):
        df = df.withColumn(RAND, rand_column(rule.seed))
    reason: Column = F.col("pre_reason").cast("string")
    alive: Column = F.col("pre_reason").isNull()
    results: list[PartResult] = []
    for part in rule.parts:
        base = df if rule.fraction_of == "pool" else df.where(alive)
        passed, res = _compile_part(base, part, small)
        reason = F.coalesce(reason, F.when(~passed, F.lit(part.drop_reason)))
        alive = alive & passed
        results.append(res)
    out = df.withColumn("drop_reason", reason).withColumn("kept", F.col("drop_reason").isNull())
    return out.drop("pre_reason", RAND), results
