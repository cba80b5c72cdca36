# Databricks notebook source
# MAGIC %md
# MAGIC # 01 · Ingest
# MAGIC Reads the configured raw sources (`ingest.sources`, `ingest.eval_sources`) into the
# MAGIC `bronze_pairs` and `bronze_eval_images` Delta tables. Bad rows go to `quarantine` with a
# MAGIC reason; re-running inserts only new uids.
# MAGIC
# MAGIC Parameters (widgets on Databricks, `DFN_<NAME>` environment variables elsewhere):
# MAGIC `conf` (YAML path, relative to the repo root), `overrides` (`key=value` per line or
# MAGIC `;`-separated), `run_id` (optional).

# COMMAND ----------

from pyspark.sql import functions as F

from etl.jobs import ingest
from etl.notebook import context, job_argv, show, widget
from etl.tables import BRONZE, EVAL_IMAGES, QUARANTINE

argv = job_argv(widget("conf", "conf/local.yaml"), widget("overrides", ""), widget("run_id", ""))
ctx = context(argv)

# COMMAND ----------

counts = ingest.main(argv)
print(counts)

# COMMAND ----------

show(ctx.lake.read(BRONZE).groupBy("source").agg(F.count("*").alias("pairs")))
if ctx.lake.exists(EVAL_IMAGES):
    print(f"eval images: {ctx.lake.read(EVAL_IMAGES).count()}")

# COMMAND ----------

if ctx.lake.exists(QUARANTINE):
    show(ctx.lake.read(QUARANTINE).groupBy("kind", "reason").count().orderBy(F.desc("count")))
