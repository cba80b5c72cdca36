"""Ingest: every reader, quarantine reasons, in-input duplicates, idempotence, count identity."""

from __future__ import annotations

import json
import tarfile

import pandas as pd
import pytest
from pyspark.sql import functions as F

from etl.config import SourceConf
from etl.fs import Store
from etl.ingest import ingest_frame
from etl.readers import IMG2DATASET_JSON, InputError, json_schema, read_source, shard_json_sample
from etl.tables import BRONZE, QUARANTINE
from etl.tarshards import TarCaps
from tests.helpers.frames import assert_same_rows
from tests.helpers.images import tiny_jpeg
from tests.helpers.ingest import U1, U2, U3, add, ingest_source, quarantine_reasons


@pytest.fixture
def datacomp_dir(tmp_path):
    d = tmp_path / "datacomp"
    d.mkdir()
    part1 = pd.DataFrame({
        "uid": [U1, U2, "NOT-A-UID"], "url": ["http://a/1.jpg", "http://a/2.jpg", "http://a/3.jpg"],
        "text": ["a red circle", "", "a blue square"], "original_width": [640, 300, 100],
        "original_height": [480, 200, 100], "sha256": ["AB" * 32, "cd" * 32, "ef" * 32],
        "clip_l14_similarity_score": [0.31, 0.12, 0.25]})
    part2 = pd.DataFrame({
        "uid": [U3, U1.upper()], "url": ["http://a/4.jpg", "http://a/1b.jpg"],
        "text": ["  a green star  ", "same uid again"], "original_width": [256, 256],
        "original_height": [256, 256], "sha256": ["12" * 32, "34" * 32],
        "clip_l14_similarity_score": [0.4, 0.3]})
    part1.to_parquet(d / "part-0.parquet")
    part2.to_parquet(d / "part-1.parquet")
    return d


def test_datacomp_reader_quarantine_dups_and_identity(spark, lake, datacomp_dir):
    counts = ingest_source(spark, lake, SourceConf(format="datacomp", path=str(datacomp_dir)))
    assert counts == {"read": 5, "quarantined": 2, "in_input_duplicates": 1, "blocked": 0, "new": 2,
                      "already_present": 0}
    bronze = lake.read(BRONZE)
    assert_same_rows(bronze, [(U1, "a red circle", 640, 480, "ab" * 32, 0.31),
                              (U3, "a green star", 256, 256, "12" * 32, 0.4)],
                     ["uid", "text", "width", "height", "sha256", "clip_l14_similarity_score"])
    reasons = quarantine_reasons(lake)
    assert reasons[0].startswith("duplicate uid within input; first at ")
    assert "part-0.parquet#0" in reasons[0]
    assert reasons[1:] == ["text: empty or missing caption", "uid: NOT-A-UID is not 32 hex characters"]
    q = lake.read(QUARANTINE).where("reason like 'uid:%'").first()
    assert q.source_file.endswith("part-0.parquet") and q.source_pos == 2


@pytest.mark.parametrize("broadcast_max", [0, 100_000])
def test_one_uid_throughout_keeps_the_first_row_on_either_join(spark, lake, tmp_path,
                                                               broadcast_max):
    """A pool whose uids are all identical (over 3 files): one row kept (the first by file and
    position), every other row quarantined as a duplicate of it, whether the duplicates' keys
    are broadcast or (cap 0) shuffle-joined."""
    d = tmp_path / "same"
    d.mkdir()
    for part in range(3):
        pd.DataFrame({"uid": [U2] * 4, "url": [f"http://b/{part}-{i}.jpg" for i in range(4)],
                      "text": [f"caption {part} {i}" for i in range(4)]}
                     ).to_parquet(d / f"part-{part}.parquet")
    raw = read_source(spark, SourceConf(format="datacomp", path=str(d))).repartition(3)
    counts = ingest_frame(lake, raw, "datacomp", "run-test", broadcast_duplicates=broadcast_max)
    assert counts == {"read": 12, "quarantined": 0, "in_input_duplicates": 11, "blocked": 0, "new": 1,
                      "already_present": 0}
    assert [r.url for r in lake.read(BRONZE).collect()] == ["http://b/0-0.jpg"]
    dups = lake.read(QUARANTINE).where(F.col("kind") == "duplicate")
    assert dups.count() == 11
    firsts = {r.reason.rsplit("/", 1)[-1] for r in dups.collect()}
    assert firsts == {"part-0.parquet#0"}


