"""Exports as a diff of the published one: new shards for added samples, only the shards that
lost a sample rewritten, the rest referenced in place byte for byte; added / removed uid
lists; an idle re-run writes nothing."""

from __future__ import annotations

import tarfile
from pathlib import Path

import numpy as np
import pytest

from etl.config import Config, ExportConf, LakehouseConf
from etl.export import read_export
from etl.exportdiff import run_export
from etl.tables import BRONZE, GOLD, SELECTION
from etl.uidfile import uid_strings
from tests.export.test_export import gold_df, gold_rows

SEL_SCHEMA = "uid string, kept boolean, drop_reason string, score double"


def select(spark, lake, rows, kept: set[str], scores: dict | None = None) -> None:
    scores = scores or {}
    sel = [(r[0], r[0] in kept, None if r[0] in kept else "aspect", scores.get(r[0], r[6]))
           for r in rows]
    lake.overwrite(spark.sparkContext.parallelize(sel, 3).toDF(SEL_SCHEMA), SELECTION)


def shard_bytes(manifest: dict) -> dict[str, bytes]:
    return {s["name"]: Path(s["path"]).read_bytes() for s in manifest["webdataset"]["shards"]}


def shard_uids(path: str) -> set[str]:
    with tarfile.open(path) as tar:
        return {m.name.split(".", 1)[0] for m in tar.getmembers()}


def npy(path: str) -> set[str]:
    return set(uid_strings(np.load(path)))


