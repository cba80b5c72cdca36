"""Export: DataComp uids.npy layout, WebDataset shards, atomic publish, the edge step."""

from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import etl.export as export
from etl.config import Config, ConfigError, ExportConf, LakehouseConf
from etl.export import export_files, read_export, write_shards
from etl.exportdiff import run_export
from etl.spark import session_conf
from etl.tables import BRONZE, GOLD, RUN_STATS, SELECTION
from etl.uidfile import UID_DTYPE, merge_uids_npy, uid_pairs, uid_strings, write_uids_npy
from tests.helpers.images import SMALL_CAP, encode, header_bomb, jpeg

GOLD_SCHEMA = ("uid string, url string, text string, image binary, width int, height int, "
               "score double")


def uid(i: int) -> str:
    # spread over the whole 128-bit range, high bit set for half of them
    return f"{(i * 0x9E3779B97F4A7C15F39CC0605CEDC834) % (1 << 128):032x}"


def image_bytes(fmt: str, color=(200, 30, 30)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (32, 24), color).save(buf, format=fmt)
    return buf.getvalue()


def gold_rows(n: int, null_image: int = 1):
    fmts = ["JPEG", "PNG", "GIF", "WEBP"]
    rows = [(uid(i), f"https://x.example/{i}.jpg", f"caption {i}",
             image_bytes(fmts[i % 4], (i * 20 % 255, 40, 90)), 32, 24, 1.0 - i / 100)
            for i in range(n)]
    for i in range(null_image):
        rows.append((uid(n + i), f"https://x.example/meta{i}", "metadata only", None, None,
                     None, 0.3))
    return rows


def gold_df(spark, rows, parts=3):
    return spark.sparkContext.parallelize(rows, parts).toDF(GOLD_SCHEMA)


def test_uid_pairs_round_trip_and_order():
    uids = sorted(uid(i) for i in range(50))
    arr = uid_pairs(uids)
    assert arr.dtype == UID_DTYPE and len(arr) == 50
    assert uid_strings(arr) == uids
    assert arr[0]["f0"] == int(uids[0][:16], 16) and arr[0]["f1"] == int(uids[0][16:], 16)
    pairs = [tuple(x) for x in arr.tolist()]
    assert pairs == sorted(pairs)  # hex order == (hi, lo) numeric order


def test_write_uids_npy_sorted_unique_in_parts(spark, tmp_path):
    uids = [uid(i) for i in range(40)]
    dup_rows = [(u,) for u in uids] + [(uids[3],), (uids[7],)]
    df = spark.sparkContext.parallelize(dup_rows, 4).toDF("uid string")
    path = tmp_path / "uids.npy"
    assert write_uids_npy(df, str(path), rows_per_part=15) == 40  # several range parts
    arr = np.load(path)
    assert arr.dtype == np.dtype("u8,u8") and arr.shape == (40,)
    assert uid_strings(arr) == sorted(uids)
    assert list(tmp_path.iterdir()) == [path]  # part files cleaned up
    bad = spark.createDataFrame([("NOT-HEX",)], "uid string")
    with pytest.raises(ValueError, match="hex"):
        write_uids_npy(bad, tmp_path / "bad.npy")


def test_a_few_uids_are_written_by_the_driver_with_the_same_bytes(spark, tmp_path):
    uids = [uid(i) for i in (9, 2, 30, 2)]
    df = spark.createDataFrame([(u,) for u in uids], "uid string").repartition(3)
    assert write_uids_npy(df, tmp_path / "spark.npy") == 3
    assert write_uids_npy(df, tmp_path / "driver.npy", rows=4) == 3
    assert (tmp_path / "driver.npy").read_bytes() == (tmp_path / "spark.npy").read_bytes()
    with pytest.raises(ValueError, match="hex"):
        write_uids_npy(spark.createDataFrame([("ABC",)], "uid string"), tmp_path / "b.npy",
                       rows=1)


