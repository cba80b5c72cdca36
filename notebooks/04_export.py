# Databricks notebook source
# MAGIC %md
# MAGIC # 04 · Export
# MAGIC Writes the kept pairs to `gold_pairs` and, under `export.out_dir`, the DataComp
# MAGIC `uids.npy`, WebDataset shards for open_clip training and a url parquet for
# MAGIC img2dataset. On Databricks point `export.out_dir` at a `/Volumes/...` or `/dbfs/...` path.
# MAGIC
# MAGIC Parameters: `conf`, `overrides`, `run_id` (see 01_ingest).

# COMMAND ----------

import json

from etl.export import output_dir, read_export, train_command
from etl.jobs import export
from etl.notebook import context, job_argv, show, widget
from etl.report import gold_preview

argv = job_argv(widget("conf", "conf/local.yaml"), widget("overrides", ""), widget("run_id", ""))
ctx = context(argv)

# COMMAND ----------

export.main(argv)

# COMMAND ----------

manifest = read_export(output_dir(ctx.lake, ctx.cfg.export), ctx.lake.store)
print(json.dumps({k: v for k, v in manifest.items() if k != "webdataset"}, indent=2))
if (manifest.get("webdataset") or {}).get("train_data"):
    print("train with:", train_command(manifest["webdataset"]))

# COMMAND ----------

show(gold_preview(ctx.lake))
