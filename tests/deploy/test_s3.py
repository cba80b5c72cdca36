"""End to end on object storage: ``dfn-curate run`` with raw inputs, lakehouse and export all on
``s3a://`` against a real S3 server (moto) on 127.0.0.1, compared with the same run on local
paths (the tiny notebook run). The subprocesses resolve hadoop-aws themselves, as users do."""

from __future__ import annotations

import io
import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest

from etl.export import read_export
from etl.fs import Store
from etl.sample import write_sample
from etl.tables import (
    BRONZE,
    DEDUP,
    EVAL_EMBEDDINGS,
    EVAL_IMAGES,
    GOLD,
    QUARANTINE,
    SELECTION,
    SILVER,
    Lakehouse,
)
from etl.uidfile import uid_strings
from tests.helpers.pipeline import notebook_run
from tests.helpers.s3 import cli, cli_env, start_server, write_conf

pytestmark = pytest.mark.slow

TABLES = [BRONZE, QUARANTINE, EVAL_IMAGES, SILVER, EVAL_EMBEDDINGS, DEDUP, SELECTION, GOLD]
LAKE = "s3a://lake/lh"
# like the test session: few partitions for a 60-row pool
SMALL_SPARK = {"spark.sql.shuffle.partitions": "2", "spark.default.parallelism": "2",
               "spark.databricks.delta.snapshotPartitions": "1"}


@pytest.fixture(scope="module")
def s3(tmp_path_factory):
    """The server with the tiny sample pool's raw files uploaded to s3://raw/sample/."""
    server = start_server()
    try:
        for bucket in ("raw", "lake"):
            server.client().create_bucket(Bucket=bucket)
        raw = tmp_path_factory.mktemp("raw-sample")
        write_sample(str(raw), n_pairs=60, eval_size=12, seed=0, shard_size=30)
        assert server.upload_dir(raw, "raw", "sample") > 20
        yield server
    finally:
        server.server.stop()


def s3_overrides(local: list[str]) -> list[str]:
    sources = ("ingest.sources=[{format: img2dataset, path: 's3a://raw/sample/pool', "
               "name: sample}]")
    evals = "ingest.eval_sources=[{format: folder, path: 's3a://raw/sample/eval', name: sample}]"
    keep = [o for o in local if not o.startswith("lakehouse.root=")]
    return [*keep, f"lakehouse.root={LAKE}", sources, evals]


def set_args(overrides: list[str]) -> list[str]:
    return [a for o in overrides for a in ("--set", o)]


def delta_commits(server, table: str) -> list[str]:
    return [k for k in server.keys("lake", f"lh/{table}/_delta_log/") if k.endswith(".json")]


@dataclass
class S3Run:
    local_lake: Lakehouse  # the same config run on local paths
    args: list[str]
    out: str  # the s3 run's output
    commits: dict[str, list[str]]  # Delta commit files per table after the run
    rerun_out: str  # a second run (--steps ingest,score) in a job that then counts every table
    counts: dict[str, int]
    tmp: Path


RERUN = """
import json, sys
from etl.jobs import run
from etl.jobs.common import parser, start
args, out = sys.argv[1:-1], sys.argv[-1]
run.main([*args, "--steps", "ingest,score", "--run-id", "s3-rerun"])
ctx = start(parser("count", "count"), args)
json.dump({t: ctx.lake.read(t).count() for t in TABLES}, open(out, "w"))
"""


