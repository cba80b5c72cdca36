"""Hostile input at ingest (issue #11): tar member and shard size caps (plain and gzip shards),
caption length, non-UTF-8 bytes from every reader, quoted newlines in CSV/TSV, a key repeated
inside one shard, and files of one source that disagree on a column's type or header."""

from __future__ import annotations

import json
import tarfile

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from etl import inputcheck
from etl.config import Config, ConfigError, IngestConf, SourceConf, load_config
from etl.ingest import ingest
from etl.readers import InputError, read_source
from etl.tables import BRONZE, QUARANTINE
from tests.helpers.images import tiny_jpeg
from tests.helpers.ingest import U1, U2, U3, add, ingest_source, quarantine_reasons


def write_tar(path, samples: list[tuple[str, bytes, bytes]], gz: bool = False) -> None:
    """A shard of (key, image bytes, caption bytes) samples, each with a .json holding its url."""
    with tarfile.open(path, "w:gz" if gz else "w") as tar:
        for key, image, text in samples:
            add(tar, f"{key}.jpg", image)
            add(tar, f"{key}.txt", text)
            add(tar, f"{key}.json", json.dumps({"url": f"http://s/{path.name}/{key}"}).encode())


def bronze_texts(lake) -> list[str]:
    return sorted(r.text for r in lake.read(BRONZE).collect())


def test_oversize_member_is_quarantined_unread_in_plain_and_gzip_shards(spark, lake, tmp_path,
                                                                        read_on):
    d = tmp_path / "shards"
    d.mkdir()
    write_tar(d / "00000.tar", [("000", tiny_jpeg(), b"ok tar"), ("001", b"x" * 5000, b"big")])
    write_tar(d / "00001.tar.gz", [("100", tiny_jpeg(), b"ok gz"), ("101", b"y" * 5000, b"big")],
              gz=True)
    write_tar(d / "00002.tgz", [("200", tiny_jpeg(), b"ok tgz")], gz=True)
    src = SourceConf(format="webdataset", path=str(d), max_member_bytes=4000)
    counts = ingest_source(spark, lake, src)
    assert counts == {"read": 5, "quarantined": 2, "in_input_duplicates": 0, "blocked": 0, "new": 3,
                      "already_present": 0}
    assert bronze_texts(lake) == ["ok gz", "ok tar", "ok tgz"]
    for shard, member in (("00000.tar", "001.jpg"), ("00001.tar.gz", "101.jpg")):
        (reason,) = [r for r in quarantine_reasons(lake) if shard in r]
        assert reason == (f"member {member} of shard {d / shard} is 5000 bytes, over "
                          "max_member_bytes 4000: not loaded; raise "
                          "ingest.sources[].max_member_bytes to ingest it")


def test_shard_over_the_cap_is_quarantined_whole_and_a_gzip_bomb_stops_at_it(spark, lake,
                                                                             tmp_path, read_on):
    d = tmp_path / "shards"
    d.mkdir()
    write_tar(d / "00000.tar", [(f"00{i}", b"z" * 6000, b"in a big shard") for i in range(3)])
    write_tar(d / "00001.tar", [("100", tiny_jpeg(), b"small shard")])
    write_tar(d / "00002.tar.gz", [(f"20{i}", bytes(6000), f"bomb {i}".encode())
                                   for i in range(4)], gz=True)
    big = (d / "00000.tar").stat().st_size
    assert big > 20_000 > (d / "00002.tar.gz").stat().st_size
    counts = ingest_source(spark, lake, SourceConf(format="img2dataset", path=str(d),
                                                   max_shard_bytes=20_000))
    assert counts == {"read": 6, "quarantined": 2, "in_input_duplicates": 0, "blocked": 0, "new": 4,
                      "already_present": 0}
    assert bronze_texts(lake) == ["bomb 0", "bomb 1", "bomb 2", "small shard"]
    q = {r.source_file.rsplit("/", 1)[-1]: r for r in lake.read(QUARANTINE).collect()}
    assert q["00000.tar"].reason == (
        f"shard {d / '00000.tar'} is {big} bytes, over max_shard_bytes 20000: not read; "
        "raise ingest.sources[].max_shard_bytes to ingest it")
    assert q["00002.tar.gz"].reason.startswith(
        f"shard {d / '00002.tar.gz'} holds over max_shard_bytes 20000 bytes once decompressed;"
        " key 203 and the rest of the shard not read")
    assert q["00002.tar.gz"].source_pos == 3


