"""Notebook helpers: parameters from Databricks widgets, with a local fallback.

The notebooks under ``notebooks/`` run unchanged on Databricks and as plain Python files
(``python notebooks/01_ingest.py``): on Databricks a parameter is a ``dbutils.widgets`` text
widget; elsewhere it is the environment variable ``DFN_<NAME>`` (e.g. ``DFN_CONF``), else the
default.
"""

from __future__ import annotations

import os
import re
import sys
from typing import Any

from etl.config import resolve_path


def _notebook_global(name: str) -> Any:
    """``name`` from the calling notebook's globals or the IPython user namespace, else None."""
    frame = sys._getframe(1)
    while frame is not None and frame.f_globals.get("__name__") == __name__:
        frame = frame.f_back
    if frame is not None and name in frame.f_globals:
        return frame.f_globals[name]
    try:
        from IPython import get_ipython
    except ImportError:
        return None
    shell = get_ipython()
    return shell.user_ns.get(name) if shell is not None else None


def widget(name: str, default: str = "") -> str:
    """A notebook parameter: Databricks widget, else ``DFN_<NAME>`` env var, else ``default``."""
    dbutils = _notebook_global("dbutils")
    if dbutils is not None:
        dbutils.widgets.text(name, default)
        return dbutils.widgets.get(name)
    return os.environ.get(f"DFN_{name.upper()}", default)


def split_overrides(text: str) -> list[str]:
    """``key=value`` overrides from a widget: one per line or separated by ``;``."""
    return [item.strip() for item in re.split(r"[;\n]", text or "") if item.strip()]


def job_argv(conf: str, overrides: str = "", run_id: str = "", *extra: str) -> list[str]:
    """argv for a job ``main``: ``--conf`` (resolved against the project root) and ``--set``s."""
    argv = ["--conf", str(resolve_path(conf))] if conf else []
    for item in split_overrides(overrides):
        argv += ["--set", item]
    if run_id:
        argv += ["--run-id", run_id]
    return argv + list(extra)


def show(obj: Any, n: int = 20) -> None:
    """Databricks ``display`` when available, else ``DataFrame.show`` / ``print``."""
    display = _notebook_global("display")
    if display is not None:
        display(obj)
    elif hasattr(obj, "show"):
        obj.show(n, truncate=60)
    else:
        print(obj)


def show_html(html: str) -> bool:
    """Render ``html`` inline on Databricks (``displayHTML``); False when not in a notebook."""
    display_html = _notebook_global("displayHTML")
    if display_html is None:
        return False
    display_html(html)
    return True


def context(argv: list[str]):
    """``etl.jobs.common.JobContext`` (cfg, spark, lake) for ``argv``, as a job would get it."""
    from etl.jobs.common import parser, start

    return start(parser("notebook", "notebook parameters"), argv)
