# Databricks notebook source
# MAGIC %md
# MAGIC # 02 · Score
# MAGIC Scores every bronze pair with the configured filter model(s) (`score.models`) into
# MAGIC `silver_scores`, and the eval images into `silver_eval_embeddings`. Only pairs with no
# MAGIC score yet are scored, so the notebook can be re-run after a failure. On a GPU cluster set
# MAGIC `score.device=cuda` (see `conf/databricks.yaml`).
# MAGIC
# MAGIC Parameters: `conf`, `overrides`, `run_id` (see 01_ingest).

# COMMAND ----------

from etl.jobs import score
from etl.notebook import context, job_argv, show, widget
from etl.report import score_errors, score_summary

argv = job_argv(widget("conf", "conf/local.yaml"), widget("overrides", ""), widget("run_id", ""))
ctx = context(argv)

# COMMAND ----------

score.main(argv)

# COMMAND ----------

show(score_summary(ctx.lake))

# COMMAND ----------

show(score_errors(ctx.lake))