@pytest.mark.parametrize("text, needle", [
    ("ingest: {sources: [{format: img2dataset, path: a, max_member_bytes: 0}]}",
     "ingest source [0].max_member_bytes: must be > 0"),
    ("ingest: {sources: [{format: img2dataset, path: a, max_shard_bytes: -1}]}",
     "ingest source [0].max_shard_bytes: must be > 0"),
    ("ingest: {max_caption_chars: 0}", "ingest.max_caption_chars: must be > 0"),
])
def test_caps_are_validated_up_front(tmp_path, text, needle):
    p = tmp_path / "c.yaml"
    p.write_text(text)
    with pytest.raises(ConfigError) as err:
        load_config(p)
    assert needle in str(err.value)


def test_caption_over_max_caption_chars_is_quarantined(spark, lake, tmp_path):
    d = tmp_path / "csv"
    d.mkdir()
    (d / "a.csv").write_text(f"url,caption\nhttp://x/1,short\nhttp://x/2,{'w' * 10_001}\n")
    (d / "b.csv").write_text("url,caption\nhttp://x/3,fine\n")
    counts = ingest_source(spark, lake, SourceConf(format="csv", path=str(d)))
    assert counts["read"] == 3 and counts["new"] == 2 and counts["quarantined"] == 1
    assert quarantine_reasons(lake) == [
        "text: caption is 10001 characters, over ingest.max_caption_chars 10000; raise it to "
        "keep such captions"]
    assert len(lake.read(QUARANTINE).first().text) == 1000  # the quarantine keeps a prefix


def _csv_case(d):
    (d / "a.csv").write_bytes(b"url,caption\nhttp://x/1,caf\xe9 in latin-1\n"
                              b"http://x/2,caf\xc3\xa9 in utf-8\n")
    (d / "b.csv").write_bytes(b"url,caption\nhttp://x/3,plain\n")
    return SourceConf(format="csv", path=str(d)), "column caption"


def _datacomp_case(d):
    text = pa.array([b"caf\xe9 in latin-1", "café in utf-8".encode()], pa.binary()).view(pa.string())
    pq.write_table(pa.table({"uid": [U1, U2], "url": ["http://a/1", "http://a/2"], "text": text}),
                   d / "p0.parquet")
    pq.write_table(pa.table({"uid": [U3], "url": ["http://a/3"], "text": ["plain"]}),
                   d / "p1.parquet")
    return SourceConf(format="datacomp", path=str(d)), "column text"


def _folder_case(d):
    for stem, caption in (("a", b"caf\xe9 in latin-1"), ("b", "café in utf-8".encode()),
                          ("c", b"plain")):
        (d / f"{stem}.jpg").write_bytes(tiny_jpeg())
        (d / f"{stem}.txt").write_bytes(caption)
    return SourceConf(format="folder", path=str(d)), "caption file"


def _webdataset_case(d):
    write_tar(d / "00000.tar", [("000", tiny_jpeg(), b"caf\xe9 in latin-1"),
                                ("001", tiny_jpeg(), "café in utf-8".encode())])
    write_tar(d / "00001.tar", [("100", tiny_jpeg(), b"plain")])
    return SourceConf(format="webdataset", path=str(d)), "member 000.txt, byte 3"


@pytest.mark.parametrize("case", [_csv_case, _datacomp_case, _folder_case, _webdataset_case])
def test_non_utf8_caption_is_quarantined_by_every_reader(spark, lake, tmp_path, case):
    src, where = case(tmp_path)
    counts = ingest_source(spark, lake, src)
    assert counts["read"] == 3 and counts["new"] == 2 and counts["quarantined"] == 1
    assert bronze_texts(lake) == ["café in utf-8", "plain"]
    assert quarantine_reasons(lake) == [f"text: not valid UTF-8 ({where})"]


def test_non_utf8_json_member_is_quarantined(spark, lake, tmp_path, read_on):
    with tarfile.open(tmp_path / "00000.tar", "w") as tar:
        add(tar, "000.jpg", tiny_jpeg())
        add(tar, "000.json", b'{"url": "http://s/0", "caption": "caf\xe9"}')
    ingest_source(spark, lake, SourceConf(format="webdataset", path=str(tmp_path)))
    (reason,) = quarantine_reasons(lake)
    assert reason.startswith("json: not valid UTF-8 (member 000.json, byte ")


@pytest.mark.parametrize("fmt, sep", [("csv", ","), ("tsv", "\t")])
def test_quoted_newlines_stay_inside_the_field(spark, lake, tmp_path, fmt, sep):
    d = tmp_path / fmt
    d.mkdir()
    (d / f"a.{fmt}").write_text(f'url{sep}caption\nhttp://x/1{sep}"line one\nline two"\n'
                                f"http://x/2{sep}plain\n")
    (d / f"b.{fmt}").write_text(f'url{sep}caption\nhttp://x/3{sep}"a\r\nb, {sep} c"\n')
    counts = ingest_source(spark, lake, SourceConf(format=fmt, path=str(d)))
    assert counts["read"] == 3 and counts["new"] == 3, quarantine_reasons(lake)
    assert bronze_texts(lake) == [f"a\r\nb, {sep} c", "line one\nline two", "plain"]


