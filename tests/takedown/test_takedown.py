"""Takedowns on a real lakehouse: every selector kind removed from every table and the export,
purged with a proof, blocked at re-ingest, a second apply a no-op, a bad request file refused.

The pool: the tiny seeded sample (60 pairs, all on img.example.com) plus a WebDataset shard
whose rows sit on hosts chosen so each selector kind has a row it must match and a near miss it
must not.
"""

from __future__ import annotations

import json
import os
import tarfile
import threading
from pathlib import Path

import numpy as np
import pytest
from pyspark.sql import functions as F

from etl import steps
from etl.config import ConfigError, LakehouseConf
from etl.export import read_export
from etl.tables import (
    BRONZE,
    EVENTS,
    GOLD,
    LEDGER,
    MATCHES,
    QUARANTINE,
    ROW_TABLES,
    SELECTION,
    Lakehouse,
)
from etl.uidfile import uid_strings
from tests.helpers.images import jpeg
from tests.helpers.ingest import add
from tests.helpers.pipeline import tiny_overrides, tiny_weights

KEY = "test-ledger-key-0123456789"
RETENTION_CHECK = "spark.databricks.delta.retentionDurationCheck.enabled"

# key -> (url, caption, colour): each selector's target and its near misses
WEB = {
    "w00": ("https://Cdn.Example.org/gallery/a.jpg", "a red square", (250, 10, 10)),
    "w01": ("https://cdn.example.org/gallery/sub/b.jpg", "a green square", (10, 250, 10)),
    "w02": ("https://cdn.example.org/galleryX/c.jpg", "a blue square", (10, 10, 250)),
    "w03": ("http://host.test:80/x.jpg", "a yellow square", (250, 250, 10)),
    "w04": ("http://www.host.test/y.jpg", "a cyan square", (10, 250, 250)),
    "w05": ("https://a.b.Domain.test/z.jpg", "a magenta square", (250, 10, 250)),
    "w06": ("https://domain.test./q.jpg", "a grey square", (128, 128, 128)),
    "w07": ("https://notdomain.test/r.jpg", "an orange square", (250, 128, 10)),
    "w08": ("https://url.test/p~q", "a purple square", (128, 10, 250)),
    "w09": ("https://url.test/p~q/more.jpg", "a pink square", (250, 180, 200)),
    "w10": ("https://hash.test/1.jpg", "a brown square", (120, 60, 20)),
    "w11": ("https://other.test/copy-of-1.jpg", "another brown square", (120, 60, 20)),
    "w12": ("https://md5.test/2.jpg", "a navy square", (20, 20, 120)),
    "w13": ("https://mirror.test/copy-of-purple.jpg", "a purple square again", (128, 10, 250)),
    "w14": ("https://domain.test/empty-caption.jpg", "", (60, 160, 60)),
}


def write_web(folder: Path) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    with tarfile.open(folder / "00000.tar", "w") as tar:
        for key, (url, caption, colour) in WEB.items():
            add(tar, f"{key}.jpg", jpeg(colour, (64 + int(key[1:]), 48)) if key not in
                ("w11", "w13") else image_of(key))
            add(tar, f"{key}.txt", caption.encode())
            add(tar, f"{key}.json", json.dumps({"url": url, "caption": caption}).encode())
    return folder


def write_later(folder: Path) -> Path:
    """After the purge: copies of removed images under new urls (blocked) and a new row."""
    folder.mkdir(parents=True, exist_ok=True)
    with tarfile.open(folder / "00000.tar", "w") as tar:
        for key, url, data in (("n00", "https://fresh.test/again.jpg", image_of("w11")),
                               # w08's bytes: removed by a url request, blocked by its sha256
                               ("n02", "https://fresh.test/purple.jpg", image_of("w13")),
                               ("n01", "https://fresh.test/new.jpg", jpeg((1, 2, 3), (70, 50)))):
            add(tar, f"{key}.jpg", data)
            add(tar, f"{key}.txt", b"a later caption")
            add(tar, f"{key}.json", json.dumps({"url": url, "caption": "a later caption"}).encode())
    return folder


