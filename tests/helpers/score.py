"""Scoring test builders: the (uid, image, text) pair schema and literal pools of pairs."""

from __future__ import annotations

from pyspark.sql import types as T

from tests.helpers.images import jpeg

PAIR_SCHEMA = T.StructType([T.StructField("uid", T.StringType()),
                            T.StructField("image", T.BinaryType()),
                            T.StructField("text", T.StringType())])


def write_pairs(lake, table: str, rows: list[tuple], files: int) -> None:
    """Overwrite ``table`` with ``rows`` (PAIR_SCHEMA) in ``files`` partitions."""
    df = lake.spark.createDataFrame(lake.spark.sparkContext.parallelize(rows, files), PAIR_SCHEMA)
    lake.overwrite(df, table)


def pool_rows(n: int, prefix: str = "u") -> list[tuple]:
    """``n`` pairs of distinct small JPEGs and captions."""
    return [(f"{prefix}{i:03d}", jpeg(((i * 37) % 256, 90, 160), (48 + i % 5 * 8, 40)),
             f"caption {i}") for i in range(n)]
