"""Incremental ingest: only files not read before are read; a changed file stops the run or,
when asked, is read again; nothing new commits nothing; a run stopped before the record of
files re-reads them without duplicating a row."""

from __future__ import annotations

import os
import shutil

import pytest

from etl import ingest as ingest_mod
from etl.config import Config, IngestConf, LakehouseConf, SampleConf, SourceConf
from etl.fs import Store
from etl.ingest import ingest
from etl.ingestfiles import ChangedFileError
from etl.readers import InputError, read_source
from etl.sample import write_sample
from etl.tables import BRONZE, EVAL_IMAGES, INGEST_FILES, QUARANTINE, Lakehouse

TABLES = (BRONZE, QUARANTINE, INGEST_FILES, EVAL_IMAGES)


def versions(lake: Lakehouse) -> dict[str, int | None]:
    return {t: lake.version(t) for t in TABLES}


def uids(lake: Lakehouse) -> set[str]:
    return {r.uid for r in lake.read(BRONZE).select("uid").collect()}


def copy_shards(src, dest, numbers) -> None:
    """Shard ``n``'s tar and its parquet sidecar, as img2dataset writes them."""
    dest.mkdir(exist_ok=True)
    for n in numbers:
        for ext in ("tar", "parquet"):
            shutil.copy2(src / f"{n:05d}.{ext}", dest / f"{n:05d}.{ext}")


@pytest.fixture(scope="module")
def pool(tmp_path_factory):
    """A small sample pool of 4 shards (each with a sidecar), written once."""
    root = tmp_path_factory.mktemp("raw")
    write_sample(str(root), n_pairs=120, eval_size=10, seed=3, shard_size=30, store=Store())
    return root / "pool"


@pytest.mark.slow
def test_second_batch_reads_only_its_files_and_matches_one_ingest(spark, lake, tmp_path, pool):
    source = tmp_path / "incoming"
    cfg = Config(ingest=IngestConf(sources=[SourceConf(format="img2dataset", path=str(source),
                                                       name="crawl")]))
    copy_shards(pool, source, [0, 1])
    first = ingest(spark, cfg, lake, "run-1")
    assert (first["bronze_pairs.files_listed"], first["bronze_pairs.files_new"]) == (4, 4)
    assert first["bronze_pairs.rows_read"] == first["bronze_pairs.read"] > 0

    copy_shards(pool, source, [2, 3])
    second = ingest(spark, cfg, lake, "run-2")
    batch2 = tmp_path / "batch2"
    copy_shards(pool, batch2, [2, 3])
    in_batch2 = read_source(spark, SourceConf(format="img2dataset", path=str(batch2))).count()
    assert second["bronze_pairs.rows_read"] == second["bronze_pairs.read"] == in_batch2
    assert {k: second[f"bronze_pairs.files_{k}"] for k in ("listed", "new", "changed", "skipped")
            } == {"listed": 8, "new": 4, "changed": 0, "skipped": 4}
    recorded = lake.read(INGEST_FILES).where("run_id = 'run-2'").collect()
    assert sorted(os.path.basename(r.path) for r in recorded) == [
        "00002.parquet", "00002.tar", "00003.parquet", "00003.tar"]
    assert sum(r.rows for r in recorded) == in_batch2

    once = Lakehouse(spark, LakehouseConf(root=str(tmp_path / "once")))
    whole = ingest(spark, cfg, once, "run-once")
    assert whole["bronze_pairs.read"] == first["bronze_pairs.read"] + in_batch2
    assert uids(lake) == uids(once)
    assert lake.read(BRONZE).count() == len(uids(lake))

    before = versions(lake)
    third = ingest(spark, cfg, lake, "run-3")
    assert versions(lake) == before  # nothing new: no commit on any ingest table
    assert (third["bronze_pairs.read"], third["bronze_pairs.rows_read"]) == (0, 0)
    assert third["bronze_pairs.files_skipped"] == 8


B = "b [1] 100%.csv"  # glob characters, a space and a % (parquet/CSV paths come URL-encoded)


def _write_csv(path, rows: list[tuple[str, str]]) -> None:
    path.write_text("url,caption\n" + "".join(f"{u},{c}\n" for u, c in rows))