def image_of(key: str) -> bytes:
    """The same bytes as the row ``key`` copies (w11 copies w10, w13 copies w08)."""
    source = {"w11": "w10", "w13": "w08"}[key]
    return jpeg(WEB[source][2], (64 + int(source[1:]), 48))


def requests_csv(path: Path, sample_uid: str, sha256: str, md5: str) -> Path:
    path.write_text(
        "request_id,category,kind,value,received_at\n"
        "R-prefix,legal,prefix,HTTPS://cdn.example.org/gallery/,2026-11-01\n"
        "R-host,opt_out,host,HOST.test.,2026-11-02T10:00:00Z\n"
        "R-domain,gdpr_erasure,domain,*.domain.test,\n"
        "R-url,legal,url,HTTPS://Url.Test:443/p%7Eq/#frag,\n"
        f"R-sha,abuse_hashlist,sha256,{sha256.upper()},\n"
        f"R-md5,abuse_hashlist,md5,{md5},\n"
        f"R-uid,internal,uid,{sample_uid},\n")
    return path


# which web rows each request must remove (w11/w13 through their identical image)
EXPECTED = {"R-prefix": {"w00", "w01"}, "R-host": {"w03"}, "R-domain": {"w05", "w06", "w14"},
            "R-url": {"w08", "w13"}, "R-sha": {"w10", "w11"}, "R-md5": {"w12"}}
NEAR_MISSES = {"w02", "w04", "w07", "w09"}


@pytest.fixture(scope="module")
def pool(spark, tmp_path_factory):
    """The pipeline run, then add + apply (twice) + purge + re-ingest, with what each saw."""
    tmp = tmp_path_factory.mktemp("takedown")
    root, web = tmp / "lake", write_web(tmp / "web")
    overrides = [*tiny_overrides(root, tiny_weights(tmp)),
                 "ingest.sources=[{format: sample}, {format: webdataset, path: '"
                 f"{web}', name: web}}]", "select.preset=none", "select.keep_fraction=1.0",
                 "dedup.near=false", "takedown.retain_hours=0", "export.shard_size=4"]
    args = [a for o in overrides for a in ("--set", o)]
    mp = pytest.MonkeyPatch()
    mp.setenv("DFN_TAKEDOWN_KEY", KEY)
    spark.conf.set(RETENTION_CHECK, "false")
    try:
        steps.main("run", [*args, "--run-id", "first"])
        lake = Lakehouse(spark, LakehouseConf(root=str(root)))
        bronze = lake.read(BRONZE)
        keys = {r["url"]: r for r in bronze.collect()}
        by_key = {k: keys[url] for k, (url, *_rest) in WEB.items() if url in keys}
        sample_uid = sorted(r["uid"] for r in bronze.where("source = 'sample'").collect())[0]
        same = bronze.where(F.col("sha256") == keys_of(bronze, sample_uid))
        sample_same = {r["uid"] for r in same.select("uid").collect()}  # identical images
        w14 = lake.read(QUARANTINE).where(F.col("url") == WEB["w14"][0]).first()["uid"]
        before = {"manifest": read_export(str(root / "export"), lake.store),
                  "gold": {r[0] for r in lake.read(GOLD).select("uid").collect()}}
        before["shards"] = {e["name"]: Path(e["path"]).read_bytes()
                            for e in before["manifest"]["webdataset"]["shards"]}
        req = requests_csv(tmp / "requests.csv", sample_uid, by_key["w10"]["sha256"],
                           by_key["w12"]["md5"])
        added = steps.main("takedown", ["add", "--file", str(req), *args])
        readded = steps.main("takedown", ["add", "--file", str(req), *args])
        applied = steps.main("takedown", ["apply", *args, "--run-id", "apply-1"])
        after_apply = {t: lake.version(t) for t in ROW_TABLES + (MATCHES,) if lake.exists(t)}
        manifest = read_export(str(root / "export"), lake.store)
        again = steps.main("takedown", ["apply", *args, "--run-id", "apply-2"])
        versions_again = {t: lake.version(t) for t in after_apply}
        manifest_again = read_export(str(root / "export"), lake.store)
        purged = steps.main("takedown", ["purge", *args, "--run-id", "purge"])
        more = write_later(tmp / "later")
        for f in [*web.glob("*.tar"), *(root / "raw" / "sample" / "pool").glob("*.*")]:
            os.utime(f, (f.stat().st_atime, f.stat().st_mtime + 10))  # read them again too
        later = [*args, "--set", "ingest.sources=[{format: sample}, {format: webdataset, path: "
                 f"'{web}', name: web}}, {{format: webdataset, path: '{more}', name: later}}]",
                 "--set", "ingest.changed_files=reingest"]
        reingest = steps.main("ingest", [*later, "--run-id", "reingest"])
    finally:
        spark.conf.set(RETENTION_CHECK, "true")
        mp.undo()
    return dict(lake=lake, root=root, args=args, by_key=by_key, sample_uid=sample_uid,
                sample_same=sample_same, w14=w14,
                before=before, added=added, readded=readded, applied=applied,
                after_apply=after_apply, manifest=manifest, again=again,
                versions_again=versions_again, manifest_again=manifest_again, purged=purged,
                reingest=reingest)