@pytest.mark.parametrize("chunk", [1, 2, 5, 1000])
def test_merged_uid_file_equals_the_sorted_set(tmp_path, chunk):
    def save(name, ids):
        np.save(tmp_path / name, uid_pairs(sorted(uid(i) for i in ids)) if ids
                else np.zeros(0, UID_DTYPE))
        return str(tmp_path / name)

    base, added, removed = set(range(0, 40, 2)), {1, 3, 41, 99}, {0, 10, 38}
    n = merge_uids_npy(save("b.npy", base), save("a.npy", added), save("r.npy", removed),
                       str(tmp_path / "o.npy"), chunk=chunk)
    want = sorted(uid(i) for i in (base - removed) | added)
    assert n == len(want) and uid_strings(np.load(tmp_path / "o.npy")) == want
    with pytest.raises(ValueError, match="already in the base"):
        merge_uids_npy(save("b.npy", base), save("a.npy", {2}), save("r.npy", set()),
                       str(tmp_path / "o.npy"), chunk=chunk)
    with pytest.raises(ValueError, match="not in the base"):
        merge_uids_npy(save("b.npy", base), save("a.npy", set()), save("r.npy", {7}),
                       str(tmp_path / "o.npy"), chunk=chunk)


def test_empty_uids_npy(spark, tmp_path):
    df = spark.createDataFrame([], "uid string")
    assert write_uids_npy(df, tmp_path / "e.npy") == 0
    assert np.load(tmp_path / "e.npy").shape == (0,)


def test_shards_readable_by_webdataset_with_counts(spark, tmp_path):
    import webdataset as wds

    rows = gold_rows(11)
    stats = write_shards(gold_df(spark, rows), tmp_path / "shards", shard_size=4)
    assert [s["name"] for s in stats] == ["00000.tar", "00001.tar", "00002.tar"]
    assert [s["count"] for s in stats] == [4, 4, 3] and sum(s["skipped"] for s in stats) == 0
    urls = [str(tmp_path / "shards" / s["name"]) for s in stats]
    samples = list(wds.WebDataset(urls, shardshuffle=False))
    assert len(samples) == 11
    by_uid = {r[0]: r for r in rows}
    exts = set()
    for s in samples:
        meta = json.loads(s["json"])
        assert s["__key__"] == meta["uid"] and meta["url"] == by_uid[meta["uid"]][1]
        assert s["txt"].decode() == by_uid[meta["uid"]][2]
        assert meta["score"] == pytest.approx(by_uid[meta["uid"]][6])
        ext = next(k for k in ("jpg", "png", "webp") if k in s)
        exts.add(ext)
        Image.open(io.BytesIO(s[ext])).verify()
    assert exts == {"jpg", "png", "webp"}  # GIF re-encoded to jpg
    with tarfile.open(urls[0]) as tar:
        names = tar.getnames()
    assert len(names) == 12 and names[0].endswith((".jpg", ".png", ".webp"))
    assert not list((tmp_path / "shards").glob(".*"))  # no temporary files left


def read_manifest(out):
    return json.loads((out / "manifest.json").read_text())