@pytest.mark.slow
def test_export_diff_adds_removes_and_rewrites_only_what_changed(spark, lake, capsys):
    rows = gold_rows(10, null_image=0)
    uids = [r[0] for r in rows]
    lake.overwrite(gold_df(spark, rows).drop("score"), BRONZE)
    cfg = Config(lakehouse=LakehouseConf(root=lake.root),
                 export=ExportConf(out_dir="export", shard_size=2))
    out = Path(lake.resolve("export"))

    select(spark, lake, rows, set(uids[:6]))
    first = run_export(lake, cfg, "run-1")
    assert "diff" not in first and len(first["webdataset"]["shards"]) == 3
    before = shard_bytes(first)

    # add three samples: two new shards in run-2, the old ones referenced in place
    select(spark, lake, rows, set(uids[:9]))
    second = run_export(lake, cfg, "run-2")
    diff = second["diff"]
    assert (diff["added"], diff["removed"], diff["updated"]) == (3, 0, 0)
    assert diff["previous_run"] == "run-1" and diff["rewritten_shards"] == []
    assert diff["new_shards"] == ["00003.tar", "00004.tar"]
    assert npy(diff["added_uids"]["path"]) == set(uids[6:9])
    assert npy(diff["removed_uids"]["path"]) == set()
    assert npy(second["uids_npy"]["path"]) == set(uids[:9])  # the full list, always
    shards = {s["name"]: s for s in second["webdataset"]["shards"]}
    for name in before:
        assert "/runs/run-1/" in shards[name]["path"]
        assert Path(shards[name]["path"]).read_bytes() == before[name]  # not rewritten
    assert {"00003.tar", "00004.tar"} == {n for n, s in shards.items() if "/run-2/" in s["path"]}
    assert sorted(p.name for p in (out / "runs" / "run-2" / "shards").iterdir()) == [
        "00003.tar", "00004.tar"]
    assert set().union(*(shard_uids(s["path"]) for s in shards.values())) == set(uids[:9])
    assert second["webdataset"]["samples"] == 9 and second["runs"] == ["run-1", "run-2"]
    assert "::" in second["webdataset"]["train_data"]
    index = spark.read.parquet(second["webdataset"]["index"]).collect()
    assert sorted(r.uid for r in index) == sorted(uids[:9])

    # remove one sample and rescore another: only their two shards are rewritten
    by_shard = {r.uid: int(r.shard) for r in index}
    gone = next(u for u in uids[:6] if by_shard[u] == 1)
    rescored = next(u for u in uids[:6] if by_shard[u] == 2)
    select(spark, lake, rows, set(uids[:9]) - {gone}, {rescored: 0.123})
    third = run_export(lake, cfg, "run-3")
    diff = third["diff"]
    assert (diff["added"], diff["removed"], diff["updated"]) == (0, 1, 1)
    assert diff["rewritten_shards"] == ["00001.tar", "00002.tar"]
    assert diff["new_shards"] == ["00005.tar"]
    assert npy(diff["removed_uids"]["path"]) == {gone} and npy(diff["added_uids"]["path"]) == set()
    shards = {s["name"]: s for s in third["webdataset"]["shards"]}
    assert "/runs/run-1/" in shards["00000.tar"]["path"]
    assert Path(shards["00000.tar"]["path"]).read_bytes() == before["00000.tar"]
    assert all("/runs/run-2/" in shards[n]["path"] for n in ("00003.tar", "00004.tar"))
    assert gone not in shard_uids(shards["00001.tar"]["path"])
    assert shard_uids(shards["00005.tar"]["path"]) == {rescored}
    assert rescored not in shard_uids(shards["00002.tar"]["path"])
    assert set().union(*(shard_uids(s["path"]) for s in shards.values())) == \
        set(uids[:9]) - {gone}
    assert third["runs"] == ["run-1", "run-2", "run-3"]

    # nothing new: no run folder, no gold commit, the same export stays published
    gold_version, tree = lake.version(GOLD), sorted(p for p in out.rglob("*"))
    fourth = run_export(lake, cfg, "run-4")
    assert fourth["run_id"] == "run-3" and read_export(str(out))["run_id"] == "run-3"
    assert not (out / "runs" / "run-4").exists() and sorted(out.rglob("*")) == tree
    assert lake.version(GOLD) == gold_version
    assert "export: unchanged; run run-3 stays published" in capsys.readouterr().out

    # a takedown republish starting meanwhile: its unfinished folder survives a publish
    (out / "runs" / "takedown-x").mkdir()
    (out / "runs" / "takedown-x" / "_dfn_export").write_text("takedown-x")

    # gold_pairs changes, then its old files are vacuumed: the diff's read of the exported
    # version fails, and a full export is published instead, saying why
    select(spark, lake, rows, set(uids[:9]) - {gone, uids[0]}, {rescored: 0.123})
    from etl.export import write_gold

    write_gold(lake)
    spark.conf.set("spark.databricks.delta.retentionDurationCheck.enabled", "false")
    try:
        spark.sql(f"VACUUM {lake.name(GOLD)} RETAIN 0 HOURS")
    finally:
        spark.conf.unset("spark.databricks.delta.retentionDurationCheck.enabled")
    vacuumed = run_export(lake, cfg, "run-4b")
    assert "diff" not in vacuumed and vacuumed["kept"] == 7
    assert "full export (the files of gold_pairs version" in capsys.readouterr().out
    assert all("/runs/run-4b/" in s["path"] for s in vacuumed["webdataset"]["shards"])
    assert vacuumed["run_id"] == "run-4b" and (out / "runs" / "takedown-x").exists()

    # another shard size cannot be a diff: a full export, saying why
    cfg.export.shard_size = 3
    fifth = run_export(lake, cfg, "run-5")
    assert "diff" not in fifth and len(fifth["webdataset"]["shards"]) == 3
    assert all("/runs/run-5/" in s["path"] for s in fifth["webdataset"]["shards"])
    assert "full export (the shard size changed" in capsys.readouterr().out
    # finished runs no longer read are pruned; the unfinished folder is left alone
    assert sorted(p.name for p in (out / "runs").iterdir()) == ["run-4b", "run-5",
                                                                "takedown-x"]