def removed_uids(pool) -> dict[str, set[str]]:
    out = {rid: {pool["by_key"][k]["uid"] for k in keys if k in pool["by_key"]}
           for rid, keys in EXPECTED.items()}
    out["R-uid"] = pool["sample_same"]  # the uid and every row with its image bytes
    out["R-domain"].add(pool["w14"])  # quarantined (empty caption), matched there by its url
    return out


def keys_of(bronze, uid: str) -> str:
    return bronze.where(F.col("uid") == uid).first()["sha256"]


@pytest.mark.slow
def test_every_selector_kind_reaches_its_rows_and_only_them(pool):
    lake = pool["lake"]
    got = {}
    for r in lake.read(MATCHES).collect():
        got.setdefault(r["request_id"], set()).add(r["uid"])
    expected = removed_uids(pool)
    assert got == expected and pool["sample_uid"] in got["R-uid"]
    misses = {pool["by_key"][k]["uid"] for k in NEAR_MISSES}
    assert not misses & set().union(*got.values())
    hashed = lake.read(LEDGER).where("hashed").select("request_id", "value").collect()
    assert {r[0] for r in hashed} == {"R-domain", "R-sha", "R-md5"}
    assert all("domain.test" not in r[1] and len(r[1]) == 64 for r in hashed)  # keyed hashes


@pytest.mark.slow
def test_rows_are_gone_from_every_table_and_history_holds_no_selector(pool):
    lake = pool["lake"]
    gone = set().union(*removed_uids(pool).values())
    for table in ROW_TABLES:
        if lake.exists(table):
            left = lake.read(table).where(F.col("uid").isin(*gone)).count()
            assert left == 0, table
    assert lake.read(QUARANTINE).where(F.col("url").contains("domain.test")).count() == 0
    for table in (BRONZE, SELECTION, GOLD):
        history = lake.history(table).collect()
        text = json.dumps([r.asDict(recursive=True) for r in history], default=str)
        assert "cdn.example.org" not in text and "domain.test" not in text
        tagged = [r for r in history if (r["userMetadata"] or "").startswith(
            "dfn-curate takedown ledger_version=")]
        assert len(tagged) == 1, table  # one commit per table


@pytest.mark.slow
def test_export_republished_rewriting_only_affected_shards(pool):
    before, after = pool["before"], pool["manifest"]
    gone = set().union(*removed_uids(pool).values())
    assert after["run_id"] == "apply-1" and after["takedown"]["ledger_version"] >= 0
    assert after["takedown"]["previous_run"] == before["manifest"]["run_id"]
    kept = set(uid_strings(np.load(after["uids_npy"]["path"])))
    assert kept == before["gold"] - gone and after["kept"] == len(kept)
    rewritten = set(after["takedown"]["rewritten_shards"])
    assert rewritten and rewritten != set(before["shards"])
    for entry in after["webdataset"]["shards"]:
        data = Path(entry["path"]).read_bytes()
        with tarfile.open(entry["path"]) as tar:
            members = {m.name.split(".")[0] for m in tar}
        assert not members & gone
        if entry["name"] in rewritten:
            assert "/runs/apply-1/" in entry["path"]
        else:
            assert data == before["shards"][entry["name"]]  # untouched, byte for byte
            assert "/runs/apply-1/" not in entry["path"]
    assert after["webdataset"]["train_num_samples"] == sum(
        e["count"] for e in after["webdataset"]["shards"])


