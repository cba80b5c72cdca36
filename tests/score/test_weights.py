"""Scores tied to their weights: a digest per model, other weights under one model_id refused
or replaced, hub ids pinned to a revision."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pytest

from etl.config import Config, ConfigError, ModelConf, ScoreConf, load_config
from etl.tables import BRONZE, SILVER
from tests.helpers.models import TINY_JSON, tiny_state
from tests.helpers.score import pool_rows, write_pairs
from udfs import models


def test_hub_ids_pin_a_revision_and_say_so_in_their_digest():
    spec = models.resolve("hf-hub:org/repo@abc123")
    assert (spec.arch, spec.revision, spec.model_id) == ("hf-hub:org/repo", "abc123",
                                                         "hf-hub:org/repo@abc123")
    assert models.declared_digest(spec) == "revision:abc123"
    conf = ModelConf(name="hf-hub:org/repo", pretrained=None, model_id="dfn", revision="v2")
    assert models.resolve_conf(conf).revision == "v2"
    assert models.declared_digest(models.resolve("hf-hub:org/repo")) is None  # load to know
    assert models.declared_digest(models.resolve("ViT-B-32", "openai")) is None
    with pytest.raises(ValueError, match="keep one"):
        models.resolve("hf-hub:org/repo@a", revision="b")
    with pytest.raises(ValueError, match="hf-hub: ids only"):
        models.resolve("ViT-B-32", "openai", revision="b")
    calls = []

    def download(**kw):
        calls.append(kw)
        return "/snapshots/abc123"

    assert models.open_clip_name(spec, download) == "local-dir:/snapshots/abc123"
    assert calls[0]["repo_id"] == "org/repo" and calls[0]["revision"] == "abc123"
    cfg = load_config(None, ["score.models=[{name: 'hf-hub:org/repo', revision: abc}]"])
    assert cfg.score.models[0].revision == "abc" and cfg.score.replace is False


def test_the_weights_decision():
    from etl.score import WeightsCheck, decide_weights

    def decide(replace=False, exists=True, recorded=None, found=None):
        return decide_weights("silver", "m", "new", replace, exists, recorded, found)

    assert decide(exists=False) == WeightsCheck(record=True)  # a new table: nothing to check
    assert decide(recorded="new", found={"old": 9}) == WeightsCheck()  # O(1): the log says so
    assert decide(found={}) == WeightsCheck(record=True)  # no rows for the model yet
    assert decide(found={"new": 4}) == WeightsCheck(record=True)
    refused = decide(found={"old": 3, "new": 1})
    assert refused.refuse and "old (3 rows)" in refused.refuse and "score.replace" in refused.refuse
    assert not refused.unset and not refused.dropped  # nothing happens before the refusal
    assert decide(True, recorded="old", found={"old": 3, "new": 1, None: 2}) == WeightsCheck(
        unset=True, dropped=5, record=True)  # the stale digest goes, then the rows
    assert decide(recorded="old", found={None: 2, "new": 1}) == WeightsCheck(
        unset=True, unknown_kept=2)  # kept and reported; no digest while they remain
    assert decide(True, found={None: 2}) == WeightsCheck(dropped=2, record=True)


def test_state_digest_follows_the_weights_and_runs_on_a_worker(spark, tmp_path):
    """A ``local-dir:`` model has no declared digest: the worker hashes its state_dict."""
    from safetensors.torch import save_file

    from etl.score import model_digest

    folder = tmp_path / "tiny-dir"
    folder.mkdir()
    cfg = json.loads(open(TINY_JSON).read())
    (folder / "open_clip_config.json").write_text(json.dumps({"model_cfg": cfg}))
    save_file(tiny_state(0), str(folder / "open_clip_model.safetensors"))
    spec = models.resolve(str(folder))
    assert spec.arch.startswith("local-dir:") and models.declared_digest(spec) is None
    first = model_digest(spark, spec)
    assert first == models.state_digest(models.load(spec).model) and len(first) == 64
    save_file(tiny_state(1), str(folder / "open_clip_model.safetensors"))
    assert model_digest(spark, spec) != first


def silver_digests(lake) -> dict[str | None, int]:
    return {r[0]: r[1] for r in lake.read(SILVER).groupBy("weights_sha256").count().collect()}


@pytest.mark.slow
def test_other_weights_under_one_model_id_are_refused_or_replaced(lake, tmp_path, capsys):
    from safetensors.torch import save_file

    from etl.score import score_table

    ckpt = tmp_path / "tiny.safetensors"  # overwritten in place, like train-dfn's default out
    save_file(tiny_state(0), str(ckpt))
    write_pairs(lake, BRONZE, pool_rows(3), files=1)
    cfg = Config(lakehouse=lake.conf, score=ScoreConf(
        models=[ModelConf(TINY_JSON, str(ckpt), "tiny")], batch_size=4, device="cpu"))
    first = models.file_digest(ckpt)
    assert score_table(lake, BRONZE, SILVER, cfg, "r1")["scored[tiny]"] == 3
    assert silver_digests(lake) == {first: 3}

    save_file(tiny_state(1), str(ckpt))
    with pytest.raises(ConfigError, match="other weights.*new model_id.*score.replace=true"):
        score_table(lake, BRONZE, SILVER, cfg, "r2")
    assert silver_digests(lake) == {first: 3}  # refused before any write

    cfg.score.replace = True
    counts = score_table(lake, BRONZE, SILVER, cfg, "r3")
    assert counts["replaced[tiny]"] == 3 and counts["scored[tiny]"] == 3
    assert silver_digests(lake) == {models.file_digest(ckpt): 3}
    assert lake.read(SILVER).count() == 3
    assert recorded_digest(lake) == models.file_digest(ckpt)


def recorded_digest(lake, model_id: str = "tiny") -> str | None:
    from etl.score import weights_property

    return lake.properties(SILVER).get(weights_property(model_id))


def test_a_recorded_digest_is_checked_from_the_delta_log_alone(lake, tmp_path):
    from safetensors.torch import save_file

    from etl.score import check_weights, score_table, weights_property

    ckpt = tmp_path / "tiny.safetensors"
    save_file(tiny_state(0), str(ckpt))
    write_pairs(lake, BRONZE, pool_rows(3), files=1)
    cfg = Config(lakehouse=lake.conf, score=ScoreConf(
        models=[ModelConf(TINY_JSON, str(ckpt), "tiny")], batch_size=4, device="cpu"))
    score_table(lake, BRONZE, SILVER, cfg, "r1")
    first = models.file_digest(ckpt)
    assert recorded_digest(lake) == first
    spec = models.resolve_conf(cfg.score.models[0])
    data = list(Path(lake.path(SILVER)).glob("*.parquet"))
    assert data
    hidden = tmp_path / "hidden"
    hidden.mkdir()
    for f in data:  # a scan would now fail: the check must not read the rows
        f.rename(hidden / f.name)
    assert check_weights(lake, SILVER, spec, first, cfg.score).dropped == 0
    for f in hidden.iterdir():
        f.rename(Path(lake.path(SILVER)) / f.name)

    # other weights with score.replace: the recorded digest goes before any row is written,
    # so a run killed after the delete cannot leave it claiming rows scored with other weights
    cfg.score.replace = True
    check = check_weights(lake, SILVER, spec, "0" * 64, cfg.score)
    assert check.dropped == 3 and check.record
    assert weights_property("tiny") not in lake.properties(SILVER)
    keys = {weights_property(m) for m in ("hf-hub:org/m@v1", "hf-hub:org/m@v2", "hf-hub_org_m_v1")}
    assert len(keys) == 3 and all(re.fullmatch(r"dfn\.weights_sha256\.[\w.-]+", k) for k in keys)


def test_silver_without_the_digest_column_keeps_working(lake, tmp_path, capsys):
    from safetensors.torch import save_file

    from etl.score import score_pairs, score_table

    ckpt = tmp_path / "tiny.safetensors"
    save_file(tiny_state(0), str(ckpt))
    write_pairs(lake, BRONZE, pool_rows(3), files=1)
    cfg = Config(lakehouse=lake.conf, score=ScoreConf(
        models=[ModelConf(TINY_JSON, str(ckpt), "tiny")], batch_size=4, device="cpu"))
    old = score_pairs(lake.read(BRONZE).limit(2), cfg.score.models[0], cfg.score, "old")
    lake.overwrite(old.drop("weights_sha256"), SILVER)  # a table from before the column
    assert score_table(lake, BRONZE, SILVER, cfg, "r1")["scored[tiny]"] == 1
    assert "weights are unknown" in capsys.readouterr().out
    assert silver_digests(lake) == {None: 2, models.file_digest(ckpt): 1}
    assert recorded_digest(lake) is None  # unknown rows remain: every run scans and says so


def test_copying_a_checkpoint_keeps_its_digest(tmp_path):
    from safetensors.torch import save_file

    a, b = tmp_path / "a.safetensors", tmp_path / "b.safetensors"
    save_file(tiny_state(0), str(a))
    shutil.copy(a, b)
    assert models.declared_digest(models.resolve(TINY_JSON, str(a))) == \
        models.declared_digest(models.resolve(TINY_JSON, str(b)))
