# Databricks notebook source
# MAGIC %md
# MAGIC # 05 · Run report
# MAGIC One HTML page for the current `gold_selection`: the funnel with drop reasons, the score
# MAGIC histogram with the threshold, thumbnails just above and below the threshold, detected
# MAGIC duplicates and eval leaks, precision/recall per drop reason (sample labels), the Delta
# MAGIC table versions and the config. Shown inline on Databricks; written to `out`
# MAGIC (default `<lakehouse.root>/report`) everywhere.
# MAGIC
# MAGIC Parameters: `conf`, `overrides`, `run_id` (see 01_ingest), `out`, `examples`.

# COMMAND ----------

from etl.jobs import report
from etl.notebook import context, job_argv, show_html, widget

out = widget("out", "")
examples = widget("examples", "8")
base = job_argv(widget("conf", "conf/local.yaml"), widget("overrides", ""), widget("run_id", ""))
argv = [*base, "--examples", examples, *(["--out", out] if out else [])]

# COMMAND ----------

page = report.main(argv)

# COMMAND ----------

if not show_html(context(base).lake.store.read_bytes(page).decode("utf-8")):
    print(f"open {page} in a browser")
