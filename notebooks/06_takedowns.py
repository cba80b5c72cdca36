# Databricks notebook source
# MAGIC %md
# MAGIC # 06 · Takedowns
# MAGIC Removal requests (`docs/stages/takedown.md`), as `dfn-curate takedown`: `add` appends a
# MAGIC request file to `takedown_ledger` (checked whole: one bad line adds nothing), `apply`
# MAGIC removes every row the ledger names from every table and republishes the export, `purge`
# MAGIC purges and vacuums the tables and records the proof, `status` changes nothing. Then it
# MAGIC shows each request's state, the rows removed per table and the last proof.
# MAGIC
# MAGIC Parameters: `conf`, `overrides`, `run_id` (see 01_ingest), `action` (`status`, `add`,
# MAGIC `apply` or `purge`; default `status`), `file` (for `add`: the request file, `.csv` or
# MAGIC `.parquet`, a path or URL). Hashed categories (`gdpr_erasure`, `abuse_hashlist`) need the
# MAGIC ledger's key in the driver's environment (`takedown.key_env`, default `DFN_TAKEDOWN_KEY`):
# MAGIC on a cluster, set that environment variable from a secret (`{{secrets/<scope>/<key>}}`).

# COMMAND ----------

from etl.jobs import takedown
from etl.notebook import context, job_argv, show, widget
from etl.takedown.ledger import status, summary

action = widget("action", "status").strip().lower()
file = widget("file", "")
argv = job_argv(widget("conf", "conf/local.yaml"), widget("overrides", ""), widget("run_id", ""))
ctx = context(argv)

# COMMAND ----------

counts = {}
if action != "status":
    counts = takedown.main([*argv, action, *(["--file", file] if file else [])])
print(counts)

# COMMAND ----------

requests = status(ctx.lake)
if requests is None:
    print("no takedown ledger yet: run with action=add and a request file")
else:
    show(requests, 1000)

# COMMAND ----------

overview = summary(ctx.lake)
if overview is not None:
    print(f"{overview['total']} requests")
    for table, rows in overview["removed"]:
        print(f"  {table:<24} {rows:>10} rows removed")
    at, result, failures = overview["proof"] or ("never", "-", "-")
    print(f"last proof: {at}: {result} (failures: {failures})")
