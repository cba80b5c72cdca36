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

from etl.jobs import ingest
from etl.notebook import context, job_argv, show, widget
from etl.report import eval_image_count, quarantine_counts, source_counts

argv = job_argv(widget("conf", "conf/local.yaml"), widget("overrides", ""), widget("run_id", ""))
ctx = context(argv)

# COMMAND ----------

counts = ingest.main(argv)
print(counts)

# COMMAND ----------

show(source_counts(ctx.lake))
evals = eval_image_count(ctx.lake)
if evals is not None:
    print(f"eval images: {evals}")

# COMMAND ----------

quarantined = quarantine_counts(ctx.lake)
if quarantined is not None:
    show(quarantined)
