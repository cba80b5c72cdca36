"""Config loading: defaults, overrides, and errors that name the key."""

from __future__ import annotations

import pytest

from etl.config import ConfigError, load_config


def write(tmp_path, text: str):
    p = tmp_path / "c.yaml"
    p.write_text(text)
    return p


def test_default_config_loads_and_is_typed():
    cfg = load_config()
    assert cfg.spark.master == "local[2]"
    assert cfg.score.models[0].model_id == "dfn-tiny"
    assert isinstance(cfg.select.keep_fraction, float)


def test_set_overrides_are_typed(tmp_path):
    cfg = load_config(write(tmp_path, "score: {batch_size: 8}"),
                      ["score.batch_size=32", "select.keep_fraction=0.15", "lakehouse.root=/x"])
    assert cfg.score.batch_size == 32 and cfg.select.keep_fraction == 0.15
    assert cfg.lakehouse.root == "/x"


@pytest.mark.parametrize("text, needle", [
    ("score: {batchsize: 3}", "unknown key 'score.batchsize'"),
    ("nonsense: 1", "unknown key 'nonsense'"),
    ("score: {batch_size: many}", "score.batch_size: expected int"),
    ("score: {embeddings: 3}", "score.embeddings: expected bool"),
    ("select: {keep_fraction: 1.5}", "select.keep_fraction"),
    ("select: {min_score: 0.2, keep_fraction: 0.1}", "not both"),
    ("ingest: {sources: [{format: xls, path: a}]}", "not one of"),
    ("ingest: {sources: [{format: csv}]}", "path is required"),
    ("score: {device: tpu}", "score.device"),
    ("- a list", "top level must be a mapping"),
])
def test_bad_config_fails_with_the_key(tmp_path, text, needle):
    with pytest.raises(ConfigError, match=None) as err:
        load_config(write(tmp_path, text))
    assert needle in str(err.value)


def test_unknown_override_key_is_rejected(tmp_path):
    with pytest.raises(ConfigError, match="allowed keys under score"):
        load_config(None, ["score.nope=1"])


def test_override_needs_equals():
    with pytest.raises(ConfigError, match="expected key=value"):
        load_config(None, ["score.batch_size"])


def test_missing_file():
    with pytest.raises(ConfigError, match="does not exist"):
        load_config("conf/nope.yaml")


def test_unknown_key_fails_the_job_before_spark(capsys):
    from etl.jobs import ingest

    with pytest.raises(SystemExit) as exc:
        ingest.main(["--set", "ingest.bogus=1"])
    assert exc.value.code == 2
    assert "unknown key 'ingest.bogus'" in capsys.readouterr().err


@pytest.mark.parametrize("root", ["s3a://bucket/lake/", "abfss://c@acct.dfs.core.windows.net/lake",
                                  "dbfs:/mnt/lake"])
def test_url_roots_are_kept_as_urls(root):
    from etl.config import LakehouseConf
    from etl.tables import Lakehouse

    lake = Lakehouse(None, LakehouseConf(root=root))
    assert lake.path("bronze_pairs") == root.rstrip("/") + "/bronze_pairs"
    assert lake.name("gold_pairs") == f"delta.`{root.rstrip('/')}/gold_pairs`"
    assert lake.resolve("export") == root.rstrip("/") + "/export"
    assert lake.resolve("gs://other/x") == "gs://other/x"


def test_relative_roots_are_made_absolute(tmp_path, monkeypatch):
    from etl.config import LakehouseConf
    from etl.tables import Lakehouse

    monkeypatch.chdir(tmp_path)
    lake = Lakehouse(None, LakehouseConf(root="lh"))
    assert lake.path("run_stats") == str(tmp_path.resolve() / "lh" / "run_stats")
    assert lake.resolve("report") == str(tmp_path.resolve() / "lh" / "report")
    assert lake.resolve("/abs/out") == "/abs/out"


@pytest.mark.parametrize("name", ["local.yaml", "cluster.yaml", "databricks.yaml", "s3.yaml"])
def test_shipped_configs_load(name):
    from etl.config import PROJECT_ROOT, config_urls

    cfg = load_config(PROJECT_ROOT / "conf" / name)
    if name == "s3.yaml":
        assert set(config_urls(cfg)) == {"lakehouse.root", "export.out_dir",
                                         "ingest.sources[0].path", "ingest.eval_sources[0].path"}


def test_unknown_url_scheme_fails_before_any_work_naming_key_and_scheme(spark):
    from etl.fs import ConnectorError
    from etl.spark import check_connectors

    with pytest.raises(ConnectorError, match=r"ingest\.sources\[0\]\.path: .*scheme 'nosuch'"):
        check_connectors(spark, {"ingest.sources[0].path": "nosuch://bucket/pool"})
    # a session built without hadoop-aws says which connector to add for s3a
    with pytest.raises(ConnectorError, match=r"lakehouse\.root: Spark has no filesystem.*hadoop-aws"):
        check_connectors(spark, {"lakehouse.root": "s3a://bucket/lake"})


def test_unreachable_endpoint_fails_fast_naming_it():
    import time

    from etl.devcluster import free_port
    from etl.fs import ConnectorError, Store
    from etl.spark import probe

    endpoint = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    store = Store.from_conf({"spark.hadoop.fs.s3a.endpoint": endpoint,
                             "spark.hadoop.fs.s3a.access.key": "k",
                             "spark.hadoop.fs.s3a.secret.key": "s"})
    t0 = time.monotonic()
    with pytest.raises(ConnectorError, match=rf"lakehouse\.root: cannot access s3a://b/lake at {endpoint}"):
        probe(store, "lakehouse.root", "s3a://b/lake")
    assert time.monotonic() - t0 < 30


@pytest.mark.parametrize("overrides, needle", [
    (["spark.remote=http://host:15002"], "spark.remote: sc://host:port"),
    (["lakehouse.catalog=main"], "lakehouse.catalog: set lakehouse.schema too"),
    (["lakehouse.schema=main.dfn"], "lakehouse.schema: 'main.dfn' must be one name"),
    (["lakehouse.catalog=dev-ml", "lakehouse.schema=dfn"], "lakehouse.catalog: 'dev-ml'"),
])
def test_remote_and_catalog_names_are_checked_up_front(overrides, needle):
    with pytest.raises(ConfigError, match=needle):
        load_config(None, overrides)
    assert load_config(None, ["spark.remote=sc://h:443/;token=x", "lakehouse.catalog=main",
                              "lakehouse.schema=dfn_curate"]).lakehouse.schema == "dfn_curate"