@pytest.mark.slow
def test_export_publishes_by_manifest_and_survives_a_crash(spark, tmp_path, monkeypatch):
    out = tmp_path / "export"
    conf = ExportConf(out_dir=str(out), shard_size=5)
    first = export_files(gold_df(spark, gold_rows(12)), out, conf, "run-a")
    run_a = out / "runs" / "run-a"
    wds_part = first["webdataset"]
    assert first["kept"] == 13 and first["uids_npy"]["count"] == 13
    assert first["run_dir"] == str(run_a) and first["uids_npy"]["path"] == str(run_a / "uids.npy")
    assert wds_part["samples"] == 12 and wds_part["pattern"] == "{00000..00002}.tar"
    assert wds_part["train_data"] == str(run_a / "shards" / "{00000..00002}.tar")
    from braceexpand import braceexpand

    assert all((run_a / "shards" / p).exists() for p in braceexpand(wds_part["pattern"]))
    assert read_manifest(out) == first == read_export(str(out)) == read_manifest(run_a)
    assert sorted(p.name for p in run_a.iterdir()) == ["_dfn_export", "manifest.json",
                                                       "shard_index.parquet", "shards",
                                                       "uids.npy", "urls.parquet"]
    assert uid_strings(np.load(run_a / "uids.npy")) == sorted(r[0] for r in gold_rows(12))
    urls = spark.read.parquet(str(run_a / "urls.parquet"))
    assert urls.columns == ["url", "caption", "uid"] and urls.count() == 13
    tree_a = tree(run_a)

    def boom(*args):
        raise RuntimeError("killed before publishing")

    monkeypatch.setattr(export, "write_manifest", boom)
    with pytest.raises(RuntimeError):
        export_files(gold_df(spark, gold_rows(3)), out, conf, "run-b")
    monkeypatch.undo()
    assert read_export(str(out)) == first  # the previous export is still the published one
    real = export.write_manifest

    def publish_boom(store, folder, manifest):
        if folder == str(out):
            raise RuntimeError("killed while publishing")
        real(store, folder, manifest)

    monkeypatch.setattr(export, "write_manifest", publish_boom)
    with pytest.raises(RuntimeError, match="while publishing"):
        export_files(gold_df(spark, gold_rows(3)), out, conf, "run-b2")
    monkeypatch.undo()
    assert (out / "runs" / "run-b2" / "manifest.json").exists()  # written, never published
    assert read_export(str(out)) == first and tree(run_a) == tree_a
    assert len(list((run_a / "shards").glob("*.tar"))) == 3  # and every file it names is there
    assert not (out / "runs" / "run-b" / "manifest.json").exists()  # the crashed run: unpublished

    (out / "runs" / "notes").mkdir()  # a folder that is not an export run is never removed
    second = export_files(gold_df(spark, gold_rows(3, null_image=0)), out, conf, "run-c")
    assert read_manifest(out)["run_id"] == "run-c" and second["webdataset"]["samples"] == 3
    assert second["webdataset"]["pattern"] == "00000.tar"
    # published run + the one before it are kept; run-b2 (finished, never published) is
    # pruned; run-b has no run manifest: it may be a run still being written, left alone
    assert sorted(p.name for p in (out / "runs").iterdir()) == ["notes", "run-a", "run-b",
                                                                "run-c"]
    export_files(gold_df(spark, gold_rows(2, null_image=0)), out, conf, "run-d")
    assert sorted(p.name for p in (out / "runs").iterdir()) == ["notes", "run-b", "run-c",
                                                                "run-d"]
    with pytest.raises(ValueError, match="already exists"):
        export_files(gold_df(spark, gold_rows(2)), out, conf, "run-d")


def tree(root: Path) -> dict[str, tuple[int, int]]:
    """Every file under ``root``: relative path -> (size, mtime_ns)."""
    return {str(p.relative_to(root)): (p.stat().st_size, p.stat().st_mtime_ns)
            for p in root.rglob("*") if p.is_file()}


