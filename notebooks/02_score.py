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

from pyspark.sql import functions as F

from etl.jobs import score
from etl.notebook import context, job_argv, show, widget
from etl.tables import SILVER

argv = job_argv(widget("conf", "conf/local.yaml"), widget("overrides", ""), widget("run_id", ""))
ctx = context(argv)

# COMMAND ----------

score.main(argv)

# COMMAND ----------

scores = ctx.lake.read(SILVER)
summary = scores.groupBy("model_id").agg(
    F.count("*").alias("pairs"), F.count("score").alias("scored"),
    F.count("score_error").alias("errors"), F.min("score").alias("min"),
    F.expr("percentile_approx(score, 0.5)").alias("median"), F.max("score").alias("max"))
show(summary)

# COMMAND ----------

show(scores.where(F.col("score_error").isNotNull()).groupBy("score_error").count())
