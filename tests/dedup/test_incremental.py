"""Incremental dedup (etl/dedupinc.py): batches in any order end as one run over the pool with
the same frozen centroids; only touched clusters are compared; nothing new, no commit."""

from __future__ import annotations

import numpy as np
import pytest

from etl.config import Config, DedupConf, LakehouseConf, SelectConf
from etl.dedupinc import (
    VECTORS,
    clustering_changed,
    flag_settings,
    forget_centroids,
    load_centroids,
    run_dedup,
    save_centroids,
    vector_settings,
)
from etl.score import weights_property
from etl.tables import (
    BRONZE,
    CENTROIDS,
    DEDUP,
    DEDUP_SIGNALS,
    RUN_STATS,
    SILVER,
    Lakehouse,
    table_info,
)
from tests.dedup.test_dedup import df, unit

BRONZE_DDL = "uid string, url string, text string, sha256 string, image binary"
SILVER_DDL = "uid string, model_id string, score double, image_embedding array<float>"

# (uid, url, text, sha256, score, vector); the frozen centres are the axes e0..e3
ROWS = {
    "a1": ("u/a1", "t", "ha1", 0.5, unit(1, .2, 0, 0)),  # cluster 0: a2 is the keeper
    "a2": ("u/a2", "t", "ha2", 0.9, unit(1, .1, 0, 0)),
    "a3": ("u/a3", "t", "ha3", 0.7, unit(1, .3, 0, 0)),
    "lone": ("u/lone", "t", "hl", 0.5, unit(1, 1, 1, 1)),  # cluster 0, near nothing
    "b1": ("u/b1", "t", "hb1", 0.4, unit(0, 1, 0, .1)),  # cluster 1: a tie, b1 keeps
    "b2": ("u/b2", "t", "hb2", 0.4, unit(0, 1, 0, .1)),
    "x2": ("u/x2", "t", "HX", 0.6, unit(0, 1, 0, .5)),  # cluster 1; x1 has its bytes
    "x1": ("u/x1", "t", "HX", 0.3, unit(0, .5, 0, 1)),  # cluster 3
    "w": ("u/w", "t", "hw", 0.9, unit(0, 0, 1, .05)),  # cluster 2
    # y1, y2 share (url, text); z has y1's bytes and a better score. Without z, y2 is y1's
    # exact_url_text copy; once z comes, y1 is z's exact_sha256 copy and y2, no longer
    # excluded, is a near copy of w: z touches cluster 2 through y2 alone
    "y1": ("u/Y", "T", "H1", 0.8, unit(.1, 0, 0, 1)),
    "y2": ("u/Y", "T", "H2", 0.6, unit(0, 0, 1, .06)),
    "z": ("u/z", "t", "H1", 0.95, unit(0, .1, 0, 1)),
}
BATCHES = {"A": ["a1", "b1", "y1", "y2", "w", "x1"], "B": ["a3", "b2", "z"],
           "C": ["a2", "x2", "lone"]}


def config(root: str, **dedup) -> Config:
    conf = DedupConf(n_clusters=4, kmeans_iters=2, near_threshold=0.95, decontaminate=False)
    for k, v in dedup.items():
        setattr(conf, k, v)
    return Config(lakehouse=LakehouseConf(root=root), select=SelectConf(model_id="m1"),
                  dedup=conf)


def ingest(spark, lake: Lakehouse, rows: dict, uids: list[str]) -> None:
    """Append rows to bronze and their scores and embeddings to silver (two partitions)."""
    lake.append(df(spark, [(u, *rows[u][:3], None) for u in uids], BRONZE_DDL), BRONZE)
    lake.append(df(spark, [(u, "m1", rows[u][3], rows[u][4]) for u in uids], SILVER_DDL), SILVER)


def flags(lake: Lakehouse) -> dict:
    return {r.uid: (r.dup_of, r.dup_reason) for r in lake.read(DEDUP).collect()}


def fresh(spark, path, centers: np.ndarray) -> Lakehouse:
    lake = Lakehouse(spark, LakehouseConf(root=str(path)))
    save_centroids(lake, {"model": (centers, 100)})
    return lake


@pytest.mark.slow
def test_batches_in_any_order_end_as_one_run(spark, tmp_path):
    once = fresh(spark, tmp_path / "once", np.eye(4, dtype=np.float32))
    ingest(spark, once, ROWS, list(ROWS))
    cfg = config(str(once.root))
    counts = run_dedup(once, cfg, "r0")
    want = flags(once)
    assert {u: f for u, f in want.items() if f[0]} == {
        "a1": want["a1"], "a3": ("a2", "near_model"), "b2": ("b1", "near_model"),
        "y2": ("w", "near_model"), "y1": ("z", "exact_sha256"), "x1": ("x2", "exact_sha256")}
    assert want["a1"][0] in {"a2", "a3"} and counts["rows_new"] == counts["pool"] == 12
    for order in ("ABC", "CBA", "BCA"):
        lake = fresh(spark, tmp_path / order, np.eye(4, dtype=np.float32))
        cfg = config(str(lake.root))
        for batch in order:
            ingest(spark, lake, ROWS, BATCHES[batch])
            got = run_dedup(lake, cfg, f"r{batch}")
            assert got["rows_new"] == len(BATCHES[batch])
        assert flags(lake) == want, order
        assert lake.read(DEDUP).count() == len(ROWS)
    # BCA's last batch (a1, b1, y1, y2, w, x1) touches clusters 0 (a1), 1 (b1), 2 (w, y2) and
    # 3 (y1, x1); the excluded rows (exact copies y1, x1) are not compared
    assert (got["clusters_touched"], got["rows_compared"]) == (4, 10)