@pytest.mark.slow
def test_changed_csv_file_stops_naming_it_then_reingest_adds_only_new_rows(spark, lake,
                                                                            tmp_path):
    d = tmp_path / "csv"
    d.mkdir()
    a = [(f"http://a/{i}.jpg", f"caption a {i}") for i in range(5)]
    b = [(f"http://b/{i}.jpg", f"caption b {i}") for i in range(4)]
    _write_csv(d / "a.csv", a)
    _write_csv(d / B, b)
    cfg = Config(ingest=IngestConf(sources=[SourceConf(format="csv", path=str(d))]))
    first = ingest(spark, cfg, lake, "run-1")
    assert (first["bronze_pairs.new"], first["bronze_pairs.rows_read"]) == (9, 9)

    _write_csv(d / B, b + [("http://b/9.jpg", "a later row")])  # grown: a new size
    stat = os.stat(d / "a.csv")
    os.utime(d / "a.csv", (stat.st_atime, stat.st_mtime + 60))  # same size, touched
    _write_csv(d / "c.csv", [("http://c/0.jpg", "a new file")])
    before = versions(lake)
    with pytest.raises(ChangedFileError) as err:
        ingest(spark, cfg, lake, "run-2")
    msg = str(err.value)
    assert "2 file(s) changed" in msg and f"{d / 'a.csv'} (size " in msg
    assert f"{d / B} (size " in msg and "--set ingest.changed_files=reingest" in msg
    assert versions(lake) == before  # stopped before any write

    cfg.ingest.changed_files = "reingest"
    second = ingest(spark, cfg, lake, "run-2")
    got = {k: second[f"bronze_pairs.{k}"] for k in (
        "files_new", "files_changed", "files_skipped", "read", "rows_read", "new",
        "already_present")}
    assert got == {"files_new": 1, "files_changed": 2, "files_skipped": 0, "read": 11,
                   "rows_read": 11, "new": 2, "already_present": 9}
    assert lake.read(BRONZE).count() == len(uids(lake)) == 11
    rows = {os.path.basename(r.path): r.rows for r in lake.read(INGEST_FILES).collect()}
    assert rows == {"a.csv": 5, B: 5, "c.csv": 1}

    before = versions(lake)
    third = ingest(spark, cfg, lake, "run-3")
    assert versions(lake) == before and third["bronze_pairs.files_skipped"] == 3

    shutil.rmtree(lake.path(BRONZE))  # bronze rebuilt from scratch: the record is not trusted
    lake = Lakehouse(spark, lake.conf)  # as the next run's process sees the lakehouse
    rebuilt = ingest(spark, cfg, lake, "run-4")
    assert (rebuilt["bronze_pairs.files_new"], rebuilt["bronze_pairs.new"]) == (3, 11)
    assert lake.read(INGEST_FILES).count() == 3
    assert {r.run_id for r in lake.read(INGEST_FILES).collect()} == {"run-4"}


@pytest.mark.slow
def test_run_stopped_before_the_record_reads_again_without_duplicates(spark, lake, tmp_path,
                                                                       monkeypatch):
    """The sample (pool shards and the eval image folder), as `make demo` ingests it: a run
    that stops after bronze but before the file record leaves every file to read again; the
    next run finds every row present, and the one after reads nothing."""
    cfg = Config(sample=SampleConf(n_pairs=60, eval_size=6, shard_size=20),
                 ingest=IngestConf(sources=[SourceConf()], eval_sources=[SourceConf()]))

    def crash(*_args, **_kwargs):
        raise RuntimeError("stopped before the record")

    monkeypatch.setattr(ingest_mod, "record_files", crash)
    with pytest.raises(RuntimeError, match="stopped before the record"):
        ingest(spark, cfg, lake, "run-1")
    kept = lake.read(BRONZE).count()
    assert kept > 0 and not lake.exists(INGEST_FILES)
    monkeypatch.undo()

    again = ingest(spark, cfg, lake, "run-2")
    assert again["bronze_pairs.new"] == 0 and again["bronze_pairs.already_present"] == kept
    assert lake.read(BRONZE).count() == kept
    assert again["bronze_eval_images.files_new"] == 18  # 6 images, captions and .json
    assert again["bronze_eval_images.rows_read"] == again["bronze_eval_images.read"] == 6

    before = versions(lake)
    last = ingest(spark, cfg, lake, "run-3")
    assert versions(lake) == before
    assert last["bronze_pairs.read"] == last["bronze_eval_images.read"] == 0


