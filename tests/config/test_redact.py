"""Redaction (etl/redact.py): which names are credentials, and URLs, structures and free text
with their credentials replaced while everything else stays as it was."""

from __future__ import annotations

import pytest

from etl.config import Config, SourceConf, load_config, to_dict
from etl.redact import REDACTED, is_secret_key, redact, redact_text, redact_url

SECRET_KEYS = [
    "spark.hadoop.fs.s3a.secret.key", "spark.hadoop.fs.s3a.access.key",
    "spark.hadoop.fs.s3a.session.token", "fs.s3a.encryption.key",
    "fs.s3a.server-side-encryption.key", "spark.hadoop.fs.s3a.bucket.b1.secret.key",
    "fs.azure.account.key.acct.dfs.core.windows.net",
    "fs.azure.sas.container.acct.blob.core.windows.net",
    "fs.azure.account.oauth2.client.secret", "fs.gs.auth.service.account.private.key",
    "fs.gs.auth.service.account.private.key.id",
    "google.cloud.auth.service.account.json.private.key",
    "spark.kubernetes.authenticate.submission.oauthToken", "spark.authenticate.secret",
    "spark.ssl.keyStorePassword", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY",
    "AWS_SESSION_TOKEN", "DATABRICKS_TOKEN", "HF_TOKEN", "password", "db_passwd", "api_key",
    "apiKey", "x-api-key", "token", "sas_token", "sasToken", "accessToken", "credentials",
    "Authorization", "auth", "X-Amz-Credential", "X-Amz-Signature", "X-Amz-Security-Token",
    "AWSAccessKeyId", "Signature", "sig",
]
PLAIN_KEYS = [
    "max_caption_chars", "tokenizer", "tokenizer_name", "max_tokens", "n_tokens", "token_count",
    "keep_fraction", "model_id", "user_id", "x-other", "author", "monkey", "keystore",
    "near_signals", "uid_column", "spark.sql.shuffle.partitions", "spark.authenticate",
    "spark.hadoop.fs.s3a.endpoint", "spark.hadoop.fs.s3a.path.style.access",
    "spark.hadoop.fs.s3a.aws.credentials.provider", "fs.s3a.connection.ssl.enabled",
    "fs.azure.account.auth.type", "fs.azure.account.oauth.provider.type",
    "google.cloud.auth.service.account.enable",
    "google.cloud.auth.service.account.json.keyfile",
    "spark.kubernetes.authenticate.driver.serviceAccountName", "spark.remote",
]


@pytest.mark.parametrize("key", SECRET_KEYS)
def test_secret_key_names(key):
    assert is_secret_key(key)


@pytest.mark.parametrize("key", PLAIN_KEYS)
def test_plain_key_names(key):
    assert not is_secret_key(key)


def config_keys(node: object, prefix: str = "") -> list[str]:
    """Every key of a plain-dict config, dotted, list items' keys under their list's key."""
    out = []
    items = node.items() if isinstance(node, dict) else []
    for key, value in items:
        out.append(f"{prefix}{key}")
        for child in value if isinstance(value, list) else [value]:
            out += config_keys(child, f"{prefix}{key}.")
    return out


def test_no_config_key_of_the_project_is_secret():
    """Redaction never hides an ordinary setting of this project (the report shows them)."""
    keys = config_keys(to_dict(Config()))
    assert len(keys) > 80 and "ingest.sources.max_member_bytes" in keys
    assert [k for k in keys if is_secret_key(k)] == []


@pytest.mark.parametrize("url, want", [
    ("sc://h:443/;token=abc;user_id=u", "sc://h:443/;token=***;user_id=u"),
    ("sc://h:443;token=abc", "sc://h:443;token=***"),
    ("sc://dbc.cloud.databricks.com:443/;token=dapiXXXX;x-other=1;x-databricks-cluster-id=c1",
     "sc://dbc.cloud.databricks.com:443/;token=***;x-other=1;x-databricks-cluster-id=c1"),
    ("s3a://AKIA:SECRET@bucket/x", "s3a://***@bucket/x"),
    ("s3a://AKIA:wJal/K7MD/bPxR@bucket/x", "s3a://***@bucket/x"),  # a / in the secret
    ("https://user:pa55@host.example/p?q=1", "https://***@host.example/p?q=1"),
    ("https://ghp_tok@github.com/o/r.git", "https://***@github.com/o/r.git"),
    ("https://b.s3.amazonaws.com/k.jpg?X-Amz-Algorithm=AWS4-HMAC-SHA256"
     "&X-Amz-Credential=AKIA%2F20240101%2Fus-east-1&X-Amz-Date=20240101T000000Z"
     "&X-Amz-Expires=3600&X-Amz-SignedHeaders=host&X-Amz-Security-Token=FwoG"
     "&X-Amz-Signature=deadbeef",
     "https://b.s3.amazonaws.com/k.jpg?X-Amz-Algorithm=AWS4-HMAC-SHA256"
     "&X-Amz-Credential=***&X-Amz-Date=20240101T000000Z"
     "&X-Amz-Expires=3600&X-Amz-SignedHeaders=host&X-Amz-Security-Token=***"
     "&X-Amz-Signature=***"),
    ("https://b.s3.amazonaws.com/k?AWSAccessKeyId=AKIA&Expires=1&Signature=c2ln",
     "https://b.s3.amazonaws.com/k?AWSAccessKeyId=***&Expires=1&Signature=***"),
    ("https://acct.blob.core.windows.net/c/b.jpg?sv=2022-11-02&se=2024&sp=r&sig=abc%3D",
     "https://acct.blob.core.windows.net/c/b.jpg?sv=2022-11-02&se=2024&sp=r&sig=***"),
    ("https://maps.example/api?key=AIzaXYZ&q=x#frag", "https://maps.example/api?key=***&q=x#frag"),
])
def test_urls_lose_their_credentials(url, want):
    assert redact_url(url) == want
    assert redact_url(want) == want  # redacting twice changes nothing