@pytest.mark.slow
def test_run_export_refuses_folders_that_are_not_exports_before_any_write(spark, lake, tmp_path):
    rows = gold_rows(4)
    lake.overwrite(gold_df(spark, rows).drop("score"), BRONZE)
    lake.overwrite(spark.createDataFrame([(r[0], True, None, r[6]) for r in rows],
                                         "uid string, kept boolean, drop_reason string, "
                                         "score double"), SELECTION)
    (Path(lake.root) / "raw").mkdir()
    (Path(lake.root) / "raw" / "notes.txt").write_text("not an export")
    home = tmp_path / "home"
    (home / "docs").mkdir(parents=True)
    (home / "docs" / "cv.txt").write_text("keep me")
    with_table = tmp_path / "old-export"
    with_table.mkdir()
    (with_table / "_dfn_export").write_text(export.FORMAT)
    (with_table / "t" / "_delta_log").mkdir(parents=True)
    cases = {".": "is the lakehouse root", "": "is the lakehouse root",
             "..": "holds the lakehouse root", str(tmp_path): "holds the lakehouse root",
             BRONZE: "is a Delta table folder", f"{BRONZE}/export": "is inside .* Delta table",
             "raw": "is not empty \\(notes.txt\\) and is not a dfn-curate export",
             str(home): "is not empty \\(docs\\)", str(with_table): "holds Delta table"}
    before = tree(tmp_path)
    for out_dir, message in cases.items():
        cfg = Config(lakehouse=LakehouseConf(root=str(lake.root)),
                     export=ExportConf(out_dir=out_dir, shard_size=2))
        with pytest.raises(ConfigError, match=message) as err:
            run_export(lake, cfg, "run-x")
        assert "export.out_dir" in str(err.value) and "set export.out_dir" in str(err.value)
        assert tree(tmp_path) == before, out_dir  # nothing written, nothing removed
    assert not lake.exists(GOLD)
    # an empty folder is claimed; an earlier export (marker or published manifest) is reused
    (tmp_path / "empty").mkdir()
    for i, out_dir in enumerate([str(tmp_path / "empty"), str(tmp_path / "empty"), "export",
                                 "export"]):
        cfg = Config(lakehouse=LakehouseConf(root=str(lake.root)),
                     export=ExportConf(out_dir=out_dir, shard_size=2))
        # the second export into a folder changes nothing: the first stays published
        assert run_export(lake, cfg, f"run-{i}")["run_id"] == f"run-{i - i % 2}"
    assert (tmp_path / "empty" / "_dfn_export").exists() and read_export(str(tmp_path / "empty"))
    (Path(lake.resolve("export")) / "_dfn_export").unlink()  # published by an older version
    assert export.is_export_dir(lake.resolve("export"), lake.store)


def test_out_dir_checks_work_for_any_url():
    """The same refusals through :class:`etl.fs.Store` on a non-local URL (fsspec memory://)."""
    import uuid

    from etl.export import check_out_dir
    from etl.fs import Store, is_within

    store, base = Store(), f"memory://dfn-{uuid.uuid4().hex[:8]}"
    store.write_text(f"{base}/home/notes.txt", "keep me")
    store.write_text(f"{base}/lh/{BRONZE}/_delta_log/00000000000000000000.json", "{}")
    lake_root = f"{base}/lh"
    for out, message in [(f"{base}/home", "not empty"), (f"{base}/lh/", "is the lakehouse"),
                         (f"{base}/lh/./", "is the lakehouse"), (base, "holds the lakehouse"),
                         (f"{base}/lh/{BRONZE}", "is a Delta table"),
                         (f"{base}/lh/{BRONZE}/x", "inside")]:
        with pytest.raises(ConfigError, match=message):
            check_out_dir(out, store, lake_root)
    check_out_dir(f"{base}/lh/export", store, lake_root)  # absent: fine
    store.write_text(f"{base}/lh/export/_dfn_export", export.FORMAT)
    check_out_dir(f"{base}/lh/export", store, lake_root)  # an export: fine
    assert is_within("s3a://bucket/lh", "s3://bucket/lh/") and not is_within(
        "s3a://bucket/lh2", "s3a://bucket/lh")