def test_reingest_adds_nothing(spark, lake, datacomp_dir):
    src = SourceConf(format="datacomp", path=str(datacomp_dir))
    ingest_source(spark, lake, src)
    again = ingest_source(spark, lake, src)
    assert again["new"] == 0 and again["already_present"] == 2
    assert lake.read(BRONZE).count() == 2
    assert lake.read(QUARANTINE).count() == 3


@pytest.mark.slow
def test_under_the_lease_new_rows_are_appended_not_merged(spark, lake, datacomp_dir):
    from etl.lease import hold

    src = SourceConf(format="datacomp", path=str(datacomp_dir))
    ingest_source(spark, lake, src)  # U1 and U3 (no lease: the table is created)
    more = datacomp_dir.parent / "more"
    more.mkdir()
    pd.DataFrame({"uid": [U1, U2], "url": ["http://m/1.jpg", "http://m/2.jpg"],
                  "text": ["again", "new"]}).to_parquet(more / "part-0.parquet")
    before = lake.version(BRONZE)
    with hold(lake, "run-lease", "ingest"):
        counts = ingest_source(spark, lake, SourceConf(format="datacomp", path=str(more)))
        again = ingest_source(spark, lake, SourceConf(format="datacomp", path=str(more)))
    assert (counts["new"], counts["already_present"]) == (1, 1)
    assert (again["new"], again["already_present"]) == (0, 2)
    assert sorted(r.uid for r in lake.read(BRONZE).collect()) == sorted([U1, U2, U3])
    ops = [r[0] for r in lake.history(BRONZE, lake.version(BRONZE) - before)
           .select("operation").collect()]
    assert ops == ["WRITE"]  # one append; nothing new made no commit


@pytest.mark.slow
def test_a_uid_another_writer_inserted_meanwhile_fails_loudly(spark, lake, datacomp_dir,
                                                             monkeypatch):
    from etl.lease import hold
    from etl.tables import Lakehouse

    ingest_source(spark, lake, SourceConf(format="datacomp", path=str(datacomp_dir)))
    more = datacomp_dir.parent / "more"
    more.mkdir()
    pd.DataFrame({"uid": [U2], "url": ["http://m/2.jpg"], "text": ["new"]}).to_parquet(
        more / "part-0.parquet")
    real = Lakehouse.append_counted

    def racing(self, df, table):  # a writer outside the lease inserts the same uid first
        self.append(df, table)
        return real(self, df, table)

    monkeypatch.setattr(Lakehouse, "append_counted", racing)
    with hold(lake, "run-race", "ingest"), pytest.raises(RuntimeError, match="twice"):
        ingest_source(spark, lake, SourceConf(format="datacomp", path=str(more)))


@pytest.mark.slow
def test_a_clean_input_leaves_an_empty_quarantine_that_later_rows_file_into(spark, lake, tmp_path,
                                                                           datacomp_dir):
    clean = tmp_path / "clean"
    clean.mkdir()
    pd.DataFrame({"uid": [U2, U3], "url": ["http://c/2.jpg", "http://c/3.jpg"],
                  "text": ["two", "three"]}).to_parquet(clean / "part-0.parquet")
    counts = ingest_source(spark, lake, SourceConf(format="datacomp", path=str(clean)))
    assert counts["new"] == 2 and counts["quarantined"] == counts["in_input_duplicates"] == 0
    assert lake.read(QUARANTINE).count() == 0
    empty = lake.read(QUARANTINE).schema
    before = lake.version(QUARANTINE)
    ingest_source(spark, lake, SourceConf(format="datacomp", path=str(clean)))  # a re-run
    assert lake.version(QUARANTINE) == before  # nothing to file: no commit

    counts = ingest_source(spark, lake, SourceConf(format="datacomp", path=str(datacomp_dir)))
    assert counts["quarantined"] + counts["in_input_duplicates"] == 3
    assert lake.read(QUARANTINE).schema == empty  # the bad rows' own columns, created up front
    assert len(quarantine_reasons(lake)) == 3