@pytest.mark.parametrize("url", [
    "s3a://bucket/lake/root", "abfss://container@acct.dfs.core.windows.net/lake",
    "gs://b/export/{00000..00003}.tar", "dbfs:/Volumes/main/x", "/tmp/lake", "sc://localhost:15002",
    "sc://h:443/;user_id=u;session_id=abc", "https://host:8443/a@b/c", "s3a://b/img@2x.png",
    "https://huggingface.co/org/repo?revision=main", "s3a://b/tbl/date=2024-01-01/part",
])
def test_urls_without_credentials_come_back_unchanged(url):
    assert redact_url(url) == url
    assert redact_text(url) == url


def test_nested_config_keeps_ordinary_values_and_hides_secret_ones():
    raw = {"spark": {"master": "local[2]", "remote": "sc://h:443/;token=T1;user_id=u",
                     "conf": {"spark.hadoop.fs.s3a.secret.key": "S2",
                              "spark.hadoop.fs.s3a.access.key": "A3",
                              "spark.hadoop.fs.s3a.endpoint": "http://minio:9000",
                              "spark.sql.shuffle.partitions": "8"}},
           "lakehouse": {"root": "s3a://AKIA:S4@bucket/lh", "catalog": None},
           "ingest": {"sources": [{"path": "https://h/x.parquet?X-Amz-Signature=S5",
                                   "max_caption_chars": 10}]},
           "credentials": {"user": "u", "keys": ["K6", None], "on": True},
           "note": "set fs.s3a.secret.key=S7 to read", "count": 3}
    got = redact(raw)
    assert got == {
        "spark": {"master": "local[2]", "remote": "sc://h:443/;token=***;user_id=u",
                  "conf": {"spark.hadoop.fs.s3a.secret.key": REDACTED,
                           "spark.hadoop.fs.s3a.access.key": REDACTED,
                           "spark.hadoop.fs.s3a.endpoint": "http://minio:9000",
                           "spark.sql.shuffle.partitions": "8"}},
        "lakehouse": {"root": "s3a://***@bucket/lh", "catalog": None},
        "ingest": {"sources": [{"path": "https://h/x.parquet?X-Amz-Signature=***",
                                "max_caption_chars": 10}]},
        "credentials": {"user": REDACTED, "keys": [REDACTED, None], "on": True},
        "note": "set fs.s3a.secret.key=*** to read", "count": 3}
    assert raw["spark"]["conf"]["spark.hadoop.fs.s3a.secret.key"] == "S2"  # a copy


def test_a_config_object_redacts_like_its_dict():
    cfg = load_config(overrides=[
        "spark.conf={spark.hadoop.fs.s3a.secret.key: S1, spark.sql.shuffle.partitions: '4'}"])
    cfg.ingest.sources = [SourceConf(format="csv", path="s3a://AKIA:S2@b/in.csv")]
    got = redact(cfg)
    assert got["spark"]["conf"] == {"spark.hadoop.fs.s3a.secret.key": REDACTED,
                                    "spark.sql.shuffle.partitions": "4"}
    assert got["ingest"]["sources"][0]["path"] == "s3a://***@b/in.csv"
    assert got["select"] == to_dict(cfg)["select"]  # ordinary sections untouched
    assert redact(Config()) == to_dict(Config())  # the defaults hold no credential


@pytest.mark.parametrize("text, want", [
    ("fs.s3a.secret.key=abc", "fs.s3a.secret.key=***"),
    ("conf: spark.hadoop.fs.s3a.secret.key=abc more", "conf: spark.hadoop.fs.s3a.secret.key=*** more"),
    ("AWS_SECRET_ACCESS_KEY=zz AWS_REGION=us-east-1", "AWS_SECRET_ACCESS_KEY=*** AWS_REGION=us-east-1"),
    ("spark:\n  conf:\n    spark.hadoop.fs.s3a.session.token: FwoG\n    x: 1\n",
     "spark:\n  conf:\n    spark.hadoop.fs.s3a.session.token: ***\n    x: 1\n"),
    ("{'spark.hadoop.fs.s3a.secret.key': 'a b', 'x': 1}",
     "{'spark.hadoop.fs.s3a.secret.key': '***', 'x': 1}"),
    ('{"password": "p w", "user": "u"}', '{"password": "***", "user": "u"}'),
    ("Authorization: Bearer xyz rest", "Authorization: *** rest"),
    ("cannot reach sc://h:443/;token=abc;x=1 (refused)", "cannot reach sc://h:443/;token=***;x=1 (refused)"),
    ("lakehouse.root: 's3a://AKIA:SK@b/lh' is wrong", "lakehouse.root: 's3a://***@b/lh' is wrong"),
    ("ingest.max_caption_chars: must be > 0, got -1", "ingest.max_caption_chars: must be > 0, got -1"),
    ("tokenizer=bpe max_tokens=77 created 2024-05-01T12:00:00+00:00",
     "tokenizer=bpe max_tokens=77 created 2024-05-01T12:00:00+00:00"),
])
def test_free_text(text, want):
    assert redact_text(text) == want


def test_leaves_other_values_alone():
    assert redact([1, 2.5, None, True, ("a", "b")]) == [1, 2.5, None, True, ("a", "b")]
    assert redact("plain caption: a dog on a beach") == "plain caption: a dog on a beach"