def test_a_key_repeated_in_one_shard_is_a_duplicate_key(spark, lake, tmp_path, read_on):
    shard = tmp_path / "00000.tar"
    with tarfile.open(shard, "w") as tar:
        for key, text in (("000", b"first"), ("001", b"other"), ("000", b"second copy")):
            add(tar, f"{key}.jpg", tiny_jpeg())
            add(tar, f"{key}.txt", text)
            add(tar, f"{key}.json", json.dumps({"url": f"http://s/{key}/{text!r}"}).encode())
        add(tar, "002.jpg", tiny_jpeg())
        add(tar, "002.jpg", tiny_jpeg(8, 8))
        add(tar, "002.txt", b"two images")
    write_tar(tmp_path / "00001.tar", [("000", tiny_jpeg(), b"same key, other shard")])
    counts = ingest_source(spark, lake, SourceConf(format="webdataset", path=str(tmp_path)))
    assert counts["read"] == 5 and counts["new"] == 3 and counts["quarantined"] == 2
    assert bronze_texts(lake) == ["first", "other", "same key, other shard"]
    q = {r.source_pos: r.reason for r in lake.read(QUARANTINE).collect()}
    assert q == {2: f"duplicate key 000 in shard {shard}; first at position 0",
                 3: f"duplicate member 002.jpg in shard {shard}"}


def _metadata(n: int, width) -> pd.DataFrame:
    return pd.DataFrame({"uid": [f"{n:032x}"], "url": [f"http://a/{n}"], "text": [f"t{n}"],
                         "original_width": [width]})


@pytest.fixture(params=["driver", "executors"])
def check_on(request, monkeypatch):
    """Run the files-agree checks on the driver (a few files) and on the executors (many)."""
    if request.param == "executors":
        monkeypatch.setattr(inputcheck, "LOCAL_CHECK_FILES", 0)
    return request.param


def test_parquet_file_with_another_column_type_stops_before_any_write(spark, lake, tmp_path,
                                                                      check_on):
    d = tmp_path / "metadata"
    d.mkdir()
    for i in range(4):
        _metadata(i, "640" if i == 2 else 640).to_parquet(d / f"part-{i}.parquet")
    cfg = Config(ingest=IngestConf(sources=[SourceConf(format="datacomp", path=str(d))]))
    with pytest.raises(InputError) as err:
        ingest(spark, cfg, lake, "run-x")
    msg = str(err.value)
    assert "\n" not in msg
    assert f"{d / 'part-2.parquet'} has original_width as byte_array (String)" in msg
    assert f"but 3 other file(s) (e.g. {d / 'part-0.parquet'}) have int64;" in msg
    assert not lake.exists(BRONZE) and not lake.exists(QUARANTINE)


def test_an_all_null_column_agrees_with_any_type(spark, tmp_path, check_on):
    d = tmp_path / "metadata"
    d.mkdir()
    for i in range(3):
        _metadata(i, None if i == 1 else 640).to_parquet(d / f"part-{i}.parquet")
    raw = read_source(spark, SourceConf(format="datacomp", path=str(d)))
    widths = [r.width for r in raw.select("width").collect()]
    assert sorted(widths, key=lambda w: -1 if w is None else w) == [None, 640, 640]


def test_sidecar_parquet_with_another_column_type_stops_with_one_line(spark, tmp_path,
                                                                      check_on):
    write_tar(tmp_path / "00000.tar", [("000", tiny_jpeg(), b"a")])
    pd.DataFrame({"key": ["000"], "status": ["success"]}).to_parquet(tmp_path / "00000.parquet")
    pd.DataFrame({"key": [1], "status": ["failed_to_download"]}).to_parquet(
        tmp_path / "00001.parquet")
    with pytest.raises(InputError, match=r"00001\.parquet has key as int64, but 1 other file"):
        read_source(spark, SourceConf(format="img2dataset", path=str(tmp_path)))


def test_csv_files_with_different_headers_stop_with_one_line(spark, tmp_path, check_on):
    (tmp_path / "a.csv").write_text("url,caption\nhttp://x/1,one\n")
    (tmp_path / "b.csv").write_text("url,caption\nhttp://x/2,two\n")
    (tmp_path / "c.csv").write_text("caption,url\nthree,http://x/3\n")
    with pytest.raises(InputError, match=r"c\.csv has header as caption, url, but 2 other "
                                         r"file\(s\) \(e\.g\. .*a\.csv\) have url, caption;"):
        read_source(spark, SourceConf(format="csv", path=str(tmp_path)))