@pytest.mark.slow
def test_gold_pairs_compares_only_uids_whose_selection_changed(spark, lake):
    from etl.exportdiff import GOLD_FROM, update_gold

    rows = gold_rows(10, null_image=0)
    uids = [r[0] for r in rows]
    lake.overwrite(gold_df(spark, rows).drop("score"), BRONZE)
    select(spark, lake, rows, set(uids[:6]))
    assert update_gold(lake)["rows_rewritten"] == 6  # the first build: every kept row
    assert lake.properties(GOLD)[GOLD_FROM] == str(lake.version(SELECTION))
    # a gold row edited behind the pipeline's back: no selection change names it
    spark.sql(f"UPDATE {lake.name(GOLD)} SET text = 'edited' WHERE uid = '{uids[0]}'")
    spark.sql(f"UPDATE {lake.name(SELECTION)} SET kept = true, drop_reason = NULL "
              f"WHERE uid = '{uids[7]}'")
    counts = update_gold(lake)
    assert (counts["rows_new"], counts["rows_updated"], counts["rows_removed"]) == (1, 0, 0)
    texts = {r.uid: r.text for r in lake.read(GOLD).collect()}
    assert uids[7] in texts and texts[uids[0]] == "edited"  # only the changed uid was read
    version = lake.version(GOLD)
    assert update_gold(lake)["rows_new"] == 0 and lake.version(GOLD) == version  # idle
    lake.set_properties(GOLD, {GOLD_FROM: None})  # no recorded version: every kept row
    counts = update_gold(lake)
    assert (counts["rows_new"], counts["rows_updated"]) == (0, 1)
    assert {r.uid: r.text for r in lake.read(GOLD).collect()}[uids[0]] != "edited"


@pytest.mark.slow
def test_uids_the_selection_gained_are_appended_unless_a_commit_followed_the_record(
        spark, lake, monkeypatch):
    from etl.exportdiff import update_gold
    from etl.lease import hold
    from etl.tables import Lakehouse

    def update():
        with hold(lake, "r", "export"):  # only under the lease are gained uids appended
            return update_gold(lake)

    rows = gold_rows(10, null_image=0)
    uids = [r[0] for r in rows]
    lake.overwrite(gold_df(spark, rows).drop("score"), BRONZE)
    sel = spark.sparkContext.parallelize([(u, True, None, 0.5) for u in uids[:4]], 2)
    lake.overwrite(sel.toDF(SEL_SCHEMA), SELECTION)
    update()
    before = lake.version(GOLD)
    update()
    assert lake.version(GOLD) == before  # idle: the record stands, no commit
    lake.append(spark.createDataFrame([(uids[4], True, None, 0.5), (uids[5], False, "aspect",
                                                                   0.1)], SEL_SCHEMA), SELECTION)
    assert update()["rows_new"] == 1
    ops = {r[0] for r in lake.history(GOLD, lake.version(GOLD) - before).select(
        "operation").collect()}
    assert "MERGE" not in ops  # the gained uid was appended: gold_pairs was not read

    lake.append(spark.createDataFrame([(uids[6], True, None, 0.5)], SEL_SCHEMA), SELECTION)

    def stop(self, table, values):
        raise RuntimeError("stopped before the record")

    monkeypatch.setattr(Lakehouse, "set_properties", stop)
    with pytest.raises(RuntimeError, match="stopped"):
        update()  # uids[6] is in gold_pairs; its record still names the last version
    monkeypatch.undo()
    update()
    got = [r.uid for r in lake.read(GOLD).collect()]
    assert sorted(got) == sorted(uids[:5] + [uids[6]])  # compared, not appended twice


@pytest.mark.slow
def test_rows_new_to_bronze_are_read_from_its_feed_not_from_bronze(spark, lake):
    from urllib.parse import urlparse

    from etl.exportdiff import update_gold

    rows = gold_rows(13, null_image=0)
    uids = [r[0] for r in rows]
    lake.overwrite(gold_df(spark, rows[:10]).drop("score"), BRONZE)
    select(spark, lake, rows[:10], set(uids[:4]))
    update_gold(lake)
    old_files = lake.read(BRONZE).inputFiles()
    lake.append(gold_df(spark, rows[10:], parts=1).drop("score"), BRONZE)
    lake.append(spark.createDataFrame([(uids[10], True, None, 0.8), (uids[11], True, None, 0.7),
                                       (uids[12], False, "aspect", 0.1)], SEL_SCHEMA),
                SELECTION)
    for f in old_files:  # a read of bronze's old rows would now fail
        Path(urlparse(f).path).unlink()
    counts = update_gold(lake)
    assert (counts["rows_new"], counts["rows_updated"], counts["rows_removed"]) == (2, 0, 0)
    got = {r.uid: (r.url, r.text, r.image, r.score) for r in lake.read(GOLD).collect()}
    want = {r[0]: (r[1], r[2], r[3], s) for r, s in ((rows[10], 0.8), (rows[11], 0.7))}
    assert {u: got[u] for u in want} == want and set(got) == set(uids[:4] + uids[10:12])