def test_a_new_file_is_checked_against_the_files_already_ingested(spark, lake, tmp_path):
    """A new file alone agrees with itself; its header is compared with a file of the source
    ingested before, and a mismatch (columns swapped: misread silently otherwise) stops the run
    before any write."""
    d = tmp_path / "csv"
    d.mkdir()
    _write_csv(d / "a.csv", [(f"http://a/{i}.jpg", f"caption a {i}") for i in range(3)])
    cfg = Config(ingest=IngestConf(sources=[SourceConf(format="csv", path=str(d))]))
    assert ingest(spark, cfg, lake, "run-1")["bronze_pairs.new"] == 3
    (d / "b.csv").write_text("caption,url\nswapped caption,http://b/0.jpg\n")
    before = versions(lake)
    with pytest.raises(InputError) as err:
        ingest(spark, cfg, lake, "run-2")
    msg = str(err.value)
    assert "has header as " in msg and "caption, url" in msg and "url, caption" in msg
    assert f"{d / 'a.csv'}" in msg or f"{d / 'b.csv'}" in msg
    assert versions(lake) == before  # stopped before any write

    (d / "b.csv").write_text("url,caption\nhttp://b/0.jpg,same header\n")
    second = ingest(spark, cfg, lake, "run-2")
    assert (second["bronze_pairs.files_new"], second["bronze_pairs.new"]) == (1, 1)


@pytest.mark.slow
def test_an_image_folder_is_planned_by_stem(spark, lake, tmp_path):
    """An image and its caption landing in different runs still meet: a stem with a missing
    half is quarantined but not recorded, so it is read again, whole, once the other half
    arrives; a stem touched by a new file is read whole (recorded files included)."""
    from tests.helpers.images import tiny_jpeg

    d = tmp_path / "imgs"
    (d / "sub").mkdir(parents=True)
    (d / "a.jpg").write_bytes(tiny_jpeg(50, 60))
    (d / "a.txt").write_text("an apple")
    (d / "sub" / "b.jpg").write_bytes(tiny_jpeg(30, 40))  # its caption comes later
    (d / "c.txt").write_text("a caption whose image comes later")
    cfg = Config(ingest=IngestConf(sources=[SourceConf(format="folder", path=str(d))]))
    first = ingest(spark, cfg, lake, "run-1")
    assert {k: first[f"bronze_pairs.{k}"] for k in ("files_new", "read", "new", "quarantined")
            } == {"files_new": 4, "read": 3, "new": 1, "quarantined": 2}
    recorded = {os.path.basename(r.path) for r in lake.read(INGEST_FILES).collect()}
    assert recorded == {"a.jpg", "a.txt"}  # the halves are left to read again

    (d / "sub" / "b.txt").write_text("a bee")
    (d / "c.png").write_bytes(tiny_jpeg(20, 10))
    (d / "a.json").write_text('{"label": "fruit"}')  # a new file of a recorded stem
    second = ingest(spark, cfg, lake, "run-2")
    got = {k: second[f"bronze_pairs.{k}"] for k in (
        "files_listed", "files_new", "files_again", "files_skipped", "read", "rows_read", "new",
        "already_present", "quarantined")}
    assert got == {"files_listed": 7, "files_new": 5, "files_again": 2, "files_skipped": 0,
                   "read": 3, "rows_read": 3, "new": 2, "already_present": 1, "quarantined": 0}
    texts = {r.text: r.width for r in lake.read(BRONZE).collect()}
    assert texts == {"an apple": 50, "a bee": 30, "a caption whose image comes later": 20}
    assert lake.read(INGEST_FILES).count() == 7

    before = versions(lake)
    third = ingest(spark, cfg, lake, "run-3")
    assert versions(lake) == before and third["bronze_pairs.files_skipped"] == 7
