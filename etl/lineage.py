"""Lineage: which derived tables each pipeline step reads, declared once.

A derived table records the source version it was built from (:meth:`Lakehouse.record_built`,
per the table registry in :mod:`etl.tables`). Before a step runs, the step runner
(:mod:`etl.steps`) asks :func:`require_fresh` whether every input the step reads under the
current config still covers bronze, and refuses a stale one with :class:`StaleTableError`,
naming the step that rebuilds it; ``dfn-curate run`` rebuilds it instead
(:func:`stale_inputs`, in :data:`INPUTS` order).

An input that does not exist is never stale here: the step itself says what is missing.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from etl.config import Config, ConfigError
from etl.tables import (
    DEDUP,
    SELECTION,
    SILVER,
    TARGETS,
    Lakehouse,
    table_info,
)


class StaleTableError(ConfigError):
    """A derived table was built from an older version of its source than the current one.

    ``step`` is the pipeline step that rebuilds it (``dfn-curate run`` runs it itself)."""

    def __init__(self, table: str, source: str, built: int, current: int, step: str,
                 needed_by: str):
        self.table, self.source, self.built, self.current = table, source, built, current
        self.step = step
        super().__init__(
            f"{needed_by}: {table} is stale: it was built from {source} version {built}, but "
            f"{source} is now at version {current} (rows were added or changed since). Run "
            f"`dfn-curate {step}` first (then `dfn-curate {needed_by}`), or `dfn-curate run "
            f"--steps {needed_by}`, which re-runs stale steps itself")


def stale_table(lake: Lakehouse, table: str, needed_by: str,
                model_id: str | None = None) -> StaleTableError | None:
    """The error to raise when registered ``table`` (of ``model_id``, for a per-model table)
    no longer covers its source (:meth:`Lakehouse.record_built`); None when it does, or when
    no version was recorded (said on stdout: it cannot be checked)."""
    info = table_info(table)
    source, command = info.source, info.step
    built = lake.built_from(info.stats_step, info.version_metric(model_id))
    if built is None:
        print(f"{needed_by}: {table} has no recorded {source} version (built before "
              f"versions were recorded); cannot tell whether it covers {source}. Run "
              f"`dfn-curate {command}` to record it")
        return None
    if not lake.data_changed_since(source, built):
        return None
    return StaleTableError(table, source, built, lake.version(source), command, needed_by)


Condition = Callable[[Lakehouse, Config], bool]
ModelOf = Callable[[Lakehouse, Config], str]


@dataclass(frozen=True)
class Input:
    """A derived table a step reads: ``when`` it reads it under a config, and for a per-model
    table (``silver_scores``) whose model's recorded version counts (``model``)."""

    table: str
    when: Condition
    model: ModelOf | None = None

    @property
    def step(self) -> str:
        """The step that (re)builds the table."""
        return table_info(self.table).step


def always(lake: Lakehouse, cfg: Config) -> bool:
    """The step reads this input under every config."""
    return True


def select_reads_scores(lake: Lakehouse, cfg: Config) -> bool:
    """select reads the selection model's silver score (:func:`etl.select.needs_scores`)."""
    from etl.select import needs_scores

    return needs_scores(cfg.select)


def select_reads_targets(lake: Lakehouse, cfg: Config) -> bool:
    """select reads ``silver_targets`` (:func:`etl.select.needs_targets`)."""
    from etl.select import needs_targets

    return needs_targets(cfg.select)


def dedup_reads_scores(lake: Lakehouse, cfg: Config) -> bool:
    """dedup reads the selection model's silver rows: its score (to keep the best-scored copy,
    when ``select.score_column`` is the model score) or its image embeddings (signal
    ``model``)."""
    conf = cfg.dedup
    embeddings = "model" in conf.near_signals and (conf.near or conf.decontaminate)
    return cfg.select.score_column == "score" or embeddings


def selection_model(lake: Lakehouse, cfg: Config) -> str:
    """The selection model (:func:`etl.silver.selection_model_id`)."""
    from etl.silver import selection_model_id

    return selection_model_id(lake, cfg)


def target_model(lake: Lakehouse, cfg: Config) -> str:
    """The model whose image embeddings targets clusters: ``targets.model_id``, else the
    selection model."""
    return cfg.targets.model_id or selection_model(lake, cfg)


# step -> the derived tables it reads, in the order their steps run
INPUTS: dict[str, tuple[Input, ...]] = {
    "dedup": (Input(SILVER, dedup_reads_scores, selection_model),),
    "targets": (Input(SILVER, always, target_model),),
    "select": (Input(SILVER, select_reads_scores, selection_model),
               Input(DEDUP, always),
               Input(TARGETS, select_reads_targets)),
    "export": (Input(SELECTION, always),),
}


def upstream(step: str) -> list[str]:
    """Every step whose table ``step`` may read, directly or through others, in run order."""
    found: list[str] = []
    for inp in INPUTS.get(step, ()):
        for name in [*upstream(inp.step), inp.step]:
            if name not in found:
                found.append(name)
    return found


def inputs(lake: Lakehouse, cfg: Config, step: str) -> list[Input]:
    """The inputs ``step`` reads under ``cfg`` that exist now."""
    return [i for i in INPUTS.get(step, ()) if lake.exists(i.table) and i.when(lake, cfg)]


def stale_inputs(lake: Lakehouse, cfg: Config, step: str) -> list[StaleTableError]:
    """The inputs of ``step`` that no longer cover their source, in :data:`INPUTS` order."""
    found = []
    for inp in inputs(lake, cfg, step):
        model = inp.model(lake, cfg) if inp.model is not None else None
        error = stale_table(lake, inp.table, step, model)
        if error is not None:
            found.append(error)
    return found


def require_fresh(lake: Lakehouse, cfg: Config, step: str) -> None:
    """Raise the first of :func:`stale_inputs` (:class:`StaleTableError`), if any."""
    stale = stale_inputs(lake, cfg, step)
    if stale:
        raise stale[0]