@pytest.mark.parametrize("table,fault,message", [
    (BRONZE, "lost", "ingest counts do not add up"),
    (BRONZE, "doubled", "ingest counts do not add up"),
    (QUARANTINE, "lost", "quarantine holds 2 of this input's 3"),
])
def test_count_identity_catches_a_lost_or_doubled_row(spark, lake, datacomp_dir, monkeypatch,
                                                      table, fault, message):
    """Each term is counted on its own, so an insert that loses or doubles a row is caught."""
    from etl.tables import Lakehouse

    real = Lakehouse.insert_new

    def faulty(self, df, into, keys):
        if into == table and fault == "lost":
            df = df.orderBy(*keys).offset(1)
        elif into == table:
            df = df.unionByName(df.orderBy(*keys).limit(1))
        return real(self, df, into, keys)

    monkeypatch.setattr(Lakehouse, "insert_new", faulty)
    with pytest.raises(RuntimeError, match=message):
        ingest_source(spark, lake, SourceConf(format="datacomp", path=str(datacomp_dir)))


def test_missing_required_column_fails_before_any_write(spark, lake, tmp_path):
    d = tmp_path / "bad"
    d.mkdir()
    pd.DataFrame({"uid": [U1], "caption": ["x"]}).to_parquet(d / "p.parquet")
    with pytest.raises(InputError, match="missing required column.*url, text"):
        read_source(spark, SourceConf(format="datacomp", path=str(d)))
    assert not lake.exists(BRONZE)


def test_csv_reader_hashes_uid_and_quarantines_malformed(spark, lake, tmp_path):
    p = tmp_path / "pairs.csv"
    p.write_text('url,caption,lang\n'
                 'http://x/1.jpg,"a cat, sitting",en\n'
                 'http://x/2.jpg,,en\n'
                 'http://x/3.jpg,a dog,en,EXTRA\n'
                 ',no url,en\n'
                 'http://x/1.jpg,"a cat, sitting",en\n')
    counts = ingest_source(spark, lake, SourceConf(format="csv", path=str(p)))
    assert counts["read"] == 5 and counts["new"] == 1 and counts["in_input_duplicates"] == 1
    assert counts["quarantined"] == 3
    row = lake.read(BRONZE).first()
    import hashlib

    assert row.uid == hashlib.md5(b"http://x/1.jpg\x00a cat, sitting").hexdigest()
    assert row.lang == "en" and row.image is None
    reasons = quarantine_reasons(lake)
    assert any(r.startswith("malformed row") for r in reasons)
    assert "url: empty or missing" in reasons


def test_tsv_reader_with_custom_columns(spark, lake, tmp_path):
    p = tmp_path / "cc.tsv"
    p.write_text("caption\timage_url\nA tree\thttp://y/1\nA car\thttp://y/2\n")
    src = SourceConf(format="tsv", path=str(p), url_column="image_url", text_column="caption")
    counts = ingest_source(spark, lake, src)
    assert counts["new"] == 2
    assert_same_rows(lake.read(BRONZE), [("http://y/1", "A tree"), ("http://y/2", "A car")],
                     ["url", "text"])


