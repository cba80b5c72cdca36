"""One session-scoped local Spark with Delta for the whole suite (local[2], small, UI off)."""

from __future__ import annotations

import os
import sys

import pytest

os.environ.setdefault("PYSPARK_PYTHON", sys.executable)
os.environ.setdefault("PYSPARK_DRIVER_PYTHON", sys.executable)


@pytest.fixture(scope="session")
def spark():
    from etl.config import SparkConf
    from etl.spark import get_spark

    conf = SparkConf(master="local[2]", app_name="dfn-curate-tests", conf={
        "spark.sql.shuffle.partitions": "2",
        "spark.default.parallelism": "2",
        "spark.driver.memory": "3g",
        "spark.databricks.delta.snapshotPartitions": "1",
        "spark.sql.sources.parallelPartitionDiscovery.parallelism": "2",
    })
    session = get_spark(conf)
    yield session
    session.stop()


@pytest.fixture
def lake(spark, tmp_path):
    """A fresh, empty lakehouse folder per test."""
    from etl.config import LakehouseConf
    from etl.tables import Lakehouse

    return Lakehouse(spark, LakehouseConf(root=str(tmp_path / "lakehouse")))


@pytest.fixture(params=["driver", "executors"])
def read_on(request, monkeypatch):
    """Run a tar-shard test twice: a small source read on the driver, then on the executors."""
    from etl import readers

    if request.param == "executors":
        monkeypatch.setattr(readers, "DRIVER_READ_BYTES", -1)
    return request.param


@pytest.fixture(scope="module")
def one_torch_thread():
    """Tiny batches run far faster on one intra-op thread when the cores are shared."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