@pytest.fixture(scope="module")
def s3_run(s3, spark, tmp_path_factory):
    """The local tiny run, then the same config on S3, then a re-run that counts the tables."""
    local = notebook_run(tmp_path_factory)
    tmp = tmp_path_factory.mktemp("s3-run")
    conf = write_conf(tmp / "s3.yaml", s3, SMALL_SPARK)
    args = ["--conf", str(conf), *set_args(s3_overrides(local.overrides))]
    out, seconds = cli(["run", *args, "--run-id", "s3"], tmp / "run.log")
    print(f"dfn-curate run on s3a:// (60 pairs): {seconds:.1f} s")
    commits = {t: delta_commits(s3, t) for t in TABLES}
    counts_json = tmp / "counts.json"
    proc = subprocess.run([sys.executable, "-c", f"TABLES = {TABLES!r}\n{RERUN}", *args,
                           str(counts_json)], env=cli_env(), capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return S3Run(Lakehouse(spark, local_conf(local.root)), args, out, commits, proc.stdout,
                 json.loads(counts_json.read_text()), tmp)


def local_conf(root: Path):
    from etl.config import LakehouseConf

    return LakehouseConf(root=str(root))


def store(server) -> Store:
    return Store.from_conf(server.spark_conf())


def test_s3_run_matches_local_run_and_exports_readable_shards(s3, s3_run):
    assert "read=66 = new 60 + already present 0 + in-input duplicates 0 + quarantined 6" \
        in s3_run.out
    # every table on S3 holds the rows the local run holds (counted by a separate job)
    local_lake = s3_run.local_lake
    local_counts = {t: local_lake.read(t).count() for t in TABLES}
    assert s3_run.counts == local_counts and s3_run.counts[BRONZE] == 60

    # the published export: manifest last, same uids.npy as the local run, shards on S3
    st = store(s3)
    manifest = read_export("s3a://lake/lh/export", st)
    local_manifest = read_export(str(local_lake.resolve("export")))
    assert manifest["run_dir"] == "s3a://lake/lh/export/runs/s3"
    s3_uids = np.load(io.BytesIO(st.read_bytes(manifest["uids_npy"]["path"])))
    assert s3_uids.dtype == np.dtype("u8,u8") and len(s3_uids) == manifest["kept"] > 0
    assert np.array_equal(s3_uids, np.load(local_manifest["uids_npy"]["path"]))
    assert shard_uids(s3, manifest) == uid_strings(s3_uids)  # sorted, every kept pair


def shard_uids(server, manifest) -> list[str]:
    """Read the exported shards from S3 with ``webdataset`` through fsspec/s3fs."""
    import importlib

    import fsspec
    import webdataset as wds
    from braceexpand import braceexpand

    gopen = importlib.import_module("webdataset.gopen")  # the module, not the function

    opts = store(server).options["s3"]
    gopen.gopen_schemes["s3"] = lambda url, mode="rb", bufsize=8192, **kw: fsspec.open(
        url, mode, **opts).open()
    urls = list(braceexpand(manifest["webdataset"]["train_data"]))
    assert urls[0].startswith("s3://lake/lh/export/runs/")
    samples = list(wds.WebDataset(urls, shardshuffle=False))
    assert len(samples) == manifest["webdataset"]["samples"]
    assert all(json.loads(s["json"])["uid"] == s["__key__"] for s in samples)
    return sorted(s["__key__"] for s in samples)


def test_s3_rerun_inserts_nothing(s3, s3_run):
    tables = [BRONZE, QUARANTINE, EVAL_IMAGES, SILVER, EVAL_EMBEDDINGS]
    assert all(s3_run.commits[t] for t in tables)
    # every file read before: none is read again
    assert "read=0 = new 0 + already present 0" in s3_run.rerun_out
    # no commit anywhere: the re-run of ingest and score changed no table
    assert {t: delta_commits(s3, t) for t in TABLES} == s3_run.commits


def test_export_killed_midway_leaves_the_published_export_intact(s3, s3_run, tmp_path):
    args = s3_run.args
    st = store(s3)
    published = read_export("s3a://lake/lh/export", st)
    marker = "lh/export/runs/killed/_dfn_export"
    console = str(Path(sys.executable).parent / "dfn-curate")
    # another shard size: a full export (a new run folder), not an unchanged diff
    proc = subprocess.Popen([console, "export", *args, "--set", "export.shard_size=7",
                             "--run-id", "killed"],
                            env=cli_env(local_dir=tmp_path),
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    deadline = time.monotonic() + 600
    try:
        while marker not in s3.keys("lake", "lh/export/runs/killed/"):
            assert proc.poll() is None, "export finished before it could be killed"
            assert time.monotonic() < deadline
            time.sleep(0.05)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    assert not st.exists("s3a://lake/lh/export/runs/killed/manifest.json")
    assert read_export("s3a://lake/lh/export", st) == published
    arr = np.load(io.BytesIO(st.read_bytes(published["uids_npy"]["path"])))
    assert len(arr) == published["kept"]
    assert len(shard_uids(s3, published)) == published["webdataset"]["samples"]


TAKEDOWN = """
import json, sys
from etl import steps
from etl.jobs.common import parser, start
from etl.tables import INGEST_FILES, MATCHES, ROW_TABLES
args, req, out = sys.argv[1:-2], sys.argv[-2], sys.argv[-1]
res = {"add": steps.main("takedown", ["add", "--file", req, *args]),
       "apply": steps.main("takedown", ["apply", *args, "--run-id", "s3-apply"]),
       "again": steps.main("takedown", ["apply", *args, "--run-id", "s3-again"]),
       "proof": steps.main("takedown", ["purge", *args, "--run-id", "s3-purge"])}
lake = start(parser("count", "count"), args).lake
lake.delete(INGEST_FILES, "true")  # every file read again: the removed rows must stay out
# the export killed above may still hold the lease until its heartbeat is stale
res["ingest"] = steps.main("ingest", [*args, "--wait", "--run-id", "s3-reingest"])
gone = lake.read(MATCHES).select("uid").distinct()
res["matched"] = gone.count()
res["left"] = {t: lake.read(t).join(gone, "uid", "left_semi").count() for t in ROW_TABLES
               if lake.exists(t)}
json.dump(res, open(out, "w"), default=str)
"""


def test_takedown_on_s3_removes_purges_proves_and_blocks(s3, s3_run, tmp_path):
    """Last in this module: it removes rows from the shared s3 lakehouse. A uid, a url and a
    hashed sha256 request, read from s3, applied, purged with its proof, and re-ingest blocked."""
    rows = sorted(s3_run.local_lake.read(BRONZE).select("uid", "url", "sha256").collect())
    requests = ("request_id,category,kind,value\n"
                f"S-uid,internal,uid,{rows[0]['uid']}\n"
                f"S-url,legal,url,{rows[1]['url']}\n"
                f"S-sha,abuse_hashlist,sha256,{rows[2]['sha256']}\n")
    s3.client().put_object(Bucket="raw", Key="requests.csv", Body=requests.encode())
    conf = write_conf(tmp_path / "s3.yaml", s3, {
        **SMALL_SPARK, "spark.databricks.delta.retentionDurationCheck.enabled": "false"})
    args = list(s3_run.args)
    args[args.index("--conf") + 1] = str(conf)
    args += ["--set", "takedown.retain_hours=0"]
    out = tmp_path / "takedown.json"
    env = {**cli_env(), "DFN_TAKEDOWN_KEY": "s3-test-ledger-key-0123"}
    proc = subprocess.run([sys.executable, "-c", TAKEDOWN, *args, "s3a://raw/requests.csv",
                           str(out)], env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    res = json.loads(out.read_text())
    assert res["add"]["selectors_added"] == 3 and res["matched"] >= 3
    assert res["apply"]["removed.bronze_pairs"] >= 3
    assert res["again"]["new_matches"] == 0 and res["again"]["rows_removed"] == 0
    proof = res["proof"]
    assert proof["verified"] and not any(proof["b_raw_scan"].values())
    assert all(proof["d_time_travel"].values()) and proof["e_export"] == []
    assert set(res["left"].values()) == {0}
    ingest = res["ingest"]
    assert ingest["bronze_pairs.new"] == 0
    assert ingest["bronze_pairs.blocked"] + ingest["bronze_eval_images.blocked"] == \
        res["matched"]
    manifest = read_export("s3a://lake/lh/export", store(s3))
    in_gold = res["apply"].get("removed.gold_pairs", 0)
    if in_gold:  # the export held some: republished without them
        assert manifest["run_id"] == "s3-apply" and manifest["takedown"]["removed"] == in_gold
