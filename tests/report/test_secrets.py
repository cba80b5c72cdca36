"""No credential reaches an artifact: the report page, export manifests, error messages, the
lakehouse's files and tables, or the console, whatever the config carries."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest

from etl.config import ConfigError, ExportConf, load_config
from etl.export import check_out_dir, export_files, read_export
from etl.fs import Store
from etl.funnel import Funnel
from etl.report import ReportData, Tile, render, shown_config
from etl.tables import TABLES, Lakehouse
from tests.helpers.pipeline import tiny_overrides, tiny_weights

SPARK_SECRETS = {"spark.hadoop.fs.s3a.secret.key": "FAKESECRET1",
                 "spark.hadoop.fs.s3a.access.key": "FAKEACCESS2",
                 "spark.hadoop.fs.s3a.session.token": "FAKETOKEN3"}
REMOTE = "sc://connect.example:443/;token=FAKETOKEN4;x-other=1"
TARGETS_URL = "folder:s3a://AKIA:FAKEPASS5@bucket/targets"  # a URL the tiny run never opens
FAKES = [*SPARK_SECRETS.values(), "FAKETOKEN4", "FAKEPASS5", "FAKESECRET6"]


def leaks(text: str | bytes) -> list[str]:
    """The fake secrets found in ``text``."""
    data = text.encode() if isinstance(text, str) else text
    return [f for f in FAKES if f.encode() in data]


def secret_overrides() -> list[str]:
    conf = ", ".join(f"{k}: {v}" for k, v in SPARK_SECRETS.items())
    return [f"spark.conf={{{conf}}}", f"targets.source={TARGETS_URL}"]


# ---- the pieces, on literal values ----------------------------------------------------------


def test_report_config_hides_the_remote_token_and_spark_conf_secrets():
    cfg = load_config(overrides=secret_overrides())
    assert hasattr(cfg.spark, "remote"), "SparkConf.remote (spark.remote) is missing"
    cfg = dataclasses.replace(cfg, spark=dataclasses.replace(cfg.spark, remote=REMOTE))
    text = shown_config(cfg)
    assert leaks(text) == []
    assert "remote: sc://connect.example:443/;token=***;x-other=1" in text
    assert "spark.hadoop.fs.s3a.secret.key: '***'" in text
    assert "source: folder:s3a://***@bucket/targets" in text
    assert f"keep_fraction: {cfg.select.keep_fraction}" in text  # ordinary settings shown


def test_report_page_redacts_every_text_it_shows():
    cfg = load_config(overrides=secret_overrides())
    cfg = dataclasses.replace(cfg, spark=dataclasses.replace(cfg.spark, remote=REMOTE))
    data = ReportData(
        funnel=Funnel(2, (), 2), histogram=None,
        above=[Tile("u1", "caption with fs.s3a.secret.key=FAKESECRET1", "note")],
        run_stats=[("export", "r1", "gold_pairs=2")],
        versions=[("gold_pairs", 3, "delta.`s3a://AKIA:FAKESECRET6@b/lh/gold_pairs`")],
        config=shown_config(cfg))
    page = render(data, {}, "report of sc://h:443/;token=FAKETOKEN4")
    assert leaks(page) == []
    assert "delta.`s3a://***@b/lh/gold_pairs`" in page and "preset: datacomp_basic" in page


def test_export_manifest_and_refusals_hide_credentials(spark, tmp_path):
    gold = spark.createDataFrame([("a",), ("b",)], "uid string")
    conf = ExportConf(webdataset=False, uids_npy=False, urls_parquet=False)
    table = "delta.`s3a://AKIA:FAKESECRET6@bucket/lh/gold_pairs`"
    manifest = export_files(gold, str(tmp_path / "out"), conf, "r1", {"gold_table": table})
    written = (tmp_path / "out" / "manifest.json").read_text()
    assert leaks(written) == [] and leaks(json.dumps(manifest)) == []
    assert manifest["gold_table"] == "delta.`s3a://***@bucket/lh/gold_pairs`"
    assert read_export(str(tmp_path / "out")) == manifest and manifest["kept"] == 2

    root = "s3a://AKIA:FAKESECRET6@bucket/lh"
    with pytest.raises(ConfigError) as err:  # refused before any request to the store
        check_out_dir(root + "/..", Store(), root)
    assert "lakehouse root" in str(err.value) and leaks(str(err.value)) == []
    assert "s3a://***@bucket/lh" in str(err.value)


# ---- end to end -----------------------------------------------------------------------------


def table_leaks(lake: Lakehouse) -> dict[str, list[str]]:
    """table -> fake secrets found in any of its string columns."""
    from pyspark.sql import functions as F

    found = {}
    for table in (t.name for t in TABLES if lake.exists(t.name)):
        df = lake.read(table)
        cols = [f.name for f in df.schema.fields if f.dataType.typeName() == "string"]
        if not cols:
            continue
        hit = [F.max(F.col(c).contains(fake).cast("int")).alias(f"{c}|{fake}")
               for c in cols for fake in FAKES]
        row = df.agg(*hit).first().asDict()
        bad = sorted(k for k, v in row.items() if v)
        if bad:
            found[table] = bad
    return found


def file_leaks(*folders: Path) -> dict[str, list[str]]:
    """file -> fake secrets found in its bytes, for every file under ``folders``."""
    found = {}
    for folder in folders:
        for path in sorted(p for p in folder.rglob("*") if p.is_file()):
            bad = leaks(path.read_bytes())
            if bad:
                found[str(path)] = bad
    return found


@pytest.mark.slow
def test_a_run_and_its_report_write_no_secret_anywhere(spark, tmp_path, capfd):
    """The tiny pipeline and the report, with fake credentials in ``spark.conf`` (also set on
    the running session while the run lasts, as a cluster would hold them) and in a URL of the
    config: no file under the lakehouse root or the report folder, no table value and no
    console line carries one, while the report shows the redacted keys."""
    from etl.jobs import report, run
    from etl.spark import session_conf

    root, out = tmp_path / "lakehouse", tmp_path / "report"
    overrides = [*tiny_overrides(root, tiny_weights(tmp_path)), *secret_overrides()]
    argv = ["--conf", "conf/local.yaml", *[a for o in overrides for a in ("--set", o)]]
    with session_conf(spark, SPARK_SECRETS):
        run.main([*argv, "--run-id", "secrets"])
        page = Path(report.main([*argv, "--out", str(out), "--examples", "2"]))
    console = capfd.readouterr()

    assert file_leaks(root, out) == {}
    assert leaks(console.out) == [] and leaks(console.err) == []
    lake = Lakehouse(spark, load_config(overrides=overrides).lakehouse)
    assert table_leaks(lake) == {}
    # what was searched holds what it should: the redacted config, a run's files and lines
    html = page.read_text()
    assert "spark.hadoop.fs.s3a.secret.key: &#x27;***&#x27;" in html
    assert "folder:s3a://***@bucket/targets" in html
    assert (root / "export" / "manifest.json").exists() and "export: gold_pairs" in console.out