@pytest.mark.slow
def test_run_export_edge(spark, lake):
    rows = gold_rows(6)
    bronze = gold_df(spark, rows).drop("score")
    lake.overwrite(bronze, BRONZE)
    kept = {r[0] for r in rows[::2]}
    sel = spark.createDataFrame([(r[0], r[0] in kept, None if r[0] in kept else "aspect", r[6])
                                 for r in rows],
                                "uid string, kept boolean, drop_reason string, score double")
    lake.overwrite(sel, SELECTION)
    cfg = Config(lakehouse=LakehouseConf(root=str(lake.root)),
                 export=ExportConf(out_dir="export", shard_size=2))
    manifest = run_export(lake, cfg, "run-e")
    gold = lake.read(GOLD)
    assert {r.uid for r in gold.collect()} == kept and "score" in gold.columns
    assert manifest == read_export(lake.resolve("export"))
    assert sorted(uid_strings(np.load(manifest["uids_npy"]["path"]))) == sorted(kept)
    assert manifest["webdataset"]["samples"] == len([r for r in rows[::2] if r[3] is not None])
    assert manifest["gold_version"] == lake.version(GOLD)
    lineage = manifest["lineage"]  # what it read, pinned: versions, models, rule, dedup
    assert lineage["tables"][BRONZE] == lake.version(BRONZE)
    assert lineage["tables"][SELECTION] == lake.version(SELECTION)
    assert lineage["tables"]["silver_scores"] is None and lineage["previous_export"] is None
    assert lineage["selection"] == {"rule": None, "cuts": None}  # not made by `select`
    from udfs.models import resolve_conf

    assert [m["model_id"] for m in lineage["models"]] == [
        resolve_conf(m).model_id for m in cfg.score.models]
    assert [m["weights_sha256"] for m in lineage["models"]] == [None]  # nothing scored here
    assert lineage["dedup"]["near_threshold"] == cfg.dedup.near_threshold
    assert lineage["package"]
    stats = {r.metric: r.value for r in lake.read(RUN_STATS).where("step = 'export'").collect()}
    assert stats["gold_pairs"] == len(kept)


def test_gold_is_prefiltered_by_a_bloom_filter_of_the_kept_uids_and_stays_exact(spark, lake):
    rows = gold_rows(40, null_image=3)
    lake.overwrite(gold_df(spark, rows, parts=4), BRONZE)  # with a `score` of its own
    flags = [True, False, None]  # a null `kept` is not kept
    sel = spark.createDataFrame([(r[0], flags[i % 3], 0.5 + i) for i, r in enumerate(rows)],
                                "uid string, kept boolean, score double").repartition(3)
    lake.overwrite(sel, SELECTION)
    selection, bronze = lake.read(SELECTION), lake.read(BRONZE)
    expected = (bronze.drop("score")
                .join(selection.where("kept").select("uid", "score"), "uid").collect())
    n_kept = export.kept_rows(selection).count()
    assert n_kept == len(expected) == len(range(0, len(rows), 3))
    conf = export.prefilter_conf(spark, n_kept)
    assert conf["spark.sql.optimizer.runtime.bloomFilter.expectedNumItems"] == str(n_kept)
    no_broadcast = {"spark.sql.autoBroadcastJoinThreshold": "-1",
                    "spark.sql.adaptive.autoBroadcastJoinThreshold": "-1"}  # as past its size
    with session_conf(spark, {**no_broadcast, **conf}):
        gold = export.gold_pairs(selection, bronze)
        plan = gold._jdf.queryExecution().optimizedPlan().toString()
        got = gold.collect()
    assert "might_contain" in plan  # bronze filtered at the scan, before the shuffle
    assert sorted(got) == sorted(expected)
    assert gold.columns == [*bronze.drop("score").columns, "score"]
    with session_conf(spark, {conf_key: "1" for conf_key in conf}):  # set by the user: kept
        assert export.prefilter_conf(spark, n_kept) == {}


# the pixel cap on every decode


def test_export_skips_images_over_the_cap(spark, tmp_path):
    from etl.export import as_supported, write_shards

    gif = encode(Image.new("RGB", (96, 64), (1, 2, 3)), "GIF")
    assert as_supported(gif, max_pixels=10_000)[0] == "jpg"  # re-encoded
    assert as_supported(gif, max_pixels=SMALL_CAP) is None  # over the cap: never decoded
    assert as_supported(jpeg(), max_pixels=SMALL_CAP) is None  # passed-through formats too
    assert as_supported(header_bomb()) is None
    rows = [(f"{i:032x}", f"u{i}", f"t{i}", img, 96, 64, 0.5)
            for i, img in enumerate([jpeg(), header_bomb(), gif])]
    df = spark.createDataFrame(rows, "uid string, url string, text string, image binary, "
                                     "width int, height int, score double")
    stats = write_shards(df, str(tmp_path / "shards"), shard_size=8, max_pixels=10_000)
    assert [(s["count"], s["skipped"]) for s in stats] == [(2, 1)]
