# Databricks notebook source
# MAGIC %md
# MAGIC # 00 · End to end
# MAGIC The whole pipeline, as `dfn-curate run`: ingest → score → dedup → select → export, then the
# MAGIC run report. Each step is idempotent, so re-running skips what is already done (ingest
# MAGIC inserts only new uids, score scores only unscored pairs).
# MAGIC
# MAGIC Parameters: `conf`, `overrides`, `run_id` (see 01_ingest), `steps` (comma-separated subset
# MAGIC of ingest,score,dedup,targets,select,export), `out` (report folder), `wheel` (a project
# MAGIC wheel to install first: serverless notebook jobs take no cluster libraries).

# COMMAND ----------

# Bootstrap, before anything imports etl: install the `wheel` widget's wheel when given.
try:
    dbutils.widgets.text("wheel", "")  # noqa: F821 - Databricks' notebook global
    _wheel = dbutils.widgets.get("wheel")  # noqa: F821
except NameError:  # not on Databricks: the project is installed already
    _wheel = ""
if _wheel:
    import subprocess
    import sys

    subprocess.check_call([sys.executable, "-m", "pip", "install", "-q", _wheel])

# COMMAND ----------

from etl.jobs import report, run
from etl.notebook import context, job_argv, show_html, widget
from etl.report import selection_funnel
from etl.steps import PIPELINE

steps = widget("steps", ",".join(PIPELINE))
out = widget("out", "")
argv = job_argv(widget("conf", "conf/local.yaml"), widget("overrides", ""), widget("run_id", ""))
ctx = context(argv)

# COMMAND ----------

results = run.main([*argv, "--steps", steps])

# COMMAND ----------

selection_funnel(ctx.lake, ctx.cfg).print()

# COMMAND ----------

page = report.main([*argv, *(["--out", out] if out else [])])
if not show_html(ctx.lake.store.read_bytes(page).decode("utf-8")):
    print(f"open {page} in a browser")