@pytest.mark.slow
def test_export_pins_its_lineage(pool):
    first, after = pool["before"]["manifest"]["lineage"], pool["manifest"]["lineage"]
    lake = pool["lake"]
    assert first["selection"]["rule"] and first["selection"]["cuts"]
    assert all(m["weights_sha256"] for m in first["models"])
    assert first["tables"][BRONZE] is not None and first["previous_export"] is None
    # republished: the same inputs, the new gold version, the replaced export named
    assert after["previous_export"] == "first" and after["selection"] == first["selection"]
    assert after["tables"][GOLD] == pool["manifest"]["gold_version"] <= lake.version(GOLD)


@pytest.mark.slow
def test_second_apply_changes_nothing(pool):
    assert pool["versions_again"] == pool["after_apply"]
    assert pool["manifest_again"]["run_id"] == pool["manifest"]["run_id"]
    assert pool["again"]["new_matches"] == 0 and pool["again"]["rows_removed"] == 0
    assert pool["readded"]["selectors_added"] == 0 and pool["added"]["selectors_added"] == 7


@pytest.mark.slow
def test_purge_proves_the_bytes_gone(pool):
    proof = pool["lake"].read(EVENTS).where("state = 'proof'").collect()
    detail = json.loads(proof[-1]["detail"])
    assert detail["verified"], detail["failures"]
    assert all(v == 0 for v in detail["a_rows"].values())
    assert all(v == 0 for v in detail["b_raw_scan"].values()) and detail["b_raw_scan"]
    assert detail["c_files_left"] == [] and detail["e_export"] == []
    assert detail["d_time_travel"] and all(detail["d_time_travel"].values())
    from etl.takedown.ledger import status

    states = {r["request_id"]: r["state"] for r in status(pool["lake"]).collect()}
    assert set(states.values()) == {"verified"}


@pytest.mark.slow
def test_reingest_brings_nothing_back(pool):
    counts, lake = pool["reingest"], pool["lake"]
    # every raw row a request names or whose uid was removed (w14 included), and the two later
    # copies of removed images under new urls; the later new row goes in
    expected = sum(len(v) for v in removed_uids(pool).values()) + 2
    assert counts["bronze_pairs.blocked"] == expected
    assert counts["bronze_pairs.new"] == 1
    assert lake.read(BRONZE).where(F.col("url").contains("fresh.test")).count() == 1
    gone = set().union(*removed_uids(pool).values())
    assert lake.read(BRONZE).where(F.col("uid").isin(*gone)).count() == 0
    assert lake.read(QUARANTINE).where(F.col("url").contains("domain.test")).count() == 0


def test_bad_request_file_is_rejected_whole(lake, tmp_path):
    from etl.config import TakedownConf
    from etl.takedown.ledger import RequestFileError, add_requests

    bad = tmp_path / "bad.csv"
    bad.write_text("request_id,category,kind,value\n"
                   "R1,legal,url,https://ok.test/a.jpg\n"
                   "R2,legal,colour,red\n"
                   "R3,lawsuit,host,x.test\n"
                   "R4,opt_out,domain,com\n"
                   "R5,opt_out,sha256,xyz\n")
    with pytest.raises(RequestFileError) as err:
        add_requests(lake, TakedownConf(), str(bad), "r")
    text = str(err.value)
    for fragment in ("line 3, kind", "line 4, category", "line 5, value", "line 6, value",
                     "nothing was added"):
        assert fragment in text
    assert "line 2" not in text
    assert not lake.exists(LEDGER)