def grid_rows(n_clusters: int, per: int, dim: int = 16) -> dict:
    """``per`` rows near each axis: far from each other (cosine < 0.95), each its own keeper."""
    rows = {}
    for c in range(n_clusters):
        for i in range(per):  # cosine 0.8 within a cluster, at most 0.4 across
            v = np.zeros(dim)
            v[c], v[(c + 1 + i) % dim] = 1.0, 0.5
            rows[f"c{c:02d}r{i}"] = (f"u/c{c}r{i}", "t", f"h{c}.{i}", 0.5, unit(*v))
    return rows


@pytest.mark.slow
def test_compared_rows_stay_flat_as_the_pool_grows_4x(spark, tmp_path):
    """Pools of 4 and 16 clusters of 5 rows; the same increment (a better copy of c00r0 and a
    new row, both in cluster 0) compares cluster 0's rows only at either size; re-running
    then commits nothing; --refit recomputes every row."""
    extra = {"new0": ("u/new0", "t", "hn0", 0.9, grid_rows(1, 1)["c00r0"][4]),
             "new1": ("u/new1", "t", "hn1", 0.5, unit(*([1] + [0] * 14 + [-1])))}
    compared = []
    for n in (4, 16):
        rows = grid_rows(n, 5)
        lake = fresh(spark, tmp_path / str(n), np.eye(16, dtype=np.float32))
        cfg = config(str(lake.root), n_clusters=16)
        ingest(spark, lake, rows, list(rows))
        first = run_dedup(lake, cfg, "r1")
        assert first["rows_compared"] == first["pool"] == 5 * n and first.get("near_model", 0) == 0
        ingest(spark, lake, {**rows, **extra}, list(extra))
        before = lake.version(DEDUP)
        got = run_dedup(lake, cfg, "r2")
        assert (got["rows_new"], got["clusters_touched"], got["pool"]) == (2, 1, 5 * n + 2)
        compared.append(got["rows_compared"])
        out = flags(lake)
        assert out["c00r0"] == ("new0", "near_model")  # the better copy displaced the keeper
        assert sum(1 for f in out.values() if f[0]) == 1 and lake.version(DEDUP) == before + 1
    assert compared == [7, 7]  # cluster 0's 5 rows and the 2 new ones, at 20 and 80 rows

    tables = (BRONZE, SILVER, DEDUP, DEDUP_SIGNALS, CENTROIDS)
    versions = {t: lake.version(t) for t in tables}
    again = run_dedup(lake, cfg, "r3")
    assert (again["rows_new"], again["rows_compared"]) == (0, 0)
    assert {t: lake.version(t) for t in tables} == versions  # nothing new: no table commit
    stats = {r.metric: r.value for r in lake.read(RUN_STATS).where("run_id = 'r3'").collect()}
    assert stats["work:new"] == stats["work:touched"] == 0 and stats["work:pool"] == 82
    # still recorded as covering bronze
    assert stats[table_info(DEDUP).version_metric()] == lake.version(BRONZE)

    # rescoring under the same model_id (score.replace) changes the weights digest: recompute
    lake.set_properties(SILVER, {weights_property("m1"): "rescored"})
    assert run_dedup(lake, cfg, "r3b")["rows_compared"] == 82
    # a --refit killed after saving its centres: the signals' centres differ, so redo
    save_centroids(lake, {"model": (np.roll(np.eye(16, dtype=np.float32), 1, axis=0), 100)})
    redo = run_dedup(lake, cfg, "r3c")
    assert (redo["rows_new"], redo["rows_compared"], redo["clusters_touched"]) == (82, 82, 16)

    refit = run_dedup(lake, cfg, "r4", refit=True)  # 82 rows < 2 x 1,000: one cluster
    assert (refit["rows_new"], refit["rows_compared"], refit["clusters_touched"]) == (82, 82, 1)
    assert lake.read(CENTROIDS).count() == 1 and flags(lake)["c00r0"] == ("new0", "near_model")


@pytest.mark.slow
def test_fingerprints_follow_weights_centres_and_clustering(spark, tmp_path):
    """The settings fingerprints change with the model's weights digest and the frozen
    centres; a changed n_clusters/kmeans_iters asks for a refit; a takedown's
    forget_centroids deletes the centres table with its files."""
    lake = fresh(spark, tmp_path, np.eye(4, dtype=np.float32))
    lake.append(df(spark, [("a1", "m1", 0.5, ROWS["a1"][4])], SILVER_DDL, parts=1), SILVER)
    cfg = config(str(lake.root))
    vec = vector_settings(lake, cfg, ["model"], ["model"])
    flag = flag_settings(lake, cfg, ["model"], False)
    lake.set_properties(SILVER, {weights_property("m1"): "d2"})
    vec2 = vector_settings(lake, cfg, ["model"], ["model"])
    assert vec2 != vec and flag_settings(lake, cfg, ["model"], False) != flag
    save_centroids(lake, {"model": (np.eye(4, dtype=np.float32)[::-1].copy(), 100)})
    assert vector_settings(lake, cfg, ["model"], ["model"]) != vec2
    assert not clustering_changed(vec2, cfg) and not clustering_changed(None, cfg)
    assert clustering_changed(vec2, config(str(lake.root), n_clusters=8))
    assert clustering_changed(vec2, config(str(lake.root), kmeans_iters=3))
    assert VECTORS == "dfn.dedup.vectors"
    folder = lake.path(CENTROIDS)
    assert forget_centroids(lake) and not lake.exists(CENTROIDS)
    assert load_centroids(lake, "model") is None and not lake.store.exists(folder)
    assert not forget_centroids(lake)
    save_centroids(lake, {"model": (np.eye(4, dtype=np.float32), 10)})  # refit: a new table
    assert load_centroids(lake, "model").shape == (4, 4)
