# Databricks notebook source
# MAGIC %md
# MAGIC # 03 · Dedup and select
# MAGIC Flags exact and near duplicates and eval-set leaks (`silver_dedup`), computes the target
# MAGIC signals when `select.rule` reads them (`silver_targets`), then applies the basic filters
# MAGIC and the score threshold, or the selection rule: `gold_selection` holds every pool uid once with `kept`
# MAGIC and the first `drop_reason`. With the sample pool's labels, precision and recall per drop
# MAGIC reason are printed too.
# MAGIC
# MAGIC Parameters: `conf`, `overrides`, `run_id` (see 01_ingest).

# COMMAND ----------

from pyspark.sql import functions as F

from etl.jobs import dedup, select_pairs, targets
from etl.notebook import context, job_argv, show, widget
from etl.select import needs_targets
from etl.tables import DEDUP, SELECTION

argv = job_argv(widget("conf", "conf/local.yaml"), widget("overrides", ""), widget("run_id", ""))
ctx = context(argv)

# COMMAND ----------

dedup.main(argv)
show(ctx.lake.read(DEDUP).groupBy("dup_reason").agg(
    F.count("*").alias("pairs"), F.count("eval_match").alias("eval_leaks")))

# COMMAND ----------

if needs_targets(ctx.cfg.select):
    targets.main(argv)

# COMMAND ----------

select_pairs.main(argv)

# COMMAND ----------

selection = ctx.lake.read(SELECTION)
funnel = selection.groupBy("kept", "drop_reason").count().orderBy(F.desc("count"))
show(funnel)