def test_hashed_request_needs_the_key(lake, tmp_path, monkeypatch):
    from etl.config import TakedownConf
    from etl.takedown.ledger import add_requests

    monkeypatch.delenv("DFN_TAKEDOWN_KEY", raising=False)
    f = tmp_path / "r.csv"
    f.write_text("request_id,category,kind,value\nG1,gdpr_erasure,url,https://x.test/me.jpg\n")
    with pytest.raises(ConfigError, match="DFN_TAKEDOWN_KEY"):
        add_requests(lake, TakedownConf(), str(f), "r")
    assert not lake.exists(LEDGER)


@pytest.mark.slow
def test_takedown_during_a_slow_ingest_is_not_undone(spark, tmp_path, monkeypatch):
    """An ingest paused before its insert while a request is added and applied: its later
    commit brings the row in, and the step's end removes it again."""

    web = write_web(tmp_path / "web")
    args = ["--set", f"lakehouse.root={tmp_path / 'lake'}", "--set",
            f"ingest.sources=[{{format: webdataset, path: '{web}', name: web}}]",
            "--set", "ingest.eval_sources=[]"]
    paused, resume = threading.Event(), threading.Event()
    real = Lakehouse.count_present

    def slow(self, df, table, keys):
        if table == BRONZE and not resume.is_set():
            paused.set()
            assert resume.wait(300)
        return real(self, df, table, keys)

    monkeypatch.setattr(Lakehouse, "count_present", slow)
    result = {}
    worker = threading.Thread(target=lambda: result.update(
        steps.main("ingest", [*args, "--run-id", "slow"])))
    worker.start()
    assert paused.wait(300)
    req = tmp_path / "r.csv"
    req.write_text("request_id,category,kind,value\nL1,legal,host,host.test\n")
    steps.main("takedown", ["add", "--file", str(req), *args])
    steps.main("takedown", ["apply", *args])
    resume.set()
    worker.join(600)
    lake = Lakehouse(spark, LakehouseConf(root=str(tmp_path / "lake")))
    assert result["bronze_pairs.new"] == len(WEB) - 1  # its insert had the row (w14 quarantined)
    assert lake.read(BRONZE).where(F.col("url").contains("host.test:80")).count() == 0
    assert lake.read(MATCHES).count() == 1


@pytest.mark.slow
def test_purge_rewrites_files_soft_deleted_by_deletion_vectors(spark, tmp_path):
    """With deletion vectors the delete leaves the row in its data file; purge's REORG
    rewrites it, VACUUM removes the old file, and the raw scan then finds nothing."""

    web = write_web(tmp_path / "web")
    args = ["--set", f"lakehouse.root={tmp_path / 'lake'}", "--set",
            f"ingest.sources=[{{format: webdataset, path: '{web}', name: web}}]",
            "--set", "ingest.eval_sources=[]", "--set", "takedown.retain_hours=0"]
    steps.main("ingest", args)
    lake = Lakehouse(spark, LakehouseConf(root=str(tmp_path / "lake")))
    lake.set_properties(BRONZE, {"delta.enableDeletionVectors": "true"})
    req = tmp_path / "r.csv"
    req.write_text("request_id,category,kind,value\nD1,legal,host,host.test\n")
    steps.main("takedown", ["add", "--file", str(req), *args])
    steps.main("takedown", ["apply", *args])
    metrics = lake.history(BRONZE, 1).first()["operationMetrics"]
    # soft: a deletion vector marks the row, no file is rewritten
    assert int(metrics.get("numTargetDeletionVectorsAdded", "0")) >= 1, metrics
    assert int(metrics.get("numTargetBytesAdded", "1")) == 0

    def on_disk() -> int:
        from etl.takedown.proof import table_location

        raw = spark.read.option("pathGlobFilter", "*.parquet").parquet(
            table_location(lake, BRONZE))
        return raw.where(F.col("url").contains("host.test:80")).count()

    assert on_disk() == 1
    spark.conf.set(RETENTION_CHECK, "false")
    try:
        proof = steps.main("takedown", ["purge", *args])
    finally:
        spark.conf.set(RETENTION_CHECK, "true")
    assert proof["verified"] and on_disk() == 0
    assert "REORG" in {r["operation"] for r in lake.history(BRONZE).collect()}
