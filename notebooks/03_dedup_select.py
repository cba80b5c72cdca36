# Databricks notebook source
# MAGIC %md
# MAGIC # 03 · Dedup and select
# MAGIC Flags exact and near duplicates and eval-set leaks (`silver_dedup`), computes the target
# MAGIC signals when `select.rule` reads them (`silver_targets`), then applies the basic filters
# MAGIC and the score threshold, or the selection rule: `gold_selection` holds every pool uid
# MAGIC once with `kept` and the first `drop_reason`. With the sample pool's labels, precision
# MAGIC and recall per drop reason are printed too.
# MAGIC
# MAGIC Parameters: `conf`, `overrides`, `run_id` (see 01_ingest).

# COMMAND ----------

from etl.jobs import dedup, select_pairs, targets
from etl.notebook import context, job_argv, show, widget
from etl.report import dedup_summary, selection_funnel
from etl.select import needs_targets

argv = job_argv(widget("conf", "conf/local.yaml"), widget("overrides", ""), widget("run_id", ""))
ctx = context(argv)

# COMMAND ----------

dedup.main(argv)
show(dedup_summary(ctx.lake))

# COMMAND ----------

if needs_targets(ctx.cfg.select):
    targets.main(argv)

# COMMAND ----------

select_pairs.main(argv)

# COMMAND ----------

funnel = selection_funnel(ctx.lake, ctx.cfg)
funnel.print()