@pytest.fixture
def shards(tmp_path):
    d = tmp_path / "shards"
    d.mkdir()
    with tarfile.open(d / "00000.tar", "w") as tar:
        add(tar, "000.jpg", tiny_jpeg(40, 30))
        add(tar, "000.txt", b"a red box")
        add(tar, "000.json", json.dumps({"url": "http://s/0", "score_x": 0.5}).encode())
        add(tar, "001.txt", b"caption without image")
        add(tar, "001.json", json.dumps({"url": "http://s/1"}).encode())
        add(tar, "002.png", tiny_jpeg())
        add(tar, "002.txt", b"\xff\xfe not utf8")
        add(tar, "002.json", b'{"url": "http://s/2"}')
    with tarfile.open(d / "00001.tar", "w") as tar:
        add(tar, "100.jpg", b"not really an image")
        add(tar, "100.json", json.dumps({"url": "http://s/100", "caption": "from json",
                                         "uid": U3}).encode())
        add(tar, "101.jpg", tiny_jpeg(20, 10))
        add(tar, "101.txt", b"broken json")
        add(tar, "101.json", b"{oops")
    pd.DataFrame({"key": ["000", "999"], "url": ["http://s/0", "http://dead/9"],
                  "caption": ["a red box", "gone"], "status": ["success", "failed_to_download"],
                  "error_message": [None, "timeout"]}).to_parquet(d / "00000.parquet")
    return d


def test_webdataset_reader(spark, lake, shards, read_on):
    counts = ingest_source(spark, lake, SourceConf(format="img2dataset", path=str(shards)))
    assert counts == {"read": 6, "quarantined": 4, "in_input_duplicates": 0, "blocked": 0, "new": 2,
                      "already_present": 0}
    rows = {r.url: r for r in lake.read(BRONZE).collect()}
    assert rows["http://s/0"].width == 40 and rows["http://s/0"].height == 30
    assert rows["http://s/0"].score_x == 0.5 and rows["http://s/0"].key == "000"
    assert rows["http://s/100"].uid == U3 and rows["http://s/100"].text == "from json"
    assert rows["http://s/100"].width is None  # undecodable bytes: left for scoring to report
    reasons = quarantine_reasons(lake)
    assert "img2dataset status=failed_to_download: timeout" in reasons
    assert "missing image member (.jpg/.png/.webp) for key 001" in reasons
    assert any(r.startswith("text: not valid UTF-8 (member 002.txt") for r in reasons)
    assert any(r.startswith("101.json is not valid JSON") for r in reasons)


def test_a_small_source_is_read_on_the_driver_a_larger_one_on_the_executors(
        spark, shards, read_on):
    df = read_source(spark, SourceConf(format="img2dataset", path=str(shards)))
    plan = df._jdf.queryExecution().executedPlan().toString()
    assert ("MapInPandas" in plan) == (read_on == "executors")
    assert df.where("error is null").count() == 2


def test_json_schema_is_img2dataset_plus_the_keys_of_its_sample(spark):
    sample = [json.dumps({"url": "u0", "extra_a": 1}),
              json.dumps({"url": "u1", "original_width": 7, "late": "x"})]
    first = json_schema(spark, sample[:1])
    assert first.fieldNames() == [*IMG2DATASET_JSON.fieldNames(), "extra_a"]
    assert first["original_width"].dataType.simpleString() == "bigint"
    assert json_schema(spark, sample).fieldNames()[-2:] == ["extra_a", "late"]
    # img2dataset's own keys alone: its schema, with no Spark inference (no session is needed)
    own = json.dumps({"url": "u", "caption": "c", "width": 3, "status": "success"})
    assert json_schema(None, [own, own]) == IMG2DATASET_JSON
    # Spark reads single quotes, Python's parser does not: such values are left to Spark
    assert json_schema(spark, [own, "{'url': 'u', 'odd': 1}"]).fieldNames()[-1] == "odd"


@pytest.mark.parametrize("values, flat", [
    ([{"n": 1}, {"n": 2.5}, {"n": None}], True),             # long + double: double
    ([{"b": True}, {"b": 1}], True),                         # boolean + long: string
    ([{"z": None}, {"z": None}], True),                      # null only: string
    ([{"s": "x", "f": 1e400, "i": -(2**63)}, {"s": 3, "f": float("nan")}], True),
    ([{"B": 1, "a": False, "é k": "v", "url": 5}, {}], True),  # name order; url keeps its type
    ([{"big": 2**63}], False),                               # beyond long: Spark decides
    ([{"nested": {"x": 1}}, {"nested": None}], False),       # nested: Spark decides
    ([{"arr": [1, 2]}], False),
])
def test_json_schema_types_extra_keys_as_spark_inference_does(spark, values, flat):
    sample = [json.dumps(v) for v in values]
    inferred = spark.read.json(spark.sparkContext.parallelize(sample, 1)).schema
    known = set(IMG2DATASET_JSON.fieldNames())
    expected = [*IMG2DATASET_JSON.fields, *(f for f in inferred.fields if f.name not in known)]
    # flat scalars are typed without Spark (no session given), the rest by Spark's inference
    assert json_schema(None if flat else spark, sample).fields == expected


def test_shard_json_sample_stops_at_its_row_and_byte_bounds(shards):
    listed = sorted((str(p), p.stat().st_size) for p in shards.glob("*.tar"))
    caps = TarCaps(SourceConf().max_member_bytes, SourceConf().max_shard_bytes)
    every = shard_json_sample(listed, Store(), caps, 100)
    assert [json.loads(j)["url"] for j in every] == ["http://s/0", "http://s/1", "http://s/2",
                                                      "http://s/100"]  # 101.json is not JSON
    assert shard_json_sample(listed, Store(), caps, 2) == every[:2]
    assert shard_json_sample(listed, Store(), caps, 100, max_bytes=1) == every[:1]


def test_image_folder_reader(spark, lake, tmp_path):
    d = tmp_path / "imgs" / "sub"
    d.mkdir(parents=True)
    (d / "a.jpg").write_bytes(tiny_jpeg(50, 60))
    (d / "a.txt").write_text("an apple\n")
    (d / "a.json").write_text(json.dumps({"label_shape": "circle"}))
    (d / "b.png").write_bytes(tiny_jpeg())
    (d / "c.txt").write_text("orphan caption")
    counts = ingest_source(spark, lake, SourceConf(format="folder", path=str(tmp_path / "imgs")))
    assert counts["new"] == 1 and counts["quarantined"] == 2 and counts["read"] == 3
    row = lake.read(BRONZE).first()
    assert (row.text, row.width, row.height, row.label_shape) == ("an apple", 50, 60, "circle")
    assert row.url.endswith("sub/a.jpg")
    assert quarantine_reasons(lake) == ["caption file without an image",
                                        "no caption file (expected stem.txt)"]


def test_bronze_sha256_is_of_the_bytes(spark, lake, shards):
    import hashlib

    ingest_source(spark, lake, SourceConf(format="webdataset", path=str(shards)))
    row = lake.read(BRONZE).where(F.col("url") == "http://s/0").first()
    assert row.sha256 == hashlib.sha256(row.image).hexdigest()


def test_captions_are_trimmed_of_ascii_whitespace_only_as_before(spark):
    """The uid of a pair without one is md5(url, caption): the trimmed caption must stay what
    the regex ``^\\s+|\\s+$`` (Java's ASCII \\s) made it, or a re-ingest would mint new uids."""
    import re

    from etl.ingest import normalize

    texts = [" a b ", "\t\n\x0b\f\ra\r\n", "\u00a0a\u3000", "a \u2003", "  ", "a", "\u2028 x\n"]
    raw = spark.createDataFrame([(f"http://u/{i}", t) for i, t in enumerate(texts)],
                                "url string, text string").withColumns(
        {"uid": F.lit(None).cast("string"), "error": F.lit(None).cast("string"),
         "width": F.lit(None).cast("int"), "height": F.lit(None).cast("int"),
         "sha256": F.lit(None).cast("string"), "image": F.lit(None).cast("binary")})
    got = {r.url: r.text for r in normalize(raw, "s", "r", images=False).collect()}
    assert got == {f"http://u/{i}": re.sub(r"^[ \t\n\x0b\f\r]+|[ \t\n\x0b\f\r]+$", "", t)
                   for i, t in enumerate(texts)}
